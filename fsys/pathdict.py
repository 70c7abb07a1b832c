"""A dict keyed by absolute paths that finds and drops a subtree in the time of what it
holds there, not of its size.

The view keeps what it knows by path (nodes, listings, names known absent...) and the
slave's INVALIDATE drops a path and all below it; the slave's watches drop the
directories below a path renamed or removed. Scanning every key for the prefix
made each notice cost the whole tree: `cp -r` of 5,000 files took ~4.6 ms a file
where 500 took 1.6 ms. PathDict keeps, beside the dict, each path's next level down
(only the paths that lead to a key), so ``subtree`` walks what is there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

V = TypeVar("V")

_ROOT = b"/"


def _parent(path: bytes) -> bytes:
    return path[: path.rfind(b"/")] or _ROOT


class PathDict(dict[bytes, V]):
    """A dict of absolute, normalised paths (b"/" and b"/a/b", no trailing slash)
    with ``subtree`` and ``drop_below``. Reads are the dict's own; writes keep the
    index: a path is in ``_below[its parent]`` while it is a key or leads to one."""

    def __init__(self) -> None:
        super().__init__()
        self._below: dict[bytes, set[bytes]] = {}

    def __setitem__(self, key: bytes, value: V) -> None:
        if not dict.__contains__(self, key):
            self._link(key)
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: bytes) -> None:
        dict.__delitem__(self, key)
        self._unlink(key)

    def pop(self, key: bytes, *default: Any) -> Any:
        if dict.__contains__(self, key):
            value = dict.pop(self, key)
            self._unlink(key)
            return value
        if default:
            return default[0]
        raise KeyError(key)

    def popitem(self) -> tuple[bytes, V]:
        key, value = dict.popitem(self)
        self._unlink(key)
        return key, value

    def setdefault(self, key: bytes, default: Any = None) -> Any:
        if not dict.__contains__(self, key):
            self[key] = default
        return dict.__getitem__(self, key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def clear(self) -> None:
        dict.clear(self)
        self._below.clear()

    def _link(self, key: bytes) -> None:
        while key != _ROOT:
            parent = _parent(key)
            kids = self._below.get(parent)
            if kids is not None:
                kids.add(key)  # the parent has children: it is linked already
                return
            self._below[parent] = {key}
            if dict.__contains__(self, parent):
                return
            key = parent

    def _unlink(self, key: bytes) -> None:
        while key != _ROOT and key not in self._below and not dict.__contains__(self, key):
            parent = _parent(key)
            kids = self._below[parent]
            kids.discard(key)
            if kids:
                return
            del self._below[parent]
            key = parent

    def subtree(self, path: bytes) -> Iterator[bytes]:
        """The keys that are ``path`` or below it."""
        stack = [path]
        while stack:
            here = stack.pop()
            if dict.__contains__(self, here):
                yield here
            stack.extend(self._below.get(here, ()))

    def drop_below(self, path: bytes) -> None:
        """Drop ``path`` and every key below it (b"/": all of them)."""
        if path == _ROOT:
            self.clear()
            return
        for gone in list(self.subtree(path)):
            del self[gone]
