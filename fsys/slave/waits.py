"""The socket calls that wait (fsys.slave.network's MustWait), with no thread and no
trio task of their own.

A call whose socket is not ready is kept as a ``Wait`` on what it needs, its fd
readable or writable, in one epoll set. fshub's hot loop polls that set's fd with
its own, and one trio task waits for it once fshub is back in trio: whichever sees
it ready first runs the waiting calls there and then, and answers them, so a
socket's data is answered with no pass through trio's run loop while the session
is busy (a trio pass per wait cost ~100 µs here, twice per round trip).

Some calls keep their order on a socket (``line``): its writes, shutdown and close
(a shutdown must follow the data written before it); its reads among themselves (a
pumped socket has two READs in flight). Such a call queues behind the first of its
line still waiting, and runs when that one is answered.

A wait ends with its answer, or EINTR when cancelled: by CANCEL (a signal in the
program), or when its master process is gone (``PairingContext.close``); or EBADF
when its socket is closed under it.
"""

from __future__ import annotations

import collections
import errno
import select
from collections.abc import Callable
from typing import Protocol

import trio

from fsys.protocol import Call, Close, Operation, Read, Recvfrom, Reply, Sendto, Shutdown, Write
from fsys.slave.network import MustWait, Result

#: A socket's operations that run in the order they came, among each other.
SENDING = (Write, Sendto, Shutdown, Close)
RECEIVING = (Read, Recvfrom)
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_BOTH = select.EPOLLERR | select.EPOLLHUP

Retry = Callable[[], Result]
#: Runs a call (``retry`` None) or its retry; its reply, or MustWait again.
Runner = Callable[[Call, Retry | None], Reply]
#: Sends a reply (and what changed before it) to the master.
Answer = Callable[[Call, Reply], None]


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Context(Protocol):
    """The pairing a wait belongs to (fshub.PairingContext): its calls that wait."""

    waiting: set[Cancellable]


class Wait:
    """One call that waits for its socket, or for its turn on it."""

    __slots__ = ("call", "context", "key", "line", "owner", "retry")

    def __init__(self, owner: SocketWaits, call: Call, context: Context, line: LineKey | None):
        self.owner = owner
        self.call = call
        self.context = context
        self.line = line
        self.key: Key | None = None  # (fd, writable) it is armed on; None: not armed
        self.retry: Retry | None = None  # None: the call is performed again

    def cancel(self) -> None:
        self.owner.cancel(self)


Key = tuple[int, bool]
LineKey = tuple[int, bool]  # (handle, sending)


class SocketWaits:
    def __init__(
        self, run: Runner, answer: Answer, cancels: dict[tuple[int, int], Callable[[], None]]
    ) -> None:
        self._run = run
        self._answer = answer
        #: What a CANCEL of each waiting call does, by (pairing, request): fshub's.
        self._cancels = cancels
        self._epoll = select.epoll()
        self._armed: dict[Key, list[Wait]] = {}
        self._lines: dict[LineKey, collections.deque[Wait]] = {}

    def fileno(self) -> int:
        """Readable when some armed socket is ready (``fire``)."""
        return self._epoll.fileno()

    def close(self) -> None:
        self._epoll.close()

    # --- calls ----------------------------------------------------------------------

    def call(self, call: Call, context: Context) -> Reply | None:
        """``call``'s reply if it needs no wait; else None, and it is answered later."""
        line_key = _line(call.op)
        line = self._lines.get(line_key) if line_key is not None else None
        if line:  # a call before it on its line still waits
            wait = self._keep(call, context, line_key)
            line.append(wait)
            return None
        try:
            return self._run(call, None)
        except MustWait as must:
            wait = self._keep(call, context, line_key)
            if line_key is not None:
                self._lines[line_key] = collections.deque([wait])
            self._arm(wait, must)
            return None

    def _keep(self, call: Call, context: Context, line_key: LineKey | None) -> Wait:
        wait = Wait(self, call, context, line_key)
        context.waiting.add(wait)
        self._cancels[(call.pairing, call.request)] = wait.cancel
        return wait

    def _arm(self, wait: Wait, must: MustWait) -> None:
        key = (must.fd, must.writable)
        wait.key, wait.retry = key, must.retry
        waits = self._armed.get(key)
        if waits is None:
            self._armed[key] = [wait]
            self._interest(must.fd)
        else:
            waits.append(wait)

    def _interest(self, fd: int) -> None:
        mask = _IN * ((fd, False) in self._armed) | _OUT * ((fd, True) in self._armed)
        try:
            if mask:
                try:
                    self._epoll.modify(fd, mask)
                except FileNotFoundError:
                    self._epoll.register(fd, mask)
            else:
                self._epoll.unregister(fd)
        except OSError:
            pass  # (closed already: its waits end in ``closing``)

    # --- readiness ------------------------------------------------------------------

    def fire(self) -> None:
        """Run the calls whose sockets are ready now."""
        for fd, mask in self._epoll.poll(0):
            if mask & (_IN | _BOTH):
                self._ready((fd, False))
            if mask & (_OUT | _BOTH):
                self._ready((fd, True))

    async def serve(self) -> None:
        """While fshub is in trio: ``fire`` whenever a socket is ready."""
        while True:
            await trio.lowlevel.wait_readable(self._epoll.fileno())
            self.fire()

    def _ready(self, key: Key) -> None:
        waits = self._armed.pop(key, None)
        if waits is None:
            return
        self._interest(key[0])
        for wait in waits:
            wait.key = None
            if self._attempt(wait) and wait.line is not None:
                self._next(wait.line)

    def _attempt(self, wait: Wait) -> bool:
        """Run ``wait``'s call: answered (True), or armed again."""
        try:
            reply = self._run(wait.call, wait.retry)
        except MustWait as must:
            self._arm(wait, must)
            return False
        self._answered(wait, reply)
        return True

    def _answered(self, wait: Wait, reply: Reply) -> None:
        wait.context.waiting.discard(wait)
        self._cancels.pop((wait.call.pairing, wait.call.request), None)
        self._answer(wait.call, reply)

    def _next(self, line_key: LineKey) -> None:
        """The first call of a line is answered: run the next ones, while they need
        no wait."""
        line = self._lines[line_key]
        line.popleft()
        while line:
            if not self._attempt(line[0]):
                return
            line.popleft()
        del self._lines[line_key]

    # --- ends -----------------------------------------------------------------------

    def cancel(self, wait: Wait) -> None:
        """CANCEL, or the end of its process: ``wait`` is answered EINTR now."""
        if wait in wait.context.waiting:  # (else answered already)
            self._end(wait, -errno.EINTR)

    def closing(self, fd: int) -> None:
        """Socket ``fd`` is about to be closed: its waits end with EBADF (as their
        calls would find it), and the fd leaves the epoll set."""
        for key in ((fd, False), (fd, True)):
            for wait in list(self._armed.get(key, ())):
                self._end(wait, -errno.EBADF)
        self._interest(fd)

    def _end(self, wait: Wait, code: int) -> None:
        """Answer ``wait`` with ``code`` without running it."""
        if wait.key is not None:
            waits = self._armed[wait.key]
            waits.remove(wait)
            if not waits:
                del self._armed[wait.key]
                self._interest(wait.key[0])
            wait.key = None
        self._answered(wait, Reply(wait.call.pairing, wait.call.request, code))
        if wait.line is not None:
            line = self._lines[wait.line]
            if line[0] is wait:
                self._next(wait.line)
            else:
                line.remove(wait)


def _line(op: Operation) -> LineKey | None:
    """The line ``op`` keeps its order on, if any."""
    kind = type(op)
    if kind in SENDING:
        return (op.handle, True)  # type: ignore[union-attr]
    if kind in RECEIVING:
        return (op.handle, False)  # type: ignore[union-attr]
    return None
