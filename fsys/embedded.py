"""The embedded slave: ``fsys-master run`` without ``--slave``.

The command-line face wires the two sides together here, so that neither side's
core imports the other's: the slave's code is imported by this module only, and
runs in a forked child that serves this machine's whole filesystem on one end of a
socketpair. The CLI imports this module after trio is loaded and forks at once, so
the slave's start-up costs little.
"""

from __future__ import annotations

import os
import socket

# Loaded now, before the fork, so that the child starts serving at once.
from fsys.slave.cli import serve_fds

#: Above every descriptor the master can hold (close_range closes the gap at once).
MAX_FD = 1 << 30


def fork_slave(theirs: socket.socket, ours: socket.socket) -> int:
    """Fork a slave serving ``theirs``; returns its pid (in the parent only)."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        ours.close()
        os.setpgid(0, 0)  # the terminal's Ctrl-C is the program's, not ours
        fd = theirs.detach()
        # Nothing of the master's but its standard streams and the link: not /dev/fuse
        # (a view's connection would outlive a master gone), not a kept session's
        # listener or ready pipe, not a descriptor the master was given (a make
        # jobserver's pipe, a pipe someone reads to its end).
        os.closerange(3, fd)
        os.closerange(fd + 1, MAX_FD)
        status = serve_fds(fd, fd, "/", label=f"embedded, for fsys-master {os.getppid()}")
    finally:
        os._exit(status)
