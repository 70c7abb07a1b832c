"""The two hubs talking over a socketpair, in one process: the link, fshub, executor."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from fsys.errors import LinkClosed, RemoteProtocolError
from fsys.iostream import FdTransport
from fsys.master.link import SlaveLink, check_reply, reply_bound
from fsys.protocol import (
    HEADER,
    Access,
    ClosePairing,
    Getdents,
    Getxattr,
    Hello,
    Listxattr,
    Open,
    OpenPairing,
    Operation,
    Read,
    Readlink,
    Reply,
    Stat,
    Write,
    encode,
)
from fsys.slave.fshub import serve_transport
from tests.conftest import served_link


@pytest.fixture
async def link(tmp_path: Path) -> AsyncIterator[SlaveLink]:
    async with served_link(tmp_path) as served:
        yield served


async def test_handshake_and_a_call(link: SlaveLink, tmp_path: Path) -> None:
    assert link.peer is not None and b"fsys-slave" in link.peer.info
    (tmp_path / "f").write_text("x")
    reply = await link.perform(0, Stat(dir=0, flags=0, mask=0x7FF, path=b"/f"))
    assert reply.result == 0 and len(reply.blob) == 256


async def test_many_calls_in_flight_are_each_answered(link: SlaveLink, tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / str(i)).write_text("y" * i)
    results: dict[int, Reply | LinkClosed] = {}
    done = trio.Event()

    def on_reply(i: int) -> object:
        def record(outcome: Reply | LinkClosed) -> None:
            results[i] = outcome
            if len(results) == 50:
                done.set()

        return record

    for i in range(50):
        link.submit(0, Access(dir=0, mode=0, flags=0, path=f"/{i}".encode()), on_reply(i))  # type: ignore[arg-type]
    with trio.fail_after(10):
        await done.wait()
    assert all(isinstance(r, Reply) and r.result == 0 for r in results.values())


async def test_a_blocking_open_does_not_stall_other_calls(link: SlaveLink, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "plain").write_text("p")
    fifo_reply: list[Reply] = []
    async with trio.open_nursery() as nursery:

        async def open_fifo() -> None:
            fifo_reply.append(
                await link.perform(
                    0, Open(dir=0, flags=os.O_RDONLY, mode=0, resolve=0, path=b"/fifo")
                )
            )

        nursery.start_soon(open_fifo)
        await trio.sleep(0.1)
        with trio.fail_after(5):  # the FIFO's open waits for a writer in a thread
            for _ in range(20):
                reply = await link.perform(0, Stat(dir=0, flags=0, mask=0x7FF, path=b"/plain"))
                assert reply.result == 0
        assert fifo_reply == []
        writer = await trio.to_thread.run_sync(os.open, tmp_path / "fifo", os.O_WRONLY)
        os.close(writer)
    assert fifo_reply[0].result > 0


async def test_two_posted_calls_blocked_at_once_leave_the_slave_serving(
    link: SlaveLink, tmp_path: Path
) -> None:
    # CALLs that want no reply are request 0: two of them blocked in threads at once
    # (FIFOs, here opens) shared one key, and the second one's end killed the slave.
    for name in ("one", "two"):
        os.mkfifo(tmp_path / name)
        link.post(0, Open(dir=0, flags=os.O_RDONLY, mode=0, resolve=0, path=f"/{name}".encode()))
    await trio.sleep(0.2)  # both wait for a writer, each in a thread
    for name in ("one", "two"):
        writer = await trio.to_thread.run_sync(os.open, tmp_path / name, os.O_WRONLY)
        os.close(writer)
        await trio.sleep(0.1)
    (tmp_path / "f").write_text("x")
    with trio.fail_after(5):
        reply = await link.perform(0, Stat(dir=0, flags=0, mask=0x7FF, path=b"/f"))
    assert reply.result == 0


async def test_a_closed_pairings_waiting_call_is_answered_and_undone(
    link: SlaveLink, tmp_path: Path
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link.send([OpenPairing(1)])
    outcome: list[Reply | LinkClosed] = []
    link.submit(1, Open(dir=0, flags=os.O_RDONLY, mode=0, resolve=0, path=b"/fifo"),
                outcome.append)  # fmt: skip
    await trio.sleep(0.2)  # it waits in a worker thread for a writer
    assert outcome == []
    link.send([ClosePairing(1)])  # its process is gone
    with trio.fail_after(5):
        while not outcome:
            await trio.sleep(0.01)
    assert isinstance(outcome[0], Reply) and outcome[0].result == -errno.EINTR
    # The abandoned open completes once a writer comes; the handle it made is closed:
    # no reader is left, so a non-blocking writer is refused.
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    with trio.fail_after(5):
        while True:
            await trio.sleep(0.02)
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                break


@asynccontextmanager
async def scripted_slave() -> AsyncIterator[tuple[SlaveLink, socket.socket]]:
    """fmhub's link, handshaken, to a "slave" the test writes frames as (its socket)."""
    ours, theirs = socket.socketpair()
    mine = ours.detach()
    transport = FdTransport(mine, mine)
    link = SlaveLink(transport)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.serve)
        theirs.sendall(encode(Hello()))
        with trio.fail_after(5):
            await link.handshake()
        yield link, theirs
        nursery.cancel_scope.cancel()
    theirs.close()
    transport.close()


async def test_slave_death_fails_every_pending_call(tmp_path: Path) -> None:
    async with scripted_slave() as (link, theirs):  # a slave that says hello, then dies
        outcome: list[object] = []
        link.submit(0, Stat(dir=0, flags=0, mask=0, path=b"/x"), outcome.append)
        theirs.close()  # the slave dies with a call in flight
        with trio.fail_after(5):
            await link.wait_closed()
        assert isinstance(outcome[0], LinkClosed)
        assert link.failure is not None and "went away" in link.failure
        with pytest.raises(LinkClosed):
            await link.perform(0, Stat(dir=0, flags=0, mask=0, path=b"/x"))


@pytest.mark.parametrize(
    ("op", "reply", "named"),
    [
        (Access(dir=0, mode=0, flags=0, path=b"/x"), (-(1 << 40), b""), "errno 1099511627776"),
        (Open(dir=0, flags=0, mode=0, resolve=0, path=b"/x"), (-100000, b""), "errno 100000"),
        (Readlink(dir=0, size=8, path=b"/l"), (100, b"x" * 100), "100 bytes to a call of 8"),
        (Read(handle=1, size=4, offset=0, rwf=0), (4, b"x" * 5), "5 bytes to a call of 4"),
        (Getdents(handle=1, size=64), (65, b"d" * 65), "65 bytes to a call of 64"),
        (Getxattr(dir=0, flags=0, size=0, path=b"/x", name=b"user.a"), (1 << 20, b""),
         "1048576 bytes to a call of 65536"),
        (Listxattr(dir=0, flags=0, size=16, path=b"/x"), (17, b"n" * 17), "17 bytes"),
        (Write(handle=1, offset=0, rwf=0, data=b"abc"), (4, b""), "4 bytes to a call of 3"),
        (Stat(dir=0, flags=0, mask=0, path=b"/x"), (0, b"garbage"), "7 bytes for a 256-byte"),
    ],
)  # fmt: skip
async def test_a_hostile_reply_ends_the_session_with_its_name(
    op: Operation, reply: tuple[int, bytes], named: str
) -> None:
    async with scripted_slave() as (link, theirs):
        outcome: list[object] = []
        link.submit(0, op, outcome.append)  # request 1
        theirs.sendall(encode(Reply(0, 1, reply[0], reply[1])))
        with trio.fail_after(5):
            await link.wait_closed()
        assert isinstance(outcome[0], LinkClosed)  # the call fails (the program gets EIO)
        assert link.failure is not None and named in link.failure, link.failure
        assert link.failure.startswith("protocol error from the slave")


async def test_a_reply_nobody_asked_for_ends_the_session() -> None:
    async with scripted_slave() as (link, theirs):
        outcome: list[object] = []
        link.submit(0, Stat(dir=0, flags=0, mask=0, path=b"/x"), outcome.append)
        theirs.sendall(encode(Reply(0, 77, 0, b"")))  # request 77 was never sent
        with trio.fail_after(5):
            await link.wait_closed()
        assert link.failure is not None and "request 77, which is not pending" in link.failure
        assert isinstance(outcome[0], LinkClosed)  # the call in flight fails too


def test_a_reply_within_its_bound_passes() -> None:
    check_reply(Reply(0, 1, -4095, b""), None)
    check_reply(Reply(0, 1, 8, b"x" * 8), reply_bound(Readlink(dir=0, size=8, path=b"/l")))
    check_reply(Reply(0, 1, 65536, b""), reply_bound(Getxattr(dir=0, flags=0, size=0,
                                                              path=b"/x", name=b"a")))  # fmt: skip
    assert reply_bound(Stat(dir=0, flags=0, mask=0, path=b"/x")) is None


async def test_slave_says_goodbye_to_a_malformed_master(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    async with trio.open_nursery() as nursery:
        fd = theirs.detach()

        async def serve() -> None:
            with pytest.raises(RemoteProtocolError, match="not an fsys peer"):
                await serve_transport(FdTransport(fd, fd), str(tmp_path))

        nursery.start_soon(serve)
        ours.sendall(HEADER.pack(0, 2, 0, 1, 0, 1))  # a CALL before any HELLO
        data = b""
        with trio.fail_after(5):
            while b"not an fsys peer" not in data:
                await trio.lowlevel.wait_readable(ours)
                chunk = ours.recv(4096)
                if not chunk:
                    break
                data += chunk
        assert b"not an fsys peer" in data  # explained in its GOODBYE
    ours.close()


def test_a_slave_whose_master_is_gone_before_hello_ends_quietly(tmp_path: Path) -> None:
    # Its HELLO meets a closed pipe: no traceback, a clean exit.
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "fsys.slave", "serve", "--stdio",
                               "--root", str(tmp_path)], stdin=subprocess.PIPE, stdout=write,
                              stderr=subprocess.PIPE, timeout=60, check=False)  # fmt: skip
    finally:
        os.close(write)
    assert done.stderr == b"" and done.returncode == 0
