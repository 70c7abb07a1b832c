"""``fsys-slave``: serve sessions.

``fsys-slave serve --stdio [--root DIR]`` speaks the protocol on its standard input
and output, which is how ``fsys-master --slave CMD`` starts it, directly, over SSH,
or embedded. Standard output is taken over for frames at once (anything else
printing to it would corrupt the stream); diagnostics go to standard error.

``fsys-slave serve --listen unix:PATH|tcp:HOST:PORT`` is a service: each connection
(``fsys-master run --connect ADDR``) is a session of its own, in a process of its
own (``fsys.slave.listener``), let in only with the shared secret (``fsys.auth``;
required for TCP).

``fsys-slave run [--root DIR] -- CMD ARGS`` starts CMD (``fsys-master run --stdio
...``, perhaps behind ``ssh HOST``) with the protocol on CMD's standard input and
output, and lends the session its own terminal and standard streams: the program
on the master reads and draws on this terminal, and the signals this terminal
sends (Ctrl-C, Ctrl-Z, a resize), SIGTERM and SIGHUP go to the program. Exit
status: CMD's (128+N if signal N ended it); 127 if CMD is not found.

``serve`` exits 0 when the master said goodbye (or went away), 125 when the session
broke: the master broke the protocol (named in one line), or the link failed.

Every form takes the confinement options (``fsys.slave.confinement``): --read-only,
--allow-setuid (a slave running as root makes no setuid file without it),
--max-handles.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import trio

from fsys import __version__
from fsys.errors import SESSION_FAILED, RemoteProtocolError
from fsys.slave.confinement import MAX_HANDLES, Confinement, drop_privileges
from fsys.slave.listener import MAX_SESSIONS


def _confinement_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root", default="/", metavar="DIR",
        help="confine every path to DIR, as if it were / (default: /)",
    )  # fmt: skip
    parser.add_argument(
        "--read-only", action="store_true",
        help="refuse every call that would change a file (EROFS), as a read-only mount",
    )  # fmt: skip
    parser.add_argument(
        "--allow-setuid", action="store_true",
        help="let forwarded calls make setuid/setgid files, device nodes and file "
        "capabilities (refused by default when fsys-slave runs as root)",
    )  # fmt: skip
    parser.add_argument(
        "--max-handles", type=_positive, default=MAX_HANDLES, metavar="N",
        help=f"open files per session; EMFILE beyond (default {MAX_HANDLES})",
    )  # fmt: skip


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsys-slave", description="Perform the system calls an fsys master forwards."
    )
    parser.add_argument("--version", action="version", version=f"fsys-slave {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve sessions (--stdio: one; --listen: a service)")
    how = serve.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--stdio", action="store_true",
        help="speak the protocol on standard input and output (one session)",
    )  # fmt: skip
    how.add_argument(
        "--listen", metavar="ADDR",
        help="serve sessions at unix:PATH (mode 0600) or tcp:HOST:PORT (needs a secret), "
        "each in a process of its own",
    )  # fmt: skip
    serve.add_argument(
        "--secret-file", metavar="FILE",
        help="the shared secret a master must prove it holds (a file of mode 0600; "
        "or FSYS_SECRET)",
    )  # fmt: skip
    serve.add_argument(
        "--tls-cert", metavar="FILE",
        help="with --listen tcp: TLS with this certificate (chain, PEM) and --tls-key",
    )  # fmt: skip
    serve.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    serve.add_argument(
        "--max-sessions", type=_positive, default=MAX_SESSIONS, metavar="N",
        help=f"sessions at once with --listen (default {MAX_SESSIONS})",
    )  # fmt: skip
    _confinement_args(serve)
    sub.add_parser("ps", help="list this slave's sessions and their processes")
    kill = sub.add_parser(
        "kill", help="signal a session's foreground process group, or one of its processes"
    )
    kill.add_argument("target", metavar="[-SIG] SESSION[:PID]", nargs="+",
                      help="-SIG: a name (-TERM, -INT) or number (-9); default TERM")  # fmt: skip
    run = sub.add_parser(
        "run", help="start CMD (fsys-master run --stdio ...) and lend it this terminal"
    )
    _confinement_args(run)
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    return parser


def serve_fds(
    read_fd: int,
    write_fd: int,
    root: str,
    confinement: Confinement | None = None,
    *,
    label: str = "serve --stdio",
) -> int:
    """Serve one session on two fds (possibly the same socket). Returns an exit status."""
    from fsys.iostream import FdTransport
    from fsys.slave.fshub import serve_transport

    os.umask(0)  # the master applies the program's umask to every mode it sends

    try:
        spin_us = max(0.0, float(os.environ.get("FSYS_SLAVE_SPIN_US", "0")))
    except ValueError:
        spin_us = 0.0

    async def run() -> None:
        await serve_transport(FdTransport(read_fd, write_fd), root, spin_us=spin_us,
                              confinement=confinement, label=label)  # fmt: skip

    try:
        trio.run(run)
    except RemoteProtocolError:
        return SESSION_FAILED  # (named on standard error by the hub)
    except OSError as exc:
        print(f"fsys-slave: {exc}", file=sys.stderr)
        return SESSION_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["kill"]:  # "-9", "-TERM" are not options here
        argv = ["kill", "--", *argv[1:]] if argv[1:2] != ["--"] else argv
    args = _parser().parse_args(argv)
    if args.command in ("ps", "kill"):
        from fsys.slave.sessions import cmd_kill, cmd_ps

        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # (| head ends us quietly)
        return cmd_ps() if args.command == "ps" else cmd_kill(args.target)
    try:
        os.close(os.open(args.root, os.O_PATH | os.O_DIRECTORY))
    except OSError as exc:
        print(f"fsys-slave: --root {args.root}: {exc.strerror}", file=sys.stderr)
        return 1
    from fsys.linux import raise_fd_limit

    raise_fd_limit()
    root_slave = os.geteuid() == 0
    confinement = Confinement(
        read_only=args.read_only,
        no_setuid=root_slave and not args.allow_setuid,
        max_handles=args.max_handles,
    )
    drop = confinement.no_setuid  # a root slave: give up what makes setuid files too
    if args.command == "run":
        from fsys.slave.lending import run_command

        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            print("fsys-slave run: no command given (fsys-slave run -- CMD ARGS)",
                  file=sys.stderr)  # fmt: skip
            return 2
        status = run_command(command, args.root, confinement, drop=drop)
        sys.stderr.flush()
        os._exit(status)
    if args.listen is not None:
        return _listen(args, confinement, drop)
    from fsys.iostream import take_stdio

    try:
        read_fd, write_fd = take_stdio()
    except OSError:
        print("fsys-slave: serve --stdio: its standard input or output is closed (the "
              "session is spoken there)", file=sys.stderr)  # fmt: skip
        return 2
    if drop:
        drop_privileges()
    status = serve_fds(read_fd, write_fd, args.root, confinement)
    sys.stderr.flush()
    os._exit(status)  # without waiting for worker threads still blocked in a call


def _listen(args: argparse.Namespace, confinement: Confinement, drop: bool) -> int:
    from fsys import auth, tls
    from fsys.address import AddressError, parse
    from fsys.slave import listener

    try:
        address = parse(args.listen)
        secret = auth.load_secret(args.secret_file)
        if secret is None and not address.is_unix:
            raise auth.AuthError(f"--listen {address} needs a secret: --secret-file FILE "
                                 "(mode 0600) or FSYS_SECRET")  # fmt: skip
        context = None
        if args.tls_cert or args.tls_key:
            if not (args.tls_cert and args.tls_key) or address.is_unix:
                raise tls.TlsError("TLS needs --listen tcp:..., --tls-cert and --tls-key")
            context = tls.server_context(args.tls_cert, args.tls_key)
        sock = listener.bind(address)
    except (AddressError, auth.AuthError, tls.TlsError, listener.ListenError) as exc:
        print(f"fsys-slave: {exc}", file=sys.stderr)
        return 2
    # Loaded before the first fork: each session starts serving at once.
    import fsys.slave.fshub  # noqa: F401

    bound = listener.bound_address(sock, address)
    service = listener.Service(bound, args.root, secret, confinement, args.max_sessions, drop,
                               context)  # fmt: skip
    guard = "with a secret" if secret is not None else "mode 0600, no secret"
    if context is not None:
        guard = "TLS, " + guard
    print(f"fsys-slave: listening on {bound} ({guard})", file=sys.stderr, flush=True)
    return listener.serve(service, sock, serve_fds)
