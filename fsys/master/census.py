"""The session's processes, as ``fsys-slave ps`` asks for them (CENSUS).

Every process under fsys descends from one the session knows: those fmhub tracks (the
trapped mode), or the program it started (the view). ``tree`` walks down from them
through /proc's children lists, so a child that has made no trapped call yet is
counted too; ``describe`` reads each one's state, parent, group and name from
/proc/PID/stat. A process that exits meanwhile is left out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from fsys.protocol import MAX_NAME, MAX_SMALL, Process

#: At most this many processes in one answer (PROCESSES fits in MAX_SMALL).
MAX_PROCESSES = MAX_SMALL // (16 + MAX_NAME)


def tree(roots: Iterable[int], children: Callable[[int], list[int] | None]) -> set[int]:
    """``roots`` and every process below them (``children``: ProcFS.children)."""
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children(pid) or ())
    return seen


def describe(pids: Iterable[int]) -> tuple[Process, ...]:
    """What /proc says of each of ``pids`` that is still there, by pid."""
    out: list[Process] = []
    for pid in sorted(pids)[:MAX_PROCESSES]:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # gone
        head, _, rest = raw.rpartition(b")")
        name = head.partition(b"(")[2][:MAX_NAME]
        fields = rest.split()
        try:
            out.append(Process(pid, int(fields[1]), int(fields[2]), fields[0][:1], name))
        except (IndexError, ValueError):
            continue
    return tuple(out)


def signal_member(pid: int, signum: int, members: Callable[[], set[int]]) -> bool:
    """Send ``signum`` to ``pid`` if it is one of ``members()`` (the session's), and
    no other: a slave may signal the session's processes, never the master's others.
    Whether it was sent."""
    if pid <= 0 or pid not in members():
        return False
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True
