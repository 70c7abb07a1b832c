"""Watches: the directories that the slave's watched answers depend on.

Theory of operation. A STAT of ``/a/b/c`` is answered from the entries ``a`` in
``/``, ``b`` in ``/a`` and ``c`` in ``/a/b``, and from the attributes of what they
name. The slave marks such an answer REPLY_WATCHED (the master may then give it
again itself) only when it watches, with inotify, every directory on the way:
``/``, ``/a`` and ``/a/b``. Each is first opened with RESOLVE_NO_SYMLINKS (inside
the root when the slave is confined), so that a path through a symlink, whose
answer depends on more than these entries, is never watched; the watch is added
after its parent's, so no change between the two goes unseen.

Any event in a watched directory ``D`` about the name ``N`` (created, deleted,
moved, its attributes or content changed) makes ``D/N`` and everything below it
stale; one that adds or removes a name changes ``D``'s own times, size and link
count too, and makes ``D/.`` stale: the answer about ``D`` alone. An event about
``D`` itself (its mode, or its removal) makes ``D`` and everything below it stale.
``changes()`` turns the queued events into these paths, for the INVALIDATE the
slave sends; an overflowed queue makes everything stale.

What inotify does not see is not watched: a file with more than one hard link (a
change through another name is reported to that name's directory), a mount made on
a watched path, a network filesystem changed from another machine. The executor
marks no answer about a hard-linked file as watched; the other two are documented
limits (docs/limits.md).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from fsys import linux
from fsys.linux import O_CLOEXEC, O_DIRECTORY, O_PATH, RESOLVE_IN_ROOT
from fsys.pathdict import PathDict
from fsys.protocol import MAX_SMALL

#: openat2(dirfd, path, flags, mode, resolve) -> fd
Opener = Callable[[int, bytes, int, int, int], int]

#: What makes an entry of a watched directory, or the directory, stale.
MASK = (
    linux.IN_MODIFY | linux.IN_ATTRIB | linux.IN_CREATE | linux.IN_DELETE
    | linux.IN_MOVED_FROM | linux.IN_MOVED_TO | linux.IN_DELETE_SELF | linux.IN_MOVE_SELF
    | linux.IN_ONLYDIR
)  # fmt: skip
_SELF_GONE = linux.IN_DELETE_SELF | linux.IN_MOVE_SELF | linux.IN_IGNORED
#: Events after which an entry's name may name another object (or none).
_RENAMING = linux.IN_CREATE | linux.IN_DELETE | linux.IN_MOVED_FROM | linux.IN_MOVED_TO
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_NO_MAGICLINKS = 0x02
#: The largest INVALIDATE body the slave sends at once (more goes in further frames).
BATCH = MAX_SMALL
#: At most this many watched directories per session (each holds an O_PATH fd and
#: an inotify watch); beyond, answers are not watched.
MAX_DIRS = 8192


class Watches:
    """The watched directories of one session, by the key the master uses for them."""

    def __init__(self, root_fd: int, opener: Opener, *, confined: bool) -> None:
        self.root_fd = root_fd
        self._open = opener
        self.resolve = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
        if confined:
            self.resolve |= RESOLVE_IN_ROOT
        self.fd = -1  # no inotify instance until ``start``: nothing is watched
        #: directory key -> (watch descriptor, O_PATH fd of the directory)
        self.dirs: PathDict[tuple[int, int]] = PathDict()
        self.keys: dict[int, set[bytes]] = {}  # watch descriptor -> directory keys
        self.full = False  # no watch left (max_user_watches, MAX_DIRS)
        self.missing = 0  # see parent()

    def start(self) -> bool:
        """Begin watching (an inotify instance of its own); False if none can be had
        (max_user_instances): then nothing is watched."""
        if self.fd < 0:
            try:
                self.fd = linux.inotify_init()
            except OSError:
                return False
        return True

    def close(self) -> None:
        for _wd, fd in self.dirs.values():
            os.close(fd)
        self.dirs.clear()
        self.keys.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def enabled(self) -> bool:
        return self.fd >= 0

    def parent(self, key: bytes) -> tuple[int, bytes] | None:
        """Watch every directory on the way to ``key`` (a ``watch_key``): the parent
        directory's fd and the last component; None if one cannot be watched (a
        symlink on the way, not a directory, no watch left). When the way ends at a
        watched directory that lacks the next one (or has a non-directory by its
        name), ``missing`` is that errno (ENOENT, ENOTDIR), else 0: an answer that
        depends only on watched entries too."""
        self.missing = 0
        cut = key.rfind(b"/")
        parent, name = key[:cut] or b"/", key[cut + 1 :]
        known = self.dirs.get(parent)
        if known is not None:
            return known[1], name
        if self.fd < 0 or self.full or self._watch(b"/"):
            return None
        at = 0
        while at < len(parent):
            at = parent.find(b"/", at + 1)
            if at < 0:
                at = len(parent)
            failed = self._watch(parent[:at])
            if failed:
                if failed in (errno.ENOENT, errno.ENOTDIR):
                    self.missing = failed
                return None
        return self.dirs[parent][1], name

    def _watch(self, key: bytes) -> int:
        """Watch the directory ``key`` (its parent is watched): 0, or why not."""
        if key in self.dirs:
            return 0
        if len(self.dirs) >= MAX_DIRS:
            self.full = True
            return errno.ENOSPC
        try:
            fd = self._open(self.root_fd, key, O_PATH | O_DIRECTORY | O_CLOEXEC, 0, self.resolve)
        except OSError as exc:
            return exc.errno or errno.EIO  # a symlink (ELOOP, EXDEV), not a directory, gone
        try:
            wd = linux.inotify_add_watch(self.fd, b"/proc/self/fd/%d" % fd, MASK)
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.ENOSPC:
                self.full = True
            return exc.errno or errno.EIO
        self.dirs[key] = (wd, fd)
        self.keys.setdefault(wd, set()).add(key)
        return 0

    def changes(self) -> list[bytes]:
        """The paths made stale by the events queued since the last call; ``P/..``
        for a file ``P`` whose content alone changed (its data, size and times: not
        its owner, mode or extended attributes)."""
        stale: set[bytes] = set()
        moved: set[bytes] = set()  # of these, names that may name something else now
        written: set[bytes] = set()  # names whose content alone changed (IN_MODIFY)
        if self.fd < 0:
            return []
        for wd, mask, name in linux.inotify_events(self.fd):
            if mask & linux.IN_Q_OVERFLOW:
                stale.add(b"/")
                moved.add(b"/")
                continue
            keys = self.keys.get(wd)
            if not keys:
                continue
            if name:
                paths = {(key if key != b"/" else b"") + b"/" + name for key in keys}
                if mask & _RENAMING:
                    moved |= paths
                    stale.update((key if key != b"/" else b"") + b"/." for key in keys)
                elif mask == linux.IN_MODIFY:
                    written |= paths
                    continue
            else:
                paths = set(keys)
                if mask & _SELF_GONE:
                    moved |= paths
            stale |= paths
        if moved:
            self._unwatch(moved)
        stale.update(path + b"/.." for path in written - stale)
        return sorted(stale)

    def _unwatch(self, moved: set[bytes]) -> None:
        """Directory keys that may name something else now, and those below them: no
        longer watched (the next STAT through them watches afresh)."""
        if b"/" in moved:
            gone = set(self.dirs)
        else:
            gone = {k for path in moved for k in self.dirs.subtree(path)}
        if gone:
            self.full = False
        for key in gone:
            wd, fd = self.dirs.pop(key)
            os.close(fd)
            keys = self.keys.get(wd)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.keys[wd]
                    linux.inotify_rm_watch(self.fd, wd)  # (EINVAL if already gone)


def batches(paths: list[bytes]) -> list[tuple[bytes, ...]]:
    """``paths`` split into INVALIDATE frames of at most BATCH bytes each."""
    out: list[tuple[bytes, ...]] = []
    batch: list[bytes] = []
    size = 0
    for path in paths:
        if size + 4 + len(path) > BATCH and batch:
            out.append(tuple(batch))
            batch, size = [], 0
        batch.append(path)
        size += 4 + len(path)
    if batch:
        out.append(tuple(batch))
    return out
