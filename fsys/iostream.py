"""Frame transport over one non-blocking fd pair, for both hubs.

The hubs' hot path is a ping-pong of small frames, and every trio checkpoint costs a
trip through the run loop (measured here: a trio ping-pong between two processes
costs 77 µs against 18 µs for blocking sockets). So writes are attempted at once,
synchronously, and only what the kernel would not take waits for a writer task
(``serve_writer``) that sleeps in ``wait_writable``; reads try the fd first and
wait in ``wait_readable`` only when it is empty. Writes keep their order, since
everything after a stalled write queues behind it.

A closed or broken fd becomes LinkClosed, here and nowhere else.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat

import trio

from fsys.errors import LinkClosed

RECEIVE_SIZE = 1 << 20
#: The kernel buffer asked for each way of the link: room for a few of the largest
#: frames (1 MiB of data), so that a big reply is written, and read, in one go rather
#: than in a wake-up of each hub per 200 KiB (the default socket buffer) or 64 KiB (a
#: pipe's). The kernel caps it (net.core.wmem_max, rmem_max; fs.pipe-max-size).
LINK_BUFFER = 4 << 20
#: What a pipe may have without privilege (fs.pipe-max-size's default).
PIPE_BUFFER = 1 << 20
F_SETPIPE_SZ = 1031


def widen(fd: int) -> None:
    """Ask for LINK_BUFFER of kernel buffer on ``fd`` (a socket or a pipe), as far as
    the kernel grants it; an fd of another kind is left as it is."""
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISSOCK(mode):
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LINK_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LINK_BUFFER)
        elif stat.S_ISFIFO(mode):
            for size in (LINK_BUFFER, PIPE_BUFFER):
                try:
                    fcntl.fcntl(fd, F_SETPIPE_SZ, size)
                    break
                except PermissionError:
                    pass  # (beyond fs.pipe-max-size without CAP_SYS_RESOURCE)
    except OSError:
        pass


def take_stdio() -> tuple[int, int]:
    """The link on fds 0 and 1 (``--stdio`` on either side), moved off them (close on
    exec, above 2) with /dev/null left there; OSError (EBADF) if either is closed."""
    read_fd = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)  # (not onto 0-2 if one is closed)
    try:
        write_fd = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    except OSError:
        os.close(read_fd)
        raise
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    if null > 2:  # (if stderr was closed, /dev/null is left there)
        os.close(null)
    return read_fd, write_fd


class FdTransport:
    def __init__(self, read_fd: int, write_fd: int) -> None:
        for fd in {read_fd, write_fd}:
            os.set_blocking(fd, False)
            widen(fd)
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._pending = bytearray()
        self._rbuf = bytearray(RECEIVE_SIZE)
        self._rview = memoryview(self._rbuf)
        self._wake = trio.Event()
        self._drained = trio.Event()
        self._broken: str | None = None
        self._closed = False

    # --- writing --------------------------------------------------------------------

    def write(self, data: bytes | bytearray) -> None:
        """Queue ``data`` and write as much as the kernel takes now. Never blocks."""
        self.writev([data])

    def writev(self, parts: list[bytes | bytearray]) -> None:
        """``write`` of ``parts`` one after the other, without joining them: a large
        blob goes from where it is into the kernel (only what the kernel does not
        take at once is copied, to wait)."""
        if self._broken is not None:
            raise LinkClosed(self._broken)
        if self._pending:
            for part in parts:
                self._pending += part
            return
        try:
            n = (
                os.writev(self.write_fd, parts)
                if len(parts) > 1
                else os.write(self.write_fd, parts[0])
            )
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self._break(f"write failed: {os.strerror(exc.errno or errno.EIO)}")
            raise LinkClosed(self._broken or "write failed") from exc
        for part in parts:
            if n >= len(part):
                n -= len(part)
                continue
            self._pending += memoryview(part)[n:]
            n = 0
        if self._pending:
            self._wake.set()

    @property
    def backlog(self) -> int:
        return len(self._pending)

    async def serve_writer(self) -> None:
        """Drain what ``write`` could not write at once. Runs for the link's life;
        the only task that waits for the fd to become writable."""
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._pending:
                    await trio.lowlevel.wait_writable(self.write_fd)
                    try:
                        n = os.write(self.write_fd, self._pending)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        self._break(f"write failed: {os.strerror(exc.errno or errno.EIO)}")
                        return
                    del self._pending[:n]
                self._drained.set()
        finally:
            self._drained.set()

    async def flush(self) -> None:
        """Wait until everything queued is written (or the link broke)."""
        while self._pending and self._broken is None:
            self._drained = trio.Event()
            self._wake.set()
            await self._drained.wait()

    # --- reading --------------------------------------------------------------------

    async def receive(self) -> memoryview:
        """The next bytes available, valid until the next call; empty at end of file.

        Reads into one buffer allocated once: a fresh 1 MiB bytes object per read
        costs ~30 µs here, more than the rest of a round trip's work.
        """
        while True:
            try:
                n = os.readv(self.read_fd, [self._rbuf])
                return self._rview[:n]
            except BlockingIOError:
                pass
            except OSError as exc:
                self._break(f"read failed: {os.strerror(exc.errno or errno.EIO)}")
                return self._rview[:0]
            await trio.lowlevel.wait_readable(self.read_fd)

    def receive_nowait(self) -> memoryview | None:
        """Like ``receive``, but None instead of waiting when nothing is there."""
        try:
            n = os.readv(self.read_fd, [self._rbuf])
        except BlockingIOError:
            return None
        except OSError as exc:
            self._break(f"read failed: {os.strerror(exc.errno or errno.EIO)}")
            return self._rview[:0]
        return self._rview[:n]

    # --- closing --------------------------------------------------------------------

    def _break(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._break("closed")
        for fd in {self.read_fd, self.write_fd}:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
