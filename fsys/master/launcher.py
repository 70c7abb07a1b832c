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
from collections.abc import Callable
from dataclasses import dataclass

from fsys import linux
from fsys.kmod import abi
from fsys.master.finding import LaunchError

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1
SECCOMP_FLAGS = abi.SECCOMP_FILTER_FLAG_NEW_LISTENER | abi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV


@dataclass(frozen=True)
class Launched:
    pid: int
    pidfd: int
    listener: int


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
    return take_listener(pid)


def take_listener(pid: int) -> Launched:
    """Take the listener of the child ``pid``, which installed its filter and waits."""
    pidfd = os.pidfd_open(pid)
    try:
        target = _find_listener(pid)
        if target is None:
            raise LaunchError("the program's listener did not appear", 125)
        try:
            listener = linux.pidfd_getfd(pidfd, target)
        except OSError as exc:
            raise LaunchError(f"cannot take the listener: {exc.strerror}", 125) from None
    except BaseException:
        os.close(pidfd)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
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


# --- the view (fsys.master.view): the program in a mount namespace of its own ------------

#: The filter of a program in the view: every call allowed (the kernel carries the
#: file calls through FUSE), with a listener only to learn when the last of the
#: program's processes is gone (it reports POLLHUP then).
ALLOW_ALL = abi.BPF_INSN.pack(0x06, 0, 0, 0x7FFF0000)  # BPF_RET|BPF_K SECCOMP_RET_ALLOW


@dataclass(frozen=True)
class Mount:
    """A bind mount the child makes in the view: ``source`` onto ``target`` (absolute
    in the view; ``source`` is a master path)."""

    source: bytes
    target: bytes


#: What the child reports once the view is mounted (before that, /dev/fuse has no
#: connection to read: EPERM).
MOUNTED = b"M"


@dataclass(frozen=True)
class Forked:
    pid: int
    report: int  # read end: MOUNTED, then EOF once the filter is in place, else "step:errno"
    go: int  # write end: a byte lets the program exec


def fork_view(program: Program, *, fuse_fd: int, root: bytes, mounts: list[Mount]) -> Forked:
    """Fork the program into a mount namespace whose root is the FUSE file system on
    ``fuse_fd`` (mounted at ``root``, a master directory) with ``mounts`` made over
    it; it waits, filter installed, for a byte on ``go`` before its execve. The
    caller serves ``fuse_fd`` meanwhile: the mounts look names up in the view."""

    def enter(step: list[str], report: int) -> None:
        _make_view(step, report, fuse_fd, root, mounts)

    return _fork(lambda step, report, go: _view_child(step, program, enter, root, report, go))


def fork_holder(*, fuse_fd: int, root: bytes, mounts: list[Mount]) -> Forked:
    """Fork a process that makes the view's mount namespace as ``fork_view`` does and
    closes ``report`` once it is made, then waits for EOF on ``go`` and exits: the
    namespace outlives it for as long as the caller holds /proc/PID/ns/mnt open
    (``fsys-master run --keep``: each program then joins it, ``fork_in_view``)."""

    def hold(step: list[str], report: int, go: int) -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        _make_view(step, report, fuse_fd, root, mounts)
        os.close(report)
        os.read(go, 1)
        os._exit(0)

    return _fork(hold)


@dataclass(frozen=True)
class Program:
    """What a program in the view is started with."""

    path: str
    argv: list[str]
    env: dict[str, str]
    cwd: bytes
    nofile: tuple[int, int] | None = None
    stdio: tuple[int, int, int] | None = None  # made its 0, 1, 2 (else fsys-master's)
    umask: int | None = None
    group: bool = False  # in a process group of its own


def fork_in_view(program: Program, *, namespace: int, root: bytes) -> Forked:
    """Fork ``program`` into the mount namespace ``namespace`` (an fd of a holder's
    /proc/PID/ns/mnt) and chroot it into ``root``; as ``fork_view`` after that."""

    def enter(step: list[str], report: int) -> None:
        step[0] = "enter the view"
        linux.setns(namespace, linux.CLONE_NEWNS)

    return _fork(lambda step, report, go: _view_child(step, program, enter, root, report, go))


def _fork(child: Callable[[list[str], int, int], None]) -> Forked:
    """Fork ``child(step, report, go)``; a failure in it is reported as ``step:errno``
    on ``report`` (exit 125)."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(report_r)
        os.close(go_w)
        step = ["start"]
        try:
            child(step, report_w, go_r)
        except OSError as exc:
            try:
                os.write(report_w, f"{step[0]}:{exc.errno or errno.EIO}".encode())
            finally:
                os._exit(125)
        except BaseException:  # noqa: BLE001 - the forked child must never return
            pass
        os._exit(125)
    os.close(report_w)
    os.close(go_r)
    return Forked(pid, report_r, go_w)


def _make_view(
    step: list[str], report: int, fuse_fd: int, root: bytes, mounts: list[Mount]
) -> None:
    """In the child: a mount namespace of its own, the view mounted at ``root`` (then
    MOUNTED on ``report``) and ``mounts`` over it."""
    step[0] = "unshare"
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount(None, b"/", None, linux.MS_REC | linux.MS_PRIVATE)
    step[0] = "mount the view"
    uid, gid = os.getuid(), os.getgid()
    options = b"fd=%d,rootmode=40000,user_id=%d,group_id=%d,allow_other,max_read=%d" % (
        fuse_fd, uid, gid, 1 << 20)  # fmt: skip
    # nosuid, nodev: a slave's setuid file or device node gives nothing on the master.
    linux.mount(b"fsys", root, b"fuse.fsys", linux.MS_NOSUID | linux.MS_NODEV, options)
    os.write(report, MOUNTED)  # /dev/fuse can be read from now on
    for m in mounts:
        step[0] = "mount " + m.target.decode(errors="replace")
        linux.mount(m.source, root + m.target, None, linux.MS_BIND | linux.MS_REC)


#: Reset in a program in the view (fsys-master ignores SIGINT and SIGQUIT, which the
#: terminal sends the program too; a kept session's trio loop handles others): the
#: defaults a program expects, as a shell gives them.
_DEFAULTS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD,
             signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH, signal.SIGPIPE,
             signal.SIGXFSZ)  # fmt: skip


def _view_child(
    step: list[str],
    program: Program,
    enter: Callable[[list[str], int], None],
    root: bytes,
    report: int,
    go: int,
) -> None:
    """Runs in the forked child: ``enter`` the view's namespace, chroot into it, install
    the filter, wait for ``go``, exec."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    limits = program.nofile or resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    if program.stdio is not None:
        for target, fd in enumerate(program.stdio):
            os.dup2(fd, target)
    for sig in _DEFAULTS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    if program.umask is not None:
        os.umask(program.umask)
    if program.group:
        os.setpgid(0, 0)
    enter(step, report)
    step[0] = "chroot"
    linux.chroot(root)
    try:
        os.chdir(program.cwd)
    except OSError:
        os.chdir(b"/")  # as the trap path: the slave's root when it lacks the directory
    step[0] = "install the filter"
    filt = ctypes.create_string_buffer(ALLOW_ALL, len(ALLOW_ALL))
    fprog = _SockFprog(1, ctypes.addressof(filt))
    syscall = _libc.syscall
    args = (ctypes.c_long(abi.SYS_SECCOMP), ctypes.c_long(abi.SECCOMP_SET_MODE_FILTER),
            ctypes.c_long(abi.SECCOMP_FILTER_FLAG_NEW_LISTENER),
            ctypes.c_void_p(ctypes.addressof(fprog)))  # fmt: skip
    if syscall(*args) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    os.close(report)  # the filter is in place: the parent takes the listener
    if not os.read(go, 1):
        os._exit(125)  # the parent gave up
    os.close(go)
    status = 126
    try:
        os.execve(program.path, program.argv, program.env)
    except OSError as exc:
        os.write(2, f"fsys-master: {program.path}: {exc.strerror}\n".encode())
        status = 127 if isinstance(exc, FileNotFoundError) else 126
    os._exit(status)


def view_failure(message: bytes) -> str:
    """What a child's report of ``step:errno`` says."""
    step, _, number = message.decode(errors="replace").rpartition(":")
    try:
        reason = os.strerror(int(number))
    except ValueError:
        reason = number
    return f"cannot set up the view ({step}): {reason}"
