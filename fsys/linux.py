"""Linux facts shared by both sides: raw syscalls, constants, and UAPI structures.

The wire carries Linux 64-bit UAPI layouts (struct statx, struct statfs, struct
flock, linux_dirent64) and asm-generic flag values, so both hubs speak of them in
one place. The wrappers below reach the calls Python's os module lacks (openat2, statx,
getdents64...) through libc's syscall() with fixed prototypes, and raise OSError.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Final

_libc = ctypes.CDLL(None, use_errno=True)

SYS_GETDENTS64: Final = 217
SYS_STATX: Final = 332
SYS_OPENAT2: Final = 437
SYS_FACCESSAT2: Final = 439
SYS_RENAMEAT2: Final = 316
SYS_FSTATFS: Final = 138
SYS_UTIMENSAT: Final = 280
SYS_FCHMODAT2: Final = 452
SYS_FCHOWNAT: Final = 260
SYS_FALLOCATE: Final = 285
SYS_SYNCFS: Final = 306
SYS_PIDFD_GETFD: Final = 438
SYS_TGKILL: Final = 234


def _proto(*argtypes: type) -> Callable[..., int]:
    """libc's syscall() with fixed argument types: no per-call conversion of each
    argument (glibc's syscall() is assembly that only moves registers, so a fixed
    prototype is safe for a variadic function here)."""
    return ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, *argtypes, use_errno=True)(
        ("syscall", _libc)
    )


_c_int, _c_long, _c_uint, _c_ulong = ctypes.c_int, ctypes.c_long, ctypes.c_uint, ctypes.c_ulong
_char_p, _void_p, _size_t = ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t
_openat2 = _proto(_c_int, _char_p, _void_p, _size_t)
_statx = _proto(_c_int, _char_p, _c_int, _c_uint, _void_p)
_getdents64 = _proto(_c_int, _void_p, _c_uint)
_faccessat2 = _proto(_c_int, _char_p, _c_int, _c_int)
_renameat2 = _proto(_c_int, _char_p, _c_int, _char_p, _c_uint)
_fstatfs = _proto(_c_int, _void_p)
_utimensat = _proto(_c_int, _char_p, _void_p, _c_int)
_fchmodat2 = _proto(_c_int, _char_p, _c_uint, _c_int)
_fchownat = _proto(_c_int, _char_p, _c_uint, _c_uint, _c_int)
_fallocate = _proto(_c_int, _c_int, _c_long, _c_long)
_syncfs = _proto(_c_int)
_pidfd_getfd = _proto(_c_int, _c_int, _c_uint)
_tgkill = _proto(_c_int, _c_int, _c_int)


# --- mount namespaces (the view: fsys.master.view) -----------------------------------

CLONE_NEWNS: Final = 0x00020000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 1 << 18
MNT_DETACH: Final = 2


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags))


def mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int,
          data: bytes | None = None) -> None:  # fmt: skip
    _check(_libc.mount(source, target, fstype, ctypes.c_ulong(flags), data))


def umount(target: bytes, flags: int = 0) -> None:
    _check(_libc.umount2(target, flags))


def chroot(path: bytes) -> None:
    _check(_libc.chroot(path))


def setns(fd: int, nstype: int) -> None:
    """Join the namespace ``fd`` refers to (os.setns is Python 3.12's)."""
    _check(_libc.setns(fd, nstype))


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit; return the limits before.

    Each remote file costs a hub one descriptor (the slave's real fd; the master's
    placeholder peer), so a hub needs as many as the program may open. Programs
    started from a hub get the original soft limit back (see the launcher).
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def openat2(dirfd: int, path: bytes, how: ctypes.Array[ctypes.c_char]) -> int:
    """openat2(2); ``how`` holds a struct open_how (OPEN_HOW)."""
    return _check(_openat2(SYS_OPENAT2, dirfd, path, how, 24))


def statx(dirfd: int, path: bytes, flags: int, mask: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    _check(_statx(SYS_STATX, dirfd, path, flags, mask, buf))


def getdents64(fd: int, buf: ctypes.Array[ctypes.c_char], count: int) -> int:
    return _check(_getdents64(SYS_GETDENTS64, fd, buf, count))


def faccessat2(dirfd: int, path: bytes, mode: int, flags: int) -> None:
    _check(_faccessat2(SYS_FACCESSAT2, dirfd, path, mode, flags))


def renameat2(olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> None:
    _check(_renameat2(SYS_RENAMEAT2, olddir, old, newdir, new, flags))


def fstatfs(fd: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    _check(_fstatfs(SYS_FSTATFS, fd, buf))


def utimensat(dirfd: int, path: bytes, times: ctypes.Array[ctypes.c_char], flags: int) -> None:
    _check(_utimensat(SYS_UTIMENSAT, dirfd, path, times, flags))


def fchmodat2(dirfd: int, path: bytes, mode: int, flags: int) -> None:
    _check(_fchmodat2(SYS_FCHMODAT2, dirfd, path, mode, flags))


def fchownat(dirfd: int, path: bytes, uid: int, gid: int, flags: int) -> None:
    _check(_fchownat(SYS_FCHOWNAT, dirfd, path, uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, flags))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_fallocate(SYS_FALLOCATE, fd, mode, offset, length))


# inotify(7): an event is ``INOTIFY_EVENT`` then ``len`` bytes of NUL-padded name.
INOTIFY_EVENT: Final = struct.Struct("=iIII")
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE, IN_CLOSE_NOWRITE = 0x2, 0x4, 0x8, 0x10
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
IN_ONLYDIR = 0x01000000


_DIRENT = struct.Struct("=QqHB")  # d_ino, d_off, d_reclen, d_type; then the name


def dirents(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(inode, DT_* type, name) of each linux_dirent64 record (what getdents64 wrote)."""
    at, end = 0, len(data)
    size = _DIRENT.size
    while at + size <= end:
        ino, _off, reclen, kind = _DIRENT.unpack_from(data, at)
        if reclen < size:
            return
        stop = data.find(b"\0", at + size, at + reclen)
        yield ino, kind, data[at + size : stop if stop >= 0 else at + reclen]
        at += reclen


def dirent_names(data: bytes) -> Iterator[bytes]:
    """The names in a buffer of linux_dirent64 records."""
    return (name for _ino, _kind, name in dirents(data))


def inotify_init() -> int:
    """A new inotify instance, non-blocking and close-on-exec."""
    return _check(_libc.inotify_init1(os.O_NONBLOCK | O_CLOEXEC))


def inotify_add_watch(fd: int, path: bytes, mask: int) -> int:
    return _check(_libc.inotify_add_watch(fd, path, ctypes.c_uint32(mask)))


def inotify_events(fd: int) -> Iterator[tuple[int, int, bytes]]:
    """(watch descriptor, mask, name) of each event queued on the (non-blocking) ``fd``."""
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        at = 0
        while at + INOTIFY_EVENT.size <= len(data):
            wd, mask, _cookie, size = INOTIFY_EVENT.unpack_from(data, at)
            start = at + INOTIFY_EVENT.size
            at = start + size
            yield wd, mask, data[start:at].rstrip(b"\0")


def inotify_rm_watch(fd: int, wd: int) -> None:
    _libc.inotify_rm_watch(fd, wd)  # EINVAL: the kernel already dropped it (IN_IGNORED)


def tgkill(tgid: int, tid: int, signum: int) -> None:
    """Send ``signum`` to the thread ``tid`` of ``tgid`` (as the kernel sends SIGPIPE)."""
    _check(_tgkill(SYS_TGKILL, tgid, tid, signum))


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A copy of another process's ``fd`` (the same open file description)."""
    return _check(_pidfd_getfd(SYS_PIDFD_GETFD, pidfd, fd, 0))


def syncfs(fd: int) -> None:
    _check(_syncfs(SYS_SYNCFS, fd))


_CAP_VERSION_3 = 0x20080522
PR_CAPBSET_DROP = 24


def drop_capabilities(caps: Iterable[int]) -> None:
    """Take ``caps`` out of this process's effective, permitted and inheritable sets
    and out of its bounding set (nothing it execs gets them back). Only the calling
    thread changes: call it before any other thread starts."""
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two __user_cap_data_struct: effective, permitted, inheritable
    _check(_libc.capget(header, data))
    for cap in caps:
        word, bit = divmod(cap, 32)
        for i in range(3):
            data[word * 3 + i] &= ~(1 << bit)
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0))
    _check(_libc.capset(header, data))


# --- constants (asm-generic, which x86_64 uses) ---------------------------------------

AT_FDCWD: Final = -100
AT_SYMLINK_NOFOLLOW: Final = 0x100
AT_REMOVEDIR: Final = 0x200
AT_EACCESS: Final = 0x200
AT_SYMLINK_FOLLOW: Final = 0x400
AT_NO_AUTOMOUNT: Final = 0x800
AT_EMPTY_PATH: Final = 0x1000
AT_STATX_SYNC_TYPE: Final = 0x6000
AT_STATX_FORCE_SYNC: Final = 0x2000

O_ACCMODE: Final = 0o3
O_CREAT: Final = 0o100
O_EXCL: Final = 0o200
O_NOCTTY: Final = 0o400
O_TRUNC: Final = 0o1000
O_APPEND: Final = 0o2000
O_NONBLOCK: Final = 0o4000
O_DIRECTORY: Final = 0o200000
O_NOFOLLOW: Final = 0o400000
O_CLOEXEC: Final = 0o2000000
O_PATH: Final = 0o10000000
O_TMPFILE: Final = 0o20000000 | O_DIRECTORY

RESOLVE_NO_XDEV: Final = 0x01
RESOLVE_NO_MAGICLINKS: Final = 0x02
RESOLVE_NO_SYMLINKS: Final = 0x04
RESOLVE_BENEATH: Final = 0x08
RESOLVE_IN_ROOT: Final = 0x10
RESOLVE_CACHED: Final = 0x20

S_IFMT: Final = 0o170000
S_IFDIR: Final = 0o040000
S_IFREG: Final = 0o100000
S_IFLNK: Final = 0o120000

STATX_BASIC_STATS: Final = 0x7FF
STATX_ALL: Final = 0xFFF

UTIME_NOW: Final = (1 << 30) - 1
UTIME_OMIT: Final = (1 << 30) - 2
PATH_MAX: Final = 4096

F_GETFL: Final = 3
F_SETFL: Final = 4
F_GETLK: Final = 5
F_SETLK: Final = 6
F_SETLKW: Final = 7
F_OFD_GETLK: Final = 36
F_OFD_SETLK: Final = 37
F_OFD_SETLKW: Final = 38

#: struct open_how for openat2(2): flags, mode, resolve.
OPEN_HOW: Final = struct.Struct("=QQQ")

# --- struct statx: the wire's stat, 256 bytes ------------------------------------------

STATX: Final = struct.Struct("=IIQIIIHxxQQQQ" + "qIxxxx" * 4 + "IIIIQ")
STATX_SIZE: Final = 256
#: x86_64 struct stat (what stat, fstat, lstat and newfstatat write), 144 bytes.
STAT: Final = struct.Struct("=QQQIIIxxxxQqqqqqqqqq24x")
#: struct flock on 64-bit Linux: type, whence, start, len, pid.
FLOCK: Final = struct.Struct("=hh4xqqi4x")
#: struct statfs on 64-bit Linux (asm-generic layout, which x86_64 shares), 120 bytes.
STATFS: Final = struct.Struct("=qqQQQQQiiqqq32x")


def new_encode_dev(major: int, minor: int) -> int:
    """The kernel's new_encode_dev(): how struct stat carries a device number."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def statx_to_stat(raw: bytes) -> bytes:
    """Convert a struct statx into the x86_64 struct stat a stat call returns."""
    (
        _mask, blksize, _attrs, nlink, uid, gid, mode, ino, size, blocks, _amask,
        asec, ansec, _bsec, _bnsec, csec, cnsec, msec, mnsec,
        rdev_major, rdev_minor, dev_major, dev_minor, _mnt_id,
    ) = STATX.unpack_from(raw)  # fmt: skip
    return STAT.pack(
        new_encode_dev(dev_major, dev_minor), ino, nlink, mode, uid, gid,
        new_encode_dev(rdev_major, rdev_minor), size, blksize, blocks,
        asec, ansec, msec, mnsec, csec, cnsec,
    )  # fmt: skip


def statx_mode(raw: bytes) -> int:
    mode: int = STATX.unpack_from(raw)[6]
    return mode


def statx_nlink(raw: bytes) -> int:
    nlink: int = STATX.unpack_from(raw)[3]
    return nlink


def statx_identity(raw: bytes) -> tuple[int, ...]:
    """(dev major, dev minor, inode, size, mtime s, mtime ns): the file, as it is now."""
    f = STATX.unpack_from(raw)
    return (f[21], f[22], f[7], f[8], f[17], f[18])


def statx_size(raw: bytes) -> int:
    size: int = STATX.unpack_from(raw)[8]
    return size


# --- terminals --------------------------------------------------------------------

TCGETS: Final = 0x5401
TCSETS: Final = 0x5402
TCSETSW: Final = 0x5403
TCSETSF: Final = 0x5404
TCSBRK: Final = 0x5409
TCXONC: Final = 0x540A
TCFLSH: Final = 0x540B
TIOCSCTTY: Final = 0x540E
TIOCGPGRP: Final = 0x540F
TIOCSPGRP: Final = 0x5410
TIOCOUTQ: Final = 0x5411
TIOCGWINSZ: Final = 0x5413
TIOCSWINSZ: Final = 0x5414
TIOCINQ: Final = 0x541B  # FIONREAD
TIOCNOTTY: Final = 0x5422
TIOCGSID: Final = 0x5429
TCSETS2: Final = 0x402C542B
TCSETSW2: Final = 0x402C542C
TCSETSF2: Final = 0x402C542D
TCIFLUSH: Final = 0
TCIOFLUSH: Final = 2
TERMIOS_SIZE: Final = 36  # the kernel's struct termios: 4 flags, c_line, c_cc[19]
TERMIOS2_SIZE: Final = 44  # struct termios2: and c_ispeed, c_ospeed

#: The terminal ioctls a slave performs for its master (TTY operation): request ->
#: (bytes it reads through its pointer, bytes it writes there). (0, 0): an integer
#: argument by value, or none. Not TIOCSTI (it would type into the slave's terminal)
#: nor the job-control ones (fmhub answers those: design.md, "The slave's terminal").
TTY_IOCTLS: Final[dict[int, tuple[int, int]]] = {
    TCGETS: (0, TERMIOS_SIZE),
    TCSETS: (TERMIOS_SIZE, 0),
    TCSETSW: (TERMIOS_SIZE, 0),
    TCSETSF: (TERMIOS_SIZE, 0),
    0x802C542A: (0, TERMIOS2_SIZE),  # TCGETS2
    TCSETS2: (TERMIOS2_SIZE, 0),
    TCSETSW2: (TERMIOS2_SIZE, 0),
    TCSETSF2: (TERMIOS2_SIZE, 0),
    TCSBRK: (0, 0),
    0x5425: (0, 0),  # TCSBRKP
    TCXONC: (0, 0),
    TCFLSH: (0, 0),
    0x540C: (0, 0),  # TIOCEXCL
    0x540D: (0, 0),  # TIOCNXCL
    0x80045440: (0, 4),  # TIOCGEXCL
    TIOCOUTQ: (0, 4),
    TIOCINQ: (0, 4),
    TIOCGWINSZ: (0, 8),
    TIOCSWINSZ: (8, 0),
    0x5415: (0, 4),  # TIOCMGET
    0x5416: (4, 0),  # TIOCMBIS
    0x5417: (4, 0),  # TIOCMBIC
    0x5418: (4, 0),  # TIOCMSET
    0x5419: (0, 4),  # TIOCGSOFTCAR
    0x541A: (4, 0),  # TIOCSSOFTCAR
    0x5424: (0, 4),  # TIOCGETD
    0x5423: (4, 0),  # TIOCSETD
}


# --- sockets with raw addresses (the slave's network: fsys.master.net) --------------
#
# Python's socket module turns addresses into tuples and back; the wire carries the
# program's struct sockaddr as it is, so the slave hands it to the kernel unchanged
# (the kernel's own checks, and errnos, for any family).

SYS_SOCKET, SYS_CONNECT, SYS_ACCEPT4, SYS_SENDTO, SYS_RECVFROM = 41, 42, 288, 44, 45
SYS_SHUTDOWN, SYS_BIND, SYS_LISTEN, SYS_GETSOCKNAME, SYS_GETPEERNAME = 48, 49, 50, 51, 52
SYS_SETSOCKOPT, SYS_GETSOCKOPT = 54, 55
SOCKADDR_MAX: Final = 128  # sizeof(struct sockaddr_storage)
_socklen = ctypes.c_uint32
_socket = _proto(_c_int, _c_int, _c_int)
_addr_call = _proto(_c_int, _char_p, _c_uint)  # bind, connect
_accept4 = _proto(_c_int, _void_p, _void_p, _c_int)
_name_call = _proto(_c_int, _void_p, _void_p)  # getsockname, getpeername
_sendto = _proto(_c_int, _char_p, _size_t, _c_int, _char_p, _c_uint)
_recvfrom = _proto(_c_int, _void_p, _size_t, _c_int, _void_p, _void_p)
_send_from = _proto(_c_int, _void_p, _size_t, _c_int, _void_p, _c_uint)
_int_call = _proto(_c_int, _c_int)  # listen, shutdown
_getsockopt = _proto(_c_int, _c_int, _c_int, _void_p, _void_p)
_setsockopt = _proto(_c_int, _c_int, _c_int, _char_p, _c_uint)


def socket_fd(family: int, kind: int, protocol: int) -> int:
    return _check(_socket(SYS_SOCKET, family, kind, protocol))


def bind(fd: int, addr: bytes) -> None:
    _check(_addr_call(SYS_BIND, fd, addr, len(addr)))


def connect(fd: int, addr: bytes) -> None:
    _check(_addr_call(SYS_CONNECT, fd, addr, len(addr)))


def listen(fd: int, backlog: int) -> None:
    _check(_int_call(SYS_LISTEN, fd, backlog))


def shutdown(fd: int, how: int) -> None:
    _check(_int_call(SYS_SHUTDOWN, fd, how))


def _address(buf: ctypes.Array[ctypes.c_char], size: ctypes.c_uint32) -> bytes:
    return buf.raw[: min(size.value, SOCKADDR_MAX)]


def accept4(fd: int, flags: int) -> tuple[int, bytes]:
    """(the connection's fd, the peer's address)."""
    buf, size = ctypes.create_string_buffer(SOCKADDR_MAX), _socklen(SOCKADDR_MAX)
    new = _check(_accept4(SYS_ACCEPT4, fd, buf, ctypes.byref(size), flags))
    return new, _address(buf, size)


def sockname(fd: int, *, peer: bool) -> bytes:
    buf, size = ctypes.create_string_buffer(SOCKADDR_MAX), _socklen(SOCKADDR_MAX)
    _check(_name_call(SYS_GETPEERNAME if peer else SYS_GETSOCKNAME, fd, buf, ctypes.byref(size)))
    return _address(buf, size)


def sendto(fd: int, data: bytes, flags: int, addr: bytes) -> int:
    return _check(_sendto(SYS_SENDTO, fd, data, len(data), flags, addr or None, len(addr)))


def send_from(fd: int, data: bytes, start: int, flags: int) -> int:
    """send(2) of ``data[start:]``, without copying it."""
    base = ctypes.cast(_char_p(data), _void_p).value or 0
    return _check(_send_from(SYS_SENDTO, fd, base + start, len(data) - start, flags, None, 0))


def recvfrom(fd: int, size: int, flags: int) -> tuple[int, bytes, bytes]:
    """(the length the kernel returned, the data it wrote, the sender's address)."""
    data = ctypes.create_string_buffer(max(size, 1))
    buf, alen = ctypes.create_string_buffer(SOCKADDR_MAX), _socklen(SOCKADDR_MAX)
    n = _check(_recvfrom(SYS_RECVFROM, fd, data, size, flags, buf, ctypes.byref(alen)))
    return n, data.raw[: min(n, size)], _address(buf, alen)


def getsockopt(fd: int, level: int, name: int, size: int) -> bytes:
    buf, length = ctypes.create_string_buffer(max(size, 1)), _socklen(size)
    _check(_getsockopt(SYS_GETSOCKOPT, fd, level, name, buf, ctypes.byref(length)))
    return buf.raw[: min(length.value, size)]


def setsockopt(fd: int, level: int, name: int, value: bytes) -> None:
    _check(_setsockopt(SYS_SETSOCKOPT, fd, level, name, value or None, len(value)))
