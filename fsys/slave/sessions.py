"""``fsys-slave ps`` and ``fsys-slave kill [-SIG] SESSION[:PID]``: the commands.

They ask each session on its control socket (``fsys.slave.control``). ps prints one
line per session (its pid, which names it, since when, what started it, its root
and open handles), then one indented line per process of the session on the master
(pid, parent, state, name). kill sends a signal to a session's foreground process
group (SESSION) or to one of its processes (SESSION:PID). Exit status: 0; 1 if a
session or process named is not found, or refuses; 2 for a malformed argument.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from fsys.slave.control import ask, sessions

#: What ps says of a session whose master does not answer its census.
NO_CENSUS = "(the master does not answer)"


def cmd_ps() -> int:
    found = sessions()
    if not found:
        print("no sessions")
        return 0
    for pid, path in found:
        answer = ask(path, {"op": "ps"})
        if answer is None:  # nobody listens: a session killed -9 left it
            try:
                os.unlink(path)
            except OSError:
                pass
            continue
        if "error" in answer:
            print(f"{pid}  ? ({answer['error']})")
            continue
        about = answer["session"]
        since = time.strftime("%H:%M:%S", time.localtime(about["since"]))
        print(f"{pid}  since {since}  {about['what']}  root {about['root']}  "
              f"{about['handles']} handles")  # fmt: skip
        processes = answer["processes"]
        if processes is None:
            print(f"    {NO_CENSUS}")
            continue
        for p_pid, ppid, _pgid, state, name in processes:
            print(f"    {p_pid:>7} {ppid:>7} {state} {name}")
    return 0


def _signal_number(text: str) -> int | None:
    if text.isdigit():
        number = int(text)
        return number if 0 < number <= 64 else None
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        return None


def cmd_kill(words: list[str]) -> int:
    signum = int(signal.SIGTERM)
    if words and words[0].startswith("-"):
        number = _signal_number(words[0][1:])
        if number is None:
            print(f"fsys-slave kill: {words[0]}: not a signal", file=sys.stderr)
            return 2
        signum, words = number, words[1:]
    if not words:
        print("fsys-slave kill: no session given (fsys-slave kill [-SIG] SESSION[:PID])",
              file=sys.stderr)  # fmt: skip
        return 2
    listening = dict(sessions())
    status = 0
    for word in words:
        session_text, _, pid_text = word.partition(":")
        if not session_text.isdigit() or (pid_text and not pid_text.isdigit()):
            print(f"fsys-slave kill: {word}: not SESSION or SESSION:PID", file=sys.stderr)
            return 2
        path = listening.get(int(session_text))
        answer = None if path is None else ask(path, {"op": "kill", "signal": signum,
                                                      "pid": int(pid_text or 0)})  # fmt: skip
        if answer is None:
            print(f"fsys-slave kill: no session {session_text} (fsys-slave ps lists them)",
                  file=sys.stderr)  # fmt: skip
            status = 1
        elif "error" in answer:
            print(f"fsys-slave kill: {word}: {answer['error']}", file=sys.stderr)
            status = 1
    return status
