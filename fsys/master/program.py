"""The program's life as a session sees it: its exit status, and the signals sent to
fsys-master that are passed on to it (both modes: trapped and the view)."""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

import trio

from fsys.master.launcher import Launched

if TYPE_CHECKING:
    from fsys.master.fmhub import Hub


def exit_status(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


async def wait_program(launched: Launched) -> int:
    await trio.lowlevel.wait_readable(launched.pidfd)
    _, status = os.waitpid(launched.pid, 0)
    return exit_status(status)


async def relay_signals(launched: Launched, hub: Hub | None) -> None:
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
