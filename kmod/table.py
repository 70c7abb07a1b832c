"""The syscall disposition table: what happens to each x86_64 system call.

This is fsys's ``syscalls.master``. ``syscalls.tsv`` next to this module lists every
system call of the kernel with its disposition:

- ``native``  — not trapped; the master's kernel runs it;
- ``fd``      — trapped; forwarded when one of its fd arguments is a placeholder for a
  remote file, continued natively otherwise;
- ``path``    — trapped; routed by the path policy (master-local paths continue);
- ``hub``     — trapped and answered by fmhub itself, never sent to the slave
  ("master-only": cwd, umask, execve);
- ``refused`` — answered in the filter with an errno.

Both the BPF program (``kmod.bpf``) and fmhub's routing are built from this one
table, and ``docs/syscalls.md`` is generated from it, so none of them can drift.
"""

from __future__ import annotations

import enum
import errno as errno_mod
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from fsys.errors import FsysError
from fsys.kmod import abi


class TableError(FsysError, ValueError):
    """The table file is malformed."""


class Disposition(enum.Enum):
    NATIVE = "native"
    FD = "fd"
    PATH = "path"
    HUB = "hub"
    REFUSED = "refused"

    @property
    def trapped(self) -> bool:
        return self in (Disposition.FD, Disposition.PATH, Disposition.HUB)


@dataclass(frozen=True, slots=True)
class PathArg:
    """A pathname argument, relative to the dirfd argument ``dirfd`` (None: the cwd)."""

    path: int
    dirfd: int | None = None


@dataclass(frozen=True, slots=True)
class NativeIf:
    """The filter lets the call run natively when ``args[arg]`` matches.

    Either ``mask`` is set (any of its bits set in the low 32 bits of the argument)
    or ``values`` (the low 32 bits equal one of them).
    """

    arg: int
    mask: int | None = None
    values: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Syscall:
    nr: int
    name: str
    disposition: Disposition
    fds: tuple[int, ...]
    paths: tuple[PathArg, ...]
    flags: int | None
    native_if: NativeIf | None
    errno: int | None
    note: str

    @property
    def errno_name(self) -> str:
        return errno_mod.errorcode[self.errno] if self.errno is not None else "-"

    def args_spec(self) -> str:
        """The ``args`` column, as written in the table."""
        out = [f"fd{i}" for i in self.fds]
        for p in self.paths:
            out.append(f"path{p.path}" if p.dirfd is None else f"at{p.dirfd}:{p.path}")
        if self.flags is not None:
            out.append(f"flags{self.flags}")
        if self.native_if is not None:
            ni = self.native_if
            if ni.mask is not None:
                out.append(f"nativeif:arg{ni.arg}&{ni.mask:#x}")
            else:
                out.append(f"nativeif:arg{ni.arg}=" + ",".join(f"{v:#x}" for v in ni.values))
        return " ".join(out) or "-"


@dataclass(frozen=True)
class Table:
    syscalls: tuple[Syscall, ...]

    @functools.cached_property
    def by_nr(self) -> dict[int, Syscall]:
        return {s.nr: s for s in self.syscalls}

    @functools.cached_property
    def by_name(self) -> dict[str, Syscall]:
        return {s.name: s for s in self.syscalls}

    def __getitem__(self, name: str) -> Syscall:
        return self.by_name[name]


_TOKEN = re.compile(
    r"fd(?P<fd>\d)$|path(?P<path>\d)$|at(?P<dirfd>\d):(?P<atpath>\d)$|flags(?P<flags>\d)$"
    r"|nativeif:arg(?P<arg>\d)(?:&(?P<mask>0x[0-9a-fA-F]+|\d+)|=(?P<values>[0-9a-fA-Fx,]+))$"
)


def _parse_row(fields: list[str], where: str) -> Syscall:
    if len(fields) != 6:
        raise TableError(f"{where}: expected 6 tab-separated columns, got {len(fields)}")
    nr_s, name, disp_s, args_s, errno_s, note = fields
    try:
        nr = int(nr_s)
        disposition = Disposition(disp_s)
    except ValueError as exc:
        raise TableError(f"{where}: {exc}") from None
    fds: list[int] = []
    paths: list[PathArg] = []
    flags: int | None = None
    native_if: NativeIf | None = None
    for token in args_s.split() if args_s != "-" else ():
        m = _TOKEN.match(token)
        if m is None:
            raise TableError(f"{where}: bad args token {token!r}")
        if m["fd"] is not None:
            fds.append(int(m["fd"]))
        elif m["path"] is not None:
            paths.append(PathArg(int(m["path"])))
        elif m["dirfd"] is not None:
            paths.append(PathArg(int(m["atpath"]), int(m["dirfd"])))
        elif m["flags"] is not None:
            flags = int(m["flags"])
        elif m["mask"] is not None:
            native_if = NativeIf(int(m["arg"]), mask=int(m["mask"], 0))
        else:
            values = tuple(int(v, 0) for v in m["values"].split(","))
            native_if = NativeIf(int(m["arg"]), values=values)
    err: int | None = None
    if errno_s != "-":
        err = getattr(errno_mod, errno_s, None)
        if not isinstance(err, int):
            raise TableError(f"{where}: unknown errno {errno_s!r}")
    if disposition is Disposition.REFUSED and err is None:
        raise TableError(f"{where}: a refused call needs an errno")
    if disposition in (Disposition.FD, Disposition.PATH) and err is None:
        raise TableError(f"{where}: an fd or path call needs the errno for unforwarded use")
    if disposition is Disposition.FD and not fds and not any(p.dirfd is not None for p in paths):
        raise TableError(f"{where}: an fd call needs an fd argument")
    if disposition is Disposition.PATH and not paths:
        raise TableError(f"{where}: a path call needs a path argument")
    return Syscall(
        nr, name, disposition, tuple(fds), tuple(paths), flags, native_if, err,
        "" if note == "-" else note,
    )  # fmt: skip


def parse(text: str, source: str = "syscalls.tsv") -> Table:
    rows: list[Syscall] = []
    seen_nr: set[int] = set()
    seen_name: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        row = _parse_row(line.split("\t"), f"{source}:{lineno}")
        if row.nr in seen_nr or row.name in seen_name:
            raise TableError(f"{source}:{lineno}: duplicate syscall {row.nr} {row.name}")
        if row.nr & abi.X32_SYSCALL_BIT:
            raise TableError(f"{source}:{lineno}: x32 numbers are refused by the filter")
        seen_nr.add(row.nr)
        seen_name.add(row.name)
        rows.append(row)
    rows.sort(key=lambda s: s.nr)
    return Table(tuple(rows))


@functools.cache
def load() -> Table:
    """The table shipped with fsys."""
    return parse(Path(__file__).with_name("syscalls.tsv").read_text(encoding="utf-8"))


HEADER = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
_DEFINE = re.compile(r"^#define __NR_(\w+)\s+(\d+)\s*$", re.MULTILINE)


def header_syscalls(header: Path = HEADER) -> dict[int, str]:
    """Syscall numbers and names as the system's ``asm/unistd_64.h`` declares them."""
    return {int(nr): name for name, nr in _DEFINE.findall(header.read_text())}
