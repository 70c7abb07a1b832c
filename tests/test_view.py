"""The view (fsys.master.view): FUSE requests answered from a real slave.

In process, a SOCK_SEQPACKET socketpair stands in for /dev/fuse (one message per
request and per answer, as the device gives), and the test plays the kernel: it
sends requests and reads answers and notices. The slave is a real fshub rooted in
a fresh box, so a call made on the wrong side shows. End to end, ``--view`` runs
real programs in a real FUSE mount (root and /dev/fuse needed, as for users).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import stat
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from fsys import linux
from fsys.errors import SESSION_FAILED, LinkClosed
from fsys.iostream import FdTransport
from fsys.master import cache, fuse, view
from fsys.master.fuse import Opcode
from fsys.master.link import SlaveLink
from fsys.master.policy import Policy, Rule, Side
from fsys.master.view import WATCHED, LayoutError, Points, View, layout
from fsys.protocol import (
    FEATURE_CREATE,
    FEATURE_OPEN_READ,
    FEATURE_WATCH,
    REPLY_NOT_LINK,
    REPLY_WATCHED,
    Create,
    Getxattr,
    Open,
    OpenRead,
    Operation,
    Read,
    Reply,
    Stat,
    Write,
)
from fsys.slave.confinement import Confinement
from fsys.slave.fshub import serve_transport
from tests.conftest import PYTHON, Result, Session

ENTRY_SIZE = fuse.ENTRY_OUT.size
ROOT = fuse.ROOT_ID


@dataclass
class Answer:
    error: int  # positive errno, or 0
    body: bytes

    def entry(self) -> tuple[int, float, float, tuple[int, ...]]:
        """(nodeid, entry validity, attr validity, fuse_attr fields)."""
        assert self.error == 0, os.strerror(self.error)
        nodeid, _gen, esec, asec, ensec, ansec, *attr = fuse.ENTRY_OUT.unpack_from(self.body)
        return nodeid, esec + ensec / 1e9, asec + ansec / 1e9, tuple(attr)

    def attr(self) -> tuple[float, tuple[int, ...]]:
        assert self.error == 0, os.strerror(self.error)
        sec, nsec, _, *attr = fuse.ATTR_OUT.unpack_from(self.body)
        return sec + nsec / 1e9, tuple(attr)

    def fh(self, at: int = 0) -> tuple[int, int]:
        assert self.error == 0, os.strerror(self.error)
        fh, flags, _ = fuse.OPEN_OUT.unpack_from(self.body, at)
        return fh, flags


@dataclass
class Kernel:
    """The kernel's side of the connection, played by the test."""

    sock: trio.socket.SocketType
    unique: int = 0
    notices: list[tuple[int, bytes]] = field(default_factory=list)
    early: dict[int, Answer] = field(default_factory=dict)

    def _request(self, opcode: int, nodeid: int, body: bytes) -> bytes:
        self.unique += 2
        header = fuse.IN_HEADER.pack(fuse.IN_HEADER.size + len(body), opcode, self.unique,
                                     nodeid, 0, 0, 1, 0, 0)  # fmt: skip
        return header + body

    async def send(self, opcode: int, nodeid: int, body: bytes = b"") -> int:
        await self.sock.send(self._request(opcode, nodeid, body))
        return self.unique

    def send_now(self, opcode: int, nodeid: int, body: bytes = b"") -> int:
        """Queue a request without letting the view run (requests that come together)."""
        os.write(self.sock.fileno(), self._request(opcode, nodeid, body))
        return self.unique

    async def _take(self) -> None:
        """One message from the view: an answer, or a notice."""
        data = await self.sock.recv(fuse.OUT_HEADER.size + view.BUFFER)
        length, error, got = fuse.OUT_HEADER.unpack_from(data)
        assert length == len(data)
        if got == 0:
            self.notices.append((error, data[fuse.OUT_HEADER.size :]))
        else:
            self.early[got] = Answer(-error, data[fuse.OUT_HEADER.size :])

    async def answer(self, unique: int) -> Answer:
        with trio.fail_after(10):
            while unique not in self.early:
                await self._take()
        return self.early.pop(unique)

    async def ask(self, opcode: int, nodeid: int, body: bytes = b"") -> Answer:
        return await self.answer(await self.send(opcode, nodeid, body))

    async def lookup(self, parent: int, name: bytes) -> Answer:
        return await self.ask(Opcode.LOOKUP, parent, name + b"\0")

    async def node(self, path: bytes) -> int:
        """The node id of ``path``, looked up name by name from the root."""
        nodeid = ROOT
        for name in path.strip(b"/").split(b"/"):
            nodeid = (await self.lookup(nodeid, name)).entry()[0]
        return nodeid

    async def getattr(self, nodeid: int) -> Answer:
        return await self.ask(Opcode.GETATTR, nodeid, fuse.GETATTR_IN.pack(0, 0, 0))

    async def open(self, nodeid: int, flags: int = os.O_RDONLY) -> int:
        return (await self.ask(Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(flags, 0))).fh()[0]

    async def read(self, nodeid: int, fh: int, size: int, offset: int = 0) -> Answer:
        return await self.ask(Opcode.READ, nodeid,
                              fuse.READ_IN.pack(fh, offset, size, 0, 0, 0, 0))  # fmt: skip

    async def listing(self, nodeid: int, *, plus: bool = False) -> list[tuple[bytes, int, bytes]]:
        """(name, DT type, entry bytes or b"") of a whole directory, opened and released."""
        opened = await self.ask(Opcode.OPENDIR, nodeid, fuse.OPEN_IN.pack(0, 0))
        fh, _ = opened.fh()
        out: list[tuple[bytes, int, bytes]] = []
        offset = 0
        while True:
            op = Opcode.READDIRPLUS if plus else Opcode.READDIR
            got = await self.ask(op, nodeid, fuse.READ_IN.pack(fh, offset, 4096, 0, 0, 0, 0))
            assert got.error == 0
            if not got.body:
                break
            at = 0
            while at < len(got.body):
                entry = b""
                if plus:
                    entry = got.body[at : at + ENTRY_SIZE]
                    at += ENTRY_SIZE
                _ino, offset, namelen, kind = fuse.DIRENT.unpack_from(got.body, at)
                name = got.body[at + fuse.DIRENT.size : at + fuse.DIRENT.size + namelen]
                out.append((name, kind, entry))
                at += (fuse.DIRENT.size + namelen + 7) & ~7
        await self.ask(Opcode.RELEASEDIR, nodeid, fuse.RELEASE_IN.pack(fh, 0, 0, 0))
        return out

    async def notices_until(self, want: int, timeout: float = 5.0) -> list[tuple[int, bytes]]:
        """Notices read so far, waiting up to ``timeout`` for at least ``want``."""
        with trio.move_on_after(timeout):
            while len(self.notices) < want:
                await self._take()
        return self.notices


def inval_entries(notices: list[tuple[int, bytes]]) -> set[tuple[int, bytes]]:
    out = set()
    for code, body in notices:
        if code == fuse.NOTIFY_INVAL_ENTRY:
            parent, namelen, _ = fuse.INVAL_ENTRY.unpack_from(body)
            out.add((parent, body[fuse.INVAL_ENTRY.size : fuse.INVAL_ENTRY.size + namelen]))
    return out


def inval_entry_flags(notices: list[tuple[int, bytes]]) -> set[int]:
    return {fuse.INVAL_ENTRY.unpack_from(body)[2]
            for code, body in notices if code == fuse.NOTIFY_INVAL_ENTRY}  # fmt: skip


def inval_inodes(notices: list[tuple[int, bytes]]) -> set[int]:
    return {fuse.INVAL_INODE.unpack_from(body)[0]
            for code, body in notices if code == fuse.NOTIFY_INVAL_INODE}  # fmt: skip


@asynccontextmanager
async def viewed(
    root: Path, points: Points | None = None, *, watch: bool = True, minor: int = 38,
    confinement: Confinement | None = None,
) -> AsyncIterator[tuple[Kernel, View]]:  # fmt: skip
    """A View over a real slave serving ``root``, and the kernel's end of its device.
    ``View.link.slave_scope`` (set here) ends the slave, as if it died."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    master_end, slave_end = socket.socketpair()
    async with trio.open_nursery() as nursery:
        slave_scope = trio.CancelScope()

        async def slave() -> None:
            fd = slave_end.detach()
            with slave_scope:
                await serve_transport(FdTransport(fd, fd), str(root), confinement=confinement)

        nursery.start_soon(slave)
        mine = master_end.detach()
        transport = FdTransport(mine, mine)
        link = SlaveLink(transport)
        await nursery.start(link.serve)
        with trio.fail_after(10):
            await link.handshake(FEATURE_WATCH if watch else 0)
        v = View(ours.fileno(), link, points or Points(), spin_us=0)
        v.slave_scope = slave_scope  # type: ignore[attr-defined]
        await nursery.start(v.serve)
        kernel = Kernel(trio.socket.from_stdlib_socket(theirs))
        init = await kernel.ask(Opcode.INIT, 0, fuse.INIT_IN.pack(7, minor, 1 << 17, 0xFFFFFFFF))
        assert init.error == 0
        yield kernel, v
        kernel.sock.close()  # the connection ends: serve returns
        if link.alive:
            with trio.fail_after(10):
                await link.goodbye()
        nursery.cancel_scope.cancel()
    v.close()
    transport.close()
    ours.close()


async def notice_of(kernel: Kernel, holds: Callable[[list[tuple[int, bytes]]], bool]
                    ) -> list[tuple[int, bytes]]:  # fmt: skip
    """The notices, once ``holds`` of them (AssertionError after 5 s)."""
    with trio.fail_after(5):
        while not holds(kernel.notices):
            await kernel.notices_until(len(kernel.notices) + 1, timeout=0.2)
    return kernel.notices


@pytest.fixture(autouse=True)
def _quick(monkeypatch: pytest.MonkeyPatch) -> None:
    # The slave runs in this process: the view must not hold the thread waiting for it.
    monkeypatch.setattr(view, "HOT_QUIET_MS", 0)


@pytest.fixture
def box(tmp_path: Path) -> Path:
    root = tmp_path / "box"
    root.mkdir()
    (root / "f").write_bytes(b"hello, view\n")
    (root / "d").mkdir()
    (root / "d" / "a").write_bytes(b"A")
    (root / "d" / "b").write_bytes(b"BB")
    (root / "link").symlink_to("d/a")
    return root


# --- the codec ---------------------------------------------------------------------------


def test_structure_sizes_are_the_kernels() -> None:
    # linux/fuse.h, protocol 7.31+: the sizes the kernel checks an answer's length against.
    assert fuse.IN_HEADER.size == 40
    assert fuse.OUT_HEADER.size == 16
    assert fuse.ENTRY_OUT.size == 128
    assert fuse.ATTR_OUT.size == 104
    assert fuse.INIT_OUT.size == 64
    assert fuse.STATFS_OUT.size == 80
    assert fuse.SETATTR_IN.size == 88
    assert fuse.OPEN_OUT.size == 16
    assert fuse.READ_IN.size == 40


def statx(path: bytes) -> bytes:
    buf = ctypes.create_string_buffer(linux.STATX_SIZE)
    linux.statx(linux.AT_FDCWD, path, linux.AT_SYMLINK_NOFOLLOW, view.MASK, buf)
    return buf.raw


def test_attr_fields_of_a_real_statx(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"12345")
    os.chmod(f, 0o640)
    os.utime(f, ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    raw = statx(bytes(f))
    st = os.lstat(f)
    ino, size, blocks, asec, msec, _csec, ansec, mnsec, _cns, mode, nlink, uid, gid, rdev, \
        blksize, _pad = fuse.attr_fields(raw)  # fmt: skip
    assert (ino, size, blocks, mode, nlink, uid, gid) == (
        st.st_ino, 5, st.st_blocks, st.st_mode, 1, st.st_uid, st.st_gid)  # fmt: skip
    assert (asec, ansec, msec, mnsec) == (1_500_000_000, 123_456_789, 1_600_000_000, 987_654_321)
    assert blksize == st.st_blksize and rdev == 0


def test_attr_fields_encode_a_device_number() -> None:
    raw = statx(b"/dev/null")
    assert fuse.attr_fields(raw)[13] == os.stat("/dev/null").st_rdev


def test_dirent_is_padded_to_eight_bytes() -> None:
    for name in (b"a", b"abcdefgh", b"x" * 13):
        record = fuse.dirent(7, 3, 8, name)
        assert len(record) % 8 == 0
        assert len(record) - fuse.DIRENT.size - len(name) < 8
        assert fuse.DIRENT.unpack_from(record) == (7, 3, len(name), 8)
        assert record[fuse.DIRENT.size : fuse.DIRENT.size + len(name)] == name


def test_init_asks_only_what_the_kernel_offers() -> None:
    offered = fuse.ASYNC_READ | fuse.DO_READDIRPLUS | fuse.SETXATTR_EXT
    major, minor, _ra, flags, *_ = fuse.INIT_OUT.unpack(fuse.init_out(34, offered, 4096, 1 << 20))
    assert (major, minor) == (7, 34)
    assert flags == fuse.ASYNC_READ | fuse.DO_READDIRPLUS  # SETXATTR_EXT is not wanted
    assert fuse.INIT_OUT.unpack(fuse.init_out(50, 0, 0, 1 << 20))[1] == fuse.MINOR


def test_init_asks_the_slave_to_clear_privileges_on_write() -> None:
    # HANDLE_KILLPRIV_V2: the kernel no longer asks for security.capability at each
    # write (the slave's own write clears suid, sgid and file capabilities).
    offered = fuse.HANDLE_KILLPRIV | fuse.HANDLE_KILLPRIV_V2
    flags = fuse.INIT_OUT.unpack(fuse.init_out(34, offered, 4096, 1 << 20))[3]
    assert flags == offered


def test_reply_and_notice_headers() -> None:
    assert fuse.OUT_HEADER.unpack(fuse.reply(9, error=errno.ENOENT)) == (16, -errno.ENOENT, 9)
    assert fuse.OUT_HEADER.unpack_from(fuse.reply(9, b"abc")) == (19, 0, 9)
    entry = fuse.inval_entry(5, b"name")
    assert fuse.OUT_HEADER.unpack_from(entry) == (len(entry), fuse.NOTIFY_INVAL_ENTRY, 0)
    assert fuse.INVAL_ENTRY.unpack_from(entry, 16) == (5, 4, 0)
    assert entry.endswith(b"name\0")
    expired = fuse.inval_entry(5, b"name", expire=True)
    assert fuse.INVAL_ENTRY.unpack_from(expired, 16) == (5, 4, fuse.EXPIRE_ONLY)
    inode = fuse.inval_inode(5)
    assert fuse.OUT_HEADER.unpack_from(inode) == (40, fuse.NOTIFY_INVAL_INODE, 0)


def test_names_refuses_a_body_with_too_few() -> None:
    assert fuse.names(memoryview(b"a\0bc\0"), 2) == [b"a", b"bc"]
    with pytest.raises(ValueError):
        fuse.names(memoryview(b"a\0bc"), 2)


# --- the layout ----------------------------------------------------------------------------


def policy(*rules: tuple[str, Side]) -> Policy:
    return Policy(tuple(Rule(p.encode(), side, "test") for p, side in rules))


def test_layout_mounts_the_masters_prefixes(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "sym").symlink_to("m")
    t = str(tmp_path)
    points, mounts = layout(policy((t + "/m", Side.MASTER), (t + "/file", Side.MASTER),
                                   (t + "/sym", Side.MASTER), (t + "/none", Side.MASTER),
                                   ("/", Side.SLAVE)))  # fmt: skip
    kinds = {p.path: p.kind for p in points.master.values()}
    tb = t.encode()
    assert kinds == {tb + b"/m": stat.S_IFDIR, tb + b"/file": stat.S_IFREG,
                     tb + b"/sym": stat.S_IFLNK, tb + b"/none": 0}  # fmt: skip
    assert points.master[tb + b"/sym"].target == b"m"
    assert {m.source for m in mounts} == {tb + b"/m", tb + b"/file"}
    assert tb in points.ways and b"/tmp" in points.ways and b"/" not in points.ways


def test_layout_refuses_what_it_cannot_lay_out() -> None:
    with pytest.raises(LayoutError, match="no --local /"):
        layout(policy(("/", Side.MASTER)))
    with pytest.raises(LayoutError, match="cannot be inside"):
        layout(policy(("/usr/x", Side.SLAVE), ("/usr", Side.MASTER), ("/", Side.SLAVE)))


# --- requests against a real slave -----------------------------------------------------------


async def test_lookup_of_a_watched_file_is_kept(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        nodeid, valid, attr_valid, attr = (await kernel.lookup(ROOT, b"f")).entry()
        st = os.lstat(box / "f")
        assert attr[0] == st.st_ino and attr[1] == 12 and attr[9] == st.st_mode
        assert valid == WATCHED and attr_valid == WATCHED
        # Asked again, from what the view holds: the same node, no slave call.
        again = (await kernel.lookup(ROOT, b"f")).entry()
        assert again[0] == nodeid
        assert v.nodes[nodeid].lookups == 2


async def test_lookup_unwatched_is_kept_for_no_time(box: Path) -> None:
    async with viewed(box, watch=False) as (kernel, _):
        _, valid, attr_valid, attr = (await kernel.lookup(ROOT, b"f")).entry()
        assert (valid, attr_valid) == (0, 0) and attr[1] == 12
        missing = await kernel.lookup(ROOT, b"nothing")
        assert missing.error == errno.ENOENT  # no negative entry either


async def test_lookup_of_a_missing_name_is_a_negative_entry(box: Path) -> None:
    async with viewed(box) as (kernel, _):
        nodeid, valid, _, _ = (await kernel.lookup(ROOT, b"nothing")).entry()
        assert nodeid == 0 and valid == WATCHED
        (box / "nothing").write_bytes(b"now")  # another process makes it
        await notice_of(kernel, lambda n: (ROOT, b"nothing") in inval_entries(n))
        assert (await kernel.lookup(ROOT, b"nothing")).entry()[3][1] == 3
        assert inval_entry_flags(kernel.notices) == {fuse.EXPIRE_ONLY}


@pytest.mark.parametrize(("minor", "flags"), [(37, 0), (41, fuse.EXPIRE_ONLY)])
async def test_names_are_expired_where_the_kernel_can(box: Path, minor: int, flags: int) -> None:
    async with viewed(box, minor=minor) as (kernel, _):
        assert (await kernel.lookup(ROOT, b"nothing")).error == 0
        (box / "nothing").write_bytes(b"now")
        await notice_of(kernel, lambda n: (ROOT, b"nothing") in inval_entries(n))
        assert inval_entry_flags(kernel.notices) == {flags}


async def test_lookup_refuses_bad_names(box: Path) -> None:
    async with viewed(box) as (kernel, _):
        assert (await kernel.lookup(ROOT, b"a/b")).error == errno.EINVAL
        assert (await kernel.ask(Opcode.LOOKUP, ROOT, b"unterminated")).error == errno.EINVAL
        assert (await kernel.lookup(987654, b"f")).error == errno.ESTALE


async def test_a_symlink_reads_the_slaves_target(box: Path) -> None:
    async with viewed(box) as (kernel, _):
        nodeid, _, _, attr = (await kernel.lookup(ROOT, b"link")).entry()
        assert stat.S_ISLNK(attr[9])
        got = await kernel.ask(Opcode.READLINK, nodeid)
        assert got.body == b"d/a"


async def test_master_points_and_the_way_to_them(box: Path, tmp_path: Path) -> None:
    masters = tmp_path / "masters"
    (masters / "thing").mkdir(parents=True)
    (masters / "sym").symlink_to("/elsewhere")
    m = bytes(masters)
    points = Points.of([m + b"/thing", m + b"/none", m + b"/sym"])
    top = m.split(b"/")[1]
    async with viewed(box, points) as (kernel, v):
        # The way to the master's points: the slave (the box) has none of it, so the
        # view makes empty directories to mount on, named for good.
        way, valid, _, attr = (await kernel.lookup(ROOT, top)).entry()
        assert stat.S_ISDIR(attr[9]) and valid == WATCHED and v.nodes[way].pinned
        lib = await kernel.node(m)
        thing, _, _, attr = (await kernel.lookup(lib, b"thing")).entry()
        assert stat.S_ISDIR(attr[9])
        # The master has nothing at one of its points: nothing is there, whatever the
        # slave has.
        (box / m.decode().lstrip("/")).mkdir(parents=True)
        (box / m.decode().lstrip("/") / "none").write_bytes(b"slave's")
        assert (await kernel.lookup(lib, b"none")).error == errno.ENOENT
        node = await kernel.node(m + b"/sym")
        assert (await kernel.ask(Opcode.READLINK, node)).body == b"/elsewhere"
        # The view's own nodes cannot be changed, removed or renamed.
        assert (await kernel.ask(Opcode.UNLINK, lib, b"thing\0")).error == errno.EBUSY
        assert (await kernel.ask(Opcode.MKDIR, lib, fuse.MKDIR_IN.pack(0o755, 0) + b"thing\0")
                ).error == errno.EEXIST  # fmt: skip
        setattr_body = fuse.SETATTR_IN.pack(fuse.FATTR_MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                            0o700, 0, 0, 0, 0)  # fmt: skip
        assert (await kernel.ask(Opcode.SETATTR, thing, setattr_body)).error == errno.EPERM
        listing = await kernel.listing(thing)
        assert [n for n, _, _ in listing] == [b".", b".."]
        # Listings show the points (of the master's type) and hide the absent one.
        assert {(n, k) for n, k, _ in await kernel.listing(lib)} == {
            (b".", 4), (b"..", 4), (b"thing", 4), (b"sym", 10)}  # fmt: skip
        assert (top, 4) in {(n, k) for n, k, _ in await kernel.listing(ROOT)}
        # Nothing of this was made on the slave.
        assert sorted(p.name for p in box.iterdir()) == ["d", "f", "link", top.decode()]
        assert not (box / m.decode().lstrip("/") / "thing").exists()


async def test_a_way_the_slave_has_is_the_slaves(box: Path) -> None:
    (box / "usr").mkdir()
    (box / "usr" / "mine").write_bytes(b"slave's")
    (box / "usr" / "gone-nowhere").write_bytes(b"slave's")
    points = Points.of([b"/usr/lib", b"/usr/gone-nowhere"])  # the master has /usr/lib
    async with viewed(box, points) as (kernel, v):
        usr, _, _, attr = (await kernel.lookup(ROOT, b"usr")).entry()
        assert attr[0] == os.lstat(box / "usr").st_ino and v.nodes[usr].pinned
        names = {n for n, _, _ in await kernel.listing(usr)}
        assert names == {b".", b"..", b"mine", b"lib"}
        assert (await kernel.lookup(usr, b"gone-nowhere")).error == errno.ENOENT
        # A change there never drops the pinned name (it would detach the mount).
        (box / "usr" / "new").write_bytes(b"")
        os.utime(box / "usr")
        v.invalidate((b"/usr",))
        notices = await kernel.notices_until(2, timeout=1)
        assert (ROOT, b"usr") not in inval_entries(notices)
        assert usr in inval_inodes(notices)


async def test_readdirplus_carries_each_entrys_attributes(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        d = await kernel.node(b"/d")
        listing = await kernel.listing(d, plus=True)
        by_name = {n: (k, e) for n, k, e in listing}
        assert set(by_name) == {b".", b"..", b"a", b"b"}
        kind, entry = by_name[b"b"]
        assert kind == 8
        nodeid, _gen, esec, *_rest = fuse.ENTRY_OUT.unpack_from(entry)
        attr = fuse.ENTRY_OUT.unpack_from(entry)[6:]
        assert nodeid and esec == WATCHED and attr[1] == 2
        assert attr[0] == os.lstat(box / "d" / "b").st_ino
        assert fuse.ENTRY_OUT.unpack_from(by_name[b"."][1])[0] == 0  # the kernel's own
        assert b"/d" in v.listings


async def test_a_listing_is_kept_until_the_directory_changes(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        d = await kernel.node(b"/d")
        assert {n for n, _, _ in await kernel.listing(d)} == {b".", b"..", b"a", b"b"}
        opened = await kernel.ask(Opcode.OPENDIR, d, fuse.OPEN_IN.pack(0, 0))
        fh, flags = opened.fh()
        assert flags & fuse.FOPEN_CACHE_DIR and flags & fuse.FOPEN_KEEP_CACHE
        await kernel.ask(Opcode.RELEASEDIR, d, fuse.RELEASE_IN.pack(fh, 0, 0, 0))
        (box / "d" / "c").write_bytes(b"")  # another process adds a name
        notices = await kernel.notices_until(1)
        assert d in inval_inodes(notices)
        with trio.fail_after(5):
            while b"/d" in v.listings:
                await trio.sleep(0.01)
        assert b"c" in {n for n, _, _ in await kernel.listing(d)}


async def test_a_walk_reads_the_next_directories_ahead(box: Path) -> None:
    (box / "d" / "x").mkdir()
    (box / "d" / "x" / "deep").mkdir()
    (box / "e").mkdir()
    (box / "e" / "in-e").write_bytes(b"")
    async with viewed(box) as (kernel, v):
        d = await kernel.node(b"/d")
        await kernel.listing(d)  # one directory opened: nothing read ahead
        assert set(v.listings) == {b"/d"}
        await kernel.listing(ROOT)
        await kernel.listing(d)  # a child of an opened directory: a walk
        with trio.fail_after(5):
            while {b"/d/x", b"/e"} - set(v.listings):
                await kernel.notices_until(len(kernel.notices) + 1, timeout=0.01)
        assert b"/d/x/deep" not in v.listings  # one level ahead only
        e = await kernel.node(b"/e")
        calls = v.link.calls
        assert {n for n, _, _ in await kernel.listing(e)} == {b".", b"..", b"in-e"}
        assert v.link.calls == calls  # answered from what was read ahead
        # A change there drops what was read ahead, as any watched listing.
        (box / "e" / "new").write_bytes(b"")
        with trio.fail_after(5):
            while b"/e" in v.listings:
                await kernel.notices_until(len(kernel.notices) + 1, timeout=0.01)
        assert b"new" in {n for n, _, _ in await kernel.listing(e)}


async def test_a_directory_opened_while_read_ahead_waits_for_that_answer(box: Path) -> None:
    (box / "e").mkdir()
    async with viewed(box) as (kernel, v):
        e = await kernel.node(b"/e")
        v._read_ahead([b"/e"])  # sent, not answered yet
        calls = v.link.calls
        names = {n for n, _, _ in await kernel.listing(e)}
        assert names == {b".", b".."} and v.link.calls == calls  # no second LISTDIR


async def test_a_lookup_lists_its_directory_ahead(box: Path) -> None:
    for i in range(20):
        (box / "d" / f"n{i}").write_bytes(b"")
    async with viewed(box) as (kernel, v):
        d = await kernel.node(b"/d")
        assert (await kernel.lookup(d, b"n0")).entry()[3][1] == 0
        with trio.fail_after(5):  # the rest of /d comes behind the answer
            while b"/d" not in v.listings:
                await kernel.notices_until(len(kernel.notices) + 1, timeout=0.01)
        calls = v.link.calls
        for i in range(1, 20):
            assert (await kernel.lookup(d, f"n{i}".encode())).entry()[0]
        nodeid, valid, _, _ = (await kernel.lookup(d, b"absent")).entry()
        assert nodeid == 0 and valid == WATCHED  # not in the watched listing: no file
        assert v.link.calls == calls  # all answered by the view
        (box / "d" / "absent").write_bytes(b"now")  # made behind the view's back
        with trio.fail_after(5):
            while (await kernel.lookup(d, b"absent")).entry()[0] == 0:
                await kernel.notices_until(len(kernel.notices) + 1, timeout=0.01)


async def test_a_large_directory_is_not_listed_for_a_lookup(box: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:  # fmt: skip
    monkeypatch.setattr(view, "LIST_AHEAD_SIZE", 0)
    async with viewed(box) as (kernel, v):
        d = await kernel.node(b"/d")
        await kernel.lookup(d, b"a")
        await kernel.getattr(ROOT)
        assert b"/d" not in v.listings and b"/d" not in v._prefetching


async def test_a_large_directory_is_read_by_handle(box: Path, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:  # fmt: skip
    big = box / "big"
    big.mkdir()
    for i in range(300):
        (big / f"entry-with-a-long-name-{i:04}").write_bytes(b"")
    from fsys.slave import executor

    monkeypatch.setattr(executor, "MAX_IO", 4096)  # LISTDIR says EFBIG beyond
    async with viewed(box) as (kernel, v):
        d = await kernel.node(b"/big")
        names = {n for n, _, _ in await kernel.listing(d)}
        assert len(names) == 302
        assert b"/big" not in v.listings  # read in pieces: not one answer to keep


async def test_read_write_create_and_remove(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        f = await kernel.node(b"/f")
        fh = await kernel.open(f)
        assert (await kernel.read(f, fh, 5, 7)).body == b"view\n"
        await kernel.ask(Opcode.RELEASE, f, fuse.RELEASE_IN.pack(fh, 0, 0, 0))

        made = await kernel.ask(Opcode.CREATE, ROOT, fuse.CREATE_IN.pack(
            os.O_WRONLY | os.O_CREAT, 0o100640, 0, 0) + b"new\0")  # fmt: skip
        nodeid, _, _, attr = made.entry()
        wfh, _ = made.fh(ENTRY_SIZE)
        assert stat.S_IMODE(attr[9]) == 0o640
        wrote = await kernel.ask(Opcode.WRITE, nodeid,
                                 fuse.WRITE_IN.pack(wfh, 0, 6, 0, 0, 0, 0) + b"abcdef")  # fmt: skip
        assert fuse.WRITE_OUT.unpack(wrote.body)[0] == 6
        sync = await kernel.ask(Opcode.FSYNC, nodeid, fuse.FSYNC_IN.pack(wfh, 0, 0))
        assert sync.error == 0
        await kernel.ask(Opcode.RELEASE, nodeid, fuse.RELEASE_IN.pack(wfh, 0, 0, 0))
        assert (box / "new").read_bytes() == b"abcdef"

        mkdir = await kernel.ask(Opcode.MKDIR, ROOT, fuse.MKDIR_IN.pack(0o750, 0) + b"sub\0")
        sub = mkdir.entry()[0]
        assert (box / "sub").is_dir() and stat.S_IMODE(os.stat(box / "sub").st_mode) == 0o750
        link = await kernel.ask(Opcode.SYMLINK, sub, b"s\0../new\0")
        assert link.error == 0 and os.readlink(box / "sub" / "s") == "../new"
        hard = await kernel.ask(Opcode.LINK, ROOT, fuse.LINK_IN.pack(nodeid) + b"hard\0")
        assert hard.entry()[3][10] == 2  # two links now
        assert (await kernel.ask(Opcode.RMDIR, ROOT, b"sub\0")).error == errno.ENOTEMPTY
        assert (await kernel.ask(Opcode.UNLINK, sub, b"s\0")).error == 0
        assert (await kernel.ask(Opcode.RMDIR, ROOT, b"sub\0")).error == 0
        assert not (box / "sub").exists()
        assert v.nodes[sub].path is None  # gone: ESTALE from now on
        assert (await kernel.getattr(sub)).error == errno.ESTALE


def write_body(fh: int, offset: int, data: bytes) -> bytes:
    return fuse.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0) + data


async def test_writes_are_answered_at_once_and_joined_behind(box: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:  # fmt: skip
    async with viewed(box) as (kernel, v):
        sent: list[int] = []
        submit = v.link.submit

        def counting(pairing: int, op: object, *args: object) -> None:
            if type(op).__name__ == "Write":
                sent.append(len(op.data))  # type: ignore[attr-defined]
            submit(pairing, op, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(v.link, "submit", counting)
        made = await kernel.ask(Opcode.CREATE, ROOT, fuse.CREATE_IN.pack(
            os.O_WRONLY | os.O_CREAT, 0o100644, 0, 0) + b"w\0")  # fmt: skip
        node, fh = made.entry()[0], made.fh(ENTRY_SIZE)[0]
        # Three writes queued at once, then a stat: the writes are answered, sent as
        # one, and the stat waits for them.
        uniques = [kernel.send_now(Opcode.WRITE, node, write_body(fh, i * 3, b"abc"))
                   for i in range(3)]  # fmt: skip
        stat_unique = kernel.send_now(Opcode.GETATTR, node, fuse.GETATTR_IN.pack(0, 0, 0))
        for unique in uniques:
            assert fuse.WRITE_OUT.unpack((await kernel.answer(unique)).body)[0] == 3
        assert (await kernel.answer(stat_unique)).attr()[1][1] == 9
        assert sent == [9]
        assert (box / "w").read_bytes() == b"abcabcabc"
        # A write that does not continue the last one is sent on its own.
        await kernel.ask(Opcode.WRITE, node, write_body(fh, 0, b"X"))
        await kernel.ask(Opcode.FSYNC, node, fuse.FSYNC_IN.pack(fh, 0, 0))
        assert (box / "w").read_bytes() == b"Xbcabcabc" and sent == [9, 1]


async def test_a_failed_write_is_reported_at_the_next_call_of_its_handle(box: Path) -> None:
    async with viewed(box) as (kernel, _):
        f = await kernel.node(b"/f")
        fh = await kernel.open(f)  # read-only: the slave refuses writes (EBADF)
        wrote = await kernel.ask(Opcode.WRITE, f, write_body(fh, 0, b"nope"))
        assert wrote.error == 0  # answered before the slave had it
        flush = fuse.RELEASE_IN.pack(fh, 0, 0, 0)
        assert (await kernel.ask(Opcode.FLUSH, f, flush)).error == errno.EBADF
        assert (await kernel.ask(Opcode.FLUSH, f, flush)).error == 0  # reported once
        await kernel.ask(Opcode.WRITE, f, write_body(fh, 0, b"nope"))
        await kernel.ask(Opcode.GETATTR, f, fuse.GETATTR_IN.pack(0, 0, 0))  # waits for it
        assert (await kernel.ask(Opcode.WRITE, f, write_body(fh, 0, b"x"))).error == errno.EBADF
        await kernel.ask(Opcode.WRITE, f, write_body(fh, 0, b"nope"))
        sync = fuse.FSYNC_IN.pack(fh, 0, 0)
        assert (await kernel.ask(Opcode.FSYNC, f, sync)).error == errno.EBADF
        assert (await kernel.ask(Opcode.FSYNC, f, sync)).error == 0
        assert (box / "f").read_bytes() == b"hello, view\n"


async def test_a_synchronous_handles_writes_are_on_the_slave_when_answered(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        f = await kernel.node(b"/f")
        fh = await kernel.open(f, os.O_WRONLY | os.O_SYNC)
        wrote = await kernel.ask(Opcode.WRITE, f, write_body(fh, 0, b"HELLO"))
        assert fuse.WRITE_OUT.unpack(wrote.body)[0] == 5
        assert (box / "f").read_bytes() == b"HELLO, view\n"
        assert v._behind.idle


async def test_rename_moves_the_nodes_below(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        d = await kernel.node(b"/d")
        a = (await kernel.lookup(d, b"a")).entry()[0]
        moved = await kernel.ask(Opcode.RENAME, ROOT, fuse.RENAME_IN.pack(ROOT) + b"d\0e\0")
        assert moved.error == 0
        assert v.nodes[d].path == b"/e" and v.nodes[a].path == b"/e/a"
        fh = await kernel.open(a)
        assert (await kernel.read(a, fh, 10)).body == b"A"
        assert (box / "e" / "a").exists() and not (box / "d").exists()
        # RENAME2 with RENAME_NOREPLACE onto an existing name: the slave's EEXIST.
        noreplace = fuse.RENAME2_IN.pack(ROOT, 1, 0) + b"e\0f\0"
        assert (await kernel.ask(Opcode.RENAME2, ROOT, noreplace)).error == errno.EEXIST


async def test_setattr_truncates_and_changes_mode_and_times(box: Path) -> None:
    async with viewed(box) as (kernel, _):
        f = await kernel.node(b"/f")
        valid = fuse.FATTR_SIZE | fuse.FATTR_MODE | fuse.FATTR_MTIME
        body = fuse.SETATTR_IN.pack(valid, 0, 0, 5, 0, 0, 1_234_567_890, 0, 0, 42, 0,
                                    0o100600, 0, 0, 0, 0)  # fmt: skip
        _, attr = (await kernel.ask(Opcode.SETATTR, f, body)).attr()
        st = os.lstat(box / "f")
        assert st.st_size == 5 and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_mtime_ns == 1_234_567_890_000_000_042
        assert attr[1] == 5 and attr[4] == 1_234_567_890


async def test_an_outside_change_drops_attributes_and_pages(box: Path) -> None:
    async with viewed(box) as (kernel, _):
        f = await kernel.node(b"/f")
        valid, attr = (await kernel.getattr(f)).attr()
        assert valid == WATCHED and attr[1] == 12
        (box / "f").write_bytes(b"longer than it was\n")
        notices = await kernel.notices_until(1)
        assert f in inval_inodes(notices)
        _, attr = (await kernel.getattr(f)).attr()
        assert attr[1] == 19


async def test_a_file_replaced_behind_the_view_is_a_new_node(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        old = (await kernel.lookup(ROOT, b"f")).entry()[0]
        (box / "g").write_bytes(b"other")
        os.rename(box / "g", box / "f")
        await kernel.notices_until(1)
        with trio.fail_after(5):
            while (await kernel.lookup(ROOT, b"f")).entry()[0] == old:
                await trio.sleep(0.01)
        assert v.nodes[old].path is None


async def test_an_open_file_stays_readable_once_removed(box: Path) -> None:
    async with viewed(box) as (kernel, _):
        f = await kernel.node(b"/f")
        fh = await kernel.open(f)
        os.unlink(box / "f")
        assert (await kernel.read(f, fh, 5)).body == b"hello"
        assert (await kernel.getattr(f)).error == errno.ENOENT


async def test_opening_a_watched_file_keeps_its_pages(box: Path) -> None:
    async with viewed(box) as (kernel, _):
        f = await kernel.node(b"/f")
        await kernel.getattr(f)
        opened = await kernel.ask(Opcode.OPEN, f, fuse.OPEN_IN.pack(os.O_RDONLY, 0))
        assert opened.fh()[1] & fuse.FOPEN_KEEP_CACHE
    async with viewed(box, watch=False) as (kernel, _):
        f = await kernel.node(b"/f")
        opened = await kernel.ask(Opcode.OPEN, f, fuse.OPEN_IN.pack(os.O_RDONLY, 0))
        assert not opened.fh()[1] & fuse.FOPEN_KEEP_CACHE


def sent_opens(v: View) -> list[bytes]:
    """The paths of the OPENs the view sends the slave from now on (a spy)."""
    paths: list[bytes] = []
    submit = v.link.submit

    def spy(pairing: int, op: Operation, resume: Callable[[Reply | LinkClosed], None],
            *args: Any, **kwargs: Any) -> int:  # fmt: skip
        if isinstance(op, (Open, OpenRead)):
            paths.append(op.path)
        return submit(pairing, op, resume, *args, **kwargs)

    v.link.submit = spy  # type: ignore[method-assign,assignment]
    return paths


async def release(kernel: Kernel, nodeid: int, fh: int) -> None:
    assert (await kernel.ask(Opcode.RELEASE, nodeid, fuse.RELEASE_IN.pack(fh, 0, 0, 0))).error == 0


async def test_a_file_read_again_is_opened_without_the_slave(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        f = await kernel.node(b"/f")
        await kernel.getattr(f)
        opens = sent_opens(v)
        first = await kernel.ask(Opcode.OPEN, f, fuse.OPEN_IN.pack(os.O_RDONLY, 0))
        fh, flags = first.fh()
        assert flags & fuse.FOPEN_NOFLUSH  # nothing to report at its close
        await release(kernel, f, fh)
        again = await kernel.ask(Opcode.OPEN, f, fuse.OPEN_IN.pack(os.O_RDONLY, 0))
        assert again.fh() == (fh, fuse.FOPEN_KEEP_CACHE | fuse.FOPEN_NOFLUSH)
        assert opens == [b"/f"]  # the second open: the handle kept idle
        # It reads the file as it is now (a change of content keeps it).
        (box / "f").write_bytes(b"HELLO, view\n")
        await notice_of(kernel, lambda n: f in inval_inodes(n))
        assert (await kernel.read(f, fh, 5)).body == b"HELLO"
        await kernel.getattr(f)  # (the change dropped its attributes: watched again)
        await release(kernel, f, fh)
        # Other flags are another open.
        assert await kernel.open(f, os.O_RDONLY | os.O_NOATIME) != fh
        assert opens == [b"/f", b"/f"] and fh in v._idle_handles
        before = len(kernel.notices)
        (box / "f").write_bytes(b"hello again\n")  # content alone: the handle stays
        await notice_of(kernel, lambda n: len(n) > before)
        assert (await kernel.open(f)) == fh and opens == [b"/f", b"/f"]


async def test_idle_handles_are_bounded(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(view, "IDLE_HANDLES", 1)
    async with viewed(box) as (kernel, v):
        f, a = await kernel.node(b"/f"), await kernel.node(b"/d/a")
        fh, ah = await kernel.open(f), await kernel.open(a)
        await release(kernel, f, fh)
        await release(kernel, a, ah)
        assert list(v._idle_handles) == [fh]  # the first stays; the second is closed
        opens = sent_opens(v)
        assert await kernel.open(f) == fh and await kernel.open(a) != ah
        assert opens == [b"/d/a"]


async def test_without_watching_no_handle_is_kept(box: Path) -> None:
    async with viewed(box, watch=False) as (kernel, v):
        f = await kernel.node(b"/f")
        await release(kernel, f, await kernel.open(f))
        assert not v._idle_handles


async def test_a_change_of_mode_or_a_new_file_closes_the_idle_handle(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        f = await kernel.node(b"/f")
        await kernel.getattr(f)
        fh = await kernel.open(f)
        await release(kernel, f, fh)
        opens = sent_opens(v)
        os.chmod(box / "f", 0o600)  # an open may fail now where it did not
        await notice_of(kernel, lambda n: f in inval_inodes(n))
        assert fh not in v._idle_handles
        await kernel.getattr(f)
        assert await kernel.open(f) != fh and opens == [b"/f"]


async def test_handles_written_through_are_not_kept(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        f = await kernel.node(b"/f")
        await kernel.getattr(f)
        opened = await kernel.ask(Opcode.OPEN, f, fuse.OPEN_IN.pack(os.O_RDWR, 0))
        fh, flags = opened.fh()
        assert not flags & fuse.FOPEN_NOFLUSH  # a write behind it reports at its close
        await release(kernel, f, fh)
        assert not v._idle_handles
        opens = sent_opens(v)
        await kernel.open(f)
        assert opens == [b"/f"]


async def test_a_forgotten_node_closes_its_idle_handle(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        f = await kernel.node(b"/f")
        await kernel.getattr(f)
        await release(kernel, f, await kernel.open(f))
        assert v._idle_handles
        await kernel.send(Opcode.FORGET, f, fuse.FORGET_IN.pack(1))
        with trio.fail_after(5):
            while v._idle_handles:
                await trio.sleep(0.01)


async def test_a_slave_out_of_handles_gets_the_idle_ones_back(box: Path) -> None:
    for i in range(3):
        (box / f"n{i}").write_bytes(b"%d" % i)
    async with viewed(box, confinement=Confinement(max_handles=3)) as (kernel, v):
        nodes = [await kernel.node(b"/n%d" % i) for i in range(3)]
        for n in nodes[:2]:
            await kernel.getattr(n)
            await release(kernel, n, await kernel.open(n))
        assert len(v._idle_handles) == 2
        held = await kernel.open(await kernel.node(b"/f"))  # the third handle
        # A fourth would be one too many: the open closes the idle ones and succeeds.
        fh = await kernel.open(nodes[2])
        assert (await kernel.read(nodes[2], fh, 1)).body == b"2"
        assert not v._idle_handles
        assert (await kernel.read(await kernel.node(b"/f"), held, 5)).body == b"hello"


async def test_xattrs_known_absent_are_answered_at_once(box: Path) -> None:
    async with viewed(box) as (kernel, _):
        f = await kernel.node(b"/f")
        got = await kernel.ask(Opcode.GETXATTR, f, fuse.GETXATTR_IN.pack(0, 0)
                               + b"security.selinux\0")  # fmt: skip
        assert got.error == errno.ENODATA
        listed = await kernel.ask(Opcode.LISTXATTR, f, fuse.GETXATTR_IN.pack(0, 0))
        assert fuse.GETXATTR_OUT.unpack(listed.body)[0] == 0
        os.setxattr(box / "f", "user.k", b"value")
        await kernel.notices_until(1)
        with trio.fail_after(5):
            while True:
                got = await kernel.ask(Opcode.GETXATTR, f, fuse.GETXATTR_IN.pack(64, 0)
                                       + b"user.k\0")  # fmt: skip
                if got.error == 0:
                    break
                await trio.sleep(0.01)
        assert got.body == b"value"
        set_body = fuse.SETXATTR_IN.pack(3, 0) + b"user.n\0xyz"
        assert (await kernel.ask(Opcode.SETXATTR, f, set_body)).error == 0
        assert os.getxattr(box / "f", "user.n") == b"xyz"
        assert (await kernel.ask(Opcode.REMOVEXATTR, f, b"user.n\0")).error == 0
        assert "user.n" not in os.listxattr(box / "f")


async def test_a_change_of_content_keeps_the_name_and_what_is_known_of_xattrs(
    box: Path,
) -> None:
    async with viewed(box) as (kernel, v):
        d = await kernel.node(b"/d")
        await kernel.listing(d, plus=True)  # primes /d/a: watched, no xattrs
        a = (await kernel.lookup(d, b"a")).entry()[0]
        assert v.xattrs_absent[b"/d/a"] is None
        with open(box / "d" / "a", "a") as f:
            f.write("more")  # another process writes: the content alone changes
        await notice_of(kernel, lambda n: a in inval_inodes(n))
        assert (d, b"a") not in inval_entries(kernel.notices)  # the same file
        got = await kernel.ask(Opcode.GETXATTR, a, fuse.GETXATTR_IN.pack(0, 0)
                               + b"security.capability\0")  # fmt: skip
        assert got.error == errno.ENODATA and v.xattrs_absent[b"/d/a"] is None
        assert (await kernel.getattr(a)).attr()[1][1] == 5  # the new size
        os.setxattr(box / "d" / "a", "user.k", b"v")  # its attributes: forgotten
        with trio.fail_after(5):
            while b"/d/a" in v.xattrs_absent:
                await kernel.notices_until(len(kernel.notices) + 1, timeout=0.05)
        got = await kernel.ask(Opcode.GETXATTR, a, fuse.GETXATTR_IN.pack(16, 0) + b"user.k\0")
        assert got.body == b"v"


async def test_an_absent_xattr_is_remembered_while_watched(box: Path) -> None:
    os.setxattr(box / "f", "user.present", b"1")
    async with viewed(box) as (kernel, v):
        f = await kernel.node(b"/f")
        ask = fuse.GETXATTR_IN.pack(0, 0) + b"security.capability\0"
        assert (await kernel.ask(Opcode.GETXATTR, f, ask)).error == errno.ENODATA
        assert v.xattrs_absent[b"/f"] == {b"security.capability"}
        calls = v.link.calls
        assert (await kernel.ask(Opcode.GETXATTR, f, ask)).error == errno.ENODATA
        assert v.link.calls == calls  # answered by the view


async def test_statfs_is_the_slaves(box: Path) -> None:
    async with viewed(box) as (kernel, _):
        got = await kernel.ask(Opcode.STATFS, ROOT)
        blocks, _bfree, _bavail, _files, _ffree, bsize, namelen, _frsize, _ = (
            fuse.STATFS_OUT.unpack(got.body))  # fmt: skip
        native = os.statvfs(box)
        assert (blocks, bsize, namelen) == (native.f_blocks, native.f_bsize, native.f_namemax)


async def test_malformed_and_unknown_requests(box: Path) -> None:
    async with viewed(box) as (kernel, _):
        f = await kernel.node(b"/f")
        assert (await kernel.ask(Opcode.READ, f, b"\0")).error == errno.EINVAL
        assert (await kernel.ask(Opcode.OPEN, f, b"")).error == errno.EINVAL
        assert (await kernel.ask(Opcode.MKDIR, ROOT, fuse.MKDIR_IN.pack(0o755, 0))
                ).error == errno.EINVAL  # fmt: skip
        assert (await kernel.ask(Opcode.SETATTR, f, b"short")).error == errno.EINVAL
        assert (await kernel.ask(Opcode.BMAP, f)).error == errno.ENOSYS
        assert (await kernel.ask(999, f)).error == errno.ENOSYS
        assert (await kernel.read(f, 12345, 10)).error == errno.EBADF
        # Still serving.
        assert (await kernel.getattr(f)).error == 0


async def test_forget_drops_a_node_once_every_lookup_is_forgotten(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        f = (await kernel.lookup(ROOT, b"f")).entry()[0]
        await kernel.lookup(ROOT, b"f")
        await kernel.send(Opcode.FORGET, f, fuse.FORGET_IN.pack(1))
        await kernel.getattr(ROOT)  # FORGET has no answer: this one orders after it
        assert f in v.nodes
        batch = fuse.BATCH_FORGET_IN.pack(1, 0) + fuse.FORGET_ONE.pack(f, 1)
        await kernel.send(Opcode.BATCH_FORGET, 0, batch)
        await kernel.getattr(ROOT)
        assert f not in v.nodes and b"/f" not in v.by_path
        assert (await kernel.getattr(f)).error == errno.ESTALE


async def test_names_are_the_slaves_and_dots_are_the_kernels(box: Path, tmp_path: Path
                                                              ) -> None:  # fmt: skip
    (tmp_path / "secret").write_bytes(b"master's")
    async with viewed(box) as (kernel, _):
        # The kernel resolves "." and ".." itself: a LOOKUP of either is refused, so
        # no node names a path that climbs.
        assert (await kernel.lookup(ROOT, b"..")).error == errno.EINVAL
        assert (await kernel.lookup(ROOT, b".")).error == errno.EINVAL
        d = await kernel.node(b"/d")
        assert (await kernel.lookup(d, b"..")).error == errno.EINVAL
        # The test's directory holds "secret"; the slave's root (the box) does not.
        assert (await kernel.lookup(ROOT, b"secret")).entry()[0] == 0


async def test_a_dead_slave_fails_requests_with_eio(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        f = await kernel.node(b"/f")
        fh = await kernel.open(f)
        v.slave_scope.cancel()  # type: ignore[attr-defined]
        with trio.fail_after(5):
            while v.link.alive:
                await trio.sleep(0.01)
        # What came with the open still reads; what needs the slave fails.
        assert (await kernel.read(f, fh, 5)).body == b"hello"
        opened = await kernel.ask(Opcode.OPEN, f, fuse.OPEN_IN.pack(os.O_RDONLY, 0))
        assert opened.error == errno.EIO
        assert (await kernel.lookup(ROOT, b"not-cached")).error == errno.EIO
        # What the view knows still answers (a watched answer holds until told).
        assert (await kernel.getattr(f)).attr()[1][1] == 12


def sent_reads(v: View) -> list[Read]:
    """The READs the view sends the slave from now on (a spy)."""
    reads: list[Read] = []
    submit = v.link.submit

    def spy(pairing: int, op: Operation, resume: Callable[[Reply | LinkClosed], None],
            *args: Any, **kwargs: Any) -> int:  # fmt: skip
        if isinstance(op, Read):
            reads.append(op)
        return submit(pairing, op, resume, *args, **kwargs)

    v.link.submit = spy  # type: ignore[method-assign,assignment]
    return reads


async def test_an_open_to_read_brings_the_files_start(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        f = await kernel.node(b"/f")
        await kernel.getattr(f)
        reads = sent_reads(v)
        fh = await kernel.open(f)
        assert (await kernel.read(f, fh, 4096)).body == b"hello, view\n"
        assert (await kernel.read(f, fh, 4096, 12)).body == b""  # it came whole: the end
        assert reads == []
        await release(kernel, f, fh)
        assert not v._ahead and v._ahead_held == 0
    async with viewed(box, watch=False) as (kernel, v):  # nothing would say it changed
        f = await kernel.node(b"/f")
        reads = sent_reads(v)
        fh = await kernel.open(f)
        assert (await kernel.read(f, fh, 4096)).body == b"hello, view\n"
        assert len(reads) == 1 and not v._ahead


async def test_an_open_to_read_with_flags_open_read_refuses_is_a_plain_open(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        f = await kernel.node(b"/f")
        await kernel.getattr(f)
        opens = sent_opens(v)
        fh = await kernel.open(f, os.O_RDONLY | os.O_APPEND)  # reads only: it opens
        assert (await kernel.read(f, fh, 5)).body == b"hello"
        assert opens == [b"/f"] and not v._ahead


async def test_a_file_longer_than_what_came_reads_the_rest(
    box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache, "START", 5)
    async with viewed(box) as (kernel, v):
        f = await kernel.node(b"/f")
        fh = await kernel.open(f)
        reads = sent_reads(v)
        assert (await kernel.read(f, fh, 5)).body == b"hello"
        assert reads == []
        assert (await kernel.read(f, fh, 100, 5)).body == b", view\n"
        assert [r.offset for r in reads] == [5]


async def test_a_change_drops_what_came_with_the_open(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        f = await kernel.node(b"/f")
        await kernel.getattr(f)
        fh = await kernel.open(f)
        assert v._ahead
        (box / "f").write_bytes(b"changed since the open\n")
        await notice_of(kernel, lambda n: f in inval_inodes(n))
        assert not v._ahead and v._ahead_held == 0
        assert (await kernel.read(f, fh, 100)).body == b"changed since the open\n"


async def test_what_comes_with_opens_is_bounded(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(view, "AHEAD_HELD", 12)  # one file's worth
    async with viewed(box) as (kernel, v):
        f = await kernel.node(b"/f")
        await kernel.getattr(f)
        first = await kernel.open(f)
        opens = sent_opens(v)
        reads = sent_reads(v)
        second = await kernel.open(f)
        assert opens == [b"/f"] and set(v._ahead) == {first}
        assert (await kernel.read(f, second, 100)).body == b"hello, view\n"
        assert len(reads) == 1


def _spy(v: View) -> list[Operation]:
    """The operations the view sends the slave from now on."""
    sent: list[Operation] = []
    submit = v.link.submit

    def spy(pairing: int, op: Operation, resume: Callable[[Reply | LinkClosed], None],
            *args: Any, **kwargs: Any) -> int:  # fmt: skip
        sent.append(op)
        return submit(pairing, op, resume, *args, **kwargs)

    v.link.submit = spy  # type: ignore[method-assign,assignment]
    return sent


def _without(v: View, feature: int) -> None:
    """As if the slave's HELLO had not had ``feature`` (an older slave)."""
    hello = v.link.conn.peer_hello
    assert hello is not None
    v.link.conn.peer_hello = hello._replace(features=hello.features & ~feature)


async def test_a_slave_without_open_read_is_sent_opens(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        _without(v, FEATURE_OPEN_READ)
        sent = _spy(v)
        f = await kernel.node(b"/f")
        fh = await kernel.open(f)
        assert (await kernel.read(f, fh, 5)).body == b"hello"
        assert [type(op) for op in sent if isinstance(op, (Open, OpenRead, Read))] == [Open, Read]


_CAPABILITY = fuse.GETXATTR_IN.pack(0, 0) + b"security.capability\0"


async def test_a_create_brings_the_new_files_attributes_and_xattrs(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        assert (await kernel.lookup(ROOT, b"new")).entry()[0] == 0  # none: watched
        sent = _spy(v)
        made = await kernel.ask(Opcode.CREATE, ROOT, fuse.CREATE_IN.pack(
            os.O_WRONLY | os.O_CREAT, 0o100640, 0, 0) + b"new\0")  # fmt: skip
        nodeid, _, _, attr = made.entry()
        assert stat.S_IMODE(attr[9]) == 0o640 and attr[0] == os.stat(box / "new").st_ino
        assert [type(op) for op in sent] == [Create]
        # What the kernel asks before the first write (file_remove_privs), and a stat:
        # answered by the view, watched.
        assert (await kernel.ask(Opcode.GETXATTR, nodeid, _CAPABILITY)).error == errno.ENODATA
        assert (await kernel.getattr(nodeid)).error == 0
        assert [type(op) for op in sent] == [Create]
        # Another process gives it an xattr: the view asks again.
        os.setxattr(box / "new", "security.capability", b"\1\0\0\2" + bytes(16))
        with trio.fail_after(5):
            while (await kernel.ask(Opcode.GETXATTR, nodeid, _CAPABILITY)).error == errno.ENODATA:
                await trio.sleep(0.01)
        assert Getxattr in {type(op) for op in sent}


async def _created_in_d(kernel: Kernel, v: View, name: bytes) -> tuple[int, int]:
    """Create d/NAME, d's listing known first; d's node and the new one."""
    d = await kernel.node(b"/d")
    assert {n for n, _, _ in await kernel.listing(d)} == {b".", b"..", b"a", b"b"}
    assert b"/d" in v.listings
    made = await kernel.ask(Opcode.CREATE, d, fuse.CREATE_IN.pack(
        os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o100600, 0, 0) + name + b"\0")  # fmt: skip
    return d, made.entry()[0]


async def test_a_create_alone_in_its_directory_adds_to_its_listing(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        await kernel.notices_until(0, timeout=0)
        before = len(kernel.notices)
        d, node = await _created_in_d(kernel, v, b"new")
        assert [n for _, _, n in v.listings[b"/d"]][-1] == b"new"
        sent = _spy(v)
        # Another name's absence, the new name, a listing: from what the view knows.
        assert (await kernel.lookup(d, b"none")).entry()[0] == 0
        assert (await kernel.lookup(d, b"new")).entry()[0] == node
        names = await kernel.listing(d)
        assert {n for n, _, _ in names} == {b".", b"..", b"a", b"b", b"new"}
        assert sent == []
        # The kernel was told nothing of our own create: it knows it.
        await kernel.notices_until(before + 1, timeout=0.2)
        assert node not in inval_inodes(kernel.notices[before:])
        assert (d, b"new") not in inval_entries(kernel.notices[before:])
        # The directory's times changed: its attributes are asked again.
        assert (await kernel.getattr(d)).attr()[1][6] >= 0
        assert [type(op) for op in sent] == [Stat]


async def test_a_create_after_another_change_in_its_directory_drops_its_listing(
    box: Path,
) -> None:
    async with viewed(box) as (kernel, v):
        await _created_in_d(kernel, v, b"new")
        hit = v.cache.lookup(b"/d/new", False, view.MASK)
        assert hit is not None
        raw, flags = hit[1], REPLY_WATCHED | REPLY_NOT_LINK
        # As if d/other had come from another process just before the create: what
        # came with it is invalidated, listing and all.
        for changed in ((b"/d/.", b"/d/new2", b"/d/other"), (b"/d/.", b"/d/new2", b"/d"),
                        (b"/d/.", b"/d/new2", b"/")):  # fmt: skip
            v._keep_listing(b"/d", [(1, 8, b"a")])
            v._created(b"/d/new2", raw, changed, flags)
            assert b"/d" not in v.listings, changed
        # No name came to /d (the file was there): the listing stands as it was.
        v._keep_listing(b"/d", [(1, 8, b"a")])
        v._created(b"/d/new2", raw, (b"/d/new2",), flags)
        assert v.listings[b"/d"] == [(1, 8, b"a")]
        # Not a watched answer; a name the listing has already; a name the view
        # knows a node by: the listing is not trusted to gain it.
        for name, flags_now, listing in ((b"new4", 0, [(1, 8, b"a")]),
                                         (b"new5", flags, [(1, 8, b"a"), (2, 8, b"new5")]),
                                         (b"new", flags, [(1, 8, b"a")])):  # fmt: skip
            v._keep_listing(b"/d", listing)
            v._created(b"/d/" + name, raw, (b"/d/.", b"/d/" + name), flags_now)
            assert b"/d" not in v.listings, name
        # Elsewhere: the listing stays, and gains the name.
        v._keep_listing(b"/d", [(1, 8, b"a")])
        v._created(b"/d/new3", raw, (b"/d/.", b"/d/new3", b"/f"), flags)
        assert [n for _, _, n in v.listings[b"/d"]] == [b"a", b"new3"]


async def test_a_stat_after_writes_needs_no_slave(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        f = await kernel.node(b"/d/a")
        fh = await kernel.open(f, os.O_WRONLY)
        sent = _spy(v)
        await kernel.ask(Opcode.WRITE, f, write_body(fh, 1, b"bcd"))
        got = await kernel.ask(Opcode.GETATTR, f, fuse.GETATTR_IN.pack(fuse.GETATTR_FH, 0, fh))
        assert got.attr()[1][1] == 4  # the size after the write
        assert [type(op) for op in sent] == [Write]  # its answer came after it


async def test_an_open_file_s_attributes_are_its_own_when_its_name_is_another_s(
    box: Path,
) -> None:
    async with viewed(box) as (kernel, v):
        f = await kernel.node(b"/f")
        fh = await kernel.open(f)
        ino = os.stat(box / "f").st_ino
        (box / "g").write_bytes(b"another file")
        os.rename(box / "g", box / "f")
        with trio.fail_after(5):
            while v.cache.lookup(b"/f", False, view.MASK) is not None:
                await trio.sleep(0.01)
        assert (await kernel.getattr(f)).attr()[1][0] != ino  # by name: the new file
        by_handle = fuse.GETATTR_IN.pack(fuse.GETATTR_FH, 0, fh)
        assert (await kernel.ask(Opcode.GETATTR, f, by_handle)).attr()[1][0] == ino


async def test_a_slave_without_create_is_sent_an_open_and_a_stat(box: Path) -> None:
    async with viewed(box) as (kernel, v):
        _without(v, FEATURE_CREATE)
        sent = _spy(v)
        made = await kernel.ask(Opcode.CREATE, ROOT, fuse.CREATE_IN.pack(
            os.O_WRONLY | os.O_CREAT, 0o100600, 0, 0) + b"old\0")  # fmt: skip
        assert stat.S_IMODE(made.entry()[3][9]) == 0o600 and (box / "old").exists()
        assert [type(op) for op in sent] == [Open, Stat]


def test_entry_sizes_match_readdirplus_budget() -> None:
    # Each direntplus record is an entry and a padded dirent: the budget must count both.
    record = fuse.direntplus(fuse.entry_out(1, 0, 0, fuse.synthetic_attr(1, 0o100644)),
                             1, 1, 8, b"abc")  # fmt: skip
    assert len(record) == ENTRY_SIZE + 32
    assert struct.calcsize("<QQII") == fuse.DIRENT.size


# --- end to end: real programs in a real mount -----------------------------------------------

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0,
    reason="--view needs /dev/fuse and root (as for users: docs/usage.md)",
)


@needs_fuse
async def test_programs_run_on_slave_files_in_the_view(session: Session) -> None:
    (session.box / "in.txt").write_bytes(b"one\ntwo\n")
    got = await session.run("/bin/sh", "-c",
                            "cat /in.txt; echo three >> /in.txt; mkdir /made; ls /;"
                            " echo x > /made/y; mv /made/y /made/z; ls -l /made | wc -l;"
                            " exit 7", extra=["--view"])  # fmt: skip
    assert got.status == 7, got.err
    lines = got.out.splitlines()
    assert lines[:2] == ["one", "two"]
    # The slave's names, and the master's mount points the slave lacks.
    assert {"in.txt", "made", "usr", "proc"} <= set(lines)
    assert lines[-1] == "2"
    assert (session.box / "in.txt").read_bytes() == b"one\ntwo\nthree\n"
    assert (session.box / "made" / "z").read_bytes() == b"x\n"
    session.master_untouched()


@needs_fuse
@pytest.mark.parametrize("writer", ["root", "nobody"])
async def test_a_write_clears_the_setuid_bit_as_the_slave_would(session: Session,
                                                               writer: str) -> None:  # fmt: skip
    # A root slave without --allow-setuid writes without CAP_FSETID: its kernel clears
    # the bits at every write, whoever the program is (docs/usage.md, "What a slave
    # refuses"); a second write, once the view knows the bits are gone, still works.
    session.box.chmod(0o755)
    (session.box / "s").write_text("a\n")
    (session.box / "s").chmod(0o6777)
    who = (
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if writer != "root" else []
    )
    got = await session.run(*who, "/bin/sh", "-c", "echo b >> /s; stat -c %a /s; echo c >> /s",
                            extra=["--view"])  # fmt: skip
    assert (got.status, got.out) == (0, "777\n"), got.err
    assert (session.box / "s").read_text() == "a\nb\nc\n"
    assert (session.box / "s").stat().st_mode & 0o7777 == 0o777


@needs_fuse
@pytest.mark.parametrize("mode", [[], ["--view"]], ids=["trapped", "view"])
async def test_a_write_drops_a_files_capability_as_natively(session: Session,
                                                            mode: list[str]) -> None:  # fmt: skip
    # The view's kernel asks the slave to remove security.capability before the
    # write; a root slave without --allow-setuid may not (no CAP_SETFCAP): it failed
    # the write with EPERM.
    (session.box / "c").write_text("a\n")
    cap = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)  # v2, effective, CAP_NET_RAW
    os.setxattr(session.box / "c", "security.capability", cap)
    got = await session.run("/bin/sh", "-c", "echo b >> /c", extra=mode)
    assert got.status == 0, got.err
    assert (session.box / "c").read_text() == "a\nb\n"
    with pytest.raises(OSError) as absent:
        os.getxattr(session.box / "c", "security.capability")
    assert absent.value.errno == errno.ENODATA


@needs_fuse
async def test_a_slave_program_runs_in_the_view(session: Session) -> None:
    # The kernel opens what it executes with __FMODE_EXEC among the open flags, which
    # the slave's openat2 refuses: the view must not pass it on (it did: EINVAL).
    shutil.copy("/bin/echo", session.box / "tool")
    got = await session.run("/bin/sh", "-c", "/tool from the slave", extra=["--view"])
    assert (got.status, got.out) == (0, "from the slave\n"), got.err
    session.master_untouched()


@needs_fuse
@pytest.mark.parametrize("mode", [[], ["--view"]], ids=["trapped", "view"])
async def test_the_program_gets_the_default_signal_dispositions(
    session: Session, mode: list[str]
) -> None:
    # fsys-master ignores SIGINT and SIGQUIT (the terminal sends them to the program
    # too); the view's program inherited that, so Ctrl-C did not end it.
    got = await session.run("/bin/sh", "-c", "grep -E '^Sig(Ign|Blk)' /proc/self/status",
                            extra=mode)  # fmt: skip
    assert (got.status, got.out) == (0, "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n")


@needs_fuse
async def test_the_view_sees_another_processs_change(session: Session) -> None:
    (session.box / "v").write_bytes(b"1")
    # The program reads, waits for the file to change on the slave (from this test),
    # and must see the new content and size without re-opening anything stale.
    script = ("cat /v; echo; while [ \"$(cat /v)\" = 1 ]; do sleep 0.05; done; cat /v;"
              " echo; stat -c %s /v")  # fmt: skip
    async with trio.open_nursery() as nursery:
        result: list[Result] = []

        async def run() -> None:
            result.append(await session.run("/bin/sh", "-c", script, extra=["--view"]))

        nursery.start_soon(run)
        await trio.sleep(2)
        (session.box / "v").write_bytes(b"22")
    (got,) = result
    assert got.status == 0, got.err
    assert got.out.split() == ["1", "22", "2"]


@needs_fuse
async def test_a_directory_made_and_entered_stays_the_cwd(session: Session) -> None:
    # An INVALIDATE of the name of the shell's cwd (mkdir's own, or chmod's, which
    # may arrive after the shell is in it): the name's dentry is expired, not dropped,
    # so getcwd still finds the way (git needs it).
    cwd = "python3 -c 'import os; print(os.getcwd())'"
    got = await session.run("/bin/sh", "-c",
                            f"mkdir /d && cd /d && sleep 0.3 && {cwd} && chmod 700 /d"
                            f" && sleep 0.3 && touch x && {cwd}",
                            extra=["--view"])  # fmt: skip
    assert got.status == 0, got.err
    assert got.out.split() == ["/d", "/d"]
    assert (session.box / "d" / "x").exists()


@needs_fuse
async def test_git_runs_on_slave_files_in_the_view(session: Session) -> None:
    got = await session.run("/bin/sh", "-c",
                            "cd /r 2>/dev/null || mkdir /r && cd /r && git init -q ."
                            " && echo hi > a && git add a"
                            " && git -c user.name=t -c user.email=t@t commit -qm m"
                            " && git status --porcelain && git log --format=%s",
                            extra=["--view"])  # fmt: skip
    assert got.status == 0, got.err
    assert got.out.split() == ["m"]
    assert (session.box / "r" / ".git" / "HEAD").exists()
    session.master_untouched()


@needs_fuse
async def test_the_view_refuses_what_it_cannot_do(session: Session) -> None:
    got = await session.run("true", extra=["--view", "--trace"])
    assert got.status == 2 and "--view" in got.err and "Traceback" not in got.err
    got = await session.run("true", extra=["--view", "--local", "/"])
    assert got.status != 0 and "no --local /" in got.err and "Traceback" not in got.err


@needs_fuse
async def test_without_dev_fuse_the_view_says_so(session: Session) -> None:
    # fsys-master in a mount namespace whose /dev has no fuse device.
    master = ["unshare", "-m", "sh", "-c",
              'mount -t tmpfs none /dev && exec "$@"', "sh", PYTHON, "-m", "fsys.master",
              "run", "--view", "--slave", session.slave, "--", "true"]  # fmt: skip
    with trio.fail_after(60):
        got = await trio.run_process(master, capture_stdout=True, capture_stderr=True,
                                     check=False, cwd=session.master_dir)  # fmt: skip
    assert got.returncode == SESSION_FAILED
    assert got.stderr.decode().strip().splitlines() == [
        "fsys-master: --view needs /dev/fuse: No such file or directory"]  # fmt: skip
