"""The program to run, found as execvp would find it, and the error of a start.

Its own module, light on imports: ``fsys-master run --keep`` finds the program
before it hands it to a kept session, and loads no more than it needs
(fsys.master.keeping).
"""

from __future__ import annotations

import os

from fsys.errors import FsysError

__all__ = ["LaunchError", "resolve_program"]


class LaunchError(FsysError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def resolve_program(name: str, env: dict[str, str]) -> str:
    """The master path of the program to run, as execvp would find it."""
    if "/" in name:
        if not os.path.exists(name):
            raise LaunchError(f"{name}: No such file or directory", 127)
        if os.path.isdir(name) or not os.access(name, os.X_OK):
            raise LaunchError(f"{name}: Permission denied", 126)
        return os.path.abspath(name)
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return os.path.abspath(candidate)
    raise LaunchError(f"{name}: command not found", 127)
