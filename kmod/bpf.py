"""The in-kernel filter, generated from the disposition table.

The program checks the architecture (anything but x86_64 kills the process: its
syscall numbers mean other calls), refuses x32 numbers with ENOSYS, then finds the
call's action by a binary search over runs of consecutive syscall numbers that
share one action. Numbers the table does not list (gaps, calls newer than the
table) get ENOSYS, as from a kernel that lacks them: no unknown call can bypass the
routing. A few calls are trapped only under a condition on an argument
(``nativeif`` in the table): mmap only when it maps a file, fcntl only for commands
that touch the open file description; one only when it matches (``trapif``): socket
only for the slave's address families.

``evaluate`` interprets the generated program in Python so the tests can check
every syscall's action without loading the filter into a kernel.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass

from fsys.kmod import abi
from fsys.kmod.table import Disposition, NativeIf, Syscall, Table

ALLOW = abi.SECCOMP_RET_ALLOW
NOTIFY = abi.SECCOMP_RET_USER_NOTIF
KILL = abi.SECCOMP_RET_KILL_PROCESS


def errno_action(err: int) -> int:
    return abi.SECCOMP_RET_ERRNO | (err & 0xFFFF)


@dataclass(frozen=True, slots=True)
class _Insn:
    code: int
    jt: int = 0
    jf: int = 0
    k: int = 0


@dataclass(frozen=True, slots=True)
class _Label:
    name: str


@dataclass(frozen=True, slots=True)
class _JumpTo:
    """An unconditional jump to a label (32-bit offset, so any distance)."""

    label: str


_Item = _Insn | _Label | _JumpTo


def _ld_arg_low(arg: int) -> _Insn:
    return _Insn(abi.BPF_LD_W_ABS, k=abi.SECCOMP_DATA_ARGS + 8 * arg)


def _leaf(action: int | NativeIf) -> list[_Item]:
    if isinstance(action, int):
        return [_Insn(abi.BPF_RET_K, k=action)]
    out: list[_Item] = [_ld_arg_low(action.arg)]
    if action.trap:
        for value in action.values:
            out.append(_Insn(abi.BPF_JMP_JEQ_K, jt=0, jf=1, k=value))
            out.append(_Insn(abi.BPF_RET_K, k=NOTIFY))
        out.append(_Insn(abi.BPF_RET_K, k=ALLOW))
        return out
    if action.mask is not None:
        out.append(_Insn(abi.BPF_JMP_JSET_K, jt=0, jf=1, k=action.mask))
        out.append(_Insn(abi.BPF_RET_K, k=ALLOW))
    else:
        for value in action.values:
            out.append(_Insn(abi.BPF_JMP_JEQ_K, jt=0, jf=1, k=value))
            out.append(_Insn(abi.BPF_RET_K, k=ALLOW))
    out.append(_Insn(abi.BPF_RET_K, k=NOTIFY))
    return out


def action_for(syscall: Syscall) -> int | NativeIf:
    """The filter's action for one table row (a NativeIf: trapped unless it matches)."""
    if syscall.disposition is Disposition.NATIVE:
        return ALLOW
    if syscall.disposition is Disposition.REFUSED:
        assert syscall.errno is not None
        return errno_action(syscall.errno)
    if syscall.native_if is not None:
        return syscall.native_if
    return NOTIFY


def _runs(table: Table) -> list[tuple[int, int | NativeIf]]:
    """(first nr, action) runs covering 0..2**32, gaps answered ENOSYS."""
    enosys = errno_action(errno.ENOSYS)
    runs: list[tuple[int, int | NativeIf]] = []
    expected = 0
    for syscall in table.syscalls:
        if syscall.nr != expected:
            runs.append((expected, enosys))
        action = action_for(syscall)
        if not runs or runs[-1][1] != action or isinstance(action, NativeIf):
            runs.append((syscall.nr, action))
        expected = syscall.nr + 1
    runs.append((expected, enosys))
    # Merge gap runs with neighbours of the same action.
    merged: list[tuple[int, int | NativeIf]] = []
    for start, action in runs:
        if merged and merged[-1][1] == action and not isinstance(action, NativeIf):
            continue
        merged.append((start, action))
    return merged


def _tree(runs: Sequence[tuple[int, int | NativeIf]], counter: list[int]) -> list[_Item]:
    if len(runs) == 1:
        return _leaf(runs[0][1])
    mid = len(runs) // 2
    counter[0] += 1
    right = f"r{counter[0]}"
    out: list[_Item] = [
        _Insn(abi.BPF_JMP_JGE_K, jt=0, jf=1, k=runs[mid][0]),
        _JumpTo(right),
    ]
    out += _tree(runs[:mid], counter)
    out.append(_Label(right))
    out += _tree(runs[mid:], counter)
    return out


def _assemble(items: Sequence[_Item]) -> bytes:
    positions: dict[str, int] = {}
    pos = 0
    for item in items:
        if isinstance(item, _Label):
            positions[item.name] = pos
        else:
            pos += 1
    if pos > abi.BPF_MAXINSNS:
        raise ValueError(f"filter has {pos} instructions, the kernel allows {abi.BPF_MAXINSNS}")
    out = bytearray()
    pos = 0
    for item in items:
        if isinstance(item, _Label):
            continue
        if isinstance(item, _JumpTo):
            out += abi.BPF_INSN.pack(abi.BPF_JMP_JA, 0, 0, positions[item.label] - pos - 1)
        else:
            out += abi.BPF_INSN.pack(item.code, item.jt, item.jf, item.k)
        pos += 1
    return bytes(out)


def build(table: Table) -> bytes:
    """The filter program (an array of struct sock_filter) for ``table``."""
    head: list[_Item] = [
        _Insn(abi.BPF_LD_W_ABS, k=abi.SECCOMP_DATA_ARCH),
        _Insn(abi.BPF_JMP_JEQ_K, jt=1, jf=0, k=abi.AUDIT_ARCH_X86_64),
        _Insn(abi.BPF_RET_K, k=KILL),
        _Insn(abi.BPF_LD_W_ABS, k=abi.SECCOMP_DATA_NR),
        _Insn(abi.BPF_JMP_JGE_K, jt=0, jf=1, k=abi.X32_SYSCALL_BIT),
        _Insn(abi.BPF_RET_K, k=errno_action(errno.ENOSYS)),
    ]
    return _assemble(head + _tree(_runs(table), [0]))


def evaluate(program: bytes, nr: int, args: Sequence[int] = (0,) * 6,
             arch: int = abi.AUDIT_ARCH_X86_64) -> int:  # fmt: skip
    """Run ``program`` on one struct seccomp_data, as the kernel would; return the action."""
    data = {abi.SECCOMP_DATA_NR: nr & 0xFFFFFFFF, abi.SECCOMP_DATA_ARCH: arch}
    for i, value in enumerate(args):
        data[abi.SECCOMP_DATA_ARGS + 8 * i] = value & 0xFFFFFFFF
        data[abi.SECCOMP_DATA_ARGS + 8 * i + 4] = (value >> 32) & 0xFFFFFFFF
    insns = [abi.BPF_INSN.unpack_from(program, off) for off in range(0, len(program), 8)]
    acc = 0
    pc = 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == abi.BPF_LD_W_ABS:
            acc = data.get(k, 0)
        elif code == abi.BPF_RET_K:
            return int(k)
        elif code == abi.BPF_JMP_JA:
            pc += k
        elif code == abi.BPF_JMP_JEQ_K:
            pc += jt if acc == k else jf
        elif code == abi.BPF_JMP_JGE_K:
            pc += jt if acc >= k else jf
        elif code == abi.BPF_JMP_JSET_K:
            pc += jt if acc & k else jf
        else:
            raise ValueError(f"unexpected BPF opcode {code:#x} at {pc - 1}")
