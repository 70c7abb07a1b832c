"""The slave's terminal (``fsys-slave run``): how long a typed line takes to come
back through ``cat`` on a pseudo-terminal, natively and under fsys, side by side.

    python bench/terminal.py [--lines N]

Each line goes: the terminal -> (fsys: fsys-slave's read -> the link -> fmhub ->
the program's placeholder) -> cat -> back the same way -> the terminal. Median of
N lines, after one to warm up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_terminal import Terminal, fsys


def echo_micros(argv: list[str], cwd: Path, lines: int) -> float:
    t = Terminal(argv, cwd)
    try:
        t.type("warm\n")
        t.expect("warm\r\nwarm")
        took = []
        for i in range(lines):
            word = f"w{i}x"
            t.seen = b""
            start = time.perf_counter()
            t.type(word + "\n")
            t.expect(f"{word}\r\n{word}\r\n")  # the terminal's echo, then cat's
            took.append((time.perf_counter() - start) * 1e6)
        t.type("\x04")
        t.wait()
    finally:
        t.close()
    return statistics.median(took)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        box = Path(tmp)
        native = echo_micros(["/bin/cat"], box, args.lines)
        under = echo_micros(fsys(box, "/bin/cat"), box, args.lines)
    print("| a typed line echoed by cat | native | fsys-slave run | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| median of {args.lines} | {native:.0f} µs | {under:.0f} µs | {under / native:.0f}x |")


if __name__ == "__main__":
    main()
