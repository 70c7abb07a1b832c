"""Corner cases of the kernel's semantics that fsys must keep (found in review)."""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.conftest import PYTHON, SYSTEM_PYTHON, Session, run_master

pytestmark = pytest.mark.e2e

RAW = """
import ctypes, os, errno
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sys(nr, *args):
    r = libc.syscall(ctypes.c_long(nr), *[a if isinstance(a, (bytes, ctypes.Array))
                                            else ctypes.c_long(a) for a in args])
    return r if r >= 0 else -ctypes.get_errno()
def name(r):
    return "ok" if r >= 0 else errno.errorcode[-r]
"""


async def run_py(session: Session, script: str, *args: str) -> str:
    result = await session.run(SYSTEM_PYTHON, "-c", textwrap.dedent(script), *args)
    assert result.status == 0, result.err
    return result.out


async def test_a_reused_thread_id_belongs_to_its_new_process(session: Session) -> None:
    # A thread of A makes a call and exits; its tid is given (ns_last_pid) to a new
    # process C in another directory: C's calls must be C's, not A's.
    for name, text in (("sub1", "one\n"), ("sub2", "two\n")):
        (session.box / name).mkdir()
        (session.box / name / "f.txt").write_text(text)
    script = """
        import os, threading
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        b = os.fork()
        if b == 0:
            os.close(w1)
            os.close(r2)
            os.chdir("/sub2")
            while True:
                want = os.read(r1, 8)
                if not want:
                    os._exit(0)
                c = os.fork()
                if c == 0:
                    print("C read", open("f.txt").read().strip(), flush=True)
                    os._exit(0)
                os.waitpid(c, 0)
                os.write(w2, b"1" if c == int(want) else b"0")
        os.close(r1)
        os.close(w2)
        os.chdir("/sub1")
        for _ in range(20):
            tid = []
            t = threading.Thread(target=lambda: (tid.append(threading.get_native_id()),
                                                 os.stat("/sub1/f.txt")))
            t.start()
            t.join()
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(tid[0] - 1))
            os.write(w1, b"%8d" % tid[0])
            if os.read(r2, 1) == b"1":
                print("reused")
                break
        os.close(w1)
        os.waitpid(b, 0)
    """
    out = await run_py(session, script)
    assert out.splitlines()[-1] == "reused", out  # the tid was really reused
    assert set(out.splitlines()[:-1]) == {"C read two"}


async def test_open_ignores_what_the_kernel_ignores(session: Session) -> None:
    (session.box / "f").write_text("x")
    script = (
        RAW
        + """
AT_FDCWD = -100
print(name(sys(257, AT_FDCWD, b"/f", os.O_RDONLY, 0o644)),        # mode without O_CREAT
      name(sys(257, AT_FDCWD, b"/f", os.O_RDONLY | 0x40000000, 0)),  # an unknown bit
      name(sys(2, b"/f", os.O_RDONLY | os.O_PATH | os.O_APPEND, 0)))  # O_PATH drops others
"""
    )
    assert await run_py(session, script) == "ok ok ok\n"


async def test_pwritev2_append_and_preadv2_flags(session: Session) -> None:
    script = """
        import os, errno
        fd = os.open("/f", os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"0123456789")
        os.pwritev(fd, [b"AB"], 0, os.RWF_APPEND)
        buf = bytearray(12)
        os.preadv(fd, [buf], 0, 0)
        try:
            os.pwritev(fd, [b"x"], 0, 0x40000000)
        except OSError as e:
            print(e.errno == errno.EOPNOTSUPP)
        print(bytes(buf).decode())
    """
    assert await run_py(session, script) == "True\n0123456789AB\n"


async def test_a_refused_chdir_into_a_master_directory_changes_nothing(
    session: Session,
) -> None:
    master_dir = Path(tempfile.mkdtemp(prefix="fsys-chdir-"))
    try:
        (master_dir / "private").mkdir(mode=0o700)
        script = f"""
            import os, errno
            open("/here", "w").write("slave")
            os.setgid(65534)
            os.setuid(65534)
            try:
                os.chdir({str(master_dir / "private")!r})
            except OSError as e:
                print(errno.errorcode[e.errno])
            print(os.getcwd(), open("here").read())
        """
        result = await session.run(
            SYSTEM_PYTHON, "-c", textwrap.dedent(script), extra=["--local", str(master_dir)]
        )
        assert (result.status, result.out) == (0, "EACCES\n/ slave\n"), result.err
    finally:
        (master_dir / "private").rmdir()
        master_dir.rmdir()


async def test_empty_and_null_paths_with_at_empty_path(session: Session) -> None:
    (session.box / "d").mkdir()
    script = (
        RAW
        + """
AT_FDCWD, AT_EMPTY_PATH = -100, 0x1000
os.chdir("/d")
buf = ctypes.create_string_buffer(144)
null = sys(262, 1, 0, buf, AT_EMPTY_PATH)         # Linux 6.11: NULL means ""
here = sys(262, AT_FDCWD, b"", buf, AT_EMPTY_PATH)  # the current directory
ino = int.from_bytes(buf.raw[8:16], "little")
print(name(null), name(here), ino == os.stat(".").st_ino)
"""
    )
    assert await run_py(session, script) == "ok ok True\n"


async def test_many_open_remote_files(session: Session) -> None:
    (session.box / "f").write_text("x")
    script = """
        import os, resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
        fds = [os.open("/f", os.O_RDONLY) for _ in range(1500)]
        print(len(fds), os.read(fds[-1], 1).decode())
    """
    assert await run_py(session, script) == "1500 x\n"


async def test_slave_refuses_device_nodes_and_honours_trailing_slashes(
    session: Session,
) -> None:
    (session.box / "file").write_text("x")
    script = """
        import os, stat, errno
        def attempt(fn):
            try:
                fn()
                return "ok"
            except OSError as e:
                return errno.errorcode[e.errno]
        print(attempt(lambda: os.mknod("/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))),
              attempt(lambda: os.mkfifo("/fifo")),
              attempt(lambda: os.symlink("file", "/link/")),
              attempt(lambda: os.rename("/file/", "/other")),
              attempt(lambda: os.link("/file", "/hard/")))
    """
    assert await run_py(session, script) == "EPERM ok ENOENT ENOTDIR ENOENT\n"
    assert not (session.box / "null").exists()


async def test_a_lock_is_free_once_its_holder_closed_it(session: Session) -> None:
    (session.box / "lock").write_text("")
    script = """
        import fcntl, os
        failures = 0
        for _ in range(30):
            pid = os.fork()
            if pid == 0:
                fd = os.open("/lock", os.O_RDWR)
                fcntl.flock(fd, fcntl.LOCK_EX)
                os._exit(0)               # the exit closes fd: the lock is released
            os.waitpid(pid, 0)
            fd = os.open("/lock", os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                failures += 1
            os.close(fd)
        print(failures)
    """
    assert await run_py(session, script) == "0\n"


async def test_a_waiting_ofd_lock_does_not_stall_the_slave(session: Session) -> None:
    (session.box / "lock").write_text("")
    script = """
        import fcntl, os, struct, time
        F_OFD_SETLK, F_OFD_SETLKW = 37, 38
        def lock(fd, cmd, kind):
            fcntl.fcntl(fd, cmd, struct.pack("hh4xqqi4x", kind, 0, 0, 0, 0))
        holder = os.open("/lock", os.O_RDWR)
        lock(holder, F_OFD_SETLK, fcntl.F_WRLCK)
        pid = os.fork()
        if pid == 0:
            waiter = os.open("/lock", os.O_RDWR)
            lock(waiter, F_OFD_SETLKW, fcntl.F_WRLCK)   # waits for the holder
            os._exit(0)
        time.sleep(0.3)
        for i in range(10):
            os.stat("/lock")                 # the slave still answers
        lock(holder, F_OFD_SETLK, fcntl.F_UNLCK)
        _, status = os.waitpid(pid, 0)
        print("waiter got it", os.waitstatus_to_exitcode(status))
    """
    assert await run_py(session, script) == "waiter got it 0\n"


async def test_a_thread_blocked_in_the_slave_does_not_keep_it_alive(session: Session) -> None:
    os.mkfifo(session.box / "fifo")
    result = await session.sh("cat /fifo & sleep 0.5; kill -9 $!; echo done")
    assert (result.status, result.out) == (0, "done\n"), result.err


async def test_slave_started_elsewhere_reports_a_missing_root(tmp_path: Path) -> None:
    result = await run_master(
        ["run", "--slave", f"{PYTHON} -m fsys.slave serve --stdio --root /nonexistent",
         "--", "true"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.status == 125
    assert "No such file or directory" in result.err


async def test_open_ignores_undefined_low_flag_bits(session: Session) -> None:
    (session.box / "f").write_text("x")
    script = (
        RAW
        + """
print(name(sys(257, -100, b"/f", os.O_RDONLY | 0x24, 0)))
"""
    )
    assert await run_py(session, script) == "ok\n"


async def test_chdir_into_a_master_directory_is_what_the_kernel_did(session: Session) -> None:
    master_dir = Path(tempfile.mkdtemp(prefix="fsys-chdir-"))
    try:
        (master_dir / "a" / "b").mkdir(parents=True)
        (master_dir / "a" / "marker").write_text("")
        (master_dir / "link").symlink_to(master_dir / "a" / "b")
        script = f"""
            import os, errno
            os.chdir({str(master_dir / "link" / "..")!r})   # the kernel: .. of a/b
            print(os.getcwd() == {str(master_dir / "a")!r}, os.access("marker", os.F_OK))
            os.chdir("/")                                  # the slave's root
            open("/here", "w").close()
            try:
                os.chdir("/usr/fsys-no-such-dir")          # fails: stays on the slave
            except OSError as e:
                print(errno.errorcode[e.errno])
            pid = os.fork()
            if pid == 0:
                os._exit(0 if os.access("here", os.F_OK) else 1)
            _, status = os.waitpid(pid, 0)
            print(os.getcwd(), os.access("here", os.F_OK), os.waitstatus_to_exitcode(status))
        """
        result = await session.run(
            SYSTEM_PYTHON, "-c", textwrap.dedent(script), extra=["--local", str(master_dir)]
        )
        assert (result.status, result.out) == (0, "True True\nENOENT\n/ True 0\n"), result.err
    finally:
        (master_dir / "link").unlink()
        (master_dir / "a" / "marker").unlink()
        (master_dir / "a" / "b").rmdir()
        (master_dir / "a").rmdir()
        master_dir.rmdir()
