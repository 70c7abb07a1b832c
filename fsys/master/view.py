"""The view: the slave's files as a FUSE file system in the program's mount namespace.

Theory of operation. With ``fsys-master run --view``, the program's kernel carries
its file calls itself: the launcher gives the program a mount namespace of its own
whose root is this FUSE file system (the slave's files, through the session link),
with the master's side of the path policy bind-mounted over it (/usr, /proc, the
program's install prefix...). The program then opens, reads, stats and maps slave
files with no trap at all, and the kernel keeps what it learned: names, attributes,
symlink targets and file pages. fmhub serves /dev/fuse here, turning each request
into the same CALLs the trap path sends.

The kernel's caches stay exact the way fmhub's attribute cache does
(``fsys.master.cache``): a name or attributes are kept only when the slave's reply
was REPLY_WATCHED, and for as long as no INVALIDATE names them; each INVALIDATE
becomes FUSE notices (INVAL_ENTRY for the name, INVAL_INODE for the attributes
and pages). A name is expired, not dropped (FUSE_EXPIRE_ONLY): the kernel asks
again at the next walk through it and keeps the dentry if the answer is the same
node, so a process whose cwd it is can still getcwd. Anything unwatched is kept
for no time at all. A file opened while its answer is watched keeps its pages
(FOPEN_KEEP_CACHE), since a change would have dropped them. Notices are written
from a thread of their own: the kernel may hold a lock that a notice needs while it
waits for an answer from us.

Nodes are paths: a node is what the slave's path named when it was looked up, by
its inode number and type. A later lookup that finds another file there gives a
new node; one found gone leaves the old node without a path (ESTALE), as an open
file on the slave keeps working through its handle. The master's mount points and
the directories on the way to them are *pinned*: their names never expire and are
never invalidated (a notice would detach the mount), and where the slave has
nothing suitable the view makes an empty directory or file to mount on.
"""

from __future__ import annotations

import errno
import functools
import os
import queue
import select
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass, field

import trio

from fsys import linux
from fsys.errors import LinkClosed
from fsys.master import fuse
from fsys.master.cache import AttrCache, start_size
from fsys.master.fuse import Opcode
from fsys.master.launcher import Mount
from fsys.master.link import SlaveLink, poll_spinning
from fsys.master.policy import Policy, Side
from fsys.pathdict import PathDict
from fsys.protocol import (
    FEATURE_CREATE,
    FEATURE_OPEN_READ,
    OPEN_READ_REFUSES,
    REPLY_NO_XATTRS,
    REPLY_WATCHED,
    Access,
    Attrs,
    Chmod,
    Chown,
    Close,
    CopyRange,
    Create,
    Fallocate,
    Fsync,
    Ftruncate,
    Getdents,
    Getxattr,
    Link,
    Listdir,
    Listxattr,
    Lseek,
    Mkdir,
    Mknod,
    Open,
    OpenRead,
    Operation,
    Read,
    Readlink,
    Removexattr,
    Rename,
    Reply,
    Setxattr,
    Stat,
    Statfs,
    Symlink,
    Truncate,
    Unlink,
    Utimens,
    Write,
    decode_paths,
    watch_key,
)

#: How long the kernel keeps a watched name or attributes (an INVALIDATE ends it
#: sooner): a day. Unwatched answers are kept for no time.
WATCHED: float = 86400.0
MASK = linux.STATX_BASIC_STATS
MAX_WRITE = 1 << 20
#: The largest request: a WRITE of MAX_WRITE bytes and its headers.
BUFFER = MAX_WRITE + 4096
READDIR_CHUNK = 64 << 10
HOT_QUIET_MS = 2
HOT_SLICE = 0.010
#: How long the view spins for a reply while a request waits for the slave (µs).
SPIN_US = 300
#: How long it spins for the program's next request after an answer (µs).
IDLE_SPIN_US = 50
PAIRING = 0
_DT = {stat.S_IFDIR: 4, stat.S_IFREG: 8, stat.S_IFLNK: 10, stat.S_IFIFO: 1,
       stat.S_IFSOCK: 12, stat.S_IFCHR: 2, stat.S_IFBLK: 6}  # fmt: skip


class Refused(Exception):
    """A request answered with an errno."""

    def __init__(self, errno_: int) -> None:
        super().__init__(errno_)
        self.errno = errno_


@dataclass(eq=False)
class Node:
    nodeid: int
    path: bytes | None  # None: what it named is gone
    ino: int
    kind: int  # S_IFMT bits
    lookups: int = 0
    #: Made by the view (a mount point, or a master symlink): its fuse_attr fields.
    synthetic: tuple[int, ...] | None = None
    target: bytes = b""  # a synthetic symlink's
    pinned: bool = False


@dataclass(eq=False)
class DirHandle:
    path: bytes
    entries: list[tuple[int, int, bytes]] | None = None  # (ino, DT_*, name)
    watched: bool = False  # the listing holds until an INVALIDATE says otherwise
    handle: int = 0  # a slave handle, for a directory too large for one LISTDIR
    served: bool = False  # something was read from it (offset 0 again: rewound)


@dataclass(frozen=True)
class MasterPoint:
    """A path the master's side of the policy covers in the view."""

    path: bytes
    kind: int  # S_IFDIR / S_IFREG: a bind mount over it; S_IFLNK: presented; 0: absent
    target: bytes = b""


@dataclass
class Points:
    """The view's fixed shape: the master's points and the directories on the way."""

    master: dict[bytes, MasterPoint] = field(default_factory=dict)
    ways: set[bytes] = field(default_factory=set)  # ancestors of master points, not "/"
    #: What a directory's listing shows of them: {parent: {name: DT_* type, 0 for none}}.
    names: dict[bytes, dict[bytes, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, paths: Iterable[bytes]) -> Points:
        """The points for master-side prefixes ``paths``, as the master has them."""
        points = cls()
        for path in paths:
            try:
                st = os.lstat(path)
            except OSError:
                points.master[path] = MasterPoint(path, 0)
                continue
            if stat.S_ISLNK(st.st_mode):
                points.master[path] = MasterPoint(path, stat.S_IFLNK, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                points.master[path] = MasterPoint(path, stat.S_IFDIR)
            else:
                points.master[path] = MasterPoint(path, stat.S_IFREG)
        for path, point in points.master.items():
            if not point.kind:
                continue
            head = path
            while True:
                head = head[: head.rfind(b"/")]
                if not head:
                    break
                points.ways.add(head)
        for path, point in points.master.items():
            points._name(path, _DT.get(point.kind, 0))
        for path in points.ways:
            points._name(path, _DT[stat.S_IFDIR])
        return points

    def _name(self, path: bytes, kind: int) -> None:
        cut = path.rfind(b"/")
        self.names.setdefault(path[:cut] or b"/", {})[path[cut + 1 :]] = kind

    def listed(self, path: bytes, entries: list[tuple[int, int, bytes]]) -> None:
        """Directory ``path``'s listing as the view shows it: with the master's points
        and the ways to them, of the master's type, and without the points where the
        master has nothing (in place)."""
        names = self.names.get(path)
        if not names:
            return
        kept = [(ino, names.get(name, kind), name) for ino, kind, name in entries
                if names.get(name, -1)]  # fmt: skip
        have = {name for _, _, name in kept}
        kept += [(1, kind, name) for name, kind in sorted(names.items())
                 if kind and name not in have]  # fmt: skip
        entries[:] = kept

    def mounts(self) -> list[MasterPoint]:
        """The bind mounts to make, outermost first (none below a master symlink)."""
        found = [p for p in self.master.values() if p.kind in (stat.S_IFDIR, stat.S_IFREG)]
        return sorted(found, key=lambda p: p.path.count(b"/"))


class Notifier:
    """Writes FUSE notices from a thread of its own, in order."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.sent = 0

    def send(self, notices: list[bytes]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fsys-notices", daemon=True)
            self._thread.start()
        for n in notices:
            self._queue.put(n)

    def _run(self) -> None:
        get = self._queue.get
        while (data := get()) is not None:
            # The notices queued meanwhile, each once (in the order of its first
            # sending): a file written in a loop is invalidated once per pass here.
            batch = {data: None}
            while not self._queue.empty():
                more = get()
                if more is None:
                    self._write_all(batch)
                    return
                batch[more] = None
            self._write_all(batch)

    def _write_all(self, batch: dict[bytes, None]) -> None:
        for data in batch:
            try:
                os.write(self.fd, data)
                self.sent += 1
            except OSError:
                pass  # ENOENT: the kernel has nothing cached for it; ENODEV: unmounted

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None


#: Write-behind: contiguous writes to one handle are sent as one of up to WRITE_BATCH
#: bytes, with at most WRITES_IN_FLIGHT of these on their way to the slave at once.
WRITE_BATCH = MAX_WRITE
#: At most this many paths' extended attributes known absent (then forgotten).
XATTRS_KEPT = 65536
#: At most this many directory listings kept, and directories read ahead at once.
LISTINGS_KEPT = 8192
READ_AHEAD = 16
#: A directory whose size (its st_size) is at most this is listed ahead at a lookup.
LIST_AHEAD_SIZE = 64 << 10
WRITES_IN_FLIGHT = 8
_SYNC_FLAGS = os.O_DSYNC | os.O_DIRECT  # (O_SYNC includes O_DSYNC's bit)
#: Flags of FUSE_OPEN not sent to the slave: what the kernel did itself (O_CREAT...),
#: and its mark on a file it executes (__FMODE_EXEC: no open flag, openat2 refuses it).
_NOT_SENT = linux.O_CREAT | linux.O_EXCL | linux.O_NOCTTY | 0x20  # 0x20: __FMODE_EXEC
#: Read-only handles of watched files kept open on the slave once the kernel released
#: them, for the next open of the same file with the same flags (``View.open_now``);
#: the slave holds up to 16,384 handles (confinement.MAX_HANDLES), and one that runs
#: out of descriptors gets these back before an open fails (``View.call``).
IDLE_HANDLES = 8192
#: How much of all files' starts (OPEN_READ, ``start_size``) the view holds at once.
AHEAD_HELD = 16 << 20
#: Open flags whose handle may be kept idle and given to a later open: reading only.
_KEEPABLE = os.O_ACCMODE | os.O_TRUNC | linux.O_PATH | _SYNC_FLAGS
_XATTR_READS = frozenset({Opcode.GETXATTR, Opcode.LISTXATTR})


class WriteBehind:
    """The program's writes, answered at once and sent to the slave behind them.

    A held write is sent when the next one does not continue it, when WRITE_BATCH
    bytes are held, or when the program pauses (the view's loop finds nothing to
    do). Every other request waits, in order, until each write held or sent has been
    answered, so that it finds the file as the program wrote it: a stat, a read,
    a rename, a fsync. A write the slave refuses is reported at the handle's next
    WRITE, FSYNC or FLUSH (its close), as NFS does: never lost.
    """

    def __init__(self, link: SlaveLink, dispatch: Callable[[int, int, int, bytes], None]) -> None:
        self.link = link
        self.dispatch = dispatch
        self.held: tuple[int, int, bytearray] | None = None  # handle, offset, data
        self.in_flight = 0
        self.deferred: deque[tuple[int, int, int, bytes]] = deque()
        self.errors: dict[int, int] = {}  # handle -> the errno its next call reports

    def waits(self, opcode: int) -> bool:
        """Whether a request must wait for the writes (those before it stay first)."""
        if self.deferred:
            return True
        if opcode == Opcode.WRITE:
            return self.in_flight >= WRITES_IN_FLIGHT
        return self.in_flight > 0 or self.held is not None

    def defer(self, opcode: int, unique: int, nodeid: int, body: bytes) -> None:
        self.deferred.append((opcode, unique, nodeid, body))
        self.send()

    def hold(self, handle: int, offset: int, data: memoryview) -> None:
        held = self.held
        if (held is not None and held[0] == handle and held[1] + len(held[2]) == offset
                and len(held[2]) + len(data) <= WRITE_BATCH):  # fmt: skip
            held[2].extend(data)
        else:
            self.send()
            held = self.held = (handle, offset, bytearray(data))
        if len(held[2]) >= WRITE_BATCH:
            self.send()

    def send(self) -> None:
        """Send what is held."""
        if self.held is not None:
            handle, offset, data = self.held
            self.held = None
            self._submit(handle, offset, bytes(data))

    def _submit(self, handle: int, offset: int, data: bytes) -> None:
        self.in_flight += 1
        self.link.submit(PAIRING, Write(handle=handle, offset=offset, rwf=0, data=data),
                         lambda reply: self._sent(handle, offset, data, reply))  # fmt: skip

    def _sent(self, handle: int, offset: int, data: bytes, reply: Reply | LinkClosed) -> None:
        self.in_flight -= 1
        if isinstance(reply, LinkClosed):
            self.errors.setdefault(handle, errno.EIO)
        elif reply.result < 0:
            self.errors.setdefault(handle, -reply.result)
        elif reply.result == 0 and data:
            self.errors.setdefault(handle, errno.EIO)
        elif reply.result < len(data):  # short (a full disk?): the rest says why
            self._submit(handle, offset + reply.result, data[reply.result :])
        self._resume()

    def _resume(self) -> None:
        """Start the requests that waited, in order, as far as the writes allow."""
        while self.deferred:
            opcode = self.deferred[0][0]
            if opcode == Opcode.WRITE:
                if self.in_flight >= WRITES_IN_FLIGHT:
                    return
            elif self.in_flight or self.held is not None:
                self.send()
                return
            self.dispatch(*self.deferred.popleft())

    def error(self, handle: int) -> None:
        """Refused with the errno of a write of ``handle`` that failed, if one did."""
        failed = self.errors.pop(handle, 0)
        if failed:
            raise Refused(failed)

    @property
    def idle(self) -> bool:
        return not self.in_flight and self.held is None and not self.deferred


class _Ask:
    """What a handler awaits: the slave's reply to ``op`` (``View._step`` sends it)."""

    __slots__ = ("op",)

    def __init__(self, op: Operation) -> None:
        self.op = op

    def __await__(self) -> Generator[_Ask, Reply, Reply]:
        reply = yield self
        return reply


class _Join(_Ask):
    """What a handler awaits: the reply to the LISTDIR of ``path`` read ahead."""

    __slots__ = ("path",)

    def __init__(self, path: bytes) -> None:
        self.path = path


Handler = Callable[[int, Node, memoryview], Coroutine[_Ask, Reply, bytes]]
#: An answer from what the view knows, or None: the slave is needed.
Fast = Callable[[Node, memoryview], bytes | None]


class View:
    """Serves one FUSE connection (``fd``: /dev/fuse) from the slave through ``link``."""

    def __init__(
        self,
        fd: int,
        link: SlaveLink,
        points: Points,
        cache: AttrCache | None = None,
        *,
        spin_us: float = SPIN_US,
    ) -> None:
        self.fd = fd
        self.spin = spin_us / 1e6
        self.idle_spin = float(os.environ.get("FSYS_VIEW_IDLE_SPIN_US", IDLE_SPIN_US)) / 1e6
        self._buf = bytearray(BUFFER)
        self._view = memoryview(self._buf)
        self.link = link
        self.points = points
        self.cache = cache if cache is not None else AttrCache()
        root = Node(fuse.ROOT_ID, b"/", 1, stat.S_IFDIR, lookups=1, pinned=True)
        self.nodes: dict[int, Node] = {fuse.ROOT_ID: root}
        self.by_path: PathDict[Node] = PathDict()
        self.by_path[b"/"] = root
        self._next_node = fuse.ROOT_ID + 1
        self.dirs: dict[int, DirHandle] = {}
        #: Extended attributes known absent, by watched path: the names, or None for
        #: all of them. Only an INVALIDATE of the path (not of its content) drops them:
        #: the kernel asks for security.capability at the first write(2) of a file.
        self.xattrs_absent: PathDict[set[bytes] | None] = PathDict()
        #: Watched listings by directory path (LISTDIR replies marked REPLY_WATCHED).
        self.listings: PathDict[list[tuple[int, int, bytes]]] = PathDict()
        self._next_dir = 1
        #: Directories being read ahead (LISTDIR sent): the requests waiting for each.
        self._prefetching: dict[bytes, list[Callable[[Reply | LinkClosed], None]]] = {}
        #: Directories the program has opened (a child opened next: it walks a tree).
        self._opened: set[bytes] = set()
        #: Whether to read directories ahead (their listings are kept: the slave watches).
        self.read_ahead = True
        #: The names of each listing (kept with the listing they were made from).
        self._names: PathDict[tuple[list[tuple[int, int, bytes]], set[bytes]]] = PathDict()
        self.notifier = Notifier(fd)
        #: Names are expired rather than dropped (the kernel's FUSE is 7.38 or newer).
        self.expire = False
        #: opcode -> how many (FSYS_VIEW_STATS only: not a cost of every request).
        self.requests: dict[int, int] | None = {} if os.environ.get("FSYS_VIEW_STATS") else None
        #: The slave's operations the view waited for, by name; the seconds from each
        #: request to its answer, by opcode (FSYS_VIEW_STATS only).
        self.asked: dict[str, int] = {}
        self.spent: dict[int, float] = {}
        self._began: dict[int, tuple[int, float]] = {}
        self._behind = WriteBehind(link, self._request)
        #: Handles whose writes must reach the slave before they return (O_SYNC...).
        self._sync_handles: set[int] = set()
        #: Read-only handles open for the kernel, by handle: (nodeid, flags); and those
        #: it released, kept open on the slave while their file is watched, by node
        #: and flags (``open_now``: an open of a file read again costs no round trip),
        #: and by handle.
        self._readers: dict[int, tuple[int, int]] = {}
        self._idle: dict[int, dict[int, list[int]]] = {}
        self._idle_handles: dict[int, tuple[int, int]] = {}
        #: What came with a reader's open (OPEN_READ): its data, and whether that is
        #: the whole file; dropped at its release, or once the file changes.
        self._ahead: dict[int, tuple[bytes, bool]] = {}
        self._ahead_held = 0
        self.failure: str | None = None
        link.on_invalidate = self.invalidate
        link.on_attrs = self._attrs
        self._handlers: dict[int, Handler] = {
            Opcode.LOOKUP: self.lookup, Opcode.GETATTR: self.getattr,
            Opcode.SETATTR: self.setattr, Opcode.READLINK: self.readlink,
            Opcode.SYMLINK: self.symlink, Opcode.MKNOD: self.mknod, Opcode.MKDIR: self.mkdir,
            Opcode.UNLINK: self.unlink, Opcode.RMDIR: self.rmdir, Opcode.RENAME: self.rename,
            Opcode.RENAME2: self.rename2, Opcode.LINK: self.hardlink, Opcode.OPEN: self.open,
            Opcode.READ: self.read, Opcode.WRITE: self.write, Opcode.STATFS: self.statfs,
            Opcode.RELEASE: self.release, Opcode.FSYNC: self.fsync, Opcode.FLUSH: self.flush,
            Opcode.SETXATTR: self.setxattr, Opcode.GETXATTR: self.getxattr,
            Opcode.LISTXATTR: self.listxattr, Opcode.REMOVEXATTR: self.removexattr,
            Opcode.OPENDIR: self.opendir, Opcode.READDIR: self.readdir,
            Opcode.READDIRPLUS: self.readdirplus, Opcode.RELEASEDIR: self.releasedir,
            Opcode.FSYNCDIR: self.fsyncdir, Opcode.ACCESS: self.access,
            Opcode.CREATE: self.create, Opcode.FALLOCATE: self.fallocate,
            Opcode.LSEEK: self.lseek, Opcode.COPY_FILE_RANGE: self.copy_file_range,
            Opcode.DESTROY: self.destroy,
        }  # fmt: skip
        self._fast: dict[int, Fast] = {
            Opcode.LOOKUP: self.lookup_now, Opcode.GETATTR: self.getattr_now,
            Opcode.GETXATTR: self.getxattr_now, Opcode.LISTXATTR: self.listxattr_now,
            Opcode.READDIRPLUS: self.readdirplus_now, Opcode.READDIR: self.readdir_now,
            Opcode.RELEASE: self.release_now, Opcode.RELEASEDIR: self.releasedir_now,
            Opcode.FLUSH: self.flush_now, Opcode.OPENDIR: self.opendir_now,
            Opcode.OPEN: self.open_now, Opcode.READ: self.read_now,
        }  # fmt: skip

    # --- serving ------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer requests until the connection ends (the mount is gone).

        As fmhub does for trapped calls (``Hub._hot``), the view serves in a hot loop
        of its own while requests keep coming: it waits for /dev/fuse and the link
        with poll(2), and spins briefly while a request waits for the slave, since
        going through trio's run loop for each wake-up costs more than the request.
        A request that needs the slave is a coroutine resumed by its reply's
        continuation (``_Ask``): no task per request.
        """
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        link_fd = self.link.transport.read_fd
        poller.register(link_fd, select.POLLIN)
        task_status.started()
        while self._receive():
            if not self._hot(poller, link_fd):
                break
            await trio.lowlevel.wait_readable(self.fd)

    def _receive(self) -> bool:
        """Answer every request queued now; False once the connection has ended."""
        buf, view = self._buf, self._view
        while True:
            try:
                n = os.readv(self.fd, [buf])
            except BlockingIOError:
                return True
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # a request interrupted before we read it
                    continue
                return False  # ENODEV: unmounted, or the connection aborted
            if n < fuse.IN_HEADER.size:
                return False
            length, opcode, unique, nodeid, *_ = fuse.IN_HEADER.unpack_from(buf)
            if self.requests is not None:
                self.requests[opcode] = self.requests.get(opcode, 0) + 1
                if opcode not in fuse.NO_REPLY:
                    self._began[unique] = (opcode, time.perf_counter())
            body = bytes(view[fuse.IN_HEADER.size : min(length, n)])
            if opcode in fuse.NO_REPLY:
                self._forget(opcode, nodeid, body)
            elif opcode == Opcode.INIT:
                self._write(fuse.reply(unique, self._init(body)))
            elif self._behind.waits(opcode):
                # Writes change no extended attribute (the slave's kernel drops a
                # file's capability itself): what the view knows of them is answered.
                if opcode not in _XATTR_READS or self._behind.deferred or not self._answer_now(
                        self._fast[opcode], unique, nodeid, body):  # fmt: skip
                    self._behind.defer(opcode, unique, nodeid, body)
            else:
                self._request(opcode, unique, nodeid, body)

    def _request(self, opcode: int, unique: int, nodeid: int, body: bytes) -> None:
        if opcode == Opcode.WRITE and self._write_behind(unique, body):
            return
        fast = self._fast.get(opcode)
        if fast is None or not self._answer_now(fast, unique, nodeid, body):
            self._answer(opcode, unique, nodeid, body)

    def _hot(self, poller: select.poll, link_fd: int) -> bool:
        """Serve requests and replies directly while they keep coming; back to trio
        after HOT_QUIET_MS of quiet or HOT_SLICE at most. False: the connection ended."""
        deadline = time.monotonic() + HOT_SLICE
        while True:
            # For a reply while a request waits for the slave; for the next request
            # else (a program that makes one call after another sends it at once).
            # (Not for directories read ahead: nobody waits for those.)
            asked = self.link.outstanding > len(self._prefetching)
            spin = self.spin if asked else self.idle_spin
            events = poll_spinning(poller, spin, 0)
            if not events:
                self._behind.send()  # a pause: the writes held go out now
                events = poller.poll(HOT_QUIET_MS)
                if not events:
                    return True
            for fd, mask in events:
                if fd == link_fd:
                    self.link.pump()
                    if not self.link.alive:
                        poller.unregister(link_fd)
                elif not self._receive() or mask & (select.POLLERR | select.POLLHUP):
                    return False
            if time.monotonic() > deadline or self.link.transport.backlog:
                return True

    def _write_behind(self, unique: int, body: bytes) -> bool:
        """Hold a WRITE and answer it (False: it must be written before it returns)."""
        try:
            fh, offset, size, *_ = fuse.WRITE_IN.unpack_from(body)
            if len(body) < fuse.WRITE_IN.size + size:
                raise ValueError("short")
        except (ValueError, struct.error):
            self._write(fuse.reply(unique, error=errno.EINVAL))
            return True
        if fh in self._sync_handles:
            self._behind.send()
            return False
        try:
            self._behind.error(fh)
        except Refused as exc:
            self._write(fuse.reply(unique, error=exc.errno))
            return True
        self._behind.hold(
            fh, offset, memoryview(body)[fuse.WRITE_IN.size : fuse.WRITE_IN.size + size]
        )
        self._write(fuse.reply(unique, fuse.WRITE_OUT.pack(size, 0)))
        return True

    async def settle(self) -> None:
        """Once every write held has been answered by the slave (the session's end)."""
        self._behind.send()
        with trio.move_on_after(30):
            while not self._behind.idle and self.link.alive:
                await trio.sleep(0.001)

    def _answer_now(self, fast: Fast, unique: int, nodeid: int, body: bytes) -> bool:
        """Answer without the slave if ``fast`` can (from what the view knows)."""
        node = self.nodes.get(nodeid)
        if node is None:
            return False
        try:
            out = fast(node, memoryview(body))
        except Refused as exc:
            self._write(fuse.reply(unique, error=exc.errno))
            return True
        except (ValueError, IndexError, KeyError, struct.error):
            self._write(fuse.reply(unique, error=errno.EINVAL))
            return True
        if out is None:
            return False
        self._write(fuse.reply(unique, out))
        return True

    def _write(self, data: bytes) -> None:
        if self.requests is not None:
            began = self._began.pop(fuse.OUT_HEADER.unpack_from(data)[2], None)
            if began is not None:
                spent = self.spent.get(began[0], 0.0)
                self.spent[began[0]] = spent + time.perf_counter() - began[1]
        try:
            os.write(self.fd, data)
        except OSError:
            pass  # ENOENT: the caller was interrupted and gave up; ENODEV: unmounted

    def _init(self, body: bytes) -> bytes:
        major, minor, max_readahead, flags = fuse.INIT_IN.unpack_from(body)
        if major != fuse.MAJOR or minor < 31:
            self.failure = f"the kernel's FUSE protocol {major}.{minor} is too old (7.31 or newer)"
        self.expire = minor >= 38
        return fuse.init_out(minor, flags, max_readahead, MAX_WRITE)

    def _answer(self, opcode: int, unique: int, nodeid: int, body: bytes) -> None:
        """Start the handler of a request; its coroutine runs until it asks the slave,
        and goes on from the reply's continuation (``_step``)."""
        handler = self._handlers.get(opcode)
        if handler is None:
            self._write(fuse.reply(unique, error=errno.ENOSYS))
            return
        node = self.nodes.get(nodeid)
        if node is None:
            self._write(fuse.reply(unique, error=errno.ESTALE))
            return
        self._step(handler(unique, node, memoryview(body)), unique, None)

    def _step(self, coro: Coroutine[_Ask, Reply, bytes], unique: int,
              outcome: Reply | LinkClosed | None) -> None:  # fmt: skip
        try:
            if isinstance(outcome, LinkClosed):
                ask = coro.throw(outcome)
            else:
                ask = coro.send(outcome)  # type: ignore[arg-type]
        except StopIteration as done:
            self._write(fuse.reply(unique, done.value))
        except Refused as exc:
            self._write(fuse.reply(unique, error=exc.errno))
        except LinkClosed:
            self._write(fuse.reply(unique, error=errno.EIO))
        except (ValueError, IndexError, KeyError, struct.error):  # a body shorter than its opcode's
            self._write(fuse.reply(unique, error=errno.EINVAL))
        else:

            def resume(reply: Reply | LinkClosed) -> None:
                self._step(coro, unique, reply)

            if isinstance(ask, _Join):
                self._prefetching[ask.path].append(resume)
            else:
                if self.requests is not None:
                    name = type(ask.op).__name__
                    self.asked[name] = self.asked.get(name, 0) + 1
                self.link.submit(PAIRING, ask.op, resume)

    def close(self) -> None:
        self.notifier.close()

    # --- the slave -----------------------------------------------------------------

    async def call(self, op: Operation) -> Reply:
        """``op`` on the slave; Refused with its errno if it failed."""
        reply = await _Ask(op)
        if reply.result in (-errno.EMFILE, -errno.ENFILE) and self._idle_handles:
            # The slave is out of descriptors: the idle handles give theirs back first
            # (the CLOSEs go before the open again, in order on the link).
            for fh in list(self._idle_handles):
                self._close_idle(fh)
            reply = await _Ask(op)
        if reply.result < 0:
            raise Refused(-reply.result)
        return reply

    async def attributes(self, path: bytes) -> tuple[int, bytes, bool]:
        """(0 or -errno, struct statx, watched) of ``path`` not following a symlink."""
        key = watch_key(path)
        if key is not None:
            hit = self.cache.lookup(key, False, MASK)
            if hit is not None:
                return hit[0], hit[1], True
        reply = await _Ask(Stat(dir=0, flags=linux.AT_SYMLINK_NOFOLLOW, mask=MASK, path=path))
        return reply.result, reply.blob, self._answered(path, reply.result, reply.blob, reply.flags)

    def _answered(self, path: bytes, result: int, raw: bytes, flags: int) -> bool:
        """Keep the slave's answer about ``path`` (a STAT's, or what came with a
        CREATE) if it is watched; whether it is."""
        key = watch_key(path)
        watched = bool(flags & REPLY_WATCHED) and key is not None
        if watched:
            assert key is not None
            self.cache.store(key, False, MASK, result, raw, flags)
            self._watching(key, flags)
        return watched

    def _created(self, path: bytes, raw: bytes, changed: tuple[bytes, ...], flags: int) -> bool:
        """A create of ours at ``path`` (``raw``: its struct statx), and what changed
        on the slave until it (``changed``): invalidated, as an INVALIDATE would be,
        but for the create itself when nothing else changed in or above its
        directory: then its listing gains the name, rather than being dropped, and
        the kernel is told nothing (it knows its own create). Keeps the new file's
        answer if it is watched; whether it is."""
        cut = path.rfind(b"/")
        parent, name = path[:cut] or b"/", path[cut + 1 :]
        dot = path[:cut] + b"/."
        rest = tuple(p for p in changed if p not in (dot, path))
        alone = (
            flags & REPLY_WATCHED
            and dot in changed
            and path in changed
            and path not in self.by_path
            and self._listed(parent, name) is not True
            and not any(_related(p, parent) for p in rest)
        )
        if not alone:
            if changed:
                self.invalidate(changed)
            return self._answered(path, 0, raw, flags)
        if rest:
            self.invalidate(rest)
        self.cache.invalidate((dot,))  # the directory's times
        self.xattrs_absent.drop_below(path)
        listing = self.listings.get(parent)
        if listing is not None:  # (a new list: a listing being read keeps its own)
            mode = linux.statx_mode(raw)
            entry = (fuse.attr_fields(raw)[0], stat.S_IFMT(mode) >> 12, name)
            self.listings[parent] = [*listing, entry]
        return self._answered(path, 0, raw, flags)

    def _attrs(self, attrs: Attrs) -> None:
        self.cache.prime(attrs)
        for attr in attrs.entries:
            if attr.flags & REPLY_WATCHED:
                self._watching(attr.path, attr.flags)

    def _watching(self, path: bytes, flags: int) -> None:
        """A watched answer about ``path``: from now on until an INVALIDATE of it
        (not of its content alone), what the view learns of its extended attributes
        holds."""
        absent = self.xattrs_absent
        if flags & REPLY_NO_XATTRS:
            absent[path] = None
        elif path not in absent:
            if len(absent) >= XATTRS_KEPT:
                absent.clear()
            absent[path] = set()

    # --- nodes ----------------------------------------------------------------------

    @staticmethod
    def _join(node: Node, name: bytes) -> bytes:
        if node.path is None:
            raise Refused(errno.ESTALE)
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise Refused(errno.EINVAL)  # the kernel resolves dots itself
        return (node.path if node.path != b"/" else b"") + b"/" + name

    @staticmethod
    def _path(node: Node) -> bytes:
        if node.path is None:
            raise Refused(errno.ESTALE)
        return node.path

    def _node_for(self, path: bytes, ino: int, kind: int) -> Node:
        """The node for what ``path`` names now (a new one if it names another file)."""
        node = self.by_path.get(path)
        if node is not None and node.synthetic is None and (node.ino, node.kind) == (ino, kind):
            return node
        if node is not None and node.pinned:
            return node
        if node is not None:
            node.path = None
        node = Node(self._next_node, path, ino, kind)
        self._next_node += 1
        self.nodes[node.nodeid] = node
        self.by_path[path] = node
        return node

    def _synthetic(self, path: bytes, kind: int, target: bytes = b"") -> Node:
        node = self.by_path.get(path)
        if node is not None and node.synthetic is not None:
            return node
        nodeid = self._next_node
        self._next_node += 1
        mode = {stat.S_IFDIR: 0o040755, stat.S_IFREG: 0o100644}.get(kind, 0o120777)
        node = Node(nodeid, path, nodeid, kind, pinned=True, target=target,
                    synthetic=fuse.synthetic_attr(nodeid, mode, len(target)))  # fmt: skip
        self.nodes[nodeid] = node
        self.by_path[path] = node
        return node

    def _entry(self, node: Node, attr: tuple[int, ...], watched: bool) -> bytes:
        """A fuse_entry_out for ``node`` (the kernel counts it as one lookup)."""
        node.lookups += 1
        valid = WATCHED if watched or node.pinned else 0.0
        return fuse.entry_out(node.nodeid, valid, WATCHED if watched else 0.0, attr)

    def _forget(self, opcode: int, nodeid: int, body: bytes) -> None:
        if opcode == Opcode.FORGET:
            self._drop(nodeid, fuse.FORGET_IN.unpack_from(body)[0])
        elif opcode == Opcode.BATCH_FORGET:
            (count, _) = fuse.BATCH_FORGET_IN.unpack_from(body)
            for i in range(count):
                node_id, n = fuse.FORGET_ONE.unpack_from(body, 8 + 16 * i)
                self._drop(node_id, n)

    def _drop(self, nodeid: int, n: int) -> None:
        node = self.nodes.get(nodeid)
        if node is None or nodeid == fuse.ROOT_ID:
            return
        node.lookups -= n
        if node.lookups <= 0 and not node.pinned:
            del self.nodes[nodeid]
            if self._idle:
                self._retire({nodeid})
            if node.path is not None and self.by_path.get(node.path) is node:
                del self.by_path[node.path]

    # --- coherence ----------------------------------------------------------------------

    def invalidate(self, paths: tuple[bytes, ...]) -> None:
        """The slave's INVALIDATE: drop the answers, and tell the kernel."""
        self.cache.invalidate(paths)
        notices: list[bytes] = []
        listings = self.listings
        absent = self.xattrs_absent
        retired: set[int] = set()  # nodes whose idle handles must close
        changed: set[int] = set()  # nodes whose content may have changed
        for path in paths:
            if path.endswith(b"/.."):  # a file's content: the same file, its xattrs stand
                node = self.by_path.get(path[:-3])
                if node is not None:
                    notices.append(fuse.inval_inode(node.nodeid))
                    changed.add(node.nodeid)
                continue
            if path.endswith(b"/."):  # a directory's own attributes (a name came or went)
                listings.pop(path[:-2] or b"/", None)
                self._names.pop(path[:-2] or b"/", None)
                node = self.by_path.get(path[:-2] or b"/")
                if node is not None:
                    notices.append(fuse.inval_inode(node.nodeid))
                continue
            absent.drop_below(path)
            listings.drop_below(path)
            self._names.drop_below(path)
            below = [(p, self.by_path[p]) for p in self.by_path.subtree(path)]
            for p, node in below:
                notices.append(fuse.inval_inode(node.nodeid))
                retired.add(node.nodeid)
                if node.pinned:
                    continue  # never its name: that would detach a mount
                parent = self.by_path.get(p[: p.rfind(b"/")] or b"/")
                if parent is not None:
                    name = p[p.rfind(b"/") + 1 :]
                    notices.append(fuse.inval_entry(parent.nodeid, name, expire=self.expire))
            if path != b"/" and path not in self.by_path:  # perhaps a negative entry
                parent = self.by_path.get(path[: path.rfind(b"/")] or b"/")
                if parent is not None and path not in self.points.ways:
                    name = path[path.rfind(b"/") + 1 :]
                    notices.append(fuse.inval_entry(parent.nodeid, name, expire=self.expire))
        if notices:
            self.notifier.send(notices)
        if retired and self._idle:
            self._retire(retired)
        changed |= retired
        if changed and self._ahead:
            for fh in [fh for fh in self._ahead if self._readers[fh][0] in changed]:
                self._drop_ahead(fh)

    # --- handlers: names -------------------------------------------------------------

    def lookup_now(self, parent: Node, body: memoryview) -> bytes | None:
        (name,) = fuse.names(body, 1)
        path = self._join(parent, name)
        point = self.points.master.get(path)
        if point is not None:
            if not point.kind:
                raise Refused(errno.ENOENT)  # the master has nothing there
            node = self._synthetic(path, point.kind, point.target)
            assert node.synthetic is not None
            return self._entry(node, node.synthetic, False)
        if path in self.points.ways:
            return None
        key = watch_key(path)
        hit = self.cache.lookup(key, False, MASK) if key is not None else None
        if hit is None:
            return None
        if hit[0] == -errno.ENOENT:
            return fuse.entry_out(0, WATCHED, 0, fuse.synthetic_attr(0, 0))
        if hit[0] < 0:
            raise Refused(-hit[0])
        return self._entry_of(path, hit[1], True)

    async def lookup(self, unique: int, parent: Node, body: memoryview) -> bytes:
        (name,) = fuse.names(body, 1)
        path = self._join(parent, name)
        where = parent.path if parent.path is not None else b""
        if path not in self.points.ways and where != b"/":
            if where in self._prefetching:
                await _Join(where)  # being listed: its entries' answers come with it
            if self._listed(where, name) is False:  # (the answers of the rest are kept)
                key = watch_key(path)
                if key is not None and self.cache.lookup(key, False, MASK) is None:
                    return fuse.entry_out(0, WATCHED, 0, fuse.synthetic_attr(0, 0))
        result, raw, watched = await self.attributes(path)
        if where not in self.listings and where not in self._prefetching and watched:
            self._list_ahead(where)
        if path in self.points.ways:
            if result == 0 and stat.S_ISDIR(linux.statx_mode(raw)):
                attr = fuse.attr_fields(raw)
                node = self._node_for(path, attr[0], stat.S_IFDIR)
                node.pinned = True
                return self._entry(node, attr, watched)
            node = self._synthetic(path, stat.S_IFDIR)  # somewhere to mount on
            assert node.synthetic is not None
            return self._entry(node, node.synthetic, False)
        if result < 0:
            if result == -errno.ENOENT and watched:  # a negative entry, kept as watched
                return fuse.entry_out(0, WATCHED, 0, fuse.synthetic_attr(0, 0))
            raise Refused(-result)
        return self._entry_of(path, raw, watched)

    def _entry_of(self, path: bytes, raw: bytes, watched: bool) -> bytes:
        attr = fuse.attr_fields(raw)
        node = self._node_for(path, attr[0], stat.S_IFMT(attr[9]))
        return self._entry(node, attr, watched)

    async def _entry_after(self, path: bytes) -> bytes:
        """The entry of what a call of ours just made at ``path``."""
        result, raw, watched = await self.attributes(path)
        if result < 0:
            raise Refused(-result)
        return self._entry_of(path, raw, watched)

    def getattr_now(self, node: Node, body: memoryview) -> bytes | None:
        if node.synthetic is not None:
            return fuse.attr_out(WATCHED, node.synthetic)
        key = watch_key(node.path) if node.path is not None else None
        hit = self.cache.lookup(key, False, MASK) if key is not None else None
        if hit is None or hit[0] < 0:
            return None
        attr = fuse.attr_fields(hit[1])
        if attr[0] != node.ino and fuse.GETATTR_IN.unpack_from(body)[0] & fuse.GETATTR_FH:
            return None  # its name is another file's now: the open file's, by its handle
        return fuse.attr_out(WATCHED, attr)

    async def getattr(self, unique: int, node: Node, body: memoryview) -> bytes:
        flags, _, fh = fuse.GETATTR_IN.unpack_from(body)
        if flags & fuse.GETATTR_FH or node.path is None:
            if not flags & fuse.GETATTR_FH:
                raise Refused(errno.ESTALE)
            reply = await self.call(Stat(dir=fh, flags=linux.AT_EMPTY_PATH, mask=MASK, path=b""))
            return fuse.attr_out(0.0, fuse.attr_fields(reply.blob))
        result, raw, watched = await self.attributes(node.path)
        if result < 0:
            raise Refused(-result)
        return fuse.attr_out(WATCHED if watched else 0.0, fuse.attr_fields(raw))

    async def setattr(self, unique: int, node: Node, body: memoryview) -> bytes:
        (valid, _, fh, size, _owner, atime, mtime, _ctime, atimensec, mtimensec, _cns, mode,
         _u4, uid, gid, _u5) = fuse.SETATTR_IN.unpack_from(body)  # fmt: skip
        self._real(node)
        path = self._path(node)
        nofollow = linux.AT_SYMLINK_NOFOLLOW
        if valid & (fuse.FATTR_UID | fuse.FATTR_GID):
            await self.call(Chown(dir=0, uid=uid if valid & fuse.FATTR_UID else -1,
                                  gid=gid if valid & fuse.FATTR_GID else -1, flags=nofollow,
                                  path=path))  # fmt: skip
        if valid & fuse.FATTR_SIZE:
            if valid & fuse.FATTR_FH:
                await self.call(Ftruncate(handle=fh, length=size))
            else:
                await self.call(Truncate(dir=0, length=size, path=path))
        if valid & fuse.FATTR_MODE:
            await self.call(Chmod(dir=0, mode=mode & 0o7777, flags=0, path=path))
        if valid & (fuse.FATTR_ATIME | fuse.FATTR_MTIME):
            omit = linux.UTIME_OMIT
            ans = (linux.UTIME_NOW if valid & fuse.FATTR_ATIME_NOW
                   else atimensec if valid & fuse.FATTR_ATIME else omit)  # fmt: skip
            mns = (linux.UTIME_NOW if valid & fuse.FATTR_MTIME_NOW
                   else mtimensec if valid & fuse.FATTR_MTIME else omit)  # fmt: skip
            await self.call(Utimens(dir=0, flags=nofollow, asec=atime, ansec=ans, msec=mtime,
                                    mnsec=mns, path=path))  # fmt: skip
        result, raw, watched = await self.attributes(path)
        if result < 0:
            raise Refused(-result)
        return fuse.attr_out(WATCHED if watched else 0.0, fuse.attr_fields(raw))

    @staticmethod
    def _real(node: Node) -> None:
        """Refuse a change to a node the view made (a mount point under the master's)."""
        if node.synthetic is not None:
            raise Refused(errno.EPERM)

    async def readlink(self, unique: int, node: Node, body: memoryview) -> bytes:
        if node.synthetic is not None:
            return node.target
        reply = await self.call(Readlink(dir=0, size=linux.PATH_MAX, path=self._path(node)))
        return reply.blob

    async def symlink(self, unique: int, parent: Node, body: memoryview) -> bytes:
        name, target = fuse.names(body, 2)
        path = self._new_name(parent, name)
        await self.call(Symlink(dir=0, target=target, path=path))
        return await self._entry_after(path)

    def _new_name(self, parent: Node, name: bytes) -> bytes:
        """The slave path of a name to create in ``parent`` (never a master point)."""
        path = self._join(parent, name)
        if path in self.points.master or path in self.points.ways:
            raise Refused(errno.EEXIST)
        return path

    async def mknod(self, unique: int, parent: Node, body: memoryview) -> bytes:
        mode, rdev, _umask, _ = fuse.MKNOD_IN.unpack_from(body)
        (name,) = fuse.names(body[fuse.MKNOD_IN.size :], 1)
        path = self._new_name(parent, name)
        await self.call(Mknod(dir=0, mode=mode, dev=rdev, path=path))
        return await self._entry_after(path)

    async def mkdir(self, unique: int, parent: Node, body: memoryview) -> bytes:
        mode, _umask = fuse.MKDIR_IN.unpack_from(body)
        (name,) = fuse.names(body[fuse.MKDIR_IN.size :], 1)
        path = self._new_name(parent, name)
        await self.call(Mkdir(dir=0, mode=mode & 0o7777, path=path))
        return await self._entry_after(path)

    async def _remove(self, parent: Node, body: memoryview, flags: int) -> bytes:
        (name,) = fuse.names(body, 1)
        path = self._join(parent, name)
        if path in self.points.master or path in self.points.ways:
            raise Refused(errno.EBUSY)  # a mount point
        await self.call(Unlink(dir=0, flags=flags, path=path))
        node = self.by_path.pop(path, None)
        if node is not None:
            node.path = None
        return b""

    async def unlink(self, unique: int, parent: Node, body: memoryview) -> bytes:
        return await self._remove(parent, body, 0)

    async def rmdir(self, unique: int, parent: Node, body: memoryview) -> bytes:
        return await self._remove(parent, body, linux.AT_REMOVEDIR)

    async def rename(self, unique: int, parent: Node, body: memoryview) -> bytes:
        (newdir,) = fuse.RENAME_IN.unpack_from(body)
        return await self._rename(parent, newdir, 0, body[fuse.RENAME_IN.size :])

    async def rename2(self, unique: int, parent: Node, body: memoryview) -> bytes:
        newdir, flags, _ = fuse.RENAME2_IN.unpack_from(body)
        return await self._rename(parent, newdir, flags, body[fuse.RENAME2_IN.size :])

    async def _rename(self, parent: Node, newdir: int, flags: int, rest: memoryview) -> bytes:
        old_name, new_name = fuse.names(rest, 2)
        target = self.nodes.get(newdir)
        if target is None:
            raise Refused(errno.ESTALE)
        old, new = self._join(parent, old_name), self._join(target, new_name)
        fixed = self.points.master.keys() | self.points.ways
        if old in fixed or new in fixed:
            raise Refused(errno.EBUSY)
        await self.call(Rename(olddir=0, newdir=0, flags=flags, old=old, new=new))
        self._moved(old, new, exchange=bool(flags & 2))  # RENAME_EXCHANGE
        return b""

    def _moved(self, old: bytes, new: bytes, *, exchange: bool) -> None:
        """Our rename of ``old`` to ``new`` is done: the nodes follow it."""

        def below(p: bytes) -> list[tuple[bytes, Node]]:
            return [(k, self.by_path[k]) for k in self.by_path.subtree(p)]

        moving, replaced = below(old), below(new)
        for k, _ in moving + replaced:
            self.by_path.pop(k, None)
        for k, node in moving:
            node.path = new + k[len(old) :]
            self.by_path[node.path] = node
        for k, node in replaced:
            if exchange:
                node.path = old + k[len(new) :]
                self.by_path[node.path] = node
            else:
                node.path = None

    async def hardlink(self, unique: int, parent: Node, body: memoryview) -> bytes:
        (old_id,) = fuse.LINK_IN.unpack_from(body)
        (name,) = fuse.names(body[fuse.LINK_IN.size :], 1)
        old = self.nodes.get(old_id)
        if old is None:
            raise Refused(errno.ESTALE)
        self._real(old)
        path = self._new_name(parent, name)
        await self.call(Link(olddir=0, newdir=0, flags=0, old=self._path(old), new=path))
        return await self._entry_after(path)

    # --- handlers: files ----------------------------------------------------------------

    def _known(self, node: Node) -> tuple[int, bytes] | None:
        """The watched answer about what ``node``'s path names (None: not watched)."""
        path = node.path
        key = watch_key(path) if path is not None else None
        return self.cache.lookup(key, False, MASK) if key is not None else None

    def _watched(self, node: Node) -> bool:
        """Whether the slave watches what ``node``'s path names (its answer is kept)."""
        return self._known(node) is not None

    def _ahead_size(self, node: Node) -> int:
        """How much of a file being opened to read to bring with the open (OPEN_READ,
        ``start_size``); none if it is not watched, if the slave cannot, or if enough
        is held."""
        peer = self.link.peer
        if peer is None or not peer.features & FEATURE_OPEN_READ:
            return 0
        if self._ahead_held >= AHEAD_HELD:
            return 0
        known = self._known(node)
        if known is None or known[0] < 0:
            return 0  # unwatched: no INVALIDATE would drop it once stale
        return start_size(known[1])

    def open_now(self, node: Node, body: memoryview) -> bytes | None:
        """An open of a watched file the kernel released a handle of, with the same
        flags: that handle, still open on the slave. Nothing that would make the open
        fail or open another file can have happened since, or an INVALIDATE would
        have closed it (``_retire``: a change of content alone keeps it); it reads
        the file as it is now (pread)."""
        flags, _ = fuse.OPEN_IN.unpack_from(body)
        handles = self._idle.get(node.nodeid, {}).get(flags & ~_NOT_SENT)
        if not handles:
            return None
        fh = handles[-1]
        self._take_idle(fh)
        self._readers[fh] = (node.nodeid, flags & ~_NOT_SENT)
        return fuse.OPEN_OUT.pack(fh, fuse.FOPEN_KEEP_CACHE | fuse.FOPEN_NOFLUSH, 0)

    async def open(self, unique: int, node: Node, body: memoryview) -> bytes:
        flags, _ = fuse.OPEN_IN.unpack_from(body)
        self._real(node)
        path = self._path(node)
        keep = self._watched(node)
        flags &= ~_NOT_SENT
        reader = flags & _KEEPABLE == os.O_RDONLY and node.kind == stat.S_IFREG
        size = self._ahead_size(node) if reader and not flags & OPEN_READ_REFUSES else 0
        if size:
            # The file's start comes with the open: its first READ needs no slave.
            reply = await self.call(OpenRead(dir=0, flags=flags, resolve=0, size=size, path=path))
        else:
            reply = await self.call(Open(dir=0, flags=flags, mode=0, resolve=0, path=path))
        fh = reply.result
        if flags & _SYNC_FLAGS:
            self._sync_handles.add(fh)
        out = fuse.FOPEN_KEEP_CACHE if keep else 0
        if reader:
            # Nothing to report at its close (no write behind it, no lock: the kernel
            # keeps those): no FLUSH.
            self._readers[fh] = (node.nodeid, flags)
            out |= fuse.FOPEN_NOFLUSH
            data = reply.blob[1:]
            if data:
                self._ahead[fh] = (data, len(data) < size)
                self._ahead_held += len(data)
        return fuse.OPEN_OUT.pack(fh, out, 0)

    def read_now(self, node: Node, body: memoryview) -> bytes | None:
        """A READ of what came with its handle's open (``open``), if it has it all:
        its range, or the file ends there (it came whole)."""
        fh, offset, size, *_ = fuse.READ_IN.unpack_from(body)
        ahead = self._ahead.get(fh)
        if ahead is None:
            return None
        data, whole = ahead
        if offset + size > len(data) and not whole:
            return None
        return data[offset : offset + size]

    def _drop_ahead(self, fh: int) -> None:
        ahead = self._ahead.pop(fh, None)
        if ahead is not None:
            self._ahead_held -= len(ahead[0])

    def _keep_idle(self, fh: int) -> bool:
        """Keep a released read-only handle open for the next open (``open_now``)."""
        self._drop_ahead(fh)
        key = self._readers.pop(fh, None)
        if key is None:
            return False
        node = self.nodes.get(key[0])
        if node is None or not self._watched(node):
            return False
        if len(self._idle_handles) >= IDLE_HANDLES:
            return False  # (the first ones stay: a walk larger than this gets some)
        nodeid, flags = key
        self._idle.setdefault(nodeid, {}).setdefault(flags, []).append(fh)
        self._idle_handles[fh] = key
        return True

    def _take_idle(self, fh: int) -> None:
        """``fh`` is no longer idle (given to an open, or to be closed)."""
        nodeid, flags = self._idle_handles.pop(fh)
        by_flags = self._idle[nodeid]
        by_flags[flags].remove(fh)
        if not by_flags[flags]:
            del by_flags[flags]
            if not by_flags:
                del self._idle[nodeid]

    def _close_idle(self, fh: int) -> None:
        self._take_idle(fh)
        self.link.post(PAIRING, Close(handle=fh))

    def _retire(self, nodeids: set[int]) -> None:
        """Close the idle handles of nodes whose name or attributes may have changed
        (another file there, another mode...), or that the kernel forgot."""
        for nodeid in nodeids & self._idle.keys():
            for handles in list(self._idle[nodeid].values()):
                for fh in list(handles):
                    self._close_idle(fh)

    async def create(self, unique: int, parent: Node, body: memoryview) -> bytes:
        flags, mode, _umask, _ = fuse.CREATE_IN.unpack_from(body)
        (name,) = fuse.names(body[fuse.CREATE_IN.size :], 1)
        path = self._new_name(parent, name)
        flags = (flags | linux.O_CREAT) & ~linux.O_NOCTTY
        peer = self.link.peer
        with_attrs = peer is not None and bool(peer.features & FEATURE_CREATE)
        if with_attrs:
            # The new file's attributes come with it: no STAT after.
            reply = await self.call(Create(dir=0, flags=flags, mode=mode & 0o7777, resolve=0,
                                           mask=MASK, path=path))  # fmt: skip
        else:
            reply = await self.call(Open(dir=0, flags=flags, mode=mode & 0o7777, resolve=0,
                                         path=path))  # fmt: skip
        handle = reply.result
        if flags & _SYNC_FLAGS:
            self._sync_handles.add(handle)
        try:
            if with_attrs and reply.blob:
                raw = reply.blob[: linux.STATX_SIZE]
                changed = decode_paths(reply.blob[linux.STATX_SIZE :])
                entry = self._entry_of(path, raw, self._created(path, raw, changed, reply.flags))
            else:
                entry = await self._entry_after(path)
        except (Refused, ValueError, IndexError, struct.error):
            self.link.post(PAIRING, Close(handle=handle))
            raise
        return entry + fuse.OPEN_OUT.pack(handle, 0, 0)

    async def read(self, unique: int, node: Node, body: memoryview) -> bytes:
        fh, offset, size, *_ = fuse.READ_IN.unpack_from(body)
        reply = await self.call(Read(handle=fh, size=size, offset=offset, rwf=0))
        return reply.blob

    async def write(self, unique: int, node: Node, body: memoryview) -> bytes:
        """A WRITE of a handle opened O_SYNC, O_DSYNC or O_DIRECT: sent and answered."""
        fh, offset, size, *_ = fuse.WRITE_IN.unpack_from(body)
        self._behind.error(fh)
        data = bytes(body[fuse.WRITE_IN.size : fuse.WRITE_IN.size + size])
        reply = await self.call(Write(handle=fh, offset=offset, rwf=0, data=data))
        return fuse.WRITE_OUT.pack(reply.result, 0)

    def release_now(self, node: Node, body: memoryview) -> bytes:
        (fh, *_) = fuse.RELEASE_IN.unpack_from(body)
        self._behind.errors.pop(fh, None)  # FLUSH, at each close, reported it
        self._sync_handles.discard(fh)
        if not self._keep_idle(fh):
            self.link.post(PAIRING, Close(handle=fh))
        return b""

    async def release(self, unique: int, node: Node, body: memoryview) -> bytes:
        return self.release_now(node, body)

    def flush_now(self, node: Node, body: memoryview) -> bytes:
        # The writes held before it have been answered (it waited for them).
        (fh, *_) = fuse.RELEASE_IN.unpack_from(body)
        self._behind.error(fh)
        return b""

    async def flush(self, unique: int, node: Node, body: memoryview) -> bytes:
        return self.flush_now(node, body)

    async def fsync(self, unique: int, node: Node, body: memoryview) -> bytes:
        fh, flags, _ = fuse.FSYNC_IN.unpack_from(body)
        self._behind.error(fh)
        await self.call(Fsync(handle=fh, datasync=flags & fuse.FSYNC_FDATASYNC))
        return b""

    async def fallocate(self, unique: int, node: Node, body: memoryview) -> bytes:
        fh, offset, length, mode, _ = fuse.FALLOCATE_IN.unpack_from(body)
        await self.call(Fallocate(handle=fh, mode=mode, offset=offset, length=length))
        return b""

    async def lseek(self, unique: int, node: Node, body: memoryview) -> bytes:
        fh, offset, whence, _ = fuse.LSEEK_IN.unpack_from(body)
        reply = await self.call(Lseek(handle=fh, offset=offset, whence=whence))
        return fuse.LSEEK_OUT.pack(reply.result)

    async def copy_file_range(self, unique: int, node: Node, body: memoryview) -> bytes:
        fh_in, off_in, _node_out, fh_out, off_out, length, flags = (
            fuse.COPY_FILE_RANGE_IN.unpack_from(body))  # fmt: skip
        reply = await self.call(CopyRange(src=fh_in, off_in=off_in, dst=fh_out, off_out=off_out,
                                          length=min(length, 1 << 30), flags=flags))  # fmt: skip
        return fuse.WRITE_OUT.pack(reply.result, 0)

    async def statfs(self, unique: int, node: Node, body: memoryview) -> bytes:
        path = node.path if node.path is not None and node.synthetic is None else b"/"
        reply = await self.call(Statfs(dir=0, flags=0, path=path))
        return fuse.statfs_out(reply.blob)

    async def access(self, unique: int, node: Node, body: memoryview) -> bytes:
        mask, _ = fuse.ACCESS_IN.unpack_from(body)
        if node.synthetic is not None:
            return b""
        await self.call(Access(dir=0, mode=mask & 7, flags=0, path=self._path(node)))
        return b""

    async def destroy(self, unique: int, node: Node, body: memoryview) -> bytes:
        return b""

    # --- handlers: extended attributes ------------------------------------------------------

    def _has_no_xattrs(self, node: Node) -> bool:
        if node.synthetic is not None:
            return True
        # (Every watched answer marked REPLY_NO_XATTRS is recorded there: _watching.)
        path = node.path
        return path is not None and path in self.xattrs_absent and self.xattrs_absent[path] is None

    def getxattr_now(self, node: Node, body: memoryview) -> bytes | None:
        if self._has_no_xattrs(node):
            raise Refused(errno.ENODATA)
        names = self.xattrs_absent.get(node.path) if node.path is not None else None
        if names and fuse.names(body[fuse.GETXATTR_IN.size :], 1)[0] in names:
            raise Refused(errno.ENODATA)
        return None

    def listxattr_now(self, node: Node, body: memoryview) -> bytes | None:
        size, _ = fuse.GETXATTR_IN.unpack_from(body)
        if self._has_no_xattrs(node):
            return fuse.GETXATTR_OUT.pack(0, 0) if not size else b""
        return None

    async def getxattr(self, unique: int, node: Node, body: memoryview) -> bytes:
        size, _ = fuse.GETXATTR_IN.unpack_from(body)
        (name,) = fuse.names(body[fuse.GETXATTR_IN.size :], 1)
        path = self._path(node)
        try:
            reply = await self.call(Getxattr(dir=0, flags=linux.AT_SYMLINK_NOFOLLOW,
                                             size=size, path=path, name=name))  # fmt: skip
        except Refused as exc:
            names = self.xattrs_absent.get(path)
            if exc.errno == errno.ENODATA and names is not None:
                names.add(name)  # watched: until an INVALIDATE says otherwise
            raise
        return fuse.GETXATTR_OUT.pack(reply.result, 0) if not size else reply.blob

    async def listxattr(self, unique: int, node: Node, body: memoryview) -> bytes:
        size, _ = fuse.GETXATTR_IN.unpack_from(body)
        path = self._path(node)
        reply = await self.call(Listxattr(dir=0, flags=linux.AT_SYMLINK_NOFOLLOW, size=size,
                                          path=path))  # fmt: skip
        if reply.result == 0 and path in self.xattrs_absent:
            self.xattrs_absent[path] = None
        return fuse.GETXATTR_OUT.pack(reply.result, 0) if not size else reply.blob

    async def setxattr(self, unique: int, node: Node, body: memoryview) -> bytes:
        size, flags = fuse.SETXATTR_IN.unpack_from(body)
        rest = bytes(body[fuse.SETXATTR_IN.size :])
        end = rest.index(b"\0")
        name, value = rest[:end], rest[end + 1 : end + 1 + size]
        self._real(node)
        await self.call(Setxattr(dir=0, flags=linux.AT_SYMLINK_NOFOLLOW, xflags=flags,
                                 path=self._path(node), name=name, value=value))  # fmt: skip
        return b""

    async def removexattr(self, unique: int, node: Node, body: memoryview) -> bytes:
        (name,) = fuse.names(body, 1)
        self._real(node)
        await self.call(Removexattr(dir=0, flags=linux.AT_SYMLINK_NOFOLLOW,
                                    path=self._path(node), name=name))  # fmt: skip
        return b""

    # --- handlers: directories ------------------------------------------------------------

    def opendir_now(self, node: Node, body: memoryview) -> bytes | None:
        if node.synthetic is not None:  # an empty directory of our own
            dots = [(node.ino, 4, b"."), (node.ino, 4, b"..")]
            self.points.listed(node.path or b"/", dots)
            return self._opened_dir(DirHandle(node.path or b"/", dots, watched=True))
        listing = self.listings.get(node.path) if node.path is not None else None
        if listing is None or node.path is None:
            return None
        self._walking(node.path, listing)
        return self._opened_dir(DirHandle(node.path, listing, watched=True))

    async def opendir(self, unique: int, node: Node, body: memoryview) -> bytes:
        path = self._path(node)
        d = DirHandle(path)
        await self._list(d)
        if d.entries is not None:
            self._walking(path, d.entries)
        return self._opened_dir(d)

    # Reading ahead: a program that opens a directory, then one of its subdirectories,
    # walks the tree (ls -R, find, du, tar, grep -r, git). From then on, each directory
    # it opens has its subdirectories, and its remaining siblings, listed ahead (their
    # LISTDIRs sent together, the slave's answers kept as any watched listing), so the
    # walk finds them listed. One level ahead only: a single `ls -l` reads nothing more.

    def _walking(self, path: bytes, entries: list[tuple[int, int, bytes]]) -> None:
        parent = path[: path.rfind(b"/")] or b"/"
        opened = self._opened
        if parent in opened and self.read_ahead:
            base = path if path != b"/" else b""
            ahead = [base + b"/" + name for _, kind, name in entries
                     if kind == _DT[stat.S_IFDIR] and name not in (b".", b"..")]  # fmt: skip
            siblings = self.listings.get(parent)
            if siblings is not None:
                top = parent if parent != b"/" else b""
                name = path[path.rfind(b"/") + 1 :]
                ahead += [top + b"/" + n for _, kind, n in siblings
                          if kind == _DT[stat.S_IFDIR] and n > name]  # fmt: skip
            self._read_ahead(ahead)
        if len(opened) >= LISTINGS_KEPT:
            opened.clear()
        opened.add(path)

    def _read_ahead(self, paths: list[bytes]) -> None:
        fixed = self.points.master.keys() | self.points.ways
        for path in paths:
            if len(self._prefetching) >= READ_AHEAD:
                return
            if path in self.listings or path in self._prefetching or path in fixed:
                continue
            if watch_key(path) != path:
                continue
            self._prefetching[path] = []
            self.link.submit(
                PAIRING, Listdir(dir=0, path=path), functools.partial(self._read, path)
            )

    def _read(self, path: bytes, reply: Reply | LinkClosed) -> None:
        """A directory read ahead: kept if watched; the requests that waited for it go on."""
        waiting = self._prefetching.pop(path, [])
        if isinstance(reply, Reply) and reply.result >= 0 and reply.flags & REPLY_WATCHED:
            entries = list(linux.dirents(reply.blob))
            self.points.listed(path, entries)
            self._keep_listing(path, entries)
        for resume in waiting:
            resume(reply)

    def _listed(self, path: bytes, name: bytes) -> bool | None:
        """Whether directory ``path``'s watched listing has ``name`` (None: not listed)."""
        listing = self.listings.get(path)
        if listing is None:
            return None
        known = self._names.get(path)
        if known is None or known[0] is not listing:
            known = self._names[path] = (listing, {n for _, _, n in listing})
        return name in known[1]

    def _list_ahead(self, path: bytes) -> None:
        """A name looked up in ``path``, which is not listed: list it ahead, so that
        the next names looked up there (git's lstat of each file, a search along
        a path) are answered by the view. Not a large directory (64 KiB of entries)."""
        if not self.read_ahead or not path:
            return
        hit = self.cache.lookup(path, False, MASK)
        if hit is not None and hit[0] == 0 and fuse.attr_fields(hit[1])[1] <= LIST_AHEAD_SIZE:
            self._read_ahead([path])

    def _keep_listing(self, path: bytes, entries: list[tuple[int, int, bytes]]) -> None:
        if len(self.listings) >= LISTINGS_KEPT:
            self.listings.clear()
            self._names.clear()
        self.listings[path] = entries

    def _opened_dir(self, d: DirHandle) -> bytes:
        fh = self._next_dir
        self._next_dir += 1
        self.dirs[fh] = d
        # A watched listing: the kernel may keep it too (a notice drops it).
        flags = fuse.FOPEN_KEEP_CACHE | fuse.FOPEN_CACHE_DIR if d.watched else 0
        return fuse.OPEN_OUT.pack(fh, flags, 0)

    async def _list(self, d: DirHandle) -> None:
        """Read the whole directory: one LISTDIR, or by handle if it is too large."""
        if not d.handle:
            try:
                if d.path in self._prefetching:
                    reply = await _Join(d.path)  # read ahead already: its answer
                    if reply.result < 0:
                        raise Refused(-reply.result)
                else:
                    reply = await self.call(Listdir(dir=0, path=d.path))
            except Refused as exc:
                if exc.errno != errno.EFBIG:
                    raise
                reply = await self.call(Open(dir=0, flags=os.O_RDONLY | os.O_DIRECTORY, mode=0,
                                             resolve=0, path=d.path))  # fmt: skip
                d.handle = reply.result
            else:
                d.entries = list(linux.dirents(reply.blob))
                self.points.listed(d.path, d.entries)
                d.watched = bool(reply.flags & REPLY_WATCHED) and (
                    d.path == b"/" or watch_key(d.path) is not None
                )
                if d.watched:
                    self._keep_listing(d.path, d.entries)
                return
        else:  # read afresh
            await self.call(Lseek(handle=d.handle, offset=0, whence=os.SEEK_SET))
        entries: list[tuple[int, int, bytes]] = []
        while True:
            reply = await self.call(Getdents(handle=d.handle, size=READDIR_CHUNK))
            if not reply.result:
                break
            entries.extend(linux.dirents(reply.blob))
        self.points.listed(d.path, entries)
        d.entries = entries

    async def _listing(self, fh: int, offset: int) -> DirHandle:
        d = self.dirs.get(fh)
        if d is None:
            raise Refused(errno.EBADF)
        if d.entries is None or (offset == 0 and d.served and not d.watched):
            await self._list(d)  # rewound: what the directory holds now
        d.served = True
        return d

    def _loaded(self, body: memoryview) -> tuple[DirHandle, int, int] | None:
        """The listing a READDIR(PLUS) continues, if it is read already."""
        fh, offset, size, *_ = fuse.READ_IN.unpack_from(body)
        d = self.dirs.get(fh)
        if d is None:
            raise Refused(errno.EBADF)
        if d.entries is None or (offset == 0 and d.served and not d.watched):
            return None
        d.served = True
        return d, offset, size

    def readdir_now(self, node: Node, body: memoryview) -> bytes | None:
        loaded = self._loaded(body)
        return self._dirents(*loaded) if loaded is not None else None

    def readdirplus_now(self, node: Node, body: memoryview) -> bytes | None:
        loaded = self._loaded(body)
        return self._direntsplus(*loaded) if loaded is not None else None

    async def readdir(self, unique: int, node: Node, body: memoryview) -> bytes:
        fh, offset, size, *_ = fuse.READ_IN.unpack_from(body)
        return self._dirents(await self._listing(fh, offset), offset, size)

    def _dirents(self, d: DirHandle, offset: int, size: int) -> bytes:
        assert d.entries is not None
        out: list[bytes] = []
        used = 0
        for i in range(offset, len(d.entries)):
            ino, kind, name = d.entries[i]
            record = fuse.dirent(ino, i + 1, kind, name)
            if used + len(record) > size:
                break
            out.append(record)
            used += len(record)
        return b"".join(out)

    async def readdirplus(self, unique: int, node: Node, body: memoryview) -> bytes:
        fh, offset, size, *_ = fuse.READ_IN.unpack_from(body)
        return self._direntsplus(await self._listing(fh, offset), offset, size)

    def _direntsplus(self, d: DirHandle, offset: int, size: int) -> bytes:
        assert d.entries is not None
        base = d.path if d.path != b"/" else b""
        fixed = self.points.master.keys() | self.points.ways
        out: list[bytes] = []
        used = 0
        empty = fuse.entry_out(0, 0.0, 0.0, fuse.synthetic_attr(0, 0))
        for i in range(offset, len(d.entries)):
            ino, kind, name = d.entries[i]
            size_needed = len(empty) + len(fuse.dirent(ino, i + 1, kind, name))
            if used + size_needed > size:
                break
            entry = empty
            path = base + b"/" + name
            if name not in (b".", b"..") and path not in fixed:
                hit = self.cache.lookup(path, False, MASK)
                if hit is not None and hit[0] == 0:
                    entry = self._entry_of(path, hit[1], True)
            out.append(fuse.direntplus(entry, ino, i + 1, kind, name))
            used += size_needed
        return b"".join(out)

    def releasedir_now(self, node: Node, body: memoryview) -> bytes:
        (fh, *_) = fuse.RELEASE_IN.unpack_from(body)
        d = self.dirs.pop(fh, None)
        if d is not None and d.handle:
            self.link.post(PAIRING, Close(handle=d.handle))
        return b""

    async def releasedir(self, unique: int, node: Node, body: memoryview) -> bytes:
        return self.releasedir_now(node, body)

    async def fsyncdir(self, unique: int, node: Node, body: memoryview) -> bytes:
        fh, flags, _ = fuse.FSYNC_IN.unpack_from(body)
        d = self.dirs.get(fh)
        if d is None:
            raise Refused(errno.EBADF)
        if node.synthetic is not None:
            return b""
        handle = d.handle
        if not handle:  # read by LISTDIR: a handle for the fsync alone
            reply = await self.call(Open(dir=0, flags=os.O_RDONLY | os.O_DIRECTORY, mode=0,
                                         resolve=0, path=d.path))  # fmt: skip
            handle = reply.result
        try:
            await self.call(Fsync(handle=handle, datasync=flags & fuse.FSYNC_FDATASYNC))
        finally:
            if not d.handle:
                self.link.post(PAIRING, Close(handle=handle))
        return b""


# --- the layout: what the launcher mounts ---------------------------------------------------


def _related(path: bytes, directory: bytes) -> bool:
    """Whether ``path`` is ``directory``, above it, or in it."""
    if b"/" in (path, directory) or path == directory:
        return True
    return directory.startswith(path + b"/") or path.startswith(directory + b"/")


class LayoutError(Exception):
    """A policy the view cannot lay out."""


def layout(policy: Policy) -> tuple[Points, list[Mount]]:
    """The view's points and the launcher's bind mounts for ``policy``: each prefix
    that the master's side decides, where the slave's decides its parent, is the
    master's there."""
    if policy.rule_for(b"/").side is not Side.SLAVE:
        raise LayoutError("with --view, / must be the slave's (no --local /)")
    masters: list[bytes] = []
    for prefix in sorted({r.prefix for r in policy.rules if r.prefix != b"/"}):
        parent = prefix[: prefix.rfind(b"/")] or b"/"
        side, around = policy.rule_for(prefix).side, policy.rule_for(parent).side
        if side is around:
            continue
        if side is Side.SLAVE:
            raise LayoutError(f"with --view, {prefix.decode(errors='replace')} (the slave's) "
                              "cannot be inside a prefix of the master's")  # fmt: skip
        masters.append(prefix)
    points = Points.of(masters)
    return points, [Mount(p.path, p.path) for p in points.mounts()]
