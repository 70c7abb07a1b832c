"""The slave's executor: real syscalls, confined to its root."""

from __future__ import annotations

import errno
import os
import stat
import struct
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsys import linux
from fsys.protocol import (
    FEATURE_WATCH,
    REPLY_WATCHED,
    Call,
    Chdir,
    Chmod,
    Close,
    CopyRange,
    Getdents,
    Getxattr,
    HandlePath,
    Lend,
    Link,
    Listdir,
    Listxattr,
    Lock,
    Mkdir,
    Open,
    OpenRead,
    Operation,
    Read,
    Readlink,
    Removexattr,
    Rename,
    Setxattr,
    Stat,
    Symlink,
    Truncate,
    Tty,
    Unlink,
    Write,
)
from fsys.slave.executor import Executor, MustBlock
from fsys.slave.fshub import perform


def run(ex: Executor, op: Operation) -> tuple[int, bytes]:
    reply = perform(ex, Call(0, 1, op))
    return reply.result, reply.blob


def fails(ex: Executor, op: Operation) -> int:
    """The errno ``op`` fails with (it must fail)."""
    result = run(ex, op)[0]
    assert result < 0, f"{op} succeeded"
    return -result


def open_(ex: Executor, path: bytes, flags: int = os.O_RDONLY, mode: int = 0, d: int = 0) -> int:
    result, _ = run(ex, Open(dir=d, flags=flags, mode=mode, resolve=0, path=path))
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
    result, _ = run(ex, Stat(dir=0, flags=0, mask=linux.STATX_BASIC_STATS, path=path))
    assert result in (-errno.ENOENT, -errno.ELOOP)


def open_read(path: bytes, size: int, flags: int = os.O_RDONLY) -> OpenRead:
    return OpenRead(dir=0, flags=flags, resolve=0, size=size, path=path)


def test_open_read_brings_the_files_start_and_leaves_its_position(ex: Executor) -> None:
    handle, blob = run(ex, open_read(b"/dir/file", 4))
    assert handle > 0 and blob == bytes([stat.S_IFREG >> 12]) + b"insi"
    assert run(ex, Read(handle=handle, size=100, offset=-1, rwf=0)) == (6, b"inside")
    whole = run(ex, open_read(b"/dir/file", 100))[1]
    assert whole[1:] == b"inside"  # shorter than asked: the whole file
    assert run(ex, open_read(b"/dir/file", 0))[1] == bytes([stat.S_IFREG >> 12])


def test_open_read_of_a_directory_or_fifo_brings_nothing(ex: Executor, box: Path) -> None:
    handle, blob = run(ex, open_read(b"/dir", 100, os.O_RDONLY | os.O_DIRECTORY))
    assert handle > 0 and blob == bytes([stat.S_IFDIR >> 12])
    os.mkfifo(box / "fifo")
    with pytest.raises(MustBlock):  # it waits for a writer: in a thread, as OPEN does
        ex.execute(open_read(b"/fifo", 100))
    writer = os.open(box / "fifo", os.O_RDWR)
    try:
        handle, blob = ex.execute_blocking(open_read(b"/fifo", 100))
        assert handle > 0 and blob == bytes([stat.S_IFIFO >> 12])
    finally:
        os.close(writer)


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_CREAT,
                                   os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND,
                                   os.O_RDONLY | linux.O_PATH, linux.O_TMPFILE])  # fmt: skip
def test_open_read_only_reads(ex: Executor, box: Path, flags: int) -> None:
    assert fails(ex, open_read(b"/dir/file", 10, flags)) == errno.EINVAL
    assert (box / "dir" / "file").read_text() == "inside"


def test_open_read_of_nothing_fails_as_open(ex: Executor) -> None:
    assert fails(ex, open_read(b"/dir/none", 10)) == errno.ENOENT


def test_dotdot_from_a_directory_handle_stays_inside(ex: Executor, box: Path) -> None:
    handle = open_(ex, b"/dir", os.O_RDONLY | os.O_DIRECTORY)
    assert handle > 0
    fd = open_(ex, b"../dir/file", d=handle)
    assert run(ex, Read(handle=fd, size=100, offset=-1, rwf=0)) == (6, b"inside")
    assert open_(ex, b"../../../etc/hostname", d=handle) == -errno.ENOENT


def test_calls_on_names_do_not_follow_escaping_symlinks(ex: Executor, box: Path) -> None:
    assert run(ex, Unlink(dir=0, flags=0, path=b"/abs"))[0] == 0  # removes the link, nothing else
    assert not (box / "abs").is_symlink()
    assert not Path("/fsys-test-escape").exists()
    assert (
        run(ex, Mkdir(dir=0, mode=0o755, path=b"/up/fsys-test-escape"))[0] == 0
    )  # /up is the root
    assert (box / "fsys-test-escape").is_dir()
    assert not Path("/fsys-test-escape").exists()
    assert run(ex, Readlink(dir=0, size=100, path=b"/up")) == (14, b"../../../../..")
    result, raw = run(ex, Stat(dir=0, flags=linux.AT_SYMLINK_NOFOLLOW, mask=0x7FF, path=b"/up"))
    assert result == 0 and stat.S_ISLNK(linux.statx_mode(raw))


def test_create_write_read_stat(ex: Executor, box: Path) -> None:
    fd = open_(ex, b"/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    assert run(ex, Write(handle=fd, offset=-1, rwf=0, data=b"hello")) == (5, b"")
    assert run(ex, Write(handle=fd, offset=10, rwf=0, data=b"!")) == (1, b"")
    run(ex, Close(handle=fd))
    assert (box / "new").read_bytes() == b"hello\0\0\0\0\0!"
    assert stat.S_IMODE((box / "new").stat().st_mode) == 0o640
    result, raw = run(ex, Stat(dir=0, flags=0, mask=0x7FF, path=b"/new"))
    assert result == 0 and linux.statx_size(raw) == 11
    assert open_(ex, b"/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL) == -errno.EEXIST


def test_getdents_lists_the_directory(ex: Executor) -> None:
    handle = open_(ex, b"/dir", os.O_RDONLY | os.O_DIRECTORY)
    count, raw = run(ex, Getdents(handle=handle, size=4096))
    assert count == len(raw) > 0
    names = []
    pos = 0
    while pos < len(raw):
        reclen = int.from_bytes(raw[pos + 16 : pos + 18], "little")
        names.append(raw[pos + 19 : pos + reclen].rstrip(b"\0"))
        pos += reclen
    assert sorted(names) == [b".", b"..", b"file"]


def test_listdir_lists_a_whole_directory_in_one_reply(ex: Executor, box: Path) -> None:
    for i in range(50):
        (box / "dir" / f"n{i}").write_bytes(b"")
    result, raw, flags = ex.listdir(Listdir(dir=0, path=b"/dir"))
    assert result == len(raw)
    assert sorted(n for _, _, n in linux.dirents(raw)) == sorted(
        [b".", b"..", b"file", *(f"n{i}".encode() for i in range(50))])  # fmt: skip
    assert flags == 0 and ex.take_attrs() == []  # no watching asked for: none kept
    assert run(ex, Listdir(dir=0, path=b"/dir/file"))[0] == -errno.ENOTDIR
    assert run(ex, Listdir(dir=0, path=b"/nothing"))[0] == -errno.ENOENT
    # /abs is a symlink to "/": inside the root, the box's own top.
    _, top = run(ex, Listdir(dir=0, path=b"/abs"))
    assert {n for _, _, n in linux.dirents(top)} >= {b"dir", b"abs", b"up"}


def test_listdir_watched_primes_the_entries(ex: Executor, box: Path) -> None:
    assert ex.hello(FEATURE_WATCH)
    result, raw, flags = ex.listdir(Listdir(dir=0, path=b"/dir"))
    assert flags & REPLY_WATCHED and result == len(raw)
    primed = {a.path: a for a in ex.take_attrs()}
    assert set(primed) == {b"/dir/file"}
    assert linux.statx_mode(primed[b"/dir/file"].statx) & 0o170000 == stat.S_IFREG


def test_listdir_too_large_says_efbig(ex: Executor, box: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from fsys.slave import executor

    for i in range(200):
        (box / "dir" / f"a-long-name-for-entry-{i:04}").write_bytes(b"")
    monkeypatch.setattr(executor, "MAX_IO", 4096)
    assert run(ex, Listdir(dir=0, path=b"/dir"))[0] == -errno.EFBIG


def test_rename_link_symlink_chmod_truncate(ex: Executor, box: Path) -> None:
    assert run(ex, Rename(olddir=0, newdir=0, flags=0, old=b"/dir/file", new=b"/moved"))[0] == 0
    assert run(ex, Link(olddir=0, newdir=0, flags=0, old=b"/moved", new=b"/hard"))[0] == 0
    assert (box / "hard").stat().st_ino == (box / "moved").stat().st_ino
    assert run(ex, Symlink(dir=0, target=b"moved", path=b"/soft"))[0] == 0
    assert os.readlink(box / "soft") == "moved"
    assert run(ex, Chmod(dir=0, mode=0o600, flags=0, path=b"/soft"))[0] == 0  # follows to the file
    assert stat.S_IMODE((box / "moved").stat().st_mode) == 0o600
    assert run(ex, Truncate(dir=0, length=2, path=b"/moved"))[0] == 0
    assert (box / "moved").read_text() == "in"
    assert (
        run(ex, Rename(olddir=0, newdir=0, flags=1, old=b"/moved", new=b"/hard"))[0]
        == -errno.EEXIST
    )  # NOREPLACE


def test_unlink_rmdir_errors(ex: Executor, box: Path) -> None:
    assert run(ex, Unlink(dir=0, flags=linux.AT_REMOVEDIR, path=b"/dir"))[0] == -errno.ENOTEMPTY
    assert run(ex, Unlink(dir=0, flags=0, path=b"/dir"))[0] == -errno.EISDIR
    assert run(ex, Unlink(dir=0, flags=0, path=b"/missing"))[0] == -errno.ENOENT
    assert run(ex, Unlink(dir=0, flags=0, path=b""))[0] == -errno.ENOENT


def test_chdir_and_handle_path_are_root_relative(ex: Executor) -> None:
    assert run(ex, Chdir(dir=0, path=b"/dir/../dir")) == (4, b"/dir")
    assert run(ex, Chdir(dir=0, path=b"/dir/file"))[0] == -errno.ENOTDIR
    handle = open_(ex, b"/dir", os.O_RDONLY | os.O_DIRECTORY)
    assert run(ex, HandlePath(handle=handle)) == (4, b"/dir")
    assert run(ex, Chdir(dir=0, path=b"/")) == (1, b"/")


def test_closed_and_unknown_handles(ex: Executor) -> None:
    fd = open_(ex, b"/dir/file")
    run(ex, Close(handle=fd))
    assert run(ex, Read(handle=fd, size=10, offset=-1, rwf=0))[0] == -errno.EBADF
    assert run(ex, Read(handle=12345, size=10, offset=-1, rwf=0))[0] == -errno.EBADF


def test_locks_become_description_locks(ex: Executor) -> None:
    a = open_(ex, b"/dir/file", os.O_RDWR)
    b = open_(ex, b"/dir/file", os.O_RDWR)
    wrlock = linux.FLOCK.pack(1, 0, 0, 0, 0)  # F_WRLCK whole file
    assert run(ex, Lock(handle=a, cmd=linux.F_SETLK, flock=wrlock))[0] == 0
    assert run(ex, Lock(handle=b, cmd=linux.F_SETLK, flock=wrlock))[0] == -errno.EAGAIN
    result, out = run(ex, Lock(handle=b, cmd=linux.F_GETLK, flock=wrlock))
    assert result == 0 and linux.FLOCK.unpack(out)[0] == 1  # conflicting lock reported


def test_xattrs(ex: Executor, box: Path) -> None:
    result = run(
        ex, Setxattr(dir=0, flags=0, xflags=0, path=b"/dir/file", name=b"user.k", value=b"v1")
    )[0]
    if result == -errno.EOPNOTSUPP:
        pytest.fail("the test filesystem must support user xattrs")
    assert result == 0
    assert run(ex, Getxattr(dir=0, flags=0, size=100, path=b"/dir/file", name=b"user.k")) == (
        2,
        b"v1",
    )
    assert run(ex, Getxattr(dir=0, flags=0, size=0, path=b"/dir/file", name=b"user.k")) == (2, b"")
    assert (
        run(ex, Getxattr(dir=0, flags=0, size=1, path=b"/dir/file", name=b"user.k"))[0]
        == -errno.ERANGE
    )
    assert run(ex, Listxattr(dir=0, flags=0, size=100, path=b"/dir/file")) == (7, b"user.k\0")
    assert run(ex, Removexattr(dir=0, flags=0, path=b"/dir/file", name=b"user.k"))[0] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="setting a file capability needs root")
def test_a_file_capability_is_removed_without_cap_setfcap(
    ex: Executor, box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slave without CAP_SETFCAP may not removexattr it: the kernel's EPERM, faked
    # here for that name alone; the chown that changes nothing removes it instead.
    real = os.removexattr

    def no_setfcap(path: object, name: bytes, *, follow_symlinks: bool = True) -> None:
        if name == b"security.capability":
            raise PermissionError(errno.EPERM, "Operation not permitted")
        real(path, name, follow_symlinks=follow_symlinks)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "removexattr", no_setfcap)
    f = box / "dir" / "file"
    remove = Removexattr(dir=0, flags=0, path=b"/dir/file", name=b"security.capability")
    assert fails(ex, remove) == errno.ENODATA  # none to remove: as natively
    os.setxattr(f, "security.capability", struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0))
    os.setxattr(f, "user.k", b"v")
    before = f.stat()
    assert run(ex, remove)[0] == 0
    with pytest.raises(OSError) as absent:
        os.getxattr(f, "security.capability")
    assert absent.value.errno == errno.ENODATA
    assert os.getxattr(f, "user.k") == b"v"  # nothing else is removed
    assert (f.stat().st_uid, f.stat().st_gid) == (before.st_uid, before.st_gid)


def test_unconfined_executor_sees_the_whole_filesystem() -> None:
    ex = Executor("/")
    try:
        fd = open_(ex, b"/etc/hostname")
        assert (
            run(ex, Read(handle=fd, size=100, offset=-1, rwf=0))[1]
            == Path("/etc/hostname").read_bytes()
        )
    finally:
        ex.close()


def test_close_releases_every_handle(box: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    ex = Executor(str(box))
    for _ in range(5):
        assert open_(ex, b"/dir/file") > 0
    ex.close()
    assert len(os.listdir("/proc/self/fd")) == before


# --- the streams a slave lends (fsys-slave run) ---------------------------------------


@pytest.fixture
def lent(box: Path) -> Iterator[tuple[Executor, int, int]]:
    """An executor lending a terminal as fds 0 and 1 and a pipe as fd 2: (executor,
    the terminal's other side, the pipe's reading end)."""
    terminal, tty = os.openpty()
    read_end, write_end = os.pipe()
    executor = Executor(str(box), lend={0: tty, 1: os.dup(tty), 2: write_end})
    yield executor, terminal, read_end
    executor.close()
    for fd in (terminal, tty, read_end, write_end):
        os.close(fd)


def test_a_lent_terminal_is_one_handle_and_a_pipe_another(lent: tuple[Executor, int, int]) -> None:
    ex, _, _ = lent
    handles = [run(ex, Lend(fd=n)) for n in (0, 1, 2)]
    assert handles[0] == handles[1]  # one file: one stream for the master too
    assert handles[0][1] == struct.pack("<q", stat.S_IFCHR)
    assert handles[2][1] == struct.pack("<q", stat.S_IFIFO)
    assert handles[2][0] != handles[0][0]
    assert fails(ex, Lend(fd=3)) == errno.EBADF
    assert fails(Executor(str(ex.root)), Lend(fd=0)) == errno.EBADF  # lends nothing
    path = run(ex, HandlePath(handle=handles[0][0]))[1]
    assert path.startswith(b"/dev/pts/")  # named as it is, outside the root as it is


def test_terminal_ioctls_act_on_the_lent_terminal(lent: tuple[Executor, int, int]) -> None:
    ex, terminal, _ = lent
    handle = run(ex, Lend(fd=0))[0]
    size = struct.pack("HHHH", 41, 133, 0, 0)
    assert run(ex, Tty(handle=handle, request=linux.TIOCSWINSZ, arg=0, size=0, data=size)) == (
        0, b"",
    )  # fmt: skip
    got = run(ex, Tty(handle=handle, request=linux.TIOCGWINSZ, arg=0, size=8, data=b""))
    assert got == (0, size)
    modes = run(ex, Tty(handle=handle, request=linux.TCGETS, arg=0, size=36, data=b""))[1]
    assert len(modes) == 36
    lflag = struct.unpack_from("=I", modes, 12)[0]
    raw = modes[:12] + struct.pack("=I", lflag & ~termios.ICANON) + modes[16:]
    run(ex, Tty(handle=handle, request=linux.TCSETS, arg=0, size=0, data=raw))
    assert not termios.tcgetattr(terminal)[3] & termios.ICANON  # the real terminal's
    run(ex, Tty(handle=handle, request=linux.TCFLSH, arg=linux.TCIFLUSH, size=0, data=b""))


@pytest.mark.parametrize(
    ("request_", "size", "data", "code"),
    [
        (0x5412, 0, b"x", errno.ENOTTY),  # TIOCSTI: never typed into the slave's terminal
        (linux.TIOCSPGRP, 0, b"\0" * 4, errno.ENOTTY),  # job control is fmhub's
        (linux.TCGETS, 8, b"", errno.EINVAL),  # a size that is not the struct's
        (linux.TCSETS, 0, b"\0" * 35, errno.EINVAL),
    ],
)
def test_terminal_ioctls_outside_the_table_or_of_a_wrong_size_fail(
    lent: tuple[Executor, int, int], request_: int, size: int, data: bytes, code: int
) -> None:
    ex, _, _ = lent
    handle = run(ex, Lend(fd=0))[0]
    assert fails(ex, Tty(handle=handle, request=request_, arg=0, size=size, data=data)) == code


def test_a_stream_read_ends_without_reading_when_the_session_does(
    lent: tuple[Executor, int, int],
) -> None:
    ex, terminal, _ = lent
    handle = run(ex, Lend(fd=0))[0]
    done: list[object] = []

    def reader() -> None:
        try:
            done.append(ex.execute_blocking(Read(handle=handle, size=100, offset=-1, rwf=0)))
        except OSError as exc:
            done.append(exc.errno)

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.2)
    assert not done  # waiting for the terminal
    ex.close()
    thread.join(5)
    assert done == [errno.EINTR]
    os.write(terminal, b"typed after\n")  # still there for whoever reads next
    tty_fd = os.open(os.ttyname(ex.lent[0]), os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert os.read(tty_fd, 100) == b"typed after\n"
    finally:
        os.close(tty_fd)


def test_a_copy_of_little_between_regular_files_is_not_threaded(ex: Executor, box: Path) -> None:
    (box / "big").write_bytes(bytes(2 << 20))
    os.mkfifo(box / "fifo")
    src, big = open_(ex, b"/dir/file"), open_(ex, b"/big")
    dst = open_(ex, b"/out", os.O_WRONLY | os.O_CREAT, 0o600)
    fifo = open_(ex, b"/fifo", os.O_RDWR | os.O_NONBLOCK)

    def copy(s: int, off_in: int, d: int = dst) -> CopyRange:
        return CopyRange(src=s, off_in=off_in, dst=d, off_out=-1, length=1 << 30, flags=0)

    assert not ex.may_block(copy(src, -1))  # cp's copy of a small file
    assert ex.may_block(copy(big, -1))  # 2 MiB from its position, 0
    assert not ex.may_block(copy(big, (2 << 20) - 10))  # its last 10 bytes
    os.lseek(ex.fd(big), (2 << 20) - (1 << 20), os.SEEK_SET)
    assert not ex.may_block(copy(big, -1))  # 1 MiB left from its position
    assert ex.may_block(copy(fifo, -1)) and ex.may_block(copy(src, -1, fifo))
    assert ex.may_block(copy(99, -1))  # no such handle: the thread says EBADF
    assert run(ex, copy(src, -1)) == (6, b"")
    assert (box / "out").read_bytes() == b"inside"
