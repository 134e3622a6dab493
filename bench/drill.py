"""The hostile and careless user's drill: bad inputs and attacks, each run through the real
commands in a fresh process, and how each ended.

    python bench/drill.py [--out bench/results_drill.json]

Every case prepares files in a scratch folder, runs ``dpo-hpc`` (train, submit, status) as a
user would, and is judged by what the terminal showed and what happened on disk:

- ``clear``: refused with exit 1 or 2, ``error:`` lines only (at most 21), no traceback, and
  nothing it must not touch was touched;
- ``correct``: a case whose right outcome is success (a moved run resumes) succeeded;
- ``traceback``: a Python traceback reached the terminal;
- ``silent``: accepted what it should have refused, or damaged something, or a flood of lines.

Prints one line per case and the tally; writes the table as JSON. Needs no GPU and no Slurm
(the Slurm cases are tests: tests/integration/test_slurm.py). Cases that need root (a small
tmpfs for a full disk) are reported as skipped elsewhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Outcome:
    rc: int
    out: str
    err: str


@dataclass
class Case:
    kind: str
    name: str
    run: Callable[["Drill"], tuple[Outcome, Optional[str]]]
    """Runs the case; returns the command's outcome and, when something on disk is wrong, what."""
    succeeds: bool = False
    """The right outcome is success (exit 0), not a refusal."""


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


class Drill:
    def __init__(self, scratch: Path):
        from dpo_hpc.data.verifiable import write_dataset
        from dpo_hpc.tiny_model import make_tiny_model

        self.scratch = scratch
        self.model = make_tiny_model(scratch / "model", seed=0, hidden_size=64, num_layers=2, num_heads=4,
                                     intermediate_size=128, max_position_embeddings=256)
        write_dataset(scratch / "data", n_train=64, n_test=8, seed=0, label_noise=0.0)
        self.data = scratch / "data/train.jsonl"
        self.count = 0

    def folder(self) -> Path:
        self.count += 1
        path = self.scratch / f"case{self.count:02d}"
        path.mkdir()
        return path

    def config(self, where: Path, **training) -> dict:
        return {"policy_name": str(self.model), "precision": "fp32",
                "dataset": {"dataset_name": str(self.data), "val_ratio": 0.1, "max_length": 96, "max_prompt_length": 64},
                "dpo_training": {"learning_rate": 1e-3, "batch_size": 4, "max_steps": 3, "logging_steps": 1,
                                 "save_dir": str(where / "run"), **training}}

    def write(self, where: Path, data, name: str = "c.yaml") -> Path:
        path = where / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return path

    def cli(self, *args: str, cwd: Optional[Path] = None) -> Outcome:
        done = subprocess.run([sys.executable, "-m", "dpo_hpc", *map(str, args)], capture_output=True, text=True,
                              env=ENV, cwd=cwd or self.scratch, timeout=600)
        return Outcome(done.returncode, done.stdout, done.stderr)

    def train(self, config: Path, *extra: str) -> Outcome:
        return self.cli("train", "dpo", "--config", config, *extra)

    def trained(self, where: Path, **training) -> dict:
        """A finished 3-step run with a checkpoint at every step, reopened for a 4-step resume."""
        raw = self.config(where, save_steps=1, save_total_limit=5, checkpoints_at_end="all", **training)
        assert self.train(self.write(where, raw)).rc == 0
        run = Path(raw["dpo_training"]["save_dir"])
        for name in ("run_manifest.json", "model.safetensors"):
            (run / name).unlink()  # as if it had been stopped after its last checkpoint
        raw["dpo_training"]["max_steps"] = 4
        return raw


# ---- the cases -----------------------------------------------------------------------------------
def config_file(content: bytes | str, name: str = "c.yaml", *extra: str):
    def run(d: Drill):
        where = d.folder()
        path = where / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content == "<folder>":
            path.mkdir()
        elif content == "<50 MB>":
            with open(path, "wb") as f:
                f.truncate(50 * 2**20)
        else:
            path.write_text(content)
        return d.train(path, *extra), None
    return run


def trainer_config(change: Callable[[dict], dict], *extra: str):
    def run(d: Drill):
        where = d.folder()
        return d.train(d.write(where, change(d.config(where))), *extra), None
    return run


def with_data(content: str):
    def run(d: Drill):
        where = d.folder()
        (where / "data.jsonl").write_text(content)
        raw = d.config(where)
        raw["dataset"]["dataset_name"] = str(where / "data.jsonl")
        return d.train(d.write(where, raw)), None
    return run


def kto_data(rows: list[dict]):
    """``dpo-hpc train kto`` on ``rows`` (a [kto_training] section instead of [dpo_training])."""
    def run(d: Drill):
        where = d.folder()
        (where / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        raw = d.config(where)
        raw["dataset"]["dataset_name"] = str(where / "data.jsonl")
        raw["kto_training"] = raw.pop("dpo_training")
        return d.cli("train", "kto", "--config", d.write(where, raw)), None
    return run


def reward_config(change: Callable[[dict], dict]):
    """``dpo-hpc train reward`` on the drill's config with a [reward_training] section, changed."""
    def run(d: Drill):
        where = d.folder()
        raw = d.config(where)
        raw["reward_training"] = {k: v for k, v in raw.pop("dpo_training").items() if k != "beta"}
        return d.cli("train", "reward", "--config", d.write(where, change(raw))), None
    return run


EXPERIMENT = """
[experiment]
name = "x"
output_root = "OUT"
SLURM
[stages.sft]
trainer = "sft"
config = { policy_name = "MODEL", dataset = { dataset_name = "DATA" }, sft_training = { learning_rate = 1e-3, batch_size = 4, max_steps = 2 } }
"""


def experiment(slurm: str = "", out: str = "out", command: tuple[str, ...] = ("submit", "--dry-run"), extra: str = ""):
    def run(d: Drill):
        where = d.folder()
        if out == "<file>":
            (where / "taken").write_text("a file")
        text = EXPERIMENT.replace("SLURM", slurm).replace("OUT", "taken" if out == "<file>" else out)
        text = text.replace("MODEL", str(d.model)).replace("DATA", str(d.data)) + extra
        path = d.write(where, text, "x.toml")
        outcome = d.cli(command[0], path, *command[1:], cwd=where)
        harm = "the file at output_root changed" if out == "<file>" and (where / "taken").read_text() != "a file" else None
        return outcome, harm
    return run


def save_dir_is_the_policy(d: Drill):
    where = d.folder()
    policy = where / "policy"
    shutil.copytree(d.model, policy)
    before = digest(policy)
    raw = d.config(where)
    raw["policy_name"] = raw["dpo_training"]["save_dir"] = str(policy)
    outcome = d.train(d.write(where, raw))
    return outcome, None if digest(policy) == before else "the policy's folder was overwritten"


def payload_in(victim: str):
    def run(d: Drill):
        from dpo_hpc.checkpoint import layout
        from dpo_hpc.fsutil import sha256_file

        where = d.folder()
        raw = d.trained(where)
        ckpt = layout.published_checkpoints(Path(raw["dpo_training"]["save_dir"]) / "checkpoints")[0]
        target = next((ckpt / layout.ENGINE_TAG).glob("*model_states.pt")) if victim == "engine" \
            else ckpt / layout.rank_file(0)
        marker = where / "pwned"
        state = torch.load(target, weights_only=False)  # the drill's own file, just written
        state["extra"] = _Payload(marker)
        torch.save(state, target)
        manifest = json.loads((ckpt / layout.MANIFEST).read_text())
        manifest["files"][target.relative_to(ckpt).as_posix()] = {"size": target.stat().st_size,
                                                                  "sha256": sha256_file(target)}
        (ckpt / layout.MANIFEST).write_text(json.dumps(manifest))
        for older in layout.published_checkpoints(ckpt.parent)[1:]:
            shutil.rmtree(older)
        outcome = d.train(d.write(where, raw))
        return outcome, "the payload ran" if marker.exists() else None
    return run


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def checkpoint_manifest(content: str, keep_older: bool = False):
    def run(d: Drill):
        from dpo_hpc.checkpoint import layout

        where = d.folder()
        raw = d.trained(where)
        found = layout.published_checkpoints(Path(raw["dpo_training"]["save_dir"]) / "checkpoints")
        for ckpt in found[:1] if keep_older else found:
            (ckpt / layout.MANIFEST).write_text(content)
        return d.train(d.write(where, raw)), None
    return run


def all_corrupt(d: Drill):
    from dpo_hpc.checkpoint import layout

    where = d.folder()
    raw = d.trained(where)
    for ckpt in layout.published_checkpoints(Path(raw["dpo_training"]["save_dir"]) / "checkpoints"):
        victim = ckpt / layout.rank_file(0)
        victim.write_bytes(victim.read_bytes()[:-4] + b"oops")
    return d.train(d.write(where, raw)), None


def refused_resume(d: Drill):
    where = d.folder()
    raw = d.trained(where)
    run = Path(raw["dpo_training"]["save_dir"])
    before = digest(run)
    raw["dpo_training"]["learning_rate"] = 0.5
    outcome = d.train(d.write(where, raw))
    return outcome, None if digest(run) == before else "the refused resume changed the run directory"


def batch_changed(split: bool):
    """Resume with half the micro-batch: alone (another global batch, refused), or with twice the
    accumulation (the out-of-memory advice: the same global batch, resumed)."""
    def run(d: Drill):
        where = d.folder()
        raw = d.trained(where)
        before = digest(Path(raw["dpo_training"]["save_dir"]))
        raw["dpo_training"]["batch_size"] = 2
        if split:
            raw["dpo_training"]["gradient_accumulation_steps"] = 2
        outcome = d.train(d.write(where, raw))
        if split:
            return outcome, None if "resumed from" in outcome.out and "at step 2/4" in outcome.out else \
                "did not resume from its last checkpoint (step 2)"
        return outcome, None if digest(Path(raw["dpo_training"]["save_dir"])) == before else \
            "the refused resume changed the run directory"
    return run


def changed_data(d: Drill):
    where = d.folder()
    data = where / "data.jsonl"
    data.write_text(d.data.read_text())
    raw = d.config(where, save_steps=1, save_total_limit=5, checkpoints_at_end="all")
    raw["dataset"]["dataset_name"] = str(data)
    assert d.train(d.write(where, raw)).rc == 0
    for name in ("run_manifest.json", "model.safetensors"):
        (Path(raw["dpo_training"]["save_dir"]) / name).unlink()
    raw["dpo_training"]["max_steps"] = 4
    data.write_text("".join(reversed(data.read_text().splitlines(keepends=True))))
    return d.train(d.write(where, raw)), None


def moved_run(d: Drill):
    where = d.folder()
    raw = d.trained(where)
    moved = where / "elsewhere" / "run"
    moved.parent.mkdir()
    Path(raw["dpo_training"]["save_dir"]).rename(moved)
    raw["dpo_training"]["save_dir"] = str(moved)
    outcome = d.train(d.write(where, raw))
    ok = "resumed from" in outcome.out and "at step 2/4" in outcome.out  # its last checkpoint
    return outcome, None if ok else "did not resume from its last checkpoint (step 2)"


def link_as_the_only_checkpoint(d: Drill):
    where = d.folder()
    (where / "someone_elses").mkdir()
    raw = d.config(where)
    from dpo_hpc.checkpoint import layout

    (Path(raw["dpo_training"]["save_dir"]) / "checkpoints").mkdir(parents=True)
    (Path(raw["dpo_training"]["save_dir"]) / "checkpoints" / layout.step_dir_name(9)).symlink_to(where / "someone_elses")
    outcome = d.train(d.write(where, raw))
    return outcome, None if (where / "someone_elses").is_dir() else "the link's target was removed"


def links_planted(d: Drill):
    from dpo_hpc.checkpoint import layout

    where = d.folder()
    outside = where / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    raw = d.config(where, save_steps=1)
    run = Path(raw["dpo_training"]["save_dir"])
    (run / "checkpoints").mkdir(parents=True)
    (run / "data_report.json").symlink_to(outside / "precious")
    (run / "README.md").symlink_to(outside / "precious")  # the model card's place
    (run / ".final-model.tmp").symlink_to(outside)
    (run / "checkpoints" / layout.tmp_dir_name(1)).symlink_to(outside)
    outcome = d.train(d.write(where, raw))
    intact = sorted(p.name for p in outside.iterdir()) == ["precious"] and (outside / "precious").read_text() == "keep"
    return outcome, None if intact else "a file outside the run was written or deleted through a link"


def second_writer(d: Drill):
    where = d.folder()
    raw = d.config(where, max_steps=100000, save_steps=50)
    config = d.write(where, raw)
    first = subprocess.Popen([sys.executable, "-m", "dpo_hpc", "train", "dpo", "--config", str(config)], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (Path(raw["dpo_training"]["save_dir"]) / "progress.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        return d.train(config), None
    finally:
        first.kill()
        first.wait()


def full_disk(d: Drill):
    where = d.folder()
    mount = where / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        return None, "skipped: cannot mount a tmpfs here"
    try:
        raw = d.config(where, save_steps=1, save_dir=str(mount / "run"))
        return d.train(d.write(where, raw)), None
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _bomb() -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    return "\n".join(lines)


def _flood(raw: dict) -> dict:
    raw["dpo_training"].update({f"key{i}": i for i in range(5000)})
    return raw


CASES = [
    Case("config", "binary file", config_file(b"\xff\xfe\x00binary\x00\x01")),
    Case("config", "Latin-1 text", config_file("policy_name: caf\xe9\n".encode("latin-1"))),
    Case("config", "a folder as the config", config_file("<folder>")),
    Case("config", "50 MB file", config_file("<50 MB>")),
    Case("config", "YAML alias bomb (9^9 values)", config_file(_bomb())),
    Case("config", "YAML alias that contains itself", config_file("a: &a\n  b: *a\n")),
    Case("config", "lists nested 3,000 deep", config_file("a: " + "[" * 3000 + "]" * 3000)),
    Case("config", "YAML python tag (code execution)", config_file("policy_name: !!python/object/apply:os.system ['id']\n")),
    Case("config", "5,000 unknown keys", trainer_config(_flood)),
    Case("config", "wrong type (batch_size: four)", trainer_config(lambda r: {**r, "dpo_training": {**r["dpo_training"], "batch_size": "four"}})),
    Case("config", "required key missing (learning_rate)", trainer_config(lambda r: {**r, "dpo_training": {k: v for k, v in r["dpo_training"].items() if k != "learning_rate"}})),
    Case("config", "--set =3", trainer_config(lambda r: r, "--set", "=3")),
    Case("config", "--set of an unknown key", trainer_config(lambda r: r, "--set", "dpo_training.lr=1")),
    Case("config", "a loss's option with another loss (discopop_tau, sigmoid)", trainer_config(
        lambda r: {**r, "dpo_training": {**r["dpo_training"], "discopop_tau": 0.1}})),
    Case("config", "exo_pair without label_smoothing", trainer_config(
        lambda r: {**r, "dpo_training": {**r["dpo_training"], "loss_type": "exo_pair"}})),
    Case("config", "a loss mixture of simpo with sigmoid", trainer_config(
        lambda r: {**r, "dpo_training": {**r["dpo_training"], "loss_type": ["sigmoid", "simpo"]}})),
    Case("config", "sync_ref_model with a precomputed reference table", trainer_config(
        lambda r: {**r, "dpo_training": {**r["dpo_training"], "sync_ref_model": True,
                                         "precompute_ref_log_probs": True}})),
    Case("config", "ref_model_sync_steps without sync_ref_model", trainer_config(
        lambda r: {**r, "dpo_training": {**r["dpo_training"], "ref_model_sync_steps": 64}})),
    Case("config", "global_batch_size and gradient_accumulation_steps both", trainer_config(
        lambda r: {**r, "dpo_training": {**r["dpo_training"], "global_batch_size": 8,
                                         "gradient_accumulation_steps": 2}})),
    Case("config", "router_aux_loss_coef on a dense model", trainer_config(lambda r: {**r, "router_aux_loss_coef": 0.02})),
    Case("config", "a system column mapped under format = text", trainer_config(
        lambda r: {**r, "dataset": {**r["dataset"], "format": "text", "columns": {"system": "sys"}}})),
    Case("config", "generate_during_eval with no validation rows (runs, says so)", trainer_config(
        lambda r: {**r, "dataset": {**r["dataset"], "val_ratio": 0.0},
                   "dpo_training": {**r["dpo_training"], "generate_during_eval": True}}), succeeds=True),
    Case("config", "an experiment file given to train", lambda d: (d.train(d.write(d.folder(), EXPERIMENT, "x.toml")), None)),
    Case("experiment", "output_root is a file (submit --no-preflight)", experiment(out="<file>", command=("submit", "--local", "--no-preflight"))),
    Case("experiment", "output_root is a file (status)", experiment(out="<file>", command=("status",))),
    Case("experiment", "sbatch value with a line break", experiment('[slurm]\npartition = "gpu\\n#SBATCH --wrap=evil"')),
    Case("experiment", "env name with a space", experiment('[slurm]\nenv = { "A B" = "1" }')),
    Case("experiment", "inline save_dir in a stage", experiment(extra='[stages.sft.config.sft_training]\nsave_dir = "mine"\n'.replace(
        "[stages.sft.config.sft_training]\n", "[stages.dpo]\ntrainer = \"dpo\"\nfrom = \"sft\"\n[stages.dpo.config]\ndataset = { dataset_name = \"d\" }\n[stages.dpo.config.dpo_training]\nlearning_rate = 1e-3\nbatch_size = 4\n"))),
    Case("experiment", "grid over save_dir", experiment(extra='[stages.sft.grid]\n"sft_training.save_dir" = ["a", "b"]\n')),
    Case("experiment", "from = a stage that does not exist", experiment(extra='[stages.dpo]\ntrainer = "dpo"\nfrom = "nope"\n')),
    Case("data", "empty JSONL", with_data("")),
    Case("data", "a JSONL line that is an array", with_data('{"prompt": "a", "chosen": "b", "rejected": "c"}\n[1, 2]\n')),
    Case("data", "a JSONL line that is not JSON", with_data('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": x\n')),
    Case("data", "rows without the expected columns", with_data('{"question": "a", "answer": "b"}\n' * 5)),
    Case("data", "data regenerated in another order, then resumed", changed_data),
    Case("data", "KTO rows whose labels are words ('yes'/'no')", kto_data(
        [{"prompt": f"Q{i}:", "completion": f" a{i}", "label": "yes" if i % 2 else "no"} for i in range(40)])),
    Case("data", "KTO rows all desirable (runs, says the weights are off)", kto_data(
        [{"prompt": f"Q{i}:", "completion": f" a{i}", "label": True} for i in range(40)]), succeeds=True),
    Case("config", "a reward model asked for sample replies", reward_config(
        lambda r: {**r, "reward_training": {**r["reward_training"], "generate_during_eval": True}})),
    Case("experiment", "an evaluate stage judged by a DPO stage", experiment(extra=(
        '[stages.dpo]\ntrainer = "dpo"\nfrom = "sft"\n[stages.dpo.config]\ndataset = { dataset_name = "d" }\n'
        'dpo_training = { learning_rate = 1e-3, batch_size = 4 }\n'
        '[stages.judged]\nfrom = "dpo"\nevaluate = { reward_model = "dpo" }\n'))),
    Case("paths", "save_dir = the policy's folder", save_dir_is_the_policy),
    Case("paths", "save_dir = \"\"", trainer_config(lambda r: {**r, "dpo_training": {**r["dpo_training"], "save_dir": ""}})),
    Case("paths", "save_dir is a file", trainer_config(lambda r: (Path(r["dpo_training"]["save_dir"]).write_text("x"), r)[1])),
    Case("paths", "a policy path with a typo", trainer_config(lambda r: {**r, "policy_name": r["policy_name"] + "-typo"})),
    Case("checkpoint", "pickle payload in DeepSpeed's model file", payload_in("engine")),
    Case("checkpoint", "pickle payload in the rank file", payload_in("rank")),
    Case("checkpoint", "manifest null (older checkpoints good)", checkpoint_manifest("null", keep_older=True), succeeds=True),
    Case("checkpoint", "manifest without files, every checkpoint", checkpoint_manifest('{"step": 3}')),
    Case("checkpoint", "every checkpoint corrupt", all_corrupt),
    Case("checkpoint", "resume with another learning rate", refused_resume),
    Case("checkpoint", "run directory moved, then resumed", moved_run, succeeds=True),
    Case("checkpoint", "resume with half the micro-batch (another global batch)", batch_changed(split=False)),
    Case("checkpoint", "resume with half the micro-batch and twice the accumulation", batch_changed(split=True),
         succeeds=True),
    Case("checkpoint", "links planted at data_report.json, README.md, .final-model.tmp, .tmp-step_*", links_planted,
         succeeds=True),
    Case("checkpoint", "a link planted as the only checkpoint (step_*)", link_as_the_only_checkpoint),
    Case("runtime", "a second trainer on a running run's save_dir", second_writer),
    Case("runtime", "disk full during a checkpoint save", full_disk),
]


def judge(case: Case, outcome: Optional[Outcome], harm: Optional[str]) -> tuple[str, str]:
    if outcome is None:
        return "skipped", harm or ""
    shown = outcome.out + outcome.err
    errors = [line for line in outcome.err.splitlines() if line.startswith("error:")]
    if "Traceback (most recent call last)" in shown:
        return "traceback", (errors or [shown.strip().splitlines()[-1]])[-1]
    if harm:
        return "silent", harm
    if case.succeeds:
        return ("correct", "exit 0") if outcome.rc == 0 else ("silent", f"exit {outcome.rc}: {' '.join(errors)[:300]}")
    if outcome.rc == 0 or not errors:
        return "silent", f"exit {outcome.rc}, accepted"
    if len(errors) > 21:
        return "silent", f"{len(errors)} error lines"
    return "clear", errors[0] + (f" (+{len(errors) - 1} more lines)" if len(errors) > 1 else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench/results_drill.json"))
    args = parser.parse_args()
    rows, started = [], time.time()
    with tempfile.TemporaryDirectory(prefix="dpo-hpc-drill-") as scratch:
        drill = Drill(Path(scratch))
        for case in CASES:
            outcome, harm = case.run(drill)
            verdict, line = judge(case, outcome, harm)
            rows.append({"kind": case.kind, "case": case.name, "verdict": verdict,
                         "exit": outcome.rc if outcome else None, "line": line})
            print(f"[drill] {verdict:9s} {case.kind:10s} {case.name}: {line[:160]}", flush=True)
    tally = {v: sum(r["verdict"] == v for r in rows) for v in ("clear", "correct", "traceback", "silent", "skipped")}
    print(f"[drill] {len(rows)} cases in {time.time() - started:.0f} s: "
          + ", ".join(f"{n} {v}" for v, n in tally.items()))
    Path(args.out).write_text(json.dumps({"tally": tally, "cases": rows}, indent=2) + "\n")
    return 0 if tally["traceback"] == tally["silent"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
