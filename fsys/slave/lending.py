"""``fsys-slave run``: a session whose program uses this side's terminal.

Theory of operation (the seed's nexec role). fsys-slave starts CMD, normally
``fsys-master run --stdio -- PROGRAM`` (perhaps behind ``ssh HOST``), with one end
of a socketpair as CMD's standard input and output, and serves the session on the
other end. It keeps copies of its own fds 0, 1 and 2 and lends them (LEND): the
program on the master gets them as its own fds 0, 1 and 2, so it reads keys from,
and draws on, this terminal, and its terminal ioctls act on it (TTY).

CMD runs in a process group of its own, so the terminal's signals reach fsys-slave
only; it relays them (SIGNAL) to the program's foreground process group on the
master: Ctrl-C, Ctrl-\\, a resize (SIGWINCH), SIGTERM, SIGHUP, Ctrl-Z (SIGTSTP),
SIGCONT. When the program stops (Ctrl-Z), the master says so (STOPPED) and
fsys-slave stops itself, putting the terminal back as it found it: the shell it was
started from gets the terminal; ``fg`` continues fsys-slave, which gives the
program its terminal modes back and relays SIGCONT.

Whatever way the session ends, the terminal's modes are put back as they were, and
the exit status is CMD's (128+N if signal N ended it).
"""

from __future__ import annotations

import fcntl
import os
import shlex
import signal
import socket
import subprocess
import sys
import termios

import trio

from fsys.errors import LinkClosed, RemoteProtocolError
from fsys.iostream import FdTransport
from fsys.slave.confinement import Confinement, drop_privileges
from fsys.slave.executor import Executor
from fsys.slave.fshub import SlaveSession

#: The signals fsys-slave passes on to the program.
RELAYED = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH,
           signal.SIGTSTP, signal.SIGCONT, signal.SIGUSR1, signal.SIGUSR2)  # fmt: skip
#: Before the session is open (or after it ended) these end fsys-slave and CMD.
_ENDING = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)
TermAttrs = list[int | list[bytes | int]]


def _lent_streams() -> dict[int, int]:
    """Close-on-exec copies of fds 0, 1, 2 (those that are open)."""
    lent: dict[int, int] = {}
    for fd in (0, 1, 2):
        try:
            lent[fd] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        except OSError:
            continue
    return lent


class Terminal:
    """The terminal fsys-slave lends, if any of its streams is one: its modes as
    found (put back at the end, and while stopped), and the program's while stopped."""

    def __init__(self, lent: dict[int, int]) -> None:
        self.fd = next((fd for fd in lent.values() if os.isatty(fd)), -1)
        self.found: TermAttrs | None = None
        self.programs: TermAttrs | None = None
        if self.fd >= 0:
            try:
                self.found = termios.tcgetattr(self.fd)
            except termios.error:
                self.fd = -1

    def _set(self, attrs: TermAttrs | None) -> None:
        if self.fd < 0 or attrs is None:
            return
        try:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, attrs)
        except (termios.error, OSError):
            pass  # the terminal is gone (hung up)

    def lend_back(self) -> None:
        """Before stopping: keep the program's modes, put back the ones found."""
        if self.fd >= 0:
            try:
                self.programs = termios.tcgetattr(self.fd)
            except termios.error:
                self.programs = None
        self._set(self.found)

    def take_again(self) -> None:
        """Continued: the program's modes again."""
        self._set(self.programs)
        self.programs = None

    def restore(self) -> None:
        """The session is over: the modes as found."""
        self._set(self.found)


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def run_command(
    command: list[str], root: str, confinement: Confinement | None = None, *, drop: bool = False
) -> int:
    """Start ``command`` and serve its session with this side's streams lent; with
    ``drop``, give up the privileges of setuid files once it is started."""
    lent = _lent_streams()
    terminal = Terminal(lent)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Its own process group: the terminal's Ctrl-C is fsys-slave's to relay.
        process = subprocess.Popen(
            command, stdin=theirs.fileno(), stdout=theirs.fileno(), process_group=0
        )
    except OSError as exc:
        print(f"fsys-slave: {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    finally:
        theirs.close()
    try:
        executor = Executor(root, lend=lent, confinement=confinement)
    except OSError as exc:
        print(f"fsys-slave: --root {root}: {exc.strerror}", file=sys.stderr)
        process.kill()
        process.wait()
        return 1
    if drop:
        drop_privileges()  # after CMD started: fsys-master keeps its own
    fd = ours.detach()
    session = SlaveSession(FdTransport(fd, fd), executor, label="run " + shlex.join(command))
    interrupted = 0
    try:
        interrupted = trio.run(_serve, session, process, terminal)
    finally:
        terminal.restore()
    return _end(process, session, interrupted, command)


def _end(
    process: subprocess.Popen[bytes], session: SlaveSession, interrupted: int, command: list[str]
) -> int:
    """Wait for CMD (ended if the session failed or was interrupted); the exit status."""
    if interrupted:
        _kill_group(process, interrupted)
        print(f"fsys-slave: {signal.Signals(interrupted).name}: the session is over",
              file=sys.stderr)  # fmt: skip
        return 128 + interrupted
    try:
        code = process.wait(5.0)
    except subprocess.TimeoutExpired:
        _kill_group(process, signal.SIGTERM)
        code = process.wait()
    if not session.opened.is_set():
        print(f"fsys-slave: {command[0]} ended ({_describe(code)}) before the session "
              "started: CMD must speak the protocol on its standard input and output "
              "(fsys-master run --stdio -- PROGRAM)", file=sys.stderr)  # fmt: skip
    return _status(code)


def _describe(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def _kill_group(process: subprocess.Popen[bytes], signum: int) -> None:
    for sig in (signum, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(2.0)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        process.wait(1.0)
    except subprocess.TimeoutExpired:
        pass


async def _serve(
    session: SlaveSession, process: subprocess.Popen[bytes], terminal: Terminal
) -> int:
    """Serve the session and relay signals; the signal that ended it early, or 0."""
    interrupted = 0

    def stopped(signum: int) -> None:
        terminal.lend_back()
        os.kill(os.getpid(), signal.SIGSTOP)  # resumed by SIGCONT (fg): see relay

    session.on_stopped = stopped
    with trio.open_signal_receiver(*RELAYED) as signals:
        async with trio.open_nursery() as nursery:

            async def relay() -> None:
                nonlocal interrupted
                async for signum in signals:
                    if signum == signal.SIGCONT:
                        terminal.take_again()
                    if session.send_signal(signum):
                        continue
                    if signum in _ENDING:  # no session to pass it to: end
                        interrupted = signum
                        nursery.cancel_scope.cancel()
                        return
                    if signum == signal.SIGTSTP:
                        os.kill(os.getpid(), signal.SIGSTOP)

            nursery.start_soon(relay)
            try:
                await session.serve()
            except* (LinkClosed, RemoteProtocolError):
                pass  # said on stderr by the session if it has anything to say
            finally:
                session.transport.close()
            nursery.cancel_scope.cancel()
    return interrupted
