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

from fsys.errors import SESSION_FAILED, Interrupted, LinkClosed
from fsys.iostream import FdTransport
from fsys.kmod.table import load
from fsys.master.cache import AttrCache
from fsys.master.calls import HANDLERS
from fsys.master.device import Listener
from fsys.master.fmhub import DEFAULT_SPIN_US, Hub
from fsys.master.launcher import Launched
from fsys.master.link import SlaveLink
from fsys.master.net import SOCKET_HANDLERS, Network
from fsys.master.policy import Policy
from fsys.master.program import (
    relay_signals,
    report_stalls,
    report_stops,
    say_slave_did_not_start,
    wait_for_slave,
    wait_program,
)
from fsys.master.staging import Stage
from fsys.master.trace import Tracer
from fsys.protocol import FEATURE_NET, FEATURE_STDIO, FEATURE_WATCH

if TYPE_CHECKING:
    from fsys.master.cli import Slave


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
    network: bool = True  # the program's sockets are the slave's (fsys.master.net)


async def _session(plan: Plan) -> int:
    launched, slave = plan.launched, plan.slave
    transport = FdTransport(*slave.take_fds())
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
            await wait_for_slave(link, FEATURE_WATCH if cache is not None else 0, slave.name)
            await hub.set_initial_cwd(os.getcwd(), staged=plan.staged)
        except Interrupted as exc:
            os.kill(launched.pid, signal.SIGKILL)
            os.waitpid(launched.pid, 0)
            nursery.cancel_scope.cancel()
            hub.close()
            listener.close()
            transport.close()
            return slave.give_up(exc.signum)
        except LinkClosed:
            os.kill(launched.pid, signal.SIGKILL)
            os.waitpid(launched.pid, 0)
            await say_slave_did_not_start(link, slave)
            nursery.cancel_scope.cancel()
            hub.close()
            listener.close()
            transport.close()
            return SESSION_FAILED

        if plan.network and link.peer is not None and link.peer.features & FEATURE_NET:
            hub.net = Network(hub, nursery)
            hub.router.socket_handlers = SOCKET_HANDLERS
        streams = []
        hub.program_pid = launched.pid  # what a relayed signal goes to, without a terminal
        if link.peer is not None and link.peer.features & FEATURE_STDIO:
            streams = await hub.lend_stdio(launched.pid)
            for stream in streams:
                nursery.start_soon(stream.pump_in)
                nursery.start_soon(stream.pump_out)
            if hub.router.terminal is not None:
                nursery.start_soon(report_stops, launched, link)

        async def report_failure() -> None:
            await link.wait_closed()
            if link.failure is not None:
                ended = slave.describe_exit()
                print(f"fsys-master: {link.failure}" + (f" (slave {ended})" if ended else "")
                      + "; remote calls now fail with EIO", file=sys.stderr)  # fmt: skip

        nursery.start_soon(report_failure)
        nursery.start_soon(relay_signals, launched, hub)
        nursery.start_soon(report_stalls, link, slave.name)
        hub_done = trio.Event()

        async def serve_hub() -> None:
            try:
                await hub.serve()
            finally:
                hub_done.set()

        nursery.start_soon(serve_hub)
        status = await wait_program(launched)
        await hub_done.wait()  # until every process under the filter is gone
        for stream in streams:
            await stream.drain()  # what the program wrote reaches the slave's terminal
        if hub.net is not None:
            await hub.net.drain()  # and what it wrote into its sockets, their peers
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
