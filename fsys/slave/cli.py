"""``fsys-slave``: serve a session.

``fsys-slave serve --stdio [--root DIR]`` speaks the protocol on its standard input
and output, which is how ``fsys-master --slave CMD`` starts it, directly, over SSH,
or embedded. Standard output is taken over for frames at once (anything else
printing to it would corrupt the stream); diagnostics go to standard error.

``fsys-slave run [--root DIR] -- CMD ARGS`` starts CMD (``fsys-master run --stdio
...``, perhaps behind ``ssh HOST``) with the protocol on CMD's standard input and
output, and lends the session its own terminal and standard streams: the program
on the master reads and draws on this terminal, and the signals this terminal
sends (Ctrl-C, Ctrl-Z, a resize), SIGTERM and SIGHUP go to the program. Exit
status: CMD's (128+N if signal N ended it); 127 if CMD is not found.
"""

from __future__ import annotations

import argparse
import os
import sys

import trio

from fsys import __version__
from fsys.errors import RemoteProtocolError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsys-slave", description="Perform the system calls an fsys master forwards."
    )
    parser.add_argument("--version", action="version", version=f"fsys-slave {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve one session")
    serve.add_argument(
        "--stdio", action="store_true", required=True,
        help="speak the protocol on standard input and output",
    )  # fmt: skip
    serve.add_argument(
        "--root", default="/", metavar="DIR",
        help="confine every path to DIR, as if it were / (default: /)",
    )  # fmt: skip
    run = sub.add_parser(
        "run", help="start CMD (fsys-master run --stdio ...) and lend it this terminal"
    )
    run.add_argument(
        "--root", default="/", metavar="DIR",
        help="confine every path to DIR, as if it were / (default: /)",
    )  # fmt: skip
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    return parser


def take_stdio() -> tuple[int, int]:
    """Move the session off fds 0 and 1, leaving /dev/null there."""
    read_fd, write_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    os.set_inheritable(read_fd, False)
    os.set_inheritable(write_fd, False)
    return read_fd, write_fd


def serve_fds(read_fd: int, write_fd: int, root: str) -> int:
    """Serve one session on two fds (possibly the same socket). Returns an exit status."""
    from fsys.iostream import FdTransport
    from fsys.slave.fshub import serve_transport

    os.umask(0)  # the master applies the program's umask to every mode it sends

    try:
        spin_us = max(0.0, float(os.environ.get("FSYS_SLAVE_SPIN_US", "0")))
    except ValueError:
        spin_us = 0.0

    async def run() -> None:
        await serve_transport(FdTransport(read_fd, write_fd), root, spin_us=spin_us)

    try:
        trio.run(run)
    except RemoteProtocolError:
        return 1
    except OSError as exc:
        print(f"fsys-slave: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        os.close(os.open(args.root, os.O_PATH | os.O_DIRECTORY))
    except OSError as exc:
        print(f"fsys-slave: --root {args.root}: {exc.strerror}", file=sys.stderr)
        return 1
    from fsys.linux import raise_fd_limit

    raise_fd_limit()
    if args.command == "run":
        from fsys.slave.lending import run_command

        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            print("fsys-slave run: no command given (fsys-slave run -- CMD ARGS)",
                  file=sys.stderr)  # fmt: skip
            return 2
        status = run_command(command, args.root)
        sys.stderr.flush()
        os._exit(status)
    read_fd, write_fd = take_stdio()
    status = serve_fds(read_fd, write_fd, args.root)
    sys.stderr.flush()
    os._exit(status)  # without waiting for worker threads still blocked in a call
