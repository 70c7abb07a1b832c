"""fsys-master's compiled front door (client/fsys-master.c): built with the scripts.

The metadata is pyproject.toml's. `fsys-master` is installed as a script: the
compiled client when a C compiler (CC, else cc) builds it, else client/fsys-master,
the same command in Python. The compiled one serves a kept session's command without
starting Python, and hands every other command to the Python it was built with.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig

from setuptools import Distribution, setup

#: The scripts' build command setuptools would run (its own distutils' build_scripts).
build_scripts = Distribution().get_command_class("build_scripts")

SOURCE = os.path.join("client", "fsys-master.c")


def _c_string(text: str) -> str:
    """``text`` as a C string literal (every byte in octal: any path is safe)."""
    return '"' + "".join(f"\\{byte:03o}" for byte in os.fsencode(text)) + '"'


class BuildScripts(build_scripts):  # type: ignore[misc,valid-type]
    def run(self) -> None:
        super().run()
        target = os.path.join(self.build_dir, "fsys-master")
        partial = target + ".c-build"
        cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
        version = self.distribution.get_version()
        command = [*shlex.split(cc), "-O2", "-Wall", f"-DFSYS_PYTHON={_c_string(sys.executable)}",
                   f"-DFSYS_VERSION={_c_string(version)}", "-o", partial, SOURCE]  # fmt: skip
        try:
            subprocess.run(command, check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"fsys: {SOURCE} not built ({exc}): fsys-master is the Python script",
                  file=sys.stderr)  # fmt: skip
            return
        os.replace(partial, target)


class CompiledDistribution(Distribution):  # type: ignore[misc]
    """Not pure Python: the wheel holds a compiled program, so it is tagged for this
    platform and Python, never installed elsewhere as "any"."""

    def has_ext_modules(self) -> bool:
        return True


setup(scripts=[os.path.join("client", "fsys-master")], cmdclass={"build_scripts": BuildScripts},
      distclass=CompiledDistribution)  # fmt: skip
