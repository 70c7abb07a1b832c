"""The kernel side of fsys: the syscall disposition table and the filter built from it.

On Linux no module is loaded: seccomp user notification is the control device.
``kmod.table`` reads the table, ``kmod.bpf`` generates the filter, ``kmod.abi`` holds
the listener's ioctl ABI. A FreeBSD ``fmaster.ko`` would expose the same
request/response protocol on a /dev node; it is planned on paper only.
"""
