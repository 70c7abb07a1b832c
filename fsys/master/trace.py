"""``fsys-master run --trace``: one strace-like line per forwarded call.

    [4242] openat(AT_FDCWD, "/a/b/f", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 3 <slave 41us>

pid (the caller's tid), the call with its decoded arguments, the result or
``-1 ERRNO (message)``, the side that performed it (``slave``; ``hub`` for calls
fmhub answered itself; ``master`` for calls continued natively, shown only with
``--trace-all``), and the microseconds fmhub spent on it.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, TextIO

from fsys import linux

if TYPE_CHECKING:
    from fsys.master.fmhub import Trapped, _Continue

_O_FLAGS = [
    (0o100, "O_CREAT"), (0o200, "O_EXCL"), (0o400, "O_NOCTTY"), (0o1000, "O_TRUNC"),
    (0o2000, "O_APPEND"), (0o4000, "O_NONBLOCK"), (0o10000, "O_DSYNC"), (0o40000, "O_DIRECT"),
    (0o200000, "O_DIRECTORY"), (0o400000, "O_NOFOLLOW"), (0o1000000, "O_NOATIME"),
    (0o2000000, "O_CLOEXEC"), (0o4010000, "O_SYNC"), (0o10000000, "O_PATH"),
    (0o20000000, "O_TMPFILE"),
]  # fmt: skip
_AT_FLAGS = [
    (0x100, "AT_SYMLINK_NOFOLLOW"), (0x200, "AT_REMOVEDIR"), (0x400, "AT_SYMLINK_FOLLOW"),
    (0x800, "AT_NO_AUTOMOUNT"), (0x1000, "AT_EMPTY_PATH"),
]  # fmt: skip

# Argument kinds by position, for the calls fmhub handles.
SIGNATURES: dict[str, tuple[str, ...]] = {
    "read": ("fd", "ptr", "int"), "write": ("fd", "ptr", "int"),
    "pread64": ("fd", "ptr", "int", "int"), "pwrite64": ("fd", "ptr", "int", "int"),
    "readv": ("fd", "ptr", "int"), "writev": ("fd", "ptr", "int"),
    "preadv": ("fd", "ptr", "int", "int"), "pwritev": ("fd", "ptr", "int", "int"),
    "preadv2": ("fd", "ptr", "int", "int", "int", "hex"),
    "pwritev2": ("fd", "ptr", "int", "int", "int", "hex"),
    "open": ("path", "oflags", "mode"), "creat": ("path", "mode"),
    "openat": ("dirfd", "path", "oflags", "mode"), "openat2": ("dirfd", "path", "ptr", "int"),
    "lseek": ("fd", "int", "int"), "fstat": ("fd", "ptr"), "stat": ("path", "ptr"),
    "lstat": ("path", "ptr"), "newfstatat": ("dirfd", "path", "ptr", "atflags"),
    "statx": ("dirfd", "path", "atflags", "hex", "ptr"), "getdents64": ("fd", "ptr", "int"),
    "access": ("path", "mode"), "faccessat": ("dirfd", "path", "mode"),
    "faccessat2": ("dirfd", "path", "mode", "atflags"),
    "readlink": ("path", "ptr", "int"), "readlinkat": ("dirfd", "path", "ptr", "int"),
    "mkdir": ("path", "mode"), "mkdirat": ("dirfd", "path", "mode"),
    "mknod": ("path", "mode", "hex"), "mknodat": ("dirfd", "path", "mode", "hex"),
    "rmdir": ("path",), "unlink": ("path",), "unlinkat": ("dirfd", "path", "atflags"),
    "rename": ("path", "path"), "renameat": ("dirfd", "path", "dirfd", "path"),
    "renameat2": ("dirfd", "path", "dirfd", "path", "hex"),
    "link": ("path", "path"), "linkat": ("dirfd", "path", "dirfd", "path", "atflags"),
    "symlink": ("ptr", "path"), "symlinkat": ("ptr", "dirfd", "path"),
    "chmod": ("path", "mode"), "fchmod": ("fd", "mode"), "fchmodat": ("dirfd", "path", "mode"),
    "fchmodat2": ("dirfd", "path", "mode", "atflags"),
    "chown": ("path", "int", "int"), "lchown": ("path", "int", "int"),
    "fchown": ("fd", "int", "int"), "fchownat": ("dirfd", "path", "int", "int", "atflags"),
    "truncate": ("path", "int"), "ftruncate": ("fd", "int"),
    "fsync": ("fd",), "fdatasync": ("fd",), "syncfs": ("fd",),
    "utimensat": ("dirfd", "path", "ptr", "atflags"), "utime": ("path", "ptr"),
    "utimes": ("path", "ptr"), "futimesat": ("dirfd", "path", "ptr"),
    "statfs": ("path", "ptr"), "fstatfs": ("fd", "ptr"),
    "fcntl": ("fd", "int", "hex"), "flock": ("fd", "int"), "ioctl": ("fd", "hex", "hex"),
    "fallocate": ("fd", "int", "int", "int"), "fadvise64": ("fd", "int", "int", "int"),
    "copy_file_range": ("fd", "ptr", "fd", "ptr", "int", "int"),
    "sendfile": ("fd", "fd", "ptr", "int"),
    "getxattr": ("path", "ptr", "ptr", "int"), "lgetxattr": ("path", "ptr", "ptr", "int"),
    "fgetxattr": ("fd", "ptr", "ptr", "int"), "listxattr": ("path", "ptr", "int"),
    "llistxattr": ("path", "ptr", "int"), "flistxattr": ("fd", "ptr", "int"),
    "setxattr": ("path", "ptr", "ptr", "int", "int"),
    "lsetxattr": ("path", "ptr", "ptr", "int", "int"),
    "fsetxattr": ("fd", "ptr", "ptr", "int", "int"),
    "removexattr": ("path", "ptr"), "lremovexattr": ("path", "ptr"),
    "fremovexattr": ("fd", "ptr"),
    "chdir": ("path",), "fchdir": ("fd",), "getcwd": ("ptr", "int"), "umask": ("mode",),
    "execve": ("path", "ptr", "ptr"), "execveat": ("dirfd", "path", "ptr", "ptr", "atflags"),
    "mmap": ("ptr", "int", "hex", "hex", "fd", "int"), "epoll_ctl": ("fd", "int", "fd", "ptr"),
}  # fmt: skip


def _flags(value: int, names: list[tuple[int, str]], base: str = "") -> str:
    parts = [base] if base else []
    for bit, name in names:
        if value & bit == bit and bit:
            parts.append(name)
            value &= ~bit
    if value:
        parts.append(hex(value))
    return "|".join(parts) or "0"


def _quote(path: bytes) -> str:
    text = path.decode("utf-8", "backslashreplace").replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def format_result(outcome: int | _Continue) -> str:
    if not isinstance(outcome, int):
        return "? (native)"
    if outcome >= 0:
        return str(outcome)
    name = errno.errorcode.get(-outcome, str(-outcome))
    return f"-1 {name} ({os.strerror(-outcome)})"


def format_call(call: Trapped) -> str:
    notif = call.notif
    name = call.syscall.name
    kinds = SIGNATURES.get(name, ("hex",) * 3)
    shown = iter(t.shown for t in call.targets)
    args: list[str] = []
    for i, kind in enumerate(kinds):
        raw = notif.args[i]
        value = notif.arg_int(i)
        if kind == "path":
            path = next(shown, None)
            args.append(_quote(path) if path is not None else hex(raw))
        elif kind == "dirfd":
            args.append("AT_FDCWD" if value == linux.AT_FDCWD else str(value))
        elif kind == "oflags":
            base = ("O_RDONLY", "O_WRONLY", "O_RDWR", "O_ACCMODE")[value & 3]
            args.append(_flags(value & ~3, _O_FLAGS, base))
        elif kind == "atflags":
            args.append(_flags(value, _AT_FLAGS))
        elif kind == "mode":
            args.append(f"0{value & 0o7777:o}" if value & ~0o7777 == 0 else f"{value:#o}")
        elif kind in ("fd", "int"):
            args.append(str(notif.arg_long(i) if kind == "int" else value))
        else:
            args.append(hex(raw))
    return f"{name}({', '.join(args)})"


class Tracer:
    def __init__(self, out: TextIO, *, all: bool = False) -> None:
        self.out = out
        self.all = all

    def summary(self, counters: dict[str, int]) -> None:
        items = ", ".join(f"{value} {name.replace('_', ' ')}" for name, value in counters.items())
        self.out.write(f"fsys-master: session ended: {items}\n")
        self.out.flush()

    def line(self, call: Trapped, outcome: int | _Continue, micros: int) -> None:
        note = f" {call.note}" if call.note else ""
        self.out.write(
            f"[{call.notif.tid}] {format_call(call)} = {format_result(outcome)}"
            f" <{call.side}{note} {micros}us>\n"
        )
        self.out.flush()
