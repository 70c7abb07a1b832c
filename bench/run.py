"""fsys benchmarks, fsys and native side by side in one run (``nox -s bench``).

    python bench/run.py [--quick] [--python PY]

- start:  a whole session of /bin/true (fork the slave, launch, handshake, exit),
          against running /bin/true directly;
- stat:   microseconds per stat(2) from a C loop, on a slave file, against native;
- read:   MB/s of `cat` reading a 1 GiB file of the slave (from the page cache),
          against native `cat`;
- fork:   1,000 fork+exec of /bin/true by one shell inside one session, against
          the same shell run natively;
- make:   `make -j2` of a small C project stored on the slave, against native.

The slave is embedded (this machine's filesystem) for start and read, and both
embedded and rooted (`--root`) for stat. Medians of several runs; the machine is
noisy, so compare the ratios, which are measured minutes apart at most.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(cmd: list[str], **kwargs: object) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def fsys(python: str, *args: str, slave: str | None = None) -> list[str]:
    cmd = [python, "-m", "fsys.master", "run"]
    if slave:
        cmd += ["--slave", slave]
    return [*cmd, "--", *args]


def bench_start(python: str, runs: int) -> dict[str, float]:
    native = median([timed(["/bin/true"]) for _ in range(runs)])
    timed(fsys(python, "/bin/true"))  # warm the page cache
    under = median([timed(fsys(python, "/bin/true")) for _ in range(runs)])
    return {"native_s": native, "fsys_s": under}


def bench_stat(python: str, work: Path, count: int, runs: int) -> dict[str, float]:
    binary = work / "statloop"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(HERE / "statloop.c")], check=True)
    box = work / "box"
    box.mkdir()
    target = box / "file"
    target.write_text("x")

    def loop(cmd: list[str]) -> float:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return float(out.split()[-1])

    native = median([loop([str(binary), str(target), str(count * 20)]) for _ in range(runs)])
    embedded = median(
        [loop(fsys(python, str(binary), str(target), str(count))) for _ in range(runs)]
    )
    slave = shlex.join([python, "-m", "fsys.slave", "serve", "--stdio", "--root", str(box)])
    rooted = median(
        [loop(fsys(python, str(binary), "/file", str(count), slave=slave)) for _ in range(runs)]
    )
    return {"native_us": native, "fsys_us": embedded, "fsys_rooted_us": rooted}


def bench_read(python: str, work: Path, size_mib: int, runs: int) -> dict[str, float]:
    big = work / "big"
    chunk = os.urandom(1 << 20)
    with open(big, "wb") as f:
        for _ in range(size_mib):
            f.write(chunk)
    size = size_mib << 20
    timed(["cat", str(big)])  # into the page cache
    native = median([timed(["cat", str(big)]) for _ in range(runs)])
    under = median([timed(fsys(python, "cat", str(big))) for _ in range(runs)])
    start = median([timed(fsys(python, "/bin/true")) for _ in range(runs)])
    big.unlink()
    return {
        "native_MBps": size / native / 1e6,
        "fsys_MBps": size / under / 1e6,
        "fsys_MBps_without_start": size / max(under - start, 1e-9) / 1e6,
    }


def bench_fork(python: str, count: int, runs: int) -> dict[str, float]:
    loop = f"i=0; while [ $i -lt {count} ]; do /bin/true; i=$((i+1)); done"
    native = median([timed(["/bin/sh", "-c", loop]) for _ in range(runs)])
    under = median([timed(fsys(python, "/bin/sh", "-c", loop)) for _ in range(runs)])
    start = median([timed(fsys(python, "/bin/true")) for _ in range(runs)])
    return {"native_s": native, "fsys_s": under, "fsys_without_start_s": under - start}


MAKEFILE = """\
OBJS = $(patsubst src/%.c,build/%.o,$(wildcard src/*.c))
build/app: $(OBJS)
\t$(CC) -o $@ $(OBJS)
build/%.o: src/%.c
\t@mkdir -p build
\t$(CC) -O1 -c -o $@ $<
"""


def c_project(root: Path, files: int) -> Path:
    proj = root / "proj"
    (proj / "src").mkdir(parents=True)
    (root / "tmp").mkdir(exist_ok=True)
    calls = []
    for i in range(files):
        (proj / "src" / f"f{i}.c").write_text(f"int f{i}(int x) {{ return x * {i} + 1; }}\n")
        calls.append(f"f{i}(1)")
    protos = "".join(f"int f{i}(int);\n" for i in range(files))
    (proj / "src" / "main.c").write_text(
        f'#include <stdio.h>\n{protos}int main(void) {{ printf("%d\\n", {" + ".join(calls)}); }}\n'
    )
    (proj / "Makefile").write_text(MAKEFILE)
    return proj


def bench_make(python: str, work: Path, runs: int) -> dict[str, float]:
    box = work / "makebox"
    proj = c_project(box, 12)
    slave = shlex.join([python, "-m", "fsys.slave", "serve", "--stdio", "--root", str(box)])

    def build(cmd: list[str]) -> float:
        shutil.rmtree(proj / "build", ignore_errors=True)
        return timed(cmd)

    native = median([build(["make", "-s", "-C", str(proj), "-j2"]) for _ in range(runs)])
    under = median(
        [build(fsys(python, "make", "-s", "-C", "/proj", "-j2", slave=slave)) for _ in range(runs)]
    )
    return {"native_s": native, "fsys_s": under}


def row(name: str, native: str, under: str, note: str) -> None:
    print(f"{name:18s} native {native:>12s}   fsys {under:>12s}" + (f"   ({note})" if note else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and smaller runs")
    parser.add_argument("--python", default=sys.executable, help="interpreter for fsys")
    args = parser.parse_args()
    if shutil.which("gcc") is None:
        print("bench: gcc is needed to build the stat loop", file=sys.stderr)
        return 1
    runs = 3 if args.quick else 5
    python = args.python
    version = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    print(f"# fsys bench: {platform.node()}, Linux {platform.release()}, "
          f"{os.cpu_count()} CPUs, fsys on Python {version} ({python})")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fsys-bench-") as tmp:
        work = Path(tmp)
        start = bench_start(python, runs * 2)
        start_ms = start["fsys_s"] * 1e3
        row("start /bin/true", f"{start['native_s'] * 1e3:.1f} ms", f"{start_ms:.0f} ms", "")
        stat = bench_stat(python, work, 5000 if args.quick else 20000, runs)
        rooted = f"rooted slave {stat['fsys_rooted_us']:.1f} us"
        row("stat (C loop)", f"{stat['native_us']:.2f} us", f"{stat['fsys_us']:.1f} us", rooted)
        read = bench_read(python, work, 256 if args.quick else 1024, runs)
        steady = f"{read['fsys_MBps_without_start']:.0f} MB/s without session start"
        row(
            "read (cat)", f"{read['native_MBps']:.0f} MB/s", f"{read['fsys_MBps']:.0f} MB/s", steady
        )
        count = 300 if args.quick else 1000
        fork = bench_fork(python, count, runs)
        ratio = fork["fsys_without_start_s"] / fork["native_s"]
        row(f"fork+exec x{count}", f"{fork['native_s']:.2f} s", f"{fork['fsys_s']:.2f} s",
            f"x{ratio:.1f} without session start")  # fmt: skip
        make = bench_make(python, work, runs)
        whole = make["fsys_s"] / make["native_s"]
        steady_ratio = (make["fsys_s"] - start["fsys_s"]) / make["native_s"]
        row("make -j2", f"{make['native_s']:.2f} s", f"{make['fsys_s']:.2f} s",
            f"x{whole:.1f}; x{steady_ratio:.1f} without session start")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
