"""The executor: performs the master's operations as real system calls on the slave.

Theory of operation. The executor owns a *handle table*: one real fd per remote open
file description, named by a handle id the master keeps. Operations are plain
synchronous methods that return ``(result, blob)`` or raise OSError; fshub turns the
OSError into its errno for the wire, and decides whether an operation runs inline
or in a worker thread (``may_block``).

Confinement. With ``--root DIR`` every path the master sends is resolved inside DIR
with openat2(2) RESOLVE_IN_ROOT: ``..``, absolute symlinks and magic links cannot
leave it, exactly as if DIR were the root. Calls that act on the final component
without following it (mkdir, unlink, rename, symlink, readlink...) first resolve the
parent directory that way and then act on one plain name, which cannot escape.
Calls whose *at variant cannot take an O_PATH descriptor (chmod, xattrs...) reach
the resolved object through ``/proc/self/fd/N``, which names that object and nothing
else. Without ``--root`` the same code runs with a root of ``/``.

Paths from a directory handle are first tried with RESOLVE_BENEATH (the common case
needs no lookup of the handle's own path); a path that climbs above the handle is
retried from the root with the handle's current path in front.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import os
import select
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fsys import linux
from fsys import protocol as wire
from fsys.errors import FsysError
from fsys.linux import (
    AT_EACCESS,
    AT_EMPTY_PATH,
    AT_REMOVEDIR,
    AT_SYMLINK_FOLLOW,
    AT_SYMLINK_NOFOLLOW,
    O_CLOEXEC,
    O_DIRECTORY,
    O_NOCTTY,
    O_NOFOLLOW,
    O_NONBLOCK,
    O_PATH,
    RESOLVE_BENEATH,
    RESOLVE_IN_ROOT,
)
from fsys.protocol import (
    MAX_IO,
    REPLY_NO_XATTRS,
    REPLY_NOT_LINK,
    REPLY_WATCHED,
    SPECS,
    Operation,
    watch_key,
)
from fsys.slave.confinement import PRIVILEGE_XATTRS, Confinement, privileged
from fsys.slave.network import SocketOps
from fsys.slave.watches import Watches

Result = tuple[int, bytes]

_I64 = struct.Struct("<q")
_TIMESPECS = struct.Struct("=qqqq")

FIONREAD = 0x541B
FIONBIO = 0x5421
FIOQSIZE = 0x5460
FIGETBSZ = 2
FS_IOC_GETFLAGS = 0x80086601
FICLONE = 0x40049409
_INT_OUT_IOCTLS = {FIONREAD, FIGETBSZ, FS_IOC_GETFLAGS}

LOCK_NB = 4
LOCK_UN = 8
F_UNLCK = 2


#: Operations that change nothing a watched answer depends on (``fsys.slave.watches``):
#: after any other, fshub sends what changed before the reply.
UNCHANGING: frozenset[type] = frozenset(
    {wire.Stat, wire.Getdents, wire.Access, wire.Readlink, wire.Read, wire.Lseek,
     wire.Statfs, wire.Getxattr, wire.Listxattr, wire.HandlePath, wire.Chdir, wire.Close,
     wire.Lock, wire.Flock, wire.Listdir}
)  # fmt: skip
#: Open flags that may write or create: checked on a read-only slave.
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
_WRITE_OPEN = _WRITE_FLAGS | linux.O_CREAT
#: Operations on a handle that wait when the handle is a stream (pipe, socket, tty).
_ON_STREAMS: frozenset[type] = frozenset(
    {wire.Read, wire.Write, wire.Getdents, wire.Ioctl, wire.Fcntl, wire.Tty}
)
#: A COPY_RANGE of at most this much of a regular file is not threaded (``may_block``).
INLINE_COPY = 1 << 20
#: Operations that may wait on the disk whatever the file.
_SLOW: frozenset[type] = frozenset(
    {wire.Fsync, wire.Syncfs, wire.CopyRange, wire.Sendfile, wire.Fallocate}
)


class Watched(OSError):
    """An errno that is a watched answer: its reply carries ``flags`` (REPLY_*)."""

    def __init__(self, code: int, flags: int) -> None:
        super().__init__(code, os.strerror(code))
        self.flags = flags


def _opening(o: wire.OpenRead) -> wire.Open:
    """The OPEN an OPEN_READ begins with."""
    return wire.Open(dir=o.dir, flags=o.flags, mode=0, resolve=o.resolve, path=o.path)


def _creating(o: wire.Create) -> wire.Open:
    """The OPEN a CREATE begins with."""
    if not o.flags & linux.O_CREAT:
        raise OSError(errno.EINVAL, "CREATE creates (O_CREAT)")
    return wire.Open(dir=o.dir, flags=o.flags, mode=o.mode, resolve=o.resolve, path=o.path)


class MustBlock(FsysError):
    """Raised by an inline attempt that would block; fshub reruns it in a thread."""


@dataclass(eq=False)
class Handle:
    fd: int
    kind: int  # S_IFMT bits of the open file
    busy: int = 0
    closing: bool = False
    #: A directory opened by its ``watch_key`` path: its entries' answers are sent
    #: along with what GETDENTS reads of it (Attrs); a regular file opened so to
    #: write: its answer is sent after each WRITE (``written``).
    key: bytes | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: A socket of the session's own (SOCKET, ACCEPT): non-blocking, and its calls
    #: wait in trio, never in a thread (fsys.slave.network); ``socktype`` its type.
    net: bool = False
    socktype: int = 0

    @property
    def streamlike(self) -> bool:
        """True for pipes, sockets, terminals: reads and writes may block."""
        return self.kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFBLK)


_HOWS: dict[tuple[int, int, int], ctypes.Array[ctypes.c_char]] = {}


def _openat2(dirfd: int, path: bytes, flags: int, mode: int = 0, resolve: int = 0) -> int:
    key = (flags, mode, resolve)
    how = _HOWS.get(key)
    if how is None:  # a few combinations recur: keep their struct open_how
        if len(_HOWS) > 256:
            _HOWS.clear()
        how = _HOWS[key] = ctypes.create_string_buffer(linux.OPEN_HOW.pack(*key))
    return linux.openat2(dirfd, path, how)


#: The fields of the answers sent with a directory's entries.
PRIMED_MASK = linux.STATX_BASIC_STATS
LISTDIR_CHUNK = 64 << 10


def _watched_stat(
    parent: int,
    name: bytes,
    flags: int,
    mask: int,
    buf: ctypes.Array[ctypes.c_char] | None = None,
) -> tuple[int, bytes, int] | None:
    """STAT of ``name`` in the watched directory ``parent``: (result, struct statx,
    REPLY_* flags), or None for a symlink that the call follows (not watched).
    A file with several hard links is not watched: a change through another of its
    names is not reported to this directory."""
    if buf is None:
        buf = ctypes.create_string_buffer(linux.STATX_SIZE)
    try:
        linux.statx(parent, name, flags | AT_SYMLINK_NOFOLLOW, mask, buf)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
            return -exc.errno, b"", REPLY_WATCHED | REPLY_NOT_LINK
        raise
    raw = buf.raw
    kind = stat.S_IFMT(linux.statx_mode(raw))
    if kind == stat.S_IFLNK:
        return (0, raw, REPLY_WATCHED) if flags & AT_SYMLINK_NOFOLLOW else None
    if kind != stat.S_IFDIR and linux.statx_nlink(raw) > 1:
        return 0, raw, 0
    return 0, raw, REPLY_WATCHED | REPLY_NOT_LINK


def _no_xattrs(parent: int, name: bytes | None = None) -> bool:
    """Whether ``name`` in the directory ``parent`` (None: the file open as ``parent``)
    has no extended attribute; False if it cannot say (a file system without them
    refuses the question)."""
    try:
        if name is None:
            return not os.listxattr(parent)
        return not os.listxattr(b"/proc/self/fd/%d/%s" % (parent, name), follow_symlinks=False)
    except OSError:
        return False


def _proc_fd(fd: int) -> bytes:
    return b"/proc/self/fd/%d" % fd


def _drop_file_capability(target: int | bytes, follow: bool) -> None:
    """Remove a file's capability without CAP_SETFCAP (a root slave without
    --allow-setuid, or one that is not root), as the kernel does when a file is
    written: a chown that changes nothing drops it (and the setuid and setgid bits,
    which the write that follows would drop too). The FUSE view asks for this
    removal before it writes such a file. PermissionError if the file keeps it."""
    name = b"security.capability"
    try:
        os.getxattr(target, name, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            raise  # nothing to remove: as natively
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM)) from None
    os.chown(target, -1, -1, follow_symlinks=follow)
    try:
        os.getxattr(target, name, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return
    raise PermissionError(errno.EPERM, "the file keeps its capability")


class Executor(SocketOps):
    """Runs operations for one session, confined to ``root``."""

    def __init__(
        self,
        root: str = "/",
        *,
        lend: dict[int, int] | None = None,
        confinement: Confinement | None = None,
    ) -> None:
        self.confinement = confinement or Confinement()
        self._checks = self.confinement.checks
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise NotADirectoryError(errno.ENOTDIR, "root is not a directory", root)
        self.root_fd = os.open(self.root, O_PATH | O_DIRECTORY | O_CLOEXEC)
        self.confined = self.root != "/"
        self.handles: dict[int, Handle] = {}
        self.watches = Watches(self.root_fd, _openat2, confined=self.confined)
        #: Watched answers about directory entries read since the last ``take_attrs``.
        self.attrs: list[wire.Attr] = []
        self._ids = itertools.count(1)
        #: The slave's own standard streams that it lends the session (fd -> its copy),
        #: and the handle already given for each file among them.
        self.lent = dict(lend or {})
        self._lent_handles: dict[tuple[int, int, int], int] = {}
        #: Readable once the session is over: stream reads waiting in threads end
        #: without reading (``_wait_readable``), so nothing is taken from a terminal or
        #: a pipe that another process would have had.
        self._ended_r, self._ended_w = os.pipe2(O_CLOEXEC)
        #: Per worker thread: the CANCEL pipe of the call it runs (``cancelled_by``).
        self._thread = threading.local()
        #: The paths CREATE found changed before its STAT (``take_early``).
        self.early: list[bytes] | None = None
        #: Called with a socket's fd before it is closed (fshub: its waits end first).
        self.on_socket_close: Callable[[int], None] = lambda fd: None
        self._dispatch: dict[type, Callable[[Any], Result]] = {
            spec.record: getattr(self, "op_" + spec.op.name.lower())
            for spec in SPECS.values()
            if spec.record is not wire.Close
        }

    def close(self) -> None:
        if self._ended_w >= 0:
            os.close(self._ended_w)  # the waiting stream reads end
            self._ended_w = -1
        for handle_id in list(self.handles):
            self.op_close_handle(handle_id)
        self.watches.close()
        if self._ended_r >= 0:
            os.close(self._ended_r)
            self._ended_r = -1
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def hello(self, features: int) -> bool:
        """The master's HELLO: with FEATURE_WATCH it keeps a cache, so start watching
        (``fsys.slave.watches``); whether the slave watches now."""
        return bool(features & wire.FEATURE_WATCH) and self.watches.start()

    # --- dispatch -------------------------------------------------------------------

    def execute(self, op: Operation) -> Result:
        """Perform ``op``; raise OSError for an errno, MustBlock to be rerun in a thread."""
        if type(op) is wire.Close:
            self.op_close_handle(op.handle)
            return 0, b""
        if self._checks:
            op = self.confinement.check(op)
        return self._dispatch[type(op)](op)

    def may_block(self, op: Operation) -> bool:
        """True if ``op`` may wait for something else (a peer, a lock, the disk)."""
        kind = type(op)
        if kind in _ON_STREAMS:
            handle = self.handles.get(op.handle)  # type: ignore[union-attr]
            return handle is not None and handle.streamlike and not handle.net
        if kind is wire.Lock:  # a waiting lock blocks; an unlock never does
            assert isinstance(op, wire.Lock)
            if op.cmd not in (linux.F_SETLKW, linux.F_OFD_SETLKW) or not op.flock:
                return False
            return len(op.flock) < 2 or op.flock[0] != F_UNLCK
        if kind is wire.Flock:
            assert isinstance(op, wire.Flock)
            return not op.operation & (LOCK_NB | LOCK_UN)
        if kind is wire.CopyRange:
            assert isinstance(op, wire.CopyRange)
            return not self._copies_little(op)
        return kind in _SLOW

    def _copies_little(self, op: wire.CopyRange) -> bool:
        """Whether a COPY_RANGE copies at most INLINE_COPY bytes, from a regular file
        to another (as quick as a READ, which is not threaded: cp's copy of a small
        file, the most common; a thread would cost more than the copy)."""
        try:
            src, dst = self.fd(op.src), self.fd(op.dst)
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode) or not stat.S_ISREG(os.fstat(dst).st_mode):
                return False
            start = op.off_in if op.off_in >= 0 else os.lseek(src, 0, os.SEEK_CUR)
        except OSError:
            return False  # (the thread reports it)
        return min(op.length, st.st_size - start) <= INLINE_COPY

    def execute_blocking(self, op: Operation) -> Result:
        """Perform ``op`` in a worker thread: an open may wait for a FIFO's peer."""
        if self._checks:
            op = self.confinement.check(op)
        if isinstance(op, wire.Open):
            return self.op_open(op, blocking=True)
        if isinstance(op, wire.OpenRead):  # not a regular file (it would not block)
            return self.op_open(_opening(op), blocking=True)
        if isinstance(op, wire.Create):  # a FIFO that was there: STAT it (no blob)
            return self.op_open(_creating(op), blocking=True)[0], b""
        # The handles this call uses stay open until it is done, even if a CLOSE for
        # one of them arrives meanwhile (its fd number must not be reused under us).
        if isinstance(op, wire.CopyRange):
            ids: tuple[int, ...] = (op.src, op.dst)
        elif isinstance(op, wire.Sendfile):
            ids = (op.out, op.src)
        else:
            ids = (getattr(op, "handle", 0),)
        held: list[Handle] = []
        try:
            for handle_id in ids:
                handle = self.handles.get(handle_id)
                if handle is None:
                    continue
                with handle.lock:
                    if handle.closing:
                        raise OSError(errno.EBADF, "closed")
                    handle.busy += 1
                held.append(handle)
            return self.execute(op)
        finally:
            for handle in held:
                with handle.lock:
                    handle.busy -= 1
                    release = handle.closing and not handle.busy
                if release:
                    os.close(handle.fd)

    # --- handles and resolution -------------------------------------------------------

    def fd(self, handle_id: int) -> int:
        handle = self.handles.get(handle_id)
        if handle is None:
            raise OSError(errno.EBADF, "no such handle")
        return handle.fd

    def _dir_fd(self, dir_id: int) -> int:
        return self.root_fd if dir_id == 0 else self.fd(dir_id)

    def _new_handle(self, fd: int) -> int:
        if len(self.handles) >= self.confinement.max_handles:
            raise OSError(errno.EMFILE, "too many handles for one session (--max-handles)")
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        handle_id = next(self._ids)
        self.handles[handle_id] = Handle(fd, kind)
        return handle_id

    def op_close_handle(self, handle_id: int) -> None:
        handle = self.handles.pop(handle_id, None)
        if handle is None:
            return
        with handle.lock:
            handle.closing = True
            release = not handle.busy
        if handle.net:
            self.on_socket_close(handle.fd)  # a task waiting on it ends first
        if release:
            os.close(handle.fd)

    def root_relative(self, real: bytes) -> bytes:
        """The slave path ``real`` as the master sees it (from the root)."""
        root = os.fsencode(self.root)
        if not self.confined:
            return real
        if real == root:
            return b"/"
        if real.startswith(root + b"/"):
            return real[len(root) :]
        raise OSError(errno.ENOENT, "outside the root")

    def _fd_path(self, fd: int) -> bytes:
        real = os.readlink(_proc_fd(fd))
        if real.endswith(b" (deleted)"):
            raise OSError(errno.ENOENT, "deleted")
        return self.root_relative(real)

    def open_at(self, dir_id: int, path: bytes, flags: int, mode: int = 0, resolve: int = 0) -> int:
        """openat2 from ``dir_id`` (0: the root) with the session's confinement.

        An empty path with a handle reopens the handle's file, as an open of
        /proc/self/fd/N does (the file is inside the root already).
        """
        base = self._dir_fd(dir_id)
        flags |= O_CLOEXEC
        if not path and dir_id:
            return os.open(_proc_fd(base), flags, mode)
        if not self.confined:
            return _openat2(base, path, flags, mode, resolve)
        if dir_id == 0 or path.startswith(b"/"):
            if resolve & RESOLVE_BENEATH and path.startswith(b"/"):
                raise OSError(errno.EXDEV, "an absolute path is never beneath")
            resolve &= ~RESOLVE_BENEATH  # beneath the root: what RESOLVE_IN_ROOT keeps
            return _openat2(self.root_fd, path, flags, mode, resolve | RESOLVE_IN_ROOT)
        if resolve & (RESOLVE_BENEATH | RESOLVE_IN_ROOT):
            return _openat2(base, path, flags, mode, resolve)  # stricter than our root
        try:
            return _openat2(base, path, flags, mode, resolve | RESOLVE_BENEATH)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        full = self._fd_path(base) + b"/" + path
        return _openat2(self.root_fd, full, flags, mode, resolve | RESOLVE_IN_ROOT)

    def _object(self, dir_id: int, path: bytes, flags: int) -> tuple[int, bool]:
        """An fd for the object ``path`` names (O_PATH), and whether to close it.

        ``flags`` are AT_* flags: AT_EMPTY_PATH with an empty path names the directory
        handle itself; AT_SYMLINK_NOFOLLOW names a final symlink itself.
        """
        if not path:
            if flags & AT_EMPTY_PATH:
                return self._dir_fd(dir_id), False
            raise OSError(errno.ENOENT, "empty path")
        oflags = O_PATH | (O_NOFOLLOW if flags & AT_SYMLINK_NOFOLLOW else 0)
        if path.endswith(b"/"):
            oflags = O_PATH | O_DIRECTORY  # a trailing slash follows and wants a directory
        return self.open_at(dir_id, path, oflags), True

    def _parent(self, dir_id: int, path: bytes) -> tuple[int, bytes]:
        """(fd of the parent directory, last component) for calls on a name itself."""
        if not path:
            raise OSError(errno.ENOENT, "empty path")
        stripped = path.rstrip(b"/")
        if not stripped:  # "/" or "///": the root itself
            return self.open_at(dir_id, b"/", O_PATH | O_DIRECTORY), b"."
        head, _, name = stripped.rpartition(b"/")
        if name in (b".", b".."):
            return self.open_at(dir_id, stripped, O_PATH | O_DIRECTORY), b"."
        if not _:
            head = b"."
        elif not head:
            head = b"/"
        return self.open_at(dir_id, head, O_PATH | O_DIRECTORY), name

    # --- operations -----------------------------------------------------------------

    def op_open(self, o: wire.Open, *, blocking: bool = False) -> Result:
        try:
            return self._open(o, blocking=blocking)
        except FileNotFoundError as exc:
            if o.dir or o.resolve or o.flags & linux.O_CREAT or not self.watches.enabled:
                raise
            # Nothing by that name, and nothing will be unless a watched entry changes:
            # as a watched STAT would say (the master keeps that answer).
            try:
                answer = self.stat(wire.Stat(dir=0, flags=AT_SYMLINK_NOFOLLOW, mask=0, path=o.path))
            except OSError:
                raise exc from None
            if answer[0] == -errno.ENOENT and answer[2] & REPLY_WATCHED:
                raise Watched(errno.ENOENT, answer[2]) from exc
            raise

    def op_open_read(self, o: wire.OpenRead) -> Result:
        if o.flags & wire.OPEN_READ_REFUSES or o.flags & linux.O_TMPFILE == linux.O_TMPFILE:
            raise OSError(errno.EINVAL, "OPEN_READ opens to read only")
        handle_id, kind = self.op_open(_opening(o))
        if kind[0] << 12 != stat.S_IFREG or o.size <= 0:
            return handle_id, kind
        try:
            data = os.pread(self.fd(handle_id), min(o.size, MAX_IO), 0)
        except OSError:
            data = b""  # (a READ reports it)
        return handle_id, kind + data

    def create(self, o: wire.Create) -> tuple[int, bytes, int]:
        """CREATE: (handle, struct statx and what changed until the open, REPLY_*
        flags). What changes after the open stays queued, to be invalidated after the
        reply: the STAT that follows the open sees the first, maybe not the second.
        (If the STAT fails, or many paths changed, they go in INVALIDATEs before the
        reply: ``take_early``.)"""
        if self._checks:
            o = self.confinement.check(o)
        handle_id, _ = self.op_open(_creating(o))
        self.early = self.watches.changes() if self.watches.enabled else []
        try:
            result, raw, flags = self.stat(
                wire.Stat(dir=o.dir, flags=AT_SYMLINK_NOFOLLOW, mask=o.mask, path=o.path)
            )
            if result < 0:
                raise OSError(-result, os.strerror(-result))
            if flags & REPLY_WATCHED and _no_xattrs(self.fd(handle_id)):
                flags |= REPLY_NO_XATTRS
        except OSError:
            self.op_close_handle(handle_id)
            raise
        changed = wire.encode_paths(self.early)
        if len(changed) > wire.MAX_SMALL:
            return handle_id, raw, flags  # (many: in INVALIDATEs before the reply)
        self.early = []  # (in the reply: nothing more before it)
        return handle_id, raw + changed, flags

    def op_create(self, o: wire.Create) -> Result:
        handle_id, raw, _ = self.create(o)
        return handle_id, raw

    def take_early(self) -> list[bytes] | None:
        """What the last CREATE found changed before it and did not reply with; None
        if it looked at nothing (its open failed, or waited in a thread): what changed
        is found now."""
        early, self.early = self.early, None
        return early

    def _open(self, o: wire.Open, *, blocking: bool = False) -> Result:
        dir_id, flags, mode, resolve, path = o
        flags &= ~O_CLOEXEC
        if flags & _WRITE_OPEN and self.confinement.read_only:
            flags, mode = self._read_only_open(o), 0  # (openat2: no mode without O_CREAT)
        if not flags & O_PATH:
            flags |= O_NOCTTY  # never take the slave's terminal (openat2 refuses it with O_PATH)
        if blocking or flags & (O_PATH | O_NONBLOCK):
            fd = self.open_at(dir_id, path, flags, mode, resolve)
        else:
            # Open without blocking first: a FIFO or device must wait in a thread, and
            # is reopened there; a regular file or directory is kept.
            try:
                fd = self.open_at(dir_id, path, flags | O_NONBLOCK, mode, resolve)
            except OSError as exc:
                if exc.errno in (errno.ENXIO, errno.EAGAIN):
                    raise MustBlock from exc
                raise
            kind = stat.S_IFMT(os.fstat(fd).st_mode)
            if kind not in (stat.S_IFREG, stat.S_IFDIR):
                os.close(fd)
                raise MustBlock
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_NONBLOCK)
        read_only = self.confinement.read_only
        if flags & _WRITE_FLAGS and read_only and stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)  # a file put there since _read_only_open looked: nothing written yet
            raise OSError(errno.EROFS, "the slave is read-only")
        try:
            handle_id = self._new_handle(fd)
        except BaseException:
            os.close(fd)
            raise
        handle = self.handles[handle_id]
        if (
            not dir_id
            and self.watches.enabled
            and (
                handle.kind == stat.S_IFDIR
                or (
                    handle.kind == stat.S_IFREG
                    and flags & _WRITE_FLAGS
                    and flags & linux.O_TMPFILE != linux.O_TMPFILE  # (its path: a directory)
                )
            )
        ):
            handle.key = path if path == b"/" or watch_key(path) == path else None
        return handle_id, bytes([handle.kind >> 12])

    def _read_only_open(self, o: wire.Open) -> int:
        """The flags an open that may write or create runs with on a read-only slave,
        or its errno, as on a read-only mount: EROFS to write or truncate a regular
        file, or to create one; an existing file opened with O_CREAT opens (EEXIST with
        O_EXCL, EISDIR for a directory)."""
        flags = o.flags
        if flags & linux.O_TMPFILE == linux.O_TMPFILE:
            raise OSError(errno.EROFS, "the slave is read-only")
        try:
            follow = flags & (O_NOFOLLOW | O_DIRECTORY)
            fd = self.open_at(o.dir, o.path, O_PATH | follow, 0, o.resolve)
        except FileNotFoundError:
            if not flags & linux.O_CREAT:
                raise
            parent, _ = self._parent(o.dir, o.path)  # ENOENT: no directory to create in
            os.close(parent)
            raise OSError(errno.EROFS, "the slave is read-only") from None
        try:
            mode = os.fstat(fd).st_mode
        finally:
            os.close(fd)
        if flags & linux.O_CREAT:
            if flags & os.O_EXCL:
                raise OSError(errno.EEXIST, "exists")
            if stat.S_ISDIR(mode):
                raise OSError(errno.EISDIR, "is a directory")
        if flags & _WRITE_FLAGS and stat.S_ISREG(mode):
            raise OSError(errno.EROFS, "the slave is read-only")
        # Anything else opens as it would on a read-only mount: a directory or a final
        # symlink refuses to be written (EISDIR, ELOOP), a device, FIFO or socket may be.
        # O_TRUNC does nothing to what is left; without O_CREAT nothing is made.
        return flags & ~(linux.O_CREAT | os.O_EXCL | os.O_TRUNC)

    def cancelled_by(self, fd: int) -> None:
        """This thread's call ends, if it is waiting and has taken nothing, when ``fd``
        becomes readable (fshub's CANCEL pipe; -1: none)."""
        self._thread.cancel = fd

    def _wait_readable(self, fd: int) -> None:
        """Until the stream ``fd`` has data (or EOF, an error), without reading it;
        EINTR if the session ends first, or the master cancels the call."""
        ended = self._ended_r  # (close() sets the attribute to -1)
        if ended < 0:
            raise OSError(errno.EINTR, "the session is over")
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(ended, select.POLLIN)
        cancel = getattr(self._thread, "cancel", -1)
        if cancel >= 0:
            poller.register(cancel, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if ended in ready:
                raise OSError(errno.EINTR, "the session is over")
            if cancel in ready:
                raise OSError(errno.EINTR, "cancelled: the program got a signal")
            if fd in ready:
                return

    def op_read(self, o: wire.Read) -> Result:
        handle_id, count, offset, rwf = o
        fd = self.fd(handle_id)
        count = max(0, min(count, MAX_IO))
        handle = self.handles.get(handle_id)
        if handle is not None and handle.net:
            return self.net_read(handle, count)
        if handle is not None and handle.streamlike and offset < 0 and not rwf:
            # A blocking stream's read waits here, where the session's end stops it.
            while os.get_blocking(fd):
                self._wait_readable(fd)
                try:
                    data = os.read(fd, count)
                except BlockingIOError:
                    continue  # another reader took it first
                return len(data), data
        if rwf:  # preadv2(2) flags: the kernel checks them (EOPNOTSUPP if unknown)
            buf = bytearray(count)
            n = os.preadv(fd, [buf], offset, rwf)
            return n, bytes(buf[:n])
        data = os.read(fd, count) if offset < 0 else os.pread(fd, count, offset)
        return len(data), data

    def op_write(self, o: wire.Write) -> Result:
        handle_id, offset, rwf, data = o
        fd = self.fd(handle_id)
        handle = self.handles.get(handle_id)
        if handle is not None and handle.net:
            return self.net_write(handle, data)
        if rwf:  # pwritev2(2) flags, RWF_APPEND among them
            return os.pwritev(fd, [data], offset, rwf), b""
        n = os.write(fd, data) if offset < 0 else os.pwrite(fd, data, offset)
        return n, b""

    def op_lseek(self, o: wire.Lseek) -> Result:
        return os.lseek(self.fd(o.handle), o.offset, o.whence), b""

    def stat(self, o: wire.Stat) -> tuple[int, bytes, int]:
        """STAT, watched where it can be: (result or -errno, struct statx, REPLY_* flags).

        A path in its ``watch_key`` form, from the root, whose directories can all be
        watched (``fsys.slave.watches``) is looked up as one name in its watched
        parent, so the answer depends on nothing unwatched: it is REPLY_WATCHED, and
        REPLY_NOT_LINK unless the name is a symlink (a followed symlink's answer
        depends on its target: not watched). A file with several hard links is not
        watched either: a change through another of its names is not seen here.
        """
        dir_id, flags, mask, path = o
        if (
            dir_id
            or flags & (AT_EMPTY_PATH | linux.AT_STATX_FORCE_SYNC)
            or not self.watches.enabled
            or watch_key(path) != path
        ):
            return (*self.execute(o), 0)
        where = self.watches.parent(path)
        if where is None:
            if self.watches.missing:  # a directory on the way is not there
                return -self.watches.missing, b"", REPLY_WATCHED | REPLY_NOT_LINK
            return (*self.execute(o), 0)
        answer = _watched_stat(*where, flags, mask)
        if answer is None:  # a symlink, followed: its answer depends on its target
            return (*self.execute(o), 0)
        return answer

    def op_stat(self, o: wire.Stat) -> Result:
        dir_id, flags, mask, path = o
        buf = ctypes.create_string_buffer(linux.STATX_SIZE)
        if not self.confined and path:  # one statx(2), the common case
            base = self.root_fd if dir_id == 0 else self.fd(dir_id)
            linux.statx(base, path, flags, mask, buf)
            return 0, buf.raw
        fd, owned = self._object(dir_id, path, flags)
        try:
            linux.statx(fd, b"", AT_EMPTY_PATH | (flags & linux.AT_STATX_SYNC_TYPE), mask, buf)
            return 0, buf.raw
        finally:
            if owned:
                os.close(fd)

    def op_getdents(self, o: wire.Getdents) -> Result:
        handle_id, count = o
        count = max(0, min(count, MAX_IO))
        buf = ctypes.create_string_buffer(count)
        handle = self.handles.get(handle_id)
        n = linux.getdents64(self.fd(handle_id), buf, count)
        raw = buf.raw[:n]
        if handle is not None and handle.key is not None and n:
            self._prime(handle.key, raw)
        return n, raw

    def listdir(self, o: wire.Listdir) -> tuple[int, bytes, int]:
        """LISTDIR: (length, the records, REPLY_WATCHED if the directory is watched)."""
        fd = self.open_at(o.dir, o.path, os.O_RDONLY | O_DIRECTORY)
        try:
            chunks: list[bytes] = []
            total = 0
            buf = ctypes.create_string_buffer(LISTDIR_CHUNK)
            while n := linux.getdents64(fd, buf, LISTDIR_CHUNK):
                total += n
                if total > MAX_IO:
                    raise OSError(errno.EFBIG, "directory too large for one reply")
                chunks.append(buf.raw[:n])
        finally:
            os.close(fd)
        raw = b"".join(chunks)
        key = o.path if o.path == b"/" or watch_key(o.path) == o.path else None
        if o.dir or key is None or not self.watches.enabled:
            return total, raw, 0
        if raw:
            self._prime(key, raw)
        watched = self.watches.parent(key + b"/.") is not None
        return total, raw, REPLY_WATCHED if watched else 0

    def op_listdir(self, o: wire.Listdir) -> Result:
        result, raw, _ = self.listdir(o)
        return result, raw

    def _prime(self, key: bytes, entries: bytes) -> None:
        """The watched answers about the entries just read of the directory ``key``
        (what a program that lists a directory asks next: ls -l, git status...)."""
        where = self.watches.parent(key + b"/.")
        if where is None:
            return
        parent = where[0]
        base = key if key != b"/" else b""
        attrs = self.attrs
        buf = ctypes.create_string_buffer(linux.STATX_SIZE)
        for name in linux.dirent_names(entries):
            if name in (b".", b".."):
                continue
            answer = _watched_stat(parent, name, AT_SYMLINK_NOFOLLOW, PRIMED_MASK, buf)
            if answer is None or not answer[2]:
                continue
            result, raw, flags = answer
            if not result and _no_xattrs(parent, name):
                flags |= REPLY_NO_XATTRS
            attrs.append(wire.Attr(base + b"/" + name, result, flags, raw))

    def written(self, op: Operation) -> list[wire.Attr]:
        """The watched answer about the file a WRITE or COPY_RANGE wrote, if it was
        opened by its ``watch_key`` path and its directory is watched: sent after the
        INVALIDATE of what changed, so the master's next stat of it needs no slave
        (a program that writes a file and reads it back: the kernel asks its size).
        Taken now, after that INVALIDATE's changes: a later change is invalidated
        later."""
        handle = self.handles.get(op.handle if type(op) is wire.Write else op.dst)  # type: ignore[union-attr]
        key = handle.key if handle is not None and handle.kind == stat.S_IFREG else None
        if key is None:
            return []
        cut = key.rfind(b"/")
        known = self.watches.dirs.get(key[:cut] or b"/")
        if known is None:
            return []
        try:
            answer = _watched_stat(known[1], key[cut + 1 :], AT_SYMLINK_NOFOLLOW, PRIMED_MASK)
        except OSError:
            return []  # (EIO, ESTALE: no answer to give; the INVALIDATE stands)
        if answer is None or not answer[2] & REPLY_WATCHED:
            return []
        result, raw, flags = answer
        return [wire.Attr(key, result, flags, raw)]

    def take_attrs(self) -> list[wire.Attr]:
        attrs, self.attrs = self.attrs, []
        return attrs

    def op_access(self, o: wire.Access) -> Result:
        dir_id, mode, flags, path = o
        fd, owned = self._object(dir_id, path, flags)
        try:
            linux.faccessat2(fd, b"", mode, AT_EMPTY_PATH | (flags & AT_EACCESS))
            return 0, b""
        finally:
            if owned:
                os.close(fd)

    def op_readlink(self, o: wire.Readlink) -> Result:
        dir_id, size, path = o
        if not path:  # readlinkat(fd, ""): the link an O_PATH|O_NOFOLLOW handle names
            if not dir_id:
                raise OSError(errno.ENOENT, "empty path")
            target = os.readlink(b"", dir_fd=self._dir_fd(dir_id))[: max(size, 0)]
            return len(target), target
        parent, name = self._parent(dir_id, path)
        try:
            if path.endswith(b"/"):
                raise OSError(errno.EINVAL, "not a symlink")
            target = os.readlink(name, dir_fd=parent)
        finally:
            os.close(parent)
        target = target[: max(size, 0)]
        return len(target), target

    def _at_name(
        self, dir_id: int, path: bytes, act: Callable[[int, bytes], None], *, create: bool = False
    ) -> Result:
        """Act on the last component of ``path`` in its (confined) parent directory.

        ``create``: the call makes a non-directory, which a trailing slash forbids.
        """
        if create and path.endswith(b"/"):
            raise OSError(errno.ENOENT, "a trailing slash names a directory")
        parent, name = self._parent(dir_id, path)
        try:
            act(parent, name)
        finally:
            os.close(parent)
        return 0, b""

    def op_mkdir(self, o: wire.Mkdir) -> Result:
        mode = o.mode
        return self._at_name(o.dir, o.path, lambda d, n: os.mkdir(n, mode, dir_fd=d))

    def op_mknod(self, o: wire.Mknod) -> Result:
        dir_id, mode, dev, path = o
        if self.confined and stat.S_IFMT(mode) in (stat.S_IFBLK, stat.S_IFCHR):
            # A device node inside the root would reach outside it (the raw disk).
            raise OSError(errno.EPERM, "no device nodes inside --root")
        # The wire carries the kernel's encoding of dev_t (new_encode_dev).
        major, minor = (dev >> 8) & 0xFFF, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
        device = os.makedev(major, minor)
        return self._at_name(
            dir_id, path, lambda d, n: os.mknod(n, mode, device, dir_fd=d), create=True
        )

    def op_unlink(self, o: wire.Unlink) -> Result:
        dir_id, flags, path = o
        if flags & AT_REMOVEDIR:
            return self._at_name(dir_id, path, lambda d, n: os.rmdir(n, dir_fd=d))
        if path.endswith(b"/"):
            fd, _ = self._object(dir_id, path, 0)  # ENOENT, or a directory: EISDIR
            os.close(fd)
            raise OSError(errno.EISDIR, "is a directory")
        return self._at_name(dir_id, path, lambda d, n: os.unlink(n, dir_fd=d))

    def _is_dir(self, dir_id: int, path: bytes) -> bool | None:
        """Whether ``path`` is a directory (not following a final symlink); None if absent."""
        try:
            fd, owned = self._object(dir_id, path.rstrip(b"/") or b"/", AT_SYMLINK_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            return stat.S_ISDIR(os.fstat(fd).st_mode)
        finally:
            if owned:
                os.close(fd)

    def op_rename(self, o: wire.Rename) -> Result:
        olddir, newdir, flags, old, new = o
        # A trailing slash on either name wants the source to be a directory.
        slash = old.endswith(b"/") or new.endswith(b"/")
        if slash and self._is_dir(olddir, old) is False:
            raise OSError(errno.ENOTDIR, "not a directory")
        old_parent, old_name = self._parent(olddir, old)
        try:
            new_parent, new_name = self._parent(newdir, new)
            try:
                linux.renameat2(old_parent, old_name, new_parent, new_name, flags)
            finally:
                os.close(new_parent)
        finally:
            os.close(old_parent)
        return 0, b""

    def op_link(self, o: wire.Link) -> Result:
        olddir, newdir, flags, old, new = o
        follow = bool(flags & AT_SYMLINK_FOLLOW)
        source, owned = self._object(
            olddir, old, (flags & AT_EMPTY_PATH) | (0 if follow else AT_SYMLINK_NOFOLLOW)
        )
        try:
            if new.endswith(b"/"):
                raise OSError(errno.ENOENT, "a trailing slash names a directory")
            if self.confinement.no_setuid and privileged(os.fstat(source).st_mode):
                raise OSError(errno.EPERM, "no links to setuid files from this slave")
            new_parent, new_name = self._parent(newdir, new)
            try:
                # linkat(2) of /proc/self/fd/N with AT_SYMLINK_FOLLOW links the object
                # N names (even a symlink opened with O_NOFOLLOW) and needs no privilege.
                os.link(_proc_fd(source), new_name, dst_dir_fd=new_parent, follow_symlinks=True)
            finally:
                os.close(new_parent)
        finally:
            if owned:
                os.close(source)
        return 0, b""

    def op_symlink(self, o: wire.Symlink) -> Result:
        target = o.target
        return self._at_name(
            o.dir, o.path, lambda d, n: os.symlink(target, n, dir_fd=d), create=True
        )

    def op_chmod(self, o: wire.Chmod) -> Result:
        dir_id, mode, flags, path = o
        no_setuid = self.confinement.no_setuid
        if flags & AT_SYMLINK_NOFOLLOW and path:
            if no_setuid:
                mode = self.confinement.mode_bits(mode, directory=bool(self._is_dir(dir_id, path)))

            def chmod_name(d: int, n: bytes) -> None:
                linux.fchmodat2(d, n, mode, AT_SYMLINK_NOFOLLOW)

            return self._at_name(dir_id, path, chmod_name)
        fd, owned = self._object(dir_id, path, flags)
        try:
            if no_setuid:
                directory = stat.S_ISDIR(os.fstat(fd).st_mode)
                mode = self.confinement.mode_bits(mode, directory=directory)
            os.chmod(_proc_fd(fd), mode)
        finally:
            if owned:
                os.close(fd)
        return 0, b""

    def op_chown(self, o: wire.Chown) -> Result:
        dir_id, uid, gid, flags, path = o
        fd, owned = self._object(dir_id, path, flags)
        try:
            linux.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH)
        finally:
            if owned:
                os.close(fd)
        return 0, b""

    def op_truncate(self, o: wire.Truncate) -> Result:
        dir_id, length, path = o
        fd = self.open_at(dir_id, path, os.O_WRONLY | O_NONBLOCK)
        try:
            os.ftruncate(fd, length)
        finally:
            os.close(fd)
        return 0, b""

    def op_ftruncate(self, o: wire.Ftruncate) -> Result:
        os.ftruncate(self.fd(o.handle), o.length)
        return 0, b""

    def op_fsync(self, o: wire.Fsync) -> Result:
        fd = self.fd(o.handle)
        if o.datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)
        return 0, b""

    def op_utimens(self, o: wire.Utimens) -> Result:
        dir_id, flags, path = o.dir, o.flags, o.path
        spec = ctypes.create_string_buffer(_TIMESPECS.pack(o.asec, o.ansec, o.msec, o.mnsec))
        if flags & AT_SYMLINK_NOFOLLOW and path:

            def touch_name(d: int, n: bytes) -> None:
                linux.utimensat(d, n, spec, AT_SYMLINK_NOFOLLOW)

            return self._at_name(dir_id, path, touch_name)
        fd, owned = self._object(dir_id, path, flags)
        try:
            linux.utimensat(linux.AT_FDCWD, _proc_fd(fd), spec, 0)
        finally:
            if owned:
                os.close(fd)
        return 0, b""

    def op_statfs(self, o: wire.Statfs) -> Result:
        fd, owned = self._object(o.dir, o.path, o.flags)
        try:
            buf = ctypes.create_string_buffer(linux.STATFS.size)
            linux.fstatfs(fd, buf)
            return 0, buf.raw
        finally:
            if owned:
                os.close(fd)

    def op_fcntl(self, o: wire.Fcntl) -> Result:
        handle_id, cmd, arg = o
        fd = self.fd(handle_id)
        if cmd == linux.F_GETFL:
            return fcntl.fcntl(fd, cmd), b""
        if cmd == linux.F_SETFL:
            return fcntl.fcntl(fd, cmd, arg & 0xFFFFFFFF), b""
        raise OSError(errno.EINVAL, "fcntl command not forwarded")

    def op_lock(self, o: wire.Lock) -> Result:
        # Record locks become open-file-description locks: every master process is
        # served by this one slave process, so per-process POSIX locks would never
        # conflict between them; a description is what each of them opened.
        handle_id, cmd, flock = o
        ofd = {linux.F_GETLK: linux.F_OFD_GETLK, linux.F_SETLK: linux.F_OFD_SETLK,
               linux.F_SETLKW: linux.F_OFD_SETLKW}.get(cmd, cmd)  # fmt: skip
        if ofd not in (linux.F_OFD_GETLK, linux.F_OFD_SETLK, linux.F_OFD_SETLKW):
            raise OSError(errno.EINVAL, "not a lock command")
        ltype, whence, start, length, _pid = linux.FLOCK.unpack(flock)
        arg = linux.FLOCK.pack(ltype, whence, start, length, 0)
        out = fcntl.fcntl(self.fd(handle_id), ofd, arg)
        return 0, bytes(out)

    def op_flock(self, o: wire.Flock) -> Result:
        fcntl.flock(self.fd(o.handle), o.operation)
        return 0, b""

    def op_ioctl(self, o: wire.Ioctl) -> Result:
        handle_id, request, arg = o
        fd = self.fd(handle_id)
        if request in _INT_OUT_IOCTLS:
            buf = bytearray(8)
            fcntl.ioctl(fd, request, buf, True)
            value = int.from_bytes(buf[:4], "little", signed=True)
            return 0, _I64.pack(value)
        if request == FIOQSIZE:
            buf = bytearray(8)
            fcntl.ioctl(fd, request, buf, True)
            return 0, bytes(buf)
        if request == FIONBIO:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | O_NONBLOCK if arg else flags & ~O_NONBLOCK)
            return 0, b""
        if request == FICLONE:
            return fcntl.ioctl(fd, request, self.fd(arg)), b""
        raise OSError(errno.ENOTTY, "ioctl not forwarded")

    def op_tty(self, o: wire.Tty) -> Result:
        handle_id, request, arg, size, data = o
        fd = self.fd(handle_id)
        shape = linux.TTY_IOCTLS.get(request & 0xFFFFFFFF)
        if shape is None:
            raise OSError(errno.ENOTTY, "terminal ioctl not forwarded")
        reads, writes = shape
        if len(data) != reads or size != writes:
            raise OSError(errno.EINVAL, "terminal ioctl of the wrong size")
        if not reads and not writes:
            return fcntl.ioctl(fd, request, arg), b""
        buf = bytearray(data) if reads else bytearray(writes)
        result = fcntl.ioctl(fd, request, buf, True)
        return result, bytes(buf) if writes else b""

    def op_lend(self, o: wire.Lend) -> Result:
        """A handle of the slave's own standard stream ``o.fd``: one per file, so that
        a terminal on fds 0, 1 and 2 is one stream for the master too."""
        copy = self.lent.get(o.fd)
        if copy is None:
            raise OSError(errno.EBADF, "this slave lends no such stream")
        st = os.fstat(copy)
        key = (st.st_dev, st.st_ino, st.st_rdev)
        handle_id = self._lent_handles.get(key)
        if handle_id is None or handle_id not in self.handles:
            handle_id = self._new_handle(os.dup(copy))
            self._lent_handles[key] = handle_id
        return handle_id, _I64.pack(stat.S_IFMT(st.st_mode))

    def op_fallocate(self, o: wire.Fallocate) -> Result:
        linux.fallocate(self.fd(o.handle), o.mode, o.offset, o.length)
        return 0, b""

    def op_copy_range(self, o: wire.CopyRange) -> Result:
        src, off_in, dst, off_out, length, flags = o
        if flags:
            raise OSError(errno.EINVAL, "copy_file_range flags must be 0")
        n = os.copy_file_range(
            self.fd(src), self.fd(dst), min(length, MAX_IO),
            None if off_in < 0 else off_in, None if off_out < 0 else off_out,
        )  # fmt: skip
        return n, b""

    def op_sendfile(self, o: wire.Sendfile) -> Result:
        out, src, offset, count = o
        n = os.sendfile(self.fd(out), self.fd(src), None if offset < 0 else offset, count)
        return n, b""

    def _xattr_target(self, dir_id: int, path: bytes, flags: int) -> tuple[int | bytes, bool, int]:
        """What os.*xattr acts on, whether to follow it, and an fd to close (-1: none).

        The os functions have no *at form: a followed path is reached as the resolved
        object's /proc/self/fd/N (followed: the magic link names exactly that object);
        a non-followed one as /proc/self/fd/PARENT/NAME (the name itself, not followed).
        """
        if not path and flags & AT_EMPTY_PATH:
            return self.fd(dir_id), True, -1
        if flags & AT_SYMLINK_NOFOLLOW:
            parent, name = self._parent(dir_id, path)
            return _proc_fd(parent) + b"/" + name, False, parent
        fd, owned = self._object(dir_id, path, flags)
        return _proc_fd(fd), True, fd if owned else -1

    def op_getxattr(self, o: wire.Getxattr) -> Result:
        dir_id, flags, size, path, name = o
        target, follow, close = self._xattr_target(dir_id, path, flags)
        try:
            value = os.getxattr(target, name, follow_symlinks=follow)
        finally:
            if close >= 0:
                os.close(close)
        if size == 0:
            return len(value), b""
        if len(value) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return len(value), value

    def op_setxattr(self, o: wire.Setxattr) -> Result:
        dir_id, flags, xflags, path, name, value = o
        target, follow, close = self._xattr_target(dir_id, path, flags)
        try:
            os.setxattr(target, name, value, xflags, follow_symlinks=follow)
        finally:
            if close >= 0:
                os.close(close)
        return 0, b""

    def op_listxattr(self, o: wire.Listxattr) -> Result:
        dir_id, flags, size, path = o
        target, follow, close = self._xattr_target(dir_id, path, flags)
        try:
            names = os.listxattr(target, follow_symlinks=follow)
        finally:
            if close >= 0:
                os.close(close)
        data = b"".join(os.fsencode(n) + b"\0" for n in names)
        if size == 0:
            return len(data), b""
        if len(data) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return len(data), data

    def op_removexattr(self, o: wire.Removexattr) -> Result:
        dir_id, flags, path, name = o
        target, follow, close = self._xattr_target(dir_id, path, flags)
        try:
            try:
                os.removexattr(target, name, follow_symlinks=follow)
            except PermissionError:
                if name not in PRIVILEGE_XATTRS:
                    raise
                _drop_file_capability(target, follow)
        finally:
            if close >= 0:
                os.close(close)
        return 0, b""

    def op_chdir(self, o: wire.Chdir) -> Result:
        fd, owned = self._object(o.dir, o.path, 0 if o.path else AT_EMPTY_PATH)
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(errno.ENOTDIR, "not a directory")
            linux.faccessat2(fd, b"", os.X_OK, AT_EMPTY_PATH | AT_EACCESS)
            path = self._fd_path(fd)
        finally:
            if owned:
                os.close(fd)
        return len(path), path

    def op_handle_path(self, o: wire.HandlePath) -> Result:
        fd = self.fd(o.handle)
        if o.handle in self._lent_handles.values():  # a lent stream: named as it is
            path = os.readlink(_proc_fd(fd))  # (/dev/pts/3, pipe:[123]), root or not
        else:
            path = self._fd_path(fd)
        return len(path), path

    def op_syncfs(self, o: wire.Syncfs) -> Result:
        linux.syncfs(self.fd(o.handle))
        return 0, b""
