"""A pumped socket's data between the hubs: fshub runs a socket's reads in order among
themselves and its writes, shutdown and close in order, each WRITE taken whole, with
no thread or task per wait (SocketWaits); fmhub keeps two READs and two WRITEs in
flight, and deals with their answers, and the program's writes, where they come."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from fsys.errors import LinkClosed
from fsys.iostream import LINK_BUFFER, PIPE_BUFFER, FdTransport
from fsys.master.link import OnReply, SlaveLink
from fsys.master.net import SOCKET_BUFFER, SocketStream
from fsys.master.placeholders import Placeholders, RemoteFile
from fsys.protocol import Call, Connect, Operation, Read, Reply, Setsockopt, Shutdown, Socket, Write
from fsys.slave.fshub import PairingContext
from fsys.slave.network import MustWait
from fsys.slave.waits import SocketWaits
from tests.conftest import served_link

Answers = list[Reply]
F_GETPIPE_SZ = 1032


@asynccontextmanager
async def connected(tmp_path: Path) -> AsyncIterator[tuple[SlaveLink, int, socket.socket]]:
    """The link to a real fshub, a slave TCP socket (its handle) connected to a
    listener of this test, and the listener's end of the connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        async with served_link(tmp_path) as link:
            made = await link.perform(0, Socket(family=socket.AF_INET, type=socket.SOCK_STREAM,
                                                protocol=0))  # fmt: skip
            handle = made.result
            port, ip = server.getsockname()[1], socket.inet_aton("127.0.0.1")
            addr = struct.pack("=H", socket.AF_INET) + struct.pack("!H4s8x", port, ip)
            assert (await link.perform(0, Connect(handle=handle, wait=1, addr=addr))).result == 0
            theirs, _ = server.accept()
            theirs.setblocking(False)
            with theirs:
                yield link, handle, theirs


async def small_buffer(link: SlaveLink, handle: int) -> None:
    """The slave socket's send buffer at its least: a big WRITE must wait for room."""
    value = struct.pack("=i", 4096)
    reply = await link.perform(0, Setsockopt(handle=handle, level=socket.SOL_SOCKET,
                                             name=socket.SO_SNDBUF, value=value))  # fmt: skip
    assert reply.result == 0


def submit(link: SlaveLink, op: Operation, answers: Answers) -> trio.Event:
    done = trio.Event()

    def on_reply(outcome: Reply | LinkClosed) -> None:
        assert isinstance(outcome, Reply)
        answers.append(outcome)
        done.set()

    link.submit(0, op, on_reply, patient=True)
    return done


async def read_all(sock: socket.socket, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        await trio.lowlevel.wait_readable(sock)
        piece = sock.recv(1 << 20)
        if not piece:
            break
        got += piece
    return bytes(got)


async def test_a_sockets_reads_are_answered_in_the_order_they_came(tmp_path: Path) -> None:
    async with connected(tmp_path) as (link, handle, theirs):
        for round_ in range(12):  # (trio runs woken tasks in a random order)
            firsts: Answers = []
            seconds: Answers = []
            first = submit(link, Read(handle=handle, size=3, offset=-1, rwf=0), firsts)
            second = submit(link, Read(handle=handle, size=3, offset=-1, rwf=0), seconds)
            await trio.sleep(0.01)  # both wait for data on the slave
            assert not firsts and not seconds
            theirs.send(b"abcdef")
            with trio.fail_after(5):
                await first.wait()
                await second.wait()
            assert (firsts[0].blob, seconds[0].blob) == (b"abc", b"def"), round_


async def test_a_write_is_taken_whole_and_two_in_flight_keep_their_order(
    tmp_path: Path,
) -> None:
    size = 3 << 20  # each far beyond the small send buffer below
    async with connected(tmp_path) as (link, handle, theirs):
        await small_buffer(link, handle)
        answers: Answers = []
        submit(link, Write(handle=handle, offset=-1, rwf=0, data=b"a" * size), answers)
        submit(link, Write(handle=handle, offset=-1, rwf=0, data=b"b" * size), answers)
        await trio.sleep(0.05)
        assert not answers  # both wait for room: neither ends part way
        with trio.fail_after(10):
            got = await read_all(theirs, 2 * size)
            while len(answers) < 2:
                await trio.sleep(0.01)
        assert got == b"a" * size + b"b" * size
        assert [a.result for a in answers] == [size, size]


async def test_a_shutdown_waits_for_the_writes_before_it(tmp_path: Path) -> None:
    size = 2 << 20
    async with connected(tmp_path) as (link, handle, theirs):
        await small_buffer(link, handle)
        answers: Answers = []
        submit(link, Write(handle=handle, offset=-1, rwf=0, data=b"w" * size), answers)
        shut = submit(link, Shutdown(handle=handle, how=socket.SHUT_WR), answers)
        with trio.fail_after(10):
            got = await read_all(theirs, size + 1)  # to the end of file
            await shut.wait()
        assert got == b"w" * size
        assert [a.result for a in answers] == [size, 0]


def counting(link: SlaveLink, kind: type) -> Callable[[], int]:
    """Wrap ``link.submit``: the most operations of ``kind`` seen in flight at once."""
    submit_ = link.submit
    state = {"now": 0, "most": 0}

    def wrapped(pairing: int, op: Operation, on_reply: OnReply, *args: Any, **kw: Any) -> int:
        if type(op) is not kind:
            return submit_(pairing, op, on_reply, *args, **kw)
        state["now"] += 1
        state["most"] = max(state["most"], state["now"])

        def landed(outcome: Reply | LinkClosed) -> None:
            state["now"] -= 1
            on_reply(outcome)

        return submit_(pairing, op, landed, *args, **kw)

    link.submit = wrapped  # type: ignore[method-assign]
    return lambda: state["most"]


@pytest.mark.parametrize("way", ["out", "in"])
async def test_a_pumped_socket_moves_its_data_whole_with_two_chunks_in_flight(
    tmp_path: Path, way: str
) -> None:
    size = 12 << 20
    data = bytes(range(256)) * (size // 256)
    async with connected(tmp_path) as (link, handle, theirs):
        most = counting(link, Write if way == "out" else Read)
        app_end, peer = socket.socketpair()
        peer.setblocking(False)
        app_end.setblocking(False)
        remote = RemoteFile(handle, 0o140000, 0, peer)
        stream = SocketStream(link, remote, 0, lambda: None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.pump_in)
            nursery.start_soon(stream.pump_out)
            sender, receiver = (app_end, theirs) if way == "out" else (theirs, app_end)

            async def send() -> None:
                view = memoryview(data)
                while view:
                    await trio.lowlevel.wait_writable(sender)
                    try:
                        view = view[sender.send(view[: 1 << 20]) :]
                    except BlockingIOError:
                        pass

            nursery.start_soon(send)
            with trio.fail_after(20):
                got = await read_all(receiver, size)
            nursery.cancel_scope.cancel()
        app_end.close()
        peer.close()
        assert got == data
        assert most() == 2


def granted(wanted: int, sysctl: str) -> int:
    """The most a socket buffer of ``wanted`` bytes reads back as (the kernel doubles
    what it is asked for, up to twice the sysctl's cap)."""
    return 2 * min(wanted, int(Path(f"/proc/sys/net/core/{sysctl}").read_text()))


async def test_the_link_asks_for_room_for_its_largest_frames() -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    read_end, write_end = os.pipe()
    ours_fd = ours.detach()
    transports = [FdTransport(ours_fd, ours_fd), FdTransport(read_end, write_end)]
    try:
        sock = socket.socket(fileno=os.dup(ours_fd))
        with sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= granted(
                LINK_BUFFER, "wmem_max"
            )
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= granted(
                LINK_BUFFER, "rmem_max"
            )
        assert fcntl.fcntl(write_end, F_GETPIPE_SZ) >= PIPE_BUFFER  # (root: LINK_BUFFER)
    finally:
        for transport in transports:
            transport.close()


def test_a_stream_sockets_placeholder_holds_chunks_each_way(tmp_path: Path) -> None:
    placeholders = Placeholders()
    try:
        app_end, remote = placeholders.create(5, 0o140000, ready=False, buffer=SOCKET_BUFFER)
        with app_end:
            for end in (app_end, remote.peer):
                room = end.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                assert room >= granted(SOCKET_BUFFER, "wmem_max")
        plain, _ = placeholders.create(6, 0o100000)
        with plain:
            assert plain.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < room
    finally:
        placeholders.close()


class ScriptedLink:
    """A link whose operations the test answers, in the order it likes."""

    def __init__(self) -> None:
        self.sent: list[tuple[Operation, OnReply]] = []

    def submit(self, pairing: int, op: Operation, on_reply: OnReply, **_: Any) -> int:
        self.sent.append((op, on_reply))
        return len(self.sent)

    def answer(self, index: int, result: int, blob: bytes = b"") -> None:
        self.sent[index][1](Reply(0, index + 1, result, blob))


def pumped(window: int = 2) -> tuple[ScriptedLink, SocketStream, socket.socket, list[int]]:
    """A socket stream on a scripted link, its app end, and the count of its wakes."""
    link = ScriptedLink()
    app_end, peer = socket.socketpair()
    peer.setblocking(False)
    app_end.setblocking(False)
    wakes: list[int] = []
    stream = SocketStream(link, RemoteFile(9, 0o140000, 0, peer), 0, lambda: wakes.append(1))  # type: ignore[arg-type]
    stream.window = window
    stream.app_end = app_end
    return link, stream, app_end, wakes


def test_the_hot_loop_sends_what_the_program_wrote_while_the_window_has_room() -> None:
    link, stream, app_end, wakes = pumped()
    with app_end, stream.peer:
        app_end.send(b"one")
        assert stream.push() is True  # sent, and nothing more to take
        app_end.send(b"two")
        assert stream.push() is True  # the window is full now
        app_end.send(b"three")
        assert stream.push() is False  # and something is left: its task waits for room
        assert [op.data for op, _ in link.sent] == [b"one", b"two"]  # type: ignore[union-attr]
        link.answer(0, 3)  # taken whole, and the window was full: the task has room now
        assert wakes == [1]
        assert stream.push() is True
        link.answer(1, 3)  # (full again: a wake)
        link.answer(2, 5)  # room was left: answered where it came, no task needed
        assert wakes == [1, 1] and not stream._flight
        assert [op.data for op, _ in link.sent] == [b"one", b"two", b"three"]  # type: ignore[union-attr]
        app_end.close()
        assert stream.push() is False  # end of file: the task ends the pump


def test_a_refused_write_wakes_the_task_and_closes_the_program_side() -> None:
    link, stream, app_end, wakes = pumped()
    with app_end, stream.peer:
        app_end.send(b"data")
        assert stream.push() is True
        link.answer(0, -32)  # EPIPE
        assert wakes == [1] and stream.write_closed and stream.write_error == 32
        app_end.send(b"more")
        assert stream.push() is False and len(link.sent) == 1  # nothing more is sent


def test_a_write_taken_in_part_sends_its_rest_first() -> None:
    link, stream, app_end, wakes = pumped(window=1)
    with app_end, stream.peer:
        app_end.send(b"abcdef")
        assert stream.push() is True
        link.answer(0, 2)
        assert wakes == [1]
        assert [op.data for op, _ in link.sent] == [b"abcdef", b"cdef"]  # type: ignore[union-attr]


def test_answered_reads_go_into_the_placeholder_where_they_come() -> None:
    link, stream, app_end, wakes = pumped()
    with app_end, stream.peer:
        stream._ask_reads()
        assert [type(op) for op, _ in link.sent] == [Read, Read]
        link.answer(0, 5, b"hello")
        assert app_end.recv(100) == b"hello" and not wakes  # no task needed
        assert len(link.sent) == 3  # the next read is asked at once
        link.answer(2, 0, b"")  # out of order: it waits for the one before it
        assert not wakes
        big = bytes(16 << 20)  # more than the placeholder holds
        link.answer(1, len(big), big)
        assert wakes == [1] and stream._unput is not None  # full: its task waits for room
        assert not stream.read_closed


def test_the_end_of_a_read_stream_wakes_the_task() -> None:
    link, stream, app_end, wakes = pumped()
    with app_end, stream.peer:
        stream._ask_reads()
        link.answer(0, 0, b"")
        assert wakes == [1] and stream.read_closed and app_end.recv(10) == b""


def test_a_read_answered_after_the_pump_ended_is_dropped() -> None:
    link, stream, app_end, wakes = pumped()
    with app_end, stream.peer:
        stream._ask_reads()
        stream._in_over = True
        link.answer(0, 4, b"late")
        assert not wakes
        with pytest.raises(BlockingIOError):
            app_end.recv(10)


class Gate:
    """A fake runner for SocketWaits: the calls whose requests are in ``shut`` must
    wait for a pipe to be readable; every run and answer is logged."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.shut: set[int] = set()
        self.runs: list[int] = []
        self.answers: list[tuple[int, int]] = []
        self.cancels: dict[tuple[int, int], Callable[[], None]] = {}
        self.waits = SocketWaits(self.run, self.answer, self.cancels)

    def run(self, call: Call, retry: Callable[[], tuple[int, bytes]] | None) -> Reply:
        self.runs.append(call.request)
        if call.request in self.shut:
            raise MustWait(self.r, writable=False)
        return Reply(call.pairing, call.request, call.request * 10)

    def answer(self, call: Call, reply: Reply) -> None:
        self.answers.append((call.request, reply.result))

    def open(self) -> None:
        self.shut.clear()
        os.write(self.w, b"x")

    def close(self) -> None:
        self.waits.close()
        os.close(self.r)
        os.close(self.w)


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.close()


def read_call(request: int, handle: int = 4) -> Call:
    return Call(1, request, Read(handle=handle, size=10, offset=-1, rwf=0))


def test_a_waiting_read_runs_when_its_socket_is_ready_and_the_next_after_it(gate: Gate) -> None:
    context = PairingContext(1, 0)
    gate.shut = {1}
    assert gate.waits.call(read_call(1), context) is None
    assert gate.waits.call(read_call(2), context) is None  # behind it on its line
    other = gate.waits.call(read_call(3, handle=5), context)  # another socket's: at once
    assert other is not None and other.result == 30
    assert gate.runs == [1, 3] and len(context.waiting) == 2
    gate.waits.fire()
    assert gate.answers == []  # not ready yet
    gate.open()
    gate.waits.fire()
    assert gate.answers == [(1, 10), (2, 20)] and gate.runs == [1, 3, 1, 2]
    assert not context.waiting and not gate.cancels


def test_a_cancelled_wait_says_eintr_and_lets_the_next_run(gate: Gate) -> None:
    context = PairingContext(1, 0)
    gate.shut = {1}
    gate.waits.call(read_call(1), context)
    gate.waits.call(read_call(2), context)
    gate.cancels[(1, 1)]()  # CANCEL: a signal in the program
    assert gate.answers == [(1, -errno.EINTR), (2, 20)]
    gate.open()
    gate.waits.fire()
    assert len(gate.answers) == 2  # answered once
    gate.cancels.get((1, 1), lambda: None)()
    assert len(gate.answers) == 2


def test_the_end_of_a_process_ends_its_waits(gate: Gate) -> None:
    context = PairingContext(1, 0)
    gate.shut = {1, 2}
    gate.waits.call(read_call(1), context)
    gate.waits.call(read_call(2, handle=5), context)
    context.close()
    assert sorted(gate.answers) == [(1, -errno.EINTR), (2, -errno.EINTR)]
    assert not context.waiting and not gate.cancels


def test_a_socket_closed_under_its_waits_ends_them_with_ebadf(gate: Gate) -> None:
    context = PairingContext(1, 0)
    gate.shut = {1}
    gate.waits.call(read_call(1), context)
    gate.waits.closing(gate.r)
    assert gate.answers == [(1, -errno.EBADF)]
    os.write(gate.w, b"x")
    gate.waits.fire()  # the fd is out of the set: nothing runs
    assert gate.runs == [1] and len(gate.answers) == 1


async def test_the_links_writev_keeps_order_through_a_full_socket() -> None:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    ours_fd = ours.detach()
    transport = FdTransport(ours_fd, ours_fd)
    try:
        with socket.socket(fileno=os.dup(ours_fd)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # (after widen)
        first, second = b"a" * (3 << 20), bytearray(b"b" * 100)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.serve_writer)
            transport.writev([first, second])
            second[:] = b"c" * 100  # (what waits was copied: the caller may reuse it)
            assert transport.backlog > 0
            transport.write(b"z")  # after them
            transport.writev([b"y"])
            with trio.fail_after(10):
                got = await read_all(theirs, len(first) + 102)
            nursery.cancel_scope.cancel()
        assert got == first + b"b" * 100 + b"zy"
    finally:
        transport.close()
        theirs.close()
