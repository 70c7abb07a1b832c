"""One error hierarchy for fsys.

Errors of a *forwarded call* never appear here: they cross the wire as Linux errno
numbers and reach the program as the errno of its call. These exceptions are for
the session itself: misuse of the protocol by our own code (LocalProtocolError),
a peer that breaks it (RemoteProtocolError), a link that is gone (LinkClosed), and a
session that cannot start (SessionError). Each connection maps trio's
Broken/ClosedResourceError to LinkClosed in exactly one place.
"""

from __future__ import annotations

#: fsys-master's exit status when the session itself failed (the slave did not start,
#: died, or broke the protocol), as opposed to the program's own status.
SESSION_FAILED = 125


class FsysError(Exception):
    """Root of fsys's own errors."""


class ProtocolError(FsysError):
    """The wire protocol was violated."""


class LocalProtocolError(ProtocolError):
    """Our side tried to send something the protocol forbids (a bug in fsys)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent a malformed, oversized or out-of-order frame."""


class LinkClosed(FsysError):
    """The link to the peer is gone (the peer exited or the transport broke)."""


class Errno(FsysError):
    """A call's outcome is this errno; raised inside handlers, answered as -errno."""

    def __init__(self, errno: int, flags: int = 0) -> None:
        super().__init__(errno)
        self.errno = errno
        #: The REPLY_* flags of the slave's reply that said so (0: not the slave's).
        self.flags = flags


class Interrupted(FsysError):
    """fsys-master got ``signum`` (SIGINT, SIGTERM, SIGHUP) while it waited for the
    slave to start: the session ends, and fsys-master exits 128 + ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
