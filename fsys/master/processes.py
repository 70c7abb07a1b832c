"""The process model: every master process's state, and every transition of it.

Theory of operation. Each process of the program has a *pairing*: its slave-side
context's id, and the state fmhub keeps for it — its working directory (a path and
the side it is on), its umask, its memory, an exec in progress. A process gets its
pairing at its first trapped call, found from the caller's tid (a thread joins its
process's pairing); fork, vfork, clone and clone3 run natively and cost nothing.

Inheritance is exact without trapping fork: the only calls that change what a child
inherits (chdir, fchdir) are trapped, and before one is applied the parent's
children are *sealed* — every child that exists at that moment is recorded with the
state it was forked with. exit_group seals too, so an orphan whose parent exited
finds its record. A child with no record was forked after its parent's last change
and inherits the parent's current state.

A chdir into a master directory is continued, so that the kernel decides with the
program's credentials; the model reads the kernel's working directory back (device
and inode before and after) at the process's next call, or before a child inherits
it, and adopts the directory or restores the previous state.

The task tree (DESIGN.md §5): each pairing is served by a task in its parent's
nursery (the session's for the first process), which lives as long as the process
and delivers the signals sent on the pairing's channel through the process's pidfd.
A child that outlives its parent is adopted by the session (its parent link is
dropped, as init adopts orphans), while its task stays in the nursery that started
it; cancelling a pairing's scope ends the pairings of its whole subtree.

Everything read from /proc goes through ``ProcFS``, so the model runs against a fake
/proc in tests.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import trio

from fsys import linux
from fsys.errors import Errno
from fsys.master.memory import TargetMemory

#: Signals queued for one pairing before a sender must wait (they are rare).
SIGNAL_QUEUE = 16
#: Sealed records kept for children that have not made a call yet, before pruning.
MAX_BIRTHS = 4096


class Inherited(NamedTuple):
    """What a child process takes from its parent at fork (fmhub's part of it)."""

    cwd: bytes
    cwd_remote: bool
    staged_cwd: bool  # the process's kernel cwd is the stage directory (staging.py)


class PendingChdir(NamedTuple):
    tid: int  # the thread that called chdir
    before: tuple[int, int]  # (st_dev, st_ino) of the kernel cwd before it
    previous: Inherited  # the state to restore if the kernel refused


class ProcFS:
    """What the model reads of the kernel: /proc and pidfds. Tests use a fake."""

    def status(self, tid: int) -> tuple[int, int, int]:
        """(Tgid, PPid, Umask) of task ``tid``. OSError or ValueError if it is gone."""
        with open(f"/proc/{tid}/status", "rb") as f:
            text = f.read()

        def value(name: bytes) -> bytes:
            start = text.index(name) + len(name)
            return text[start : text.index(b"\n", start)].strip()

        return int(value(b"\nTgid:")), int(value(b"\nPPid:")), int(value(b"\nUmask:"), 8)

    def stat_field(self, pid: int, number: int) -> int:
        """Field ``number`` (as proc(5) numbers them) of /proc/<pid>/stat; -1 if gone."""
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                # Fields from the third on follow the ")" that ends the command name.
                return int(f.read().rsplit(b")", 1)[1].split()[number - 3])
        except (OSError, IndexError, ValueError):
            return -1

    def start_time(self, pid: int) -> int:
        """When ``pid`` started (clock ticks since boot): pids are reused, this is not."""
        return self.stat_field(pid, 22)

    def arg_start(self, pid: int) -> int:
        """Where ``pid``'s argument strings start in its memory."""
        return self.stat_field(pid, 48)

    def caught_signal_pending(self, tgid: int, tid: int) -> bool:
        """Whether thread ``tid`` has a signal pending that it does not block and has a
        handler for: one sent to the thread, or to the process when the thread is its
        only one (with others, the kernel may give a process's signal to another)."""
        try:
            with open(f"/proc/{tgid}/task/{tid}/status", "rb") as f:
                text = f.read()
        except OSError:
            return False
        fields: dict[bytes, bytes] = {}
        for line in text.splitlines():
            key, _, value = line.partition(b":")
            fields[key] = value.strip()
        try:
            pending = int(fields[b"SigPnd"], 16)
            if fields[b"Threads"] == b"1":
                pending |= int(fields[b"ShdPnd"], 16)
            return bool(pending & ~int(fields[b"SigBlk"], 16) & int(fields[b"SigCgt"], 16))
        except (KeyError, ValueError):
            return False

    def children(self, pid: int) -> list[int] | None:
        """The children of every thread of ``pid``; None if it is gone."""
        task_dir = f"/proc/{pid}/task"
        try:
            tasks = os.listdir(task_dir)
        except OSError:
            return None
        out: list[int] = []
        for task in tasks:
            try:
                with open(f"{task_dir}/{task}/children") as f:
                    out.extend(map(int, f.read().split()))
            except OSError:
                continue
        return out

    def cwd(self, tid: int) -> tuple[tuple[int, int], bytes] | None:
        """((st_dev, st_ino), path) of the kernel working directory of ``tid``."""
        try:
            st = os.stat(f"/proc/{tid}/cwd")
            return (st.st_dev, st.st_ino), os.fsencode(os.readlink(f"/proc/{tid}/cwd"))
        except OSError:
            return None

    def take_fd(self, pid: int, pidfd: int, fd: int) -> int:
        """fmhub's own copy of ``pid``'s ``fd`` (the same open file description);
        OSError if it has none. ``pidfd``: the process's, or -1."""
        own = pidfd if pidfd >= 0 else os.pidfd_open(pid)
        try:
            return linux.pidfd_getfd(own, fd)
        finally:
            if own != pidfd:
                os.close(own)

    def identity(self, tid: int, path: bytes) -> tuple[int, int] | None:
        """(st_dev, st_ino) of ``path`` as ``tid`` sees it (its root), if it exists."""
        try:
            st = os.stat(b"/proc/%d/root" % tid + path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def fd_path(self, tid: int, fd: int) -> str | None:
        """What the program's ``fd`` names (readlink of /proc/<tid>/fd/N), if open."""
        try:
            return os.readlink(f"/proc/{tid}/fd/{fd}")
        except OSError:
            return None

    def memory(self, pid: int) -> TargetMemory:
        return TargetMemory(pid)

    def pidfd(self, pid: int) -> int:
        """A pidfd for ``pid``; ProcessLookupError if it is gone."""
        return os.pidfd_open(pid)

    def exists(self, pid: int) -> bool:
        return os.path.exists(f"/proc/{pid}")

    async def wait_exit(self, pidfd: int, pid: int) -> None:
        """Until ``pid`` (watched through ``pidfd``, or -1 if none could be had) exits."""
        if pidfd >= 0:
            await trio.lowlevel.wait_readable(pidfd)
            return
        while self.exists(pid):  # no descriptor to spare: look now and then
            await trio.sleep(0.5)

    def send_signal(self, pidfd: int, signum: int) -> None:
        signal.pidfd_send_signal(pidfd, signum)

    def signal_thread(self, tgid: int, tid: int, signum: int) -> None:
        """``signum`` to one thread, as the kernel sends it (SIGPIPE); none if gone."""
        try:
            linux.tgkill(tgid, tid, signum)
        except ProcessLookupError:
            pass

    def close_fd(self, fd: int) -> None:
        os.close(fd)


@dataclass(eq=False)
class Process:
    """One master process and its pairing with a slave-process context."""

    id: int
    tgid: int
    parent: Process | None
    cwd: bytes
    cwd_remote: bool
    staged_cwd: bool
    umask: int
    memory: TargetMemory
    staged_names: frozenset[bytes] = frozenset()  # names of its staged wrapper
    pending_cwd: PendingChdir | None = None  # a continued chdir, not read back yet
    # An execve was continued: other threads die in it, and an argv[0] that staging
    # rewrote is put back in the new image (see Processes.on_call).
    exec_pending: bool = False
    argv0_fix: tuple[int, int] | None = None  # (address of the rewritten byte, arg_start)
    tids: set[int] = field(default_factory=set)
    announced: bool = False  # the slave knows this pairing
    closed: bool = False
    # The task tree: the nursery of this pairing's task (None until it runs), children
    # whose task waits for it, the scope that ends the subtree, the signal channel.
    nursery: trio.Nursery | None = None
    early: list[Process] = field(default_factory=list)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    signals: trio.MemorySendChannel[int] | None = None
    pidfd: int = -1

    def inheritable(self) -> Inherited:
        return Inherited(self.cwd, self.cwd_remote, self.staged_cwd)

    def adopt(self, state: Inherited) -> None:
        self.cwd, self.cwd_remote, self.staged_cwd = state

    def signal_nowait(self, signum: int) -> bool:
        """Queue ``signum`` for delivery to this process; False if it cannot be queued."""
        if self.signals is None or self.closed:
            return False
        try:
            self.signals.send_nowait(signum)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True


class Processes:
    """Every process of the session, by tgid and tid, and their transitions.

    ``on_exit`` runs once for each pairing when its process is gone (fmhub tells the
    slave). ``serve`` runs the root of the task tree.
    """

    def __init__(
        self,
        procfs: ProcFS | None = None,
        *,
        on_exit: Callable[[Process], None] | None = None,
    ) -> None:
        self.procfs = procfs or ProcFS()
        self.on_exit = on_exit
        self.by_tgid: dict[int, Process] = {}
        self.by_tid: dict[int, Process] = {}
        self.initial = Inherited(b"/", True, False)
        # child pid -> (state at its fork, its start time: pids are reused)
        self.births: dict[int, tuple[Inherited, int]] = {}
        self.created = 0  # pairings created; the last one's id
        self._root: trio.Nursery | None = None
        self._waiting: list[Process] = []  # created before the root nursery ran

    def __len__(self) -> int:
        return len(self.by_tgid)

    def __iter__(self) -> Iterator[Process]:
        return iter(list(self.by_tgid.values()))

    # --- the task tree ------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The session's nursery: the root of the pairings' task tree."""
        try:
            async with trio.open_nursery() as nursery:
                self._root = nursery
                for process in self._waiting:
                    nursery.start_soon(self._serve_process, process)
                self._waiting.clear()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._root = None

    def _spawn(self, process: Process) -> None:
        """Start ``process``'s task in its parent's nursery (or the session's)."""
        parent = process.parent
        if parent is not None and not parent.closed:
            if parent.nursery is None:
                parent.early.append(process)
            else:
                parent.nursery.start_soon(self._serve_process, process)
        elif self._root is not None:
            self._root.start_soon(self._serve_process, process)
        else:
            self._waiting.append(process)

    async def _serve_process(self, process: Process) -> None:
        """A pairing's task: lives as long as its process, delivers its signals, and
        holds the tasks of the children forked while it lived."""
        try:
            process.pidfd = self.procfs.pidfd(process.tgid)
        except ProcessLookupError:
            process.pidfd = -1
            self._exited(process)  # gone before its task ran
            return
        except OSError:
            process.pidfd = -1  # cannot watch it (out of descriptors?): look now and then
        send, receive = trio.open_memory_channel[int](SIGNAL_QUEUE)
        process.signals = send
        try:
            with process.scope:
                async with trio.open_nursery() as nursery:
                    process.nursery = nursery
                    for child in process.early:
                        nursery.start_soon(self._serve_process, child)
                    process.early.clear()
                    nursery.start_soon(self._deliver_signals, process, receive)
                    await self.procfs.wait_exit(process.pidfd, process.tgid)
                    self._release(process, send)
                    # The children's tasks keep this nursery open until they end.
        finally:
            self._release(process, send)

    def _release(self, process: Process, signals: trio.MemorySendChannel[int]) -> None:
        self._exited(process)
        signals.close()  # ends the signal task
        if process.pidfd >= 0:
            self.procfs.close_fd(process.pidfd)
            process.pidfd = -1

    async def _deliver_signals(
        self, process: Process, receive: trio.MemoryReceiveChannel[int]
    ) -> None:
        async with receive:
            async for signum in receive:
                if process.pidfd >= 0 and not process.closed:
                    try:
                        self.procfs.send_signal(process.pidfd, signum)
                    except ProcessLookupError:
                        return

    def _exited(self, process: Process) -> None:
        """``process`` is gone: its pairing closes, its children are adopted."""
        if process.closed:
            return
        process.closed = True
        process.memory.forget()
        for tid in process.tids:
            if self.by_tid.get(tid) is process:
                del self.by_tid[tid]
        if self.by_tgid.get(process.tgid) is process:
            del self.by_tgid[process.tgid]
        for other in self.by_tgid.values():
            if other.parent is process:
                other.parent = None  # adopted by the session, as init adopts orphans
        early, process.early = process.early, []
        for child in early:  # its task never ran: the session's nursery takes them
            self._spawn(child)
        if self.on_exit is not None:
            self.on_exit(process)

    def cancel(self, process: Process) -> None:
        """End ``process``'s pairing and those of its whole subtree (the processes whose
        tasks its task started, orphans it left included)."""
        process.scope.cancel()

    # --- finding a caller's process -----------------------------------------------------

    def for_tid(self, tid: int) -> Process:
        """The process of the calling thread ``tid``; created at its first call.

        Raises Errno(ESRCH) if the task is gone.
        """
        process = self.by_tid.get(tid)
        if process is not None and not process.closed:
            return process
        process = self.by_tgid.get(tid)
        if process is not None and not process.closed:
            # A live process's own id: the caller is its leader (after an execve the
            # exec'ing thread takes that id), no need to ask /proc.
            process.tids.add(tid)
            self.by_tid[tid] = process
            return process
        try:
            tgid, ppid, umask = self.procfs.status(tid)
        except (OSError, ValueError) as exc:
            raise Errno(errno.ESRCH) from exc
        process = self.by_tgid.get(tgid)
        if process is None or process.closed:
            parent = self.by_tgid.get(ppid)
            if parent is not None and parent.closed:
                parent = None
            state = self._inherited(tgid, ppid)
            self.created += 1
            process = Process(
                id=self.created, tgid=tgid, parent=parent, cwd=state.cwd,
                cwd_remote=state.cwd_remote, staged_cwd=state.staged_cwd, umask=umask,
                memory=self.procfs.memory(tgid),
            )  # fmt: skip
            self.by_tgid[tgid] = process
            self._spawn(process)
        process.tids.add(tid)
        self.by_tid[tid] = process
        return process

    def _inherited(self, pid: int, ppid: int) -> Inherited:
        """What the new process ``pid`` took from its parent at fork.

        Its sealed record if there is one (and is for this process: a pid can be
        reused); else its parent's current state, the parent being a known process or,
        walking up, a process that made no trapped call yet (and so changed nothing).
        """
        own = pid
        for _ in range(64):
            record = self.births.pop(pid, None) if pid == own else self.births.get(pid)
            if record is not None and record[1] == self.procfs.start_time(pid):
                return record[0]
            parent = self.by_tgid.get(ppid)
            if parent is not None and not parent.closed:
                return self.state_of(parent)
            if ppid <= 1:
                break
            try:
                pid, ppid = ppid, self.procfs.status(ppid)[1]
            except (OSError, ValueError):
                break
        return self.initial

    def state_of(self, process: Process) -> Inherited:
        """What ``process`` passes to a child now (a continued chdir settled first)."""
        if process.pending_cwd is not None:
            self.settle_cwd(process, process.pending_cwd.tid)
        return process.inheritable()

    # --- transitions ------------------------------------------------------------------

    def on_call(self, process: Process, tid: int) -> None:
        """Before routing a call of ``tid``: settle what the last calls left open."""
        if process.pending_cwd is not None:
            self.settle_cwd(process, tid)
        if process.exec_pending and tid == process.tgid:
            self._after_exec(process)

    def seal(self, process: Process) -> None:
        """Record, for each child of ``process`` not yet seen, the state it inherits.

        Called before the parent's state changes and when it exits: a child that
        exists now was forked before, with the current state.
        """
        state = self.state_of(process)
        children = self.procfs.children(process.tgid)
        if children is None:
            return
        for child in children:
            if child in self.by_tgid:
                continue
            started = self.procfs.start_time(child)
            known = self.births.get(child)
            if known is None or known[1] != started:  # new, or a reused pid
                self.births[child] = (state, started)
        if len(self.births) > MAX_BIRTHS:  # children that died before their first call
            self.births = {
                c: r for c, r in self.births.items() if self.procfs.start_time(c) == r[1]
            }

    def chdir_remote(self, process: Process, path: bytes) -> None:
        """``process`` is now in the slave directory ``path`` (as the slave resolved it)."""
        self.seal(process)  # children forked until now keep the old directory
        process.cwd, process.cwd_remote = path, True

    def chdir_master(self, process: Process, tid: int, path: bytes) -> None:
        """``tid``'s chdir into the master directory ``path`` is being continued."""
        self.seal(process)
        found = self.procfs.cwd(tid)
        if found is None:
            return
        if process.cwd_remote and found[0] == self.procfs.identity(tid, path):
            # Back into the master directory that the kernel never left while the
            # process was in slave directories: the chdir changes nothing to read back.
            process.adopt(Inherited(found[1], False, False))
            return
        previous = process.inheritable()
        process.pending_cwd = PendingChdir(tid, found[0], previous)
        process.adopt(Inherited(path, False, False))

    def settle_cwd(self, process: Process, tid: int) -> None:
        """Read back a continued chdir into a master directory.

        The kernel's working directory changed: adopt it (as the kernel resolved it,
        symlinks and ``..`` included). Unchanged, as seen by the thread that called
        chdir: the kernel refused, restore the previous state. Unchanged as seen by
        another thread: the chdir may not have run yet; ask again later.
        """
        pending = process.pending_cwd
        assert pending is not None
        found = self.procfs.cwd(tid)
        if found is None:
            return
        identity, actual = found
        if identity != pending.before:
            process.pending_cwd = None
            process.adopt(Inherited(actual, False, False))
        elif tid == pending.tid:
            process.pending_cwd = None
            process.adopt(pending.previous)

    def set_umask(self, process: Process, mask: int) -> None:
        process.umask = mask & 0o777

    def exec_started(self, process: Process) -> None:
        """``process`` calls execve: the names of its staged wrapper no longer apply."""
        process.staged_names = frozenset()

    def exec_continued(self, process: Process) -> None:
        """An execve of ``process`` is continued: if it succeeds, a new image and a new
        address space."""
        process.memory.forget()
        process.exec_pending = True

    def exec_staged(
        self,
        process: Process,
        *,
        staged_names: frozenset[bytes],
        argv0_fix: tuple[int, int] | None,
    ) -> None:
        """An execve of a staged copy is continued: the interpreter of a staged wrapper
        reads it by ``staged_names``; ``argv0_fix``: argv[0]'s "/" to put back."""
        process.staged_names = staged_names
        process.argv0_fix = argv0_fix
        self.exec_continued(process)

    def _after_exec(self, process: Process) -> None:
        """The first call of the new image (from the leader): the other threads are
        gone, and an argv[0] that staging rewrote is put back."""
        process.exec_pending = False
        for tid in list(process.tids):
            if tid != process.tgid:
                self.thread_exit(tid)
        fix, process.argv0_fix = process.argv0_fix, None
        if fix is None:
            return
        address, old_arg_start = fix
        now = self.procfs.arg_start(process.tgid)
        try:
            if now != old_arg_start:  # a new image: its copy of argv[0]
                process.memory.write(now, b"/")
            else:  # the execve failed: the caller's own string
                process.memory.rewrite_byte(address, b"/")
        except Errno:
            pass

    def thread_exit(self, tid: int) -> None:
        """``tid`` is exiting (a thread): its number may soon be another task's."""
        process = self.by_tid.pop(tid, None)
        if process is not None:
            process.tids.discard(tid)

    def exit_group(self, process: Process) -> None:
        """``process`` is exiting: its orphans will not find it any more."""
        self.seal(process)

    def close(self) -> None:
        """Release every process's memory descriptor (the session is over)."""
        for process in list(self.by_tgid.values()):
            process.memory.forget()
