"""Sessions over a real sshd (started on 127.0.0.1 by the fixture, key auth), both ways:
the master reaching the slave (``--ssh``, ``--slave 'ssh ...'``) and the slave
reaching the master (``fsys-slave run -- ssh ... fsys-master run --stdio``).

The remote side is this machine through the loopback sshd, so the slave is always
rooted in a box (a wrapper named fsys-slave adds --root, as a user's install may).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsys.errors import SESSION_FAILED
from tests.conftest import PYTHON, Result, run_master

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from sshd import Sshd, loopback_sshd, missing  # bench/sshd.py: the bench's sshd too

pytestmark = pytest.mark.skipif(missing() is not None, reason=f"no sshd here: {missing()}")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def remote_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory first on the remote PATH, empty unless a test puts a slave in it."""
    return tmp_path_factory.mktemp("remote-bin")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory, remote_bin: Path) -> Iterator[Sshd]:
    keys = tmp_path_factory.mktemp("sshd") / "keys"
    # The remote shell's PATH: the test's directory, then the system's (not the venv's).
    with loopback_sshd(keys, extra_config=f"SetEnv PATH={remote_bin}:/usr/bin:/bin\n") as found:
        yield found


@pytest.fixture
def box(tmp_path: Path) -> Path:
    box = tmp_path / "box"
    box.mkdir()
    (box / "f").write_bytes(b"over ssh\n")
    return box


def rooted_slave(where: Path, box: Path) -> Path:
    """An executable named fsys-slave in ``where`` that serves ``box`` only."""
    wrapper = where / "fsys-slave"
    wrapper.write_text(f'#!/bin/sh\nexec {PYTHON} -m fsys.slave "$@" --root {box}\n')
    wrapper.chmod(0o755)
    return wrapper


def ssh_args(sshd: Sshd) -> list[str]:
    args = ["--ssh", sshd.host]
    for option in sshd.options:
        args += ["--ssh-option", option]
    return args


async def test_ssh_finds_the_slave_and_runs_the_session(
    sshd: Sshd, remote_bin: Path, box: Path, tmp_path: Path
) -> None:
    rooted_slave(remote_bin, box)  # on the remote PATH
    try:
        got = await run_master(["run", *ssh_args(sshd), "--", "/bin/sh", "-c",
                                "cat /f; echo back > /g"], cwd=tmp_path)  # fmt: skip
    finally:
        (remote_bin / "fsys-slave").unlink()
    assert got.status == 0, got.err
    assert got.out == "over ssh\n"
    assert (box / "g").read_bytes() == b"back\n"


async def test_ssh_slave_names_where_it_is(sshd: Sshd, box: Path, tmp_path: Path) -> None:
    wrapper = rooted_slave(tmp_path, box)  # not on the remote PATH
    got = await run_master(["run", *ssh_args(sshd), "--ssh-slave", str(wrapper), "--",
                            "cat", "/f"], cwd=tmp_path)  # fmt: skip
    assert got.status == 0, got.err
    assert got.out == "over ssh\n"


async def test_ssh_without_a_remote_slave_says_what_to_do(sshd: Sshd, tmp_path: Path) -> None:
    got = await run_master(["run", *ssh_args(sshd), "--", "true"], cwd=tmp_path)
    assert got.status == SESSION_FAILED
    assert "no fsys-slave on the PATH or in ~/.local/bin" in got.err
    assert "--ssh-slave" in got.err and "Traceback" not in got.err


async def test_ssh_options_go_with_ssh(tmp_path: Path) -> None:
    got = await run_master(["run", "--ssh-option", "Port=2", "--", "true"], cwd=tmp_path)
    assert got.status == 2 and "go with --ssh" in got.err


async def test_slave_command_over_ssh(sshd: Sshd, box: Path, tmp_path: Path) -> None:
    remote = shlex.join([PYTHON, "-m", "fsys.slave", "serve", "--stdio", "--root", str(box)])
    command = shlex.join(sshd.ssh()) + " " + shlex.quote(remote)
    got = await run_master(["run", "--slave", command, "--", "cat", "/f"], cwd=tmp_path)
    assert got.status == 0, got.err
    assert got.out == "over ssh\n"


async def test_ssh_with_a_tty_is_named(sshd: Sshd, box: Path, tmp_path: Path) -> None:
    remote = shlex.join([PYTHON, "-m", "fsys.slave", "serve", "--stdio", "--root", str(box)])
    command = shlex.join([*sshd.ssh()[:1], "-tt", *sshd.ssh()[1:]]) + " " + shlex.quote(remote)
    got = await run_master(["run", "--slave", command, "--", "cat", "/f"], cwd=tmp_path)
    assert got.status == SESSION_FAILED and "Traceback" not in got.err
    assert "HELLO" in got.err and "-t" in got.err, got.err


def test_the_slave_reaches_the_master_over_ssh(sshd: Sshd, box: Path, tmp_path: Path) -> None:
    # The other way: fsys-slave here lends its streams; the program runs on "the
    # master" at the far end of ssh, and reads and writes this side's files.
    master = shlex.join([PYTHON, "-m", "fsys.master", "run", "--stdio", "--", "/bin/sh", "-c",
                         "cat /f; read line; echo \"got $line\" > /g"])  # fmt: skip
    done = subprocess.run(
        [PYTHON, "-m", "fsys.slave", "run", "--root", str(box), "--", *sshd.ssh(), master],
        input=b"typed\n", capture_output=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    result = Result(done.returncode, done.stdout, done.stderr)
    assert result.status == 0, result.err
    assert result.out == "over ssh\n"
    assert (box / "g").read_bytes() == b"got typed\n"
    assert os.listdir(tmp_path) == ["box"]
