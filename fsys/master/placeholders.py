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
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass

from fsys.errors import Errno

_SOCKET_PREFIX = "socket:["


@dataclass(eq=False, slots=True)
class RemoteFile:
    handle: int
    kind: int  # S_IFMT bits
    inode: int
    peer: socket.socket

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


class Placeholders:
    """The placeholders of a session. ``fd_path(tid, fd)`` reads what a program's fd
    names (/proc/<tid>/fd/N); tests give a fake."""

    def __init__(self, fd_path: Callable[[int, int], str | None] = _fd_path) -> None:
        self._fd_path = fd_path
        self.by_inode: dict[int, RemoteFile] = {}
        self._by_peer: dict[int, RemoteFile] = {}
        self._closed = select.epoll()

    def __len__(self) -> int:
        return len(self.by_inode)

    def fileno(self) -> int:
        """Readable when some placeholder has lost its last copy (see ``reap``)."""
        return self._closed.fileno()

    def create(self, handle: int, kind: int) -> tuple[socket.socket, RemoteFile]:
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
        remote = RemoteFile(handle, kind, inode, peer)
        self.by_inode[inode] = remote
        self._by_peer[peer.fileno()] = remote
        self._closed.register(peer.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        return app_end, remote

    def lookup(self, tid: int, fd: int) -> RemoteFile | None:
        """The remote file behind the program's ``fd`` in thread ``tid``, if any."""
        if fd < 0 or not self.by_inode:  # no placeholder: no fd can be one (no /proc)
            return None
        target = self._fd_path(tid, fd)
        if target is None or not target.startswith(_SOCKET_PREFIX):
            return None
        return self.by_inode.get(int(target[len(_SOCKET_PREFIX) : -1]))

    def discard(self, remote: RemoteFile) -> None:
        self.by_inode.pop(remote.inode, None)
        fd = remote.peer.fileno()
        if self._by_peer.pop(fd, None) is not None:
            self._closed.unregister(fd)
        remote.peer.close()

    def reap(self, on_last_close: Callable[[RemoteFile], None]) -> None:
        """Release every placeholder whose last copy is gone. Never blocks."""
        for fd, _ in self._closed.poll(0):
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
                on_last_close(remote)

    def close(self) -> None:
        """Drop every placeholder's peer end and the watcher. Idempotent."""
        for remote in list(self.by_inode.values()):
            self.discard(remote)
        if not self._closed.closed:
            self._closed.close()

    def __enter__(self) -> Placeholders:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
