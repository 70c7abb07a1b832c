"""TLS for a listening slave's TCP sessions: certificate files, and a relay.

Theory of operation. With ``fsys-slave serve --listen tcp:... --tls-cert F --tls-key
K`` and ``fsys-master run --connect tcp:... --tls [--tls-ca F]``, each side makes
the TLS handshake itself, blocking, before anything else (so a certificate that
does not verify is said at once, by name), and the shared secret's exchange
(``fsys.auth``) runs inside it. Then the hubs, which speak to an fd
(``FdTransport``), get one end of a socketpair, and a relay process of the side's
own carries the bytes between its other end and the TLS connection: the hubs stay
as they are, and OpenSSL's work and the copies run in a process of their own, not
in a hub's loop. The relay ends when either side ends; a TCP end without TLS's
close_notify reads as end of file (the protocol's GOODBYE tells a clean end from a
cut).
"""

from __future__ import annotations

import os
import select
import socket
import ssl

from fsys.errors import FsysError

#: At most this much held in the relay in each direction (then it reads no more).
HELD = 1 << 20
_CHUNK = 1 << 16


class TlsError(FsysError):
    """TLS cannot be set up; the message says why, for the user."""


def server_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"--tls-cert {cert} --tls-key {key}: {_why(exc)}") from None
    return context


def client_context(ca: str | None) -> ssl.SSLContext:
    """Verifying the slave's certificate and name: against ``ca`` (a CA's or the
    slave's own certificate), or the system's CAs."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"--tls-ca {ca}: {_why(exc)}") from None
    return context


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def handshake(sock: socket.socket, context: ssl.SSLContext, hostname: str | None) -> ssl.SSLSocket:
    """The TLS handshake on ``sock`` (blocking, with its timeout), or TlsError."""
    try:
        return context.wrap_socket(sock, server_side=hostname is None, server_hostname=hostname)
    except ssl.SSLCertVerificationError as exc:
        raise TlsError(f"the slave's certificate does not verify: {exc.verify_message}") from None
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"TLS handshake failed: {_why(exc)}") from None


def relay(tls: ssl.SSLSocket) -> tuple[socket.socket, int]:
    """Fork the relay of ``tls``; the plaintext end for the hub, and the relay's pid
    (this process's child: wait for it)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ours.close()
            pump(tls, theirs)
            code = 0
        finally:
            os._exit(code)  # never back into the caller's code
    theirs.close()
    tls.close()  # (the relay has it now: no close_notify from here)
    return ours, pid


def pump(tls: ssl.SSLSocket, plain: socket.socket) -> None:
    """Carry bytes both ways until both directions have ended (or one broke)."""
    tls.setblocking(False)
    plain.setblocking(False)
    to_plain, to_tls = bytearray(), bytearray()
    tls_done = plain_done = False  # no more to read from it
    tls_shut = plain_shut = False  # told the other side that nothing more comes
    recv_wait = send_wait = select.POLLIN
    poller = select.poll()
    while not (tls_shut and plain_shut):
        moved = True
        while moved:
            moved = False
            if not tls_done and len(to_plain) < HELD:
                try:
                    data = tls.recv(_CHUNK)
                except ssl.SSLWantReadError:
                    recv_wait = select.POLLIN
                except ssl.SSLWantWriteError:
                    recv_wait = select.POLLOUT
                except (ssl.SSLError, OSError):
                    tls_done = True  # a cut, or an end without close_notify: end of file
                else:
                    if data:
                        to_plain += data
                        moved = True
                    else:
                        tls_done = True
            if to_plain:
                try:
                    del to_plain[: plain.send(to_plain)]
                    moved = True
                except BlockingIOError:
                    pass
                except OSError:
                    return  # the hub is gone
            if tls_done and not to_plain and not plain_shut:
                _shut(plain)
                plain_shut = True
            if not plain_done and len(to_tls) < HELD:
                try:
                    data = plain.recv(_CHUNK)
                except BlockingIOError:
                    pass
                except OSError:
                    plain_done = True
                else:
                    if data:
                        to_tls += data
                        moved = True
                    else:
                        plain_done = True
            if to_tls:
                try:
                    del to_tls[: tls.send(to_tls[:_CHUNK])]
                    moved = True
                except ssl.SSLWantWriteError:
                    send_wait = select.POLLOUT
                except ssl.SSLWantReadError:
                    send_wait = select.POLLIN
                except (ssl.SSLError, OSError):
                    return  # the peer is gone
            if plain_done and not to_tls and not tls_shut:
                _shut(tls)
                tls_shut = True
        if tls_shut and plain_shut:
            return
        if not tls_done and tls.pending():
            continue  # decrypted bytes held by OpenSSL: no poll will announce them
        poller = select.poll()
        tls_events = (recv_wait if not tls_done and len(to_plain) < HELD else 0) | (
            send_wait if to_tls else 0
        )
        plain_events = (select.POLLIN if not plain_done and len(to_tls) < HELD else 0) | (
            select.POLLOUT if to_plain else 0
        )
        if tls_events:
            poller.register(tls.fileno(), tls_events)
        if plain_events:
            poller.register(plain.fileno(), plain_events)
        if not tls_events and not plain_events:
            return
        poller.poll()


def _shut(sock: socket.socket) -> None:
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)  # a TCP end, not TLS's close_notify
    except OSError:
        pass
