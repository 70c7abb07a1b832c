"""Routing: which side performs a trapped call, and which handler, if any.

A function of three things only — the call's row in the disposition table, the
placeholder set, and the path policy (with the caller's working directory) — and
decided synchronously, without the slave:

- ``fd`` rows: each fd argument is looked up among the placeholders. None remote:
  the call is continued natively, at once.
- ``path`` rows: each path is read from the caller's memory and placed: an absolute
  path by the path policy; a relative one by the side of its directory (the cwd, or
  a dirfd that is or is not a placeholder). All on the master: continued at once.
- ``hub`` rows: always handled by fmhub (cwd, umask, execve, exit).

A call that involves the slave runs its handler (``fsys.master.calls``); a call with
no handler is answered with the table's errno for it.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fsys.errors import Errno
from fsys.kmod.table import Disposition, PathArg, Syscall
from fsys.linux import AT_EMPTY_PATH, AT_FDCWD, AT_SYMLINK_NOFOLLOW
from fsys.master.device import Notification
from fsys.master.memory import TargetMemory
from fsys.master.placeholders import Placeholders, RemoteFile
from fsys.master.policy import Policy
from fsys.master.processes import Process
from fsys.protocol import MAX_PATH, Operation, Reply

if TYPE_CHECKING:
    from fsys.master.fmhub import Hub


class Continue:
    """A handler's answer: run the call natively."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "CONTINUE"


CONTINUE = Continue()

Outcome = int | Continue
"""How a call ends: a result (>= 0), -errno, or CONTINUE."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The one wait a handler may ask for besides the slave: resume it (with an empty
    reply) once fmhub's own ``fd`` is readable, or writable. fmhub waits in the caller's
    pairing task, so the wait ends with the process."""

    fd: int
    writable: bool = False


Step = Operation | Ready
Steps = Generator[Step, Reply, Outcome]
"""A handler that needs the slave: it yields each operation and is resumed with the
successful reply (an errno reply is raised in it as Errno), then returns."""
Handler = Callable[["Hub", "Trapped"], "Steps | Outcome"]


@dataclass(slots=True)
class Target:
    """Where one path argument lives."""

    remote: bool
    dir: int = 0  # remote: the directory handle it is relative to (0: the root)
    path: bytes = b""  # remote: the path sent to the slave
    shown: bytes = b""  # as the program wrote it
    null: bool = False  # the program passed NULL (utimensat's "this fd")
    #: A link that names an object itself: /proc/self/fd/N of a remote file (the handle
    #: ``dir``), or /proc/self/cwd of a slave directory (``dir`` 0, ``path`` the cwd).
    whole: bool = False


#: The variants that act on a final symlink itself rather than on what it names.
NOFOLLOW = frozenset({"lstat", "lchown", "lgetxattr", "lsetxattr", "llistxattr", "lremovexattr"})
#: Links to a process's fds: /proc/self/fd/N, /proc/thread-self/fd/N, /proc/PID/fd/N,
#: /proc/PID/task/TID/fd/N, /dev/fd/N (and /dev/stdin, /dev/stdout, /dev/stderr).
_FD_LINK = re.compile(
    rb"^/(?:proc/(self|thread-self|\d+)(?:/task/(\d+))?/fd|dev/fd)/(\d+)(?:/+(.*))?$", re.DOTALL
)
_STDIO = {b"/dev/stdin": 0, b"/dev/stdout": 1, b"/dev/stderr": 2}
#: Calls that act natively on a pumped stream's placeholder (fsys.master.streams): its
#: data calls, and those whose answer for a socket is the one for a terminal or pipe
#: (ESPIPE, EINVAL...). Its other calls (ioctls, fstat, fchmod...) are forwarded.
STREAM_NATIVE = frozenset({
    "read", "readv", "pread64", "preadv", "preadv2", "write", "writev", "pwrite64",
    "pwritev", "pwritev2", "sendfile", "splice", "tee", "vmsplice", "fcntl", "lseek",
    "flock", "fsync", "fdatasync", "sync_file_range", "fadvise64", "readahead", "mmap", "epoll_ctl",
    "copy_file_range", "ftruncate", "fallocate", "getdents64", "fchdir", "syncfs",
})  # fmt: skip
STREAM_WRITES = frozenset({"write", "writev", "pwrite64", "pwritev", "pwritev2"})
#: A slave socket's calls that act natively on its placeholder whatever its state (the
#: O_NONBLOCK and O_ASYNC of its description are the placeholder's); and its data
#: calls, native once it is a pumped connection (but an error to report first).
SOCKET_NATIVE = frozenset({"fcntl", "epoll_ctl"})
SOCKET_DATA = frozenset({"recvfrom", "sendto", "recvmsg", "sendmsg", "recvmmsg", "sendmmsg"})
SOCKET_READS = frozenset({"read", "readv", "recvfrom", "recvmsg", "recvmmsg"})
SOCKET_WRITES = STREAM_WRITES | {"sendto", "sendmsg", "sendmmsg"}
#: Calls whose AF_UNIX address decides the side of a master socket.
UNIX_ADDRESSED = {"bind": (1, 2), "connect": (1, 2), "sendto": (4, 5)}  # address, length
UNIX_SWITCH = "unix switch"
AF_UNIX = 1
SOCKADDR_UN = 110  # sizeof(struct sockaddr_un)
_CWD_LINK = re.compile(rb"^/proc/(self|thread-self|\d+)/cwd(?:/+(.*))?$", re.DOTALL)


@dataclass(eq=False, slots=True)
class Trapped:
    """One trapped call, as routed."""

    notif: Notification
    syscall: Syscall
    process: Process
    files: tuple[RemoteFile | None, ...] = ()
    targets: tuple[Target, ...] = ()
    answered: bool = False
    side: str = "slave"
    note: str = ""
    start: int = 0

    @property
    def memory(self) -> TargetMemory:
        return self.process.memory

    @property
    def tid(self) -> int:
        return self.notif.tid

    # Every call of a handler reads its arguments through these: one dict lookup each
    # (KeyError for a name the call's signature lacks).

    def arg(self, name: str) -> int:
        """The argument the table names ``name``, as the raw 64-bit register."""
        return self.notif.args[self.syscall.positions[name]]

    def arg_int(self, name: str) -> int:
        """The argument ``name`` as a C int (fds, flags, modes)."""
        v = self.notif.args[self.syscall.positions[name]] & 0xFFFFFFFF
        return v - (1 << 32) if v & 0x80000000 else v

    def arg_long(self, name: str) -> int:
        """The argument ``name`` as a C long (offsets, lengths), signed."""
        v = self.notif.args[self.syscall.positions[name]]
        return v - (1 << 64) if v & (1 << 63) else v

    def has(self, name: str) -> bool:
        """Whether this call has an argument named ``name``."""
        return name in self.syscall.positions


def _join(cwd: bytes, path: bytes) -> bytes:
    return (cwd.rstrip(b"/") or b"") + b"/" + path


class Router:
    def __init__(
        self, *, policy: Policy, placeholders: Placeholders, handlers: dict[str, Handler],
        socket_handlers: dict[str, Handler] | None = None,
    ) -> None:  # fmt: skip
        self.policy = policy
        self.placeholders = placeholders
        self.handlers = handlers
        #: The handlers of calls on the slave's sockets (fsys.master.net), which take
        #: precedence for a socket; UNIX_SWITCH: a master AF_UNIX socket that binds or
        #: connects to a slave path. Set when the program uses the slave's network.
        self.socket_handlers = socket_handlers or {}
        #: The terminal the slave lends the session, if any, and the names of it that
        #: lead to it (/dev/tty, and its name on the slave: what ttyname(3) gives).
        self.terminal: RemoteFile | None = None
        self.terminal_names: frozenset[bytes] = frozenset({b"/dev/tty"})

    def route(self, call: Trapped) -> Handler | int | None:
        """None: continue natively; an int: answer it (-errno); else the handler to run.

        Fills ``call.files`` and ``call.targets``. Raises Errno for an argument that
        cannot be placed (a path fmhub cannot read, or too long once joined).
        """
        syscall = call.syscall
        notif = call.notif
        remote = False
        if syscall.fds:
            lookup = self.placeholders.lookup
            call.files = files = tuple([lookup(notif.tid, notif.arg_int(i)) for i in syscall.fds])
            remote = files.count(None) != len(files)
            if remote and self.socket_handlers:
                sock = next((f for f in files if f is not None and f.sock is not None), None)
                if sock is not None:
                    return self._socket(call, sock)
            elif (
                not remote
                and syscall.name in UNIX_ADDRESSED
                and self.socket_handlers
                and self._unix_remote(call)
            ):
                return self.socket_handlers[UNIX_SWITCH]
            # A stream's data calls run natively (but for a write into a stream the
            # slave no longer takes: EPIPE).
            if (
                remote
                and syscall.name in STREAM_NATIVE
                and self._streams_only(files)
                and (syscall.name not in STREAM_WRITES or not self._write_closed(files))
            ):
                call.side = "master"
                return None
        if syscall.paths:
            call.targets = targets = tuple([self._target(call, p) for p in syscall.paths])
            remote = remote or any([t.remote for t in targets])
        if not remote and syscall.disposition is not Disposition.HUB:
            call.side = "master"
            return None
        handler = self.handlers.get(syscall.name)
        if handler is None:
            assert syscall.errno is not None
            call.side = "hub"
            call.note = "not forwarded"
            return -syscall.errno
        return handler

    def _socket(self, call: Trapped, rf: RemoteFile) -> Handler | int | None:
        """A call on the slave's socket ``rf``: native on its placeholder where that
        acts as the socket would (its flags; the data of a pumped connection), else
        its handler."""
        name = call.syscall.name
        stream = rf.stream
        if name in SOCKET_NATIVE:
            call.side = "master"
            return None
        if (
            stream is not None
            and (name in STREAM_NATIVE or name in SOCKET_DATA)
            and self._streams_only(call.files)
            and not (name in SOCKET_READS and stream.read_error)
            and not (name in SOCKET_WRITES and stream.write_closed)
        ):
            call.side = "master"
            return None
        handler = self.socket_handlers.get(name) or self.handlers.get(name)
        if handler is None:
            call.side = "hub"
            call.note = "not forwarded"
            return -(call.syscall.errno or errno.EOPNOTSUPP)
        return handler

    def _unix_remote(self, call: Trapped) -> bool:
        """Whether a bind, connect or sendto of a master socket names an AF_UNIX path on the
        slave (the socket becomes the slave's: UNIX_SWITCH). ``call.targets``: where."""
        at, length = UNIX_ADDRESSED[call.syscall.name]
        size = call.notif.args[length] & 0xFFFFFFFF
        if size < 3 or size > SOCKADDR_UN or not call.notif.args[at]:
            return False
        raw = call.memory.read(call.notif.args[at], size)
        if int.from_bytes(raw[:2], "little") != AF_UNIX or raw[2] == 0:
            return False  # another family, or an abstract name (the master's network)
        target = self.place(call, raw[2:].split(b"\0", 1)[0])
        call.targets = (target,)
        return target.remote

    @staticmethod
    def _write_closed(files: tuple[RemoteFile | None, ...]) -> bool:
        return any(f is not None and f.stream is not None and f.stream.write_closed for f in files)

    @staticmethod
    def _streams_only(files: tuple[RemoteFile | None, ...]) -> bool:
        """Whether every remote file among ``files`` is a pumped stream."""
        return all(f is None or f.stream is not None for f in files)

    def _fd_link(self, call: Trapped, path: bytes, flags: int) -> Target | None:
        """A link to a program's fd that is a placeholder: the remote file itself (or,
        with more after it, a path relative to it as a directory). A call on the link
        itself (lstat, AT_SYMLINK_NOFOLLOW) stays the master's: the kernel answers it."""
        cwd = _CWD_LINK.match(path)
        if cwd is not None:
            return self._cwd_link(call, cwd.group(1), cwd.group(2) or b"")
        if self.terminal is not None and path in self.terminal_names:  # the slave's, lent
            return Target(True, self.terminal.handle, b"", path, whole=True)
        number = _STDIO.get(path)
        rest = b""
        tid = call.tid
        if number is None:
            match = _FD_LINK.match(path)
            if match is None:
                return None
            who, task, digits, more = match.groups()
            number, rest = int(digits), more or b""
            if task is not None:
                tid = int(task)
            elif who not in (None, b"self", b"thread-self"):
                tid = int(who)
        remote = self.placeholders.lookup(tid, number)
        if remote is None:
            return None
        if rest:
            return Target(True, remote.handle, rest, path)
        if flags & AT_SYMLINK_NOFOLLOW or call.syscall.name in NOFOLLOW:
            return Target(False, shown=path)
        return Target(True, remote.handle, b"", path, whole=True)

    def _cwd_link(self, call: Trapped, who: bytes, rest: bytes) -> Target | None:
        """/proc/self/cwd of a process in a slave directory: that directory (readlink
        gives its path)."""
        process = call.process
        if who not in (b"self", b"thread-self") and int(who) not in (process.tgid, call.tid):
            return None  # another process's: the kernel's answer
        if not process.cwd_remote:
            return None
        if rest:
            return Target(True, 0, _join(process.cwd, rest), _join(b"/proc/self/cwd", rest))
        return Target(True, 0, process.cwd, b"/proc/self/cwd", whole=True)

    def _target(self, call: Trapped, arg: PathArg) -> Target:
        notif = call.notif
        process = call.process
        dirfd = AT_FDCWD if arg.dirfd is None else notif.arg_int(arg.dirfd)
        addr = notif.args[arg.path]
        flags = notif.arg_int(call.syscall.flags) if call.syscall.flags is not None else 0
        null = addr == 0 and bool(flags & AT_EMPTY_PATH or call.syscall.name == "utimensat")
        path = b"" if null else process.memory.read_cstring(addr)
        return self._place(call, path, dirfd, flags, null)

    def place(self, call: Trapped, path: bytes) -> Target:
        """Where ``path`` lives for the caller, as a path argument relative to its
        working directory would (an AF_UNIX socket's address)."""
        return self._place(call, path, AT_FDCWD, 0, False)

    def _place(self, call: Trapped, path: bytes, dirfd: int, flags: int, null: bool) -> Target:
        notif = call.notif
        process = call.process
        if path.startswith(b"/"):
            if path.startswith((b"/proc/", b"/dev/")):
                linked = self._fd_link(call, path, flags)
                if linked is not None:
                    return linked
            remote = not self.policy.is_local(path)
            return Target(remote, 0, path, path)
        if not path:
            # readlinkat(fd, "") reads the link that an O_PATH fd names (no flag needed).
            if not (null or flags & AT_EMPTY_PATH or call.syscall.name == "readlinkat"):
                return Target(False, shown=path)  # the kernel answers ENOENT
            if dirfd == AT_FDCWD:  # the current directory itself
                if process.cwd_remote:
                    if null and call.syscall.name == "utimensat":
                        raise Errno(errno.EFAULT)  # NULL names an fd's file; AT_FDCWD none
                    return Target(True, 0, process.cwd, b"", null)
                return Target(False, shown=path, null=null)
            rf = self.placeholders.lookup(notif.tid, dirfd)
            if rf is not None:
                return Target(True, rf.handle, b"", b"", null)
            return Target(False, shown=path, null=null)
        if dirfd == AT_FDCWD:
            if process.cwd_remote:
                if path in process.staged_names:
                    return Target(False, shown=path)  # an interpreter reading its wrapper
                # Relative to a slave directory: resolved by the slave, wherever it leads.
                joined = _join(process.cwd, path)
                if len(joined) >= MAX_PATH:
                    raise Errno(errno.ENAMETOOLONG)
                return Target(True, 0, joined, path)
            joined = _join(process.cwd, path)
            if self.policy.is_local(joined):
                return Target(False, shown=path)
            if len(joined) >= MAX_PATH:
                raise Errno(errno.ENAMETOOLONG)
            return Target(True, 0, joined, path)
        rf = self.placeholders.lookup(notif.tid, dirfd)
        if rf is None:
            return Target(False, shown=path)  # relative to a master directory fd
        return Target(True, rf.handle, path, path)
