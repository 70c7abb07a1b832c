"""A self-signed certificate for 127.0.0.1, for the TLS bench row and the TLS tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def self_signed(cert: Path, key: Path) -> str | None:
    """Make ``cert`` and ``key`` (PEM, EC P-256, valid two days, for 127.0.0.1 and
    localhost) with openssl; why not, or None."""
    if shutil.which("openssl") is None:
        return "openssl is not installed"
    done = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj",
         "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return None if done.returncode == 0 else done.stderr.strip() or "openssl failed"
