"""The one command (``dpo-hpc submit|status|report``, ``--version``), clear messages when a file
of the other kind is given, and the report of a finished experiment read back."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from dpo_hpc.trainers.metrics import THROUGHPUT
from conftest import REPO
from test_slurm import DPO, SFT, experiment


def dpo_hpc(cwd, *args):
    return subprocess.run([sys.executable, "-m", "dpo_hpc", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_version_and_files_of_the_other_kind(tmp_path):
    from dpo_hpc import __version__

    version = dpo_hpc(REPO, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"dpo-hpc {__version__}"
    wrong = dpo_hpc(REPO, "validate", "experiments/tiny.toml")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    (line,) = wrong.stderr.strip().splitlines()
    assert "experiments/tiny.toml is an experiment file" in line and "dpo-hpc submit experiments/tiny.toml" in line
    wrong = dpo_hpc(REPO, "submit", "experiments/seed/config_dpo.yaml", "--dry-run")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    (line,) = wrong.stderr.strip().splitlines()
    assert "config_dpo.yaml is a trainer config" in line and "dpo-hpc train dynamic-beta-dpo --config" in line
    dry = dpo_hpc(REPO, "submit", "experiments/tiny.toml", "--dry-run", "--out", str(tmp_path / "dry"))
    assert dry.returncode == 0 and (tmp_path / "dry/manifest.jsonl").exists(), dry.stderr
    assert dpo_hpc(REPO, "submit", "--help").stdout.startswith("usage: python -m dpo_hpc.submit")
    for judges in ([], ["--data", "t.jsonl", "--reward-model", "rm"]):  # evaluate scores one way
        wrong = dpo_hpc(REPO, "evaluate", str(tmp_path), *judges)
        assert wrong.returncode == 2 and "give --data" in wrong.stderr and "Traceback" not in wrong.stderr


SEEDED_DPO = DPO.replace('"dpo_training.beta" = [0.1, 0.3]', '"dpo_training.beta" = [0.1, 0.3]\n"dpo_training.seed" = [1, 2]')


def test_report_tables_and_plots_of_a_finished_experiment(tmp_path, micro_model, reverse_data):
    path = experiment(tmp_path, micro_model, reverse_data, SFT + SEEDED_DPO, name="rep")
    done = dpo_hpc(tmp_path, "submit", path.name, "--local", "--set", "training.max_steps=2", "--set",
                   "training.generate_during_eval=true", "--set", "training.max_new_tokens=4")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--set over every stage that has the key: training.max_steps=2" in done.stdout
    result = dpo_hpc(tmp_path, "report", path.name)  # the plan as submitted, --set included
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out/rep/report"
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 5 and {r["state"] for r in rows} == {"done"}
    for row in rows:  # values read back from each run's manifest
        manifest = json.loads((tmp_path / "out/rep" / row["stage"] / row["run_id"] / "run_manifest.json").read_text())
        if "eval/rewards/accuracies" in row and row["eval/rewards/accuracies"]:
            assert float(row["eval/rewards/accuracies"]) == manifest["final_eval"]["rewards/accuracies"]
        assert int(row["step"]) == manifest["final_step"]
        throughput = [summary for summary, _ in THROUGHPUT.values() if summary in manifest]
        assert "median_tokens_per_sec" in throughput
        assert all(float(row[summary]) == manifest[summary] for summary in throughput)
    run = tmp_path / "out/rep/dpo" / next(r["run_id"] for r in rows if r["stage"] == "dpo")
    card = (run / "README.md").read_text()  # the model card names the SFT run it started from
    sft_run = json.loads((run / "config.resolved.json").read_text())["policy_name"]
    assert f"| started from | `{Path(sft_run).resolve()}` (a dpo-hpc sft run), from `" in card
    again = dpo_hpc(tmp_path, "model-card", path.name)  # every completed run of the experiment, the same cards
    assert again.returncode == 0 and "5 of its 5 training run(s) completed" in again.stdout, again.stderr
    assert (run / "README.md").read_text() == card
    markdown = (out / "report.md").read_text()
    table = markdown.split("## dpo (dpo)")[1]
    assert "| beta | runs done |" in table and table.count("| 2/2 |") == 2 and " ± " in table  # 2 seeds each
    samples = (out / "samples.md").read_text()  # every run's last completions, run beside run, per prompt
    assert f"[report] sample generations, run beside run: {out / 'samples.md'}" in result.stdout
    dpo_part = samples.split("## dpo\n")[1]
    first_prompt = dpo_part.split("### prompt 1")[0]
    for row in rows:
        if row["stage"] == "dpo":
            run_dir = tmp_path / "out/rep/dpo" / row["run_id"]
            (last, *_), = [[json.loads(line) for line in p.read_text().splitlines()]
                           for p in sorted(run_dir.glob("samples/step_*.jsonl"))[-1:]]
            label = f"**beta={row['dpo_training.beta']} seed={row['dpo_training.seed']}** ({row['run_id']}, step 2)"
            assert label + "\n\n" + "\n".join("    " + x for x in last["completion"].split("\n")) in first_prompt
    assert "## sft\n" in samples
    pngs = sorted(out.glob("*.png"))
    assert any(p.name == "dpo_train_loss.png" for p in pngs)
    assert any(p.name.startswith("dpo_final_eval_rewards_accuracies_by_beta") for p in pngs)
    import matplotlib.image

    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(png).ndim == 3


def test_preflight_finds_what_would_fail_in_the_job_before_anything_is_queued(tmp_path, micro_model, reverse_data):
    text = f"""
[experiment]
name = "bad"
output_root = "out"
[slurm]
env = {{ HF_HUB_OFFLINE = "1" }}
[stages.typo]
trainer = "sft"
[stages.typo.config]
policy_name = "{micro_model}-typo"
dataset = {{ dataset_name = "{reverse_data}" }}
sft_training = {{ learning_rate = 1e-3, batch_size = 4 }}
[stages.hub]
trainer = "sft"
[stages.hub.config]
policy_name = "meta-llama/Llama-3.2-1B"
dataset = {{ dataset_name = "{tmp_path / 'missing.jsonl'}" }}
sft_training = {{ learning_rate = 1e-3, batch_size = 4 }}
[stages.format]
trainer = "dpo"
[stages.format.config]
policy_name = "{micro_model}"
dataset = {{ dataset_name = "{reverse_data}", format = "conversational" }}
dpo_training = {{ learning_rate = 1e-3, batch_size = 4 }}
[stages.format.slurm.container]
image = "{tmp_path / 'nope.sif'}"
[stages.split]
trainer = "sft"
[stages.split.config]
policy_name = "{tmp_path / 'failed_sft'}"
dataset = {{ dataset_name = "{reverse_data}", eval_subset = "test" }}
sft_training = {{ learning_rate = 1e-3, batch_size = 4 }}
[stages.mix]
trainer = "dpo"
[stages.mix.config]
policy_name = "{micro_model}"
dpo_training = {{ learning_rate = 1e-3, batch_size = 4 }}
[stages.mix.config.dataset]
dataset_name = "{reverse_data}"
mix = [{{ dataset_name = "{reverse_data}", columns = {{ prompt = "question" }} }}]
[stages.judged]
from = "mix"
evaluate = {{ reward_model = "rn" }}
[stages.shares]
trainer = "sft"
slurm = {{ ntasks_per_node = 4 }}
[stages.shares.config]
policy_name = "{micro_model}"
dataset = {{ dataset_name = "{reverse_data}" }}
sft_training = {{ learning_rate = 1e-3, batch_size = 2, global_batch_size = 6 }}
"""
    (tmp_path / "bad.toml").write_text(text)
    (tmp_path / "failed_sft").mkdir()
    (tmp_path / "failed_sft/run_manifest.json").write_text('{"trainer": "sft", "status": "failed"}')
    result = dpo_hpc(tmp_path, "submit", "bad.toml", "--dry-run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    expected = [f"policy_name '{micro_model}-typo': no such local folder",
                "policy_name 'meta-llama/Llama-3.2-1B' is not in the Hugging Face cache and the job runs with "
                "HF_HUB_OFFLINE=1; run `dpo-hpc prefetch EXPERIMENT` on a login node (or `hf download "
                "meta-llama/Llama-3.2-1B` with the jobs' HF_HOME)",
                f"local path '{tmp_path / 'missing.jsonl'}' does not exist",
                "none of the first 32 rows is usable (dropped: not_messages=32); expected format 'conversational'",
                f"stages.format.slurm.container.image: '{tmp_path / 'nope.sif'}' does not exist",
                f"policy_name '{tmp_path / 'failed_sft'}' is the directory of a sft run that has not finished",
                "is a single file, so its only split is 'train'; got eval_subset 'test'",
                "dataset.mix[0].columns.prompt = 'question', but there is no column 'question'",
                "stages.judged.evaluate.reward_model: 'rn' is neither a stage of this experiment",
                "sft_training.global_batch_size = 6 cannot be shared by 4 ranks; run on a number of ranks that divides "
                "it (the stage's nodes x ntasks_per_node)"]
    for fragment in expected:
        assert sum(fragment in line for line in errors) == 1, (fragment, errors)
    assert len(errors) == len(expected)
    submitted = dpo_hpc(tmp_path, "submit", "bad.toml", "--local")
    assert submitted.returncode == 2 and not (tmp_path / "out/bad/.submit/ledger.jsonl").exists()
    assert not (tmp_path / "out").exists()  # a failed pre-flight writes nothing
    (tmp_path / "out").write_text("a file where the output root should be")
    blocked = dpo_hpc(tmp_path, "submit", "bad.toml", "--dry-run", "--only", "typo")
    assert any("is a file, not a folder" in line for line in blocked.stderr.splitlines())


def test_validate_checks_the_data_and_model_of_a_trainer_config(tmp_path, micro_model):
    config = tmp_path / "c.yaml"
    config.write_text(f"policy_name: {micro_model}\ndataset: {{dataset_name: {tmp_path}/nope.jsonl}}\n"
                      f"dpo_training: {{learning_rate: 1.0e-6, batch_size: 2, save_dir: {tmp_path}/run}}\n")
    result = dpo_hpc(tmp_path, "validate", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert f"local path '{tmp_path}/nope.jsonl' does not exist" in line


def test_a_second_submission_of_the_same_experiment_is_refused_while_one_runs(tmp_path, micro_model, reverse_data):
    import os

    from dpo_hpc.filelock import FileLock

    path = experiment(tmp_path, micro_model, reverse_data, SFT, name="twice")
    lock = FileLock(tmp_path / "out/twice/.submit/submit.lock")  # what a running `submit` holds
    assert lock.try_acquire()
    try:
        second = dpo_hpc(tmp_path, "submit", path.name, "--local")
    finally:
        lock.release()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    (line,) = [x for x in second.stderr.strip().splitlines() if x.startswith("error:")]
    assert "is being submitted by" in line and f":{os.getpid()}" in line
    assert not (tmp_path / "out/twice/sft").exists()  # nothing ran
