"""Interactive programs on the slave's terminal, driven through tmux as a user would.

A tmux server of the test's own runs a shell; in it the test types
``fsys-slave run --root BOX -- fsys-master run --stdio -- PROGRAM`` and then keys
(send-keys), and reads the screen (capture-pane). PROGRAM is the master's (vim,
less, python3, bash); the files it edits are the box's.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PYTHON

TIMEOUT = 30.0

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)"
)


class Tmux:
    def __init__(self, name: str, cwd: Path) -> None:
        self.base = ["tmux", "-L", name, "-f", "/dev/null"]
        subprocess.run(
            [*self.base, "new-session", "-d", "-x", "100", "-y", "30", "-c", str(cwd),
             "env PS1='[sh]' bash --norc --noprofile"],
            check=True,
        )  # fmt: skip

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", "0", *keys], check=True)

    def line(self, text: str) -> None:
        self.keys("-l", text)
        self.keys("Enter")

    def screen(self) -> str:
        done = subprocess.run(
            [*self.base, "capture-pane", "-p", "-t", "0"], capture_output=True, check=True
        )
        return done.stdout.decode()

    def expect(self, text: str, timeout: float = TIMEOUT) -> str:
        until = time.monotonic() + timeout
        while True:
            shown = self.screen()
            if text in shown:
                return shown
            if time.monotonic() > until:
                raise AssertionError(f"{text!r} not on the screen:\n{shown}")
            time.sleep(0.1)

    def resize(self, cols: int, rows: int) -> None:
        subprocess.run([*self.base, "resize-window", "-t", "0", "-x", str(cols), "-y",
                        str(rows)], check=True)  # fmt: skip

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, check=False)


@pytest.fixture
def box(tmp_path: Path) -> Path:
    path = tmp_path / "box"
    path.mkdir()
    return path


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    here = tmp_path / "master"
    here.mkdir()
    t = Tmux(f"fsys-test-{os.getpid()}-{tmp_path.name}", here)
    t.expect("[sh]")  # (capture-pane drops trailing spaces: no prompt ends in one)
    yield t
    t.kill()
    assert list(here.iterdir()) == []  # nothing was made on the master's side


def under_fsys(box: Path, *program: str) -> str:
    return shlex.join([PYTHON, "-m", "fsys.slave", "run", "--root", str(box), "--",
                       PYTHON, "-m", "fsys.master", "run", "--stdio", "--", *program])  # fmt: skip


def prompt(tmux: Tmux, text: str) -> None:
    """Until the last line shown is the prompt ``text``, waiting for a command."""
    until = time.monotonic() + TIMEOUT
    while not tmux.screen().rstrip().endswith(text):
        assert time.monotonic() < until, tmux.screen()
        time.sleep(0.1)


def finished(tmux: Tmux) -> None:
    """The session is over: the shell's prompt is back, and fsys-slave's exit status
    is 0. (Keys typed before the prompt is back may be read by the program's session:
    docs/limits.md.)"""
    prompt(tmux, "[sh]")
    tmux.line("echo status=$?")
    tmux.expect("status=0")


@pytest.mark.skipif(shutil.which("vim") is None, reason="vim is not installed")
def test_vim_edits_a_slave_file_and_saves(tmux: Tmux, box: Path) -> None:
    (box / "notes.txt").write_text("first line on the slave\n")
    tmux.line(under_fsys(box, "vim", "-u", "NONE", "-N", "-n", "/notes.txt"))
    tmux.expect("first line on the slave")
    tmux.keys("G", "o")
    tmux.keys("-l", "written by vim under fsys")
    tmux.keys("Escape")
    tmux.keys("-l", ":wq")
    tmux.keys("Enter")
    finished(tmux)
    assert (box / "notes.txt").read_text() == (
        "first line on the slave\nwritten by vim under fsys\n"
    )


@pytest.mark.skipif(shutil.which("less") is None, reason="less is not installed")
def test_less_pages_a_slave_file(tmux: Tmux, box: Path) -> None:
    (box / "long.txt").write_text("".join(f"line number {i}\n" for i in range(1, 201)))
    tmux.line(under_fsys(box, "less", "/long.txt"))
    tmux.expect("line number 29")
    assert "line number 31" not in tmux.screen()  # one screen, from the top
    tmux.keys("G")
    tmux.expect("line number 200")
    tmux.keys("q")
    finished(tmux)


def test_the_python_repl_evaluates_input(tmux: Tmux, box: Path) -> None:
    (box / "data.txt").write_text("slave data\n")
    tmux.line(under_fsys(box, "python3", "-q"))
    prompt(tmux, ">>>")
    tmux.line("6 * 7")
    tmux.expect("42")
    prompt(tmux, ">>>")
    tmux.line("open('/data.txt').read()")
    tmux.expect("'slave data\\n'")
    prompt(tmux, ">>>")
    tmux.keys("-l", "unfinished")
    tmux.expect(">>> unfinished")  # (as a user sees it before pressing Ctrl-C)
    tmux.keys("C-c")  # Ctrl-C at the prompt, during its read of the terminal
    tmux.expect("KeyboardInterrupt")
    prompt(tmux, ">>>")
    tmux.line("exit()")
    finished(tmux)


def test_bash_job_control_ctrl_c_and_ctrl_z_then_fg(tmux: Tmux, box: Path) -> None:
    tmux.line(under_fsys(box, "env", "PS1=[in]", "bash", "--norc", "--noprofile", "-i"))
    prompt(tmux, "[in]")
    tmux.line("cd / && touch made-by-bash")
    prompt(tmux, "[in]")
    tmux.line("sleep 100")
    time.sleep(0.5)
    tmux.keys("C-c")
    prompt(tmux, "[in]")
    tmux.line("echo after=$?")
    tmux.expect("after=130")
    tmux.line("sleep 100")
    time.sleep(0.5)
    tmux.keys("C-z")
    tmux.expect("Stopped")
    prompt(tmux, "[in]")
    tmux.line("jobs -l")
    tmux.expect("sleep 100")
    tmux.line("fg")
    time.sleep(0.5)
    tmux.keys("C-c")
    prompt(tmux, "[in]")
    tmux.line("echo again=$?")
    tmux.expect("again=130")
    tmux.line("exit")
    finished(tmux)
    assert (box / "made-by-bash").exists()


def test_a_resized_window_changes_stty_size(tmux: Tmux, box: Path) -> None:
    tmux.line(under_fsys(box, "env", "PS1=[in]", "bash", "--norc", "--noprofile", "-i"))
    prompt(tmux, "[in]")
    tmux.line("stty size")
    tmux.expect("30 100")
    prompt(tmux, "[in]")
    tmux.resize(120, 40)
    time.sleep(0.5)
    tmux.line("stty size")
    tmux.expect("40 120")
    tmux.line("exit")
    finished(tmux)
