"""The FUSE kernel protocol (linux/fuse.h), sans-IO: what /dev/fuse carries.

Theory of operation. The kernel writes one request per read(2) of /dev/fuse: a
``fuse_in_header`` (length, opcode, unique id, node id, the caller's uid, gid and
pid) and an opcode-specific body. The server answers with one write(2): a
``fuse_out_header`` (length, -errno or 0, the same unique id) and a body. A write
with unique id 0 is a *notice* instead (the header's error field is the notice's
code): the server tells the kernel that what it cached about a node or a name no
longer holds. This module names the opcodes and structures and packs and unpacks
them; ``fsys.master.view`` serves them. Layouts are those of protocol 7.31 and
later on 64-bit Linux; fields are little endian on every architecture fsys runs
on (x86_64, aarch64).
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from fsys import linux

MAJOR: Final = 7
#: The newest minor version whose structures this module packs (INIT's is the
#: smaller of this and the kernel's).
MINOR: Final = 38
ROOT_ID: Final = 1


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36  # no reply
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47


NO_REPLY: Final = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})

# INIT flags (fuse_init_out.flags)
ASYNC_READ: Final = 1 << 0
ATOMIC_O_TRUNC: Final = 1 << 3
BIG_WRITES: Final = 1 << 5
AUTO_INVAL_DATA: Final = 1 << 12
DO_READDIRPLUS: Final = 1 << 13
ASYNC_DIO: Final = 1 << 15
PARALLEL_DIROPS: Final = 1 << 18
HANDLE_KILLPRIV: Final = 1 << 19
MAX_PAGES: Final = 1 << 22
CACHE_SYMLINKS: Final = 1 << 23
HANDLE_KILLPRIV_V2: Final = 1 << 28
SETXATTR_EXT: Final = 1 << 29

# fuse_open_out.open_flags
FOPEN_DIRECT_IO: Final = 1 << 0
FOPEN_KEEP_CACHE: Final = 1 << 1
FOPEN_CACHE_DIR: Final = 1 << 3
#: No FLUSH at each close (the kernel's 5.16 and later; without WRITEBACK_CACHE).
FOPEN_NOFLUSH: Final = 1 << 5

# fuse_setattr_in.valid
FATTR_MODE: Final = 1 << 0
FATTR_UID: Final = 1 << 1
FATTR_GID: Final = 1 << 2
FATTR_SIZE: Final = 1 << 3
FATTR_ATIME: Final = 1 << 4
FATTR_MTIME: Final = 1 << 5
FATTR_FH: Final = 1 << 6
FATTR_ATIME_NOW: Final = 1 << 7
FATTR_MTIME_NOW: Final = 1 << 8

GETATTR_FH: Final = 1 << 0
FSYNC_FDATASYNC: Final = 1 << 0

# notices: fuse_out_header.error when unique is 0
NOTIFY_INVAL_INODE: Final = 2
NOTIFY_INVAL_ENTRY: Final = 3
#: fuse_notify_inval_entry_out.flags (7.38): expire the name, do not drop its dentry
#: (a dropped dentry is "unlinked": getcwd in it fails with ENOENT).
EXPIRE_ONLY: Final = 1 << 0

IN_HEADER: Final = struct.Struct("<IIQQIIIHH")  # 40 bytes
OUT_HEADER: Final = struct.Struct("<IiQ")  # 16 bytes
_ATTR = "QQQQQQIIIIIIIIII"  # struct fuse_attr, 88 bytes
ENTRY_OUT: Final = struct.Struct("<QQQQII" + _ATTR)  # 128 bytes
ATTR_OUT: Final = struct.Struct("<QII" + _ATTR)  # 104 bytes
OPEN_OUT: Final = struct.Struct("<QII")
WRITE_OUT: Final = struct.Struct("<II")
GETXATTR_OUT: Final = struct.Struct("<II")
LSEEK_OUT: Final = struct.Struct("<Q")
STATFS_OUT: Final = struct.Struct("<QQQQQIIII24x")  # struct fuse_kstatfs, 80 bytes
INIT_IN: Final = struct.Struct("<IIII")  # major, minor, max_readahead, flags
INIT_OUT: Final = struct.Struct("<IIIIHHIIHHI28x")  # 64 bytes
DIRENT: Final = struct.Struct("<QQII")  # ino, off, namelen, type; then the name
INVAL_INODE: Final = struct.Struct("<Qqq")
INVAL_ENTRY: Final = struct.Struct("<QII")

FORGET_IN: Final = struct.Struct("<Q")
FORGET_ONE: Final = struct.Struct("<QQ")
BATCH_FORGET_IN: Final = struct.Struct("<II")
GETATTR_IN: Final = struct.Struct("<IIQ")  # getattr_flags, dummy, fh
SETATTR_IN: Final = struct.Struct("<IIQQQQQQIIIIIIII")  # 88 bytes
MKNOD_IN: Final = struct.Struct("<IIII")  # mode, rdev, umask, padding
MKDIR_IN: Final = struct.Struct("<II")  # mode, umask
RENAME_IN: Final = struct.Struct("<Q")
RENAME2_IN: Final = struct.Struct("<QII")
LINK_IN: Final = struct.Struct("<Q")
OPEN_IN: Final = struct.Struct("<II")  # flags, open_flags
CREATE_IN: Final = struct.Struct("<IIII")  # flags, mode, umask, open_flags
RELEASE_IN: Final = struct.Struct("<QIIQ")
READ_IN: Final = struct.Struct("<QQIIQII")  # fh, offset, size, read_flags, ...
WRITE_IN: Final = struct.Struct("<QQIIQII")  # fh, offset, size, write_flags, ...
FSYNC_IN: Final = struct.Struct("<QII")
SETXATTR_IN: Final = struct.Struct("<II")  # size, flags (without SETXATTR_EXT)
GETXATTR_IN: Final = struct.Struct("<II")  # size, padding
ACCESS_IN: Final = struct.Struct("<II")
FALLOCATE_IN: Final = struct.Struct("<QQQII")
LSEEK_IN: Final = struct.Struct("<QQII")
COPY_FILE_RANGE_IN: Final = struct.Struct("<QQQQQQQ")  # fh_in, off_in, node, fh, off, len, flags

_NS = 1_000_000_000


def attr_fields(raw: bytes) -> tuple[int, ...]:
    """A struct statx as the fields of a struct fuse_attr (``ATTR_OUT`` and
    ``ENTRY_OUT`` end with them): the slave's inode number, size, times and mode."""
    (
        _mask, blksize, _attrs, nlink, uid, gid, mode, ino, size, blocks, _amask,
        asec, ansec, _bsec, _bnsec, csec, cnsec, msec, mnsec,
        rdev_major, rdev_minor, _dev_major, _dev_minor, _mnt_id,
    ) = linux.STATX.unpack_from(raw)  # fmt: skip
    return (
        ino, size, blocks, asec & 0xFFFFFFFFFFFFFFFF, msec & 0xFFFFFFFFFFFFFFFF,
        csec & 0xFFFFFFFFFFFFFFFF, ansec, mnsec, cnsec, mode, nlink, uid, gid,
        linux.new_encode_dev(rdev_major, rdev_minor) & 0xFFFFFFFF, blksize, 0,
    )  # fmt: skip


def synthetic_attr(ino: int, mode: int, size: int = 0) -> tuple[int, ...]:
    """The fuse_attr fields of a node the view makes itself (owned by root)."""
    return (ino, size, 0, 0, 0, 0, 0, 0, 0, mode, 2 if mode & 0o040000 else 1, 0, 0, 0, 4096, 0)


def split_seconds(seconds: float) -> tuple[int, int]:
    """A cache validity (seconds) as fuse_entry_out's (seconds, nanoseconds)."""
    whole = int(seconds)
    return whole, int((seconds - whole) * _NS)


def entry_out(nodeid: int, valid: float, attr_valid: float, attr: tuple[int, ...]) -> bytes:
    sec, nsec = split_seconds(valid)
    asec, ansec = split_seconds(attr_valid)
    return ENTRY_OUT.pack(nodeid, 0, sec, asec, nsec, ansec, *attr)


def attr_out(valid: float, attr: tuple[int, ...]) -> bytes:
    sec, nsec = split_seconds(valid)
    return ATTR_OUT.pack(sec, nsec, 0, *attr)


def statfs_out(raw: bytes) -> bytes:
    """A struct statfs (the wire's) as a struct fuse_kstatfs."""
    (_type, bsize, blocks, bfree, bavail, files, ffree, _f0, _f1, namelen, frsize,
     _flags) = linux.STATFS.unpack_from(raw)  # fmt: skip
    return STATFS_OUT.pack(blocks, bfree, bavail, files, ffree, bsize, namelen, frsize or bsize, 0)


def reply(unique: int, body: bytes = b"", error: int = 0) -> bytes:
    """The answer to request ``unique``: ``body``, or the errno ``error`` (positive)."""
    if error:
        return OUT_HEADER.pack(OUT_HEADER.size, -error, unique)
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body


def notice(code: int, body: bytes) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), code, 0) + body


def inval_inode(nodeid: int) -> bytes:
    """Notice: the node's attributes and cached data no longer hold."""
    return notice(NOTIFY_INVAL_INODE, INVAL_INODE.pack(nodeid, 0, 0))


def inval_entry(parent: int, name: bytes, *, expire: bool = False) -> bytes:
    """Notice: what ``name`` in ``parent`` names (or that nothing does) no longer holds.
    With ``expire``, the kernel keeps the dentry but asks again at the next walk
    through it, and drops it only if the answer names something else."""
    flags = EXPIRE_ONLY if expire else 0
    return notice(NOTIFY_INVAL_ENTRY, INVAL_ENTRY.pack(parent, len(name), flags) + name + b"\0")


def _align(n: int) -> int:
    return (n + 7) & ~7


def dirent(ino: int, offset: int, kind: int, name: bytes) -> bytes:
    """One struct fuse_dirent (``kind``: the DT_* type), padded to 8 bytes."""
    record = DIRENT.pack(ino, offset, len(name), kind) + name
    return record + b"\0" * (_align(len(record)) - len(record))


def direntplus(entry: bytes, ino: int, offset: int, kind: int, name: bytes) -> bytes:
    """One struct fuse_direntplus: a fuse_entry_out, then the dirent."""
    return entry + dirent(ino, offset, kind, name)


def init_out(kernel_minor: int, kernel_flags: int, max_readahead: int, max_write: int) -> bytes:
    """INIT's answer: the flags both sides have, of ``WANTED``."""
    flags = kernel_flags & WANTED
    return INIT_OUT.pack(
        MAJOR, min(kernel_minor, MINOR), max_readahead, flags,
        64, 48, max_write, 1, max_write // 4096, 0, 0,
    )  # fmt: skip


#: What the view asks of the kernel: parallel reads and lookups, readdirplus, big
#: writes and reads (MAX_PAGES), symlink targets kept until a notice drops them, and
#: suid/sgid bits and file capabilities cleared by the slave's own kernel when the
#: slave writes (HANDLE_KILLPRIV, and _V2: the kernel then marks a file found without
#: them, and stops asking for security.capability at every write). No
#: WRITEBACK_CACHE: the view holds the writes (View._write_behind), not the kernel.
WANTED: Final = (
    ASYNC_READ | ATOMIC_O_TRUNC | BIG_WRITES | AUTO_INVAL_DATA | DO_READDIRPLUS | ASYNC_DIO
    | PARALLEL_DIROPS | HANDLE_KILLPRIV | HANDLE_KILLPRIV_V2 | MAX_PAGES | CACHE_SYMLINKS
)  # fmt: skip


def names(body: memoryview, count: int) -> list[bytes]:
    """The first ``count`` NUL-terminated strings of ``body`` (ValueError if fewer)."""
    out: list[bytes] = []
    data = bytes(body)
    at = 0
    for _ in range(count):
        end = data.index(b"\0", at)
        out.append(data[at:end])
        at = end + 1
    return out
