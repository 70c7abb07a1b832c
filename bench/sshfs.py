"""sshfs for the bench: a mount of a directory through a loopback sshd of our own.

The alternative a user would try next to fsys: sshfs with its default options, over
a loopback sshd (bench/sshd.py) started with keys made for the run. ``mounted``
yields None, with the reason printed once, when sshd, sshfs or FUSE are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sshd import Sshd, loopback_sshd  # (bench/sshd.py, next to this file)
from sshd import missing as sshd_missing


def missing() -> str | None:
    """Why sshfs cannot be measured here, or None."""
    why = sshd_missing()
    if why is not None:
        return why
    for tool in ("sshfs",):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if shutil.which("fusermount") is None and shutil.which("fusermount3") is None:
        return "fusermount is not installed"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


@contextmanager
def mounted(export: Path, work: Path) -> Iterator[Path | None]:
    """``export`` mounted with sshfs (default options) through a fresh loopback sshd."""
    why = missing()
    if why is not None:
        print(f"bench: sshfs skipped: {why}", file=sys.stderr)
        yield None
        return
    with loopback_sshd(work / "ssh") as sshd:
        yield from _mount(export, work, sshd)


def _mount(export: Path, work: Path, sshd: Sshd) -> Iterator[Path | None]:
    mnt = work / "sshfs"
    mnt.mkdir()
    options = ",".join(o.replace("Port=", "port=") for o in sshd.options if "BatchMode" not in o)
    for _ in range(50):  # sshd takes a moment to accept
        done = subprocess.run(["sshfs", "-o", options, f"{sshd.host}:{export}", str(mnt)],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode == 0:
            break
        time.sleep(0.1)
    else:
        print(f"bench: sshfs skipped: mount failed: {done.stderr.strip()}", file=sys.stderr)
        yield None
        return
    try:
        yield mnt
    finally:
        unmount = shutil.which("fusermount") or shutil.which("fusermount3") or "fusermount"
        subprocess.run([unmount, "-u", str(mnt)], check=False)
