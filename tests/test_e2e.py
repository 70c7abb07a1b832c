"""Real programs under a real master and slave (the slave rooted in a fresh box)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest
import trio

from tests.conftest import PYTHON, SYSTEM_PYTHON, Session, run_master, slave_command

pytestmark = pytest.mark.e2e

#: Both modes: trapped, and the view (where root and /dev/fuse allow it).
VIEW_OR_NOT = [
    pytest.param([], id="trapped"),
    pytest.param(["--view"], id="view", marks=pytest.mark.skipif(
        not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="--view: root, /dev/fuse")),
]  # fmt: skip


def populate(box: Path) -> None:
    (box / "data").mkdir()
    (box / "data" / "one.txt").write_text("one\n")
    (box / "data" / "two.txt").write_text("two\nlines\n")
    (box / "data" / "sub").mkdir()
    (box / "data" / "sub" / "three.txt").write_text("three\n")


async def test_issue_example(session: Session) -> None:
    assert not Path("/a").exists()
    result = await session.sh("mkdir -p /a/b && echo hi > /a/b/f && cat /a/b/f")
    assert (result.status, result.out) == (0, "hi\n"), result.err
    assert (session.box / "a" / "b" / "f").read_text() == "hi\n"
    assert not Path("/a").exists()
    session.master_untouched()


async def test_ls_la_root(session: Session) -> None:
    populate(session.box)
    (session.box / "secret").write_bytes(b"x" * 1234)
    result = await session.run("ls", "-la", "/")
    assert result.status == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("total ")
    names = {line.split()[-1] for line in lines[1:]}
    assert names == {".", "..", "data", "secret"}
    secret = next(line for line in lines if line.endswith(" secret"))
    assert " 1234 " in secret and secret.startswith("-rw")


async def test_embedded_slave_reads_etc_hostname(tmp_path: Path) -> None:
    result = await run_master(["run", "--trace", "--", "cat", "/etc/hostname"], cwd=tmp_path)
    assert result.status == 0, result.err
    assert result.out == Path("/etc/hostname").read_text()
    # The file was opened and read by the slave, not by the master's kernel.
    assert any(
        '"/etc/hostname"' in line and "<slave" in line and line.split("] ")[1].startswith("open")
        for line in result.err.splitlines()
    ), result.err


#: A script listing the descriptors from 3 up of the master (the program's parent:
#: "M TARGET" lines) and of its other children, the slave ("S TARGET").
HELD = """
held() { for f in /proc/$2/fd/*; do [ "${f##*/}" -lt 3 ] || echo "$1 $(readlink "$f")"; done; }
held M $PPID
for p in $(pgrep -P $PPID); do [ $p = $$ ] || held S $p; done
"""


@pytest.mark.parametrize("mode", VIEW_OR_NOT)
def test_the_embedded_slave_holds_none_of_the_masters_descriptors(
    tmp_path: Path, mode: list[str]
) -> None:
    # /proc is the master's: the program sees both. The master holds a pipe it was
    # given, the view's /dev/fuse, its own sockets; the slave must hold none of them.
    given_r, given_w = os.pipe()
    try:
        done = subprocess.run([PYTHON, "-m", "fsys.master", "run", *mode, "--", "/bin/sh", "-c",
                               HELD], cwd=tmp_path, pass_fds=(given_w,), capture_output=True,
                              timeout=60, check=False)  # fmt: skip
        given = f"pipe:[{os.fstat(given_w).st_ino}]"
    finally:
        os.close(given_r)
        os.close(given_w)
    assert done.returncode == 0, done.stderr
    lines = [line.split(" ", 1) for line in done.stdout.decode().splitlines()]
    master = {target for who, target in lines if who == "M"}
    slave = {target for who, target in lines if who == "S"}
    assert given in master and slave and (mode != ["--view"] or "/dev/fuse" in master)
    shared = {t for t in master & slave if t.startswith(("pipe:", "socket:", "/dev/fuse"))}
    assert shared == set()


async def test_coreutils(session: Session) -> None:
    populate(session.box)
    script = """
        set -e
        cp -r /data /copy
        mv /copy/one.txt /copy/uno.txt
        mkdir -p /deep/er/est
        sort /data/two.txt > /sorted
        head -n 1 /data/two.txt > /head
        tail -n 1 /data/two.txt > /tail
        wc -l /data/two.txt | cut -d' ' -f1 > /count
        find /data -type f | sort > /found
        stat -c '%s %F' /data/one.txt > /stat
        rm -r /copy/sub
        touch /gone && rm /gone
    """
    result = await session.sh(textwrap.dedent(script))
    assert result.status == 0, result.err
    box = session.box
    assert sorted(p.name for p in (box / "copy").iterdir()) == ["two.txt", "uno.txt"]
    assert (box / "copy" / "uno.txt").read_text() == "one\n"
    assert (box / "deep" / "er" / "est").is_dir()
    assert (box / "sorted").read_text() == "lines\ntwo\n"
    assert (box / "head").read_text() == "two\n"
    assert (box / "tail").read_text() == "lines\n"
    assert (box / "count").read_text() == "2\n"
    assert (box / "found").read_text().split() == [
        "/data/one.txt", "/data/sub/three.txt", "/data/two.txt"
    ]  # fmt: skip
    assert (box / "stat").read_text() == "4 regular file\n"
    assert not (box / "gone").exists()
    session.master_untouched()


async def test_python_script_walks_reads_writes(session: Session) -> None:
    populate(session.box)
    (session.box / "tool.py").write_text(
        textwrap.dedent(
            """
            import os, json
            found = {}
            for dirpath, dirnames, filenames in os.walk("/data"):
                for name in filenames:
                    path = os.path.join(dirpath, name)
                    with open(path) as f:
                        found[path] = f.read()
            os.makedirs("/out", exist_ok=True)
            with open("/out/report.json", "w") as f:
                json.dump(found, f, sort_keys=True)
            os.rename("/out/report.json", "/out/final.json")
            print(len(found), os.getcwd(), os.path.getsize("/out/final.json") > 0)
            """
        )
    )
    result = await session.run(SYSTEM_PYTHON, "/tool.py")
    assert result.status == 0, result.err
    assert result.out == "3 / True\n"
    report = (session.box / "out" / "final.json").read_text()
    assert '"/data/sub/three.txt": "three\\n"' in report
    session.master_untouched()


async def test_static_binary(session: Session, static_binary: Path) -> None:
    (session.box / "work").mkdir()
    result = await session.run(str(static_binary), "/work")
    assert result.status == 0, result.err
    assert result.out == "read: static hello\nsize: 13\nentry: static.txt\n"
    assert (session.box / "work" / "static.txt").read_text() == "static hello\n"


async def test_starts_in_callers_directory_when_the_slave_has_it(session: Session) -> None:
    inside = session.box / session.master_dir.relative_to("/")
    inside.mkdir(parents=True)
    (inside / "here.txt").write_text("here\n")
    result = await session.sh("pwd; cat here.txt; echo new > made.txt")
    assert result.status == 0, result.err
    assert result.out == f"{session.master_dir}\nhere\n"
    assert (inside / "made.txt").read_text() == "new\n"
    session.master_untouched()


async def test_starts_at_slave_root_otherwise(session: Session) -> None:
    result = await session.sh("pwd; echo x > rel.txt; cd /; mkdir d; cd d; pwd; echo y > f")
    assert result.status == 0, result.err
    assert result.out == "/\n/d\n"
    assert (session.box / "rel.txt").read_text() == "x\n"
    assert (session.box / "d" / "f").read_text() == "y\n"
    session.master_untouched()


async def test_umask_applies_to_created_files(session: Session) -> None:
    result = await session.sh("umask 027; echo x > /f; mkdir /d; umask 0; mkdir -m 777 /e")
    assert result.status == 0, result.err
    assert stat.S_IMODE((session.box / "f").stat().st_mode) == 0o640
    assert stat.S_IMODE((session.box / "d").stat().st_mode) == 0o750
    assert stat.S_IMODE((session.box / "e").stat().st_mode) == 0o777


async def test_root_confinement_holds(session: Session) -> None:
    (session.box / "up").symlink_to("../../../../../../..")
    (session.box / "abs").symlink_to("/")
    result = await session.sh(
        "ls /up/; ls /abs/; cat /up/etc/hostname; cat /../../etc/hostname; echo end"
    )
    assert result.out == "abs\nup\nabs\nup\nend\n", result.err
    assert result.err.count("No such file or directory") == 2


FIND_SLAVE = """
import os, sys, time
def find_slave():
    # The fsys-slave process serving this test's box (its --root is argv[1]).
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
            except OSError:
                continue
            if b"fsys.slave" in cmd and sys.argv[1].encode() in cmd:
                return int(pid)
"""


ERRNO_SCRIPT = """
import errno, mmap, os, sys
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]
os.mkdir("/d")
open("/d/f", "w").write("content")
os.mkdir("/empty")
wfd = os.open("/w", os.O_WRONLY | os.O_CREAT, 0o644)
os.write(wfd, bytes(4096))
rfd = os.open("/d/f", os.O_RDONLY)
dfd = os.open("/d", os.O_RDONLY)
results = {
    "ENOENT": attempt(lambda: open("/missing")),
    "EISDIR": attempt(lambda: open("/d", "w")),
    "ENOTDIR": attempt(lambda: open("/d/f/x")),
    "EEXIST": attempt(lambda: os.mkdir("/d")),
    "ENOTEMPTY": attempt(lambda: os.rmdir("/d")),
    "EBADF": attempt(lambda: os.read(wfd, 1)),
    "ENODEV": attempt(lambda: mmap.mmap(dfd, 4096, prot=mmap.PROT_READ)),  # a directory
    "EACCES-map": attempt(lambda: mmap.mmap(wfd, 4096, prot=mmap.PROT_READ)),  # write-only
    "EACCES": attempt(lambda: os.execv("/d/f", ["f"])),
    "rmdir-empty": attempt(lambda: os.rmdir("/empty")),
}
print(" ".join(f"{k}={v}" for k, v in results.items()))
"""


async def test_errno_pass_through(session: Session) -> None:
    result = await session.run(SYSTEM_PYTHON, "-c", ERRNO_SCRIPT)
    assert result.status == 0, result.err
    got = dict(item.split("=") for item in result.out.split())
    expected = {name: name for name in got if name.startswith("E")}
    expected["rmdir-empty"] = "ok"
    expected["EACCES-map"] = "EACCES"
    # exec of a slave-only file: the kernel's answer for a non-executable is EACCES;
    # fsys checks it on the slave before it stages a copy to run.
    assert got == expected


async def test_eacces_as_unprivileged_slave(session: Session) -> None:
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    # A box the unprivileged slave can reach (pytest's tmp_path is private to root).
    session.box = Path(tempfile.mkdtemp(prefix="fsys-eacces-"))
    session.box.chmod(0o755)
    (session.box / "private").write_text("secret")
    (session.box / "private").chmod(0o600)
    (session.box / "ro").mkdir()
    (session.box / "ro").chmod(0o555)
    script = "cat /private; echo rc=$?; touch /ro/new; echo rc=$?; cat /ro/../private; echo rc=$?"
    result = await run_master(
        ["run", "--slave", slave_command(session.box, prefix=prefix), "--", "/bin/sh", "-c",
         script],
        cwd=session.master_dir,
    )  # fmt: skip
    assert result.out == "rc=1\nrc=1\nrc=1\n", result.err
    assert result.err.count("Permission denied") == 3
    assert not (session.box / "ro" / "new").exists()
    shutil.rmtree(session.box)


async def test_placeholder_outlives_parent_close_and_handle_is_released(
    session: Session,
) -> None:
    (session.box / "shared.txt").write_text("inherited\n")
    script = FIND_SLAVE + textwrap.dedent(
        """
        slave = find_slave()
        def count():
            return len(os.listdir(f"/proc/{slave}/fd"))
        baseline = count()
        fd = os.open("/shared.txt", os.O_RDONLY)
        opened = count()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            os.read(r, 1)                       # wait until the parent closed its copy
            data = os.pread(fd, 100, 0)
            os._exit(0 if data == b"inherited\\n" else 1)
        os.close(fd)
        os.close(r)
        os.write(w, b"x")
        _, status = os.waitpid(pid, 0)
        deadline = time.monotonic() + 5
        while count() != baseline and time.monotonic() < deadline:
            time.sleep(0.01)
        print(opened - baseline, os.waitstatus_to_exitcode(status), count() - baseline)
        """
    )
    result = await session.run(SYSTEM_PYTHON, "-c", script, str(session.box))
    assert result.status == 0, result.err
    assert result.out == "1 0 0\n"


async def test_dup_fork_share_offset_and_cloexec(session: Session) -> None:
    script = textwrap.dedent(
        """
        import os, fcntl
        fd = os.open("/log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        dup = os.dup(fd)
        os.write(fd, b"a")
        os.write(dup, b"b")                     # shares the offset with fd
        os.dup2(fd, 9)
        os.write(9, b"c")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        print(os.lseek(fd, 0, os.SEEK_CUR), flags & os.O_ACCMODE == os.O_WRONLY)
        cloexec = os.open("/log", os.O_RDONLY | os.O_CLOEXEC)
        print(fcntl.fcntl(cloexec, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
        """
    )
    result = await session.run(SYSTEM_PYTHON, "-c", script)
    assert result.status == 0, result.err
    assert result.out == "3 True\n1\n"
    assert (session.box / "log").read_bytes() == b"abc"


async def test_trace_lines(session: Session) -> None:
    result = await session.run("cat", "/nope", extra=["--trace"])
    assert result.status == 1
    line = next(line for line in result.err.splitlines() if '"/nope"' in line)
    assert "ENOENT (No such file or directory)" in line
    assert "<slave " in line and line.rstrip().endswith("us>")


@pytest.mark.parametrize("where", ["missing/trace", "."])
async def test_an_unwritable_trace_file_is_one_line_and_no_orphan(session: Session,
                                                                   where: str) -> None:  # fmt: skip
    target = session.master_dir / where
    result = await session.run("true", extra=["--trace-file", str(target)])
    assert result.status == 2
    assert result.err.splitlines() == [f"fsys-master: cannot write the trace to {target}: "
                                       + ("Is a directory" if where == "." else
                                          "No such file or directory")]  # fmt: skip
    # The slave command it had started is gone (no process serves the box).
    serving = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(session.box).encode() in (proc / "cmdline").read_bytes():
                serving.append(proc.name)
        except OSError:
            pass  # gone meanwhile
    assert serving == []


def _session_members(sid: int) -> list[int]:
    """The live processes of session ``sid`` (zombies aside)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(proc.name))
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("extra", VIEW_OR_NOT)
async def test_a_signal_while_the_slave_does_not_answer_ends_everything(
    session: Session, tmp_path: Path, signum: int, extra: list[str]
) -> None:
    stages = set(Path(tempfile.gettempdir()).glob("fsys-stage-*"))
    env = dict(os.environ, FSYS_SLAVE_PATIENCE="0.2")
    command = [PYTHON, "-m", "fsys.master", "run", *extra, "--slave", "sleep 40", "--", "true"]
    proc = await trio.lowlevel.open_process(
        command, cwd=session.master_dir, env=env, stderr=subprocess.PIPE, start_new_session=True
    )
    await trio.sleep(1.0)
    assert proc.poll() is None  # still waiting
    proc.send_signal(signum)
    with trio.fail_after(10):
        status = await proc.wait()
    assert proc.stderr is not None
    err = (await proc.stderr.receive_some(65536)).decode()
    await proc.stderr.aclose()
    assert status == 128 + signum
    assert err.splitlines() == [
        "fsys-master: waiting for the slave to answer (sleep 40); Ctrl-C gives up",
        f"fsys-master: {signal.Signals(signum).name} while waiting for the slave: giving up",
    ]
    assert _session_members(proc.pid) == []  # the slave command is gone with it
    assert set(Path(tempfile.gettempdir()).glob("fsys-stage-*")) == stages


HOSTILE_SLAVE = r"""
import os, sys
from fsys.protocol import Call, Connection, Hello, Reply, Role, NEED_DATA
conn = Connection(Role.SLAVE)
os.write(1, conn.send(Hello()))
while data := os.read(0, 65536):
    conn.receive_data(data)
    while (event := conn.next_event()) is not NEED_DATA:
        if isinstance(event, Call) and event.request:
            os.write(1, conn.send(Reply(event.pairing, event.request, -(1 << 40), b"")))
"""


SLOW_SLAVE = r"""
import os, sys, time
from fsys.protocol import Call, Connection, Hello, Role, NEED_DATA
from fsys.slave.executor import Executor
from fsys.slave.fshub import perform
conn, ex = Connection(Role.SLAVE), Executor(sys.argv[1])
os.write(1, conn.send(Hello()))
while data := os.read(0, 65536):
    conn.receive_data(data)
    while (event := conn.next_event()) is not NEED_DATA:
        if isinstance(event, Call) and event.request:
            if type(event.op).__name__ == "Open" and event.op.path.endswith(b"/slow"):
                time.sleep(1.5)  # a slave that stops answering for a while
            os.write(1, conn.send(perform(ex, event)))
"""


@pytest.mark.parametrize("extra", VIEW_OR_NOT)
async def test_a_slave_slow_to_answer_is_reported_then_its_answer(
    session: Session, tmp_path: Path, extra: list[str]
) -> None:
    script = tmp_path / "slow.py"
    script.write_text(SLOW_SLAVE)
    (session.box / "slow").write_text("data\n")
    slave = f"{PYTHON} {script} {session.box}"
    env = dict(os.environ, FSYS_SLAVE_PATIENCE="0.3")
    result = await run_master(["run", *extra, "--slave", slave, "--", "cat", "/slow"],
                              cwd=session.master_dir, env=env)  # fmt: skip
    assert (result.status, result.out) == (0, "data\n"), result.err
    # (A slave slow to start, on a loaded machine, is also said to be waited for: 0.3 s.)
    said = [line for line in result.err.splitlines()
            if not line.startswith("fsys-master: waiting for the slave to answer")]  # fmt: skip
    assert len(said) == 2, said
    assert said[0].startswith(f"fsys-master: the slave ({slave}) has not answered OPEN for ")
    assert said[0].endswith(" s; waiting")
    assert said[1].startswith("fsys-master: the slave answered after ")


@pytest.mark.parametrize("extra", VIEW_OR_NOT)
async def test_a_hostile_slave_ends_the_session_with_a_named_error(
    session: Session, tmp_path: Path, extra: list[str]
) -> None:
    script = tmp_path / "hostile.py"
    script.write_text(HOSTILE_SLAVE)
    result = await run_master(["run", *extra, "--slave", f"{PYTHON} {script}", "--",
                               "cat", "/etc/hostname"], cwd=session.master_dir)  # fmt: skip
    assert result.status == 125, result.err
    assert "Traceback" not in result.err
    assert "protocol error from the slave: a REPLY with errno 1099511627776" in result.err


async def test_rename_across_sides_is_exdev(session: Session) -> None:
    script = (
        "import os, errno\n"
        "open('/x', 'w').close()\n"
        "try:\n"
        "    os.rename('/x', '/proc/x')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno])\n"
    )
    result = await session.run(SYSTEM_PYTHON, "-c", script)
    assert (result.status, result.out) == (0, "EXDEV\n"), result.err


async def test_program_not_found(session: Session) -> None:
    result = await session.run("no-such-program-fsys")
    assert result.status == 127
    assert "no-such-program-fsys: not found" in result.err
    result = await session.run("/no/such/program")
    assert result.status == 127
    assert "/no/such/program: not found" in result.err


async def test_program_that_only_the_slave_has(session: Session) -> None:
    (session.box / "tools").mkdir()
    tool = session.box / "tools" / "tool"
    tool.write_text('#!/bin/sh\necho "slave tool $0 $*"\n')
    tool.chmod(0o755)
    result = await session.run("/tools/tool", "a")
    assert (result.status, result.out) == (0, "slave tool /tools/tool a\n"), result.err


async def test_slave_that_fails_to_start(session: Session) -> None:
    result = await run_master(
        ["run", "--slave", "exit 3", "--", "cat", "/etc/hostname"], cwd=session.master_dir
    )
    assert result.status == 125
    assert "the slave did not start" in result.err
    assert "exited with status 3" in result.err
    assert result.out == ""


@pytest.mark.parametrize(
    ("slave", "hint"),
    [
        ("no-such-fsys-slave serve --stdio", "on the PATH of the shell that runs it"),
        ("echo Welcome; exec PY -m fsys.slave serve --stdio",
         "something wrote to the slave's standard output before fsys-slave started"),
        ("cat", "must end in `fsys-slave serve --stdio`"),
    ],
)  # fmt: skip
async def test_a_slave_command_that_is_not_one_gets_a_hint(session: Session, slave: str,
                                                          hint: str) -> None:  # fmt: skip
    result = await run_master(["run", "--slave", slave.replace("PY", PYTHON), "--", "true"],
                              cwd=session.master_dir)  # fmt: skip
    assert result.status == 125
    said = [line for line in result.err.splitlines() if line.startswith("fsys-master:")]
    assert len(said) == 1 and said[0].startswith("fsys-master: the slave did not start")
    assert hint in said[0] and "Traceback" not in result.err


async def test_slave_dies_mid_run(session: Session) -> None:
    (session.box / "f").write_text("before\n")
    script = FIND_SLAVE + textwrap.dedent(
        """
        import signal, errno
        slave = find_slave()
        print(open("/f").read(), end="", flush=True)
        os.kill(slave, signal.SIGKILL)
        time.sleep(0.2)
        try:
            open("/f")
        except OSError as exc:
            print(errno.errorcode[exc.errno], flush=True)
        """
    )
    result = await session.run(SYSTEM_PYTHON, "-c", script, str(session.box))
    assert result.out == "before\nEIO\n"
    assert result.status == 125
    assert "the slave went away" in result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"GET / HTTP/1.1\r\n\r\n" * 4, "not an fsys peer"),
        (b"\xff\xff\xff\xff" + b"\x01" * 12, "exceeds the limit"),
        (b"\x00\x00\x00\x01" + b"\x02" * 12, "not an fsys peer"),
    ],
)
async def test_malformed_or_oversized_frame(session: Session, payload: bytes, message: str) -> None:
    fake = session.master_dir / "fake_slave.py"
    fake.write_text(
        "import sys, time\n"
        f"sys.stdout.buffer.write({payload!r})\n"
        "sys.stdout.flush()\n"
        "time.sleep(30)\n"
    )
    result = await run_master(
        ["run", "--slave", f"{PYTHON} {fake}", "--", "cat", "/etc/hostname"],
        cwd=session.master_dir,
        deadline=20,
    )
    assert result.status == 125
    assert message in result.err
    assert "Traceback" not in result.err


async def test_garbage_after_handshake_ends_session(session: Session) -> None:
    fake = session.master_dir / "fake_slave.py"
    fake.write_text(
        textwrap.dedent(
            """
            import os, time
            from fsys.protocol import Hello, encode
            os.write(1, encode(Hello()))
            os.read(0, 65536)               # the master's HELLO and first call
            os.write(1, b"\\x08\\x00\\x00\\x00\\x63" + b"\\x00" * 11 + b"garbage!")
            time.sleep(30)
            """
        )
    )
    result = await run_master(
        ["run", "--slave", f"{PYTHON} {fake}", "--", "cat", "/f"], cwd=session.master_dir,
        deadline=20,
    )  # fmt: skip
    assert result.status == 125
    assert "protocol error from the slave: unknown frame kind 99" in result.err
    assert "Traceback" not in result.err


async def test_exit_status_and_death_by_signal(session: Session) -> None:
    assert (await session.sh("exit 7")).status == 7
    assert (await session.sh("kill -TERM $$")).status == 128 + 15


async def test_a_process_blocked_on_the_slave_does_not_stall_the_others(
    session: Session,
) -> None:
    # The child blocks opening a slave FIFO until the parent, still served, opens it
    # for writing: a hub that waited for the blocked open would deadlock here.
    script = textwrap.dedent(
        """
        import os
        os.mkfifo("/fifo")
        pid = os.fork()
        if pid == 0:
            fd = os.open("/fifo", os.O_RDONLY)
            print("child read", os.read(fd, 100).decode(), flush=True)
            os._exit(0)
        for i in range(20):
            with open(f"/file{i}", "w") as f:
                f.write("x")
        fd = os.open("/fifo", os.O_WRONLY)
        os.write(fd, b"through the fifo")
        os.close(fd)
        os.waitpid(pid, 0)
        print("parent wrote", len(os.listdir("/")))
        """
    )
    result = await session.run(SYSTEM_PYTHON, "-c", script)
    assert result.status == 0, result.err
    assert result.out == "child read through the fifo\nparent wrote 21\n"
