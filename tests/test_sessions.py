"""``fsys-slave ps`` and ``fsys-slave kill``: a real session, asked from outside.

Each test gives the slave a runtime directory of its own (FSYS_RUNTIME_DIR), so the
sessions it lists are the test's alone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsys.master import census
from tests.conftest import PYTHON, slave_command

TIMEOUT = 30.0


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "run"
    monkeypatch.setenv("FSYS_RUNTIME_DIR", str(where))
    return where


def slave_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "fsys.slave", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)  # fmt: skip


@pytest.fixture
def running(tmp_path: Path, runtime: Path) -> Iterator[subprocess.Popen[bytes]]:
    """fsys-master running a shell with two sleeps, against a rooted slave."""
    box = tmp_path / "box"
    box.mkdir()
    proc = subprocess.Popen(
        [PYTHON, "-m", "fsys.master", "run", "--slave", slave_command(box), "--",
         "/bin/sh", "-c", "exec 3>/held; sleep 60 & sleep 61; echo after"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    proc.stderr.close()


def listing(until: str) -> str:
    """fsys-slave ps's output, once it has ``until`` in it."""
    end = time.monotonic() + TIMEOUT
    while time.monotonic() < end:
        done = slave_cli("ps")
        assert done.returncode == 0, done.stderr
        if until in done.stdout:
            return done.stdout
        time.sleep(0.1)
    raise AssertionError(f"ps never showed {until!r}: {done.stdout!r}")


def sleeps(text: str) -> list[int]:
    return [int(line.split()[0]) for line in text.splitlines() if line.endswith(" sleep")]


def test_ps_lists_the_session_and_its_processes(running: subprocess.Popen[bytes]) -> None:
    out = listing(" sleep")
    while len(sleeps(out)) < 2:
        out = listing(" sleep")
    head = out.splitlines()[0]
    session = int(head.split()[0])
    assert "serve --stdio" in head and "/box" in head and "1 handles" in head
    names = [line.split()[-1] for line in out.splitlines()[1:]]
    assert sorted(names) == ["sh", "sleep", "sleep"]
    for pid in sleeps(out):
        assert Path(f"/proc/{pid}").exists()  # the master's real pids
    assert Path(os.environ["FSYS_RUNTIME_DIR"], f"{session}.sock").exists()


def test_kill_signals_one_process_or_the_program(running: subprocess.Popen[bytes]) -> None:
    out = listing(" sleep")
    while len(sleeps(out)) < 2:
        out = listing(" sleep")
    session = int(out.split()[0])
    first, second = sleeps(out)
    done = slave_cli("kill", "-9", f"{session}:{first}")
    assert done.returncode == 0, done.stderr
    end = time.monotonic() + TIMEOUT
    while Path(f"/proc/{first}").exists() and time.monotonic() < end:
        time.sleep(0.05)
    assert sleeps(slave_cli("ps").stdout) == [second]
    # Not the session's: refused, here and by the master.
    done = slave_cli("kill", "-9", f"{session}:1")
    assert done.returncode == 1 and f"no process 1 in session {session}" in done.stderr
    done = slave_cli("kill", "-TERM", str(session))  # the program: the shell
    assert done.returncode == 0, done.stderr
    os.kill(second, signal.SIGKILL)  # (the shell's other child, as natively, lives on)
    assert running.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM
    assert slave_cli("ps").stdout == "no sessions\n"
    assert os.listdir(os.environ["FSYS_RUNTIME_DIR"]) == []  # its socket is gone


def test_kill_says_what_is_wrong(runtime: Path) -> None:
    done = slave_cli("kill", "-NOSUCH", "1")
    assert done.returncode == 2 and "-NOSUCH: not a signal" in done.stderr
    done = slave_cli("kill", "-9")
    assert done.returncode == 2 and "no session given" in done.stderr
    done = slave_cli("kill", "x:y")
    assert done.returncode == 2 and "not SESSION or SESSION:PID" in done.stderr
    done = slave_cli("kill", "4194304")
    assert done.returncode == 1 and "no session 4194304" in done.stderr


def test_a_socket_left_by_a_killed_session_is_cleared(runtime: Path) -> None:
    runtime.mkdir(mode=0o700)
    stale = runtime / "4194304.sock"  # no such pid (beyond pid_max's default)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    assert slave_cli("ps").stdout == "no sessions\n"
    assert not stale.exists()


def test_only_the_sessions_processes_can_be_signalled() -> None:
    child = subprocess.Popen(["sleep", "60"])
    other = subprocess.Popen(["sleep", "60"])
    try:
        members = census.tree([child.pid], lambda pid: [])
        assert census.describe(members)[0].name == b"sleep"
        assert not census.signal_member(other.pid, signal.SIGKILL, lambda: members)
        assert not census.signal_member(0, signal.SIGKILL, lambda: members)
        assert census.signal_member(child.pid, signal.SIGKILL, lambda: members)
        assert child.wait(timeout=TIMEOUT) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        for p in (child, other):
            p.kill()
            p.wait()
