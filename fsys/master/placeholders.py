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

A remote file that the program maps has *pages* too (``fsys.master.pages``): fds
switched to a memfd of its content name the same remote file, and the remote handle
lives until the placeholder's copies and the pages' descriptions are all gone.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass

from fsys.errors import Errno
from fsys.master.pages import MEMFD_PREFIX, Pages, Watcher

_SOCKET_PREFIX = "socket:["


@dataclass(eq=False, slots=True)
class RemoteFile:
    handle: int
    kind: int  # S_IFMT bits
    inode: int
    peer: socket.socket
    #: The open flags that decide access: O_ACCMODE and O_PATH.
    access: int = 0
    pages: Pages | None = None
    #: Every copy of the placeholder is closed (the pages may still be mapped).
    gone: bool = False

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
        #: Remote files with pages, by the memfd's inode and by inotify watch.
        self.by_memfd: dict[int, RemoteFile] = {}
        self._by_wd: dict[int, RemoteFile] = {}

    def __len__(self) -> int:
        return len(self.by_inode) + sum(1 for remote in self.by_memfd.values() if remote.gone)

    def fileno(self) -> int:
        """Readable when some placeholder has lost its last copy (see ``reap``)."""
        return self._closed.fileno()

    def create(self, handle: int, kind: int, access: int = 0) -> tuple[socket.socket, RemoteFile]:
        """A new placeholder: (the end to install in the program, its record).

        Raises Errno(EMFILE/ENFILE) when fmhub itself is out of descriptors.
        """
        try:
            app_end, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise Errno(exc.errno or errno.EMFILE) from None
        inode = os.fstat(app_end.fileno()).st_ino
        peer.setblocking(False)
        peer.send(b"\0")  # readable, like a regular file
        remote = RemoteFile(handle, kind, inode, peer, access)
        self.by_inode[inode] = remote
        self._by_peer[peer.fileno()] = remote
        self._closed.register(peer.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        return app_end, remote

    def lookup(self, tid: int, fd: int) -> RemoteFile | None:
        """The remote file behind the program's ``fd`` in thread ``tid``, if any."""
        if fd < 0 or not (self.by_inode or self.by_memfd):  # none: no fd can be one (no /proc)
            return None
        target = self._fd_path(tid, fd)
        if target is None:
            return None
        if target.startswith(_SOCKET_PREFIX):
            return self.by_inode.get(int(target[len(_SOCKET_PREFIX) : -1]))
        if target.startswith(MEMFD_PREFIX) and self.by_memfd:
            info = self.fd_info(tid, fd)  # the inode, so that no program's memfd passes
            return self.by_memfd.get(info[1]) if info is not None else None
        return None

    def pages(self, remote: RemoteFile) -> Pages:
        """``remote``'s pages, created empty on first use."""
        if remote.pages is None:
            if self._watcher is None:
                self._watcher = Watcher()
                self._closed.register(self._watcher.fd, select.EPOLLIN)
            pages = Pages.create(remote.handle, self._watcher)
            remote.pages = pages
            self.by_memfd[pages.inode] = remote
            self._by_wd[pages.wd] = remote
        return remote.pages

    def paged(self) -> list[RemoteFile]:
        """The remote files that have pages."""
        return list(self.by_memfd.values())

    def _drop_pages(self, remote: RemoteFile) -> None:
        pages = remote.pages
        if pages is not None and self._watcher is not None:
            self.by_memfd.pop(pages.inode, None)
            self._by_wd.pop(pages.wd, None)
            pages.close(self._watcher)

    def discard(self, remote: RemoteFile) -> None:
        self.by_inode.pop(remote.inode, None)
        fd = remote.peer.fileno()
        if self._by_peer.pop(fd, None) is not None:
            self._closed.unregister(fd)
        remote.peer.close()

    def reap(
        self,
        on_last_close: Callable[[RemoteFile], None],
        on_unmapped: Callable[[RemoteFile], None] = lambda remote: None,
    ) -> None:
        """Release every remote file whose placeholder copies and page descriptions
        are all gone; ``on_unmapped`` for one whose pages no fd or mapping holds any
        more while placeholder copies remain. Never blocks.

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
                if remote.pages is None or not remote.pages.views:
                    self._last_close(remote, on_last_close)

    def _released(
        self, on_last_close: Callable[[RemoteFile], None], on_unmapped: Callable[[RemoteFile], None]
    ) -> None:
        assert self._watcher is not None
        for wd in self._watcher.releases():
            remote = self._by_wd.get(wd)
            if remote is None or remote.pages is None or remote.pages.views <= 0:
                continue
            remote.pages.views -= 1
            if remote.pages.views:
                continue
            if remote.gone:
                self._last_close(remote, on_last_close)
            else:
                on_unmapped(remote)

    def _last_close(self, remote: RemoteFile, on_last_close: Callable[[RemoteFile], None]) -> None:
        try:
            on_last_close(remote)
        finally:
            self._drop_pages(remote)

    def close(self) -> None:
        """Drop every placeholder's peer end and the watcher. Idempotent."""
        for remote in list(self.by_inode.values()):
            self.discard(remote)
        for remote in self.paged():
            self._drop_pages(remote)
        if self._watcher is not None:
            self._watcher.close()
        if not self._closed.closed:
            self._closed.close()

    def __enter__(self) -> Placeholders:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
