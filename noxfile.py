"""nox is the front door: ``nox -s tests``, ``nox -s lint mypy``, ``nox -s bench``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tomllib
from pathlib import Path

import nox

nox.options.sessions = ["lint", "mypy", "tests"]
nox.options.reuse_existing_virtualenvs = True

TEST_DEPS = ["pytest>=8", "pytest-trio>=0.8", "hypothesis>=6.100"]
LINT_DEPS = ["ruff>=0.6"]
# Pinned: the mutants session sets mutmut's configuration from Python (see MUTMUT_DRIVER).
MUTMUT = "mutmut==3.8.1"


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite: protocol, hubs, and real programs end to end."""
    session.install(".", *TEST_DEPS)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install(*LINT_DEPS)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def mypy(session: nox.Session) -> None:
    session.install(".", "mypy>=1.10", "nox", *TEST_DEPS)
    session.run("mypy")


#: What the bench compares fsys with: sshfs through a loopback sshd (bench/sshfs.py).
BENCH_PACKAGES = ("sshfs", "openssh-server")


@nox.session
def bench(session: nox.Session) -> None:
    """Speed, side by side in one run: fsys vs native vs sshfs."""
    session.install(".")
    if shutil.which("sshfs") is None or not os.path.exists("/usr/sbin/sshd"):
        if os.geteuid() == 0 and shutil.which("apt-get"):
            env = {"DEBIAN_FRONTEND": "noninteractive"}
            session.run("apt-get", "install", "-y", "-q", *BENCH_PACKAGES,
                        external=True, env=env, success_codes=[0, 100])  # fmt: skip
        else:
            session.log(f"sshfs not measured: install {' '.join(BENCH_PACKAGES)}")
    session.run("python", "bench/run.py", *session.posargs)


@nox.session
def compat(session: nox.Session) -> None:
    """CPython's own regression tests natively and under fsys, side by side (several
    minutes: not part of the default run). ``nox -s compat -- test_os test_io``."""
    session.install(".")
    session.run("python", "tests/compat.py", *session.posargs)


@nox.session
def fuzz(session: nox.Session) -> None:
    """A hostile peer, at length: tests/test_fuzz.py's properties, 35,000 examples each
    (over 100,000 cases; a few minutes). ``nox -s fuzz -- N`` for N each."""
    session.install(".", *TEST_DEPS)
    examples = session.posargs[0] if session.posargs else "35000"
    session.run("pytest", "-q", "tests/test_fuzz.py", env={"FSYS_FUZZ_EXAMPLES": examples})


@nox.session
def docs(session: nox.Session) -> None:
    """Regenerate docs/syscalls.md from the table."""
    session.install(".")
    with open("docs/syscalls.md", "w") as out:
        session.run("fsys-master", "syscalls", "--markdown", stdout=out)


# Named sets for `nox -s mutants -- NAME`: the files to mutate and the fast tests that
# must kill their mutants. With no argument (and no FSYS_MUTANTS), the set is the one
# in pyproject.toml's [tool.mutmut] (only_mutate, pytest_add_cli_args_test_selection):
# fsys/master/{calls,processes,routing}.py against tests/test_{handlers,
# processes_model,routing,pages,cache,net_handlers}.py.
MUTANT_SETS: dict[str, tuple[list[str], list[str]]] = {
    "protocol": (["fsys/protocol.py"], ["tests/test_protocol.py"]),
    "pages": (["fsys/master/pages.py"], ["tests/test_pages.py"]),
    "net": (
        [
            "fsys/master/net.py",
            "fsys/master/streams.py",
            "fsys/slave/network.py",
            "fsys/slave/waits.py",
        ],
        ["tests/test_net_handlers.py", "tests/test_socket_pumps.py"],
    ),
    "cache": (["fsys/master/cache.py", "fsys/slave/watches.py"], ["tests/test_cache.py"]),
    "service": (
        ["fsys/auth.py", "fsys/address.py", "fsys/slave/confinement.py"],
        ["tests/test_auth.py", "tests/test_confinement.py"],
    ),
}

# mutmut reads its configuration from pyproject.toml alone: this runs mutmut's command
# line with the chosen set in place of [tool.mutmut]'s (the processes it forks keep it).
MUTMUT_DRIVER = """\
import json, os, sys
from mutmut.configuration import config
from mutmut.__main__ import cli

cfg = config()
cfg.only_mutate = json.loads(os.environ["FSYS_MUTANTS_SOURCES"])
cfg.pytest_add_cli_args_test_selection = json.loads(os.environ["FSYS_MUTANTS_TESTS"])
command, *args = sys.argv[1:]
if command == "show":  # any number of mutants, in one process
    for name in args:
        cli(["show", name], "mutmut", standalone_mode=False)
else:
    cli([command, *args], "mutmut")
"""


def _mutant_set(session: nox.Session) -> tuple[list[str], list[str]]:
    """The files to mutate and the tests, from the arguments or FSYS_MUTANTS."""
    words = session.posargs or os.environ.get("FSYS_MUTANTS", "").split()
    if not words:
        with open("pyproject.toml", "rb") as f:
            config = tomllib.load(f)["tool"]["mutmut"]
        return list(config["only_mutate"]), list(config["pytest_add_cli_args_test_selection"])
    sources: list[str] = []
    tests: list[str] = []
    for word in words:
        if word in MUTANT_SETS:
            sources += MUTANT_SETS[word][0]
            tests += MUTANT_SETS[word][1]
        elif word.startswith("tests/"):
            tests.append(word)
        elif word.startswith("fsys/") and word.endswith(".py"):
            sources.append(word)
        else:
            session.error(
                f"{word!r} is neither a set ({', '.join(MUTANT_SETS)}), "
                "nor a file fsys/....py to mutate, nor a test under tests/"
            )
    if not sources or not tests:
        session.error("give at least one file to mutate and one test, or the name of a set")
    return sources, tests


def _digest(sources: list[str]) -> str:
    """A digest of what the mutants' results depend on, less the mutated files."""
    tops = ["fsys", "kmod", "tests", "docs"]  # fsys/kmod is a link: rglob does not follow it
    files = {p for top in tops for p in Path(top).rglob("*") if p.is_file()}
    files.add(Path("pyproject.toml"))
    files -= {Path(source) for source in sources}
    digest = hashlib.sha256()
    for path in sorted(p for p in files if "__pycache__" not in p.parts):
        data = path.read_bytes()
        digest.update(f"{path}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


@nox.session
def mutants(session: nox.Session) -> None:
    """Mutation testing with mutmut: the score and the surviving mutants, as a report.

    ``nox -s mutants`` runs the set in pyproject.toml's [tool.mutmut];
    ``nox -s mutants -- protocol`` (or FSYS_MUTANTS=protocol) a set of MUTANT_SETS;
    ``nox -s mutants -- fsys/protocol.py tests/test_protocol.py`` any files and tests.
    Results are kept in ./mutants/ for the next run of the same set.
    """
    sources, tests = _mutant_set(session)
    missing = [path for path in sources + tests if not Path(path.partition("::")[0]).exists()]
    if missing:
        session.error(f"not written yet: {' '.join(missing)} (try: nox -s mutants -- protocol)")
    session.install(".", *TEST_DEPS, MUTMUT)

    # ./mutants/ holds mutmut's results, which it keeps for the mutants of unchanged
    # functions. They are only valid for the set that made them (a file mutated, then
    # copied unmutated for another set, would be taken for mutated still), and with the
    # same tests and unmutated code: mutmut retests no cached survivor when a test improves.
    work = Path("mutants")
    chosen = {"sources": sorted(sources), "tests": sorted(tests), "inputs": _digest(sources)}
    stamp = work / "fsys-mutant-set.json"
    if work.exists() and (not stamp.exists() or json.loads(stamp.read_text()) != chosen):
        session.log(f"removing {work}/: another set, or the tests or unmutated code changed")
        shutil.rmtree(work)
    work.mkdir(exist_ok=True)
    (work / ".gitignore").write_text("*\n")  # mutmut's own git look-ups skip it too
    stamp.write_text(json.dumps(chosen))

    driver = Path(session.create_tmp()) / "mutmut_driver.py"
    driver.write_text(MUTMUT_DRIVER)
    env = {"FSYS_MUTANTS_SOURCES": json.dumps(sources), "FSYS_MUTANTS_TESTS": json.dumps(tests)}

    def mutmut(*args: str, silent: bool = False, log: bool = True) -> str:
        out = session.run("python", str(driver), *args, env=env, silent=silent, log=log)
        return out if isinstance(out, str) else ""

    mutmut("run")
    mutmut("export-cicd-stats", silent=True)
    counts: dict[str, int] = json.loads((work / "mutmut-cicd-stats.json").read_text())
    lines = [line.strip() for line in mutmut("results", silent=True).splitlines()]
    survivors = [line.rpartition(":")[0] for line in lines if line.endswith(": survived")]
    others = [line for line in lines if ": " in line and not line.endswith(": survived")]
    diffs = work / "survivors.diff"
    session.log(f"mutmut show (each surviving mutant) > {diffs}")
    diffs.write_text(mutmut("show", *survivors, silent=True, log=False) if survivors else "")

    print(f"\nMutants of {' '.join(sources)}, against {' '.join(tests)}:")
    print(f"surviving: {len(survivors)} (their diffs: {diffs})")
    print("".join(f"    {name}\n" for name in survivors), end="")
    if others:
        print(f"neither killed nor surviving: {len(others)}")
        print("".join(f"    {line}\n" for line in others), end="")
    killed, total = counts["killed"], counts["total"]
    rest = ", ".join(f"{key} {counts[key]}" for key in ("survived", "timeout", "no_tests"))
    score = f" = {100 * killed / total:.1f}%" if total else ""
    print(f"mutation score: killed {killed} / total {total}{score} ({rest})")
