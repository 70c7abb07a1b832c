"""fsys benchmarks, fsys and native side by side in one run (``nox -s bench``).

    python bench/run.py [--quick] [--runs N] [--only NAME,...] [--python PY] [--master CMD]

- start:  a whole session of /bin/true (fork the slave, launch, handshake, exit),
          against running /bin/true directly;
- stat:   microseconds per stat(2) from a C loop, on a slave file, against native;
- continued: microseconds per trapped call that stays on the master (fmhub continues
          it), from a C loop: read(fd, buf, 1) on a pipe of the program, and fstat(2)
          of a master file (/usr/bin/true); against the same loop run natively;
- read:   MB/s of `cat` reading a 1 GiB file of the slave (from the page cache),
          against native `cat`;
- write:  MB/s of `dd bs=4k conv=fsync` writing 256 MiB to a rooted slave (and
          through sshfs);
- memory: peak resident memory of the session's largest process, reading 64 MiB and
          1 GiB and listing 500 and 5,000 files (it must not grow with either);
- fork:   1,000 fork+exec of /bin/true by one shell inside one session, against
          the same shell run natively;
- make:   `make -j2` of a small C project stored on the slave, against native.
- git:    `git status` in a repository of 2,000 files on the slave.
- transports: a forwarded stat (µs, --no-cache) and `cat` of a 1 GiB slave file
          (MB/s, whole session) through each way of reaching a rooted slave: a slave
          command's stdio (the default), a listening slave on a unix socket, on TCP
          (with a secret) and on TCP with TLS, and over SSH (--ssh, through the
          loopback sshd);
- tree:   metadata-heavy commands on a 5,000-file tree (ls -lR, find, du, tar, grep
          -r, Python reading 1,000 files) on a rooted slave, against native and
          against sshfs (default options) through a loopback sshd the bench starts
          itself (bench/sshfs.py; skipped, with the reason, without sshd or sshfs).
- warm:   the tree's commands inside one session, each timed after a first run (as
          a shell under fsys runs them, and as a mounted sshfs in use serves them),
          against the same loop natively and on the sshfs mount.
- kept:   each command a whole `fsys-master run --view --keep 120` (a new fsys-master
          each time, served by the kept session the first one started): what a user
          typing the tree's commands one by one sees, as with a mounted sshfs; the
          session start (`true`) too. With the installed fsys-master (the compiled
          client, next to PY), and with the Python client (`PY -m fsys.master`).
          Against the same commands natively and on the sshfs mount, each timed
          whole. Needs the view (root and /dev/fuse).
- network: TCP over 127.0.0.1 with a Python client under fsys (its sockets are the
          embedded slave's, pumped through a placeholder) and a Python server run
          natively: 1 GiB sent to a server that discards it, 1 GiB read from a server,
          and 2,000 1-byte ping-pong round trips with an echo server; against the same
          client run natively (the client times itself).

As root with /dev/fuse, each row is also measured with `--view` (its own column;
`--no-view` skips it). With sshfs available, the stat row has its figure too. fsys
answers a repeated stat from its attribute cache; the stat row also gives a
forwarded stat (`--no-cache`).

The slave is embedded (this machine's filesystem) for start, continued and read, and
both embedded and rooted (`--root`) for stat. The C loops time themselves
(CLOCK_MONOTONIC), so their figures exclude the session's start. Medians of several
runs; the machine is noisy, so compare the ratios, which are measured minutes apart
at most. The output is one markdown table.

`--only stat,continued` runs just those rows. fsys runs as `PY -m fsys.master` (PY is
`--python`; run from outside a source tree to be sure which fsys it imports) unless
`--master CMD` names another command, e.g. `--master fsys-master`; a rooted slave is
always `PY -m fsys.slave serve --stdio --root DIR`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from certs import self_signed  # (bench/certs.py, next to this file)
from sshd import loopback_sshd  # (bench/sshd.py)
from sshd import missing as sshd_missing
from sshfs import mounted  # (bench/sshfs.py)

HERE = Path(__file__).resolve().parent
BENCHES = ("start", "stat", "continued", "read", "write", "fork", "make", "git", "tree", "warm",
           "kept", "memory", "transports", "network")  # fmt: skip


def timed(cmd: list[str], **kwargs: object) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass(frozen=True)
class Fsys:
    """How to run fsys: the master's command, and the interpreter of a rooted slave."""

    python: str
    master: tuple[str, ...]
    #: Measure `--view` too (root and /dev/fuse): its own column.
    view: bool = False

    def run(self, *args: str, slave: str | None = None, options: tuple[str, ...] = ()) -> list[str]:
        cmd = [*self.master, "run", *options]
        if slave:
            cmd += ["--slave", slave]
        return [*cmd, "--", *args]

    def rooted(self, root: Path) -> str:
        """The --slave command of a slave confined to root."""
        slave = [self.python, "-m", "fsys.slave", "serve", "--stdio", "--root", str(root)]
        return shlex.join(slave)


def build(work: Path, name: str) -> Path:
    """Compiles bench/NAME.c into work/NAME."""
    binary = work / name
    if not binary.exists():
        cmd = ["gcc", "-O2", "-o", str(binary), str(HERE / f"{name}.c")]
        subprocess.run(cmd, check=True)
    return binary


def c_loop(cmd: list[str], timeout: float | None = None) -> float:
    """Runs a C loop that prints its microseconds per call on its last line."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         timeout=timeout).stdout  # fmt: skip
    return float(out.split()[-1])


VIEW = ("--view",)


def bench_start(fs: Fsys, runs: int) -> dict[str, float]:
    native = median([timed(["/bin/true"]) for _ in range(runs)])
    timed(fs.run("/bin/true"))  # warm the page cache
    out = {"native_s": native, "fsys_s": median([timed(fs.run("/bin/true")) for _ in range(runs)])}
    if fs.view:
        out["view_s"] = median([timed(fs.run("/bin/true", options=VIEW)) for _ in range(runs)])
    return out


def bench_stat(fs: Fsys, work: Path, count: int, runs: int, sshfs: Path | None) -> dict[str, float]:
    """stat(2) of one slave file in a C loop: from fsys's cache (embedded and rooted
    slave), forwarded each time (--no-cache), and through sshfs."""
    binary = build(work, "statloop")
    box = work / "box"
    box.mkdir()
    target = box / "file"
    target.write_text("x")
    native = median([c_loop([str(binary), str(target), str(count * 20)]) for _ in range(runs)])
    embedded = median([c_loop(fs.run(str(binary), str(target), str(count))) for _ in range(runs)])
    forwarded = median(
        [
            c_loop(fs.run(str(binary), str(target), str(count), options=("--no-cache",)))
            for _ in range(runs)
        ]
    )
    slave = fs.rooted(box)
    rooted = median(
        [c_loop(fs.run(str(binary), "/file", str(count), slave=slave)) for _ in range(runs)]
    )
    out = {"native_us": native, "fsys_us": embedded, "fsys_forwarded_us": forwarded,
           "fsys_rooted_us": rooted}  # fmt: skip
    if fs.view:
        out["view_us"] = median([c_loop(fs.run(str(binary), "/file", str(count * 5), slave=slave,
                                               options=VIEW)) for _ in range(runs)])  # fmt: skip
    if sshfs is not None:
        probe = sshfs / "box" / "file"
        out["sshfs_us"] = median(
            [c_loop([str(binary), str(probe), str(count)]) for _ in range(runs)]
        )
    return out


#: The tree bench's commands, run by /bin/sh with ROOT the directory holding tree/.
TREE = {
    "ls -lR": "ls -lR ROOT/tree",
    "find -type f": "find ROOT/tree -type f",
    "du -s": "du -s ROOT/tree",
    "tar cf - tree": "tar cf - -C ROOT/ tree | wc -c",
    "grep -r": "grep -rl needle ROOT/tree",
    "python reads 1,000 files": (
        "python3 -c 'import os, sys; r = sys.argv[1]; "
        '[open(os.path.join(d, f), "rb").read() for d, _, fs in sorted(os.walk(r))[:100] '
        "for f in fs]' ROOT/tree"
    ),
}


def make_tree(root: Path, dirs: int = 50, subdirs: int = 10, files: int = 10) -> None:
    """dirs x subdirs x files small files (5,000 by default), one holding "needle"."""
    for d in range(dirs):
        for s in range(subdirs):
            sub = root / f"d{d}" / f"s{s}"
            sub.mkdir(parents=True)
            for f in range(files):
                (sub / f"f{f}").write_text(f"{d} {s} {f}\n" * (f + 1))
    (root / "d7" / "s3" / "f5").write_text("a needle here\n")


def bench_tree(fs: Fsys, work: Path, runs: int, sshfs: Path | None) -> dict[str, dict[str, float]]:
    box = work / "treebox"
    make_tree(box / "tree")
    slave = fs.rooted(box)
    out: dict[str, dict[str, float]] = {}
    for name, script in TREE.items():
        native = ["/bin/sh", "-c", script.replace("ROOT", str(box))]
        under = fs.run("/bin/sh", "-c", script.replace("ROOT", ""), slave=slave)
        timed(native)
        timed(under)  # warm the page cache, and the slave's
        fig = {"native_s": median([timed(native) for _ in range(runs)]),
               "fsys_s": median([timed(under) for _ in range(runs)])}  # fmt: skip
        if fs.view:
            viewed = fs.run("/bin/sh", "-c", script.replace("ROOT", ""), slave=slave, options=VIEW)
            timed(viewed)
            fig["view_s"] = median([timed(viewed) for _ in range(runs)])
        if sshfs is not None:
            remote = ["/bin/sh", "-c", script.replace("ROOT", str(sshfs / "treebox"))]
            timed(remote)
            fig["sshfs_s"] = median([timed(remote) for _ in range(runs)])
        out[name] = fig
    return out


#: Run inside one session (or natively, or on the sshfs mount): the script once to warm
#: every cache, then RUNS more times, each timed here; prints the median in seconds.
#: This is how a shell under fsys, or an sshfs mount in use, runs its commands.
WARM = """
import statistics, subprocess, sys, time
runs, cmd = int(sys.argv[1]), ["/bin/sh", "-c", sys.argv[2]]
subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
times = []
for _ in range(runs):
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
    times.append(time.perf_counter() - start)
print(statistics.median(times))
"""


def warm(cmd: list[str]) -> float:
    """Runs WARM's loop (``cmd`` ends with its arguments); its median in seconds."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def bench_warm_tree(
    fs: Fsys, work: Path, runs: int, sshfs: Path | None
) -> dict[str, dict[str, float]]:
    """The tree's commands run inside one warm session (each after a first run):
    what a shell under fsys sees, beside a mounted sshfs in use."""
    box = work / "treebox"
    if not (box / "tree").exists():
        make_tree(box / "tree")
    slave = fs.rooted(box)
    harness = ["/usr/bin/python3", "-c", WARM, str(runs)]
    out: dict[str, dict[str, float]] = {}
    for name, script in TREE.items():
        inside = script.replace("ROOT", "")
        fig = {"native_s": warm([*harness, script.replace("ROOT", str(box))]),
               "fsys_s": warm(fs.run(*harness, inside, slave=slave))}  # fmt: skip
        if fs.view:
            fig["view_s"] = warm(fs.run(*harness, inside, slave=slave, options=VIEW))
        if sshfs is not None:
            fig["sshfs_s"] = warm([*harness, script.replace("ROOT", str(sshfs / "treebox"))])
        out[name] = fig
    return out


#: The anchor benchmark's other rows (issue 8), for kept sessions: files made by
#: make_files in the box; each command leaves the box as it found it.
KEPT_MORE = {
    "cat BIG": "cat ROOT/big > /dev/null",
    "dd bs=4k 256 MiB, fsync": ("dd if=/dev/zero of=ROOT/dd.out bs=4k count=65536 conv=fsync "
                                "status=none; rm ROOT/dd.out"),
    "write 512 MiB, fsync": ("dd if=/dev/zero of=ROOT/w.out bs=1M count=512 conv=fsync "
                             "status=none; rm ROOT/w.out"),
    "cp -r tree (and rm -r)": "cp -r ROOT/tree ROOT/copy; rm -r ROOT/copy",
    "sqlite scan, 27 MB db": (
        "python3 -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("
        '"select count(*), sum(length(v)) from t").fetchone())\' ROOT/db.sqlite'
    ),
    "git status, 2,000 files": "git -C ROOT/repo status --short",
    "gcc -c x20": "cd ROOT/src && for i in $(seq 20); do gcc -pipe -c f$i.c; done; rm f*.o",
}  # fmt: skip


def make_files(box: Path, big_mib: int) -> None:
    """KEPT_MORE's files in ``box``: a file of ``big_mib`` MiB, a 27 MB SQLite database,
    a git repository of 2,000 files, 20 C sources."""
    import sqlite3

    if not (box / "big").exists() or (box / "big").stat().st_size != big_mib << 20:
        with (box / "big").open("wb") as f:
            for _ in range(big_mib):
                f.write(os.urandom(1 << 20))
    if not (box / "db.sqlite").exists():
        with contextlib.closing(sqlite3.connect(box / "db.sqlite")) as db:
            db.execute("create table t (k integer primary key, v text)")
            db.executemany("insert into t (v) values (?)",
                           ((f"{i:08d}" * 16,) for i in range(200_000)))  # fmt: skip
            db.commit()
    if not (box / "repo").exists():
        make_repo(box / "repo", 2000)
    (box / "src").mkdir(exist_ok=True)
    for i in range(1, 21):
        (box / "src" / f"f{i}.c").write_text(
            f"#include <stdio.h>\n#include <string.h>\n#include <stdlib.h>\n"
            f'int f{i}(const char *s) {{ char b[64]; snprintf(b, sizeof b, "%s{i}", s); '
            f"return (int)strlen(b) + atoi(s); }}\n"
        )


#: Rows of KEPT_MORE slow on sshfs (seconds a run): measured at most this many times.
HEAVY_RUNS = 3


def bench_kept(
    fs: Fsys, work: Path, runs: int, sshfs: Path | None, big_mib: int
) -> dict[str, dict[str, float]]:
    """Each of the tree's commands (and `true`), then the anchor benchmark's other rows
    (KEPT_MORE), run as a whole `fsys-master run --view --keep`, after a first run that
    starts the kept session and warms it."""
    box = work / "treebox"
    if not (box / "tree").exists():
        make_tree(box / "tree")
    make_files(box, big_mib)
    more = {name.replace("BIG", f"{big_mib} MiB"): script for name, script in KEPT_MORE.items()}
    slave = fs.rooted(box)
    env = {**os.environ, "FSYS_KEEP_DIR": str(work / "kept"), "FSYS_MASTER_PYTHON": fs.python}
    options = ("--view", "--keep", "120")
    # What a user types: the installed fsys-master, the compiled client (setup.py) when
    # it was built; and fsys.master in Python, that client's fallback, beside it.
    installed = Path(fs.python).parent / "fsys-master"
    compiled = installed.exists() and installed.read_bytes()[:4] == b"\x7fELF"
    out: dict[str, dict[str, float]] = {}
    try:
        for name, script in {"start /bin/true": "true", **TREE, **more}.items():
            n = min(runs, HEAVY_RUNS) if name in more else runs
            native = ["/bin/sh", "-c", script.replace("ROOT", str(box))]
            under = fs.run("/bin/sh", "-c", script.replace("ROOT", ""), slave=slave,
                           options=options)  # fmt: skip
            timed(native)
            timed(under, env=env)
            through_python = median([timed(under, env=env) for _ in range(n)])
            fig = {"native_s": median([timed(native) for _ in range(n)]),
                   "kept_s": through_python}  # fmt: skip
            if compiled:  # kept_s is the compiled client's; python_s beside it
                typed = [str(installed), *under[len(fs.master) :]]
                timed(typed, env=env)
                fig["kept_s"] = median([timed(typed, env=env) for _ in range(n)])
                fig["python_s"] = through_python
            if sshfs is not None:
                remote = ["/bin/sh", "-c", script.replace("ROOT", str(sshfs / "treebox"))]
                timed(remote)
                fig["sshfs_s"] = median([timed(remote) for _ in range(n)])
            out[name] = fig
    finally:
        subprocess.run([*fs.master, "kept", "--stop"], env=env, check=False,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    return out


def bench_continued(fs: Fsys, work: Path, count: int, runs: int) -> dict[str, dict[str, float]]:
    """Per call of read(2) on a pipe and fstat(2) of /usr/bin/true: trapped, continued."""
    binary = build(work, "trapped")
    loops = {"read": [str(binary), "read", str(count)],
             "fstat": [str(binary), "fstat", "/usr/bin/true", str(count)]}  # fmt: skip
    figures: dict[str, dict[str, list[float]]] = {
        name: {"native_us": [], "fsys_us": []} for name in loops
    }
    for _ in range(runs):  # interleaved, so that both rows see the same moments
        for name, cmd in loops.items():
            figures[name]["native_us"].append(c_loop(cmd))
            figures[name]["fsys_us"].append(c_loop(fs.run(*cmd)))
    out = {name: {k: median(v) for k, v in fig.items()} for name, fig in figures.items()}
    for fig in out.values():
        fig["overhead_us"] = fig["fsys_us"] - fig["native_us"]
    return out


def bench_read(fs: Fsys, work: Path, size_mib: int, runs: int) -> dict[str, float]:
    big = work / "big"
    chunk = os.urandom(1 << 20)
    with open(big, "wb") as f:
        for _ in range(size_mib):
            f.write(chunk)
    size = size_mib << 20
    timed(["cat", str(big)])  # into the page cache
    native = median([timed(["cat", str(big)]) for _ in range(runs)])
    under = median([timed(fs.run("cat", str(big))) for _ in range(runs)])
    start = median([timed(fs.run("/bin/true")) for _ in range(runs)])
    out = {
        "native_MBps": size / native / 1e6,
        "fsys_MBps": size / under / 1e6,
        "fsys_MBps_without_start": size / max(under - start, 1e-9) / 1e6,
    }
    if fs.view:
        cat = fs.run("cat", str(big), options=VIEW)
        timed(cat)
        out["view_MBps"] = size / median([timed(cat) for _ in range(runs)]) / 1e6
    big.unlink()
    return out


def bench_write(
    fs: Fsys, work: Path, size_mib: int, runs: int, sshfs: Path | None
) -> dict[str, float]:
    """dd bs=4k of SIZE MiB into a slave file, and fsync (rooted slave; the same box
    through sshfs)."""
    box = work / "writebox"
    box.mkdir()
    slave = fs.rooted(box)

    def dd(out: Path | str) -> list[str]:
        return ["dd", "if=/dev/zero", f"of={out}", "bs=4k", f"count={size_mib * 256}",
                "conv=fsync", "status=none"]  # fmt: skip

    size = size_mib << 20
    out = {"native_MBps": size / median([timed(dd(box / "out")) for _ in range(runs)]) / 1e6,
           "fsys_MBps": size / median([timed(fs.run(*dd("/out"), slave=slave))
                                       for _ in range(runs)]) / 1e6}  # fmt: skip
    if fs.view:
        out["view_MBps"] = size / median([timed(fs.run(*dd("/out"), slave=slave, options=VIEW))
                                          for _ in range(runs)]) / 1e6  # fmt: skip
    if sshfs is not None:
        remote = sshfs / "writebox" / "out"
        out["sshfs_MBps"] = size / median([timed(dd(remote)) for _ in range(runs)]) / 1e6
    return out


#: Runs a command and prints the peak resident memory (KiB) of the largest process it
#: waited for (getrusage RUSAGE_CHILDREN: fsys-master, the slave, the program).
PEAK = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
        "stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # fmt: skip


def peak_mib(cmd: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK, *cmd], check=True, capture_output=True,
                         text=True).stdout  # fmt: skip
    return int(out.split()[-1]) / 1024


MEMORY_RUNS = (
    ("cat64", ["cat", "/small"]),
    ("cat1024", ["cat", "/large"]),
    ("ls500", ["ls", "-lR", "/tree"]),
    ("ls5000", ["ls", "-lR", "/big"]),
)
MEMORY_ROWS = {"cat64": "cat 64 MiB", "cat1024": "cat 1 GiB", "ls500": "ls -lR 500 files",
               "ls5000": "ls -lR 5,000 files"}  # fmt: skip


def bench_memory(fs: Fsys, work: Path, runs: int) -> dict[str, float]:
    """Peak memory of a session's largest process (fsys-master or the slave): reading
    64 MiB and 1 GiB, and listing a 5,000-file tree, on a rooted slave; the figure must
    not grow with the file's size nor the tree's."""
    box = work / "membox"
    (box / "tree").mkdir(parents=True)
    make_tree(box / "tree", dirs=10, subdirs=5)  # 500 files
    chunk = os.urandom(1 << 20)
    for name, mib in (("small", 64), ("large", 1024)):
        with open(box / name, "wb") as f:
            for _ in range(mib):
                f.write(chunk)
    make_tree(box / "big", dirs=50)
    slave = fs.rooted(box)
    out: dict[str, float] = {}
    modes = [("fsys", ())] + ([("view", VIEW)] if fs.view else [])
    for mode, options in modes:
        for label, cmd in MEMORY_RUNS:
            peaks = [peak_mib(fs.run(*cmd, slave=slave, options=options)) for _ in range(runs)]
            out[f"{mode}_{label}"] = median(peaks)
    return out


def bench_fork(fs: Fsys, count: int, runs: int) -> dict[str, float]:
    loop = f"i=0; while [ $i -lt {count} ]; do /bin/true; i=$((i+1)); done"
    native = median([timed(["/bin/sh", "-c", loop]) for _ in range(runs)])
    under = median([timed(fs.run("/bin/sh", "-c", loop)) for _ in range(runs)])
    start = median([timed(fs.run("/bin/true")) for _ in range(runs)])
    out = {"native_s": native, "fsys_s": under, "fsys_without_start_s": under - start}
    if fs.view:
        out["view_s"] = median([timed(fs.run("/bin/sh", "-c", loop, options=VIEW))
                                for _ in range(runs)])  # fmt: skip
    return out


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


def bench_make(fs: Fsys, work: Path, runs: int) -> dict[str, float]:
    box = work / "makebox"
    proj = c_project(box, 12)
    slave = fs.rooted(box)

    def make(cmd: list[str]) -> float:
        shutil.rmtree(proj / "build", ignore_errors=True)
        return timed(cmd)

    native = median([make(["make", "-s", "-C", str(proj), "-j2"]) for _ in range(runs)])
    under = median(
        [make(fs.run("make", "-s", "-C", "/proj", "-j2", slave=slave)) for _ in range(runs)]
    )
    out = {"native_s": native, "fsys_s": under}
    if fs.view:
        out["view_s"] = median([make(fs.run("make", "-s", "-C", "/proj", "-j2", slave=slave,
                                            options=VIEW)) for _ in range(runs)])  # fmt: skip
    return out


def make_repo(repo: Path, files: int) -> None:
    """A git repository of ``files`` committed files, one of them modified."""
    repo.mkdir(parents=True)
    for i in range(files):
        sub = repo / f"d{i % 20}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}.txt").write_text(f"file {i}\n")
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", HOME=str(repo.parent))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.org"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "tree"]):
        subprocess.run([*git, "-C", str(repo), *args], check=True, env=env)
    (repo / "d3" / "f3.txt").write_text("changed\n")  # one modified file to report


def bench_git(fs: Fsys, work: Path, files: int, runs: int) -> dict[str, float]:
    """git status in a repository of ``files`` committed files on the slave."""
    box = work / "gitbox"
    repo = box / "repo"
    make_repo(repo, files)
    slave = fs.rooted(box)
    status = ["git", "status", "--short"]
    timed(["git", "-C", str(repo), *status[1:]])  # warm the index and the page cache
    native = median([timed(["git", "-C", str(repo), *status[1:]]) for _ in range(runs)])
    under = median([timed(fs.run(*status[:1], "-C", "/repo", *status[1:], slave=slave))
                    for _ in range(runs)])  # fmt: skip
    out = {"native_s": native, "fsys_s": under}
    if fs.view:
        viewed = fs.run(*status[:1], "-C", "/repo", *status[1:], slave=slave, options=VIEW)
        timed(viewed)
        out["view_s"] = median([timed(viewed) for _ in range(runs)])
    return out


def _service(fs: Fsys, box: Path, *listen: str) -> tuple[subprocess.Popen[bytes], str]:
    """A listening slave serving ``box``, and the address it says it listens on."""
    proc = subprocess.Popen([fs.python, "-m", "fsys.slave", "serve", "--root", str(box),
                             "--listen", *listen], stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    if "listening on " not in line:
        proc.kill()
        raise RuntimeError(f"the listening slave did not start: {line!r}")
    return proc, line.split("listening on ")[1].split()[0]


def bench_transports(
    fs: Fsys, work: Path, count: int, size_mib: int, runs: int
) -> dict[str, dict[str, float]]:
    """Forwarded stat and 1 GiB read through each way of reaching a rooted slave."""
    binary = build(work, "statloop")
    box = work / "transports"
    box.mkdir()
    (box / "file").write_text("x")
    chunk = os.urandom(1 << 20)
    with open(box / "big", "wb") as f:
        for _ in range(size_mib):
            f.write(chunk)
    secret = work / "secret"
    secret.write_bytes(os.urandom(24).hex().encode())
    secret.chmod(0o600)
    ways: dict[str, tuple[str, ...]] = {"stdio (--slave)": ("--slave", fs.rooted(box))}
    cert, key = work / "cert.pem", work / "key.pem"
    why_not = self_signed(cert, key)
    tcp = ["tcp:127.0.0.1:0", "--secret-file", str(secret)]
    listens = {"unix": [f"unix:{work}/fsys.sock"], "tcp": tcp}
    if why_not is None:
        listens["tcp + TLS"] = [*tcp, "--tls-cert", str(cert), "--tls-key", str(key)]
    else:
        print(f"bench: TLS not measured: {why_not}", file=sys.stderr)
    with ExitStack() as stack:
        for name, listen in listens.items():
            proc, address = _service(fs, box, *listen)
            stack.callback(proc.wait)
            stack.callback(proc.terminate)
            extra: tuple[str, ...] = ()
            if address.startswith("tcp:"):
                extra = ("--secret-file", str(secret))
            if "TLS" in name:
                extra += ("--tls-ca", str(cert))
            ways[name] = ("--connect", address, *extra)
        why = sshd_missing()
        if why is None:
            sshd = stack.enter_context(loopback_sshd(work / "sshd"))
            wrapper = work / "fsys-slave"
            wrapper.write_text(f'#!/bin/sh\nexec {fs.python} -m fsys.slave "$@" --root {box}\n')
            wrapper.chmod(0o755)
            options = [arg for option in sshd.options for arg in ("--ssh-option", option)]
            ways["ssh (--ssh)"] = ("--ssh", sshd.host, *options, "--ssh-slave", str(wrapper))
        else:
            print(f"bench: ssh not measured: {why}", file=sys.stderr)
        out: dict[str, dict[str, float]] = {}
        size = size_mib << 20
        for name, way in ways.items():
            loop = fs.run(str(binary), "/file", str(count), options=(*way, "--no-cache"))
            stat_us = median([c_loop(loop) for _ in range(runs)])
            cat = fs.run("cat", "/big", options=way)
            timed(cat)
            read_s = median([timed(cat) for _ in range(runs)])
            out[name] = {"stat_us": stat_us, "read_MBps": size / read_s / 1e6}
    return out


#: The network bench's peers, written to work/netpeer.py. `serve` listens on
#: 127.0.0.1 (it prints its port) and reads each connection's first byte: s (sink:
#: read to end of file, answer the count in 8 bytes), r SIZE (send SIZE bytes, then
#: end of file), e (echo each byte). The client (`send|recv|echo PORT COUNT`) prints
#: its seconds (send, recv: until the sink's answer, or the end of file) or its
#: microseconds per round trip (echo) on its last line.
NETPEER = """\
import socket, sys, threading, time

CHUNK = 1 << 20


def recv_exact(conn, size):
    out = b""
    while len(out) < size:
        got = conn.recv(size - len(out))
        if not got:
            raise SystemExit("netpeer: short read")
        out += got
    return out


def handle(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        mode = conn.recv(1)
        if mode == b"s":
            buf, total = bytearray(CHUNK), 0
            while n := conn.recv_into(buf):
                total += n
            conn.sendall(total.to_bytes(8, "big"))
        elif mode == b"r":
            size, data = int.from_bytes(recv_exact(conn, 8), "big"), memoryview(bytes(CHUNK))
            while size > 0:
                conn.sendall(data[: min(size, CHUNK)])
                size -= CHUNK
        elif mode == b"e":
            while b := conn.recv(1):
                conn.sendall(b)


def serve():
    server = socket.create_server(("127.0.0.1", 0))
    print(server.getsockname()[1], flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def client(mode, port, count):
    conn = socket.create_connection(("127.0.0.1", port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = time.perf_counter()
    if mode == "send":
        conn.sendall(b"s")
        data, left = memoryview(bytes(CHUNK)), count
        while left > 0:
            conn.sendall(data[: min(left, CHUNK)])
            left -= CHUNK
        conn.shutdown(socket.SHUT_WR)
        got = int.from_bytes(recv_exact(conn, 8), "big")
        figure = time.perf_counter() - start
    elif mode == "recv":
        conn.sendall(b"r" + count.to_bytes(8, "big"))
        buf, got = bytearray(CHUNK), 0
        while n := conn.recv_into(buf):
            got += n
        figure = time.perf_counter() - start
    else:
        conn.sendall(b"ex")  # one round trip before the clock starts
        recv_exact(conn, 1)
        start = time.perf_counter()
        for _ in range(count):
            conn.sendall(b"x")
            if conn.recv(1) != b"x":
                raise SystemExit("netpeer: echo lost")
        figure, got = (time.perf_counter() - start) / count * 1e6, count
    conn.close()
    if got != count:
        raise SystemExit(f"netpeer: {mode} moved {got} bytes of {count}")
    print(f"{figure:.6f}")


if sys.argv[1] == "serve":
    serve()
else:
    client(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
"""


def bench_network(
    fs: Fsys, work: Path, size_mib: int, count: int, runs: int
) -> dict[str, dict[str, float]]:
    """TCP over 127.0.0.1: a client under fsys (embedded slave), a native server."""
    script = work / "netpeer.py"
    script.write_text(NETPEER)
    server = subprocess.Popen([sys.executable, str(script), "serve"], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        port = server.stdout.readline().decode().strip()
        if not port.isdigit():
            raise RuntimeError(f"the bench's TCP server did not start: {port!r}")
        size = size_mib << 20
        loops = {"send": [sys.executable, str(script), "send", port, str(size)],
                 "recv": [sys.executable, str(script), "recv", port, str(size)],
                 "echo": [sys.executable, str(script), "echo", port, str(count)]}  # fmt: skip
        modes = [("native", None), ("fsys", ())] + ([("view", VIEW)] if fs.view else [])
        figures: dict[str, dict[str, list[float]]] = {
            name: {mode: [] for mode, _ in modes} for name in loops
        }
        for _ in range(runs):  # interleaved, so that native and fsys see the same moments
            for name, cmd in loops.items():
                for mode, options in modes:
                    under = cmd if options is None else fs.run(*cmd, options=options)
                    figures[name][mode].append(c_loop(under, timeout=120))
    finally:
        server.kill()
        server.wait()
    out: dict[str, dict[str, float]] = {}
    for name, fig in figures.items():
        unit = "us" if name == "echo" else "s"
        out[name] = {f"{mode}_{unit}": median(values) for mode, values in fig.items()}
        if name != "echo":
            for mode in fig:
                out[name][f"{mode}_MBps"] = size / out[name][f"{mode}_s"] / 1e6
    return out


def header() -> None:
    print("| measure | native | sshfs | fsys | fsys --view | note |")
    print("| --- | --- | --- | --- | --- | --- |")


def row(name: str, native: str, under: str, note: str, sshfs: str = "", view: str = "") -> None:
    print(f"| {name} | {native} | {sshfs} | {under} | {view} | {note} |", flush=True)


def seconds(value: float) -> str:
    return f"{value * 1e3:.0f} ms" if value < 1 else f"{value:.2f} s"


def ms(value: float | None) -> str:
    return "" if value is None else f"{value * 1e3:.0f} ms"


def selection(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown bench {', '.join(unknown) or repr(text)}; choose from {', '.join(BENCHES)}"
        )
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and smaller runs")
    parser.add_argument("--runs", type=int, help="runs per figure (default 5, 3 with --quick)")
    choices = ",".join(BENCHES)
    parser.add_argument("--only", type=selection, default=list(BENCHES),
                        help=f"comma-separated benches to run, of: {choices}")  # fmt: skip
    parser.add_argument("--python", default=sys.executable, help="interpreter for fsys")
    parser.add_argument("--master", help="command of the master (default: PY -m fsys.master)")
    parser.add_argument("--no-sshfs", action="store_true", help="do not measure sshfs")
    parser.add_argument("--no-view", action="store_true", help="do not measure --view")
    args = parser.parse_args()
    only: list[str] = args.only
    if shutil.which("gcc") is None and {"stat", "continued"} & set(only):
        print("bench: gcc is needed to build the C loops", file=sys.stderr)
        return 1
    runs: int = args.runs or (3 if args.quick else 5)
    python: str = args.python
    master = shlex.split(args.master) if args.master else [python, "-m", "fsys.master"]
    view = not args.no_view and os.geteuid() == 0 and os.path.exists("/dev/fuse")
    if not args.no_view and not view:
        print("bench: --view not measured: it needs root and /dev/fuse", file=sys.stderr)
    fs = Fsys(python, tuple(master), view)
    version = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    print(f"# fsys bench: {platform.node()}, Linux {platform.release()}, "
          f"{os.cpu_count()} CPUs, fsys on Python {version} ({shlex.join(master)})")  # fmt: skip
    print()
    header()
    with tempfile.TemporaryDirectory(prefix="fsys-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        sshfs: Path | None = None
        if not args.no_sshfs and {"stat", "write", "tree", "warm", "kept"} & set(only):
            sshfs = stack.enter_context(mounted(work, work / "mnt"))
        start_s: float | None = None
        if "start" in only:
            start = bench_start(fs, runs * 2)
            start_s = start["fsys_s"]
            row("start /bin/true", f"{start['native_s'] * 1e3:.1f} ms", f"{start_s * 1e3:.0f} ms",
                "whole session", view=ms(start.get("view_s")))  # fmt: skip
        if "stat" in only:
            stat = bench_stat(fs, work, 5000 if args.quick else 20000, runs, sshfs)
            note = (f"from fsys's cache, embedded slave; rooted slave {stat['fsys_rooted_us']:.1f}"
                    f" us; forwarded (--no-cache) {stat['fsys_forwarded_us']:.1f} us; "
                    "timed in the loop")  # fmt: skip
            row("stat (C loop)", f"{stat['native_us']:.2f} us", f"{stat['fsys_us']:.1f} us", note,
                f"{stat['sshfs_us']:.1f} us" if "sshfs_us" in stat else "",
                f"{stat['view_us']:.2f} us" if "view_us" in stat else "")  # fmt: skip
        if "continued" in only:
            count = 20000 if args.quick else 100000
            cont = bench_continued(fs, work, count, runs)
            for name, what in (("read", "read 1 byte (master pipe)"),
                               ("fstat", "fstat (master file)")):  # fmt: skip
                fig = cont[name]
                row(f"continued {what}", f"{fig['native_us']:.2f} us", f"{fig['fsys_us']:.1f} us",
                    f"+{fig['overhead_us']:.1f} us per call; x{count} in the loop")  # fmt: skip
        if "read" in only:
            read = bench_read(fs, work, 256 if args.quick else 1024, runs)
            steady = f"{read['fsys_MBps_without_start']:.0f} MB/s without session start"
            row(
                "read (cat)",
                f"{read['native_MBps']:.0f} MB/s",
                f"{read['fsys_MBps']:.0f} MB/s",
                steady,
                view=f"{read['view_MBps']:.0f} MB/s" if "view_MBps" in read else "",
            )
        if "write" in only:
            size_mib = 64 if args.quick else 256
            write = bench_write(fs, work, size_mib, runs, sshfs)
            row(
                f"write (dd bs=4k, {size_mib} MiB, fsync)",
                f"{write['native_MBps']:.0f} MB/s",
                f"{write['fsys_MBps']:.1f} MB/s",
                "rooted slave",
                sshfs=f"{write['sshfs_MBps']:.1f} MB/s" if "sshfs_MBps" in write else "",
                view=f"{write['view_MBps']:.1f} MB/s" if "view_MBps" in write else "",
            )
        if "memory" in only:
            mem = bench_memory(fs, work, runs)
            for label, what in MEMORY_ROWS.items():
                viewed = mem.get("view_" + label)
                row(f"peak memory, {what}", "", f"{mem['fsys_' + label]:.0f} MiB",
                    "the session's largest process (fsys-master or the slave); rooted slave",
                    view=f"{viewed:.0f} MiB" if viewed is not None else "")  # fmt: skip
        if "fork" in only:
            count = 300 if args.quick else 1000
            fork = bench_fork(fs, count, runs)
            ratio = fork["fsys_without_start_s"] / fork["native_s"]
            row(f"fork+exec x{count}", f"{fork['native_s']:.2f} s", f"{fork['fsys_s']:.2f} s",
                f"x{ratio:.1f} without session start",
                view=seconds(fork["view_s"]) if "view_s" in fork else "")  # fmt: skip
        if "make" in only:
            make = bench_make(fs, work, runs)
            if start_s is None:
                start_s = bench_start(fs, runs)["fsys_s"]
            whole = make["fsys_s"] / make["native_s"]
            steady_ratio = (make["fsys_s"] - start_s) / make["native_s"]
            row("make -j2", f"{make['native_s']:.2f} s", f"{make['fsys_s']:.2f} s",
                f"x{whole:.1f}; x{steady_ratio:.1f} without session start",
                view=seconds(make["view_s"]) if "view_s" in make else "")  # fmt: skip
        if "git" in only:
            git = bench_git(fs, work, 500 if args.quick else 2000, runs)
            if start_s is None:
                start_s = bench_start(fs, runs)["fsys_s"]
            row("git status, 2,000 files" if not args.quick else "git status, 500 files",
                f"{git['native_s'] * 1e3:.0f} ms", f"{git['fsys_s'] * 1e3:.0f} ms",
                f"x{git['fsys_s'] / git['native_s']:.0f}; "
                f"x{(git['fsys_s'] - start_s) / git['native_s']:.0f} without session start; "
                "rooted slave", view=ms(git.get("view_s")))  # fmt: skip
        if "transports" in only:
            ways = bench_transports(fs, work, 2000 if args.quick else 10000,
                                    256 if args.quick else 1024, runs)  # fmt: skip
            base = next(iter(ways.values()))
            for name, fig in ways.items():
                stat_ratio = fig["stat_us"] / base["stat_us"]
                read_ratio = fig["read_MBps"] / base["read_MBps"]
                row(f"over {name}: forwarded stat", "", f"{fig['stat_us']:.1f} us",
                    f"x{stat_ratio:.2f} stdio; rooted slave, --no-cache")  # fmt: skip
                row(f"over {name}: read (cat)", "", f"{fig['read_MBps']:.0f} MB/s",
                    f"x{read_ratio:.2f} stdio; whole session")  # fmt: skip
        if "tree" in only:
            tree = bench_tree(fs, work, runs, sshfs)
            for name, fig in tree.items():
                versus = (f"; x{fig['fsys_s'] / fig['sshfs_s']:.1f} sshfs"
                          if "sshfs_s" in fig else "")  # fmt: skip
                if "view_s" in fig:
                    versus += f"; --view x{fig['view_s'] / fig['native_s']:.1f} native"
                row(f"{name}, 5,000 files", seconds(fig["native_s"]), seconds(fig["fsys_s"]),
                    f"x{fig['fsys_s'] / fig['native_s']:.1f} native{versus}; rooted slave",
                    seconds(fig["sshfs_s"]) if "sshfs_s" in fig else "",
                    seconds(fig["view_s"]) if "view_s" in fig else "")  # fmt: skip
        if "warm" in only:
            tree = bench_warm_tree(fs, work, runs, sshfs)
            for name, fig in tree.items():
                versus = (f"; x{fig['fsys_s'] / fig['sshfs_s']:.1f} sshfs"
                          if "sshfs_s" in fig else "")  # fmt: skip
                if "view_s" in fig and "sshfs_s" in fig:
                    versus += f"; --view x{fig['view_s'] / fig['sshfs_s']:.2f} sshfs"
                row(f"{name}, warm session", seconds(fig["native_s"]), seconds(fig["fsys_s"]),
                    f"x{fig['fsys_s'] / fig['native_s']:.1f} native{versus}; one session, "
                    "each after a first run; rooted slave",
                    seconds(fig["sshfs_s"]) if "sshfs_s" in fig else "",
                    seconds(fig["view_s"]) if "view_s" in fig else "")  # fmt: skip
        if "kept" in only and not fs.view:
            print("bench: kept not measured: it needs the view (root and /dev/fuse)",
                  file=sys.stderr)  # fmt: skip
        elif "kept" in only:
            tree = bench_kept(fs, work, runs, sshfs, 256 if args.quick else 1024)
            for name, fig in tree.items():
                versus = (f"; x{fig['kept_s'] / fig['sshfs_s']:.2f} sshfs"
                          if "sshfs_s" in fig else "")  # fmt: skip
                client = (f"compiled fsys-master ({seconds(fig['python_s'])} with the Python "
                          "client)" if "python_s" in fig else "the Python client")  # fmt: skip
                row(f"{name}, kept session", seconds(fig["native_s"]), "",
                    f"--view --keep: x{fig['kept_s'] / fig['native_s']:.1f} native{versus}; "
                    f"each command whole, after a first; {client}; rooted slave",
                    seconds(fig["sshfs_s"]) if "sshfs_s" in fig else "",
                    seconds(fig["kept_s"]))  # fmt: skip
        if "network" in only:
            size_mib = 256 if args.quick else 1024
            count = 500 if args.quick else 2000
            net = bench_network(fs, work, size_mib, count, runs)
            size = "256 MiB" if args.quick else "1 GiB"

            def rate(fig: dict[str, float], mode: str) -> str:
                if f"{mode}_s" not in fig:
                    return ""
                return f"{fig[mode + '_MBps']:.0f} MB/s ({seconds(fig[mode + '_s'])})"

            for name, what in (("send", f"TCP send {size} to a sink"),
                               ("recv", f"TCP receive {size} from a source")):  # fmt: skip
                fig = net[name]
                row(what, rate(fig, "native"), rate(fig, "fsys"),
                    f"x{fig['fsys_MBps'] / fig['native_MBps']:.2f} native; 127.0.0.1, Python "
                    "client under fsys (embedded slave), server native; timed in the client",
                    view=rate(fig, "view"))  # fmt: skip
            echo = net["echo"]
            row("TCP ping-pong, 1 byte", f"{echo['native_us']:.1f} us",
                f"{echo['fsys_us']:.0f} us",
                f"+{echo['fsys_us'] - echo['native_us']:.0f} us per round trip; x{count} in the "
                "loop, TCP_NODELAY; echo server native",
                view=f"{echo['view_us']:.1f} us" if "view_us" in echo else "")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
