"""The wire protocol between fmhub and fshub, sans-IO.

Theory of operation. One connection carries a whole session. Each direction is a
sequence of frames; a frame is a 16-byte header (body length, kind, flags, op,
pairing, request) and a body. Both sides open with HELLO (version and features);
then the master sends CALLs and pairing changes, the slave answers each CALL with a
REPLY carrying the same pairing and request id. Request id 0 means "no reply
wanted" (closing a remote handle). GOODBYE ends a direction with a reason.

Watched answers. The slave may mark a STAT reply REPLY_WATCHED: it watches the
directories that the answer depends on (inotify), and until it sends an INVALIDATE
naming the path or a prefix of it, the same STAT would get the same answer, so the
master may answer it again itself. Both sides key such answers by ``watch_key``.

A CALL carries one *operation*: a record (``Open``, ``Stat``...) whose fields are
named once here and read by name on both sides. On the wire its body is the
record's integer fields (signed 64-bit, little endian) followed by its byte strings
(u32 length + bytes); each record declares how long each string may be, so a frame
is checked completely before anything acts on it. A REPLY's body is the result (>= 0, or -errno as
Linux numbers it) and one byte string. Structures that cross the wire (stat,
statfs, directory entries, flock) use the Linux 64-bit UAPI layouts, which are the
same on every 64-bit Linux architecture; flags and mode bits use the asm-generic
values.

This module imports no trio and touches no socket: ``Connection.receive_data``
takes bytes, ``next_event`` returns the next event (or NEED_DATA), ``send`` turns an
event into bytes. Every length is bounded before any allocation: a malformed frame
raises RemoteProtocolError and the connection is dead from then on.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, ClassVar, Final, NamedTuple, Self, TypeVar, dataclass_transform

from fsys.errors import LocalProtocolError, RemoteProtocolError
from fsys.linux import O_PATH, STATX_SIZE

MAGIC: Final = b"FSYS"
VERSION: Final = 1
FEATURES: Final = 0
FEATURE_WATCH: Final = 1
"""In the master's HELLO: mark STAT replies REPLY_WATCHED where they can be, and send
INVALIDATEs (the master keeps an attribute cache). Without it the slave watches nothing."""
FEATURE_STDIO: Final = 2
"""In the slave's HELLO: it lends the session its standard input, output and error
(``fsys-slave run``): LEND answers for fds 0, 1 and 2, and the slave relays the
signals it gets for the session (SIGNAL) and stops when the program stops (STOPPED)."""
FEATURE_NET: Final = 4
"""In the slave's HELLO: the program may use this side's network (SOCKET and the
other socket operations); without it its sockets stay the master's."""
FEATURE_OPEN_READ: Final = 8
"""In the slave's HELLO: it answers OPEN_READ (an open that brings the file's start)."""
FEATURE_CREATE: Final = 16
"""In the slave's HELLO: it answers CREATE (an open that creates, with the new file's
attributes)."""
OPEN_READ_REFUSES: Final = os.O_ACCMODE | os.O_CREAT | os.O_TRUNC | os.O_APPEND | O_PATH
"""The open flags an OPEN_READ refuses (EINVAL), with O_TMPFILE: it only reads."""

MAX_IO: Final = 4 << 20
#: The largest errno a reply may carry (the kernel's MAX_ERRNO).
MAX_ERRNO: Final = 4095
"""Largest data string in one READ/WRITE; bigger requests are split by the master."""
MAX_PATH: Final = 4096
"""PATH_MAX, including the terminating NUL the wire does not carry."""
MAX_SMALL: Final = 64 << 10
"""Largest non-data string: an xattr value or name list, a struct, a reason."""
MAX_BODY: Final = MAX_IO + MAX_SMALL
"""Largest frame body; a header announcing more ends the session."""

HEADER: Final = struct.Struct("<IBBHII")
_I64: Final = struct.Struct("<q")
_U32: Final = struct.Struct("<I")
_HELLO: Final = struct.Struct("<4sHHQ")
_ATTR: Final = struct.Struct("<IqII")  # path length, result, flags, statx length


class Kind(enum.IntEnum):
    HELLO = 1
    CALL = 2
    REPLY = 3
    OPEN_PAIRING = 4
    CLOSE_PAIRING = 5
    GOODBYE = 6
    INVALIDATE = 7
    ATTRS = 8
    SIGNAL = 9
    STOPPED = 10
    CENSUS = 11
    PROCESSES = 12
    CANCEL = 13


class Op(enum.IntEnum):
    """Operation codes on the wire; each has one record below that names its fields."""

    OPEN = 1
    CLOSE = 2
    READ = 3
    WRITE = 4
    LSEEK = 5
    STAT = 6
    GETDENTS = 7
    ACCESS = 8
    READLINK = 9
    MKDIR = 10
    MKNOD = 11
    UNLINK = 12
    RENAME = 13
    LINK = 14
    SYMLINK = 15
    CHMOD = 16
    CHOWN = 17
    TRUNCATE = 18
    FTRUNCATE = 19
    FSYNC = 20
    UTIMENS = 21
    STATFS = 22
    FCNTL = 23
    LOCK = 24
    FLOCK = 25
    IOCTL = 26
    FALLOCATE = 27
    COPY_RANGE = 28
    SENDFILE = 29
    GETXATTR = 30
    SETXATTR = 31
    LISTXATTR = 32
    REMOVEXATTR = 33
    CHDIR = 34
    HANDLE_PATH = 35
    SYNCFS = 36
    LISTDIR = 37
    LEND = 38
    TTY = 39
    SOCKET = 40
    BIND = 41
    CONNECT = 42
    LISTEN = 43
    ACCEPT = 44
    SOCKNAME = 45
    GETSOCKOPT = 46
    SETSOCKOPT = 47
    SHUTDOWN = 48
    SENDTO = 49
    RECVFROM = 50
    POLL = 51
    OPEN_READ = 52
    CREATE = 53


class Blob(enum.Enum):
    """What a CALL's byte string holds, which bounds its length."""

    PATH = MAX_PATH - 1
    DATA = MAX_IO
    SMALL = MAX_SMALL


@dataclass(frozen=True, slots=True)
class Spec:
    """How one operation record crosses the wire: its code, integers and strings."""

    op: Op
    record: type[Any]  # a NamedTuple class
    ints: struct.Struct  # the integer fields, in declaration order
    head: struct.Struct  # the frame header followed by the integer fields
    nints: int
    limits: tuple[int, ...]  # one per string field
    paths: tuple[bool, ...]  # which strings are paths (no NUL inside)


#: record type -> its Spec; op number -> its Spec (for decoding).
SPECS: Final[dict[type, Spec]] = {}
_BY_CODE: Final[dict[int, Spec]] = {}

_R = TypeVar("_R")
_T = TypeVar("_T")


_tuple_new = tuple.__new__
_UNFINISHED: list[type] = []


def _finish_records() -> None:
    """Give each record declared so far a ``__new__`` taking its fields by name: one
    compile for all of them (one each would cost start-up time)."""
    source = []
    for i, record in enumerate(_UNFINISHED):
        names = ", ".join(record._fields)  # type: ignore[attr-defined]
        source.append(f"def new_{i}(_cls, {names}):\n    return _new(_cls, ({names},))")
    namespace: dict[str, Any] = {"_new": _tuple_new}
    exec("\n".join(source), namespace)
    for i, record in enumerate(_UNFINISHED):
        record.__new__ = namespace[f"new_{i}"]  # type: ignore[method-assign]
    _UNFINISHED.clear()


@dataclass_transform()
class Record(tuple):  # type: ignore[type-arg]
    """An operation's record: a tuple whose fields are named by its annotations.

    Like a NamedTuple, but made without typing.NamedTuple's machinery (36 of those
    cost fsys-master ~8 ms of start-up); each record gets a ``__new__`` of its own
    fields (``_finish_records``), so making one costs what a NamedTuple costs.
    Records of different operations never compare equal.
    """

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls) -> None:
        # Not inspect.get_annotations: importing inspect costs fsys-master's start-up.
        fields = tuple(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063
        cls._fields = fields
        for i, name in enumerate(fields):
            setattr(cls, name, property(itemgetter(i), doc=f"Field {i}: {name}"))
        _UNFINISHED.append(cls)  # its __new__ comes with the others' (_finish_records)

    @classmethod
    def _make(cls, values: Iterable[Any]) -> Self:
        return _tuple_new(cls, values)

    def __repr__(self) -> str:
        pairs = ", ".join(
            f"{name}={value!r}" for name, value in zip(self._fields, self, strict=True)
        )
        return f"{type(self).__name__}({pairs})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = tuple.__hash__


def _type_name(annotation: object) -> str:
    """``int`` for int, "int" and ForwardRef("int") alike."""
    name = getattr(annotation, "__forward_arg__", annotation)
    return name if isinstance(name, str) else getattr(name, "__name__", repr(name))


def _wire(op: Op, *blobs: Blob) -> Callable[[type[_R]], type[_R]]:
    """Declare a record as ``op``'s CALL: its int fields first, then one bytes field
    per ``blobs`` entry, in order. The field names are the operation's interface."""

    def register(record: type[_R]) -> type[_R]:
        fields: tuple[str, ...] = record._fields  # type: ignore[attr-defined]
        if record.__mro__[1] is not Record:
            raise TypeError(f"{record.__name__}: an operation is a Record")
        kinds = {f: _type_name(t) for f, t in record.__annotations__.items()}
        nints = len(fields) - len(blobs)
        if [kinds[f] for f in fields] != ["int"] * nints + ["bytes"] * len(blobs):
            raise TypeError(f"{record.__name__}: int fields first, then {len(blobs)} bytes")
        spec = Spec(
            op, record, struct.Struct("<" + "q" * nints),
            struct.Struct("<IBBHII" + "q" * nints), nints,
            tuple(b.value for b in blobs), tuple(b is Blob.PATH for b in blobs),
        )  # fmt: skip
        SPECS[record] = _BY_CODE[op] = spec
        return record

    return register


_P, _D, _S = Blob.PATH, Blob.DATA, Blob.SMALL

# ``dir`` is a directory handle, or 0 for the slave's root. Each docstring gives the
# reply: its result, and its byte string if it has one.


@_wire(Op.OPEN, _P)
class Open(Record):
    """-> a new handle; blob: the file type (S_IFMT >> 12)."""

    dir: int
    flags: int
    mode: int
    resolve: int
    path: bytes


@_wire(Op.OPEN_READ, _P)
class OpenRead(Record):
    """OPEN to read (``flags`` neither write nor create: else EINVAL), then a READ of
    the first ``size`` bytes of a regular file -> a new handle; blob: the file type
    (S_IFMT >> 12) in one byte, then the data (none for another type of file, or if
    that read failed: a READ reports it). The handle's position stays at 0."""

    dir: int
    flags: int
    resolve: int
    size: int
    path: bytes


@_wire(Op.CREATE, _P)
class Create(Record):
    """OPEN with O_CREAT in ``flags`` (else EINVAL), then the STAT of ``path`` as
    STAT with AT_SYMLINK_NOFOLLOW and ``mask``, watched where it can be -> a new
    handle; blob: the struct statx, then what changed until the open (the paths an
    INVALIDATE would carry, as its body holds them: the master applies them before
    the answer); none if the open waited in a thread (a FIFO that was there): STAT
    it. Its flags: the STAT's REPLY_*, and REPLY_NO_XATTRS where the file has no
    extended attribute. What changed after the open is invalidated after the reply."""

    dir: int
    flags: int
    mode: int
    resolve: int
    mask: int
    path: bytes


@_wire(Op.CLOSE)
class Close(Record):
    """Sent with request 0: no reply."""

    handle: int


@_wire(Op.READ)
class Read(Record):
    """-> length; blob: the data, at most ``size`` bytes. offset -1: the file position."""

    handle: int
    size: int
    offset: int
    rwf: int


@_wire(Op.WRITE, _D)
class Write(Record):
    """-> count written. offset -1: the file position."""

    handle: int
    offset: int
    rwf: int
    data: bytes


@_wire(Op.LSEEK)
class Lseek(Record):
    """-> the new offset."""

    handle: int
    offset: int
    whence: int


@_wire(Op.STAT, _P)
class Stat(Record):
    """-> 0; blob: struct statx."""

    dir: int
    flags: int
    mask: int
    path: bytes


@_wire(Op.GETDENTS)
class Getdents(Record):
    """-> length; blob: linux_dirent64 records, at most ``size`` bytes."""

    handle: int
    size: int


@_wire(Op.ACCESS, _P)
class Access(Record):
    dir: int
    mode: int
    flags: int
    path: bytes


@_wire(Op.READLINK, _P)
class Readlink(Record):
    """-> length; blob: the link's target, at most ``size`` bytes."""

    dir: int
    size: int
    path: bytes


@_wire(Op.MKDIR, _P)
class Mkdir(Record):
    dir: int
    mode: int
    path: bytes


@_wire(Op.MKNOD, _P)
class Mknod(Record):
    dir: int
    mode: int
    dev: int
    path: bytes


@_wire(Op.UNLINK, _P)
class Unlink(Record):
    dir: int
    flags: int
    path: bytes


@_wire(Op.RENAME, _P, _P)
class Rename(Record):
    olddir: int
    newdir: int
    flags: int
    old: bytes
    new: bytes


@_wire(Op.LINK, _P, _P)
class Link(Record):
    olddir: int
    newdir: int
    flags: int
    old: bytes
    new: bytes


@_wire(Op.SYMLINK, _P, _P)
class Symlink(Record):
    dir: int
    target: bytes
    path: bytes


@_wire(Op.CHMOD, _P)
class Chmod(Record):
    dir: int
    mode: int
    flags: int
    path: bytes


@_wire(Op.CHOWN, _P)
class Chown(Record):
    dir: int
    uid: int
    gid: int
    flags: int
    path: bytes


@_wire(Op.TRUNCATE, _P)
class Truncate(Record):
    dir: int
    length: int
    path: bytes


@_wire(Op.FTRUNCATE)
class Ftruncate(Record):
    handle: int
    length: int


@_wire(Op.FSYNC)
class Fsync(Record):
    handle: int
    datasync: int


@_wire(Op.UTIMENS, _P)
class Utimens(Record):
    dir: int
    flags: int
    asec: int
    ansec: int
    msec: int
    mnsec: int
    path: bytes


@_wire(Op.STATFS, _P)
class Statfs(Record):
    """-> 0; blob: struct statfs."""

    dir: int
    flags: int
    path: bytes


@_wire(Op.FCNTL)
class Fcntl(Record):
    """-> the command's result (F_GETFL, F_SETFL)."""

    handle: int
    cmd: int
    arg: int


@_wire(Op.LOCK, _S)
class Lock(Record):
    """-> 0; blob: struct flock (for the GETLK commands)."""

    handle: int
    cmd: int
    flock: bytes


@_wire(Op.FLOCK)
class Flock(Record):
    handle: int
    operation: int


@_wire(Op.IOCTL)
class Ioctl(Record):
    """-> the result; blob: the i64 the request writes through its pointer."""

    handle: int
    request: int
    arg: int


@_wire(Op.FALLOCATE)
class Fallocate(Record):
    handle: int
    mode: int
    offset: int
    length: int


@_wire(Op.COPY_RANGE)
class CopyRange(Record):
    """-> count copied. Offsets -1: the file positions."""

    src: int
    off_in: int
    dst: int
    off_out: int
    length: int
    flags: int


@_wire(Op.SENDFILE)
class Sendfile(Record):
    """-> count sent. offset -1: the position of ``src``."""

    out: int
    src: int
    offset: int
    size: int


@_wire(Op.GETXATTR, _P, _S)
class Getxattr(Record):
    """-> the value's length; blob: the value (none when ``size`` is 0)."""

    dir: int
    flags: int
    size: int
    path: bytes
    name: bytes


@_wire(Op.SETXATTR, _P, _S, _S)
class Setxattr(Record):
    dir: int
    flags: int
    xflags: int
    path: bytes
    name: bytes
    value: bytes


@_wire(Op.LISTXATTR, _P)
class Listxattr(Record):
    """-> the list's length; blob: NUL-terminated names (none when ``size`` is 0)."""

    dir: int
    flags: int
    size: int
    path: bytes


@_wire(Op.REMOVEXATTR, _P, _S)
class Removexattr(Record):
    dir: int
    flags: int
    path: bytes
    name: bytes


@_wire(Op.CHDIR, _P)
class Chdir(Record):
    """-> length; blob: the directory's path from the root."""

    dir: int
    path: bytes


@_wire(Op.HANDLE_PATH)
class HandlePath(Record):
    """-> length; blob: the handle's path from the root."""

    handle: int


@_wire(Op.SYNCFS)
class Syncfs(Record):
    handle: int


@_wire(Op.LISTDIR, _P)
class Listdir(Record):
    """-> length; blob: the linux_dirent64 records of the whole directory (EFBIG if
    more than MAX_IO bytes: read it by handle). REPLY_WATCHED: the slave watches the
    directory, so until an INVALIDATE names it, a prefix of it, or ``path/.``, the
    same LISTDIR would list the same names. From the root (``dir`` 0), the slave
    sends the watched answers about the entries first (ATTRS), as for GETDENTS."""

    dir: int
    path: bytes


@_wire(Op.LEND)
class Lend(Record):
    """-> a handle of the slave's own standard stream ``fd`` (0, 1, 2), the same
    handle for streams that are one file (a terminal on all three); blob: the file
    type (S_IFMT) as an i64. EBADF unless the slave lends its stdio (FEATURE_STDIO)."""

    fd: int


@_wire(Op.TTY, _S)
class Tty(Record):
    """A terminal ioctl on a handle: ``data`` is what the request reads through its
    pointer (struct termios, winsize...), ``arg`` its integer argument; -> the
    result; blob: the ``size`` bytes the request writes through its pointer. Only
    the requests the slave knows (``fsys.linux.TTY_IOCTLS``); others ENOTTY."""

    handle: int
    request: int
    arg: int
    size: int
    data: bytes


# --- sockets (fsys.master.net). A socket handle's calls never block the slave: one
# that must wait (``wait`` 1) waits in a task of its own, which CANCEL ends (EINTR);
# ``wait`` 0 answers EAGAIN (EINPROGRESS for a connect) instead. Addresses are struct
# sockaddr as the kernel takes them; an AF_UNIX path is the slave's, from its root.


@_wire(Op.SOCKET)
class Socket(Record):
    """-> a new socket handle (``type`` without SOCK_NONBLOCK and SOCK_CLOEXEC)."""

    family: int
    type: int
    protocol: int


@_wire(Op.BIND, _S)
class Bind(Record):
    handle: int
    addr: bytes


@_wire(Op.CONNECT, _S)
class Connect(Record):
    """-> 0 once connected (``wait``), or EINPROGRESS while it goes on."""

    handle: int
    wait: int
    addr: bytes


@_wire(Op.LISTEN)
class Listen(Record):
    handle: int
    backlog: int


@_wire(Op.ACCEPT)
class Accept(Record):
    """-> the new connection's socket handle; blob: the peer's address."""

    handle: int
    wait: int


@_wire(Op.SOCKNAME)
class Sockname(Record):
    """-> the address's length; blob: the socket's address (``peer``: its peer's)."""

    handle: int
    peer: int


@_wire(Op.GETSOCKOPT)
class Getsockopt(Record):
    """-> the value's length; blob: the value, at most ``size`` bytes."""

    handle: int
    level: int
    name: int
    size: int


@_wire(Op.SETSOCKOPT, _S)
class Setsockopt(Record):
    handle: int
    level: int
    name: int
    value: bytes


@_wire(Op.SHUTDOWN)
class Shutdown(Record):
    handle: int
    how: int


@_wire(Op.SENDTO, _S, _D)
class Sendto(Record):
    """-> count sent; ``addr`` empty: to the peer. ``flags``: MSG_* bits."""

    handle: int
    flags: int
    wait: int
    addr: bytes
    data: bytes


@_wire(Op.RECVFROM)
class Recvfrom(Record):
    """-> the length received (the datagram's whole length with MSG_TRUNC); blob:
    RECV_HEAD (the msghdr's flags, the address's length), the address, the data."""

    handle: int
    flags: int
    size: int
    wait: int


@_wire(Op.POLL)
class Poll(Record):
    """-> revents, once any of ``events`` (or POLLERR, POLLHUP) holds: waits, never
    takes anything (the readiness of a socket whose data goes call by call)."""

    handle: int
    events: int


RECV_HEAD: Final = struct.Struct("<IH")


Operation = (
    Open | Close | Read | Write | Lseek | Stat | Getdents | Access | Readlink | Mkdir
    | Mknod | Unlink | Rename | Link | Symlink | Chmod | Chown | Truncate | Ftruncate
    | Fsync | Utimens | Statfs | Fcntl | Lock | Flock | Ioctl | Fallocate | CopyRange
    | Sendfile | Getxattr | Setxattr | Listxattr | Removexattr | Chdir | HandlePath | Syncfs
    | Listdir | Lend | Tty | Socket | Bind | Connect | Listen | Accept | Sockname
    | Getsockopt | Setsockopt | Shutdown | Sendto | Recvfrom | Poll | OpenRead | Create
)  # fmt: skip
"""One operation the slave performs, with its arguments by name."""

_finish_records()

if len(SPECS) != len(Op):  # pragma: no cover - a declaration is missing
    raise TypeError(f"operations without a record: {set(Op) - set(_BY_CODE)}")


def watch_key(path: bytes) -> bytes | None:
    """The form of ``path`` that watched answers are keyed by on both sides: absolute,
    with "//" and "/./" collapsed (they name the same thing). None for a path whose
    meaning depends on more than the entries it names: relative, with "..", ending in
    "/" or "/.", or the root itself."""
    if not path.startswith(b"/") or path.endswith((b"/", b"/.")):
        return None
    if b"//" not in path and b"/." not in path:
        return path  # already in its key form (the common case: no split and join)
    parts = [p for p in path.split(b"/") if p and p != b"."]
    if not parts or b".." in parts:
        return None
    return b"/" + b"/".join(parts)


# --- events (named tuples: they are made for every frame, and are cheap to make) ----


class Hello(NamedTuple):
    version: int = VERSION
    features: int = FEATURES
    info: bytes = b""


class Call(NamedTuple):
    pairing: int
    request: int
    op: Operation


class Reply(NamedTuple):
    pairing: int
    request: int
    result: int
    blob: bytes = b""
    #: REPLY_* bits (the frame header's flags byte).
    flags: int = 0


REPLY_WATCHED: Final = 1
"""A STAT reply (result or errno) that the slave keeps watching: until an INVALIDATE
names its path, or a prefix of it, the same STAT would get the same answer."""
REPLY_NOT_LINK: Final = 2
"""With REPLY_WATCHED: the path's last component is no symlink, so the answer holds
whether or not the STAT follows one."""


REPLY_NO_XATTRS: Final = 4
"""In an ATTRS entry: the file has no extended attributes (getxattr: ENODATA)."""


class Attr(NamedTuple):
    """One watched answer about one path: as a REPLY_WATCHED STAT reply for a STAT
    of ``path`` not following a final symlink, with the mask of its ATTRS."""

    path: bytes
    result: int  # 0 or -errno
    flags: int  # REPLY_* bits, REPLY_WATCHED among them
    statx: bytes = b""  # struct statx when result is 0


class Attrs(NamedTuple):
    """Slave -> master: watched answers the master did not ask for yet: the entries
    of a directory it is reading (NFS's READDIRPLUS), sent before the GETDENTS reply."""

    mask: int
    entries: tuple[Attr, ...]


class Invalidate(NamedTuple):
    """Slave -> master: what the answers marked REPLY_WATCHED about these paths, and
    every path below them, may no longer be; b"/" is everything. The slave sends it
    before the reply to any call of its own that caused the change, so the program
    sees its own changes at once, and as soon as it reads the change otherwise."""

    paths: tuple[bytes, ...]


class OpenPairing(NamedTuple):
    pairing: int
    parent: int = 0


class ClosePairing(NamedTuple):
    pairing: int


class Goodbye(NamedTuple):
    reason: bytes = b""


class Signal(NamedTuple):
    """Slave -> master: the slave got ``signum`` for the session (its terminal's Ctrl-C,
    a resize, SIGTERM...): deliver it to the program's foreground process group; with
    ``pid``, to that process of the session alone (``fsys-slave kill``)."""

    signum: int
    pid: int = 0


class Cancel(NamedTuple):
    """Master -> slave: the program was signalled while CALL ``request`` of ``pairing``
    waits: end it now if that takes nothing (a read still waiting for data) and
    answer EINTR, or let it finish and answer as usual."""

    pairing: int
    request: int


class Census(NamedTuple):
    """Slave -> master: which processes the session has now (``fsys-slave ps``); the
    master answers PROCESSES with the same ``request``."""

    request: int


class Process(NamedTuple):
    """One process of a session, as PROCESSES lists it."""

    pid: int
    ppid: int
    pgid: int
    state: bytes  # one letter, as in /proc/PID/stat (R, S, T, Z...)
    name: bytes  # its comm: at most 15 bytes in Linux, at most MAX_NAME here


class Processes(NamedTuple):
    """Master -> slave: the answer to CENSUS ``request``: the session's processes."""

    request: int
    entries: tuple[Process, ...]


class Stopped(NamedTuple):
    """Master -> slave: the program stopped on ``signum`` (Ctrl-Z): the slave stops
    too, so that the shell it was started from gets the terminal back."""

    signum: int


Event = (
    Hello | Call | Reply | OpenPairing | ClosePairing | Goodbye | Invalidate | Attrs
    | Signal | Stopped | Census | Processes | Cancel
)  # fmt: skip
#: The signal numbers SIGNAL and STOPPED may carry (1 .. SIGRTMAX).
MAX_SIGNAL: Final = 64
#: The longest process name PROCESSES carries.
MAX_NAME: Final = 64
_PROCESS: Final = struct.Struct("<IIIcB")  # pid, ppid, pgid, state, name length


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


NEED_DATA: Final = _Sentinel.NEED_DATA
"""next_event: no complete frame buffered yet."""
CLOSED: Final = _Sentinel.CLOSED
"""next_event: the peer closed the connection cleanly (after GOODBYE, or EOF)."""


# --- state: one table for both sides --------------------------------------------------


class Role(enum.Enum):
    MASTER = "master"
    SLAVE = "slave"


class State(enum.Enum):
    HANDSHAKE = "handshake"  # nothing but HELLO yet
    OPEN = "open"
    DONE = "done"  # GOODBYE sent or received: nothing more in this direction


#: Which events each role may send, by the sender's state; the value is the new state.
TRANSITIONS: Final[dict[tuple[Role, State, type[Event]], State]] = {
    (Role.MASTER, State.HANDSHAKE, Hello): State.OPEN,
    (Role.SLAVE, State.HANDSHAKE, Hello): State.OPEN,
    (Role.MASTER, State.OPEN, Call): State.OPEN,
    (Role.MASTER, State.OPEN, OpenPairing): State.OPEN,
    (Role.MASTER, State.OPEN, ClosePairing): State.OPEN,
    (Role.SLAVE, State.OPEN, Reply): State.OPEN,
    (Role.SLAVE, State.OPEN, Invalidate): State.OPEN,
    (Role.SLAVE, State.OPEN, Attrs): State.OPEN,
    (Role.SLAVE, State.OPEN, Signal): State.OPEN,
    (Role.MASTER, State.OPEN, Stopped): State.OPEN,
    (Role.SLAVE, State.OPEN, Census): State.OPEN,
    (Role.MASTER, State.OPEN, Processes): State.OPEN,
    (Role.MASTER, State.OPEN, Cancel): State.OPEN,
    (Role.MASTER, State.HANDSHAKE, Goodbye): State.DONE,
    (Role.SLAVE, State.HANDSHAKE, Goodbye): State.DONE,
    (Role.MASTER, State.OPEN, Goodbye): State.DONE,
    (Role.SLAVE, State.OPEN, Goodbye): State.DONE,
}

_OTHER = {Role.MASTER: Role.SLAVE, Role.SLAVE: Role.MASTER}


class Pairings:
    """The pairings the master has opened; ids are never reused within a session.

    Pairing 0 is the session itself (calls made on behalf of no process, such as
    closing a handle whose last placeholder is gone); it is always open.
    """

    def __init__(self) -> None:
        self.open: set[int] = {0}
        self._closed: set[int] = set()

    def check_open(self, pairing: int, parent: int) -> str | None:
        if pairing in self.open or pairing in self._closed:
            return f"pairing {pairing} opened twice"
        if parent not in self.open:
            return f"pairing {pairing} has unknown parent {parent}"
        return None

    def check_use(self, pairing: int) -> str | None:
        return None if pairing in self.open else f"pairing {pairing} is not open"

    def apply(self, event: Event) -> None:
        if isinstance(event, OpenPairing):
            self.open.add(event.pairing)
        elif isinstance(event, ClosePairing):
            self.open.discard(event.pairing)
            self._closed.add(event.pairing)


def _check_pairings(pairings: Pairings, event: Event) -> str | None:
    if isinstance(event, OpenPairing):
        return pairings.check_open(event.pairing, event.parent)
    if isinstance(event, ClosePairing):
        if event.pairing == 0:
            return "pairing 0 cannot be closed"
        return pairings.check_use(event.pairing)
    if isinstance(event, Call):
        return pairings.check_use(event.pairing)
    return None


# --- encoding -------------------------------------------------------------------------

_U32_MAX = 0xFFFFFFFF


def _check_ids(*values: int) -> None:
    for value in values:
        if not 0 <= value <= _U32_MAX:
            raise LocalProtocolError(f"id {value} out of range")


_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


def check_call(op: Operation) -> None:
    """Raise LocalProtocolError unless a CALL of ``op`` can be encoded."""
    spec = SPECS[type(op)]
    values: tuple[Any, ...] = op
    nints = spec.nints
    try:
        spec.ints.pack(*values[:nints])  # struct checks the range of each integer
    except struct.error:
        bad = next(v for v in values[:nints] if not _I64_MIN <= v <= _I64_MAX)
        raise LocalProtocolError(f"{spec.op.name}: integer {bad} out of range") from None
    if spec.limits:
        for limit, blob in zip(spec.limits, values[nints:], strict=True):
            if len(blob) > limit:
                raise LocalProtocolError(
                    f"{spec.op.name}: string of {len(blob)} bytes (limit {limit})"
                )


def _encode_call(event: Call) -> bytes:
    parts = _call_parts(event)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _call_parts(event: Call) -> list[bytes]:
    pairing, request, op = event
    spec = SPECS[type(op)]
    if not (0 <= pairing <= _U32_MAX and 0 <= request <= _U32_MAX):
        raise LocalProtocolError(f"pairing {pairing} or request {request} out of range")
    nints = spec.nints
    size = spec.ints.size
    limits = spec.limits
    if limits:
        parts = [b""]
        for limit, blob in zip(limits, op[nints:], strict=True):
            n = len(blob)
            if n > limit:
                raise LocalProtocolError(f"{spec.op.name}: string of {n} bytes (limit {limit})")
            parts.append(_U32.pack(n))
            parts.append(blob)
            size += 4 + n
    try:
        first = spec.head.pack(size, Kind.CALL, 0, spec.op, pairing, request, *op[:nints])
    except struct.error as exc:
        raise LocalProtocolError(f"{spec.op.name}: {exc}") from None
    if not limits:
        return [first]
    parts[0] = first
    return parts


def encode_iov(event: Event) -> list[bytes]:
    """The bytes of one frame in pieces, its strings and blobs not copied (for
    writev: a WRITE's data, a READ's reply). Raises LocalProtocolError as ``encode``."""
    if isinstance(event, Call):
        return _call_parts(event)
    if isinstance(event, Reply):
        return [_reply_head(event), event.blob]
    return [encode(event)]


def _reply_head(event: Reply) -> bytes:
    """A REPLY frame but its blob."""
    blob = event.blob
    if len(blob) > MAX_IO:
        raise LocalProtocolError(f"reply of {len(blob)} bytes")
    _check_ids(event.pairing, event.request)
    head = HEADER.pack(8 + len(blob), Kind.REPLY, event.flags, 0, event.pairing, event.request)
    return head + _I64.pack(event.result)


def encode(event: Event) -> bytes:
    """The bytes of one frame. Raises LocalProtocolError for an impossible event."""
    if isinstance(event, Call):
        return _encode_call(event)
    if isinstance(event, Reply):
        return _reply_head(event) + event.blob
    if isinstance(event, Invalidate):
        body = encode_paths(event.paths)
        if len(body) > MAX_BODY or any(len(p) >= MAX_PATH for p in event.paths):
            raise LocalProtocolError("INVALIDATE too long")
        return HEADER.pack(len(body), Kind.INVALIDATE, 0, 0, 0, 0) + body
    if isinstance(event, Attrs):
        parts = [_U32.pack(event.mask)]
        for path, result, flags, raw in event.entries:
            if not 0 < len(path) < MAX_PATH or len(raw) not in (0, STATX_SIZE):
                raise LocalProtocolError("ATTRS entry of a bad size")
            parts.append(_ATTR.pack(len(path), result, flags, len(raw)) + path + raw)
        body = b"".join(parts)
        if len(body) > MAX_BODY:
            raise LocalProtocolError("ATTRS too long")
        return HEADER.pack(len(body), Kind.ATTRS, 0, 0, 0, 0) + body
    if isinstance(event, Hello):
        if len(event.info) > MAX_SMALL:
            raise LocalProtocolError("hello info too long")
        body = _HELLO.pack(MAGIC, event.version, 0, event.features) + event.info
        return HEADER.pack(len(body), Kind.HELLO, 0, 0, 0, 0) + body
    if isinstance(event, Signal | Stopped):
        if not 0 < event.signum <= MAX_SIGNAL:
            raise LocalProtocolError(f"signal {event.signum} out of range")
        if isinstance(event, Stopped):
            return HEADER.pack(4, Kind.STOPPED, 0, 0, 0, 0) + _U32.pack(event.signum)
        if not 0 <= event.pid < 2**31:
            raise LocalProtocolError(f"pid {event.pid} out of range")
        return (
            HEADER.pack(8, Kind.SIGNAL, 0, 0, 0, 0) + _U32.pack(event.signum) + _U32.pack(event.pid)
        )
    if isinstance(event, Census):
        _check_ids(event.request)
        return HEADER.pack(0, Kind.CENSUS, 0, 0, 0, event.request)
    if isinstance(event, Cancel):
        _check_ids(event.pairing, event.request)
        return HEADER.pack(0, Kind.CANCEL, 0, 0, event.pairing, event.request)
    if isinstance(event, Processes):
        _check_ids(event.request)
        parts = [_U32.pack(len(event.entries))]
        for entry in event.entries:
            if len(entry.state) != 1 or len(entry.name) > MAX_NAME:
                raise LocalProtocolError(f"a PROCESSES entry out of range: {entry}")
            _check_ids(entry.pid, entry.ppid, entry.pgid)
            parts.append(_PROCESS.pack(entry.pid, entry.ppid, entry.pgid, entry.state,
                                       len(entry.name)) + entry.name)  # fmt: skip
        body = b"".join(parts)
        if len(body) > MAX_SMALL:
            raise LocalProtocolError("PROCESSES too long")
        return HEADER.pack(len(body), Kind.PROCESSES, 0, 0, 0, event.request) + body
    if isinstance(event, OpenPairing):
        _check_ids(event.pairing, event.parent)
        head = HEADER.pack(4, Kind.OPEN_PAIRING, 0, 0, event.pairing, 0)
        return head + _U32.pack(event.parent)
    if isinstance(event, ClosePairing):
        _check_ids(event.pairing)
        return HEADER.pack(0, Kind.CLOSE_PAIRING, 0, 0, event.pairing, 0)
    reason = event.reason[:MAX_SMALL]
    return HEADER.pack(len(reason), Kind.GOODBYE, 0, 0, 0, 0) + reason


def _decode_call(op_value: int, pairing: int, request: int, body: memoryview) -> Call:
    spec = _BY_CODE.get(op_value)
    if spec is None:
        raise RemoteProtocolError(f"unknown op {op_value}")
    ints_struct = spec.ints
    name = spec.op.name
    if len(body) < ints_struct.size:
        raise RemoteProtocolError(f"{name}: truncated arguments")
    ints = ints_struct.unpack_from(body)
    if not spec.limits:
        if len(body) != ints_struct.size:
            raise RemoteProtocolError(f"{name}: {len(body) - ints_struct.size} trailing bytes")
        return Call(pairing, request, spec.record._make(ints))
    pos = ints_struct.size
    end = len(body)
    blobs: list[bytes] = []
    for limit, is_path in zip(spec.limits, spec.paths, strict=True):
        if end - pos < 4:
            raise RemoteProtocolError(f"{name}: truncated string length")
        (n,) = _U32.unpack_from(body, pos)
        pos += 4
        if n > limit or n > end - pos:
            raise RemoteProtocolError(f"{name}: string of {n} bytes (limit {limit})")
        blob = bytes(body[pos : pos + n])
        if is_path and b"\0" in blob:
            raise RemoteProtocolError(f"{name}: NUL inside a path")
        blobs.append(blob)
        pos += n
    if pos != end:
        raise RemoteProtocolError(f"{name}: {end - pos} trailing bytes")
    return Call(pairing, request, spec.record._make((*ints, *blobs)))


def encode_paths(paths: Iterable[bytes]) -> bytes:
    """Paths as an INVALIDATE's body holds them (CREATE's reply holds them too)."""
    return b"".join([_U32.pack(len(p)) + p for p in paths])


def decode_paths(body: memoryview | bytes) -> tuple[bytes, ...]:
    """``encode_paths``'s paths; RemoteProtocolError unless each is absolute."""
    return _decode_invalidate(memoryview(body)).paths


def _decode_invalidate(body: memoryview) -> Invalidate:
    paths: list[bytes] = []
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 4:
            raise RemoteProtocolError("INVALIDATE: truncated path length")
        (n,) = _U32.unpack_from(body, pos)
        pos += 4
        if not 0 < n < MAX_PATH or n > end - pos:
            raise RemoteProtocolError(f"INVALIDATE: path of {n} bytes")
        path = bytes(body[pos : pos + n])
        if not path.startswith(b"/") or b"\0" in path:
            raise RemoteProtocolError(f"INVALIDATE: not an absolute path: {path[:64]!r}")
        paths.append(path)
        pos += n
    return Invalidate(tuple(paths))


def _decode_attrs(body: memoryview) -> Attrs:
    if len(body) < 4:
        raise RemoteProtocolError("ATTRS: truncated")
    (mask,) = _U32.unpack_from(body)
    entries: list[Attr] = []
    pos, end = 4, len(body)
    while pos < end:
        if end - pos < _ATTR.size:
            raise RemoteProtocolError("ATTRS: truncated entry")
        n, result, flags, size = _ATTR.unpack_from(body, pos)
        pos += _ATTR.size
        if not 0 < n < MAX_PATH or size not in (0, STATX_SIZE) or n + size > end - pos:
            raise RemoteProtocolError(f"ATTRS: entry of {n} + {size} bytes")
        path = bytes(body[pos : pos + n])
        if not path.startswith(b"/") or b"\0" in path:
            raise RemoteProtocolError(f"ATTRS: not an absolute path: {path[:64]!r}")
        entries.append(Attr(path, result, flags, bytes(body[pos + n : pos + n + size])))
        pos += n + size
    return Attrs(mask, tuple(entries))


def decode(
    kind_value: int, op: int, pairing: int, request: int, body: memoryview, flags: int = 0
) -> Event:
    """One frame's event (header fields already split off). Raises RemoteProtocolError."""
    if kind_value == Kind.CALL:
        return _decode_call(op, pairing, request, body)
    if kind_value == Kind.REPLY:
        if len(body) < 8:
            raise RemoteProtocolError("truncated reply")
        return Reply(pairing, request, _I64.unpack_from(body)[0], bytes(body[8:]), flags)
    if kind_value == Kind.INVALIDATE:
        return _decode_invalidate(body)
    if kind_value == Kind.ATTRS:
        return _decode_attrs(body)
    if kind_value == Kind.HELLO:
        if len(body) < _HELLO.size:
            raise RemoteProtocolError("truncated hello")
        magic, version, _, features = _HELLO.unpack_from(body)
        if magic != MAGIC:
            raise RemoteProtocolError(f"not an fsys peer (magic {magic!r})")
        return Hello(version, features, bytes(body[_HELLO.size :]))
    if kind_value == Kind.OPEN_PAIRING:
        if len(body) != 4:
            raise RemoteProtocolError("bad OPEN_PAIRING body")
        return OpenPairing(pairing, _U32.unpack_from(body)[0])
    if kind_value == Kind.CLOSE_PAIRING:
        if len(body):
            raise RemoteProtocolError("bad CLOSE_PAIRING body")
        return ClosePairing(pairing)
    if kind_value in (Kind.SIGNAL, Kind.STOPPED):
        if len(body) != (8 if kind_value == Kind.SIGNAL else 4):
            raise RemoteProtocolError(f"bad {Kind(kind_value).name} body")
        (signum,) = _U32.unpack_from(body)
        if not 0 < signum <= MAX_SIGNAL:
            raise RemoteProtocolError(f"{Kind(kind_value).name}: signal {signum} out of range")
        if kind_value == Kind.STOPPED:
            return Stopped(signum)
        (pid,) = _U32.unpack_from(body, 4)
        if pid >= 2**31:
            raise RemoteProtocolError(f"SIGNAL: pid {pid} out of range")
        return Signal(signum, pid)
    if kind_value == Kind.CENSUS:
        if len(body):
            raise RemoteProtocolError("bad CENSUS body")
        return Census(request)
    if kind_value == Kind.CANCEL:
        if len(body):
            raise RemoteProtocolError("bad CANCEL body")
        return Cancel(pairing, request)
    if kind_value == Kind.PROCESSES:
        return _decode_processes(request, body)
    if kind_value == Kind.GOODBYE:
        if len(body) > MAX_SMALL:
            raise RemoteProtocolError("GOODBYE reason too long")
        return Goodbye(bytes(body))
    raise RemoteProtocolError(f"unknown frame kind {kind_value}")


def _decode_processes(request: int, body: memoryview) -> Processes:
    if len(body) > MAX_SMALL or len(body) < 4:
        raise RemoteProtocolError("bad PROCESSES body")
    (count,) = _U32.unpack_from(body)
    at, entries = 4, []
    for _ in range(count):
        if at + _PROCESS.size > len(body):
            raise RemoteProtocolError("truncated PROCESSES entry")
        pid, ppid, pgid, state, size = _PROCESS.unpack_from(body, at)
        at += _PROCESS.size
        if size > MAX_NAME or at + size > len(body):
            raise RemoteProtocolError("bad PROCESSES name")
        entries.append(Process(pid, ppid, pgid, state, bytes(body[at : at + size])))
        at += size
    if at != len(body):
        raise RemoteProtocolError("trailing bytes after PROCESSES")
    return Processes(request, tuple(entries))


# --- the connection -------------------------------------------------------------------

#: Events that neither use nor change pairings.
_NO_PAIRING_CHANGE = (Reply, Invalidate, Attrs, Signal, Stopped, Census, Processes, Cancel)


def _rules(sender: Role) -> dict[State, dict[type, State]]:
    """TRANSITIONS for one sender, as state -> {event type: new state}."""
    out: dict[State, dict[type, State]] = {state: {} for state in State}
    for (role, state, event_type), new in TRANSITIONS.items():
        if role is sender:
            out[state][event_type] = new
    return out


_RULES: Final = {role: _rules(role) for role in Role}


class Connection:
    """One side of a session: parses what arrives, checks what leaves.

    ``receive_data(b"")`` signals end of file. After a RemoteProtocolError the
    connection is broken and every further ``next_event`` raises it again.
    """

    def __init__(self, role: Role, *, max_body: int = MAX_BODY) -> None:
        self.role = role
        self.our_state = State.HANDSHAKE
        self.their_state = State.HANDSHAKE
        self._our_rules = _RULES[role]
        self._their_rules = _RULES[_OTHER[role]]
        self._our_allowed = self._our_rules[State.HANDSHAKE]
        self._their_allowed = self._their_rules[State.HANDSHAKE]
        self.pairings = Pairings()
        self.peer_hello: Hello | None = None
        self._max_body = max_body
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._error: RemoteProtocolError | None = None

    # receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            self._eof = True
            return
        if self._pos:
            if self._pos == len(self._buf):
                self._buf.clear()
                self._pos = 0
            elif self._pos > 1 << 20:
                del self._buf[: self._pos]
                self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_event(self) -> Event | _Sentinel:
        if self._error is not None:
            raise self._error
        buf = self._buf
        pos = self._pos
        available = len(buf) - pos
        if available < 16:
            return self._at_end(available)
        length, kind, flags, op, pairing, request = HEADER.unpack_from(buf, pos)
        try:
            if kind != Kind.HELLO and self.their_state is State.HANDSHAKE:
                raise RemoteProtocolError(
                    f"not an fsys peer: its first frame is not HELLO "
                    f"({bytes(buf[pos : pos + 16])!r})"
                )
            if length > self._max_body:
                raise RemoteProtocolError(
                    f"frame body of {length} bytes exceeds the limit of {self._max_body}"
                )
            if available < 16 + length:
                return self._at_end(available)
            start = pos + 16
            with memoryview(buf) as view:
                event = decode(kind, op, pairing, request, view[start : start + length], flags)
            self._pos = start + length
            self._receive_transition(event)
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        return event

    def _at_end(self, available: int) -> _Sentinel:
        if not self._eof:
            return NEED_DATA
        exc: RemoteProtocolError
        if available:
            exc = RemoteProtocolError(f"connection closed inside a frame ({available} bytes)")
        elif self.their_state is not State.DONE:
            exc = RemoteProtocolError("connection closed without GOODBYE")
        else:
            return CLOSED
        self._error = exc
        raise exc

    def _receive_transition(self, event: Event) -> None:
        event_type = type(event)
        new = self._their_allowed.get(event_type)
        if new is None:
            sender = _OTHER[self.role]
            raise RemoteProtocolError(
                f"{event_type.__name__} from the {sender.value} in state {self.their_state.value}"
            )
        if isinstance(event, Call):
            if event.pairing not in self.pairings.open:
                raise RemoteProtocolError(f"pairing {event.pairing} is not open")
        elif not isinstance(
            event, Reply | Invalidate | Attrs | Signal | Stopped | Census | Processes
        ):
            if isinstance(event, Hello):
                if event.version != VERSION:
                    raise RemoteProtocolError(
                        f"peer speaks protocol version {event.version}, we speak {VERSION}"
                    )
                self.peer_hello = event
            problem = _check_pairings(self.pairings, event)
            if problem is not None:
                raise RemoteProtocolError(problem)
            self.pairings.apply(event)
        if new is not self.their_state:
            self.their_state = new
            self._their_allowed = self._their_rules[new]

    # sending

    def send(self, event: Event) -> bytes:
        """The bytes of ``event``; LocalProtocolError if this side cannot send it now."""
        return self._send(event, encode)

    def send_iov(self, event: Event) -> list[bytes]:
        """``send``, in pieces (``encode_iov``): a large blob is not copied."""
        return self._send(event, encode_iov)

    def _send(self, event: Event, encoder: Callable[[Event], _T]) -> _T:
        event_type = type(event)
        new = self._our_allowed.get(event_type)
        if new is None:
            raise LocalProtocolError(
                f"the {self.role.value} cannot send {event_type.__name__} "
                f"in state {self.our_state.value}"
            )
        master = self.role is Role.MASTER
        if master and event_type is not Hello and event_type is not Goodbye:
            problem = _check_pairings(self.pairings, event)
            if problem is not None:
                raise LocalProtocolError(problem)
        data = encoder(event)
        if master and (event_type is OpenPairing or event_type is ClosePairing):
            self.pairings.apply(event)
        if new is not self.our_state:
            self.our_state = new
            self._our_allowed = self._our_rules[new]
        return data
