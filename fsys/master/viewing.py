"""A session whose program runs in the view (``fsys-master run --view``).

Apart from the trapped mode's session (``fsys.master.session``), so that it loads
none of fmhub, its handlers or the syscall table: the view's start is the program's.
"""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from fsys.errors import SESSION_FAILED, Interrupted, LinkClosed
from fsys.iostream import FdTransport
from fsys.master import census, keeping
from fsys.master.finding import LaunchError
from fsys.master.fuse import Opcode
from fsys.master.launcher import (
    MOUNTED,
    Forked,
    Launched,
    Mount,
    Program,
    fork_holder,
    fork_in_view,
    fork_view,
    take_listener,
    view_failure,
)
from fsys.master.link import SlaveLink
from fsys.master.processes import ProcFS
from fsys.master.program import (
    relay_signals,
    report_stalls,
    say_slave_did_not_start,
    wait_for_slave,
    wait_program,
)
from fsys.master.staging import Stage
from fsys.master.view import Points, View
from fsys.protocol import FEATURE_WATCH

if TYPE_CHECKING:
    from fsys.master.cli import Slave


@dataclass(frozen=True)
class ViewPlan:
    """``fsys-master run --view``: the program is started by the session itself, once
    the view is served (its mounts look names up in it)."""

    path: str
    argv: list[str]
    env: dict[str, str]
    slave: Slave
    fuse_fd: int  # /dev/fuse, open (the session closes it)
    points: Points
    mounts: list[Mount]
    stage: Stage
    cwd: bytes
    nofile: tuple[int, int] | None = None
    cache: bool = True  # ask the slave to watch (else the kernel keeps nothing)


async def _reported(forked: Forked, view: View | None, nursery: trio.Nursery | None) -> None:
    """Until ``forked`` closes its report: serve ``view`` once it says MOUNTED (if it
    mounts it); LaunchError with what it reported if it failed instead."""
    message, mounted = b"", view is None
    os.set_blocking(forked.report, False)  # (a wake-up may be another fd's: see closing)
    while True:
        await trio.lowlevel.wait_readable(forked.report)
        try:
            chunk = os.read(forked.report, 256)
        except BlockingIOError:
            continue
        if not chunk:
            break
        if not mounted and chunk.startswith(MOUNTED):
            assert view is not None and nursery is not None
            mounted = True
            await nursery.start(view.serve)
            chunk = chunk[len(MOUNTED) :]
        message += chunk
    if message:
        os.waitpid(forked.pid, 0)
        raise LaunchError(view_failure(message), SESSION_FAILED)


async def _start_in_view(plan: ViewPlan, view: View, nursery: trio.Nursery) -> Launched:
    """Fork the program into the view, serve the view once it is mounted, and let the
    program exec once its filter is in place."""
    root = plan.stage.base + b"/view"
    os.makedirs(root, exist_ok=True)
    program = Program(plan.path, plan.argv, plan.env, plan.cwd, plan.nofile)
    forked = fork_view(program, fuse_fd=view.fd, root=root, mounts=plan.mounts)
    return await _started(forked, view, nursery)


async def _started(forked: Forked, view: View | None, nursery: trio.Nursery | None) -> Launched:
    try:
        await _reported(forked, view, nursery)
        launched = take_listener(forked.pid)
        os.write(forked.go, b"x")
        return launched
    finally:
        closing(forked.report)
        os.close(forked.go)


async def _program_gone(launched: Launched) -> int:
    """The program's exit status, once every process it started is gone too (POLLHUP
    on the listener: the last process under the filter has exited)."""
    status = await wait_program(launched)
    await trio.lowlevel.wait_readable(launched.listener)
    return status


def _release(launched: Launched) -> None:
    closing(launched.listener)
    closing(launched.pidfd)


def closing(fd: int) -> None:
    """Close ``fd``, which trio may have waited on. The children forked meanwhile hold
    copies of it until they exec: trio must forget it first, or its epoll keeps
    reporting the old file's events under the number a new fd then takes."""
    trio.lowlevel.notify_closing(fd)
    os.close(fd)


async def _view_session(plan: ViewPlan) -> int:
    slave = plan.slave
    transport = FdTransport(*slave.take_fds())
    link = SlaveLink(transport)
    fuse_fd = plan.fuse_fd
    view = View(fuse_fd, link, plan.points)
    view.read_ahead = plan.cache
    status = SESSION_FAILED
    async with trio.open_nursery() as nursery:
        await nursery.start(link.serve)
        try:
            await wait_for_slave(link, FEATURE_WATCH if plan.cache else 0, slave.name)
        except Interrupted as exc:
            nursery.cancel_scope.cancel()
            view.close()
            os.close(fuse_fd)
            transport.close()
            return slave.give_up(exc.signum)
        except LinkClosed:
            await say_slave_did_not_start(link, slave)
            nursery.cancel_scope.cancel()
        else:
            try:
                launched = await _start_in_view(plan, view, nursery)
            except LaunchError as exc:
                print(f"fsys-master: {exc}", file=sys.stderr)
                if link.failure is not None:  # why the view could not be set up
                    print(f"fsys-master: {link.failure}", file=sys.stderr)
                status = exc.status
            else:
                _answer_the_slave(link, lambda: (launched.pid,))
                nursery.start_soon(relay_signals, launched, None)
                nursery.start_soon(report_stalls, link, slave.name)
                try:
                    status = await _program_gone(launched)
                finally:
                    _release(launched)
            await view.settle()
            await link.goodbye()
            nursery.cancel_scope.cancel()
    view.close()
    if view.requests is not None:
        counts = sorted(view.requests.items(), key=lambda kv: -kv[1])
        print("fsys-master: view requests (how many, ms until answered): " + ", ".join(
            f"{Opcode(op).name if op in Opcode._value2member_map_ else op} {n}"
            f" {view.spent.get(op, 0.0) * 1e3:.0f}"
            for op, n in counts), file=sys.stderr)  # fmt: skip
        asked = sorted(view.asked.items(), key=lambda kv: -kv[1])
        print("fsys-master: view waited for: " + ", ".join(f"{name} {n}" for name, n in asked)
              + f"; notices {view.notifier.sent}", file=sys.stderr)  # fmt: skip
    os.close(fuse_fd)
    transport.close()
    if view.failure is not None:
        print(f"fsys-master: {view.failure}", file=sys.stderr)
    return SESSION_FAILED if link.failure is not None else status


def _answer_the_slave(link: SlaveLink, programs: Callable[[], Collection[int]]) -> None:
    """CENSUS and SIGNAL from the slave (``fsys-slave ps``, ``kill``): about the
    programs and what descends from them, nothing else (``kill SESSION``: the first)."""
    procfs = ProcFS()

    def members() -> set[int]:
        return census.tree(programs(), procfs.children)

    def deliver(signum: int, pid: int) -> None:
        if pid or programs():
            census.signal_member(pid or min(programs()), signum, members)

    link.on_census = lambda: census.describe(members())
    link.on_signal = deliver


def run_view(plan: ViewPlan) -> int:
    """Serve a session whose program runs in the view; its exit status, or SESSION_FAILED."""
    return trio.run(_view_session, plan)


# --- kept sessions (fsys-master run --view --keep: fsys.master.keeping) ---------------


@dataclass(frozen=True)
class KeptPlan:
    """A kept session: the view's link and mounts, held until ``keep`` seconds after
    its last program, with programs asked for on ``control`` (listening)."""

    slave: Slave
    fuse_fd: int  # /dev/fuse, open (the session closes it)
    points: Points
    mounts: list[Mount]
    stage: Stage
    control: socket.socket
    place: keeping.Place
    ready: int  # written READY once programs can be asked for
    keep: float
    cache: bool = True


async def _hold_view(plan: KeptPlan, view: View, nursery: trio.Nursery, root: bytes) -> int:
    """The view mounted in a namespace of its own, served; an fd of that namespace."""
    forked = fork_holder(fuse_fd=view.fd, root=root, mounts=plan.mounts)
    try:
        await _reported(forked, view, nursery)
        return os.open(f"/proc/{forked.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        closing(forked.report)
        os.close(forked.go)  # the holder exits: the fd holds the namespace
        with contextlib.suppress(ChildProcessError):
            os.waitpid(forked.pid, 0)


#: How long a kept session waits for the command that started it, at least.
FIRST_CLIENT = 10.0


class _Kept:
    """The kept session's programs, asked for by clients on the control socket."""

    def __init__(self, plan: KeptPlan, view: View, namespace: int, root: bytes) -> None:
        self.plan = plan
        self.view = view
        self.namespace = namespace
        self.root = root
        self.programs: dict[int, Launched] = {}  # by pid: those whose processes run
        self.clients = 0
        self.served = False  # a client has come
        self._changed = trio.Event()
        # The socket's file, to remove only ours (not one a later session bound there).
        self._bound = os.stat(plan.place.socket).st_ino

    def _count(self, change: int) -> None:
        self.clients += change
        self.served = True
        self._changed.set()

    async def serve(self, link: SlaveLink) -> None:
        """Until ``keep`` seconds pass with no client, the slave goes, or SIGTERM."""
        control = trio.socket.from_stdlib_socket(self.plan.control)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def accept() -> None:
                    while True:
                        conn, _ = await control.accept()
                        nursery.start_soon(self._client, conn)

                async def ending() -> None:
                    async for signum in signals:
                        print(f"fsys-master: kept session: signal {signum}: ending",
                              file=sys.stderr)  # fmt: skip
                        self._signal_all(signal.SIGTERM)
                        return

                async def slave_gone() -> None:
                    while link.alive:
                        await trio.sleep(0.1)
                    print(f"fsys-master: kept session: {link.failure or 'the slave went'}",
                          file=sys.stderr)  # fmt: skip
                    self._signal_all(signal.SIGKILL)

                async with trio.open_nursery() as watch:
                    watch.start_soon(accept)
                    watch.start_soon(_first_of, watch, ending)
                    watch.start_soon(_first_of, watch, slave_gone)
                    watch.start_soon(_first_of, watch, self._idle)
                # Ending: no new client is served (those waiting are told to retry, and
                # start another session), those being served are awaited.
                self._unlisten(control)
                with trio.move_on_after(10):
                    while self.clients:
                        await trio.sleep(0.01)
                self._signal_all(signal.SIGKILL)
                nursery.cancel_scope.cancel()

    async def _idle(self) -> None:
        """Returns once no client has been served for ``keep`` seconds (counted from
        the first: the command that started the session connects after it listens)."""
        with trio.move_on_after(max(self.plan.keep, FIRST_CLIENT)):
            while not self.served:
                await self._changed.wait()
                self._changed = trio.Event()
        while True:
            changed = self._changed = trio.Event()
            if self.clients:
                await changed.wait()
                continue
            with trio.move_on_after(self.plan.keep) as scope:
                await changed.wait()
            if scope.cancelled_caught:
                return

    def _unlisten(self, control: trio.socket.SocketType) -> None:
        """Remove the socket (if it is still this session's) and answer RETRY to the
        clients that connected before it was gone."""
        path = self.plan.place.socket
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == self._bound:
                path.unlink()
        plain = self.plan.control
        plain.setblocking(False)
        while True:
            try:
                conn, _ = plain.accept()
            except OSError:
                break
            with conn, contextlib.suppress(OSError):
                conn.send(keeping.status_frame(keeping.RETRY))
        plain.close()

    def _signal_all(self, signum: int) -> None:
        for pid in self.programs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signum)

    async def _client(self, conn: trio.socket.SocketType) -> None:
        self._count(+1)
        try:
            with conn:
                await self._run(conn)
        except OSError as exc:
            print(f"fsys-master: kept session: a client: {exc}", file=sys.stderr)
        finally:
            self._count(-1)

    async def _run(self, conn: trio.socket.SocketType) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, keeping.CREDS.size)
        _, uid, _ = keeping.CREDS.unpack(creds)
        if uid not in (os.getuid(), 0):
            print(f"fsys-master: kept session: refused a client of uid {uid}", file=sys.stderr)
            return
        fds: list[int] = []
        try:
            data, ancillary, _, _ = await conn.recvmsg(
                1 << 16, socket.CMSG_SPACE(3 * _FD.itemsize), socket.MSG_CMSG_CLOEXEC
            )
            if not data and not ancillary:
                return  # fsys-master kept: it asked only who listens
            for level, kind, raw in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds.extend(array.array("i", raw[: len(raw) - len(raw) % _FD.itemsize]))
            while True:
                missing, request = keeping.take_request(data, fds)
                if request is not None:
                    break
                more = await conn.recv(min(missing, 1 << 20))
                if not more:
                    raise ValueError("the client went away")
                data += more
            await self._start(conn, request, fds)
        except ValueError as exc:
            print(f"fsys-master: kept session: a client's request refused: {exc}",
                  file=sys.stderr)  # fmt: skip
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    async def _start(self, conn: trio.socket.SocketType, request: keeping.Request,
                     fds: list[int]) -> None:  # fmt: skip
        program = Program(request.path, request.argv, request.env, os.fsencode(request.cwd),
                          request.nofile, (fds[0], fds[1], fds[2]), request.umask,
                          group=True)  # fmt: skip
        try:
            launched = await _started(fork_in_view(program, namespace=self.namespace,
                                                   root=self.root), None, None)  # fmt: skip
        except LaunchError as exc:
            with contextlib.suppress(OSError):
                os.write(fds[2], f"fsys-master: {exc}\n".encode())
            await conn.send(keeping.status_frame(exc.status))
            return
        for fd in fds:
            os.close(fd)  # the program has them: ours would keep its pipes open
        fds.clear()
        pid = launched.pid
        self.programs[pid] = launched
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._relay, conn, pid)
                status = await _program_gone(launched)
                nursery.cancel_scope.cancel()
        finally:
            del self.programs[pid]
            _release(launched)
        await self.view.settle()  # its writes are on the slave when its command returns
        await conn.send(keeping.status_frame(status))

    async def _relay(self, conn: trio.socket.SocketType, pid: int) -> None:
        """The client's signals to the program's group; a client gone (killed) kills it,
        as fsys-master's end kills a program it runs itself."""
        rest = b""
        while True:
            data = await conn.recv(256)
            if not data:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                return
            numbers, rest = keeping.signal_numbers(rest + data)
            for signum in numbers:
                if 0 < signum < signal.NSIG:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signum)


_FD = array.array("i")


async def _first_of(nursery: trio.Nursery, task: Callable[[], Awaitable[None]]) -> None:
    """Run ``task``; once it returns, end the others of ``nursery``."""
    await task()
    nursery.cancel_scope.cancel()


async def _kept_session(plan: KeptPlan) -> int:
    slave = plan.slave
    transport = FdTransport(*slave.take_fds())
    link = SlaveLink(transport)
    view = View(plan.fuse_fd, link, plan.points)
    view.read_ahead = plan.cache
    status = SESSION_FAILED
    root = plan.stage.base + b"/view"
    os.makedirs(root, exist_ok=True)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(link.serve)
            try:
                await wait_for_slave(link, FEATURE_WATCH if plan.cache else 0, slave.name)
                namespace = await _hold_view(plan, view, nursery, root)
            except LinkClosed:
                await say_slave_did_not_start(link, slave)
                nursery.cancel_scope.cancel()
            except (Interrupted, LaunchError) as exc:
                why = f"signal {exc.signum}" if isinstance(exc, Interrupted) else str(exc)
                print(f"fsys-master: the kept session did not start: {why}", file=sys.stderr)
                if link.failure is not None:
                    print(f"fsys-master: {link.failure}", file=sys.stderr)
                nursery.cancel_scope.cancel()
            else:
                kept = _Kept(plan, view, namespace, root)
                _answer_the_slave(link, lambda: tuple(kept.programs))
                nursery.start_soon(report_stalls, link, slave.name)
                os.write(plan.ready, keeping.READY)
                os.close(plan.ready)
                await kept.serve(link)
                status = 0
                await view.settle()
                await link.goodbye()
                nursery.cancel_scope.cancel()
                os.close(namespace)
    finally:
        view.close()
        os.close(plan.fuse_fd)
        transport.close()
    if view.failure is not None:
        print(f"fsys-master: {view.failure}", file=sys.stderr)
    return SESSION_FAILED if link.failure is not None else status


def run_kept(plan: KeptPlan) -> int:
    """Serve a kept session until it ends; 0, or SESSION_FAILED."""
    return trio.run(_kept_session, plan)
