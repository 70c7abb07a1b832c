"""Who may use a listening slave: its greeting, and a shared secret's challenge.

Theory of operation. A slave that listens (``fsys-slave serve --listen``) speaks
first on each connection, before the protocol's HELLO, with a GREETING: b"FSYSAUTH",
a version (u16), a method (u16) and 32 random bytes, the challenge.

- OPEN: nothing is asked (a unix socket of mode 0600 is the gate); the protocol
  begins at once.
- HMAC: the master answers with 32 random bytes of its own and
  HMAC-SHA256(secret, "fsys master" + challenge + its bytes); the slave checks it in
  constant time and answers b"OK" and HMAC-SHA256(secret, "fsys slave" + the
  master's bytes + challenge), so that the master knows the slave holds the secret
  too, or b"NO" and closes. Only after OK does the protocol begin.
- REFUSED: a u16 length and a UTF-8 reason follow (too many sessions); the slave
  closes.

The secret never crosses the wire, and both sides' bytes are fresh for each
connection, so no answer seen on the wire can be used again. This proves who is at
the other end; it does not hide what the session carries: over a network anyone
may read, run the session over SSH (docs/ssh.md).

A secret is at least 16 bytes, from a file only its owner may read (``--secret-file``)
or from FSYS_SECRET; never from the command line, which every user can read in /proc.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import socket
import stat
import struct
from typing import Final

from fsys.errors import FsysError

MAGIC: Final = b"FSYSAUTH"
VERSION: Final = 1
GREETING: Final = struct.Struct("<8sHH32s")  # magic, version, method, challenge
NONCE: Final = 32
MAC: Final = hashlib.sha256().digest_size
ANSWER: Final = NONCE + MAC
VERDICT: Final = 2 + MAC  # b"OK" + the slave's proof, or b"NO" + zeros
MIN_SECRET: Final = 16
MAX_SECRET: Final = 4096
MAX_REASON: Final = 1024
#: How long either side waits for the other's part of the exchange.
TIMEOUT: Final = 10.0


class Method(enum.IntEnum):
    OPEN = 0
    HMAC = 1
    REFUSED = 0xFFFF


class AuthError(FsysError):
    """The exchange failed; the message says why, for the user."""


def _mac(secret: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, label + first + second, hashlib.sha256).digest()


# --- the secret -----------------------------------------------------------------------


def _checked(secret: bytes, where: str) -> bytes:
    secret = secret.rstrip(b"\r\n")
    if len(secret) < MIN_SECRET:
        raise AuthError(f"the secret in {where} is shorter than {MIN_SECRET} bytes")
    return secret


def load_secret(path: str | None, environ: dict[str, str] | None = None) -> bytes | None:
    """The secret from ``path`` (refused unless only its owner, who must be us, can
    read or write it), else from FSYS_SECRET; None if neither is given."""
    env = os.environ if environ is None else environ
    if path is None:
        text = env.get("FSYS_SECRET")
        return None if text is None else _checked(os.fsencode(text), "FSYS_SECRET")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise AuthError(f"--secret-file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AuthError(f"--secret-file {path}: not a regular file")
        if st.st_uid != os.geteuid():
            raise AuthError(f"--secret-file {path}: owned by uid {st.st_uid}, not by us")
        if st.st_mode & 0o077:
            raise AuthError(f"--secret-file {path}: others may read it (mode "
                            f"{st.st_mode & 0o777:03o}): chmod 600 {path}")  # fmt: skip
        data = os.read(fd, MAX_SECRET + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET:
        raise AuthError(f"--secret-file {path}: longer than {MAX_SECRET} bytes")
    return _checked(data, path)


# --- the exchange, over a connected socket (blocking, with TIMEOUT) ---------------------


def _recv_exactly(sock: socket.socket, size: int, what: str) -> bytes:
    data = bytearray()
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except TimeoutError:
            raise AuthError(f"no {what} within {sock.gettimeout() or 0:.0f} s") from None
        if not chunk:
            raise AuthError(f"the connection closed before the {what}")
        data += chunk
    return bytes(data)


def greet(sock: socket.socket, secret: bytes | None) -> None:
    """The slave's side: greet, and with a secret, check the master's answer.
    AuthError if the master failed (it has been told so)."""
    challenge = os.urandom(NONCE)
    method = Method.OPEN if secret is None else Method.HMAC
    sock.sendall(GREETING.pack(MAGIC, VERSION, method, challenge))
    if secret is None:
        return
    answer = _recv_exactly(sock, ANSWER, "answer to the challenge")
    theirs, proof = answer[:NONCE], answer[NONCE:]
    if not hmac.compare_digest(proof, _mac(secret, b"fsys master", challenge, theirs)):
        sock.sendall(b"NO" + bytes(MAC))
        raise AuthError("wrong secret")
    sock.sendall(b"OK" + _mac(secret, b"fsys slave", theirs, challenge))


def refuse(sock: socket.socket, reason: str) -> None:
    """The slave's side: turn this connection away, saying why."""
    text = reason.encode()[:MAX_REASON]
    message = GREETING.pack(MAGIC, VERSION, Method.REFUSED, bytes(NONCE))
    sock.sendall(message + struct.pack("<H", len(text)) + text)


def answer(sock: socket.socket, secret: bytes | None) -> None:
    """The master's side: read the greeting and prove that we hold the secret; check
    that the slave holds it too. AuthError, said for the user, if any of it fails."""
    head = _recv_exactly(sock, GREETING.size, "greeting")
    magic, version, method, challenge = GREETING.unpack(head)
    if magic != MAGIC:
        raise AuthError(f"not a listening fsys slave: it greeted with {head[:16]!r}")
    if version != VERSION:
        raise AuthError(f"the slave greets with version {version}, we speak {VERSION}")
    if method == Method.REFUSED:
        (length,) = struct.unpack("<H", _recv_exactly(sock, 2, "reason"))
        reason = _recv_exactly(sock, min(length, MAX_REASON), "reason")
        raise AuthError(f"the slave refused the session: {reason.decode(errors='replace')}")
    if method == Method.OPEN:
        return
    if method != Method.HMAC:
        raise AuthError(f"the slave asks for an unknown method {method}")
    if secret is None:
        raise AuthError("the slave asks for a secret: give --secret-file F or FSYS_SECRET")
    ours = os.urandom(NONCE)
    sock.sendall(ours + _mac(secret, b"fsys master", challenge, ours))
    verdict = _recv_exactly(sock, VERDICT, "verdict")
    if verdict[:2] != b"OK":
        raise AuthError("the slave refused our secret")
    if not hmac.compare_digest(verdict[2:], _mac(secret, b"fsys slave", ours, challenge)):
        raise AuthError("the slave does not know the secret: it is not the slave you meant")
