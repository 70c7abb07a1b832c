"""The slave's network (fsys.master.net), end to end.

The slave runs in a network namespace of its own (``unshare -n``, lo up), and so do
the servers it should reach; the master and the tests' own processes cannot reach
them. So a program whose socket were made on the wrong side would fail: its connect
would be refused, its server would not be seen from the slave's namespace, its
names would not resolve. The slave is also rooted in a box, as everywhere.
"""

from __future__ import annotations

import os
import socket
import subprocess
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.conftest import PYTHON, Result, Session, build_c, slave_command

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@dataclass
class NetNS:
    """A network namespace held open by a sleeping process."""

    pid: int

    @property
    def enter(self) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.pid}/ns/net"]

    @contextmanager
    def server(self, script: str) -> Iterator[str]:
        """Run ``script`` (python) in the namespace while the block runs; its first
        line (the port it serves)."""
        proc = subprocess.Popen(
            [*self.enter, PYTHON, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            yield proc.stdout.readline().strip()
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.enter, *args], capture_output=True, text=True, timeout=30, check=False
        )


@pytest.fixture
def netns() -> Iterator[NetNS]:
    holder = subprocess.Popen(["unshare", "-n", "sleep", "3600"])
    try:
        for _ in range(100):  # until it is in its namespace (unshare has exec'd)
            if os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                break
            subprocess.run(["sleep", "0.01"], check=True)
        ns = NetNS(holder.pid)
        subprocess.run([*ns.enter, "ip", "link", "set", "lo", "up"], check=True)
        yield ns
    finally:
        holder.kill()
        holder.wait()


@dataclass
class NetSession(Session):
    ns: NetNS

    @property
    def slave(self) -> str:
        return slave_command(self.box, prefix=self.ns.enter)

    async def py(self, script: str, *args: str, extra: tuple[str, ...] = ()) -> Result:
        return await self.run(PYTHON, "-c", textwrap.dedent(script), *args, extra=extra)


@pytest.fixture
def net(tmp_path: Path, netns: NetNS) -> NetSession:
    box, master_dir = tmp_path / "box", tmp_path / "master"
    box.mkdir()
    master_dir.mkdir()
    return NetSession(box, master_dir, netns)


TCP_SERVER = """
    import socket, sys
    s = socket.create_server(("127.0.0.1", 0))
    print(s.getsockname()[1], flush=True)
    while True:
        c, addr = s.accept()
        with c:
            data = b""
            while not data.endswith(b"\\n"):
                more = c.recv(4096)
                if not more:
                    break
                data += more
            c.sendall(b"slave says " + data)
"""

CLIENT = """
    import socket, sys
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as c:
        c.sendall(b"hello\\n")
        print(c.recv(100).decode().strip(), c.getpeername()[0])
"""


async def test_a_client_connects_from_the_slave(net: NetSession) -> None:
    with net.ns.server(TCP_SERVER) as port:
        got = await net.py(CLIENT, port)
        assert got.status == 0, got.err
        assert got.out == "slave says hello 127.0.0.1\n"
        # The same program with the master's network: nothing listens there.
        got = await net.py(CLIENT, port, extra=("--network", "master"))
        assert got.status != 0 and "ConnectionRefusedError" in got.err


UDP_SERVER = """
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1], flush=True)
    while True:
        data, addr = s.recvfrom(65536)
        for piece in data.split(b","):  # one datagram back per piece
            s.sendto(piece + b"@" + str(addr[1]).encode(), addr)
"""

UDP_CLIENT = """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(10)
    s.sendto(b"a,bb,ccc", ("127.0.0.1", int(sys.argv[1])))
    me = s.getsockname()[1]
    for _ in range(3):
        data, addr = s.recvfrom(100)
        print(data.decode().replace(str(me), "ME"), addr == ("127.0.0.1", int(sys.argv[1])))
    s.sendto(b"xyz", ("127.0.0.1", int(sys.argv[1])))
    print(len(s.recv(2)), "of a longer datagram")  # the rest of it is gone, as natively
"""


async def test_udp_keeps_datagrams_and_addresses(net: NetSession) -> None:
    with net.ns.server(UDP_SERVER) as port:
        got = await net.py(UDP_CLIENT, port)
        assert got.status == 0, got.err
        assert got.out == "a@ME True\nbb@ME True\nccc@ME True\n2 of a longer datagram\n"


async def test_a_server_under_fsys_listens_on_the_slave(net: NetSession) -> None:
    (net.box / "index.txt").write_text("served from the box\n")
    ns = net.ns

    async def fetch() -> str:
        for _ in range(200):
            done = await trio.to_thread.run_sync(
                ns.run, "curl", "-s", "-m", "5", "http://127.0.0.1:18080/index.txt"
            )
            if done.returncode == 0:
                return done.stdout
            await trio.sleep(0.05)
        return "never served"

    async with trio.open_nursery() as nursery:
        result: list[Result] = []

        async def serve() -> None:
            result.append(
                await net.run(
                    PYTHON, "-m", "http.server", "18080", "--bind", "127.0.0.1", deadline=30
                )
            )

        nursery.start_soon(serve)
        first = await fetch()
        second = await fetch()
        # The master's own namespace has no such server.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", 18080), timeout=1).close()
        nursery.cancel_scope.cancel()
    assert first == second == "served from the box\n"


ASYNCIO_PAIR = """
    import asyncio
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
    async def client(port, i):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = (b"%d " % i) * (1000 + i * 37)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        back = await reader.read()
        writer.close()
        return back == payload
    async def main():
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        oks = await asyncio.gather(*(client(port, i) for i in range(100)))
        print(sum(oks), "of", len(oks))
        server.close()
    asyncio.run(main())
"""


async def test_an_asyncio_server_and_100_clients(net: NetSession) -> None:
    got = await net.py(ASYNCIO_PAIR)
    assert got.status == 0, got.err
    assert got.out == "100 of 100\n"


TRIO_PAIR = """
    import functools, trio
    async def echo(stream):
        async for data in stream:
            await stream.send_all(data)
    async def main():
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")
            listeners = await nursery.start(serve)
            port = listeners[0].socket.getsockname()[1]
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            for word in (b"one", b"two", b"three"):
                await stream.send_all(word)
                print((await stream.receive_some(100)).decode())
            await stream.aclose()
            nursery.cancel_scope.cancel()
    trio.run(main)
"""


async def test_a_trio_server_and_client(net: NetSession) -> None:
    got = await net.py(TRIO_PAIR)
    assert got.status == 0, got.err
    assert got.out == "one\ntwo\nthree\n"


POLL_SERVER = """
    import socket
    s = socket.create_server(("127.0.0.1", 0))
    print(s.getsockname()[1], flush=True)
    c, _ = s.accept()
    assert c.recv(2) == b"go"
    c.sendall(b"sock")
    c.recv(1)
"""


async def test_poll_on_a_local_pipe_and_a_remote_socket(
    net: NetSession, tmp_path_factory: pytest.TempPathFactory
) -> None:
    program = build_c(tmp_path_factory, "poll_mixed")
    with net.ns.server(POLL_SERVER) as port:
        got = await net.run(str(program), port)
        assert got.status == 0, got.out + got.err
        assert got.out == "pipe: pipe\nsocket: sock\n"  # the pipe first: the server waits


NONBLOCKING = """
    import errno, select, socket, sys
    def attempt(port):
        s = socket.socket()
        s.setblocking(False)
        code = s.connect_ex(("127.0.0.1", port))
        assert code in (0, errno.EINPROGRESS), code
        _, writable, _ = select.select([], [s], [], 10)
        assert writable == [s]
        return errno.errorcode.get(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), "0"), s
    print(attempt(int(sys.argv[2]))[0])  # nobody listens
    code, s = attempt(int(sys.argv[1]))
    s.setblocking(True)
    s.sendall(b"late\\n")
    print(code, s.recv(100).decode().strip())
"""


async def test_a_nonblocking_connect_ends_in_success_or_its_error(net: NetSession) -> None:
    with net.ns.server(TCP_SERVER) as port:
        got = await net.py(NONBLOCKING, port, "1")
        assert got.status == 0, got.err
        assert got.out == "ECONNREFUSED\n0 slave says late\n"


RESETTING_SERVER = """
    import socket, struct
    s = socket.create_server(("127.0.0.1", 0))
    print(s.getsockname()[1], flush=True)
    while True:
        c, _ = s.accept()
        how = c.recv(10)
        if how == b"reset":  # close with a RST
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
"""

RESET_CLIENT = """
    import socket, sys, time
    port = int(sys.argv[1])
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"reset")
    time.sleep(0.3)
    try:
        print("read", c.recv(10))
    except ConnectionResetError:
        print("read ECONNRESET")
    print("then", c.recv(10))
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"close")
    time.sleep(0.3)
    try:
        for _ in range(100):
            c.sendall(b"x" * 1000)
            time.sleep(0.01)
        print("no error")
    except (BrokenPipeError, ConnectionResetError) as exc:
        print("write", type(exc).__name__)
"""


async def test_a_reset_and_a_broken_pipe_reach_the_program(net: NetSession) -> None:
    with net.ns.server(RESETTING_SERVER) as port:
        native = await trio.to_thread.run_sync(
            net.ns.run, PYTHON, "-c", textwrap.dedent(RESET_CLIENT), port
        )
        got = await net.py(RESET_CLIENT, port)
        assert got.status == 0, got.err
        assert native.stdout.startswith("read ECONNRESET\nthen b''\nwrite ")
        assert got.out == native.stdout


UNIX = """
    import os, socket
    os.chdir("/work")
    a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    a.bind("rel.sock")  # relative to a slave directory
    a.listen()
    print(a.getsockname(), os.path.exists("/work/rel.sock"))
    b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        b.bind("/work/rel.sock")
    except OSError as exc:
        print(type(exc).__name__, exc.errno)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect("/work/rel.sock")
    conn, _ = a.accept()
    c.sendall(b"through the slave")
    print(conn.recv(100).decode())
    d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    d.bind("/work/d.sock")
    e = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    e.sendto(b"one", "/work/d.sock")
    print(d.recv(10).decode())
"""


async def test_unix_sockets_at_slave_paths_are_the_slaves(net: NetSession) -> None:
    (net.box / "work").mkdir()
    got = await net.py(UNIX)
    assert got.status == 0, got.err
    assert got.out == "rel.sock True\nOSError 98\nthrough the slave\none\n"
    assert (net.box / "work" / "rel.sock").is_socket()
    assert (net.box / "work" / "d.sock").is_socket()
    net.master_untouched()


DNS_SERVER = """
    import socket, struct
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 53))
    print("ready", flush=True)
    while True:
        query, addr = s.recvfrom(512)
        ident, flags, qd = struct.unpack("!HHH", query[:6])
        end = query.index(b"\\0", 12) + 5
        name, qtype = query[12 : end - 4], struct.unpack("!H", query[end - 4 : end - 2])[0]
        answers = b""
        count = 0
        if name == b"\\x07dnsonly\\x04test\\x00" and qtype == 1:
            answers = b"\\xc0\\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([10, 9, 8, 7])
            count = 1
        head = struct.pack("!HHHHHH", ident, 0x8180, 1, count, 0, 0)
        s.sendto(head + query[12:end] + answers, addr)
"""

RESOLVE = """
    import socket
    for name in ("slaveonly.test", "dnsonly.test"):
        print(name, socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
"""


async def test_names_resolve_the_slaves_way(net: NetSession) -> None:
    etc = net.box / "etc"
    etc.mkdir()
    (etc / "hosts").write_text("127.0.0.1 localhost\n10.1.2.3 slaveonly.test\n")
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
    (etc / "nsswitch.conf").write_text("hosts: files dns\n")
    with net.ns.server(DNS_SERVER) as line:
        assert line == "ready"
        got = await net.py(RESOLVE)
        assert got.status == 0, got.err
        assert got.out == "slaveonly.test 10.1.2.3\ndnsonly.test 10.9.8.7\n"


#: Sends until the kernel has taken nothing for a second: what the buffers on the way
#: hold. (A hub that buffered without bound would take the loop's 256 MiB.)
FILL = """
    def fill(sock):
        import time
        sock.setblocking(False)
        total, idle, chunk = 0, 0, b"x" * 65536
        while idle < 5 and total < 256 << 20:
            try:
                total += sock.send(chunk)
                idle = 0
            except BlockingIOError:
                idle += 1
                time.sleep(0.2)
        sock.setblocking(True)
        return total
"""

SLOW_READER = """
    import socket
    s = socket.create_server(("127.0.0.1", 0), backlog=2)
    print(s.getsockname()[1], flush=True)
    data, _ = s.accept()
    go, _ = s.accept()  # the writer has stalled: read everything now
    total = 0
    while more := data.recv(1 << 20):
        total += len(more)
    data.sendall(str(total).encode())
"""

STALLED_WRITER = """
    import socket, sys
    port = int(sys.argv[1])
    data = socket.create_connection(("127.0.0.1", port), timeout=30)
    total = fill(data)
    socket.create_connection(("127.0.0.1", port), timeout=30).close()
    data.shutdown(socket.SHUT_WR)
    print(total, data.recv(100).decode())
"""


async def test_a_peer_that_does_not_read_stops_the_programs_writes(net: NetSession) -> None:
    with net.ns.server(SLOW_READER) as port:
        got = await net.py(textwrap.dedent(FILL) + textwrap.dedent(STALLED_WRITER), port)
    assert got.status == 0, got.err
    sent, received = map(int, got.out.split())
    assert sent == received  # nothing lost on the way
    assert 0 < sent < 64 << 20  # what the placeholder, the pumps and TCP hold


FAST_WRITER = """
    import socket
    s = socket.create_server(("127.0.0.1", 0), backlog=2)
    print(s.getsockname()[1], flush=True)
    data, _ = s.accept()
    told, _ = s.accept()
    total = fill(data)
    told.sendall(str(total).encode())
    told.close()
    data.close()
"""

STALLED_READER = """
    import socket, sys
    port = int(sys.argv[1])
    data = socket.create_connection(("127.0.0.1", port), timeout=30)
    told = socket.create_connection(("127.0.0.1", port), timeout=30)
    stalled = told.recv(100).decode()  # the writer has stalled: read everything now
    got = 0
    while more := data.recv(1 << 20):
        got += len(more)
    print(stalled, got)
"""


async def test_a_program_that_does_not_read_stops_its_peers_writes(net: NetSession) -> None:
    script = "\n".join(textwrap.dedent(part) for part in (FILL, FAST_WRITER))
    with net.ns.server(script) as port:
        got = await net.py(STALLED_READER, port)
    assert got.status == 0, got.err
    sent, received = map(int, got.out.split())
    assert sent == received
    assert 0 < sent < 64 << 20


CONNECT_AGAIN = """
    import errno, select, socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    addr = listener.getsockname()
    s = socket.socket()
    s.setblocking(False)
    first = s.connect_ex(addr)  # nobody listens yet: refused, at once or soon
    select.select([], [s], [], 5)
    print(errno.errorcode.get(first, first), s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    print(select.select([s], [], [], 0)[0] != [])  # (readable: a read reports the error)
    listener.listen(1)
    for _ in range(128):  # as asyncio's sock_connect is retried (test_sock_lowlevel)
        again = s.connect_ex(addr)  # (ECONNABORTED, the first time after a refusal)
        if again in (errno.EINPROGRESS, errno.EALREADY):
            select.select([], [s], [], 5)
            again = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if again in (0, errno.EISCONN):
            break
    print("connected", again in (0, errno.EISCONN))
    c, _ = listener.accept()
    s.setblocking(True)
    s.sendall(b"hello")
    print(c.recv(10))
    c.sendall(b"back")
    print(s.recv(10))
"""


async def test_a_connect_refused_then_made_again(net: NetSession) -> None:
    native = subprocess.run([PYTHON, "-c", textwrap.dedent(CONNECT_AGAIN)], capture_output=True,
                            text=True, timeout=30, check=True)  # fmt: skip
    got = await net.py(CONNECT_AGAIN)
    assert got.status == 0, got.err
    assert got.out == native.stdout
    assert "b'hello'\nb'back'\n" in got.out
