"""sshfs for the bench: an sshd of our own on 127.0.0.1, and a mount of a directory.

The alternative a user would try next to fsys: sshfs with its default options, over
a loopback sshd that this module starts with keys made for the run (nothing of the
machine's own ssh setup is read or changed). ``mounted`` yields None, with the
reason printed once, when sshd, sshfs or FUSE are missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def missing() -> str | None:
    """Why sshfs cannot be measured here, or None."""
    if not os.path.exists(SSHD):
        return "openssh-server is not installed"
    for tool in ("sshfs", "ssh-keygen", "fusermount"):
        if shutil.which(tool) is None and not (
            tool == "fusermount" and shutil.which("fusermount3")
        ):
            return f"{tool} is not installed"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@contextmanager
def mounted(export: Path, work: Path) -> Iterator[Path | None]:
    """``export`` mounted with sshfs (default options) through a fresh loopback sshd."""
    why = missing()
    if why is not None:
        print(f"bench: sshfs skipped: {why}", file=sys.stderr)
        yield None
        return
    keys = work / "ssh"
    keys.mkdir(parents=True)
    _keygen(keys / "host")
    _keygen(keys / "id")
    shutil.copy(keys / "id.pub", keys / "authorized_keys")
    port = _free_port()
    config = keys / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPasswordAuthentication no\n"
        f"PermitRootLogin yes\nStrictModes no\nUsePAM no\nPidFile {keys / 'sshd.pid'}\n"
        "Subsystem sftp internal-sftp\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL)
    mnt = work / "sshfs"
    mnt.mkdir()
    try:
        user = os.environ.get("USER") or "root"
        options = (f"port={port},IdentityFile={keys / 'id'},StrictHostKeyChecking=no,"
                   "UserKnownHostsFile=/dev/null,LogLevel=ERROR")  # fmt: skip
        for _ in range(50):  # sshd takes a moment to listen
            done = subprocess.run(["sshfs", "-o", options, f"{user}@127.0.0.1:{export}", str(mnt)],
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
    finally:
        sshd.terminate()
        sshd.wait()
