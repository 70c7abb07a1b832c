"""fsys: forward the system calls of an unmodified Linux program to another machine.

The program runs on the *master* (its CPU, memory, binaries and libraries); its
files are those of the *slave*, which performs each forwarded call and answers with
the result or errno. See docs/ for usage and design.
"""

__version__ = "0.1.0"
