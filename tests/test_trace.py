"""``--trace`` lines: the arguments decoded by the kinds of the table's signatures."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pytest

from fsys.kmod.table import Syscall, load, parse
from fsys.master.device import Notification
from fsys.master.trace import Tracer, format_call, format_result

TABLE = load()
AT_FDCWD = (1 << 64) - 100  # as the kernel hands it over: -100 sign-extended to 64 bits
BUF = 0x7FFD_1234_5000


@dataclass
class FakeTarget:
    shown: bytes


@dataclass
class FakeCall:
    notif: Notification
    syscall: Syscall
    targets: tuple[FakeTarget, ...] = ()
    side: str = "slave"
    note: str = ""


def call(name: str | Syscall, *args: int, paths: tuple[bytes, ...] = ()) -> FakeCall:
    syscall = TABLE[name] if isinstance(name, str) else name
    padded = (*args, *(0xDEAD for _ in range(6 - len(args))))
    return FakeCall(
        Notification(1, 4242, syscall.nr, padded), syscall, tuple(FakeTarget(p) for p in paths)
    )


def test_openat() -> None:
    c = call("openat", AT_FDCWD, BUF, 0o1101, 0o666, paths=(b"/a/b/f",))
    assert format_call(c) == 'openat(AT_FDCWD, "/a/b/f", O_WRONLY|O_CREAT|O_TRUNC, 0666)'
    c = call("openat", 7, BUF, 0o2200000, 0, paths=(b"d",))
    assert format_call(c) == 'openat(7, "d", O_RDONLY|O_DIRECTORY|O_CLOEXEC, 00)'


def test_statx() -> None:
    c = call("statx", 3, BUF, 0x1100 | 0x2000, 0x7FF, BUF + 8, paths=(b"",))
    assert format_call(c) == (
        'statx(3, "", AT_SYMLINK_NOFOLLOW|AT_EMPTY_PATH|0x2000, 0x7ff, 0x7ffd12345008)'
    )
    assert format_call(call("statx", AT_FDCWD, BUF, 0, 0xFFF, BUF, paths=(b"x",))) == (
        'statx(AT_FDCWD, "x", 0, 0xfff, 0x7ffd12345000)'
    )


def test_read_shows_its_count_unsigned() -> None:
    assert format_call(call("read", 5, BUF, 4096)) == "read(5, 0x7ffd12345000, 4096)"
    assert format_call(call("read", (1 << 64) - 1, 0, (1 << 64) - 1)) == (
        "read(-1, 0x0, 18446744073709551615)"
    )


def test_rename_shows_both_paths_in_order() -> None:
    c = call("rename", BUF, BUF + 64, paths=(b"/x", b'/proc/"x\\'))
    assert format_call(c) == 'rename("/x", "/proc/\\"x\\\\")'


def test_renameat2_pairs_each_path_with_its_target() -> None:
    c = call("renameat2", AT_FDCWD, BUF, 9, BUF + 64, 1, paths=(b"old", b"new"))
    assert format_call(c) == 'renameat2(AT_FDCWD, "old", 9, "new", 0x1)'


def test_fchownat() -> None:
    c = call("fchownat", AT_FDCWD, BUF, 0xFFFFFFFF, 100, 0x100, paths=(b"f\xff",))
    assert format_call(c) == 'fchownat(AT_FDCWD, "f\\\\xff", -1, 100, AT_SYMLINK_NOFOLLOW)'


def test_a_path_without_a_target_is_shown_as_its_pointer() -> None:
    assert format_call(call("unlink", BUF)) == "unlink(0x7ffd12345000)"


def test_other_kinds() -> None:
    assert format_call(call("lseek", 3, (1 << 64) - 10, 2)) == "lseek(3, -10, 2)"
    assert format_call(call("umask", 0o22)) == "umask(022)"
    assert format_call(call("mkdir", BUF, 0o40755, paths=(b"d",))) == 'mkdir("d", 0o40755)'
    assert format_call(call("ioctl", 1, 0x5401, BUF)) == "ioctl(1, 0x5401, 0x7ffd12345000)"
    assert format_call(call("symlink", BUF, BUF + 64, paths=(b"/l",))) == (
        'symlink(0x7ffd12345000, "/l")'
    )


def test_a_call_without_arguments() -> None:
    assert format_call(call("getpid")) == "getpid()"


def test_an_unknown_signature_shows_three_args_in_hex() -> None:
    futex = parse("202\tfutex\tnative\t-\t-\t-\t?\n")["futex"]
    assert not futex.signature_known
    assert format_call(call(futex, BUF, 0x80, 1, 0, 0, 0)) == "futex(0x7ffd12345000, 0x80, 0x1)"


@pytest.mark.parametrize(
    ("outcome", "text"),
    [
        (0, "0"),
        (3, "3"),
        (1 << 40, "1099511627776"),
        (-2, "-1 ENOENT (No such file or directory)"),
        (-18, "-1 EXDEV (Invalid cross-device link)"),
        (-4000, "-1 4000 (Unknown error 4000)"),
        (object(), "? (native)"),
        (None, "? (native)"),
    ],
)
def test_format_result(outcome: object, text: str) -> None:
    assert format_result(outcome) == text


def test_tracer_lines_and_summary() -> None:
    out = io.StringIO()
    tracer = Tracer(out)
    assert not tracer.all
    c = call("openat", AT_FDCWD, BUF, 0o1101, 0o666, paths=(b"/a/b/f",))
    tracer.line(c, 3, 41)
    c = call("unlink", BUF, paths=(b"/nope",))
    tracer.line(c, -2, 7)
    c = call("unlink", BUF, paths=(b"/here",))
    c.side, c.note = "hub", "not forwarded"
    tracer.line(c, object(), 0)
    tracer.summary({"calls": 3, "forwarded_calls": 2})
    assert out.getvalue() == (
        '[4242] openat(AT_FDCWD, "/a/b/f", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 3 <slave 41us>\n'
        '[4242] unlink("/nope") = -1 ENOENT (No such file or directory) <slave 7us>\n'
        '[4242] unlink("/here") = ? (native) <hub not forwarded 0us>\n'
        "fsys-master: session ended: 3 calls, 2 forwarded calls\n"
    )
