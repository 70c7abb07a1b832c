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

Each row also gives the call's signature: its arguments' names and kinds
(``Syscall.params``), so code asks for an argument by name (``Syscall.position``)
and the tracer decodes arguments without a list of its own.

Both the BPF program (``kmod.bpf``) and fmhub's routing are built from this one
table, and ``docs/syscalls.md`` is generated from it, so none of them can drift.
"""

from __future__ import annotations

import enum
import errno as errno_mod
import functools
import re
from dataclasses import dataclass, field
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


class Kind(enum.StrEnum):
    """What one argument of a system call is (column 7 of the table)."""

    FD = "fd"  # a file descriptor (C int)
    DIRFD = "dirfd"  # the directory fd of an *at call; AT_FDCWD is the cwd
    PATH = "path"  # a pathname pointer, routed as the args tokens say
    PTR = "ptr"  # any other pointer
    INT = "int"  # a C int: the low 32 bits, signed
    LONG = "long"  # a C long (off_t): 64 bits, signed
    SIZE = "size"  # a size_t: 64 bits, unsigned
    HEX = "hex"  # a bit mask or opaque value
    OFLAGS = "oflags"  # O_* open flags
    ATFLAGS = "atflags"  # AT_* flags
    MODE = "mode"  # a file mode


MAX_PARAMS = 6
"""A system call takes at most six arguments (struct seccomp_data has six)."""


@dataclass(frozen=True, slots=True)
class Param:
    """One argument of a system call: its kernel / man page name and its kind."""

    name: str
    kind: Kind

    def __str__(self) -> str:
        return f"{self.name}:{self.kind}"


@dataclass(frozen=True, slots=True)
class PathArg:
    """A pathname argument, relative to the dirfd argument ``dirfd`` (None: the cwd)."""

    path: int
    dirfd: int | None = None


@dataclass(frozen=True, slots=True)
class NativeIf:
    """The filter lets the call run natively when ``args[arg]`` matches.

    Either ``mask`` is set (any of its bits set in the low 32 bits of the argument)
    or ``values`` (the low 32 bits equal one of them). ``trap`` turns it round: the
    call is trapped only when the argument equals one of ``values`` (``trapif``).
    """

    arg: int
    mask: int | None = None
    values: tuple[int, ...] = ()
    trap: bool = False


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
    params: tuple[Param, ...] = ()
    signature_known: bool = False  # False: column 7 is ``?`` (params is then empty)
    #: argument name -> its index (0..5); read it, never change it.
    positions: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", {p.name: i for i, p in enumerate(self.params)})

    def position(self, name: str) -> int:
        """The index (0..5) of the argument called ``name``; KeyError if there is none."""
        try:
            return self.positions[name]
        except KeyError:
            raise KeyError(f"{self.name} has no argument {name!r}") from None

    def has(self, name: str) -> bool:
        """Whether the call has an argument called ``name`` (no exception: hot path)."""
        return name in self.positions

    def param(self, name: str) -> Param:
        """The argument called ``name``; KeyError if there is none."""
        return self.params[self.position(name)]

    def signature_spec(self) -> str:
        """The ``signature`` column, as written in the table."""
        if not self.signature_known:
            return "?"
        return " ".join(map(str, self.params)) or "-"

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
            elif ni.trap:
                out.append(f"trapif:arg{ni.arg}=" + ",".join(f"{v:#x}" for v in ni.values))
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
    r"|(?P<cond>native|trap)if:arg(?P<arg>\d)"
    r"(?:&(?P<mask>0x[0-9a-fA-F]+|\d+)|=(?P<values>[0-9a-fA-Fx,]+))$"
)


_PARAM_NAME = re.compile(r"[a-z_][a-z0-9_]*$")


#: Parsed signature tokens: start-up parses the table each time fsys-master runs.
_TOKENS: dict[str, Param] = {}


def _parse_signature(text: str, where: str) -> tuple[tuple[Param, ...], bool]:
    """(params, signature_known) from column 7."""
    if text == "?":
        return (), False
    if text == "-":
        return (), True
    if not text.strip():
        raise TableError(f"{where}: empty signature (- for a call without arguments, ? unknown)")
    params: list[Param] = []
    seen: set[str] = set()
    for token in text.split():
        known = _TOKENS.get(token)  # most tokens recur (fd:fd, path:path, buf:ptr...)
        if known is not None:
            if known.name in seen:
                raise TableError(
                    f"{where}: duplicate argument name {known.name!r} in the signature"
                )
            seen.add(known.name)
            params.append(known)
            continue
        name, colon, kind_s = token.partition(":")
        if not colon or _PARAM_NAME.match(name) is None:
            raise TableError(f"{where}: bad signature token {token!r} (want name:kind)")
        try:
            kind = Kind(kind_s)
        except ValueError:
            kinds = ", ".join(k.value for k in Kind)
            raise TableError(
                f"{where}: unknown argument kind {kind_s!r} in {token!r} (kinds: {kinds})"
            ) from None
        if name in seen:
            raise TableError(f"{where}: duplicate argument name {name!r} in the signature")
        seen.add(name)
        params.append(_TOKENS.setdefault(token, Param(name, kind)))
    if len(params) > MAX_PARAMS:
        raise TableError(
            f"{where}: {len(params)} arguments in the signature, a syscall has at most {MAX_PARAMS}"
        )
    return tuple(params), True


def _check_signature(
    params: tuple[Param, ...],
    fds: list[int],
    paths: list[PathArg],
    flags: int | None,
    native_if: NativeIf | None,
    where: str,
) -> None:
    """The args tokens (column 4) agree with the signature (column 7), both ways."""

    def expect(i: int, token: str, *kinds: Kind) -> None:
        if i >= len(params):
            raise TableError(
                f"{where}: {token} names argument {i}, the signature has {len(params)}"
            )
        if params[i].kind not in kinds:
            want = " or ".join(k.value for k in kinds)
            raise TableError(
                f"{where}: {token} says argument {i} is {want}, the signature has {params[i]}"
            )

    for i in fds:
        expect(i, f"fd{i}", Kind.FD)
    for p in paths:
        if p.dirfd is None:
            expect(p.path, f"path{p.path}", Kind.PATH)
        else:
            expect(p.dirfd, f"at{p.dirfd}:{p.path}", Kind.DIRFD)
            expect(p.path, f"at{p.dirfd}:{p.path}", Kind.PATH)
    if flags is not None:
        expect(flags, f"flags{flags}", Kind.ATFLAGS, Kind.OFLAGS)
    if native_if is not None and native_if.arg >= len(params):
        raise TableError(
            f"{where}: nativeif:arg{native_if.arg} names argument {native_if.arg},"
            f" the signature has {len(params)}"
        )
    named = {
        Kind.PATH: {p.path for p in paths},
        Kind.DIRFD: {p.dirfd for p in paths if p.dirfd is not None},
        Kind.ATFLAGS: {flags} if flags is not None else set(),
    }
    for i, param in enumerate(params):
        tokens = named.get(param.kind)
        if tokens is not None and i not in tokens:
            raise TableError(
                f"{where}: argument {i} ({param}) has no pathN/atD:P/flagsN token in the args"
            )


def _parse_row(fields: list[str], where: str) -> Syscall:
    if len(fields) != 7:
        raise TableError(f"{where}: expected 7 tab-separated columns, got {len(fields)}")
    nr_s, name, disp_s, args_s, errno_s, note, signature_s = fields
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
            if m["cond"] == "trap":
                raise TableError(f"{where}: trapif takes values, not a mask")
            native_if = NativeIf(int(m["arg"]), mask=int(m["mask"], 0))
        else:
            values = tuple(int(v, 0) for v in m["values"].split(","))
            native_if = NativeIf(int(m["arg"]), values=values, trap=m["cond"] == "trap")
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
    params, known = _parse_signature(signature_s, where)
    if disposition.trapped and not known:
        raise TableError(f"{where}: a trapped ({disp_s}) call needs its signature, not ?")
    if known:
        _check_signature(params, fds, paths, flags, native_if, where)
    return Syscall(
        nr, name, disposition, tuple(fds), tuple(paths), flags, native_if, err,
        "" if note == "-" else note, params, known,
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
