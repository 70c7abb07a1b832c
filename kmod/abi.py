"""The ABI of the control device: seccomp user notification on Linux x86_64.

On Linux no kernel module is loaded. The kernel's seccomp user notification is the
fd-based control device that fsyscall's fmaster.ko provided on FreeBSD: a filter
marks the calls to intercept, the *listener* fd delivers one request per trapped
call, and the supervisor answers with a result, an errno, "continue natively", or
a file descriptor injected into the caller. Every number below was measured on the
machines this project runs on (see DESIGN.md §2); nothing else in the project
spells them out.
"""

from __future__ import annotations

import struct
from typing import Final

#: seccomp(2) is syscall 317 on x86_64; pidfd_getfd(2) is 438; openat2(2) is 437.
SYS_SECCOMP: Final = 317
SYS_PIDFD_GETFD: Final = 438
SECCOMP_SET_MODE_FILTER: Final = 1

# seccomp(2) flags for SECCOMP_SET_MODE_FILTER.
SECCOMP_FILTER_FLAG_TSYNC: Final = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER: Final = 8  # Linux 5.0
SECCOMP_FILTER_FLAG_TSYNC_ESRCH: Final = 16
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV: Final = 32  # Linux 5.19, needs NEW_LISTENER

# Filter return values (the high 16 bits are the action, the low 16 the data).
SECCOMP_RET_KILL_PROCESS: Final = 0x80000000
SECCOMP_RET_ERRNO: Final = 0x00050000
SECCOMP_RET_USER_NOTIF: Final = 0x7FC00000
SECCOMP_RET_ALLOW: Final = 0x7FFF0000

# struct seccomp_data, as the filter sees it: nr, arch, instruction_pointer, args[6].
SECCOMP_DATA_NR: Final = 0
SECCOMP_DATA_ARCH: Final = 4
SECCOMP_DATA_ARGS: Final = 16  # args[i] at 16 + 8*i, low 32 bits first (little endian)
AUDIT_ARCH_X86_64: Final = 0xC000003E
X32_SYSCALL_BIT: Final = 0x40000000

#: struct seccomp_notif: id, pid (a tid, in our pid namespace), flags, nr, arch,
#: instruction_pointer, args[6]. 80 bytes.
NOTIF: Final = struct.Struct("=QIIiIQ6Q")
#: struct seccomp_notif_resp: id, val, error (-errno), flags. 24 bytes.
NOTIF_RESP: Final = struct.Struct("=QqiI")
SECCOMP_USER_NOTIF_FLAG_CONTINUE: Final = 1  # needs val == error == 0
#: struct seccomp_notif_addfd: id, flags, srcfd, newfd, newfd_flags. 24 bytes.
NOTIF_ADDFD: Final = struct.Struct("=QIIII")
SECCOMP_ADDFD_FLAG_SETFD: Final = 1
SECCOMP_ADDFD_FLAG_SEND: Final = 2  # install the fd and answer the call with its number

# ioctl(2) requests on the listener.
SECCOMP_IOCTL_NOTIF_RECV: Final = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND: Final = 0xC0182101
SECCOMP_IOCTL_NOTIF_ID_VALID: Final = 0x40082102
SECCOMP_IOCTL_NOTIF_ADDFD: Final = 0x40182103
SECCOMP_IOCTL_NOTIF_SET_FLAGS: Final = 0x40082104
#: SET_FLAGS: wake the supervisor on the trapping task's CPU (Linux 6.6).
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: Final = 1

#: The errno the kernel turns into a restart (SA_RESTART) or EINTR, as for a native call.
ERESTARTSYS: Final = 512

# Classic BPF opcodes used by the filter generator.
BPF_LD_W_ABS: Final = 0x20
BPF_JMP_JA: Final = 0x05
BPF_JMP_JEQ_K: Final = 0x15
BPF_JMP_JGE_K: Final = 0x35
BPF_JMP_JSET_K: Final = 0x45
BPF_RET_K: Final = 0x06
BPF_INSN: Final = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
BPF_MAXINSNS: Final = 4096
