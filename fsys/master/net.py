"""The slave's network: the program's sockets live on the slave (DESIGN.md §3).

An AF_INET or AF_INET6 socket the program makes is made on the slave (SOCKET); an
AF_UNIX socket stays the master's until it binds or connects to a path the policy
gives the slave, when it is made again there, at the same fd number (UNIX_SWITCH).
So connections leave from the slave, servers listen on it, and names resolve the
slave's way (the policy gives the program the slave's /etc/resolv.conf and hosts).

In the program a slave socket is a placeholder like any remote file, in one of two
modes:

- **pumped**, once it is a connected stream (a connect that succeeded, an accepted
  connection): its data goes through the placeholder as through a lent stream
  (``fsys.master.streams``), so read, write, send, recv, poll, select, epoll,
  O_NONBLOCK and signals act natively on it; control calls are forwarded.
- **call by call** otherwise (before it connects; listening; datagrams, which keep
  their boundaries and addresses): its data calls are forwarded, and its
  readiness for reading is a *token*: while the slave says the socket is readable
  (POLL), the placeholder holds one byte, so poll and epoll wake natively; the
  token is taken back after each forwarded receive or accept, and given again while
  the socket stays readable. A connect in progress on a non-blocking socket fills
  the placeholder's send buffer, so it is not writable until the connect ends, as
  natively; then the pump drops that filling before anything the program wrote.

The pumps keep flow bounded both ways (two READs and two WRITEs of 1 MiB in flight:
the slave runs a socket's reads in order, and its writes, shutdown and close in
order, each WRITE taken whole). A pumped
socket's last close is the end of file its pump reads from the peer end (fmhub
never shuts the placeholder itself down: a shutdown is forwarded, and the writes
after it fail with EPIPE here); what the program wrote before closing is sent
first, then the slave's socket is closed. A call-by-call socket's last close is
seen as any placeholder's (``Placeholders.reap``).
"""

from __future__ import annotations

import errno
import select
import signal
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

import trio

from fsys import protocol as wire
from fsys.errors import Errno
from fsys.master.calls import Asks, _blob, _iovecs, _pieces, _transfer, handles
from fsys.master.link import SlaveLink
from fsys.master.placeholders import RemoteFile
from fsys.master.routing import CONTINUE, UNIX_SWITCH, Continue, Handler, Steps, Trapped
from fsys.master.streams import Stream, ask
from fsys.protocol import MAX_IO, MAX_SMALL, RECV_HEAD, Reply

if TYPE_CHECKING:
    from fsys.master.fmhub import Hub

#: The handlers that take precedence for a slave socket (Router.socket_handlers).
SOCKET_HANDLERS: dict[str, Handler] = {}
S_IFSOCK = stat.S_IFSOCK
SOCK_TYPE_MASK = 0xF
_TYPE_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_INT = struct.Struct("=i")
_UINT = struct.Struct("=I")
#: struct msghdr: name, namelen, iov, iovlen, control, controllen, flags.
_MSGHDR = struct.Struct("=QI4xQQQQi4x")
_MMSGHDR = 64  # struct mmsghdr: a msghdr and its msg_len, padded
#: How much one READ of a pumped socket asks for (a connection is a fast stream).
SOCKET_CHUNK = 1 << 20
#: The placeholder's send buffer each way for a stream socket (it may be pumped):
#: room for a few chunks, so that a READ's data goes to the program in one send and
#: the program's writes are taken a chunk at a time (Placeholders.create).
SOCKET_BUFFER = 4 * SOCKET_CHUNK
#: How long the end of a session waits for the sockets' last bytes to be sent.
DRAIN_PATIENCE = 10.0
#: The socket options the placeholder itself must have too (its reads and writes
#: wait natively once pumped): SO_RCVTIMEO, SO_SNDTIMEO, SO_RCVLOWAT.
_PLACEHOLDER_OPTIONS = {(socket.SOL_SOCKET, socket.SO_RCVTIMEO),
                        (socket.SOL_SOCKET, socket.SO_SNDTIMEO),
                        (socket.SOL_SOCKET, socket.SO_RCVLOWAT)}  # fmt: skip


def _on_sockets(*names: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for name in names:
            SOCKET_HANDLERS[name] = fn
        return fn

    return register


@dataclass(eq=False)
class Sock:
    """A slave socket, as fmhub keeps it."""

    remote: RemoteFile
    family: int
    type: int  # SOCK_STREAM, SOCK_DGRAM... (without the flags)
    #: The AF_UNIX address the program bound, as it gave it (getsockname's answer).
    name: bytes = b""
    token: bool = False  # the placeholder holds its readiness byte
    watching: bool = False  # a POLL task gives the token
    #: Set when a receive or accept has taken the token back: the POLL task asks again.
    taken: trio.Event = field(default_factory=trio.Event)
    closed: bool = False
    #: Bytes a non-blocking connect put in the placeholder (``connecting``) to keep it
    #: from polling writable, its pump drops them first; the program's end of the
    #: placeholder meanwhile (its send buffer at its least, so that little fills it);
    #: the count of such connects (the newest one's end is the one that counts).
    filling: int = 0
    app_copy: socket.socket | None = None
    connects: int = 0
    #: The send buffer of the program's end of the placeholder (SO_SNDBUF's, if set).
    send_buffer: int = SOCKET_BUFFER

    @property
    def handle(self) -> int:
        return self.remote.handle

    @property
    def pumped(self) -> bool:
        return self.remote.stream is not None


class SocketStream(Stream):
    """A connected slave socket's pump: its errors reach the program's calls."""

    chunk = SOCKET_CHUNK
    window = 2  # (the slave's net_write takes all of a WRITE, or fails)
    reads = 2

    def __init__(
        self, link: SlaveLink, remote: RemoteFile, filling: int, wake: Callable[[], None]
    ) -> None:
        super().__init__(link, remote, None, wake)  # type: ignore[arg-type]
        #: Bytes of the connect's filling still in the peer, before the program's.
        self.filling = filling

    def failed(self, code: int) -> None:
        """ECONNRESET, ETIMEDOUT...: the next read that finds nothing queued fails
        with it (Router: SOCKET_READS), then reads end of file."""
        self.read_error = code
        self._shut(socket.SHUT_WR)
        self.read_closed = True

    def _take(self) -> bytes | None:
        while self.filling:
            try:
                dropped = self.peer.recv(min(self.filling, 1 << 16))
            except BlockingIOError:
                return None
            except OSError:
                return b""
            if not dropped:
                return b""
            self.filling -= len(dropped)
        return super()._take()

    def close(self) -> None:
        pass  # (no copy of the placeholder is kept: its last close is the program's)


class Network:
    """The program's sockets on the slave. Their pumps and POLL tasks run in
    ``nursery``, which outlives fmhub's (what a program wrote before it exited is
    sent before the session ends: ``drain``)."""

    def __init__(self, hub: Hub, nursery: trio.Nursery) -> None:
        self.hub = hub
        self.link = hub.link
        self.nursery = nursery
        self.sockets: dict[int, Sock] = {}
        self._pumping: set[trio.Event] = set()

    # --- making placeholders ------------------------------------------------------

    def install(
        self, call: Trapped, handle: int, family: int, kind: int, *, nonblock: bool,
        cloexec: bool, connected: bool = False, number: int | None = None,
    ) -> tuple[int, Sock]:  # fmt: skip
        """Give the program the slave socket ``handle`` (see Hub.install_remote)."""
        pumped = connected and kind == socket.SOCK_STREAM
        fd, remote = self.hub.install_remote(
            call, handle, S_IFSOCK, cloexec=cloexec, stream=pumped, ready=False,
            nonblock=nonblock, number=number,
            buffer=SOCKET_BUFFER if kind == socket.SOCK_STREAM else 0,
        )  # fmt: skip
        sock = Sock(remote, family, kind)
        remote.sock = sock
        self.sockets[handle] = sock
        if pumped:
            self.pump(sock)
        elif kind != socket.SOCK_STREAM:
            self.watch(sock)  # datagrams may come at any time
        return fd, sock

    def pump(self, sock: Sock) -> None:
        """``sock`` is connected: its data goes through its placeholder from now on
        (once: a connect in progress may end in the program's second connect, which
        waits for it, and in ``_connect``)."""
        if sock.pumped or sock.closed:
            return
        remote = sock.remote
        self.hub.placeholders.unwatch(remote)  # (its pump sees the last close)
        stream = SocketStream(self.link, remote, sock.filling, self.hub.wake)
        sock.filling = 0
        _unfilled(sock)
        remote.stream = stream
        self.hub.add_stream(stream)
        done = trio.Event()
        self._pumping.add(done)
        self.nursery.start_soon(self._pump, sock, stream, done)

    async def _pump(self, sock: Sock, stream: SocketStream, done: trio.Event) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.pump_in)
                await stream.pump_out()  # until the program's last copy is closed
                nursery.cancel_scope.cancel()
        finally:
            self._pumping.discard(done)
            done.set()
            self.hub.remove_stream(stream)
            self.hub.placeholders.discard(sock.remote)
            sock.remote.gone = True
            self.closed(sock.remote)
            self.hub.close_handle(sock.handle)

    def closed(self, remote: RemoteFile) -> None:
        """``remote``'s last copy is gone: its POLL task ends."""
        sock = remote.sock
        if sock is not None and self.sockets.get(sock.handle) is sock:
            del self.sockets[sock.handle]
            sock.closed = True
            sock.taken.set()
            _unfilled(sock)

    async def drain(self) -> None:
        """The program is gone: wait (DRAIN_PATIENCE at most) for its sockets' pumps
        to send what it wrote."""
        with trio.move_on_after(DRAIN_PATIENCE):
            for done in list(self._pumping):
                await done.wait()

    # --- readiness of call-by-call sockets ----------------------------------------

    def watch(self, sock: Sock) -> None:
        if not sock.watching and not sock.closed:
            sock.watching = True
            self.nursery.start_soon(self._watch, sock)

    async def _watch(self, sock: Sock) -> None:
        """Give the token while the slave says ``sock`` is readable."""
        try:
            while not sock.closed and not sock.pumped:
                op = wire.Poll(handle=sock.handle, events=select.POLLIN)
                reply = await ask(self.link, op, self.hub.wake)
                if reply is None or reply.result < 0 or sock.closed or sock.pumped:
                    return
                sock.taken = trio.Event()
                if not sock.token:
                    try:
                        sock.remote.peer.send(b"\1")
                    except OSError:
                        return  # its last copy is gone
                    sock.token = True
                await sock.taken.wait()
        finally:
            sock.watching = False

    def take_token(self, call: Trapped, sock: Sock) -> None:
        """A receive or accept is done: take the token back (the POLL task gives it
        again if the socket is still readable)."""
        if sock.token:
            copy = _copy(self.hub, call, _number(call))
            if copy is not None:
                with copy:
                    try:
                        copy.recv(64, socket.MSG_DONTWAIT)
                    except OSError:
                        pass
            sock.token = False
        sock.taken.set()

    def connecting(self, call: Trapped, sock: Sock) -> None:
        """A non-blocking connect goes on: the placeholder is not writable until it
        ends (``_connect``). (Again after a failed one: its token goes.)"""
        self.take_token(call, sock)
        copy = _copy(self.hub, call, _number(call))
        if copy is not None:
            _unfilled(sock)
            sock.app_copy = copy
            copy.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # (the kernel's least)
            piece = bytes(1 << 12)
            while True:
                try:
                    sock.filling += copy.send(piece, socket.MSG_DONTWAIT)
                except OSError:
                    break
        sock.connects += 1
        self.hub.placeholders.unwatch(sock.remote)  # (the filling is not the program's)
        self.nursery.start_soon(self._connect, sock, sock.connects)

    async def _connect(self, sock: Sock, connect: int) -> None:
        op = wire.Poll(handle=sock.handle, events=select.POLLOUT)
        reply = await ask(self.link, op, self.hub.wake)
        if sock.pumped or sock.closed or connect != sock.connects:
            return  # (the program's own connect saw it end first, or connects again)
        if reply is not None and reply.result > 0 and not reply.result & select.POLLERR:
            self.pump(sock)
            return
        # Refused, unreachable...: writable again (the program asks SO_ERROR), and
        # readable (a read reports the error), as natively.
        peer = sock.remote.peer
        while sock.filling > 0:
            try:
                sock.filling -= len(peer.recv(min(sock.filling, 1 << 16))) or sock.filling
            except OSError:
                break
        sock.filling = 0
        _unfilled(sock)
        try:
            peer.send(b"\1")
            sock.token = True
        except OSError:
            pass
        self.hub.placeholders.watch(sock.remote)


def _unfilled(sock: Sock) -> None:
    """A connect has ended: the program's end of the placeholder has its buffer back."""
    copy, sock.app_copy = sock.app_copy, None
    if copy is not None:
        with copy:
            try:
                copy.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sock.send_buffer)
            except OSError:
                pass


def _copy(hub: Hub, call: Trapped, fd: int) -> socket.socket | None:
    """fmhub's own copy of the program's fd (the same socket), or None if it has gone."""
    process = call.process
    try:
        own = hub.processes.procfs.take_fd(process.tgid, process.pidfd, fd)
    except OSError:
        return None
    return socket.socket(fileno=own)


def _number(call: Trapped) -> int:
    """The program's fd number of the socket the call is on (its first fd argument)."""
    return call.notif.arg_int(call.syscall.fds[0])


def _net(hub: Hub) -> Network:
    if hub.net is None:
        raise Errno(errno.EAFNOSUPPORT)
    return hub.net


def _sock(call: Trapped) -> Sock:
    rf = call.files[0]
    if rf is None or rf.sock is None:
        raise Errno(errno.ENOTSOCK)
    return rf.sock


def _nonblocking(hub: Hub, call: Trapped) -> bool:
    """Whether the program's socket fd is O_NONBLOCK (its placeholder's description)."""
    info = hub.placeholders.fd_info(call.tid, _number(call))
    return info is not None and bool(info[0] & socket.SOCK_NONBLOCK)


def _address_in(hub: Hub, call: Trapped, addr: int, size: int) -> bytes:
    """The struct sockaddr the program passes; an AF_UNIX path as the slave's path."""
    if size < 0 or size > 128:
        raise Errno(errno.EINVAL)
    raw = call.memory.read(addr, size) if size else b""
    if len(raw) > 2 and raw[:2] == b"\1\0" and raw[2] != 0:  # AF_UNIX, a path
        target = hub.router.place(call, raw[2:].split(b"\0", 1)[0])
        if not target.remote:
            raise Errno(errno.ECONNREFUSED)  # a master path: no slave socket is there
        raw = raw[:2] + target.path + b"\0"
    return raw


def _address_out(call: Trapped, addr: int, size_at: int, value: bytes) -> None:
    """Write an address the way the kernel does: truncated to the caller's buffer,
    with its whole length in ``*size_at``."""
    if not addr or not size_at:
        return
    (room,) = call.memory.read_struct(size_at, _INT)
    if room < 0:
        raise Errno(errno.EINVAL)
    if room and value:
        call.memory.write(addr, value[:room])
    call.memory.write(size_at, _INT.pack(len(value)))


def _sigpipe(hub: Hub, call: Trapped, flags: int) -> None:
    if not flags & socket.MSG_NOSIGNAL:
        hub.processes.procfs.signal_thread(call.process.tgid, call.tid, signal.SIGPIPE)


# --- making sockets --------------------------------------------------------------


@handles("socket")
def sys_socket(hub: Hub, call: Trapped) -> Steps:
    net = hub.net
    if net is None:
        return CONTINUE  # the program uses the master's network (--network master)
    family, kind = call.arg_int("domain"), call.arg_int("type")
    if kind & ~(SOCK_TYPE_MASK | _TYPE_FLAGS):
        raise Errno(errno.EINVAL)
    reply = yield wire.Socket(family=family, type=kind & SOCK_TYPE_MASK,
                              protocol=call.arg_int("protocol"))  # fmt: skip
    fd, _ = net.install(call, reply.result, family, kind & SOCK_TYPE_MASK,
                        nonblock=bool(kind & socket.SOCK_NONBLOCK),
                        cloexec=bool(kind & socket.SOCK_CLOEXEC))  # fmt: skip
    return fd


@_on_sockets(UNIX_SWITCH)
def sys_unix_switch(hub: Hub, call: Trapped) -> Steps:
    """A master AF_UNIX socket binds, connects or sends to a slave path: it becomes a
    slave socket of the same type, flags and fd number, then does so there."""
    net = _net(hub)
    number = _number(call)
    copy = _copy(hub, call, number)
    info = hub.placeholders.fd_info(call.tid, number)
    if copy is None or info is None:
        raise Errno(errno.EBADF)
    with copy:
        kind = copy.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        try:
            bound = len(copy.getsockname() or "") > 0
        except OSError:
            bound = False
    if bound:
        return CONTINUE  # a master socket already: it stays one (the kernel answers)
    reply = yield wire.Socket(family=socket.AF_UNIX, type=kind, protocol=0)
    flags = info[0]
    net.install(call, reply.result, socket.AF_UNIX, kind, number=number,
                nonblock=bool(flags & socket.SOCK_NONBLOCK),
                cloexec=bool(flags & socket.SOCK_CLOEXEC))  # fmt: skip
    call.files = (hub.placeholders.lookup(call.tid, number),)
    then = {"bind": _bind, "connect": _connect}.get(call.syscall.name, _sendto)
    return (yield from then(hub, call))


def _bind(hub: Hub, call: Trapped) -> Steps:
    sock = _sock(call)
    addr = _address_in(hub, call, call.arg("addr"), call.arg_int("addrlen"))
    yield wire.Bind(handle=sock.handle, addr=addr)
    if sock.family == socket.AF_UNIX:
        sock.name = call.memory.read(call.arg("addr"), call.arg_int("addrlen"))
    return 0


def _connect(hub: Hub, call: Trapped) -> Steps:
    sock = _sock(call)
    net = _net(hub)
    addr = _address_in(hub, call, call.arg("addr"), call.arg_int("addrlen"))
    streams = sock.type == socket.SOCK_STREAM and not sock.pumped
    nonblock = _nonblocking(hub, call)
    try:
        yield wire.Connect(handle=sock.handle, wait=int(not nonblock), addr=addr)
    except Errno as exc:
        if exc.errno == errno.EINPROGRESS and streams:
            net.connecting(call, sock)
        raise
    if streams:
        net.pump(sock)
    return 0


sys_bind = handles("bind")(_bind)
sys_connect = handles("connect")(_connect)


@handles("listen")
def sys_listen(hub: Hub, call: Trapped) -> Steps:
    sock = _sock(call)
    net = _net(hub)
    yield wire.Listen(handle=sock.handle, backlog=call.arg_int("backlog"))
    net.watch(sock)
    return 0


@handles("accept", "accept4")
def sys_accept(hub: Hub, call: Trapped) -> Steps:
    sock = _sock(call)
    net = _net(hub)
    flags = call.arg_int("flags") if call.has("flags") else 0
    if flags & ~_TYPE_FLAGS:
        raise Errno(errno.EINVAL)
    try:
        reply = yield wire.Accept(handle=sock.handle, wait=int(not _nonblocking(hub, call)))
    finally:
        net.take_token(call, sock)
    try:
        _address_out(call, call.arg("addr"), call.arg("addrlen"), _blob(reply, 128))
    except Errno:
        hub.close_handle(reply.result)
        raise
    fd, _ = net.install(call, reply.result, sock.family, sock.type, connected=True,
                        nonblock=bool(flags & socket.SOCK_NONBLOCK),
                        cloexec=bool(flags & socket.SOCK_CLOEXEC))  # fmt: skip
    return fd


@handles("getsockname", "getpeername")
def sys_sockname(hub: Hub, call: Trapped) -> Steps:
    sock = _sock(call)
    peer = call.syscall.name == "getpeername"
    if sock.name and not peer:
        value = sock.name
    else:
        value = _blob((yield wire.Sockname(handle=sock.handle, peer=int(peer))), 128)
    _address_out(call, call.arg("addr"), call.arg("addrlen"), value)
    return 0


@handles("getsockopt")
def sys_getsockopt(hub: Hub, call: Trapped) -> Steps:
    sock = _sock(call)
    where = call.arg("optlen")
    (size,) = call.memory.read_struct(where, _INT)
    if size < 0:
        raise Errno(errno.EINVAL)
    size = min(size, MAX_SMALL)
    reply = yield wire.Getsockopt(handle=sock.handle, level=call.arg_int("level"),
                                  name=call.arg_int("optname"), size=size)  # fmt: skip
    value = _blob(reply, size)
    if value:
        call.memory.write(call.arg("optval"), value)
    call.memory.write(where, _INT.pack(len(value)))
    return 0


@handles("setsockopt")
def sys_setsockopt(hub: Hub, call: Trapped) -> Steps:
    sock = _sock(call)
    size = call.arg_int("optlen")
    if size < 0:
        raise Errno(errno.EINVAL)
    if size > MAX_SMALL:
        raise Errno(errno.ENOMEM)
    level, name = call.arg_int("level"), call.arg_int("optname")
    value = call.memory.read(call.arg("optval"), size) if size else b""
    yield wire.Setsockopt(handle=sock.handle, level=level, name=name, value=value)
    if (level, name) in _PLACEHOLDER_OPTIONS:  # its reads and writes wait natively
        copy = _copy(hub, call, _number(call))
        if copy is not None:
            with copy:
                copy.setsockopt(level, name, value)
    elif level == socket.SOL_SOCKET and name in (socket.SO_SNDBUF, socket.SO_RCVBUF) and value:
        # The program wants the socket to hold this little: so does its placeholder
        # (what it writes in one way, what fmhub puts there for it the other), or a
        # send would end at once where it would wait, natively, for its peer.
        room = max(_INT.unpack(value[: _INT.size].ljust(_INT.size, b"\0"))[0], 1)
        if name == socket.SO_RCVBUF:
            sock.remote.peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, room)
        else:
            sock.send_buffer = room  # (a connect that goes on gives it back as it ends)
            copy = None if sock.app_copy is not None else _copy(hub, call, _number(call))
            if copy is not None:
                with copy:
                    copy.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, room)
    return 0


@handles("shutdown")
def sys_shutdown(hub: Hub, call: Trapped) -> Steps:
    sock = _sock(call)
    how = call.arg_int("how")
    if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
        raise Errno(errno.EINVAL)
    stream = sock.remote.stream
    if stream is not None and how != socket.SHUT_RD and not stream.write_closed:
        yield from stream.settle()  # what the program wrote before goes first
        stream.write_closed = True  # and its writes after fail with EPIPE
        stream.write_error = errno.EPIPE
    yield wire.Shutdown(handle=sock.handle, how=how)
    return 0


# --- data, call by call (and a pumped socket's errors) ----------------------------


def _wait(hub: Hub, call: Trapped, flags: int) -> int:
    return int(not (flags & socket.MSG_DONTWAIT or _nonblocking(hub, call)))


def _refused_write(hub: Hub, call: Trapped, sock: Sock, flags: int) -> NoReturn:
    """A write into a pumped socket the slave no longer takes: its first error (as
    ECONNRESET), then EPIPE (and SIGPIPE unless MSG_NOSIGNAL)."""
    stream = sock.remote.stream
    assert stream is not None
    code, stream.write_error = stream.write_error or errno.EPIPE, errno.EPIPE
    if code == errno.EPIPE:
        _sigpipe(hub, call, flags)
    raise Errno(code)


def _failed_read(hub: Hub, call: Trapped, sock: Sock) -> Continue:
    """A read of a pumped socket whose connection failed (ECONNRESET): what came
    before is read first (natively), then the error once, then end of file."""
    stream = sock.remote.stream
    assert stream is not None
    copy = _copy(hub, call, _number(call))
    if copy is not None:
        with copy:
            try:
                if copy.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    return CONTINUE
            except OSError:
                pass
    code, stream.read_error = stream.read_error, 0
    raise Errno(code)


def _send(hub: Hub, call: Trapped, sock: Sock, data: bytes, flags: int, addr: bytes) -> Asks[int]:
    if sock.pumped:
        _refused_write(hub, call, sock, flags)
    op = wire.Sendto(handle=sock.handle, flags=flags & ~socket.MSG_DONTWAIT,
                     wait=_wait(hub, call, flags), addr=addr, data=data)  # fmt: skip
    try:
        return (yield op).result
    except Errno as exc:
        if exc.errno == errno.EPIPE:
            _sigpipe(hub, call, flags)
        raise


Received = tuple[int, int, bytes, bytes]


def _receive(
    hub: Hub, call: Trapped, sock: Sock, size: int, flags: int
) -> Asks[Received | Continue]:
    """(result, msg_flags, address, data) of one forwarded receive."""
    if sock.pumped:
        return _failed_read(hub, call, sock)
    op = wire.Recvfrom(handle=sock.handle, flags=flags, size=min(size, MAX_IO),
                       wait=_wait(hub, call, flags))  # fmt: skip
    try:
        reply: Reply = yield op
    finally:
        if not flags & socket.MSG_PEEK:
            _net(hub).take_token(call, sock)
    blob = reply.blob
    if len(blob) < RECV_HEAD.size:
        raise Errno(errno.EIO)
    msg_flags, alen = RECV_HEAD.unpack_from(blob)
    addr = blob[RECV_HEAD.size : RECV_HEAD.size + alen]
    data = blob[RECV_HEAD.size + alen :]
    if len(addr) != alen or len(data) > size:
        raise Errno(errno.EIO)
    return reply.result, msg_flags, addr, data


def _scatter(call: Trapped, iovs: list[tuple[int, int]], data: bytes) -> None:
    view = memoryview(data)
    for addr, at, length in _pieces(iovs, 0, len(data)):
        call.memory.write(addr, view[at : at + length])


def _gather(call: Trapped, iovs: list[tuple[int, int]]) -> bytes:
    total = min(sum(length for _, length in iovs), MAX_IO)
    return b"".join(call.memory.read(a, n) for a, _, n in _pieces(iovs, 0, total))


@_on_sockets("read", "readv", "write", "writev")
def sys_socket_rw(hub: Hub, call: Trapped) -> Steps:
    sock = _sock(call)
    iovs = _transfer(call)[0]
    if call.syscall.name in ("write", "writev"):
        return (yield from _send(hub, call, sock, _gather(call, iovs), 0, b""))
    total = sum(length for _, length in iovs)
    got = yield from _receive(hub, call, sock, total, 0)
    if not isinstance(got, tuple):
        return got
    result, _, _, data = got
    _scatter(call, iovs, data)
    return result


def _sendto(hub: Hub, call: Trapped) -> Steps:
    sock = _sock(call)
    flags = call.arg_int("flags")
    addr = (
        _address_in(hub, call, call.arg("dest_addr"), call.arg_int("addrlen"))
        if call.arg("dest_addr")
        else b""
    )
    data = call.memory.read(call.arg("buf"), min(call.arg("len"), MAX_IO))
    return (yield from _send(hub, call, sock, data, flags, addr))


sys_sendto = _on_sockets("sendto")(_sendto)


@_on_sockets("recvfrom")
def sys_recvfrom(hub: Hub, call: Trapped) -> Steps:
    sock = _sock(call)
    size = call.arg("len")
    got = yield from _receive(hub, call, sock, size, call.arg_int("flags"))
    if not isinstance(got, tuple):
        return got
    result, _, addr, data = got
    if data:
        call.memory.write(call.arg("buf"), data)
    _address_out(call, call.arg("src_addr"), call.arg("addrlen"), addr)
    return result


def _msghdr(call: Trapped, at: int) -> tuple[int, int, list[tuple[int, int]], int, int]:
    """(name, namelen, iovecs, control, controllen) of the struct msghdr at ``at``."""
    name, namelen, iov, iovlen, control, controllen, _ = call.memory.read_struct(at, _MSGHDR)
    return name, namelen, _iovecs(call, iov, iovlen), control, controllen


def _sendmsg(hub: Hub, call: Trapped, sock: Sock, at: int, flags: int) -> Asks[int]:
    name, namelen, iovs, _, controllen = _msghdr(call, at)
    if controllen:
        raise Errno(errno.EOPNOTSUPP)  # ancillary data (SCM_RIGHTS...) on a slave socket
    addr = _address_in(hub, call, name, namelen) if name else b""
    return (yield from _send(hub, call, sock, _gather(call, iovs), flags, addr))


def _recvmsg(hub: Hub, call: Trapped, sock: Sock, at: int, flags: int) -> Asks[int | Continue]:
    name, _, iovs, _, _ = _msghdr(call, at)
    total = sum(length for _, length in iovs)
    got = yield from _receive(hub, call, sock, total, flags)
    if not isinstance(got, tuple):
        return got
    result, msg_flags, addr, data = got
    _scatter(call, iovs, data)
    # msg_namelen, msg_controllen (no ancillary data) and msg_flags, as the kernel sets them
    if name:
        (room,) = call.memory.read_struct(at + 8, _INT)
        call.memory.write(name, addr[: max(room, 0)])
        call.memory.write(at + 8, _INT.pack(len(addr)))
    call.memory.write(at + 40, struct.pack("=Q", 0))
    call.memory.write(at + 48, _INT.pack(msg_flags))
    return result


@_on_sockets("sendmsg")
def sys_sendmsg(hub: Hub, call: Trapped) -> Steps:
    return (yield from _sendmsg(hub, call, _sock(call), call.arg("msg"), call.arg_int("flags")))


@_on_sockets("recvmsg")
def sys_recvmsg(hub: Hub, call: Trapped) -> Steps:
    return (yield from _recvmsg(hub, call, _sock(call), call.arg("msg"), call.arg_int("flags")))


@_on_sockets("sendmmsg", "recvmmsg")
def sys_mmsg(hub: Hub, call: Trapped) -> Steps:
    """Each message in turn; the count done, or the first one's error (the kernel's
    rule). recvmmsg waits for the first message only (then takes what is there)."""
    sock = _sock(call)
    vector, count = call.arg("msgvec"), min(call.arg("vlen") & 0xFFFFFFFF, 1024)
    flags = call.arg_int("flags")
    sending = call.syscall.name == "sendmmsg"
    done = 0
    length: int | Continue
    while done < count:
        at = vector + done * _MMSGHDR
        try:
            if sending:
                length = yield from _sendmsg(hub, call, sock, at, flags)
            else:
                length = yield from _recvmsg(hub, call, sock, at, flags)
        except Errno:
            if done:
                return done
            raise
        if not isinstance(length, int):
            return length
        call.memory.write(at + 56, _UINT.pack(length))
        done += 1
        if not sending:
            flags |= socket.MSG_DONTWAIT
    return done


_FD_IOCTLS = {0x5421, 0x5450, 0x5451, 0x5452}  # FIONBIO, FIONCLEX, FIOCLEX, FIOASYNC
_QUEUE_IOCTLS = {0x541B, 0x5411}  # FIONREAD (SIOCINQ), TIOCOUTQ (SIOCOUTQ)


@_on_sockets("ioctl")
def sys_socket_ioctl(hub: Hub, call: Trapped) -> Steps:
    sock = _sock(call)
    request = call.arg("request") & 0xFFFFFFFF
    if request in _FD_IOCTLS or (sock.pumped and request in _QUEUE_IOCTLS):
        return CONTINUE  # the placeholder's: its description, its queue
    if request == 0x541B:
        reply = yield wire.Ioctl(handle=sock.handle, request=request, arg=0)
        call.memory.write(
            call.arg("arg"), _INT.pack(struct.unpack("<q", _blob(reply, 8, exact=True))[0])
        )
        return reply.result
    raise Errno(errno.ENOTTY)  # interface requests (SIOCGIF*) are not forwarded
