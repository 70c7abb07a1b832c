"""How soon a change made on the slave by another process is seen under fsys.

    python bench/stale.py [--sessions N] [--python PY] [--view]

Each session: a program under fsys (rooted slave) stats a slave file in a loop,
so its answers come from fsys's attribute cache; this process then chmods the file
behind fsys's back and notes the time; the program prints the time it first saw the
new mode (CLOCK_MONOTONIC is shared by the two). Prints min, median and max in ms.
With --view, the program runs in the view (its kernel's caches, kept by notices).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROGRAM = r"""
import os, time
for _ in range(100):
    os.stat("/t/f")
open("/t/go", "w").close()
while os.stat("/t/f").st_mode & 0o777 == 0o644:
    pass
print(time.monotonic())
"""


def one(python: str, box: Path, options: list[str]) -> float:
    target, go = box / "t" / "f", box / "t" / "go"
    target.chmod(0o644)
    go.unlink(missing_ok=True)
    slave = f"{python} -m fsys.slave serve --stdio --root {box}"
    cmd = [python, "-m", "fsys.master", "run", *options, "--slave", slave, "--",
           "/usr/bin/python3", "-c", PROGRAM]  # fmt: skip
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        while not go.exists():
            time.sleep(0.001)
        time.sleep(0.05)  # the program is in its loop, answered from the cache
        changed = time.monotonic()
        target.chmod(0o600)
        out, _ = proc.communicate(timeout=60)
    return (float(out.split()[-1]) - changed) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--python", default=sys.executable, help="interpreter for fsys")
    parser.add_argument("--view", action="store_true", help="run the program in the view")
    args = parser.parse_args()
    box = Path(tempfile.mkdtemp(prefix="fsys-stale-"))
    try:
        (box / "t").mkdir()
        (box / "t" / "f").touch()
        options = ["--view"] if args.view else []
        delays = sorted(one(args.python, box, options) for _ in range(args.sessions))
    finally:
        shutil.rmtree(box)
    print(f"seen after {delays[0]:.2f} / {statistics.median(delays):.2f} / {delays[-1]:.2f} ms "
          f"(min / median / max of {len(delays)} sessions)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
