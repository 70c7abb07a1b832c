"""Paths that name a program's fds (/proc/self/fd/N, /dev/fd/N, /dev/stdin...) and
what copies trees with their modes (tar x, rsync -a) does through them, end to end
on a rooted slave, compared with the same script run natively."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SYSTEM_PYTHON, Session, native

FD_LINKS = r"""
import os, stat, sys
root = sys.argv[1]
os.makedirs(root + "/t/d")
with open(root + "/t/f", "w") as f:
    f.write("content")
fd = os.open(root + "/t/f", os.O_RDONLY)
link = f"/proc/self/fd/{fd}"
out = [os.readlink(link).removeprefix(root), os.readlink(f"/dev/fd/{fd}").removeprefix(root)]
os.chmod(link, 0o640)
out.append(oct(os.stat(root + "/t/f").st_mode & 0o777))
os.utime(link, (1_000_000, 2_000_000))
out.append(str(os.stat(root + "/t/f").st_mtime))
with open(link) as again:  # a new open file of the same file
    out.append(again.read())
out.append(str(os.access(link, os.R_OK)))
out.append(str(os.stat(link).st_size))
out.append(str(stat.S_ISLNK(os.lstat(link).st_mode)))  # the link itself: the master's
# glibc's fchmodat(AT_SYMLINK_NOFOLLOW): an O_PATH open, then chmod of /proc/self/fd/N.
os.chmod(root + "/t/f", 0o604, follow_symlinks=False)
os.chmod(root + "/t/d", 0o715, follow_symlinks=False)
out += [oct(os.stat(root + p).st_mode & 0o777) for p in ("/t/f", "/t/d")]
dfd = os.open(root + "/t", os.O_RDONLY | os.O_DIRECTORY)
out.append(open(f"/proc/self/fd/{dfd}/f").read())  # a path under a directory fd
print(" ".join(out))
"""


async def test_fd_links_name_the_remote_file(session: Session, tmp_path: Path) -> None:
    here = tmp_path / "native"
    here.mkdir()
    expected = native(FD_LINKS, here)
    assert expected.startswith("/t/f /t/f 0o640 2000000.0 content True 7 True 0o604 0o715")
    result = await session.run(SYSTEM_PYTHON, "-c", FD_LINKS, "")
    assert (result.status, result.out) == (0, expected), result.err
    session.master_untouched()


def tree(root: Path) -> list[tuple[str, int, int]]:
    """Each entry's path, mode and mtime."""
    return sorted(
        (str(p.relative_to(root)), p.lstat().st_mode, int(p.lstat().st_mtime))
        for p in root.rglob("*")
    )


def source_tree(src: Path) -> None:
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f").write_text("hi\n")
    (src / "a" / "x.sh").write_text("#!/bin/sh\n")
    (src / "a" / "b" / "ln").symlink_to("f")
    for path, mode in (("a/b/f", 0o640), ("a/x.sh", 0o751), ("a/b", 0o705), ("a", 0o711)):
        (src / path).chmod(mode)
    for path in ("a/b/f", "a/x.sh", "a/b", "a"):
        subprocess.run(["touch", "-h", "-d", "2001-02-03", str(src / path)], check=True)


async def test_tar_x_keeps_modes_and_times(session: Session, tmp_path: Path) -> None:
    src = tmp_path / "src"
    source_tree(src)
    subprocess.run(["tar", "cf", str(session.box / "t.tar"), "-C", str(src), "a"], check=True)
    result = await session.sh("mkdir /out && tar xf /t.tar -C /out")
    assert result.status == 0, result.err
    assert tree(session.box / "out") == tree(src)


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
async def test_rsync_a_keeps_modes_and_times(session: Session, tmp_path: Path) -> None:
    source_tree(session.box / "src")
    result = await session.run("rsync", "-a", "/src/", "/copy/")
    assert result.status == 0, result.err
    assert tree(session.box / "copy") == tree(session.box / "src")


KERNEL_RULES = r"""
import ctypes, errno, os, struct, sys
root = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
def e(fn):
    try:
        r = fn()
        return "ok" if r is None else repr(r)
    except OSError as exc:
        return errno.errorcode[exc.errno]
def c(result):
    return str(result) if result >= 0 else errno.errorcode[ctypes.get_errno()]
os.makedirs(root + "/b")
open(root + "/b/f", "w").write("x")
os.symlink("f", root + "/b/l")
out = []
# O_PATH fds: fstat works, fchmod and read are EBADF; readlinkat(fd, "") reads the link.
p = os.open(root + "/b/f", os.O_PATH)
out += [e(lambda: os.chmod(p, 0o600)), e(lambda: os.stat(p).st_size), e(lambda: os.read(p, 1))]
lp = os.open(root + "/b/l", os.O_PATH | os.O_NOFOLLOW)
buf = ctypes.create_string_buffer(100)
n = libc.readlinkat(lp, b"", buf, 100)
out.append(buf.raw[:n].decode() if n >= 0 else c(n))
# Unknown flag bits: EINVAL before any lookup.
st = ctypes.create_string_buffer(256)
name = (root + "/b/f").encode()
out.append(c(libc.syscall(439, -100, name, 0, 0x10000)))  # faccessat2
out.append(c(libc.fstatat(-100, name, st, 0x10000)))
out.append(c(libc.statx(-100, name, 0x10000, 0xFFF, st)))
out.append(c(libc.statx(-100, name, 0x6000, 0xFFF, st)))
# listxattr follows a symlink, llistxattr does not.
try:
    os.setxattr(root + "/b/f", "user.k", b"1")
    out += [e(lambda: os.listxattr(root + "/b/l")),
            e(lambda: os.listxattr(root + "/b/l", follow_symlinks=False))]
except OSError as exc:
    out.append("no-xattrs")
# /proc/self/cwd of a process in a slave directory.
os.chdir(root + "/b")
out.append(os.readlink("/proc/self/cwd").removeprefix(root))
out.append(open("/proc/self/cwd/f").read())
# openat2's RESOLVE_* flags apply from the working directory.
def openat2(path, resolve):
    how = struct.pack("QQQ", os.O_RDONLY, 0, resolve)
    fd = libc.syscall(437, -100, path, how, 24)
    return "fd" if fd >= 0 else c(fd)
out += [openat2(b"f", 0x08), openat2(b"../b/f", 0x08), openat2(b"l", 0x04),
        openat2((root + "/b/f").encode(), 0x08)]
print(" ".join(out))
"""


async def test_kernel_rules_hold_for_slave_files(session: Session, tmp_path: Path) -> None:
    here = tmp_path / "native"
    here.mkdir()
    expected = native(KERNEL_RULES, here)
    assert expected.startswith("EBADF 1 EBADF f EINVAL EINVAL EINVAL EINVAL"), expected
    assert expected.endswith("/b x fd EXDEV ELOOP EXDEV\n"), expected
    result = await session.run(SYSTEM_PYTHON, "-c", KERNEL_RULES, "")
    assert (result.status, result.out) == (0, expected), result.err


DNOTIFY = r"""
import fcntl, os, signal, sys, time
root, outside = sys.argv[1], sys.argv[2]  # outside: the same directory, not through fsys
os.makedirs(root + "/watched")
got = []
signal.signal(signal.SIGIO, lambda *a: got.append(1))
def wait():
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    seen = bool(got)
    got.clear()
    return "signal" if seen else "none"
fd = os.open(root + "/watched", os.O_RDONLY)
fcntl.fcntl(fd, fcntl.F_NOTIFY, fcntl.DN_CREATE | fcntl.DN_DELETE | fcntl.DN_MULTISHOT)
time.sleep(0.3)
open(root + "/watched/new", "w").close()  # by the program itself
out = [wait()]
time.sleep(0.3)
os.unlink(outside + "/watched/new")  # by another process of the slave's machine
out.append(wait())
fcntl.fcntl(fd, fcntl.F_NOTIFY, 0)  # no more
try:
    g = os.open(root + "/x", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.fcntl(g, fcntl.F_NOTIFY, fcntl.DN_CREATE)  # not a directory
except OSError as exc:
    out.append(exc.strerror)
print(" ".join(out))
"""


async def test_dnotify_on_a_slave_directory(session: Session, tmp_path: Path) -> None:
    here = tmp_path / "native"
    here.mkdir()
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", DNOTIFY, str(here), str(here)], check=False,
        capture_output=True, text=True,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "signal signal Not a directory\n"), done.stderr
    # The program reaches the box directly too (--local): a change made outside fsys.
    result = await session.run(
        SYSTEM_PYTHON, "-c", DNOTIFY, "", str(session.box), extra=["--local", str(session.box)]
    )
    assert (result.status, result.out) == (0, done.stdout), result.err
