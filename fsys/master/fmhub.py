"""fmhub: the master's hub. Reads the control device and routes every trapped call.

Theory of operation. One task reads notifications. For each it finds the caller's
*pairing* (its process: cwd, umask, memory) and routes the call by its row in the
disposition table, synchronously and without the slave:

- ``fd``: each fd argument is looked up among the placeholders. None remote: the
  call is continued natively, at once.
- ``path``: each path is read from the caller's memory and placed: an absolute path
  by the path policy; a relative one by the side of its directory (the cwd, or a
  dirfd that is or is not a placeholder). All on the master: continued at once.
- ``hub``: always answered by fmhub (cwd, umask, execve, exit).

Only a call that involves the slave (or fmhub's own state) runs a handler from
``fsys.master.calls``. A handler is an ``async def`` that awaits nothing but
``hub.call(...)`` (one operation on the slave); fmhub drives it itself instead of
starting a trio task: it sends the operation the handler yields, and resumes the
handler from the link's reader when the reply arrives. A call costs no task and no
trip through trio's run loop of its own, and any number of calls (threads of one
process, or many processes) are in flight at once. The handler reads its arguments
from the caller's memory, writes results back, and returns the call's result. A
call with no handler is answered with the table's errno for it. Each answer goes
out exactly once: a value, -errno, CONTINUE, or an injected placeholder.

Pairings are found from the caller's tid via /proc: a thread joins its process's
pairing; a new process gets a pairing that inherits its parent's working directory
*as of the fork*. A process's inheritable state changes only through calls fmhub
traps (chdir, fchdir), so before applying such a change, and when a process calls
exit, fmhub *seals* its children: every child that exists then is recorded with
the state it was forked with. A child first seen later was forked after the last
change, and inherits the parent's current state; an orphan whose parent exited
finds its record. Fork itself is not trapped: it costs nothing.
Each pairing is announced to the slave before its first call and closed when its
process exits (its pidfd becomes readable).
"""

from __future__ import annotations

import errno
import functools
import os
import select
import sys
import time
import traceback
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import NamedTuple

import trio

from fsys.errors import Errno, LinkClosed, LocalProtocolError
from fsys.kmod.table import Disposition, PathArg, Syscall, Table
from fsys.linux import AT_EMPTY_PATH, AT_FDCWD
from fsys.master.device import Listener, Notification
from fsys.master.link import SlaveLink
from fsys.master.memory import TargetMemory
from fsys.master.placeholders import Placeholders, RemoteFile
from fsys.master.policy import Policy, normalize
from fsys.master.staging import Stage
from fsys.master.trace import Tracer
from fsys.protocol import (
    MAX_PATH,
    ClosePairing,
    Connection,
    Event,
    Op,
    OpenPairing,
    Reply,
    check_call,
)

HOT_QUIET_MS = 2
SPIN = float(os.environ.get("FSYS_SPIN_US", "300")) / 1e6
HOT_SLICE = 0.010


class _Continue:
    def __repr__(self) -> str:
        return "CONTINUE"


CONTINUE = _Continue()
"""A handler's answer: run the call natively."""


@dataclass(eq=False)
class Pairing:
    """One master process and its slave-process context."""

    id: int
    tgid: int
    parent: Pairing | None
    cwd: bytes
    cwd_remote: bool
    umask: int
    memory: TargetMemory
    staged_cwd: bool = False  # the process's kernel cwd is the stage directory
    staged_names: frozenset[bytes] = frozenset()  # names of its staged wrapper (staging.py)
    # A chdir into a master directory, continued: the kernel's verdict is read back
    # from /proc (see Hub.settle_cwd).
    pending_cwd: PendingChdir | None = None
    # An execve was continued: other threads die in it (see Hub._after_exec), and an
    # argv[0] that staging rewrote is put back in the new image.
    exec_pending: bool = False
    argv0_fix: tuple[int, int] | None = None  # (address of the rewritten byte, arg_start)
    tids: set[int] = field(default_factory=set)
    announced: bool = False
    closed: bool = False

    def inheritable(self) -> Inherited:
        return Inherited(self.cwd, self.cwd_remote, self.staged_cwd)


class PendingChdir(NamedTuple):
    tid: int  # the thread that called chdir
    before: tuple[int, int]  # (st_dev, st_ino) of the kernel cwd before it
    previous: Inherited  # the state to restore if the kernel refused


class Inherited(NamedTuple):
    """What a child process takes from its parent at fork (fmhub's part of it)."""

    cwd: bytes
    cwd_remote: bool
    staged_cwd: bool


@dataclass(slots=True)
class Target:
    """Where one path argument lives."""

    remote: bool
    dir: int = 0  # remote: the directory handle it is relative to (0: the root)
    path: bytes = b""  # remote: the path sent to the slave
    shown: bytes = b""  # as the program wrote it
    null: bool = False  # the program passed NULL (utimensat's "this fd")


@dataclass(eq=False, slots=True)
class Trapped:
    """One trapped call, as routed."""

    notif: Notification
    syscall: Syscall
    pairing: Pairing
    files: tuple[RemoteFile | None, ...] = ()
    targets: tuple[Target, ...] = ()
    answered: bool = False
    side: str = "slave"
    note: str = ""
    start: int = 0

    @property
    def memory(self) -> TargetMemory:
        return self.pairing.memory

    def arg(self, i: int) -> int:
        return self.notif.args[i]

    def arg_int(self, i: int) -> int:
        return self.notif.arg_int(i)

    def arg_long(self, i: int) -> int:
        return self.notif.arg_long(i)


class SlaveCall:
    """What a handler awaits: one operation on the slave, resumed with its reply."""

    __slots__ = ("blobs", "ints", "op")

    def __init__(self, op: Op, ints: tuple[int, ...], blobs: tuple[bytes, ...]) -> None:
        self.op = op
        self.ints = ints
        self.blobs = blobs

    def __await__(self) -> Generator[SlaveCall, Reply, Reply]:
        reply = yield self
        if reply.result < 0:
            raise Errno(-reply.result)
        return reply


Handler = Callable[["Hub", Trapped], Coroutine[SlaveCall, Reply, "int | _Continue"]]


def _join(cwd: bytes, path: bytes) -> bytes:
    return (cwd.rstrip(b"/") or b"") + b"/" + path


def _proc_stat(pid: int, field: int) -> int:
    """Field ``field`` (numbered as in proc(5)) of /proc/<pid>/stat; -1 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # Fields from the third on follow the ")" that ends the command name.
            return int(f.read().rsplit(b")", 1)[1].split()[field - 3])
    except (OSError, IndexError, ValueError):
        return -1


def _start_time(pid: int) -> int:
    """When ``pid`` started (clock ticks since boot): pids are reused, this is not."""
    return _proc_stat(pid, 22)


def arg_start(pid: int) -> int:
    """Where ``pid``'s argument strings start in its memory."""
    return _proc_stat(pid, 48)


def _proc_status(tid: int) -> tuple[int, int, int]:
    """(Tgid, PPid, Umask) of task ``tid``, from /proc/<tid>/status."""
    with open(f"/proc/{tid}/status", "rb") as f:
        text = f.read()

    def field(name: bytes) -> bytes:
        start = text.index(name) + len(name)
        return text[start : text.index(b"\n", start)].strip()

    return int(field(b"\nTgid:")), int(field(b"\nPPid:")), int(field(b"\nUmask:"), 8)


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
    ) -> None:
        self.listener = listener
        self.stage = stage
        self.link = link
        self.policy = policy
        self.table = table
        self.handlers = handlers
        self.tracer = tracer
        self.placeholders = Placeholders()
        self.pairings: dict[int, Pairing] = {}  # by tgid
        self.by_tid: dict[int, Pairing] = {}
        self.initial = Inherited(b"/", True, False)
        # child pid -> (state at its fork, its start time: pids are reused)
        self.births: dict[int, tuple[Inherited, int]] = {}
        self.processes = 0  # pairings created; the last one's id
        self._nursery: trio.Nursery | None = None
        self.trapped = 0
        self.forwarded = 0

    # --- the notification loop ----------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Route notifications until no task is left under the filter."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            poller = select.poll()
            poller.register(self.listener.fd, select.POLLIN)
            link_fd = self.link.transport.read_fd
            poller.register(link_fd, select.POLLIN)
            poller.register(self.placeholders.fileno(), select.POLLIN)
            nursery.start_soon(self._reap_closed)
            while True:
                notif = await self.listener.receive()
                if notif is None:
                    break
                self.route(notif)
                if not self._hot(poller, link_fd):
                    break
            nursery.cancel_scope.cancel()

    def statistics(self) -> dict[str, int]:
        """Counters of the session: calls trapped, forwarded (or answered by fmhub),
        processes seen, remote files open now, operations sent to the slave."""
        return {
            "trapped": self.trapped,
            "handled": self.forwarded,
            "processes": self.processes,
            "open_remote_files": len(self.placeholders),
            "slave_calls": self.link.calls,
        }

    async def _reap_closed(self) -> None:
        """Release remote handles whose last placeholder is gone, while fmhub idles."""
        while True:
            await trio.lowlevel.wait_readable(self.placeholders.fileno())
            self.placeholders.reap(self._release)

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
        while True:
            events = poller.poll(0)
            if not events:
                # While a call waits for the slave, its caller is blocked: spin briefly
                # for the reply rather than sleep (on these machines a sleeping hub
                # wakes late and cold). Never while the program may need the CPU.
                if self.link.waiting and SPIN:
                    spin_until = time.monotonic() + SPIN
                    while not events and time.monotonic() < spin_until:
                        events = poller.poll(0)
                if not events:
                    events = poller.poll(HOT_QUIET_MS)
                    if not events:
                        return True
            for fd, mask in events:
                if fd == link_fd:
                    self.link.pump()
                    if not self.link.alive:
                        poller.unregister(link_fd)
                elif fd == closed_fd:
                    self.placeholders.reap(self._release)
                elif mask & select.POLLIN:
                    notif = listener.receive_ready()
                    if notif is not None:
                        self.route(notif)
                else:
                    return False  # POLLHUP: no task left under the filter
            if time.monotonic() > deadline or self.link.transport.backlog:
                return True

    def route(self, notif: Notification) -> None:
        self.trapped += 1
        syscall = self.table.by_nr.get(notif.nr)
        if syscall is None:  # the filter traps only table rows; be safe anyway
            self.listener.reply(notif.id, -errno.ENOSYS)
            return
        try:
            pairing = self.pairing_for(notif.tid)
        except Errno:
            self.listener.continue_(notif.id)  # the caller is gone; nothing to route
            return
        if pairing.pending_cwd is not None:
            self.settle_cwd(pairing, notif.tid)
        if pairing.exec_pending and notif.tid == pairing.tgid:
            self._after_exec(pairing)
        call = Trapped(notif, syscall, pairing)
        opened = pairing.memory.opened
        try:
            if syscall.fds:
                call.files = tuple(
                    self.placeholders.lookup(notif.tid, notif.arg_int(i)) for i in syscall.fds
                )
            if syscall.paths:
                call.targets = tuple(self._target(call, p) for p in syscall.paths)
        except Errno as exc:
            self._answer(call, -exc.errno, 0)
            return
        remote = any(f is not None for f in call.files) or any(t.remote for t in call.targets)
        if syscall.disposition is not Disposition.HUB and not remote:
            self.listener.continue_(notif.id)
            if self.tracer is not None and self.tracer.all:
                call.side = "master"
                self.tracer.line(call, CONTINUE, 0)
            return
        handler = self.handlers.get(syscall.name)
        if handler is None:
            assert syscall.errno is not None
            call.side = "hub"
            call.note = "not forwarded"
            self._answer(call, -syscall.errno, 0)
            return
        if (
            syscall.paths
            and pairing.memory.opened != opened
            and not self.listener.id_valid(notif.id)
        ):
            # The memory descriptor was (re)opened for this call: if the caller died and
            # its pid was reused in between, we read another process. (A descriptor
            # opened earlier is bound to the caller's address space and cannot be fooled.)
            return
        self.forwarded += 1
        # A handle whose last placeholder was just closed is released first, as a
        # native close would have released it (a lock, say) before this call.
        if self.placeholders.by_inode:
            self.placeholders.reap(self._release)
        self._start(handler, call)

    def _start(self, handler: Handler, call: Trapped) -> None:
        call.start = time.perf_counter_ns()
        self._advance(call, handler(self, call), None)

    def _advance(
        self,
        call: Trapped,
        coro: Coroutine[SlaveCall, Reply, int | _Continue],
        sent: Reply | BaseException | None,
    ) -> None:
        """Run ``call``'s handler up to its next slave operation, or to its end."""
        while True:
            try:
                if isinstance(sent, BaseException):
                    step = coro.throw(sent)
                else:
                    step = coro.send(sent)  # type: ignore[arg-type]
            except StopIteration as stop:
                outcome: int | _Continue = stop.value
            except Errno as exc:
                outcome = -exc.errno
            except LinkClosed:
                outcome = -errno.EIO
            except Exception:  # noqa: BLE001 - a bug must not take the session down
                print(f"fsys-master: internal error in {call.syscall.name}:", file=sys.stderr)
                traceback.print_exc()
                outcome = -errno.EIO
            else:
                pairing = call.pairing
                if pairing.closed:
                    sent = Errno(errno.ESRCH)  # the caller died: no more work for it
                    continue
                try:
                    check_call(step.op, step.ints, step.blobs)
                except LocalProtocolError:
                    sent = Errno(errno.EINVAL)  # an argument the wire cannot carry
                    continue
                self.link.submit(
                    pairing.id, step.op, step.ints, step.blobs,
                    functools.partial(self._advance, call, coro), self._announce(pairing),
                )  # fmt: skip
                return
            self._answer(call, outcome, call.start)
            return

    def _answer(self, call: Trapped, outcome: int | _Continue, start: int) -> None:
        if not call.answered:
            if isinstance(outcome, _Continue):
                self.listener.continue_(call.notif.id)
            else:
                self.listener.reply(call.notif.id, outcome)
        if self.tracer is not None:
            micros = (time.perf_counter_ns() - start) // 1000 if start else 0
            self.tracer.line(call, outcome, micros)

    # --- placing paths ------------------------------------------------------------

    def _target(self, call: Trapped, arg: PathArg) -> Target:
        notif = call.notif
        pairing = call.pairing
        dirfd = AT_FDCWD if arg.dirfd is None else notif.arg_int(arg.dirfd)
        addr = notif.args[arg.path]
        flags = notif.arg_int(call.syscall.flags) if call.syscall.flags is not None else 0
        null = addr == 0 and bool(flags & AT_EMPTY_PATH or call.syscall.name == "utimensat")
        path = b"" if null else pairing.memory.read_cstring(addr)
        if path.startswith(b"/"):
            remote = not self.policy.is_local(normalize(path))
            return Target(remote, 0, path, path)
        if not path:
            if not (null or flags & AT_EMPTY_PATH):
                return Target(False, shown=path)  # the kernel answers ENOENT
            if dirfd == AT_FDCWD:  # the current directory itself
                if pairing.cwd_remote:
                    return Target(True, 0, pairing.cwd, b"", null)
                return Target(False, shown=path, null=null)
            rf = self.placeholders.lookup(notif.tid, dirfd)
            if rf is not None:
                return Target(True, rf.handle, b"", b"", null)
            return Target(False, shown=path, null=null)
        if dirfd == AT_FDCWD:
            if pairing.cwd_remote:
                if path in pairing.staged_names:
                    return Target(False, shown=path)  # an interpreter reading its wrapper
                # Relative to a slave directory: resolved by the slave, wherever it leads.
                joined = _join(pairing.cwd, path)
                if len(joined) >= MAX_PATH:
                    raise Errno(errno.ENAMETOOLONG)
                return Target(True, 0, joined, path)
            joined = _join(pairing.cwd, path)
            if self.policy.is_local(normalize(joined)):
                return Target(False, shown=path)
            if len(joined) >= MAX_PATH:
                raise Errno(errno.ENAMETOOLONG)
            return Target(True, 0, joined, path)
        rf = self.placeholders.lookup(notif.tid, dirfd)
        if rf is None:
            return Target(False, shown=path)  # relative to a master directory fd
        return Target(True, rf.handle, path, path)

    # --- pairings -----------------------------------------------------------------

    def pairing_for(self, tid: int) -> Pairing:
        pairing = self.by_tid.get(tid)
        if pairing is not None and not pairing.closed:
            return pairing
        pairing = self.pairings.get(tid)
        if pairing is not None and not pairing.closed:
            # A live process's own id: the caller is its leader (after an execve the
            # exec'ing thread takes that id), no need to ask /proc.
            pairing.tids.add(tid)
            self.by_tid[tid] = pairing
            return pairing
        try:
            tgid, ppid, umask = _proc_status(tid)
        except (OSError, ValueError) as exc:
            raise Errno(errno.ESRCH) from exc
        pairing = self.pairings.get(tgid)
        if pairing is None or pairing.closed:
            parent = self.pairings.get(ppid)
            if parent is not None and parent.closed:
                parent = None
            pairing = Pairing(
                id=self.processes + 1,
                tgid=tgid,
                parent=parent,
                cwd=b"",
                cwd_remote=True,
                umask=umask,
                memory=TargetMemory(tgid),
            )
            self.processes += 1
            state = self._inherited(tgid, ppid)
            pairing.cwd, pairing.cwd_remote, pairing.staged_cwd = state
            self.pairings[tgid] = pairing
            assert self._nursery is not None
            self._nursery.start_soon(self._watch_process, pairing)
        pairing.tids.add(tid)
        self.by_tid[tid] = pairing
        return pairing

    def _inherited(self, pid: int, ppid: int) -> Inherited:
        """What the new process ``pid`` took from its parent at fork.

        Its sealed record if there is one (and is for this process: a pid can be
        reused); else its parent's current state, the parent being a known process or,
        walking up, a process that made no trapped call yet (and so changed nothing).
        """
        own = pid
        for _ in range(64):
            record = self.births.pop(pid, None) if pid == own else self.births.get(pid)
            if record is not None and record[1] == _start_time(pid):
                return record[0]
            parent = self.pairings.get(ppid)
            if parent is not None and not parent.closed:
                return self.state_of(parent)
            if ppid <= 1:
                break
            try:
                pid, ppid = ppid, _proc_status(ppid)[1]
            except (OSError, ValueError):
                break
        return self.initial

    def forget_tid(self, tid: int) -> None:
        """``tid`` is exiting (a thread): its number may soon be another task's."""
        pairing = self.by_tid.pop(tid, None)
        if pairing is not None:
            pairing.tids.discard(tid)

    def state_of(self, pairing: Pairing) -> Inherited:
        """What ``pairing`` passes to a child now (a continued chdir settled first)."""
        if pairing.pending_cwd is not None:
            self.settle_cwd(pairing, pairing.pending_cwd.tid)
        return pairing.inheritable()

    def settle_cwd(self, pairing: Pairing, tid: int) -> None:
        """Read back a continued chdir into a master directory.

        The kernel's working directory changed: adopt it (as the kernel resolved it,
        symlinks and ``..`` included). Unchanged, as seen by the thread that called
        chdir: the kernel refused, restore the previous state. Unchanged as seen by
        another thread: the chdir may not have run yet; ask again later.
        """
        pending = pairing.pending_cwd
        assert pending is not None
        try:
            st = os.stat(f"/proc/{tid}/cwd")
            actual = os.fsencode(os.readlink(f"/proc/{tid}/cwd"))
        except OSError:
            return
        if (st.st_dev, st.st_ino) != pending.before:
            pairing.pending_cwd = None
            pairing.cwd, pairing.cwd_remote, pairing.staged_cwd = actual, False, False
        elif tid == pending.tid:
            pairing.pending_cwd = None
            pairing.cwd, pairing.cwd_remote, pairing.staged_cwd = pending.previous

    def _after_exec(self, pairing: Pairing) -> None:
        """The first call of the new image (from the leader): the other threads are
        gone, and an argv[0] that staging rewrote is put back."""
        pairing.exec_pending = False
        for tid in list(pairing.tids):
            if tid != pairing.tgid:
                self.forget_tid(tid)
        fix, pairing.argv0_fix = pairing.argv0_fix, None
        if fix is None:
            return
        address, old_arg_start = fix
        now = arg_start(pairing.tgid)
        try:
            if now != old_arg_start:  # a new image: its copy of argv[0]
                pairing.memory.write(now, b"/")
            else:  # the execve failed: the caller's own string
                pairing.memory.rewrite_byte(address, b"/")
        except Errno:
            pass

    def seal(self, pairing: Pairing) -> None:
        """Record, for each child of ``pairing`` not yet seen, the state it inherits.

        Called before the parent's state changes and when it exits: a child that
        exists now was forked before, with the current state.
        """
        state = self.state_of(pairing)
        task_dir = f"/proc/{pairing.tgid}/task"
        try:
            tasks = os.listdir(task_dir)
        except OSError:
            return
        for task in tasks:
            try:
                with open(f"{task_dir}/{task}/children") as f:
                    children = f.read().split()
            except OSError:
                continue
            for child in map(int, children):
                if child in self.pairings:
                    continue
                started = _start_time(child)
                known = self.births.get(child)
                if known is None or known[1] != started:  # new, or a reused pid
                    self.births[child] = (state, started)
        if len(self.births) > 4096:  # children that died before their first call
            self.births = {c: r for c, r in self.births.items() if _start_time(c) == r[1]}

    async def _watch_process(self, pairing: Pairing) -> None:
        try:
            pidfd = os.pidfd_open(pairing.tgid)
        except ProcessLookupError:
            pidfd = -1  # already gone
        except OSError:
            pidfd = -2  # cannot watch it (out of descriptors?): look now and then
        try:
            if pidfd >= 0:
                await trio.lowlevel.wait_readable(pidfd)
            elif pidfd == -2:
                while os.path.exists(f"/proc/{pairing.tgid}"):
                    await trio.sleep(0.5)
        finally:
            if pidfd >= 0:
                os.close(pidfd)
            pairing.closed = True
            pairing.memory.forget()
            for tid in pairing.tids:
                if self.by_tid.get(tid) is pairing:
                    del self.by_tid[tid]
            if self.pairings.get(pairing.tgid) is pairing:
                del self.pairings[pairing.tgid]
            if pairing.announced and self.link.alive:
                try:
                    self.link.send([ClosePairing(pairing.id)])
                except LinkClosed:
                    pass

    def _announce(self, pairing: Pairing) -> Callable[[Connection], list[Event]] | None:
        if pairing.announced:
            return None

        def prelude(conn: Connection) -> list[Event]:
            chain: list[Pairing] = []
            p: Pairing | None = pairing
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

    # --- talking to the slave -----------------------------------------------------

    def call(self, op: Op, ints: tuple[int, ...], blobs: tuple[bytes, ...] = ()) -> SlaveCall:
        """Perform ``op`` on the slave (await it); an errno reply raises Errno."""
        return SlaveCall(op, ints, blobs)

    def install(self, call: Trapped, handle: int, kind: int, *, cloexec: bool) -> int:
        """Give the program a placeholder for ``handle``; it is the call's answer."""
        try:
            app_end, remote = self.placeholders.create(handle, kind)
        except Errno:
            self.link.post(0, Op.CLOSE, (handle,))
            raise
        try:
            fd = self.listener.inject(call.notif.id, app_end.fileno(), cloexec=cloexec)
        finally:
            app_end.close()
        if fd < 0:
            self.placeholders.discard(remote)
            self._release(remote)
            if fd == -errno.ENOENT:
                call.answered = True  # the caller is gone: nobody to answer
            raise Errno(-fd)
        call.answered = True
        return fd

    def _release(self, remote: RemoteFile) -> None:
        self.link.post(0, Op.CLOSE, (remote.handle,))

    async def set_initial_cwd(self, cwd: str, *, staged: bool) -> None:
        """The program starts in ``cwd`` as the slave has it, else the slave's root.

        ``staged``: the launcher started it in the stage directory (see staging.py).
        """
        path = os.fsencode(cwd)
        if self.policy.is_local(normalize(path)):
            self.initial = Inherited(path, False, False)
            return
        reply = await self.link.call(0, Op.CHDIR, (0,), (path,))
        self.initial = Inherited(reply.blob if reply.result >= 0 else b"/", True, staged)
