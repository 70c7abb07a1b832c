"""Every handler, in-process: fake control device, fake memory and /proc, the real
hub, router and handlers, the real wire codec, and a real executor on a temporary
directory (the slave's root). Each test checks what the program would see (result,
errno, the bytes written into its memory) and what happened on the slave's disk."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from fsys import linux
from fsys import protocol as wire
from fsys.master.calls import HANDLERS
from fsys.master.routing import CONTINUE
from fsys.master.staging import Stage
from tests.fakes import AT_FDCWD, NO_ANSWER, FakeMemory, FakeProcess, Rig

O_RDONLY, O_WRONLY, O_RDWR = os.O_RDONLY, os.O_WRONLY, os.O_RDWR
O_CREAT, O_TRUNC, O_APPEND = os.O_CREAT, os.O_TRUNC, os.O_APPEND
IOVEC = struct.Struct("=QQ")
LOFF = struct.Struct("=q")


@pytest.fixture
def box(tmp_path: Path) -> Path:
    box = tmp_path / "box"
    box.mkdir()
    (box / "data").mkdir()
    (box / "data" / "f").write_bytes(b"0123456789")
    return box


def iovecs(p: FakeProcess, *sizes: int, fill: bytes = b"") -> tuple[int, list[int]]:
    bufs = [p.mem.alloc(fill * n if fill else n) for n in sizes]
    table = b"".join(IOVEC.pack(b, n) for b, n in zip(bufs, sizes, strict=True))
    return p.mem.alloc(table), bufs


def open_(p: FakeProcess, path: bytes, flags: int = O_RDONLY, mode: int = 0) -> int:
    fd = p.call("openat", AT_FDCWD, path, flags, mode)
    assert isinstance(fd, int) and fd >= 0, fd
    return fd


# --- routing: what stays on the master -------------------------------------------


def test_a_master_path_is_continued_without_the_slave(rig: Rig, proc: FakeProcess) -> None:
    assert proc.call("openat", AT_FDCWD, b"/usr/bin/true", O_RDONLY, 0) is CONTINUE
    assert rig.link.ops == []


def test_a_master_fd_is_continued(rig: Rig, proc: FakeProcess) -> None:
    remote = open_(proc, b"/data/f")  # a placeholder exists: each fd is looked up
    proc.fds[3] = "/usr/bin/true"
    proc.fds[4] = "socket:[1]"  # a socket, but not one of ours
    buf = proc.mem.alloc(8)
    count = len(rig.link.ops)
    assert proc.call("read", 3, buf, 8) is CONTINUE
    assert proc.call("fstat", 4, buf) is CONTINUE
    assert len(rig.link.ops) == count
    assert proc.call("read", remote, buf, 8) == 8


def test_a_call_with_no_handler_gets_the_tables_errno(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data/f")
    count = len(rig.link.ops)
    assert proc.call("connect", fd, proc.mem.alloc(16), 16) == -errno.ENOTSOCK
    assert proc.call("sendto", fd, proc.mem.alloc(4), 4, 0, 0, 0) == -errno.ENOTSOCK
    assert len(rig.link.ops) == count  # answered without the slave


# --- open, read, write -------------------------------------------------------------


def test_open_installs_a_placeholder_that_names_the_remote_file(
    rig: Rig, proc: FakeProcess
) -> None:
    fd = open_(proc, b"/data/f")
    assert fd == 0  # the lowest free number, as the kernel gives it
    assert proc.fds[fd].startswith("socket:[")
    op = rig.link.ops[-1]
    assert op == wire.Open(dir=0, flags=O_RDONLY, mode=0, resolve=0, path=b"/data/f")
    assert len(rig.placeholders) == 1


def test_open_of_a_missing_file_is_enoent(rig: Rig, proc: FakeProcess) -> None:
    assert proc.call("openat", AT_FDCWD, b"/data/missing", O_RDONLY, 0) == -errno.ENOENT
    assert proc.fds == {}


def test_open_relative_to_a_slave_cwd(rig: Rig, proc: FakeProcess) -> None:
    assert proc.call("chdir", b"/data") == 0
    fd = open_(proc, b"f")
    buf = proc.mem.alloc(4)
    assert proc.call("read", fd, buf, 4) == 4
    assert proc.mem.bytes_at(buf, 4) == b"0123"


def test_open_creates_with_the_umask_applied(rig: Rig, box: Path) -> None:
    p = rig.process(umask=0o027)
    fd = open_(p, b"/data/new", O_WRONLY | O_CREAT | O_TRUNC, 0o666)
    assert fd >= 0
    assert stat.S_IMODE((box / "data" / "new").stat().st_mode) == 0o640


def test_open_without_creat_sends_no_mode(rig: Rig, proc: FakeProcess) -> None:
    open_(proc, b"/data/f", O_RDONLY, 0o777)
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Open) and op.mode == 0


def test_legacy_open_drops_unknown_flag_bits(rig: Rig, proc: FakeProcess) -> None:
    fd = proc.call("open", b"/data/f", O_RDONLY | (1 << 40) | 0o4, 0)
    assert isinstance(fd, int) and fd >= 0
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Open) and op.flags == O_RDONLY


def test_o_path_keeps_only_its_flags(rig: Rig, proc: FakeProcess) -> None:
    flags = linux.O_PATH | O_CREAT | O_TRUNC | linux.O_NOFOLLOW
    assert isinstance(proc.call("openat", AT_FDCWD, b"/data/f", flags, 0o644), int)
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Open) and op.flags == linux.O_PATH | linux.O_NOFOLLOW


def test_creat(rig: Rig, proc: FakeProcess, box: Path) -> None:
    fd = proc.call("creat", b"/data/c", 0o600)
    assert isinstance(fd, int) and fd >= 0
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Open)
    assert op.flags == O_CREAT | O_WRONLY | O_TRUNC and op.mode == 0o600
    assert (box / "data" / "c").exists()


def test_open_cloexec_reaches_the_injection(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data/f", O_RDONLY | os.O_CLOEXEC)
    assert fd >= 0
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Open) and op.flags & os.O_CLOEXEC


def test_openat2(rig: Rig, proc: FakeProcess, box: Path) -> None:
    how = proc.mem.alloc(linux.OPEN_HOW.pack(O_WRONLY | O_CREAT, 0o640, 0))
    fd = proc.call("openat2", AT_FDCWD, b"/data/o2", how, linux.OPEN_HOW.size)
    assert isinstance(fd, int) and fd >= 0
    assert stat.S_IMODE((box / "data" / "o2").stat().st_mode) == 0o640 & ~0o022
    short = proc.call("openat2", AT_FDCWD, b"/data/o2", how, linux.OPEN_HOW.size - 1)
    assert short == -errno.EINVAL
    big = proc.mem.alloc(linux.OPEN_HOW.pack(0, 0, 0) + b"\1" + b"\0" * 7)
    assert proc.call("openat2", AT_FDCWD, b"/data/o2", big, 32) == -errno.E2BIG
    assert proc.call("openat2", AT_FDCWD, b"/data/o2", big, 8192) == -errno.E2BIG
    wide = proc.mem.alloc(linux.OPEN_HOW.pack(1 << 33, 0, 0))
    assert proc.call("openat2", AT_FDCWD, b"/data/o2", wide, 24) == -errno.EINVAL


def test_openat2_resolve_flags_apply_from_the_slave_cwd(
    rig: Rig, proc: FakeProcess, box: Path
) -> None:
    (box / "data" / "link").symlink_to("f")
    assert proc.call("chdir", b"/data") == 0

    def openat2(path: bytes, resolve: int, flags: int = os.O_RDONLY) -> int:
        how = proc.mem.alloc(linux.OPEN_HOW.pack(flags, 0, resolve))
        result = proc.call("openat2", AT_FDCWD, path, how, linux.OPEN_HOW.size)
        assert isinstance(result, int)
        return result

    handles = len(rig.executor.handles)
    fd = openat2(b"f", linux.RESOLVE_BENEATH)
    assert fd >= 0 and len(rig.executor.handles) == handles + 1  # the cwd's is closed again
    buf = proc.mem.alloc(4)
    assert proc.call("read", fd, buf, 4) == 4 and proc.mem.bytes_at(buf, 4) == b"0123"
    assert openat2(b"../data/f", linux.RESOLVE_BENEATH) == -errno.EXDEV
    assert openat2(b"link", linux.RESOLVE_NO_SYMLINKS) == -errno.ELOOP
    assert openat2(b"/data/f", linux.RESOLVE_BENEATH) == -errno.EXDEV  # absolute: never
    made = openat2(b"new", linux.RESOLVE_BENEATH, os.O_WRONLY | O_CREAT)
    assert made >= 0 and (box / "data" / "new").exists()  # created in the cwd, not the root
    assert not (box / "new").exists()


def test_read_and_file_position(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data/f")
    buf = proc.mem.alloc(16)
    assert proc.call("read", fd, buf, 4) == 4
    assert proc.call("read", fd, buf + 4, 16) == 6
    assert proc.mem.bytes_at(buf, 10) == b"0123456789"
    assert proc.call("read", fd, buf, 16) == 0


def test_read_into_a_bad_buffer_is_efault(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data/f")
    assert proc.call("read", fd, 0xDEAD0000, 4) == -errno.EFAULT
    ro = proc.mem.alloc(8, readonly=True)
    assert proc.call("read", fd, ro, 4) == -errno.EFAULT


def test_pread_does_not_move_the_position(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data/f")
    buf = proc.mem.alloc(4)
    assert proc.call("pread64", fd, buf, 3, 5) == 3
    assert proc.mem.bytes_at(buf, 3) == b"567"
    assert proc.call("read", fd, buf, 2) == 2
    assert proc.mem.bytes_at(buf, 2) == b"01"
    assert proc.call("pread64", fd, buf, 3, -1) == -errno.EINVAL


def test_readv_fills_each_buffer_in_turn(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data/f")
    iov, (a, b, c) = iovecs(proc, 3, 4, 5)
    assert proc.call("readv", fd, iov, 3) == 10
    assert proc.mem.bytes_at(a, 3) == b"012"
    assert proc.mem.bytes_at(b, 4) == b"3456"
    assert proc.mem.bytes_at(c, 5) == b"789\0\0"


def test_preadv_and_preadv2(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data/f")
    iov, (a, b) = iovecs(proc, 2, 2)
    assert proc.call("preadv", fd, iov, 2, 6, 0) == 4
    assert proc.mem.bytes_at(a, 2) + proc.mem.bytes_at(b, 2) == b"6789"
    assert proc.call("preadv2", fd, iov, 2, -1, 0, 0) == 4  # -1: the file position
    assert proc.mem.bytes_at(a, 2) + proc.mem.bytes_at(b, 2) == b"0123"
    assert proc.call("preadv2", fd, iov, 2, 2, 0, 0) == 4
    assert proc.mem.bytes_at(a, 2) + proc.mem.bytes_at(b, 2) == b"2345"
    assert proc.call("preadv2", fd, iov, 2, 0, 0, 0x10000000) == -errno.EOPNOTSUPP
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Read) and op.rwf == 0x10000000


def test_readv_checks_its_vector(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data/f")
    iov, _ = iovecs(proc, 2)
    assert proc.call("readv", fd, iov, 1025) == -errno.EINVAL
    assert proc.call("readv", fd, iov, -1) == -errno.EINVAL
    assert proc.call("readv", fd, iov, (1 << 32) + 1) == 2  # an unsigned int: 1 iovec
    huge = proc.mem.alloc(IOVEC.pack(0x1000, 1 << 63))
    assert proc.call("readv", fd, huge, 1) == -errno.EINVAL
    assert proc.call("readv", fd, 0xBAD000, 1) == -errno.EFAULT


def test_write_and_append(rig: Rig, proc: FakeProcess, box: Path) -> None:
    fd = open_(proc, b"/data/w", O_WRONLY | O_CREAT, 0o644)
    assert proc.call("write", fd, proc.mem.alloc(b"hello"), 5) == 5
    assert proc.call("pwrite64", fd, proc.mem.alloc(b"J"), 1, 0) == 1
    assert proc.call("pwrite64", fd, proc.mem.alloc(b"J"), 1, -5) == -errno.EINVAL
    assert (box / "data" / "w").read_bytes() == b"Jello"
    afd = open_(proc, b"/data/w", O_WRONLY | O_APPEND)
    assert proc.call("write", afd, proc.mem.alloc(b"!"), 1) == 1
    assert (box / "data" / "w").read_bytes() == b"Jello!"


def test_writev_joins_the_pieces_in_order(rig: Rig, proc: FakeProcess, box: Path) -> None:
    fd = open_(proc, b"/data/v", O_WRONLY | O_CREAT, 0o644)
    pieces = [b"ab", b"", b"cde", b"f"]
    bufs = [proc.mem.alloc(p) if p else 0x1000 for p in pieces]
    table = b"".join(IOVEC.pack(b, len(p)) for b, p in zip(bufs, pieces, strict=True))
    assert proc.call("writev", fd, proc.mem.alloc(table), 4) == 6
    assert (box / "data" / "v").read_bytes() == b"abcdef"
    iov = proc.mem.alloc(IOVEC.pack(bufs[0], 2) + IOVEC.pack(bufs[2], 3))
    assert proc.call("pwritev", fd, iov, 2, 1, 0) == 5
    assert (box / "data" / "v").read_bytes() == b"aabcde"
    assert proc.call("pwritev2", fd, iov, 2, -1, 0, 0) == 5  # at the position (6)
    assert (box / "data" / "v").read_bytes() == b"aabcdeabcde"


def test_a_write_from_a_bad_buffer_is_efault(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data/w", O_WRONLY | O_CREAT, 0o644)
    assert proc.call("write", fd, 0xBAD000, 4) == -errno.EFAULT


def test_large_transfers_are_split(rig: Rig, proc: FakeProcess, box: Path) -> None:
    size = wire.MAX_IO + 1000
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    fd = open_(proc, b"/data/big", O_RDWR | O_CREAT, 0o644)
    assert proc.call("write", fd, proc.mem.alloc(data), size) == size
    assert (box / "data" / "big").read_bytes() == data
    writes = [op for op in rig.link.ops if isinstance(op, wire.Write)]
    assert [len(w.data) for w in writes] == [wire.MAX_IO, 1000]
    assert [w.offset for w in writes] == [-1, -1]
    buf = proc.mem.alloc(size)
    assert proc.call("pread64", fd, buf, size, 0) == size
    assert proc.mem.bytes_at(buf, size) == data
    reads = [op for op in rig.link.ops if isinstance(op, wire.Read)]
    assert [(r.size, r.offset) for r in reads] == [(wire.MAX_IO, 0), (1000, wire.MAX_IO)]


def test_a_read_error_after_some_data_returns_the_count(rig: Rig, proc: FakeProcess) -> None:
    size = wire.MAX_IO + 10
    (rig.box / "data" / "big").write_bytes(b"x" * size)
    fd = open_(proc, b"/data/big")
    buf = proc.mem.alloc(wire.MAX_IO + 5)  # the second piece overruns the buffer
    assert proc.call("read", fd, buf, size) == wire.MAX_IO


def test_lseek(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data/f")
    assert proc.call("lseek", fd, 7, os.SEEK_SET) == 7
    assert proc.call("lseek", fd, -2, os.SEEK_CUR) == 5
    assert proc.call("lseek", fd, -1, os.SEEK_END) == 9
    assert proc.call("lseek", fd, -100, os.SEEK_SET) == -errno.EINVAL


def test_last_close_releases_the_remote_handle(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data/f")
    handle = rig.placeholders.lookup(proc.tid, fd)
    assert handle is not None and handle.handle in rig.executor.handles
    proc.close(fd)
    rig.placeholders.reap(rig.hub.release)
    rig.link.pump()
    assert handle.handle not in rig.executor.handles
    assert rig.link.ops[-1] == wire.Close(handle=handle.handle)
    assert len(rig.placeholders) == 0


def test_a_fork_keeps_the_handle_until_both_close(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data/f")
    child = proc.fork(200)
    remote = rig.placeholders.lookup(proc.tid, fd)
    assert remote is not None
    proc.close(fd)
    rig.placeholders.reap(rig.hub.release)
    rig.link.pump()
    assert remote.handle in rig.executor.handles
    buf = child.mem.alloc(3)
    assert child.call("read", fd, buf, 3) == 3
    assert child.mem.bytes_at(buf, 3) == b"012"
    child.close(fd)
    rig.placeholders.reap(rig.hub.release)
    rig.link.pump()
    assert remote.handle not in rig.executor.handles


# --- metadata -------------------------------------------------------------------------


def test_stat_family(rig: Rig, proc: FakeProcess, box: Path) -> None:
    (box / "data" / "link").symlink_to("f")
    real = (box / "data" / "f").stat()
    buf = proc.mem.alloc(144)
    assert proc.call("stat", b"/data/link", buf) == 0
    st = proc.stat_at(buf)
    assert (st.ino, st.size, st.mode) == (real.st_ino, 10, real.st_mode)
    assert proc.call("lstat", b"/data/link", buf) == 0
    assert stat.S_ISLNK(proc.stat_at(buf).mode)
    assert proc.call("newfstatat", AT_FDCWD, b"/data/link", buf, linux.AT_SYMLINK_NOFOLLOW) == 0
    assert stat.S_ISLNK(proc.stat_at(buf).mode)
    assert proc.call("newfstatat", AT_FDCWD, b"/data/link", buf, 0) == 0
    assert proc.stat_at(buf).ino == real.st_ino
    fd = open_(proc, b"/data/f")
    assert proc.call("fstat", fd, buf) == 0
    assert proc.stat_at(buf).ino == real.st_ino
    assert proc.call("newfstatat", fd, b"", buf, linux.AT_EMPTY_PATH) == 0
    assert proc.stat_at(buf).ino == real.st_ino
    assert proc.call("stat", b"/data/nope", buf) == -errno.ENOENT
    assert proc.call("stat", b"/data/f", 0xBAD000) == -errno.EFAULT


def test_statx(rig: Rig, proc: FakeProcess, box: Path) -> None:
    buf = proc.mem.alloc(256)
    assert proc.call("statx", AT_FDCWD, b"/data/f", 0, linux.STATX_BASIC_STATS, buf) == 0
    raw = proc.mem.bytes_at(buf, 256)
    assert linux.statx_size(raw) == 10
    assert stat.S_ISREG(linux.statx_mode(raw))
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Stat) and op.mask == linux.STATX_BASIC_STATS


def test_getdents64(rig: Rig, proc: FakeProcess, box: Path) -> None:
    for name in ("a", "b", "c"):
        (box / "data" / name).touch()
    fd = open_(proc, b"/data", O_RDONLY | os.O_DIRECTORY)
    buf = proc.mem.alloc(4096)
    n = proc.call("getdents64", fd, buf, 4096)
    assert isinstance(n, int) and n > 0
    raw = proc.mem.bytes_at(buf, n)
    names = set()
    pos = 0
    while pos < n:
        reclen = struct.unpack_from("=H", raw, pos + 16)[0]
        names.add(raw[pos + 19 : pos + reclen].split(b"\0")[0])
        pos += reclen
    assert names == {b".", b"..", b"a", b"b", b"c", b"f"}
    assert proc.call("getdents64", fd, buf, 4096) == 0


def test_access(rig: Rig, proc: FakeProcess, box: Path) -> None:
    assert proc.call("access", b"/data/f", os.R_OK) == 0
    assert proc.call("faccessat", AT_FDCWD, b"/data/f", os.R_OK) == 0
    assert proc.call("faccessat2", AT_FDCWD, b"/data/nope", os.F_OK, 0) == -errno.ENOENT
    op = rig.link.ops[-1]
    assert op == wire.Access(dir=0, mode=os.F_OK, flags=0, path=b"/data/nope")
    proc.call("faccessat2", AT_FDCWD, b"/data/f", os.R_OK, linux.AT_EACCESS)
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Access) and op.flags == linux.AT_EACCESS and op.mode == os.R_OK


def test_readlink(rig: Rig, proc: FakeProcess, box: Path) -> None:
    (box / "data" / "l").symlink_to("some/target")
    buf = proc.mem.alloc(64)
    assert proc.call("readlink", b"/data/l", buf, 64) == 11
    assert proc.mem.bytes_at(buf, 11) == b"some/target"
    assert proc.call("readlinkat", AT_FDCWD, b"/data/l", buf, 4) == 4  # truncated
    assert proc.mem.bytes_at(buf, 4) == b"some"
    assert proc.call("readlink", b"/data/l", buf, 0) == -errno.EINVAL
    assert proc.call("readlink", b"/data/f", buf, 64) == -errno.EINVAL
    # readlinkat(fd, "") reads the link an O_PATH fd names, with no flag to say so.
    link = open_(proc, b"/data/l", linux.O_PATH | os.O_NOFOLLOW)
    assert proc.call("readlinkat", link, b"", buf, 64) == 11
    assert proc.mem.bytes_at(buf, 11) == b"some/target"


def test_mkdir_keeps_the_sticky_bit_and_applies_the_umask(rig: Rig, box: Path) -> None:
    p = rig.process(umask=0o022)
    assert p.call("mkdir", b"/data/d", 0o1777) == 0
    assert stat.S_IMODE((box / "data" / "d").stat().st_mode) == 0o1755
    assert p.call("mkdirat", AT_FDCWD, b"/data/e", 0o7777) == 0
    assert stat.S_IMODE((box / "data" / "e").stat().st_mode) == 0o1755  # no setuid/gid
    assert p.call("mkdir", b"/data/d", 0o755) == -errno.EEXIST


def test_mknod_makes_a_fifo(rig: Rig, proc: FakeProcess, box: Path) -> None:
    assert proc.call("mknod", b"/data/fifo", stat.S_IFIFO | 0o666, 0) == 0
    st = (box / "data" / "fifo").stat()
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert proc.call("mknodat", AT_FDCWD, b"/data/chr", stat.S_IFCHR | 0o600, 0x103) == (
        -errno.EPERM
    )  # no device nodes inside --root


def test_unlink_rmdir(rig: Rig, proc: FakeProcess, box: Path) -> None:
    (box / "data" / "d").mkdir()
    assert proc.call("unlink", b"/data/d") == -errno.EISDIR
    assert proc.call("rmdir", b"/data/f") == -errno.ENOTDIR
    assert proc.call("unlinkat", AT_FDCWD, b"/data/d", linux.AT_REMOVEDIR) == 0
    assert proc.call("unlinkat", AT_FDCWD, b"/data/f", 0x1) == -errno.EINVAL
    assert proc.call("unlink", b"/data/f") == 0
    assert sorted(os.listdir(box / "data")) == []


def test_rename_and_link(rig: Rig, proc: FakeProcess, box: Path) -> None:
    assert proc.call("rename", b"/data/f", b"/data/g") == 0
    assert (box / "data" / "g").read_bytes() == b"0123456789"
    assert proc.call("link", b"/data/g", b"/data/h") == 0
    assert (box / "data" / "h").stat().st_nlink == 2
    assert proc.call("renameat2", AT_FDCWD, b"/data/g", AT_FDCWD, b"/data/h", 1) == -errno.EEXIST
    assert proc.call("linkat", AT_FDCWD, b"/data/g", AT_FDCWD, b"/data/i", 0) == 0
    op = rig.link.ops[-1]
    assert op == wire.Link(olddir=0, newdir=0, flags=0, old=b"/data/g", new=b"/data/i")
    assert proc.call("renameat", AT_FDCWD, b"/data/i", AT_FDCWD, b"/data/j") == 0
    assert isinstance(rig.link.ops[-1], wire.Rename)


def test_rename_across_the_sides_is_exdev(rig: Rig, proc: FakeProcess) -> None:
    assert proc.call("rename", b"/data/f", b"/usr/f") == -errno.EXDEV
    assert proc.call("rename", b"/usr/f", b"/data/f") == -errno.EXDEV
    assert proc.call("link", b"/data/f", b"/usr/f") == -errno.EXDEV


def test_symlink(rig: Rig, proc: FakeProcess, box: Path) -> None:
    assert proc.call("symlink", b"../x/y", b"/data/s") == 0
    assert os.readlink(box / "data" / "s") == "../x/y"
    assert proc.call("symlinkat", b"f", AT_FDCWD, b"/data/t") == 0
    assert (box / "data" / "t").read_bytes() == b"0123456789"


def test_chmod_family(rig: Rig, proc: FakeProcess, box: Path) -> None:
    f = box / "data" / "f"
    assert proc.call("chmod", b"/data/f", 0o100640) == 0
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    assert proc.call("fchmodat", AT_FDCWD, b"/data/f", 0o4600) == 0
    assert stat.S_IMODE(f.stat().st_mode) == 0o4600
    fd = open_(proc, b"/data/f")
    assert proc.call("fchmod", fd, 0o604) == 0
    assert stat.S_IMODE(f.stat().st_mode) == 0o604
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Chmod) and op.flags == linux.AT_EMPTY_PATH and op.path == b""
    (box / "data" / "l").symlink_to("f")
    assert proc.call("fchmodat2", AT_FDCWD, b"/data/l", 0o600, 0) == 0
    assert stat.S_IMODE(f.stat().st_mode) == 0o600


def test_chown_family(rig: Rig, proc: FakeProcess, box: Path) -> None:
    (box / "data" / "l").symlink_to("f")
    uid, gid = os.getuid(), os.getgid()
    assert proc.call("chown", b"/data/f", uid, gid) == 0
    assert rig.link.ops[-1] == wire.Chown(dir=0, uid=uid, gid=gid, flags=0, path=b"/data/f")
    assert proc.call("lchown", b"/data/l", -1, gid) == 0
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Chown)
    assert (op.uid, op.gid, op.flags) == (-1, gid, linux.AT_SYMLINK_NOFOLLOW)
    fd = open_(proc, b"/data/f")
    assert proc.call("fchown", fd, uid, -1) == 0
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Chown) and (op.uid, op.gid, op.flags) == (
        uid,
        -1,
        linux.AT_EMPTY_PATH,
    )
    flags = linux.AT_SYMLINK_NOFOLLOW
    assert proc.call("fchownat", AT_FDCWD, b"/data/l", uid, gid, flags) == 0
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Chown) and op.flags == flags and op.path == b"/data/l"


def test_truncate_ftruncate(rig: Rig, proc: FakeProcess, box: Path) -> None:
    assert proc.call("truncate", b"/data/f", 4) == 0
    assert (box / "data" / "f").read_bytes() == b"0123"
    assert proc.call("truncate", b"/data/f", -1) == -errno.EINVAL
    fd = open_(proc, b"/data/f", O_WRONLY)
    assert proc.call("ftruncate", fd, 2) == 0
    assert (box / "data" / "f").read_bytes() == b"01"
    assert proc.call("ftruncate", fd, -2) == -errno.EINVAL


def test_fsync_family(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data/f", O_WRONLY)
    assert proc.call("fsync", fd) == 0
    assert proc.call("fdatasync", fd) == 0
    assert proc.call("syncfs", fd) == 0
    assert proc.call("sync_file_range", fd, 0, 0, 0) == 0
    assert rig.link.ops[-4:] == [
        wire.Fsync(handle=1, datasync=0),
        wire.Fsync(handle=1, datasync=1),
        wire.Syncfs(handle=1),
        wire.Fsync(handle=1, datasync=1),
    ]


def test_utimensat_and_friends(rig: Rig, proc: FakeProcess, box: Path) -> None:
    f = box / "data" / "f"
    times = proc.mem.alloc(struct.pack("=qqqq", 1000, 5, 2000, 7))
    assert proc.call("utimensat", AT_FDCWD, b"/data/f", times, 0) == 0
    st = f.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (1000 * 10**9 + 5, 2000 * 10**9 + 7)
    bad = proc.mem.alloc(struct.pack("=qqqq", 0, 10**9, 0, 0))
    assert proc.call("utimensat", AT_FDCWD, b"/data/f", bad, 0) == -errno.EINVAL
    assert proc.call("utimensat", AT_FDCWD, b"/data/f", times, 0x4) == -errno.EINVAL
    tv = proc.mem.alloc(struct.pack("=qqqq", 3000, 1, 4000, 2))
    assert proc.call("utimes", b"/data/f", tv) == 0
    st = f.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (3000 * 10**9 + 1000, 4000 * 10**9 + 2000)
    assert proc.call("futimesat", AT_FDCWD, b"/data/f", tv) == 0
    badtv = proc.mem.alloc(struct.pack("=qqqq", 0, 10**6, 0, 0))
    assert proc.call("utimes", b"/data/f", badtv) == -errno.EINVAL
    ub = proc.mem.alloc(struct.pack("=qq", 5000, 6000))
    assert proc.call("utime", b"/data/f", ub) == 0
    assert f.stat().st_mtime_ns == 6000 * 10**9
    fd = open_(proc, b"/data/f")
    assert proc.call("utimensat", fd, 0, 0, 0) == 0  # NULL path: the fd itself, now
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Utimens)
    assert op.flags == linux.AT_EMPTY_PATH and (op.ansec, op.mnsec) == (
        linux.UTIME_NOW,
        linux.UTIME_NOW,
    )
    # NULL with AT_FDCWD names nothing: EFAULT, as natively, in a slave cwd too.
    assert proc.call("chdir", b"/data") == 0
    before = len(rig.link.ops)
    assert proc.call("utimensat", AT_FDCWD, 0, 0, 0) == -errno.EFAULT
    assert len(rig.link.ops) == before


def test_statfs(rig: Rig, proc: FakeProcess) -> None:
    buf = proc.mem.alloc(linux.STATFS.size)
    assert proc.call("statfs", b"/data", buf) == 0
    native = os.statvfs(rig.box)
    _type, bsize, blocks = struct.unpack_from("=qqQ", proc.mem.bytes_at(buf, 24))
    assert (bsize, blocks) == (native.f_bsize, native.f_blocks)
    fd = open_(proc, b"/data/f")
    assert proc.call("fstatfs", fd, buf) == 0
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Statfs) and op.flags == linux.AT_EMPTY_PATH


# --- descriptors ------------------------------------------------------------------


def test_fcntl(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data/f", O_RDWR)
    flags = proc.call("fcntl", fd, linux.F_GETFL, 0)
    assert isinstance(flags, int) and flags & os.O_ACCMODE == O_RDWR
    assert proc.call("fcntl", fd, linux.F_SETFL, os.O_NONBLOCK) == 0
    assert proc.call("fcntl", fd, 1025, 0) == 2  # F_GETLEASE: no lease
    assert proc.call("fcntl", fd, 1032, 0) == -errno.EBADF  # F_GETPIPE_SZ: not a pipe
    assert proc.call("fcntl", fd, 9999, 0) == -errno.EINVAL


def test_record_locks(rig: Rig, proc: FakeProcess) -> None:
    a = open_(proc, b"/data/f", O_RDWR)
    b = open_(proc, b"/data/f", O_RDWR)
    lock = proc.mem.alloc(linux.FLOCK.pack(1, 0, 0, 5, 0))  # F_WRLCK over 0..5
    assert proc.call("fcntl", a, linux.F_SETLK, lock) == 0
    assert proc.call("fcntl", b, linux.F_SETLK, lock) == -errno.EAGAIN
    probe = proc.mem.alloc(linux.FLOCK.pack(1, 0, 0, 5, 0))
    assert proc.call("fcntl", b, linux.F_GETLK, probe) == 0
    assert linux.FLOCK.unpack(proc.mem.bytes_at(probe, linux.FLOCK.size))[0] == 1
    assert proc.call("fcntl", b, linux.F_GETLK, 0xBAD000) == -errno.EFAULT


def test_flock(rig: Rig, proc: FakeProcess) -> None:
    a = open_(proc, b"/data/f")
    b = open_(proc, b"/data/f")
    assert proc.call("flock", a, 2) == 0  # LOCK_EX
    assert proc.call("flock", b, 2 | 4) == -errno.EWOULDBLOCK  # LOCK_EX|LOCK_NB
    assert proc.call("flock", a, 8) == 0  # LOCK_UN
    assert proc.call("flock", b, 2 | 4) == 0


def test_ioctl(rig: Rig, proc: FakeProcess, box: Path) -> None:
    fd = open_(proc, b"/data/f")
    out = proc.mem.alloc(8)
    assert proc.call("ioctl", fd, 0x541B, out) == 0  # FIONREAD
    assert struct.unpack("=i", proc.mem.bytes_at(out, 4))[0] == 10
    native = bytearray(8)
    with open(box / "data" / "f", "rb") as f:
        fcntl.ioctl(f, 0x5460, native, True)
    assert proc.call("ioctl", fd, 0x5460, out) == 0  # FIOQSIZE
    assert proc.mem.bytes_at(out, 8) == bytes(native)
    one = proc.mem.alloc(struct.pack("=i", 1))
    assert proc.call("ioctl", fd, 0x5421, one) == 0  # FIONBIO
    assert rig.link.ops[-1] == wire.Ioctl(handle=1, request=0x5421, arg=1)
    assert proc.call("ioctl", fd, 0x5401, out) == -errno.ENOTTY  # TCGETS
    assert proc.call("ioctl", fd, 0x40049409, 55) == -errno.EXDEV  # FICLONE from a master fd


def test_fallocate_and_advice(rig: Rig, proc: FakeProcess, box: Path) -> None:
    fd = open_(proc, b"/data/f", O_RDWR)
    assert proc.call("fallocate", fd, 0, 0, 100) == 0
    assert (box / "data" / "f").stat().st_size == 100
    assert rig.link.ops[-1] == wire.Fallocate(handle=1, mode=0, offset=0, length=100)
    count = len(rig.link.ops)
    assert proc.call("fadvise64", fd, 0, 0, 2) == 0
    assert proc.call("fadvise64", fd, 0, 0, 6) == -errno.EINVAL
    assert proc.call("readahead", fd, 0, 10) == 0
    assert len(rig.link.ops) == count  # advice costs no round trip


def test_copy_file_range_advances_both_offsets(rig: Rig, proc: FakeProcess, box: Path) -> None:
    src = open_(proc, b"/data/f")
    dst = open_(proc, b"/data/copy", O_WRONLY | O_CREAT, 0o644)
    off_in = proc.mem.alloc(LOFF.pack(2))
    off_out = proc.mem.alloc(LOFF.pack(1))
    assert proc.call("copy_file_range", src, off_in, dst, off_out, 4, 0) == 4
    assert LOFF.unpack(proc.mem.bytes_at(off_in, 8))[0] == 6
    assert LOFF.unpack(proc.mem.bytes_at(off_out, 8))[0] == 5
    assert (box / "data" / "copy").read_bytes() == b"\x002345"
    assert proc.call("copy_file_range", src, 0, dst, 0, 3, 0) == 3  # at the positions
    assert (box / "data" / "copy").read_bytes() == b"01245"
    assert proc.call("copy_file_range", src, 0, dst, 0, 3, 0) == 3  # they moved
    assert (box / "data" / "copy").read_bytes() == b"012345"
    neg = proc.mem.alloc(LOFF.pack(-1))
    assert proc.call("copy_file_range", src, neg, dst, 0, 3, 0) == -errno.EINVAL
    proc.fds[9] = "/usr/bin/true"
    assert proc.call("copy_file_range", src, 0, 9, 0, 3, 0) == -errno.EXDEV


def test_sendfile(rig: Rig, proc: FakeProcess, box: Path) -> None:
    src = open_(proc, b"/data/f")
    out = open_(proc, b"/data/sent", O_WRONLY | O_CREAT, 0o644)
    offset = proc.mem.alloc(LOFF.pack(3))
    assert proc.call("sendfile", out, src, offset, 4) == 4
    assert LOFF.unpack(proc.mem.bytes_at(offset, 8))[0] == 7
    assert (box / "data" / "sent").read_bytes() == b"3456"
    r, w = os.pipe()
    proc.own(9, w)  # a master pipe: fmhub copies into it
    assert proc.call("sendfile", 9, src, offset, 2) == 2
    assert os.read(r, 10) == b"78"
    assert LOFF.unpack(proc.mem.bytes_at(offset, 8))[0] == 9
    assert proc.call("sendfile", 8, src, 0, 4) == -errno.EBADF  # no such master fd
    dirfd = open_(proc, b"/data")
    assert proc.call("sendfile", 9, dirfd, 0, 4) == -errno.EINVAL  # not a regular file
    os.close(r)
    os.close(w)


def test_splice_between_a_slave_file_and_a_master_pipe(
    rig: Rig, proc: FakeProcess, box: Path
) -> None:
    src = open_(proc, b"/data/f", O_RDWR)
    r, w = os.pipe()
    proc.own(7, r)
    proc.own(8, w)
    off = proc.mem.alloc(LOFF.pack(2))
    assert proc.call("splice", src, off, 8, 0, 3, 0) == 3
    assert os.read(r, 10) == b"234" and LOFF.unpack(proc.mem.bytes_at(off, 8))[0] == 5
    assert proc.call("splice", src, 0, 8, off, 3, 0) == -errno.ESPIPE
    os.write(w, b"AB")
    assert proc.call("splice", 7, 0, src, 0, 10, 0) == 2  # at the file position: 0
    assert (box / "data" / "f").read_bytes() == b"AB23456789"
    # An empty pipe: a non-blocking splice says so (a blocking one waits in fmhub).
    with watchdog(lambda: os.write(w, b"!")):
        assert proc.call("splice", 7, 0, src, 0, 10, 0x02) == -errno.EAGAIN
    assert proc.call("splice", src, 0, src, 0, 10, 0) == -errno.EINVAL  # no pipe at all
    os.close(r)
    os.close(w)


def test_splice_and_sendfile_refuse_what_the_kernel_refuses(
    rig: Rig, proc: FakeProcess, box: Path, tmp_path: Path
) -> None:
    """As natively (checked on this kernel): splice wants a pipe at one end and known
    flags; sendfile reads only from a file that supports mmap-like reads."""
    src = open_(proc, b"/data/f", O_RDWR)
    a, b = socket.socketpair()
    proc.own(9, a.fileno())
    r, w = os.pipe()
    proc.own(7, r)
    proc.own(8, w)
    (tmp_path / "m").write_bytes(b"master file")
    m = os.open(tmp_path / "m", os.O_RDONLY)
    proc.own(6, m)
    assert proc.call("splice", src, 0, 9, 0, 3, 0) == -errno.EINVAL  # into a socket
    assert proc.call("splice", 6, 0, src, 0, 3, 0) == -errno.EINVAL  # from a master file
    assert proc.call("splice", src, 0, 8, 0, 3, 0x100) == -errno.EINVAL  # unknown flag
    assert proc.call("splice", src, 0, 8, 0, 3, 0x04) == 3  # SPLICE_F_MORE is known
    os.write(w, b"xyz")
    assert proc.call("sendfile", src, 7, 0, 3) == -errno.EINVAL  # from a pipe
    b.send(b"q")
    assert proc.call("sendfile", src, 9, 0, 1) == -errno.EINVAL  # from a socket
    assert proc.call("sendfile", src, 6, 0, 6) == 6  # from a master file
    assert (box / "data" / "f").read_bytes()[:9] == b"012master"  # at its position
    for fd in (r, w, m):
        os.close(fd)
    a.close()
    b.close()


# --- sendfile and splice with a master fd -------------------------------------------
# The program's own pipe, socket or file (fmhub writes into, or reads from, its copy of
# it): what fits now, waiting for readiness as the kernel would, and the kernel's errors.

BIG = bytes(range(256)) * 400
SPLICE_F_NONBLOCK = 0x02
F_GETPIPE_SZ = 1032


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


@pytest.fixture
def small_socket(
    proc: FakeProcess, sockets: tuple[socket.socket, socket.socket]
) -> tuple[socket.socket, socket.socket, int]:
    """The program's master socket at fd 9 (a small send buffer, soon full), its peer,
    and an open slave file to send from."""
    a, b = sockets
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    proc.own(9, a.fileno())
    return a, b, open_(proc, b"/data/f")


def loff(p: FakeProcess, addr: int) -> int:
    value: int = LOFF.unpack(p.mem.bytes_at(addr, LOFF.size))[0]
    return value


def position(p: FakeProcess, fd: int) -> int:
    pos = p.call("lseek", fd, 0, os.SEEK_CUR)
    assert isinstance(pos, int) and pos >= 0, pos
    return pos


def drain(fd: int) -> bytes:
    """Everything queued in a pipe or socket, read without blocking."""
    out = bytearray()
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def fill(fd: int) -> None:
    """Write into a pipe or socket until one more byte would block."""
    blocking = os.get_blocking(fd)
    os.set_blocking(fd, False)
    try:
        while True:
            os.write(fd, b"z" * 4096)
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(fd, blocking)


@contextmanager
def watchdog(unblock: Callable[[], object]) -> Iterator[None]:
    """fmhub must never block on the program's pipe or socket: if it does, ``unblock``
    it (drain the pipe, or feed it) after a second, and keep at it, so that the test
    fails where it would hang."""
    done = threading.Event()

    def watch() -> None:
        if not done.wait(1.0):
            while not done.wait(0.01):
                unblock()

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def test_sendfile_into_a_master_socket(
    rig: Rig, proc: FakeProcess, sockets: tuple[socket.socket, socket.socket]
) -> None:
    a, b = sockets
    proc.own(9, a.fileno())
    src = open_(proc, b"/data/f")
    off = proc.mem.alloc(LOFF.pack(2))
    before = len(rig.link.ops)
    assert proc.call("sendfile", 9, src, off, 5) == 5
    assert b.recv(100) == b"23456" and loff(proc, off) == 7
    # All of it fit: one plain read of the slave file, nothing given back.
    (read,) = rig.link.ops[before:]
    assert isinstance(read, wire.Read) and (read.size, read.offset, read.rwf) == (5, 2, 0)
    assert position(proc, src) == 0
    assert proc.call("sendfile", 9, src, 0, 3) == 3  # at the file position, which moves
    assert b.recv(100) == b"012" and position(proc, src) == 3


def test_sendfile_into_a_full_master_socket_takes_what_fits(
    rig: Rig, proc: FakeProcess, box: Path, sockets: tuple[socket.socket, socket.socket]
) -> None:
    (box / "data" / "big").write_bytes(BIG)
    a, b = sockets
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    proc.own(9, a.fileno())
    src = open_(proc, b"/data/big")
    with watchdog(lambda: drain(b.fileno())):
        n = proc.call("sendfile", 9, src, 0, len(BIG))
    assert isinstance(n, int) and 0 < n < len(BIG)  # a partial count, as the kernel's
    assert drain(b.fileno()) == BIG[:n]
    assert position(proc, src) == n  # what the socket did not take went back to the file
    off = proc.mem.alloc(LOFF.pack(0))
    with watchdog(lambda: drain(b.fileno())):
        m = proc.call("sendfile", 9, src, off, len(BIG))
    assert isinstance(m, int) and 0 < m < len(BIG)
    assert drain(b.fileno()) == BIG[:m]
    assert loff(proc, off) == m and position(proc, src) == n  # at an offset: it stays


def test_sendfile_into_a_master_file(rig: Rig, proc: FakeProcess, tmp_path: Path) -> None:
    (tmp_path / "m").write_bytes(b"master")
    master = os.open(tmp_path / "m", O_RDWR)
    try:
        os.lseek(master, 2, os.SEEK_SET)
        proc.own(5, master)
        src = open_(proc, b"/data/f")
        off = proc.mem.alloc(LOFF.pack(6))
        assert proc.call("sendfile", 5, src, off, 3) == 3  # at the master file's position
        assert (tmp_path / "m").read_bytes() == b"ma678r"
        assert os.lseek(master, 0, os.SEEK_CUR) == 5 and loff(proc, off) == 9
    finally:
        os.close(master)


def test_a_master_socket_filled_meanwhile_gives_eagain(
    rig: Rig, proc: FakeProcess, sockets: tuple[socket.socket, socket.socket]
) -> None:
    a, b = sockets
    a.setblocking(False)  # O_NONBLOCK: the program asks for EAGAIN, not a wait
    proc.own(9, a.fileno())
    src = open_(proc, b"/data/f")

    def another_writer(op: wire.Operation) -> None:  # between fmhub's look and its write
        if isinstance(op, wire.Read):
            fill(a.fileno())

    rig.link.on_perform = another_writer
    assert proc.call("sendfile", 9, src, 0, 4) == -errno.EAGAIN
    rig.link.on_perform = None
    assert position(proc, src) == 0  # the bytes read for it went back
    assert set(drain(b.fileno())) == {ord("z")}


def test_a_non_blocking_master_pipe_filled_meanwhile_gives_eagain(
    rig: Rig, proc: FakeProcess, pipe: tuple[int, int]
) -> None:
    r, w = pipe
    os.set_blocking(w, False)
    proc.own(9, w)
    src = open_(proc, b"/data/f")
    rig.link.on_perform = lambda op: fill(w) if isinstance(op, wire.Read) else None
    assert proc.call("sendfile", 9, src, 0, 4) == -errno.EAGAIN
    rig.link.on_perform = None
    assert position(proc, src) == 0
    assert set(drain(r)) == {ord("z")}


async def test_a_blocking_master_pipe_filled_meanwhile_is_waited_for_again(
    rig: Rig, proc: FakeProcess, pipe: tuple[int, int]
) -> None:
    """Another writer fills the pipe while the slave reads: fmhub's write must not
    block it (every process's calls go through it); the call waits for room again."""
    r, w = pipe
    proc.own(9, w)
    src = open_(proc, b"/data/f")
    off = proc.mem.alloc(LOFF.pack(1))
    async with trio.open_nursery() as nursery:
        rig.processes.by_tgid[proc.tgid].nursery = nursery
        rig.link.on_perform = lambda op: fill(w) if isinstance(op, wire.Read) else None
        # SPLICE_F_NONBLOCK: EAGAIN, not a wait, and the bytes go back.
        with watchdog(lambda: drain(r)):
            assert proc.call("splice", src, 0, 9, 0, 4, SPLICE_F_NONBLOCK) == -errno.EAGAIN
        assert position(proc, src) == 0
        drain(r)
        with watchdog(lambda: drain(r)):
            assert proc.call("sendfile", 9, src, off, 4) is NO_ANSWER
        rig.link.on_perform = None
        await trio.testing.wait_all_tasks_blocked()
        assert loff(proc, off) == 1
        assert set(drain(r)) == {ord("z")}
        assert await rig.wait_answer() == 4
        assert os.read(r, 10) == b"1234" and loff(proc, off) == 5


async def test_a_blocking_master_socket_filled_meanwhile_is_waited_for_again(
    rig: Rig, proc: FakeProcess, small_socket: tuple[socket.socket, socket.socket, int]
) -> None:
    a, b, src = small_socket
    async with trio.open_nursery() as nursery:
        rig.processes.by_tgid[proc.tgid].nursery = nursery
        rig.link.on_perform = lambda op: fill(a.fileno()) if isinstance(op, wire.Read) else None
        with watchdog(lambda: drain(b.fileno())):
            assert proc.call("sendfile", 9, src, 0, 4) is NO_ANSWER
        rig.link.on_perform = None
        await trio.testing.wait_all_tasks_blocked()
        assert set(drain(b.fileno())) == {ord("z")}
        assert await rig.wait_answer() == 4
        assert b.recv(10) == b"0123" and position(proc, src) == 4


def test_sendfile_into_a_master_pipe_reads_only_what_fits(
    rig: Rig, proc: FakeProcess, box: Path, pipe: tuple[int, int]
) -> None:
    (box / "data" / "big").write_bytes(BIG)
    r, w = pipe
    os.set_blocking(w, False)  # a wrong count makes a short write here, not a hang
    os.write(w, b"q" * 40000)
    room = fcntl.fcntl(w, F_GETPIPE_SZ) - 40000
    proc.own(9, w)
    src = open_(proc, b"/data/big")
    before = len(rig.link.ops)
    assert proc.call("sendfile", 9, src, 0, len(BIG)) == room
    (read,) = rig.link.ops[before:]  # no more read than fits: nothing to give back
    assert isinstance(read, wire.Read) and (read.size, read.offset) == (room, -1)
    assert drain(r) == b"q" * 40000 + BIG[:room]
    assert position(proc, src) == room
    assert proc.call("sendfile", 9, src, 0, 1) == 1  # a count smaller than the room
    assert drain(r) == BIG[room : room + 1]


def test_sendfile_and_splice_of_nothing(rig: Rig, proc: FakeProcess, pipe: tuple[int, int]) -> None:
    """A count of 0 and a read at the end of the file: 0, nothing moved (as natively)."""
    r, w = pipe
    proc.own(9, w)
    src = open_(proc, b"/data/f")
    off = proc.mem.alloc(LOFF.pack(3))
    assert proc.call("sendfile", 9, src, off, 0) == 0 and loff(proc, off) == 3
    assert proc.call("splice", src, off, 9, 0, 0, 0) == 0 and loff(proc, off) == 3
    end = proc.mem.alloc(LOFF.pack(10))
    assert proc.call("sendfile", 9, src, end, 5) == 0 and loff(proc, end) == 10
    assert proc.call("lseek", src, 10, os.SEEK_SET) == 10
    assert proc.call("sendfile", 9, src, 0, 5) == 0 and position(proc, src) == 10
    assert drain(r) == b""
    fill(w)
    # splice(2) answers a length of 0 before it looks at anything else.
    assert proc.call("splice", src, 0, 9, 0, 0, SPLICE_F_NONBLOCK) == 0
    assert proc.call("splice", src, 0, src, 0, 0, 0) == 0


def test_transfers_check_the_master_fd_as_the_kernel_does(
    rig: Rig, proc: FakeProcess, pipe: tuple[int, int], tmp_path: Path
) -> None:
    r, w = pipe
    proc.own(7, r)
    proc.own(8, w)
    src = open_(proc, b"/data/f", O_RDWR)
    # A pipe's read end takes nothing in, its write end gives nothing out: EBADF at once.
    assert proc.call("sendfile", 7, src, 0, 4) == -errno.EBADF
    assert proc.call("splice", src, 0, 7, 0, 4, 0) == -errno.EBADF
    os.write(w, b"xy")
    assert proc.call("splice", 8, 0, src, 0, 4, 0) == -errno.EBADF
    assert drain(r) == b"xy"
    (tmp_path / "m").write_bytes(b"master")
    path_fd = os.open(tmp_path / "m", os.O_PATH)
    try:
        proc.own(5, path_fd)  # an O_PATH fd neither reads nor writes
        assert proc.call("sendfile", src, 5, 0, 4) == -errno.EBADF
        assert proc.call("sendfile", 5, src, 0, 4) == -errno.EBADF
    finally:
        os.close(path_fd)
    negative = proc.mem.alloc(LOFF.pack(-1))
    assert proc.call("sendfile", 8, src, negative, 4) == -errno.EINVAL
    assert proc.call("splice", src, negative, 8, 0, 4, 0) == -errno.EINVAL
    closed_r, closed_w = os.pipe()
    os.close(closed_r)
    try:
        proc.own(6, closed_w)  # nobody reads it: EPIPE, and the file position stays
        signals = len(rig.procfs.signals)
        assert proc.call("sendfile", 6, src, 0, 4) == -errno.EPIPE
        assert proc.call("splice", src, 0, 6, 0, 4, 0) == -errno.EPIPE
        assert position(proc, src) == 0
        # and SIGPIPE to the calling thread, each time, as the kernel sends it
        assert rig.procfs.signals[signals:] == [(proc.tid, signal.SIGPIPE)] * 2
    finally:
        os.close(closed_w)
    assert drain(r) == b""


def test_sendfile_from_a_master_file_to_a_slave_file(
    rig: Rig, proc: FakeProcess, box: Path, tmp_path: Path
) -> None:
    (tmp_path / "m").write_bytes(b"abcdefghij")
    master = os.open(tmp_path / "m", O_RDWR)
    try:
        os.lseek(master, 3, os.SEEK_SET)
        proc.own(5, master)
        out = open_(proc, b"/data/out", O_WRONLY | O_CREAT, 0o644)
        off = proc.mem.alloc(LOFF.pack(0))
        before = len(rig.link.ops)
        assert proc.call("sendfile", out, 5, off, 4) == 4  # at offset 0: its position stays
        (write,) = rig.link.ops[before:]
        assert isinstance(write, wire.Write) and (write.offset, write.rwf) == (-1, 0)
        assert (box / "data" / "out").read_bytes() == b"abcd" and loff(proc, off) == 4
        assert os.lseek(master, 0, os.SEEK_CUR) == 3
        assert proc.call("sendfile", out, 5, 0, 4) == 4  # at its position, which moves
        assert (box / "data" / "out").read_bytes() == b"abcddefg"
        assert os.lseek(master, 0, os.SEEK_CUR) == 7
        tail = proc.mem.alloc(LOFF.pack(8))
        assert proc.call("sendfile", out, 5, tail, 4) == 2 and loff(proc, tail) == 10
        before = len(rig.link.ops)
        assert proc.call("sendfile", out, 5, tail, 4) == 0 and loff(proc, tail) == 10
        assert rig.link.ops[before:] == []  # at its end: nothing to ask the slave
        assert (box / "data" / "out").read_bytes() == b"abcddefgij"
    finally:
        os.close(master)


async def test_a_blocking_transfer_waits_for_the_master_pipe(
    rig: Rig, proc: FakeProcess, box: Path, pipe: tuple[int, int]
) -> None:
    r, w = pipe
    proc.own(7, r)
    proc.own(8, w)
    src = open_(proc, b"/data/f", O_RDWR)
    off = proc.mem.alloc(LOFF.pack(2))
    async with trio.open_nursery() as nursery:
        rig.processes.by_tgid[proc.tgid].nursery = nursery  # its pairing's task tree
        fill(w)
        # Non-blocking (SPLICE_F_NONBLOCK, or O_NONBLOCK on the pipe): EAGAIN at once.
        with watchdog(lambda: drain(r)):
            assert proc.call("splice", src, off, 8, 0, 3, SPLICE_F_NONBLOCK) == -errno.EAGAIN
            os.set_blocking(w, False)
            assert proc.call("sendfile", 8, src, off, 3) == -errno.EAGAIN
            os.set_blocking(w, True)
        with watchdog(lambda: drain(r)):
            assert proc.call("sendfile", 8, src, off, 3) is NO_ANSWER  # it waits for room
        await trio.testing.wait_all_tasks_blocked()
        assert rig.link.pending == [] and loff(proc, off) == 2
        assert set(drain(r)) == {ord("z")}
        assert await rig.wait_answer() == 3
        assert os.read(r, 10) == b"234" and loff(proc, off) == 5
        # The other way: an empty pipe, until there is something to read.
        with watchdog(lambda: os.write(w, b"!")):
            assert proc.call("splice", 7, 0, src, 0, 10, SPLICE_F_NONBLOCK) == -errno.EAGAIN
        with watchdog(lambda: os.write(w, b"!")):
            assert proc.call("splice", 7, 0, src, 0, 10, 0) is NO_ANSWER
        await trio.testing.wait_all_tasks_blocked()
        assert (box / "data" / "f").read_bytes() == b"0123456789"
        os.write(w, b"AB")
        assert await rig.wait_answer() == 2
        assert (box / "data" / "f").read_bytes() == b"AB23456789"


async def test_a_blocking_sendfile_waits_for_room_in_a_master_socket(
    rig: Rig, proc: FakeProcess, small_socket: tuple[socket.socket, socket.socket, int]
) -> None:
    a, b, src = small_socket
    async with trio.open_nursery() as nursery:
        rig.processes.by_tgid[proc.tgid].nursery = nursery
        fill(a.fileno())
        b.send(b"in")  # readable, and still full: it waits for room, not for data
        with watchdog(lambda: drain(b.fileno())):
            assert proc.call("sendfile", 9, src, 0, 2) is NO_ANSWER
        await trio.testing.wait_all_tasks_blocked()
        assert set(drain(b.fileno())) == {ord("z")}
        assert await rig.wait_answer() == 2
        assert b.recv(10) == b"01" and position(proc, src) == 2


# --- extended attributes ----------------------------------------------------------


def test_xattrs(rig: Rig, proc: FakeProcess, box: Path) -> None:
    value = proc.mem.alloc(b"v1")
    assert proc.call("setxattr", b"/data/f", b"user.k", value, 2, 0) == 0
    assert os.getxattr(box / "data" / "f", "user.k") == b"v1"
    assert proc.call("setxattr", b"/data/f", b"user.k", value, 2, 1) == -errno.EEXIST  # CREATE
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Setxattr) and op.flags == 0 and op.xflags == 1
    buf = proc.mem.alloc(16)
    assert proc.call("getxattr", b"/data/f", b"user.k", buf, 16) == 2
    assert proc.mem.bytes_at(buf, 2) == b"v1"
    assert proc.call("getxattr", b"/data/f", b"user.k", 0, 0) == 2  # the size only
    assert proc.call("getxattr", b"/data/f", b"user.k", buf, 1) == -errno.ERANGE
    assert proc.call("getxattr", b"/data/f", b"", buf, 16) == -errno.ERANGE
    assert proc.call("getxattr", b"/data/f", b"u" * 300, buf, 16) == -errno.ERANGE
    assert proc.call("listxattr", b"/data/f", buf, 16) == 7
    assert proc.mem.bytes_at(buf, 7) == b"user.k\0"
    fd = open_(proc, b"/data/f")
    assert proc.call("fgetxattr", fd, b"user.k", buf, 16) == 2
    assert proc.call("flistxattr", fd, buf, 16) == 7
    assert proc.call("fremovexattr", fd, b"user.k") == 0
    assert proc.call("removexattr", b"/data/f", b"user.k") == -errno.ENODATA
    big = proc.mem.alloc(70000)
    assert proc.call("setxattr", b"/data/f", b"user.b", big, 70000, 0) == -errno.E2BIG


def test_listxattr_follows_symlinks_and_llistxattr_does_not(
    rig: Rig, proc: FakeProcess, box: Path
) -> None:
    (box / "data" / "l").symlink_to("f")
    os.setxattr(box / "data" / "f", "user.k", b"v")
    buf = proc.mem.alloc(64)
    assert proc.call("listxattr", b"/data/l", buf, 64) == 7
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Listxattr) and op.flags == 0
    assert proc.call("llistxattr", b"/data/l", buf, 64) == 0  # a symlink has none
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Listxattr) and op.flags == linux.AT_SYMLINK_NOFOLLOW
    assert proc.call("getxattr", b"/data/l", b"user.k", buf, 64) == 1
    assert proc.call("lgetxattr", b"/data/l", b"user.k", buf, 64) == -errno.ENODATA
    assert proc.call("lsetxattr", b"/data/l", b"user.k", buf, 1, 0) == -errno.EPERM
    assert proc.call("lremovexattr", b"/data/l", b"user.k") == -errno.EPERM  # user.* on a link


# --- the working directory, umask, exit -------------------------------------------


def test_chdir_into_the_slave_and_getcwd(rig: Rig, proc: FakeProcess, box: Path) -> None:
    (box / "data" / "sub").mkdir()
    assert proc.call("chdir", b"/data/sub/..") == 0
    buf = proc.mem.alloc(64)
    assert proc.call("getcwd", buf, 64) == 6
    assert proc.mem.bytes_at(buf, 6) == b"/data\0"
    assert proc.call("getcwd", buf, 6) == 6  # exactly enough
    assert proc.call("getcwd", buf, 5) == -errno.ERANGE
    assert proc.call("chdir", b"sub") == 0
    assert proc.call("getcwd", buf, 64) == 10
    assert proc.mem.bytes_at(buf, 10) == b"/data/sub\0"
    assert proc.call("chdir", b"/data/f") == -errno.ENOTDIR
    assert proc.call("chdir", b"/data/none") == -errno.ENOENT
    (box / "data" / "sub" / "X").mkdir()  # only the cwd's trailing "/" goes when joined
    (box / "data" / "sub" / "X" / "f").write_bytes(b"in X")
    assert proc.call("chdir", b"X/") == 0
    fd = open_(proc, b"f")
    assert proc.call("read", fd, buf, 64) == 4 and proc.mem.bytes_at(buf, 4) == b"in X"


def test_chdir_into_a_master_directory_is_read_back(rig: Rig, proc: FakeProcess) -> None:
    task = rig.procfs.tasks[proc.tid]
    assert proc.call("chdir", b"/usr/lib") is CONTINUE
    task.cwd = ((8, 2), b"/usr/lib")  # the kernel moved it
    buf = proc.mem.alloc(64)
    assert proc.call("getcwd", buf, 64) is CONTINUE  # the kernel answers
    process = rig.processes.by_tgid[proc.tgid]
    assert (process.cwd, process.cwd_remote) == (b"/usr/lib", False)
    assert proc.call("chdir", b"/data") == 0
    assert proc.call("chdir", b"/usr/nope") is CONTINUE  # the kernel will refuse
    assert proc.call("getcwd", buf, 64) == 6  # unchanged: the slave directory again
    assert proc.mem.bytes_at(buf, 6) == b"/data\0"


def test_a_relative_path_in_a_master_cwd(rig: Rig, proc: FakeProcess) -> None:
    (rig.box / "usr").mkdir()  # the slave resolves /usr/.. itself
    rig.processes.initial = rig.processes.initial._replace(cwd=b"/usr", cwd_remote=False)
    p = rig.process(300)
    assert p.call("openat", AT_FDCWD, b"lib/x", O_RDONLY, 0) is CONTINUE
    assert p.call("stat", b"../data/f", p.mem.alloc(144)) == 0  # /usr/../data is the slave's


def test_fchdir(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data", O_RDONLY | os.O_DIRECTORY)
    assert proc.call("fchdir", fd) == 0
    buf = proc.mem.alloc(64)
    assert proc.call("getcwd", buf, 64) == 6
    f = open_(proc, b"/data/f")
    assert proc.call("fchdir", f) == -errno.ENOTDIR
    proc.fds[7] = "/usr/share"
    assert proc.call("fchdir", 7) is CONTINUE
    process = rig.processes.by_tgid[proc.tgid]
    assert process.pending_cwd is not None and process.cwd == b"/usr/share"


def test_umask_is_tracked_for_creation(rig: Rig, box: Path) -> None:
    p = rig.process(umask=0o022)
    assert p.call("umask", 0o077) is CONTINUE
    open_(p, b"/data/u", O_WRONLY | O_CREAT, 0o666)
    assert stat.S_IMODE((box / "data" / "u").stat().st_mode) == 0o600
    assert p.call("umask", 0o1002) is CONTINUE  # only the permission bits count
    assert p.call("mkdir", b"/data/ud", 0o777) == 0
    assert stat.S_IMODE((box / "data" / "ud").stat().st_mode) == 0o775


def test_exits_are_continued(rig: Rig, proc: FakeProcess) -> None:
    t = proc.thread(101)
    assert t.call("stat", b"/data/f", t.mem.alloc(144)) == 0
    assert rig.processes.by_tid[101].tgid == proc.tgid
    assert t.call("exit", 0) is CONTINUE
    assert 101 not in rig.processes.by_tid
    assert proc.call("exit_group", 0) is CONTINUE


# --- exec ---------------------------------------------------------------------------


def test_exec_of_a_master_binary_is_continued(rig: Rig, proc: FakeProcess) -> None:
    argv = proc.mem.alloc(16)
    assert proc.call("execve", b"/usr/bin/true", argv, 0) is CONTINUE
    assert rig.processes.by_tgid[proc.tgid].exec_pending


def test_exec_of_a_slave_file(rig: Rig, proc: FakeProcess, box: Path, tmp_path: Path) -> None:
    (box / "data" / "tool").write_bytes(b"\x7fELF not really")
    (box / "data" / "tool").chmod(0o755)
    argv = proc.mem.alloc(16)
    assert proc.call("execve", b"/data/f", argv, 0) == -errno.EACCES  # not executable
    assert proc.call("execve", b"/data", argv, 0) == -errno.EACCES  # not a file
    assert proc.call("execve", b"/data/none", argv, 0) == -errno.ENOENT
    # Not staged: the process's kernel cwd is not the stage.
    assert proc.call("execve", b"/data/tool", argv, 0) == -errno.ENOEXEC


@pytest.fixture
def staging(box: Path) -> Iterator[tuple[Rig, Stage]]:
    """A session whose program started in a slave directory: its kernel cwd is the stage."""
    stage = Stage()
    rig = Rig(box, stage=stage)
    rig.processes.initial = rig.processes.initial._replace(staged_cwd=True)
    try:
        yield rig, stage
    finally:
        rig.close()
        stage.close()


def test_exec_of_a_slave_file_stages_it(box: Path, staging: tuple[Rig, Stage]) -> None:
    (box / "data" / "tool").write_bytes(b"\x7fELF not really")
    (box / "data" / "tool").chmod(0o755)
    rig, stage = staging
    p = rig.process()
    name = p.mem.cstring(b"/data/tool")
    argv = p.mem.alloc(struct.pack("=QQ", name, 0))
    rig.procfs.arg_starts[p.tgid] = 0x5000
    assert rig.call(p.tid, "execve", name, argv, 0) is CONTINUE
    staged = Path(os.fsdecode(stage.cwd)) / ".data" / "tool"
    assert staged.read_bytes() == b"\x7fELF not really"
    assert p.mem.bytes_at(name, 10) == b".data/tool"  # made relative to the stage
    process = rig.processes.by_tgid[p.tgid]
    assert process.argv0_fix == (name, 0x5000) and process.exec_pending
    new_argv0 = p.mem.alloc(16)  # a new image: its argument strings moved
    rig.procfs.arg_starts[p.tgid] = new_argv0
    assert p.call("getcwd", p.mem.alloc(64), 64) == 2  # its first call settles it
    assert p.mem.bytes_at(new_argv0, 1) == b"/"
    assert not process.exec_pending


def exec_staged(rig: Rig, p: FakeProcess, path: bytes) -> int | object:
    """execve(path, [path]) from ``p``, whose kernel cwd is the stage."""
    name = p.mem.cstring(path)
    return rig.call(p.tid, "execve", name, p.mem.alloc(struct.pack("=QQ", name, 0)), 0)


def test_exec_of_a_slave_symlink_to_a_master_binary_stages_a_link(
    box: Path, staging: tuple[Rig, Stage]
) -> None:
    """A venv's bin/python: the kernel runs the master binary the slave link names,
    followed through relative links as the kernel follows them."""
    rig, stage = staging
    bin_ = box / "data" / "venv" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "python").symlink_to("/usr/bin/true")
    (bin_ / "py").symlink_to("../lib/py3")  # relative, to another link
    (box / "data" / "venv" / "lib").mkdir()
    (box / "data" / "venv" / "lib" / "py3").symlink_to("../../../usr/bin/env")
    p = rig.process()
    assert exec_staged(rig, p, b"/data/venv/bin/python") is CONTINUE
    staged = Path(os.fsdecode(stage.cwd)) / ".data" / "venv" / "bin"
    assert os.readlink(staged / "python") == "/usr/bin/true"
    assert exec_staged(rig, p, b"/data/venv/bin/py") is CONTINUE
    assert os.readlink(staged / "py") == "/usr/bin/env"  # /data/venv/bin/../lib/py3, then
    # /data/venv/lib/../../../usr/bin/env: the master's /usr/bin/env
    readlinks = [op for op in rig.link.ops if isinstance(op, wire.Readlink)]
    assert readlinks[-2:] == [
        wire.Readlink(dir=0, size=wire.MAX_PATH, path=b"/data/venv/bin/py"),
        wire.Readlink(dir=0, size=wire.MAX_PATH, path=b"/data/venv/lib/py3"),
    ]


def test_exec_of_a_slave_symlink_to_a_slave_file_stages_the_file(
    box: Path, staging: tuple[Rig, Stage]
) -> None:
    rig, stage = staging
    (box / "data" / "tool").write_bytes(b"\x7fELF not really")
    (box / "data" / "tool").chmod(0o755)
    (box / "data" / "link").symlink_to("tool")
    (box / "data" / "loop").symlink_to("loop")
    p = rig.process()
    assert exec_staged(rig, p, b"/data/link") is CONTINUE
    staged = Path(os.fsdecode(stage.cwd)) / ".data" / "link"
    assert not staged.is_symlink() and staged.read_bytes() == b"\x7fELF not really"
    assert exec_staged(rig, p, b"/data/loop") == -errno.ELOOP  # as the kernel's exec


def test_a_short_statx_of_an_exec_symlink_is_eio(
    box: Path, staging: tuple[Rig, Stage], capsys: pytest.CaptureFixture[str]
) -> None:
    rig, _ = staging
    (box / "data" / "python").symlink_to("/usr/bin/true")
    original = rig.executor.execute

    def hostile(op: wire.Operation) -> tuple[int, bytes]:
        if isinstance(op, wire.Stat):
            return 0, original(op)[1][:-1]
        return original(op)

    rig.executor.execute = hostile  # type: ignore[method-assign]
    assert exec_staged(rig, rig.process(), b"/data/python") == -errno.EIO
    assert "internal error" not in capsys.readouterr().err  # refused, not crashed on


# --- a slave that misbehaves --------------------------------------------------------


def test_a_dead_link_gives_eio(rig: Rig, proc: FakeProcess) -> None:
    rig.link.broken = True
    assert proc.call("stat", b"/data/f", proc.mem.alloc(144)) == -errno.EIO
    assert proc.call("stat", b"/data/f", proc.mem.alloc(144)) == -errno.EIO
    assert proc.call("openat", AT_FDCWD, b"/usr/x", O_RDONLY, 0) is CONTINUE


def test_an_errno_out_of_range_is_eio(rig: Rig, proc: FakeProcess) -> None:
    original = rig.executor.execute

    def hostile(op: wire.Operation) -> tuple[int, bytes]:
        if isinstance(op, wire.Access):
            return -(1 << 40), b""
        return original(op)

    rig.executor.execute = hostile  # type: ignore[method-assign]
    assert proc.call("access", b"/data/f", 0) == -errno.EIO


def test_an_oversized_reply_is_eio(rig: Rig, proc: FakeProcess) -> None:
    original = rig.executor.execute

    def hostile(op: wire.Operation) -> tuple[int, bytes]:
        if isinstance(op, wire.Readlink):
            return 100, b"x" * 100
        return original(op)

    rig.executor.execute = hostile  # type: ignore[method-assign]
    buf = proc.mem.alloc(8)
    assert proc.call("readlink", b"/data/f", buf, 8) == -errno.EIO
    assert proc.mem.bytes_at(buf, 8) == bytes(8)  # nothing written past the buffer


def test_a_path_too_long_once_joined(rig: Rig, proc: FakeProcess) -> None:
    assert proc.call("chdir", b"/data") == 0
    long = b"a" * 4090
    assert proc.call("stat", long, proc.mem.alloc(144)) == -errno.ENAMETOOLONG


def test_an_unreadable_path_is_efault(rig: Rig, proc: FakeProcess) -> None:
    assert rig.call(proc.tid, "stat", 0xBAD000, proc.mem.alloc(144)) == -errno.EFAULT


def test_a_caller_that_is_gone_is_continued(rig: Rig) -> None:
    assert rig.call(999, "stat", 0, 0) is CONTINUE


def test_each_process_is_announced_once_with_its_parent(rig: Rig, proc: FakeProcess) -> None:
    proc.call("access", b"/data/f", 0)
    child = proc.fork(200)
    child.call("access", b"/data/f", 0)
    child.call("access", b"/data/f", 0)
    opened = [e for e in rig.link.events if isinstance(e, wire.OpenPairing)]
    parent_id = rig.processes.by_tgid[proc.tgid].id
    child_id = rig.processes.by_tgid[child.tgid].id
    assert opened == [wire.OpenPairing(parent_id, 0), wire.OpenPairing(child_id, parent_id)]


def test_a_caller_whose_pid_may_have_been_reused_is_not_answered(
    rig: Rig, proc: FakeProcess
) -> None:
    proc.mem.opened = 2  # as if reading the path had (re)opened /proc/<pid>/mem
    path, buf = proc.mem.cstring(b"/data/f"), proc.mem.alloc(144)
    memory = proc.mem

    def reopening(addr: int, limit: int = 4096) -> bytes:
        memory.opened += 1
        return FakeMemory.read_cstring(memory, addr, limit)

    memory.read_cstring = reopening  # type: ignore[method-assign]
    rig.listener.invalid.add(rig._nid + 1)  # ... and the caller died meanwhile
    assert rig.call(proc.tid, "stat", path, buf) == NO_ANSWER
    assert rig.link.ops == []  # nothing acted on what was read
    assert rig.call(proc.tid, "stat", path, buf) == 0  # a valid caller is served


def test_a_caller_that_dies_mid_call_gets_no_more_work(rig: Rig, proc: FakeProcess) -> None:
    (rig.box / "data" / "tool").write_bytes(b"#!/bin/sh\n")
    (rig.box / "data" / "tool").chmod(0o755)
    process = rig.processes.for_tid(proc.tid)

    def dies(op: wire.Operation) -> None:
        if isinstance(op, wire.Stat):
            rig.processes._exited(process)

    rig.link.on_perform = dies
    assert proc.call("execve", b"/data/tool", proc.mem.alloc(16), 0) == -errno.ESRCH
    assert [type(op) for op in rig.link.ops] == [wire.Stat]  # its Access never went out


def test_every_handler_finds_every_argument_it_reads_by_name(
    rig: Rig, proc: FakeProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each registered call, with a remote fd and a remote path for its fd and path
    arguments: a name a handler reads that the call's signature lacks would end in an
    internal error."""
    for name in sorted(HANDLERS):
        syscall = rig.hub.table[name]
        (rig.box / "data" / "f").write_bytes(b"0123456789")  # unlink, rename... remove it
        fd = open_(proc, b"/data/f")
        args: list[int | bytes] = [0] * len(syscall.params)
        for i in syscall.fds:
            args[i] = fd
        for p in syscall.paths:
            args[p.path] = b"/data/f"
            if p.dirfd is not None:
                args[p.dirfd] = AT_FDCWD
        for i, param in enumerate(syscall.params):
            if param.kind.value == "ptr" and not args[i]:
                args[i] = proc.mem.alloc(256)
        if name in ("exit", "exit_group"):
            continue
        answer = proc.call(name, *args)
        assert answer != NO_ANSWER, name
        assert "internal error" not in capsys.readouterr().err, name


def test_cloexec_reaches_the_injected_fd(rig: Rig, proc: FakeProcess) -> None:
    plain = open_(proc, b"/data/f")
    closing = open_(proc, b"/data/f", O_RDONLY | os.O_CLOEXEC)
    assert rig.listener.cloexec[(proc.tgid, plain)] is False
    assert rig.listener.cloexec[(proc.tgid, closing)] is True


@pytest.mark.parametrize(
    ("nsec", "valid"),
    [(0, True), (999_999_999, True), (1_000_000_000, False), (-1, False),
     (linux.UTIME_NOW, True), (linux.UTIME_OMIT, True), (linux.UTIME_OMIT - 1, False)],
)  # fmt: skip
def test_utimensat_checks_each_nanosecond_field(
    rig: Rig, proc: FakeProcess, nsec: int, valid: bool
) -> None:
    for times in ((5, nsec, 6, 0), (5, 0, 6, nsec)):
        addr = proc.mem.alloc(struct.pack("=qqqq", *times))
        before = len(rig.link.ops)
        answer = proc.call("utimensat", AT_FDCWD, b"/data/f", addr, 0)
        assert answer == (0 if valid else -errno.EINVAL), times
        assert valid or rig.link.ops[before:] == []  # refused by fmhub, as by the kernel
        if valid:
            op = rig.link.ops[-1]
            assert isinstance(op, wire.Utimens)
            assert (op.asec, op.ansec, op.msec, op.mnsec) == times


@pytest.mark.parametrize(
    ("usec", "valid"), [(0, True), (999_999, True), (1_000_000, False), (-1, False)]
)
def test_utimes_checks_each_microsecond_field(
    rig: Rig, proc: FakeProcess, usec: int, valid: bool
) -> None:
    for times in ((5, usec, 6, 0), (5, 0, 6, usec)):
        addr = proc.mem.alloc(struct.pack("=qqqq", *times))
        before = len(rig.link.ops)
        assert proc.call("utimes", b"/data/f", addr) == (0 if valid else -errno.EINVAL)
        assert valid or rig.link.ops[before:] == []  # refused by fmhub, as by the kernel
        if valid:
            op = rig.link.ops[-1]
            assert isinstance(op, wire.Utimens)
            assert (op.asec, op.ansec, op.msec, op.mnsec) == (
                5,
                times[1] * 1000,
                6,
                times[3] * 1000,
            )


def test_null_times_mean_now_and_utimbuf_has_no_fraction(rig: Rig, proc: FakeProcess) -> None:
    assert proc.call("utimes", b"/data/f", 0) == 0
    assert rig.link.ops[-1] == wire.Utimens(
        dir=0, flags=0, asec=0, ansec=linux.UTIME_NOW, msec=0, mnsec=linux.UTIME_NOW,
        path=b"/data/f",
    )  # fmt: skip
    assert proc.call("utime", b"/data/f", proc.mem.alloc(struct.pack("=qq", 7, 8))) == 0
    assert rig.link.ops[-1] == wire.Utimens(
        dir=0, flags=0, asec=7, ansec=0, msec=8, mnsec=0, path=b"/data/f"
    )


def test_iovec_limits(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data/f")
    one = proc.mem.alloc(4)
    assert proc.call("readv", fd, proc.mem.alloc(16), 0) == 0  # no vector at all
    full = proc.mem.alloc(IOVEC.pack(one, 0) * 1023 + IOVEC.pack(one, 4))
    assert proc.call("preadv", fd, full, 1024, 0, 0) == 4  # UIO_MAXIOV pieces are fine
    big = (1 << 63) - 1
    assert proc.call("preadv", fd, proc.mem.alloc(IOVEC.pack(one, big)), 1, 0, 0) == -errno.EFAULT
    over = proc.mem.alloc(IOVEC.pack(one, 1 << 63))
    assert proc.call("preadv", fd, over, 1, 0, 0) == -errno.EINVAL
    halves = proc.mem.alloc(IOVEC.pack(one, 4) + IOVEC.pack(one, (1 << 63) - 5))
    assert proc.call("preadv", fd, halves, 2, 6, 0) == 4  # the sum just fits
    too_much = proc.mem.alloc(IOVEC.pack(one, 4) + IOVEC.pack(one, (1 << 63) - 4))
    assert proc.call("preadv", fd, too_much, 2, 6, 0) == -errno.EINVAL


def test_statx_checks_its_flags_as_the_kernel_does(rig: Rig, proc: FakeProcess) -> None:
    buf = proc.mem.alloc(256)
    known = linux.AT_SYMLINK_NOFOLLOW | linux.AT_NO_AUTOMOUNT | 0x2000  # FORCE_SYNC
    assert proc.call("statx", AT_FDCWD, b"/data/f", known, 0x7FF, buf) == 0
    op = rig.link.ops[-1]
    assert isinstance(op, wire.Stat) and op.flags == known
    sent = len(rig.link.ops)
    for flags, mask in ((known | 0x1, 0x7FF), (known | 0x200, 0x7FF), (0x6000, 0x7FF),
                        (0, 0x80000000)):  # fmt: skip
        assert proc.call("statx", AT_FDCWD, b"/data/f", flags, mask, buf) == -errno.EINVAL
    assert len(rig.link.ops) == sent  # refused before the slave is asked


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("newfstatat", (AT_FDCWD, b"/data/f", 0, 0x10000)),
        ("faccessat2", (AT_FDCWD, b"/data/f", 0, 0x10000)),
        ("fchownat", (AT_FDCWD, b"/data/f", 0, 0, 0x10000)),
        ("linkat", (AT_FDCWD, b"/data/f", AT_FDCWD, b"/data/g", 0x10000)),
        ("fchmodat2", (AT_FDCWD, b"/data/f", 0o600, 0x10000)),
        ("renameat2", (AT_FDCWD, b"/data/f", AT_FDCWD, b"/data/g", 0x10)),
        ("execveat", (AT_FDCWD, b"/data/f", 0, 0, 0x10000)),
    ],
)
def test_unknown_at_flags_are_einval(
    rig: Rig, proc: FakeProcess, name: str, args: tuple[int | bytes, ...]
) -> None:
    values = [proc.mem.alloc(256) if name == "newfstatat" and i == 2 else a
              for i, a in enumerate(args)]  # fmt: skip
    assert proc.call(name, *values) == -errno.EINVAL


def test_f_notify_wants_a_directory(rig: Rig, proc: FakeProcess) -> None:
    f_notify, dn_create = 1026, 0x4
    assert proc.call("fcntl", open_(proc, b"/data/f"), f_notify, dn_create) == -errno.ENOTDIR
    assert proc.call("fcntl", open_(proc, b"/data"), f_notify, dn_create) == 0
    assert proc.call("fcntl", open_(proc, b"/data"), f_notify, 0) == 0


def test_o_path_fds_allow_only_what_the_kernel_allows(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data/f", linux.O_PATH)
    assert proc.call("fchmod", fd, 0o600) == -errno.EBADF
    assert proc.call("fchown", fd, 0, 0) == -errno.EBADF
    assert proc.call("fstat", fd, proc.mem.alloc(144)) == 0


def test_a_short_statx_from_the_slave_is_eio(rig: Rig, proc: FakeProcess) -> None:
    original = rig.executor.execute

    def hostile(op: wire.Operation) -> tuple[int, bytes]:
        if isinstance(op, wire.Stat):
            return 0, original(op)[1][:200]
        return original(op)

    rig.executor.execute = hostile  # type: ignore[method-assign]
    buf = proc.mem.alloc(256)
    assert proc.call("statx", AT_FDCWD, b"/data/f", 0, 0x7FF, buf) == -errno.EIO
    assert proc.mem.bytes_at(buf, 256) == bytes(256)


def test_reads_and_writes_send_exactly_these_operations(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/data/f", O_RDWR)
    buf = proc.mem.alloc(8)
    proc.call("read", fd, buf, 3)
    proc.call("pread64", fd, buf, 2, 4)
    iov, _ = iovecs(proc, 1, 2)
    proc.call("readv", fd, iov, 2)
    proc.call("write", fd, buf, 1)
    proc.call("pwrite64", fd, buf, 2, 7)
    handle = rig.link.ops[0]
    assert isinstance(handle, wire.Open)
    assert rig.link.ops[1:] == [
        wire.Read(handle=1, size=3, offset=-1, rwf=0),
        wire.Read(handle=1, size=2, offset=4, rwf=0),
        wire.Read(handle=1, size=3, offset=-1, rwf=0),
        wire.Write(handle=1, offset=-1, rwf=0, data=proc.mem.bytes_at(buf, 1)),
        wire.Write(handle=1, offset=7, rwf=0, data=proc.mem.bytes_at(buf, 2)),
    ]


def test_a_large_positioned_write_advances_its_offset(
    rig: Rig, proc: FakeProcess, box: Path
) -> None:
    size = wire.MAX_IO + 100
    data = (bytes(range(1, 252)) * (size // 251 + 1))[:size]  # no zeros: none to miss
    fd = open_(proc, b"/data/big", O_RDWR | O_CREAT, 0o644)
    assert proc.call("pwrite64", fd, proc.mem.alloc(data), size, 10) == size
    assert (box / "data" / "big").read_bytes() == bytes(10) + data
    iov, (a, b) = iovecs(proc, wire.MAX_IO - 10, 200)
    assert proc.call("preadv", fd, iov, 2, 10, 0) == wire.MAX_IO + 100  # to EOF
    assert proc.mem.bytes_at(a, wire.MAX_IO - 10) == data[: wire.MAX_IO - 10]
    assert proc.mem.bytes_at(b, 110) == data[wire.MAX_IO - 10 :]  # across both pieces
    # The second piece fills two buffers, from the middle of the first one.
    iov, (a, b, c) = iovecs(proc, wire.MAX_IO - 10, 50, 200)
    assert proc.call("preadv", fd, iov, 3, 10, 0) == wire.MAX_IO + 100
    assert proc.mem.bytes_at(a, wire.MAX_IO - 10) == data[: wire.MAX_IO - 10]
    assert proc.mem.bytes_at(b, 50) == data[wire.MAX_IO - 10 : wire.MAX_IO + 40]
    assert proc.mem.bytes_at(c, 60) == data[wire.MAX_IO + 40 :]


def test_xattr_name_limits(rig: Rig, proc: FakeProcess) -> None:
    buf = proc.mem.alloc(16)
    longest = b"user." + b"n" * 250  # XATTR_NAME_MAX: 255 bytes
    assert proc.call("getxattr", b"/data/f", longest, buf, 16) == -errno.ENODATA
    before = len(rig.link.ops)
    assert proc.call("getxattr", b"/data/f", longest + b"n", buf, 16) == -errno.ERANGE
    assert rig.link.ops[before:] == []  # refused as it is read, as the kernel does
    assert rig.call(proc.tid, "getxattr", proc.mem.cstring(b"/data/f"), 0xBAD000, buf, 16) == (
        -errno.EFAULT
    )


def test_a_reply_without_a_file_type_still_opens(rig: Rig, proc: FakeProcess) -> None:
    original = rig.executor.execute

    def terse(op: wire.Operation) -> tuple[int, bytes]:
        result, blob = original(op)
        return (result, b"") if isinstance(op, wire.Open) else (result, blob)

    rig.executor.execute = terse  # type: ignore[method-assign]
    fd = open_(proc, b"/data/f")
    remote = rig.placeholders.lookup(proc.tid, fd)
    assert remote is not None and remote.kind == 0


def test_staging_reads_a_large_slave_file_whole(box: Path, staging: tuple[Rig, Stage]) -> None:
    content = b"\x7fELF" + bytes(range(256)) * (wire.MAX_IO // 256 + 10)
    (box / "data" / "big-tool").write_bytes(content)
    (box / "data" / "big-tool").chmod(0o755)
    rig, stage = staging
    p = rig.process()
    assert p.call("execve", b"big-tool", p.mem.alloc(16), 0) == -errno.ENOENT  # not in /
    assert p.call("chdir", b"/data") == 0
    assert p.call("execve", b"big-tool", p.mem.alloc(16), 0) is CONTINUE
    staged = Path(os.fsdecode(stage.cwd)) / "big-tool"
    assert staged.read_bytes() == content
    ops = [op for op in rig.link.ops if isinstance(op, wire.Open | wire.Read)]
    assert ops[-4:] == [
        wire.Open(dir=0, flags=O_RDONLY, mode=0, resolve=0, path=b"/data/big-tool"),
        wire.Read(handle=1, size=wire.MAX_IO, offset=-1, rwf=0),
        wire.Read(handle=1, size=wire.MAX_IO, offset=-1, rwf=0),
        wire.Read(handle=1, size=wire.MAX_IO, offset=-1, rwf=0),
    ]
    assert rig.link.ops[-1] == wire.Close(handle=1)  # its own handle, released
