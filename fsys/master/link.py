"""fmhub's end of the session link.

One reader task owns the receiving side and routes each REPLY, by request id, to the
continuation registered when its CALL was sent. Sending is synchronous (see
``fsys.iostream``): frames are encoded and queued in the order ``submit`` is called,
so the protocol state and the bytes on the wire agree without a lock. A call, once
its request is queued, is never abandoned: its continuation runs exactly once, with
the reply, or with LinkClosed if the link dies first — the slave may already have
performed it, so the result is not ours to drop.

The protocol's RemoteProtocolError and the transport's failures end the link here,
and ``failure`` keeps the first reason for the report.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Sequence

import trio

from fsys.errors import LinkClosed, RemoteProtocolError
from fsys.iostream import FdTransport
from fsys.linux import STATFS, STATX_SIZE
from fsys.protocol import (
    CLOSED,
    MAX_ERRNO,
    MAX_IO,
    NEED_DATA,
    Attrs,
    Call,
    Cancel,
    Census,
    Connection,
    CopyRange,
    Create,
    Event,
    Getdents,
    Getxattr,
    Goodbye,
    Hello,
    Invalidate,
    Lend,
    Listdir,
    Listxattr,
    Operation,
    Process,
    Processes,
    Read,
    Readlink,
    Reply,
    Role,
    Signal,
    Stat,
    Statfs,
    Tty,
    Write,
    decode_paths,
)

#: The largest value of an extended attribute and of a list of their names (Linux's
#: XATTR_SIZE_MAX and XATTR_LIST_MAX): what a query of the size (size 0) may answer.
XATTR_MAX = 65536


def reply_bound(op: Operation) -> int | None:
    """The largest result, and blob, that a reply to ``op`` may carry (None: no bound
    beyond the frame's). A reply beyond it is the slave's bug, or malice: passed on, it
    would tell the program that more bytes than its buffer holds were written there."""
    if isinstance(op, (Read, Getdents, Readlink)):
        return op.size
    if isinstance(op, (Getxattr, Listxattr)):
        return op.size or XATTR_MAX
    if isinstance(op, Write):
        return len(op.data)
    if isinstance(op, CopyRange):
        return op.length
    if isinstance(op, Listdir):
        return MAX_IO
    if isinstance(op, Tty):
        return op.size
    return None


OnReply = Callable[[Reply | LinkClosed], None]


def poll_spinning(poller: select.poll, spin: float, quiet_ms: int) -> list[tuple[int, int]]:
    """The hot loops' wait (fmhub's, the view's): what is ready now, else after
    spinning ``spin`` seconds, else within ``quiet_ms``; [] after that. Spinning
    rather than sleeping: a reply, or a program's next call, comes within
    microseconds, and a sleeping hub wakes late and cold on these machines."""
    events = poller.poll(0)
    if not events and spin:
        spin_until = time.monotonic() + spin
        while not events and time.monotonic() < spin_until:
            events = poller.poll(0)
    if not events:
        events = poller.poll(quiet_ms)
    return events


def reply_shape(op: Operation) -> int | None:
    """The exact length of the blob of a successful reply to ``op``, when it is a
    structure (a struct statx, a struct statfs)."""
    if isinstance(op, Stat):
        return STATX_SIZE
    if isinstance(op, Statfs):
        return STATFS.size
    if isinstance(op, Tty):
        return op.size
    if isinstance(op, Lend):
        return 8
    return None


def check_reply(reply: Reply, bound: int | None, shape: int | None = None) -> None:
    """RemoteProtocolError unless ``reply`` has an errno within the kernel's range, a
    result and blob within ``bound`` (``reply_bound`` of its call), and when it
    succeeded, a blob of ``shape`` bytes (``reply_shape``)."""
    if reply.result < -MAX_ERRNO:
        raise RemoteProtocolError(f"a REPLY with errno {-reply.result} (at most {MAX_ERRNO})")
    if bound is not None and max(reply.result, len(reply.blob)) > bound:
        raise RemoteProtocolError(
            f"a REPLY of {max(reply.result, len(reply.blob))} bytes to a call of {bound}"
        )
    if shape is not None and reply.result >= 0 and len(reply.blob) != shape:
        raise RemoteProtocolError(f"a REPLY of {len(reply.blob)} bytes for a {shape}-byte struct")


def check_created(reply: Reply) -> None:
    """RemoteProtocolError unless a successful CREATE's blob is empty, or a struct
    statx then paths as an INVALIDATE holds them."""
    if reply.result < 0 or not reply.blob:
        return
    if len(reply.blob) < STATX_SIZE:
        raise RemoteProtocolError(f"a CREATE's REPLY of {len(reply.blob)} bytes: no struct statx")
    decode_paths(memoryview(reply.blob)[STATX_SIZE:])


class SlaveLink:
    """fmhub's end of the session: CALLs out, REPLYs routed back by request id."""

    def __init__(self, transport: FdTransport) -> None:
        self.transport = transport
        self.conn = Connection(Role.MASTER)
        self.failure: str | None = None
        self._pending: dict[int, OnReply] = {}
        #: When each pending call was sent, and what it was: its reply is checked
        #: against it, and a slave that stops answering is reported (``oldest``).
        self._sent: dict[int, tuple[float, Operation]] = {}
        #: Pending calls that may wait as long as they like (a stream's pump reading a
        #: terminal): not stalls, and nothing for fmhub to spin for.
        self._patient: set[int] = set()
        self._next_request = 0
        self._hello = trio.Event()
        self._done = trio.Event()
        self._closing = False
        self.calls = 0
        #: Called with the paths of each INVALIDATE, in order with the replies.
        self.on_invalidate: Callable[[tuple[bytes, ...]], None] | None = None
        #: Called with each ATTRS (watched answers not asked for), in order too.
        self.on_attrs: Callable[[Attrs], None] | None = None
        #: Called with each signal the slave relays (SIGNAL).
        self.on_signal: Callable[[int, int], None] | None = None
        #: The session's processes, for CENSUS (``fsys-slave ps``); none if unset.
        self.on_census: Callable[[], tuple[Process, ...]] | None = None

    # --- life cycle ---------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The reader and writer tasks: run until the link ends."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.transport.serve_writer)
            task_status.started()
            try:
                while self.alive:
                    self.feed(await self.transport.receive())
                with trio.move_on_after(1):
                    await self.transport.flush()  # a GOODBYE explaining a protocol error
            finally:
                self._fail("the slave closed the connection")
                nursery.cancel_scope.cancel()

    def pump(self) -> None:
        """Process whatever the slave has sent, without waiting (fmhub's hot loop)."""
        data = self.transport.receive_nowait()
        if data is not None:
            self.feed(data)

    def feed(self, data: memoryview) -> None:
        """Process received bytes: route replies to their continuations."""
        conn = self.conn
        conn.receive_data(data)
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                if event is CLOSED:
                    self._fail("the slave closed the connection")
                    return
                if isinstance(event, Reply):
                    self._check(event)
                    on_reply = self._pending.pop(event.request)
                    self._sent.pop(event.request, None)
                    if self._patient:
                        self._patient.discard(event.request)
                    on_reply(event)
                elif isinstance(event, Invalidate):
                    if self.on_invalidate is not None:
                        self.on_invalidate(event.paths)
                elif isinstance(event, Attrs):
                    if self.on_attrs is not None:
                        self.on_attrs(event)
                elif isinstance(event, Signal):
                    if self.on_signal is not None:
                        self.on_signal(event.signum, event.pid)
                elif isinstance(event, Census):
                    found = self.on_census() if self.on_census is not None else ()
                    try:
                        self.send([Processes(event.request, found)])
                    except LinkClosed:
                        pass  # ending: the slave's question goes unanswered
                elif isinstance(event, Hello):
                    self._hello.set()
                elif isinstance(event, Goodbye):
                    reason = event.reason.decode(errors="replace")
                    self._fail(f"the slave ended the session: {reason}")
                    return
        except RemoteProtocolError as exc:
            if not data and conn.buffered == 0:
                self._fail(
                    "the slave went away (connection closed)"
                    if self.peer is not None
                    else "the slave closed the connection before the handshake"
                )
                return
            self._fail(f"protocol error from the slave: {exc}")
            try:
                self.transport.write(conn.send(Goodbye(str(exc).encode())))
            except (LinkClosed, RemoteProtocolError):
                pass
            return
        if not data:
            self._fail("the slave went away (connection closed)")

    def _check(self, reply: Reply) -> None:
        """RemoteProtocolError unless ``reply`` answers a pending call, as check_reply."""
        if reply.request not in self._pending:
            raise RemoteProtocolError(f"a REPLY to request {reply.request}, which is not pending")
        op = self._sent[reply.request][1]
        check_reply(reply, reply_bound(op), reply_shape(op))
        if isinstance(op, Create):
            check_created(reply)

    def _fail(self, reason: str) -> None:
        if self.failure is None and not self._done.is_set() and not self._closing:
            self.failure = reason
        self._done.set()
        self._hello.set()
        pending, self._pending = self._pending, {}
        self._sent.clear()
        self._patient.clear()
        error = LinkClosed(self.failure or reason)
        for on_reply in pending.values():
            on_reply(error)

    @property
    def waiting(self) -> bool:
        """Some call awaits its reply (one that is not patient)."""
        return len(self._pending) > len(self._patient)

    def oldest(self) -> tuple[int, float, str] | None:
        """The call that has waited longest for its reply: (request, when sent, what)."""
        for request, (when, op) in self._sent.items():  # (in the order they were sent)
            if request not in self._patient:
                return request, when, type(op).__name__
        return None

    @property
    def outstanding(self) -> int:
        """How many calls await their replies."""
        return len(self._pending)

    @property
    def peer(self) -> Hello | None:
        """The slave's HELLO, once it came."""
        return self.conn.peer_hello

    async def aclose(self) -> None:
        """End the session (GOODBYE) and release the transport. Idempotent."""
        try:
            await self.goodbye()
        finally:
            self.transport.close()

    async def wait_closed(self) -> None:
        await self._done.wait()

    @property
    def alive(self) -> bool:
        return not self._done.is_set()

    async def handshake(self, features: int = 0) -> Hello:
        """Send our HELLO (asking for ``features``) and wait for the slave's."""
        self.send([Hello(features=features, info=b"fsys-master")])
        await self._hello.wait()
        if self.peer is None:
            raise LinkClosed(self.failure or "no HELLO from the slave")
        return self.peer

    async def goodbye(self) -> None:
        """End the session cleanly: GOODBYE, then wait (briefly) for the slave's."""
        if not self.alive:
            return
        try:
            self.send([Goodbye(b"done")])
        except LinkClosed:
            return
        self._closing = True  # nothing more is sent; the slave's GOODBYE is no failure
        with trio.move_on_after(5):
            await self.transport.flush()
            await self._done.wait()
        self._done.set()

    # --- sending --------------------------------------------------------------------

    def send(self, events: Sequence[Event]) -> None:
        """Queue ``events`` for the slave; LinkClosed if the link is down or ending."""
        if not self.alive or self._closing:
            raise LinkClosed(self.failure or "the session is ending")
        parts: list[bytes | bytearray] = []
        for event in events:
            parts += self.conn.send_iov(event)  # (a WRITE's data is not copied)
        try:
            self.transport.writev(parts)
        except LinkClosed:
            self._fail("the slave went away (write failed)")
            raise

    def submit(
        self,
        pairing: int,
        op: Operation,
        on_reply: OnReply,
        prelude: Callable[[Connection], list[Event]] | None = None,
        *,
        patient: bool = False,
    ) -> int:
        """Send ``op`` for ``pairing``; ``on_reply`` runs once with its REPLY or LinkClosed.
        The request's id (0 if the link is down: ``on_reply`` has run).

        ``prelude`` gives the events to send first (the pairing's announcement).
        ``patient``: the reply may take forever, as a read of a terminal may (no stall).
        """
        if not self.alive or self._closing:
            on_reply(LinkClosed(self.failure or "the session is ending"))
            return 0
        self._next_request = self._next_request % 0xFFFFFFFF + 1
        request = self._next_request
        events: list[Event] = prelude(self.conn) if prelude is not None else []
        events.append(Call(pairing, request, op))
        self._pending[request] = on_reply
        self._sent[request] = (time.monotonic(), op)
        if patient:
            self._patient.add(request)
        self.calls += 1
        try:
            self.send(events)
        except LinkClosed:
            return 0  # _fail has run every pending continuation, this one included
        return request

    def cancel(self, pairing: int, request: int) -> None:
        """Ask the slave to end ``request`` now if it can (CANCEL): its reply still
        comes, EINTR if it ended so."""
        if request in self._pending and self.alive and not self._closing:
            try:
                self.send([Cancel(pairing, request)])
            except LinkClosed:
                pass

    async def perform(self, pairing: int, op: Operation) -> Reply:
        """``submit`` for trio code: wait (shielded) for the reply."""
        done = trio.Event()
        result: list[Reply | LinkClosed] = []

        def on_reply(outcome: Reply | LinkClosed) -> None:
            result.append(outcome)
            done.set()

        self.submit(pairing, op, on_reply)
        with trio.CancelScope(shield=True):
            await done.wait()
        outcome = result[0]
        if isinstance(outcome, LinkClosed):
            raise outcome
        return outcome

    def post(self, pairing: int, op: Operation) -> None:
        """Send a CALL that wants no reply (request 0), if the link is still up."""
        if self.alive and not self._closing:
            try:
                self.send([Call(pairing, 0, op)])
            except LinkClosed:
                pass
