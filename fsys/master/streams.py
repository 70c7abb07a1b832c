"""Streams: the slave's terminal and pipes as pumped placeholders (DESIGN.md §3).

A remote stream that the slave lends the session (its standard input, output and
error, ``fsys-slave run``) is a placeholder like any remote file, but its data does
not go call by call: fmhub *pumps* it. What the slave reads from the stream is
written into the placeholder's peer end, so the program's read(2), poll(2),
select(2), epoll and signals act natively on the placeholder (a handler runs, a call
without SA_RESTART fails with EINTR, nothing is lost: the data stays in the socket
for the next read). What the program writes is read from the peer end and written
on the slave, in order. Control calls (terminal ioctls, fstat) are forwarded, after
the data written before them (``settle``), as the kernel would order them.

Flow is bounded both ways: ``reads`` reads of at most ``chunk`` bytes are asked of
the slave at a time (one of 64 KiB for a terminal or pipe), and asked again only
once the program's socket took the data; ``window`` writes are in flight (one for a
terminal or pipe), and the next is read from the socket only once there is room
(a terminal that stops output, with Ctrl-S, stops the program's writes).

Ends: the stream's end of file (a pipe's, or Ctrl-D on a terminal in canonical mode)
shuts the placeholder for reading, so the program reads end of file; after a write
the slave refuses (EPIPE: no reader; EIO: the terminal hung up) the program's next
write fails with EPIPE and SIGPIPE, as on a closed pipe.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import socket
import struct
import termios
from collections.abc import Callable, Generator

import trio

from fsys.errors import Errno, LinkClosed
from fsys.master.link import SlaveLink
from fsys.master.placeholders import RemoteFile
from fsys.protocol import Operation, Read, Reply, Write

#: The most one read or write of a stream carries.
CHUNK = 64 << 10
_INT = struct.Struct("=i")
#: What ``settle`` yields (the handler that drives it sends each Write to the slave).
Settling = Generator[Write, Reply, None]


class Asked:
    """An operation sent to the slave, and its reply once it comes (``reply``: None
    while it is awaited, and if the link went down). ``then`` runs when it comes,
    where the link reads it (in fmhub's hot loop, or its trio task)."""

    __slots__ = ("done", "reply")

    def __init__(self, link: SlaveLink, op: Operation, then: Callable[[], None]) -> None:
        self.done = trio.Event()
        self.reply: Reply | None = None

        def on_reply(outcome: Reply | LinkClosed) -> None:
            if not isinstance(outcome, LinkClosed):
                self.reply = outcome
            self.done.set()
            then()

        try:
            link.submit(0, op, on_reply, patient=type(op) is not Write)
        except LinkClosed:
            self.done.set()

    async def wait(self) -> Reply | None:
        await self.done.wait()
        return self.reply


async def ask(link: SlaveLink, op: Operation, woken: Callable[[], None]) -> Reply | None:
    """``op``'s reply; None if the link is down. Cancellable: the reply to an
    abandoned operation is dropped (the slave takes nothing once the session ends).
    Patient: a read waits for the user to type, a socket for its peer (no stall to
    report). ``woken`` runs when the reply comes (fmhub's hot loop goes back to trio)."""
    return await Asked(link, op, woken).wait()


class Stream:
    """One pumped remote stream. ``app_end`` is kept, so that more copies of the
    placeholder can be given (an open of /dev/tty is one of the terminal) and so that
    an input flush can drop what the program has not read."""

    #: The most one READ asks of the slave.
    chunk = CHUNK
    #: How many WRITEs may be in flight at once (the slave runs a stream's writes in
    #: the order they came). One for a terminal or pipe: a write the slave takes
    #: only in part is sent again, its rest before anything after it.
    window = 1
    #: How many READs may be in flight at once (the slave runs a socket's reads in
    #: the order they came; a terminal's or pipe's waits in a thread: one).
    reads = 1

    def __init__(
        self, link: SlaveLink, remote: RemoteFile, app_end: socket.socket,
        wake: Callable[[], None],
    ) -> None:  # fmt: skip
        self.link = link
        self.remote = remote
        self.app_end = app_end
        self.peer = remote.peer
        self._out_scope = trio.CancelScope()
        self._out_done = trio.Event()
        #: The WRITEs in flight, oldest first, with their data; the READs, and the
        #: part of the oldest one's data that the placeholder has not taken yet.
        self._flight: collections.deque[tuple[Asked, bytes | memoryview]] = collections.deque()
        self._reads: collections.deque[Asked] = collections.deque()
        self._unput: memoryview | None = None
        self._in_over = False  # pump_in has ended: its READs' answers are dropped
        self.read_closed = False  # the program reads end of file now
        self.write_closed = False  # the program's writes fail with EPIPE now
        #: Why the slave refused a write (EPIPE, ECONNRESET...), once it has; the
        #: error a read reports before end of file (a socket's ECONNRESET).
        self.write_error = 0
        self.read_error = 0
        #: Called when a reply for this stream needs its pump's task: fmhub's hot
        #: loop, which does not let trio run, goes back to trio at once (a keystroke
        #: must not wait for the loop's quiet spell). Replies that need no task (data
        #: the placeholder takes at once, a write taken whole) are dealt with where
        #: they arrive, and the hot loop goes on.
        self._wake = wake

    @property
    def handle(self) -> int:
        return self.remote.handle

    # --- slave -> program -----------------------------------------------------------

    async def pump_in(self) -> None:
        """Read the stream on the slave, into the placeholder, until end of file."""
        try:
            self._ask_reads()
            while True:
                await self._reads[0].done.wait()
                state = self._put()
                if state == "end":
                    return
                if state == "full":
                    await trio.lowlevel.wait_writable(self.peer)
                elif state == "again":
                    await trio.sleep(0.05)  # a stream left non-blocking on the slave
                    self._reads.popleft()
                    self._ask_reads()
        finally:
            self._in_over = True

    def _ask_reads(self) -> None:
        while len(self._reads) < self.reads:
            op = Read(handle=self.handle, size=self.chunk, offset=-1, rwf=0)
            self._reads.append(Asked(self.link, op, self._read_landed))

    def _read_landed(self) -> None:
        """A READ is answered (they are, in order): its data goes into the
        placeholder now, if it takes it; anything else is the task's."""
        if not self._in_over and self._unput is None and self._put() != "put":
            self._wake()

    def _put(self) -> str:
        """Put the answered READs' data into the placeholder, in order, and ask for
        more: "put" (all of it), "full" (the placeholder holds its most), "again"
        (the slave's stream said EAGAIN), "end" (end of file, an error, no link)."""
        reads = self._reads
        while reads and reads[0].done.is_set():
            reply = reads[0].reply
            if reply is None:
                return "end"  # the link is down
            if reply.result == -errno.EAGAIN:
                return "again"
            if reply.result < 0:
                self.failed(-reply.result)  # (EIO: hung up; ECONNRESET...)
                return "end"
            if not reply.blob:
                self._shut(socket.SHUT_WR)
                self.read_closed = True
                return "end"
            view = memoryview(reply.blob) if self._unput is None else self._unput
            try:
                sent = self.peer.send(view)
            except BlockingIOError:
                sent = 0
            except OSError:
                return "end"  # no copy of the placeholder is left
            if sent < len(view):
                self._unput = view[sent:]
                return "full"
            self._unput = None
            reads.popleft()
            self._ask_reads()
        return "put"

    def failed(self, code: int) -> None:
        """The stream's read on the slave failed with ``code``: no more input."""

    def flush_input(self) -> None:
        """Drop what the program has not read yet (TCFLSH, TCSETSF)."""
        while True:  # (MSG_DONTWAIT: the program's description stays as it set it)
            try:
                if not self.app_end.recv(CHUNK, socket.MSG_DONTWAIT):
                    return
            except OSError:
                return

    def queued(self) -> int:
        """How many bytes the program can read without waiting for the slave."""
        raw = fcntl.ioctl(self.app_end.fileno(), termios.FIONREAD, bytes(_INT.size))
        value: int = _INT.unpack(raw)[0]
        return value

    # --- program -> slave -----------------------------------------------------------

    async def pump_out(self) -> None:
        """Write what the program writes into the placeholder on the slave, in order
        (fmhub's hot loop sends it first when it can: ``push``)."""
        try:
            with self._out_scope:
                while True:
                    await self._landed(self.window - 1)
                    await trio.lowlevel.wait_readable(self.peer)
                    if self._send_taken() is False:
                        return
        finally:
            with trio.CancelScope(shield=True):  # (drain waits for them)
                await self._landed(0)
            self._out_done.set()

    def push(self) -> bool:
        """The program wrote into the placeholder: send it now, while the window has
        room (fmhub's hot loop). False: the pump's task must run (end of file, a
        refused write, data left with the window full)."""
        if len(self._flight) >= self.window or self.write_closed:
            return False
        while len(self._flight) < self.window:
            sent = self._send_taken()
            if not sent:
                return sent is None
        return True  # (if some is left, the hot loop sees it again, and comes back)

    def _send_taken(self) -> bool | None:
        """Take what the program wrote and send it: True; None: nothing there;
        False: end of file (its last copy is closed)."""
        data = self._take()
        if data is None:
            return None
        if not data:
            return False
        if not self.write_closed:  # (else it goes nowhere, as into a broken pipe)
            self._flight.append((self._ask_write(data), data))
        return True

    def _take(self) -> bytes | None:
        """What the program wrote and fmhub has not sent yet; None: nothing now."""
        try:
            return self.peer.recv(self.chunk)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def _ask_write(self, data: bytes | memoryview) -> Asked:
        op = Write(handle=self.handle, offset=-1, rwf=0, data=bytes(data))
        return Asked(self.link, op, self._write_landed)

    def _write_landed(self) -> None:
        """A WRITE is answered: take the answers now; the task runs if it waits for
        room, or a write failed."""
        full = len(self._flight) >= self.window
        if not self._answers() or full:
            self._wake()

    async def _landed(self, most: int) -> None:
        """Wait until at most ``most`` writes are in flight."""
        while len(self._flight) > most:
            await self._flight[0][0].done.wait()
            self._answers()

    def _answers(self) -> bool:
        """Take the answers of the oldest writes, as far as they have come. False if
        one failed or was taken in part."""
        flight, clean = self._flight, True
        while flight and flight[0][0].done.is_set():
            asked, data = flight.popleft()
            reply = asked.reply
            if reply is None:
                flight.clear()  # the link is down
                return False
            if reply.result < 0:
                flight.clear()  # (the writes after it find the same error)
                if not self.write_closed:
                    self._refused(-reply.result)
                return False
            if reply.result < len(data) and not self.write_closed:
                # Taken in part (a terminal's write cut short; a connection that
                # broke part way, whose next write fails): the rest goes next.
                rest = memoryview(data)[reply.result :]
                flight.appendleft((self._ask_write(rest), rest))
                clean = False
        return clean

    def _refused(self, code: int) -> None:
        """The slave refused a write (EPIPE: no reader; EIO: hung up): from now on the
        program's writes fail with EPIPE and SIGPIPE (fmhub answers them: the routing
        sends them to ``sys_write``), and what it wrote before goes nowhere, as into a
        pipe whose reader is gone. (Not a shutdown of the socket: a write blocked in
        it would fail without SIGPIPE.)"""
        self.write_closed = True
        self.write_error = code
        while self._take():
            pass

    def _shut(self, how: int) -> None:
        try:
            self.peer.shutdown(how)
        except OSError:
            pass

    def settle(self) -> Settling:
        """Before a control call on the stream: send what the program wrote before it
        (the handler that yields from this sends each write and waits for it). The
        slave runs a stream's calls in the order they come (fshub)."""
        while not self.write_closed:
            data = self._take()
            if not data:
                return
            view = memoryview(data)
            while view:
                try:
                    reply = yield Write(handle=self.handle, offset=-1, rwf=0, data=bytes(view))
                except Errno as exc:  # the slave refused it
                    self._refused(exc.errno)
                    return
                view = view[reply.result :]

    async def drain(self) -> None:
        """The session ends: every byte the program wrote reaches the slave first."""
        self._out_scope.cancel()  # (writes in flight finish: they are shielded)
        await self._out_done.wait()
        while self._send_taken():
            await self._landed(self.window - 1)
        await self._landed(0)

    def close(self) -> None:
        self.app_end.close()
