"""What a slave refuses to do for a session, beyond keeping it inside its root.

Theory of operation. The executor passes each operation through ``Confinement.check``
before it runs it; ``check`` answers with the operation to run (the same one, or one
with its mode's setuid and setgid bits taken out) or raises OSError with the errno
the program gets:

- ``read_only``: EROFS for every operation that would change the file system (what
  a read-only mount refuses): a name made, removed or moved, a mode, owner, time or
  extended attribute set, an open that writes, truncates or creates. Writes through
  handles need no check: no handle that could write a file is ever opened. Devices,
  FIFOs and sockets may be opened for writing, as on a read-only mount, and the
  lent streams (the slave's terminal) are not the file system either.
- ``no_setuid``: no file is made or kept setuid or setgid, and no device node or
  file capability is made, by any forwarded call, so a program may not leave behind
  a file that gives whoever runs it outside fsys the slave's privileges. The bits are
  taken out of the modes of open(O_CREAT), mkdir, mknod and chmod, silently, as the
  kernel itself drops a setgid bit a caller may not set (a directory keeps its setgid
  bit: it only makes new files take the directory's group); mknod of a block or
  character device and setting ``security.capability`` fail with EPERM, as for a
  process without CAP_MKNOD or CAP_SETFCAP; a hard link to a setuid or setgid file
  fails with EPERM (``Executor.op_link``). A slave running as root also gives up
  CAP_FSETID, CAP_MKNOD and CAP_SETFCAP (``drop_privileges``), so that the kernel
  clears the bits of a setuid file that a forwarded write changes, as it does for
  everyone without CAP_FSETID. On by default for a slave that runs as root.
- ``max_handles``: EMFILE for an open beyond that many of the session's handles.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import Any

from fsys import linux
from fsys import protocol as wire

#: The bits no_setuid takes out of every mode a call sets.
PRIVILEGE_BITS = stat.S_ISUID | stat.S_ISGID
#: Extended attributes that give privileges to whoever runs the file.
PRIVILEGE_XATTRS = frozenset({b"security.capability"})
#: The capabilities a root slave gives up with no_setuid (linux/capability.h).
CAP_FSETID, CAP_MKNOD, CAP_SETFCAP = 4, 27, 31
#: At most this many handles per session unless the slave is told otherwise.
MAX_HANDLES = 16384

#: Operations that change the file system whatever their arguments.
_WRITING: frozenset[type] = frozenset(
    {wire.Mkdir, wire.Mknod, wire.Unlink, wire.Rename, wire.Link, wire.Symlink, wire.Chmod,
     wire.Chown, wire.Truncate, wire.Utimens, wire.Setxattr, wire.Removexattr}
)  # fmt: skip
_DEVICES = (stat.S_IFBLK, stat.S_IFCHR)


@dataclass(frozen=True)
class Confinement:
    read_only: bool = False
    no_setuid: bool = False
    max_handles: int = MAX_HANDLES

    @property
    def checks(self) -> bool:
        """Whether ``check`` may change or refuse anything."""
        return self.read_only or self.no_setuid

    def mode_bits(self, mode: int, *, directory: bool) -> int:
        """``mode`` as no_setuid lets it be set: no setuid bit; no setgid bit but on a
        directory (where it only makes new files take the directory's group)."""
        if not self.no_setuid:
            return mode
        return mode & ~(stat.S_ISUID if directory else PRIVILEGE_BITS)

    def check(self, op: Any) -> Any:
        """``op`` as it may run, or OSError (EROFS, EPERM)."""
        kind = type(op)
        # An open that writes or creates depends on what is there: the executor checks
        # it (Executor._read_only_open).
        if self.read_only and kind in _WRITING:
            raise OSError(errno.EROFS, "the slave is read-only")
        if not self.no_setuid:
            return op
        if kind is wire.Open:
            if op.flags & os.O_CREAT or op.flags & linux.O_TMPFILE == linux.O_TMPFILE:
                mode = self.mode_bits(op.mode, directory=False)
                return op._make((op.dir, op.flags, mode, op.resolve, op.path))
        elif kind is wire.Create:
            mode = self.mode_bits(op.mode, directory=False)
            return op._make((op.dir, op.flags, mode, op.resolve, op.mask, op.path))
        elif kind is wire.Mkdir:
            return op._make((op.dir, self.mode_bits(op.mode, directory=True), op.path))
        elif kind is wire.Mknod:
            if stat.S_IFMT(op.mode) in _DEVICES:
                raise OSError(errno.EPERM, "no device nodes from this slave (--allow-setuid)")
            return op._make((op.dir, self.mode_bits(op.mode, directory=False), op.dev, op.path))
        elif kind is wire.Setxattr and op.name in PRIVILEGE_XATTRS:
            raise OSError(errno.EPERM, "no file capabilities from this slave (--allow-setuid)")
        # (chmod: the executor, which knows whether it sets a directory's mode)
        return op


def privileged(mode: int) -> bool:
    """Whether a file of ``mode`` gives privileges to whoever runs it: setuid, or
    setgid and executable by its group (setgid without it marks mandatory locking)."""
    if not stat.S_ISREG(mode):
        return False
    return bool(mode & stat.S_ISUID) or (mode & (stat.S_ISGID | stat.S_IXGRP)) == (
        stat.S_ISGID | stat.S_IXGRP
    )


def drop_privileges() -> None:
    """Give up CAP_FSETID, CAP_MKNOD and CAP_SETFCAP for good (a root slave with
    no_setuid), before any thread starts: threads inherit what they start with."""
    linux.drop_capabilities((CAP_FSETID, CAP_MKNOD, CAP_SETFCAP))
