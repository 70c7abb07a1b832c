"""The embedded slave: ``fsys-master run`` without ``--slave``.

The command-line face wires the two sides together here, so that neither side's
core imports the other's: the slave's code is imported only in the forked child,
which serves this machine's whole filesystem on one end of a socketpair. It is
forked after fsys-master has loaded trio, so its start-up costs little.
"""

from __future__ import annotations

import os
import socket


def fork_slave(theirs: socket.socket, ours: socket.socket) -> int:
    """Fork a slave serving ``theirs``; returns its pid (in the parent only)."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        ours.close()
        os.setpgid(0, 0)  # the terminal's Ctrl-C is the program's, not ours
        from fsys.slave.cli import serve_fds

        fd = theirs.detach()
        status = serve_fds(fd, fd, "/")
    finally:
        os._exit(status)
