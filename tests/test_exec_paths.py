"""Executing by the names real trees use, end to end on a rooted slave: a master
directory entered again after slave ones, a slave script whose interpreter is a
slave file, a slave symlink that leads to a master binary (a venv's bin/python)."""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path

from tests.conftest import Session


async def test_back_into_a_master_directory_after_a_slave_one(session: Session) -> None:
    (session.box / "data").mkdir()
    result = await session.sh("cd /usr/bin; cd /data; cd /usr/bin && ./true && pwd; cd /data; pwd")
    assert (result.status, result.out) == (0, "/usr/bin\n/data\n"), result.err
    session.master_untouched()


def venv(box: Path) -> Path:
    bin_dir = box / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "interp").write_text('#!/bin/sh\necho "interp: $1 $2"\n')
    (bin_dir / "tool").write_text("#!/venv/bin/interp\nbody\n")
    for name in ("interp", "tool"):
        os.chmod(bin_dir / name, 0o755)
    (bin_dir / "python").symlink_to("python3")  # relative, then a master path
    (bin_dir / "python3").symlink_to("/usr/bin/python3")
    return bin_dir


async def test_a_script_whose_interpreter_is_a_slave_file(session: Session) -> None:
    venv(session.box)
    result = await session.sh("cd /venv && bin/tool a; cd bin && ./tool b; /venv/bin/tool c")
    assert (result.status, result.out) == (
        0, "interp: bin/tool a\ninterp: ./tool b\ninterp: /venv/bin/tool c\n"
    ), result.err  # fmt: skip
    session.master_untouched()


async def test_a_slave_symlink_to_a_master_binary(session: Session) -> None:
    venv(session.box)
    script = "import sys; print(sys.executable)"
    result = await session.sh(
        f"cd /venv && ./bin/python -c '{script}' && /venv/bin/python -c '{script}'"
        "; ./bin/missing 2>/dev/null; echo $?"
    )
    assert (result.status, result.out) == (0, "/venv/bin/python\n/venv/bin/python\n127\n"), (
        result.err
    )


def wheel(path: Path) -> None:
    """A minimal pure-Python wheel: tinypkg 1.0."""
    files = {
        "tinypkg/__init__.py": "def hello():\n    return 'hi from tinypkg'\n",
        "tinypkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
        "tinypkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: fsys-tests\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append("tinypkg-1.0.dist-info/RECORD,,")
    files["tinypkg-1.0.dist-info/RECORD"] = "\n".join(record) + "\n"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)


async def test_a_venv_on_the_slave_and_pip_install_into_it(session: Session) -> None:
    wheel(session.box / "tinypkg-1.0-py3-none-any.whl")
    check = "import tinypkg; print(tinypkg.hello())"
    result = await session.sh(
        "/usr/bin/python3 -m venv /v && /v/bin/pip install -q --no-index"
        f" /tinypkg-1.0-py3-none-any.whl && /v/bin/python -c '{check}'"
        " && /v/bin/pip --version | cut -d' ' -f1"
    )
    assert (result.status, result.out) == (0, "hi from tinypkg\npip\n"), result.err
    assert (session.box / "v" / "bin" / "python").is_symlink()
    assert list((session.box / "v" / "lib").glob("python3*/site-packages/tinypkg/__init__.py"))
    session.master_untouched()
