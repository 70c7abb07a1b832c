"""The control device: the seccomp listener, read on trio.

Each trapped call arrives as a notification (RECV); fmhub answers it exactly once,
with a value or errno (SEND), "run it natively" (CONTINUE), or a file descriptor
installed into the caller that is also the call's result (ADDFD with SEND, one
ioctl, so the fd cannot leak if the caller is interrupted in between). ADDFD with
SETFD replaces one of the caller's fds before its call continues (see pages.py).

RECV ignores O_NONBLOCK and blocks, so we wait for POLLIN first; POLLHUP without
POLLIN means no task is left under the filter. A notification whose caller died
or was interrupted becomes invalid: SEND then fails with ENOENT, which is not an
error for us. ``id_valid`` tells, after reading a caller's memory, that the memory
still belonged to the caller when it was read.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
from dataclasses import dataclass

import trio

from fsys.kmod import abi


@dataclass(frozen=True, slots=True)
class Notification:
    id: int
    tid: int
    nr: int
    args: tuple[int, ...]

    def arg_int(self, i: int) -> int:
        """Argument ``i`` as a C int (fds, flags): the low 32 bits, signed."""
        v = self.args[i] & 0xFFFFFFFF
        return v - (1 << 32) if v & 0x80000000 else v

    def arg_long(self, i: int) -> int:
        """Argument ``i`` as a C long (offsets, lengths), signed."""
        v = self.args[i]
        return v - (1 << 64) if v & (1 << 63) else v


class Listener:
    """Owns the listener fd taken from the launched program."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._closed = False

    def _pending(self) -> tuple[bool, bool]:
        """(a notification is ready, no task is left) without blocking."""
        events = self._poll.poll(0)
        if not events:
            return False, False
        mask = events[0][1]
        return bool(mask & select.POLLIN), bool(mask & (select.POLLHUP | select.POLLERR))

    async def receive(self) -> Notification | None:
        """The next notification, or None when no task is left under the filter."""
        while True:
            ready, hup = self._pending()
            if not ready:
                if hup:
                    return None
                await trio.lowlevel.wait_readable(self.fd)
                continue
            buf = bytearray(abi.NOTIF.size)
            try:
                fcntl.ioctl(self.fd, abi.SECCOMP_IOCTL_NOTIF_RECV, buf, True)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EINTR):
                    continue  # the caller went away between poll and receive
                raise
            nid, tid, _flags, nr, _arch, _ip, *args = abi.NOTIF.unpack(buf)
            return Notification(nid, tid, nr, tuple(args))

    def receive_ready(self) -> Notification | None:
        """RECV after poll() said POLLIN. It does not block even if the caller died
        in between: the kernel then answers ENOENT (and we return None)."""
        buf = bytearray(abi.NOTIF.size)
        try:
            fcntl.ioctl(self.fd, abi.SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR):
                return None
            raise
        nid, tid, _flags, nr, _arch, _ip, *args = abi.NOTIF.unpack(buf)
        return Notification(nid, tid, nr, tuple(args))

    def set_sync_wake_up(self) -> bool:
        """Ask the kernel to wake fmhub on the CPU of the task that trapped (the task
        then waits for the answer, so the two need not cross CPUs). False if the
        kernel does not know the flag (before Linux 6.6)."""
        try:
            fcntl.ioctl(self.fd, abi.SECCOMP_IOCTL_NOTIF_SET_FLAGS,
                        abi.SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)  # fmt: skip
        except OSError:
            return False
        return True

    def id_valid(self, nid: int) -> bool:
        try:
            fcntl.ioctl(self.fd, abi.SECCOMP_IOCTL_NOTIF_ID_VALID, nid.to_bytes(8, "little"))
        except OSError:
            return False
        return True

    def _send(self, nid: int, val: int, error: int, flags: int) -> None:
        resp = bytearray(abi.NOTIF_RESP.pack(nid, val, error, flags))
        try:
            fcntl.ioctl(self.fd, abi.SECCOMP_IOCTL_NOTIF_SEND, resp, True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the caller is gone or interrupted
                raise

    def reply(self, nid: int, value: int) -> None:
        """Answer with a result (>= 0) or -errno."""
        if value < 0:
            self._send(nid, 0, value, 0)
        else:
            self._send(nid, value, 0, 0)

    def continue_(self, nid: int) -> None:
        """Let the call run natively in the caller's kernel context."""
        self._send(nid, 0, 0, abi.SECCOMP_USER_NOTIF_FLAG_CONTINUE)

    def inject(self, nid: int, fd: int, *, cloexec: bool) -> int:
        """Install a copy of ``fd`` in the caller and answer with its number.

        Returns the caller's fd number, or -errno (ENOENT: the caller is gone; EMFILE:
        its table is full).
        """
        flags = os.O_CLOEXEC if cloexec else 0
        req = bytearray(abi.NOTIF_ADDFD.pack(nid, abi.SECCOMP_ADDFD_FLAG_SEND, fd, 0, flags))
        try:
            installed: int = fcntl.ioctl(self.fd, abi.SECCOMP_IOCTL_NOTIF_ADDFD, req, True)
            return installed
        except OSError as exc:
            return -(exc.errno or errno.EIO)

    def place(self, nid: int, fd: int, number: int, *, cloexec: bool) -> int:
        """Put a copy of ``fd`` at the caller's fd ``number`` (closing what was there,
        as dup2 does) without answering the call. Returns 0 or -errno."""
        flags = os.O_CLOEXEC if cloexec else 0
        req = bytearray(abi.NOTIF_ADDFD.pack(nid, abi.SECCOMP_ADDFD_FLAG_SETFD, fd, number, flags))
        try:
            fcntl.ioctl(self.fd, abi.SECCOMP_IOCTL_NOTIF_ADDFD, req, True)
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        return 0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)
