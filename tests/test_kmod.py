"""kmod: the disposition table, the filter generated from it, and the docs built from it."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from fsys.kmod import abi, bpf
from fsys.kmod.table import HEADER, Disposition, TableError, header_syscalls, load, parse
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
    from fsys.kmod.table import Syscall

    assert isinstance(syscall, Syscall)
    action = bpf.evaluate(PROGRAM, syscall.nr)
    if syscall.disposition is Disposition.NATIVE:
        assert action == abi.SECCOMP_RET_ALLOW
    elif syscall.disposition is Disposition.REFUSED:
        assert syscall.errno is not None
        assert action == abi.SECCOMP_RET_ERRNO | syscall.errno
    elif syscall.native_if is None:
        assert action == abi.SECCOMP_RET_USER_NOTIF


def test_conditional_traps() -> None:
    fcntl = TABLE["fcntl"].nr
    for cmd in (0, 1, 2, 1030):  # F_DUPFD, F_GETFD, F_SETFD, F_DUPFD_CLOEXEC
        assert bpf.evaluate(PROGRAM, fcntl, (3, cmd, 0, 0, 0, 0)) == abi.SECCOMP_RET_ALLOW
    for cmd in (3, 4, 5, 6, 7):  # F_GETFL, F_SETFL, locks
        assert bpf.evaluate(PROGRAM, fcntl, (3, cmd, 0, 0, 0, 0)) == abi.SECCOMP_RET_USER_NOTIF


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
    with pytest.raises(TableError, match="6 tab-separated"):
        parse("0\tread\tfd\tfd0\tEIO\n")
    with pytest.raises(TableError, match="duplicate"):
        parse("0\tread\tfd\tfd0\tEIO\t-\n0\tread\tfd\tfd0\tEIO\t-\n")
    with pytest.raises(TableError, match="bad args token"):
        parse("0\tread\tfd\tfdx\tEIO\t-\n")
    with pytest.raises(TableError, match="needs an errno"):
        parse("0\tread\trefused\t-\t-\t-\n")
    with pytest.raises(TableError, match="unknown errno"):
        parse("0\tread\tfd\tfd0\tENOPE\t-\n")
    with pytest.raises(TableError):
        parse("0\tread\tweird\tfd0\tEIO\t-\n")
