"""Pages: the content of remote files that a program maps into its memory.

The kernel maps the pages of a file, and a placeholder is a socket, so mmap(2) of
a placeholder cannot work as it is. When a program maps a remote regular file,
fmhub fetches the needed ranges of the file from the slave into a file of its own
in a private directory on /dev/shm: the slave file's *pages*, one set per slave file
(device, inode), shared by every handle of it that the program maps or writes. Each
handle reaches the pages through a hard link of its own (``h<handle>``); the
program's fd is switched to a description opened through that link — ADDFD with
SETFD at the same number and with the same close-on-exec flag — before the call
continues, and the kernel then maps the pages natively. What a program sees:

- identity: the switched fd still names its remote handle: its /proc link is the
  handle's link, and fmhub checks the inode (fdinfo's ``ino``), so no other file
  passes for one; reads, writes, fstat, locks and every other call on it are
  forwarded as on the placeholder;
- access: a description is opened read-only for a private mapping, read-write for a
  shared mapping of a read-write handle, so the kernel itself answers EACCES for a
  shared writable mapping of an O_RDONLY fd; EACCES for a write-only handle, ENODEV
  for anything but a regular file, EBADF for O_PATH (the kernel's answers);
- coherence: shared mappings through separate opens of one file are one memory, as
  on one machine (sqlite's ``-shm`` in each of its processes); writes and truncates
  through any handle of the file show in the pages at once;
- lifetime: a native file stays open while mapped. inotify (IN_CLOSE_*) says that a
  description of the pages was released; which handles' links are still held is then
  read from the session's processes (/proc/PID/fd and maps show the link), and a
  handle whose placeholder copies are gone and whose link nothing holds is closed;
- content: the ranges that mappings ask for, fetched at their mmap (the rest is a
  hole of the file's size; large ranges around the slave file's own holes), and
  fetched again at a later mmap only when the slave's inode, size or mtime has
  changed other than by fmhub's own writes; SIGBUS beyond the end, as natively;
- write-back: pages that a shared read-write mapping may change are compared with a
  shadow of what the slave holds, and the pages that differ (the kernel's unit of
  write-back too) are written to the slave, through a writable handle of the file
  and all at once: at msync (MS_SYNC adds an fsync), before any other call on a
  handle of the file (so read(2) sees what the mapping wrote), when a handle's last
  mapping and fd are gone (munmap and close, or exit), and at the end of the session.

A slave-side process sees a mapping's writes once they are written back; the pages
see a slave-side change at the next mmap.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fsys import linux
from fsys import protocol as wire
from fsys.errors import Errno
from fsys.linux import O_CLOEXEC

if TYPE_CHECKING:
    from fsys.master.placeholders import RemoteFile

#: inotify events that report the release of a description (close of its last fd
#: and unmapping of its last mapping).
IN_CLOSE = linux.IN_CLOSE_WRITE | linux.IN_CLOSE_NOWRITE
#: The unit of write-back: a block differs from its snapshot or not.
BLOCK = 65536


class Watcher:
    """One inotify instance: the release of each description of a memfd."""

    def __init__(self) -> None:
        self.fd = linux.inotify_init()

    def watch(self, memfd: int) -> int:
        return linux.inotify_add_watch(self.fd, b"/proc/self/fd/%d" % memfd, IN_CLOSE)

    def unwatch(self, wd: int) -> None:
        linux.inotify_rm_watch(self.fd, wd)

    def releases(self) -> Iterator[int]:
        """The watch of each description released since the last call (one per release)."""
        for wd, mask, _name in linux.inotify_events(self.fd):
            if mask & IN_CLOSE:
                yield wd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


PAGE = 4096
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
#: A range at least this large is fetched around its holes (SEEK_DATA, SEEK_HOLE).
SPARSE_SCAN = 1 << 20


def _memfd(name: str) -> int:
    try:
        return os.memfd_create(name, os.MFD_CLOEXEC)
    except OSError as exc:
        raise Errno(exc.errno or errno.ENOMEM) from None


class Store:
    """A private directory of fmhub's for the pages' files (on /dev/shm when it is
    there: memory, like a memfd), made at first use and removed at the end."""

    def __init__(self) -> None:
        self._path: bytes | None = None

    @property
    def path(self) -> bytes:
        if self._path is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            try:
                self._path = os.fsencode(tempfile.mkdtemp(prefix="fsys-pages-", dir=base))
            except OSError as exc:
                raise Errno(exc.errno or errno.ENOMEM) from None
        return self._path

    @property
    def made(self) -> bool:
        return self._path is not None

    def owns(self, name: str) -> bool:
        return self._path is not None and name.startswith(os.fsdecode(self._path) + "/h")

    def handle_of(self, name: str) -> int | None:
        """The handle that a link name (``DIR/h<handle>``, maybe `` (deleted)``) names."""
        if not self.owns(name):
            return None
        assert self._path is not None
        digits = name[len(os.fsdecode(self._path)) + 2 :].split(" ", 1)[0]
        return int(digits) if digits.isdigit() else None

    def close(self) -> None:
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None


@dataclass(eq=False)
class Pages:
    """One slave file's content in a file of fmhub's, shared by every remote handle of
    that slave file that is mapped (so that shared mappings through separate opens of
    it are coherent, as on one machine).

    Each handle reaches the content through a hard link of its own, ``DIR/h<handle>``:
    what a program's fd or mapping holds then names its handle in /proc (fd links,
    maps). Only the ranges that mappings asked for are fetched (``loaded``); the rest
    is a hole of the right size, so a mapping of one page of a large file fetches one.
    """

    number: int
    store: Store
    memfd: int
    inode: int
    wd: int
    #: The slave file: (device major, minor, inode).
    file: tuple[int, ...] = ()
    #: The remote handles of this file that were mapped and are not closed yet.
    handles: dict[int, RemoteFile] = field(default_factory=dict)
    #: The handles whose descriptions the program may still hold (fds or mappings).
    mapped: set[int] = field(default_factory=set)
    #: The slave file's (dev, inode, size, mtime) when the pages last matched it.
    identity: tuple[int, ...] | None = None
    #: The fetched ranges (start, end), sorted and disjoint.
    loaded: list[tuple[int, int]] = field(default_factory=list)
    #: The slave's mtime moved by fmhub's own writes since ``identity`` was taken.
    ours: bool = False
    #: What the slave holds of the loaded ranges (a memfd), kept once a shared
    #: read-write mapping may change the pages; -1 before.
    shadow: int = -1

    @classmethod
    def create(cls, number: int, store: Store, watcher: Watcher) -> Pages:
        path = store.path + b"/f%d" % number
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_CLOEXEC, 0o600)
        except OSError as exc:
            raise Errno(exc.errno or errno.ENOMEM) from None
        try:
            wd = watcher.watch(fd)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            raise Errno(exc.errno or errno.ENOMEM) from None
        return cls(number, store, fd, os.fstat(fd).st_ino, wd)

    def link(self, handle: int) -> bytes:
        """The name through which ``handle`` reaches the content (made on first use)."""
        name = self.store.path + b"/h%d" % handle
        if not os.path.lexists(name):
            os.link(self.store.path + b"/f%d" % self.number, name)
        return name

    def unlink(self, handle: int) -> None:
        try:
            os.unlink(self.store.path + b"/h%d" % handle)
        except FileNotFoundError:
            pass

    def writer(self) -> int:
        """A handle that can write the file (what write-back goes through), or 0."""
        for handle, remote in self.handles.items():
            # (an O_APPEND handle would write at the end, whatever the offset)
            if remote.access & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR) and not (
                remote.access & os.O_APPEND
            ):
                return handle
        return 0

    @property
    def size(self) -> int:
        return os.fstat(self.memfd).st_size

    def current(self, identity: tuple[int, ...], size: int) -> list[tuple[int, int]]:
        """The slave's file is ``identity`` now. If it changed since the pages were
        fetched: the pages take its size, and what was fetched is to be fetched again
        (the ranges returned), as live mappings may show it."""
        if self.ours and size == self.size:  # the change is ours: the pages have it
            self.identity = identity
        self.ours = False
        if identity == self.identity:
            return []
        stale = [(lo, min(hi, size)) for lo, hi in self.loaded if lo < size]
        self.loaded = []
        for fd in (self.memfd, self.shadow):
            if fd >= 0:
                os.ftruncate(fd, size)
        self.identity = identity
        return stale

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ranges of [start, end) (widened to pages, cut at the end of the file)
        that are not fetched yet."""
        start -= start % PAGE
        end = min(-(-end // PAGE) * PAGE, self.size)
        gaps: list[tuple[int, int]] = []
        at = start
        for lo, hi in self.loaded:
            if hi <= at:
                continue
            if lo >= end:
                break
            if lo > at:
                gaps.append((at, lo))
            at = max(at, hi)
        if at < end:
            gaps.append((at, end))
        return gaps

    def load(self, offset: int, data: bytes) -> None:
        """Bytes fetched from the slave at ``offset``."""
        os.pwrite(self.memfd, data, offset)
        if self.shadow >= 0:
            os.pwrite(self.shadow, data, offset)
        self._mark(offset, offset + len(data))

    def hole(self, start: int, end: int) -> None:
        """[start, end) is a hole in the slave's file: zeros, fetched without a read."""
        for fd in (self.memfd, self.shadow):
            if fd >= 0:
                linux.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, end - start)
        self._mark(start, end)

    def _mark(self, start: int, end: int) -> None:
        spans = sorted([*self.loaded, (start, end)])
        merged: list[tuple[int, int]] = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        self.loaded = merged

    def description(self, handle: int, *, writable: bool) -> int:
        """A new description of the pages for the program, through ``handle``'s link
        (fmhub closes its copy once installed)."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | O_CLOEXEC
        if writable and self.shadow < 0:
            self.shadow = _memfd(f"fsys-shadow:{self.number}")
            os.ftruncate(self.shadow, self.size)
            for lo, hi in self._data():
                self._copy(self.memfd, self.shadow, lo, hi)
        try:
            fd = os.open(self.link(handle), flags)
        except OSError as exc:
            raise Errno(exc.errno or errno.ENOMEM) from None
        self.mapped.add(handle)
        return fd

    def _data(self) -> Iterator[tuple[int, int]]:
        """The loaded ranges where the memfd holds pages (its holes are zeros in the
        shadow too, so they never differ)."""
        for lo, hi in self.loaded:
            at = lo
            while at < hi:
                try:
                    start = os.lseek(self.memfd, at, os.SEEK_DATA)
                except OSError:
                    break  # ENXIO: nothing but holes to the end
                if start >= hi:
                    break
                end = min(os.lseek(self.memfd, start, os.SEEK_HOLE), hi)
                yield start, end
                at = end

    @staticmethod
    def _copy(src: int, dst: int, lo: int, hi: int) -> None:
        for at in range(lo, hi, BLOCK):
            os.pwrite(dst, os.pread(src, min(BLOCK, hi - at), at), at)

    def written(self, offset: int, data: bytes) -> None:
        """The program wrote ``data`` at ``offset`` through a handle (the slave has it).
        A gap it leaves past the old end is zeros on the slave too: known, so loaded."""
        old = self.size
        for fd in (self.memfd, self.shadow):
            if fd >= 0:
                os.pwrite(fd, data, offset)
        self._mark(min(offset, old), offset + len(data))
        self.ours = True

    def truncated(self, length: int) -> None:
        """The handle's file was truncated (or extended) to ``length`` on the slave."""
        old = self.size
        for fd in (self.memfd, self.shadow):
            if fd >= 0:
                os.ftruncate(fd, length)
        self.loaded = [(lo, min(hi, length)) for lo, hi in self.loaded if lo < length]
        if length > old:  # extended: zeros on the slave as here
            self._mark(old, length)
        self.ours = True

    def changes(self) -> list[wire.Write]:
        """The writes that bring the slave up to date with the pages (none unless a
        shared read-write mapping was made); the shadow then counts them as done."""
        writer = self.writer()
        if self.shadow < 0 or not writer:
            return []
        ops: list[wire.Write] = []
        for start, hi in list(self._data()):
            for block in range(start, hi, BLOCK):  # compared a block at a time...
                end = min(block + BLOCK, hi)
                mine = os.pread(self.memfd, end - block, block)
                theirs = os.pread(self.shadow, end - block, block)
                if mine == theirs:
                    continue
                os.pwrite(self.shadow, mine, block)
                ops = self._pages_of(ops, writer, block, mine, theirs)
        if ops:
            self.ours = True
        return ops

    @staticmethod
    def _pages_of(
        ops: list[wire.Write], writer: int, block: int, mine: bytes, theirs: bytes
    ) -> list[wire.Write]:
        """...and written a page at a time, as the kernel writes a mapping back: only
        the pages that differ (another writer's bytes elsewhere are not overwritten)."""
        for rel in range(0, len(mine), PAGE):
            page = mine[rel : rel + PAGE]
            if page == theirs[rel : rel + PAGE]:
                continue
            at = block + rel
            last = ops[-1] if ops else None
            if (
                last
                and last.offset + len(last.data) == at
                and len(last.data) + len(page) <= wire.MAX_IO
            ):
                ops[-1] = wire.Write(handle=writer, offset=last.offset, rwf=0,
                                     data=last.data + page)  # fmt: skip
            else:
                ops.append(wire.Write(handle=writer, offset=at, rwf=0, data=page))
        return ops

    def close(self, watcher: Watcher) -> None:
        if self.memfd >= 0:
            watcher.unwatch(self.wd)
            os.close(self.memfd)
            self.memfd = -1
            for handle in list(self.handles):
                self.unlink(handle)
            try:
                os.unlink(self.store.path + b"/f%d" % self.number)
            except FileNotFoundError:
                pass
        if self.shadow >= 0:
            os.close(self.shadow)
            self.shadow = -1


def links_in_use(pids: Iterable[int], store: Store) -> set[int]:
    """The handles whose links (``store``'s ``h<handle>``) the processes ``pids`` hold,
    as fds or mappings (/proc/PID/fd, /proc/PID/maps)."""
    found: set[int] = set()
    if not store.made:
        return found
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            handle = store.handle_of(target)
            if handle is not None:
                found.add(handle)
        found |= mapped_handles(pid, 0, 1 << 64, store)
    return found


def mapped_handles(pid: int, start: int, end: int, store: Store) -> set[int]:
    """The handles whose links ``pid`` maps somewhere in [start, end) (/proc/pid/maps)."""
    found: set[int] = set()
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split(None, 5)
        if len(fields) < 6:
            continue
        handle = store.handle_of(fields[5].decode(errors="replace"))
        if handle is None:
            continue
        lo, hi = (int(x, 16) for x in fields[0].split(b"-"))
        if lo < end and start < hi:
            found.add(handle)
    return found
