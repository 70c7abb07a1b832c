"""Shared fixtures: run real programs under a real master and slave.

Every end-to-end test runs the slave confined to a fresh directory (``--root``) and
runs fsys-master from another fresh directory, so a call performed on the wrong
side shows: the file appears in the master's tree, or is missing from the box.
The in-process tests share ``rig`` and ``proc`` (tests/fakes.py).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from fsys.iostream import FdTransport
from fsys.master.link import SlaveLink
from fsys.slave.fshub import serve_transport
from tests.fakes import FakeProcess, Rig

PYTHON = sys.executable
DEADLINE = 60.0


@dataclass
class Result:
    status: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode()

    @property
    def err(self) -> str:
        return self.stderr.decode()


@asynccontextmanager
async def served_link(root: Path, features: int = 0) -> AsyncIterator[SlaveLink]:
    """fmhub's link to a real fshub serving ``root``, over a socketpair, in this process."""
    ours, theirs = socket.socketpair()
    async with trio.open_nursery() as nursery:
        fd = theirs.detach()
        nursery.start_soon(serve_transport, FdTransport(fd, fd), str(root))
        mine = ours.detach()
        transport = FdTransport(mine, mine)
        link = SlaveLink(transport)
        await nursery.start(link.serve)
        with trio.fail_after(10):
            await link.handshake(features)
        yield link
        with trio.fail_after(10):
            await link.goodbye()
        nursery.cancel_scope.cancel()
    transport.close()


def slave_command(root: Path, *, prefix: Sequence[str] = ()) -> str:
    args = [*prefix, PYTHON, "-m", "fsys.slave", "serve", "--stdio", "--root", str(root)]
    return shlex.join(args)


async def run_master(
    args: Sequence[str],
    *,
    cwd: Path,
    stdin: bytes = b"",
    deadline: float = DEADLINE,
    env: dict[str, str] | None = None,
) -> Result:
    """Run ``fsys-master ARGS`` to completion, within ``deadline`` seconds.

    fsys-master and its program run in a session of their own, so that at the
    deadline every process is killed, and none keeps the output pipes open.
    """

    async def kill_all(proc: trio.Process) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    with trio.fail_after(deadline):
        proc = await trio.run_process(
            [PYTHON, "-m", "fsys.master", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=cwd,
            env=env,
            start_new_session=True,
            deliver_cancel=kill_all,
        )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@dataclass
class Session:
    """A slave root (the box) and a master working directory, both fresh."""

    box: Path
    master_dir: Path

    @property
    def slave(self) -> str:
        return slave_command(self.box)

    async def run(
        self,
        *program: str,
        stdin: bytes = b"",
        extra: Sequence[str] = (),
        deadline: float = DEADLINE,
    ) -> Result:
        return await run_master(
            ["run", "--slave", self.slave, *extra, "--", *program],
            cwd=self.master_dir,
            stdin=stdin,
            deadline=deadline,
        )

    async def sh(self, script: str, stdin: bytes = b"") -> Result:
        return await self.run("/bin/sh", "-c", script, stdin=stdin)

    def master_untouched(self) -> None:
        """The master's working directory is still empty."""
        assert list(self.master_dir.iterdir()) == []


@pytest.fixture
def session(tmp_path: Path) -> Session:
    box = tmp_path / "box"
    master_dir = tmp_path / "master"
    box.mkdir()
    master_dir.mkdir()
    return Session(box, master_dir)


def build_c(tmp_path_factory: pytest.TempPathFactory, name: str, *flags: str) -> Path:
    """tests/NAME.c, built with gcc into a directory of its own."""
    source = Path(__file__).with_name(f"{name}.c")
    out = tmp_path_factory.mktemp(name) / name
    subprocess.run(["gcc", "-O1", *flags, "-o", str(out), str(source)], check=True)
    return out


@pytest.fixture(scope="session")
def static_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A statically linked C program (no loader, no libc.so) built with gcc."""
    return build_c(tmp_path_factory, "static_prog", "-static")


@pytest.fixture(scope="session")
def interrupted_read(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/interrupted_read.c: a read(2) a signal interrupts."""
    return build_c(tmp_path_factory, "interrupted_read")


#: A master binary whose stdlib is under /usr (a master prefix by the default policy).
SYSTEM_PYTHON = "/usr/bin/python3"


def native(script: str, root: Path, *args: str) -> str:
    """What ``script`` prints run natively by SYSTEM_PYTHON with ``root`` as its argv[1]
    (the same script runs under fsys with "" there: the slave's root)."""
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", script, str(root), *args], check=False, capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def slave_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def rig(box: Path) -> Iterator[Rig]:
    """An in-process session (tests/fakes.py) over the module's ``box`` fixture."""
    rig = Rig(box)
    yield rig
    rig.close()


@pytest.fixture
def proc(rig: Rig) -> FakeProcess:
    return rig.process()
