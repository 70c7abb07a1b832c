"""The attribute cache: the slave's watches (inotify), its watched STAT answers, the
INVALIDATEs before replies, the master's cache, and what a program sees end to end."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import termios
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from fsys import linux
from fsys import protocol as wire
from fsys.iostream import FdTransport
from fsys.linux import (
    AT_FDCWD,
    AT_SYMLINK_NOFOLLOW,
    O_CLOEXEC,
    O_DIRECTORY,
    O_PATH,
    STATX_BASIC_STATS,
)
from fsys.master import cache, calls, fmhub
from fsys.master.cache import AttrCache
from fsys.master.link import SlaveLink
from fsys.master.routing import CONTINUE
from fsys.protocol import (
    FEATURE_OPEN_READ,
    FEATURE_WATCH,
    NEED_DATA,
    REPLY_NO_XATTRS,
    REPLY_NOT_LINK,
    REPLY_WATCHED,
    Attrs,
    Call,
    Chmod,
    Connection,
    Create,
    Hello,
    Invalidate,
    Lseek,
    Open,
    OpenRead,
    Read,
    Reply,
    Role,
    Stat,
    Write,
    decode_paths,
    watch_key,
)
from fsys.slave import executor as executor_module
from fsys.slave.executor import Executor, MustBlock
from fsys.slave.fshub import before_reply, perform, serve_transport
from fsys.slave.watches import MAX_DIRS, Watches, batches
from tests.conftest import SYSTEM_PYTHON, Session, served_link
from tests.fakes import FakeProcess, Rig

BASIC = STATX_BASIC_STATS
STATX_BTIME = 0x800

# --- the key both sides use ------------------------------------------------------------


def test_watch_key_collapses_what_names_the_same_and_refuses_the_rest() -> None:
    assert watch_key(b"/a//b/./c") == b"/a/b/c"
    assert watch_key(b"/./x") == b"/x"
    for path in (b"a/b", b"/a/../b", b"/a/", b"/a/.", b"/", b"", b"/a/.."):
        assert watch_key(path) is None, path


# --- the master's cache ------------------------------------------------------------------


def test_an_answer_about_no_symlink_holds_for_both_variants() -> None:
    cache = AttrCache()
    cache.store(b"/a/f", False, BASIC, 0, b"R", REPLY_WATCHED | REPLY_NOT_LINK)
    assert cache.lookup(b"/a/f", True, BASIC) == (0, b"R")
    assert cache.lookup(b"/a/f", False, BASIC) == (0, b"R")
    assert cache.hits == 2


def test_an_answer_about_a_symlink_holds_for_its_variant_only() -> None:
    cache = AttrCache()
    cache.store(b"/a/l", False, BASIC, 0, b"L", REPLY_WATCHED)
    assert cache.lookup(b"/a/l", False, BASIC) == (0, b"L")
    assert cache.lookup(b"/a/l", True, BASIC) is None


def test_fields_the_slave_was_not_asked_for_go_to_the_slave() -> None:
    cache = AttrCache()
    cache.store(b"/f", True, BASIC, 0, b"R", REPLY_WATCHED | REPLY_NOT_LINK)
    assert cache.lookup(b"/f", True, BASIC | STATX_BTIME) is None
    assert cache.lookup(b"/f", True, 0x1) == (0, b"R")  # fewer: the answer has them
    cache.store(b"/g", True, BASIC, -2, b"", REPLY_WATCHED | REPLY_NOT_LINK)
    assert cache.lookup(b"/g", True, BASIC | STATX_BTIME) == (-2, b"")  # no file


def test_an_invalidation_drops_the_path_and_everything_below_it() -> None:
    cache = AttrCache()
    flags = REPLY_WATCHED | REPLY_NOT_LINK
    for key in (b"/a", b"/a/b/c/d", b"/a/bc", b"/x"):  # /a/b and /a/b/c never cached
        cache.store(key, True, BASIC, 0, key, flags)
    cache.invalidate((b"/a/b",))
    assert sorted(cache.entries) == [b"/a", b"/a/bc", b"/x"]
    cache.invalidate([b"/a"])
    assert sorted(cache.entries) == [b"/x"]
    cache.store(b"/a/b", True, BASIC, 0, b"again", flags)  # and may be cached again
    assert cache.lookup(b"/a/b", True, BASIC) == (0, b"again")
    cache.invalidate((b"/",))
    assert len(cache) == 0


def test_a_change_of_content_drops_the_files_answer() -> None:
    cache = AttrCache()
    flags = REPLY_WATCHED | REPLY_NOT_LINK
    for key in (b"/a", b"/a/f", b"/a/g"):
        cache.store(key, True, BASIC, 0, key, flags)
    cache.invalidate((b"/a/f/..",))
    assert sorted(cache.entries) == [b"/a", b"/a/g"]


def test_a_directory_s_own_answer_is_dropped_alone() -> None:
    cache = AttrCache()
    flags = REPLY_WATCHED | REPLY_NOT_LINK
    for key in (b"/a", b"/a/b", b"/a/b/c"):
        cache.store(key, True, BASIC, 0, key, flags)
    cache.opened(7, b"/a/b")
    cache.invalidate((b"/a/b/.",))  # a name added to /a/b: its mtime changed
    assert sorted(cache.entries) == [b"/a", b"/a/b/c"]
    assert cache.key_of(7, b"c") == b"/a/b/c"  # the handle still names it
    cache.invalidate((b"/.",))  # the root has no answer of its own
    assert sorted(cache.entries) == [b"/a", b"/a/b/c"]


def test_the_cache_holds_at_most_its_limit() -> None:
    cache = AttrCache(limit=64)
    for i in range(1000):
        cache.store(b"/d/%d" % i, True, BASIC, 0, b"", REPLY_WATCHED | REPLY_NOT_LINK)
    assert 0 < len(cache) <= 64
    assert cache.lookup(b"/d/999", True, BASIC) is not None  # the newest are kept
    assert cache.lookup(b"/d/0", True, BASIC) is None


# --- the slave's watches -------------------------------------------------------------------


@pytest.fixture
def watches(tmp_path: Path) -> Iterator[Watches]:
    root = os.open(tmp_path, O_PATH | O_DIRECTORY | O_CLOEXEC)
    from fsys.slave.executor import _openat2

    w = Watches(root, _openat2, confined=True)
    assert w.start()
    yield w
    w.close()
    os.close(root)


def test_every_directory_on_the_way_is_watched(watches: Watches, tmp_path: Path) -> None:
    (tmp_path / "a/b").mkdir(parents=True)
    where = watches.parent(b"/a/b/f")
    assert where is not None and where[1] == b"f"
    assert set(watches.dirs) == {b"/", b"/a", b"/a/b"}
    assert os.path.samefile(f"/proc/self/fd/{where[0]}", tmp_path / "a/b")


def test_a_symlink_on_the_way_is_not_watched(watches: Watches, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    (tmp_path / "file").write_text("")
    assert watches.parent(b"/link/f") is None
    assert watches.parent(b"/file/f") is None
    assert b"/link" not in watches.dirs and b"/file" not in watches.dirs
    assert watches.parent(b"/gone/f") is None


def test_changes_name_the_entries_that_changed(watches: Watches, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a/f").write_text("x")
    assert watches.parent(b"/a/f") is not None
    assert watches.changes() == []
    os.chmod(tmp_path / "a/f", 0o600)
    (tmp_path / "a/new").write_text("")
    (tmp_path / "top").mkdir()
    # a name added: the directory's own answer too (its mtime), not those below it
    assert watches.changes() == [b"/.", b"/a/.", b"/a/f", b"/a/new", b"/top"]
    with open(tmp_path / "a/f", "a") as f:
        f.write("more")  # content alone: the size and mtime, not the owner, mode, xattrs
    assert watches.changes() == [b"/a/f/.."]
    with open(tmp_path / "a/f", "a") as f:
        f.write("more")
    os.chmod(tmp_path / "a/f", 0o644)  # and its mode: the whole answer
    assert watches.changes() == [b"/a/f"]
    os.unlink(tmp_path / "a/new")
    assert watches.changes() == [b"/a/.", b"/a/new"]
    os.chmod(tmp_path / "a", 0o700)  # the directory itself: all below it too
    assert watches.changes() == [b"/a"]


def test_a_renamed_directory_is_no_longer_watched_under_its_old_name(
    watches: Watches, tmp_path: Path
) -> None:
    (tmp_path / "a/b").mkdir(parents=True)
    assert watches.parent(b"/a/b/f") is not None
    os.rename(tmp_path / "a", tmp_path / "z")
    assert b"/a" in watches.changes()
    assert set(watches.dirs) == {b"/"}  # /a and /a/b named what they name no more
    (tmp_path / "z/b/f").write_text("")  # nothing reported under a name that is gone
    assert watches.changes() == []
    (tmp_path / "a").mkdir()
    assert watches.changes() == [b"/.", b"/a"]
    assert watches.parent(b"/a/f") is not None  # the new /a is watched afresh
    (tmp_path / "a/f").write_text("")
    assert watches.changes() == [b"/a/.", b"/a/f"]


def test_a_removed_directory_is_forgotten(watches: Watches, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert watches.parent(b"/a/f") is not None
    os.rmdir(tmp_path / "a")
    assert watches.changes() == [b"/.", b"/a"]
    assert set(watches.dirs) == {b"/"}
    assert not watches.keys.get(-1)


def test_no_watch_left_means_no_watched_answer(watches: Watches, tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / str(i)).mkdir()
    import fsys.slave.watches as module

    saved = module.MAX_DIRS
    module.MAX_DIRS = 2
    try:
        assert watches.parent(b"/0/f") is not None
        assert watches.parent(b"/1/f") is None  # "/" and "/0" fill it
        assert watches.full
    finally:
        module.MAX_DIRS = saved
    assert saved == MAX_DIRS


def test_invalidations_are_split_into_frames_of_bounded_size() -> None:
    paths = [b"/" + b"x" * 1000 + b"%d" % i for i in range(200)]
    frames = batches(paths)
    assert [p for frame in frames for p in frame] == paths
    assert len(frames) > 1
    assert all(sum(4 + len(p) for p in frame) <= 65536 for frame in frames)


# --- the executor's watched answers -----------------------------------------------------------


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[Executor]:
    ex = Executor(str(tmp_path))
    assert not ex.watches.enabled  # until the master asks for it
    assert ex.hello(FEATURE_WATCH) and ex.watches.enabled
    yield ex
    ex.close()


def _stat(ex: Executor, path: bytes, flags: int = 0) -> tuple[int, bytes, int]:
    return ex.stat(Stat(dir=0, flags=flags, mask=BASIC, path=path))


def test_a_file_in_watched_directories_is_watched(executor: Executor, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_text("12345")
    result, raw, flags = _stat(executor, b"/d/f")
    assert (result, flags) == (0, REPLY_WATCHED | REPLY_NOT_LINK)
    assert linux.statx_size(raw) == 5
    result, raw, flags = _stat(executor, b"/d")
    assert (result, flags) == (0, REPLY_WATCHED | REPLY_NOT_LINK)
    assert stat.S_ISDIR(linux.statx_mode(raw))


def test_a_missing_file_is_a_watched_answer(executor: Executor, tmp_path: Path) -> None:
    assert _stat(executor, b"/nothing") == (-2, b"", REPLY_WATCHED | REPLY_NOT_LINK)


def test_symlinks_and_hard_links(executor: Executor, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    (tmp_path / "l").symlink_to("f")
    result, raw, flags = _stat(executor, b"/l", AT_SYMLINK_NOFOLLOW)
    assert (result, flags) == (0, REPLY_WATCHED) and stat.S_ISLNK(linux.statx_mode(raw))
    result, raw, flags = _stat(executor, b"/l")  # followed: depends on the target
    assert (result, flags) == (0, 0) and stat.S_ISREG(linux.statx_mode(raw))
    os.link(tmp_path / "f", tmp_path / "g")
    result, raw, flags = _stat(executor, b"/g")
    assert (result, flags) == (0, 0) and linux.statx_nlink(raw) == 2


def test_paths_not_in_key_form_are_not_watched(executor: Executor, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_text("x")
    for path in (b"/d//f", b"/d/./f", b"/d/../d/f", b"/d/"):
        assert _stat(executor, path)[::2] == (0, 0), path
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    (tmp_path / "real/f").write_text("x")
    assert _stat(executor, b"/link/f")[::2] == (0, 0)
    assert _stat(executor, b"/d/f", linux.AT_STATX_FORCE_SYNC)[::2] == (0, 0)


def test_a_confined_slave_never_answers_about_a_file_outside(tmp_path: Path) -> None:
    box = tmp_path / "box"
    (box / "d").mkdir(parents=True)
    (tmp_path / "secret").write_text("outside")
    os.symlink("/", box / "d/up")  # inside the box: its root
    ex = Executor(str(box))
    ex.hello(FEATURE_WATCH)
    try:
        assert ex.stat(Stat(dir=0, flags=0, mask=BASIC, path=b"/secret"))[0] == -2
        with pytest.raises(FileNotFoundError):  # followed inside the box, not watched
            ex.stat(Stat(dir=0, flags=0, mask=BASIC, path=b"/d/up/secret"))
        assert b"/d/up" not in ex.watches.dirs
    finally:
        ex.close()


def _create(path: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_EXCL) -> Create:
    return Create(dir=0, flags=flags, mode=0o600, resolve=0, mask=BASIC, path=path)


def test_a_create_brings_the_new_files_watched_answer(executor: Executor, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    assert _stat(executor, b"/d/x")[0] == -errno.ENOENT  # /d is watched now
    handle, blob, flags = executor.create(_create(b"/d/x"))
    assert handle > 0 and (tmp_path / "d/x").exists()
    assert flags == REPLY_WATCHED | REPLY_NOT_LINK | REPLY_NO_XATTRS
    raw = blob[: linux.STATX_SIZE]
    assert stat.S_ISREG(linux.statx_mode(raw)) and linux.statx_size(raw) == 0
    assert linux.statx_mode(raw) & 0o7777 == os.stat(tmp_path / "d/x").st_mode & 0o7777
    # What changed until the open comes with the answer (the create's own change); a
    # change after the STAT does not (it goes after the reply, when inotify says so).
    (tmp_path / "d/later").write_text("another process")
    assert decode_paths(blob[linux.STATX_SIZE :]) == (b"/d/.", b"/d/x")
    assert executor.take_early() == []  # (all in the reply: nothing to find before it)
    assert executor.take_early() is None
    assert executor.watches.changes() == [b"/d/.", b"/d/later"]


def test_a_create_that_follows_many_changes_invalidates_them_before_its_reply(
    executor: Executor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "d").mkdir()
    _stat(executor, b"/d/x")
    (tmp_path / "d/other").write_text("another process")
    monkeypatch.setattr(wire, "MAX_SMALL", 20)  # more than a reply should hold
    handle, blob, _ = executor.create(_create(b"/d/x"))
    assert handle > 0 and len(blob) == linux.STATX_SIZE
    assert executor.take_early() == [b"/d/.", b"/d/other", b"/d/x"]


def test_a_create_where_xattrs_cannot_be_listed_claims_nothing_about_them(
    executor: Executor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*args: object, **kwargs: object) -> list[str]:
        raise OSError(errno.EOPNOTSUPP, "no xattrs on this file system")

    monkeypatch.setattr(os, "listxattr", refused)
    handle, _, flags = executor.create(_create(b"/x"))
    assert handle > 0 and flags == REPLY_WATCHED | REPLY_NOT_LINK


def test_a_create_that_waited_in_a_thread_is_invalidated_before_its_reply(
    executor: Executor, tmp_path: Path
) -> None:
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d/p")
    master, slave = _slave_conn()
    _stat(executor, b"/d/p")
    (tmp_path / "d/other").write_text("another process")  # (unseen until a look)
    create = _create(b"/d/p", os.O_RDWR | os.O_CREAT)
    reply = perform(executor, Call(0, 1, create), blocking=True)
    assert reply.result > 0 and reply.blob == b""
    master.receive_data(before_reply(executor, slave, create))
    assert master.next_event() == Invalidate((b"/d/.", b"/d/other"))


def test_a_create_says_no_xattrs_only_where_there_are_none(
    executor: Executor, tmp_path: Path
) -> None:
    (tmp_path / "y").write_text("there")
    os.setxattr(tmp_path / "y", "user.tag", b"1")
    _, _, flags = executor.create(_create(b"/y", os.O_WRONLY | os.O_CREAT))
    assert flags == REPLY_WATCHED | REPLY_NOT_LINK
    # Not watched (a path not in key form): no claim about xattrs either.
    _, _, flags = executor.create(_create(b"//z"))
    assert flags == 0


def test_a_create_without_o_creat_or_of_something_there_fails(
    executor: Executor, tmp_path: Path
) -> None:
    (tmp_path / "f").write_text("x")
    for op, code in ((_create(b"/g", os.O_WRONLY), errno.EINVAL), (_create(b"/f"), errno.EEXIST),
                     (_create(b"/none/f"), errno.ENOENT)):  # fmt: skip
        reply = perform(executor, Call(0, 1, op))
        assert reply.result == -code and reply.flags == 0
    assert not (tmp_path / "g").exists()


def test_a_created_fifo_that_was_there_waits_in_a_thread_and_brings_no_answer(
    executor: Executor, tmp_path: Path
) -> None:
    os.mkfifo(tmp_path / "p")
    with pytest.raises(MustBlock):
        perform(executor, Call(0, 1, _create(b"/p", os.O_RDWR | os.O_CREAT)))
    reply = perform(executor, Call(0, 1, _create(b"/p", os.O_RDWR | os.O_CREAT)), blocking=True)
    assert reply.result > 0 and reply.blob == b"" and reply.flags == 0


def test_a_create_s_reply_has_what_came_before_its_stat_and_the_next_the_rest(
    executor: Executor, tmp_path: Path
) -> None:
    (tmp_path / "d").mkdir()
    master, slave = _slave_conn()
    _stat(executor, b"/d/x")
    reply = perform(executor, Call(0, 1, _create(b"/d/x")))
    (tmp_path / "d/later").write_text("another process")
    assert before_reply(executor, slave, _create(b"/d/x")) == b""  # (the reply has them)
    assert decode_paths(reply.blob[linux.STATX_SIZE :]) == (b"/d/.", b"/d/x")
    assert reply.result > 0 and reply.flags & REPLY_WATCHED
    # The next reply's INVALIDATE has the rest.
    chmod = Chmod(dir=0, mode=0, flags=0, path=b"/d/x")  # (not performed)
    master.receive_data(before_reply(executor, slave, chmod))
    assert master.next_event() == Invalidate((b"/d/.", b"/d/later"))


def _slave_conn() -> tuple[Connection, Connection]:
    master, slave = Connection(Role.MASTER), Connection(Role.SLAVE)
    slave.receive_data(master.send(Hello(features=FEATURE_WATCH)))
    master.receive_data(slave.send(Hello(features=0)))
    assert slave.next_event() and master.next_event()
    return master, slave


def test_a_write_s_invalidate_is_followed_by_the_files_new_answer(
    executor: Executor, tmp_path: Path
) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_text("12")
    (tmp_path / "u").mkdir()
    (tmp_path / "u/g").write_text("12")
    master, slave = _slave_conn()
    _stat(executor, b"/d/f")  # /d is watched; /u is not
    handles = {}
    for path, flags in ((b"/d/f", os.O_WRONLY), (b"/u/g", os.O_RDWR), (b"/d/f", os.O_RDONLY)):
        opening = Open(dir=0, flags=flags, mode=0, resolve=0, path=path)
        handles[path, flags] = perform(executor, Call(0, 1, opening)).result
    write = Write(handle=handles[b"/d/f", os.O_WRONLY], offset=2, rwf=0, data=b"345")
    assert perform(executor, Call(0, 1, write)).result == 3
    master.receive_data(before_reply(executor, slave, write))
    assert master.next_event() == Invalidate((b"/d/f/..",))
    attrs = master.next_event()
    assert isinstance(attrs, Attrs) and [a.path for a in attrs.entries] == [b"/d/f"]
    assert attrs.entries[0].flags & REPLY_WATCHED
    assert linux.statx_size(attrs.entries[0].statx) == 5
    # Unwatched, or not opened to write: its answer does not follow.
    for key in ((b"/u/g", os.O_RDWR), (b"/d/f", os.O_RDONLY)):
        write = Write(handle=handles[key], offset=0, rwf=0, data=b"x")
        perform(executor, Call(0, 1, write))
        frames = before_reply(executor, slave, write)  # (an INVALIDATE, if watched)
        if frames:
            master.receive_data(frames)
            while (event := master.next_event()) is not NEED_DATA:
                assert not isinstance(event, Attrs), key


def test_a_write_whose_file_cannot_be_stated_brings_only_its_invalidate(
    executor: Executor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "f").write_text("12")
    master, slave = _slave_conn()
    _stat(executor, b"/f")
    opening = Open(dir=0, flags=os.O_WRONLY, mode=0, resolve=0, path=b"/f")
    write = Write(handle=perform(executor, Call(0, 1, opening)).result, offset=0, rwf=0,
                  data=b"x")  # fmt: skip
    perform(executor, Call(0, 1, write))

    def failing(*args: object) -> None:
        raise OSError(errno.EIO, "the disk")

    monkeypatch.setattr(executor_module, "_watched_stat", failing)
    master.receive_data(before_reply(executor, slave, write))  # (no exception: the slave goes on)
    assert master.next_event() == Invalidate((b"/f/..",))
    assert master.next_event() is NEED_DATA


def test_an_o_tmpfile_handle_brings_no_answer_after_its_writes(
    executor: Executor, tmp_path: Path
) -> None:
    _stat(executor, b"/f")
    opening = Open(dir=0, flags=os.O_RDWR | linux.O_TMPFILE, mode=0o600, resolve=0, path=b"/")
    handle = perform(executor, Call(0, 1, opening)).result
    assert handle > 0 and executor.handles[handle].key is None
    write = Write(handle=handle, offset=0, rwf=0, data=b"x")
    assert executor.written(write) == []


# --- fshub: INVALIDATE before the reply ----------------------------------------------------


@pytest.fixture
async def link(tmp_path: Path) -> AsyncIterator[SlaveLink]:
    async with served_link(tmp_path, FEATURE_WATCH) as served:
        yield served


async def test_our_own_change_is_invalidated_before_its_reply(
    link: SlaveLink, tmp_path: Path
) -> None:
    (tmp_path / "f").write_text("x")
    seen: list[object] = []
    link.on_invalidate = seen.append
    reply = await link.perform(0, Stat(dir=0, flags=0, mask=BASIC, path=b"/f"))
    assert reply.flags == REPLY_WATCHED | REPLY_NOT_LINK
    assert seen == []

    done = trio.Event()

    def on_reply(outcome: object) -> None:
        seen.append(outcome)
        done.set()

    link.submit(0, Chmod(dir=0, mode=0o600, flags=0, path=b"/f"), on_reply)
    with trio.fail_after(10):
        await done.wait()
    assert seen[0] == (b"/f",)  # before the reply
    assert isinstance(seen[1], Reply) and seen[1].result == 0


async def test_another_process_change_is_sent_when_inotify_reports_it(
    link: SlaveLink, tmp_path: Path
) -> None:
    (tmp_path / "d").mkdir()
    got = trio.Event()
    seen: list[tuple[bytes, ...]] = []

    def on_invalidate(paths: tuple[bytes, ...]) -> None:
        seen.append(paths)
        got.set()

    link.on_invalidate = on_invalidate
    reply = await link.perform(0, Stat(dir=0, flags=0, mask=BASIC, path=b"/d/f"))
    assert (reply.result, reply.flags) == (-2, REPLY_WATCHED | REPLY_NOT_LINK)
    await trio.sleep(0.05)  # the slave idles in trio now
    (tmp_path / "d/f").write_text("made behind fsys's back")
    with trio.fail_after(5):
        await got.wait()
    assert seen == [(b"/d/.", b"/d/f")]  # a name added to /d: its mtime too


async def test_without_the_feature_the_slave_watches_nothing(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    ours, theirs = socket.socketpair()
    async with trio.open_nursery() as nursery:
        fd = theirs.detach()
        nursery.start_soon(serve_transport, FdTransport(fd, fd), str(tmp_path))
        mine = ours.detach()
        link = SlaveLink(FdTransport(mine, mine))
        await nursery.start(link.serve)
        with trio.fail_after(10):
            await link.handshake()
            reply = await link.perform(0, Stat(dir=0, flags=0, mask=BASIC, path=b"/f"))
            assert (reply.result, reply.flags) == (0, 0)
            await link.goodbye()
        nursery.cancel_scope.cancel()
    link.transport.close()


def test_the_wire_carries_reply_flags_and_invalidations() -> None:
    slave, master = Connection(Role.SLAVE), Connection(Role.MASTER)
    master.send(Hello())
    master.receive_data(slave.send(Hello()))
    master.receive_data(slave.send(Invalidate((b"/a", b"/b/c"))))
    master.receive_data(slave.send(Reply(0, 1, 0, b"x", REPLY_WATCHED)))
    assert master.next_event() == Hello()
    assert master.next_event() == Invalidate((b"/a", b"/b/c"))
    assert master.next_event() == Reply(0, 1, 0, b"x", REPLY_WATCHED)


def _frame_from_the_slave(kind: int, body: bytes) -> None:
    """A frame of ``kind`` with ``body`` after the handshake: it must end the session."""
    from fsys.errors import RemoteProtocolError
    from fsys.protocol import HEADER, Kind

    slave, master = Connection(Role.SLAVE), Connection(Role.MASTER)
    master.send(Hello())
    master.receive_data(slave.send(Hello()))
    master.next_event()
    master.receive_data(HEADER.pack(len(body), kind, 0, 0, 0, 0) + body)
    with pytest.raises(RemoteProtocolError, match=Kind(kind).name):
        master.next_event()


@pytest.mark.parametrize("body", [b"\x05\x00\x00\x00/a", b"\x02\x00\x00\x00ab", b"\x00"])
def test_a_malformed_invalidation_ends_the_session(body: bytes) -> None:
    _frame_from_the_slave(7, body)


# --- end to end --------------------------------------------------------------------------------

WATCH = r"""
import os, sys, time
os.makedirs("/t/d")
open("/t/d/f", "w").close()
os.chmod("/t/d/f", 0o644)
# Our own changes are seen at once, each time.
for i in range(50):
    mode = 0o600 if i % 2 else 0o640
    os.chmod("/t/d/f", mode)
    assert os.stat("/t/d/f").st_mode & 0o777 == mode, i
    assert os.lstat("/t/d/f").st_mode & 0o777 == mode, i
os.chmod("/t/d/f", 0o644)
for _ in range(100):
    os.stat("/t/d/f")
open("/t/go", "w").close()  # the test changes /t/d/f now, behind our back
while os.stat("/t/d/f").st_mode & 0o777 == 0o644:
    pass
seen = time.monotonic()
while os.path.exists("/t/d/f"):  # then renames /t/d away
    pass
gone = time.monotonic()
print(seen, gone)
"""


@pytest.mark.parametrize("extra", [
    pytest.param(["--trace-file", "/dev/null"], id="trapped"),
    pytest.param(["--view"], id="view", marks=pytest.mark.skipif(
        not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="--view: root, /dev/fuse")),
])  # fmt: skip
async def test_changes_are_seen_at_once_or_within_the_bound(session: Session,
                                                            extra: list[str]) -> None:  # fmt: skip
    box = session.box
    bounds: list[float] = []

    async def meddle() -> None:
        with trio.fail_after(60):
            while not (box / "t/go").exists():
                await trio.sleep(0.01)
        await trio.sleep(0.2)
        bounds.append(time.monotonic())
        os.chmod(box / "t/d/f", 0o600)
        await trio.sleep(0.2)
        bounds.append(time.monotonic())
        os.rename(box / "t/d", box / "t/e")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(meddle)
        result = await session.run(SYSTEM_PYTHON, "-c", WATCH, extra=extra)
    assert result.status == 0, result.err
    seen, gone = map(float, result.out.split())
    assert 0 <= seen - bounds[0] < 1.0
    assert 0 <= gone - bounds[1] < 1.0


async def test_a_stat_loop_is_answered_from_the_cache(session: Session, tmp_path: Path) -> None:
    (session.box / "f").write_text("x")
    script = "import os\nfor _ in range(500): os.stat('/f')\n"
    trace = tmp_path / "trace"
    for extra, cached in (
        (["--trace-file", str(trace)], True),
        (["--no-cache", "--trace-file", str(trace)], False),
    ):
        result = await session.run(SYSTEM_PYTHON, "-c", script, extra=extra)
        assert result.status == 0, result.err
        summary = trace.read_text().splitlines()[-1]
        hits = int(summary.split(" cached stats")[0].rsplit(", ", 1)[1])
        assert (hits >= 490) if cached else (hits == 0), summary


# --- the handlers, in-process, with a cache ------------------------------------------------


@pytest.fixture
def cached(tmp_path: Path) -> Iterator[Rig]:
    box = tmp_path / "box"
    (box / "data").mkdir(parents=True)
    (box / "data/f").write_text("0123456789")
    rig = Rig(box, cache=True)
    yield rig
    rig.close()


def _slave_stats(rig: Rig) -> int:
    return sum(isinstance(op, Stat) for op in rig.link.ops)


def test_a_second_stat_is_answered_by_fmhub(cached: Rig) -> None:
    proc = cached.process()
    buf = proc.mem.alloc(144)
    assert proc.call("stat", b"/data//./f", buf) == 0
    op = cached.link.ops[-1]
    assert isinstance(op, Stat) and op.path == b"/data/f"  # sent in its key form
    for name, args in (("stat", ()), ("lstat", ()), ("newfstatat", (0,))):
        buf2 = proc.mem.alloc(144)
        call_args = (
            (AT_FDCWD, b"/data/f", buf2, *args) if name == "newfstatat" else (b"/data/f", buf2)
        )
        assert proc.call(name, *call_args) == 0
        assert proc.mem.bytes_at(buf2, 144) == proc.mem.bytes_at(buf, 144)
    assert _slave_stats(cached) == 1
    sx = proc.mem.alloc(256)
    assert proc.call("statx", AT_FDCWD, b"/data/f", 0, linux.STATX_BASIC_STATS, sx) == 0
    assert linux.statx_size(proc.mem.bytes_at(sx, 256)) == 10
    assert _slave_stats(cached) == 1
    assert proc.call("statx", AT_FDCWD, b"/data/f", 0, STATX_BTIME, sx) == 0
    assert _slave_stats(cached) == 2  # a field not asked for before
    assert proc.call("statx", AT_FDCWD, b"/data/f", linux.AT_STATX_FORCE_SYNC, 1, sx) == 0
    assert _slave_stats(cached) == 3  # the program wants it from the file system
    assert cached.hub.statistics()["cached_stats"] == 4


def test_a_missing_file_stays_missing_until_it_is_made(cached: Rig) -> None:
    proc = cached.process()
    buf = proc.mem.alloc(144)
    assert proc.call("stat", b"/data/new", buf) == -errno.ENOENT
    assert proc.call("stat", b"/data/new", buf) == -errno.ENOENT
    assert _slave_stats(cached) == 1
    fd = proc.call("openat", AT_FDCWD, b"/data/new", os.O_CREAT | os.O_WRONLY, 0o600)
    assert isinstance(fd, int) and fd >= 0
    assert proc.call("stat", b"/data/new", buf) == 0
    assert proc.stat_at(buf).mode & 0o777 == 0o600


def test_our_own_changes_are_seen_by_the_next_stat(cached: Rig) -> None:
    proc = cached.process()
    buf = proc.mem.alloc(144)
    assert proc.call("stat", b"/data/f", buf) == 0
    assert proc.call("chmod", b"/data/f", 0o604) == 0
    assert proc.call("stat", b"/data/f", buf) == 0
    assert proc.stat_at(buf).mode & 0o777 == 0o604
    fd = proc.call("openat", AT_FDCWD, b"/data/f", os.O_WRONLY | os.O_APPEND, 0)
    assert isinstance(fd, int)
    data = proc.mem.alloc(b"abcde")
    assert proc.call("write", fd, data, 5) == 5
    assert proc.call("stat", b"/data/f", buf) == 0
    assert proc.stat_at(buf).size == 15
    assert proc.call("rename", b"/data", b"/moved") == 0
    assert proc.call("stat", b"/data/f", buf) == -errno.ENOENT
    assert proc.call("stat", b"/moved/f", buf) == 0


def test_a_symlink_is_followed_by_the_slave_each_time(cached: Rig, tmp_path: Path) -> None:
    (cached.box / "data/l").symlink_to("f")
    proc = cached.process()
    buf = proc.mem.alloc(144)
    assert proc.call("lstat", b"/data/l", buf) == 0
    assert stat.S_ISLNK(proc.stat_at(buf).mode)
    assert proc.call("lstat", b"/data/l", buf) == 0
    assert _slave_stats(cached) == 1
    for _ in range(2):
        assert proc.call("stat", b"/data/l", buf) == 0
        assert stat.S_ISREG(proc.stat_at(buf).mode)
    assert _slave_stats(cached) == 3


def test_no_cache_without_the_feature(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data/f").write_text("x")
    rig = Rig(tmp_path)
    proc: FakeProcess = rig.process()
    buf = proc.mem.alloc(144)
    for _ in range(3):
        assert proc.call("stat", b"/data/f", buf) == 0
    assert _slave_stats(rig) == 3
    assert rig.executor.watches.dirs == {} and rig.executor.watches.fd == -1  # no inotify
    rig.close()


# --- a directory's entries come with their answers (ATTRS) ----------------------------------


def test_the_entries_of_a_listed_directory_come_with_their_answers(
    executor: Executor, tmp_path: Path
) -> None:
    from fsys.protocol import Getdents, Open

    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_text("123")
    (tmp_path / "d/sub").mkdir()
    (tmp_path / "d/l").symlink_to("f")
    (tmp_path / "d/x").write_text("")
    os.setxattr(tmp_path / "d/x", "user.k", b"v")
    os.link(tmp_path / "d/f", tmp_path / "d/hard")  # f and hard: not watched
    (tmp_path / "other").mkdir()
    handle, _ = executor.execute(
        Open(dir=0, flags=os.O_RDONLY | os.O_DIRECTORY, mode=0, resolve=0, path=b"/d")
    )
    n, _raw = executor.execute(Getdents(handle=handle, size=65536))
    assert n > 0
    attrs = {a.path: a for a in executor.take_attrs()}
    assert executor.take_attrs() == []
    assert set(attrs) == {b"/d/sub", b"/d/l", b"/d/x"}
    assert attrs[b"/d/sub"].flags == REPLY_WATCHED | REPLY_NOT_LINK | REPLY_NO_XATTRS
    assert stat.S_ISDIR(linux.statx_mode(attrs[b"/d/sub"].statx))
    assert attrs[b"/d/l"].flags & (REPLY_WATCHED | REPLY_NOT_LINK) == REPLY_WATCHED
    assert attrs[b"/d/x"].flags == REPLY_WATCHED | REPLY_NOT_LINK  # it has an xattr
    # Opened relative to a handle, or by a path not in its key form: no answers.
    for path in (b"/d/", b"//d"):
        other, _ = executor.execute(
            Open(dir=0, flags=os.O_RDONLY | os.O_DIRECTORY, mode=0, resolve=0, path=path)
        )
        executor.execute(Getdents(handle=other, size=65536))
        assert executor.take_attrs() == []
    sub, _ = executor.execute(
        Open(dir=handle, flags=os.O_RDONLY | os.O_DIRECTORY, mode=0, resolve=0, path=b"sub")
    )
    (tmp_path / "d/sub/y").write_text("")
    executor.execute(Getdents(handle=sub, size=65536))
    assert executor.take_attrs() == []


def test_ls_l_is_answered_from_the_listing(cached: Rig) -> None:
    for i in range(5):
        (cached.box / f"data/f{i}").write_text("x" * i)
    proc = cached.process()
    fd = proc.call("openat", AT_FDCWD, b"/data", os.O_RDONLY | os.O_DIRECTORY, 0)
    assert isinstance(fd, int) and fd >= 0
    dents = proc.mem.alloc(65536)
    assert isinstance(proc.call("getdents64", fd, dents, 65536), int)
    before = len(cached.link.ops)
    buf = proc.mem.alloc(144)
    value = proc.mem.alloc(64)
    for i in range(5):
        path = b"/data/f%d" % i
        assert proc.call("lstat", path, buf) == 0
        assert proc.stat_at(buf).size == i
        assert proc.call("lgetxattr", path, b"security.selinux", value, 64) == -errno.ENODATA
        assert proc.call("getxattr", path, b"system.posix_acl_access", value, 64) == -errno.ENODATA
        assert proc.call("llistxattr", path, value, 64) == 0
    assert len(cached.link.ops) == before  # not one of them went to the slave
    os.setxattr(cached.box / "data/f1", "user.k", b"v")  # behind our back: no event read yet
    assert proc.call("setxattr", b"/data/f2", b"user.k", b"w", 1, 0) == 0  # ours: seen at once
    assert proc.call("getxattr", b"/data/f2", b"user.k", value, 64) == 1
    assert proc.mem.bytes_at(value, 1) == b"w"
    assert proc.call("llistxattr", b"/data/f1", value, 64) == len(b"user.k\0")  # read with ours


def test_the_wire_carries_attrs() -> None:
    from fsys.protocol import Attr, Attrs

    slave, master = Connection(Role.SLAVE), Connection(Role.MASTER)
    master.send(Hello())
    master.receive_data(slave.send(Hello()))
    attrs = Attrs(0x7FF, (Attr(b"/a", 0, 3, b"s" * 256), Attr(b"/b", -2, 3)))
    master.receive_data(slave.send(attrs))
    assert master.next_event() == Hello()
    assert master.next_event() == attrs


@pytest.mark.parametrize(
    "body",
    [b"\x01\x00", b"\xff\x07\x00\x00" + b"\x02\x00\x00\x00" + b"\x00" * 16 + b"/",
     b"\xff\x07\x00\x00\x02\x00\x00\x00" + b"\x00" * 8 + b"\x03\x00\x00\x00\x05\x00\x00\x00/a12345",
     b"\xff\x07\x00\x00" + b"\x01\x00\x00\x00" + b"\x00" * 16 + b"a"],
)  # fmt: skip
def test_malformed_attrs_end_the_session(body: bytes) -> None:
    _frame_from_the_slave(8, body)


def test_a_primed_answer_that_is_not_watched_is_not_kept() -> None:
    from fsys.protocol import Attr, Attrs

    cache = AttrCache()
    cache.prime(
        Attrs(
            BASIC,
            (
                Attr(b"/a", 0, 0, b"s"),
                Attr(b"/b//c", 0, REPLY_WATCHED, b"s"),
                Attr(b"/d", 0, REPLY_WATCHED | REPLY_NOT_LINK, b"d"),
            ),
        )
    )
    assert sorted(cache.entries) == [b"/d"]
    assert not cache.no_xattrs(b"/d", True)
    cache.prime(Attrs(BASIC, (Attr(b"/e", 0, REPLY_WATCHED | REPLY_NO_XATTRS, b"e"),)))
    assert cache.no_xattrs(b"/e", False) and not cache.no_xattrs(b"/e", True)


# --- paths from a directory handle ----------------------------------------------------------


def test_a_walk_by_directory_fds_is_cached(cached: Rig) -> None:
    (cached.box / "data/sub").mkdir()
    (cached.box / "data/sub/g").write_text("g")
    proc = cached.process()
    flags = os.O_RDONLY | os.O_DIRECTORY
    top = proc.call("openat", AT_FDCWD, b"/data", flags, 0)
    assert isinstance(top, int)
    sub = proc.call("openat", top, b"sub", flags, 0)  # sent by its key path
    assert isinstance(sub, int)
    op = cached.link.ops[-1]
    assert isinstance(op, Open) and (op.dir, op.path) == (0, b"/data/sub")
    dents = proc.mem.alloc(4096)
    for fd in (top, sub):  # each listed: its entries' answers come along
        assert isinstance(proc.call("getdents64", fd, dents, 4096), int)
    before = len(cached.link.ops)
    buf = proc.mem.alloc(144)
    assert proc.call("newfstatat", sub, b"g", buf, AT_SYMLINK_NOFOLLOW) == 0
    assert proc.stat_at(buf).size == 1
    assert proc.call("fstat", sub, buf) == 0  # the handle itself: by its key
    assert stat.S_ISDIR(proc.stat_at(buf).mode)
    assert proc.call("newfstatat", top, b"sub/g", buf, 0) == 0
    assert len(cached.link.ops) == before
    # Renamed: the handles name their directories still, their keys do not.
    assert proc.call("rename", b"/data", b"/moved") == 0
    assert proc.call("newfstatat", sub, b"g", buf, AT_SYMLINK_NOFOLLOW) == 0
    op = cached.link.ops[-1]
    assert isinstance(op, Stat) and op.dir != 0 and op.path == b"g"  # by the handle
    assert proc.call("stat", b"/data/sub/g", buf) == -errno.ENOENT
    assert cached.hub.cache is not None and cached.hub.cache.handles == {}


def test_an_open_that_writes_is_sent_as_the_program_made_it(cached: Rig) -> None:
    proc = cached.process()
    top = proc.call("openat", AT_FDCWD, b"/data", os.O_RDONLY | os.O_DIRECTORY, 0)
    assert isinstance(top, int)
    for flags in (os.O_WRONLY, os.O_RDWR | os.O_CREAT, os.O_RDONLY | os.O_TRUNC):
        fd = proc.call("openat", top, b"f", flags, 0o600)
        assert isinstance(fd, int) and fd >= 0
        op = cached.link.ops[-1]
        assert isinstance(op, Open) and op.dir != 0 and op.path == b"f", flags
    fd = proc.call("openat", top, b"f", os.O_RDONLY, 0)
    op = cached.link.ops[-1]
    assert isinstance(op, Open) and (op.dir, op.path) == (0, b"/data/f")


def test_a_closed_directory_handle_has_no_key(cached: Rig) -> None:
    proc = cached.process()
    top = proc.call("openat", AT_FDCWD, b"/data", os.O_RDONLY | os.O_DIRECTORY, 0)
    assert isinstance(top, int)
    cache = cached.hub.cache
    assert cache is not None and list(cache.handles.values()) == [b"/data"]
    proc.close(top)
    cached.hub.reap()
    assert cache.handles == {}


def test_fstat_of_a_directory_handle_is_of_the_directory(cached: Rig) -> None:
    (cached.box / "data/real").mkdir()
    (cached.box / "data/link").symlink_to("real")
    proc = cached.process()
    flags = os.O_RDONLY | os.O_DIRECTORY
    buf = proc.mem.alloc(144)
    top = proc.call("openat", AT_FDCWD, b"/data", flags, 0)
    assert isinstance(top, int)
    assert isinstance(proc.call("getdents64", top, proc.mem.alloc(4096), 4096), int)
    link = proc.call("openat", AT_FDCWD, b"/data/link", flags, 0)  # through the symlink
    assert isinstance(link, int)
    assert proc.call("lstat", b"/data/link", buf) == 0 and stat.S_ISLNK(proc.stat_at(buf).mode)
    assert proc.call("fstat", link, buf) == 0
    real = (cached.box / "data/real").stat()
    assert stat.S_ISDIR(proc.stat_at(buf).mode) and proc.stat_at(buf).ino == real.st_ino
    root = proc.call("openat", AT_FDCWD, b"/", flags, 0)  # no key: sent as it is
    assert isinstance(root, int)
    assert proc.call("fstat", root, buf) == 0
    assert proc.stat_at(buf).ino == cached.box.stat().st_ino


def test_a_path_under_a_missing_directory_is_a_watched_answer(
    executor: Executor, tmp_path: Path
) -> None:
    assert _stat(executor, b"/etc/nsswitch.conf") == (-2, b"", REPLY_WATCHED | REPLY_NOT_LINK)
    (tmp_path / "file").write_text("")
    assert _stat(executor, b"/file/x") == (-20, b"", REPLY_WATCHED | REPLY_NOT_LINK)
    (tmp_path / "link").symlink_to("/")
    with pytest.raises(FileNotFoundError):  # through a symlink: not watched
        executor.stat(Stat(dir=0, flags=0, mask=BASIC, path=b"/link/nothing/x"))
    (tmp_path / "etc").mkdir()
    assert b"/etc" in executor.watches.changes()


def test_an_open_of_nothing_is_remembered_until_something_is_made(cached: Rig) -> None:
    proc = cached.process()
    for _ in range(3):
        assert proc.call("openat", AT_FDCWD, b"/etc/passwd", os.O_RDONLY, 0) == -errno.ENOENT
    assert sum(isinstance(op, Open) for op in cached.link.ops) == 1
    assert proc.call("mkdir", b"/etc", 0o755) == 0
    fd = proc.call("openat", AT_FDCWD, b"/etc/passwd", os.O_WRONLY | os.O_CREAT, 0o644)
    assert isinstance(fd, int) and fd >= 0
    fd = proc.call("openat", AT_FDCWD, b"/etc/passwd", os.O_RDONLY, 0)
    assert isinstance(fd, int) and fd >= 0
    (cached.box / "data/dangling").symlink_to("nowhere")
    for _ in range(2):  # ENOENT through a dangling symlink: the slave's each time
        assert proc.call("openat", AT_FDCWD, b"/data/dangling", os.O_RDONLY, 0) == -errno.ENOENT
    assert [op.path for op in cached.link.ops if isinstance(op, Open)][-2:] == [
        b"/data/dangling"
    ] * 2


def test_fstat_of_a_file_handle_follows_its_changes(cached: Rig) -> None:
    proc = cached.process()
    top = proc.call("openat", AT_FDCWD, b"/data", os.O_RDONLY | os.O_DIRECTORY, 0)
    assert isinstance(top, int)
    assert isinstance(proc.call("getdents64", top, proc.mem.alloc(4096), 4096), int)
    fd = proc.call("openat", AT_FDCWD, b"/data/f", os.O_RDWR, 0)
    assert isinstance(fd, int)
    buf = proc.mem.alloc(144)
    before = len(cached.link.ops)
    assert proc.call("fstat", fd, buf) == 0 and proc.stat_at(buf).size == 10
    assert len(cached.link.ops) == before
    assert proc.call("write", fd, proc.mem.alloc(b"x" * 20), 20) == 20
    assert proc.call("fstat", fd, buf) == 0 and proc.stat_at(buf).size == 20
    assert proc.call("rename", b"/data/f", b"/data/g") == 0
    (cached.box / "data/f").write_text("another")
    assert proc.call("fstat", fd, buf) == 0 and proc.stat_at(buf).size == 20  # still ours


def test_the_trace_says_which_answers_came_from_the_cache(cached: Rig) -> None:
    import io

    from fsys.master.trace import Tracer

    out = io.StringIO()
    cached.hub.tracer = Tracer(out)
    proc = cached.process()
    buf = proc.mem.alloc(144)
    top = proc.call("openat", AT_FDCWD, b"/data", os.O_RDONLY | os.O_DIRECTORY, 0)
    assert isinstance(top, int)
    assert isinstance(proc.call("getdents64", top, proc.mem.alloc(4096), 4096), int)
    proc.call("stat", b"/data/f", buf)
    proc.call("fstat", top, buf)  # /data itself: not listed, from the slave
    proc.call("fstat", top, buf)  # now watched: from the cache
    proc.call("lgetxattr", b"/data/f", b"user.x", buf, 16)
    proc.call("openat", AT_FDCWD, b"/data/none", os.O_RDONLY, 0)
    proc.call("openat", AT_FDCWD, b"/data/none", os.O_RDONLY, 0)
    sides = [line.rsplit("<", 1)[1].split()[0] for line in out.getvalue().splitlines()]
    assert sides == ["slave", "slave", "cache", "slave", "cache", "cache", "slave", "cache"]


def test_an_answer_that_is_not_watched_is_not_kept(cached: Rig) -> None:
    (cached.box / "data/l").symlink_to("f")
    proc = cached.process()
    buf = proc.mem.alloc(144)
    for _ in range(2):  # through a symlink to a file: ENOTDIR, not watched
        assert proc.call("stat", b"/data/l/x", buf) == -errno.ENOTDIR
        assert proc.call("openat", AT_FDCWD, b"/data/l/x", os.O_RDONLY, 0) == -errno.ENOTDIR
    assert _slave_stats(cached) == 2
    assert sum(isinstance(op, Open) for op in cached.link.ops) == 2


def test_fields_asked_of_a_handle_reach_the_slave(cached: Rig) -> None:
    proc = cached.process()
    top = proc.call("openat", AT_FDCWD, b"/data", os.O_RDONLY | os.O_DIRECTORY, 0)
    assert isinstance(top, int)
    sx = proc.mem.alloc(256)
    assert proc.call("statx", top, b"", linux.AT_EMPTY_PATH, STATX_BTIME, sx) == 0
    op = cached.link.ops[-1]
    assert isinstance(op, Stat) and op.mask == STATX_BTIME | BASIC


def test_getxattr_through_a_symlink_asks_about_its_target(cached: Rig) -> None:
    os.setxattr(cached.box / "data/f", "user.k", b"v")
    (cached.box / "data/l").symlink_to("f")
    proc = cached.process()
    top = proc.call("openat", AT_FDCWD, b"/data", os.O_RDONLY | os.O_DIRECTORY, 0)
    assert isinstance(top, int)
    assert isinstance(proc.call("getdents64", top, proc.mem.alloc(4096), 4096), int)
    value = proc.mem.alloc(16)
    assert proc.call("lgetxattr", b"/data/l", b"user.k", value, 16) == -errno.ENODATA
    assert proc.call("getxattr", b"/data/l", b"user.k", value, 16) == 1
    assert proc.mem.bytes_at(value, 1) == b"v"


def test_fstat_of_an_o_path_handle_of_a_symlink_is_of_the_symlink(cached: Rig) -> None:
    (cached.box / "data/l").symlink_to("f")
    proc = cached.process()
    fd = proc.call("openat", AT_FDCWD, b"/data/l", os.O_PATH | os.O_NOFOLLOW, 0)
    assert isinstance(fd, int) and fd >= 0
    buf = proc.mem.alloc(144)
    for _ in range(2):
        assert proc.call("fstat", fd, buf) == 0
        assert stat.S_ISLNK(proc.stat_at(buf).mode)
    assert cached.hub.cache is not None and cached.hub.cache.handles == {}


async def test_a_directory_s_times_follow_names_added_by_another_process(
    session: Session,
) -> None:
    (session.box / "d").mkdir()
    script = (
        "import os, time\n"
        "before = os.stat('/d').st_mtime_ns\n"
        "open('/go', 'w').close()\n"
        "while not os.path.exists('/d/new'): time.sleep(0.01)\n"
        "time.sleep(0.3)\n"
        "print(before != os.stat('/d').st_mtime_ns)\n"
    )

    async def meddle() -> None:
        with trio.fail_after(60):
            while not (session.box / "go").exists():
                await trio.sleep(0.01)
        await trio.sleep(0.05)
        (session.box / "d/new").write_text("")  # another process: /d's mtime changes

    async with trio.open_nursery() as nursery:
        nursery.start_soon(meddle)
        result = await session.run(SYSTEM_PYTHON, "-c", script)
    assert result.status == 0, result.err
    assert result.out.split() == ["True"]


# --- a file's start with its open (OPEN_READ) ----------------------------------------


@pytest.fixture
def starts(tmp_path: Path) -> Iterator[Rig]:
    box = tmp_path / "box"
    (box / "data").mkdir(parents=True)
    (box / "data/f").write_text("0123456789")
    rig = Rig(box, cache=True, slave_features=FEATURE_OPEN_READ)
    yield rig
    rig.close()


def _opened(rig: Rig, proc: FakeProcess, path: bytes = b"/data/f") -> int:
    """``path`` opened to read, once its attributes are watched (a stat first)."""
    assert proc.call("stat", path, proc.mem.alloc(144)) == 0
    fd = proc.call("openat", AT_FDCWD, path, os.O_RDONLY, 0)
    assert isinstance(fd, int) and fd >= 0
    return fd


def _slave_ops(rig: Rig, kind: type) -> list[object]:
    return [op for op in rig.link.ops if isinstance(op, kind)]


def test_reads_and_seeks_in_a_files_start_need_no_slave(starts: Rig) -> None:
    proc = starts.process()
    fd = _opened(starts, proc)
    opened = starts.link.ops[-1]
    assert isinstance(opened, OpenRead) and opened.size == 11  # one more than it holds
    before = len(starts.link.ops)
    buf = proc.mem.alloc(16)
    assert proc.call("read", fd, buf, 4) == 4
    assert proc.call("read", fd, buf + 4, 16) == 6
    assert proc.call("read", fd, buf, 16) == 0  # it came whole: the end
    assert proc.mem.bytes_at(buf + 4, 6) == b"456789"
    assert proc.call("lseek", fd, 0, os.SEEK_CUR) == 10
    assert proc.call("lseek", fd, 2, os.SEEK_SET) == 2
    assert proc.call("lseek", fd, -3, os.SEEK_END) == 7
    assert proc.call("lseek", fd, -8, os.SEEK_CUR) == -errno.EINVAL
    assert proc.call("pread64", fd, buf, 3, 1) == 3 and proc.mem.bytes_at(buf, 3) == b"123"
    assert proc.call("read", fd, buf, 2) == 2 and proc.mem.bytes_at(buf, 2) == b"78"
    assert proc.call("fstat", fd, proc.mem.alloc(144)) == 0
    assert proc.call("read", fd, buf, 9) == 1 and proc.mem.bytes_at(buf, 1) == b"9"
    assert starts.link.ops[before:] == []


def test_a_call_that_uses_the_position_gets_it_on_the_slave(starts: Rig) -> None:
    proc = starts.process()
    fd = _opened(starts, proc)
    buf = proc.mem.alloc(16)
    assert proc.call("read", fd, buf, 4) == 4
    r, w = os.pipe()
    try:
        proc.own(9, w)
        assert proc.call("sendfile", 9, fd, 0, 3) == 3  # from the file position
        assert os.read(r, 10) == b"456"
    finally:
        os.close(r)
        os.close(w)
    seeks = _slave_ops(starts, Lseek)
    assert [(op.offset, op.whence) for op in seeks] == [(4, os.SEEK_SET)]  # type: ignore[attr-defined]
    # The slave has the position now: reads go there, and go on from it.
    reads = len(_slave_ops(starts, Read))
    assert proc.call("read", fd, buf, 16) == 3 and proc.mem.bytes_at(buf, 3) == b"789"
    assert len(_slave_ops(starts, Read)) == reads + 1


def test_an_ioctl_on_the_position_gets_it_on_the_slave(starts: Rig) -> None:
    proc = starts.process()
    fd = _opened(starts, proc)
    assert proc.call("read", fd, proc.mem.alloc(4), 4) == 4
    count = proc.mem.alloc(4)
    assert proc.call("ioctl", fd, termios.FIONREAD, count) == 0
    assert struct.unpack("<i", proc.mem.bytes_at(count, 4))[0] == 6  # what is left to read


def test_a_file_longer_than_its_start_reads_on_from_the_slave(
    starts: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache, "START", 4)
    proc = starts.process()
    fd = _opened(starts, proc)
    buf = proc.mem.alloc(16)
    assert proc.call("read", fd, buf, 4) == 4 and not _slave_ops(starts, Read)
    assert proc.call("read", fd, buf, 2) == 2 and proc.mem.bytes_at(buf, 2) == b"45"
    assert [op.offset for op in _slave_ops(starts, Lseek)] == [4]  # type: ignore[attr-defined]
    assert proc.call("lseek", fd, 0, os.SEEK_END) == 10  # (the size is the slave's)
    assert proc.call("lseek", fd, 5, os.SEEK_SET) == 5
    assert proc.call("read", fd, buf, 16) == 5 and proc.mem.bytes_at(buf, 5) == b"56789"


def test_a_change_drops_the_start(starts: Rig) -> None:
    proc = starts.process()
    fd = _opened(starts, proc)
    # The program's own write, through another fd: its INVALIDATE comes first.
    wfd = proc.call("openat", AT_FDCWD, b"/data/f", os.O_WRONLY, 0)
    assert isinstance(wfd, int) and wfd >= 0
    assert proc.call("write", wfd, proc.mem.alloc(b"abc"), 3) == 3
    buf = proc.mem.alloc(16)
    assert proc.call("read", fd, buf, 16) == 10 and proc.mem.bytes_at(buf, 10) == b"abc3456789"
    # Another process's change: dropped once the slave says (its INVALIDATE, as
    # fshub sends it when inotify reports the change).
    fd2 = _opened(starts, proc)
    (starts.box / "data/f").write_text("changed!")
    assert starts.link.on_invalidate is not None
    starts.link.on_invalidate(tuple(starts.executor.watches.changes()))
    assert proc.call("read", fd2, buf, 16) == 8 and proc.mem.bytes_at(buf, 8) == b"changed!"
    assert not starts.hub.started  # (the writer brought none)


def test_a_start_is_brought_only_where_it_is_watched_and_the_slave_can(tmp_path: Path) -> None:
    box = tmp_path / "box"
    (box / "data").mkdir(parents=True)
    (box / "data/f").write_text("0123456789")
    for rig in (Rig(box, cache=True), Rig(box, slave_features=FEATURE_OPEN_READ)):
        try:
            proc = rig.process()
            _opened(rig, proc)
            assert not _slave_ops(rig, OpenRead) and _slave_ops(rig, Open)
        finally:
            rig.close()


def test_starts_are_bounded_and_released_at_close(
    starts: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fmhub, "STARTS_HELD", 10)
    monkeypatch.setattr(calls, "STARTS_HELD", 10)
    proc = starts.process()
    first = _opened(starts, proc)
    _opened(starts, proc)
    assert len(_slave_ops(starts, OpenRead)) == 1 and starts.hub.started_bytes == 10
    proc.close(first)
    starts.hub.reap()
    assert starts.hub.started_bytes == 0 and not starts.hub.started


def test_a_mapped_files_start_gives_way_to_its_pages(starts: Rig) -> None:
    proc = starts.process()
    fd = _opened(starts, proc)
    rw = proc.call("openat", AT_FDCWD, b"/data/f", os.O_RDWR, 0)
    assert isinstance(rw, int) and rw >= 0
    assert proc.call("mmap", 0, 4096, 0x3, 0x1, rw, 0) is CONTINUE  # shared, read-write
    os.pwrite(starts.listener.kept[(proc.tgid, rw)], b"X", 0)  # the program writes the map
    buf = proc.mem.alloc(16)
    assert proc.call("read", fd, buf, 16) == 10 and proc.mem.bytes_at(buf, 2) == b"X1"


def test_a_file_not_known_yet_or_read_with_flags_reads_from_the_slave(starts: Rig) -> None:
    proc = starts.process()
    fd = proc.call("openat", AT_FDCWD, b"/data/f", os.O_RDONLY, 0)  # no stat before it
    assert isinstance(fd, int) and fd >= 0
    assert not _slave_ops(starts, OpenRead)
    # A watched failure (not a directory): the open fails as the slave says.
    assert proc.call("stat", b"/data/f/x", proc.mem.alloc(144)) == -errno.ENOTDIR
    assert proc.call("openat", AT_FDCWD, b"/data/f/x", os.O_RDONLY, 0) == -errno.ENOTDIR
    fd = _opened(starts, proc)
    iov = proc.mem.alloc(struct.pack("<QQ", proc.mem.alloc(4), 4))
    reads = len(_slave_ops(starts, Read))
    assert proc.call("preadv2", fd, iov, 1, 0, 0, 0x8) == 4  # RWF_NOWAIT: the kernel's say
    assert len(_slave_ops(starts, Read)) == reads + 1
