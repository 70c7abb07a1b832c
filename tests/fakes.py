"""Fakes that drive fmhub in-process: a fake control device, fake target memory, a
fake /proc, and a link that carries every operation through the real wire codec to a
real executor confined to a temporary directory.

``Rig`` is one session: ``rig.process()`` makes a fake program process, and
``proc.call("openat", AT_FDCWD, path, O_RDONLY, 0)`` traps one call, routes it
through the real Hub, router and handler, performs its operations on the real
executor, and returns the answer as the program would see it: the result, -errno,
or CONTINUE. Everything runs synchronously, in milliseconds.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from fsys.errors import Errno, LinkClosed, RemoteProtocolError
from fsys.kmod.table import load
from fsys.master.cache import AttrCache
from fsys.master.calls import HANDLERS
from fsys.master.device import Notification
from fsys.master.fmhub import Hub
from fsys.master.link import check_created, check_reply, reply_bound, reply_shape
from fsys.master.memory import TargetMemory
from fsys.master.net import SOCKET_HANDLERS, Network
from fsys.master.pages import links_in_use
from fsys.master.placeholders import Placeholders
from fsys.master.policy import Policy
from fsys.master.processes import Processes, ProcFS
from fsys.master.routing import CONTINUE, Continue
from fsys.master.staging import Stage
from fsys.protocol import (
    FEATURE_WATCH,
    NEED_DATA,
    Attrs,
    Call,
    Connection,
    Create,
    Event,
    Hello,
    Invalidate,
    Operation,
    Reply,
    Role,
    _Sentinel,
)
from fsys.slave.executor import Executor
from fsys.slave.fshub import before_reply, perform

TABLE = load()
AT_FDCWD = -100
BASE = 0x10_0000


class FakeMemory(TargetMemory):
    """A sparse address space: regions made with ``alloc``; anything else faults."""

    def __init__(self, pid: int) -> None:
        super().__init__(pid)
        self.regions: dict[int, bytearray] = {}
        self.readonly: set[int] = set()
        self._next = BASE
        self.opened = 1
        self.rewritten: list[tuple[int, bytes]] = []

    def alloc(self, data: bytes | int, *, readonly: bool = False) -> int:
        """A new region holding ``data`` (or that many zero bytes); its address."""
        content = bytearray(data)
        addr = self._next
        self._next += (len(content) + 0xFFF) // 0x1000 * 0x1000 + 0x1000  # a guard gap
        self.regions[addr] = content
        if readonly:
            self.readonly.add(addr)
        return addr

    def cstring(self, text: bytes) -> int:
        return self.alloc(text + b"\0")

    def _region(self, addr: int, size: int) -> tuple[int, bytearray]:
        for base, content in self.regions.items():
            if base <= addr and addr + size <= base + len(content):
                return base, content
        raise Errno(errno.EFAULT)

    def bytes_at(self, addr: int, size: int) -> bytes:
        base, content = self._region(addr, size)
        return bytes(content[addr - base : addr - base + size])

    def _mem(self) -> int:  # never a real /proc/<pid>/mem
        raise AssertionError("FakeMemory has no descriptor")

    def forget(self) -> None:
        pass

    def read(self, addr: int, size: int) -> bytes:
        if size == 0:
            return b""
        return self.bytes_at(addr, size)

    def read_cstring(self, addr: int, limit: int = 4096) -> bytes:
        if addr == 0:
            raise Errno(errno.EFAULT)
        for base, content in self.regions.items():
            if base <= addr < base + len(content):
                data = bytes(content[addr - base : addr - base + limit])
                end = data.find(b"\0")
                if end >= 0:
                    return data[:end]
                raise Errno(errno.ENAMETOOLONG if len(data) == limit else errno.EFAULT)
        raise Errno(errno.EFAULT)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        if len(data) == 0:
            return
        base, content = self._region(addr, len(data))
        if base in self.readonly:
            raise Errno(errno.EFAULT)
        content[addr - base : addr - base + len(data)] = data

    def rewrite_byte(self, addr: int, value: bytes) -> None:
        base, content = self._region(addr, 1)
        content[addr - base] = value[0]
        self.rewritten.append((addr, value))


@dataclass
class Task:
    tgid: int
    ppid: int
    umask: int = 0o022
    start: int = 1000
    cwd: tuple[tuple[int, int], bytes] = ((1, 1), b"/")


class FakeProc(ProcFS):
    """A /proc of fake tasks; pidfds are numbers, exits are trio Events."""

    def __init__(self) -> None:
        self.tasks: dict[int, Task] = {}
        self.fds: dict[int, dict[int, str]] = {}  # tgid -> fd -> what it names
        self.mems: dict[int, FakeMemory] = {}
        self.exited: dict[int, trio.Event] = {}
        self.signals: list[tuple[int, int]] = []  # (pid, signum) delivered
        self.arg_starts: dict[int, int] = {}
        self.closed_pidfds: list[int] = []
        self.status_reads = 0
        self.identities: dict[bytes, tuple[int, int]] = {}  # master path -> (dev, ino)
        self.files: dict[tuple[int, int], int] = {}  # (tgid, fd) -> a real master fd
        self.installed: dict[tuple[int, int], int] = {}  # (tgid, fd) -> a placeholder copy
        self.no_pidfd: set[int] = set()  # pids whose pidfd cannot be had (EMFILE)

    def add(self, tid: int, tgid: int, ppid: int, **kw: object) -> Task:
        task = Task(tgid, ppid, **kw)  # type: ignore[arg-type]
        self.tasks[tid] = task
        self.fds.setdefault(tgid, {})
        self.exited.setdefault(tgid, trio.Event())
        return task

    def exit(self, tgid: int) -> None:
        for tid in [t for t, task in self.tasks.items() if task.tgid == tgid]:
            del self.tasks[tid]
        self.exited[tgid].set()

    def status(self, tid: int) -> tuple[int, int, int]:
        self.status_reads += 1
        task = self.tasks.get(tid)
        if task is None:
            raise FileNotFoundError(errno.ENOENT, "no such task")
        return task.tgid, task.ppid, task.umask

    def stat_field(self, pid: int, number: int) -> int:
        raise AssertionError("use start_time or arg_start")

    def start_time(self, pid: int) -> int:
        task = self.tasks.get(pid)
        return task.start if task is not None else -1

    def arg_start(self, pid: int) -> int:
        return self.arg_starts.get(pid, -1)

    def children(self, pid: int) -> list[int] | None:
        if pid not in self.tasks:
            return None
        return [t for t, task in self.tasks.items() if task.ppid == pid and t == task.tgid]

    def cwd(self, tid: int) -> tuple[tuple[int, int], bytes] | None:
        task = self.tasks.get(tid)
        return task.cwd if task is not None else None

    def identity(self, tid: int, path: bytes) -> tuple[int, int] | None:
        return self.identities.get(path)

    def take_fd(self, pid: int, pidfd: int, fd: int) -> int:
        real = self.files.get((pid, fd), self.installed.get((pid, fd)))
        if real is None or pidfd not in (-1, 10_000 + pid):  # pidfd_getfd: EBADF for both
            raise OSError(errno.EBADF, "no such fd")
        return os.dup(real)

    def fd_path(self, tid: int, fd: int) -> str | None:
        task = self.tasks.get(tid)
        if task is None:
            return None
        return self.fds[task.tgid].get(fd)

    def memory(self, pid: int) -> FakeMemory:
        return self.mems.setdefault(pid, FakeMemory(pid))

    def pidfd(self, pid: int) -> int:
        if pid not in self.tasks:
            raise ProcessLookupError(pid)
        if pid in self.no_pidfd:
            raise OSError(errno.EMFILE, "too many open files")
        return 10_000 + pid

    def exists(self, pid: int) -> bool:
        return pid in self.tasks

    async def wait_exit(self, pidfd: int, pid: int) -> None:
        assert pidfd in (-1, 10_000 + pid), f"watching {pid} through pidfd {pidfd}"
        await self.exited[pid].wait()

    def send_signal(self, pidfd: int, signum: int) -> None:
        self.signals.append((pidfd - 10_000, signum))

    def signal_thread(self, tgid: int, tid: int, signum: int) -> None:
        self.signals.append((tid, signum))

    def close_fd(self, fd: int) -> None:
        self.closed_pidfds.append(fd)


class FakeListener:
    """The control device's answers, recorded; ADDFD installs into the fake fd table."""

    def __init__(self, procfs: FakeProc) -> None:
        self.procfs = procfs
        self.answers: dict[int, int | Continue] = {}
        self.kept: dict[tuple[int, int], int] = {}  # (tgid, fd) -> our copy of the socket
        procfs.installed = self.kept  # (what pidfd_getfd copies, as for the program's own)
        self.cloexec: dict[tuple[int, int], bool] = {}  # (tgid, fd) -> O_CLOEXEC
        self.callers: dict[int, int] = {}  # notification id -> tid
        self.invalid: set[int] = set()
        self.fd = -1

    def _answer(self, nid: int, value: int | Continue) -> None:
        assert nid not in self.answers, f"notification {nid} answered twice"
        self.answers[nid] = value

    def reply(self, nid: int, value: int) -> None:
        self._answer(nid, value)

    def continue_(self, nid: int) -> None:
        self._answer(nid, CONTINUE)

    def id_valid(self, nid: int) -> bool:
        return nid not in self.invalid

    def inject(self, nid: int, fd: int, *, cloexec: bool) -> int:
        tid = self.callers[nid]
        task = self.procfs.tasks.get(tid)
        if task is None:
            return -errno.ENOENT
        table = self.procfs.fds[task.tgid]
        number = next(n for n in range(len(table) + 1) if n not in table)
        table[number] = f"socket:[{os.fstat(fd).st_ino}]"
        self.kept[(task.tgid, number)] = os.dup(fd)  # the program's copy
        self.cloexec[(task.tgid, number)] = cloexec
        self._answer(nid, number)
        return number

    def place(self, nid: int, fd: int, number: int, *, cloexec: bool) -> int:
        tid = self.callers[nid]
        task = self.procfs.tasks.get(tid)
        if task is None:
            return -errno.ENOENT
        table = self.procfs.fds[task.tgid]
        old = self.kept.pop((task.tgid, number), None)
        table[number] = os.readlink(f"/proc/self/fd/{fd}")
        self.kept[(task.tgid, number)] = os.dup(fd)  # the program's copy
        self.cloexec[(task.tgid, number)] = cloexec
        if old is not None:
            os.close(old)
        return 0

    def fd_info(self, tid: int, number: int) -> tuple[int, int] | None:
        """(flags, inode) of the program's fd ``number``, as fdinfo gives them."""
        task = self.procfs.tasks.get(tid)
        kept = self.kept.get((task.tgid, number)) if task is not None else None
        if kept is None:
            return None
        flags = fcntl.fcntl(kept, fcntl.F_GETFL) & ~os.O_CLOEXEC
        if self.cloexec.get((task.tgid, number)):  # type: ignore[union-attr]
            flags |= os.O_CLOEXEC
        return flags, os.fstat(kept).st_ino

    def close_fd(self, tgid: int, number: int) -> None:
        """The program closes its fd ``number`` (natively, as close(2) is not trapped)."""
        del self.procfs.fds[tgid][number]
        kept = self.kept.pop((tgid, number), None)
        if kept is not None:
            os.close(kept)

    def close(self) -> None:
        for kept in self.kept.values():
            os.close(kept)
        self.kept.clear()


class WireLink:
    """A link through the real codec, both directions, to a real executor.

    Operations are queued and performed by ``pump`` (as the slave would, later), so
    a handler is resumed from the "reader", not from inside its own yield.
    """

    def __init__(self, executor: Executor, features: int = 0, slave_features: int = 0) -> None:
        self.executor = executor
        self.conn = Connection(Role.MASTER)
        self.slave = Connection(Role.SLAVE)
        self.slave.receive_data(self.conn.send(Hello(features=features)))
        executor.hello(features)
        self.conn.receive_data(self.slave.send(Hello(features=slave_features)))
        assert self.slave.next_event() == Hello(features=features)
        self.peer = self.conn.next_event()
        assert self.peer == Hello(features=slave_features)
        self.pending: list[tuple[Call, Callable[[Reply | LinkClosed], None] | None]] = []
        self.ops: list[Operation] = []  # every operation the slave performed, in order
        self.events: list[Event] = []  # pairing events the slave received
        self.calls = 0
        self.alive = True
        self.failure: str | None = None
        self._request = 0
        self.broken = False
        self.on_perform: Callable[[Operation], None] | None = None  # before each op
        self.on_invalidate: Callable[[tuple[bytes, ...]], None] | None = None
        self.on_attrs: Callable[[Attrs], None] | None = None

    @property
    def waiting(self) -> bool:
        return bool(self.pending)

    def _deliver(self, events: list[Event]) -> list[Event]:
        data = b"".join(self.conn.send(e) for e in events)
        self.slave.receive_data(data)
        out: list[Event] = []
        while True:
            event = self.slave.next_event()
            if event is NEED_DATA:
                return out
            assert not isinstance(event, _Sentinel)
            out.append(event)

    def send(self, events: list[Event]) -> None:
        if not self.alive:
            raise LinkClosed("down")
        self.events.extend(self._deliver(events))

    def submit(
        self,
        pairing: int,
        op: Operation,
        on_reply: Callable[[Reply | LinkClosed], None],
        prelude: Callable[[Connection], list[Event]] | None = None,
    ) -> None:
        if not self.alive:
            on_reply(LinkClosed("down"))
            return
        self._request += 1
        events: list[Event] = prelude(self.conn) if prelude is not None else []
        events.append(Call(pairing, self._request, op))
        self.calls += 1
        for event in self._deliver(events):
            if isinstance(event, Call):
                self.pending.append((event, on_reply))
            else:
                self.events.append(event)

    def post(self, pairing: int, op: Operation) -> None:
        if self.alive:
            for event in self._deliver([Call(pairing, 0, op)]):
                assert isinstance(event, Call)
                self.pending.append((event, None))

    async def perform(self, pairing: int, op: Operation) -> Reply:
        replies: list[Reply | LinkClosed] = []
        self.submit(pairing, op, replies.append)
        self.pump()
        outcome = replies[0]
        if isinstance(outcome, LinkClosed):
            raise outcome
        return outcome

    #: More operations than this in one pump (the suite needs under a hundred): a
    #: handler that never stops asking the slave, failed rather than left to spin.
    RUNAWAY = 1_000

    def pump(self) -> None:
        """Perform every queued operation, answering each through the codec."""
        performed = 0
        while self.pending:
            performed += 1
            if performed > self.RUNAWAY:
                raise AssertionError(f"over {self.RUNAWAY} operations: a runaway handler")
            call, on_reply = self.pending.pop(0)
            self.ops.append(call.op)
            if self.on_perform is not None:
                self.on_perform(call.op)
            if self.broken:
                self.alive = False
                if on_reply is not None:
                    on_reply(LinkClosed("the slave went away"))
                continue
            reply = perform(self.executor, call, blocking=self.executor.may_block(call.op))
            extra = before_reply(self.executor, self.slave, call.op)
            if extra:
                self.conn.receive_data(extra)
            while extra:  # the ATTRS and INVALIDATEs that fshub sends before the reply
                sent = self.conn.next_event()
                if sent is NEED_DATA:
                    break
                if isinstance(sent, Invalidate) and self.on_invalidate is not None:
                    self.on_invalidate(sent.paths)
                elif isinstance(sent, Attrs) and self.on_attrs is not None:
                    self.on_attrs(sent)
            if on_reply is None:
                continue
            self.conn.receive_data(self.slave.send(reply))
            echoed = self.conn.next_event()
            assert isinstance(echoed, Reply)
            try:
                check_reply(echoed, reply_bound(call.op), reply_shape(call.op))  # as SlaveLink
                if isinstance(call.op, Create):
                    check_created(echoed)
            except RemoteProtocolError as exc:
                self.failure = f"protocol error from the slave: {exc}"
                self.broken = True  # the session ends: every call from now on fails
                self.alive = False
                on_reply(LinkClosed(self.failure))
                continue
            on_reply(echoed)


_STAT = struct.Struct("=QQQIIIxxxxQqqqqqqqqq24x")


@dataclass
class Stat:
    """The fields of the x86_64 struct stat the tests look at."""

    dev: int
    ino: int
    nlink: int
    mode: int
    uid: int
    gid: int
    size: int

    @classmethod
    def parse(cls, raw: bytes) -> Stat:
        dev, ino, nlink, mode, uid, gid, _rdev, size, *_ = _STAT.unpack(raw)
        return cls(dev, ino, nlink, mode, uid, gid, size)


@dataclass
class FakeProcess:
    rig: Rig
    tid: int
    tgid: int

    @property
    def mem(self) -> FakeMemory:
        return self.rig.procfs.memory(self.tgid)

    @property
    def fds(self) -> dict[int, str]:
        return self.rig.procfs.fds[self.tgid]

    def call(self, name: str, *args: int | bytes) -> int | Continue:
        """Trap ``name(*args)`` from this process; bytes arguments become C strings."""
        values = [self.mem.cstring(a) if isinstance(a, bytes) else a for a in args]
        return self.rig.call(self.tid, name, *values)

    def close(self, fd: int) -> None:
        self.rig.listener.close_fd(self.tgid, fd)

    def own(self, number: int, fd: int) -> None:
        """The program's fd ``number`` is the master fd ``fd`` (a pipe, socket or file
        of its own, which fmhub takes a copy of as pidfd_getfd would)."""
        self.fds[number] = os.readlink(f"/proc/self/fd/{fd}")
        self.rig.procfs.files[(self.tgid, number)] = fd

    def fork(self, tid: int) -> FakeProcess:
        """A child forked now (it makes no trapped call until asked)."""
        task = self.rig.procfs.tasks[self.tid]
        self.rig.procfs.add(tid, tid, self.tgid, umask=task.umask, cwd=task.cwd)
        self.rig.procfs.fds[tid] = dict(self.fds)
        for number in self.fds:
            kept = self.rig.listener.kept.get((self.tgid, number))
            if kept is not None:
                self.rig.listener.kept[(tid, number)] = os.dup(kept)
        return FakeProcess(self.rig, tid, tid)

    def thread(self, tid: int) -> FakeProcess:
        task = self.rig.procfs.tasks[self.tid]
        self.rig.procfs.add(tid, self.tgid, task.ppid, umask=task.umask, cwd=task.cwd)
        return FakeProcess(self.rig, tid, self.tgid)

    def stat_at(self, addr: int) -> Stat:
        return Stat.parse(self.mem.bytes_at(addr, _STAT.size))


@dataclass
class Rig:
    """One in-process session: the real Hub, router, handlers and process model over
    fakes of the kernel's side, and a real executor confined to ``box``."""

    box: Path
    procfs: FakeProc = field(default_factory=FakeProc)
    policy: Policy = field(default_factory=Policy.build)
    stage: Stage | None = None
    cache: bool = False  # the hub keeps an attribute cache, the slave watches
    network: bool = False  # the program's sockets are the slave's (fsys.master.net)
    slave_features: int = 0  # FEATURE_* of the slave's HELLO (FEATURE_OPEN_READ...)

    def __post_init__(self) -> None:
        # The slave runs with umask 0: the master applies the program's (fsys-slave's
        # serve_fds does the same).
        self._umask = os.umask(0)
        self.executor = Executor(str(self.box))
        self.link = WireLink(self.executor, FEATURE_WATCH if self.cache else 0,
                             self.slave_features)  # fmt: skip
        self.listener = FakeListener(self.procfs)
        self.processes = Processes(self.procfs)
        self.placeholders = Placeholders(self.procfs.fd_path, self.listener.fd_info)
        # The program's fds and mappings of the pages' links are this process's own
        # descriptors here (``kept``, and the dups a test holds as mappings).
        self.placeholders.in_use = lambda store: links_in_use([os.getpid()], store)
        self.hub = Hub(
            listener=self.listener,  # type: ignore[arg-type]
            link=self.link,  # type: ignore[arg-type]
            policy=self.policy,
            table=TABLE,
            handlers=HANDLERS,
            stage=self.stage,
            processes=self.processes,
            placeholders=self.placeholders,
            cache=AttrCache() if self.cache else None,
        )
        if self.network:
            self.tasks = TaskList()
            self.hub.net = Network(self.hub, self.tasks)  # type: ignore[arg-type]
            self.hub.router.socket_handlers = SOCKET_HANDLERS
        self._nid = 0

    def close(self) -> None:
        self.listener.close()
        self.placeholders.close()
        self.executor.close()
        os.umask(self._umask)

    def process(self, pid: int = 100, *, ppid: int = 1, umask: int = 0o022) -> FakeProcess:
        self.procfs.add(pid, pid, ppid, umask=umask)
        return FakeProcess(self, pid, pid)

    def call(self, tid: int, name: str, *args: int) -> int | Continue:
        syscall = TABLE[name]
        self._nid += 1
        nid = self._nid
        self.listener.callers[nid] = tid
        regs = tuple(a & 0xFFFFFFFFFFFFFFFF for a in (*args, *[0] * (6 - len(args))))
        self.hub.route(Notification(nid, tid, syscall.nr, regs))
        self.link.pump()
        self.hub.reap()  # as fmhub's loop does while it idles
        self.link.pump()
        return self.listener.answers.get(nid, NO_ANSWER)

    async def wait_answer(self) -> int | Continue:
        """The answer to the last call, once it is given: after a wait fmhub runs in
        the caller's pairing (its ``Process.nursery``), for a master fd to be ready."""
        nid = self._nid
        with trio.fail_after(5):
            while nid not in self.listener.answers:
                await trio.sleep(0.001)
                self.link.pump()
        return self.listener.answers[nid]


class TaskList:
    """Stands for a nursery: records the tasks started in it (run by no one)."""

    def __init__(self) -> None:
        self.started: list[tuple[str, tuple[object, ...]]] = []

    def start_soon(self, fn: Callable[..., object], *args: object) -> None:
        self.started.append((getattr(fn, "__name__", repr(fn)), args))


class _NoAnswer(int):
    def __repr__(self) -> str:
        return "NO_ANSWER"


NO_ANSWER = _NoAnswer(-(1 << 40))
"""What Rig.call returns when the hub answered nothing (the caller died)."""


def socketpair_inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino
