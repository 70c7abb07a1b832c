"""Where a listening slave is: ``unix:PATH`` or ``tcp:HOST:PORT``.

The same text names the address on both sides: ``fsys-slave serve --listen ADDR``
and ``fsys-master run --connect ADDR``. HOST is a name, an IPv4 address, or an IPv6
address in brackets (``tcp:[::1]:7000``); PORT 0 on the listening side takes a free
port (the slave says which).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from fsys.errors import FsysError


class AddressError(FsysError):
    """Not an address fsys can listen on or connect to; the message says why."""


@dataclass(frozen=True)
class Address:
    family: socket.AddressFamily
    #: A path for AF_UNIX, (host, port) otherwise.
    where: str | tuple[str, int]

    @property
    def is_unix(self) -> bool:
        return self.family == socket.AF_UNIX

    def __str__(self) -> str:
        if isinstance(self.where, str):
            return f"unix:{self.where}"
        host, port = self.where
        return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


def parse(text: str) -> Address:
    scheme, sep, rest = text.partition(":")
    if not sep or scheme not in ("unix", "tcp"):
        raise AddressError(f"{text!r}: not unix:PATH or tcp:HOST:PORT")
    if scheme == "unix":
        if not rest:
            raise AddressError(f"{text!r}: no path after unix:")
        if len(rest.encode()) >= 108:
            raise AddressError(f"{text!r}: a unix socket's path is at most 107 bytes")
        return Address(socket.AF_UNIX, rest)
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host:
        raise AddressError(f"{text!r}: not tcp:HOST:PORT")
    family = socket.AF_INET
    if host.startswith("[") and host.endswith("]"):
        host, family = host[1:-1], socket.AF_INET6
    elif ":" in host:
        raise AddressError(f"{text!r}: an IPv6 address goes in brackets: tcp:[{host}]:PORT")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise AddressError(f"{text!r}: the port is not a number from 0 to 65535")
    return Address(family, (host, int(port_text)))


def connect(address: Address, timeout: float) -> socket.socket:
    """A connected socket (blocking, with ``timeout`` set), or OSError."""
    if isinstance(address.where, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address.where)
        except BaseException:
            sock.close()
            raise
        return sock
    host, port = address.where
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    enable_keepalive(sock)
    return sock


def enable_keepalive(sock: socket.socket) -> None:
    """TCP keepalive: a peer gone silent (a machine off, a cable cut) is noticed within
    about a minute (15 s idle, then 5 probes 9 s apart), not hours later."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 15)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 9)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 5)
