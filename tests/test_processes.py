"""Processes under fsys: fork, exec, threads, pipes; shells and builds (issue 3).

Every test runs real programs with the slave rooted in a fresh box; the master's
working directory is not in the box, so programs start at the slave's root.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import SYSTEM_PYTHON, Session
from tests.test_e2e import FIND_SLAVE

pytestmark = pytest.mark.e2e

MAKEFILE = """\
OBJS = build/a.o build/b.o build/main.o
all: build/app
build:
\tmkdir -p build
build/%.o: src/%.c | build
\t$(CC) -O1 -c -o $@ $<
build/app: $(OBJS)
\t$(CC) -o $@ $(OBJS)
clean:
\trm -rf build
"""


def c_project(root: Path) -> Path:
    proj = root / "proj"
    (proj / "src").mkdir(parents=True)
    (root / "tmp").mkdir(exist_ok=True)  # gcc's temporary files are the slave's
    (proj / "src" / "a.c").write_text("int a(void) { return 40; }\n")
    (proj / "src" / "b.c").write_text("int a(void);\nint b(void) { return a() + 2; }\n")
    (proj / "src" / "main.c").write_text(
        '#include <stdio.h>\nint b(void);\nint main(void) { printf("answer %d\\n", b()); }\n'
    )
    (proj / "Makefile").write_text(MAKEFILE)
    return proj


async def test_pipeline_with_cd_and_redirections(session: Session) -> None:
    (session.box / "proj").mkdir()
    for name in ("c", "a", "b"):
        (session.box / "proj" / name).write_text(name)
    # The list goes outside the listed directory: natively too, whether `ls` sees a
    # file that sort's redirection creates meanwhile is a race.
    result = await session.sh(
        "cd /proj && ls | sort > ../list && wc -l < ../list && cat ../list | tr -d '\\n'"
    )
    assert (result.status, result.out) == (0, "3\nabc"), result.err
    assert (session.box / "list").read_text() == "a\nb\nc\n"
    session.master_untouched()


async def test_make_j2_builds_on_the_slave_and_the_result_runs(session: Session) -> None:
    proj = c_project(session.box)
    result = await session.run("make", "-C", "/proj", "-j2")
    assert result.status == 0, result.err
    for name in ("a.o", "b.o", "main.o", "app"):
        assert (proj / "build" / name).stat().st_size > 0, name
    run = await session.sh("cd /proj && ./build/app && /proj/build/app")
    assert (run.status, run.out) == (0, "answer 42\nanswer 42\n"), run.err
    again = await session.run("make", "-C", "/proj", "-q")  # up to date: make saw mtimes
    assert again.status == 0, again.err
    session.master_untouched()


async def test_scripts_stored_on_the_slave(session: Session) -> None:
    proj = session.box / "proj"
    (proj / "tools").mkdir(parents=True)
    configure = proj / "configure.sh"
    configure.write_text(
        '#!/bin/sh\ncd "$(dirname "$0")" && echo "configured $0 $*" > config.log\n'
    )
    configure.chmod(0o755)
    run = proj / "tools" / "run"
    run.write_text("#!/usr/bin/env python3\nimport os, sys\nprint(sys.argv, os.getcwd())\n")
    run.chmod(0o755)
    (proj / "not-executable").write_text("#!/bin/sh\necho never\n")
    result = await session.sh(
        "cd /proj && ./configure.sh one two && cat config.log && tools/run x && "
        "/proj/tools/run y && cd tools && ../configure.sh three && ./not-here; "
        "../not-executable; echo $?"
    )
    assert result.out.splitlines() == [
        "configured ./configure.sh one two",
        "['tools/run', 'x'] /proj",
        "['/proj/tools/run', 'y'] /proj",
        "126",
    ], result.err
    assert (proj / "config.log").read_text() == "configured ../configure.sh three\n"
    assert "not-here: not found" in result.err


async def test_python_subprocess_pipes_and_four_threads(session: Session) -> None:
    (session.box / "out").mkdir()
    script = textwrap.dedent(
        """
        import subprocess, threading
        def writer(n):
            with open(f"/out/t{n}", "w") as f:
                for i in range(200):
                    f.write(f"{n}:{i}\\n")
                    f.flush()
        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        p = subprocess.run(["sort", "-r"], input="a\\nc\\nb\\n", capture_output=True, text=True)
        q = subprocess.Popen("cat /out/t2 | wc -l", shell=True, stdout=subprocess.PIPE)
        print(p.stdout.split(), q.communicate()[0].decode().strip())
        """
    )
    result = await session.run(SYSTEM_PYTHON, "-c", script)
    assert (result.status, result.out) == (0, "['c', 'b', 'a'] 200\n"), result.err
    for n in range(4):
        lines = (session.box / "out" / f"t{n}").read_text().splitlines()
        assert lines == [f"{n}:{i}" for i in range(200)]


async def test_a_thread_blocked_on_the_slave_does_not_stall_its_siblings(
    session: Session,
) -> None:
    script = textwrap.dedent(
        """
        import os, threading
        os.mkfifo("/fifo")
        got = []
        t = threading.Thread(target=lambda: got.append(open("/fifo").read()))
        t.start()                      # blocks in the slave, opening the FIFO
        for i in range(30):
            with open(f"/f{i}", "w") as f:
                f.write("x")
        with open("/fifo", "w") as f:
            f.write("done")
        t.join()
        print(got[0], len([n for n in os.listdir("/") if n.startswith("f")]))
        """
    )
    result = await session.run(SYSTEM_PYTHON, "-c", script)
    assert (result.status, result.out) == (0, "done 31\n"), result.err


async def test_xargs_parallel(session: Session) -> None:
    (session.box / "in").mkdir()
    for i in range(12):
        (session.box / "in" / f"{i}.txt").write_text(f"{i}\n" * (i + 1))
    result = await session.sh("cd /in && ls *.txt | xargs -P2 -n1 sh -c 'wc -l < $0 > $0.count'")
    assert result.status == 0, result.err
    for i in range(12):
        assert (session.box / "in" / f"{i}.txt.count").read_text() == f"{i + 1}\n"


async def test_fork_shares_the_file_offset_and_append_interleaves(session: Session) -> None:
    script = textwrap.dedent(
        """
        import os
        fd = os.open("/shared", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            for i in range(50):
                os.write(fd, b"c")
            os._exit(0)
        os.waitpid(pid, 0)
        for i in range(50):
            os.write(fd, b"p")              # continues at the child's offset
        a1 = os.open("/log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        pid = os.fork()
        if pid == 0:
            a2 = os.open("/log", os.O_WRONLY | os.O_APPEND)
            for i in range(100):
                os.write(a2, b"C" * 10)
            os._exit(0)
        for i in range(100):
            os.write(a1, b"P" * 10)
        os.waitpid(pid, 0)
        print(os.lseek(fd, 0, os.SEEK_CUR))
        """
    )
    result = await session.run(SYSTEM_PYTHON, "-c", script)
    assert (result.status, result.out) == (0, "100\n"), result.err
    assert (session.box / "shared").read_bytes() == b"c" * 50 + b"p" * 50
    log = (session.box / "log").read_bytes()
    assert len(log) == 2000  # O_APPEND: nothing overwritten
    assert (
        sorted(log[i : i + 10] for i in range(0, 2000, 10)) == [b"C" * 10] * 100 + [b"P" * 10] * 100
    )


async def test_children_inherit_the_directory_they_were_forked_with(session: Session) -> None:
    for name in ("d1", "d2", "d3", "d4", "out"):
        (session.box / name).mkdir()
    script = textwrap.dedent(
        """
        import os, signal, time
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        os.chdir("/d1")
        first = os.fork()
        if first == 0:
            signal.sigwait({signal.SIGUSR1})    # no call fmhub sees until released
            open("/out/first", "w").write(os.getcwd())
            os._exit(0)
        os.chdir("/d2")
        second = os.fork()
        if second == 0:
            signal.sigwait({signal.SIGUSR1})
            open("/out/second", "w").write(os.getcwd())
            os._exit(0)
        os.chdir("/d3")
        middle = os.fork()
        if middle == 0:                         # orphan maker: its child outlives it
            os.chdir("/d4")
            orphan = os.fork()
            if orphan == 0:
                signal.sigwait({signal.SIGUSR1})
                open("/out/orphan", "w").write(os.getcwd())
                os._exit(0)
            open("/out/orphan.pid", "w").write(str(orphan))
            os._exit(0)
        os.waitpid(middle, 0)
        orphan = int(open("/out/orphan.pid").read())
        for pid in (first, second, orphan):
            os.kill(pid, signal.SIGUSR1)
        os.waitpid(first, 0)
        os.waitpid(second, 0)
        """
    )
    result = await session.run(SYSTEM_PYTHON, "-c", script)
    assert result.status == 0, result.err
    out = session.box / "out"
    assert (out / "first").read_text() == "/d1"
    assert (out / "second").read_text() == "/d2"
    assert (out / "orphan").read_text() == "/d4"  # written after its parent exited


async def test_a_child_outlives_its_parent_and_the_session_waits_for_it(
    session: Session,
) -> None:
    result = await session.sh("(sleep 0.5; echo late > /late) & echo early")
    assert (result.status, result.out) == (0, "early\n"), result.err
    assert (session.box / "late").read_text() == "late\n"


async def test_posix_spawn_and_vfork_paths(session: Session) -> None:
    (session.box / "data").write_text("spawned\n")
    script = textwrap.dedent(
        """
        import os, subprocess
        pid = os.posix_spawn("/usr/bin/cat", ["cat", "/data"], os.environ)
        _, status = os.waitpid(pid, 0)
        pid = os.posix_spawnp("sh", ["sh", "-c", "cd / && cat data > copy"], os.environ)
        os.waitpid(pid, 0)
        out = subprocess.run(["cat", "/copy"], capture_output=True).stdout   # vfork+exec
        print(os.waitstatus_to_exitcode(status), out.decode().strip())
        """
    )
    result = await session.run(SYSTEM_PYTHON, "-c", script)
    assert (result.status, result.out) == (0, "spawned\n0 spawned\n"), result.err


async def test_local_pipes_eventfd_socketpair_stay_local(session: Session) -> None:
    script = textwrap.dedent(
        """
        import os, socket
        r, w = os.pipe()
        os.write(w, b"pipe")
        a, b = socket.socketpair()
        a.send(b"pair")
        e = os.eventfd(0)
        os.eventfd_write(e, 3)
        print(os.read(r, 4).decode(), b.recv(4).decode(), os.eventfd_read(e))
        """
    )
    result = await session.run(SYSTEM_PYTHON, "-c", script, extra=["--trace"])
    assert (result.status, result.out) == (0, "pipe pair 3\n"), result.err
    # The trace shows what reached the slave (python's start-up looks at the slave's
    # cwd), and no read or write of the pipe, socketpair or eventfd is among it.
    forwarded = {line.split("] ")[1].split("(")[0] for line in result.err.splitlines()
                 if line.startswith("[") and "<slave" in line}  # fmt: skip
    assert forwarded, result.err
    assert forwarded.isdisjoint({"read", "write", "sendto", "recvfrom", "sendmsg", "recvmsg"})


async def test_five_hundred_short_processes_leak_nothing_on_the_slave(
    session: Session,
) -> None:
    (session.box / "f").write_text("x")
    script = FIND_SLAVE + textwrap.dedent(
        """
        import subprocess
        slave = find_slave()
        def count():
            return len(os.listdir(f"/proc/{slave}/fd"))
        baseline = count()
        subprocess.run(["sh", "-c", "i=0; while [ $i -lt 500 ]; do cat /f > /dev/null; "
                        "i=$((i+1)); done"], check=True)
        deadline = time.monotonic() + 10
        while count() != baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        print(count() - baseline)
        """
    )
    result = await session.run(SYSTEM_PYTHON, "-c", script, str(session.box))
    assert (result.status, result.out) == (0, "0\n"), result.err


async def test_close_on_exec_releases_the_remote_file(session: Session) -> None:
    (session.box / "f").write_text("x")
    after_exec = FIND_SLAVE + textwrap.dedent(
        """
        deadline = time.monotonic() + 5
        while len(os.listdir(f"/proc/{find_slave()}/fd")) != int(sys.argv[2]):
            if time.monotonic() > deadline:
                print("still open")
                sys.exit(1)
            time.sleep(0.02)
        print("released")
        """
    )
    before_exec = FIND_SLAVE + textwrap.dedent(
        f"""
        baseline = len(os.listdir(f"/proc/{{find_slave()}}/fd"))
        kept = os.open("/f", os.O_RDONLY | os.O_CLOEXEC)
        assert len(os.listdir(f"/proc/{{find_slave()}}/fd")) == baseline + 1
        os.execv({SYSTEM_PYTHON!r}, ["python3", "-c", {after_exec!r}, sys.argv[1],
                 str(baseline)])
        """
    )
    result = await session.run(SYSTEM_PYTHON, "-c", before_exec, str(session.box))
    assert (result.status, result.out) == (0, "released\n"), result.err


async def test_grandchildren_of_a_silent_process_inherit_through_it(session: Session) -> None:
    # A makes no trapped call: its children inherit what A was forked with (/x),
    # sealed when P left /x, not P's later directory.
    for name in ("x", "y", "out"):
        (session.box / name).mkdir()
    script = textwrap.dedent(
        """
        import os, signal
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        os.chdir("/x")
        a = os.fork()
        if a == 0:
            signal.sigwait({signal.SIGUSR1})       # until P has moved to /y
            kids = []
            for name in ("b", "c"):
                pid = os.fork()
                if pid == 0:
                    open(f"/out/{name}", "w").write(os.getcwd())
                    os._exit(0)
                kids.append(pid)
            for pid in kids:
                os.waitpid(pid, 0)
            open("/out/a", "w").write(os.getcwd())
            os._exit(0)
        os.chdir("/y")
        os.kill(a, signal.SIGUSR1)
        os.waitpid(a, 0)
        """
    )
    result = await session.run(SYSTEM_PYTHON, "-c", script)
    assert result.status == 0, result.err
    out = session.box / "out"
    assert [(out / n).read_text() for n in ("a", "b", "c")] == ["/x", "/x", "/x"]


async def test_a_staged_binary_keeps_its_argv0(session: Session, tmp_path: Path) -> None:
    source = tmp_path / "hello.c"
    source.write_text(
        '#include <stdio.h>\nint main(int c, char **v) { printf("%s\\n", v[0]); return 3; }\n'
    )
    (session.box / "x").mkdir()
    subprocess.run(["gcc", "-o", str(session.box / "x" / "hello"), str(source)], check=True)
    result = await session.sh("/x/hello; echo $?; cd /x && ./hello")
    assert result.out == "/x/hello\n3\n./hello\n", result.err
    direct = await session.run("/x/hello")  # found on the slave only
    assert (direct.status, direct.out) == (3, "/x/hello\n"), direct.err


async def test_a_process_killed_while_its_program_is_staged(session: Session) -> None:
    (session.box / "big").write_bytes(b"\x7fELF" + b"\0" * (400 << 20))  # ~1 s to stage
    (session.box / "big").chmod(0o755)
    result = await session.sh("(sleep 0.2; kill -9 $$) & exec /big")
    assert result.status == 128 + 9, result.err
    assert "Traceback" not in result.err and "internal error" not in result.err
