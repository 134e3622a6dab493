"""dpo-hpc prefetch against a hub cache filled beforehand (no network here): what an experiment
reads is found in the cache its jobs use, what is missing is listed, local paths are checked;
and a job offline trains from that cache (the model by its hub id, the dataset from the files
prefetch stores)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(hub: Path, kind: str, repo: str, files: dict[str, Path]) -> None:
    """A repository in huggingface_hub's cache layout, as a download leaves it."""
    root = hub / f"{kind}s--{repo.replace('/', '--')}"
    for rel, source in files.items():
        (root / "snapshots" / COMMIT / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / "snapshots" / COMMIT / rel)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)


def filled_cache(tmp_path: Path, micro_model: Path, reverse_data: Path) -> Path:
    home = tmp_path / "hf"
    cache_repo(home / "hub", "model", "org/micro", {p.name: p for p in micro_model.iterdir() if p.is_file()})
    cache_repo(home / "hub", "dataset", "org/pairs", {"data/train.jsonl": reverse_data})
    return home


EXPERIMENT = """
[experiment]
name = "p"
output_root = "out"

[slurm.env]
HF_HOME = "CACHE_HOME"

[stages.sft]
trainer = "sft"
[stages.sft.config]
policy_name = "org/micro"
dataset = { dataset_name = "org/pairs", val_ratio = 0.1, max_length = 96, max_prompt_length = 64 }
sft_training = { learning_rate = 1e-3, batch_size = 8, max_steps = 2 }

[stages.dpo]
trainer = "dpo"
from = "sft"
[stages.dpo.config]
dataset = { dataset_name = "org/pairs" }
dpo_training = { learning_rate = 1e-4, batch_size = 4, max_steps = 2 }
"""


def prefetch(path: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpo_hpc", "prefetch", path.name], cwd=path.parent, text=True,
                          capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=300)


def test_prefetch_finds_the_cache_the_jobs_use_and_lists_what_is_missing(tmp_path, micro_model, reverse_data):
    home = filled_cache(tmp_path, micro_model, reverse_data)
    path = tmp_path / "p.toml"
    path.write_text(EXPERIMENT.replace("CACHE_HOME", str(home)))
    done = prefetch(path, HF_HOME=str(tmp_path / "elsewhere"))  # the stage's [slurm.env] HF_HOME wins
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"[prefetch] model org/micro: already in {home / 'hub'}" in done.stdout
    assert f"[prefetch] dataset org/pairs: already in {home / 'hub'}" in done.stdout
    assert done.stdout.count("[prefetch] ") == 3  # the dpo stage starts from sft's model: nothing more to fetch

    path.write_text(EXPERIMENT.replace("CACHE_HOME", str(home)).replace('policy_name = "org/micro"',
                                                                   'policy_name = "org/absent"\ntokenizer_name = "MODEL"')
                    .replace("MODEL", str(micro_model)) + "\n[stages.extra]\ntrainer = \"sft\"\n[stages.extra.config]\n"
                    f'policy_name = "{micro_model}"\ndataset = {{ dataset_name = "missing.jsonl", '
                    'mix = [{ dataset_name = "mixed-in.jsonl" }] }\n'
                    "sft_training = { learning_rate = 1e-3, batch_size = 8 }\n")
    done = prefetch(path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: model org/absent: not in {home / 'hub'}, and HF_HUB_OFFLINE=1 forbids fetching it; run "
                      "`dpo-hpc prefetch` where there is network, with the jobs' HF_HOME",
                      f"error: dataset {tmp_path / 'missing.jsonl'}: no such local path",
                      f"error: dataset {tmp_path / 'mixed-in.jsonl'}: no such local path"], done.stderr
    assert f"[prefetch] model {micro_model}: local, present" in done.stdout and "3 missing" in done.stdout


def test_an_offline_job_trains_from_what_prefetch_stored(tmp_path, micro_model, reverse_data):
    home = filled_cache(tmp_path, micro_model, reverse_data)
    config = {"policy_name": "org/micro", "precision": "fp32",
              "dataset": {"dataset_name": "org/pairs", "val_ratio": 0.1, "max_length": 96, "max_prompt_length": 64},
              "sft_training": {"learning_rate": 1e-3, "batch_size": 8, "max_steps": 2, "save_dir": str(tmp_path / "run")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "dpo_hpc", "train", "sft", "--config", str(tmp_path / "c.yaml")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run/model.safetensors").is_file()
