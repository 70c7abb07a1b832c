"""The process model against a fake /proc: inheritance at fork, sealing, chdir
read-back, exec, exits, and the pairings' task tree."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from fsys import linux
from fsys.errors import Errno
from fsys.master.memory import TargetMemory
from fsys.master.processes import SIGNAL_QUEUE, Inherited, Process, Processes, ProcFS
from tests.fakes import FakeProc

SLAVE_DATA = Inherited(b"/data", True, False)


@asynccontextmanager
async def served(processes: Processes) -> AsyncIterator[trio.Nursery]:
    """The session's nursery, serving the pairings' task tree, cancelled at the end."""
    async with trio.open_nursery() as nursery:
        await nursery.start(processes.serve)
        yield nursery
        nursery.cancel_scope.cancel()


def model(*, initial: Inherited = SLAVE_DATA) -> tuple[FakeProc, Processes, list[Process]]:
    procfs = FakeProc()
    exited: list[Process] = []
    processes = Processes(procfs, on_exit=exited.append)
    processes.initial = initial
    return procfs, processes, exited


def test_the_first_process_starts_in_the_initial_state() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1, umask=0o027)
    p = processes.for_tid(10)
    assert (p.tgid, p.id, p.parent, p.umask) == (10, 1, None, 0o027)
    assert p.inheritable() == SLAVE_DATA
    assert processes.for_tid(10) is p
    assert len(processes) == 1 and list(processes) == [p]


def test_a_gone_task_is_esrch() -> None:
    _, processes, _ = model()
    with pytest.raises(Errno) as caught:
        processes.for_tid(77)
    assert caught.value.errno == errno.ESRCH


def test_a_thread_joins_its_process() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1)
    procfs.add(11, 10, 1)
    p = processes.for_tid(10)
    assert processes.for_tid(11) is p
    assert p.tids == {10, 11}
    processes.thread_exit(11)
    assert p.tids == {10} and 11 not in processes.by_tid
    processes.thread_exit(11)  # twice is harmless


def test_a_child_forked_before_a_chdir_keeps_the_old_directory() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1)
    parent = processes.for_tid(10)
    procfs.add(20, 20, 10, start=555)  # forked, no call yet
    processes.chdir_remote(parent, b"/data/sub")
    procfs.add(21, 21, 10)  # forked after the chdir
    early, late = processes.for_tid(20), processes.for_tid(21)
    assert early.cwd == b"/data" and late.cwd == b"/data/sub"
    assert early.parent is parent and late.parent is parent
    assert 20 not in processes.births  # a record is used once


def test_a_reused_pid_does_not_take_an_old_record() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1)
    parent = processes.for_tid(10)
    procfs.add(20, 20, 10, start=555)
    processes.chdir_remote(parent, b"/data/sub")  # seals 20 with /data
    procfs.exit(20)
    procfs.add(20, 20, 10, start=999)  # another process got pid 20 after the chdir
    assert processes.for_tid(20).cwd == b"/data/sub"


def test_sealing_again_keeps_the_state_at_fork() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1)
    parent = processes.for_tid(10)
    procfs.add(20, 20, 10, start=5)
    processes.chdir_remote(parent, b"/data/a")
    processes.chdir_remote(parent, b"/data/b")  # 20 is sealed already: still /data
    assert processes.for_tid(20).cwd == b"/data"


def test_an_orphan_finds_its_record_after_its_parent_exited() -> None:
    procfs, processes, exited = model()
    procfs.add(10, 10, 1)
    parent = processes.for_tid(10)
    processes.chdir_remote(parent, b"/data/x")
    procfs.add(20, 20, 10, start=5)
    processes.exit_group(parent)  # seals 20 with /data/x
    processes._exited(parent)
    assert exited == [parent] and parent.closed
    procfs.tasks[20].ppid = 1  # reparented to init
    orphan = processes.for_tid(20)
    assert orphan.cwd == b"/data/x" and orphan.parent is None


def test_a_grandchild_inherits_through_a_silent_parent() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1)
    top = processes.for_tid(10)
    processes.chdir_remote(top, b"/data/t")
    procfs.add(20, 20, 10)  # never makes a call
    procfs.add(30, 30, 20)
    assert processes.for_tid(30).cwd == b"/data/t"


def test_a_master_chdir_is_adopted_once_the_kernel_moved() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1, cwd=((1, 1), b"/"))
    p = processes.for_tid(10)
    processes.chdir_master(p, 10, b"/usr/lib")
    assert p.pending_cwd is not None and p.cwd == b"/usr/lib" and not p.cwd_remote
    procfs.tasks[10].cwd = ((8, 9), b"/usr/lib64")  # as the kernel resolved it
    processes.on_call(p, 10)
    assert p.pending_cwd is None and p.inheritable() == Inherited(b"/usr/lib64", False, False)


def test_a_refused_master_chdir_restores_the_previous_state() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1, cwd=((1, 1), b"/stage"))
    procfs.add(11, 10, 1, cwd=((1, 1), b"/stage"))
    p = processes.for_tid(10)
    processes.chdir_master(p, 10, b"/usr/nope")
    processes.on_call(p, 11)  # another thread: its chdir may not have run yet
    assert p.pending_cwd is not None
    processes.on_call(p, 10)  # the caller itself, unmoved: the kernel refused
    assert p.pending_cwd is None and p.inheritable() == SLAVE_DATA


def test_back_into_the_master_directory_the_kernel_never_left() -> None:
    # cd /usr/bin; cd /data; cd /usr/bin: the kernel stayed in /usr/bin meanwhile.
    procfs, processes, _ = model()
    procfs.add(10, 10, 1, cwd=((5, 6), b"/usr/bin"))
    procfs.identities[b"/usr/bin"] = (5, 6)
    p = processes.for_tid(10)
    processes.chdir_remote(p, b"/data")
    processes.chdir_master(p, 10, b"/usr/bin")
    processes.on_call(p, 10)  # unmoved, yet not refused
    assert p.pending_cwd is None and p.inheritable() == Inherited(b"/usr/bin", False, False)


def test_a_child_of_a_pending_chdir_settles_it_first() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1, cwd=((1, 1), b"/"))
    p = processes.for_tid(10)
    processes.chdir_master(p, 10, b"/usr")
    procfs.tasks[10].cwd = ((3, 4), b"/usr")
    procfs.add(20, 20, 10)
    assert processes.for_tid(20).inheritable() == Inherited(b"/usr", False, False)


def test_a_master_chdir_of_a_vanished_thread_changes_nothing() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1)
    p = processes.for_tid(10)
    del procfs.tasks[10]
    processes.chdir_master(p, 10, b"/usr")
    assert p.pending_cwd is None and p.inheritable() == SLAVE_DATA


def test_exec_forgets_the_other_threads_and_restores_argv0() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1)
    procfs.add(11, 10, 1)
    p = processes.for_tid(10)
    processes.for_tid(11)
    p.staged_names = frozenset({b".x"})
    processes.exec_started(p)
    assert p.staged_names == frozenset()
    name = procfs.memory(10).cstring(b".data/tool")
    procfs.arg_starts[10] = 0x1000
    processes.exec_staged(p, staged_names=frozenset({b".w"}), argv0_fix=(name, 0x1000))
    assert p.exec_pending and p.staged_names == frozenset({b".w"})
    processes.on_call(p, 11)  # not the leader: nothing yet
    assert p.exec_pending
    new_arg = procfs.memory(10).alloc(b"xdata/tool\0")
    procfs.arg_starts[10] = new_arg
    processes.on_call(p, 10)
    assert not p.exec_pending and p.tids == {10} and p.argv0_fix is None
    assert procfs.memory(10).bytes_at(new_arg, 2) == b"/d"


def test_a_failed_exec_restores_the_callers_own_string() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1)
    p = processes.for_tid(10)
    mem = procfs.memory(10)
    name = mem.cstring(b".data/tool")
    procfs.arg_starts[10] = 0x1000
    processes.exec_staged(p, staged_names=frozenset(), argv0_fix=(name, 0x1000))
    processes.on_call(p, 10)  # same arg_start: the old image goes on
    assert mem.bytes_at(name, 2) == b"/d" and mem.rewritten == [(name, b"/")]


def test_umask_keeps_the_permission_bits() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1)
    p = processes.for_tid(10)
    processes.set_umask(p, 0o7077)
    assert p.umask == 0o077


def test_old_birth_records_are_pruned() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1)
    p = processes.for_tid(10)
    processes.births = {1000 + i: (SLAVE_DATA, 7) for i in range(4097)}  # all long gone
    procfs.add(20, 20, 10, start=3)
    processes.seal(p)
    assert processes.births == {20: (SLAVE_DATA, 3)}


# --- the task tree ------------------------------------------------------------------


async def test_each_pairing_is_a_task_in_its_parents_nursery() -> None:
    procfs, processes, exited = model()
    async with served(processes):
        procfs.add(10, 10, 1)
        parent = processes.for_tid(10)
        procfs.add(20, 20, 10)
        child = processes.for_tid(20)
        await trio.testing.wait_all_tasks_blocked()
        assert parent.nursery is not None and child.nursery is not None
        serving = [t.name for t in parent.nursery.child_tasks]
        assert any("_serve_process" in name for name in serving)  # the child's task
        assert parent.pidfd == 10_010 and child.pidfd == 10_020
        procfs.exit(20)
        await trio.testing.wait_all_tasks_blocked()
        assert exited == [child] and child.closed and 10_020 in procfs.closed_pidfds
        assert 20 not in processes.by_tgid
        procfs.exit(10)
        await trio.testing.wait_all_tasks_blocked()
        assert exited == [child, parent]


async def test_an_orphan_is_adopted_and_lives_on() -> None:
    procfs, processes, exited = model()
    async with served(processes):
        procfs.add(10, 10, 1)
        parent = processes.for_tid(10)
        procfs.add(20, 20, 10)
        child = processes.for_tid(20)
        await trio.testing.wait_all_tasks_blocked()
        procfs.exit(10)
        await trio.testing.wait_all_tasks_blocked()
        assert exited == [parent] and child.parent is None and not child.closed
        procfs.add(30, 30, 20)  # the orphan forks: its child's task joins its nursery
        grandchild = processes.for_tid(30)
        await trio.testing.wait_all_tasks_blocked()
        assert grandchild.parent is child and grandchild.pidfd == 10_030
        procfs.exit(20)
        procfs.exit(30)
        await trio.testing.wait_all_tasks_blocked()
        assert set(map(id, exited)) == {id(parent), id(child), id(grandchild)}


async def test_cancelling_a_pairing_ends_its_subtree() -> None:
    procfs, processes, exited = model()
    async with served(processes):
        procfs.add(10, 10, 1)
        procfs.add(20, 20, 10)
        procfs.add(30, 30, 1)
        parent, child, other = (processes.for_tid(t) for t in (10, 20, 30))
        await trio.testing.wait_all_tasks_blocked()
        processes.cancel(parent)
        await trio.testing.wait_all_tasks_blocked()
        assert parent.closed and child.closed and not other.closed
        assert {id(p) for p in exited} == {id(parent), id(child)}
    assert other.closed  # the session's end ends every pairing


async def test_signals_are_delivered_through_the_pidfd() -> None:
    procfs, processes, _ = model()
    async with served(processes):
        procfs.add(10, 10, 1)
        p = processes.for_tid(10)
        assert not p.signal_nowait(signal.SIGTERM)  # its task has not started yet
        await trio.testing.wait_all_tasks_blocked()
        assert p.signal_nowait(signal.SIGTERM) and p.signal_nowait(signal.SIGHUP)
        await trio.testing.wait_all_tasks_blocked()
        assert procfs.signals == [(10, signal.SIGTERM), (10, signal.SIGHUP)]
        procfs.exit(10)
        await trio.testing.wait_all_tasks_blocked()
        assert not p.signal_nowait(signal.SIGTERM)  # gone: nothing is queued


async def test_a_process_without_a_pidfd_is_watched_and_gets_no_signals() -> None:
    """Out of descriptors: its exit is still seen (ProcFS polls for it); a signal for it
    is not sent through any descriptor, and none is closed for it."""
    procfs, processes, exited = model()
    procfs.no_pidfd.add(10)
    async with served(processes):
        procfs.add(10, 10, 1)
        p = processes.for_tid(10)
        await trio.testing.wait_all_tasks_blocked()
        assert p.pidfd == -1 and not p.closed
        assert p.signal_nowait(signal.SIGTERM)
        await trio.testing.wait_all_tasks_blocked()
        assert procfs.signals == []
        procfs.exit(10)
        await trio.testing.wait_all_tasks_blocked()
        assert exited == [p] and p.closed and p.pidfd == -1
        assert procfs.closed_pidfds == []


async def test_a_pidfd_is_closed_once_its_process_ends() -> None:
    procfs, processes, exited = model()
    async with served(processes):
        procfs.add(10, 10, 1)
        p = processes.for_tid(10)
        await trio.testing.wait_all_tasks_blocked()
        assert p.pidfd == 10_010
        procfs.exit(10)
        await trio.testing.wait_all_tasks_blocked()
        assert exited == [p] and p.pidfd == -1 and procfs.closed_pidfds == [10_010]


async def test_a_process_gone_before_its_task_ran_is_closed() -> None:
    procfs, processes, exited = model()
    procfs.add(10, 10, 1)
    p = processes.for_tid(10)  # no nursery yet: it waits for the session's
    procfs.exit(10)
    async with served(processes):
        await trio.testing.wait_all_tasks_blocked()
        assert exited == [p] and p.closed


# --- the real /proc ---------------------------------------------------------------


def test_procfs_reads_the_kernels_view_of_this_process(tmp_path: Path) -> None:
    procfs = ProcFS()
    pid = os.getpid()
    umask = os.umask(0o027)
    try:
        assert procfs.status(pid) == (pid, os.getppid(), 0o027)
    finally:
        os.umask(umask)
    assert procfs.start_time(pid) > 0 and procfs.start_time(pid) == procfs.start_time(pid)
    assert procfs.arg_start(pid) > 0x1000
    st = os.stat(os.getcwd())
    assert procfs.cwd(pid) == ((st.st_dev, st.st_ino), os.fsencode(os.getcwd()))
    with open(tmp_path / "f", "w") as f:
        assert procfs.fd_path(pid, f.fileno()) == str(tmp_path / "f")
    assert procfs.fd_path(pid, 99999) is None
    assert procfs.exists(pid) and isinstance(procfs.memory(pid), TargetMemory)
    # arg_start: where the argument strings start, as /proc/<pid>/cmdline gives them.
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read()
    assert procfs.memory(pid).read(procfs.arg_start(pid), len(cmdline)) == cmdline
    # start_time: clock ticks since boot, not long before now for a process just started.
    child = subprocess.Popen(["sleep", "30"])
    try:
        with open("/proc/uptime") as f:
            now = float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK")
        assert now - 5 * os.sysconf("SC_CLK_TCK") < procfs.start_time(child.pid) <= now + 1
    finally:
        child.kill()
        child.wait()


def test_procfs_reads_stat_fields_after_a_command_name_with_parentheses(
    tmp_path: Path,
) -> None:
    """/proc/<pid>/stat's fields follow the last ")": the command name may hold others."""
    procfs = ProcFS()
    odd = tmp_path / "a) 1 2 (x) 3"  # the command name is the file's, up to 15 bytes
    odd.symlink_to("/bin/sleep")
    child = subprocess.Popen([str(odd), "30"])
    plain = subprocess.Popen(["sleep", "30"])
    try:
        for _ in range(100):  # until both have exec'd
            names = [Path(f"/proc/{p.pid}/comm").read_text() for p in (child, plain)]
            if names == ["a) 1 2 (x) 3\n", "sleep\n"]:
                break
            time.sleep(0.01)
        ticks = os.sysconf("SC_CLK_TCK")
        assert abs(procfs.start_time(child.pid) - procfs.start_time(plain.pid)) < 5 * ticks
        assert procfs.arg_start(child.pid) > 0x1000
        assert procfs.memory(child.pid).read(procfs.arg_start(child.pid), len(str(odd))) == (
            os.fsencode(odd)
        )
    finally:
        for p in (child, plain):
            p.kill()
            p.wait()


def test_procfs_takes_a_copy_of_a_process_fd(tmp_path: Path) -> None:
    """pidfd_getfd: the same open file description, through the process's pidfd or one
    opened (and closed) for the call; the process's own pidfd is left open."""
    procfs = ProcFS()
    pid = os.getpid()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    pidfd = procfs.pidfd(pid)
    try:
        for given in (pidfd, -1):
            before = sorted(os.listdir("/proc/self/fd"))
            copy = procfs.take_fd(pid, given, fd)
            try:
                assert copy != fd
                os.lseek(copy, 5, os.SEEK_SET)  # one description: one file position
                assert os.lseek(fd, 0, os.SEEK_CUR) == 5
                os.lseek(fd, 0, os.SEEK_SET)
            finally:
                os.close(copy)
            assert sorted(os.listdir("/proc/self/fd")) == before  # no pidfd left behind
            os.fstat(pidfd)  # still open
        with pytest.raises(OSError) as failure:
            procfs.take_fd(pid, pidfd, 99999)
        assert failure.value.errno == errno.EBADF
    finally:
        os.close(pidfd)
        os.close(fd)


def test_procfs_signals_one_thread() -> None:
    """tgkill: the signal reaches the thread named (here a process's only thread); a
    thread that is gone is no error."""
    procfs = ProcFS()
    child = subprocess.Popen(["sleep", "30"])
    try:
        procfs.signal_thread(os.getpid(), child.pid, 0)  # not one of our threads: ESRCH
        assert child.poll() is None
        procfs.signal_thread(child.pid, child.pid, signal.SIGTERM)
        assert child.wait(timeout=10) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()


def test_procfs_identity_is_the_file_as_the_process_sees_it(tmp_path: Path) -> None:
    procfs = ProcFS()
    (tmp_path / "f").write_bytes(b"")
    st = os.stat(tmp_path / "f")
    path = os.fsencode(tmp_path / "f")
    assert procfs.identity(os.getpid(), path) == (st.st_dev, st.st_ino)
    assert procfs.identity(os.getpid(), path + b"-none") is None


def test_closing_the_model_releases_every_memory_descriptor() -> None:
    processes = Processes(ProcFS())
    p = processes.for_tid(os.getpid())
    buf = ctypes.create_string_buffer(b"fsys")
    assert p.memory.read(ctypes.addressof(buf), 4) == b"fsys"  # its /proc/<pid>/mem open
    before = len(os.listdir("/proc/self/fd"))
    processes.close()
    assert len(os.listdir("/proc/self/fd")) == before - 1


def test_procfs_on_a_task_that_is_gone() -> None:
    procfs = ProcFS()
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(OSError):
        procfs.status(child.pid)
    assert procfs.start_time(child.pid) == -1 and procfs.arg_start(child.pid) == -1
    assert procfs.children(child.pid) is None and procfs.cwd(child.pid) is None
    assert not procfs.exists(child.pid)
    with pytest.raises(ProcessLookupError):
        procfs.pidfd(child.pid)


def test_procfs_sees_threads_and_children() -> None:
    procfs = ProcFS()
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in (procfs.children(os.getpid()) or [])
        tids: list[int] = []
        started, done = threading.Event(), threading.Event()

        def run() -> None:
            tids.append(threading.get_native_id())
            started.set()
            done.wait(10)

        thread = threading.Thread(target=run)
        thread.start()
        started.wait(10)
        try:
            tgid, _, _ = procfs.status(tids[0])
            assert tids[0] != os.getpid() and tgid == os.getpid()
        finally:
            done.set()
            thread.join()
    finally:
        child.kill()
        child.wait()


async def test_procfs_waits_and_signals_through_a_pidfd() -> None:
    procfs = ProcFS()
    child = subprocess.Popen(["sleep", "30"])
    pidfd = procfs.pidfd(child.pid)
    try:
        procfs.send_signal(pidfd, signal.SIGTERM)
        with trio.fail_after(10):
            await procfs.wait_exit(pidfd, child.pid)
        assert child.wait() == -signal.SIGTERM
    finally:
        procfs.close_fd(pidfd)
    with pytest.raises(OSError):
        os.fstat(pidfd)  # closed
    with trio.fail_after(10):
        await procfs.wait_exit(-1, child.pid)  # gone already: returns at once


async def test_children_waiting_for_a_parent_gone_before_its_task_ran_are_served() -> None:
    procfs, processes, exited = model()
    procfs.add(10, 10, 1)
    parent = processes.for_tid(10)
    procfs.add(20, 20, 10)
    child = processes.for_tid(20)  # its parent's task has not run: it waits on it
    assert parent.early == [child]
    procfs.exit(10)  # the parent is gone before its task opens its pidfd
    async with served(processes):
        await trio.testing.wait_all_tasks_blocked()
        assert exited == [parent] and child.parent is None
        assert child.pidfd == 10_020 and not child.closed  # served from the session
        procfs.exit(20)
        await trio.testing.wait_all_tasks_blocked()
        assert exited == [parent, child] and 20 not in processes.by_tgid


def test_a_threads_later_calls_do_not_read_proc() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1)
    procfs.add(11, 10, 1)
    p = processes.for_tid(10)
    assert processes.for_tid(11) is p
    reads = procfs.status_reads
    for tid in (10, 11, 10, 11):
        assert processes.for_tid(tid) is p
    assert procfs.status_reads == reads
    assert processes.by_tid[11] is p and processes.by_tid[10] is p


def test_a_leader_calling_after_its_thread_needs_no_proc_read() -> None:
    """A thread made the process; the leader's first call (its id is the tgid, as is the
    exec'ing thread's after an execve) joins it without reading /proc."""
    procfs, processes, _ = model()
    procfs.add(10, 10, 1)
    procfs.add(11, 10, 1)
    p = processes.for_tid(11)
    reads = procfs.status_reads
    assert processes.for_tid(10) is p
    assert procfs.status_reads == reads
    assert p.tids == {10, 11} and processes.by_tid[10] is p
    processes.thread_exit(10)
    assert p.tids == {11} and 10 not in processes.by_tid


def test_a_closed_process_is_not_returned_for_its_tids() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1)
    old = processes.for_tid(10)
    old.closed = True  # it exited; its pid is reused by a new process
    procfs.tasks[10].start = 2000
    new = processes.for_tid(10)
    assert new is not old and new.id == 2 and processes.by_tgid[10] is new


def test_an_ancestors_record_serves_each_descendant() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1)
    top = processes.for_tid(10)
    procfs.add(20, 20, 10, start=5)  # forked, silent
    processes.chdir_remote(top, b"/data/new")  # 20 is sealed with /data
    procfs.add(30, 30, 20)  # 20's child, forked before 20 changed anything
    assert processes.for_tid(30).cwd == b"/data"  # through 20's record, kept
    assert processes.for_tid(20).cwd == b"/data"  # 20 still finds its own


def test_a_parent_chain_that_cannot_be_read_gives_the_initial_state() -> None:
    procfs, processes, _ = model()
    procfs.add(30, 30, 20)  # its parent 20 is not in /proc any more
    assert processes.for_tid(30).inheritable() == SLAVE_DATA
    procfs.add(40, 40, 1)
    assert processes.for_tid(40).inheritable() == SLAVE_DATA
    assert processes.for_tid(40).parent is None


def test_an_exit_forgets_every_thread_of_the_process() -> None:
    procfs, processes, exited = model()
    procfs.add(10, 10, 1)
    procfs.add(11, 10, 1)
    p = processes.for_tid(10)
    processes.for_tid(11)
    processes._exited(p)
    assert processes.by_tid == {} and processes.by_tgid == {}
    processes._exited(p)
    assert exited == [p]  # once


def test_a_child_of_a_refused_chdir_inherits_the_state_before_it() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1, cwd=((1, 1), b"/stage"))
    p = processes.for_tid(10)
    processes.chdir_master(p, 10, b"/usr/nope")
    assert p.inheritable() == Inherited(b"/usr/nope", False, False)  # until read back
    procfs.add(20, 20, 10)  # the kernel refused: its kernel cwd did not move
    assert processes.for_tid(20).inheritable() == SLAVE_DATA


def test_sealing_skips_known_children_and_records_the_rest() -> None:
    procfs, processes, _ = model()
    procfs.add(10, 10, 1)
    p = processes.for_tid(10)
    procfs.add(20, 20, 10)
    processes.for_tid(20)  # a known process
    procfs.add(21, 21, 10, start=7)
    processes.seal(p)
    assert processes.births == {21: (SLAVE_DATA, 7)}


def test_the_default_initial_state_is_the_slaves_root() -> None:
    assert Processes(FakeProc()).initial == Inherited(b"/", True, False)


async def test_a_full_signal_queue_refuses_more() -> None:
    procfs, processes, _ = model()
    async with served(processes):
        procfs.add(10, 10, 1)
        p = processes.for_tid(10)
        await trio.testing.wait_all_tasks_blocked()
        # One goes straight to the waiting task, SIGNAL_QUEUE more are queued.
        assert all(p.signal_nowait(signal.SIGHUP) for _ in range(SIGNAL_QUEUE + 1))
        assert not p.signal_nowait(signal.SIGHUP)  # full: refused, not blocked on
        await trio.testing.wait_all_tasks_blocked()
        assert len(procfs.signals) == SIGNAL_QUEUE + 1


async def test_processes_made_after_the_session_are_kept_waiting() -> None:
    procfs, processes, _ = model()
    async with served(processes):
        pass
    procfs.add(10, 10, 1)
    p = processes.for_tid(10)  # no nursery to serve it: queued, no crash
    assert p.nursery is None and not p.closed


async def test_procfs_without_a_pidfd_polls_until_the_process_is_gone() -> None:
    procfs = ProcFS()
    child = subprocess.Popen(["sleep", "30"])
    done = trio.Event()

    async def wait() -> None:
        await procfs.wait_exit(-1, child.pid)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.sleep(0.2)
        assert not done.is_set()  # it is alive
        child.kill()
        child.wait()
        with trio.fail_after(5):
            await done.wait()


# --- a caught signal pending for a thread waiting in the filter (fmhub._watch_interrupts)

_CHILD = """
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda *a: None)            # caught
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2}) # blocked (and caught)
signal.signal(signal.SIGUSR2, lambda *a: None)
print("ready", flush=True)
time.sleep(60)
"""


def _stopped_child() -> subprocess.Popen[bytes]:
    """A child that catches SIGUSR1 and SIGUSR2 (blocked), stopped: what it is sent
    stays pending, as for a thread that waits in the filter."""
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == b"ready\n"
    os.kill(child.pid, signal.SIGSTOP)
    for _ in range(200):
        if _state(child.pid) == "T":
            break
        time.sleep(0.01)
    return child


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize(
    ("signum", "pending", "to_thread"),
    [(signal.SIGUSR1, True, False),   # caught, not blocked: the call is to be interrupted
     (signal.SIGUSR1, True, True),    # the same, sent to the thread (SigPnd, not ShdPnd)
     (signal.SIGUSR2, False, False),  # caught but blocked: it waits, as natively
     (signal.SIGTERM, False, False),  # not caught (default action): the kernel's business
     (0, False, False)],              # nothing pending
)  # fmt: skip
def test_a_caught_unblocked_pending_signal_is_seen(
    signum: int, pending: bool, to_thread: bool
) -> None:
    child = _stopped_child()
    try:
        procfs = ProcFS()
        assert not procfs.caught_signal_pending(child.pid, child.pid)
        if signum and to_thread:
            linux.tgkill(child.pid, child.pid, signum)
        elif signum:  # (sent to the process: with one thread, ShdPnd counts)
            os.kill(child.pid, signum)
        for _ in range(100):
            if procfs.caught_signal_pending(child.pid, child.pid) == pending:
                break
            time.sleep(0.01)
        assert procfs.caught_signal_pending(child.pid, child.pid) == pending
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
    assert not ProcFS().caught_signal_pending(child.pid, child.pid)  # gone: False
