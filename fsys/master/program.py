"""The program's life as a session sees it (both modes: trapped and the view): the
wait for the slave to start, the program's exit status, and the signals sent to
fsys-master that are passed on to it."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING

import trio

from fsys.errors import Interrupted, LinkClosed
from fsys.master.launcher import Launched
from fsys.master.link import SlaveLink
from fsys.protocol import Stopped

if TYPE_CHECKING:
    from fsys.master.cli import Slave
    from fsys.master.fmhub import Hub

#: How long fsys-master waits for the slave's HELLO before it says that it waits
#: (FSYS_SLAVE_PATIENCE, seconds).
PATIENCE = 5.0
_ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def say_slave_did_not_start(link: SlaveLink, slave: Slave) -> None:
    """Why the slave gave no HELLO, with a hint at the usual causes."""
    ended = slave.describe_exit()
    with trio.move_on_after(0.5):  # its socket closes just before it exits
        while not ended:
            await trio.sleep(0.01)
            ended = slave.describe_exit()
    reason = link.failure or "no handshake"
    hint = ""
    if ended == "exited with status 127":
        hint = ("; is the slave's command on the PATH of the shell that runs it (over ssh: "
                "the remote non-interactive shell's)?")  # fmt: skip
    elif "first frame is not HELLO" in reason:
        hint = ("; something wrote to the slave's standard output before fsys-slave started "
                "(a shell start-up file, a banner, `ssh -t`?)")  # fmt: skip
    elif "protocol error" in reason:
        hint = "; the slave's command must end in `fsys-slave serve --stdio`"
    print(f"fsys-master: the slave did not start: {reason}"
          + (f" (slave {ended})" if ended else "") + hint, file=sys.stderr)  # fmt: skip


def _patience() -> float:
    try:
        return max(0.05, float(os.environ.get("FSYS_SLAVE_PATIENCE", PATIENCE)))
    except ValueError:
        return PATIENCE


async def report_stalls(link: SlaveLink, slave: str) -> None:
    """While the session runs: a call the slave has not answered for PATIENCE seconds
    is reported once (what it is, since when); so is the answer that ends the wait."""
    patience = _patience()
    reported: tuple[int, float] | None = None  # (request, when sent)
    while link.alive:
        await trio.sleep(patience / 4)
        oldest = link.oldest()
        if reported is not None and (oldest is None or oldest[0] != reported[0]):
            waited = time.monotonic() - reported[1]
            print(f"fsys-master: the slave answered after {waited:.1f} s", file=sys.stderr)
            reported = None
        if oldest is not None and reported is None:
            request, when, what = oldest
            if time.monotonic() - when >= patience:
                print(f"fsys-master: the slave ({slave}) has not answered {what.upper()} for "
                      f"{time.monotonic() - when:.1f} s; waiting", file=sys.stderr)  # fmt: skip
                reported = (request, when)


async def wait_for_slave(link: SlaveLink, features: int, slave: str) -> None:
    """The handshake, as the user sees it: after PATIENCE seconds without the slave's
    HELLO, a line says what fsys-master waits for; Ctrl-C, SIGTERM or SIGHUP meanwhile
    end the wait (Interrupted). LinkClosed if the slave went away instead."""
    patience = _patience()
    got = 0
    closed: LinkClosed | None = None
    with trio.open_signal_receiver(*_ENDING) as signals:
        async with trio.open_nursery() as nursery:

            async def ended() -> None:
                nonlocal got
                async for signum in signals:
                    got = signum
                    nursery.cancel_scope.cancel()
                    return

            async def say() -> None:
                await trio.sleep(patience)
                print(f"fsys-master: waiting for the slave to answer ({slave}); "
                      "Ctrl-C gives up", file=sys.stderr)  # fmt: skip

            nursery.start_soon(ended)
            nursery.start_soon(say)
            try:
                await link.handshake(features)
            except LinkClosed as exc:
                closed = exc  # raised below, not as a group
            nursery.cancel_scope.cancel()
    if got:
        raise Interrupted(got)
    if closed is not None:
        raise closed


def exit_status(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


async def wait_program(launched: Launched) -> int:
    while True:
        await trio.lowlevel.wait_readable(launched.pidfd)
        pid, status = os.waitpid(launched.pid, os.WNOHANG)  # (a wake-up may be stale)
        if pid:
            return exit_status(status)


async def report_stops(launched: Launched, link: SlaveLink) -> None:
    """With the slave's terminal: when the program stops (Ctrl-Z), the slave is told
    (STOPPED), so that it stops too and its shell gets the terminal back."""
    flags = os.WSTOPPED | os.WNOHANG
    with trio.open_signal_receiver(signal.SIGCHLD) as signals:
        async for _ in signals:
            try:
                info = os.waitid(os.P_PID, launched.pid, flags)
            except ChildProcessError:
                return
            if info is not None and info.si_code == os.CLD_STOPPED:
                try:
                    link.send([Stopped(info.si_status)])
                except LinkClosed:
                    return


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
