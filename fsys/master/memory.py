"""The program's memory, read and written the way the kernel would.

Reads go through a cached ``/proc/<tgid>/mem`` descriptor (one pread, ~1-2 µs).
Writes use process_vm_writev(2), which honours page protections as the real system
call's copy_to_user does: writing into a read-only buffer fails with EFAULT instead
of silently succeeding as a write to /proc/<pid>/mem would. After execve the
descriptor refers to the old address space, so fmhub drops it (``forget``) and the
next access reopens it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from fsys.errors import Errno

PATH_MAX = 4096
PAGE = 4096


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_process_vm_writev = _libc.process_vm_writev
_process_vm_writev.restype = ctypes.c_ssize_t
_process_vm_writev.argtypes = [
    ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
    ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong,
]  # fmt: skip


def _bytes_data_offset() -> int:
    probe = b"fsys"
    address = ctypes.cast(ctypes.c_char_p(probe), ctypes.c_void_p).value
    assert address is not None
    return address - id(probe)


#: Where a bytes object's data starts, from its id(): lets a write hand the kernel
#: the buffer of an immutable bytes object without a ctypes copy.
_BYTES_DATA = _bytes_data_offset()


class TargetMemory:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = -1
        self.opened = 0  # how many times the descriptor was opened
        self._local = _IoVec()
        self._remote = _IoVec()

    def _mem(self) -> int:
        if self._fd < 0:
            try:
                self._fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise Errno(errno.ESRCH) from exc
            self.opened += 1
        return self._fd

    def forget(self) -> None:
        """Close the descriptor (it is reopened at the next access). Idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    close = forget

    def read(self, addr: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``addr``, or Errno(EFAULT)."""
        if size == 0:
            return b""
        if addr == 0:
            raise Errno(errno.EFAULT)
        for attempt in (1, 2):
            try:
                data = os.pread(self._mem(), size, addr)
            except OSError:
                data = b""
            if len(data) == size:
                return data
            if attempt == 1:
                # The descriptor may be bound to an address space an execve has just
                # replaced (a sibling thread's call raced it): reopen, try once more.
                self.forget()
        raise Errno(errno.EFAULT)

    def read_cstring(self, addr: int, limit: int = PATH_MAX) -> bytes:
        """The NUL-terminated string at ``addr``, without its NUL.

        EFAULT if it runs into unmapped memory, ENAMETOOLONG if ``limit`` bytes
        hold no NUL (a path's limit is PATH_MAX including the NUL).
        """
        if addr == 0:
            raise Errno(errno.EFAULT)
        # Most strings are short: read to the end of the page first (never crossing
        # into a page that may be unmapped), then the rest if no NUL was there.
        first = min(limit, PAGE - addr % PAGE)
        data = b""
        for attempt in (1, 2):
            try:
                data = os.pread(self._mem(), first, addr)
                end = data.find(b"\0")
                if end >= 0:
                    return data[:end]
                if len(data) == first < limit:
                    data += os.pread(self._mem(), limit - first, addr + first)
            except OSError:
                pass
            if data or attempt == 2:
                break
            self.forget()  # see read(): an address space replaced by an execve
        end = data.find(b"\0")
        if end >= 0:
            return data[:end]
        raise Errno(errno.ENAMETOOLONG if len(data) == limit else errno.EFAULT)

    def read_struct(self, addr: int, fmt: struct.Struct) -> tuple[int, ...]:
        return fmt.unpack(self.read(addr, fmt.size))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``addr``, or raise Errno(EFAULT)."""
        size = len(data)
        if size == 0:
            return
        if addr == 0:
            raise Errno(errno.EFAULT)
        if type(data) is not bytes:
            data = bytes(data)
        local, remote = self._local, self._remote
        local.base = id(data) + _BYTES_DATA
        local.len = size
        remote.base = addr
        remote.len = size
        written = _process_vm_writev(self.pid, local, 1, remote, 1, 0)
        if written != size:
            raise Errno(errno.EFAULT)

    def rewrite_byte(self, addr: int, value: bytes) -> None:
        """Change one byte of the program's memory, even in a read-only mapping.

        Used only on the name passed to an execve that is about to replace the
        address space (staging.py); a private read-only page is copied on write, as
        a debugger's write would be.
        """
        try:
            self.write(addr, value)
            return
        except Errno:
            pass
        try:
            fd = os.open(f"/proc/{self.pid}/mem", os.O_WRONLY | os.O_CLOEXEC)
            try:
                if os.pwrite(fd, value, addr) != len(value):
                    raise Errno(errno.EFAULT)
            finally:
                os.close(fd)
        except OSError as exc:
            raise Errno(errno.EFAULT) from exc

    def write_struct(self, addr: int, fmt: struct.Struct, *values: int) -> None:
        self.write(addr, fmt.pack(*values))
