"""The slave's executor: real syscalls, confined to its root."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsys import linux
from fsys.protocol import Call, Op
from fsys.slave.executor import Executor
from fsys.slave.fshub import perform


def run(ex: Executor, op: Op, ints: tuple[int, ...], *blobs: bytes) -> tuple[int, bytes]:
    reply = perform(ex, Call(0, 1, op, ints, blobs))
    return reply.result, reply.blob


def open_(ex: Executor, path: bytes, flags: int = os.O_RDONLY, mode: int = 0, d: int = 0) -> int:
    result, _ = run(ex, Op.OPEN, (d, flags, mode, 0), path)
    return result


@pytest.fixture
def box(tmp_path: Path) -> Path:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "file").write_text("inside")
    (tmp_path / "abs").symlink_to("/")
    (tmp_path / "up").symlink_to("../../../../..")
    (tmp_path / "proc").symlink_to("/proc/self/root")
    return tmp_path


@pytest.fixture
def ex(box: Path) -> Iterator[Executor]:
    executor = Executor(str(box))
    yield executor
    executor.close()


@pytest.mark.parametrize(
    "path",
    [
        b"/../../etc/hostname",
        b"/abs/etc/hostname",
        b"/up/etc/hostname",
        b"/proc/etc/hostname",
        b"/dir/../../../../etc/hostname",
    ],
)
def test_paths_cannot_leave_the_root(ex: Executor, path: bytes) -> None:
    # /proc -> /proc/self/root resolves, inside the root, to the link itself: ELOOP.
    assert open_(ex, path) in (-errno.ENOENT, -errno.ELOOP)
    result, _ = run(ex, Op.STAT, (0, 0, linux.STATX_BASIC_STATS), path)
    assert result in (-errno.ENOENT, -errno.ELOOP)


def test_dotdot_from_a_directory_handle_stays_inside(ex: Executor, box: Path) -> None:
    handle = open_(ex, b"/dir", os.O_RDONLY | os.O_DIRECTORY)
    assert handle > 0
    fd = open_(ex, b"../dir/file", d=handle)
    assert run(ex, Op.READ, (fd, 100, -1, 0)) == (6, b"inside")
    assert open_(ex, b"../../../etc/hostname", d=handle) == -errno.ENOENT


def test_calls_on_names_do_not_follow_escaping_symlinks(ex: Executor, box: Path) -> None:
    assert run(ex, Op.UNLINK, (0, 0), b"/abs")[0] == 0  # removes the link, nothing else
    assert not (box / "abs").is_symlink()
    assert not Path("/fsys-test-escape").exists()
    assert run(ex, Op.MKDIR, (0, 0o755), b"/up/fsys-test-escape")[0] == 0  # /up is the root
    assert (box / "fsys-test-escape").is_dir()
    assert not Path("/fsys-test-escape").exists()
    assert run(ex, Op.READLINK, (0, 100), b"/up") == (14, b"../../../../..")
    result, raw = run(ex, Op.STAT, (0, linux.AT_SYMLINK_NOFOLLOW, 0x7FF), b"/up")
    assert result == 0 and stat.S_ISLNK(linux.statx_mode(raw))


def test_create_write_read_stat(ex: Executor, box: Path) -> None:
    fd = open_(ex, b"/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    assert run(ex, Op.WRITE, (fd, -1, 0), b"hello") == (5, b"")
    assert run(ex, Op.WRITE, (fd, 10, 0), b"!") == (1, b"")
    run(ex, Op.CLOSE, (fd,))
    assert (box / "new").read_bytes() == b"hello\0\0\0\0\0!"
    assert stat.S_IMODE((box / "new").stat().st_mode) == 0o640
    result, raw = run(ex, Op.STAT, (0, 0, 0x7FF), b"/new")
    assert result == 0 and linux.statx_size(raw) == 11
    assert open_(ex, b"/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL) == -errno.EEXIST


def test_getdents_lists_the_directory(ex: Executor) -> None:
    handle = open_(ex, b"/dir", os.O_RDONLY | os.O_DIRECTORY)
    count, raw = run(ex, Op.GETDENTS, (handle, 4096))
    assert count == len(raw) > 0
    names = []
    pos = 0
    while pos < len(raw):
        reclen = int.from_bytes(raw[pos + 16 : pos + 18], "little")
        names.append(raw[pos + 19 : pos + reclen].rstrip(b"\0"))
        pos += reclen
    assert sorted(names) == [b".", b"..", b"file"]


def test_rename_link_symlink_chmod_truncate(ex: Executor, box: Path) -> None:
    assert run(ex, Op.RENAME, (0, 0, 0), b"/dir/file", b"/moved")[0] == 0
    assert run(ex, Op.LINK, (0, 0, 0), b"/moved", b"/hard")[0] == 0
    assert (box / "hard").stat().st_ino == (box / "moved").stat().st_ino
    assert run(ex, Op.SYMLINK, (0,), b"moved", b"/soft")[0] == 0
    assert os.readlink(box / "soft") == "moved"
    assert run(ex, Op.CHMOD, (0, 0o600, 0), b"/soft")[0] == 0  # follows to the file
    assert stat.S_IMODE((box / "moved").stat().st_mode) == 0o600
    assert run(ex, Op.TRUNCATE, (0, 2), b"/moved")[0] == 0
    assert (box / "moved").read_text() == "in"
    assert run(ex, Op.RENAME, (0, 0, 1), b"/moved", b"/hard")[0] == -errno.EEXIST  # NOREPLACE


def test_unlink_rmdir_errors(ex: Executor, box: Path) -> None:
    assert run(ex, Op.UNLINK, (0, linux.AT_REMOVEDIR), b"/dir")[0] == -errno.ENOTEMPTY
    assert run(ex, Op.UNLINK, (0, 0), b"/dir")[0] == -errno.EISDIR
    assert run(ex, Op.UNLINK, (0, 0), b"/missing")[0] == -errno.ENOENT
    assert run(ex, Op.UNLINK, (0, 0), b"")[0] == -errno.ENOENT


def test_chdir_and_handle_path_are_root_relative(ex: Executor) -> None:
    assert run(ex, Op.CHDIR, (0,), b"/dir/../dir") == (4, b"/dir")
    assert run(ex, Op.CHDIR, (0,), b"/dir/file")[0] == -errno.ENOTDIR
    handle = open_(ex, b"/dir", os.O_RDONLY | os.O_DIRECTORY)
    assert run(ex, Op.HANDLE_PATH, (handle,)) == (4, b"/dir")
    assert run(ex, Op.CHDIR, (0,), b"/") == (1, b"/")


def test_closed_and_unknown_handles(ex: Executor) -> None:
    fd = open_(ex, b"/dir/file")
    run(ex, Op.CLOSE, (fd,))
    assert run(ex, Op.READ, (fd, 10, -1, 0))[0] == -errno.EBADF
    assert run(ex, Op.READ, (12345, 10, -1, 0))[0] == -errno.EBADF


def test_locks_become_description_locks(ex: Executor) -> None:
    a = open_(ex, b"/dir/file", os.O_RDWR)
    b = open_(ex, b"/dir/file", os.O_RDWR)
    wrlock = linux.FLOCK.pack(1, 0, 0, 0, 0)  # F_WRLCK whole file
    assert run(ex, Op.LOCK, (a, linux.F_SETLK), wrlock)[0] == 0
    assert run(ex, Op.LOCK, (b, linux.F_SETLK), wrlock)[0] == -errno.EAGAIN
    result, out = run(ex, Op.LOCK, (b, linux.F_GETLK), wrlock)
    assert result == 0 and linux.FLOCK.unpack(out)[0] == 1  # conflicting lock reported


def test_xattrs(ex: Executor, box: Path) -> None:
    result = run(ex, Op.SETXATTR, (0, 0, 0), b"/dir/file", b"user.k", b"v1")[0]
    if result == -errno.EOPNOTSUPP:
        pytest.fail("the test filesystem must support user xattrs")
    assert result == 0
    assert run(ex, Op.GETXATTR, (0, 0, 100), b"/dir/file", b"user.k") == (2, b"v1")
    assert run(ex, Op.GETXATTR, (0, 0, 0), b"/dir/file", b"user.k") == (2, b"")
    assert run(ex, Op.GETXATTR, (0, 0, 1), b"/dir/file", b"user.k")[0] == -errno.ERANGE
    assert run(ex, Op.LISTXATTR, (0, 0, 100), b"/dir/file") == (7, b"user.k\0")
    assert run(ex, Op.REMOVEXATTR, (0, 0), b"/dir/file", b"user.k")[0] == 0


def test_unconfined_executor_sees_the_whole_filesystem() -> None:
    ex = Executor("/")
    try:
        fd = open_(ex, b"/etc/hostname")
        assert run(ex, Op.READ, (fd, 100, -1, 0))[1] == Path("/etc/hostname").read_bytes()
    finally:
        ex.close()


def test_close_releases_every_handle(box: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    ex = Executor(str(box))
    for _ in range(5):
        assert open_(ex, b"/dir/file") > 0
    ex.close()
    assert len(os.listdir("/proc/self/fd")) == before
