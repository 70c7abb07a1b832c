"""fmhub: the master's hub. Receives every trapped call, routes it, drives its handler.

Theory of operation. One task reads notifications from the control device. For each
it finds the caller's process (``fsys.master.processes``), settles what the process's
last calls left open, and asks the router (``fsys.master.routing``) where the call
goes: continued natively, answered with an errno, or run by a handler
(``fsys.master.calls``).

A handler that needs the slave is a generator: it yields each operation
(``reply = yield Stat(...)``) and fmhub, not trio, drives it: it sends the operation
on the link and resumes the handler from the link's reader when the reply arrives
(an errno reply is raised in the handler as Errno). A call costs no task and no trip
through trio's run loop of its own, any number of calls (threads of one process, or
many processes) are in flight at once, and a handler cannot block by accident: it
has no way to await anything but the slave. The handler reads its arguments from the
caller's memory, writes results back, and returns the call's result. Each answer
goes out exactly once: a value, -errno, CONTINUE, or an injected placeholder.

Pairings are announced to the slave before their first call, and closed when their
process exits.
"""

from __future__ import annotations

import errno
import functools
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable, Generator
from dataclasses import dataclass
from termios import FIONREAD
from types import GeneratorType
from typing import TYPE_CHECKING, Final

import trio

from fsys import protocol
from fsys.errors import Errno, LinkClosed, LocalProtocolError
from fsys.kmod.table import Table
from fsys.linux import AT_EMPTY_PATH, O_CLOEXEC, STATX, STATX_BASIC_STATS
from fsys.master import census
from fsys.master.cache import AttrCache
from fsys.master.device import Listener, Notification
from fsys.master.link import SlaveLink, poll_spinning
from fsys.master.pages import Pages, Store, links_in_use
from fsys.master.placeholders import Placeholders, RemoteFile
from fsys.master.policy import Policy
from fsys.master.processes import Inherited, Process, Processes
from fsys.master.routing import (
    CONTINUE,
    Continue,
    Handler,
    Outcome,
    Ready,
    Router,
    Step,
    Steps,
    Trapped,
)
from fsys.master.staging import Stage
from fsys.master.streams import Stream
from fsys.master.trace import Tracer
from fsys.protocol import (
    Chdir,
    Close,
    ClosePairing,
    Connection,
    Event,
    HandlePath,
    Lend,
    Lseek,
    OpenPairing,
    Reply,
    Stat,
    check_call,
)

if TYPE_CHECKING:
    from fsys.master.net import Network

HOT_QUIET_MS = 2
HOT_SLICE = 0.010
#: How long fmhub spins for a reply while a caller waits for the slave (FSYS_SPIN_US).
DEFAULT_SPIN_US = 300
#: How often a dnotify watch looks at its slave directory (seconds).
NOTIFY_POLL = 0.1
DN_MULTISHOT = 0x80000000
#: What a handler's Ready wait is resumed with.
READY = Reply(0, 0, 0)
_I64 = struct.Struct("<q")
#: The signals a terminal sends for a key (Ctrl-C, Ctrl-\, Ctrl-Z), after it drops
#: what was typed and not read yet (unless NOFLSH).
_FLUSHING = frozenset({signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP})


#: How often, and after how long, a forwarded call's thread is looked at for a signal.
INTERRUPT_POLL = 0.02
ERESTARTSYS = 512


@dataclass(eq=False)
class _Waiting:
    request: int
    since: float
    cancelled: bool = False


#: The calls, besides reads (``calls.sys_read``) and lseek (``calls.sys_lseek``),
#: that use or move a file's position: on a file whose reads came from its start
#: (OPEN_READ), the slave's handle gets the position first (``Hub.settle``). (No other
#: call on a regular file does; ioctl only for FIONREAD.)
SETTLES: Final = frozenset({"write", "writev", "sendfile", "splice", "copy_file_range"})
#: How much of all files' starts fmhub holds at once.
STARTS_HELD = 16 << 20


class Hub:
    def __init__(
        self,
        *,
        listener: Listener,
        link: SlaveLink,
        policy: Policy,
        table: Table,
        handlers: dict[str, Handler],
        tracer: Tracer | None = None,
        stage: Stage | None = None,
        processes: Processes | None = None,
        placeholders: Placeholders | None = None,
        cache: AttrCache | None = None,
        spin_us: float = DEFAULT_SPIN_US,
    ) -> None:
        self.listener = listener
        self.stage = stage
        self.link = link
        self.policy = policy
        self.table = table
        self.tracer = tracer
        self.spin = spin_us / 1e6
        self.placeholders = placeholders if placeholders is not None else Placeholders()
        #: The slave's watched answers (None: every stat goes to the slave).
        self.cache = cache
        if cache is not None:
            link.on_invalidate = self._invalidate
            link.on_attrs = cache.prime
        #: The remote files whose start came with their open (OPEN_READ), by handle,
        #: and how many bytes they hold (at most STARTS_HELD).
        self.started: dict[int, RemoteFile] = {}
        self.started_bytes = 0
        self.processes = processes if processes is not None else Processes()
        self.processes.on_exit = self._closed
        if placeholders is None:  # (tests give theirs, with a fake of the scan)
            self.placeholders.in_use = self._links_in_use
        self.router = Router(policy=policy, placeholders=self.placeholders, handlers=handlers)
        self.trapped = 0
        self.forwarded = 0
        self._nursery: trio.Nursery | None = None
        self._notifies: dict[tuple[int, int], trio.CancelScope] = {}
        #: The streams the slave lends (fsys.master.streams), by handle.
        self.streams: dict[int, Stream] = {}
        #: The slave's network, if the program uses it (set by the session).
        self.net: Network | None = None
        #: The program's process group, and the one its terminal's signals go to (a
        #: shell under fsys moves it with TIOCSPGRP); 0 without a lent terminal.
        self.program_pid = 0
        self.foreground = 0
        #: Forwarded calls waiting for the slave, which a signal may interrupt.
        self._waiting: dict[Trapped, _Waiting] = {}
        self._waiting_begins = trio.Event()
        #: The program's first fds (number -> fmhub's copy), put in place at its first
        #: trapped call: its execve.
        self._initial_fds: dict[int, int] = {}
        self._keep: list[socket.socket] = []
        #: The hot loop's poll set (``_hot``): the listener, the link, the placeholders'
        #: last closes, and the streams' peers.
        self._poller = select.poll()
        self._peers: dict[int, Stream] = {}  # (the streams' peers in it)
        self._woken = False  # (``wake``)
        link.on_signal = self.deliver_signal
        link.on_census = self.census

    # --- the notification loop ----------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Route notifications until no task is left under the filter."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.processes.serve)
            task_status.started()
            poller = self._poller
            poller.register(self.listener.fd, select.POLLIN)
            link_fd = self.link.transport.read_fd
            poller.register(link_fd, select.POLLIN)
            poller.register(self.placeholders.fileno(), select.POLLIN)
            for stream in self.streams.values():  # data from the program: to trio
                poller.register(stream.peer.fileno(), select.POLLIN)
                self._peers[stream.peer.fileno()] = stream
            nursery.start_soon(self._reap_closed)
            nursery.start_soon(self._watch_interrupts)
            while True:
                notif = await self.listener.receive()
                if notif is None:
                    break
                self.route(notif)
                if not self._hot(poller, link_fd):
                    break
            # The program's last mappings went with its processes: write them back.
            self.reap()
            for pages in self.placeholders.paged():
                self.write_back(pages)
            nursery.cancel_scope.cancel()

    async def _watch_interrupts(self) -> None:
        """While forwarded calls wait on the slave: one whose thread has a caught,
        unblocked signal pending (the kernel holds it: the thread waits killably in
        the filter) is cancelled on the slave (CANCEL); answered EINTR, it becomes
        -ERESTARTSYS (``_resume``), so the kernel runs the handler and restarts the
        call (SA_RESTART) or fails it with EINTR, as for a native call."""
        procfs = self.processes.procfs
        while True:
            if not self._waiting:
                self._waiting_begins = trio.Event()
                await self._waiting_begins.wait()
            await trio.sleep(INTERRUPT_POLL)
            now = time.monotonic()
            for call, waited in list(self._waiting.items()):
                if waited.cancelled or now - waited.since < INTERRUPT_POLL:
                    continue
                if procfs.caught_signal_pending(call.process.tgid, call.tid):
                    waited.cancelled = True
                    self.link.cancel(call.process.id, waited.request)

    def close(self) -> None:
        """Release what fmhub holds: placeholder peers, memory descriptors. Idempotent."""
        self.placeholders.close()
        self.processes.close()

    def statistics(self) -> dict[str, int]:
        """Counters of the session: calls trapped, forwarded (or answered by fmhub),
        processes seen, remote files open now, operations sent to the slave."""
        return {
            "trapped": self.trapped,
            "handled": self.forwarded,
            "processes": self.processes.created,
            "open_remote_files": len(self.placeholders),
            "slave_calls": self.link.calls,
            "cached_stats": self.cache.hits if self.cache is not None else 0,
        }

    async def _reap_closed(self) -> None:
        """Release remote handles whose last placeholder is gone, while fmhub idles."""
        while True:
            await trio.lowlevel.wait_readable(self.placeholders.fileno())
            self.reap()

    def reap(self) -> None:
        """Release what the program closed (placeholders, pages) since the last look."""
        self.placeholders.reap(self.release, self.write_back)

    def _hot(self, poller: select.poll, link_fd: int) -> bool:
        """Serve notifications and replies directly, while they keep coming.

        A forwarded call is a ping-pong of three processes; going through trio's run
        loop for each of its two wake-ups costs more than the rest of the call. So
        once a call arrives, fmhub waits for the next event with poll(2) itself, and
        returns to trio after HOT_QUIET of quiet, or HOT_SLICE at most so that the
        other tasks (last-close and exit watchers) run. False: no task is left.
        """
        listener = self.listener
        closed_fd = self.placeholders.fileno()
        deadline = time.monotonic() + HOT_SLICE
        peers = self._peers
        while True:
            # While a call waits for the slave, its caller is blocked: spin briefly
            # for the reply. Never while the program may need the CPU.
            events = poll_spinning(poller, self.spin if self.link.waiting else 0.0, HOT_QUIET_MS)
            if not events:
                return True
            for fd, mask in events:
                if fd == link_fd:
                    self.link.pump()
                    if not self.link.alive:
                        poller.unregister(link_fd)
                elif fd in peers:
                    if not peers[fd].push():  # the program wrote to a stream
                        return True  # its pump's task must run, in trio
                elif fd == closed_fd:
                    self.reap()
                elif mask & select.POLLIN:
                    notif = listener.receive_ready()
                    if notif is not None:
                        self.route(notif)
                else:
                    return False  # POLLHUP: no task left under the filter
            if time.monotonic() > deadline or self.link.transport.backlog:
                return True
            if self._woken:
                self._woken = False
                return True  # a stream's pump (or a socket's task) has its reply: let it run

    def route(self, notif: Notification) -> None:
        """Route one notification and, unless a handler waits for the slave, answer it."""
        self.trapped += 1
        if self._initial_fds and notif.tid == self.program_pid:
            self._place_initial(notif)
        syscall = self.table.by_nr.get(notif.nr)
        if syscall is None:  # the filter traps only table rows; be safe anyway
            self.listener.reply(notif.id, -errno.ENOSYS)
            return
        try:
            process = self.processes.for_tid(notif.tid)
        except Errno:
            self.listener.continue_(notif.id)  # the caller is gone; nothing to route
            return
        self.processes.on_call(process, notif.tid)
        call = Trapped(notif, syscall, process)
        opened = process.memory.opened
        try:
            decision = self.router.route(call)
        except Errno as exc:
            self._answer(call, -exc.errno)
            return
        if decision is None:
            self.listener.continue_(notif.id)
            if self.tracer is not None and self.tracer.all:
                self.tracer.line(call, CONTINUE, 0)
            return
        if isinstance(decision, int):
            self._answer(call, decision)
            return
        if (
            syscall.paths
            and process.memory.opened != opened
            and not self.listener.id_valid(notif.id)
        ):
            # The memory descriptor was (re)opened for this call: if the caller died and
            # its pid was reused in between, we read another process. (A descriptor
            # opened earlier is bound to the caller's address space and cannot be fooled.)
            return
        self.forwarded += 1
        # A handle whose last placeholder was just closed is released first, as a
        # native close would have released it (a lock, say) before this call.
        placeholders = self.placeholders
        if placeholders.by_inode or placeholders.by_handle:
            self.reap()
            if placeholders.by_handle:
                self._settle_pages(call)
        call.start = time.perf_counter_ns()
        try:
            if (
                call.files
                and (syscall.name in SETTLES
                     or (syscall.name == "ioctl" and call.arg("request") & 0xFFFFFFFF == FIONREAD))
                and any(f is not None and f.at is not None for f in call.files)
            ):  # fmt: skip
                # A call on a file whose reads came from its start, other than a
                # read: the slave's handle gets the file position first.
                started: object = self._settled(decision, call)
            else:
                started = decision(self, call)
        except Errno as exc:
            self._answer(call, -exc.errno)
            return
        except Exception:  # noqa: BLE001 - a bug must not take the session down
            self._internal_error(call)
            return
        if type(started) is GeneratorType:
            self._advance(call, started, None)
        else:
            self._answer(call, started)  # type: ignore[arg-type]

    def _advance(self, call: Trapped, steps: Steps, sent: Reply | BaseException | None) -> None:
        """Run ``call``'s handler up to its next slave operation, or to its end."""
        while True:
            try:
                if isinstance(sent, BaseException):
                    op = steps.throw(sent)
                else:
                    op = steps.send(sent)  # type: ignore[arg-type]
            except StopIteration as stop:
                outcome: Outcome = stop.value
            except Errno as exc:
                outcome = -exc.errno
            except LinkClosed:
                outcome = -errno.EIO
            except Exception:  # noqa: BLE001 - a bug must not take the session down
                self._internal_error(call)
                return
            else:
                process = call.process
                if process.closed:
                    sent = Errno(errno.ESRCH)  # the caller died: no more work for it
                    continue
                if isinstance(op, Ready):
                    self._wait_ready(call, steps, op)
                    return
                try:
                    check_call(op)
                except LocalProtocolError:
                    sent = Errno(errno.EINVAL)  # an argument the wire cannot carry
                    continue
                request = self.link.submit(
                    process.id, op, functools.partial(self._resume, call, steps),
                    self._announce(process),
                )  # fmt: skip
                if request:
                    if not self._waiting:
                        self._waiting_begins.set()
                    self._waiting[call] = _Waiting(request, time.monotonic())
                return
            self._answer(call, outcome)
            return

    def _wait_ready(self, call: Trapped, steps: Steps, ready: Ready) -> None:
        """Resume ``call``'s handler once ``ready.fd`` is ready, from a task in the
        caller's pairing (cancelled, and the handler closed, if the process ends)."""
        nursery = call.process.nursery or self._nursery
        if nursery is None:  # no task tree (in-process tests): look once, now
            self._advance(call, steps, Errno(errno.EAGAIN))
            return

        async def wait() -> None:
            try:
                if ready.writable:
                    await trio.lowlevel.wait_writable(ready.fd)
                else:
                    await trio.lowlevel.wait_readable(ready.fd)
            except BaseException:
                steps.close()
                raise
            self._advance(call, steps, READY)

        nursery.start_soon(wait)

    def _resume(self, call: Trapped, steps: Steps, reply: Reply | LinkClosed) -> None:
        """The slave answered ``call``'s operation: go on with its handler."""
        waited = self._waiting.pop(call, None)
        cancelled = waited is not None and waited.cancelled
        if cancelled and isinstance(reply, Reply) and reply.result == -errno.EINTR:
            steps.close()  # ended for a signal, nothing taken:
            self._answer(call, -ERESTARTSYS)  # the kernel restarts it, or says EINTR
            return
        sent: Reply | BaseException
        if isinstance(reply, LinkClosed):
            sent = reply
        elif reply.result < 0:  # (within MAX_ERRNO: the link checked it)
            sent = Errno(-reply.result, reply.flags)
        else:
            sent = reply
        self._advance(call, steps, sent)

    def _internal_error(self, call: Trapped) -> None:
        print(f"fsys-master: internal error in {call.syscall.name}:", file=sys.stderr)
        traceback.print_exc()
        self._answer(call, -errno.EIO)

    def _answer(self, call: Trapped, outcome: Outcome) -> None:
        if not call.answered:
            if isinstance(outcome, Continue):
                self.listener.continue_(call.notif.id)
            else:
                self.listener.reply(call.notif.id, outcome)
        if self.tracer is not None:
            start = call.start
            micros = (time.perf_counter_ns() - start) // 1000 if start else 0
            self.tracer.line(call, outcome, micros)

    # --- the slave's standard streams and terminal -----------------------------------

    async def lend_stdio(self, pid: int) -> list[Stream]:
        """Take the streams the slave lends (FEATURE_STDIO) as the fds 0, 1, 2 of the
        program ``pid`` (waiting in its first execve), which gets a process group of
        its own: the terminal's foreground. Returns the streams to pump."""
        by_handle: dict[int, tuple[socket.socket, RemoteFile]] = {}
        for number in (0, 1, 2):
            try:
                reply = await self.link.perform(0, Lend(fd=number))
            except LinkClosed:
                break
            if reply.result < 0:
                continue  # that stream is closed on the slave: the program's stays
            if reply.result not in by_handle:
                kind = _I64.unpack(reply.blob)[0] & 0o170000
                plain = kind in (0o100000, 0o040000)  # a file: call by call
                app_end, remote = self.placeholders.create(reply.result, kind, stream=not plain)
                by_handle[reply.result] = (app_end, remote)
                if not plain:
                    remote.stream = self.streams[remote.handle] = Stream(
                        self.link, remote, app_end, self.wake
                    )
                    if kind == 0o020000 and self.router.terminal is None:
                        self.router.terminal = remote
            self._initial_fds[number] = by_handle[reply.result][0].fileno()
        self._keep = [app_end for app_end, remote in by_handle.values() if remote.stream is None]
        self.program_pid = pid
        terminal = self.router.terminal
        if terminal is not None:
            try:
                name = await self.link.perform(0, HandlePath(handle=terminal.handle))
            except LinkClosed:
                name = Reply(0, 0, -errno.EIO)
            if name.result > 0 and name.blob.startswith(b"/dev/"):
                self.router.terminal_names = frozenset({b"/dev/tty", name.blob})
            try:
                os.setpgid(pid, pid)
                self.foreground = pid
            except OSError:
                self.foreground = os.getpgid(pid)
        return list(self.streams.values())

    def wake(self) -> None:
        """A task of fmhub's (a stream's pump, a socket's) has its slave's reply: the
        hot loop goes back to trio, so that it runs at once."""
        self._woken = True

    def add_stream(self, stream: Stream) -> None:
        """Pump ``stream`` from now on (a connected socket): the hot loop hands what
        the program writes into it to trio at once."""
        self.streams[stream.handle] = stream
        self._poller.register(stream.peer.fileno(), select.POLLIN)
        self._peers[stream.peer.fileno()] = stream

    def remove_stream(self, stream: Stream) -> None:
        if self.streams.pop(stream.handle, None) is not None:
            fd = stream.peer.fileno()
            self._peers.pop(fd, None)
            try:
                self._poller.unregister(fd)
            except (KeyError, ValueError):
                pass

    def _place_initial(self, notif: Notification) -> None:
        fds, self._initial_fds = self._initial_fds, {}
        for number, fd in fds.items():
            self.listener.place(notif.id, fd, number, cloexec=False)
        for app_end in self._keep:
            app_end.close()  # (a stream's is kept: see Stream)
        self._keep = []

    def install_copy(self, call: Trapped, app_end: socket.socket, *, cloexec: bool) -> int:
        """Answer ``call`` with one more copy of a stream's placeholder."""
        fd = self.listener.inject(call.notif.id, app_end.fileno(), cloexec=cloexec)
        if fd < 0:
            raise Errno(-fd)
        call.answered = True
        return fd

    def _terminal(self, remote: RemoteFile) -> None:
        terminal = self.router.terminal
        if terminal is None or terminal.handle != remote.handle:
            raise Errno(errno.ENOTTY)  # not the session's terminal

    def foreground_group(self, remote: RemoteFile) -> int:
        """TIOCGPGRP on ``remote``: the session terminal's foreground process group."""
        self._terminal(remote)
        return self.foreground

    def set_foreground(self, remote: RemoteFile, group: int) -> None:
        """TIOCSPGRP: the terminal's signals go to ``group`` from now on (the kernel's
        checks: EINVAL, ESRCH, EPERM for a group of another session)."""
        self._terminal(remote)
        if group < 0:
            raise Errno(errno.EINVAL)
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            raise Errno(errno.ESRCH) from None
        except PermissionError:
            raise Errno(errno.EPERM) from None
        try:
            if os.getsid(group) != os.getsid(self.program_pid) or group == os.getpgrp():
                raise Errno(errno.EPERM)
        except ProcessLookupError:
            pass  # its leader is gone; the group is not
        self.foreground = group

    def terminal_session(self, remote: RemoteFile) -> int:
        """TIOCGSID: the session the terminal belongs to (the program's)."""
        self._terminal(remote)
        try:
            return os.getsid(self.program_pid)
        except ProcessLookupError:
            raise Errno(errno.ENOTTY) from None

    def deliver_signal(self, signum: int, pid: int = 0) -> None:
        """The slave relays ``signum`` (SIGNAL): to the foreground process group, as a
        terminal sends it (the program's, if the group is gone); without a lent
        terminal, to the program. With ``pid``, to that process, if it is one of the
        session's (no other: a slave may not signal the master's other processes)."""
        if pid:
            census.signal_member(pid, signum, self.members)
            return
        terminal = self.router.terminal
        if signum in _FLUSHING and terminal is not None and terminal.stream is not None:
            terminal.stream.flush_input()  # what was typed before it goes, as natively
        if not self.foreground:
            if self.program_pid:
                try:
                    os.kill(self.program_pid, signum)
                except (ProcessLookupError, PermissionError):
                    pass
            return
        for group in (self.foreground, self.program_pid):
            try:
                os.killpg(group, signum)
                return
            except (ProcessLookupError, PermissionError):
                continue

    # --- pairings on the slave ----------------------------------------------------

    def _closed(self, process: Process) -> None:
        """``process`` exited: its slave context goes too."""
        if process.announced and self.link.alive:
            try:
                self.link.send([ClosePairing(process.id)])
            except LinkClosed:
                pass

    def _announce(self, process: Process) -> Callable[[Connection], list[Event]] | None:
        if process.announced:
            return None

        def prelude(conn: Connection) -> list[Event]:
            chain: list[Process] = []
            p: Process | None = process
            while p is not None and not p.announced and not p.closed:
                chain.append(p)
                p = p.parent
            events: list[Event] = []
            for q in reversed(chain):
                up = q.parent
                parent = up.id if up and not up.closed and up.id in conn.pairings.open else 0
                if q.id not in conn.pairings.open:
                    events.append(OpenPairing(q.id, parent))
                q.announced = True
            return events

        return prelude

    # --- services for handlers ----------------------------------------------------

    def install(
        self, call: Trapped, handle: int, kind: int, *, cloexec: bool, access: int = 0
    ) -> int:
        """Give the program a placeholder for ``handle``; it is the call's answer.

        ``access``: the open flags that decide what the fd allows (RemoteFile.access).
        """
        return self.install_remote(call, handle, kind, cloexec=cloexec, access=access)[0]

    def install_remote(
        self, call: Trapped, handle: int, kind: int, *, cloexec: bool, access: int = 0,
        stream: bool = False, ready: bool = True, nonblock: bool = False,
        number: int | None = None, buffer: int = 0,
    ) -> tuple[int, RemoteFile]:  # fmt: skip
        """Give the program a placeholder for ``handle`` (see Placeholders.create):
        as the call's answer, or at its fd ``number`` (which it replaces, as dup2
        does) without answering. ``nonblock``: its description is O_NONBLOCK."""
        try:
            app_end, remote = self.placeholders.create(handle, kind, access, stream=stream,
                                                       ready=ready, buffer=buffer)  # fmt: skip
        except Errno:
            self.link.post(0, Close(handle))
            raise
        try:
            if nonblock:
                app_end.setblocking(False)  # (the program's description: it is shared)
            if number is None:
                fd = self.listener.inject(call.notif.id, app_end.fileno(), cloexec=cloexec)
            else:
                placed = self.listener.place(call.notif.id, app_end.fileno(), number,
                                             cloexec=cloexec)  # fmt: skip
                fd = placed if placed < 0 else number
        finally:
            app_end.close()
        if fd < 0:
            self.placeholders.discard(remote)
            self.release(remote)
            if fd == -errno.ENOENT:
                call.answered = True  # the caller is gone: nobody to answer
            raise Errno(-fd)
        if number is None:
            call.answered = True
        return fd, remote

    def _invalidate(self, paths: tuple[bytes, ...]) -> None:
        """The slave's INVALIDATE: the cache's answers, and the starts of the files it
        names (their content may have changed), are dropped."""
        assert self.cache is not None
        self.cache.invalidate(paths)
        if not self.started:
            return
        for path in paths:  # (a directory's own "D/." names no file's key)
            base = path[:-3] if path.endswith(b"/..") else path
            below = base.rstrip(b"/") + b"/"
            for rf in [rf for rf in self.started.values()
                       if rf.key == base or rf.key.startswith(below)]:  # fmt: skip
                self.forget_start(rf)

    def keep_start(self, rf: RemoteFile, data: bytes, *, whole: bool, key: bytes) -> None:
        """``data``, the start of ``rf``'s file, came with its open: its reads are
        answered from it (``calls.sys_read``) until the file changes."""
        rf.start, rf.whole, rf.key, rf.at = data, whole, key, 0
        self.started[rf.handle] = rf
        self.started_bytes += len(data)

    def forget_start(self, rf: RemoteFile) -> None:
        """Drop what came with ``rf``'s open (its position stays where reads left it)."""
        if self.started.pop(rf.handle, None) is not None and rf.start is not None:
            self.started_bytes -= len(rf.start)
        rf.start = None

    def settle(self, rf: RemoteFile) -> Generator[Step, Reply, None]:
        """Give the slave's handle the position that reads from the start and lseeks
        left (fmhub's own until now): a call that uses it, or a read past the start,
        goes to the slave next. The start stays for reads at an offset."""
        at, rf.at = rf.at, None
        if at:
            yield Lseek(handle=rf.handle, offset=at, whence=os.SEEK_SET)

    def _settled(self, decision: Handler, call: Trapped) -> Steps:
        """``decision`` on files whose position the slave must have first."""
        for rf in call.files:
            if rf is not None and rf.at is not None:
                yield from self.settle(rf)
        started = decision(self, call)
        if isinstance(started, GeneratorType):
            outcome: Outcome = yield from started
            return outcome
        assert not isinstance(started, Generator)
        return started

    def release(self, remote: RemoteFile) -> None:
        """The program holds no copy of ``remote`` any more: close the slave's handle
        (after writing back what mappings changed in its file's pages; its dnotify
        watches end with it)."""
        for key in [k for k in self._notifies if k[1] == remote.handle]:
            self._notifies.pop(key).cancel()
        if remote.pages is not None:
            self.write_back(remote.pages)
        if self.cache is not None:
            self.cache.closed(remote.handle)
        self.forget_start(remote)
        self.close_handle(remote.handle)

    def write_back(self, pages: Pages) -> bool:
        """Send the slave what shared mappings changed in ``pages``, all at once (so no
        close of the handle they go through comes in between). True if anything went."""
        ops = pages.changes() if self.link.alive else []
        for op in ops:
            try:
                self.link.post(0, op)
            except LinkClosed:
                break
        if ops and self.cache is not None:
            self.cache.clear()  # a reply will bring no INVALIDATE before our next call
        if ops:
            for rf in list(self.started.values()):
                self.forget_start(rf)
        return bool(ops)

    def _links_in_use(self, store: Store) -> set[int]:
        """The handles whose page links the session's processes hold: every process
        under the filter, including children that have not made a trapped call yet."""
        return links_in_use(self.members(), store)

    def census(self) -> tuple[protocol.Process, ...]:
        """The session's processes now (CENSUS: ``fsys-slave ps``)."""
        return census.describe(self.members())

    def members(self) -> set[int]:
        """Every process of the session: under the filter, or born to one."""
        return census.tree((p.tgid for p in self.processes), self.processes.procfs.children)

    def _settle_pages(self, call: Trapped) -> None:
        """Before a call on a mapped remote file, the slave gets the mappings' writes
        (so that read(2) sees them, as natively)."""
        for remote in call.files:
            if remote is not None and remote.pages is not None:
                self.write_back(remote.pages)

    def map_pages(self, call: Trapped, number: int, remote: RemoteFile, *, writable: bool) -> None:
        """Switch the program's fd ``number`` to a description of ``remote``'s pages
        (same number, same close-on-exec flag), so that its mmap maps them."""
        assert remote.pages is not None
        info = self.placeholders.fd_info(call.tid, number)
        if info is None:
            raise Errno(errno.EBADF)
        view = remote.pages.description(remote.handle, writable=writable)
        try:
            cloexec = bool(info[0] & O_CLOEXEC)
            done = self.listener.place(call.notif.id, view, number, cloexec=cloexec)
        finally:
            os.close(view)
        if done < 0:
            raise Errno(-done)

    # --- dnotify on slave directories -------------------------------------------------

    def notify(self, process: Process, remote: RemoteFile, mask: int) -> None:
        """F_NOTIFY on the slave directory ``remote``: SIGIO to ``process`` when the
        directory changes (mask 0: no more). The slave directory is looked at every
        NOTIFY_POLL seconds, in a task of the process's pairing."""
        key = (process.tgid, remote.handle)
        previous = self._notifies.pop(key, None)
        if previous is not None:
            previous.cancel()
        nursery = process.nursery or self._nursery
        if not mask or nursery is None:
            return
        scope = trio.CancelScope()
        self._notifies[key] = scope
        nursery.start_soon(self._watch_directory, process, remote.handle, mask, scope)

    async def _watch_directory(
        self, process: Process, handle: int, mask: int, scope: trio.CancelScope
    ) -> None:
        op = Stat(dir=handle, flags=AT_EMPTY_PATH, mask=STATX_BASIC_STATS, path=b"")
        before: tuple[int, ...] | None = None
        with scope:
            while True:
                try:
                    reply = await self.link.perform(0, op)
                except LinkClosed:
                    return
                if reply.result < 0 or len(reply.blob) < STATX.size:
                    return
                f = STATX.unpack_from(reply.blob)
                now = (f[3], f[8], f[15], f[16], f[17], f[18])  # nlink size ctime mtime
                if before is not None and now != before:
                    try:
                        self.processes.procfs.send_signal(process.pidfd, signal.SIGIO)
                    except OSError:
                        return
                    if not mask & DN_MULTISHOT:
                        return
                before = now
                await trio.sleep(NOTIFY_POLL)

    def close_handle(self, handle: int) -> None:
        """Close a slave handle that fmhub opened for itself."""
        self.link.post(0, Close(handle))

    async def set_initial_cwd(self, cwd: str, *, staged: bool) -> None:
        """The program starts in ``cwd`` as the slave has it, else the slave's root.

        ``staged``: the launcher started it in the stage directory (see staging.py).
        """
        path = os.fsencode(cwd)
        if self.policy.is_local(path):
            self.processes.initial = Inherited(path, False, False)
            return
        reply = await self.link.perform(0, Chdir(dir=0, path=path))
        self.processes.initial = Inherited(reply.blob if reply.result >= 0 else b"/", True, staged)
