"""The path policy: which absolute paths live on the master and which on the slave.

The program runs on the master, so its binaries, its libraries, the loader's
files and the kernel's own views (/proc, /sys, /dev) must come from the master:
the loader maps them, and /proc/self is the program itself. Everything else —
the user's data — is the slave's.

The policy is an ordered list of prefix rules; the first rule whose prefix is the
path or one of its ancestors decides (a prefix matches whole components: /usr does
not match /usrx). The order is: ``--local``/``--remote`` flags as given, then the
rules of the config file, then the program's own install prefix, then the
defaults, then "everything else is the slave's". Paths are compared after lexical
normalisation (``a/../b`` is ``b``); symlinks are not followed, so a master-local
symlink to a slave path stays on the master. ``fsys-master policy PATH`` shows the
deciding rule.
"""

from __future__ import annotations

import enum
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fsys.errors import FsysError


class Side(enum.Enum):
    MASTER = "master"
    SLAVE = "slave"


@dataclass(frozen=True, slots=True)
class Rule:
    prefix: bytes
    side: Side
    origin: str


DEFAULT_LOCAL: tuple[str, ...] = (
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
    "/etc/ld.so.cache", "/etc/ld.so.preload", "/etc/ld.so.conf", "/etc/ld.so.conf.d",
    "/etc/alternatives", "/proc", "/sys", "/dev", "/nix", "/snap", "/gnu",
)  # fmt: skip
FALLBACK = Rule(b"/", Side.SLAVE, "default: everything else is the slave's")


class PolicyError(FsysError, ValueError):
    """A bad rule in a flag or a config file."""


def normalize(path: bytes) -> bytes:
    """Lexical normal form of an absolute path (no ., .., or repeated slashes)."""
    norm = posixpath.normpath(path)
    if norm.startswith(b"//"):
        norm = b"/" + norm.lstrip(b"/")
    return norm


def _prefix(text: str, where: str) -> bytes:
    if not text.startswith("/"):
        raise PolicyError(f"{where}: prefix {text!r} is not an absolute path")
    return normalize(os.fsencode(os.path.expanduser(text)))


def program_prefixes(program: str) -> list[str]:
    """Where the program is installed: the prefix above its bin/ or sbin/ directory
    (/opt/app for /opt/app/bin/tool), or else the program file alone, so that running
    /tmp/tool does not make all of /tmp the master's. For the path as given and as
    resolved; /, /usr and /usr/local are left to the defaults."""
    out: list[str] = []
    for path in (program, os.path.realpath(program)):
        directory = os.path.dirname(path)
        prefix = path
        if os.path.basename(directory) in ("bin", "sbin"):
            prefix = os.path.dirname(directory)
        if prefix not in ("/", "/usr", "/usr/local") and prefix not in out:
            out.append(prefix)
    return out


class Policy:
    """The ordered rules, with an index by prefix and a cache of recent answers.

    Every path call asks the policy, so ``is_local`` looks up the path's ancestors in
    a dict (first rule wins by position) instead of testing every rule in turn, and
    remembers recent answers.
    """

    CACHE_SIZE = 4096

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        self._index: dict[bytes, tuple[int, Rule]] = {}
        for i, rule in enumerate(rules):
            self._index.setdefault(rule.prefix, (i, rule))
        self._cache: dict[bytes, bool] = {}

    @classmethod
    def build(
        cls,
        *,
        flags: Iterable[tuple[Side, str]] = (),
        config: Path | None = None,
        program: str | None = None,
        defaults: bool = True,
    ) -> Policy:
        rules: list[Rule] = []
        for side, text in flags:
            flag = "--local" if side is Side.MASTER else "--remote"
            rules.append(Rule(_prefix(text, flag), side, f"flag {flag} {text}"))
        if config is not None:
            config_rules, defaults = load_config(config, defaults)
            rules += config_rules
        if program is not None:
            rules += [
                Rule(_prefix(p, "program"), Side.MASTER, f"the program's install prefix {p}")
                for p in program_prefixes(program)
            ]
        if defaults:
            rules += [Rule(_prefix(p, "default"), Side.MASTER, "default") for p in DEFAULT_LOCAL]
        rules.append(FALLBACK)
        return cls(tuple(rules))

    def rule_for(self, path: bytes) -> Rule:
        """The rule deciding ``path`` (absolute, normalised)."""
        best: tuple[int, Rule] | None = None
        index = self._index
        prefix = path
        while True:
            hit = index.get(prefix)
            if hit is not None and (best is None or hit[0] < best[0]):
                best = hit
            if prefix == b"/":
                break
            prefix = prefix[: prefix.rindex(b"/")] or b"/"
        return best[1] if best is not None else FALLBACK

    def is_local(self, path: bytes) -> bool:
        """True if the absolute ``path`` is the master's. It is normalised here, only
        when it is not among the recent answers (every path call asks)."""
        cached = self._cache.get(path)
        if cached is None:
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            cached = self._cache[path] = self.rule_for(normalize(path)).side is Side.MASTER
        return cached


def load_config(path: Path, defaults: bool = True) -> tuple[list[Rule], bool]:
    """Rules from a TOML file::

    [policy]
    defaults = true            # keep the built-in master-local prefixes
    [[policy.rule]]
    prefix = "/opt/tools"
    side = "master"            # or "slave"
    """
    import tomllib  # only for a config file: start-up time

    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc
        raise PolicyError(f"{path}: {reason}") from None
    if set(data) - {"policy"}:
        raise PolicyError(f"{path}: unknown key(s): {', '.join(sorted(set(data) - {'policy'}))}"
                          " (the rules go in [policy])")  # fmt: skip
    section = data.get("policy", {})
    if not isinstance(section, dict):
        raise PolicyError(f"{path}: [policy] must be a table")
    unknown = set(section) - {"defaults", "rule"}
    if unknown:
        raise PolicyError(f"{path}: unknown key(s) in [policy]: {', '.join(sorted(unknown))}")
    defaults = section.get("defaults", defaults)
    if not isinstance(defaults, bool):
        raise PolicyError(f"{path}: policy.defaults must be true or false")
    entries = section.get("rule", [])
    if not isinstance(entries, list):
        raise PolicyError(f"{path}: policy.rule must be an array of tables ([[policy.rule]])")
    rules: list[Rule] = []
    for i, entry in enumerate(entries):
        where = f"{path}: policy.rule[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"prefix", "side"}:
            raise PolicyError(f"{where}: needs exactly 'prefix' and 'side'")
        try:
            side = Side(entry["side"])
        except ValueError:
            raise PolicyError(f"{where}: side must be 'master' or 'slave'") from None
        if not isinstance(entry["prefix"], str):
            raise PolicyError(f"{where}: prefix must be a string")
        rules.append(Rule(_prefix(entry["prefix"], where), side, f"config {path} rule {i}"))
    return rules, defaults
