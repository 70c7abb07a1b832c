"""Placeholders: remote open file descriptions as real kernel objects in the program.

A file the slave opened is represented in the program by one end of an AF_UNIX
socketpair, installed with ADDFD, so the program's fd numbers follow POSIX (lowest
free) and dup, dup2, fork, close-on-exec and close_range work natively, with the
kernel keeping the table. fmhub keeps the other end (the *peer*):

- identity: the placeholder's inode (``/proc/<tid>/fd/N`` reads ``socket:[ino]``)
  names the remote handle; every lookup asks the kernel, so no cache can go stale
  after a native close or dup2;
- last close: when every copy of the placeholder is gone, the peer reads EOF, and
  the remote handle is closed;
- readiness: the placeholder of a regular file or directory carries one byte in
  its receive queue, so poll/select/epoll_wait see it readable and writable, as a
  regular file always is.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import trio

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


class Placeholders:
    def __init__(self) -> None:
        self.by_inode: dict[int, RemoteFile] = {}

    def __len__(self) -> int:
        return len(self.by_inode)

    def create(self, handle: int, kind: int) -> tuple[socket.socket, RemoteFile]:
        """A new placeholder: (the end to install in the program, its record)."""
        app_end, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        inode = os.fstat(app_end.fileno()).st_ino
        peer.setblocking(False)
        peer.send(b"\0")  # readable, like a regular file
        remote = RemoteFile(handle, kind, inode, peer)
        self.by_inode[inode] = remote
        return app_end, remote

    def lookup(self, tid: int, fd: int) -> RemoteFile | None:
        """The remote file behind the program's ``fd`` in thread ``tid``, if any."""
        if fd < 0:
            return None
        try:
            target = os.readlink(f"/proc/{tid}/fd/{fd}")
        except OSError:
            return None
        if not target.startswith(_SOCKET_PREFIX):
            return None
        return self.by_inode.get(int(target[len(_SOCKET_PREFIX) : -1]))

    def discard(self, remote: RemoteFile) -> None:
        self.by_inode.pop(remote.inode, None)
        remote.peer.close()

    async def watch(self, remote: RemoteFile, on_last_close: Callable[[RemoteFile], None]) -> None:
        """Wait until the program holds no copy of ``remote``, then release it."""
        peer = remote.peer
        try:
            while True:
                await trio.lowlevel.wait_readable(peer)
                try:
                    data = peer.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    break
                if not data:
                    break  # EOF: the last placeholder is closed
        finally:
            self.discard(remote)
            on_last_close(remote)
