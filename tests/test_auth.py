"""Addresses and the shared secret's exchange, in process (over socketpairs)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from fsys import auth
from fsys.address import AddressError, parse

SECRET = b"correct horse battery staple"


# --- addresses ---------------------------------------------------------------------------


def test_addresses_parse_and_print_back() -> None:
    for text in ("unix:/run/fsys.sock", "tcp:127.0.0.1:7000", "tcp:[::1]:0", "tcp:box:22"):
        assert str(parse(text)) == text
    assert parse("unix:rel/s").where == "rel/s"
    assert parse("tcp:[::1]:9").family == socket.AF_INET6


@pytest.mark.parametrize(
    ("text", "says"),
    [("box:22", "not unix:PATH"), ("unix:", "no path"), ("tcp:host", "not tcp:HOST:PORT"),
     ("tcp:host:http", "port"), ("tcp:h:70000", "port"), ("tcp:::1:5", "brackets"),
     ("unix:/" + "x" * 120, "107 bytes")],
)  # fmt: skip
def test_bad_addresses_say_why(text: str, says: str) -> None:
    with pytest.raises(AddressError, match=says):
        parse(text)


# --- the secret and the exchange ---------------------------------------------------------


def exchange(slave_secret: bytes | None, master_secret: bytes | None) -> tuple[str, str]:
    """Both sides of the exchange over a socketpair: what each raised ("" if nothing)."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    outcome = {"slave": "", "master": ""}

    def slave() -> None:
        try:
            auth.greet(a, slave_secret)
        except auth.AuthError as exc:
            outcome["slave"] = str(exc)
        finally:
            a.close()  # as the service does: the session never begins

    thread = threading.Thread(target=slave)
    thread.start()
    try:
        auth.answer(b, master_secret)
    except auth.AuthError as exc:
        outcome["master"] = str(exc)
    b.close()  # as the master does when it gives up
    thread.join()
    return outcome["slave"], outcome["master"]


def test_the_same_secret_lets_in() -> None:
    assert exchange(SECRET, SECRET) == ("", "")


def test_no_secret_asked_none_needed() -> None:
    assert exchange(None, None) == ("", "")
    assert exchange(None, SECRET) == ("", "")


def test_a_wrong_or_missing_secret_is_refused() -> None:
    slave, master = exchange(SECRET, b"another secret, just as long")
    assert slave == "wrong secret" and "refused our secret" in master
    slave, master = exchange(SECRET, None)
    assert "asks for a secret" in master and "FSYS_SECRET" in master
    assert "closed before the answer" in slave


def test_an_answer_seen_on_the_wire_cannot_be_replayed() -> None:
    # A good answer to an earlier challenge, sent to a new greeting: refused.
    earlier = os.urandom(32)
    seen = auth._mac(SECRET, b"fsys master", earlier, b"y" * 32)
    a2, b2 = socket.socketpair()
    failed: list[str] = []

    def second() -> None:
        try:
            auth.greet(a2, SECRET)
        except auth.AuthError as exc:
            failed.append(str(exc))

    thread = threading.Thread(target=second)
    thread.start()
    b2.recv(auth.GREETING.size)
    b2.sendall(b"y" * 32 + seen)
    assert b2.recv(2) == b"NO"
    thread.join()
    assert failed == ["wrong secret"]
    a2.close()
    b2.close()


def test_a_slave_that_does_not_know_the_secret_is_found_out() -> None:
    a, b = socket.socketpair()

    def impostor() -> None:
        a.sendall(auth.GREETING.pack(auth.MAGIC, auth.VERSION, auth.Method.HMAC, os.urandom(32)))
        a.recv(auth.ANSWER)
        a.sendall(b"OK" + os.urandom(auth.MAC))  # it cannot compute the proof

    threading.Thread(target=impostor).start()
    with pytest.raises(auth.AuthError, match="does not know the secret"):
        auth.answer(b, SECRET)
    a.close()
    b.close()


@pytest.mark.parametrize(
    ("sent", "says"),
    [(b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n" + bytes(20), "not a listening fsys slave"),
     (auth.GREETING.pack(auth.MAGIC, 9, 0, bytes(32)), "version 9"),
     (auth.GREETING.pack(auth.MAGIC, auth.VERSION, 7, bytes(32)), "unknown method 7"),
     (b"FSYSAU", "closed before the greeting")],
)  # fmt: skip
def test_what_is_not_a_greeting_is_named(sent: bytes, says: str) -> None:
    a, b = socket.socketpair()
    a.sendall(sent)
    a.close()
    with pytest.raises(auth.AuthError, match=says):
        auth.answer(b, SECRET)
    b.close()


def test_a_refusal_carries_its_reason() -> None:
    a, b = socket.socketpair()
    auth.refuse(a, "3 sessions already (--max-sessions)")
    with pytest.raises(auth.AuthError, match="refused the session: 3 sessions already"):
        auth.answer(b, SECRET)
    a.close()
    b.close()


def test_secret_files(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_bytes(SECRET + b"\n")
    f.chmod(0o600)
    assert auth.load_secret(str(f)) == SECRET  # the final newline is not part of it
    f.chmod(0o640)
    with pytest.raises(auth.AuthError, match=r"others may read it \(mode 640\): chmod 600"):
        auth.load_secret(str(f))
    f.chmod(0o600)
    f.write_bytes(b"short")
    with pytest.raises(auth.AuthError, match="shorter than 16"):
        auth.load_secret(str(f))
    with pytest.raises(auth.AuthError, match="No such file"):
        auth.load_secret(str(tmp_path / "missing"))
    with pytest.raises(auth.AuthError, match="not a regular file"):
        auth.load_secret(str(tmp_path))
    assert auth.load_secret(None, {"FSYS_SECRET": SECRET.decode()}) == SECRET
    assert auth.load_secret(None, {}) is None
    with pytest.raises(auth.AuthError, match="FSYS_SECRET is shorter"):
        auth.load_secret(None, {"FSYS_SECRET": "abc"})


def test_a_secret_file_of_another_owner_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    f = tmp_path / "secret"
    f.write_bytes(SECRET)
    f.chmod(0o600)
    os.chown(f, 65534, 65534)
    with pytest.raises(auth.AuthError, match="owned by uid 65534"):
        auth.load_secret(str(f))
