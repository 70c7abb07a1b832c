"""What a slave refuses beyond its root: --read-only, no setuid files, handle limits.

Driven through the executor in process (``perform``, as fshub runs a call), on a real
box; the end-to-end forms are in tests/test_service.py.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsys import linux
from fsys.protocol import (
    Call,
    Chmod,
    Chown,
    Create,
    Link,
    Mkdir,
    Mknod,
    Open,
    Operation,
    Read,
    Removexattr,
    Rename,
    Setxattr,
    Stat,
    Symlink,
    Truncate,
    Unlink,
    Utimens,
    Write,
)
from fsys.slave import confinement as conf
from fsys.slave.confinement import Confinement, privileged
from fsys.slave.executor import Executor
from fsys.slave.fshub import perform

O_RDONLY, O_WRONLY, O_RDWR = os.O_RDONLY, os.O_WRONLY, os.O_RDWR
O_CREAT, O_EXCL, O_TRUNC = os.O_CREAT, os.O_EXCL, os.O_TRUNC
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a root slave's rules")


@pytest.fixture(autouse=True)
def no_umask() -> Iterator[None]:
    old = os.umask(0)  # as the slave runs (the master applies the program's umask)
    yield
    os.umask(old)


@pytest.fixture
def box(tmp_path: Path) -> Path:
    (tmp_path / "f").write_bytes(b"content")
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to("f")
    return tmp_path


def run(ex: Executor, op: Operation) -> int:
    return perform(ex, Call(0, 1, op)).result


def errno_of(ex: Executor, op: Operation) -> int:
    result = run(ex, op)
    assert result < 0, f"{op} succeeded"
    return -result


def opened(ex: Executor, path: bytes, flags: int, mode: int = 0o644) -> int:
    """The handle (> 0) or -errno of an open (``mode`` with O_CREAT or O_TMPFILE only,
    as the master sends it: openat2 refuses a mode otherwise)."""
    if not flags & (O_CREAT | linux.O_TMPFILE):
        mode = 0
    return run(ex, Open(dir=0, flags=flags, mode=mode, resolve=0, path=path))


# --- read-only --------------------------------------------------------------------------

WRITING = [
    Mkdir(dir=0, mode=0o755, path=b"/new"),
    Mknod(dir=0, mode=stat.S_IFIFO | 0o644, dev=0, path=b"/newfifo"),
    Unlink(dir=0, flags=0, path=b"/f"),
    Unlink(dir=0, flags=linux.AT_REMOVEDIR, path=b"/d"),
    Rename(olddir=0, newdir=0, flags=0, old=b"/f", new=b"/g"),
    Link(olddir=0, newdir=0, flags=0, old=b"/f", new=b"/g"),
    Symlink(dir=0, target=b"f", path=b"/s"),
    Chmod(dir=0, mode=0o600, flags=0, path=b"/f"),
    Chown(dir=0, uid=os.getuid(), gid=os.getgid(), flags=0, path=b"/f"),
    Truncate(dir=0, length=0, path=b"/f"),
    Utimens(dir=0, flags=0, asec=0, ansec=0, msec=0, mnsec=0, path=b"/f"),
    Setxattr(dir=0, flags=0, xflags=0, path=b"/f", name=b"user.x", value=b"1"),
    Removexattr(dir=0, flags=0, path=b"/f", name=b"user.x"),
]


@pytest.mark.parametrize("op", WRITING, ids=lambda op: type(op).__name__)
def test_read_only_refuses_every_writing_call(box: Path, op: Operation) -> None:
    before = sorted((p.name, p.lstat().st_mode, p.lstat().st_mtime_ns) for p in box.iterdir())
    ex = Executor(str(box), confinement=Confinement(read_only=True))
    try:
        assert errno_of(ex, op) == errno.EROFS
    finally:
        ex.close()
    after = sorted((p.name, p.lstat().st_mode, p.lstat().st_mtime_ns) for p in box.iterdir())
    assert after == before
    assert (box / "f").read_bytes() == b"content"


def test_read_only_opens_as_a_read_only_mount(box: Path) -> None:
    ex = Executor(str(box), confinement=Confinement(read_only=True))
    try:
        assert opened(ex, b"/f", O_RDONLY) > 0
        for flags in (O_WRONLY, O_RDWR, O_RDONLY | O_TRUNC, O_WRONLY | O_CREAT):
            assert opened(ex, b"/f", flags) == -errno.EROFS, flags
        assert opened(ex, b"/link", O_WRONLY) == -errno.EROFS  # through the symlink
        # O_CREAT of what exists opens it; of what does not, EROFS; O_EXCL: EEXIST.
        handle = opened(ex, b"/f", O_RDONLY | O_CREAT)
        assert handle > 0
        assert (
            perform(ex, Call(0, 1, Read(handle=handle, size=7, offset=0, rwf=0))).blob == b"content"
        )
        assert opened(ex, b"/missing", O_RDONLY | O_CREAT) == -errno.EROFS
        create = Create(dir=0, flags=O_RDONLY | O_CREAT, mode=0o600, resolve=0, mask=0xFFF,
                        path=b"/missing")  # fmt: skip
        assert run(ex, create) == -errno.EROFS
        assert run(ex, Create._make((*create[:-1], b"/f"))) > 0  # (there: opened to read)
        assert opened(ex, b"/f", O_RDONLY | O_CREAT | O_EXCL) == -errno.EEXIST
        assert opened(ex, b"/nodir/x", O_WRONLY | O_CREAT) == -errno.ENOENT
        assert opened(ex, b"/d", O_RDONLY | O_CREAT) == -errno.EISDIR
        assert opened(ex, b"/d", O_RDWR) == -errno.EISDIR
        assert opened(ex, b"/d", O_RDWR | linux.O_TMPFILE) == -errno.EROFS
        # A FIFO is no file system write: it opens for writing (its reader is us).
        reader = opened(ex, b"/fifo", O_RDONLY | os.O_NONBLOCK)
        writer = opened(ex, b"/fifo", O_WRONLY | os.O_NONBLOCK)
        assert reader > 0 and writer > 0
        assert run(ex, Write(handle=writer, offset=-1, rwf=0, data=b"through")) == 7
    finally:
        ex.close()
    assert sorted(p.name for p in box.iterdir()) == ["d", "f", "fifo", "link"]
    assert (box / "f").read_bytes() == b"content"


def test_read_only_still_reads_and_stats(box: Path) -> None:
    ex = Executor(str(box), confinement=Confinement(read_only=True))
    try:
        assert run(ex, Stat(dir=0, flags=0, mask=0xFFF, path=b"/f")) == 0
    finally:
        ex.close()


# --- no setuid -------------------------------------------------------------------------


def test_no_setuid_takes_the_bits_out_of_every_mode(box: Path) -> None:
    ex = Executor(str(box), confinement=Confinement(no_setuid=True))
    try:
        assert opened(ex, b"/made", O_WRONLY | O_CREAT, 0o6755) > 0
        created = Create(dir=0, flags=O_WRONLY | O_CREAT, mode=0o4755, resolve=0, mask=0xFFF,
                         path=b"/created")  # fmt: skip
        assert run(ex, created) > 0
        waited = Create._make((*created[:-1], b"/waited"))  # (in a thread: checked there too)
        assert ex.execute_blocking(waited)[0] > 0
        assert run(ex, Mkdir(dir=0, mode=0o2775, path=b"/dir")) == 0
        assert run(ex, Mknod(dir=0, mode=stat.S_IFREG | 0o4755, dev=0, path=b"/node")) == 0
        assert run(ex, Chmod(dir=0, mode=0o4755, flags=0, path=b"/f")) == 0
        assert run(ex, Chmod(dir=0, mode=0o5777, flags=0, path=b"/d")) == 0  # sticky stays
        assert run(ex, Chmod(dir=0, mode=0o6775, flags=0, path=b"/dir")) == 0
        nofollow = Chmod(dir=0, mode=0o6755, flags=linux.AT_SYMLINK_NOFOLLOW, path=b"/node")
        assert run(ex, nofollow) in (0, -errno.EOPNOTSUPP)
    finally:
        ex.close()
    assert stat.S_IMODE((box / "made").stat().st_mode) == 0o755
    assert stat.S_IMODE((box / "created").stat().st_mode) == 0o755
    assert stat.S_IMODE((box / "waited").stat().st_mode) == 0o755
    # A directory keeps its setgid bit (new files take its group: no privilege);
    # mkdir's own mode never carries it (Linux ignores it there, natively too).
    assert stat.S_IMODE((box / "dir").stat().st_mode) == 0o2775
    assert stat.S_IMODE((box / "node").stat().st_mode) == 0o755
    assert stat.S_IMODE((box / "f").stat().st_mode) == 0o755
    assert stat.S_IMODE((box / "d").stat().st_mode) == 0o1777
    assert not (box / "node").stat().st_mode & 0o6000  # by name, not following: no bits


def test_no_setuid_refuses_devices_capabilities_and_links_to_setuid_files(box: Path) -> None:
    planted = box / "suid"
    planted.write_bytes(b"#!/bin/sh\n")
    os.chmod(planted, 0o4755)  # there before the session (made natively)
    ex = Executor(str(box), confinement=Confinement(no_setuid=True))
    try:
        char = Mknod(dir=0, mode=stat.S_IFCHR | 0o666, dev=linux.new_encode_dev(1, 3),
                     path=b"/null")  # fmt: skip
        assert errno_of(ex, char) == errno.EPERM
        block = Mknod(dir=0, mode=stat.S_IFBLK | 0o666, dev=linux.new_encode_dev(7, 0),
                      path=b"/loop")  # fmt: skip
        assert errno_of(ex, block) == errno.EPERM
        assert run(ex, Mknod(dir=0, mode=stat.S_IFIFO | 0o644, dev=0, path=b"/p")) == 0
        cap = Setxattr(dir=0, flags=0, xflags=0, path=b"/f", name=b"security.capability",
                       value=b"\x01\x00\x00\x02" + bytes(16))  # fmt: skip
        assert errno_of(ex, cap) == errno.EPERM
        link = Link(olddir=0, newdir=0, flags=0, old=b"/suid", new=b"/copy")
        assert errno_of(ex, link) == errno.EPERM
        assert run(ex, Link(olddir=0, newdir=0, flags=0, old=b"/f", new=b"/f2")) == 0
    finally:
        ex.close()
    assert not (box / "null").exists() and not (box / "copy").exists()
    assert (box / "f2").exists()


def test_without_no_setuid_the_bits_stay(box: Path) -> None:
    ex = Executor(str(box))
    try:
        assert run(ex, Chmod(dir=0, mode=0o4755, flags=0, path=b"/f")) == 0
    finally:
        ex.close()
    assert stat.S_IMODE((box / "f").stat().st_mode) == 0o4755


def test_privileged_modes() -> None:
    assert privileged(stat.S_IFREG | 0o4755)
    assert privileged(stat.S_IFREG | 0o2755)
    assert not privileged(stat.S_IFREG | 0o2745)  # setgid without group x: locking
    assert not privileged(stat.S_IFDIR | 0o2775)
    assert not privileged(stat.S_IFREG | 0o755)


def test_check_leaves_other_calls_as_they_are() -> None:
    guard = Confinement(read_only=True, no_setuid=True)
    op = Open(dir=0, flags=O_RDONLY, mode=0o4755, resolve=0, path=b"/f")
    assert guard.check(op) is op  # no O_CREAT: the mode means nothing
    other = Stat(dir=0, flags=0, mask=0, path=b"/f")
    assert guard.check(other) is other
    assert not Confinement().checks and Confinement(no_setuid=True).checks


@needs_root
def test_a_root_slave_gives_up_what_keeps_a_setuid_bit(tmp_path: Path) -> None:
    # With CAP_FSETID a write by root keeps a setuid file's bit; without it the
    # kernel clears it, as for any other writer.
    target = tmp_path / "suid"
    target.write_bytes(b"x")
    os.chmod(target, 0o4755)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            conf.drop_privileges()
            with open(target, "ab") as f:
                f.write(b"y")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    # Natively (CAP_FSETID held) the same write keeps it: the test above is not vacuous.
    os.chmod(target, 0o4755)
    with open(target, "ab") as f:
        f.write(b"z")
    assert stat.S_IMODE(target.stat().st_mode) == 0o4755


# --- handles ---------------------------------------------------------------------------


def test_max_handles_is_emfile_beyond(box: Path) -> None:
    ex = Executor(str(box), confinement=Confinement(max_handles=3))
    try:
        handles = [opened(ex, b"/f", O_RDONLY) for _ in range(3)]
        assert all(h > 0 for h in handles)
        assert opened(ex, b"/f", O_RDONLY) == -errno.EMFILE
        run(ex, Open(dir=0, flags=O_RDONLY, mode=0, resolve=0, path=b"/d"))  # still EMFILE
        from fsys.protocol import Close

        perform(ex, Call(0, 0, Close(handle=handles[0])))
        assert opened(ex, b"/f", O_RDONLY) > 0  # one closed: one more
    finally:
        ex.close()
