"""Programs that map slave files, end to end: a real master, a slave rooted in a
temporary box, real mmap(2). What a native run of the same script gives is what
the run under fsys must give (pages.py has the mechanism)."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SYSTEM_PYTHON, Session, native

MAPPINGS = r"""
import fcntl, mmap, os, sys
root = sys.argv[1]
p = lambda name: root + name
with open(p("/three"), "wb") as f:
    f.write(b"a" * 4096 + b"b" * 4096 + b"c" * 100)
out = []
with open(p("/three"), "rb") as f:
    m = mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ, offset=4096)
    out.append(m[:3].decode() + str(len(m)))
    whole = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    out.append(whole[8190:8194].decode())
    m.close(); whole.close()

# A shared writable mapping: read(2) sees its writes, another open sees them after
# msync, and they are in the file after munmap and close.
fd = os.open(p("/three"), os.O_RDWR)
m = mmap.mmap(fd, 0)
m[0:5] = b"HELLO"
out.append(os.pread(fd, 5, 0).decode())
m.flush()
with open(p("/three"), "rb") as other:
    out.append(other.read(5).decode())
m[4096:4101] = b"WORLD"
m.flush()  # msync: another open sees it at once
with open(p("/three"), "rb") as other:
    out.append(other.read()[4096:4101].decode())
m[4096:4101] = b"THERE"
m.close()
os.close(fd)
with open(p("/three"), "rb") as other:
    out.append(other.read()[4096:4101].decode())

# write(2) through the fd shows in a mapping at once.
fd = os.open(p("/three"), os.O_RDWR)
m = mmap.mmap(fd, 0)
os.pwrite(fd, b"xyz", 10)
out.append(m[10:13].decode())
m.close(); os.close(fd)

# What cannot be mapped, as the kernel says.
def errname(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return os.strerror(exc.errno)
ro = os.open(p("/three"), os.O_RDONLY)
out.append(errname(lambda: mmap.mmap(ro, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_WRITE)))
out.append(errname(lambda: mmap.mmap(ro, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_WRITE)))

# The open file lives while it is mapped: its flock lock stays until munmap.
fd = os.open(p("/three"), os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
m = mmap.mmap(fd, 0)
os.close(fd)
other = os.open(p("/three"), os.O_RDONLY)
out.append(errname(lambda: fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)))
m.close()
out.append(errname(lambda: fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)))

# A file changed through another descriptor is seen at the next mmap.
fd = os.open(p("/three"), os.O_RDONLY)
m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
first = m[:5]
m.close()
with open(p("/three"), "r+b") as w:
    w.write(b"AGAIN")
m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
out.append(first.decode() + ">" + m[:5].decode())
print(" ".join(out))
"""


async def test_mappings_behave_as_natively(session: Session, tmp_path: Path) -> None:
    here = tmp_path / "native"
    here.mkdir()
    expected = native(MAPPINGS, here)
    assert expected.split()[0] == "bbb4096"
    result = await session.run(SYSTEM_PYTHON, "-c", MAPPINGS, "")
    assert (result.status, result.out) == (0, expected), result.err
    assert (session.box / "three").read_bytes() == (here / "three").read_bytes()
    session.master_untouched()


SIGBUS_BEYOND_EOF = r"""
import mmap, os
fd = os.open("/short", os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, b"x" * 8192)
m = mmap.mmap(fd, 8192)
os.ftruncate(fd, 10)
print(m[5:6].decode(), flush=True)
m[5000]  # beyond the end of the file: SIGBUS
print("not reached")
"""


async def test_a_page_beyond_the_end_is_sigbus(session: Session) -> None:
    result = await session.run(SYSTEM_PYTHON, "-c", SIGBUS_BEYOND_EOF)
    assert result.out == "x\n", result.err
    assert result.status in (-signal.SIGBUS, 128 + signal.SIGBUS), result.err


async def test_mmap_is_shown_in_the_trace(session: Session) -> None:
    (session.box / "f").write_bytes(b"traced")
    script = "import mmap; f = open('/f', 'rb'); print(mmap.mmap(f.fileno(), 0, prot=1)[:])"
    result = await session.run(SYSTEM_PYTHON, "-c", script, extra=["--trace"])
    assert result.status == 0, result.err
    assert "b'traced'" in result.out
    assert " of handle " in result.err and "mmap(" in result.err


SQLITE = r"""
import sqlite3, sys
db = sqlite3.connect(sys.argv[1] + "/db/app.sqlite")
print(db.execute("PRAGMA journal_mode=WAL").fetchone()[0])
db.execute("PRAGMA mmap_size=1048576")
db.execute("create table t (k integer primary key, v text)")
with db:
    db.executemany("insert into t (v) values (?)", [(f"row {i}",) for i in range(2000)])
reader = sqlite3.connect(sys.argv[1] + "/db/app.sqlite")
print(reader.execute("select count(*), max(v) from t").fetchone())
with db:
    db.execute("update t set v = 'changed' where k = 7")
print(reader.execute("select v from t where k = 7").fetchone()[0])
print(db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
print(db.execute("PRAGMA integrity_check").fetchone()[0])
"""


async def test_sqlite_in_wal_mode(session: Session, tmp_path: Path) -> None:
    here = tmp_path / "native"
    (here / "db").mkdir(parents=True)
    expected = native(SQLITE, here)
    (session.box / "db").mkdir()
    result = await session.run(SYSTEM_PYTHON, "-c", SQLITE, "")
    assert (result.status, result.out) == (0, expected), result.err
    check = native(
        "import sqlite3, sys; db = sqlite3.connect(sys.argv[1] + '/db/app.sqlite');"
        "print(db.execute('select count(*), v from t where k = 7').fetchone())",
        session.box,
    )
    assert check == "(1, 'changed')\n"


SQLITE_PROCESSES = r"""
import sqlite3, subprocess, sys
path = sys.argv[1] + "/db/shared.sqlite"
if len(sys.argv) > 2:  # a writer: its own connection, its own open of the -shm file
    db = sqlite3.connect(path, timeout=30)
    for i in range(150):
        with db:
            db.execute("insert into t (who, n) values (?, ?)", (sys.argv[2], i))
    sys.exit(0)
db = sqlite3.connect(path)
db.execute("PRAGMA journal_mode=WAL")
db.execute("create table t (who text, n integer)")
db.commit()
writers = [subprocess.Popen([sys.executable, "-c", __doc__ or CODE, sys.argv[1], name])
           for name in ("a", "b", "c")]
print([w.wait() for w in writers])
print(db.execute("select who, count(*) from t group by who order by who").fetchall())
print(db.execute("PRAGMA integrity_check").fetchone()[0])
"""


async def test_sqlite_wal_shared_by_processes(session: Session, tmp_path: Path) -> None:
    # Three processes write one WAL database at once: their -shm mappings, through
    # separate opens, must be one memory (as on one machine) or the index breaks.
    code = SQLITE_PROCESSES.replace("__doc__ or CODE", repr(SQLITE_PROCESSES))
    here = tmp_path / "native"
    (here / "db").mkdir(parents=True)
    expected = native(code, here)
    assert expected == "[0, 0, 0]\n[('a', 150), ('b', 150), ('c', 150)]\nok\n"
    (session.box / "db").mkdir()
    result = await session.run(SYSTEM_PYTHON, "-c", code, "")
    assert (result.status, result.out) == (0, expected), result.err


GIT_SCRIPT = r"""
set -e
cd "$1/repo"
git init -q -b main
git config user.name fsys; git config user.email fsys@example.org
git add .
git commit -qm one
echo more >> f7.txt
git diff --stat
git commit -qam two
git checkout -qb topic
echo topic > topic.txt; git add topic.txt; git commit -qm topic
git checkout -q main
echo main > main.txt; git add main.txt; git commit -qm main
git merge -q --no-edit topic
git status --short
git log --format=%s | sort
git gc -q
git clone -q . "$1/clone"
cd "$1/clone"
git log --format=%s | wc -l
git fsck --no-progress 2>&1
ls | wc -l
"""


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
async def test_git_on_slave_files(session: Session, tmp_path: Path) -> None:
    here = tmp_path / "native"
    for root in (here, session.box):
        (root / "repo").mkdir(parents=True)
        for i in range(2000):
            (root / "repo" / f"f{i}.txt").write_text(f"file {i}\n")
    when = "'@1700000000 +0000'"
    env_fixed = (
        f"export GIT_AUTHOR_DATE={when} GIT_COMMITTER_DATE={when} GIT_CONFIG_NOSYSTEM=1 HOME=/;"
    )
    expected = subprocess.run(
        ["/bin/sh", "-c", env_fixed + GIT_SCRIPT, "sh", str(here)],
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    assert expected.returncode == 0, expected.stderr
    # 2,000 files: each git step is thousands of forwarded calls (issue 8 is their speed).
    result = await session.run("/bin/sh", "-c", env_fixed + GIT_SCRIPT, "sh", "", deadline=240)
    assert (result.status, result.out) == (0, expected.stdout), result.err
    clone = str(session.box / "clone")
    fsck = subprocess.run(["git", "-C", clone, "fsck"], check=False, capture_output=True)
    assert fsck.returncode == 0, fsck.stderr
