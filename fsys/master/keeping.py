"""Kept sessions (``fsys-master run --view --keep SECONDS``): a session that stays.

sshfs is mounted once and stays warm; a session per command starts cold each time (a
slave to start, a view to mount, every name and page to fetch again). With ``--keep``
the first command starts a *kept session* in the background: a process of its own
that holds the slave's link, the view and its mount namespace, and listens on a unix
socket in a directory only this user can enter. Every later command with the same
options (the same slave, policy and caching: ``key``) is a client of it: it sends its
program (path, arguments, environment, working directory, umask, file limit) and its
standard input, output and error (SCM_RIGHTS); the kept session starts the program in
the view, in a process group of its own, and answers its exit status once every
process of it is gone and its writes are on the slave. The signals the client gets
are passed on to the program's group (Ctrl-C, Ctrl-Z and fg, a resize...). The kept
session ends SECONDS after its last program ends, when its slave goes, or at
SIGTERM (``fsys-master kept --stop``).

This module is the client's side, and loads no trio: a command that finds its kept
session starts in the time Python takes to start. The kept session itself is in
``fsys.master.viewing``.

The socket's frames (docs/protocol.md, "A kept session's socket"): the client sends a
4-byte length and the request (Request: a header and NUL-terminated names), with its
three descriptors; then a 4-byte signal number for each signal it gets. The kept
session answers with a 4-byte exit status and closes. The compiled client
(client/fsys-master.c) is the other client: it loads nothing at all.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import stat
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fsys.errors import SESSION_FAILED, FsysError

_LENGTH = struct.Struct("!I")
_NUMBER = struct.Struct("!i")
#: A request larger than this is refused (ARG_MAX is 2 MiB: arguments and environment).
MAX_REQUEST = 4 << 20
MAX_FD = 1 << 20
#: The signals a client passes on to its program.
RELAYED = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH,
           signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT)  # fmt: skip
#: What a started kept session writes on its ready pipe once it listens.
READY = b"R"
#: The status a kept session that is ending answers to a client it did not serve: the
#: client starts another and asks it.
RETRY = -1


class KeepError(FsysError):
    """The kept session cannot be had; the message says why."""


@dataclass(frozen=True)
class Request:
    """A program to run in the kept session (the names are fsdecoded).

    On the wire (the compiled client, client/fsys-master.c, writes it too): a header
    (REQUEST_HEAD: magic, umask, the file limit's soft and hard values, how many
    arguments, how many environment entries), then NUL-terminated strings: the path,
    the working directory, each argument, each environment entry as KEY=VALUE."""

    path: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    umask: int
    nofile: tuple[int, int]

    def encode(self) -> bytes:
        names = [self.path, self.cwd, *self.argv, *(f"{k}={v}" for k, v in self.env.items())]
        head = REQUEST_HEAD.pack(REQUEST_MAGIC, self.umask, *self.nofile, len(self.argv),
                                 len(self.env))  # fmt: skip
        return head + b"".join(os.fsencode(name) + b"\0" for name in names)

    @classmethod
    def decode(cls, data: bytes) -> Request:
        """The request in ``data``; ValueError if it is not one."""
        if len(data) < REQUEST_HEAD.size:
            raise ValueError("malformed request: shorter than its header")
        magic, umask, soft, hard, argc, envc = REQUEST_HEAD.unpack_from(data)
        if magic != REQUEST_MAGIC:
            raise ValueError(f"malformed request: magic {magic!r} (another fsys's client?)")
        if argc < 1 or umask > 0o777 or min(soft, hard) < -1:
            raise ValueError("malformed request: no arguments, a bad umask or a bad limit")
        names = [os.fsdecode(name) for name in data[REQUEST_HEAD.size :].split(b"\0")]
        if names.pop() != "" or len(names) != 2 + argc + envc:
            raise ValueError(f"malformed request: {len(names)} names for {argc} arguments "
                             f"and {envc} environment entries")  # fmt: skip
        env = {}
        for entry in names[2 + argc :]:
            name, equals, value = entry.partition("=")
            if not equals:
                raise ValueError(f"malformed request: environment entry {entry!r}")
            env[name] = value
        return cls(names[0], names[2 : 2 + argc], env, names[1], umask, (soft, hard))


#: The request's header (see Request): the compiled client writes the same.
REQUEST_HEAD = struct.Struct("!4sIqqII")
REQUEST_MAGIC = b"fsk1"


def key(parts: dict[str, object]) -> str:
    """The name of the kept session for the options ``parts`` (with this fsys, this
    Python and this user: a session is only ever shared by the same of each)."""
    from fsys import __version__

    whole = {**parts, "version": __version__, "python": sys.executable, "uid": os.getuid()}
    return hashlib.sha256(json.dumps(whole, sort_keys=True).encode()).hexdigest()[:20]


def directory() -> Path:
    """Where kept sessions listen: FSYS_KEEP_DIR, else $XDG_RUNTIME_DIR/fsys, else
    /tmp/fsys-UID; made if missing, and refused unless it is a directory of this user
    that nobody else can enter."""
    uid = os.getuid()
    given = os.environ.get("FSYS_KEEP_DIR")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    where = Path(given or (f"{runtime}/fsys" if runtime else f"/tmp/fsys-{uid}"))
    try:
        where.mkdir(mode=0o700, parents=bool(given or runtime), exist_ok=True)
        st = os.lstat(where)
    except OSError as exc:
        raise KeepError(
            f"cannot make the kept sessions' directory {where}: {exc.strerror}"
        ) from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise KeepError(f"{where}: the kept sessions' directory must be a directory of "
                        "yours that nobody else can enter (mode 0700); it is not")  # fmt: skip
    return where


@dataclass(frozen=True)
class Place:
    """A kept session's files: its socket, the lock taken to start it, its log."""

    socket: Path
    lock: Path
    log: Path

    @classmethod
    def of(cls, name: str) -> Place:
        where = directory()
        place = cls(where / f"{name}.sock", where / f"{name}.lock", where / f"{name}.log")
        if len(os.fsencode(place.socket)) >= 108:
            raise KeepError(f"{place.socket}: too long for a unix socket's name (set "
                            "FSYS_KEEP_DIR to a shorter directory)")  # fmt: skip
        return place


# --- quick records: how the compiled client finds a session without Python -------------
#
# fsys-master is a compiled program (client/fsys-master.c) when `pip install .` found a C
# compiler. For `run ... -- PROGRAM ARGS` it looks for a quick record of the options
# before `--` and the program's path, written here by the Python client that last ran
# them; if the record holds (the program is the same file, the --config file is
# unchanged) and its session listens, it sends the request itself. Anything else (no
# record, no session, a session ending) it hands to Python, the one that decides.

#: The first of a quick record's inputs: the compiled client's own is the same.
QUICK_MAGIC = b"fsys-quick-1"


def quick_inputs(options: list[str], program: str) -> bytes:
    """What the compiled client knows of a command before it finds its session: this
    fsys and its Python, the options before ``--``, the program's path (resolved as
    execvp would); NUL-terminated."""
    from fsys import __version__

    names = [QUICK_MAGIC, __version__.encode(), os.fsencode(sys.executable),
             *map(os.fsencode, options), b"--", os.fsencode(program)]  # fmt: skip
    return b"".join(name + b"\0" for name in names)


def quick_name(inputs: bytes) -> str:
    """The record's file name: FNV-1a of its inputs (which the record repeats, so that a
    collision is a miss, not another session)."""
    digest = 0xCBF29CE484222325
    for byte in inputs:
        digest = ((digest ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{digest:016x}.quick"


def witness(program: str, config: str | None) -> tuple[str, str, str] | None:
    """What a quick record checks before it is used: the program's real path, the
    --config file and its identity (device, inode, size, mtime; "" without one).
    Taken before the policy is built from them, so that a change in between makes
    the record miss, never name another session; None if the file cannot be seen."""
    identity = ""
    try:
        if config is not None:
            st = os.stat(config)
            identity = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        return os.path.realpath(program), config or "", identity
    except OSError:
        return None


def remember(place: Place, inputs: bytes, seen: tuple[str, str, str]) -> None:
    """Write the quick record of ``inputs`` for the session at ``place``: its inputs,
    the socket, then what ``witness`` saw (the program's real path, the --config
    file, its identity), each NUL-terminated. A record that cannot be written is no
    record: the compiled client then hands the command to Python."""
    names = [os.path.abspath(place.socket), *seen]
    record = inputs + b"".join(os.fsencode(name) + b"\0" for name in names)
    path = place.socket.with_name(quick_name(inputs))
    partial = path.with_name(f"{path.name}.{os.getpid()}")
    try:
        partial.write_bytes(record)
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink()


def connect(path: Path) -> socket.socket | None:
    """A connection to the kept session listening at ``path``; None if none listens
    (a socket left by one that died is removed)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if sock.fileno() < 3:  # a standard stream is closed: not it, or it is sent as one
        high = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 3)
        sock.close()
        sock = socket.socket(fileno=high)
    try:
        sock.connect(os.fsencode(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        if isinstance(exc, ConnectionRefusedError):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # nobody listens: a kept session that was killed
        return None
    return sock


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def start(place: Place, serve: Callable[[Place, int], int]) -> None:
    """Start a kept session at ``place``: ``serve(place, ready)`` runs in a daemon
    process (a session of its own, standard input and output /dev/null, standard
    error its log) and writes READY on ``ready`` once it listens. KeepError, with
    what its log says, if it ended instead."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the daemon's own process (tested end to end)
        status = SESSION_FAILED
        try:
            # Nothing of the client's but the ready pipe: not its lock (the next client
            # waits on it), not its descriptors.
            os.closerange(3, ready_w)
            os.closerange(ready_w + 1, MAX_FD)
            os.setsid()
            if os.fork():
                os._exit(0)
            null = os.open(os.devnull, os.O_RDWR)
            log = os.open(place.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            for target, fd in ((0, null), (1, null), (2, log)):
                os.dup2(fd, target)
            os.close(null)
            os.close(log)
            os.chdir("/")
            status = serve(place, ready_w)
        except BaseException as exc:  # noqa: BLE001 - the daemon must never return
            with contextlib.suppress(BaseException):
                print(f"fsys-master: the kept session failed: {exc!r}", file=sys.stderr)
        finally:
            os._exit(status)
    os.close(ready_w)
    os.waitpid(pid, 0)
    try:
        # One read, not to the end: a process the session forked before it was ready
        # (the embedded slave) holds a copy of the pipe for as long as it lives. READY
        # is one write of less than PIPE_BUF, so it comes whole or not at all (EOF).
        got = os.read(ready_r, len(READY))
    finally:
        os.close(ready_r)
    if got != READY:
        try:
            said = place.log.read_text(errors="replace").strip()
        except OSError:
            said = ""
        raise KeepError(said or "the kept session did not start")


def run(place: Place, request: Request, serve: Callable[[Place, int], int]) -> int:
    """Run ``request`` in the kept session at ``place``, started first (``serve``) if
    none listens there; the program's exit status."""
    sock = _connect_or_start(place, serve)
    for _ in range(3):
        if sock is None:
            raise KeepError(f"the kept session at {place.socket} went away as it started")
        with sock:
            status = _converse(sock, request, place)
        if status != RETRY:
            return status
        sock = _connect_or_start(place, serve)  # it was ending: a new one
    raise KeepError(f"the kept sessions at {place.socket} keep ending")


def _connect_or_start(place: Place, serve: Callable[[Place, int], int]) -> socket.socket | None:
    sock = connect(place.socket)
    if sock is None:
        with _locked(place.lock):  # one client starts it; the others wait, then connect
            sock = connect(place.socket)
            if sock is None:
                start(place, serve)
                sock = connect(place.socket)
    return sock


def _stdio() -> list[int]:
    """The client's standard input, output and error (/dev/null where one is closed)."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)  # noqa: PLW2901
        fds.append(fd)
    return fds


def _converse(sock: socket.socket, request: Request, place: Place) -> int:
    payload = request.encode()
    fds = array.array("i", _stdio())
    frame = _LENGTH.pack(len(payload)) + payload
    sent = sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    sock.sendall(frame[sent:])  # (a large request may go in parts)

    def relay(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(_NUMBER.pack(signum))

    def stop(_signum: int, _frame: object) -> None:
        # Ctrl-Z: the program's group stops, then this client, as the shell expects;
        # at fg, SIGCONT reaches the client and is passed on.
        relay(signal.SIGTSTP, None)
        os.kill(os.getpid(), signal.SIGSTOP)

    for signum in RELAYED:
        signal.signal(signum, relay)
    signal.signal(signal.SIGTSTP, stop)
    got = b""
    while len(got) < _NUMBER.size:
        try:
            chunk = sock.recv(_NUMBER.size - len(got))
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise KeepError(f"the kept session ended before the program did (its log: {place.log})")
        got += chunk
    for signum in (*RELAYED, signal.SIGTSTP):
        signal.signal(signum, signal.SIG_DFL)
    return int(_NUMBER.unpack(got)[0])


@dataclass(frozen=True)
class Kept:
    """A kept session that listens: its socket and its process."""

    socket: Path
    pid: int


def listening() -> list[Kept]:
    """The kept sessions of this user that listen (in ``directory()``)."""
    out = []
    for path in sorted(directory().glob("*.sock")):
        sock = connect(path)
        if sock is None:
            continue
        with sock:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, CREDS.size)
        out.append(Kept(path, CREDS.unpack(creds)[0]))
    return out


def stop(kept: Kept, timeout: float = 10.0) -> bool:
    """End ``kept`` (SIGTERM: its programs get SIGTERM too); whether it ended within
    ``timeout`` seconds."""
    try:
        pidfd = os.pidfd_open(kept.pid)
    except ProcessLookupError:
        return True
    try:
        os.kill(kept.pid, signal.SIGTERM)
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


CREDS = struct.Struct("3i")


# --- the kept session's side of the socket (its trio loop is fsys.master.viewing) --------


def take_request(first: bytes, fds: list[int]) -> tuple[int, Request | None]:
    """From the first bytes a client sent: (how many more bytes the request needs, the
    request if it is whole). ValueError if it cannot be one (``fds``: those it sent)."""
    if len(fds) != 3:
        raise ValueError(f"{len(fds)} descriptors, not 3")
    if len(first) < _LENGTH.size:
        return _LENGTH.size - len(first), None
    (length,) = _LENGTH.unpack_from(first)
    if length > MAX_REQUEST:
        raise ValueError(f"a request of {length} bytes")
    missing = _LENGTH.size + length - len(first)
    if missing > 0:
        return missing, None
    if missing < 0:
        raise ValueError("bytes after the request")
    return 0, Request.decode(first[_LENGTH.size :])


def status_frame(status: int) -> bytes:
    return _NUMBER.pack(status)


def signal_numbers(data: bytes) -> tuple[list[int], bytes]:
    """The signal numbers in ``data``, and the bytes left of an incomplete one."""
    whole = len(data) - len(data) % _NUMBER.size
    numbers = [n for (n,) in _NUMBER.iter_unpack(data[:whole])]
    return numbers, data[whole:]
