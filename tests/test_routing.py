"""Routing: where each path and fd argument lives, decided from the table, the
placeholders and the policy alone (no slave)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsys.errors import Errno
from fsys.kmod.table import load
from fsys.linux import AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW
from fsys.master.calls import HANDLERS, sys_stat
from fsys.master.device import Notification
from fsys.master.placeholders import RemoteFile
from fsys.master.processes import Inherited
from fsys.master.routing import CONTINUE, Router, Target, Trapped
from tests.fakes import AT_FDCWD, FakeProcess, Rig

TABLE = load()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    yield rig
    rig.close()


def routed(rig: Rig, p: FakeProcess, name: str, *args: int | bytes) -> tuple[object, Trapped]:
    values = [p.mem.cstring(a) if isinstance(a, bytes) else a for a in args]
    regs = tuple(v & (2**64 - 1) for v in (*values, *[0] * (6 - len(values))))
    syscall = TABLE[name]
    process = rig.processes.for_tid(p.tid)
    call = Trapped(Notification(1, p.tid, syscall.nr, regs), syscall, process)
    return rig.hub.router.route(call), call


def placeholder(rig: Rig, p: FakeProcess, fd: int, handle: int, kind: int = 0o040000) -> None:
    app_end, _ = rig.placeholders.create(handle, kind)
    p.fds[fd] = f"socket:[{os.fstat(app_end.fileno()).st_ino}]"
    rig.listener.kept[(p.tgid, fd)] = app_end.detach()


def test_absolute_paths_follow_the_policy(rig: Rig) -> None:
    p = rig.process()
    decision, call = routed(rig, p, "stat", b"/usr/lib/x", 0)
    assert decision is None and call.side == "master"
    assert call.targets == (Target(False, 0, b"/usr/lib/x", b"/usr/lib/x"),)
    decision, call = routed(rig, p, "stat", b"/home/u/x", 0)
    assert decision is sys_stat
    assert call.targets == (Target(True, 0, b"/home/u/x", b"/home/u/x"),)
    decision, call = routed(rig, p, "stat", b"/usr/../home/x", 0)  # normalized for the policy
    assert decision is sys_stat


def test_relative_paths_follow_the_cwd(rig: Rig) -> None:
    rig.processes.initial = Inherited(b"/home/u", True, False)
    p = rig.process()
    decision, call = routed(rig, p, "stat", b"src/a.c", 0)
    assert decision is sys_stat
    assert call.targets == (Target(True, 0, b"/home/u/src/a.c", b"src/a.c"),)
    rig.processes.initial = Inherited(b"/usr", False, False)
    q = rig.process(200)
    decision, call = routed(rig, q, "stat", b"lib/x", 0)
    assert decision is None and call.targets[0].remote is False
    decision, call = routed(rig, q, "stat", b"../home/x", 0)
    assert decision is sys_stat and call.targets[0].path == b"/usr/../home/x"


def test_the_root_as_cwd_joins_without_a_double_slash(rig: Rig) -> None:
    rig.processes.initial = Inherited(b"/", True, False)
    p = rig.process()
    _, call = routed(rig, p, "stat", b"x", 0)
    assert call.targets[0].path == b"/x"


def test_a_dirfd_placeholder_makes_the_path_relative_to_its_handle(rig: Rig) -> None:
    p = rig.process()
    placeholder(rig, p, 5, handle=42)
    decision, call = routed(rig, p, "newfstatat", 5, b"a/b", 0, 0)
    assert decision is sys_stat
    assert call.targets == (Target(True, 42, b"a/b", b"a/b"),)
    p.fds[6] = "/usr"  # a master directory
    decision, call = routed(rig, p, "newfstatat", 6, b"a/b", 0, 0)
    assert decision is None
    decision, call = routed(rig, p, "newfstatat", 6, b"/home/x", 0, 0)  # absolute wins
    assert decision is sys_stat and call.targets[0].dir == 0


def test_an_empty_path_names_the_dirfd_or_the_cwd(rig: Rig) -> None:
    rig.processes.initial = Inherited(b"/home/u", True, False)
    p = rig.process()
    placeholder(rig, p, 5, handle=42)
    _, call = routed(rig, p, "newfstatat", 5, b"", 0, AT_EMPTY_PATH)
    assert call.targets == (Target(True, 42, b"", b"", False),)
    _, call = routed(rig, p, "newfstatat", AT_FDCWD, b"", 0, AT_EMPTY_PATH)
    assert call.targets == (Target(True, 0, b"/home/u", b"", False),)
    decision, call = routed(rig, p, "newfstatat", AT_FDCWD, b"", 0, AT_SYMLINK_NOFOLLOW)
    assert decision is None  # no AT_EMPTY_PATH: the kernel's ENOENT
    p.fds[6] = "/usr"
    decision, call = routed(rig, p, "newfstatat", 6, b"", 0, AT_EMPTY_PATH)
    assert decision is None


def test_utimensat_with_a_null_path_names_its_fd(rig: Rig) -> None:
    p = rig.process()
    placeholder(rig, p, 5, handle=42, kind=0o100000)
    decision, call = routed(rig, p, "utimensat", 5, 0, 0, 0)
    assert decision is HANDLERS["utimensat"]
    assert call.targets == (Target(True, 42, b"", b"", True),)
    rig.processes.initial = Inherited(b"/usr", False, False)
    q = rig.process(200)
    decision, call = routed(rig, q, "utimensat", AT_FDCWD, 0, 0, 0)
    assert decision is None and call.targets[0].null


def test_a_null_path_is_not_read(rig: Rig) -> None:
    p = rig.process()
    with pytest.raises(Errno) as caught:
        routed(rig, p, "newfstatat", AT_FDCWD, 0, 0, 0)  # NULL without AT_EMPTY_PATH
    assert caught.value.errno == errno.EFAULT


def test_fd_calls_look_up_each_fd(rig: Rig) -> None:
    p = rig.process()
    placeholder(rig, p, 3, handle=7, kind=0o100000)
    p.fds[4] = "pipe:[99]"
    decision, call = routed(rig, p, "copy_file_range", 3, 0, 4, 0, 10, 0)
    assert decision is HANDLERS["copy_file_range"]
    assert [f.handle if f else None for f in call.files] == [7, None]
    decision, call = routed(rig, p, "copy_file_range", 4, 0, 4, 0, 10, 0)
    assert decision is None and call.files == (None, None)
    decision, call = routed(rig, p, "read", -1, 0, 0)
    assert decision is None


def test_hub_calls_always_run_their_handler(rig: Rig) -> None:
    p = rig.process()
    decision, _ = routed(rig, p, "umask", 0o22)
    assert decision is HANDLERS["umask"]
    decision, _ = routed(rig, p, "exit_group", 0)
    assert decision is HANDLERS["exit_group"]


def test_a_remote_call_without_a_handler_gets_the_tables_errno(rig: Rig) -> None:
    p = rig.process()
    placeholder(rig, p, 3, handle=7, kind=0o100000)
    decision, call = routed(rig, p, "sendto", 3, 0, 0)
    assert decision == -errno.ENOTSOCK
    assert (call.side, call.note) == ("hub", "not forwarded")


def test_staged_names_are_the_masters(rig: Rig) -> None:
    rig.processes.initial = Inherited(b"/home/u", True, True)
    p = rig.process()
    rig.processes.for_tid(p.tid).staged_names = frozenset({b".home/u/run"})
    decision, _ = routed(rig, p, "openat", AT_FDCWD, b".home/u/run", 0, 0)
    assert decision is None
    decision, _ = routed(rig, p, "openat", AT_FDCWD, b".home/u/other", 0, 0)
    assert decision is HANDLERS["openat"]


def test_a_joined_path_too_long_is_enametoolong(rig: Rig) -> None:
    rig.processes.initial = Inherited(b"/home/" + b"d" * 100, True, False)
    p = rig.process()
    with pytest.raises(Errno) as caught:
        routed(rig, p, "stat", b"x" * 4000, 0)
    assert caught.value.errno == errno.ENAMETOOLONG
    rig.processes.initial = Inherited(b"/usr", False, False)
    q = rig.process(200)
    with pytest.raises(Errno):
        routed(rig, q, "stat", b"../" + b"x" * 4090, 0)
    decision, _ = routed(rig, q, "stat", b"x" * 4000, 0)  # stays on the master: its limit
    assert decision is None


def test_router_needs_only_policy_placeholders_and_handlers(rig: Rig) -> None:
    router = Router(policy=rig.policy, placeholders=rig.placeholders, handlers={})
    p = rig.process()
    syscall = TABLE["stat"]
    process = rig.processes.for_tid(p.tid)
    regs = (p.mem.cstring(b"/home/x"), 0, 0, 0, 0, 0)
    call = Trapped(Notification(1, p.tid, syscall.nr, regs), syscall, process)
    assert router.route(call) == -errno.EIO  # no handler: the table's errno for stat


def test_every_branch_places_the_path_exactly(rig: Rig) -> None:
    """Each way a path is placed, as a whole Target: side, handle, path sent, shown."""
    rig.processes.initial = Inherited(b"/home/u", True, True)
    p = rig.process()
    placeholder(rig, p, 5, handle=42)
    p.fds[6] = "/usr"
    rig.processes.for_tid(p.tid).staged_names = frozenset({b"run"})
    cases: list[tuple[tuple[int | bytes, ...], str, Target]] = [
        ((AT_FDCWD, b"", 0, 0), "newfstatat", Target(False, 0, b"", b"", False)),
        ((6, b"", 0, AT_EMPTY_PATH), "newfstatat", Target(False, 0, b"", b"", False)),
        ((AT_FDCWD, b"run", 0, 0), "newfstatat", Target(False, 0, b"", b"run", False)),
        ((AT_FDCWD, b"src", 0, 0), "newfstatat", Target(True, 0, b"/home/u/src", b"src")),
        ((6, b"lib", 0, 0), "newfstatat", Target(False, 0, b"", b"lib", False)),
        ((5, b"lib", 0, 0), "newfstatat", Target(True, 42, b"lib", b"lib")),
        ((AT_FDCWD, b"", 0, AT_EMPTY_PATH), "newfstatat", Target(True, 0, b"/home/u", b"")),
    ]
    for args, name, want in cases:
        _, call = routed(rig, p, name, *args)
        assert call.targets == (want,), (args, call.targets)
    rig.processes.initial = Inherited(b"/usr", False, False)
    q = rig.process(200)
    _, call = routed(rig, q, "newfstatat", AT_FDCWD, b"", 0, AT_EMPTY_PATH)
    assert call.targets == (Target(False, 0, b"", b"", False),)
    _, call = routed(rig, q, "newfstatat", AT_FDCWD, b"lib", 0, 0)
    assert call.targets == (Target(False, 0, b"", b"lib", False),)
    _, call = routed(rig, q, "newfstatat", AT_FDCWD, b"../home", 0, 0)
    assert call.targets == (Target(True, 0, b"/usr/../home", b"../home"),)


def test_the_flags_argument_is_read_only_where_the_table_has_one(rig: Rig) -> None:
    rig.processes.initial = Inherited(b"/home/u", True, False)
    p = rig.process()
    # stat has no flags argument: a 1 (or AT_EMPTY_PATH) in its second register means
    # nothing, and an empty path is the kernel's ENOENT on the master.
    decision, call = routed(rig, p, "stat", b"", AT_EMPTY_PATH)
    assert decision is None and call.targets == (Target(False, 0, b"", b"", False),)


def test_a_joined_path_at_the_limit(rig: Rig) -> None:
    rig.processes.initial = Inherited(b"/h", True, False)
    p = rig.process()
    fits = b"x" * (4096 - len(b"/h/") - 1)  # 4095 bytes joined: one short of PATH_MAX
    _, call = routed(rig, p, "stat", fits, 0)
    assert len(call.targets[0].path) == 4095
    with pytest.raises(Errno) as caught:
        routed(rig, p, "stat", fits + b"x", 0)
    assert caught.value.errno == errno.ENAMETOOLONG
    rig.processes.initial = Inherited(b"/usr", False, False)
    q = rig.process(200)
    up = b"../h/" + b"x" * (4096 - len(b"/usr/../h/") - 1)
    _, call = routed(rig, q, "stat", up, 0)
    assert len(call.targets[0].path) == 4095
    with pytest.raises(Errno) as caught:
        routed(rig, q, "stat", up + b"x", 0)
    assert caught.value.errno == errno.ENAMETOOLONG


# --- links that name fds and the working directory ---------------------------------


@pytest.mark.parametrize(
    "link",
    [b"/proc/self/fd/5", b"/proc/thread-self/fd/5", b"/proc/100/fd/5",
     b"/proc/100/task/100/fd/5", b"/dev/fd/5"],
)  # fmt: skip
def test_an_fd_link_of_a_placeholder_is_its_remote_file(rig: Rig, link: bytes) -> None:
    p = rig.process(100)
    placeholder(rig, p, 5, handle=7, kind=0o100000)
    decision, call = routed(rig, p, "chmod", link, 0o600)
    assert decision is HANDLERS["chmod"]
    assert call.targets == (Target(True, 7, b"", link, whole=True),)


def test_an_fd_link_names_what_is_under_a_directory_fd(rig: Rig) -> None:
    p = rig.process()
    placeholder(rig, p, 5, handle=7)
    _, call = routed(rig, p, "stat", b"/proc/self/fd/5//sub/f", 0)
    assert call.targets == (Target(True, 7, b"sub/f", b"/proc/self/fd/5//sub/f"),)


def test_the_stdio_links(rig: Rig) -> None:
    p = rig.process()
    placeholder(rig, p, 0, handle=3)
    placeholder(rig, p, 2, handle=4)
    _, call = routed(rig, p, "stat", b"/dev/stdin", 0)
    assert call.targets[0] == Target(True, 3, b"", b"/dev/stdin", whole=True)
    _, call = routed(rig, p, "stat", b"/dev/stderr", 0)
    assert call.targets[0].dir == 4
    decision, call = routed(rig, p, "stat", b"/dev/stdout", 0)  # fd 1 is the master's
    assert decision is None and not call.targets[0].remote


def test_a_call_on_the_link_itself_is_the_kernels(rig: Rig) -> None:
    p = rig.process()
    placeholder(rig, p, 5, handle=7)
    decision, _ = routed(rig, p, "lstat", b"/proc/self/fd/5", 0)
    assert decision is None
    decision, _ = routed(rig, p, "newfstatat", AT_FDCWD, b"/proc/self/fd/5", 0,
                         AT_SYMLINK_NOFOLLOW)  # fmt: skip
    assert decision is None
    decision, _ = routed(rig, p, "newfstatat", AT_FDCWD, b"/proc/self/fd/5", 0, 0)
    assert decision is sys_stat


def test_fd_links_that_are_not_placeholders_are_the_masters(rig: Rig) -> None:
    p = rig.process()
    placeholder(rig, p, 5, handle=7)
    p.fds[6] = "pipe:[9]"
    for link in (b"/proc/self/fd/6", b"/proc/self/fd/8", b"/proc/self/fdinfo/5",
                 b"/dev/fdx/5", b"/proc/self/fd/"):  # fmt: skip
        decision, call = routed(rig, p, "stat", link, 0)
        assert decision is None and not call.targets[0].remote, link
    other = rig.process(300)  # another process's fd 5 is not ours
    decision, _ = routed(rig, other, "stat", b"/proc/self/fd/5", 0)
    assert decision is None
    decision, call = routed(rig, other, "stat", b"/proc/100/fd/5", 0)  # but by its pid: yes
    assert decision is sys_stat and call.targets[0].dir == 7


def test_proc_self_cwd_of_a_slave_directory(rig: Rig) -> None:
    rig.processes.initial = Inherited(b"/home/u", True, False)
    p = rig.process(100)
    for link in (b"/proc/self/cwd", b"/proc/thread-self/cwd", b"/proc/100/cwd"):
        _, call = routed(rig, p, "readlink", link, 0, 64)
        assert call.targets == (Target(True, 0, b"/home/u", b"/proc/self/cwd", whole=True),)
    _, call = routed(rig, p, "stat", b"/proc/self/cwd/src/a.c", 0)
    assert call.targets == (Target(True, 0, b"/home/u/src/a.c", b"/proc/self/cwd/src/a.c"),)
    decision, _ = routed(rig, p, "stat", b"/proc/1/cwd", 0)  # another process's
    assert decision is None
    rig.processes.initial = Inherited(b"/usr", False, False)
    q = rig.process(200)
    decision, _ = routed(rig, q, "stat", b"/proc/self/cwd", 0)  # a master cwd
    assert decision is None


def test_continue_shows_as_its_name() -> None:
    assert repr(CONTINUE) == "CONTINUE"  # in traces and test failures


def stream(rig: Rig, p: FakeProcess, fd: int, handle: int) -> RemoteFile:
    """A pumped stream's placeholder at the fake process's ``fd``; its record."""
    from fsys.master.streams import Stream

    app_end, remote = rig.placeholders.create(handle, 0o020000, stream=True)
    p.fds[fd] = f"socket:[{os.fstat(app_end.fileno()).st_ino}]"
    remote.stream = Stream(rig.hub.link, remote, app_end, rig.hub.wake)
    rig.hub.streams[handle] = remote.stream
    rig.hub.router.terminal = remote
    return remote


def test_a_streams_data_calls_run_natively_and_its_control_calls_are_forwarded(
    rig: Rig,
) -> None:
    p = rig.process()
    remote = stream(rig, p, 0, 7)
    for name, args in [
        ("read", (0, 0, 10)),
        ("write", (0, 0, 10)),
        ("writev", (0, 0, 1)),
        ("fcntl", (0, 4, 0)),
        ("lseek", (0, 0, 0)),
        ("sendfile", (5, 0, 0, 9)),
    ]:
        decision, call = routed(rig, p, name, *args)
        assert decision is None and call.side == "master", name  # fmt: skip
    assert routed(rig, p, "ioctl", 0, 0x5401, 0)[0] is HANDLERS["ioctl"]
    assert routed(rig, p, "fstat", 0, 0)[0] is HANDLERS["fstat"]
    assert routed(rig, p, "fchmod", 0, 0o600)[0] is HANDLERS["fchmod"]
    assert remote.stream is not None
    remote.stream.write_closed = True  # the slave refused a write: fmhub answers them
    assert routed(rig, p, "write", 0, 0, 10)[0] is HANDLERS["write"]
    assert routed(rig, p, "read", 0, 0, 10)[0] is None


def test_dev_tty_and_the_terminals_slave_name_lead_to_the_lent_terminal(rig: Rig) -> None:
    p = rig.process()
    stream(rig, p, 0, 7)
    rig.hub.router.terminal_names = frozenset({b"/dev/tty", b"/dev/pts/9"})
    for path in (b"/dev/tty", b"/dev/pts/9"):
        _, call = routed(rig, p, "openat", AT_FDCWD, path, os.O_RDWR, 0)
        assert call.targets == (Target(True, 7, b"", path, whole=True),)
    _, call = routed(rig, p, "openat", AT_FDCWD, b"/dev/pts/8", os.O_RDWR, 0)
    assert call.targets[0].remote is False  # another terminal: the master's
