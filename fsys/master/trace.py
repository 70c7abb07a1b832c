"""``fsys-master run --trace``: one strace-like line per forwarded call.

    [4242] openat(AT_FDCWD, "/a/b/f", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 3 <slave 41us>

pid (the caller's tid), the call with its decoded arguments, the result or
``-1 ERRNO (message)``, the side that performed it (``slave``; ``hub`` for calls
fmhub answered itself; ``cache`` for an answer from the attribute cache;
``master`` for calls continued natively, shown only with ``--trace-all``), and the
microseconds fmhub spent on it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Protocol, TextIO

from fsys import linux
from fsys.kmod.table import Kind, Syscall


class TracedNotification(Protocol):
    """The seccomp notification of a traced call (fsys.master.device.Notification)."""

    @property
    def tid(self) -> int: ...
    @property
    def args(self) -> tuple[int, ...]: ...
    def arg_int(self, i: int) -> int: ...
    def arg_long(self, i: int) -> int: ...


class TracedTarget(Protocol):
    """One path argument of a traced call, as routed."""

    @property
    def shown(self) -> bytes: ...  # the path as the program wrote it


class TracedCall(Protocol):
    """What the tracer reads of a call (fmhub's Trapped)."""

    @property
    def notif(self) -> TracedNotification: ...
    @property
    def syscall(self) -> Syscall: ...
    @property
    def targets(self) -> Sequence[TracedTarget]: ...  # one per syscall.paths, in order
    @property
    def side(self) -> str: ...
    @property
    def note(self) -> str: ...


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


def format_result(outcome: object) -> str:
    """An int result as the kernel gives it (``-errno`` for errors); anything else (fmhub's
    CONTINUE) ran natively, with a result the tracer does not see."""
    if not isinstance(outcome, int):
        return "? (native)"
    if outcome >= 0:
        return str(outcome)
    name = errno.errorcode.get(-outcome, str(-outcome))
    return f"-1 {name} ({os.strerror(-outcome)})"


_UNKNOWN = (Kind.HEX,) * 3  # a call whose signature the table does not record


def format_arg(call: TracedCall, i: int, kind: Kind) -> str:
    """Argument ``i`` of ``call``, decoded as ``kind``."""
    notif = call.notif
    raw = notif.args[i]
    if kind is Kind.PATH:
        for j, p in enumerate(call.syscall.paths):
            if p.path == i and j < len(call.targets):
                return _quote(call.targets[j].shown)
        return hex(raw)
    if kind is Kind.DIRFD:
        value = notif.arg_int(i)
        return "AT_FDCWD" if value == linux.AT_FDCWD else str(value)
    if kind is Kind.OFLAGS:
        value = notif.arg_int(i)
        base = ("O_RDONLY", "O_WRONLY", "O_RDWR", "O_ACCMODE")[value & 3]
        return _flags(value & ~3, _O_FLAGS, base)
    if kind is Kind.ATFLAGS:
        return _flags(notif.arg_int(i), _AT_FLAGS)
    if kind is Kind.MODE:
        value = notif.arg_int(i)
        return f"0{value & 0o7777:o}" if value & ~0o7777 == 0 else f"{value:#o}"
    if kind in (Kind.FD, Kind.INT):
        return str(notif.arg_int(i))
    if kind is Kind.LONG:
        return str(notif.arg_long(i))
    if kind is Kind.SIZE:
        return str(raw & 0xFFFFFFFFFFFFFFFF)
    return hex(raw)  # ptr, hex


def format_call(call: TracedCall) -> str:
    """``name(arg, ...)`` with the arguments decoded by the kinds of the table's signature."""
    syscall = call.syscall
    kinds = [p.kind for p in syscall.params] if syscall.signature_known else _UNKNOWN
    args = ", ".join(format_arg(call, i, kind) for i, kind in enumerate(kinds))
    return f"{syscall.name}({args})"


class Tracer:
    def __init__(self, out: TextIO, *, all: bool = False) -> None:
        self.out = out
        self.all = all

    def summary(self, counters: dict[str, int]) -> None:
        items = ", ".join(f"{value} {name.replace('_', ' ')}" for name, value in counters.items())
        self.out.write(f"fsys-master: session ended: {items}\n")
        self.out.flush()

    def line(self, call: TracedCall, outcome: object, micros: int) -> None:
        note = f" {call.note}" if call.note else ""
        self.out.write(
            f"[{call.notif.tid}] {format_call(call)} = {format_result(outcome)}"
            f" <{call.side}{note} {micros}us>\n"
        )
        self.out.flush()
