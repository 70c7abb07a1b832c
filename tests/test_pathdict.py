"""fsys.pathdict: a dict of paths with subtrees found without a scan."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fsys.pathdict import PathDict

#: Paths over a small alphabet, so that operations meet each other's subtrees.
PATHS = st.lists(st.sampled_from([b"a", b"b", b"ab"]), max_size=4).map(
    lambda parts: b"/" + b"/".join(parts)
)
OPS = st.lists(
    st.tuples(
        st.sampled_from(["set", "del", "pop", "setdefault", "drop", "popitem", "clear"]),
        PATHS,
        st.integers(),
    ),
    max_size=60,
)


def naive_below(keys: set[bytes], path: bytes) -> set[bytes]:
    if path == b"/":
        return set(keys)
    return {k for k in keys if k == path or k.startswith(path + b"/")}


def leads_to_a_key(d: PathDict[int], path: bytes) -> bool:
    return any(k == path or k.startswith(path.rstrip(b"/") + b"/") for k in d)


@settings(max_examples=400, deadline=None)
@given(OPS, st.lists(PATHS, max_size=5))
def test_it_is_a_dict_whose_subtrees_are_those_a_scan_finds(
    ops: list[tuple[str, bytes, int]], probes: list[bytes]
) -> None:
    d: PathDict[int] = PathDict()
    model: dict[bytes, int] = {}
    for op, path, value in ops:
        if op == "set":
            d[path] = model[path] = value
        elif op == "del" and path in model:
            del d[path]
            del model[path]
        elif op == "pop":
            assert d.pop(path, None) == model.pop(path, None)
        elif op == "setdefault":
            assert d.setdefault(path, value) == model.setdefault(path, value)
        elif op == "drop":
            d.drop_below(path)
            for gone in naive_below(set(model), path):
                del model[gone]
        elif op == "popitem" and model:
            key, item = d.popitem()
            assert model.pop(key) == item
        elif op == "clear":
            d.clear()
            model.clear()
        assert dict(d) == model
        # The index holds exactly the paths that lead to a key.
        for parent, kids in d._below.items():
            assert kids and leads_to_a_key(d, parent)
            assert all(leads_to_a_key(d, kid) for kid in kids)
    for path in [*probes, b"/"]:
        assert set(d.subtree(path)) == naive_below(set(model), path)


def test_a_missing_key_pops_its_default_or_raises() -> None:
    d: PathDict[int] = PathDict()
    d.update({b"/a": 1})
    assert d.pop(b"/b", 7) == 7
    with pytest.raises(KeyError):
        d.pop(b"/b")
    assert list(d.subtree(b"/a")) == [b"/a"]
