"""fshub: the slave's end of a session.

Theory of operation. One reader task owns the connection: it parses frames, keeps
one context per pairing (a master process), and performs each CALL. Calls that
cannot block (on regular files and directories, metadata) run inline, and all the
replies to one read are written together, synchronously (``fsys.iostream``), so the
common round trip never passes through trio's run loop. Calls that may wait (a
FIFO's open, a read from a pipe or terminal, a lock, fsync) run in worker threads,
so one process blocked on the slave never stalls the others; their replies are
written from the trio thread when they finish. The session ends on GOODBYE, on the
master's EOF (its death), or on a protocol violation, which is reported in a
GOODBYE and on stderr; the executor then closes every handle the session opened.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import select
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from fsys.errors import LinkClosed, LocalProtocolError, RemoteProtocolError
from fsys.iostream import FdTransport
from fsys.protocol import (
    CLOSED,
    FEATURE_CREATE,
    FEATURE_NET,
    FEATURE_OPEN_READ,
    FEATURE_STDIO,
    NEED_DATA,
    Attrs,
    Call,
    Cancel,
    Census,
    Close,
    ClosePairing,
    Connection,
    CopyRange,
    Create,
    Getdents,
    Goodbye,
    Hello,
    Invalidate,
    Listdir,
    Open,
    OpenPairing,
    OpenRead,
    Operation,
    Process,
    Processes,
    Read,
    Reply,
    Role,
    Signal,
    Stat,
    Stopped,
    Write,
)
from fsys.slave.confinement import Confinement
from fsys.slave.control import serve_control
from fsys.slave.executor import PRIMED_MASK, UNCHANGING, Executor, MustBlock, Watched
from fsys.slave.network import NET_OPS, MustWait
from fsys.slave.waits import Cancellable, SocketWaits
from fsys.slave.watches import batches

MAX_THREADS = 64
#: Entries per ATTRS frame (~300 bytes each: well under a frame's limit).
ATTRS_BATCH = 2048
HOT_QUIET_MS = 2
#: A reply blob this large is written from where it is, not copied among the frames.
BIG_BLOB = 64 << 10
HOT_SLICE = 0.010


@dataclass(eq=False)
class PairingContext:
    """The slave side of one master process (fsyscall's fslave).

    Its calls that wait in worker threads each run under a cancel scope it keeps:
    when the master process is gone (CLOSE_PAIRING), they are abandoned at once, and
    nothing is answered for them. ``calls`` counts the operations performed for it.
    """

    pairing: int
    parent: int
    calls: int = 0
    #: Its calls that wait now: in threads (their scopes), for sockets (fsys.slave.waits).
    waiting: set[Cancellable] = field(default_factory=set)
    closed: bool = False

    def close(self) -> None:
        self.closed = True
        for waiting in list(self.waiting):  # (a socket's wait leaves the set at once)
            waiting.cancel()


def perform(executor: Executor, call: Call, *, blocking: bool = False) -> Reply:
    """Run ``call`` and turn its outcome, result or errno, into a Reply.

    Any failure becomes an errno: an argument Python refuses (a value out of range)
    is EINVAL, as the kernel would say; anything else is a bug, reported, and EIO.
    """
    try:
        if type(call.op) is Stat:
            result, blob, flags = executor.stat(call.op)
            return Reply(call.pairing, call.request, result, blob, flags)
        if type(call.op) is Listdir:
            result, blob, flags = executor.listdir(call.op)
            return Reply(call.pairing, call.request, result, blob, flags)
        if type(call.op) is Create and not blocking:
            result, blob, flags = executor.create(call.op)
            return Reply(call.pairing, call.request, result, blob, flags)
        if blocking:
            result, blob = executor.execute_blocking(call.op)
        else:
            result, blob = executor.execute(call.op)
    except Watched as exc:
        return Reply(call.pairing, call.request, -(exc.errno or errno.EIO), b"", exc.flags)
    except OSError as exc:
        return Reply(call.pairing, call.request, -(exc.errno or errno.EIO))
    except (ValueError, OverflowError, struct.error):
        return Reply(call.pairing, call.request, -errno.EINVAL)
    except (MustBlock, MustWait):
        raise
    except Exception:  # noqa: BLE001 - a bug must not end the session
        print(f"fsys-slave: internal error in {type(call.op).__name__}:", file=sys.stderr)
        traceback.print_exc()
        return Reply(call.pairing, call.request, -errno.EIO)
    return Reply(call.pairing, call.request, result, blob)


def before_reply(executor: Executor, conn: Connection, op: Operation | None) -> bytes:
    """The frames that go out before the reply to ``op``: the watched answers about
    the entries a GETDENTS read (ATTRS), and an INVALIDATE of what changed, unless
    ``op`` changes nothing watched, so that the master sees the effect of its own
    calls before their replies. ``op`` None: just the INVALIDATE."""
    out = bytearray()
    if not executor.watches.enabled:
        return b""
    if op is not None and type(op) in UNCHANGING:
        if type(op) is Getdents or type(op) is Listdir:
            attrs = executor.take_attrs()
            for at in range(0, len(attrs), ATTRS_BATCH):
                out += conn.send(Attrs(PRIMED_MASK, tuple(attrs[at : at + ATTRS_BATCH])))
        return bytes(out)
    # (A CREATE's reply holds what changed until its open; what changed after its
    # STAT goes after the reply.)
    early = executor.take_early() if type(op) is Create else None
    changed = early if early is not None else executor.watches.changes()
    for paths in batches(changed):
        out += conn.send(Invalidate(paths))
    if type(op) is Write or type(op) is CopyRange:
        written = executor.written(op)
        if written:
            out += conn.send(Attrs(PRIMED_MASK, tuple(written)))
    return bytes(out)


def _poke(fd: int) -> None:
    try:
        os.write(fd, b"x")
    except BlockingIOError:
        pass  # poked before: one byte is enough


def _retried(call: Call, retry: Callable[[], tuple[int, bytes]]) -> Reply:
    """The reply of a call that waited, from ``retry`` (a connect's SO_ERROR)."""
    try:
        result, blob = retry()
    except OSError as exc:
        return Reply(call.pairing, call.request, -(exc.errno or errno.EIO))
    return Reply(call.pairing, call.request, result, blob)


class _Shared:
    """A worker thread's reply, and whether the trio side has abandoned it: whichever
    side learns second that both happened undoes the call's effect."""

    __slots__ = ("abandoned", "lock", "reply")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reply: Reply | None = None
        self.abandoned = False


class SlaveSession:
    def __init__(
        self, transport: FdTransport, executor: Executor, *, spin_us: float = 0.0,
        label: str = "serve --stdio",
    ) -> None:  # fmt: skip
        #: What started the session, for ``fsys-slave ps`` (``fsys.slave.control``).
        self.label = label
        #: CENSUS requests awaiting their PROCESSES: request -> (answered, answer).
        self._census: dict[int, tuple[trio.Event, list[tuple[Process, ...]]]] = {}
        self._census_ids = itertools.count(1)
        #: The calls that wait (in threads, or for a socket), by (pairing, request):
        #: what their CANCEL does.
        self._cancels: dict[tuple[int, int], Callable[[], None]] = {}
        #: The socket calls that wait for their sockets (its fd is in the hot
        #: loop's poll set: the loop runs them when their sockets are ready).
        self._waits = SocketWaits(self._run, self._answer, self._cancels)
        executor.on_socket_close = self._waits.closing
        self.spin = spin_us / 1e6
        self.transport = transport
        self.executor = executor
        self.conn = Connection(Role.SLAVE)
        self.pairings: dict[int, PairingContext] = {0: PairingContext(0, 0)}
        self._limiter = trio.CapacityLimiter(MAX_THREADS)
        self._threads = 0
        self.error: RemoteProtocolError | None = None
        #: The hot loop's poll set: the link, and the inotify fd once watching.
        self._poller = select.poll()
        #: The last call on each stream handle (but reads) still to finish: the next
        #: one waits for it, so that a terminal gets writes and ioctls in order.
        self._chains: dict[int, trio.Event] = {}
        #: Called with the signal when the master says the program stopped (STOPPED).
        self.on_stopped: Callable[[int], None] | None = None
        #: Set once both HELLOs are exchanged.
        self.opened = trio.Event()

    def send_signal(self, signum: int, pid: int = 0) -> bool:
        """Relay ``signum`` to the master (SIGNAL), for the foreground group or process
        ``pid``; False if the session is not open."""
        if not self.opened.is_set():
            return False
        try:
            self.transport.write(self.conn.send(Signal(signum, pid)))
        except (LinkClosed, LocalProtocolError):
            return False
        return True

    async def census(self, timeout: float) -> tuple[Process, ...] | None:
        """The master's processes of the session (CENSUS), or None if it does not say
        within ``timeout`` seconds (or the session is not open)."""
        if not self.opened.is_set():
            return None
        request = next(self._census_ids)
        answered: trio.Event = trio.Event()
        answer: list[tuple[Process, ...]] = []
        self._census[request] = (answered, answer)
        try:
            self.transport.write(self.conn.send(Census(request)))
            with trio.move_on_after(timeout):
                await answered.wait()
        except (LinkClosed, LocalProtocolError):
            return None
        finally:
            self._census.pop(request, None)
        return answer[0] if answer else None

    def _ordered(self, call: Call) -> int | None:
        """The stream handle ``call`` must wait its turn on, if any: every call on a
        pipe, socket or terminal but reads (each pumped stream has one read waiting
        on it, and other calls must not wait behind that) runs in arrival order."""
        op = call.op
        if type(op) is Read:
            return None
        handle_id = getattr(op, "handle", None)
        if handle_id is None:
            return None
        handle = self.executor.handles.get(handle_id)
        return handle_id if handle is not None and handle.streamlike else None

    def _start_chained(
        self, nursery: trio.Nursery, call: Call, context: PairingContext, key: int
    ) -> None:
        before = self._chains.get(key)
        done = self._chains[key] = trio.Event()
        self._threads += 1

        async def chained() -> None:
            try:
                if before is not None:
                    await before.wait()
                await self._threaded(call, context)
            finally:
                done.set()
                if self._chains.get(key) is done:
                    del self._chains[key]

        nursery.start_soon(chained)

    def _start_threaded(self, nursery: trio.Nursery, call: Call, context: PairingContext) -> None:
        self._threads += 1  # counted now: the hot loop must yield for it to start
        nursery.start_soon(self._threaded, call, context)

    async def _threaded(self, call: Call, context: PairingContext) -> None:
        shared = _Shared()
        # CANCEL of this call writes to the pipe: a wait that takes nothing ends (EINTR).
        cancel_r, cancel_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        key = (call.pairing, call.request)
        # (CALLs that want no reply are all request 0: another may hold the key.)
        poke = self._cancels[key] = functools.partial(_poke, cancel_w)

        def work() -> Reply:
            self.executor.cancelled_by(cancel_r)
            try:
                reply = perform(self.executor, call, blocking=True)
            finally:
                self.executor.cancelled_by(-1)
                os.close(cancel_r)  # here, not by the trio side: the thread may outlive it
            with shared.lock:
                shared.reply = reply
                abandoned = shared.abandoned
            if abandoned:
                self._undo(call, reply)
            return reply

        reply: Reply | None = None
        scope = trio.CancelScope()
        if context.closed:
            scope.cancel()
        context.waiting.add(scope)
        try:
            # Abandoned, not waited for, when the session or the pairing ends: a thread
            # blocked on a FIFO must not keep the slave alive (it exits with its threads).
            with scope:
                reply = await trio.to_thread.run_sync(
                    work, limiter=self._limiter, abandon_on_cancel=True
                )
        finally:
            self._threads -= 1
            context.waiting.discard(scope)
            if self._cancels.get(key) is poke:
                del self._cancels[key]
            if reply is None:
                _poke(cancel_w)  # abandoned: a wait that takes nothing ends now
            os.close(cancel_w)
        if reply is None:  # abandoned: its process is gone
            with shared.lock:
                shared.abandoned = True
                late = shared.reply
            if late is not None:  # it finished just as it was abandoned
                self._undo(call, late)
            # Every call is answered once (link.py); nobody waits for this one now.
            reply = Reply(call.pairing, call.request, -errno.EINTR)
        self._answer(call, reply)

    # --- sockets: calls that wait in trio tasks (fsys.slave.network) ---------------

    def _on_socket(self, op: Operation) -> bool:
        kind = type(op)
        if kind in NET_OPS:
            return True
        if kind is Read or kind is Write or kind is Close:
            handle = self.executor.handles.get(op.handle)  # type: ignore[union-attr]
            return handle is not None and handle.net
        return False

    def _run(self, call: Call, retry: Callable[[], tuple[int, bytes]] | None) -> Reply:
        """A socket call, or the retry of one that waited (SocketWaits)."""
        return perform(self.executor, call) if retry is None else _retried(call, retry)

    def _answer(self, call: Call, reply: Reply) -> None:
        """Send the reply of a call that waited (and what changed before it)."""
        try:
            out = bytearray()
            self._add(out, call, reply)
            if out:
                self.transport.write(out)
        except (LinkClosed, LocalProtocolError):
            pass  # the master is gone, or has said goodbye: the session is over

    def _add(self, out: bytearray, call: Call, reply: Reply) -> None:
        """Add ``call``'s reply, and what changed before it, to the frames to send
        (``out``); a large blob is not copied there: it is written at once, after
        what ``out`` held."""
        out += before_reply(self.executor, self.conn, call.op)
        if not call.request:
            return
        head, blob = self.conn.send_iov(reply)
        if len(blob) < BIG_BLOB:
            out += head
            out += blob
        else:
            self.transport.writev([out, head, blob])
            out.clear()

    def _send_changes(self) -> None:
        """Send an INVALIDATE of what changed on the slave since the last look, if any."""
        out = before_reply(self.executor, self.conn, None)
        if out:
            self.transport.write(out)

    async def _watch_changes(self) -> None:
        """Send what changed on the slave, by whoever, as soon as inotify says so."""
        while True:
            await trio.lowlevel.wait_readable(self.executor.watches.fd)
            self._send_changes()

    def _undo(self, call: Call, reply: Reply) -> None:
        """An abandoned call succeeded after all: release what it made (a handle)."""
        if isinstance(call.op, (Open, OpenRead, Create)) and reply.result > 0:
            self.executor.op_close_handle(reply.result)

    async def serve(self) -> None:
        """Serve until the master says goodbye, goes away, or breaks the protocol."""
        info = f"fsys-slave pid={os.getpid()} root={self.executor.root}".encode()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.transport.serve_writer)
                nursery.start_soon(self._waits.serve)
                nursery.start_soon(serve_control, self, self.label)
                features = FEATURE_NET | FEATURE_OPEN_READ | FEATURE_CREATE
                features |= FEATURE_STDIO if self.executor.lent else 0
                self.transport.write(self.conn.send(Hello(features=features, info=info)))
                await self._read_loop(nursery)
                with trio.move_on_after(5):
                    await self.transport.flush()
                nursery.cancel_scope.cancel()
        finally:
            self.executor.close()
            self._waits.close()
        if self.error is not None:
            raise self.error

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        """Explain the violation in a GOODBYE and on stderr; the session ends."""
        self.error = exc
        print(f"fsys-slave: protocol error from the master: {exc}", file=sys.stderr)
        try:
            self.transport.write(self.conn.send(Goodbye(f"protocol error: {exc}".encode())))
        except (LinkClosed, LocalProtocolError):
            pass

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        try:
            await self._serve_requests(nursery)
        except LinkClosed:
            pass  # the master went away while we answered: end, releasing everything

    async def _serve_requests(self, nursery: trio.Nursery) -> None:
        poller = self._poller
        poller.register(self.transport.read_fd, select.POLLIN)
        waits_fd = self._waits.fileno()
        poller.register(waits_fd, select.POLLIN)
        while True:
            data = await self.transport.receive()
            if not self._feed(data, nursery):
                return
            # Hot loop: wait for the next request with poll(2) directly while requests
            # keep coming (see fmhub._hot for why), back to trio after a quiet spell,
            # or at once when a worker thread or a stalled write needs trio.
            deadline = time.monotonic() + HOT_SLICE
            while not self._threads and not self.transport.backlog:
                events = self._spin(poller, self.spin) or poller.poll(HOT_QUIET_MS)
                if not events:
                    break
                for fd, _mask in events:
                    if fd == waits_fd:
                        self._waits.fire()  # sockets that calls wait for are ready
                    elif fd == self.executor.watches.fd:
                        self._send_changes()
                    else:
                        more = self.transport.receive_nowait()
                        if more is not None and not self._feed(more, nursery):
                            return
                if time.monotonic() > deadline:
                    break

    @staticmethod
    def _spin(poller: select.poll, seconds: float) -> list[tuple[int, int]]:
        """Poll without sleeping for up to ``seconds`` (FSYS_SLAVE_SPIN_US; 0: never).

        A request that comes while the slave spins is served without a wake-up (a
        forwarded stat 121 -> 102 us here), but the spin takes a CPU from the program
        and fmhub (cat 256 MiB -5%, make -j2 +4%): off unless asked for.
        """
        if not seconds:
            return []
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            events = poller.poll(0)
            if events:
                return events
        return []

    def _feed(self, data: memoryview, nursery: trio.Nursery) -> bool:
        """Perform what ``data`` completes; False when the session is over."""
        conn = self.conn
        executor = self.executor
        conn.receive_data(data)
        out = bytearray()
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                if data or conn.buffered:
                    self._protocol_error(exc)
                return False  # (or the master died: end quietly, releasing everything)
            if event is NEED_DATA:
                break
            if event is CLOSED:
                return False
            if isinstance(event, Call):
                context = self.pairings[event.pairing]
                context.calls += 1
                if executor.handles and self._on_socket(event.op):
                    reply = self._waits.call(event, context)
                    if reply is not None:
                        self._add(out, event, reply)
                    continue
                key = self._ordered(event) if executor.handles else None
                if key is not None:
                    self._start_chained(nursery, event, context, key)
                    continue
                if executor.may_block(event.op):
                    self._start_threaded(nursery, event, context)
                    continue
                try:
                    reply = perform(executor, event)
                except MustBlock:
                    self._start_threaded(nursery, event, context)
                    continue
                self._add(out, event, reply)
            elif isinstance(event, Hello):
                if executor.hello(event.features):  # the master keeps a cache: watch
                    self._poller.register(executor.watches.fd, select.POLLIN)
                    nursery.start_soon(self._watch_changes)
                self.opened.set()
            elif isinstance(event, Stopped):
                if self.on_stopped is not None:
                    self.on_stopped(event.signum)
            elif isinstance(event, Cancel):
                cancel = self._cancels.get((event.pairing, event.request))
                if cancel is not None:
                    cancel()
            elif isinstance(event, Processes):
                waiting = self._census.get(event.request)
                if waiting is not None:
                    waiting[1].append(event.entries)
                    waiting[0].set()
            elif isinstance(event, OpenPairing):
                self.pairings[event.pairing] = PairingContext(event.pairing, event.parent)
            elif isinstance(event, ClosePairing):
                closed = self.pairings.pop(event.pairing, None)
                if closed is not None:
                    closed.close()  # its process is gone: nobody awaits its calls
            elif isinstance(event, Goodbye):
                out += conn.send(Goodbye(b"bye"))
                self.transport.write(out)
                return False
        if out:
            self.transport.write(out)
        return bool(data)


async def serve_transport(
    transport: FdTransport,
    root: str = "/",
    *,
    spin_us: float = 0.0,
    confinement: Confinement | None = None,
    label: str = "serve --stdio",
) -> None:
    executor = Executor(root, confinement=confinement)
    session = SlaveSession(transport, executor, spin_us=spin_us, label=label)
    try:
        await session.serve()
    except* LinkClosed:
        pass  # the master is gone (perhaps before its HELLO): nothing to say
    finally:
        transport.close()
