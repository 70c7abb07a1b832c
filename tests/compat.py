"""CPython's own regression tests, natively and under fsys (``nox -s compat``).

Each module of the interpreter's ``test`` package runs twice with the same
interpreter: natively in a fresh directory, and under fsys-master against a slave
rooted in a fresh box (holding copies of /etc/passwd, group and hosts, as a slave
machine has), with the working directory and TMPDIR on the slave. Every
test that passes natively must pass under fsys, except the ones docs/limits.md
names (its table "CPython's tests that differ under fsys", with a reason each).
Prints one markdown table: module | native pass/fail/skip | fsys pass/fail/skip,
then each unexpected difference; exits 1 if there is one.

    python tests/compat.py [--timeout S] [MODULE...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODULES = [
    "test_os", "test_shutil", "test_tempfile", "test_pathlib", "test_glob", "test_fileio",
    "test_posixpath", "test_io", "test_zipfile", "test_tarfile", "test_sqlite3", "test_mmap",
    "test_fcntl", "test_subprocess", "test_stat",
    # The slave's network (test_socket itself runs past 500 s natively here: left out).
    "test_selectors", "test_socketserver", "test_asyncio.test_sock_lowlevel",
    "test_asyncio.test_streams", "test_asyncio.test_sendfile",
]  # fmt: skip

ROOT = Path(__file__).resolve().parent.parent
LIMITS = ROOT / "docs" / "limits.md"
MARK = "@@fsys-compat@@ "

# Runs one test module with unittest and prints each test's outcome, as JSON, on the
# last line of stdout (the tests' own output goes to stderr).
RUNNER = r"""
import importlib, json, sys, unittest
name = sys.argv[1]
outcomes = {}
class Result(unittest.TextTestResult):
    def addSuccess(self, test):
        super().addSuccess(test); outcomes[test.id()] = "pass"
    def addFailure(self, test, err):
        super().addFailure(test, err); outcomes[test.id()] = "fail"
    def addError(self, test, err):
        super().addError(test, err); outcomes[str(getattr(test, "id", lambda: test)())] = "fail"
    def addSkip(self, test, reason):
        super().addSkip(test, reason); outcomes[test.id()] = "skip"
    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err); outcomes[test.id()] = "pass"
    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test); outcomes[test.id()] = "fail"
    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            outcomes[test.id()] = "fail"
from test import support
support.verbose = False
try:
    module = importlib.import_module("test." + name)
    suite = unittest.defaultTestLoader.loadTestsFromModule(module)
    unittest.TextTestRunner(stream=sys.stderr, resultclass=Result, verbosity=1).run(suite)
except unittest.SkipTest as exc:
    outcomes[name] = "skip"
sys.stdout.flush()
print("@@fsys-compat@@ " + json.dumps(outcomes), flush=True)
"""


def known_differences() -> dict[str, str]:
    """test id (or a prefix ending in '*') -> reason, from docs/limits.md's table."""
    known: dict[str, str] = {}
    text = LIMITS.read_text()
    section = text.split("## CPython's tests that differ under fsys", 1)
    if len(section) < 2:
        return known
    for line in section[1].split("\n## ", 1)[0].splitlines():
        match = re.match(r"\|\s*`([^`]+)`\s*\|\s*(.+?)\s*\|\s*$", line)
        if match:
            known[match.group(1)] = match.group(2)
    return known


def explained(test: str, known: dict[str, str]) -> bool:
    return any(
        test == pattern or (pattern.endswith("*") and test.startswith(pattern[:-1]))
        for pattern in known
    )


def run(
    cmd: list[str], cwd: Path, env: dict[str, str], timeout: float
) -> tuple[dict[str, str], str]:
    try:
        done = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
            errors="replace", check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {}, f"timed out after {timeout:.0f} s"
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MARK):
            outcomes: dict[str, str] = json.loads(line[len(MARK) :])
            return outcomes, ""
    return {}, f"exit {done.returncode}: " + done.stderr[-2000:]


def counts(outcomes: dict[str, str]) -> str:
    values = list(outcomes.values())
    return f"{values.count('pass')}/{values.count('fail')}/{values.count('skip')}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", default=MODULES)
    parser.add_argument("--timeout", type=float, default=900.0, help="per module and side")
    parser.add_argument(
        "--python", default=getattr(sys, "_base_executable", sys.executable),
        help="the interpreter whose test package runs (a master binary)",
    )  # fmt: skip
    args = parser.parse_args()
    python = os.path.realpath(args.python)
    prefix = subprocess.run(
        [python, "-c", "import sys; print(sys.base_prefix)"], capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip
    master = [sys.executable, "-m", "fsys.master"]
    slave = [sys.executable, "-m", "fsys.slave"]
    known = known_differences()
    print(f"# CPython's tests under fsys: {python} (its stdlib at {prefix} is the master's)\n")
    print("| module | native pass/fail/skip | fsys pass/fail/skip | seconds native / fsys |")
    print("| --- | --- | --- | --- |")
    unexpected: list[str] = []
    for module in args.modules:
        with tempfile.TemporaryDirectory(prefix="fsys-compat-") as scratch:
            here = Path(scratch) / "native"
            box = Path(scratch) / "box"
            for d in (here / "tmp", box / "tmp", box / "work", box / "etc"):
                d.mkdir(parents=True)
            for name in ("passwd", "group", "hosts"):  # the slave machine's, as a slave has
                shutil.copy(f"/etc/{name}", box / "etc" / name)
            env = dict(os.environ, TMPDIR=str(here / "tmp"))
            start = time.monotonic()
            native, why_native = run([python, "-c", RUNNER, module], here, env, args.timeout)
            native_s = time.monotonic() - start
            root = shlex.join([*slave, "serve", "--stdio", "--root", str(box)])
            program = ["/bin/sh", "-c", 'cd /work && exec "$@"', "sh", python, "-c", RUNNER, module]
            cmd = [*master, "run", "--slave", root, "--local", prefix, "--", *program]
            env = dict(os.environ, TMPDIR="/tmp")
            start = time.monotonic()
            under, why_under = run(cmd, here, env, args.timeout)
            under_s = time.monotonic() - start
        times = f"{native_s:.1f} / {under_s:.1f}"
        print(f"| {module} | {counts(native)} | {counts(under)} | {times} |", flush=True)
        for why, side in ((why_native, "native"), (why_under, "fsys")):
            if why:
                unexpected.append(f"{module} ({side}): {why}")
        for test, outcome in sorted(native.items()):
            if outcome == "pass" and under.get(test) != "pass" and not explained(test, known):
                unexpected.append(f"{test}: native pass, fsys {under.get(test, 'missing')}")
    if unexpected:
        print("\nUnexpected under fsys (not in docs/limits.md):\n")
        for line in unexpected:
            print(f"- {line}")
        return 1
    print("\nEvery test that passes natively passes under fsys, or docs/limits.md says why not.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
