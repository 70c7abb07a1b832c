"""The slave's network: the socket operations of the executor (fsys.master.net).

Every socket the master asks for is made here, non-blocking and close-on-exec, and
its calls never block the executor: a call that must wait for its socket (a blocking
accept, connect, recv, or a send into a full buffer) raises MustWait, and fshub
waits for the socket in a trio task of its own, then runs the call again (a connect
is not run again: its outcome is the socket's SO_ERROR). No thread waits on the
network, so a thousand idle connections cost a thousand fds and nothing more.

Addresses cross as the program's struct sockaddr, given to the kernel unchanged, but
for an AF_UNIX path: it is the slave's path from its root, so under ``--root`` the
executor resolves its directory inside the root (as for any name it creates) and
hands the kernel the directory's real path and the name; the addresses it reports
(getsockname, getpeername, accept, recvfrom) are put back from the root.
"""

from __future__ import annotations

import errno
import functools
import os
import select
import socket
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from fsys import linux
from fsys import protocol as wire
from fsys.errors import FsysError

if TYPE_CHECKING:
    from fsys.slave.confinement import Confinement
    from fsys.slave.executor import Handle

Result = tuple[int, bytes]
_FAMILY = struct.Struct("=H")
_SUN_PATH = 108  # sizeof(sockaddr_un.sun_path)
_ERROR = struct.Struct("=i")
#: A socket whose operations go through the wait-in-trio path (MustWait), not threads.
NET_OPS: frozenset[type] = frozenset(
    {wire.Bind, wire.Connect, wire.Listen, wire.Accept, wire.Sockname, wire.Getsockopt,
     wire.Setsockopt, wire.Shutdown, wire.Sendto, wire.Recvfrom, wire.Poll}
)  # fmt: skip


class MustWait(FsysError):
    """A socket call would block: fshub waits until ``fd`` is readable (or writable),
    then calls ``retry`` (None: performs the operation again)."""

    def __init__(self, fd: int, *, writable: bool, retry: Callable[[], Result] | None = None):
        super().__init__("must wait")
        self.fd = fd
        self.writable = writable
        self.retry = retry


@contextmanager
def _or_wait(fd: int, *, writable: bool, wait: bool = True) -> Iterator[None]:
    """A call on a socket that would block: MustWait (or EAGAIN when not ``wait``)."""
    try:
        yield
    except BlockingIOError:
        if not wait:
            raise
        raise MustWait(fd, writable=writable) from None


def _connected(fd: int) -> Result:
    """A connect's outcome, once its socket is writable: its SO_ERROR."""
    code = _ERROR.unpack(linux.getsockopt(fd, socket.SOL_SOCKET, socket.SO_ERROR, 4))[0]
    if code:
        raise OSError(code, os.strerror(code))
    return 0, b""


class SocketOps:
    """The executor's socket operations (mixed into fsys.slave.executor.Executor)."""

    handles: dict[int, Handle]
    root: str
    confined: bool
    confinement: Confinement

    if TYPE_CHECKING:  # the Executor's, used here

        def _new_handle(self, fd: int) -> int: ...
        def root_relative(self, real: bytes) -> bytes: ...
        def _parent(self, dir_id: int, path: bytes) -> tuple[int, bytes]: ...

    def _net(self, handle_id: int) -> Handle:
        handle = self.handles.get(handle_id)
        if handle is None:
            raise OSError(errno.EBADF, "no such handle")
        if not handle.net:
            raise OSError(errno.ENOTSOCK, "not a socket of this session")
        return handle

    def _new_socket(self, fd: int, kind: int) -> int:
        try:
            handle_id = self._new_handle(fd)
        except OSError:
            os.close(fd)
            raise
        handle = self.handles[handle_id]
        handle.net = True
        handle.socktype = kind
        return handle_id

    def op_socket(self, o: wire.Socket) -> Result:
        kind = o.type & 0xF  # SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET, SOCK_RAW...
        fd = linux.socket_fd(o.family, o.type | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                             o.protocol)  # fmt: skip
        return self._new_socket(fd, kind), b""

    # --- AF_UNIX paths: the slave's, from its root ------------------------------------

    def _unix_in(self, addr: bytes, *, creates: bool) -> bytes:
        """``addr`` as the kernel must get it: an AF_UNIX path placed in the root."""
        if len(addr) <= 2 or _FAMILY.unpack_from(addr)[0] != socket.AF_UNIX or addr[2] == 0:
            return addr  # not AF_UNIX, unnamed, or abstract (this network's, as is)
        path = addr[2:].split(b"\0", 1)[0]
        if not self.confined and not creates:
            return addr
        if creates and self.confinement.read_only:
            raise OSError(errno.EROFS, "the slave is read-only")
        parent, name = self._parent(0, path)
        try:
            real = os.readlink(b"/proc/self/fd/%d" % parent)
        finally:
            os.close(parent)
        self.root_relative(real)  # ENOENT if it is outside the root
        full = (real.rstrip(b"/") or b"") + b"/" + name
        if len(full) >= _SUN_PATH:
            raise OSError(errno.ENAMETOOLONG, "the socket's path is too long on this slave")
        return addr[:2] + full + b"\0"

    def _unix_out(self, addr: bytes) -> bytes:
        """An address the kernel reported, as the master sees it (from the root)."""
        if not self.confined or len(addr) <= 2 or addr[2] == 0:
            return addr
        if _FAMILY.unpack_from(addr)[0] != socket.AF_UNIX:
            return addr
        path = addr[2:].split(b"\0", 1)[0]
        try:
            return addr[:2] + self.root_relative(path) + b"\0"
        except OSError:
            return addr[:2]  # a name outside the root: unnamed, as far as the master sees

    # --- the calls ------------------------------------------------------------------

    def op_bind(self, o: wire.Bind) -> Result:
        handle = self._net(o.handle)
        linux.bind(handle.fd, self._unix_in(o.addr, creates=True))
        return 0, b""

    def op_connect(self, o: wire.Connect) -> Result:
        handle = self._net(o.handle)
        fd = handle.fd
        try:
            linux.connect(fd, self._unix_in(o.addr, creates=False))
        except OSError as exc:
            # EALREADY: a connect restarted after a signal (it goes on, as natively).
            waits = exc.errno in (errno.EINPROGRESS, errno.EALREADY)
            if not (o.wait and waits) and not (exc.errno == errno.EAGAIN and o.wait):
                raise
            raise MustWait(fd, writable=True, retry=lambda: _connected(fd)) from None
        return 0, b""

    def op_listen(self, o: wire.Listen) -> Result:
        linux.listen(self._net(o.handle).fd, o.backlog)
        return 0, b""

    def op_accept(self, o: wire.Accept) -> Result:
        handle = self._net(o.handle)
        with _or_wait(handle.fd, writable=False, wait=bool(o.wait)):
            fd, addr = linux.accept4(handle.fd, socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        return self._new_socket(fd, handle.socktype), self._unix_out(addr)

    def op_sockname(self, o: wire.Sockname) -> Result:
        addr = self._unix_out(linux.sockname(self._net(o.handle).fd, peer=bool(o.peer)))
        return len(addr), addr

    def op_getsockopt(self, o: wire.Getsockopt) -> Result:
        value = linux.getsockopt(self._net(o.handle).fd, o.level, o.name, o.size)
        return len(value), value

    def op_setsockopt(self, o: wire.Setsockopt) -> Result:
        linux.setsockopt(self._net(o.handle).fd, o.level, o.name, o.value)
        return 0, b""

    def op_shutdown(self, o: wire.Shutdown) -> Result:
        linux.shutdown(self._net(o.handle).fd, o.how)
        return 0, b""

    def op_sendto(self, o: wire.Sendto) -> Result:
        handle = self._net(o.handle)
        addr = self._unix_in(o.addr, creates=False) if o.addr else b""
        with _or_wait(handle.fd, writable=True, wait=bool(o.wait)):
            return linux.sendto(handle.fd, o.data, o.flags | socket.MSG_NOSIGNAL, addr), b""

    def op_recvfrom(self, o: wire.Recvfrom) -> Result:
        handle = self._net(o.handle)
        size = max(0, min(o.size, wire.MAX_IO))
        flags = o.flags & ~socket.MSG_DONTWAIT
        datagram = handle.socktype in (socket.SOCK_DGRAM, socket.SOCK_SEQPACKET)
        with _or_wait(handle.fd, writable=False, wait=bool(o.wait)):
            n, data, addr = linux.recvfrom(handle.fd, size, flags | (socket.MSG_TRUNC * datagram))
        msg_flags = socket.MSG_TRUNC if datagram and n > size else 0
        result = n if o.flags & socket.MSG_TRUNC or not datagram else min(n, size)
        addr = self._unix_out(addr)
        return result, wire.RECV_HEAD.pack(msg_flags, len(addr)) + addr + data

    def op_poll(self, o: wire.Poll) -> Result:
        handle = self._net(o.handle)
        poller = select.poll()
        poller.register(handle.fd, o.events)
        ready = poller.poll(0)
        if ready:
            return ready[0][1], b""
        raise MustWait(handle.fd, writable=not o.events & select.POLLIN)

    # --- a socket's data through READ and WRITE (a pumped stream) ------------------

    def net_read(self, handle: Handle, count: int) -> Result:
        with _or_wait(handle.fd, writable=False):
            data = os.read(handle.fd, count)
        return len(data), data

    def net_write(self, handle: Handle, data: bytes) -> Result:
        """All of ``data``, or an error: the master keeps more than one WRITE of a
        pumped socket in flight, so a WRITE never ends part way while the connection
        lives. If it breaks part way, the count sent (the next WRITE finds the error)."""
        return _send_all(handle.fd, data, 0)


def _send_all(fd: int, data: bytes, sent: int) -> Result:
    while sent < len(data):
        try:
            sent += linux.send_from(fd, data, sent, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            retry = functools.partial(_send_all, fd, data, sent)
            raise MustWait(fd, writable=True, retry=retry) from None
        except OSError:
            if not sent:
                raise
            break
    return sent, b""
