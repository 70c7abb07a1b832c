"""The attribute cache: answers of the slave that fmhub may give again itself.

Theory of operation. The slave marks a STAT reply REPLY_WATCHED when it watches
every directory the answer depends on (``fsys.slave.watches``); from then until an
INVALIDATE names the path or a prefix of it, the same STAT would get the same
answer. fmhub keeps such answers here, by path (``protocol.watch_key``), and a
stat, lstat, newfstatat or statx of a cached path is answered without the slave.

Coherence rests on the link's order: the slave sends an INVALIDATE as soon as it
reads the change from inotify, and before the reply to any call of ours that made
it. So the program sees its own changes at once, and another process's within the
time the slave takes to read the event and the link to carry it (docs/performance.md
gives the figure). An INVALIDATE of ``/a/b`` drops ``/a/b`` and everything below it:
entries are kept as a tree of directories, so that costs what it drops.

When the program reads a directory that it opened by such a path, the slave sends
the watched answers about its entries along, before the GETDENTS reply (ATTRS, as
NFS's READDIRPLUS): the stat that ``ls -l``, ``git status`` or a tree walk makes
next of each entry is then answered here too, and so is a getxattr or listxattr
of an entry that the slave found to have no extended attribute at all (ENODATA,
an empty list).

A handle opened by a key keeps it until an INVALIDATE of it or above it
(``handles``): its fstat is the key's answer (if that is about no symlink), and a
path relative to it (a directory) has a key too, so fmhub sends such a stat, or a
read-only open, by that path from the root: a tree walk by directory fds (find, du,
rm -r: fts) and the fstat after each open are cached too.

An answer holds for the variant of the call that got it (following a final symlink
or not), or for both when the reply says the last component is no symlink
(REPLY_NOT_LINK). A statx asking for fields outside the mask the answer was got
with goes to the slave. The cache holds at most ``limit`` paths: beyond, the oldest
are dropped.
"""

from __future__ import annotations

import stat

from fsys.linux import statx_mode, statx_size
from fsys.pathdict import PathDict
from fsys.protocol import REPLY_NO_XATTRS, REPLY_NOT_LINK, REPLY_WATCHED, Attrs, watch_key

#: How much of a file an open to read brings with it, at most (OPEN_READ).
START = 128 << 10


def start_size(raw: bytes) -> int:
    """How much of the file whose watched struct statx is ``raw`` to bring with an
    open to read it: one byte more than its size (a file shorter than START then
    comes whole, and says so by coming short), START at most; none but for a
    regular file."""
    if not stat.S_ISREG(statx_mode(raw)):
        return 0
    return min(statx_size(raw) + 1, START)


#: (the statx mask asked for, result (0 or -errno), struct statx or b"", REPLY_* flags)
Answer = tuple[int, int, bytes, int]
#: The most paths kept (each costs ~0.5 KiB): 64k paths, ~32 MiB.
LIMIT = 65536


class AttrCache:
    """Watched STAT answers by path: [not following a final symlink, following it]."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        #: Found by subtree: an INVALIDATE of a directory drops every answer below it.
        self.entries: PathDict[list[Answer | None]] = PathDict()
        #: Handles opened by a key path, while no INVALIDATE said otherwise.
        self.handles: dict[int, bytes] = {}
        self.hits = 0

    def __len__(self) -> int:
        return len(self.entries)

    def key_of(self, dir_handle: int, path: bytes) -> bytes | None:
        """The key of a path from the root (``dir_handle`` 0) or from a directory
        handle opened by a key path that still names it; None if it has none. The
        root's own key is "/" (it has no answer of its own: nothing watches its
        entry; its handle's key makes the paths below it keys)."""
        if not dir_handle:
            return b"/" if path == b"/" else watch_key(path)
        base = self.handles.get(dir_handle)
        if base is None or not path or path.startswith(b"/"):
            return None
        return watch_key(base + b"/" + path)

    def opened(self, handle: int, key: bytes) -> None:
        """The handle ``handle`` was opened by the path ``key``."""
        self.handles[handle] = key

    def closed(self, handle: int) -> None:
        self.handles.pop(handle, None)

    def lookup(
        self, key: bytes, follow: bool, mask: int, *, itself: bool = False
    ) -> tuple[int, bytes] | None:
        """(result, struct statx) of a watched answer that holds for this call, or None.
        ``itself``: only an answer about no symlink (what an open of ``key`` opened)."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        answer = entry[follow]
        if answer is None:
            return None
        asked, result, raw, flags = answer
        if (result == 0 and mask & ~asked) or (itself and not flags & REPLY_NOT_LINK):
            return None  # fields the slave was not asked for; a symlink's own answer
        self.hits += 1
        return result, raw

    def store(
        self, key: bytes, follow: bool, mask: int, result: int, raw: bytes, flags: int
    ) -> None:
        """Keep a REPLY_WATCHED answer (``flags`` are the reply's)."""
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= self.limit:
                self._shrink()
            entry = self.entries[key] = [None, None]
        answer = (mask, result, raw, flags)
        if flags & REPLY_NOT_LINK:
            entry[0] = entry[1] = answer
        else:
            entry[follow] = answer

    def prime(self, attrs: Attrs) -> None:
        """Keep the answers of an ATTRS (a directory's entries, as the slave read them)."""
        store = self.store
        for path, result, flags, raw in attrs.entries:
            if flags & REPLY_WATCHED and watch_key(path) == path:
                store(path, False, attrs.mask, result, raw, flags)

    def no_xattrs(self, key: bytes, follow: bool) -> bool:
        """Whether a watched answer says that ``key`` has no extended attributes."""
        entry = self.entries.get(key)
        if entry is None:
            return False
        answer = entry[follow]
        if answer is None or not answer[3] & REPLY_NO_XATTRS:
            return False
        self.hits += 1
        return True

    def invalidate(self, paths: tuple[bytes, ...] | list[bytes]) -> None:
        """Drop each path and everything below it (b"/": everything); a path
        ``D/.`` drops the answer about the directory ``D`` alone, ``P/..`` the answer
        about the file ``P`` (its content changed)."""
        handles = self.handles
        for stale in paths:
            path = stale[:-3] if stale.endswith(b"/..") else stale
            if path.endswith(b"/."):
                self.entries.pop(path[:-2], None)  # (its entries' answers stand)
                continue
            if path == b"/":
                self.clear()
                return
            self.entries.drop_below(path)
            if handles:  # a handle's key may name another file now
                prefix = path + b"/"
                for handle in [h for h, k in handles.items() if k == path or k.startswith(prefix)]:
                    del handles[handle]

    def _shrink(self) -> None:
        """Drop the oldest eighth of the paths."""
        for key in list(self.entries)[: max(1, self.limit // 8)]:
            if key in self.entries:
                self.invalidate((key,))

    def clear(self) -> None:
        self.entries.clear()
        self.handles.clear()
