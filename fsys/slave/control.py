"""``fsys-slave ps`` and ``fsys-slave kill``: each session answers on a socket of its own.

Theory of operation. Every session a slave serves (``serve --stdio``, a listening
slave's, ``run``'s, an embedded one) listens on DIR/PID.sock, PID being the session
process's: DIR is FSYS_RUNTIME_DIR if set, else $XDG_RUNTIME_DIR/fsys-slave, else
/run/fsys-slave for root and /tmp/fsys-slave-UID for others; DIR is made mode 0700
and the socket 0600, so only the slave's own user may ask. A request is one line of
JSON, and so is its answer:

- ``{"op": "ps"}``: the session (pid, since when, what started it, its root, its
  open handles) and the master's processes of the session, asked of the master
  (CENSUS: pid, parent, group, state, name), or ``null`` if it does not answer in
  ASK_TIMEOUT seconds;
- ``{"op": "kill", "signal": N, "pid": P}``: SIGNAL N to process P of the session, or
  with P 0 to its foreground process group (as the terminal's keys go). A P that
  the master's census does not list is refused here, and the master checks again.

``fsys-slave ps`` asks every socket in DIR; one that nobody answers was left by a
session killed with SIGKILL, and is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import trio

from fsys.protocol import MAX_SIGNAL

if TYPE_CHECKING:
    from fsys.slave.fshub import SlaveSession

#: How long a session waits for the master's census.
ASK_TIMEOUT = 2.0
MAX_REQUEST = 4096


def runtime_dir(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if env.get("FSYS_RUNTIME_DIR"):
        return env["FSYS_RUNTIME_DIR"]
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "fsys-slave")
    if os.geteuid() == 0:
        return "/run/fsys-slave"
    return f"/tmp/fsys-slave-{os.geteuid()}"


def _make_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path} is not ours alone")


@contextlib.asynccontextmanager
async def listening(path: str) -> AsyncIterator[trio.socket.SocketType]:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)  # (EADDRINUSE: another session of this process has it)
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    try:
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)


async def serve_control(session: SlaveSession, label: str) -> None:
    """Answer ps and kill for ``session`` until cancelled (nothing if the directory
    cannot be had: the session runs on, unlisted)."""
    directory = runtime_dir()
    try:
        _make_dir(directory)
    except OSError:
        return
    path = os.path.join(directory, f"{os.getpid()}.sock")
    since = time.time()
    try:
        async with listening(path) as sock, trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(_answer, session, conn, label, since)
    except OSError:
        return


async def _answer(session: SlaveSession, conn: trio.socket.SocketType, label: str,
                  since: float) -> None:  # fmt: skip
    with conn:
        try:
            with trio.fail_after(5):
                data = b""
                while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                    chunk = await conn.recv(MAX_REQUEST)
                    if not chunk:
                        break
                    data += chunk
                answer = await _reply(session, data, label, since)
                out = json.dumps(answer).encode() + b"\n"
                while out:
                    out = out[await conn.send(out) :]
        except (trio.TooSlowError, OSError):
            return


async def _reply(session: SlaveSession, data: bytes, label: str, since: float) -> dict[str, Any]:
    try:
        request = json.loads(data)
        op = request["op"]
    except (ValueError, KeyError, TypeError):
        return {"error": "not a request"}
    if op == "ps":
        processes = await session.census(ASK_TIMEOUT)
        executor = session.executor
        about = {"pid": os.getpid(), "since": since, "what": label, "root": executor.root,
                 "handles": len(executor.handles)}  # fmt: skip
        listed = None
        if processes is not None:
            listed = [[p.pid, p.ppid, p.pgid, p.state.decode(errors="replace"),
                       p.name.decode(errors="replace")] for p in processes]  # fmt: skip
        return {"session": about, "processes": listed}
    if op == "kill":
        signum, pid = request.get("signal"), request.get("pid", 0)
        if not isinstance(signum, int) or not 0 < signum <= MAX_SIGNAL:
            return {"error": f"no signal {signum!r}"}
        if not isinstance(pid, int) or pid < 0:
            return {"error": f"no process {pid!r}"}
        if pid:
            processes = await session.census(ASK_TIMEOUT)
            if processes is None:
                return {"error": "the master does not answer"}
            if pid not in {p.pid for p in processes}:
                return {"error": f"no process {pid} in session {os.getpid()}"}
        if not session.send_signal(signum, pid):
            return {"error": "the session is not open"}
        return {"ok": True}
    return {"error": f"no request {op!r}"}


# --- the commands' side -----------------------------------------------------------------


def ask(path: str, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any] | None:
    """One request to the session listening at ``path``; None if nobody is there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except OSError as exc:
        return {"error": exc.strerror or str(exc)}
    finally:
        sock.close()
    try:
        answer: dict[str, Any] = json.loads(data)
    except ValueError:
        return {"error": "no answer"}
    return answer


def sessions(directory: str | None = None) -> list[tuple[int, str]]:
    """(session pid, socket path) of every session listening, by pid; stale sockets
    (their session was killed) are removed."""
    directory = directory or runtime_dir()
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    out = []
    for name in names:
        stem, _, ext = name.partition(".")
        if ext != "sock" or not stem.isdigit():
            continue
        path = os.path.join(directory, name)
        if not os.path.exists(f"/proc/{stem}"):
            with contextlib.suppress(OSError):
                os.unlink(path)
            continue
        out.append((int(stem), path))
    return sorted(out)
