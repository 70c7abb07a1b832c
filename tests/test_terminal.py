"""The slave's terminal and the signal relay (``fsys-slave run``), end to end.

Each test starts ``fsys-slave run --root BOX -- fsys-master run --stdio -- PROGRAM``
on a fresh pseudo-terminal, as a user's shell would (the terminal's session leader,
in its foreground), types on the terminal and reads what it shows. The program runs
on the master with the slave's terminal as its fds 0, 1, 2; the box holds the
slave's files. Where the behaviour must be the native one (an interrupted read),
the same program runs natively on a terminal of its own and the two are compared.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import shlex
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.conftest import PYTHON

TIMEOUT = 30.0


class Terminal:
    """A program on a pseudo-terminal of its own: its controlling terminal, with it
    as the foreground process group, ``rows`` x ``cols``."""

    def __init__(self, argv: Sequence[str], cwd: Path, *, rows: int = 24, cols: int = 80) -> None:
        self.fd, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(
            list(argv), stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # noqa: PLW1509
        )  # fmt: skip
        os.close(slave)
        self.seen = b""

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError as exc:
            if exc.errno == errno.EIO:  # every process has let the terminal go
                return False
            raise
        self.seen += data
        return bool(data)

    def expect(self, text: str, timeout: float = TIMEOUT) -> None:
        """Until the terminal has shown ``text``."""
        until = time.monotonic() + timeout
        while text.encode() not in self.seen:
            left = until - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.2)):
                raise AssertionError(f"{text!r} not shown; the terminal shows {self.seen!r}")

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def modes(self) -> list[object]:
        return termios.tcgetattr(self.fd)

    def wait(self, timeout: float = TIMEOUT) -> int:
        until = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > until:
                raise AssertionError(f"still running; the terminal shows {self.seen!r}")
            self._read(0.05)
        while self._read(0.05) and self.seen:
            if time.monotonic() > until:
                break
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        os.close(self.fd)


def fsys(box: Path, *program: str) -> list[str]:
    """The command that runs ``program`` on the master with this terminal lent."""
    return [PYTHON, "-m", "fsys.slave", "run", "--root", str(box), "--",
            PYTHON, "-m", "fsys.master", "run", "--stdio", "--", *program]  # fmt: skip


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    box, here = tmp_path / "box", tmp_path / "master"
    box.mkdir()
    here.mkdir()
    return box, here


@pytest.fixture
def term() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for t in opened:
        t.close()


def start(term: list[Terminal], argv: list[str], cwd: Path, **size: int) -> Terminal:
    t = Terminal(argv, cwd, **size)
    term.append(t)
    return t


PROBE = """
import os, sys, termios
print("tty", os.isatty(0), os.isatty(1), os.isatty(2), os.get_terminal_size())
print("name", os.ttyname(0))
print("file", open("/notes.txt").read().strip())
print("line", input("say: "))
"""


def test_the_program_reads_and_writes_the_slaves_terminal(
    term: list[Terminal], dirs: tuple[Path, Path]
) -> None:
    box, here = dirs
    (box / "notes.txt").write_text("from the slave\n")
    t = start(term, fsys(box, PYTHON, "-c", PROBE), here, rows=33, cols=111)
    t.expect("say: ")
    t.type("hello there\n")
    assert t.wait() == 0
    shown = t.seen.decode()
    assert "tty True True True os.terminal_size(columns=111, lines=33)" in shown
    assert "name /dev/pts/" in shown  # the slave's terminal, as the slave names it
    assert "file from the slave" in shown
    assert "line hello there" in shown
    assert list(here.iterdir()) == []


def _children(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in found]


@pytest.mark.parametrize("end", ["program exits", "program killed", "fsys-master killed"])
def test_raw_mode_is_restored_however_the_session_ends(
    term: list[Terminal], dirs: tuple[Path, Path], end: str
) -> None:
    box, here = dirs
    code = "import tty, os, time; tty.setraw(0); print('raw', flush=True); "
    code += "os._exit(3)" if end == "program exits" else "time.sleep(100)"
    t = start(term, fsys(box, PYTHON, "-c", code), here)
    found = t.modes()
    t.expect("raw")
    if end != "program exits":
        (master,) = _children(t.proc.pid)  # fsys-slave's CMD: fsys-master
        victim = master if end == "fsys-master killed" else _children(master)[0]
        os.kill(victim, signal.SIGKILL)
    status = t.wait()
    assert t.modes() == found  # as fsys-slave found the terminal
    assert status == {"program exits": 3, "program killed": 128 + signal.SIGKILL,
                      "fsys-master killed": 128 + signal.SIGKILL}[end]  # fmt: skip


def test_ctrl_c_reaches_the_program_and_its_status_comes_back(
    term: list[Terminal], dirs: tuple[Path, Path]
) -> None:
    box, here = dirs
    sleeper = "import time; print('ready', flush=True); time.sleep(100)"
    t = start(term, fsys(box, PYTHON, "-c", sleeper), here)
    t.expect("ready")
    t.type("\x03")
    assert t.wait() == 128 + signal.SIGINT  # KeyboardInterrupt ends python by SIGINT


def test_sigterm_to_fsys_slave_ends_the_program(
    term: list[Terminal], dirs: tuple[Path, Path]
) -> None:
    box, here = dirs
    code = ("import signal, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: (print('got TERM', flush=True), exit(9)))\n"
            "print('ready', flush=True)\n"
            "time.sleep(100)")  # fmt: skip
    t = start(term, fsys(box, PYTHON, "-c", code), here)
    t.expect("ready")
    t.proc.send_signal(signal.SIGTERM)
    t.expect("got TERM")
    assert t.wait() == 9


def test_a_killed_program_gives_128_plus_n(term: list[Terminal], dirs: tuple[Path, Path]) -> None:
    box, here = dirs
    t = start(term, fsys(box, "/bin/sh", "-c", "echo ready; kill -USR1 $$"), here)
    assert t.wait() == 128 + signal.SIGUSR1


def test_a_resize_is_seen_by_the_program(term: list[Terminal], dirs: tuple[Path, Path]) -> None:
    box, here = dirs
    code = ("import os, signal, sys\n"
            "signal.signal(signal.SIGWINCH, lambda *a: print('size', os.get_terminal_size(),"
            " flush=True))\n"
            "print('ready', flush=True)\n"
            "sys.stdin.readline()")  # fmt: skip
    t = start(term, fsys(box, PYTHON, "-c", code), here)
    t.expect("ready")
    t.resize(40, 132)
    t.expect("size os.terminal_size(columns=132, lines=40)")
    t.type("\n")
    assert t.wait() == 0


@pytest.mark.parametrize("how", ["restart", "eintr"])
def test_an_interrupted_read_is_exactly_native(
    term: list[Terminal], dirs: tuple[Path, Path], interrupted_read: Path, how: str
) -> None:
    box, here = dirs
    shown = []
    for argv in ([str(interrupted_read), how], fsys(box, str(interrupted_read), how)):
        t = start(term, argv, here)
        t.expect("ready")
        _blocked_in_read(interrupted_read.name)  # not a moment before: the handler would run first
        t.type("\x03")  # the terminal's SIGINT: the handler runs during the read
        t.expect("handler ran")
        if how == "restart":
            t.type("abc\n")  # the read went on: it gets the line, whole
        assert t.wait() == 0
        shown.append(t.seen.decode().replace("\r\n", "\n").split("ready\n", 1)[1])
    native, under_fsys = shown
    assert under_fsys == native
    expected = "read 4 bytes: abc\n|" if how == "restart" else "read failed: Interrupted"
    assert expected in native


def _blocked_in_read(comm: str) -> None:
    """Until a process named ``comm`` sleeps in read(2) (syscall 0 on x86_64)."""
    until = time.monotonic() + TIMEOUT
    while time.monotonic() < until:
        for entry in Path("/proc").iterdir():
            try:
                if (entry / "comm").read_text().strip() != comm[:15]:
                    continue
                if (entry / "syscall").read_text().split()[0] == "0":
                    return
            except (OSError, IndexError):
                continue
        time.sleep(0.01)
    raise AssertionError(f"{comm} never blocked in read")


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_ctrl_z_stops_the_program_and_fsys_slave_then_fg_continues(
    term: list[Terminal], dirs: tuple[Path, Path]
) -> None:
    box, here = dirs
    t = start(term, fsys(box, "/bin/cat"), here)
    t.type("one\n")
    t.expect("one\r\none")  # the terminal's echo, then cat's
    t.type("\x1a")  # Ctrl-Z: cat stops on the master, so fsys-slave stops here
    until = time.monotonic() + TIMEOUT
    while _state(t.proc.pid) != "T":
        assert time.monotonic() < until, "fsys-slave did not stop"
        time.sleep(0.05)
    os.killpg(t.proc.pid, signal.SIGCONT)  # what the shell's `fg` does
    t.type("two\n")
    t.expect("two\r\ntwo")
    t.type("\x04")  # end of file
    assert t.wait() == 0


def test_pipes_and_sigpipe_as_natively(dirs: tuple[Path, Path]) -> None:
    box, here = dirs
    script = "cat; yes | head -c 3000000; echo status $? >&2"
    argv = fsys(box, "/bin/sh", "-c", script)
    done = subprocess.run(
        f"{shlex.join(argv)} | head -c 20",
        shell=True, input=b"through a pipe\n", capture_output=True, cwd=here, timeout=TIMEOUT,
        check=False,
    )  # fmt: skip
    assert done.stdout == b"through a pipe\ny\ny\ny"
    assert b"status 141" in done.stderr  # head killed by SIGPIPE, as natively


def test_errors_of_fsys_slave_run(dirs: tuple[Path, Path]) -> None:
    box, here = dirs
    missing = subprocess.run(
        [PYTHON, "-m", "fsys.slave", "run", "--", "no-such-command-here"],
        capture_output=True, cwd=here, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert missing.returncode == 127
    assert missing.stderr.decode().strip() == (
        "fsys-slave: no-such-command-here: No such file or directory"
    )
    not_master = subprocess.run(
        [PYTHON, "-m", "fsys.slave", "run", "--root", str(box), "--", "true"],
        capture_output=True, cwd=here, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert not_master.returncode == 0
    assert "true ended (exit status 0) before the session started" in not_master.stderr.decode()
    nothing = subprocess.run([PYTHON, "-m", "fsys.slave", "run"], capture_output=True,
                             timeout=TIMEOUT, check=False)  # fmt: skip
    assert nothing.returncode == 2
    both = subprocess.run(
        [PYTHON, "-m", "fsys.master", "run", "--stdio", "--slave", "cat", "--", "true"],
        capture_output=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert both.returncode == 2
    assert b"--slave and --stdio each name the slave: give one" in both.stderr


def test_ctrl_c_before_the_session_ends_fsys_slave_and_its_command(
    term: list[Terminal], dirs: tuple[Path, Path]
) -> None:
    _, here = dirs
    t = start(term, [PYTHON, "-m", "fsys.slave", "run", "--", "sleep", "40"], here)
    time.sleep(1.0)
    t.type("\x03")
    assert t.wait(10) == 128 + signal.SIGINT
    assert "SIGINT: the session is over" in t.seen.decode()
    leftover = subprocess.run(["pgrep", "-f", "^sleep 40$"], capture_output=True, check=False)
    assert leftover.returncode == 1  # sleep was ended with it
