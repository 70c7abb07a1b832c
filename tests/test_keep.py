"""Kept sessions (``fsys-master run --view --keep SECONDS``: fsys.master.keeping).

In process: the client's frames, the session's key and directory. End to end: a
rooted slave in a box, the kept sessions' directory a fresh one, every kept session
started there stopped at the end of each test.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from fsys.master import keeping
from tests.conftest import PYTHON, Result, run_master, slave_command

# --- in process -------------------------------------------------------------------------


def request() -> keeping.Request:
    return keeping.Request("/bin/echo", ["echo", "a b", "\udcff"], {"K": "v\udcfe"}, "/w", 0o027,
                           (1024, 4096))  # fmt: skip


def test_a_request_survives_its_encoding_with_names_that_are_not_utf8() -> None:
    assert keeping.Request.decode(request().encode()) == request()


def raw_request(
    names: list[bytes],
    *,
    magic: bytes = keeping.REQUEST_MAGIC,
    umask: int = 0o22,
    nofile: tuple[int, int] = (1024, -1),
    argc: int = 1,
    envc: int = 0,
) -> bytes:
    head = keeping.REQUEST_HEAD.pack(magic, umask, *nofile, argc, envc)
    return head + b"".join(name + b"\0" for name in names)


def test_a_request_is_its_header_then_nul_terminated_names() -> None:
    # The compiled client (client/fsys-master.c) writes this by hand: it is the format.
    want = raw_request([b"/bin/echo", b"/w", b"echo", b"a b", b"\xff", b"K=v\xfe"],
                       umask=0o027, nofile=(1024, 4096), argc=3, envc=1)  # fmt: skip
    assert request().encode() == want
    assert keeping.Request.decode(raw_request([b"/x", b"/", b"x", b"A=b=c", b"E="], argc=1,
                                              envc=2)).env == {"A": "b=c", "E": ""}  # fmt: skip


@pytest.mark.parametrize(
    "raw",
    [b"", b"fsk1", raw_request([b"/x", b"/", b"x"], magic=b"fsk0"),
     raw_request([b"/x", b"/"], argc=0), raw_request([b"/x", b"/", b"x"], umask=0o1000),
     raw_request([b"/x", b"/", b"x"], nofile=(-2, 5)), raw_request([b"/x", b"/"]),
     raw_request([b"/x", b"/", b"x", b"y"]), raw_request([b"/x", b"/", b"x"])[:-1],
     raw_request([b"/x", b"/", b"x", b"NOEQUALS"], envc=1), raw_request([], argc=1)],
    ids=["empty", "short", "magic", "no-argv", "umask", "nofile", "too-few", "too-many",
         "unterminated", "env", "no-names"],
)  # fmt: skip
def test_a_malformed_request_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError, match="malformed request"):
        keeping.Request.decode(raw)


def test_a_quick_record_repeats_its_inputs_then_names_the_session(tmp_path: Path) -> None:
    place = keeping.Place(tmp_path / "s.sock", tmp_path / "s.lock", tmp_path / "s.log")
    config = tmp_path / "policy.toml"
    config.write_text("")
    inputs = keeping.quick_inputs(["--view", "--keep", "5"], "/bin/sh")
    tail = [b"--view", b"--keep", b"5", b"--", b"/bin/sh", b""]
    assert inputs.startswith(b"fsys-quick-1\0") and inputs.endswith(b"\0".join(tail))
    seen = keeping.witness("/bin/sh", str(config))
    st = config.stat()
    identity = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    assert seen == (os.path.realpath("/bin/sh"), str(config), identity)
    keeping.remember(place, inputs, seen)
    (record,) = tmp_path.glob("*.quick")
    assert record.name == keeping.quick_name(inputs)
    assert record.read_bytes() == inputs + b"\0".join(
        os.fsencode(name) for name in (str(place.socket), *seen, "")
    )
    assert keeping.witness("/bin/sh", None) == (os.path.realpath("/bin/sh"), "", "")


def test_the_quick_name_is_fnv1a_of_the_inputs() -> None:
    # FNV-1a 64's published test vectors: the compiled client computes the same.
    assert keeping.quick_name(b"") == "cbf29ce484222325.quick"
    assert keeping.quick_name(b"a") == "af63dc4c8601ec8c.quick"
    assert keeping.quick_name(b"foobar") == "85944171f73967e8.quick"


def test_a_record_that_cannot_be_written_or_checked_is_none(tmp_path: Path) -> None:
    assert keeping.witness("/bin/sh", str(tmp_path / "missing.toml")) is None
    place = keeping.Place(tmp_path / "gone" / "s.sock", tmp_path / "s.lock", tmp_path / "s.log")
    keeping.remember(place, b"x\0", ("/bin/sh", "", ""))  # its directory is missing
    assert list(tmp_path.rglob("*.quick*")) == []


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def test_take_request_waits_for_the_whole_frame() -> None:
    whole = frame(request().encode())
    assert keeping.take_request(whole[:2], [3, 4, 5]) == (2, None)
    assert keeping.take_request(whole[:10], [3, 4, 5]) == (len(whole) - 10, None)
    assert keeping.take_request(whole, [3, 4, 5]) == (0, request())


@pytest.mark.parametrize(
    ("data", "fds"),
    [(frame(b"{}"), [3, 4]), (frame(request().encode()) + b"x", [3, 4, 5]),
     (struct.pack("!I", keeping.MAX_REQUEST + 1), [3, 4, 5])],
    ids=["two-fds", "trailing", "too-large"],
)  # fmt: skip
def test_take_request_refuses_what_cannot_be_a_request(data: bytes, fds: list[int]) -> None:
    with pytest.raises(ValueError):
        keeping.take_request(data, fds)


def test_signal_numbers_keep_an_incomplete_one() -> None:
    data = keeping.status_frame(2) + keeping.status_frame(15) + b"\0\0"
    assert keeping.signal_numbers(data) == ([2, 15], b"\0\0")


def test_the_key_is_one_per_set_of_options() -> None:
    one = {"slave": ["a"], "rules": [["/usr", "master"]], "cache": True}
    assert keeping.key(one) == keeping.key(dict(reversed(list(one.items()))))
    assert keeping.key(one) != keeping.key({**one, "cache": False})
    assert keeping.key(one) != keeping.key({**one, "slave": ["b"]})


def test_the_directory_is_made_private(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FSYS_KEEP_DIR", str(tmp_path / "k"))
    assert keeping.directory() == tmp_path / "k"
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("make", ["open", "symlink", "other"])
def test_a_directory_others_can_enter_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, make: str
) -> None:
    where = tmp_path / "k"
    if make == "symlink":
        (tmp_path / "real").mkdir(mode=0o700)
        where.symlink_to(tmp_path / "real")
    else:
        where.mkdir(mode=0o700)
        if make == "open":
            where.chmod(0o755)
        elif os.geteuid() == 0:
            os.chown(where, 65534, 65534)
        else:
            pytest.skip("chown to another user needs root")
    monkeypatch.setenv("FSYS_KEEP_DIR", str(where))
    with pytest.raises(keeping.KeepError, match="nobody else can enter"):
        keeping.directory()


def test_a_socket_name_too_long_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FSYS_KEEP_DIR", str(tmp_path / ("k" * 100)))
    with pytest.raises(keeping.KeepError, match="too long"):
        keeping.Place.of("x" * 20)


def test_a_dead_sessions_socket_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()  # bound, never listening: as one killed
    assert keeping.connect(path) is None
    assert not path.exists()


def test_start_returns_once_ready_while_a_child_of_the_session_holds_the_pipe(
    tmp_path: Path,
) -> None:
    # The embedded slave is forked before the session is ready and keeps a copy of the
    # ready pipe: the first command hung until it ended (the README's default slave).
    place = keeping.Place(tmp_path / "s.sock", tmp_path / "s.lock", tmp_path / "s.log")
    holder = tmp_path / "holder"

    def serve(_place: keeping.Place, ready: int) -> int:
        if os.fork() == 0:  # holds the pipe, as the embedded slave does
            holder.write_text(str(os.getpid()))
            time.sleep(30)
            os._exit(0)
        while not holder.exists():
            time.sleep(0.01)
        os.write(ready, keeping.READY)
        return 0

    def hung(_signum: int, _frame: object) -> None:
        raise TimeoutError("start waited for the holder of the ready pipe")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        keeping.start(place, serve)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        while not holder.exists() or not holder.read_text():
            time.sleep(0.01)
        os.kill(int(holder.read_text()), signal.SIGKILL)


def test_start_reports_a_session_that_ended_unready(tmp_path: Path) -> None:
    place = keeping.Place(tmp_path / "s.sock", tmp_path / "s.lock", tmp_path / "s.log")

    def serve(_place: keeping.Place, _ready: int) -> int:
        os.write(2, b"no slave here\n")
        return 1

    with pytest.raises(keeping.KeepError, match="no slave here"):
        keeping.start(place, serve)


# --- end to end --------------------------------------------------------------------------

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0,
    reason="--view needs /dev/fuse and root (as for users: docs/usage.md)",
)


class Kept:
    """A box for the slave, a master directory, and a kept sessions' directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.box = tmp_path / "box"
        self.box.mkdir()
        self.cwd = tmp_path / "master"
        self.cwd.mkdir()
        self.dir = Path(tempfile.mkdtemp(prefix="fk-", dir="/tmp"))
        # The compiled client hands over to the Python of the tests.
        self.env = {**os.environ, "FSYS_KEEP_DIR": str(self.dir), "FSYS_MASTER_PYTHON": PYTHON}

    def args(self, *program: str, keep: str = "30", extra: tuple[str, ...] = ()) -> list[str]:
        return ["run", "--view", "--keep", keep, "--slave", slave_command(self.box), *extra,
                "--", *program]  # fmt: skip

    async def run(self, *program: str, keep: str = "30", stdin: bytes = b"",
                  extra: tuple[str, ...] = ()) -> Result:  # fmt: skip
        return await run_master(self.args(*program, keep=keep, extra=extra), cwd=self.cwd,
                                stdin=stdin, env=self.env)  # fmt: skip

    def popen(self, *program: str, compiled: bool = False, extra: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
        """fsys-master in Python, or ``compiled`` (with stdin a pipe: see served)."""
        master = [str(COMPILED)] if compiled else [PYTHON, "-m", "fsys.master"]
        return subprocess.Popen([*master, *self.args(*program, extra=extra)], cwd=self.cwd,
                                env={**self.env, **(env or {})}, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    async def warm(self, *programs: tuple[str, ...]) -> None:
        """Run each of ``programs`` once (the Python client): the session starts, and the
        compiled client finds the quick record of each program's path."""
        for program in programs:
            got = await self.run(*program)
            assert got.status == 0, got.stderr

    def sessions(self) -> list[keeping.Kept]:
        old = os.environ.get("FSYS_KEEP_DIR")
        os.environ["FSYS_KEEP_DIR"] = str(self.dir)
        try:
            return keeping.listening()
        finally:
            if old is None:
                del os.environ["FSYS_KEEP_DIR"]
            else:
                os.environ["FSYS_KEEP_DIR"] = old

    def log(self) -> str:
        return "".join(p.read_text() for p in self.dir.glob("*.log"))


#: fsys-master as installed: the compiled client (setup.py builds it with the package).
COMPILED = Path(PYTHON).parent / "fsys-master"


def served(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the running ``proc``, a client of a kept session whose program already
    runs, is the compiled client itself (served without Python), not the Python it
    hands over to."""
    return os.readlink(f"/proc/{proc.pid}/exe") == os.path.realpath(COMPILED)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] in "ZX"
    except FileNotFoundError:
        return True


@pytest.fixture
def kept(tmp_path: Path) -> Iterator[Kept]:
    k = Kept(tmp_path)
    yield k
    k.dir.chmod(0o700)  # (a test may have opened it)
    for session in k.sessions():
        keeping.stop(session)
    for session in k.sessions():
        os.kill(session.pid, signal.SIGKILL)
    subprocess.run(["rm", "-rf", str(k.dir)], check=True)


async def wait_until(holds: object, timeout: float = 10.0) -> None:
    assert callable(holds)
    with trio.fail_after(timeout):
        while not holds():
            await trio.sleep(0.02)


@needs_fuse
async def test_a_second_command_runs_in_the_first_ones_session(kept: Kept) -> None:
    (kept.box / "f").write_text("from the slave\n")
    first = await kept.run("/bin/sh", "-c", "cat /f; echo $PPID")
    second = await kept.run("/bin/sh", "-c", "cat /f; echo $PPID; exit 3")
    assert first.status == 0, first.stderr
    assert second.status == 3, second.stderr
    assert first.out.splitlines()[0] == second.out.splitlines()[0] == "from the slave"
    daemon = int(first.out.split()[-1])
    assert daemon == int(second.out.split()[-1])  # both started by the kept session
    assert [s.pid for s in kept.sessions()] == [daemon]
    assert list(kept.cwd.iterdir()) == []  # the program's files were the slave's


@needs_fuse
async def test_the_program_gets_the_clients_stdio_cwd_umask_env_and_arguments(
    kept: Kept,
) -> None:
    await kept.run("/bin/true")  # the session's own environment and umask: the first's
    script = 'cat; echo err >&2; pwd; umask; printf "%s|" "$K" "$@"'
    old = os.umask(0o077)
    try:
        got = await run_master(kept.args("/bin/sh", "-c", script, "sh", "a b", "\udcff"),
                               cwd=Path("/usr/share"), stdin=b"input\n",
                               env={**kept.env, "K": "v"})  # fmt: skip
    finally:
        os.umask(old)
    assert (got.status, got.stderr) == (0, b"err\n")
    # /usr/share is the master's, in the view too (the path policy).
    assert got.stdout == b"input\n/usr/share\n0077\nv|a b|\xff|"


def client(kept: Kept, prelude: str, program: tuple[str, ...], after: str = "") -> Result:
    """fsys-master's main, as a client of ``kept``, in a Python of its own: ``prelude``
    before it, ``after`` once it returned."""
    main = f"status = main({kept.args(*program)!r})"
    script = (f"import sys\n{prelude}\nfrom fsys.master.cli import main\n{main}\n{after}\n"
              "raise SystemExit(status)\n")  # fmt: skip
    done = subprocess.run([PYTHON, "-c", script], cwd=kept.cwd, env=kept.env,
                          capture_output=True, timeout=60, check=False)  # fmt: skip
    return Result(done.returncode, done.stdout, done.stderr)


@needs_fuse
async def test_the_program_gets_the_clients_file_limits(kept: Kept) -> None:
    await kept.run("/bin/true")
    limit = "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048))"
    got = client(kept, limit, ("/bin/sh", "-c", "ulimit -Sn; ulimit -Hn"))
    assert (got.status, got.out) == (0, "256\n2048\n"), got.stderr


@needs_fuse
async def test_the_session_raises_its_own_file_limit(kept: Kept) -> None:
    # (for the embedded slave it forks, a descriptor per file the programs hold open)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))"
    got = client(kept, limit, ("/bin/sh", "-c", "ulimit -Sn"))  # the first: it starts it
    assert (got.status, got.out) == (0, "256\n"), got.stderr
    (session,) = kept.sessions()
    limits = Path(f"/proc/{session.pid}/limits").read_text().splitlines()
    assert next(line for line in limits if "open files" in line).split()[3:5] == ["4096"] * 2


@needs_fuse
async def test_a_client_loads_neither_trio_nor_the_trapped_modes_launcher(kept: Kept) -> None:
    await kept.run("/bin/true")
    heavy = ("print(sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'ctypes') "
             "or m in ('fsys.master.launcher', 'fsys.master.staging', 'fsys.linux')))")  # fmt: skip
    got = client(kept, "", ("/bin/true",), heavy)
    assert (got.status, got.out) == (0, "[]\n"), got.stderr


@needs_fuse
async def test_changes_either_way_are_seen_between_commands(kept: Kept) -> None:
    (kept.box / "v").write_text("1\n")
    assert (await kept.run("/bin/cat", "/v")).out == "1\n"
    (kept.box / "v").write_text("22\n")  # by another process on the slave
    (kept.box / "new").write_text("n\n")
    got = await kept.run("/bin/sh", "-c", "cat /v /new; ls /")
    assert got.out.split()[:2] == ["22", "n"], got.stderr
    # The program's own writes are on the slave when its command returns.
    wrote = await kept.run("/bin/sh", "-c", "head -c 3000000 /dev/zero > /big; echo x > /v")
    assert wrote.status == 0
    assert (kept.box / "big").stat().st_size == 3000000
    assert (kept.box / "v").read_text() == "x\n"


@needs_fuse
async def test_the_session_ends_its_keep_after_the_last_program(kept: Kept) -> None:
    got = await kept.run("/bin/sh", "-c", "echo $PPID", keep="0.5")
    daemon = int(got.out)
    socket_file = next(kept.dir.glob("*.sock"))
    await wait_until(lambda: gone(daemon))
    assert not socket_file.exists()
    slaves = subprocess.run(["pgrep", "-f", f"--root {kept.box}"], capture_output=True,
                            check=False)  # fmt: skip
    assert slaves.stdout == b""  # the slave ended with it
    again = await kept.run("/bin/sh", "-c", "echo $PPID", keep="0.5")
    assert int(again.out) != daemon  # a new one


@needs_fuse
async def test_a_program_running_keeps_the_session(kept: Kept) -> None:
    async with trio.open_nursery() as nursery:
        results: list[Result] = []

        async def slow() -> None:
            results.append(await kept.run("/bin/sh", "-c", "sleep 1.5; echo $PPID", keep="0.3"))

        nursery.start_soon(slow)
        await trio.sleep(1.0)
        quick = await kept.run("/bin/sh", "-c", "echo $PPID", keep="0.3")
    assert int(quick.out) == int(results[0].out)


@needs_fuse
@pytest.mark.parametrize("compiled", [False, True], ids=["python", "compiled"])
async def test_signals_to_the_client_reach_the_program(kept: Kept, compiled: bool) -> None:
    # Started, with the quick records of both programs: the clients below are clients only.
    await kept.warm(("/bin/sh", "-c", "true"), ("/bin/sleep", "0"))
    trap = 'trap "echo INT; exit 7" INT; trap "echo TERM; exit 8" TERM'
    proc = kept.popen("/bin/sh", "-c", f"{trap}; echo ready; while :; do sleep 0.05; done",
                      compiled=compiled)  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    assert served(proc) == compiled
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert (proc.returncode, out) == (7, b"INT\n"), err
    proc = kept.popen("/bin/sleep", "30", compiled=compiled)
    time.sleep(0.5)
    assert served(proc) == compiled
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert proc.returncode == 128 + signal.SIGTERM  # killed by it, as natively


@needs_fuse
@pytest.mark.parametrize("compiled", [False, True], ids=["python", "compiled"])
async def test_ctrl_z_stops_the_program_and_fg_continues_it(kept: Kept, compiled: bool) -> None:
    await kept.warm(("/bin/sh", "-c", "true"))
    proc = kept.popen(
        "/bin/sh", "-c", "echo $$; while :; do echo tick; sleep 0.05; done", compiled=compiled
    )
    assert proc.stdout is not None
    program = int(proc.stdout.readline())
    proc.stdout.readline()
    assert served(proc) == compiled
    proc.send_signal(signal.SIGTSTP)
    await wait_until(lambda: _state(program) == "T" and _state(proc.pid) == "T")
    proc.send_signal(signal.SIGCONT)
    await wait_until(lambda: _state(program) in "RS" and _state(proc.pid) in "RS")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=20)
    assert proc.returncode == 128 + signal.SIGINT


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(") ")[2][0]


@needs_fuse
@pytest.mark.parametrize("compiled", [False, True], ids=["python", "compiled"])
async def test_a_client_killed_kills_its_program(kept: Kept, compiled: bool) -> None:
    await kept.warm(("/bin/sh", "-c", "true"))
    proc = kept.popen("/bin/sh", "-c", "echo $$; exec sleep 30", compiled=compiled)
    assert proc.stdout is not None
    program = int(proc.stdout.readline())
    assert served(proc) == compiled
    proc.kill()
    proc.wait()
    proc.stdout.close()  # (the program has them too: communicate would wait for it)
    assert proc.stderr is not None and proc.stdin is not None
    proc.stderr.close()
    proc.stdin.close()
    await wait_until(lambda: gone(program))
    assert (await kept.run("/bin/echo", "still")).out == "still\n"


@needs_fuse
async def test_a_session_killed_fails_its_clients_and_the_next_starts_anew(kept: Kept) -> None:
    daemon = int((await kept.run("/bin/sh", "-c", "echo $PPID")).out)
    proc = kept.popen("/bin/sh", "-c", "echo $$; exec sleep 30")
    assert proc.stdout is not None
    program = int(proc.stdout.readline())
    os.kill(daemon, signal.SIGKILL)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 125
    assert b"the kept session ended before the program did" in err
    await wait_until(lambda: gone(program))
    again = await kept.run("/bin/sh", "-c", "echo $PPID")
    assert again.status == 0, again.stderr
    assert int(again.out) != daemon


@needs_fuse
async def test_clients_starting_together_share_one_session(kept: Kept) -> None:
    results: list[Result] = []
    async with trio.open_nursery() as nursery:
        for _ in range(4):

            async def one() -> None:
                results.append(await kept.run("/bin/sh", "-c", "echo $PPID"))

            nursery.start_soon(one)
    assert len({r.out for r in results}) == 1, [r.stderr for r in results]
    assert len(kept.sessions()) == 1


@needs_fuse
async def test_other_options_are_another_session(kept: Kept) -> None:
    one = await kept.run("/bin/sh", "-c", "echo $PPID")
    other = await kept.run("/bin/sh", "-c", "echo $PPID", extra=("--no-cache",))
    assert one.out != other.out
    assert len(kept.sessions()) == 2


@needs_fuse
async def test_kept_lists_and_stops_sessions(kept: Kept) -> None:
    daemon = int((await kept.run("/bin/sh", "-c", "echo $PPID")).out)
    listed = await run_master(["kept"], cwd=kept.cwd, env=kept.env)
    assert listed.out == f"{next(kept.dir.glob('*.sock'))}: pid {daemon}\n"
    proc = kept.popen("/bin/sh", "-c", 'trap "echo TERM; exit 9" TERM; echo ready;'
                      " while :; do sleep 0.05; done")  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    stopped = await run_master(["kept", "--stop"], cwd=kept.cwd, env=kept.env)
    assert stopped.out.endswith(f"pid {daemon}: ended\n"), stopped.stderr
    out, _ = proc.communicate(timeout=20)
    assert (proc.returncode, out) == (9, b"TERM\n")
    assert gone(daemon)
    assert (await run_master(["kept"], cwd=kept.cwd, env=kept.env)).out == ""


@needs_fuse
async def test_a_keep_of_zero_runs_its_command(kept: Kept) -> None:
    # The idle time counts from the first client: the command that started the
    # session connects after it listens (it went away first, at times: exit 125).
    for _ in range(4):
        got = await kept.run("/bin/echo", "ran", keep="0")
        assert (got.status, got.out) == (0, "ran\n"), got.err


@needs_fuse
async def test_many_clients_at_once_are_all_served(kept: Kept) -> None:
    # Each program is forked from the session with copies of its fds; a descriptor
    # the session closed and whose number came back woke trio for the old one, and a
    # blocking read or waitpid then hung the whole session (round 2 or 3 of these).
    await kept.run("/bin/true")
    for _ in range(4):
        procs = [kept.popen("/bin/sh", "-c", "ls / >/dev/null; echo ok") for _ in range(16)]
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert (proc.returncode, out) == (0, b"ok\n"), err


@needs_fuse
async def test_a_malformed_request_is_refused_and_the_session_goes_on(kept: Kept) -> None:
    daemon = int((await kept.run("/bin/sh", "-c", "echo $PPID")).out)
    path = next(kept.dir.glob("*.sock"))
    null = os.open(os.devnull, os.O_RDWR)
    garbage = [(b"\0\0\0\x05hello", 0), (b"\0\0\0\x05hello", 3), (b"\xff\xff\xff\xff", 3),
               (frame(raw_request([b"/x", b"/", b"x"], magic=b"{\"a\"")), 3),
               (frame(request().encode()), 2), (frame(request().encode()[:-1]), 3),
               (frame(raw_request([b"/bin/true", b"/", b"true"], umask=1 << 31)), 3)]  # fmt: skip
    for data, fds in garbage:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", null) * fds)]
            sock.sendmsg([data], rights if fds else [])
            sock.settimeout(10)
            assert sock.recv(4) == b""  # closed, no status
    os.close(null)
    with socket.socket(socket.AF_UNIX) as sock:  # a client that says nothing, then goes
        sock.connect(str(path))
    await wait_until(lambda: kept.log().count("request refused") == len(garbage))
    got = await kept.run("/bin/sh", "-c", "echo $PPID")
    assert int(got.out) == daemon


@needs_fuse
async def test_a_client_of_another_user_is_refused(kept: Kept) -> None:
    daemon = int((await kept.run("/bin/sh", "-c", "echo $PPID")).out)
    path = next(kept.dir.glob("*.sock"))
    kept.dir.chmod(0o711)
    path.chmod(0o666)  # as if the directory's protection were gone
    probe = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(10)\n"
        "payload = b'{}'\n"
        "try:\n"
        "    s.sendmsg([len(payload).to_bytes(4, 'big'), payload],"
        " [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(12))])\n"
        "    print(repr(s.recv(4)))\n"
        "except (BrokenPipeError, ConnectionResetError):  # closed before, or as, we sent\n"
        "    print(repr(b''))\n"
    )
    # (the system's Python: nobody may not enter where the tests' own is installed)
    probing = ["/usr/bin/python3", "-c", probe, str(path)]
    out = subprocess.run(probing, capture_output=True, text=True, timeout=20, check=False)
    assert out.stdout == "b''\n", out.stderr
    await wait_until(lambda: "refused a client of uid 65534" in kept.log())
    kept.dir.chmod(0o700)
    assert int((await kept.run("/bin/sh", "-c", "echo $PPID")).out) == daemon


async def test_keep_needs_the_view(kept: Kept) -> None:
    got = await run_master(["run", "--keep", "5", "--slave", slave_command(kept.box), "--",
                            "/bin/true"], cwd=kept.cwd, env=kept.env)  # fmt: skip
    assert (got.status, got.stderr) == (2, b"fsys-master: --keep goes with --view (only the "
                                           b"view's session can be kept)\n")  # fmt: skip


@pytest.mark.parametrize("value", ["-1", "soon", "nan"])
async def test_a_bad_keep_is_refused(kept: Kept, value: str) -> None:
    got = await kept.run("/bin/true", keep=value)
    assert got.status == 2
    assert f"{value!r} is not a number of seconds".encode() in got.stderr


@needs_fuse
async def test_a_slave_that_does_not_start_is_reported_and_nothing_stays(kept: Kept) -> None:
    args = ["run", "--view", "--keep", "30", "--slave", "echo no such slave >&2; exit 3", "--",
            "/bin/true"]  # fmt: skip
    got = await run_master(args, cwd=kept.cwd, env=kept.env)
    assert got.status == 125
    assert b"fsys-master: the slave did not start" in got.stderr, got.stderr
    assert b"no such slave" in got.stderr
    assert kept.sessions() == []
    assert not list(kept.dir.glob("*.sock"))


@needs_fuse
async def test_a_directory_others_can_enter_is_refused_by_run(kept: Kept) -> None:
    kept.dir.chmod(0o755)
    got = await kept.run("/bin/true")
    assert got.status == 125
    assert b"nobody else can enter (mode 0700)" in got.stderr
    kept.dir.chmod(0o700)
    assert kept.sessions() == []


@needs_fuse
async def test_a_command_returns_once_its_last_process_is_done(kept: Kept) -> None:
    got = await kept.run(
        "/bin/sh", "-c", "(sleep 0.5; echo late > /late) >/dev/null 2>&1 & echo now"
    )
    assert got.out == "now\n"
    assert (kept.box / "late").read_text() == "late\n"  # as a session of its own waits


@needs_fuse
async def test_a_slave_gone_ends_the_session_and_its_programs(kept: Kept) -> None:
    daemon = int((await kept.run("/bin/sh", "-c", "echo $PPID")).out)
    proc = kept.popen("/bin/sh", "-c", "echo $$; exec sleep 30")
    assert proc.stdout is not None
    program = int(proc.stdout.readline())
    # (the slave alone: the client's and the session's own command lines name it too)
    slave = f"^{PYTHON} -m fsys.slave serve --stdio --root {kept.box}$"
    subprocess.run(["pkill", "-KILL", "-f", slave], check=True)
    proc.communicate(timeout=15)
    assert proc.returncode == 128 + signal.SIGKILL
    assert gone(program)
    await wait_until(lambda: gone(daemon))
    assert "kept session: the slave went away" in kept.log()
    assert not list(kept.dir.glob("*.sock"))


# --- the compiled client (client/fsys-master.c) -------------------------------------------


def test_fsys_master_is_the_compiled_client() -> None:
    # setup.py builds it with the package: the command a user types.
    assert COMPILED.read_bytes()[:4] == b"\x7fELF"


def _compiled(*args: str, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
    return subprocess.run([str(COMPILED), *args], cwd=cwd, capture_output=True, timeout=60,
                          env={**os.environ, "FSYS_MASTER_PYTHON": PYTHON, **(env or {})},
                          check=False)  # fmt: skip


def test_the_compiled_client_hands_other_commands_to_python() -> None:
    python = [PYTHON, "-m", "fsys.master"]
    for args in (["--version"], ["policy", "/usr/lib", "/home"], ["run"], ["kept", "--bogus"]):
        native = subprocess.run([*python, *args], capture_output=True, timeout=60, check=False)
        got = _compiled(*args)
        assert (got.returncode, got.stdout, got.stderr) == (
            native.returncode,
            native.stdout,
            native.stderr,
        ), args
    assert _compiled("--version").stdout.startswith(b"fsys-master ")


def test_the_compiled_client_hands_over_to_the_python_beside_it(tmp_path: Path) -> None:
    # A wheel built in one environment and installed in another: that environment's
    # python3, not the one it was built with. Outside an environment (a python3 that
    # is perhaps another's beside it), the one it was built with.
    env = {k: v for k, v in os.environ.items() if k != "FSYS_MASTER_PYTHON"}
    for where, venv in (("venv", True), ("bin", False)):
        bin_dir = tmp_path / where / "bin"
        bin_dir.mkdir(parents=True)
        client = bin_dir / "fsys-master"
        client.write_bytes(COMPILED.read_bytes())
        client.chmod(0o755)
        (bin_dir / "python3").write_text('#!/bin/sh\necho "$0 $*"\n')
        (bin_dir / "python3").chmod(0o755)
        if venv:
            (tmp_path / where / "pyvenv.cfg").write_text("home = /usr/bin\n")
        got = subprocess.run([str(client), "--version"], env=env, capture_output=True,
                             timeout=60, check=False)  # fmt: skip
        want = f"{bin_dir}/python3 -P -m fsys.master --version\n" if venv else "fsys-master "
        assert got.returncode == 0 and got.stdout.decode().startswith(want), got


def test_a_python_that_is_not_there_is_reported() -> None:
    got = _compiled("--version", env={"FSYS_MASTER_PYTHON": "/nonexistent/python"})
    assert (got.returncode, got.stdout) == (125, b"")
    assert got.stderr == (b"fsys-master: cannot start /nonexistent/python: No such file or "
                          b"directory (FSYS_MASTER_PYTHON names the Python fsys is installed "
                          b"in)\n")  # fmt: skip


def test_the_hand_over_does_not_import_the_working_directorys_modules(tmp_path: Path) -> None:
    (tmp_path / "fsys").mkdir()
    (tmp_path / "fsys" / "__init__.py").write_text("raise SystemExit('the wrong fsys')\n")
    got = _compiled("--version", cwd=tmp_path)
    assert (got.returncode, got.stderr) == (0, b""), got.stderr


#: A program that says it runs, then waits for a line: while it waits, served() can
#: tell who its client is.
WAITS = 'echo ready; read x; echo "got $x"; umask; printf "%s|" "$K" "$@"; exit 5'


def _served(proc: subprocess.Popen[bytes]) -> tuple[bool, int, bytes, bytes]:
    """(served by the compiled client, status, output, errors) of a client of WAITS."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == b"ready\n", proc.communicate(timeout=30)
    by = served(proc)
    out, err = proc.communicate(b"in\n", timeout=30)
    return by, proc.returncode, out, err


@needs_fuse
async def test_a_command_python_ran_is_then_served_without_python(kept: Kept) -> None:
    await kept.warm(("/bin/sh", "-c", "true"))  # the Python client: session and record
    old = os.umask(0o077)
    try:
        proc = kept.popen("/bin/sh", "-c", WAITS, "sh", "a b", "\udcff", compiled=True,
                          env={"K": "v\udcfe"})  # fmt: skip
        got = _served(proc)
    finally:
        os.umask(old)
    assert got == (True, 5, b"got in\n0077\nv\xfe|a b|\xff|", b"")
    assert len(kept.sessions()) == 1


@needs_fuse
async def test_the_compiled_client_finds_the_program_as_python_does(kept: Kept) -> None:
    await kept.warm(("/bin/sh", "-c", "true"))
    # Another spelling of the same path (PATH entries are normalised as abspath does).
    odd = {"PATH": "/nonexistent:/usr/./../bin//"}
    assert _served(kept.popen("sh", "-c", WAITS, compiled=True, env=odd))[:2] == (True, 5)
    # A name it has no record of: handed over; Python's run leaves the record.
    (kept.cwd / "tool").symlink_to("/bin/sh")
    for expect in (False, True):
        got = _served(kept.popen("./tool", "-c", WAITS, compiled=True))
        assert got[:2] == (expect, 5), got


@needs_fuse
async def test_a_record_that_no_longer_holds_is_handed_over(kept: Kept) -> None:
    tool = kept.cwd / "tool"
    tool.symlink_to("/bin/sh")
    config = kept.cwd / "policy.toml"
    config.write_text("")
    extra = ("--config", str(config))
    await kept.run(str(tool), "-c", "true", extra=extra)
    assert _served(kept.popen(str(tool), "-c", WAITS, compiled=True, extra=extra))[:2] == (True, 5)
    tool.unlink()
    tool.symlink_to("/bin/bash")  # the same path, another program
    for expect in (False, True):
        got = _served(kept.popen(str(tool), "-c", WAITS, compiled=True, extra=extra))
        assert got[:2] == (expect, 5), got
    config.write_text("# another policy\n")
    for expect in (False, True):
        got = _served(kept.popen(str(tool), "-c", WAITS, compiled=True, extra=extra))
        assert got[:2] == (expect, 5), got
    (before,) = kept.sessions()
    assert keeping.stop(before)
    got = _served(kept.popen(str(tool), "-c", WAITS, compiled=True, extra=extra))
    assert got[:2] == (False, 5), got  # no session: Python starts one
    assert [s.pid for s in kept.sessions()] != [before.pid]


@needs_fuse
async def test_a_relative_config_leaves_no_record(kept: Kept) -> None:
    (kept.cwd / "policy.toml").write_text("")
    got = await kept.run("/bin/true", extra=("--config", "policy.toml"))
    assert got.status == 0, got.stderr
    assert list(kept.dir.glob("*.quick")) == []
    await kept.run("/bin/true")
    assert len(list(kept.dir.glob("*.quick"))) == 1


def test_a_relative_python_is_refused() -> None:
    got = _compiled("--version", env={"FSYS_MASTER_PYTHON": "python3"})
    assert (got.returncode, got.stdout) == (125, b"")
    assert got.stderr == b"fsys-master: FSYS_MASTER_PYTHON must be an absolute path, not python3\n"


@needs_fuse
@pytest.mark.parametrize("compiled", [False, True], ids=["python", "compiled"])
async def test_a_closed_stdin_is_dev_null_not_the_sessions_socket(
    kept: Kept, compiled: bool
) -> None:
    await kept.warm(("/bin/sh", "-c", "true"))
    master = [str(COMPILED)] if compiled else [PYTHON, "-m", "fsys.master"]
    got = subprocess.run([*master, *kept.args("/bin/sh", "-c", "readlink /proc/self/fd/0")],
                         cwd=kept.cwd, env=kept.env, capture_output=True, timeout=60,
                         preexec_fn=lambda: os.close(0), check=False)  # fmt: skip
    assert (got.returncode, got.stdout, got.stderr) == (0, b"/dev/null\n", b"")


def _environ_run(argv: list[str], envp: list[bytes]) -> bytes:
    """The output of ``argv`` run with exactly ``envp`` (duplicates too, which
    os.execve cannot pass): execve(2) through ctypes in a child."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    args = (ctypes.c_char_p * (len(argv) + 1))(*map(os.fsencode, argv), None)
    env = (ctypes.c_char_p * (len(envp) + 1))(*envp, None)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.dup2(write, 1)
        libc.execve(args[0], args, env)
        os._exit(127)
    os.close(write)
    with os.fdopen(read, "rb") as out:
        data = out.read()
    os.waitpid(pid, 0)
    return data


@needs_fuse
async def test_the_first_of_two_environment_entries_of_a_name_is_the_programs(
    kept: Kept,
) -> None:
    await kept.warm(("/bin/sh", "-c", "true"))
    envp = [f"{k}={v}".encode() for k, v in kept.env.items()] + [b"K=first", b"K=second"]
    command = kept.args("/bin/sh", "-c", 'echo "$K"; readlink /proc/$PPID/exe')
    python = _environ_run([PYTHON, "-m", "fsys.master", *command], envp)
    compiled = _environ_run([str(COMPILED), *command], envp)
    assert python.split(b"\n")[0] == compiled.split(b"\n")[0] == b"first"


@needs_fuse
async def test_a_c_locale_python_would_coerce_is_pythons(kept: Kept) -> None:
    # Python adds LC_CTYPE=C.UTF-8 to the environment it passes on (PEP 538): the
    # compiled client leaves such a command to it, so the program's is the same.
    await kept.warm(("/bin/sh", "-c", "true"))
    plain = {k: v for k, v in kept.env.items() if not k.startswith(("LC_", "LANG"))}
    script = 'echo ready; read x; echo "[$LC_CTYPE]"'
    for extra, expect in (({}, (False, 0, b"[C.UTF-8]\n")), ({"LC_ALL": "C.UTF-8"},
                                                           (True, 0, b"[]\n"))):  # fmt: skip
        proc = subprocess.Popen([str(COMPILED), *kept.args("/bin/sh", "-c", script)],
                                cwd=kept.cwd, env={**plain, **extra}, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        assert _served(proc)[:3] == expect


@needs_fuse
async def test_a_directory_named_with_a_trailing_slash_is_checked_as_python_does(
    kept: Kept,
) -> None:
    await kept.warm(("/bin/true",))
    link = kept.dir.parent / f"{kept.dir.name}-link"
    link.symlink_to(kept.dir)
    try:
        env = {**kept.env, "FSYS_KEEP_DIR": f"{link}/"}
        for master in ([str(COMPILED)], [PYTHON, "-m", "fsys.master"]):
            got = subprocess.run([*master, *kept.args("/bin/true")], cwd=kept.cwd, env=env,
                                 capture_output=True, timeout=60, check=False)  # fmt: skip
            assert got.returncode == 125 and b"nobody else can enter" in got.stderr, got
    finally:
        link.unlink()


# --- the compiled client against a fake session (no FUSE: what it sends and does) --------


class FakeSession:
    """A socket where the compiled client finds a kept session (a quick record of
    OPTIONS and PROGRAM, written as the Python client writes it), served by a thread
    that takes the request, then answers ``status`` (None: closes without one) once
    ``release`` is set."""

    OPTIONS = ["--view", "--keep", "5"]
    PROGRAM = "/bin/true"

    def __init__(self, where: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import threading

        where.mkdir(mode=0o700)
        self.dir = where
        self.python = where / "python"  # what the client hands over to: it says so
        self.python.write_text(f'#!/bin/sh\necho "$@" > {where}/handed; exit 42\n')
        self.python.chmod(0o700)
        place = keeping.Place(where / "s.sock", where / "s.lock", where / "s.log")
        monkeypatch.setattr(sys, "executable", str(self.python))
        inputs = keeping.quick_inputs(self.OPTIONS, self.PROGRAM)
        seen = keeping.witness(self.PROGRAM, None)
        assert seen is not None
        keeping.remember(place, inputs, seen)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(place.socket))
        self.listener.listen()
        self.status: int | None = 0
        self.release = threading.Event()
        self.request: keeping.Request | None = None
        self.signals: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            data, ancillary, _, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(12))
            fds = list(struct.unpack("3i", ancillary[0][2])) if ancillary else []
            while True:
                missing, request = keeping.take_request(data, fds)
                if request is not None:
                    break
                data += conn.recv(missing)
            for fd in fds:
                os.close(fd)
            self.request = request
            conn.settimeout(0.05)
            while not self.release.is_set():
                with contextlib.suppress(TimeoutError):
                    got = conn.recv(4)
                    if got:
                        self.signals.append(struct.unpack("!i", got)[0])
            if self.status is not None:
                conn.sendall(keeping.status_frame(self.status))

    def client(self) -> subprocess.Popen[bytes]:
        env = {"PATH": os.environ["PATH"], "FSYS_KEEP_DIR": str(self.dir), "LC_ALL": "C.UTF-8",
               "FSYS_MASTER_PYTHON": str(self.python), "K": "v"}  # fmt: skip
        return subprocess.Popen([str(COMPILED), "run", *self.OPTIONS, "--", self.PROGRAM, "x"],
                                cwd=self.dir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)  # fmt: skip

    def handed(self) -> str | None:
        path = self.dir / "handed"
        return path.read_text() if path.exists() else None


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSession]:
    session = FakeSession(tmp_path / "k", monkeypatch)
    yield session
    session.release.set()
    session.listener.close()


def test_the_compiled_client_sends_what_the_python_client_sends(fake: FakeSession) -> None:
    fake.status = 7
    proc = fake.client()
    until = time.monotonic() + 10
    while fake.request is None and time.monotonic() < until:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # passed on, not fatal to the client
    proc.send_signal(signal.SIGWINCH)
    while len(fake.signals) < 2 and time.monotonic() < until:
        time.sleep(0.01)
    fake.release.set()
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out, err, fake.handed()) == (7, b"", b"", None)
    assert fake.signals == [signal.SIGTERM, signal.SIGWINCH]
    umask = os.umask(0)
    os.umask(umask)
    assert fake.request == keeping.Request(
        fake.PROGRAM, [fake.PROGRAM, "x"],
        {"PATH": os.environ["PATH"], "FSYS_KEEP_DIR": str(fake.dir), "LC_ALL": "C.UTF-8",
         "FSYS_MASTER_PYTHON": str(fake.python), "K": "v"},
        str(fake.dir), umask, resource.getrlimit(resource.RLIMIT_NOFILE),
    )  # fmt: skip


def test_a_session_that_is_ending_hands_the_command_to_python(fake: FakeSession) -> None:
    fake.status = keeping.RETRY
    fake.release.set()
    proc = fake.client()
    _, err = proc.communicate(timeout=30)
    assert (proc.returncode, err) == (42, b"")  # the fake Python's
    assert fake.handed() == f"-P -m fsys.master run {' '.join(fake.OPTIONS)} -- /bin/true x\n"


def test_a_session_that_ends_before_its_program_fails_the_command(fake: FakeSession) -> None:
    fake.status = None
    fake.release.set()
    proc = fake.client()
    _, err = proc.communicate(timeout=30)
    assert (proc.returncode, fake.handed()) == (125, None)
    assert err == (b"fsys-master: the kept session ended before the program did (its log: "
                   + str(fake.dir / "s.log").encode() + b")\n")  # fmt: skip
