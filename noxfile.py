"""nox is the front door: ``nox -s tests``, ``nox -s lint mypy``, ``nox -s bench``."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "mypy", "tests"]
nox.options.reuse_existing_virtualenvs = True

TEST_DEPS = ["pytest>=8", "pytest-trio>=0.8", "hypothesis>=6.100"]
LINT_DEPS = ["ruff>=0.6"]


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


@nox.session
def bench(session: nox.Session) -> None:
    """Speed, side by side in one run: fsys vs native (vs sshfs-style alternatives)."""
    session.install(".")
    session.run("python", "bench/run.py", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Regenerate docs/syscalls.md from the table."""
    session.install(".")
    with open("docs/syscalls.md", "w") as out:
        session.run("fsys-master", "syscalls", "--markdown", stdout=out)
