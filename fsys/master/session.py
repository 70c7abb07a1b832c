"""The session: the hubs and the program's life, on trio (``fsys-master run``).

Separate from the CLI so that ``fsys-master`` can start a slave command before it
loads trio: the two start-ups then overlap.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

import trio

from fsys.errors import SESSION_FAILED, LinkClosed
from fsys.iostream import FdTransport
from fsys.kmod.table import load
from fsys.master.cache import AttrCache
from fsys.master.calls import HANDLERS
from fsys.master.device import Listener
from fsys.master.fmhub import DEFAULT_SPIN_US, Hub
from fsys.master.launcher import (
    MOUNTED,
    Launched,
    LaunchError,
    Mount,
    fork_view,
    take_listener,
    view_failure,
)
from fsys.master.link import SlaveLink
from fsys.master.policy import Policy
from fsys.master.staging import Stage
from fsys.master.trace import Tracer
from fsys.master.view import Points, View
from fsys.protocol import FEATURE_WATCH

if TYPE_CHECKING:
    from fsys.master.cli import Slave


def _exit_status(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


async def _wait_program(launched: Launched) -> int:
    await trio.lowlevel.wait_readable(launched.pidfd)
    _, status = os.waitpid(launched.pid, 0)
    return _exit_status(status)


async def _relay_signals(launched: Launched, hub: Hub | None) -> None:
    """SIGTERM and SIGHUP sent to fsys-master go to the program's processes: the
    program itself (through its pidfd: never another process that got its pid), and
    the processes it started that are still running (those fmhub knows: in the view,
    none; the program's own handling passes them on, as a shell's does)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            try:
                signal.pidfd_send_signal(launched.pidfd, signum)
            except ProcessLookupError:
                pass
            for process in hub.processes if hub is not None else ():
                if process.tgid == launched.pid or process.signal_nowait(signum):
                    continue  # queued: delivered through its own pidfd
                try:  # its task has not started yet, or it has no pidfd
                    os.kill(process.tgid, signum)
                except ProcessLookupError:
                    pass


def _spin_us() -> float:
    """FSYS_SPIN_US: how long fmhub spins for a reply (docs/design.md), in µs."""
    try:
        return max(0.0, float(os.environ.get("FSYS_SPIN_US", DEFAULT_SPIN_US)))
    except ValueError:
        return DEFAULT_SPIN_US


@dataclass(frozen=True)
class Plan:
    """Everything ``fsys-master run`` prepared before the session starts."""

    launched: Launched  # the program, waiting in its first execve
    slave: Slave
    policy: Policy
    trace: TextIO | None
    trace_all: bool
    stage: Stage
    staged: bool  # the program starts in the stage directory (staging.py)
    cache: bool = True  # keep the slave's watched answers (fsys.master.cache)


async def _session(plan: Plan) -> int:
    launched, slave = plan.launched, plan.slave
    fd = slave.socket.detach()
    transport = FdTransport(fd, fd)
    link = SlaveLink(transport)
    listener = Listener(launched.listener)
    if os.environ.get("FSYS_SYNC_WAKE", "1") != "0":
        # fmhub woken on the trapping task's CPU: with the attribute cache most
        # answers are fmhub's own, and this halves their cost here (performance.md).
        listener.set_sync_wake_up()
    tracer = Tracer(plan.trace, all=plan.trace_all) if plan.trace is not None else None
    cache = AttrCache() if plan.cache else None
    hub = Hub(listener=listener, link=link, policy=plan.policy, table=load(),
              handlers=HANDLERS, tracer=tracer, stage=plan.stage, cache=cache,
              spin_us=_spin_us())  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(link.serve)
        try:
            await link.handshake(FEATURE_WATCH if cache is not None else 0)
            await hub.set_initial_cwd(os.getcwd(), staged=plan.staged)
        except LinkClosed:
            os.kill(launched.pid, signal.SIGKILL)
            os.waitpid(launched.pid, 0)
            ended = slave.describe_exit()
            reason = link.failure or "no handshake"
            print(f"fsys-master: the slave did not start: {reason}"
                  + (f" (slave {ended})" if ended else ""), file=sys.stderr)  # fmt: skip
            nursery.cancel_scope.cancel()
            hub.close()
            listener.close()
            transport.close()
            return SESSION_FAILED

        async def report_failure() -> None:
            await link.wait_closed()
            if link.failure is not None:
                ended = slave.describe_exit()
                print(f"fsys-master: {link.failure}" + (f" (slave {ended})" if ended else "")
                      + "; remote calls now fail with EIO", file=sys.stderr)  # fmt: skip

        nursery.start_soon(report_failure)
        nursery.start_soon(_relay_signals, launched, hub)
        hub_done = trio.Event()

        async def serve_hub() -> None:
            try:
                await hub.serve()
            finally:
                hub_done.set()

        nursery.start_soon(serve_hub)
        status = await _wait_program(launched)
        await hub_done.wait()  # until every process under the filter is gone
        await link.goodbye()
        nursery.cancel_scope.cancel()
    if tracer is not None:
        tracer.summary(hub.statistics())
    hub.close()
    listener.close()
    transport.close()
    return SESSION_FAILED if link.failure is not None else status


def run(plan: Plan) -> int:
    """Serve the session to its end; the program's exit status, or SESSION_FAILED."""
    return trio.run(_session, plan)


# --- the view (fsys.master.view) ------------------------------------------------------------


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


async def _start_in_view(plan: ViewPlan, view: View, nursery: trio.Nursery) -> Launched:
    """Fork the program into the view, serve the view once it is mounted, and let the
    program exec once its filter is in place."""
    root = plan.stage.base + b"/view"
    os.makedirs(root, exist_ok=True)
    forked = fork_view(plan.path, plan.argv, plan.env, fuse_fd=view.fd, root=root,
                       mounts=plan.mounts, cwd=plan.cwd, nofile=plan.nofile)  # fmt: skip
    try:
        message, mounted = b"", False
        while True:
            await trio.lowlevel.wait_readable(forked.report)
            chunk = os.read(forked.report, 256)
            if not chunk:
                break
            if not mounted and chunk.startswith(MOUNTED):
                mounted = True
                await nursery.start(view.serve)
                chunk = chunk[len(MOUNTED) :]
            message += chunk
        if message:
            os.waitpid(forked.pid, 0)
            raise LaunchError(view_failure(message), SESSION_FAILED)
        launched = take_listener(forked.pid)
        os.write(forked.go, b"x")
        return launched
    finally:
        os.close(forked.report)
        os.close(forked.go)


async def _view_session(plan: ViewPlan) -> int:
    slave = plan.slave
    fd = slave.socket.detach()
    transport = FdTransport(fd, fd)
    link = SlaveLink(transport)
    fuse_fd = plan.fuse_fd
    view = View(fuse_fd, link, plan.points)
    view.read_ahead = plan.cache
    status = SESSION_FAILED
    async with trio.open_nursery() as nursery:
        await nursery.start(link.serve)
        try:
            await link.handshake(FEATURE_WATCH if plan.cache else 0)
        except LinkClosed:
            ended = slave.describe_exit()
            print(f"fsys-master: the slave did not start: {link.failure or 'no handshake'}"
                  + (f" (slave {ended})" if ended else ""), file=sys.stderr)  # fmt: skip
            nursery.cancel_scope.cancel()
        else:
            try:
                launched = await _start_in_view(plan, view, nursery)
            except LaunchError as exc:
                print(f"fsys-master: {exc}", file=sys.stderr)
                status = exc.status
            else:
                nursery.start_soon(_relay_signals, launched, None)
                status = await _wait_program(launched)
                # POLLHUP: the last process under the filter (the program's) is gone.
                await trio.lowlevel.wait_readable(launched.listener)
                os.close(launched.listener)
                os.close(launched.pidfd)
            await view.settle()
            await link.goodbye()
            nursery.cancel_scope.cancel()
    view.close()
    if os.environ.get("FSYS_VIEW_STATS"):
        from fsys.master.fuse import Opcode

        counts = sorted(view.requests.items(), key=lambda kv: -kv[1])
        print("fsys-master: view requests: " + ", ".join(
            f"{Opcode(op).name if op in Opcode._value2member_map_ else op} {n}"
            for op, n in counts), file=sys.stderr)  # fmt: skip
    os.close(fuse_fd)
    transport.close()
    if view.failure is not None:
        print(f"fsys-master: {view.failure}", file=sys.stderr)
    return SESSION_FAILED if link.failure is not None else status


def run_view(plan: ViewPlan) -> int:
    """Serve a session whose program runs in the view; its exit status, or SESSION_FAILED."""
    return trio.run(_view_session, plan)
