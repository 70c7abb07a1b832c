"""mmap of remote files, in-process: the pages, the switched fd, write-back and the
remote handle's lifetime (fsys.master.pages), against a real executor and real
memfds and inotify. The program's side is the fake fd table: a mapping holds the
description that the switched fd names, as ``kept`` holds it here."""

from __future__ import annotations

import errno
import fcntl
import mmap as mmap_module
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fsys import protocol as wire
from fsys.master.routing import CONTINUE
from tests.fakes import AT_FDCWD, FakeProcess, Rig

PROT_READ, PROT_WRITE = 0x1, 0x2
MAP_SHARED, MAP_PRIVATE = 0x01, 0x02
MS_SYNC = 0x4
O_PATH = 0o10000000


@pytest.fixture
def box(tmp_path: Path) -> Path:
    box = tmp_path / "box"
    box.mkdir()
    (box / "f").write_bytes(b"0123456789")
    (box / "d").mkdir()
    return box


def open_(p: FakeProcess, path: bytes, flags: int = os.O_RDONLY) -> int:
    fd = p.call("openat", AT_FDCWD, path, flags, 0)
    assert isinstance(fd, int) and fd >= 0, fd
    return fd


def mmap(
    p: FakeProcess, fd: int, flags: int = MAP_PRIVATE, prot: int = PROT_READ, *,
    length: int = 4096, offset: int = 0,
) -> object:  # fmt: skip
    return p.call("mmap", 0, length, prot, flags, fd, offset)


def view(rig: Rig, p: FakeProcess, fd: int) -> int:
    """The program's description behind ``fd`` (what its mapping maps)."""
    return rig.listener.kept[(p.tgid, fd)]


def reads(rig: Rig) -> list[wire.Read]:
    return [op for op in rig.link.ops if isinstance(op, wire.Read)]


def test_mmap_switches_the_fd_to_pages_holding_the_content(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/f")
    assert mmap(proc, fd) is CONTINUE  # the kernel then maps the pages natively
    assert rig.placeholders.store.owns(proc.fds[fd])
    mapped = view(rig, proc, fd)
    assert os.pread(mapped, 100, 0) == b"0123456789"
    assert os.fstat(mapped).st_size == 10  # a page beyond the end: SIGBUS, as natively
    assert fcntl.fcntl(mapped, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY


def test_the_switched_fd_still_names_the_remote_file(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/f")
    mmap(proc, fd)
    buf = proc.mem.alloc(4)
    assert proc.call("read", fd, buf, 4) == 4
    assert proc.mem.bytes_at(buf, 4) == b"0123"
    assert proc.call("lseek", fd, 0, os.SEEK_CUR) == 4  # the remote file's position


def test_close_on_exec_survives_the_switch(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/f", os.O_RDONLY | os.O_CLOEXEC)
    plain = open_(proc, b"/f")
    mmap(proc, fd)
    mmap(proc, plain)
    assert rig.listener.cloexec[(proc.tgid, fd)] is True
    assert rig.listener.cloexec[(proc.tgid, plain)] is False


def test_a_program_file_of_another_inode_is_not_a_remote_file(
    rig: Rig, proc: FakeProcess, box: Path
) -> None:
    real = open_(proc, b"/f")
    mmap(proc, real)
    other = os.open(box / "f", os.O_RDONLY)  # any other file, shown under our link name
    rig.listener.kept[(proc.tgid, 9)] = other
    proc.fds[9] = proc.fds[real]
    assert proc.call("read", 9, proc.mem.alloc(4), 4) is CONTINUE


def test_separate_opens_of_one_file_share_its_pages(rig: Rig, proc: FakeProcess, box: Path) -> None:
    one = open_(proc, b"/f", os.O_RDWR)
    two = open_(proc, b"/f", os.O_RDWR)
    mmap(proc, one, MAP_SHARED, PROT_READ | PROT_WRITE)
    mmap(proc, two, MAP_SHARED, PROT_READ | PROT_WRITE)
    assert os.fstat(view(rig, proc, one)).st_ino == os.fstat(view(rig, proc, two)).st_ino
    os.pwrite(view(rig, proc, one), b"S", 0)  # one process's shared mapping writes...
    assert os.pread(view(rig, proc, two), 1, 0) == b"S"  # ...the other's shows it
    data = proc.mem.alloc(b"W")
    assert proc.call("pwrite64", two, data, 1, 1) == 1  # a write through either fd too
    assert os.pread(view(rig, proc, one), 2, 0) == b"SW"
    # Each fd still names its own open file: its own position.
    assert proc.call("lseek", one, 3, os.SEEK_SET) == 3
    assert proc.call("lseek", two, 0, os.SEEK_CUR) == 0


def test_a_closed_open_is_released_while_another_open_maps_the_file(
    rig: Rig, proc: FakeProcess, box: Path
) -> None:
    locker = open_(proc, b"/f", os.O_RDWR)
    assert proc.call("flock", locker, 2) == 0  # LOCK_EX
    mmap(proc, locker, MAP_SHARED, PROT_READ | PROT_WRITE)
    keeper = open_(proc, b"/f")
    mmap(proc, keeper)
    handles = len(rig.executor.handles)
    proc.close(locker)  # closed and unmapped: its open file goes, its lock with it
    rig.hub.reap()
    rig.link.pump()
    assert len(rig.executor.handles) == handles - 1
    other = open_(proc, b"/f")
    assert proc.call("flock", other, 2 | 4) == 0  # LOCK_EX | LOCK_NB


@pytest.mark.parametrize(
    ("path", "flags", "map_flags", "prot", "expected"),
    [
        (b"/f", os.O_WRONLY, MAP_PRIVATE, PROT_READ, -errno.EACCES),
        (b"/d", os.O_RDONLY, MAP_PRIVATE, PROT_READ, -errno.ENODEV),
        (b"/f", O_PATH, MAP_PRIVATE, PROT_READ, -errno.EBADF),
    ],
)
def test_what_cannot_be_mapped(
    rig: Rig, proc: FakeProcess, path: bytes, flags: int, map_flags: int, prot: int, expected: int
) -> None:
    fd = open_(proc, path, flags)
    assert mmap(proc, fd, map_flags, prot) == expected
    assert proc.fds[fd].startswith("socket:")  # untouched


def test_a_shared_mapping_of_a_read_only_fd_is_read_only(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/f")
    assert mmap(proc, fd, MAP_SHARED, PROT_READ | PROT_WRITE) is CONTINUE
    # The description is O_RDONLY: the kernel's own mmap answers EACCES.
    with pytest.raises(PermissionError):
        mmap_module.mmap(view(rig, proc, fd), 10, mmap_module.MAP_SHARED, PROT_READ | PROT_WRITE)
    mmap_module.mmap(view(rig, proc, fd), 10, mmap_module.MAP_PRIVATE, PROT_READ | PROT_WRITE)


def test_shared_writes_reach_the_slave_before_the_next_call(
    rig: Rig, proc: FakeProcess, box: Path
) -> None:
    fd = open_(proc, b"/f", os.O_RDWR)
    assert mmap(proc, fd, MAP_SHARED, PROT_READ | PROT_WRITE) is CONTINUE
    os.pwrite(view(rig, proc, fd), b"AB", 3)  # the program writes through its mapping
    buf = proc.mem.alloc(10)
    assert proc.call("pread64", fd, buf, 10, 0) == 10  # read(2) sees it, as natively
    assert proc.mem.bytes_at(buf, 10) == b"012AB56789"
    assert (box / "f").read_bytes() == b"012AB56789"


def test_only_the_changed_blocks_are_written_back(rig: Rig, proc: FakeProcess, box: Path) -> None:
    (box / "big").write_bytes(bytes(300_000))
    fd = open_(proc, b"/big", os.O_RDWR)
    mmap(proc, fd, MAP_SHARED, PROT_READ | PROT_WRITE, length=300_000)
    os.pwrite(view(rig, proc, fd), b"\1", 200_000)
    rig.link.ops.clear()
    proc.call("fsync", fd)
    writes = [op for op in rig.link.ops if isinstance(op, wire.Write)]
    assert [(w.offset, len(w.data)) for w in writes] == [(196_608, 4096)]  # its page
    assert (box / "big").read_bytes()[200_000] == 1
    rig.link.ops.clear()
    proc.call("fsync", fd)  # nothing new: nothing sent
    assert not [op for op in rig.link.ops if isinstance(op, wire.Write)]


def test_only_the_mapped_range_is_fetched(rig: Rig, proc: FakeProcess, box: Path) -> None:
    with open(box / "sparse", "wb") as f:
        f.truncate(6 << 30)  # a 6 GiB file with one page of data at 5 GiB
        f.seek(5 << 30)
        f.write(b"deep")
    fd = open_(proc, b"/sparse")
    assert mmap(proc, fd, length=100, offset=5 << 30) is CONTINUE
    assert [(op.offset, op.size) for op in reads(rig)] == [(5 << 30, 4096)]
    mapped = view(rig, proc, fd)
    assert os.fstat(mapped).st_size == 6 << 30
    assert os.pread(mapped, 4, 5 << 30) == b"deep"
    mmap(proc, fd, length=8192, offset=(5 << 30) - 4096)  # one page more, before it
    assert [(op.offset, op.size) for op in reads(rig)][1:] == [((5 << 30) - 4096, 4096)]


def test_a_new_mmap_first_writes_back_what_mappings_changed(
    rig: Rig, proc: FakeProcess, box: Path
) -> None:
    fd = open_(proc, b"/f", os.O_RDWR)
    mmap(proc, fd, MAP_SHARED, PROT_READ | PROT_WRITE)
    os.pwrite(view(rig, proc, fd), b"M", 2)
    reads_before = len(reads(rig))
    assert mmap(proc, fd, MAP_SHARED, PROT_READ | PROT_WRITE) is CONTINUE
    assert (box / "f").read_bytes() == b"01M3456789"
    assert len(reads(rig)) == reads_before  # its own write-back: nothing to fetch again


def test_writes_through_the_fd_show_in_the_pages(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/f", os.O_RDWR)
    mmap(proc, fd, MAP_SHARED, PROT_READ | PROT_WRITE)
    data = proc.mem.alloc(b"xy")
    assert proc.call("pwrite64", fd, data, 2, 8) == 2
    assert proc.call("lseek", fd, 0, os.SEEK_END) == 10
    assert proc.call("write", fd, data, 2) == 2  # at the position: the file grows
    assert os.pread(view(rig, proc, fd), 100, 0) == b"01234567xyxy"
    assert proc.call("ftruncate", fd, 4) == 0
    assert os.fstat(view(rig, proc, fd)).st_size == 4


def test_a_large_positioned_write_through_the_fd_shows_in_the_pages(
    rig: Rig, proc: FakeProcess
) -> None:
    """Split in MAX_IO pieces: each piece lands in the pages where it went in the file."""
    fd = open_(proc, b"/f", os.O_RDWR)
    mmap(proc, fd, MAP_SHARED, PROT_READ | PROT_WRITE)
    size = wire.MAX_IO + 100
    data = bytes(range(251)) * (size // 251) + bytes(size % 251)
    assert proc.call("pwrite64", fd, proc.mem.alloc(data), size, 4) == size
    assert os.pread(view(rig, proc, fd), size + 10, 0) == b"0123" + data


def test_pages_are_fetched_again_only_when_the_slave_file_changed(
    rig: Rig, proc: FakeProcess, box: Path
) -> None:
    fd = open_(proc, b"/f")
    mmap(proc, fd)
    before = len(reads(rig))
    mmap(proc, fd)
    assert len(reads(rig)) == before  # unchanged: the pages are reused
    (box / "f").write_bytes(b"another content")  # another process on the slave
    mmap(proc, fd)
    assert len(reads(rig)) > before
    assert os.pread(view(rig, proc, fd), 100, 0) == b"another content"


def test_the_remote_handle_lives_while_mapped(rig: Rig, proc: FakeProcess, box: Path) -> None:
    fd = open_(proc, b"/f", os.O_RDWR)
    dup = os.dup(rig.listener.kept[(proc.tgid, fd)])  # a copy of the placeholder elsewhere
    mmap(proc, fd, MAP_SHARED, PROT_READ | PROT_WRITE)
    mapping = os.dup(view(rig, proc, fd))  # the mapping holds the description
    handles = len(rig.executor.handles)
    proc.close(fd)
    os.close(dup)
    rig.hub.reap()
    assert len(rig.executor.handles) == handles  # still mapped: still open
    os.pwrite(mapping, b"Z", 0)
    os.close(mapping)  # munmap: the description is released
    rig.hub.reap()
    rig.link.pump()
    assert len(rig.executor.handles) == handles - 1
    assert (box / "f").read_bytes() == b"Z123456789"  # written back before the close
    assert not rig.placeholders.by_handle


def test_unmapped_pages_are_written_back_while_the_fd_stays(
    rig: Rig, proc: FakeProcess, box: Path
) -> None:
    fd = open_(proc, b"/f", os.O_RDWR)
    copy = open_(proc, b"/f")
    mmap(proc, fd, MAP_SHARED, PROT_READ | PROT_WRITE)
    os.pwrite(view(rig, proc, fd), b"Q", 1)
    # The program dup'ed the placeholder before mapping, then closes the mapped fd.
    rig.listener.kept[(proc.tgid, 20)] = os.dup(rig.listener.kept[(proc.tgid, copy)])
    proc.close(fd)
    rig.hub.reap()
    rig.link.pump()
    assert (box / "f").read_bytes() == b"0Q23456789"


def test_the_end_of_the_session_writes_back(rig: Rig, proc: FakeProcess, box: Path) -> None:
    fd = open_(proc, b"/f", os.O_RDWR)
    mmap(proc, fd, MAP_SHARED, PROT_READ | PROT_WRITE)
    os.pwrite(view(rig, proc, fd), b"E", 9)
    for remote in rig.placeholders.paged():
        rig.hub.write_back(remote)
    rig.link.pump()
    assert (box / "f").read_bytes() == b"012345678E"


# --- write-back and sharing, at their edges ----------------------------------------


def at_first(rig: Rig, kind: type, action: Callable[[], None]) -> None:
    """Run ``action`` (then fmhub's reap) as the slave performs the first ``kind`` op."""
    done: list[bool] = []

    def hook(op: wire.Operation) -> None:
        if isinstance(op, kind) and not done:
            done.append(True)
            action()
            rig.hub.reap()

    rig.link.on_perform = hook


def test_write_back_never_sends_what_was_not_fetched(
    rig: Rig, proc: FakeProcess, box: Path
) -> None:
    (box / "f").write_bytes(b"\xaa" * 200_000)
    fd = open_(proc, b"/f", os.O_RDWR)
    mmap(proc, fd, MAP_SHARED, PROT_READ | PROT_WRITE, length=4096, offset=69632)
    os.pwrite(view(rig, proc, fd), b"X", 70000)
    proc.call("fsync", fd)
    data = (box / "f").read_bytes()
    assert data[65536:69632] == b"\xaa" * 4096 and data[70000:70001] == b"X"


def test_a_file_extended_then_written_through_the_mapping(
    rig: Rig, proc: FakeProcess, box: Path
) -> None:
    (box / "f").write_bytes(b"a" * 4096)
    fd = open_(proc, b"/f", os.O_RDWR)
    mmap(proc, fd, MAP_SHARED, PROT_READ | PROT_WRITE, length=8192)
    assert proc.call("ftruncate", fd, 8192) == 0
    os.pwrite(view(rig, proc, fd), b"Y", 5000)  # the mapping writes the new page
    proc.call("fsync", fd)
    assert (box / "f").read_bytes()[5000:5001] == b"Y"


def test_a_write_through_an_open_that_never_mapped(rig: Rig, proc: FakeProcess, box: Path) -> None:
    fd = open_(proc, b"/f", os.O_RDWR)
    other = open_(proc, b"/f", os.O_RDWR)
    mmap(proc, fd, MAP_SHARED, PROT_READ | PROT_WRITE)
    assert proc.call("pwrite64", other, proc.mem.alloc(b"B"), 1, 5) == 1
    assert os.pread(view(rig, proc, fd), 10, 0) == b"01234B6789"  # the mapping shows it
    os.pwrite(view(rig, proc, fd), b"M", 0)
    buf = proc.mem.alloc(10)
    assert proc.call("pread64", other, buf, 10, 0) == 10  # and its read sees the mapping's
    assert proc.mem.bytes_at(buf, 10) == b"M1234B6789"
    assert (box / "f").read_bytes() == b"M1234B6789"


def test_write_back_is_not_split_by_the_close_of_its_handle(
    rig: Rig, proc: FakeProcess, box: Path
) -> None:
    (box / "f").write_bytes(b"." * 300_000)
    a = open_(proc, b"/f", os.O_RDWR)
    mmap(proc, a, MAP_SHARED, PROT_READ | PROT_WRITE, length=300_000)
    os.pwrite(view(rig, proc, a), b"1", 0)
    os.pwrite(view(rig, proc, a), b"2", 200_000)
    second = rig.process(200)
    b = open_(second, b"/f", os.O_RDWR)
    at_first(rig, wire.Write, lambda: proc.close(a))  # unmapped and closed meanwhile
    assert mmap(second, b, MAP_SHARED, PROT_READ | PROT_WRITE, length=300_000) is CONTINUE
    data = (box / "f").read_bytes()
    assert data[0:1] == b"1" and data[200_000:200_001] == b"2"


@pytest.mark.parametrize("same_handle", [True, False])
def test_its_own_write_back_does_not_make_the_pages_stale(
    rig: Rig, proc: FakeProcess, box: Path, same_handle: bool
) -> None:
    fd = open_(proc, b"/f", os.O_RDWR)
    two = fd if same_handle else open_(proc, b"/f", os.O_RDWR)
    mmap(proc, fd, MAP_SHARED, PROT_READ | PROT_WRITE)
    time.sleep(0.02)  # so that the write-back moves the slave's mtime
    os.pwrite(view(rig, proc, fd), b"M", 2)
    mmap(proc, two, MAP_SHARED, PROT_READ | PROT_WRITE)  # writes back first
    before = len(reads(rig))
    mmap(proc, fd, MAP_SHARED, PROT_READ | PROT_WRITE)  # nothing changed since
    assert len(reads(rig)) == before


def test_an_fd_closed_during_its_mmap(rig: Rig, proc: FakeProcess) -> None:
    fd = open_(proc, b"/f", os.O_RDWR)
    at_first(rig, wire.Stat, lambda: proc.close(fd))  # another thread closes it meanwhile
    assert mmap(proc, fd, MAP_SHARED, PROT_READ | PROT_WRITE) == -errno.EBADF
    assert not rig.placeholders.by_handle  # nothing kept for a closed handle


def test_write_back_never_goes_through_an_append_handle(
    rig: Rig, proc: FakeProcess, box: Path
) -> None:
    appending = open_(proc, b"/f", os.O_RDWR | os.O_APPEND)
    mmap(proc, appending, MAP_PRIVATE, PROT_READ)
    rw = open_(proc, b"/f", os.O_RDWR)
    mmap(proc, rw, MAP_SHARED, PROT_READ | PROT_WRITE)
    os.pwrite(view(rig, proc, rw), b"Z", 0)
    proc.call("fsync", rw)
    assert (box / "f").read_bytes() == b"Z123456789"


def test_a_large_range_is_fetched_around_the_files_holes(
    rig: Rig, proc: FakeProcess, box: Path
) -> None:
    with open(box / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(3 << 20)
        f.write(b"A" * 5000)  # one data extent, in a 16 MiB range that is mostly holes
        f.seek((8 << 20) - 10)
        f.write(b"end")
    fd = open_(proc, b"/sparse")
    assert proc.call("lseek", fd, 1234, os.SEEK_SET) == 1234
    assert mmap(proc, fd, length=16 << 20, offset=0) is CONTINUE
    fetched = sum(op.size for op in reads(rig))
    assert fetched < 64 << 10  # the data pages only, not 16 MiB
    mapped = view(rig, proc, fd)
    assert os.pread(mapped, 5000, 3 << 20) == b"A" * 5000
    assert os.pread(mapped, 3, (8 << 20) - 10) == b"end"
    assert os.pread(mapped, 4, 1 << 20) == bytes(4)  # a hole reads as zeros
    assert proc.call("lseek", fd, 0, os.SEEK_CUR) == 1234  # the program's position kept
    rig.link.pump()
    assert list(rig.executor.handles) == list(rig.placeholders.by_handle)  # no reopen left
