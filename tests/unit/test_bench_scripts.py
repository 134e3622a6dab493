"""The shell scripts that run where no test can follow them (a lent GPU machine, a cluster's login
node): they parse, the GPU session's steps exist, and every wheel it carries has a pinned version."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import REPO

SCRIPTS = sorted([*REPO.glob("bench/*.sh"), *REPO.glob("hpc/*.sh")])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_gpu_session_step_is_defined_and_documented():
    text = (REPO / "bench/gpu_session.sh").read_text()
    (default,) = re.findall(r"steps=\(([a-z_ ]+)\)", text)
    defined = set(re.findall(r"^([a-z_]+)\(\) \{", text, flags=re.M))
    documented = set(re.findall(r"^#   ([a-z_]+) ", text, flags=re.M))
    assert set(default.split()) <= defined and set(default.split()) == documented


def test_every_carried_wheel_has_a_pinned_version():
    text = (REPO / "bench/gpu_wheels.sh").read_text()
    (listed,) = re.findall(r"missing=\((.*?)\n\)", text, flags=re.S)
    names = [word for line in listed.splitlines() for word in line.split("#")[0].split()]
    pins = {re.sub(r"[-_.]+", "-", line.split("==")[0]).lower()
            for line in (REPO / "hpc/constraints.txt").read_text().splitlines() if "==" in line}
    unpinned = [n for n in names if "==" not in n and re.sub(r"[-_.]+", "-", n).lower() not in pins]
    assert names and not unpinned, unpinned
