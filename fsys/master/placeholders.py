"""Placeholders: remote open file descriptions as real kernel objects in the program.

A file the slave opened is represented in the program by one end of an AF_UNIX
socketpair, installed with ADDFD, so the program's fd numbers follow POSIX (lowest
free) and dup, dup2, fork, close-on-exec and close_range work natively, with the
kernel keeping the table. fmhub keeps the other end (the *peer*):

- identity: the placeholder's inode (``/proc/<tid>/fd/N`` reads ``socket:[ino]``)
  names the remote handle; every lookup asks the kernel, so no cache can go stale
  after a native close or dup2;
- last close: when every copy of the placeholder is gone, the peer reads EOF, and
  the remote handle is closed. The peers are all watched by one epoll set, which
  fmhub checks before each call it forwards (so a handle closed natively just before
  is released first, as a lock held through it would be) and while it idles;
- readiness: the placeholder of a regular file or directory carries one byte in
  its receive queue, so poll/select/epoll_wait see it readable and writable, as a
  regular file always is.

A remote file that the program maps has *pages* too (``fsys.master.pages``), shared
with every mapped handle of the same slave file: fds switched to a link to its
content name the same remote file, and the remote handle lives until its
placeholder's copies are gone and no fd or mapping holds its link.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fsys.errors import Errno
from fsys.master.pages import Pages, Store, Watcher

if TYPE_CHECKING:
    from fsys.master.net import Sock
    from fsys.master.streams import Stream

_SOCKET_PREFIX = "socket:["


@dataclass(eq=False, slots=True)
class RemoteFile:
    handle: int
    kind: int  # S_IFMT bits
    inode: int
    peer: socket.socket
    #: The open flags that decide what the fd allows: O_ACCMODE, O_PATH, O_APPEND.
    access: int = 0
    pages: Pages | None = None
    #: Every copy of the placeholder is closed (the pages may still be mapped).
    gone: bool = False
    #: The slave file (device major, minor, inode), once fmhub has asked.
    file: tuple[int, ...] | None = None
    #: A pumped stream (``fsys.master.streams``): its reads and writes are native.
    stream: Stream | None = None
    #: A socket on the slave (``fsys.master.net``).
    sock: Sock | None = None
    #: What came with the open (OPEN_READ): the file's start, kept until the file
    #: changes (``Hub.started``); whether that is the whole file; the path it was
    #: opened by. ``at``: the file position while reads are answered from the start
    #: (the slave's stays 0 until ``Hub.settle`` moves it there); None: the slave's.
    start: bytes | None = None
    whole: bool = False
    key: bytes = b""
    at: int | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind == 0o040000

    @property
    def is_regular(self) -> bool:
        return self.kind == 0o100000


def _fd_path(tid: int, fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/{tid}/fd/{fd}")
    except OSError:
        return None


def _fd_info(tid: int, fd: int) -> tuple[int, int] | None:
    """(flags, inode) of a program's fd, from /proc/<tid>/fdinfo/N."""
    try:
        with open(f"/proc/{tid}/fdinfo/{fd}", "rb") as info:
            fields = dict(line.split(b":", 1) for line in info.read().splitlines() if b":" in line)
        return int(fields[b"flags"], 8), int(fields[b"ino"])
    except (OSError, KeyError, ValueError):
        return None


class Placeholders:
    """The placeholders of a session. ``fd_path(tid, fd)`` reads what a program's fd
    names (/proc/<tid>/fd/N), ``fd_info(tid, fd)`` its flags and inode
    (/proc/<tid>/fdinfo/N); tests give fakes."""

    def __init__(
        self,
        fd_path: Callable[[int, int], str | None] = _fd_path,
        fd_info: Callable[[int, int], tuple[int, int] | None] = _fd_info,
    ) -> None:
        self._fd_path = fd_path
        self.fd_info = fd_info
        self.by_inode: dict[int, RemoteFile] = {}
        self._by_peer: dict[int, RemoteFile] = {}
        self._closed = select.epoll()
        self._watcher: Watcher | None = None
        self.store = Store()
        #: Which handles the program's processes hold links of (set by fmhub: it knows
        #: the processes; tests give a fake).
        self.in_use: Callable[[Store], set[int]] = lambda store: set()
        #: The pages of mapped slave files, by the file's (dev, inode) and by inotify
        #: watch; the remote files that have pages, by handle.
        self.by_file: dict[tuple[int, ...], Pages] = {}
        self._by_wd: dict[int, Pages] = {}
        self.by_handle: dict[int, RemoteFile] = {}
        self._numbers = itertools.count(1)

    def __len__(self) -> int:
        return len(self.by_inode) + sum(remote.gone for remote in self.by_handle.values())

    def fileno(self) -> int:
        """Readable when some placeholder has lost its last copy (see ``reap``)."""
        return self._closed.fileno()

    def create(
        self, handle: int, kind: int, access: int = 0, *, stream: bool = False,
        ready: bool = True, buffer: int = 0,
    ) -> tuple[socket.socket, RemoteFile]:  # fmt: skip
        """A new placeholder: (the end to install in the program, its record).

        ``stream``: for a pumped stream, whose readiness is its data's and whose peer
        is read by its pump (not watched for the last close here). ``ready``: it is
        readable from the start, as a regular file (a socket's is not: fsys.master.net).
        ``buffer``: the send buffer asked for each way (SO_SNDBUF, as far as
        net.core.wmem_max allows), so that a pump moves big chunks in one go.
        Raises Errno(EMFILE/ENFILE) when fmhub itself is out of descriptors.
        """
        try:
            app_end, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise Errno(exc.errno or errno.EMFILE) from None
        inode = os.fstat(app_end.fileno()).st_ino
        peer.setblocking(False)
        if buffer:
            for end in (app_end, peer):
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        remote = RemoteFile(handle, kind, inode, peer, access)
        self.by_inode[inode] = remote
        if stream:
            return app_end, remote
        if ready:
            peer.send(b"\0")  # readable, like a regular file
        self.watch(remote)
        return app_end, remote

    def watch(self, remote: RemoteFile) -> None:
        """Release ``remote`` when its last copy is gone (``reap``)."""
        self._by_peer[remote.peer.fileno()] = remote
        self._closed.register(remote.peer.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

    def unwatch(self, remote: RemoteFile) -> None:
        """Its pump reads ``remote``'s peer from now on (and sees its last close)."""
        fd = remote.peer.fileno()
        if self._by_peer.pop(fd, None) is not None:
            self._closed.unregister(fd)

    def lookup(self, tid: int, fd: int) -> RemoteFile | None:
        """The remote file behind the program's ``fd`` in thread ``tid``, if any."""
        if fd < 0 or not (self.by_inode or self.by_handle):  # none: no fd can be one
            return None
        target = self._fd_path(tid, fd)
        if target is None:
            return None
        if target.startswith(_SOCKET_PREFIX):
            return self.by_inode.get(int(target[len(_SOCKET_PREFIX) : -1]))
        if self.by_handle:
            remote = self.by_handle.get(self.store.handle_of(target) or 0)
            if remote is not None and remote.pages is not None:
                info = self.fd_info(tid, fd)  # the inode: only our pages' file passes
                if info is not None and info[1] == remote.pages.inode:
                    return remote
        return None

    def pages(self, remote: RemoteFile, file: tuple[int, ...]) -> Pages:
        """The pages of the slave file ``file`` (device, inode) that ``remote`` names,
        created empty when no handle of it is mapped yet."""
        if remote.pages is not None:
            return remote.pages
        if remote.gone:  # closed while its call was on the slave
            raise Errno(errno.EBADF)
        remote.file = file
        pages = self.by_file.get(file)
        if pages is None:
            if self._watcher is None:
                self._watcher = Watcher()
                self._closed.register(self._watcher.fd, select.EPOLLIN)
            pages = Pages.create(next(self._numbers), self.store, self._watcher)
            pages.file = file
            self.by_file[file] = pages
            self._by_wd[pages.wd] = pages
        pages.handles[remote.handle] = remote
        remote.pages = pages
        self.by_handle[remote.handle] = remote
        return pages

    def paged(self) -> list[Pages]:
        """The pages of every mapped slave file."""
        return list(self.by_file.values())

    def _detach(self, remote: RemoteFile) -> None:
        """``remote`` is closed: its file's pages go once no handle of it is left."""
        pages = remote.pages
        remote.pages = None
        self.by_handle.pop(remote.handle, None)
        if pages is None:
            return
        pages.handles.pop(remote.handle, None)
        pages.mapped.discard(remote.handle)
        pages.unlink(remote.handle)
        if not pages.handles and self._watcher is not None:
            self.by_file.pop(pages.file, None)
            self._by_wd.pop(pages.wd, None)
            pages.close(self._watcher)

    def discard(self, remote: RemoteFile) -> None:
        self.by_inode.pop(remote.inode, None)
        self.unwatch(remote)
        remote.peer.close()

    def reap(
        self,
        on_last_close: Callable[[RemoteFile], None],
        on_unmapped: Callable[[Pages], object] = lambda pages: None,
    ) -> None:
        """Release every remote file whose placeholder copies are gone and whose link
        to its pages no fd or mapping holds; ``on_unmapped`` for pages whose mappings
        through some handle are all gone. Never blocks.

        ``on_last_close`` runs while the remote file still has its pages (if any).
        """
        for fd, _ in self._closed.poll(0):
            if self._watcher is not None and fd == self._watcher.fd:
                self._released(on_last_close, on_unmapped)
                continue
            remote = self._by_peer.get(fd)
            if remote is None:
                continue
            try:
                data = remote.peer.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # EOF: the program holds no copy any more
                self.discard(remote)
                remote.gone = True
                if remote.pages is None or remote.handle not in remote.pages.mapped:
                    self._last_close(remote, on_last_close)

    def _released(
        self, on_last_close: Callable[[RemoteFile], None], on_unmapped: Callable[[Pages], object]
    ) -> None:
        """Some description of some pages was released: which handles' links are
        still held is read from the processes themselves (inotify says only that one
        of the file's descriptions went, not which)."""
        assert self._watcher is not None
        if not any(True for _ in self._watcher.releases()):
            return
        live = self.in_use(self.store)
        for pages in self.paged():
            gone = [handle for handle in pages.mapped if handle not in live]
            if not gone:
                continue
            pages.mapped.difference_update(gone)
            on_unmapped(pages)
            for handle in gone:
                remote = pages.handles.get(handle)
                if remote is not None and remote.gone:
                    self._last_close(remote, on_last_close)

    def _last_close(self, remote: RemoteFile, on_last_close: Callable[[RemoteFile], None]) -> None:
        try:
            on_last_close(remote)
        finally:
            self._detach(remote)

    def close(self) -> None:
        """Drop every placeholder's peer end, the pages and the watcher. Idempotent."""
        for remote in list(self.by_inode.values()):
            if remote.stream is not None:
                remote.stream.close()
            self.discard(remote)
        for remote in list(self.by_handle.values()):
            self._detach(remote)
        if self._watcher is not None:
            self._watcher.close()
        self.store.close()
        if not self._closed.closed:
            self._closed.close()

    def __enter__(self) -> Placeholders:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
