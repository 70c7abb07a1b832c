"""A hostile peer, fuzzed: the decoder of either side, and the slave fed any call.

Each property runs FSYS_FUZZ_EXAMPLES examples (a few hundred in the suite; ``nox -s
fuzz`` runs 35,000 of each, over 100,000 in all). What must hold: any bytes end in
events or a named RemoteProtocolError, never another exception or a hang; any
well-formed CALL, whatever its numbers, gets a REPLY that the master's own checks
accept (an errno within 1..4095, a result and blob within what the call allows), and
never acts outside the slave's root.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsys.errors import RemoteProtocolError
from fsys.master.link import check_reply, reply_bound, reply_shape
from fsys.protocol import (
    CLOSED,
    HEADER,
    NEED_DATA,
    SPECS,
    Call,
    Connection,
    Fallocate,
    Lend,
    Op,
    Reply,
    Role,
    Stat,
    Tty,
    encode,
)
from fsys.slave.executor import Executor, MustBlock
from fsys.slave.fshub import perform
from tests.test_protocol import opened

EXAMPLES = int(os.environ.get("FSYS_FUZZ_EXAMPLES", "300"))
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)


def drain(conn: Connection) -> None:
    """Every event ``conn`` holds, to the end: a RemoteProtocolError is the only failure."""
    conn.receive_data(b"")
    try:
        for _ in range(100000):
            event = conn.next_event()
            if event is CLOSED:
                return
            assert event is not NEED_DATA  # at end of file, never "wait for more"
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError):
            conn.next_event()  # it stays broken
        return
    raise AssertionError("no end")


# --- the decoder ---------------------------------------------------------------------------

#: Numbers a hostile peer would try: edges of every width the wire uses.
EDGES = [0, 1, 2, 7, 8, 16, 255, 256, 4095, 4096, 65535, 65536, 2**31 - 1, 2**31,
         2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, -1, -2, -4095, -4096, -(2**31),
         -(2**40), -(2**63)]  # fmt: skip
numbers = st.one_of(st.sampled_from(EDGES), st.integers(-(2**63), 2**63 - 1))


@st.composite
def valid_frames(draw: st.DrawFn) -> bytes:
    spec = draw(st.sampled_from(list(SPECS.values())))
    ints = [draw(numbers) for _ in range(spec.nints)]
    blobs = [draw(st.binary(max_size=64)).replace(b"\0", b"x") for _ in spec.paths]
    request = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        return encode(Call(0, request, spec.record._make((*ints, *blobs))))
    return encode(Reply(0, request, draw(numbers), blobs[0] if blobs else b""))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A run of valid frames with some bytes changed, cut or added: closer to a
    decoder's corners than pure noise."""
    data = bytearray(b"".join(draw(st.lists(valid_frames(), min_size=1, max_size=4))))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        what = draw(st.sampled_from(["flip", "set", "cut", "insert", "header"]))
        if what == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif what == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif what == "cut":
            del data[at:]
        elif what == "insert":
            data[at:at] = draw(st.binary(max_size=16))
        else:  # a whole header of hostile numbers
            u32 = st.integers(0, 2**32 - 1)
            u8 = st.integers(0, 255)
            header = HEADER.pack(draw(u32), draw(u8), draw(u8), draw(st.integers(0, 65535)),
                                 draw(u32), draw(u32))  # fmt: skip
            data[at:at] = header
    return bytes(data)


@fuzz
@given(mutated(), st.sampled_from([Role.MASTER, Role.SLAVE]), st.integers(1, 64))
def test_any_bytes_are_events_or_a_named_error(data: bytes, role: Role, chunk: int) -> None:
    conn = opened(role)
    try:
        for at in range(0, len(data), chunk):  # as they come off a socket: in pieces
            conn.receive_data(data[at : at + chunk])
            while conn.next_event() is not NEED_DATA:
                pass
    except RemoteProtocolError:
        return
    drain(conn)


@fuzz
@given(st.binary(max_size=600), st.sampled_from([Role.MASTER, Role.SLAVE]))
def test_noise_before_the_handshake_is_named(data: bytes, role: Role) -> None:
    conn = Connection(role)
    conn.receive_data(data)
    drain(conn)


# --- the slave, fed any call ---------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Executor, Path, Path]]:
    """An executor confined to a box, and a directory beside the box that it must
    never touch."""
    top = tmp_path_factory.mktemp("fuzz")
    box, outside = top / "box", top / "outside"
    box.mkdir()
    outside.mkdir()
    (outside / "sentinel").write_bytes(b"untouched")
    old = os.umask(0)
    ex = Executor(str(box))
    yield ex, box, outside
    ex.close()
    os.umask(old)


def refill(box: Path) -> None:
    """What the calls work on: a file, a directory, a symlink out, a link up."""
    try:
        if not os.path.lexists(box / "f"):
            (box / "f").write_bytes(b"0123456789")
        if not os.path.lexists(box / "d"):
            (box / "d").mkdir()
        if not os.path.lexists(box / "out"):
            (box / "out").symlink_to("../outside/sentinel")
        if not os.path.lexists(box / "up"):
            (box / "up").symlink_to("../..")
    except OSError:
        pass  # the calls made something odd of it: it is still a box


PATHS = [b"/f", b"f", b"/d", b"d/x", b"/", b"", b".", b"..", b"../outside/sentinel", b"/out",
         b"/up/outside/sentinel", b"/proc/self/root/etc/passwd", b"/new", b"d/../../x"]  # fmt: skip
small = st.one_of(st.sampled_from([0, 1, 2, 3, 4, -1, 100]), numbers)


@st.composite
def hostile_calls(draw: st.DrawFn) -> Call:
    spec = draw(st.sampled_from([s for s in SPECS.values() if s.op not in (Op.LEND, Op.TTY)]))
    ints = [draw(small) for _ in range(spec.nints)]
    blobs = [draw(st.one_of(st.sampled_from(PATHS), st.binary(max_size=40)))
             if is_path else draw(st.binary(max_size=64)) for is_path in spec.paths]  # fmt: skip
    blobs = [b.replace(b"\0", b"x") if is_path else b
             for b, is_path in zip(blobs, spec.paths, strict=True)]  # fmt: skip
    op = spec.record._make((*ints, *blobs))
    if isinstance(op, Fallocate) and not 0 <= op.length <= 1 << 20:
        op = op._make((*op[:-1], 4096))  # real blocks: keep the disk for the other tests
    return Call(0, 1, op)


@fuzz
@given(call=hostile_calls())
def test_any_call_gets_a_reply_the_master_accepts(
    world: tuple[Executor, Path, Path], call: Call, capsys: pytest.CaptureFixture[str]
) -> None:
    ex, box, outside = world
    refill(box)
    try:
        reply = perform(ex, call)
    except MustBlock:
        # A call that would wait (a FIFO, a lock): fshub runs it in a thread; nothing
        # in the box makes one wait for long, but do not wait here at all.
        return
    assert isinstance(reply, Reply)
    bound = reply_bound(call.op)
    if bound is not None and bound < 0:  # no master asks for a negative size: no bytes
        assert -4095 <= reply.result <= 0 and not reply.blob
    else:
        check_reply(reply, bound, reply_shape(call.op))
    assert "internal error" not in capsys.readouterr().err
    assert os.listdir(outside) == ["sentinel"]
    assert (outside / "sentinel").read_bytes() == b"untouched"


def test_the_calls_left_out_are_refused_without_a_lender(
    world: tuple[Executor, Path, Path],
) -> None:
    ex, _, _ = world
    assert perform(ex, Call(0, 1, Lend(fd=0))).result < 0
    tty = Tty(handle=99, request=0x5401, arg=0, size=60, data=b"")
    assert perform(ex, Call(0, 1, tty)).result < 0
    assert perform(ex, Call(0, 1, Stat(dir=0, flags=0, mask=0, path=b"/"))).result == 0
