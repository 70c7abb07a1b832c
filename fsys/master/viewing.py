"""A session whose program runs in the view (``fsys-master run --view``).

Apart from the trapped mode's session (``fsys.master.session``), so that it loads
none of fmhub, its handlers or the syscall table: the view's start is the program's.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from fsys.errors import SESSION_FAILED, Interrupted, LinkClosed
from fsys.iostream import FdTransport
from fsys.master import census
from fsys.master.fuse import Opcode
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
                _answer_the_slave(link, launched.pid)
                nursery.start_soon(relay_signals, launched, None)
                nursery.start_soon(report_stalls, link, slave.name)
                status = await wait_program(launched)
                # POLLHUP: the last process under the filter (the program's) is gone.
                await trio.lowlevel.wait_readable(launched.listener)
                os.close(launched.listener)
                os.close(launched.pidfd)
            await view.settle()
            await link.goodbye()
            nursery.cancel_scope.cancel()
    view.close()
    if view.requests is not None:
        counts = sorted(view.requests.items(), key=lambda kv: -kv[1])
        print("fsys-master: view requests: " + ", ".join(
            f"{Opcode(op).name if op in Opcode._value2member_map_ else op} {n}"
            for op, n in counts), file=sys.stderr)  # fmt: skip
    os.close(fuse_fd)
    transport.close()
    if view.failure is not None:
        print(f"fsys-master: {view.failure}", file=sys.stderr)
    return SESSION_FAILED if link.failure is not None else status


def _answer_the_slave(link: SlaveLink, program: int) -> None:
    """CENSUS and SIGNAL from the slave (``fsys-slave ps``, ``kill``): about the
    program and what descends from it, nothing else."""
    procfs = ProcFS()

    def members() -> set[int]:
        return census.tree([program], procfs.children)

    def deliver(signum: int, pid: int) -> None:
        census.signal_member(pid or program, signum, members)

    link.on_census = lambda: census.describe(members())
    link.on_signal = deliver


def run_view(plan: ViewPlan) -> int:
    """Serve a session whose program runs in the view; its exit status, or SESSION_FAILED."""
    return trio.run(_view_session, plan)
