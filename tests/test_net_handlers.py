"""The socket handlers (fsys.master.net), in-process: the real hub, router and
handlers over fakes of the kernel's side, and a real executor, whose sockets are
real (on 127.0.0.1 of this machine). Calls that would wait are made non-blocking
here (SOCK_NONBLOCK, MSG_DONTWAIT): waiting is the end-to-end tests' part."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsys.master.net import SOCKET_BUFFER
from fsys.master.routing import CONTINUE
from tests.fakes import FakeProcess, Rig

AF_INET, AF_UNIX = socket.AF_INET, socket.AF_UNIX
STREAM, DGRAM = socket.SOCK_STREAM, socket.SOCK_DGRAM
NONBLOCK, CLOEXEC = socket.SOCK_NONBLOCK, socket.SOCK_CLOEXEC
SOL_SOCKET, SO_TYPE, SO_REUSEADDR = socket.SOL_SOCKET, socket.SO_TYPE, socket.SO_REUSEADDR
_INT = struct.Struct("=i")
WMEM_MAX = int(Path("/proc/sys/net/core/wmem_max").read_text())


def sin(port: int = 0) -> bytes:
    return struct.pack("=H", AF_INET) + struct.pack("!H", port) + bytes([127, 0, 0, 1]) + bytes(8)


def sun(path: bytes) -> bytes:
    return struct.pack("=H", AF_UNIX) + path + b"\0"


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Rig]:
    box = tmp_path / "box"
    (box / "work").mkdir(parents=True)
    rig = Rig(box, network=True)
    yield rig
    rig.close()


@pytest.fixture
def app(net: Rig) -> FakeProcess:
    return net.process()


def sock(p: FakeProcess, family: int = AF_INET, kind: int = STREAM | NONBLOCK) -> int:
    fd = p.call("socket", family, kind, 0)
    assert isinstance(fd, int) and fd >= 0, fd
    return fd


def name_of(p: FakeProcess, fd: int, call: str = "getsockname", room: int = 128) -> bytes:
    buf, size = p.mem.alloc(128), p.mem.alloc(_INT.pack(room))
    assert p.call(call, fd, buf, size) == 0
    (length,) = _INT.unpack(p.mem.bytes_at(size, 4))
    return p.mem.bytes_at(buf, min(length, room)) + b"|%d" % length


def port_of(p: FakeProcess, fd: int) -> int:
    raw = name_of(p, fd)
    port: int = struct.unpack("!H", raw[2:4])[0]
    return port


def test_an_inet_socket_is_made_on_the_slave(net: Rig, app: FakeProcess) -> None:
    fd = sock(app, kind=STREAM | CLOEXEC)
    remote = net.placeholders.lookup(app.tid, fd)
    assert remote is not None and remote.sock is not None
    assert (remote.sock.family, remote.sock.type) == (AF_INET, STREAM)
    assert net.listener.cloexec[(app.tgid, fd)] is True
    handle = net.executor.handles[remote.handle]
    assert handle.net and os.get_blocking(handle.fd) is False  # the slave never blocks
    # Not readable: its readiness is the slave socket's (no byte as for a file).
    kept = socket.socket(fileno=os.dup(net.listener.kept[(app.tgid, fd)]))
    with kept:
        with pytest.raises(BlockingIOError):
            kept.recv(1, socket.MSG_DONTWAIT)
        # Room for a pump's chunks each way once it connects; a datagram socket, none.
        stream_room = kept.getsockopt(SOL_SOCKET, socket.SO_SNDBUF)
    assert stream_room >= 2 * min(SOCKET_BUFFER, WMEM_MAX)
    udp = sock(app, kind=DGRAM)
    with socket.socket(fileno=os.dup(net.listener.kept[(app.tgid, udp)])) as datagrams:
        assert datagrams.getsockopt(SOL_SOCKET, socket.SO_SNDBUF) < stream_room
    assert app.call("socket", AF_INET, STREAM | 0x100, 0) == -errno.EINVAL
    assert app.call("socket", 99, STREAM, 0) == -errno.EAFNOSUPPORT  # the slave's answer


def test_sockets_stay_the_masters_without_the_slaves_network(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        assert rig.process().call("socket", AF_INET, STREAM, 0) is CONTINUE
    finally:
        rig.close()


def test_bind_getsockname_and_the_kernels_truncation(net: Rig, app: FakeProcess) -> None:
    fd = sock(app)
    assert app.call("bind", fd, app.mem.alloc(sin()), 16) == 0
    port = port_of(app, fd)
    assert port > 0
    assert name_of(app, fd, room=4) == sin(port)[:4] + b"|16"  # truncated, whole length
    assert app.call("bind", fd, app.mem.alloc(sin()), 200) == -errno.EINVAL
    size = app.mem.alloc(_INT.pack(-1))
    assert app.call("getsockname", fd, app.mem.alloc(16), size) == -errno.EINVAL
    assert app.call("getpeername", fd, app.mem.alloc(16), app.mem.alloc(_INT.pack(16))) == (
        -errno.ENOTCONN
    )


def test_socket_options_cross_to_the_slave(net: Rig, app: FakeProcess) -> None:
    fd = sock(app)
    one = app.mem.alloc(_INT.pack(1))
    assert app.call("setsockopt", fd, SOL_SOCKET, SO_REUSEADDR, one, 4) == 0
    value, size = app.mem.alloc(8), app.mem.alloc(_INT.pack(8))
    assert app.call("getsockopt", fd, SOL_SOCKET, SO_REUSEADDR, value, size) == 0
    assert (app.mem.bytes_at(value, 4), app.mem.bytes_at(size, 4)) == (_INT.pack(1), _INT.pack(4))
    assert app.call("getsockopt", fd, SOL_SOCKET, SO_TYPE, value, size) == 0
    assert app.mem.bytes_at(value, 4) == _INT.pack(STREAM)
    assert app.call("getsockopt", fd, SOL_SOCKET, SO_TYPE, value, app.mem.alloc(_INT.pack(-1))) == (
        -errno.EINVAL
    )
    assert app.call("setsockopt", fd, SOL_SOCKET, SO_REUSEADDR, one, -1) == -errno.EINVAL


def test_listen_watches_and_a_nonblocking_accept_says_eagain(net: Rig, app: FakeProcess) -> None:
    fd = sock(app)
    assert app.call("bind", fd, app.mem.alloc(sin()), 16) == 0
    assert app.call("listen", fd, 8) == 0
    assert [name for name, _ in net.tasks.started] == ["_watch"]
    assert app.call("accept4", fd, 0, 0, NONBLOCK) == -errno.EAGAIN
    assert app.call("accept4", fd, 0, 0, 0x4000_0000) == -errno.EINVAL
    client = socket.create_connection(("127.0.0.1", port_of(app, fd)))
    with client:
        buf, size = app.mem.alloc(128), app.mem.alloc(_INT.pack(128))
        conn = app.call("accept4", fd, buf, size, CLOEXEC)
        assert isinstance(conn, int) and conn > fd
        peer = struct.unpack("!H", app.mem.bytes_at(buf + 2, 2))[0]
        assert peer == client.getsockname()[1]
        remote = net.placeholders.lookup(app.tid, conn)
        assert remote is not None and remote.stream is not None  # pumped: connected
        assert net.listener.cloexec[(app.tgid, conn)] is True
        assert net.tasks.started[-1][0] == "_pump"
        # A pumped connection's data calls run natively on its placeholder.
        assert app.call("recvfrom", conn, buf, 10, 0, 0, 0) is CONTINUE
        assert app.call("read", conn, buf, 10) is CONTINUE
        assert app.call("fcntl", conn, 4, os.O_NONBLOCK) is CONTINUE


def test_shutdown_checks_how_and_asks_the_slave(net: Rig, app: FakeProcess) -> None:
    fd = sock(app)
    assert app.call("shutdown", fd, 3) == -errno.EINVAL
    assert app.call("shutdown", fd, socket.SHUT_RDWR) == -errno.ENOTCONN


def test_udp_datagrams_with_their_addresses(net: Rig, app: FakeProcess) -> None:
    fd = sock(app, kind=DGRAM)
    assert [name for name, _ in net.tasks.started] == ["_watch"]  # readable when it is
    peer = socket.socket(AF_INET, DGRAM)
    peer.bind(("127.0.0.1", 0))
    with peer:
        to = app.mem.alloc(sin(peer.getsockname()[1]))
        assert app.call("sendto", fd, app.mem.alloc(b"hello"), 5, 0, to, 16) == 5
        data, addr = peer.recvfrom(100)
        assert data == b"hello" and addr[1] == port_of(app, fd)
        buf, src, size = app.mem.alloc(16), app.mem.alloc(16), app.mem.alloc(_INT.pack(16))
        dontwait = socket.MSG_DONTWAIT
        assert app.call("recvfrom", fd, buf, 16, dontwait, src, size) == -errno.EAGAIN
        peer.sendto(b"a longer datagram", addr)
        assert app.call("recvfrom", fd, buf, 4, dontwait, src, size) == 4  # the rest is gone
        assert app.mem.bytes_at(buf, 4) == b"a lo"
        assert app.mem.bytes_at(src, 16) == sin(peer.getsockname()[1])
        peer.sendto(b"xyz", addr)
        trunc = dontwait | socket.MSG_TRUNC
        assert app.call("recvfrom", fd, buf, 1, trunc, 0, 0) == 3  # its whole length
        peer.sendto(b"by read", addr)
        nonblocking = os.dup(net.listener.kept[(app.tgid, fd)])
        os.set_blocking(nonblocking, False)  # (the program's description: O_NONBLOCK)
        os.close(nonblocking)
        assert app.call("read", fd, buf, 16) == 7
        assert app.mem.bytes_at(buf, 7) == b"by read"
        assert app.call("read", fd, buf, 16) == -errno.EAGAIN


def test_a_unix_socket_binding_a_slave_path_becomes_the_slaves(net: Rig, app: FakeProcess) -> None:
    local = socket.socket(AF_UNIX, STREAM)
    app.own(5, local.fileno())
    net.listener.kept[(app.tgid, 5)] = os.dup(local.fileno())
    assert app.call("bind", 5, app.mem.alloc(sun(b"/work/s.sock")), 15) == 0
    assert (net.box / "work" / "s.sock").is_socket()
    remote = net.placeholders.lookup(app.tid, 5)
    assert remote is not None and remote.sock is not None and remote.sock.family == AF_UNIX
    assert name_of(app, 5) == sun(b"/work/s.sock") + b"|15"  # as the program gave it
    local.close()


def test_a_unix_socket_at_a_master_path_or_abstract_stays_the_masters(
    net: Rig, app: FakeProcess
) -> None:
    local = socket.socket(AF_UNIX, STREAM)
    app.own(5, local.fileno())
    with local:
        assert app.call("bind", 5, app.mem.alloc(sun(b"/usr/x.sock")), 14) is CONTINUE
        assert app.call("bind", 5, app.mem.alloc(b"\1\0\0abstract"), 11) is CONTINUE
        assert app.call("connect", 5, app.mem.alloc(sin()), 16) is CONTINUE
    assert net.link.ops == []


def accepted(net: Rig, app: FakeProcess) -> tuple[int, socket.socket]:
    """A pumped connection of the program's (accepted on the slave), and its peer."""
    fd = sock(app, kind=STREAM)
    assert app.call("bind", fd, app.mem.alloc(sin()), 16) == 0
    assert app.call("listen", fd, 1) == 0
    client = socket.create_connection(("127.0.0.1", port_of(app, fd)))
    conn = app.call("accept4", fd, 0, 0, 0)
    assert isinstance(conn, int) and conn > fd
    return conn, client


def test_a_small_buffer_the_program_sets_is_its_placeholders_too(
    net: Rig, app: FakeProcess
) -> None:
    conn, client = accepted(net, app)
    with client:
        remote = net.placeholders.lookup(app.tid, conn)
        assert remote is not None
        kept = socket.socket(fileno=os.dup(net.listener.kept[(app.tgid, conn)]))
        with kept:
            roomy = kept.getsockopt(SOL_SOCKET, socket.SO_SNDBUF)
            small = app.mem.alloc(_INT.pack(4096))
            assert app.call("setsockopt", conn, SOL_SOCKET, socket.SO_SNDBUF, small, 4) == 0
            assert kept.getsockopt(SOL_SOCKET, socket.SO_SNDBUF) < roomy  # what it writes
            assert remote.peer.getsockopt(SOL_SOCKET, socket.SO_SNDBUF) == roomy
            assert app.call("setsockopt", conn, SOL_SOCKET, socket.SO_RCVBUF, small, 4) == 0
            assert remote.peer.getsockopt(SOL_SOCKET, socket.SO_SNDBUF) < roomy  # its input


def test_sendfile_into_a_pumped_socket_goes_after_what_was_written(
    net: Rig, app: FakeProcess
) -> None:
    (net.box / "work" / "f").write_bytes(b"from the file")
    conn, client = accepted(net, app)
    with client:
        remote = net.placeholders.lookup(app.tid, conn)
        assert remote is not None and remote.stream is not None
        src = app.call("openat", -100, b"/work/f", os.O_RDONLY, 0)
        assert isinstance(src, int) and src >= 0
        assert app.call("sendfile", conn, src, 0, 100) == 13
        # Into the placeholder, where the pump takes it in order; not the slave's
        # sendfile straight into its socket, which would pass what waits there.
        assert remote.peer.recv(100) == b"from the file"
        remote.stream.write_closed = True  # the slave refused a write
        assert app.call("sendfile", conn, src, 0, 100) == -errno.EPIPE
