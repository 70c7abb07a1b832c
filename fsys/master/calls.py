"""Handlers for the calls fmhub forwards or answers itself.

A handler runs when a call involves the slave: one of its fds is a placeholder, or
one of its paths is the slave's (see fmhub's routing). It reads the arguments the
kernel would read from the caller's memory, performs the operation on the slave,
writes what the kernel would write, and returns the call's result (or raises
Errno). The semantics are the man pages' (``open(2)``, ``readv(2)``...); where a
remote file and a master file meet in one call (rename across them, copy between
them) the answer is the kernel's for two filesystems: EXDEV.

Large transfers are split into MAX_IO pieces; a regular file is read until the
count is satisfied or EOF, like the kernel's read of a regular file, and data is
written into the caller as each piece arrives.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable

from fsys import linux
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
from fsys.master import staging
from fsys.master.fmhub import (
    CONTINUE,
    Handler,
    Hub,
    PendingChdir,
    Target,
    Trapped,
    _Continue,
    arg_start,
)
from fsys.master.placeholders import RemoteFile
from fsys.master.policy import normalize
from fsys.protocol import MAX_IO, Op, Reply

HANDLERS: dict[str, Handler] = {}

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


def _remote(call: Trapped, i: int = 0) -> Target:
    target = call.targets[i]
    if not target.remote:
        raise Errno(errno.EXDEV)  # one side on the master, one on the slave
    return target


def _create_mode(call: Trapped, mode: int) -> int:
    return mode & 0o7777 & ~call.pairing.umask


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


async def _read_into(
    hub: Hub,
    call: Trapped,
    rf: RemoteFile,
    iovs: list[tuple[int, int]],
    offset: int | None,
    rwf: int = 0,
) -> int:
    total = min(sum(length for _, length in iovs), MAX_RW_COUNT)
    done = 0
    while True:
        want = min(total - done, MAX_IO)
        pos = -1 if offset is None else offset + done
        try:
            data = _blob(await hub.call(Op.READ, (rf.handle, want, pos, rwf)), want)
            pieces = _pieces(iovs, done, len(data))
            if len(pieces) == 1:  # one buffer: hand the reply's bytes over as they are
                call.memory.write(pieces[0][0], data)
            else:
                view = memoryview(data)
                for addr, at, length in pieces:
                    call.memory.write(addr, view[at : at + length])
        except Errno:
            if done:
                return done
            raise
        done += len(data)
        if done >= total or len(data) < want or not rf.is_regular:
            return done


async def _write_from(
    hub: Hub,
    call: Trapped,
    rf: RemoteFile,
    iovs: list[tuple[int, int]],
    offset: int | None,
    rwf: int = 0,
) -> int:
    total = min(sum(length for _, length in iovs), MAX_RW_COUNT)
    done = 0
    while True:
        size = min(total - done, MAX_IO)
        pos = -1 if offset is None else offset + done
        try:
            chunk = b"".join(call.memory.read(a, n) for a, _, n in _pieces(iovs, done, size))
            reply = await hub.call(Op.WRITE, (rf.handle, pos, rwf), (chunk,))
            written = min(reply.result, size)
        except Errno:
            if done:
                return done
            raise
        done += written
        if done >= total or written < size:
            return done


def _offset(value: int) -> int:
    if value < 0:
        raise Errno(errno.EINVAL)
    return value


def _transfer(call: Trapped) -> tuple[list[tuple[int, int]], int | None, int]:
    """(buffers, offset or None for the file position, RWF_* flags) of a read or
    write of any of the five forms: read, pread64, readv, preadv, preadv2."""
    name = call.syscall.name
    if name.endswith(("v", "v2")):
        iovs = _iovecs(call, call.arg(1), call.arg_int(2))
    else:
        iovs = [(call.arg(1), call.arg(2))]
    if name in ("read", "write", "readv", "writev"):
        return iovs, None, 0
    offset = call.arg_long(3)
    if name.endswith("2"):  # offset -1: the file position; flags in argument 5
        return iovs, None if offset == -1 else _offset(offset), call.arg_int(5) & 0xFFFFFFFF
    return iovs, _offset(offset), 0


@handles("read", "pread64", "readv", "preadv", "preadv2")
async def sys_read(hub: Hub, call: Trapped) -> int:
    return await _read_into(hub, call, _file(call), *_transfer(call))


@handles("write", "pwrite64", "writev", "pwritev", "pwritev2")
async def sys_write(hub: Hub, call: Trapped) -> int:
    return await _write_from(hub, call, _file(call), *_transfer(call))


@handles("lseek")
async def sys_lseek(hub: Hub, call: Trapped) -> int:
    args = (_file(call).handle, call.arg_long(1), call.arg_int(2))
    return (await hub.call(Op.LSEEK, args)).result


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


async def _open(hub: Hub, call: Trapped, flags: int, mode: int, resolve: int = 0) -> int:
    target = call.targets[0]
    # A mode counts only for a call that creates; the umask applies to it. (openat2
    # refuses a mode without O_CREAT/O_TMPFILE: for openat2 itself, so does the slave.)
    creates = flags & O_CREAT or flags & O_TMPFILE == O_TMPFILE
    if creates:
        mode = _create_mode(call, mode)
    elif call.syscall.name != "openat2":
        mode = 0
    reply = await hub.call(Op.OPEN, (target.dir, flags, mode, resolve), (target.path,))
    kind = reply.blob[0] << 12 if reply.blob else 0
    return hub.install(call, reply.result, kind, cloexec=bool(flags & O_CLOEXEC))


@handles("open")
async def sys_open(hub: Hub, call: Trapped) -> int:
    return await _open(hub, call, *_legacy_open(call.arg(1), call.arg(2)))


@handles("creat")
async def sys_creat(hub: Hub, call: Trapped) -> int:
    return await _open(hub, call, *_legacy_open(O_CREAT | os.O_WRONLY | os.O_TRUNC, call.arg(1)))


@handles("openat")
async def sys_openat(hub: Hub, call: Trapped) -> int:
    return await _open(hub, call, *_legacy_open(call.arg(2), call.arg(3)))


@handles("openat2")
async def sys_openat2(hub: Hub, call: Trapped) -> int:
    size = call.arg(3)
    if size < linux.OPEN_HOW.size or size > 4096:
        raise Errno(errno.EINVAL if size < linux.OPEN_HOW.size else errno.E2BIG)
    raw = call.memory.read(call.arg(2), size)
    if any(raw[linux.OPEN_HOW.size :]):
        raise Errno(errno.E2BIG)
    flags, mode, resolve = linux.OPEN_HOW.unpack_from(raw)
    if flags >> 32 or mode >> 32:
        raise Errno(errno.EINVAL)
    return await _open(hub, call, flags, mode, resolve)


# --- metadata ---------------------------------------------------------------------


async def _statx(hub: Hub, call: Trapped, target: Target, flags: int, mask: int) -> bytes:
    flags &= AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH | linux.AT_NO_AUTOMOUNT | 0x6000
    reply = await hub.call(Op.STAT, (target.dir, flags, mask), (target.path,))
    return _blob(reply, linux.STATX_SIZE, exact=True)


def _fd_target(call: Trapped, i: int = 0) -> Target:
    return Target(True, _file(call, i).handle, b"", b"")


@handles("fstat")
async def sys_fstat(hub: Hub, call: Trapped) -> int:
    raw = await _statx(hub, call, _fd_target(call), AT_EMPTY_PATH, STATX_BASIC_STATS)
    call.memory.write(call.arg(1), linux.statx_to_stat(raw))
    return 0


@handles("stat", "lstat")
async def sys_stat(hub: Hub, call: Trapped) -> int:
    flags = AT_SYMLINK_NOFOLLOW if call.syscall.name == "lstat" else 0
    raw = await _statx(hub, call, call.targets[0], flags, STATX_BASIC_STATS)
    call.memory.write(call.arg(1), linux.statx_to_stat(raw))
    return 0


@handles("newfstatat")
async def sys_newfstatat(hub: Hub, call: Trapped) -> int:
    raw = await _statx(hub, call, call.targets[0], call.arg_int(3), STATX_BASIC_STATS)
    call.memory.write(call.arg(2), linux.statx_to_stat(raw))
    return 0


@handles("statx")
async def sys_statx(hub: Hub, call: Trapped) -> int:
    raw = await _statx(hub, call, call.targets[0], call.arg_int(2), call.arg_int(3))
    call.memory.write(call.arg(4), raw)
    return 0


@handles("getdents64")
async def sys_getdents64(hub: Hub, call: Trapped) -> int:
    count = min(call.arg(2), MAX_IO)
    reply = await hub.call(Op.GETDENTS, (_file(call).handle, count))
    call.memory.write(call.arg(1), _blob(reply, count))
    return reply.result


@handles("access", "faccessat", "faccessat2")
async def sys_access(hub: Hub, call: Trapped) -> int:
    target = call.targets[0]
    first = 0 if call.syscall.name == "access" else 1
    mode = call.arg_int(first + 1)
    flags = call.arg_int(3) if call.syscall.name == "faccessat2" else 0
    await hub.call(Op.ACCESS, (target.dir, mode, flags), (target.path,))
    return 0


@handles("readlink", "readlinkat")
async def sys_readlink(hub: Hub, call: Trapped) -> int:
    first = 0 if call.syscall.name == "readlink" else 1
    size = call.arg_int(first + 2)
    if size <= 0:
        raise Errno(errno.EINVAL)
    target = call.targets[0]
    reply = await hub.call(Op.READLINK, (target.dir, size), (target.path,))
    call.memory.write(call.arg(first + 1), _blob(reply, size))
    return reply.result


@handles("mkdir", "mkdirat")
async def sys_mkdir(hub: Hub, call: Trapped) -> int:
    mode = call.arg_int(1 if call.syscall.name == "mkdir" else 2)
    target = call.targets[0]
    mode = mode & 0o1777 & ~call.pairing.umask
    await hub.call(Op.MKDIR, (target.dir, mode), (target.path,))
    return 0


@handles("mknod", "mknodat")
async def sys_mknod(hub: Hub, call: Trapped) -> int:
    first = 0 if call.syscall.name == "mknod" else 1
    mode, dev = call.arg_int(first + 1), call.arg(first + 2) & 0xFFFFFFFF
    target = call.targets[0]
    mode = (mode & linux.S_IFMT) | _create_mode(call, mode)
    await hub.call(Op.MKNOD, (target.dir, mode, dev), (target.path,))
    return 0


@handles("rmdir", "unlink", "unlinkat")
async def sys_unlink(hub: Hub, call: Trapped) -> int:
    name = call.syscall.name
    flags = AT_REMOVEDIR if name == "rmdir" else call.arg_int(2) if name == "unlinkat" else 0
    if flags & ~AT_REMOVEDIR:
        raise Errno(errno.EINVAL)
    target = call.targets[0]
    await hub.call(Op.UNLINK, (target.dir, flags), (target.path,))
    return 0


@handles("rename", "renameat", "renameat2", "link", "linkat")
async def sys_rename(hub: Hub, call: Trapped) -> int:
    old, new = _remote(call, 0), _remote(call, 1)
    name = call.syscall.name
    flags = call.arg_int(4) if name in ("renameat2", "linkat") else 0
    op = Op.LINK if name.startswith("link") else Op.RENAME
    await hub.call(op, (old.dir, new.dir, flags), (old.path, new.path))
    return 0


@handles("symlink", "symlinkat")
async def sys_symlink(hub: Hub, call: Trapped) -> int:
    content = call.memory.read_cstring(call.arg(0))
    target = call.targets[0]
    await hub.call(Op.SYMLINK, (target.dir,), (content, target.path))
    return 0


@handles("chmod", "fchmod", "fchmodat", "fchmodat2")
async def sys_chmod(hub: Hub, call: Trapped) -> int:
    name = call.syscall.name
    if name == "fchmod":
        target, mode, flags = _fd_target(call), call.arg_int(1), AT_EMPTY_PATH
    else:
        target = call.targets[0]
        mode = call.arg_int(1 if name == "chmod" else 2)
        flags = call.arg_int(3) if name == "fchmodat2" else 0
    await hub.call(Op.CHMOD, (target.dir, mode & 0o7777, flags), (target.path,))
    return 0


@handles("chown", "lchown", "fchown", "fchownat")
async def sys_chown(hub: Hub, call: Trapped) -> int:
    name = call.syscall.name
    if name == "fchown":
        target, first, flags = _fd_target(call), 1, AT_EMPTY_PATH
    elif name == "fchownat":
        target, first, flags = call.targets[0], 2, call.arg_int(4)
    else:
        target, first = call.targets[0], 1
        flags = AT_SYMLINK_NOFOLLOW if name == "lchown" else 0
    uid, gid = call.arg_int(first), call.arg_int(first + 1)
    await hub.call(Op.CHOWN, (target.dir, uid, gid, flags), (target.path,))
    return 0


@handles("truncate")
async def sys_truncate(hub: Hub, call: Trapped) -> int:
    target = call.targets[0]
    await hub.call(Op.TRUNCATE, (target.dir, _offset(call.arg_long(1))), (target.path,))
    return 0


@handles("ftruncate")
async def sys_ftruncate(hub: Hub, call: Trapped) -> int:
    await hub.call(Op.FTRUNCATE, (_file(call).handle, _offset(call.arg_long(1))))
    return 0


@handles("fsync", "fdatasync", "sync_file_range")
async def sys_fsync(hub: Hub, call: Trapped) -> int:
    datasync = int(call.syscall.name != "fsync")
    await hub.call(Op.FSYNC, (_file(call).handle, datasync))
    return 0


@handles("syncfs")
async def sys_syncfs(hub: Hub, call: Trapped) -> int:
    await hub.call(Op.SYNCFS, (_file(call).handle,))
    return 0


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
async def sys_utimens(hub: Hub, call: Trapped) -> int:
    name = call.syscall.name
    target = call.targets[0]
    if name == "utimensat":
        times, flags = _times(call, call.arg(2), "timespec"), call.arg_int(3)
        if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH):
            raise Errno(errno.EINVAL)
        if target.null:
            flags |= AT_EMPTY_PATH
    elif name == "futimesat":
        times, flags = _times(call, call.arg(2), "timeval"), 0
    else:
        times, flags = _times(call, call.arg(1), "timeval" if name == "utimes" else "utimbuf"), 0
    await hub.call(Op.UTIMENS, (target.dir, flags, *times), (target.path,))
    return 0


@handles("statfs", "fstatfs")
async def sys_statfs(hub: Hub, call: Trapped) -> int:
    if call.syscall.name == "fstatfs":
        target, flags = _fd_target(call), AT_EMPTY_PATH
    else:
        target, flags = call.targets[0], 0
    reply = await hub.call(Op.STATFS, (target.dir, flags), (target.path,))
    call.memory.write(call.arg(1), _blob(reply, linux.STATFS.size, exact=True))
    return 0


# --- descriptors ------------------------------------------------------------------

F_SETPIPE_SZ, F_GETPIPE_SZ, F_GETLEASE = 1031, 1032, 1025
_LOCK_COMMANDS = {linux.F_GETLK, linux.F_SETLK, linux.F_SETLKW,
                  linux.F_OFD_GETLK, linux.F_OFD_SETLK, linux.F_OFD_SETLKW}  # fmt: skip


@handles("fcntl")
async def sys_fcntl(hub: Hub, call: Trapped) -> int:
    rf = _file(call)
    cmd = call.arg_int(1)
    if cmd in (linux.F_GETFL, linux.F_SETFL):
        return (await hub.call(Op.FCNTL, (rf.handle, cmd, call.arg_int(2)))).result
    if cmd in _LOCK_COMMANDS:
        raw = call.memory.read(call.arg(2), linux.FLOCK.size)
        reply = await hub.call(Op.LOCK, (rf.handle, cmd), (raw,))
        if cmd in (linux.F_GETLK, linux.F_OFD_GETLK):
            call.memory.write(call.arg(2), _blob(reply, linux.FLOCK.size, exact=True))
        return 0
    if cmd == F_GETLEASE:
        return 2  # F_UNLCK: no lease
    if cmd in (F_SETPIPE_SZ, F_GETPIPE_SZ):
        raise Errno(errno.EBADF)
    raise Errno(errno.EINVAL)


@handles("flock")
async def sys_flock(hub: Hub, call: Trapped) -> int:
    await hub.call(Op.FLOCK, (_file(call).handle, call.arg_int(1)))
    return 0


FIONREAD, FIONBIO, FIOQSIZE, FIGETBSZ = 0x541B, 0x5421, 0x5460, 2
FS_IOC_GETFLAGS, FICLONE = 0x80086601, 0x40049409


@handles("ioctl")
async def sys_ioctl(hub: Hub, call: Trapped) -> int:
    rf = _file(call)
    request = call.arg(1) & 0xFFFFFFFF
    addr = call.arg(2)
    if request in (FIONREAD, FIGETBSZ, FS_IOC_GETFLAGS):
        reply = await hub.call(Op.IOCTL, (rf.handle, request, 0))
        call.memory.write(addr, _INT.pack(_LOFF.unpack(_blob(reply, 8, exact=True))[0]))
        return reply.result
    if request == FIOQSIZE:
        reply = await hub.call(Op.IOCTL, (rf.handle, request, 0))
        call.memory.write(addr, _blob(reply, 8, exact=True))
        return reply.result
    if request == FIONBIO:
        (value,) = call.memory.read_struct(addr, _INT)
        return (await hub.call(Op.IOCTL, (rf.handle, request, value))).result
    if request == FICLONE:
        source = hub.placeholders.lookup(call.notif.tid, call.arg_int(2))
        if source is None:
            raise Errno(errno.EXDEV)
        return (await hub.call(Op.IOCTL, (rf.handle, request, source.handle))).result
    raise Errno(errno.ENOTTY)


@handles("fallocate")
async def sys_fallocate(hub: Hub, call: Trapped) -> int:
    args = (_file(call).handle, call.arg_int(1), call.arg_long(2), call.arg_long(3))
    await hub.call(Op.FALLOCATE, args)
    return 0


@handles("fadvise64", "readahead")
async def sys_fadvise(hub: Hub, call: Trapped) -> int:
    # Advice only: accepted without a round trip, as the kernel accepts it for files.
    rf = _file(call)
    if call.syscall.name == "fadvise64" and not 0 <= call.arg_int(3) <= 5:
        raise Errno(errno.EINVAL)
    if not (rf.is_regular or rf.is_dir):
        raise Errno(errno.ESPIPE if call.syscall.name == "fadvise64" else errno.EINVAL)
    return 0


def _offset_in(call: Trapped, addr: int) -> int:
    return -1 if addr == 0 else _offset(call.memory.read_struct(addr, _LOFF)[0])


@handles("copy_file_range")
async def sys_copy_file_range(hub: Hub, call: Trapped) -> int:
    src, dst = call.files
    if src is None or dst is None:
        raise Errno(errno.EXDEV)
    off_in, off_out = _offset_in(call, call.arg(1)), _offset_in(call, call.arg(3))
    length, flags = call.arg(4), call.arg_int(5)
    args = (src.handle, off_in, dst.handle, off_out, min(length, MAX_RW_COUNT), flags)
    n = (await hub.call(Op.COPY_RANGE, args)).result
    if off_in >= 0:
        call.memory.write_struct(call.arg(1), _LOFF, off_in + n)
    if off_out >= 0:
        call.memory.write_struct(call.arg(3), _LOFF, off_out + n)
    return n


@handles("sendfile")
async def sys_sendfile(hub: Hub, call: Trapped) -> int:
    out, src = call.files
    if out is None or src is None:
        raise Errno(errno.EINVAL)
    offset = _offset_in(call, call.arg(2))
    count = min(call.arg(3), MAX_RW_COUNT)
    n = (await hub.call(Op.SENDFILE, (out.handle, src.handle, offset, count))).result
    if offset >= 0:
        call.memory.write_struct(call.arg(2), _LOFF, offset + n)
    return n


# --- extended attributes ----------------------------------------------------------


def _xattr_target(call: Trapped) -> tuple[Target, int]:
    name = call.syscall.name
    if name.startswith("f"):
        return _fd_target(call), AT_EMPTY_PATH
    return call.targets[0], AT_SYMLINK_NOFOLLOW if name.startswith("l") else 0


def _xattr_name(call: Trapped, addr: int) -> bytes:
    try:
        name = call.memory.read_cstring(addr, XATTR_NAME_MAX + 1)
    except Errno as exc:
        raise Errno(errno.ERANGE if exc.errno == errno.ENAMETOOLONG else exc.errno) from None
    if not name:
        raise Errno(errno.ERANGE)
    return name


@handles("getxattr", "lgetxattr", "fgetxattr")
async def sys_getxattr(hub: Hub, call: Trapped) -> int:
    target, flags = _xattr_target(call)
    attr = _xattr_name(call, call.arg(1))
    size = min(call.arg(3), XATTR_SIZE_MAX)
    reply = await hub.call(Op.GETXATTR, (target.dir, flags, size), (target.path, attr))
    if size:
        call.memory.write(call.arg(2), _blob(reply, size))
    return reply.result


@handles("setxattr", "lsetxattr", "fsetxattr")
async def sys_setxattr(hub: Hub, call: Trapped) -> int:
    target, flags = _xattr_target(call)
    attr = _xattr_name(call, call.arg(1))
    size = call.arg(3)
    if size > XATTR_SIZE_MAX:
        raise Errno(errno.E2BIG)
    value = call.memory.read(call.arg(2), size)
    args = (target.dir, flags, call.arg_int(4))
    await hub.call(Op.SETXATTR, args, (target.path, attr, value))
    return 0


@handles("listxattr", "llistxattr", "flistxattr")
async def sys_listxattr(hub: Hub, call: Trapped) -> int:
    target, flags = _xattr_target(call)
    size = min(call.arg(2), XATTR_SIZE_MAX)
    reply = await hub.call(Op.LISTXATTR, (target.dir, flags, size), (target.path,))
    if size:
        call.memory.write(call.arg(1), _blob(reply, size))
    return reply.result


@handles("removexattr", "lremovexattr", "fremovexattr")
async def sys_removexattr(hub: Hub, call: Trapped) -> int:
    target, flags = _xattr_target(call)
    attr = _xattr_name(call, call.arg(1))
    await hub.call(Op.REMOVEXATTR, (target.dir, flags), (target.path, attr))
    return 0


# --- answered by the hub: cwd, umask, execve ----------------------------------------


@handles("chdir")
async def sys_chdir(hub: Hub, call: Trapped) -> int | _Continue:
    call.side = "hub"
    target = call.targets[0]
    pairing = call.pairing
    if target.remote:
        reply = await hub.call(Op.CHDIR, (target.dir,), (target.path,))
        hub.seal(pairing)  # children forked until now keep the old directory
        pairing.cwd, pairing.cwd_remote = reply.blob, True
        call.side = "slave"
        return 0
    path = target.shown
    absolute = normalize(path if path.startswith(b"/") else pairing.cwd + b"/" + path)
    _enter_master_directory(hub, call, absolute)
    call.side = "master"
    return CONTINUE


def _enter_master_directory(hub: Hub, call: Trapped, path: bytes) -> None:
    """A chdir into a master directory is continued: the kernel decides, with the
    program's credentials; fmhub reads its verdict back (Hub.settle_cwd)."""
    pairing = call.pairing
    hub.seal(pairing)
    try:
        st = os.stat(f"/proc/{call.notif.tid}/cwd")
    except OSError:
        return
    previous = pairing.inheritable()
    pairing.pending_cwd = PendingChdir(call.notif.tid, (st.st_dev, st.st_ino), previous)
    pairing.cwd, pairing.cwd_remote, pairing.staged_cwd = path, False, False


@handles("fchdir")
async def sys_fchdir(hub: Hub, call: Trapped) -> int | _Continue:
    pairing = call.pairing
    rf = call.files[0]
    if rf is not None:
        if not rf.is_dir:
            raise Errno(errno.ENOTDIR)
        reply = await hub.call(Op.HANDLE_PATH, (rf.handle,))
        hub.seal(pairing)
        pairing.cwd, pairing.cwd_remote = reply.blob, True
        return 0
    call.side = "master"
    try:
        path = os.readlink(f"/proc/{call.notif.tid}/fd/{call.arg_int(0)}")
    except OSError:
        return CONTINUE  # the kernel answers EBADF
    if path.startswith("/"):
        _enter_master_directory(hub, call, os.fsencode(path))
    return CONTINUE


@handles("getcwd")
async def sys_getcwd(hub: Hub, call: Trapped) -> int | _Continue:
    pairing = call.pairing
    if not pairing.cwd_remote:
        call.side = "master"
        return CONTINUE
    call.side = "hub"
    data = pairing.cwd + b"\0"
    if call.arg(1) < len(data):
        raise Errno(errno.ERANGE)
    call.memory.write(call.arg(0), data)
    return len(data)


@handles("umask")
async def sys_umask(hub: Hub, call: Trapped) -> int | _Continue:
    call.side = "master"
    call.pairing.umask = call.arg_int(0) & 0o777
    return CONTINUE


@handles("exit")
async def sys_thread_exit(hub: Hub, call: Trapped) -> _Continue:
    call.side = "master"
    hub.forget_tid(call.notif.tid)
    return CONTINUE


@handles("exit_group")
async def sys_exit(hub: Hub, call: Trapped) -> _Continue:
    call.side = "master"
    hub.seal(call.pairing)  # its orphans will not find it any more
    return CONTINUE


@handles("execve", "execveat")
async def sys_execve(hub: Hub, call: Trapped) -> int | _Continue:
    target = call.targets[0]
    call.pairing.staged_names = frozenset()
    if not target.remote:
        call.side = "master"
        call.pairing.memory.forget()  # a new address space after a successful exec
        call.pairing.exec_pending = True
        return CONTINUE
    # A file that lives only on the slave: answer what the kernel would for a file
    # that does not exist or cannot be executed; otherwise stage it (staging.py).
    flags = call.arg_int(4) & AT_EMPTY_PATH if call.syscall.name == "execveat" else 0
    reply = await hub.call(Op.STAT, (target.dir, flags, STATX_BASIC_STATS), (target.path,))
    raw = reply.blob
    if not stat.S_ISREG(linux.statx_mode(raw)):
        raise Errno(errno.EACCES)
    await hub.call(Op.ACCESS, (target.dir, os.X_OK, flags | linux.AT_EACCESS), (target.path,))
    name = target.shown
    if hub.stage is None or not name or not call.pairing.staged_cwd:
        call.note = "slave-only executable: not staged (the process left the slave's tree)"
        raise Errno(errno.ENOEXEC)
    if call.syscall.name == "execveat" and call.arg_int(0) != linux.AT_FDCWD:
        call.note = "slave-only executable: execveat from a directory fd is not staged"
        raise Errno(errno.ENOEXEC)
    absolute = name.startswith(b"/")
    kernel_name = b"." + name[1:] if absolute else name
    try:
        staged = hub.stage.place(kernel_name)
    except Errno:
        call.note = "slave-only executable: its name climbs out of the stage"
        raise
    identity = linux.statx_identity(raw)
    if not hub.stage.current(staged, identity):
        content = await _read_whole(hub, target)
        script = staging.shebang(content) if absolute else None
        if script is not None:
            content = staging.wrapper(script[0], script[1], name)
        hub.stage.write(staged, content, linux.statx_mode(raw), identity)
    if absolute and hub.stage.is_wrapper(staged):
        # The wrapper's /bin/sh opens it by the rewritten name: from the stage.
        call.pairing.staged_names = frozenset({kernel_name})
    if absolute:
        name_at = call.arg(0 if call.syscall.name == "execve" else 1)
        argv = call.arg(1 if call.syscall.name == "execve" else 2)
        call.memory.rewrite_byte(name_at, b".")
        if argv and call.memory.read_struct(argv, _POINTER)[0] == name_at:
            # The name is argv[0] too (shells and execvp pass one string): the new
            # image gets its "/" back at its first call (Hub._after_exec).
            call.pairing.argv0_fix = (name_at, arg_start(call.pairing.tgid))
    call.pairing.memory.forget()
    call.pairing.exec_pending = True
    call.side = "master"
    call.note = f"staged as {os.fsdecode(staged)}"
    return CONTINUE


async def _read_whole(hub: Hub, target: Target) -> bytes:
    """The content of a slave file, read with a handle of our own."""
    reply = await hub.call(Op.OPEN, (target.dir, os.O_RDONLY, 0, 0), (target.path,))
    handle = reply.result
    chunks: list[bytes] = []
    try:
        while True:
            data = _blob(await hub.call(Op.READ, (handle, MAX_IO, -1, 0)), MAX_IO)
            if not data:
                break
            chunks.append(data)
    finally:
        hub.link.post(0, Op.CLOSE, (handle,))
    return b"".join(chunks)
