"""``fsys-slave serve --listen ADDR``: the slave as a service, a process per session.

Theory of operation. The listening process accepts connections and forks a child
for each. The child greets the peer (``fsys.auth``): with a secret, nothing runs for
a peer until it has proved that it holds it; a unix socket without a secret is
guarded by its mode (0600, its owner alone). Then the child serves the session
(``fsys.slave.fshub``) and exits when it ends, and every handle of the session is
closed with it, however the master went away. The listener itself never reads what
a peer sends and runs no trio loop: a peer that stalls or sends garbage holds its
own child and nothing else, and a session that dies takes no other with it. The
children are forked from a process that has trio and the slave loaded already, so
a session starts at once.

Beyond ``max_sessions`` live sessions a connection is turned away with the reason
(``auth.refuse``). SIGTERM, SIGINT and SIGHUP stop the service: no new connection,
the socket file removed, SIGTERM to every session (each master sees its link close
and says so), SIGKILL to any still there after a few seconds. One line on standard
error for each session begun, ended or refused.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from fsys import auth, tls
from fsys.address import Address, enable_keepalive
from fsys.slave.confinement import Confinement, drop_privileges

#: How long sessions get to end after SIGTERM before they are killed.
GRACE = 3.0
#: At most this many sessions at once unless told otherwise.
MAX_SESSIONS = 128
_STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class ListenError(Exception):
    """The service cannot start; the message says why, for the user."""


@dataclass(frozen=True)
class Service:
    address: Address
    root: str
    secret: bytes | None
    confinement: Confinement
    max_sessions: int = MAX_SESSIONS
    #: Give up CAP_FSETID, CAP_MKNOD, CAP_SETFCAP in each session (a root slave).
    drop: bool = False
    #: TLS for each connection (``fsys.tls``), before the secret's exchange.
    tls: ssl.SSLContext | None = None


def _say(text: str) -> None:
    print(f"fsys-slave: {text}", file=sys.stderr, flush=True)


def bind(address: Address) -> socket.socket:
    """A listening socket at ``address``, or ListenError. A unix socket is made mode
    0600; a stale one (nobody listening) is replaced, a live one is not."""
    if isinstance(address.where, str):
        path = address.where
        _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # made 0600, with no moment at a wider mode
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise ListenError(f"--listen {address}: {exc.strerror}") from None
        finally:
            os.umask(old)
    else:
        host, port = address.where
        sock = socket.socket(address.family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            why = exc.strerror or str(exc)
            raise ListenError(f"--listen {address}: {why}") from None
    sock.listen(64)
    return sock


def _clear_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not (st.st_mode & 0o170000) == 0o140000:  # S_IFSOCK
        raise ListenError(f"--listen unix:{path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens there: a service that was killed left it
        return
    finally:
        probe.close()
    raise ListenError(f"--listen unix:{path}: a slave already listens there")


def bound_address(sock: socket.socket, address: Address) -> Address:
    """``address`` with the port the system chose for port 0."""
    if isinstance(address.where, str):
        return address
    return Address(address.family, (address.where[0], sock.getsockname()[1]))


def _peer(conn: socket.socket, address: Address) -> str:
    if address.is_unix:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        return f"pid {pid} uid {uid}"
    host, port = conn.getpeername()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(service: Service, sock: socket.socket, serve_fds: Callable[..., int]) -> int:
    """Accept sessions on ``sock`` until a signal stops the service; exit status 0.
    ``serve_fds(read_fd, write_fd, root, confinement)`` serves one session."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    got: list[int] = []
    for signum in (*_STOPPING, signal.SIGCHLD):
        signal.signal(signum, lambda n, _f: got.append(n))
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    sock.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    sessions: dict[int, tuple[int, str]] = {}  # pid -> (number, peer)
    numbers = iter(range(1, 1 << 62))
    stopping = 0
    try:
        while not stopping:
            for key, _ in selector.select():
                if key.fd == wake_r:
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        pass
                    continue
                try:
                    conn, _addr = sock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:  # EMFILE, ENOBUFS...: this one is lost, not us
                    _say(f"cannot accept a connection: {exc.strerror}")
                    time.sleep(0.1)
                    continue
                _reap(sessions)
                peer = _peer(conn, service.address)
                if len(sessions) >= service.max_sessions:
                    _turn_away(conn, peer, f"{len(sessions)} sessions already (--max-sessions)")
                    continue
                number = next(numbers)
                pid = os.fork()
                if pid == 0:
                    _child(service, conn, peer, number, (sock.fileno(), wake_r, wake_w),
                           serve_fds)  # fmt: skip
                conn.close()
                sessions[pid] = (number, peer)
            _reap(sessions)
            stopping = next((n for n in got if n in _STOPPING), 0)
            got.clear()
    finally:
        signal.set_wakeup_fd(-1)
        selector.close()
        sock.close()
        if service.address.is_unix:
            try:
                os.unlink(service.address.where)  # type: ignore[arg-type]
            except OSError:
                pass
        _end_all(sessions)
        os.close(wake_r)
        os.close(wake_w)
    _say(f"stopped by {signal.Signals(stopping).name}")
    return 0


def _turn_away(conn: socket.socket, peer: str, reason: str) -> None:
    conn.setblocking(False)
    try:
        auth.refuse(conn, reason)  # a few bytes: they fit in the socket's buffer
    except OSError:
        pass
    conn.close()
    _say(f"refused {peer}: {reason}")


def _child(
    service: Service,
    conn: socket.socket,
    peer: str,
    number: int,
    listener_fds: tuple[int, ...],
    serve_fds: Callable[..., int],
) -> None:
    status = 1
    try:
        signal.set_wakeup_fd(-1)
        for fd in listener_fds:
            os.close(fd)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        # The terminal's Ctrl-C reaches the whole group: the listener ends the sessions.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        conn.setblocking(True)
        conn.settimeout(auth.TIMEOUT)
        if not service.address.is_unix:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            enable_keepalive(conn)
        link: socket.socket = conn
        try:
            if service.tls is not None:
                link = tls.handshake(conn, service.tls, None)
            auth.greet(link, service.secret)
        except (auth.AuthError, tls.TlsError, OSError) as exc:
            _say(f"refused {peer}: {exc}")
            return
        relay = 0
        if isinstance(link, ssl.SSLSocket):
            link, relay = tls.relay(link)  # (which sets it non-blocking)
        link.settimeout(None)
        if service.drop:
            drop_privileges()
        _say(f"session {number} ({peer}) began")
        fd = link.detach()
        label = f"{service.address}, from {peer}"
        status = serve_fds(fd, fd, service.root, service.confinement, label=label)
        _say(f"session {number} ({peer}) ended")
        if relay:
            os.waitpid(relay, 0)  # it ends with the session (whose end closed the fd)
    finally:
        sys.stderr.flush()
        os._exit(status)


def _reap(sessions: dict[int, tuple[int, str]]) -> None:
    while sessions:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            sessions.clear()
            return
        if pid == 0:
            return
        sessions.pop(pid, None)


def _end_all(sessions: dict[int, tuple[int, str]]) -> None:
    """SIGTERM to every session, SIGKILL to those left after GRACE; all reaped."""
    for pid in sessions:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    while sessions and time.monotonic() < deadline:
        _reap(sessions)
        time.sleep(0.02)
    for pid in sessions:
        _kill(pid, signal.SIGKILL)
    for pid in list(sessions):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    sessions.clear()


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise
