"""Pages: the content of remote files that a program maps into its memory.

The kernel maps the pages of a file, and a placeholder is a socket, so mmap(2) of
a placeholder cannot work as it is. When a program maps a remote regular file,
fmhub fetches the file's content from the slave into a memfd of its own (one per
remote handle: its *pages*) and switches the program's fd to a description of that
memfd — ADDFD with SETFD at the same number and with the same close-on-exec flag —
before the call continues; the kernel then maps the memfd natively. What a program
sees:

- identity: the switched fd still names the same remote handle. It reads as
  ``/memfd:fsys:<handle> (deleted)`` in /proc, and fmhub checks the memfd's inode
  (fdinfo's ``ino``), so no program-made memfd passes for one; reads, writes, fstat,
  locks and every other call on it are forwarded as on the placeholder;
- access: a description is opened read-only for a private mapping, read-write for a
  shared mapping of a read-write handle, so the kernel itself answers EACCES for a
  shared writable mapping of an O_RDONLY fd; EACCES for a write-only handle, ENODEV
  for anything but a regular file, EBADF for O_PATH (the kernel's answers);
- lifetime: a native file stays open while mapped. inotify reports the release of
  each description handed out (IN_CLOSE_*, once no fd and no mapping holds it), and
  the remote handle is closed when its placeholder copies and its memfd
  descriptions are all gone;
- content: fetched at the first mmap, and fetched again at a later mmap only when
  the slave's inode, size or mtime has changed (a cache per handle); the program's
  own writes and truncates through the handle are applied to the pages as well, so
  a mapping sees them at once; SIGBUS beyond the end of the file, as natively;
- write-back: pages that a shared read-write mapping may change are compared with a
  snapshot of what the slave holds, and the differences are written to the slave at
  msync, at fsync, before any other call on the handle (so read(2) sees what the
  mapping wrote), when the last mapping and fd are gone (munmap and close, or the
  process's exit), and at the end of the session.

Processes that share the handle (fork, dup, SCM_RIGHTS) share the pages; two
separate opens of one slave file have separate pages, coherent only through the
slave (at write-back and the next mmap). A slave-side process sees a mapping's
writes once they are written back.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from fsys import protocol as wire
from fsys.errors import Errno
from fsys.linux import O_CLOEXEC

#: inotify events that report the release of a description (close of its last fd
#: and unmapping of its last mapping).
IN_CLOSE = 0x08 | 0x10  # IN_CLOSE_WRITE | IN_CLOSE_NOWRITE
IN_IGNORED = 0x8000
_EVENT = struct.Struct("=iIII")
#: The unit of write-back: a block differs from its snapshot or not.
BLOCK = 65536
MEMFD_PREFIX = "/memfd:fsys:"

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class Watcher:
    """One inotify instance: the release of each description of a memfd."""

    def __init__(self) -> None:
        self.fd = _check(_libc.inotify_init1(os.O_NONBLOCK | O_CLOEXEC))

    def watch(self, memfd: int) -> int:
        return _check(_libc.inotify_add_watch(self.fd, f"/proc/self/fd/{memfd}".encode(), IN_CLOSE))

    def unwatch(self, wd: int) -> None:
        _libc.inotify_rm_watch(self.fd, wd)

    def releases(self) -> Iterator[int]:
        """The watch of each description released since the last call (one per release)."""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            at = 0
            while at + _EVENT.size <= len(data):
                wd, mask, _cookie, size = _EVENT.unpack_from(data, at)
                at += _EVENT.size + size
                if mask & IN_CLOSE:
                    yield wd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(eq=False)
class Pages:
    """One remote handle's content in a memfd of fmhub's."""

    handle: int
    memfd: int
    inode: int
    wd: int
    #: The slave file's (dev, inode, size, mtime) when the pages last matched it.
    identity: tuple[int, ...] | None = None
    #: Descriptions of the memfd handed to the program and not yet released.
    views: int = 0
    #: What the slave holds, kept once a shared read-write mapping may change the pages.
    snapshot: bytearray | None = field(default=None, repr=False)

    @classmethod
    def create(cls, handle: int, watcher: Watcher) -> Pages:
        try:
            memfd = os.memfd_create(f"fsys:{handle}", os.MFD_CLOEXEC)
        except OSError as exc:
            raise Errno(exc.errno or errno.ENOMEM) from None
        try:
            wd = watcher.watch(memfd)
        except OSError as exc:
            os.close(memfd)
            raise Errno(exc.errno or errno.ENOMEM) from None
        return cls(handle, memfd, os.fstat(memfd).st_ino, wd)

    @property
    def size(self) -> int:
        return os.fstat(self.memfd).st_size

    def load(self, size: int, pieces: list[tuple[int, bytes]], identity: tuple[int, ...]) -> None:
        """The slave's content, fetched in ``pieces`` (offset, data), replaces the pages."""
        os.ftruncate(self.memfd, size)
        for offset, data in pieces:
            os.pwrite(self.memfd, data, offset)
        self.identity = identity
        if self.snapshot is not None:
            self.snapshot = bytearray(self._content())

    def _content(self) -> bytes:
        size = self.size
        return os.pread(self.memfd, size, 0) if size else b""

    def description(self, *, writable: bool) -> int:
        """A new description of the pages for the program (fmhub closes its copy once
        installed). Each one is counted until inotify reports its release."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | O_CLOEXEC
        try:
            fd = os.open(f"/proc/self/fd/{self.memfd}", flags)
        except OSError as exc:
            raise Errno(exc.errno or errno.ENOMEM) from None
        self.views += 1
        if writable and self.snapshot is None:
            self.snapshot = bytearray(self._content())
        return fd

    def written(self, offset: int, data: bytes) -> None:
        """The program wrote ``data`` at ``offset`` through the handle (the slave has it)."""
        os.pwrite(self.memfd, data, offset)
        if self.snapshot is not None:
            end = offset + len(data)
            if len(self.snapshot) < end:
                self.snapshot.extend(bytes(end - len(self.snapshot)))
            self.snapshot[offset:end] = data
        self.identity = None  # the slave's mtime moved: check again at the next mmap

    def truncated(self, length: int) -> None:
        """The handle's file was truncated (or extended) to ``length`` on the slave."""
        os.ftruncate(self.memfd, length)
        if self.snapshot is not None:
            del self.snapshot[length:]
            self.snapshot.extend(bytes(length - len(self.snapshot)))
        self.identity = None

    def changes(self) -> list[wire.Write]:
        """The writes that bring the slave up to date with the pages (none unless a
        shared read-write mapping was made); the snapshot then counts them as done."""
        snapshot = self.snapshot
        if snapshot is None:
            return []
        content = self._content()
        ops: list[wire.Write] = []
        size = min(len(content), len(snapshot))
        start = -1
        for at in range(0, size, BLOCK):
            differs = content[at : at + BLOCK] != snapshot[at : at + BLOCK]
            if differs and start < 0:
                start = at
            elif not differs and start >= 0:
                ops.extend(self._writes(content, start, at))
                start = -1
        if start >= 0:
            ops.extend(self._writes(content, start, size))
        if ops:
            snapshot[:size] = content[:size]
            self.identity = None
        return ops

    def _writes(self, content: bytes, start: int, end: int) -> Iterator[wire.Write]:
        for at in range(start, end, wire.MAX_IO):
            data = content[at : min(end, at + wire.MAX_IO)]
            yield wire.Write(handle=self.handle, offset=at, rwf=0, data=data)

    def close(self, watcher: Watcher) -> None:
        if self.memfd >= 0:
            watcher.unwatch(self.wd)
            os.close(self.memfd)
            self.memfd = -1


def mapped_handles(pid: int, start: int, end: int) -> set[int]:
    """The handles whose pages ``pid`` maps somewhere in [start, end) (/proc/pid/maps)."""
    found: set[int] = set()
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return found
    prefix = MEMFD_PREFIX.encode()
    for line in lines:
        fields = line.split(None, 5)
        if len(fields) < 6 or not fields[5].startswith(prefix):
            continue
        lo, hi = (int(x, 16) for x in fields[0].split(b"-"))
        if lo < end and start < hi:
            handle = handle_of(fields[5].decode(errors="replace"))
            if handle is not None:
                found.add(handle)
    return found


def handle_of(name: str) -> int | None:
    """The handle a ``/memfd:fsys:<handle> (deleted)`` name carries, if it is one."""
    if not name.startswith(MEMFD_PREFIX):
        return None
    digits = name[len(MEMFD_PREFIX) :].split(" ", 1)[0]
    return int(digits) if digits.isdigit() else None
