"""``fsys-slave serve --listen``: addresses, the shared secret, and the service.

The exchange is driven in process over socketpairs; the service end to end, as a
user runs it: a listening fsys-slave confined to a box, fsys-master --connect from
another directory, and raw protocol clients where a thousand sessions are wanted.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from fsys import auth
from fsys.address import connect, parse
from fsys.errors import SESSION_FAILED
from fsys.protocol import (
    CLOSED,
    HEADER,
    NEED_DATA,
    Call,
    Connection,
    Goodbye,
    Hello,
    Op,
    Reply,
    Role,
    Stat,
    encode,
)
from tests.conftest import PYTHON, Result, run_master

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from certs import self_signed  # bench/certs.py: the bench's certificate too

SECRET = b"correct horse battery staple"


# --- the service end to end ----------------------------------------------------------------


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    address: str
    box: Path
    master_dir: Path
    log: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def children(self) -> list[int]:
        """The service's session processes now."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                             text=True, check=False).stdout  # fmt: skip
        return [int(p) for p in out.split()]

    async def run(self, *program: str, extra: tuple[str, ...] = (),
                  env: dict[str, str] | None = None, deadline: float = 60) -> Result:  # fmt: skip
        return await run_master(["run", "--connect", self.address, *extra, "--", *program],
                                cwd=self.master_dir, env=env, deadline=deadline)  # fmt: skip

    def said(self, text: str, timeout: float = 10) -> str:
        """The first line of the service's log with ``text`` in it (waiting for it)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.log):
                if text in line:
                    return line
            time.sleep(0.02)
        raise AssertionError(f"the service never said {text!r}: {self.log}")

    async def heard(self, text: str, timeout: float = 20) -> str:
        """``said``, for a test inside trio (other tasks go on meanwhile)."""
        with trio.fail_after(timeout):
            while True:
                for line in list(self.log):
                    if text in line:
                        return line
                await trio.sleep(0.02)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout=20)
        if self.reader is not None:
            self.reader.join(timeout=10)  # at the end of the log: the pipe can close
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return status


#: The services started by the running test (``no_service_left`` ends them).
STARTED: list[Service] = []


def start_service(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Service:
    box, master_dir = tmp_path / "box", tmp_path / "master"
    box.mkdir(exist_ok=True)
    master_dir.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [PYTHON, "-m", "fsys.slave", "serve", "--root", str(box), *args],
        stderr=subprocess.PIPE, env=env, start_new_session=True,
    )  # fmt: skip
    service = Service(proc, "", box, master_dir)
    STARTED.append(service)

    def read_log() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            service.log.append(raw.decode(errors="replace").rstrip("\n"))

    service.reader = threading.Thread(target=read_log, daemon=True)
    service.reader.start()
    line = service.said("listening on")
    service.address = line.split("listening on ")[1].split(" ")[0]
    return service


@pytest.fixture(autouse=True)
def no_service_left() -> Iterator[None]:
    """Whatever a test does, no service it started outlives it."""
    yield
    while STARTED:
        service = STARTED.pop()
        if service.proc.poll() is None:
            os.killpg(service.proc.pid, signal.SIGKILL)
            service.proc.wait()
        if service.proc.stderr is not None:
            service.proc.stderr.close()


@pytest.fixture
def unix_service(tmp_path: Path) -> Iterator[Service]:
    service = start_service(tmp_path, "--listen", f"unix:{tmp_path}/slave.sock")
    yield service
    assert service.stop() == 0
    assert not (tmp_path / "slave.sock").exists()  # the service removes its socket


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    f = tmp_path / "secret"
    f.write_bytes(SECRET)
    f.chmod(0o600)
    return f


@pytest.fixture
def tcp_service(tmp_path: Path, secret_file: Path) -> Iterator[Service]:
    service = start_service(tmp_path, "--listen", "tcp:127.0.0.1:0",
                            "--secret-file", str(secret_file))  # fmt: skip
    yield service
    assert service.stop() == 0


async def test_a_unix_service_serves_sessions(unix_service: Service, tmp_path: Path) -> None:
    assert stat.S_IMODE((tmp_path / "slave.sock").stat().st_mode) == 0o600
    (unix_service.box / "f").write_bytes(b"on the slave\n")
    got = await unix_service.run("/bin/sh", "-c", "cat /f; echo made > /g")
    assert got.status == 0, got.err
    assert got.out == "on the slave\n"
    assert (unix_service.box / "g").read_bytes() == b"made\n"
    assert list(unix_service.master_dir.iterdir()) == []
    unix_service.said("session 1 (pid")
    for _ in range(50):
        if any("ended" in line for line in unix_service.log):
            break
        await trio.sleep(0.05)
    assert unix_service.children() == []


async def test_tcp_lets_in_only_the_secret(tcp_service: Service, secret_file: Path) -> None:
    write = ("/bin/sh", "-c", "echo in > /made")
    wrong = {**os.environ, "FSYS_SECRET": "not the secret, but as long"}
    got = await tcp_service.run(*write, env=wrong)
    assert got.status == SESSION_FAILED and "the slave refused our secret" in got.err
    assert "Traceback" not in got.err and len(got.err.splitlines()) == 1
    tcp_service.said("wrong secret")
    missing = {k: v for k, v in os.environ.items() if k != "FSYS_SECRET"}
    got = await tcp_service.run(*write, env=missing)
    assert got.status == SESSION_FAILED and "asks for a secret" in got.err
    assert not (tcp_service.box / "made").exists()  # nothing ran for either
    got = await tcp_service.run(*write, extra=("--secret-file", str(secret_file)))
    assert got.status == 0, got.err
    assert (tcp_service.box / "made").read_bytes() == b"in\n"
    right = {**os.environ, "FSYS_SECRET": SECRET.decode()}
    got = await tcp_service.run("cat", "/made", env=right)
    assert got.out == "in\n"


def run_slave_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "fsys.slave", "serve", *args], capture_output=True,
                          text=True, timeout=30, check=False, env=env)  # fmt: skip


def test_the_service_refuses_to_start_unguarded(tmp_path: Path, secret_file: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FSYS_SECRET"}
    done = run_slave_cli("--listen", "tcp:127.0.0.1:0", env=env)
    assert done.returncode == 2 and "needs a secret" in done.stderr
    secret_file.chmod(0o644)
    done = run_slave_cli("--listen", "tcp:127.0.0.1:0", "--secret-file", str(secret_file))
    assert done.returncode == 2 and "chmod 600" in done.stderr
    done = run_slave_cli("--listen", "nowhere")
    assert done.returncode == 2 and "not unix:PATH or tcp:HOST:PORT" in done.stderr
    done = run_slave_cli("--listen", "unix:/nonexistent/dir/s")
    assert done.returncode == 2 and "No such file or directory" in done.stderr
    assert "Traceback" not in done.stderr
    (tmp_path / "file").write_text("")
    done = run_slave_cli("--listen", f"unix:{tmp_path}/file")
    assert done.returncode == 2 and "exists and is not a socket" in done.stderr
    done = run_slave_cli("--stdio", "--listen", "unix:/x")
    assert done.returncode == 2 and "not allowed with" in done.stderr


async def test_a_live_socket_is_kept_and_a_stale_one_replaced(
    unix_service: Service, tmp_path: Path
) -> None:
    done = run_slave_cli("--listen", unix_service.address)
    assert done.returncode == 2 and "a slave already listens there" in done.stderr
    # A socket nobody listens on (a service killed -9 leaves one): taken over.
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    service = start_service(tmp_path, "--listen", f"unix:{stale}")
    try:
        got = await service.run("true")
        assert got.status == 0, got.err
    finally:
        assert service.stop() == 0


async def test_the_master_says_why_it_cannot_connect(tmp_path: Path) -> None:
    got = await run_master(["run", "--connect", f"unix:{tmp_path}/none", "--", "true"],
                           cwd=tmp_path)  # fmt: skip
    assert got.status == SESSION_FAILED
    assert "cannot connect to unix:" in got.err and "fsys-slave serve --listen" in got.err
    got = await run_master(["run", "--connect", "tcp:127.0.0.1:1", "--", "true"], cwd=tmp_path)
    assert got.status == SESSION_FAILED and "Connection refused" in got.err
    got = await run_master(["run", "--connect", "nowhere", "--", "true"], cwd=tmp_path)
    assert got.status == 2 and "not unix:PATH" in got.err
    got = await run_master(["run", "--connect", "unix:/x", "--slave", "cat", "--", "true"],
                           cwd=tmp_path)  # fmt: skip
    assert got.status == 2 and "--slave and --connect each name the slave" in got.err
    got = await run_master(["run", "--secret-file", "/x", "--", "true"], cwd=tmp_path)
    assert got.status == 2 and "--secret-file, --tls and --tls-ca go with --connect" in got.err
    for line in got.err.splitlines():
        assert "Traceback" not in line


async def test_beyond_max_sessions_a_peer_is_told_why(tmp_path: Path) -> None:
    service = start_service(tmp_path, "--listen", f"unix:{tmp_path}/s", "--max-sessions", "1")
    try:
        holder = raw_client(service.address)  # one session, held open
        got = await service.run("true")
        assert got.status == SESSION_FAILED
        assert "refused the session: 1 sessions already (--max-sessions)" in got.err
        holder.close()
        for _ in range(100):  # its process ends: room again
            if not service.children():
                break
            await trio.sleep(0.05)
        got = await service.run("true")
        assert got.status == 0, got.err
    finally:
        assert service.stop() == 0


# --- TLS ----------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (made by openssl)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    why_not = self_signed(cert, key)
    if why_not is not None:
        pytest.skip(why_not)  # (.ci/run installs openssl: CI runs these)
    return cert, key


@pytest.fixture
def tls_service(tmp_path: Path, secret_file: Path, certificate: tuple[Path, Path]) -> Service:
    cert, key = certificate
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    return start_service(tmp_path, "--listen", "tcp:127.0.0.1:0", "--secret-file",
                         str(secret_file), *tls)  # fmt: skip


async def test_tls_carries_the_session(
    tls_service: Service, secret_file: Path, certificate: tuple[Path, Path]
) -> None:
    data = os.urandom(3 << 20)  # more than the relay holds at once
    (tls_service.box / "big").write_bytes(data)
    tls = ("--secret-file", str(secret_file), "--tls-ca", str(certificate[0]))
    got = await tls_service.run("/bin/sh", "-c", "sha256sum < /big; cp /big /copy", extra=tls)
    assert got.status == 0, got.err
    assert got.out.split()[0] == hashlib.sha256(data).hexdigest()
    assert (tls_service.box / "copy").read_bytes() == data
    assert "TLS, with a secret" in tls_service.log[0]
    assert tls_service.stop() == 0


async def test_tls_refuses_what_does_not_verify(
    tls_service: Service, secret_file: Path, tmp_path: Path
) -> None:
    secret = ("--secret-file", str(secret_file))
    got = await tls_service.run("true", extra=(*secret, "--tls"))  # the system's CAs
    assert got.status == SESSION_FAILED
    assert "the slave's certificate does not verify: self-signed certificate" in got.err
    quick = {**os.environ, "FSYS_CONNECT_TIMEOUT": "1"}
    got = await tls_service.run("true", extra=secret, env=quick)  # no TLS at all
    assert got.status == SESSION_FAILED
    assert "no greeting within 1 s (a slave listening with TLS wants --tls)" in got.err
    await tls_service.heard("refused")
    assert tls_service.stop() == 0


async def test_tls_to_a_plain_slave_is_named(
    tcp_service: Service, secret_file: Path, certificate: tuple[Path, Path]
) -> None:
    extra = ("--secret-file", str(secret_file), "--tls-ca", str(certificate[0]))
    got = await tcp_service.run("true", extra=extra)
    assert got.status == SESSION_FAILED
    assert "TLS handshake failed" in got.err and "--tls-cert?" in got.err


def test_tls_options_are_checked(
    tmp_path: Path, secret_file: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    secret = ("--secret-file", str(secret_file))
    done = run_slave_cli("--listen", "tcp:127.0.0.1:0", *secret, "--tls-cert", str(cert))
    assert done.returncode == 2 and "--tls-cert and --tls-key" in done.stderr
    done = run_slave_cli("--listen", f"unix:{tmp_path}/s", "--tls-cert", str(cert),
                         "--tls-key", str(key))  # fmt: skip
    assert done.returncode == 2 and "needs --listen tcp" in done.stderr
    done = run_slave_cli("--listen", "tcp:127.0.0.1:0", *secret, "--tls-cert", str(key),
                         "--tls-key", str(key))  # fmt: skip
    assert done.returncode == 2 and "--tls-cert" in done.stderr
    assert "Traceback" not in done.stderr


# --- raw sessions: many, stuck, garbage -------------------------------------------------


def raw_client(address: str, secret: bytes | None = None) -> socket.socket:
    """A connection let in by the service (its session has begun)."""
    sock = connect(parse(address), 10)
    auth.answer(sock, secret)
    return sock


def raw_session(address: str, secret: bytes | None = None) -> int:
    """One whole session by hand: HELLO, a STAT of /, GOODBYE; the STAT's result."""
    sock = raw_client(address, secret)
    conn = Connection(Role.MASTER)
    try:
        sock.sendall(conn.send(Hello()))
        sock.sendall(conn.send(Call(0, 1, Stat(dir=0, flags=0, mask=0xFFF, path=b"/"))))
        result = None
        goodbye_sent = False
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(sock.recv(65536))
                continue
            if event is CLOSED:
                break
            if isinstance(event, Reply):
                result = event.result
                sock.sendall(conn.send(Goodbye(b"done")))
                goodbye_sent = True
                sock.shutdown(socket.SHUT_WR)
            elif isinstance(event, Goodbye) and not goodbye_sent:
                break
        assert result is not None
        return result
    finally:
        sock.close()


def open_files(pid: int) -> list[str]:
    """What ``pid``'s fds name now (one closed meanwhile is left out)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


def status_of(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def test_many_sessions_leave_the_service_as_it_was(tcp_service: Service) -> None:
    pid = tcp_service.proc.pid
    for _ in range(20):
        assert raw_session(tcp_service.address, SECRET) == 0
    fds, rss = len(os.listdir(f"/proc/{pid}/fd")), status_of(pid, "VmRSS")
    for _ in range(1000):
        assert raw_session(tcp_service.address, SECRET) == 0
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(
        raw_session(tcp_service.address, SECRET))) for _ in range(50)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0] * 50
    for _ in range(200):
        if not tcp_service.children():
            break
        time.sleep(0.05)
    assert tcp_service.children() == []
    assert len(os.listdir(f"/proc/{pid}/fd")) == fds
    assert status_of(pid, "VmRSS") - rss < 2048  # kB: no growth per session


def test_a_stuck_or_garbage_peer_stalls_nobody_else(tcp_service: Service) -> None:
    silent = connect(parse(tcp_service.address), 10)  # says nothing after connecting
    garbage = raw_client(tcp_service.address, SECRET)
    garbage.sendall(b"\xff" * 4096)  # not a frame
    try:
        assert raw_session(tcp_service.address, SECRET) == 0
        tcp_service.said("session")
    finally:
        silent.close()
        garbage.close()
    assert raw_session(tcp_service.address, SECRET) == 0
    assert "Traceback" not in "\n".join(tcp_service.log)


# --- a hostile master against the real fsys-slave ---------------------------------------


def _hello() -> bytes:
    return encode(Hello())


@pytest.mark.parametrize(
    ("sent", "named"),
    [(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "its first frame is not HELLO"),
     (HEADER.pack(5_000_000, 1, 0, 0, 0, 0), "exceeds the limit"),
     (_hello() + HEADER.pack(8, 2, 0, Op.CLOSE, 7, 0) + bytes(8), "pairing 7 is not open"),
     (_hello() + HEADER.pack(0, 2, 0, 999, 0, 1), "unknown op 999"),
     (_hello() + HEADER.pack(8, 3, 0, 0, 0, 1) + bytes(8), "Reply from the master"),
     (_hello() + HEADER.pack(100, 2, 0, Op.STAT, 0, 1) + bytes(10), "inside a frame"),
     (_hello()[:20], "inside a frame")],
)  # fmt: skip
def test_a_hostile_master_ends_the_session_by_name(tmp_path: Path, sent: bytes, named: str) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "fsys.slave", "serve", "--stdio", "--root", str(tmp_path)],
        input=sent, capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == SESSION_FAILED, err
    assert named in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("closed", ["<&-", ">&-"])
def test_a_slave_without_its_stdio_says_so(tmp_path: Path, closed: str) -> None:
    command = f"exec {PYTHON} -m fsys.slave serve --stdio --root {tmp_path} {closed}"
    done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip
    assert done.returncode == 2
    assert "standard input or output is closed" in done.stderr
    assert len(done.stderr.splitlines()) == 1


# --- faults ---------------------------------------------------------------------------------


async def test_sigterm_ends_the_service_and_its_sessions(tmp_path: Path) -> None:
    service = start_service(tmp_path, "--listen", f"unix:{tmp_path}/s")
    async with trio.open_nursery() as nursery:
        result: list[Result] = []

        async def run() -> None:
            result.append(await service.run("sleep", "30"))

        nursery.start_soon(run)
        await service.heard("began")
        children = service.children()
        assert len(children) == 1
        assert service.stop() == 0
    (got,) = result
    assert got.status == SESSION_FAILED and "Traceback" not in got.err
    assert not (tmp_path / "s").exists()
    assert not Path(f"/proc/{children[0]}").exists()
    assert "stopped by SIGTERM" in "\n".join(service.log)


async def test_a_session_killed_mid_write_fails_the_program_cleanly(
    unix_service: Service,
) -> None:
    async with trio.open_nursery() as nursery:
        result: list[Result] = []

        async def run() -> None:
            result.append(await unix_service.run(
                "dd", "if=/dev/zero", "of=/big", "bs=1M", "count=100000"))  # fmt: skip

        nursery.start_soon(run)
        await unix_service.heard("began")
        while not (unix_service.box / "big").exists() or (
            (unix_service.box / "big").stat().st_size < 1 << 20
        ):
            await trio.sleep(0.02)
        (child,) = unix_service.children()
        os.kill(child, signal.SIGKILL)
    (got,) = result
    assert got.status == SESSION_FAILED
    assert "slave" in got.err and "Traceback" not in got.err
    assert unix_service.children() == []


async def test_a_master_killed_mid_write_ends_its_session(unix_service: Service) -> None:
    proc = subprocess.Popen(
        [PYTHON, "-m", "fsys.master", "run", "--connect", unix_service.address, "--",
         "dd", "if=/dev/zero", "of=/big", "bs=1M", "count=100000"],
        cwd=unix_service.master_dir, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await unix_service.heard("began")
        (child,) = unix_service.children()
        big = unix_service.box / "big"
        while not big.exists() or big.stat().st_size < 4 << 20:  # writing, through a handle
            await trio.sleep(0.02)
        assert any(path.endswith("/box/big") for path in open_files(child))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for _ in range(200):
            if not Path(f"/proc/{child}").exists():
                break
            await trio.sleep(0.05)
        assert not Path(f"/proc/{child}").exists()  # gone, and every handle with it
        size = big.stat().st_size
        await trio.sleep(0.3)
        assert big.stat().st_size == size  # nothing writes on
        assert unix_service.children() == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- confinement through the service ------------------------------------------------------


async def test_a_program_as_nobody_plants_no_setuid_file(unix_service: Service) -> None:
    if os.geteuid() != 0:
        pytest.skip("the escalation needs a root slave")
    script = ("cp /bin/sh /sh2 && chmod 4755 /sh2 && chmod g+s /sh2;"
              " mkdir /dir && chmod 2777 /dir;"
              " python3 -c 'import os; os.setxattr(\"/sh2\", \"security.capability\","
              " bytes([1, 0, 0, 2]) + bytes(16))' 2>&1 | tail -1;"
              " mknod /null c 1 3; ls /")  # fmt: skip
    got = await unix_service.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 "/bin/sh", "-c", script)  # fmt: skip
    assert "PermissionError" in got.out and "Operation not permitted" in got.err, got
    planted = unix_service.box / "sh2"
    assert planted.exists() and planted.stat().st_uid == 0  # made, by the root slave...
    assert stat.S_IMODE(planted.stat().st_mode) == 0o755  # ...but runs as nobody's own
    assert b"security.capability" not in "".join(os.listxattr(planted)).encode()
    assert stat.S_IMODE((unix_service.box / "dir").stat().st_mode) == 0o2777  # (a directory)
    assert not (unix_service.box / "null").exists()


async def test_read_only_service(tmp_path: Path) -> None:
    service = start_service(tmp_path, "--listen", f"unix:{tmp_path}/s", "--read-only")
    try:
        (service.box / "f").write_bytes(b"kept\n")
        script = "cat /f; echo x > /f; echo y > /new; rm /f; mkdir /d; cat /f"
        got = await service.run("/bin/sh", "-c", script)
        assert got.out == "kept\nkept\n"
        assert got.err.count("Read-only file system") == 4, got.err
        assert sorted(p.name for p in service.box.iterdir()) == ["f"]
    finally:
        assert service.stop() == 0
