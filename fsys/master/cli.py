"""``fsys-master``: run a program here with its files on a slave.

    fsys-master run [--slave CMD] [--trace] [--local P] [--remote P] [--config F] -- PROGRAM ARGS
    fsys-master policy [--program PROGRAM] PATH...
    fsys-master syscalls [--markdown]

``run`` starts the slave (``--slave CMD`` is run by /bin/sh with its standard input
and output connected to fsys-master; without it an embedded slave serving this
machine's whole filesystem is forked), starts PROGRAM under the filter, and serves
the session until every process of the program is gone.

Exit status: the program's (128+N if signal N killed it); 127 if the program is not
found, 126 if it cannot be executed; 125 if the session itself failed (the slave
did not start, died, or broke the protocol).
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

from fsys import __version__
from fsys.errors import SESSION_FAILED
from fsys.master.finding import LaunchError, resolve_program
from fsys.master.policy import Policy, PolicyError, Side, normalize

if TYPE_CHECKING:
    from subprocess import Popen

    from fsys.master.keeping import Place, Request


class _RuleAction(argparse.Action):
    """--local/--remote append to one ordered list: the first matching rule wins."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        side = Side.MASTER if option_string == "--local" else Side.SLAVE
        rules: list[tuple[Side, str]] = list(getattr(namespace, "rules", None) or [])
        rules.append((side, str(values)))
        namespace.rules = rules


def _policy_args(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(rules=[])
    parser.add_argument(
        "--local", metavar="PREFIX", action=_RuleAction, dest="rules",
        help="paths under PREFIX are the master's (repeatable; first match wins)",
    )  # fmt: skip
    parser.add_argument(
        "--remote", metavar="PREFIX", action=_RuleAction, dest="rules",
        help="paths under PREFIX are the slave's (repeatable)",
    )  # fmt: skip
    parser.add_argument("--config", metavar="FILE", type=Path, help="policy rules (TOML)")
    parser.add_argument(
        "--no-default-policy", action="store_true",
        help="drop the built-in master-local prefixes (/usr, /lib, /proc, ...)",
    )  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsys-master",
        description="Run a program on this machine with the files of a slave machine.",
    )
    parser.add_argument("--version", action="version", version=f"fsys-master {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a program under fsys")
    run.add_argument(
        "--slave", metavar="CMD",
        help="command (run by /bin/sh) that speaks the protocol on its stdin/stdout, "
        "e.g. 'ssh host fsys-slave serve --stdio'; default: an embedded slave",
    )  # fmt: skip
    run.add_argument(
        "--stdio", action="store_true",
        help="speak the protocol on standard input and output, to the slave that started "
        "fsys-master (fsys-slave run -- fsys-master run --stdio -- PROGRAM): the program "
        "gets that slave's terminal",
    )  # fmt: skip
    run.add_argument(
        "--connect", metavar="ADDR",
        help="the slave is a service listening at unix:PATH or tcp:HOST:PORT "
        "(fsys-slave serve --listen ADDR)",
    )  # fmt: skip
    run.add_argument(
        "--secret-file", metavar="FILE",
        help="with --connect: the shared secret the slave asks for (a file of mode 0600; "
        "or FSYS_SECRET)",
    )  # fmt: skip
    run.add_argument(
        "--tls", action="store_true",
        help="with --connect tcp: TLS, verifying the slave's certificate and name against "
        "the system's CAs (or --tls-ca)",
    )  # fmt: skip
    run.add_argument(
        "--tls-ca", metavar="FILE",
        help="with --tls: trust this CA (or the slave's own certificate) instead (PEM)",
    )  # fmt: skip
    run.add_argument(
        "--ssh", metavar="[USER@]HOST",
        help="the slave is fsys-slave on HOST, started over ssh (docs/ssh.md)",
    )  # fmt: skip
    run.add_argument(
        "--ssh-option", metavar="OPT", action="append", default=[],
        help="with --ssh: an ssh -o option, e.g. Port=2222 (repeatable)",
    )  # fmt: skip
    run.add_argument(
        "--ssh-slave", metavar="PATH",
        help="with --ssh: fsys-slave's path on HOST (default: fsys-slave on the remote "
        "PATH, or in ~/.local/bin)",
    )  # fmt: skip
    run.add_argument("--trace", action="store_true", help="print each forwarded call")
    run.add_argument(
        "--trace-all", action="store_true", help="also print trapped calls run natively"
    )
    run.add_argument("--trace-file", metavar="FILE", help="write the trace to FILE")
    run.add_argument(
        "--no-cache", action="store_true",
        help="send every stat to the slave (for slave files that change where inotify "
        "cannot see: a network filesystem changed from elsewhere)",
    )  # fmt: skip
    run.add_argument(
        "--network", choices=("slave", "master"), default="slave",
        help="whose network the program's sockets use: the slave's (default: its "
        "connections leave from the slave, its servers listen there, names resolve "
        "there) or the master's (docs/usage.md)",
    )  # fmt: skip
    run.add_argument(
        "--view", action="store_true",
        help="give the program the slave's files as a file system of its own kernel "
        "(FUSE, in a mount namespace of its own; needs root): no call is trapped, and "
        "names, attributes and pages are cached by the kernel, exactly (docs/usage.md)",
    )  # fmt: skip
    run.add_argument(
        "--keep", metavar="SECONDS", type=_seconds,
        help="with --view: run PROGRAM in a kept session for these options, started if "
        "none runs, that stays SECONDS after its last program ends: the next command "
        "finds the slave, the view and its caches ready (docs/usage.md, \"Kept sessions\")",
    )  # fmt: skip
    _policy_args(run)
    run.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM [ARGS...]")

    policy = sub.add_parser("policy", help="show which side each PATH is on, and why")
    _policy_args(policy)
    policy.add_argument("--program", help="include PROGRAM's install prefix, as run does")
    policy.add_argument("paths", nargs="+", metavar="PATH")

    kept = sub.add_parser("kept", help="list the kept sessions (run --keep), or stop them")
    kept.add_argument("--stop", action="store_true", help="end them (their programs get SIGTERM)")

    syscalls = sub.add_parser("syscalls", help="print the syscall disposition table")
    syscalls.add_argument("--markdown", action="store_true", help="as docs/syscalls.md")
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def _build_policy(args: argparse.Namespace, program: str | None) -> Policy:
    return Policy.build(
        flags=args.rules,
        config=args.config,
        program=program,
        defaults=not args.no_default_policy,
    )


# --- the slave --------------------------------------------------------------------


class Slave:
    """The slave process: forked (embedded) or started by a shell command; or, with
    ``stdio``, whoever is on fsys-master's standard input and output (``fsys-slave
    run -- fsys-master run --stdio ...``, perhaps over ssh); or, with ``sock``, a
    listening slave's session, reached at ``address``."""

    def __init__(
        self, command: str | None, *, stdio: bool = False, sock: socket.socket | None = None,
        address: str = "",
    ) -> None:  # fmt: skip
        self.command = command
        #: Where a listening slave was reached (``sock``: it is not our process).
        self.address = address
        #: The session gave up waiting for it (a signal): it is ended, not waited for.
        self.given_up = False
        self.process: Popen[bytes] | None = None
        self.pid = -1
        self.stdio = stdio
        self.socket: socket.socket | None = sock
        if sock is not None:
            return
        if stdio:
            # The link is fds 0 and 1 now; the program gets /dev/null there, unless the
            # slave lends it its own streams.
            from fsys.iostream import take_stdio

            self._fds = take_stdio()
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket = ours
        if command is None:
            from fsys.embedded import fork_slave

            self.pid = fork_slave(theirs, ours)
        else:
            from subprocess import Popen

            self.process = Popen(
                ["/bin/sh", "-c", command],
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                process_group=0,
            )
        theirs.close()

    @property
    def name(self) -> str:
        if self.address:
            return f"the slave at {self.address}"
        if self.stdio:
            return "the slave on standard input and output"
        return self.command if self.command is not None else "the embedded slave"

    def take_fds(self) -> tuple[int, int]:
        """The link's (read, write) fds, now the session's to close."""
        if self.socket is None:
            return self._fds
        fd = self.socket.detach()
        return fd, fd

    def close(self) -> None:
        """Close the link before a session began (the slave sees end of file)."""
        if self.socket is not None:
            self.socket.close()
        elif self._fds[0] >= 0:
            os.close(self._fds[0])
            os.close(self._fds[1])
            self._fds = (-1, -1)

    def give_up(self, signum: int) -> int:
        """The session ends on signal ``signum`` before the slave answered: say so; the
        exit status (128 + signum)."""
        self.given_up = True
        print(f"fsys-master: {signal.Signals(signum).name} while waiting for the slave: "
              "giving up", file=sys.stderr)  # fmt: skip
        return 128 + signum

    def describe_exit(self) -> str:
        """How the slave ended, if it has."""
        if self.process is not None:
            code = self.process.poll()
        elif self.pid <= 0:
            return ""  # not our child (--stdio), or reaped
        else:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return ""
            code = os.waitstatus_to_exitcode(status) if pid else None
            if pid:
                self.pid = -1
        if code is None:
            return ""
        return f"killed by signal {-code}" if code < 0 else f"exited with status {code}"

    def reap(self, *, failed: bool) -> None:
        """Wait for the slave to exit; after a failed session, end its process group.

        A slave command may leave processes behind (``sh -c 'ssh ...'``); they are all
        in the group the slave was started in, and hold our stderr open.
        """
        if self.process is not None:
            from subprocess import TimeoutExpired

            try:
                self.process.wait(0.5 if failed else 5.0)
            except TimeoutExpired:
                pass
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(1.0)
                except TimeoutExpired:
                    continue
            self.process.wait()
        elif self.pid > 0:
            # Wait for it to exit (its pidfd becomes readable), for 5 s at most.
            pidfd = os.pidfd_open(self.pid)
            try:
                waiter = select.poll()
                waiter.register(pidfd, select.POLLIN)
                if failed or not waiter.poll(5000):
                    os.kill(self.pid, signal.SIGKILL)
            finally:
                os.close(pidfd)
            os.waitpid(self.pid, 0)
            self.pid = -1


class SlaveError(Exception):
    """The slave named cannot be had; the message says why, ``status`` is the exit."""

    def __init__(self, message: str, status: int = SESSION_FAILED) -> None:
        super().__init__(message)
        self.status = status


#: On the remote side of --ssh: fsys-slave from the PATH, else from where pip --user
#: and pipx put it (a non-interactive ssh session's PATH often lacks ~/.local/bin).
_FIND_SLAVE = (
    'for s in "$(command -v fsys-slave)" "$HOME/.local/bin/fsys-slave"; do'
    ' [ -n "$s" ] && [ -x "$s" ] && exec "$s" serve --stdio; done;'
    ' echo "fsys: no fsys-slave on the PATH or in ~/.local/bin of $(hostname):'
    ' install it there (docs/ssh.md), or name it with --ssh-slave PATH" >&2; exit 127'
)


def ssh_command(host: str, options: list[str], slave: str | None) -> str:
    """The shell command that starts fsys-slave on ``host`` over ssh: no tty (a tty
    would mangle the frames), keepalives so a dead link is noticed, the user's own
    options first (ssh keeps the first value it is given for each)."""
    import shlex

    argv = ["ssh", "-T"]
    for option in options:
        argv += ["-o", option]
    argv += ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", "--", host]
    remote = f"exec {shlex.quote(slave)} serve --stdio" if slave else _FIND_SLAVE
    return shlex.join(argv) + " " + shlex.quote(remote)


def _start_slave(args: argparse.Namespace) -> Slave | None:
    """The slave the options name, started (None: the embedded one, forked later)."""
    given = [name for name, value in (("--slave", args.slave), ("--stdio", args.stdio),
             ("--connect", args.connect), ("--ssh", args.ssh)) if value]  # fmt: skip
    if len(given) > 1:
        raise SlaveError(f"{' and '.join(given)} each name the slave: give one", 2)
    if (args.secret_file or args.tls or args.tls_ca) and not args.connect:
        raise SlaveError("--secret-file, --tls and --tls-ca go with --connect", 2)
    if (args.ssh_option or args.ssh_slave) and not args.ssh:
        raise SlaveError("--ssh-option and --ssh-slave go with --ssh", 2)
    if args.connect:
        return _connect(args.connect, args.secret_file, args.tls or bool(args.tls_ca), args.tls_ca)
    command = args.slave
    if args.ssh:
        command = ssh_command(args.ssh, args.ssh_option, args.ssh_slave)
    try:
        if command is not None:
            return Slave(command)
        return Slave(None, stdio=True) if args.stdio else None
    except OSError as exc:
        raise SlaveError(f"cannot start the slave: {exc}") from None


def _connect_timeout() -> float:
    """FSYS_CONNECT_TIMEOUT seconds (default 10) for the connection, the TLS handshake
    and the greeting each."""
    from fsys import auth

    try:
        return max(0.1, float(os.environ.get("FSYS_CONNECT_TIMEOUT", auth.TIMEOUT)))
    except ValueError:
        return auth.TIMEOUT


def _connect(text: str, secret_file: str | None, with_tls: bool, ca: str | None) -> Slave:
    import ssl

    from fsys import auth, tls
    from fsys.address import AddressError, connect, parse

    try:
        address = parse(text)
        secret = auth.load_secret(secret_file)
        if with_tls and address.is_unix:
            raise tls.TlsError("--tls is for --connect tcp:HOST:PORT")
        context = tls.client_context(ca) if with_tls else None
    except (AddressError, auth.AuthError, tls.TlsError) as exc:
        raise SlaveError(str(exc), 2) from None
    relay = -1
    try:
        sock = connect(address, _connect_timeout())
        link = sock
        try:
            if context is not None:
                assert not isinstance(address.where, str)
                link = tls.handshake(sock, context, address.where[0])
            auth.answer(link, secret)
            if isinstance(link, ssl.SSLSocket):
                link, relay = tls.relay(link)
            link.settimeout(None)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise SlaveError(f"cannot connect to {address}: {why} (is fsys-slave serve "
                         f"--listen {address} running?)") from None  # fmt: skip
    except (auth.AuthError, tls.TlsError) as exc:
        hint = ""
        if context is None and "no greeting" in str(exc):
            hint = " (a slave listening with TLS wants --tls)"
        elif context is not None and "handshake failed" in str(exc):
            hint = " (is the slave listening with --tls-cert?)"
        raise SlaveError(f"{address}: {exc}{hint}") from None
    except KeyboardInterrupt:
        raise SlaveError("interrupted while connecting to the slave", 130) from None
    slave = Slave(None, sock=link, address=str(address))
    slave.pid = relay  # the TLS relay, our child: reaped with the session
    return slave


# --- run ----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, *, nofile: tuple[int, int] | None = None) -> int:
    argv = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not argv:
        print("fsys-master run: no program given (fsys-master run -- PROGRAM ARGS)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        os.getcwd()
    except FileNotFoundError:
        print("fsys-master: the working directory has been removed: cd to another one",
              file=sys.stderr)  # fmt: skip
        return 2
    env = dict(os.environ)
    try:
        path: str | None = resolve_program(argv[0], env)
    except LaunchError as exc:
        if exc.status != 127:
            print(f"fsys-master: {exc}", file=sys.stderr)
            return exc.status
        path = None  # perhaps the slave has it: see below
    seen = _witness(args, path) if args.keep is not None else None  # before the policy
    try:
        policy = _build_policy(args, path)
    except PolicyError as exc:
        print(f"fsys-master: {exc}", file=sys.stderr)
        return 2
    if args.keep is not None:
        return _run_kept(args, argv, env, path, policy, nofile, seen)
    try:
        fuse_fd = _open_fuse(args) if args.view else -1
    except LaunchError as exc:
        print(f"fsys-master: {exc}", file=sys.stderr)
        return exc.status
    try:
        # A slave command starts first: it boots (imports trio...) while we do. The
        # embedded one is forked once trio is loaded (importing it is most of a start).
        slave = _start_slave(args)
    except SlaveError as exc:
        print(f"fsys-master: {exc}", file=sys.stderr)
        if fuse_fd >= 0:
            os.close(fuse_fd)
        return exc.status
    if fuse_fd >= 0:
        return _run_view(argv, env, path, policy, fuse_fd, slave, nofile, cache=not args.no_cache)
    from fsys.kmod import bpf
    from fsys.kmod.table import load
    from fsys.master import session
    from fsys.master.launcher import launch
    from fsys.master.staging import Stage

    if slave is None:
        try:
            slave = Slave(None)  # embedded: forked now that trio is loaded
        except OSError as exc:
            print(f"fsys-master: cannot start the slave: {exc}", file=sys.stderr)
            return SESSION_FAILED
    program = bpf.build(load())
    trace: TextIO | None = None
    if args.trace or args.trace_all or args.trace_file:
        try:
            trace = open(args.trace_file, "w") if args.trace_file else sys.stderr  # noqa: SIM115
        except OSError as exc:
            print(f"fsys-master: cannot write the trace to {args.trace_file}: {exc.strerror}",
                  file=sys.stderr)  # fmt: skip
            slave.close()
            slave.reap(failed=True)
            return 2
    stage = Stage()
    # Started in a slave directory: its kernel working directory is the stage (for
    # running slave-only files, see staging.py).
    staged = not policy.is_local(normalize(os.fsencode(os.getcwd())))
    if path is None:
        if not staged:
            print(f"fsys-master: {argv[0]}: not found on the master (a program only the "
                  "slave has can run from a slave directory only)", file=sys.stderr)  # fmt: skip
            slave.close()
            slave.reap(failed=True)
            stage.close()
            return 127
        # Not on the master: the program may be the slave's. A shell looks for it (on
        # the slave's PATH and tree, through fsys) and execs it, staged, or says
        # "not found" (127).
        path, argv = "/bin/sh", ["/bin/sh", "-c", 'exec "$0" "$@"', *argv]
    try:
        launched = launch(
            path, argv, env, program, cwd=stage.cwd if staged else None, nofile=nofile
        )
    except LaunchError as exc:
        print(f"fsys-master: {exc}", file=sys.stderr)
        slave.close()
        slave.reap(failed=True)
        stage.close()
        return exc.status
    # Like a shell waiting for its job: the terminal's SIGINT/SIGQUIT are the program's.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    status = SESSION_FAILED
    try:
        plan = session.Plan(
            launched,
            slave,
            policy,
            trace,
            args.trace_all,
            stage,
            staged,
            not args.no_cache,
            network=args.network == "slave",
        )
        status = session.run(plan)
        return status
    finally:
        slave.reap(failed=status == SESSION_FAILED or slave.given_up)
        stage.close()
        if trace is not None and trace is not sys.stderr:
            trace.close()


def _open_fuse(args: argparse.Namespace) -> int:
    """For ``--view``: /dev/fuse, open, or LaunchError (before the slave starts:
    nothing to undo)."""
    if args.trace or args.trace_all or args.trace_file:
        raise LaunchError("--trace is not available with --view (no call is trapped)", 2)
    if args.stdio:
        raise LaunchError("--stdio is not available with --view in this version", 2)
    try:
        return os.open("/dev/fuse", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise LaunchError(f"--view needs /dev/fuse: {exc.strerror}", SESSION_FAILED) from None


def _run_view(
    argv: list[str],
    env: dict[str, str],
    path: str | None,
    policy: Policy,
    fuse_fd: int,
    slave: Slave | None,
    nofile: tuple[int, int] | None,
    *,
    cache: bool,
) -> int:
    """``fsys-master run --view``: the program in a view of the slave's files."""
    from fsys.master import viewing
    from fsys.master.staging import Stage
    from fsys.master.view import LayoutError, layout

    if slave is None:
        try:
            slave = Slave(None)  # embedded: forked now that trio is loaded
        except OSError as exc:
            print(f"fsys-master: cannot start the slave: {exc}", file=sys.stderr)
            os.close(fuse_fd)
            return SESSION_FAILED

    try:
        points, mounts = layout(policy)
    except LayoutError as exc:
        print(f"fsys-master: {exc}", file=sys.stderr)
        os.close(fuse_fd)
        slave.close()
        slave.reap(failed=True)
        return 2
    if path is None:  # perhaps the slave has it: a shell in the view looks for it
        path, argv = "/bin/sh", ["/bin/sh", "-c", 'exec "$0" "$@"', *argv]
    stage = Stage()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    status = SESSION_FAILED
    try:
        plan = viewing.ViewPlan(path, argv, env, slave, fuse_fd, points, mounts, stage,
                                os.fsencode(os.getcwd()), nofile, cache)  # fmt: skip
        status = viewing.run_view(plan)
        return status
    finally:
        slave.reap(failed=status == SESSION_FAILED or slave.given_up)
        stage.close()


def _run_kept(
    args: argparse.Namespace,
    argv: list[str],
    env: dict[str, str],
    path: str | None,
    policy: Policy,
    nofile: tuple[int, int] | None,
    seen: tuple[str, str, str] | None,
) -> int:
    """``fsys-master run --view --keep SECONDS``: the program in the kept session for
    these options (fsys.master.keeping), started first if none runs. ``seen``: what
    its quick record will check (_witness), or None for no record."""
    from fsys.master import keeping

    if not args.view:
        print("fsys-master: --keep goes with --view (only the view's session can be kept)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.trace or args.trace_all or args.trace_file or args.stdio:
        print("fsys-master: --trace and --stdio are not available with --view",
              file=sys.stderr)  # fmt: skip
        return 2
    if path is None:  # perhaps the slave has it: a shell in the view looks for it
        path, argv = "/bin/sh", ["/bin/sh", "-c", 'exec "$0" "$@"', *argv]
    slave = [args.slave, args.connect, args.ssh, args.ssh_option, args.ssh_slave,
             args.secret_file, args.tls, args.tls_ca]  # fmt: skip
    rules = [(os.fsdecode(rule.prefix), rule.side.value) for rule in policy.rules]
    umask = os.umask(0)
    os.umask(umask)
    request = keeping.Request(path, argv, env, os.getcwd(), umask,
                              nofile or resource.getrlimit(resource.RLIMIT_NOFILE))  # fmt: skip
    try:
        place = keeping.Place.of(keeping.key({"slave": slave, "rules": rules,
                                              "cache": not args.no_cache}))  # fmt: skip
        if seen is not None:
            _remember(args.tokens, args.program, place, request, seen)
        return keeping.run(place, request, lambda place, ready: _serve_kept(args, policy, place,
                                                                              ready))  # fmt: skip
    except keeping.KeepError as exc:
        print(f"fsys-master: {exc}", file=sys.stderr)
        return SESSION_FAILED


def _witness(args: argparse.Namespace, program: str | None) -> tuple[str, str, str] | None:
    """What the quick record of this command will check (keeping.witness), taken
    before the policy is built from it; None if it gets no record: its program was
    not found, or its --config is given by a relative path."""
    from fsys.master import keeping

    config = None if args.config is None else str(args.config)
    if program is None or (config is not None and not os.path.isabs(config)):
        return None
    return keeping.witness(program, config)


def _remember(tokens: list[str], program: list[str], place: Place, request: Request,
              seen: tuple[str, str, str]) -> None:  # fmt: skip
    """The quick record of this command for the compiled client (keeping.remember),
    when what decides its session is all in the words it sees (``tokens``, the words
    after fsys-master): the options before the first ``--``, the program found as
    execvp would find it, and a --config file given by its absolute path (the rules'
    prefixes are absolute, or refused)."""
    from fsys.master import keeping

    if "--" not in tokens:
        return
    dash = tokens.index("--")
    if program != tokens[dash:] or request.argv != tokens[dash + 1 :]:
        return  # the options hold a `--` of their own, or the program was not found
    keeping.remember(place, keeping.quick_inputs(tokens[1:dash], request.path), seen)


def _serve_kept(args: argparse.Namespace, policy: Policy, place: object, ready: int) -> int:
    """The kept session's own process (a daemon: stderr is its log): listen at
    ``place``, start the slave, mount the view, serve until it ends."""
    from fsys.linux import raise_fd_limit
    from fsys.master import keeping, viewing
    from fsys.master.staging import Stage
    from fsys.master.view import LayoutError, layout

    assert isinstance(place, keeping.Place)
    raise_fd_limit()  # the programs get the client's limits (Request.nofile)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        place.socket.unlink(missing_ok=True)  # left by one that died (we hold the lock)
        control.bind(os.fsencode(place.socket))
        os.chmod(place.socket, 0o600)
        control.listen(64)
    except OSError as exc:
        print(f"fsys-master: cannot listen at {place.socket}: {exc.strerror}", file=sys.stderr)
        return SESSION_FAILED
    try:
        points, mounts = layout(policy)
        fuse_fd = _open_fuse(args)
    except (LayoutError, LaunchError) as exc:
        print(f"fsys-master: {exc}", file=sys.stderr)
        return 2
    try:
        slave = _start_slave(args) or Slave(None)
    except (SlaveError, OSError) as exc:
        print(f"fsys-master: {exc}", file=sys.stderr)
        os.close(fuse_fd)
        return SESSION_FAILED
    stage = Stage()
    status = SESSION_FAILED
    try:
        plan = viewing.KeptPlan(slave, fuse_fd, points, mounts, stage, control, place, ready,
                                args.keep, cache=not args.no_cache)  # fmt: skip
        status = viewing.run_kept(plan)
        return status
    finally:
        slave.reap(failed=status == SESSION_FAILED or slave.given_up)
        stage.close()


# --- policy and syscalls ------------------------------------------------------------


def cmd_policy(args: argparse.Namespace) -> int:
    program = None
    if args.program:
        try:
            program = resolve_program(args.program, dict(os.environ))
        except LaunchError as exc:
            print(f"fsys-master: {exc}", file=sys.stderr)
            return exc.status
    try:
        policy = _build_policy(args, program)
    except PolicyError as exc:
        print(f"fsys-master: {exc}", file=sys.stderr)
        return 2
    for text in args.paths:
        raw = os.fsencode(text)
        if not raw.startswith(b"/"):
            raw = os.fsencode(os.getcwd()) + b"/" + raw
        norm = normalize(raw)
        rule = policy.rule_for(norm)
        prefix = os.fsdecode(rule.prefix)
        print(f"{os.fsdecode(norm)}: {rule.side.value}  (prefix {prefix}, {rule.origin})")
    return 0


def cmd_kept(args: argparse.Namespace) -> int:
    """``fsys-master kept [--stop]``: the kept sessions that listen, one a line."""
    from fsys.master import keeping

    try:
        sessions = keeping.listening()
    except keeping.KeepError as exc:
        print(f"fsys-master: {exc}", file=sys.stderr)
        return SESSION_FAILED
    status = 0
    for kept in sessions:
        if args.stop:
            ended = keeping.stop(kept)
            print(f"{kept.socket}: pid {kept.pid}: {'ended' if ended else 'did not end'}")
            status = status or (0 if ended else 1)
        else:
            print(f"{kept.socket}: pid {kept.pid}")
    return status


def cmd_syscalls(args: argparse.Namespace) -> int:
    from fsys.master.syscalls_doc import render_markdown, render_text

    sys.stdout.write(render_markdown() if args.markdown else render_text())
    return 0


def run() -> NoReturn:
    """fsys-master's entry (``python -m fsys.master``, the script): main(), then an
    exit at once. The interpreter's own end frees trio and every module one by one,
    ~45 ms of a session of ~0.25 s, and nothing of ours needs it: every file,
    directory and process is closed, removed or reaped before main returns."""
    status = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        raise SystemExit(status) from None  # Python's own end reports it (exit 120)
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    tokens = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(tokens)
    args.tokens = tokens
    if args.command == "run":
        if args.keep is not None:  # a kept session's client: the session raises its own
            return cmd_run(args, nofile=None)
        from fsys.linux import raise_fd_limit

        return cmd_run(args, nofile=raise_fd_limit())
    # Listings: a reader that stops early (| head) ends us quietly, as it ends cat.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if args.command == "policy":
        return cmd_policy(args)
    if args.command == "kept":
        return cmd_kept(args)
    return cmd_syscalls(args)
