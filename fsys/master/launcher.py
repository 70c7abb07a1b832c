"""The launcher: start the program under the filter and take its listener.

The hand-over must not trap itself. The child installs the filter with
NEW_LISTENER, which returns the listener in the child; every later call the filter
traps would wait for a supervisor that does not have the listener yet. So the
child makes only untrapped calls after installing it: it closes the write end of a
pipe (close is native) to say "installed", then calls execve, which the filter
traps. The parent sees EOF on the pipe, finds the listener in /proc/<pid>/fd
(``anon_inode:seccomp notify``), copies it with pidfd_getfd, and only then answers
the execve with CONTINUE (fmhub does, once the slave is ready). Until then the
program has not started: the trapped execve is the start gate.

The child is forked before trio starts, so no other thread exists. If anything
fails before the filter is in place, the child writes the errno to the pipe and
exits 127; the parent reports it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
from dataclasses import dataclass

from fsys import linux
from fsys.errors import FsysError
from fsys.kmod import abi

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1
SECCOMP_FLAGS = abi.SECCOMP_FILTER_FLAG_NEW_LISTENER | abi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV


class LaunchError(FsysError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Launched:
    pid: int
    pidfd: int
    listener: int


def resolve_program(name: str, env: dict[str, str]) -> str:
    """The master path of the program to run, as execvp would find it."""
    if "/" in name:
        if not os.path.exists(name):
            raise LaunchError(f"{name}: No such file or directory", 127)
        if os.path.isdir(name) or not os.access(name, os.X_OK):
            raise LaunchError(f"{name}: Permission denied", 126)
        return os.path.abspath(name)
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return os.path.abspath(candidate)
    raise LaunchError(f"{name}: command not found", 127)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _child(
    path: str,
    argv: list[str],
    env: dict[str, str],
    fprog: _SockFprog,
    write_fd: int,
    cwd: bytes | None,
    nofile: tuple[int, int],
) -> None:
    """Runs in the forked child; never returns."""
    try:
        # Without fsys-master the program could not run (every trapped call would fail
        # with ENOSYS): it goes with it.
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)  # as fsys-master was given it
        if cwd is not None:
            os.chdir(cwd)
        # Python ignores these; a program expects the defaults (as subprocess restores).
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        syscall = _libc.syscall
        args = (ctypes.c_long(abi.SYS_SECCOMP), ctypes.c_long(abi.SECCOMP_SET_MODE_FILTER),
                ctypes.c_long(SECCOMP_FLAGS), ctypes.c_void_p(ctypes.addressof(fprog)))  # fmt: skip
        if syscall(*args) < 0:
            err = ctypes.get_errno()
            if err != errno.EACCES:
                raise OSError(err, os.strerror(err))
            # Without CAP_SYS_ADMIN a filter needs no_new_privs (setuid binaries then
            # run without their privileges, as under any unprivileged seccomp filter).
            _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            if syscall(*args) < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        os.close(write_fd)  # native: tells the parent the listener exists
        try:
            os.execve(path, argv, env)  # trapped: waits for fmhub
        except OSError as exc:
            os.write(2, f"fsys-master: {path}: {exc.strerror}\n".encode())
        os._exit(126)
    except OSError as exc:
        try:
            os.write(write_fd, str(exc.errno or errno.EIO).encode())
        finally:
            os._exit(127)
    except BaseException:  # noqa: BLE001 - the forked child must never return
        os._exit(127)


def launch(
    path: str,
    argv: list[str],
    env: dict[str, str],
    program: bytes,
    cwd: bytes | None = None,
    *,
    nofile: tuple[int, int] | None = None,
) -> Launched:
    """Fork ``path`` under the filter ``program``; return it waiting in its execve.

    ``cwd``: the kernel working directory to start it in (the stage directory).
    ``nofile``: the program's limit on open files (fsys-master's own if None; the CLI
    passes the one fsys-master was started with, before it raised its own).
    """
    limits = nofile if nofile is not None else resource.getrlimit(resource.RLIMIT_NOFILE)
    filt = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // abi.BPF_INSN.size, ctypes.addressof(filt))
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(path, argv, env, fprog, write_fd, cwd, limits)
    os.close(write_fd)
    try:
        message = b""
        while chunk := os.read(read_fd, 64):
            message += chunk
    finally:
        os.close(read_fd)
    if message:
        os.waitpid(pid, 0)
        err = int(message)
        raise LaunchError(f"cannot install the syscall filter: {os.strerror(err)}", 125)
    pidfd = os.pidfd_open(pid)
    target = _find_listener(pid)
    if target is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise LaunchError("the program's listener did not appear", 125)
    try:
        listener = linux.pidfd_getfd(pidfd, target)
    except OSError as exc:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise LaunchError(f"cannot take the listener: {exc.strerror}", 125) from None
    os.set_inheritable(listener, False)
    return Launched(pid, pidfd, listener)


def _find_listener(pid: int) -> int | None:
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{name}") == "anon_inode:seccomp notify":
                return int(name)
        except OSError:
            continue
    return None
