"""Handlers for the calls fmhub forwards or answers itself.

A handler runs when a call involves the slave: one of its fds is a placeholder, or
one of its paths is the slave's (see ``fsys.master.routing``). It reads the
arguments the kernel would read from the caller's memory — each argument by the name
the syscall table gives it — performs the operation on the slave, writes what the
kernel would write, and returns the call's result (or raises Errno).

A handler that needs the slave is a generator: ``reply = yield Stat(...)`` sends one
operation and resumes with its successful reply; an errno reply is raised at the
``yield`` as Errno. fmhub drives it (see fmhub), so a handler has no way to block on
anything but the slave. A handler that needs no slave simply returns.

The semantics are the man pages' (``open(2)``, ``readv(2)``...); where a remote
file and a master file meet in one call (rename across them, copy between them)
the answer is the kernel's for two filesystems: EXDEV.

Large transfers are split into MAX_IO pieces; a regular file is read until the
count is satisfied or EOF, like the kernel's read of a regular file, and data is
written into the caller as each piece arrives.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import stat
import struct
import termios
from collections.abc import Callable, Generator
from typing import NoReturn, TypeVar

from fsys import linux
from fsys import protocol as wire
from fsys.errors import Errno
from fsys.linux import (
    AT_EMPTY_PATH,
    AT_REMOVEDIR,
    AT_SYMLINK_NOFOLLOW,
    O_CLOEXEC,
    O_CREAT,
    O_TMPFILE,
    STATX_BASIC_STATS,
    UTIME_NOW,
    UTIME_OMIT,
)
from fsys.master import pages, staging
from fsys.master.cache import AttrCache, start_size
from fsys.master.fmhub import STARTS_HELD, Hub
from fsys.master.pages import SPARSE_SCAN, Pages
from fsys.master.placeholders import RemoteFile
from fsys.master.policy import normalize
from fsys.master.routing import (
    CONTINUE,
    NOFOLLOW,
    Handler,
    Outcome,
    Ready,
    Step,
    Steps,
    Target,
    Trapped,
)
from fsys.protocol import MAX_IO, MAX_PATH, Reply

HANDLERS: dict[str, Handler] = {}

T = TypeVar("T")
Asks = Generator[Step, Reply, T]
"""A helper (or handler) that asks the slave and returns a T."""

MAX_RW_COUNT = 0x7FFFF000  # the kernel clamps every read and write to this
UIO_MAXIOV = 1024
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
_IOVEC = struct.Struct("=QQ")
_LOFF = struct.Struct("=q")
_INT = struct.Struct("=i")
_TIMESPEC2 = struct.Struct("=qqqq")
_TIMEVAL2 = struct.Struct("=qqqq")
_UTIMBUF = struct.Struct("=qq")
_POINTER = struct.Struct("=Q")


def handles(*names: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for name in names:
            HANDLERS[name] = fn
        return fn

    return register


def _file(call: Trapped, i: int = 0) -> RemoteFile:
    rf = call.files[i]
    if rf is None:
        raise Errno(errno.EBADF)
    return rf


def _remote(call: Trapped, i: int) -> Target:
    target = call.targets[i]
    if not target.remote:
        raise Errno(errno.EXDEV)  # one side on the master, one on the slave
    return target


def _create_mode(call: Trapped, mode: int) -> int:
    return mode & 0o7777 & ~call.process.umask


def _flags(call: Trapped) -> int:
    """The call's ``flags`` argument, 0 for a variant that has none."""
    return call.arg_int("flags") if call.has("flags") else 0


def _object(call: Trapped, *, at_flags: bool = True) -> tuple[Target, int]:
    """What a call that takes a path or an fd acts on, and the AT_* flags for it.

    The fd forms (fchmod, fstatfs, fgetxattr...) name their placeholder's handle.
    ``at_flags``: the call's ``flags`` argument holds AT_* flags (not so for xattrs).
    """
    if not call.targets:
        return _fd_target(call), AT_EMPTY_PATH
    target = call.targets[0]
    if target.whole:  # /proc/self/fd/N: the handle itself
        return target, AT_EMPTY_PATH
    if call.syscall.name in NOFOLLOW:
        return target, AT_SYMLINK_NOFOLLOW
    return target, _flags(call) if at_flags else 0


# --- read and write ---------------------------------------------------------------


def _iovecs(call: Trapped, addr: int, count: int) -> list[tuple[int, int]]:
    if count < 0 or count > UIO_MAXIOV:
        raise Errno(errno.EINVAL)
    raw = call.memory.read(addr, _IOVEC.size * count)
    iovs = [_IOVEC.unpack_from(raw, i * _IOVEC.size) for i in range(count)]
    total = 0
    for _, length in iovs:
        if length > 0x7FFFFFFFFFFFFFFF:
            raise Errno(errno.EINVAL)
        total += length
    if total > 0x7FFFFFFFFFFFFFFF:
        raise Errno(errno.EINVAL)
    return iovs


def _pieces(iovs: list[tuple[int, int]], start: int, size: int) -> list[tuple[int, int, int]]:
    """(address, offset in the piece, length) spans of bytes start..start+size of iovs."""
    spans: list[tuple[int, int, int]] = []
    pos = 0
    end = start + size
    for base, length in iovs:
        lo, hi = max(start, pos), min(end, pos + length)
        if lo < hi:
            spans.append((base + lo - pos, lo - start, hi - lo))
        pos += length
        if pos >= end:
            break
    return spans


def _blob(reply: Reply, limit: int, *, exact: bool = False) -> bytes:
    """The reply's string, checked: a slave must not make us overrun a buffer."""
    blob = reply.blob
    if len(blob) > limit or (exact and len(blob) != limit):
        raise Errno(errno.EIO)
    return blob


def _put_into(call: Trapped, iovs: list[tuple[int, int]], done: int, data: bytes) -> None:
    """Write ``data`` into the program's buffers ``iovs``, from ``done`` bytes in."""
    pieces = _pieces(iovs, done, len(data))
    if len(pieces) == 1:  # one buffer: hand the bytes over as they are
        call.memory.write(pieces[0][0], data)
    else:
        view = memoryview(data)
        for addr, at, length in pieces:
            call.memory.write(addr, view[at : at + length])


def _read_into(
    call: Trapped, rf: RemoteFile, iovs: list[tuple[int, int]], offset: int | None, rwf: int
) -> Asks[int]:
    total = min(sum(length for _, length in iovs), MAX_RW_COUNT)
    done = 0
    while True:
        want = min(total - done, MAX_IO)
        pos = -1 if offset is None else offset + done
        try:
            reply = yield wire.Read(handle=rf.handle, size=want, offset=pos, rwf=rwf)
            data = _blob(reply, want)
            _put_into(call, iovs, done, data)
        except Errno:
            if done:
                return done
            raise
        done += len(data)
        if done >= total or len(data) < want or not rf.is_regular:
            return done


def _write_from(
    call: Trapped, rf: RemoteFile, iovs: list[tuple[int, int]], offset: int | None, rwf: int
) -> Asks[int]:
    total = min(sum(length for _, length in iovs), MAX_RW_COUNT)
    done = 0
    while True:
        size = min(total - done, MAX_IO)
        pos = -1 if offset is None else offset + done
        try:
            chunk = b"".join(call.memory.read(a, n) for a, _, n in _pieces(iovs, done, size))
            reply = yield wire.Write(handle=rf.handle, offset=pos, rwf=rwf, data=chunk)
            written = min(reply.result, size)
        except Errno:
            if done:
                return done
            raise
        done += written
        if rf.pages is not None and written:
            yield from _written(rf, offset, done - written, chunk[:written])
        if done >= total or written < size:
            return done


def _written(rf: RemoteFile, offset: int | None, at: int, data: bytes) -> Asks[None]:
    """A write through a mapped handle: its pages get the same bytes."""
    assert rf.pages is not None
    if offset is None:  # at the file position (O_APPEND: the end): where it ended
        end = (yield wire.Lseek(handle=rf.handle, offset=0, whence=os.SEEK_CUR)).result
        rf.pages.written(end - len(data), data)
    else:
        rf.pages.written(offset + at, data)


def _offset(value: int) -> int:
    if value < 0:
        raise Errno(errno.EINVAL)
    return value


def _transfer(call: Trapped) -> tuple[list[tuple[int, int]], int | None, int]:
    """(buffers, offset or None for the file position, RWF_* flags) of a read or
    write of any of the five forms: read, pread64, readv, preadv, preadv2."""
    if call.has("iov"):
        # The kernel takes the count as an unsigned int (import_iovec's nr_segs).
        iovs = _iovecs(call, call.arg("iov"), call.arg("iovcnt") & 0xFFFFFFFF)
    else:
        iovs = [(call.arg("buf"), call.arg("count"))]
    if not call.has("offset"):
        return iovs, None, 0
    offset = call.arg_long("offset")
    if call.has("flags"):  # preadv2, pwritev2: offset -1 is the file position
        return iovs, None if offset == -1 else _offset(offset), call.arg_int("flags") & 0xFFFFFFFF
    return iovs, _offset(offset), 0


def _fstatx(rf: RemoteFile) -> Asks[bytes]:
    """The struct statx of the remote file ``rf`` names, as it is now."""
    return (yield from _statx(Target(True, rf.handle, b"", b""), AT_EMPTY_PATH, STATX_BASIC_STATS))


def _join_pages(hub: Hub, rf: RemoteFile) -> Asks[None]:
    """A handle that never mapped a file that some other handle maps shares its pages
    all the same: its reads first get the mappings' writes, its writes show in them."""
    placeholders = hub.placeholders
    if rf.pages is not None or not placeholders.by_file or not rf.is_regular:
        return
    if rf.file is None:
        rf.file = linux.statx_identity((yield from _fstatx(rf)))[:3]
    pages = placeholders.by_file.get(rf.file)
    if pages is not None:
        placeholders.pages(rf, rf.file)
        hub.write_back(pages)


@handles("read", "pread64", "readv", "preadv", "preadv2")
def sys_read(hub: Hub, call: Trapped) -> Asks[int]:
    rf = _file(call)
    iovs, offset, rwf = _transfer(call)
    if rf.start is not None:
        done = _from_start(hub, call, rf, iovs, offset, rwf)
        if done is not None:
            return done
    if rf.at is not None and offset is None:
        yield from hub.settle(rf)  # the slave's handle reads on from there
    yield from _join_pages(hub, rf)
    return (yield from _read_into(call, rf, iovs, offset, rwf))


def _from_start(
    hub: Hub, call: Trapped, rf: RemoteFile, iovs: list[tuple[int, int]], offset: int | None,
    rwf: int,
) -> int | None:  # fmt: skip
    """A read answered from what came with the file's open, if that holds it all (or
    the file ends within it); None: the slave reads it."""
    start = rf.start
    if start is None or rwf or hub.placeholders.by_file:  # (mapped: pages may be newer)
        return None
    at = rf.at if offset is None else offset
    if at is None:
        return None  # the slave has the position
    end = at + min(sum(length for _, length in iovs), MAX_RW_COUNT)
    if end > len(start) and not rf.whole:
        return None
    data = start[at:end]
    _put_into(call, iovs, 0, data)
    if offset is None:
        rf.at = at + len(data)
    call.side = "cache"
    return len(data)


@handles("write", "pwrite64", "writev", "pwritev", "pwritev2")
def sys_write(hub: Hub, call: Trapped) -> Asks[int]:
    rf = _file(call)
    if rf.stream is not None:  # (routed here once the slave refused its writes)
        _broken_pipe(hub, call)
    yield from _join_pages(hub, rf)
    return (yield from _write_from(call, rf, *_transfer(call)))


def _broken_pipe(hub: Hub, call: Trapped) -> NoReturn:
    """A write into a stream whose writes the slave refuses: SIGPIPE and EPIPE."""
    hub.processes.procfs.signal_thread(call.process.tgid, call.tid, signal.SIGPIPE)
    raise Errno(errno.EPIPE)


@handles("lseek")
def sys_lseek(hub: Hub, call: Trapped) -> Asks[int]:
    rf = _file(call)
    offset, whence = call.arg_long("offset"), call.arg_int("whence")
    if rf.at is not None:  # the position is fmhub's (reads from the file's start)
        if whence == os.SEEK_END and rf.start is not None and rf.whole:
            base: int | None = len(rf.start)
        else:
            base = {os.SEEK_SET: 0, os.SEEK_CUR: rf.at}.get(whence)
        if base is not None:
            if base + offset < 0:
                raise Errno(errno.EINVAL)
            rf.at = base + offset
            call.side = "cache"
            return rf.at
        yield from hub.settle(rf)
    return (yield wire.Lseek(handle=rf.handle, offset=offset, whence=whence)).result


# --- open -------------------------------------------------------------------------


#: The flags open(2) and openat(2) act on; the kernel ignores any other bit (openat2,
#: which the slave uses, would refuse them, and a mode without O_CREAT).
VALID_OPEN_FLAGS = 0o37777703  # the kernel's VALID_OPEN_FLAGS on x86_64
O_PATH_FLAGS = linux.O_PATH | linux.O_DIRECTORY | linux.O_NOFOLLOW | O_CLOEXEC


def _legacy_open(flags: int, mode: int) -> tuple[int, int]:
    """open/openat/creat arguments as openat2 takes them (mode: see _open)."""
    flags &= VALID_OPEN_FLAGS
    if flags & linux.O_PATH:
        flags &= O_PATH_FLAGS
    return flags, mode


def _open(
    hub: Hub, call: Trapped, flags: int, mode: int, resolve: int = 0, *, how: bool = False
) -> Asks[int]:
    """Open on the slave and install the placeholder. ``how``: openat2's own rules."""
    target = call.targets[0]
    if target.whole and target.dir:
        stream = hub.streams.get(target.dir)
        if stream is not None:  # /dev/tty, /dev/stdin... of a lent stream: that stream
            return hub.install_copy(call, stream.app_end, cloexec=bool(flags & O_CLOEXEC))
    # A mode counts only for a call that creates; the umask applies to it. (openat2
    # refuses a mode without O_CREAT/O_TMPFILE: for openat2 itself, so does the slave.)
    creates = flags & O_CREAT or flags & O_TMPFILE == O_TMPFILE
    if creates:
        mode = _create_mode(call, mode)
    elif not how:
        mode = 0
    size, key = 0, None  # (what of the file comes with the open: _start_size)
    if resolve and not target.dir and not target.shown.startswith(b"/"):
        # RESOLVE_* flags apply from the working directory, not from the root: open
        # the slave cwd, then the name from it.
        cwd = call.process.cwd
        base = yield wire.Open(dir=0, flags=linux.O_PATH | linux.O_DIRECTORY, mode=0,
                               resolve=0, path=cwd)  # fmt: skip
        try:
            reply = yield wire.Open(dir=base.result, flags=flags, mode=mode, resolve=resolve,
                                    path=target.shown)  # fmt: skip
        finally:
            hub.close_handle(base.result)
    else:
        where, path = target.dir, target.path
        if hub.cache is not None and not target.whole and not resolve:
            key = hub.cache.key_of(where, path)
            if where and key is not None and not creates and not flags & _WRITES:
                where, path = 0, key  # by its key: the slave reads it with its entries
        if key is not None and not where and not creates:
            assert hub.cache is not None
            missing = hub.cache.lookup(key, True, 0)
            if missing is not None and missing[0] == -errno.ENOENT:
                call.side = "cache"
                raise Errno(errno.ENOENT)  # a watched answer: nothing by that name
        size = _start_size(hub, key, flags) if key is not None and not where else 0
        try:
            if size:  # the file's start comes with the open (its first reads need no slave)
                assert key is not None
                reply = yield wire.OpenRead(dir=0, flags=flags, resolve=0, size=size, path=key)
            else:
                reply = yield wire.Open(dir=where, flags=flags, mode=mode, resolve=resolve,
                                        path=path)  # fmt: skip
        except Errno as exc:
            if key is not None and exc.flags & wire.REPLY_WATCHED:
                assert hub.cache is not None
                hub.cache.store(key, False, 0, -exc.errno, b"", exc.flags)
            raise
        if key is not None and not where and flags & _LINK_ITSELF != _LINK_ITSELF:
            assert hub.cache is not None
            hub.cache.opened(reply.result, key)  # (it names what its key names, followed)
    kind = reply.blob[0] << 12 if reply.blob else 0
    access = flags & (linux.O_ACCMODE | linux.O_PATH | linux.O_APPEND)
    fd, rf = hub.install_remote(call, reply.result, kind, cloexec=bool(flags & O_CLOEXEC),
                                access=access)  # fmt: skip
    if size and key is not None and len(reply.blob) > 1:
        start = _blob(reply, size + 1)[1:]
        hub.keep_start(rf, start, whole=len(start) < size, key=key)
    return fd


def _start_size(hub: Hub, key: bytes, flags: int) -> int:
    """How much of the file ``key`` names to bring with an open of it by ``flags``
    (OPEN_READ): some if the open only reads, the slave watches what the key names
    (an INVALIDATE drops the start once the file changes) and it can; else none."""
    peer = hub.link.peer
    if flags & _NO_START or peer is None or not peer.features & wire.FEATURE_OPEN_READ:
        return 0  # (O_TMPFILE names a directory: start_size gives none)
    if hub.started_bytes >= STARTS_HELD:
        return 0
    assert hub.cache is not None  # (a key is the cache's)
    known = hub.cache.lookup(key, True, STATX_BASIC_STATS)
    return start_size(known[1]) if known is not None and known[0] == 0 else 0


#: An open of a final symlink itself (not of what it names).
_LINK_ITSELF = linux.O_PATH | linux.O_NOFOLLOW
#: Open flags of an open that may change what it opens: never sent by another path.
_WRITES = linux.O_ACCMODE | linux.O_TRUNC | linux.O_APPEND
#: Open flags of an open that brings no start (OPEN_READ refuses them; O_DIRECT and
#: O_NOATIME: the program asked for its reads to reach the file).
_NO_START = wire.OPEN_READ_REFUSES | os.O_DIRECT | os.O_NOATIME


@handles("open", "openat")
def sys_open(hub: Hub, call: Trapped) -> Asks[int]:
    return _open(hub, call, *_legacy_open(call.arg("flags"), call.arg("mode")))


@handles("creat")
def sys_creat(hub: Hub, call: Trapped) -> Asks[int]:
    return _open(hub, call, *_legacy_open(O_CREAT | os.O_WRONLY | os.O_TRUNC, call.arg("mode")))


@handles("openat2")
def sys_openat2(hub: Hub, call: Trapped) -> Asks[int]:
    size = call.arg("size")
    if size < linux.OPEN_HOW.size or size > 4096:
        raise Errno(errno.EINVAL if size < linux.OPEN_HOW.size else errno.E2BIG)
    raw = call.memory.read(call.arg("how"), size)
    if any(raw[linux.OPEN_HOW.size :]):
        raise Errno(errno.E2BIG)
    flags, mode, resolve = linux.OPEN_HOW.unpack_from(raw)
    if flags >> 32 or mode >> 32:
        raise Errno(errno.EINVAL)
    return _open(hub, call, flags, mode, resolve, how=True)


# --- metadata ---------------------------------------------------------------------


def _cached(hit: tuple[int, bytes], call: Trapped | None) -> bytes:
    """A struct statx from the attribute cache (the trace says so of ``call``)."""
    if call is not None:
        call.side = "cache"
    result, raw = hit
    if result:
        raise Errno(-result)
    return raw


def _statx(
    target: Target,
    flags: int,
    mask: int,
    cache: AttrCache | None = None,
    call: Trapped | None = None,
) -> Asks[bytes]:
    """The struct statx of ``target``: from ``cache`` if it holds a watched answer
    (fsys.master.cache; the trace then says so of ``call``), else from the slave,
    kept in ``cache`` if it is watched."""
    flags &= AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH | linux.AT_NO_AUTOMOUNT | 0x6000
    path = target.path
    key = None
    follow = not flags & AT_SYMLINK_NOFOLLOW
    where = target.dir
    if cache is not None and not target.whole and not flags & linux.AT_STATX_FORCE_SYNC:
        if not flags & AT_EMPTY_PATH:
            key = cache.key_of(where, path)
        elif where and not path:
            # fstat of a handle: the answer about its key, if that is about no
            # symlink (else the handle's own stat goes to the slave, as it is).
            handle_key = cache.handles.get(where)
            mask |= STATX_BASIC_STATS
            hit = None if handle_key is None else cache.lookup(handle_key, False, mask, itself=True)
            if hit is not None:
                return _cached(hit, call)
            if handle_key is not None:  # what the open followed to: its key, followed
                key, follow, flags = (
                    handle_key,
                    True,
                    flags & ~(AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW),
                )
        if key is not None:
            where, path = 0, key  # the form the slave watches
            mask |= STATX_BASIC_STATS  # (what stat(2) wants: one answer serves both)
            hit = cache.lookup(key, follow, mask)
            if hit is not None:
                return _cached(hit, call)
    try:
        reply = yield wire.Stat(dir=where, flags=flags, mask=mask, path=path)
    except Errno as exc:
        if key is not None and exc.flags & wire.REPLY_WATCHED:
            assert cache is not None
            cache.store(key, follow, mask, -exc.errno, b"", exc.flags)
        raise
    raw = _blob(reply, linux.STATX_SIZE, exact=True)
    if key is not None and reply.flags & wire.REPLY_WATCHED:
        assert cache is not None
        cache.store(key, follow, mask, 0, raw, reply.flags)
    return raw


#: The fd forms that an O_PATH fd allows (open(2): fstat, fstatfs, fchdir...).
O_PATH_CALLS = frozenset({"fstat", "newfstatat", "statx", "fstatfs", "fchdir"})


def _fd_target(call: Trapped, i: int = 0) -> Target:
    rf = _file(call, i)
    if rf.access & linux.O_PATH and call.syscall.name not in O_PATH_CALLS:
        raise Errno(errno.EBADF)  # fchmod, fchown, fgetxattr... of an O_PATH fd
    return Target(True, rf.handle, b"", b"")


#: The AT_* flags each call accepts; any other bit is EINVAL, before any lookup.
_VALID_AT = {
    "newfstatat": AT_SYMLINK_NOFOLLOW | linux.AT_NO_AUTOMOUNT | AT_EMPTY_PATH,
    "statx": AT_SYMLINK_NOFOLLOW | linux.AT_NO_AUTOMOUNT | AT_EMPTY_PATH | 0x6000,
    "faccessat2": linux.AT_EACCESS | AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH,
    "fchownat": AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH,
    "linkat": linux.AT_SYMLINK_FOLLOW | AT_EMPTY_PATH,
    "fchmodat2": AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH,
    "renameat2": 0x1 | 0x2 | 0x4,  # RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT
    "execveat": AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH,
}
STATX__RESERVED = 0x80000000


def _check_flags(call: Trapped) -> None:
    valid = _VALID_AT.get(call.syscall.name)
    if valid is not None and call.arg_int("flags") & ~valid:
        raise Errno(errno.EINVAL)


@handles("stat", "lstat", "newfstatat", "fstat")
def sys_stat(hub: Hub, call: Trapped) -> Steps:
    _check_flags(call)
    target, flags = _object(call)
    raw = yield from _statx(target, flags, STATX_BASIC_STATS, hub.cache, call)
    call.memory.write(call.arg("statbuf"), linux.statx_to_stat(raw))
    return 0


@handles("statx")
def sys_statx(hub: Hub, call: Trapped) -> Steps:
    _check_flags(call)
    flags = call.arg_int("flags")
    if flags & 0x6000 == 0x6000 or call.arg_int("mask") & STATX__RESERVED:
        raise Errno(errno.EINVAL)  # both sync types at once; a reserved mask bit
    target = call.targets[0]
    flags |= AT_EMPTY_PATH if target.whole else 0
    raw = yield from _statx(target, flags, call.arg_int("mask"), hub.cache, call)
    call.memory.write(call.arg("statxbuf"), raw)
    return 0


@handles("getdents64")
def sys_getdents64(hub: Hub, call: Trapped) -> Steps:
    count = min(call.arg("count"), MAX_IO)
    reply = yield wire.Getdents(handle=_file(call).handle, size=count)
    call.memory.write(call.arg("dirp"), _blob(reply, count))
    return reply.result


@handles("access", "faccessat", "faccessat2")
def sys_access(hub: Hub, call: Trapped) -> Steps:
    _check_flags(call)
    target = call.targets[0]
    flags = _flags(call) | (AT_EMPTY_PATH if target.whole else 0)
    yield wire.Access(dir=target.dir, mode=call.arg_int("mode"), flags=flags, path=target.path)
    return 0


@handles("readlink", "readlinkat")
def sys_readlink(hub: Hub, call: Trapped) -> Steps:
    size = call.arg_int("bufsiz")
    if size <= 0:
        raise Errno(errno.EINVAL)
    target = call.targets[0]
    if target.whole and not target.dir:  # /proc/self/cwd in a slave directory
        path = target.path[:size]
        call.memory.write(call.arg("buf"), path)
        return len(path)
    if target.whole:  # /proc/self/fd/N of a remote file: its path on the slave
        path = _blob((yield wire.HandlePath(handle=target.dir)), MAX_PATH)[:size]
        call.memory.write(call.arg("buf"), path)
        return len(path)
    reply = yield wire.Readlink(dir=target.dir, size=size, path=target.path)
    call.memory.write(call.arg("buf"), _blob(reply, size))
    return reply.result


@handles("mkdir", "mkdirat")
def sys_mkdir(hub: Hub, call: Trapped) -> Steps:
    target = call.targets[0]
    mode = call.arg_int("mode") & 0o1777 & ~call.process.umask  # mkdir(2) keeps S_ISVTX
    yield wire.Mkdir(dir=target.dir, mode=mode, path=target.path)
    return 0


@handles("mknod", "mknodat")
def sys_mknod(hub: Hub, call: Trapped) -> Steps:
    mode, dev = call.arg_int("mode"), call.arg("dev") & 0xFFFFFFFF
    target = call.targets[0]
    mode = (mode & linux.S_IFMT) | _create_mode(call, mode)
    yield wire.Mknod(dir=target.dir, mode=mode, dev=dev, path=target.path)
    return 0


@handles("rmdir", "unlink", "unlinkat")
def sys_unlink(hub: Hub, call: Trapped) -> Steps:
    flags = AT_REMOVEDIR if call.syscall.name == "rmdir" else _flags(call)
    if flags & ~AT_REMOVEDIR:
        raise Errno(errno.EINVAL)
    target = call.targets[0]
    yield wire.Unlink(dir=target.dir, flags=flags, path=target.path)
    return 0


@handles("rename", "renameat", "renameat2")
def sys_rename(hub: Hub, call: Trapped) -> Steps:
    _check_flags(call)
    old, new = _remote(call, 0), _remote(call, 1)
    yield wire.Rename(
        olddir=old.dir, newdir=new.dir, flags=_flags(call), old=old.path, new=new.path
    )
    return 0


@handles("link", "linkat")
def sys_link(hub: Hub, call: Trapped) -> Steps:
    _check_flags(call)
    old, new = _remote(call, 0), _remote(call, 1)
    yield wire.Link(olddir=old.dir, newdir=new.dir, flags=_flags(call), old=old.path, new=new.path)
    return 0


@handles("symlink", "symlinkat")
def sys_symlink(hub: Hub, call: Trapped) -> Steps:
    content = call.memory.read_cstring(call.arg("target"))
    target = call.targets[0]
    yield wire.Symlink(dir=target.dir, target=content, path=target.path)
    return 0


@handles("chmod", "fchmod", "fchmodat", "fchmodat2")
def sys_chmod(hub: Hub, call: Trapped) -> Steps:
    _check_flags(call)
    target, flags = _object(call)
    mode = call.arg_int("mode") & 0o7777
    yield wire.Chmod(dir=target.dir, mode=mode, flags=flags, path=target.path)
    return 0


@handles("chown", "lchown", "fchown", "fchownat")
def sys_chown(hub: Hub, call: Trapped) -> Steps:
    _check_flags(call)
    target, flags = _object(call)
    uid, gid = call.arg_int("owner"), call.arg_int("group")
    yield wire.Chown(dir=target.dir, uid=uid, gid=gid, flags=flags, path=target.path)
    return 0


@handles("truncate")
def sys_truncate(hub: Hub, call: Trapped) -> Steps:
    target = call.targets[0]
    yield wire.Truncate(dir=target.dir, length=_offset(call.arg_long("length")), path=target.path)
    return 0


@handles("ftruncate")
def sys_ftruncate(hub: Hub, call: Trapped) -> Steps:
    rf = _file(call)
    length = _offset(call.arg_long("length"))
    yield from _join_pages(hub, rf)
    yield wire.Ftruncate(handle=rf.handle, length=length)
    if rf.pages is not None:
        rf.pages.truncated(length)
    return 0


@handles("fsync", "fdatasync", "sync_file_range")
def sys_fsync(hub: Hub, call: Trapped) -> Steps:
    datasync = int(call.syscall.name != "fsync")
    yield wire.Fsync(handle=_file(call).handle, datasync=datasync)
    return 0


@handles("syncfs")
def sys_syncfs(hub: Hub, call: Trapped) -> Steps:
    yield wire.Syncfs(handle=_file(call).handle)
    return 0


#: The layout of each call's ``times`` argument.
_TIMES_LAYOUT = {"utimensat": "timespec", "futimesat": "timeval", "utimes": "timeval",
                 "utime": "utimbuf"}  # fmt: skip


def _times(call: Trapped, addr: int, kind: str) -> tuple[int, int, int, int]:
    if addr == 0:
        return (0, UTIME_NOW, 0, UTIME_NOW)
    if kind == "timespec":
        asec, ansec, msec, mnsec = call.memory.read_struct(addr, _TIMESPEC2)
        for nsec in (ansec, mnsec):
            if not (0 <= nsec < 1_000_000_000 or nsec in (UTIME_NOW, UTIME_OMIT)):
                raise Errno(errno.EINVAL)
        return (asec, ansec, msec, mnsec)
    if kind == "timeval":
        asec, ausec, msec, musec = call.memory.read_struct(addr, _TIMEVAL2)
        if not (0 <= ausec < 1_000_000 and 0 <= musec < 1_000_000):
            raise Errno(errno.EINVAL)
        return (asec, ausec * 1000, msec, musec * 1000)
    actime, modtime = call.memory.read_struct(addr, _UTIMBUF)
    return (actime, 0, modtime, 0)


@handles("utimensat", "utime", "utimes", "futimesat")
def sys_utimens(hub: Hub, call: Trapped) -> Steps:
    target = call.targets[0]
    asec, ansec, msec, mnsec = _times(call, call.arg("times"), _TIMES_LAYOUT[call.syscall.name])
    flags = _flags(call)
    if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH):
        raise Errno(errno.EINVAL)
    if target.null or target.whole:
        flags |= AT_EMPTY_PATH
    yield wire.Utimens(dir=target.dir, flags=flags, asec=asec, ansec=ansec, msec=msec,
                  mnsec=mnsec, path=target.path)  # fmt: skip
    return 0


@handles("statfs", "fstatfs")
def sys_statfs(hub: Hub, call: Trapped) -> Steps:
    target, flags = _object(call)
    reply = yield wire.Statfs(dir=target.dir, flags=flags & AT_EMPTY_PATH, path=target.path)
    call.memory.write(call.arg("buf"), _blob(reply, linux.STATFS.size, exact=True))
    return 0


# --- descriptors ------------------------------------------------------------------

F_SETPIPE_SZ, F_GETPIPE_SZ, F_GETLEASE, F_NOTIFY = 1031, 1032, 1025, 1026
_LOCK_COMMANDS = {linux.F_GETLK, linux.F_SETLK, linux.F_SETLKW,
                  linux.F_OFD_GETLK, linux.F_OFD_SETLK, linux.F_OFD_SETLKW}  # fmt: skip


@handles("fcntl")
def sys_fcntl(hub: Hub, call: Trapped) -> Steps:
    rf = _file(call)
    cmd = call.arg_int("cmd")
    if cmd in (linux.F_GETFL, linux.F_SETFL):
        return (yield wire.Fcntl(handle=rf.handle, cmd=cmd, arg=call.arg_int("arg"))).result
    if cmd in _LOCK_COMMANDS:
        raw = call.memory.read(call.arg("arg"), linux.FLOCK.size)
        reply = yield wire.Lock(handle=rf.handle, cmd=cmd, flock=raw)
        if cmd in (linux.F_GETLK, linux.F_OFD_GETLK):
            call.memory.write(call.arg("arg"), _blob(reply, linux.FLOCK.size, exact=True))
        return 0
    if cmd == F_NOTIFY:
        if not rf.is_dir:
            raise Errno(errno.ENOTDIR)
        hub.notify(call.process, rf, call.arg("arg") & 0xFFFFFFFF)
        return 0
    if cmd == F_GETLEASE:
        return 2  # F_UNLCK: no lease
    if cmd in (F_SETPIPE_SZ, F_GETPIPE_SZ):
        raise Errno(errno.EBADF)
    raise Errno(errno.EINVAL)


@handles("flock")
def sys_flock(hub: Hub, call: Trapped) -> Steps:
    yield wire.Flock(handle=_file(call).handle, operation=call.arg_int("operation"))
    return 0


FIONREAD, FIONBIO, FIOQSIZE, FIGETBSZ = 0x541B, 0x5421, 0x5460, 2
FS_IOC_GETFLAGS, FICLONE = 0x80086601, 0x40049409


#: ioctls on any fd that act on the fd itself (or its description): native on a
#: stream's placeholder (FIONBIO makes its reads non-blocking, as on the terminal).
_FD_IOCTLS = {FIONBIO, 0x5450, 0x5451, 0x5452}  # FIONCLEX, FIOCLEX, FIOASYNC
_JOB_IOCTLS = {linux.TIOCGPGRP, linux.TIOCSPGRP, linux.TIOCGSID, linux.TIOCSCTTY,
               linux.TIOCNOTTY}  # fmt: skip


def _tty_ioctl(hub: Hub, call: Trapped, rf: RemoteFile, request: int, addr: int) -> Steps:
    """A terminal ioctl on a remote terminal (or stream): job control answered by
    fmhub for the session (design.md, "The slave's terminal"), the rest performed on
    the slave after the data written before it."""
    if request == linux.TIOCGPGRP:
        call.memory.write_struct(addr, _INT, hub.foreground_group(rf))
        return 0
    if request == linux.TIOCSPGRP:
        (group,) = call.memory.read_struct(addr, _INT)
        hub.set_foreground(rf, group)
        return 0
    if request == linux.TIOCGSID:
        call.memory.write_struct(addr, _INT, hub.terminal_session(rf))
        return 0
    if request in (linux.TIOCSCTTY, linux.TIOCNOTTY):
        hub.foreground_group(rf)  # (ENOTTY unless it is the session's terminal)
        return 0
    shape = linux.TTY_IOCTLS.get(request)
    if shape is None:
        raise Errno(errno.ENOTTY)
    reads, writes = shape
    data = call.memory.read(addr, reads) if reads else b""
    if writes:
        call.memory.read(addr, writes)  # EFAULT before anything is done, as natively
    stream = rf.stream
    if stream is not None:
        yield from stream.settle()
    flushes = request in (linux.TCSETSF, linux.TCSETSF2) or (
        request == linux.TCFLSH and call.arg_int("arg") in (linux.TCIFLUSH, linux.TCIOFLUSH)
    )
    if stream is not None and flushes:
        stream.flush_input()
    arg = 0 if reads or writes else call.arg_int("arg")
    reply = yield wire.Tty(handle=rf.handle, request=request, arg=arg, size=writes, data=data)
    if stream is not None and flushes:
        stream.flush_input()  # (and what the pump brought meanwhile)
    if writes:
        out = reply.blob
        if request == linux.TIOCINQ and stream is not None:  # and what the socket holds
            out = _INT.pack(_INT.unpack(out)[0] + stream.queued())
        call.memory.write(addr, out)
    return reply.result


@handles("ioctl")
def sys_ioctl(hub: Hub, call: Trapped) -> Steps:
    rf = _file(call)
    request = call.arg("request") & 0xFFFFFFFF
    addr = call.arg("arg")
    if rf.stream is not None and request in _FD_IOCTLS:
        return CONTINUE
    if rf.stream is not None or (
        rf.kind == stat.S_IFCHR and (request in linux.TTY_IOCTLS or request in _JOB_IOCTLS)
    ):
        return (yield from _tty_ioctl(hub, call, rf, request, addr))
    if request in (FIONREAD, FIGETBSZ, FS_IOC_GETFLAGS):
        reply = yield wire.Ioctl(handle=rf.handle, request=request, arg=0)
        call.memory.write(addr, _INT.pack(_LOFF.unpack(_blob(reply, 8, exact=True))[0]))
        return reply.result
    if request == FIOQSIZE:
        reply = yield wire.Ioctl(handle=rf.handle, request=request, arg=0)
        call.memory.write(addr, _blob(reply, 8, exact=True))
        return reply.result
    if request == FIONBIO:
        (value,) = call.memory.read_struct(addr, _INT)
        return (yield wire.Ioctl(handle=rf.handle, request=request, arg=value)).result
    if request == FICLONE:
        source = hub.placeholders.lookup(call.tid, call.arg_int("arg"))
        if source is None:
            raise Errno(errno.EXDEV)
        return (yield wire.Ioctl(handle=rf.handle, request=request, arg=source.handle)).result
    raise Errno(errno.ENOTTY)


@handles("fallocate")
def sys_fallocate(hub: Hub, call: Trapped) -> Steps:
    yield wire.Fallocate(handle=_file(call).handle, mode=call.arg_int("mode"),
                    offset=call.arg_long("offset"), length=call.arg_long("len"))  # fmt: skip
    return 0


@handles("fadvise64", "readahead")
def sys_fadvise(hub: Hub, call: Trapped) -> Outcome:
    # Advice only: accepted without a round trip, as the kernel accepts it for files.
    rf = _file(call)
    advises = call.has("advice")
    if advises and not 0 <= call.arg_int("advice") <= 5:
        raise Errno(errno.EINVAL)
    if not (rf.is_regular or rf.is_dir):
        raise Errno(errno.ESPIPE if advises else errno.EINVAL)
    return 0


def _offset_in(call: Trapped, addr: int) -> int:
    return -1 if addr == 0 else _offset(call.memory.read_struct(addr, _LOFF)[0])


@handles("copy_file_range")
def sys_copy_file_range(hub: Hub, call: Trapped) -> Steps:
    src, dst = call.files
    if src is None or dst is None:
        raise Errno(errno.EXDEV)
    off_in, off_out = _offset_in(call, call.arg("off_in")), _offset_in(call, call.arg("off_out"))
    length = min(call.arg("len"), MAX_RW_COUNT)
    reply = yield wire.CopyRange(src=src.handle, off_in=off_in, dst=dst.handle, off_out=off_out,
                            length=length, flags=call.arg_int("flags"))  # fmt: skip
    n = reply.result
    if off_in >= 0:
        call.memory.write_struct(call.arg("off_in"), _LOFF, off_in + n)
    if off_out >= 0:
        call.memory.write_struct(call.arg("off_out"), _LOFF, off_out + n)
    return n


@handles("sendfile")
def sys_sendfile(hub: Hub, call: Trapped) -> Asks[int]:
    out, src = call.files
    offset = _offset_in(call, call.arg("offset"))
    count = min(call.arg("count"), MAX_RW_COUNT)
    if out is not None and out.stream is not None and out.stream.write_closed:
        _broken_pipe(hub, call)
    if out is not None and src is not None and out.stream is None:
        n = (yield wire.Sendfile(out=out.handle, src=src.handle, offset=offset, size=count)).result
    elif src is not None:  # from a slave file to a master fd (a socket, a pipe...), or
        # into a pumped stream's placeholder: after what the program wrote before it.
        n = yield from _to_master(hub, call, src, offset, "out_fd", count, nonblock=False)
    else:
        assert out is not None  # to a slave file from a master file
        n = yield from _from_master(hub, call, "in_fd", offset, out, -1, count, nonblock=False,
                                    kinds=_SENDFILE_FROM)  # fmt: skip
    if offset >= 0:
        call.memory.write_struct(call.arg("offset"), _LOFF, offset + n)
    return n


SPLICE_F_NONBLOCK = 0x02
SPLICE_F_ALL = 0x0F  # MOVE, NONBLOCK, MORE, GIFT
#: What sendfile(2) reads from: a file that supports mmap-like reads (no pipe, socket
#: or directory: EINVAL).
_SENDFILE_FROM = (stat.S_IFREG, stat.S_IFBLK)
_PIPE = (stat.S_IFIFO,)


@handles("splice")
def sys_splice(hub: Hub, call: Trapped) -> Asks[int]:
    """Between a slave file and a master pipe (one end of a splice is a pipe)."""
    if not call.arg("len"):
        return 0  # the kernel answers a length of 0 before it looks at anything else
    if call.arg_int("flags") & ~SPLICE_F_ALL:
        raise Errno(errno.EINVAL)
    src, dst = call.files
    if src is not None and dst is not None:
        raise Errno(errno.EINVAL)  # two slave files: neither is a pipe
    count = min(call.arg("len"), MAX_RW_COUNT)
    nonblock = bool(call.arg_int("flags") & SPLICE_F_NONBLOCK)
    if src is not None:
        if call.arg("off_out"):
            raise Errno(errno.ESPIPE)  # the pipe's side has no offset
        offset = _offset_in(call, call.arg("off_in"))
        n = yield from _to_master(hub, call, src, offset, "fd_out", count, nonblock=nonblock,
                                  kinds=_PIPE)  # fmt: skip
        if offset >= 0:
            call.memory.write_struct(call.arg("off_in"), _LOFF, offset + n)
        return n
    assert dst is not None
    if call.arg("off_in"):
        raise Errno(errno.ESPIPE)
    offset = _offset_in(call, call.arg("off_out"))
    n = yield from _from_master(hub, call, "fd_in", -1, dst, offset, count, nonblock=nonblock,
                                kinds=_PIPE)  # fmt: skip
    if offset >= 0:
        call.memory.write_struct(call.arg("off_out"), _LOFF, offset + n)
    return n


def _master_fd(
    hub: Hub, call: Trapped, name: str, *, writing: bool, kinds: tuple[int, ...] = ()
) -> int:
    """fmhub's own copy of the program's fd argument ``name`` (same description);
    EBADF, as the kernel checks first, if it is not open for writing (or reading): a
    pipe's other end would never be ready. EINVAL if ``kinds`` (S_IFMT values) are
    given and it is none of them (splice: a pipe; sendfile's input: a file)."""
    process = call.process
    try:
        fd = hub.processes.procfs.take_fd(process.tgid, process.pidfd, call.arg_int(name))
    except OSError as exc:
        raise Errno(exc.errno or errno.EBADF) from None
    access = fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_ACCMODE | linux.O_PATH)
    if access not in ((os.O_WRONLY, os.O_RDWR) if writing else (os.O_RDONLY, os.O_RDWR)):
        os.close(fd)
        raise Errno(errno.EBADF)
    if kinds and stat.S_IFMT(os.fstat(fd).st_mode) not in kinds:
        os.close(fd)
        raise Errno(errno.EINVAL)
    return fd


def _await_ready(fd: int, *, writable: bool, nonblock: bool) -> Asks[None]:
    """Until the master fd ``fd`` is ready, as the call would wait natively; EAGAIN
    instead for a non-blocking one."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT if writable else select.POLLIN)
    if poller.poll(0):
        return
    if _nonblocking(fd, nonblock):
        raise Errno(errno.EAGAIN)
    yield Ready(fd, writable=writable)


def _nonblocking(fd: int, nonblock: bool) -> bool:
    """Whether the call on the master fd ``fd`` gives EAGAIN rather than wait: its own
    flag (SPLICE_F_NONBLOCK), or O_NONBLOCK on the fd."""
    return nonblock or not os.get_blocking(fd)


def _room(fd: int, count: int) -> int:
    """How much can go into the master fd ``fd`` without blocking (a pipe's free space)."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode):
        size = fcntl.fcntl(fd, F_GETPIPE_SZ)
        queued: int = _INT.unpack(fcntl.ioctl(fd, termios.FIONREAD, bytes(_INT.size)))[0]
        return min(count, max(size - queued, 1))
    return count


def _to_master(
    hub: Hub, call: Trapped, src: RemoteFile, offset: int, name: str, count: int, *,
    nonblock: bool, kinds: tuple[int, ...] = (),
) -> Asks[int]:  # fmt: skip
    """Copy from a slave file to the program's master fd ``name``: what fits now (a
    partial count, as the kernel may give), after waiting for room as it would."""
    if not src.is_regular:
        raise Errno(errno.EINVAL)
    fd = _master_fd(hub, call, name, writing=True, kinds=kinds)
    try:
        while True:
            yield from _await_ready(fd, writable=True, nonblock=nonblock)
            want = min(_room(fd, count), MAX_IO)
            reply = yield wire.Read(handle=src.handle, size=want, offset=offset, rwf=0)
            data = _blob(reply, want)
            written, error = _put(fd, data)
            if written < len(data) and offset < 0:  # give back what the fd did not take
                yield wire.Lseek(handle=src.handle, offset=written - len(data), whence=os.SEEK_CUR)
            if error == errno.EAGAIN and not _nonblocking(fd, nonblock):
                continue  # filled by another writer while the slave read: wait again
            if error == errno.EPIPE:  # no reader left: the kernel's SIGPIPE as well
                hub.processes.procfs.signal_thread(call.process.tgid, call.tid, signal.SIGPIPE)
            if error:
                raise Errno(error)
            return written
    finally:
        os.close(fd)


def _put(fd: int, data: bytes) -> tuple[int, int]:
    """(bytes written, errno) of one write into the master fd ``fd`` that never blocks
    fmhub: a socket or pipe may have filled since it was found ready."""
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISSOCK(mode):
            sock = socket.socket(fileno=fd)  # borrowed: detached below, not closed
            try:
                return sock.send(data, socket.MSG_DONTWAIT), 0
            finally:
                sock.detach()
        if stat.S_ISFIFO(mode):
            return os.pwritev(fd, [data], -1, os.RWF_NOWAIT), 0
        return os.write(fd, data), 0
    except OSError as exc:  # EAGAIN (filled meanwhile), EPIPE...: nothing went
        return 0, exc.errno or errno.EIO


def _from_master(
    hub: Hub, call: Trapped, name: str, offset: int, dst: RemoteFile, off_out: int, count: int,
    *, nonblock: bool, kinds: tuple[int, ...] = (),
) -> Asks[int]:  # fmt: skip
    """Copy from the program's master fd ``name`` (at ``offset``, -1: its position) to
    a slave file (at ``off_out``, -1: its position)."""
    fd = _master_fd(hub, call, name, writing=False, kinds=kinds)
    try:
        yield from _await_ready(fd, writable=False, nonblock=nonblock)
        want = min(count, MAX_IO)
        try:
            data = os.read(fd, want) if offset < 0 else os.pread(fd, want, offset)
        except BlockingIOError:
            raise Errno(errno.EAGAIN) from None
        except OSError as exc:
            raise Errno(exc.errno or errno.EIO) from None
        if not data:
            return 0
        reply = yield wire.Write(handle=dst.handle, offset=off_out, rwf=0, data=data)
        return min(reply.result, len(data))
    finally:
        os.close(fd)


# --- extended attributes ----------------------------------------------------------


# --- mappings ---------------------------------------------------------------------

PROT_WRITE = 0x2
MAP_TYPE = 0x0F
MAP_SHARED = 0x01
MAP_SHARED_VALIDATE = 0x03
MS_SYNC = 0x4


@handles("mmap")
def sys_mmap(hub: Hub, call: Trapped) -> Steps:
    """A remote file mapped: its pages, fetched or checked, then the native mmap of
    them (see fsys.master.pages)."""
    rf = _file(call)
    if rf.access & linux.O_PATH:
        raise Errno(errno.EBADF)
    if not rf.is_regular:
        raise Errno(errno.ENODEV)
    mode = rf.access & linux.O_ACCMODE
    if mode == os.O_WRONLY:
        raise Errno(errno.EACCES)
    shared = call.arg_int("flags") & MAP_TYPE in (MAP_SHARED, MAP_SHARED_VALIDATE)
    if rf.pages is not None:
        hub.write_back(rf.pages)  # before the statx: the file as the slave now has it
    raw = yield from _fstatx(rf)
    pages = hub.placeholders.pages(rf, linux.statx_identity(raw)[:3])  # EBADF: closed
    if hub.write_back(pages):  # other handles' mappings of the file had changed it
        raw = yield from _fstatx(rf)
    offset = call.arg("offset")
    identity = linux.statx_identity(raw)
    yield from _refresh(hub, rf, pages, identity, offset, offset + call.arg("length"))
    # A shared mapping of a read-write handle may be written (now or after mprotect);
    # any other is read-only in the file (the kernel refuses a shared writable one).
    hub.map_pages(call, call.arg_int("fd"), rf, writable=shared and mode == os.O_RDWR)
    call.note = f"pages {pages.number} of handle {rf.handle}, {pages.size} bytes"
    return CONTINUE


def _refresh(
    hub: Hub, rf: RemoteFile, pages: Pages, identity: tuple[int, ...], start: int, end: int
) -> Asks[None]:
    """Bring the pages of [start, end) up to date: what the slave changed since the
    last fetch (``identity``: the file as it is now) is fetched again, through ``rf``."""
    stale = pages.current(identity, identity[3])
    for lo, hi in stale:  # live mappings show these: fetched again first
        yield from _fetch(hub, rf.handle, pages, lo, hi)
    for lo, hi in pages.missing(start, end):
        yield from _fetch(hub, rf.handle, pages, lo, hi)


def _fetch(hub: Hub, handle: int, pages: Pages, lo: int, hi: int) -> Asks[None]:
    """Fetch [lo, hi) into the pages; a large range around the file's holes."""
    if hi - lo < SPARSE_SCAN:
        yield from _fetch_data(handle, pages, lo, hi)
        return
    # SEEK_DATA and SEEK_HOLE move a position: on a handle of fmhub's own (the slave
    # reopens the file), not on the program's, which other threads may be using.
    own = (yield wire.Open(dir=handle, flags=os.O_RDONLY, mode=0, resolve=0, path=b"")).result
    try:
        yield from _fetch_sparse(own, pages, lo, hi)
    finally:
        hub.close_handle(own)


def _fetch_sparse(handle: int, pages: Pages, lo: int, hi: int) -> Asks[None]:
    at = lo
    while at < hi:
        try:
            data = (yield wire.Lseek(handle=handle, offset=at, whence=os.SEEK_DATA)).result
        except Errno as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = hi  # no data up to the end of the file
        data = min(data, hi)
        if data > at:
            pages.hole(at, data)
        if data >= hi:
            break
        end = (yield wire.Lseek(handle=handle, offset=data, whence=os.SEEK_HOLE)).result
        yield from _fetch_data(handle, pages, data, min(end, hi))
        at = min(end, hi)


def _fetch_data(handle: int, pages: Pages, lo: int, hi: int) -> Asks[None]:
    at = lo
    while at < hi:
        want = min(hi - at, MAX_IO)
        data = _blob((yield wire.Read(handle=handle, size=want, offset=at, rwf=0)), want)
        if not data:
            return  # shorter than it was a moment ago
        pages.load(at, data)
        at += len(data)


@handles("msync")
def sys_msync(hub: Hub, call: Trapped) -> Steps:
    """Write back what mappings of remote files changed in the range, then the native
    msync (which checks the arguments as the kernel does)."""
    start = call.arg("addr")
    end = start + call.arg("length")
    placeholders = hub.placeholders
    mapped = set()
    if placeholders.by_handle:
        mapped = pages.mapped_handles(call.process.tgid, start, end, placeholders.store)
    call.side = "master"
    for file in {rf.pages for h in mapped if (rf := placeholders.by_handle.get(h)) and rf.pages}:
        hub.write_back(file)
        writer = file.writer()
        if writer and call.arg_int("flags") & MS_SYNC:  # what earlier write-backs sent too
            yield wire.Fsync(handle=writer, datasync=1)
        call.side = "slave"
    return CONTINUE


def _xattr_name(call: Trapped) -> bytes:
    try:
        name = call.memory.read_cstring(call.arg("name"), XATTR_NAME_MAX + 1)
    except Errno as exc:
        raise Errno(errno.ERANGE if exc.errno == errno.ENAMETOOLONG else exc.errno) from None
    if not name:
        raise Errno(errno.ERANGE)
    return name


def _no_xattrs(hub: Hub, target: Target, flags: int) -> bool:
    """A watched answer says that the file ``target`` names has no extended attribute."""
    if hub.cache is None or target.whole:
        return False
    key = hub.cache.key_of(target.dir, target.path)
    return key is not None and hub.cache.no_xattrs(key, not flags & AT_SYMLINK_NOFOLLOW)


@handles("getxattr", "lgetxattr", "fgetxattr")
def sys_getxattr(hub: Hub, call: Trapped) -> Steps:
    target, flags = _object(call, at_flags=False)
    attr = _xattr_name(call)
    if _no_xattrs(hub, target, flags):
        call.side = "cache"
        raise Errno(errno.ENODATA)
    size = min(call.arg("size"), XATTR_SIZE_MAX)
    reply = yield wire.Getxattr(dir=target.dir, flags=flags, size=size, path=target.path, name=attr)
    if size:
        call.memory.write(call.arg("value"), _blob(reply, size))
    return reply.result


@handles("setxattr", "lsetxattr", "fsetxattr")
def sys_setxattr(hub: Hub, call: Trapped) -> Steps:
    target, flags = _object(call, at_flags=False)
    attr = _xattr_name(call)
    size = call.arg("size")
    if size > XATTR_SIZE_MAX:
        raise Errno(errno.E2BIG)
    value = call.memory.read(call.arg("value"), size)
    yield wire.Setxattr(dir=target.dir, flags=flags, xflags=call.arg_int("flags"),
                   path=target.path, name=attr, value=value)  # fmt: skip
    return 0


@handles("listxattr", "llistxattr", "flistxattr")
def sys_listxattr(hub: Hub, call: Trapped) -> Steps:
    target, flags = _object(call, at_flags=False)
    if _no_xattrs(hub, target, flags):
        call.side = "cache"
        return 0
    size = min(call.arg("size"), XATTR_SIZE_MAX)
    reply = yield wire.Listxattr(dir=target.dir, flags=flags, size=size, path=target.path)
    if size:
        call.memory.write(call.arg("list"), _blob(reply, size))
    return reply.result


@handles("removexattr", "lremovexattr", "fremovexattr")
def sys_removexattr(hub: Hub, call: Trapped) -> Steps:
    target, flags = _object(call, at_flags=False)
    attr = _xattr_name(call)
    yield wire.Removexattr(dir=target.dir, flags=flags, path=target.path, name=attr)
    return 0


# --- answered by the hub: cwd, umask, execve ----------------------------------------


@handles("chdir")
def sys_chdir(hub: Hub, call: Trapped) -> Steps:
    call.side = "hub"
    target = call.targets[0]
    process = call.process
    if target.remote:
        reply = yield wire.Chdir(dir=target.dir, path=target.path)
        hub.processes.chdir_remote(process, reply.blob)
        call.side = "slave"
        return 0
    path = target.shown
    absolute = normalize(path if path.startswith(b"/") else process.cwd + b"/" + path)
    # Continued: the kernel decides, with the program's credentials, and the process
    # model reads its verdict back.
    hub.processes.chdir_master(process, call.tid, absolute)
    call.side = "master"
    return CONTINUE


@handles("fchdir")
def sys_fchdir(hub: Hub, call: Trapped) -> Steps:
    rf = call.files[0]
    if rf is not None:
        if not rf.is_dir:
            raise Errno(errno.ENOTDIR)
        reply = yield wire.HandlePath(handle=rf.handle)
        hub.processes.chdir_remote(call.process, reply.blob)
        return 0
    call.side = "master"
    path = hub.processes.procfs.fd_path(call.tid, call.arg_int("fd"))
    if path is not None and path.startswith("/"):
        hub.processes.chdir_master(call.process, call.tid, os.fsencode(path))
    return CONTINUE  # (a bad fd: the kernel answers EBADF)


@handles("getcwd")
def sys_getcwd(hub: Hub, call: Trapped) -> Outcome:
    process = call.process
    if not process.cwd_remote:
        call.side = "master"
        return CONTINUE
    call.side = "hub"
    data = process.cwd + b"\0"
    if call.arg("size") < len(data):
        raise Errno(errno.ERANGE)
    call.memory.write(call.arg("buf"), data)
    return len(data)


@handles("umask")
def sys_umask(hub: Hub, call: Trapped) -> Outcome:
    call.side = "master"
    hub.processes.set_umask(call.process, call.arg_int("mask"))
    return CONTINUE


@handles("exit")
def sys_thread_exit(hub: Hub, call: Trapped) -> Outcome:
    call.side = "master"
    hub.processes.thread_exit(call.tid)
    return CONTINUE


@handles("exit_group")
def sys_exit(hub: Hub, call: Trapped) -> Outcome:
    call.side = "master"
    hub.processes.exit_group(call.process)
    return CONTINUE


@handles("execve", "execveat")
def sys_execve(hub: Hub, call: Trapped) -> Steps:
    _check_flags(call)
    target = call.targets[0]
    process = call.process
    hub.processes.exec_started(process)
    if not target.remote:
        call.side = "master"
        hub.processes.exec_continued(process)  # a new address space if it succeeds
        return CONTINUE
    # A file that lives only on the slave: answer what the kernel would for a file
    # that does not exist or cannot be executed; otherwise stage it (staging.py).
    flags = _flags(call) & AT_EMPTY_PATH
    # A slave symlink to a master binary (a venv's python): the kernel checks that one.
    master_binary = yield from _master_link(hub, target)
    raw = b""
    if master_binary is None:
        op = wire.Stat(dir=target.dir, flags=flags, mask=STATX_BASIC_STATS, path=target.path)
        raw = _blob((yield op), linux.STATX_SIZE, exact=True)
        if not stat.S_ISREG(linux.statx_mode(raw)):
            raise Errno(errno.EACCES)
        yield wire.Access(
            dir=target.dir, mode=os.X_OK, flags=flags | linux.AT_EACCESS, path=target.path
        )
    name = target.shown
    if hub.stage is None or not name or not process.staged_cwd:
        call.note = "slave-only executable: not staged (the process left the slave's tree)"
        raise Errno(errno.ENOEXEC)
    if call.has("dirfd") and call.arg_int("dirfd") != linux.AT_FDCWD:
        call.note = "slave-only executable: execveat from a directory fd is not staged"
        raise Errno(errno.ENOEXEC)
    absolute = name.startswith(b"/")
    kernel_name = b"." + name[1:] if absolute else name
    try:
        staged = hub.stage.place(kernel_name)
    except Errno:
        call.note = "slave-only executable: its name climbs out of the stage"
        raise
    if master_binary is not None:
        hub.stage.link(staged, master_binary)
    else:
        identity = linux.statx_identity(raw)
        if not hub.stage.current(staged, identity):
            content = yield from _read_whole(hub, target)
            script = staging.shebang(content)
            # The kernel finds a script's interpreter on the master: a wrapper runs it
            # by its slave name when the script is named absolutely (the interpreter
            # then reads it from the slave) or its interpreter is a slave file.
            if script is not None and (absolute or not hub.policy.is_local(script[0])):
                content = staging.wrapper(script[0], script[1], name)
            hub.stage.write(staged, content, linux.statx_mode(raw), identity)
    names: frozenset[bytes] = frozenset()
    if hub.stage.is_wrapper(staged):
        # The wrapper's /bin/sh opens it by the rewritten name: from the stage.
        names = frozenset({kernel_name})
    fix: tuple[int, int] | None = None
    if absolute:
        name_at, argv = call.arg("path"), call.arg("argv")
        call.memory.rewrite_byte(name_at, b".")
        if argv and call.memory.read_struct(argv, _POINTER)[0] == name_at:
            # The name is argv[0] too (shells and execvp pass one string): the new
            # image gets its "/" back at its first call (Processes.on_call).
            fix = (name_at, hub.processes.procfs.arg_start(process.tgid))
    hub.processes.exec_staged(process, staged_names=names, argv0_fix=fix)
    call.side = "master"
    call.note = f"staged as {os.fsdecode(staged)}"
    return CONTINUE


#: How many symlinks an exec follows (the kernel's MAXSYMLINKS).
MAX_SYMLINKS = 40


def _master_link(hub: Hub, target: Target) -> Asks[bytes | None]:
    """The master path that ``target`` leads to through slave symlinks, if it does.

    A symlink on the slave whose target the policy gives to the master names the
    master's file, as every other path to it does.
    """
    if target.dir:
        return None
    path = target.path
    for _ in range(MAX_SYMLINKS):
        reply = yield wire.Stat(dir=0, flags=AT_SYMLINK_NOFOLLOW, mask=STATX_BASIC_STATS, path=path)
        if not stat.S_ISLNK(linux.statx_mode(_blob(reply, linux.STATX_SIZE, exact=True))):
            return None
        link = _blob((yield wire.Readlink(dir=0, size=MAX_PATH, path=path)), MAX_PATH)
        path = link if link.startswith(b"/") else normalize(os.path.dirname(path) + b"/" + link)
        if hub.policy.is_local(path):
            return path
    return None


def _read_whole(hub: Hub, target: Target) -> Asks[bytes]:
    """The content of a slave file, read with a handle of our own."""
    reply = yield wire.Open(dir=target.dir, flags=os.O_RDONLY, mode=0, resolve=0, path=target.path)
    handle = reply.result
    chunks: list[bytes] = []
    try:
        while True:
            data = _blob((yield wire.Read(handle=handle, size=MAX_IO, offset=-1, rwf=0)), MAX_IO)
            if not data:
                break
            chunks.append(data)
    finally:
        hub.close_handle(handle)
    return b"".join(chunks)


# The socket calls (socket, bind, connect...) register here too: one table of handlers.
from fsys.master import net as _net  # noqa: E402, F401
