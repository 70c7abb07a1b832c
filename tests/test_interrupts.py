"""A signal that arrives while a forwarded call waits on the slave: exactly native.

The program (tests/interrupted_read.c HOW FIFO) reads a FIFO; under fsys the FIFO is the slave's, so
the read is a forwarded call that waits in the slave, and the program's thread waits
in the filter. SIGALRM comes 0.3 s later: fmhub sees it pending and caught in /proc,
cancels the slave's read (which has taken nothing), and answers -ERESTARTSYS, so the
kernel runs the handler and then restarts the read (SA_RESTART) or fails it with
EINTR. Natively, the same program reads a FIFO of this machine: the outputs must be
the same, byte for byte.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio

from tests.conftest import PYTHON, Session


async def _drive(argv: list[str], fifo: Path, how: str, cwd: Path | None = None) -> str:
    """Run ``argv``; once its handler has run (the read still waiting), and only then,
    feed the FIFO if the read is to be restarted. Its output, whole."""
    out = b""
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, cwd=cwd)
    try:
        assert proc.stdout is not None
        with trio.fail_after(20):
            while b"handler ran" not in out:
                chunk = await proc.stdout.receive_some()
                assert chunk, f"the handler never ran while the read waited: {out!r}"
                out += chunk
            if how == "restart":
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.write(fd, b"abc\n")
                os.close(fd)
            while chunk := await proc.stdout.receive_some():
                out += chunk
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()
    return out.decode()


@pytest.mark.parametrize("how", ["eintr", "restart"])
async def test_a_forwarded_read_interrupted_by_a_signal_is_exactly_native(
    session: Session, interrupted_read: Path, tmp_path: Path, how: str
) -> None:
    here = tmp_path / "native"
    here.mkdir()
    os.mkfifo(here / "fifo")
    os.mkfifo(session.box / "fifo")
    native = await _drive([str(interrupted_read), how, str(here / "fifo")], here / "fifo", how)
    under = await _drive(
        [PYTHON, "-m", "fsys.master", "run", "--slave", session.slave, "--",
         str(interrupted_read), how, "/fifo"], session.box / "fifo", how, cwd=session.master_dir,
    )  # fmt: skip
    assert under == native
    expected = "read 4 bytes: abc\n|" if how == "restart" else "read failed: Interrupted"
    assert "handler ran" in native and expected in native
