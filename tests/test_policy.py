"""The path policy: ordered prefix rules, config file, and the policy command."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio

from fsys.master.policy import Policy, PolicyError, Side, normalize, program_prefixes
from tests.conftest import PYTHON, run_master


def side(policy: Policy, path: str) -> str:
    return policy.rule_for(normalize(path.encode())).side.value


def test_defaults_keep_system_files_on_the_master() -> None:
    policy = Policy.build()
    for path in ("/usr/lib/libc.so.6", "/lib64/ld-linux-x86-64.so.2", "/etc/ld.so.cache",
                 "/proc/self/maps", "/dev/null", "/sys/kernel", "/bin/sh"):  # fmt: skip
        assert side(policy, path) == "master", path
    for path in ("/", "/etc/hostname", "/home/u/x", "/tmp/f", "/usrx", "/etc/ld.so.cachex"):
        assert side(policy, path) == "slave", path


def test_first_matching_rule_wins_and_components_match_whole() -> None:
    policy = Policy.build(flags=[(Side.SLAVE, "/usr/local/src"), (Side.MASTER, "/opt/tools")])
    assert side(policy, "/usr/local/src/x.c") == "slave"
    assert side(policy, "/usr/local/bin/x") == "master"
    assert side(policy, "/opt/tools/bin/t") == "master"
    assert side(policy, "/opt/toolsx") == "slave"
    assert side(policy, "/usr/../opt/tools") == "master"  # lexical normalisation


def test_no_defaults() -> None:
    assert side(Policy.build(defaults=False), "/usr/bin/cat") == "slave"


def test_program_prefix() -> None:
    assert program_prefixes("/opt/app/bin/tool") == ["/opt/app"]
    assert program_prefixes("/srv/tool") == ["/srv/tool"]  # not all of /srv
    assert "/usr" not in program_prefixes("/usr/bin/cat")
    policy = Policy.build(program="/opt/app/bin/tool")
    assert side(policy, "/opt/app/lib/libx.so") == "master"


def test_config_file(tmp_path: Path) -> None:
    config = tmp_path / "policy.toml"
    config.write_text(
        '[policy]\ndefaults = false\n[[policy.rule]]\nprefix = "/data/cache"\nside = "master"\n'
    )
    policy = Policy.build(config=config)
    assert side(policy, "/data/cache/a") == "master"
    assert side(policy, "/usr/bin") == "slave"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[policy]\nbogus = 1\n", "unknown key"),
        ('[[policy.rule]]\nprefix = "rel"\nside = "master"\n', "not an absolute path"),
        ('[[policy.rule]]\nprefix = "/x"\nside = "left"\n', "side must be"),
        ("[policy\n", "policy.toml"),
        ("rule = 5\n", "unknown key.*rule.*go in \\[policy\\]"),
        ("[policy]\nrule = 5\n", "must be an array of tables"),
        (b"[policy]\n# \xff\n", "not UTF-8 text"),
    ],
)
def test_bad_config(tmp_path: Path, text: str | bytes, message: str) -> None:
    config = tmp_path / "policy.toml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(PolicyError, match=message):
        Policy.build(config=config)


def test_cache_gives_the_same_answers() -> None:
    policy = Policy.build()
    for _ in range(2):
        assert policy.is_local(b"/usr/bin/ls")
        assert not policy.is_local(b"/home")


async def test_policy_command(tmp_path: Path) -> None:
    result = await run_master(
        ["policy", "--remote", "/usr/src", "/usr/src/linux", "/usr/bin/ls", "/etc/hostname"],
        cwd=tmp_path,
    )
    assert result.status == 0
    assert result.out.splitlines() == [
        "/usr/src/linux: slave  (prefix /usr/src, flag --remote /usr/src)",
        "/usr/bin/ls: master  (prefix /usr, default)",
        "/etc/hostname: slave  (prefix /, default: everything else is the slave's)",
    ]
    bad = await run_master(["policy", "--local", "relative", "/x"], cwd=tmp_path)
    assert bad.status == 2 and "not an absolute path" in bad.err


def test_policy_into_a_reader_that_stops_early_is_quiet(tmp_path: Path) -> None:
    paths = [f"/p{i}" for i in range(20000)]  # more than a pipe holds
    cmd = [PYTHON, "-m", "fsys.master", "policy", *paths]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith(b"/p0: slave")
        proc.stdout.close()  # as `| head -1` does
        err = proc.stderr.read()
        status = proc.wait(timeout=60)
    assert err == b"" and status == -signal.SIGPIPE


async def test_run_from_a_removed_directory_is_one_line(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    stages = set(Path(tempfile.gettempdir()).glob("fsys-stage-*"))
    script = f"cd {gone} && rmdir {gone} && exec {PYTHON} -m fsys.master run -- true"
    result = await trio.run_process(["/bin/sh", "-c", script], capture_stderr=True, check=False)
    assert result.returncode == 2
    assert (
        result.stderr == b"fsys-master: the working directory has been removed: cd to another one\n"
    )
    assert set(Path(tempfile.gettempdir()).glob("fsys-stage-*")) == stages


def test_what_fsys_master_printed_is_all_there_when_it_exits(tmp_path: Path) -> None:
    # fsys-master ends with os._exit (cli.run): what it buffered is written first.
    paths = [f"/p{i}" for i in range(100)]
    outputs = []
    for unbuffered in ("", "1"):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        if unbuffered:
            env["PYTHONUNBUFFERED"] = unbuffered
        out = tmp_path / f"out{unbuffered}"
        with out.open("wb") as f:
            done = subprocess.run([PYTHON, "-m", "fsys.master", "policy", *paths], stdout=f,
                                  env=env, timeout=60, check=False)  # fmt: skip
        assert done.returncode == 0
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]
    assert len(outputs[0].splitlines()) == len(paths)
