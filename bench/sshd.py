"""A loopback sshd of our own: for sshfs in the bench, and for the SSH tests.

Started on 127.0.0.1 at a free port with keys made for the run (nothing of the
machine's own ssh setup is read or changed); ``Sshd.options`` are what ssh (or
sshfs, or ``fsys-master run --ssh-option``) needs to reach it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def missing() -> str | None:
    """Why no sshd can be started here, or None."""
    if not os.path.exists(SSHD):
        return "openssh-server is not installed"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@dataclass(frozen=True)
class Sshd:
    port: int
    key: Path
    user: str

    @property
    def options(self) -> list[str]:
        """ssh -o options (KEY=VALUE) that reach this sshd."""
        return [f"Port={self.port}", f"IdentityFile={self.key}", "StrictHostKeyChecking=no",
                "UserKnownHostsFile=/dev/null", "LogLevel=ERROR", "BatchMode=yes"]  # fmt: skip

    @property
    def host(self) -> str:
        return f"{self.user}@127.0.0.1"

    def ssh(self) -> list[str]:
        """An ssh command line to this sshd, up to the remote command."""
        argv = ["ssh"]
        for option in self.options:
            argv += ["-o", option]
        return [*argv, self.host]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@contextmanager
def loopback_sshd(keys: Path, *, extra_config: str = "") -> Iterator[Sshd]:
    """An sshd on 127.0.0.1 accepting a key made in ``keys`` (a new directory), for
    as long as the context lasts; ready when it is entered."""
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
        f"Subsystem sftp internal-sftp\n{extra_config}"
    )
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL)
    try:
        user = os.environ.get("USER") or "root"
        found = Sshd(port, keys / "id", user)
        for _ in range(100):  # sshd takes a moment to listen
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield found
    finally:
        sshd.terminate()
        sshd.wait()
