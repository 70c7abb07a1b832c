"""kmod: the disposition table, the filter generated from it, and the docs built from it."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from fsys.kmod import abi, bpf
from fsys.kmod.table import (
    HEADER,
    Disposition,
    Kind,
    Param,
    Syscall,
    TableError,
    header_syscalls,
    load,
    parse,
)
from fsys.master.calls import HANDLERS
from fsys.master.syscalls_doc import render_markdown

TABLE = load()
PROGRAM = bpf.build(TABLE)


def test_every_syscall_of_the_system_header_has_a_disposition() -> None:
    declared = header_syscalls(HEADER)
    assert len(declared) > 350
    missing = {nr: name for nr, name in declared.items() if nr not in TABLE.by_nr}
    assert missing == {}
    renamed = {nr: (name, TABLE.by_nr[nr].name) for nr, name in declared.items()
               if TABLE.by_nr[nr].name != name}  # fmt: skip
    assert renamed == {}


def test_the_table_reaches_linux_6_18() -> None:
    assert TABLE["file_setattr"].nr == 469
    assert TABLE["fchmodat2"].disposition is Disposition.PATH


@pytest.mark.parametrize("syscall", TABLE.syscalls, ids=lambda s: s.name)
def test_filter_action_matches_the_table(syscall: object) -> None:
    assert isinstance(syscall, Syscall)
    action = bpf.evaluate(PROGRAM, syscall.nr)
    if syscall.disposition is Disposition.NATIVE:
        assert action == abi.SECCOMP_RET_ALLOW
    elif syscall.disposition is Disposition.REFUSED:
        assert syscall.errno is not None
        assert action == abi.SECCOMP_RET_ERRNO | syscall.errno
    elif syscall.native_if is None:
        assert action == abi.SECCOMP_RET_USER_NOTIF
    else:  # trapped unless its argument matches the condition
        cond = syscall.native_if
        native, trapped = [0] * 6, [0] * 6
        if cond.mask is not None:
            native[cond.arg] = cond.mask & -cond.mask  # one of the mask's bits
            trapped[cond.arg] = ~cond.mask & 0xFFFFFFFF
        elif cond.trap:
            trapped[cond.arg] = cond.values[-1]
            native[cond.arg] = max(cond.values) + 1
        else:
            native[cond.arg] = cond.values[-1]
            trapped[cond.arg] = max(cond.values) + 1
        assert bpf.evaluate(PROGRAM, syscall.nr, native) == abi.SECCOMP_RET_ALLOW
        assert bpf.evaluate(PROGRAM, syscall.nr, trapped) == abi.SECCOMP_RET_USER_NOTIF


def test_conditional_traps() -> None:
    fcntl = TABLE["fcntl"].nr
    for cmd in (0, 1, 2, 1030):  # F_DUPFD, F_GETFD, F_SETFD, F_DUPFD_CLOEXEC
        assert bpf.evaluate(PROGRAM, fcntl, (3, cmd, 0, 0, 0, 0)) == abi.SECCOMP_RET_ALLOW
    for cmd in (3, 4, 5, 6, 7):  # F_GETFL, F_SETFL, locks
        assert bpf.evaluate(PROGRAM, fcntl, (3, cmd, 0, 0, 0, 0)) == abi.SECCOMP_RET_USER_NOTIF


def test_only_the_slaves_socket_families_trap() -> None:
    nr = TABLE["socket"].nr
    for family in (2, 10):  # AF_INET, AF_INET6: the slave's network
        assert bpf.evaluate(PROGRAM, nr, (family, 1, 0, 0, 0, 0)) == abi.SECCOMP_RET_USER_NOTIF
    for family in (1, 16, 17):  # AF_UNIX (until it binds or connects), netlink, packet
        assert bpf.evaluate(PROGRAM, nr, (family, 1, 0, 0, 0, 0)) == abi.SECCOMP_RET_ALLOW


def test_arch_x32_io_uring_and_unknown_numbers() -> None:
    assert bpf.evaluate(PROGRAM, 0, arch=0x40000003) == abi.SECCOMP_RET_KILL_PROCESS  # i386
    enosys = abi.SECCOMP_RET_ERRNO | errno.ENOSYS
    assert bpf.evaluate(PROGRAM, 0x40000000 | 2) == enosys  # x32 open
    assert bpf.evaluate(PROGRAM, TABLE["io_uring_setup"].nr) == enosys
    assert bpf.evaluate(PROGRAM, 400) == enosys  # a gap in the numbering
    assert bpf.evaluate(PROGRAM, 10_000) == enosys  # newer than the table


def test_every_forwarded_call_has_a_handler_or_an_errno() -> None:
    for syscall in TABLE.syscalls:
        if syscall.disposition is Disposition.HUB:
            assert syscall.name in HANDLERS, syscall.name
        if syscall.disposition in (Disposition.FD, Disposition.PATH):
            assert syscall.name in HANDLERS or syscall.errno is not None
    unknown = set(HANDLERS) - set(TABLE.by_name)
    assert unknown == set()
    natively = {name for name in HANDLERS if TABLE[name].disposition is Disposition.NATIVE}
    assert natively == set()


def test_the_issue_list_of_forwarded_calls_is_handled() -> None:
    required = """open openat openat2 creat read write readv writev pread64 pwrite64 preadv
    pwritev preadv2 pwritev2 lseek fstat stat lstat newfstatat statx getdents64 access
    faccessat faccessat2 readlink readlinkat mkdir mkdirat rmdir unlink unlinkat rename
    renameat renameat2 link linkat symlink symlinkat chmod fchmod fchmodat chown fchown
    lchown fchownat truncate ftruncate fsync fdatasync utimensat statfs fstatfs fcntl
    flock ioctl""".split()  # noqa: SIM905 - the issue's list, as written
    assert [name for name in required if name not in HANDLERS] == []


def test_docs_syscalls_md_is_generated_from_the_table() -> None:
    docs = Path(__file__).resolve().parent.parent / "docs" / "syscalls.md"
    assert docs.read_text() == render_markdown(), "run: nox -s docs"


def test_malformed_tables_are_rejected() -> None:
    with pytest.raises(TableError, match="7 tab-separated"):
        parse("0\tread\tfd\tfd0\tEIO\t-\n")
    with pytest.raises(TableError, match="duplicate"):
        parse("0\tread\tfd\tfd0\tEIO\t-\tfd:fd\n0\tread\tfd\tfd0\tEIO\t-\tfd:fd\n")
    with pytest.raises(TableError, match="bad args token"):
        parse("0\tread\tfd\tfdx\tEIO\t-\tfd:fd\n")
    with pytest.raises(TableError, match="needs an errno"):
        parse("0\tread\trefused\t-\t-\t-\t?\n")
    with pytest.raises(TableError, match="unknown errno"):
        parse("0\tread\tfd\tfd0\tENOPE\t-\tfd:fd\n")
    with pytest.raises(TableError):
        parse("0\tread\tweird\tfd0\tEIO\t-\tfd:fd\n")


# --- signatures (column 7) -----------------------------------------------------------

TRAPPED = [s for s in TABLE.syscalls if s.disposition.trapped]

# The argument names other code looks up (Syscall.position): they must stay exactly these.
NAMES = {
    "read": "fd buf count", "write": "fd buf count",
    "pread64": "fd buf count offset", "pwrite64": "fd buf count offset",
    "readv": "fd iov iovcnt", "writev": "fd iov iovcnt",
    "preadv": "fd iov iovcnt offset pos_h", "pwritev": "fd iov iovcnt offset pos_h",
    "preadv2": "fd iov iovcnt offset pos_h flags", "pwritev2": "fd iov iovcnt offset pos_h flags",
    "open": "path flags mode", "creat": "path mode", "openat": "dirfd path flags mode",
    "openat2": "dirfd path how size",
    "stat": "path statbuf", "lstat": "path statbuf", "fstat": "fd statbuf",
    "newfstatat": "dirfd path statbuf flags", "statx": "dirfd path flags mask statxbuf",
    "access": "path mode", "faccessat": "dirfd path mode", "faccessat2": "dirfd path mode flags",
    "readlink": "path buf bufsiz", "readlinkat": "dirfd path buf bufsiz",
    "mkdir": "path mode", "mkdirat": "dirfd path mode", "mknod": "path mode dev",
    "mknodat": "dirfd path mode dev",
    "unlink": "path", "rmdir": "path", "unlinkat": "dirfd path flags",
    "rename": "oldpath newpath", "link": "oldpath newpath",
    "renameat": "olddirfd oldpath newdirfd newpath",
    "renameat2": "olddirfd oldpath newdirfd newpath flags",
    "linkat": "olddirfd oldpath newdirfd newpath flags",
    "symlink": "target linkpath", "symlinkat": "target newdirfd linkpath",
    "chmod": "path mode", "fchmod": "fd mode", "fchmodat": "dirfd path mode",
    "fchmodat2": "dirfd path mode flags",
    "chown": "path owner group", "lchown": "path owner group", "fchown": "fd owner group",
    "fchownat": "dirfd path owner group flags",
    "truncate": "path length", "ftruncate": "fd length",
    "utimensat": "dirfd path times flags", "utime": "path times", "utimes": "path times",
    "futimesat": "dirfd path times",
    "statfs": "path buf", "fstatfs": "fd buf", "fcntl": "fd cmd arg", "flock": "fd operation",
    "ioctl": "fd request arg",
    "fallocate": "fd mode offset len", "fadvise64": "fd offset len advice",
    "readahead": "fd offset count",
    "getxattr": "path name value size", "lgetxattr": "path name value size",
    "fgetxattr": "fd name value size",
    "setxattr": "path name value size flags", "lsetxattr": "path name value size flags",
    "fsetxattr": "fd name value size flags",
    "listxattr": "path list size", "llistxattr": "path list size", "flistxattr": "fd list size",
    "removexattr": "path name", "lremovexattr": "path name", "fremovexattr": "fd name",
    "getdents64": "fd dirp count", "lseek": "fd offset whence",
    "fsync": "fd", "fdatasync": "fd", "syncfs": "fd", "sync_file_range": "fd offset nbytes flags",
    "copy_file_range": "fd_in off_in fd_out off_out len flags",
    "sendfile": "out_fd in_fd offset count",
    "chdir": "path", "fchdir": "fd", "getcwd": "buf size", "umask": "mask",
    "exit": "status", "exit_group": "status",
    "execve": "path argv envp", "execveat": "dirfd path argv envp flags",
}  # fmt: skip

# How many arguments the kernel's SYSCALL_DEFINEn takes, for calls where a short
# signature would go unnoticed by the token checks.
ARITY = {
    "read": 3, "pread64": 4, "preadv": 5, "preadv2": 6, "open": 3, "openat": 4, "openat2": 4,
    "newfstatat": 4, "statx": 5, "mknodat": 4, "linkat": 5, "renameat2": 5, "fchownat": 5,
    "utimensat": 4, "fallocate": 4, "setxattr": 5, "copy_file_range": 6, "splice": 6,
    "sendto": 6, "recvfrom": 6, "mount": 5, "execveat": 5, "mmap": 6, "getpid": 0,
}  # fmt: skip


@pytest.mark.parametrize("syscall", TRAPPED, ids=lambda s: s.name)
def test_every_trapped_row_has_a_known_signature(syscall: Syscall) -> None:
    assert syscall.signature_known
    assert syscall.params, "every trapped call takes arguments"
    assert len(syscall.params) <= 6
    assert len({p.name for p in syscall.params}) == len(syscall.params)
    assert all(isinstance(p.kind, Kind) for p in syscall.params)
    for i, p in enumerate(syscall.params):
        assert syscall.position(p.name) == i


def test_the_table_has_both_trapped_and_unknown_rows() -> None:
    assert len(TRAPPED) > 100
    unknown = [s.name for s in TABLE.syscalls if not s.signature_known]
    assert unknown, "the ? rows are native or refused ones"
    assert all(not TABLE[name].disposition.trapped for name in unknown)
    assert all(TABLE[name].params == () for name in unknown)


@pytest.mark.parametrize("name", sorted(NAMES))
def test_argument_names_others_rely_on(name: str) -> None:
    assert [p.name for p in TABLE[name].params] == NAMES[name].split()


def test_argument_counts() -> None:
    counts = {name: len(TABLE[name].params) for name in ARITY}
    assert counts == ARITY
    assert TABLE["getpid"].signature_known


def test_kinds_of_some_arguments() -> None:
    def kinds(name: str) -> str:
        return " ".join(p.kind.value for p in TABLE[name].params)

    assert kinds("openat") == "dirfd path oflags mode"
    assert kinds("statx") == "dirfd path atflags hex ptr"
    assert kinds("read") == "fd ptr size"
    assert kinds("lseek") == "fd long int"
    assert kinds("fchownat") == "dirfd path int int atflags"
    assert kinds("symlinkat") == "ptr dirfd path"
    assert kinds("renameat2") == "dirfd path dirfd path hex"
    assert kinds("copy_file_range") == "fd ptr fd ptr size int"
    assert kinds("umask") == "mode"
    assert kinds("mmap") == "ptr size hex hex fd long"


def test_position_by_name() -> None:
    assert TABLE["openat"].position("flags") == 2
    assert TABLE["open"].position("flags") == 1
    assert TABLE["pread64"].position("offset") == 3
    assert TABLE["renameat2"].position("newpath") == 3
    assert TABLE["copy_file_range"].position("fd_out") == 2
    assert TABLE["statx"].position("mask") == 3
    assert TABLE["fchownat"].param("group") == Param("group", Kind.INT)
    with pytest.raises(KeyError, match=r"openat has no argument 'nope'"):
        TABLE["openat"].position("nope")
    futex = parse("202\tfutex\tnative\t-\t-\t-\t?\n")["futex"]
    with pytest.raises(KeyError, match=r"futex has no argument 'uaddr'"):
        futex.position("uaddr")


def test_rows_stay_frozen_and_hashable() -> None:
    row = TABLE["openat"]
    again = parse((Path(__file__).resolve().parent.parent / "kmod" / "syscalls.tsv").read_text())
    assert again["openat"] == row and hash(again["openat"]) == hash(row)
    assert {row: 1}[again["openat"]] == 1
    with pytest.raises(AttributeError):
        row.name = "x"  # type: ignore[misc]
    assert row.signature_spec() == "dirfd:dirfd path:path flags:oflags mode:mode"
    assert TABLE["getpid"].signature_spec() == "-"
    assert parse("202\tfutex\tnative\t-\t-\t-\t?\n")["futex"].signature_spec() == "?"


def _row(signature: str, args: str = "fd0", disposition: str = "fd") -> str:
    errno_col = "-" if disposition in ("native", "hub") else "EIO"
    return f"0\tread\t{disposition}\t{args}\t{errno_col}\t-\t{signature}\n"


def test_a_well_formed_signature_parses() -> None:
    # The base of the malformed rows below: each breaks exactly one rule.
    row = parse(_row("fd:fd buf:ptr count:size"))["read"]
    assert row.params == (Param("fd", Kind.FD), Param("buf", Kind.PTR), Param("count", Kind.SIZE))
    assert row.signature_known
    at = parse(_row("dirfd:dirfd path:path flags:atflags", "at0:1 flags2", "path"))["read"]
    assert at.position("flags") == 2
    assert parse(_row("?", "-", "native"))["read"].params == ()
    assert not parse(_row("?", "-", "native"))["read"].signature_known
    assert parse(_row("-", "-", "native"))["read"].signature_known


@pytest.mark.parametrize(
    ("signature", "args", "disposition", "message"),
    [
        ("fd:fd buf:pointer count:size", "fd0", "fd", "unknown argument kind 'pointer'"),
        ("fd:fd buf:ptr buf:size", "fd0", "fd", "duplicate argument name 'buf'"),
        ("fd:int buf:ptr count:size", "fd0", "fd", "fd0 says argument 0 is fd"),
        ("fd:fd buf:ptr count:size", "fd3", "fd", "fd3 names argument 3"),
        ("a:fd b:int c:int d:int e:int f:int g:int", "fd0", "fd", "at most 6"),
        ("fd:fd buf", "fd0", "fd", "bad signature token 'buf'"),
        ("fd:fd Buf:ptr", "fd0", "fd", "bad signature token 'Buf:ptr'"),
        ("", "fd0", "fd", "empty signature"),
        ("?", "fd0", "fd", "needs its signature"),
        ("?", "path0", "path", "needs its signature"),
        ("?", "-", "hub", "needs its signature"),
        ("path:ptr", "path0", "path", "path0 says argument 0 is path"),
        ("dirfd:fd path:path", "at0:1", "path", "at0:1 says argument 0 is dirfd"),
        ("dirfd:dirfd path:ptr", "at0:1", "path", "at0:1 says argument 1 is path"),
        ("dirfd:dirfd path:path flags:hex", "at0:1 flags2", "path", "flags2 says argument 2"),
        ("path:path other:path", "path0", "path", "argument 1 \\(other:path\\) has no"),
        ("fd:fd dirfd:dirfd", "fd0", "fd", "argument 1 \\(dirfd:dirfd\\) has no"),
        ("dirfd:dirfd path:path flags:atflags", "at0:1", "path", "argument 2 \\(flags:atflags"),
        ("fd:fd", "fd0 nativeif:arg1=1", "fd", "nativeif:arg1 names argument 1"),
    ],
)
def test_malformed_signatures_are_rejected(
    signature: str, args: str, disposition: str, message: str
) -> None:
    with pytest.raises(TableError, match=rf"^src\.tsv:3: (.* )?{message}"):
        parse("# a comment\n\n" + _row(signature, args, disposition), source="src.tsv")


def test_native_rows_are_checked_too_when_their_signature_is_given() -> None:
    with pytest.raises(TableError, match="fd1 says argument 1 is fd"):
        parse("33\tdup2\tnative\tfd0 fd1\t-\t-\toldfd:fd newfd:int\n")
    assert parse("33\tdup2\tnative\tfd0 fd1\t-\t-\t?\n")["dup2"].params == ()
