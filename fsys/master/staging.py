"""Staging: running a file that lives only on the slave.

The kernel executes only what it finds on the master, and a trapped execve cannot be
given another path: fmhub may only answer it or continue it. So fmhub makes the
name the program passed resolve, on the master, to a copy of the slave file:

- a process whose current directory is on the slave has, as its real (kernel)
  current directory, the session's *stage directory* ``cwd``: the launcher starts
  the program there when it starts in a slave directory, children inherit it, and
  a chdir into a slave directory is answered by fmhub without moving it;
- a relative name (``./configure.sh``, ``tools/run``) is therefore resolved by the
  kernel inside the stage directory, where fmhub writes the copy before continuing
  the execve. ``cwd`` is nested a few levels deep in the session's stage tree so
  that ``../x`` stays inside it;
- an absolute name (``/proj/run``) is turned into a relative one by overwriting its
  first byte in the program's memory (``.proj/run``, the same length), and the copy
  is written there. A script run that way is staged as a small /bin/sh wrapper that
  execs its interpreter on the original path, so the interpreter reads the script
  from the slave under its real name, as it would natively.

A relative script whose interpreter is the master's needs no wrapper: the kernel
hands the interpreter the name the program used, and that name, opened by the
interpreter, goes to the slave; one whose interpreter is a slave file gets the
wrapper too (its exec of the interpreter is staged in turn). A slave symlink that
leads to a master path (a venv's ``bin/python``) is staged as a symlink to it. Copies
are cached by the slave file's identity (device, inode, size, mtime).
"""

from __future__ import annotations

import errno
import os
import posixpath
import shlex
import tempfile

from fsys.errors import Errno

DEPTH = 8


class Stage:
    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="fsys-stage-").encode()
        self.cwd = self.base + b"/c" * DEPTH
        os.makedirs(self.cwd)
        self._cache: dict[bytes, tuple[int, ...]] = {}
        self._wrappers: set[bytes] = set()

    def place(self, name: bytes) -> bytes:
        """Where the kernel will look for ``name`` from the stage directory."""
        path = posixpath.normpath(self.cwd + b"/" + name)
        if not path.startswith(self.base + b"/c"):
            raise Errno(errno.ENOEXEC)  # more ".." than the stage is deep
        return path

    def current(self, path: bytes, identity: tuple[int, ...]) -> bool:
        """True if ``path`` already holds the copy of the slave file ``identity``."""
        return self._cache.get(path) == identity and os.path.exists(path)

    def is_wrapper(self, path: bytes) -> bool:
        return path in self._wrappers

    def write(self, path: bytes, content: bytes, mode: int, identity: tuple[int, ...]) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temp = path + b".fsys-tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o700)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.chmod(temp, (mode & 0o7777) | 0o500)
        os.rename(temp, path)  # atomic: a concurrent exec sees the old copy or the new
        self._cache[path] = identity
        if content.startswith(WRAPPER_HEAD):
            self._wrappers.add(path)
        else:
            self._wrappers.discard(path)

    def link(self, path: bytes, target: bytes) -> None:
        """``path`` becomes a symlink to the master file ``target``."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temp = path + b".fsys-tmp"
        if os.path.lexists(temp):
            os.unlink(temp)
        os.symlink(target, temp)
        os.rename(temp, path)
        self._cache.pop(path, None)
        self._wrappers.discard(path)

    def close(self) -> None:
        import shutil  # only at the end: start-up time

        shutil.rmtree(self.base, ignore_errors=True)


def shebang(content: bytes) -> tuple[bytes, bytes | None] | None:
    """(interpreter, optional argument) of a ``#!`` line, as the kernel splits it."""
    if not content.startswith(b"#!"):
        return None
    line = content[2:].split(b"\n", 1)[0].strip(b" \t")
    if not line:
        return None
    parts = line.split(None, 1)
    return parts[0], (parts[1].strip(b" \t") if len(parts) > 1 else None)


WRAPPER_HEAD = b"#!/bin/sh\n# fsys staging wrapper\n"


def wrapper(interpreter: bytes, argument: bytes | None, script: bytes) -> bytes:
    """A /bin/sh script that runs ``interpreter [argument] script "$@"``."""
    words = [interpreter, *([argument] if argument is not None else []), script]
    quoted = " ".join(shlex.quote(os.fsdecode(w)) for w in words)
    return WRAPPER_HEAD + f'exec {quoted} "$@"\n'.encode("utf-8", "surrogateescape")
