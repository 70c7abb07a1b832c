"""sendfile(2) and splice(2) between slave files and master fds (sockets, pipes,
files), end to end on a rooted slave and compared with a native run: offsets,
partial counts, file positions, and a blocking wait for room in a full socket."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import SYSTEM_PYTHON, Session, native

TRANSFERS = r"""
import os, socket, sys, threading, time
root = sys.argv[1]
out = []
with open(root + "/data", "wb") as f:
    f.write(bytes(range(256)) * 4096)  # 1 MiB
fd = os.open(root + "/data", os.O_RDWR)
r, w = os.pipe()
out.append(os.splice(fd, w, 10, offset_src=5))       # slave file -> master pipe
out.append(os.read(r, 100).hex())
os.write(w, b"PIPE")
out.append(os.splice(r, fd, 4, offset_dst=0))        # master pipe -> slave file
out.append(os.pread(fd, 6, 0).hex())
a, b = socket.socketpair()
out.append(os.sendfile(a.fileno(), fd, 2, 5))        # slave file -> master socket
out.append(b.recv(10).hex())
out.append(os.sendfile(a.fileno(), fd, None, 3))     # at the file position
out.append(b.recv(10).hex())
out.append(os.lseek(fd, 0, os.SEEK_CUR))
copy = os.open(root + "/copy", os.O_WRONLY | os.O_CREAT, 0o644)
local = os.open("/usr/bin/true", os.O_RDONLY)
out.append(os.sendfile(copy, local, 0, 100))         # master file -> slave file
out.append(os.stat(root + "/copy").st_size)
# A full socket: sendfile waits for room, as natively, while a thread drains it.
a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
got = bytearray()
def drain():
    while len(got) < 1 << 20:
        time.sleep(0.001)
        got.extend(b.recv(65536))
reader = threading.Thread(target=drain)
reader.start()
sent = 0
while sent < 1 << 20:
    sent += os.sendfile(a.fileno(), fd, sent, (1 << 20) - sent)
reader.join()
with open(root + "/data", "rb") as f:
    out.append(bytes(got) == f.read())
print(" ".join(map(str, out)))
"""


async def test_sendfile_and_splice_between_slave_files_and_master_fds(
    session: Session, tmp_path: Path
) -> None:
    here = tmp_path / "native"
    here.mkdir()
    expected = native(TRANSFERS, here)
    assert expected.endswith(" 100 100 True\n")
    result = await session.run(SYSTEM_PYTHON, "-c", TRANSFERS, "")
    assert (result.status, result.out) == (0, expected), result.err
    assert (session.box / "copy").read_bytes() == Path("/usr/bin/true").read_bytes()[:100]
    session.master_untouched()


SIGPIPE = r"""
import os, signal, sys
with open(sys.argv[1] + "/f", "w") as f:
    f.write("data")
src = os.open(sys.argv[1] + "/f", os.O_RDONLY)
r, w = os.pipe()
os.close(r)
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
try:
    os.splice(src, w, 4)
except BrokenPipeError:
    print("EPIPE", flush=True)
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
os.splice(src, w, 4)  # killed by SIGPIPE
print("not reached")
"""


async def test_a_splice_into_a_closed_pipe_raises_sigpipe(session: Session, tmp_path: Path) -> None:
    here = tmp_path / "native"
    here.mkdir()
    natively = subprocess.run(
        [SYSTEM_PYTHON, "-c", SIGPIPE, str(here)], capture_output=True, text=True, check=False
    )
    assert (natively.returncode, natively.stdout) == (-13, "EPIPE\n")
    result = await session.run(SYSTEM_PYTHON, "-c", SIGPIPE, "")
    assert (result.status, result.out) == (128 + 13, "EPIPE\n"), result.err
