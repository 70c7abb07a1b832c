"""The wire protocol: synchronous, byte-exact, no I/O."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fsys.errors import LocalProtocolError, RemoteProtocolError
from fsys.protocol import (
    CLOSED,
    HEADER,
    MAX_BODY,
    MAX_IO,
    MAX_NAME,
    MAX_PATH,
    NEED_DATA,
    SPECS,
    Call,
    Census,
    Close,
    ClosePairing,
    Connection,
    Event,
    Goodbye,
    Hello,
    Kind,
    Op,
    OpenPairing,
    Process,
    Processes,
    Reply,
    Role,
    Signal,
    Stat,
    Stopped,
    Write,
    check_call,
    encode,
    encode_iov,
)


def opened(role: Role) -> Connection:
    """A connection past the handshake."""
    conn = Connection(role)
    conn.send(Hello())
    conn.receive_data(encode(Hello()))
    assert conn.next_event() == Hello()
    return conn


def one_event(conn: Connection, data: bytes) -> Event:
    conn.receive_data(data)
    event = conn.next_event()
    assert conn.next_event() is NEED_DATA
    assert isinstance(
        event,
        Hello
        | Call
        | Reply
        | OpenPairing
        | ClosePairing
        | Goodbye
        | Signal
        | Stopped
        | Census
        | Processes,
    )
    return event


def test_call_bytes_are_exact() -> None:
    data = encode(Call(3, 7, Stat(dir=0, flags=0x100, mask=0x7FF, path=b"/a/b")))
    body = struct.pack("<qqq", 0, 0x100, 0x7FF) + struct.pack("<I", 4) + b"/a/b"
    assert data == HEADER.pack(len(body), 2, 0, Op.STAT, 3, 7) + body
    assert data[:16].hex() == "20000000020006000300000007000000"


def test_reply_bytes_are_exact() -> None:
    data = encode(Reply(1, 9, -2, b""))
    assert data == HEADER.pack(8, 3, 0, 0, 1, 9) + struct.pack("<q", -2)


def test_hello_bytes_are_exact() -> None:
    data = encode(Hello(1, 0, b"hi"))
    assert data == HEADER.pack(18, 1, 0, 0, 0, 0) + b"FSYS" + struct.pack("<HHQ", 1, 0, 0) + b"hi"


def _ints(n: int) -> st.SearchStrategy[tuple[int, ...]]:
    return st.tuples(*[st.integers(-(2**63), 2**63 - 1)] * n)


def _blob(is_path: bool) -> st.SearchStrategy[bytes]:
    if is_path:
        return st.binary(max_size=300).map(lambda b: b.replace(b"\0", b"x"))
    return st.binary(max_size=300)


@st.composite
def calls(draw: st.DrawFn) -> Call:
    spec = draw(st.sampled_from(list(SPECS.values())))
    ints = draw(_ints(spec.nints))
    blobs = tuple(draw(_blob(is_path)) for is_path in spec.paths)
    op = spec.record._make((*ints, *blobs))
    return Call(draw(st.sampled_from([0, 1])), draw(st.integers(0, 2**32 - 1)), op)


@given(calls())
def test_every_call_round_trips(call: Call) -> None:
    master, slave = opened(Role.MASTER), opened(Role.SLAVE)
    master.send(OpenPairing(1))
    slave.receive_data(encode(OpenPairing(1)))
    assert slave.next_event() == OpenPairing(1, 0)
    data = master.send(call)
    assert one_event(slave, data) == call


@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(-(2**63), 2**63 - 1),
    st.binary(max_size=1000),
)
def test_every_reply_round_trips(pairing: int, request: int, result: int, blob: bytes) -> None:
    reply = Reply(pairing, request, result, blob)
    slave, master = opened(Role.SLAVE), opened(Role.MASTER)
    assert one_event(master, slave.send(reply)) == reply


@pytest.mark.parametrize(
    "event", [Hello(1, 5, b"x"), OpenPairing(4, 0), ClosePairing(4), Goodbye(b"why")]
)
def test_other_messages_round_trip(event: Event) -> None:
    master = Connection(Role.MASTER)
    slave = Connection(Role.SLAVE)
    if not isinstance(event, Hello):
        master = opened(Role.MASTER)
        slave = opened(Role.SLAVE)
    if isinstance(event, ClosePairing):
        slave.receive_data(master.send(OpenPairing(4)))
        slave.next_event()
    assert one_event(slave, master.send(event)) == event


@given(st.binary(min_size=1, max_size=200), st.integers(1, 50))
def test_split_anywhere(tail: bytes, cut: int) -> None:
    data = encode(Reply(0, 1, 5, tail))
    master = opened(Role.MASTER)
    master.receive_data(data[:cut])
    if cut < len(data):
        assert master.next_event() is NEED_DATA
        master.receive_data(data[cut:])
    assert master.next_event() == Reply(0, 1, 5, tail)


def test_large_read_reply_fits_the_limit() -> None:
    reply = Reply(0, 1, MAX_IO, b"x" * MAX_IO)
    assert one_event(opened(Role.MASTER), opened(Role.SLAVE).send(reply)) == reply


def test_oversized_header_is_rejected_before_the_body_arrives() -> None:
    master = opened(Role.MASTER)
    master.receive_data(HEADER.pack(MAX_BODY + 1, 3, 0, 0, 0, 1))
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        master.next_event()
    with pytest.raises(RemoteProtocolError):  # the connection stays broken
        master.next_event()


def test_path_limits_and_nul_are_enforced() -> None:
    slave = opened(Role.SLAVE)
    body = struct.pack("<qqq", 0, 0, 0) + struct.pack("<I", MAX_PATH) + b"a" * MAX_PATH
    slave.receive_data(HEADER.pack(len(body), 2, 0, Op.STAT, 0, 1) + body)
    with pytest.raises(RemoteProtocolError, match="limit"):
        slave.next_event()
    slave = opened(Role.SLAVE)
    body = struct.pack("<qqq", 0, 0, 0) + struct.pack("<I", 3) + b"a\0b"
    slave.receive_data(HEADER.pack(len(body), 2, 0, Op.STAT, 0, 1) + body)
    with pytest.raises(RemoteProtocolError, match="NUL"):
        slave.next_event()


def test_sending_too_long_a_path_is_local_misuse() -> None:
    master = opened(Role.MASTER)
    with pytest.raises(LocalProtocolError):
        master.send(Call(0, 1, Stat(dir=0, flags=0, mask=0, path=b"a" * MAX_PATH)))
    with pytest.raises(LocalProtocolError, match="out of range"):
        check_call(Stat(dir=0, flags=1 << 63, mask=0, path=b"a"))
    with pytest.raises(LocalProtocolError, match="limit"):
        check_call(Write(handle=1, offset=0, rwf=0, data=b"x" * (MAX_IO + 1)))
    check_call(Stat(dir=0, flags=-(1 << 63), mask=(1 << 63) - 1, path=b"a" * (MAX_PATH - 1)))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (HEADER.pack(0, 3, 0, 0, 0, 1), "truncated reply"),
        (HEADER.pack(0, 99, 0, 0, 0, 0), "unknown frame kind 99"),
        (HEADER.pack(1, 4, 0, 0, 5, 0) + b"x", "bad OPEN_PAIRING"),
    ],
)
def test_malformed_frames(data: bytes, message: str) -> None:
    master = opened(Role.MASTER)
    master.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=message):
        master.next_event()


def test_unknown_op_and_trailing_bytes() -> None:
    slave = opened(Role.SLAVE)
    slave.receive_data(HEADER.pack(0, 2, 0, 999, 0, 1))
    with pytest.raises(RemoteProtocolError, match="unknown op 999"):
        slave.next_event()
    slave = opened(Role.SLAVE)
    body = struct.pack("<q", 1) + b"zz"
    slave.receive_data(HEADER.pack(len(body), 2, 0, Op.CLOSE, 0, 0) + body)
    with pytest.raises(RemoteProtocolError, match="trailing"):
        slave.next_event()


@given(st.binary(max_size=400))
def test_garbage_never_crashes_or_hangs(garbage: bytes) -> None:
    """Garbage ends in a RemoteProtocolError (the connection then stays broken), or in
    CLOSED after a GOODBYE it happened to hold; every event before is a whole frame."""
    slave = opened(Role.SLAVE)
    slave.receive_data(garbage)
    slave.receive_data(b"")
    events: list[object] = []
    try:
        while (event := slave.next_event()) is not CLOSED:
            assert event is not NEED_DATA  # at end of file, never "wait for more"
            events.append(event)
            assert len(events) <= len(garbage) // 16  # each took a header at least
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError):
            slave.next_event()
    else:
        assert events and isinstance(events[-1], Goodbye)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00" * 15,  # half a header
        HEADER.pack(5, 3, 0, 0, 0, 1) + b"ab",  # half a body
        HEADER.pack(0, 99, 0, 0, 0, 1),  # an unknown kind
        HEADER.pack(8, 3, 0, 0, 0, 1) + struct.pack("<q", 0),  # a REPLY from the master
    ],
)
def test_garbage_examples_are_each_an_error(data: bytes) -> None:
    slave = opened(Role.SLAVE)
    slave.receive_data(data)
    slave.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        slave.next_event()


def test_the_first_frame_must_be_hello() -> None:
    slave = Connection(Role.SLAVE)
    slave.receive_data(encode(Call(0, 1, Close(handle=1))))
    with pytest.raises(RemoteProtocolError, match="not an fsys peer"):
        slave.next_event()


def test_version_mismatch() -> None:
    slave = Connection(Role.SLAVE)
    slave.receive_data(encode(Hello(version=99)))
    with pytest.raises(RemoteProtocolError, match="version 99"):
        slave.next_event()


def test_state_rules() -> None:
    slave = opened(Role.SLAVE)
    with pytest.raises(LocalProtocolError):
        slave.send(Call(0, 1, Close(handle=1)))  # a slave never calls
    master = opened(Role.MASTER)
    master.receive_data(encode(Call(0, 1, Close(handle=1))))
    with pytest.raises(RemoteProtocolError, match="Call from the slave"):
        master.next_event()
    master = opened(Role.MASTER)
    master.send(Goodbye())
    with pytest.raises(LocalProtocolError, match="state done"):
        master.send(Call(0, 1, Close(handle=1)))


def test_pairings_must_be_opened_and_never_reused() -> None:
    slave = opened(Role.SLAVE)
    slave.receive_data(encode(Call(5, 1, Close(handle=1))))
    with pytest.raises(RemoteProtocolError, match="pairing 5 is not open"):
        slave.next_event()
    master = opened(Role.MASTER)
    master.send(OpenPairing(5))
    master.send(ClosePairing(5))
    with pytest.raises(LocalProtocolError, match="opened twice"):
        master.send(OpenPairing(5))
    with pytest.raises(LocalProtocolError, match="unknown parent"):
        master.send(OpenPairing(6, parent=7))
    with pytest.raises(LocalProtocolError, match="cannot be closed"):
        master.send(ClosePairing(0))


def test_end_of_file() -> None:
    master = opened(Role.MASTER)
    master.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="without GOODBYE"):
        master.next_event()
    master = opened(Role.MASTER)
    master.receive_data(encode(Goodbye(b"bye")))
    assert master.next_event() == Goodbye(b"bye")
    master.receive_data(b"")
    assert master.next_event() is CLOSED
    master = opened(Role.MASTER)
    master.receive_data(encode(Reply(0, 1, 0))[:10])
    master.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        master.next_event()


def test_every_op_has_one_record_with_named_fields() -> None:
    assert sorted(spec.op for spec in SPECS.values()) == sorted(Op)
    for record, spec in SPECS.items():
        assert spec.record is record
        assert len(record._fields) == spec.nints + len(spec.limits)


def test_fields_cross_by_name() -> None:
    """A record decoded on the other side has each value under the same name."""
    master, slave = opened(Role.MASTER), opened(Role.SLAVE)
    op = Write(handle=7, offset=-1, rwf=16, data=b"xy")
    event = one_event(slave, master.send(Call(0, 3, op)))
    assert isinstance(event, Call) and isinstance(event.op, Write)
    assert (event.op.handle, event.op.offset, event.op.rwf, event.op.data) == (7, -1, 16, b"xy")


def test_docs_protocol_md_declares_every_record_as_the_code_does() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    for spec in SPECS.values():
        fields = spec.record._fields
        ints, blobs = " ".join(fields[: spec.nints]), " ".join(fields[spec.nints :])
        row = f"| {int(spec.op)} {spec.op.name} | `{spec.record.__name__}` | {ints} | {blobs} |"
        assert row in doc, row


@pytest.mark.parametrize("signum", [1, 2, 20, 28, 64])
def test_signals_go_slave_to_master_and_stops_master_to_slave(signum: int) -> None:
    slave, master = opened(Role.SLAVE), opened(Role.MASTER)
    assert one_event(master, slave.send(Signal(signum))) == Signal(signum)
    assert one_event(slave, master.send(Stopped(signum))) == Stopped(signum)
    with pytest.raises(LocalProtocolError):
        master.send(Signal(signum))  # the master relays no signal to the slave
    with pytest.raises(LocalProtocolError):
        slave.send(Stopped(signum))


@pytest.mark.parametrize("signum", [0, 65, 2**32 - 1])
def test_a_signal_out_of_range_is_refused_both_ways(signum: int) -> None:
    slave, master = opened(Role.SLAVE), opened(Role.MASTER)
    with pytest.raises(LocalProtocolError):
        slave.send(Signal(signum if signum < 2**32 - 1 else 0))
    forged = HEADER.pack(8, Kind.SIGNAL, 0, 0, 0, 0) + signum.to_bytes(4, "little") + bytes(4)
    master.receive_data(forged)
    with pytest.raises(RemoteProtocolError, match="out of range"):
        master.next_event()


def test_a_signal_with_a_body_of_another_size_is_refused() -> None:
    master = opened(Role.MASTER)
    master.receive_data(HEADER.pack(4, Kind.SIGNAL, 0, 0, 0, 0) + bytes(4))
    with pytest.raises(RemoteProtocolError, match="bad SIGNAL body"):
        master.next_event()


def test_a_signal_for_one_process() -> None:
    slave, master = opened(Role.SLAVE), opened(Role.MASTER)
    data = slave.send(Signal(9, 4242))
    assert data == HEADER.pack(8, Kind.SIGNAL, 0, 0, 0, 0) + struct.pack("<II", 9, 4242)
    assert one_event(master, data) == Signal(9, 4242)
    with pytest.raises(LocalProtocolError, match="pid"):
        slave.send(Signal(9, 2**31))
    master.receive_data(HEADER.pack(8, Kind.SIGNAL, 0, 0, 0, 0) + struct.pack("<II", 9, 2**31))
    with pytest.raises(RemoteProtocolError, match="pid"):
        master.next_event()


def test_a_census_and_its_answer() -> None:
    slave, master = opened(Role.SLAVE), opened(Role.MASTER)
    assert one_event(master, slave.send(Census(7))) == Census(7)
    entries = (Process(10, 1, 10, b"S", b"sh"), Process(11, 10, 10, b"R", b"x" * MAX_NAME))
    data = master.send(Processes(7, entries))
    assert len(data) == 16 + 4 + 2 * 14 + 2 + MAX_NAME
    assert one_event(slave, data) == Processes(7, entries)
    assert one_event(slave, master.send(Processes(8, ()))) == Processes(8, ())
    with pytest.raises(LocalProtocolError):
        master.send(Census(1))  # the slave asks, the master answers
    with pytest.raises(LocalProtocolError):
        slave.send(Processes(1, ()))
    with pytest.raises(LocalProtocolError, match="out of range"):
        master.send(Processes(1, (Process(1, 0, 1, b"S", b"y" * (MAX_NAME + 1)),)))


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"", "bad PROCESSES body"),
     (struct.pack("<I", 1), "truncated PROCESSES entry"),
     (struct.pack("<I", 1) + struct.pack("<IIIcB", 1, 0, 1, b"S", 5) + b"ab", "name"),
     (struct.pack("<I", 1) + struct.pack("<IIIcB", 1, 0, 1, b"S", 200) + bytes(200), "name"),
     (struct.pack("<I", 0) + b"x", "trailing bytes")],
)  # fmt: skip
def test_a_forged_processes_answer_is_named(body: bytes, message: str) -> None:
    slave = opened(Role.SLAVE)
    slave.receive_data(HEADER.pack(len(body), Kind.PROCESSES, 0, 0, 0, 1) + body)
    with pytest.raises(RemoteProtocolError, match=message):
        slave.next_event()
    master = opened(Role.MASTER)
    master.receive_data(HEADER.pack(1, Kind.CENSUS, 0, 0, 0, 1) + b"x")
    with pytest.raises(RemoteProtocolError, match="bad CENSUS body"):
        master.next_event()


@pytest.mark.parametrize(
    "event",
    [
        Call(1, 2, Write(handle=3, offset=-1, rwf=0, data=b"d" * 70000)),
        Call(1, 2, Stat(dir=0, flags=0, mask=0x7FF, path=b"/a/b")),
        Call(1, 2, Close(handle=5)),
        Reply(1, 2, 70000, b"r" * 70000, 0),
        Reply(1, 2, -2),
        Goodbye(b"bye"),
    ],
)
def test_a_frame_in_pieces_is_the_frame(event: Event) -> None:
    pieces = encode_iov(event)
    assert b"".join(pieces) == encode(event)
    blob = getattr(event, "blob", None)
    if isinstance(event, Call) and isinstance(event.op, Write):
        blob = event.op.data
    if blob:
        assert any(piece is blob for piece in pieces)  # not copied


def test_sending_in_pieces_keeps_the_rules_of_sending() -> None:
    conn = Connection(Role.SLAVE)
    with pytest.raises(LocalProtocolError):
        conn.send_iov(Reply(1, 2, 0, b"x"))  # before HELLO
    conn.send_iov(Hello())
    with pytest.raises(LocalProtocolError):
        conn.send_iov(Reply(1, 2, 0, bytes(MAX_IO + 1)))
