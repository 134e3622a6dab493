"""The HPC layer on a real Slurm cluster (hpc/slurm-up.sh: slurmctld, slurmd, slurmdbd, munge).

Each test submits a shrunk experiment with ``python -m dpo_hpc.submit`` exactly as a user does,
waits through ``dpo_hpc.status``, and checks what Slurm and the run directories recorded. In CI
(``DPO_HPC_REQUIRE_SLURM=1``, set by .ci/run) a missing cluster FAILS these tests; elsewhere it
skips them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from conftest import REPO
from dpo_hpc.checkpoint import layout

pytestmark = pytest.mark.slurm


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return result.returncode == 0 and any(s.strip() in ("idle", "mixed", "allocated") for s in result.stdout.split())


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    if not _cluster_up():
        message = "no Slurm cluster: run `bash hpc/slurm-up.sh` (as root) first"
        if os.environ.get("DPO_HPC_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)


def experiment(tmp_path: Path, model: Path, data: Path, stages: str, name: str = "exp") -> Path:
    text = f"""
[experiment]
name = "{name}"
output_root = "out"

[slurm]
time = "00:10:00"
cpus_per_task = 1
mem = "2G"
signal_lead_s = 30
""" + stages.replace("MODEL", str(model)).replace("DATA", str(data))
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


SFT = """
[stages.sft]
trainer = "sft"
[stages.sft.config]
policy_name = "MODEL"
dataset = { dataset_name = "DATA", val_ratio = 0.1, max_length = 96, max_prompt_length = 64 }
sft_training = { learning_rate = 1e-3, batch_size = 8, max_steps = 4, logging_steps = 1 }
"""

DPO = """
[stages.dpo]
trainer = "dpo"
from = "sft"
[stages.dpo.config]
dataset = { dataset_name = "DATA", val_ratio = 0.1, max_length = 96, max_prompt_length = 64 }
dpo_training = { learning_rate = 1e-4, batch_size = 4, max_steps = 3, logging_steps = 1 }
[stages.dpo.grid]
"dpo_training.beta" = [0.1, 0.3]
"""


PRECOMPUTED_DPO = DPO.replace("logging_steps = 1 }", "logging_steps = 1, precompute_ref_log_probs = true }")


def check_reference_pass(root: Path) -> None:
    """One reference pass made the table; both beta runs read it, started after it ended, and
    never ran the reference."""
    (pass_dir,) = (root / ".ref_passes").iterdir()
    made = manifest(pass_dir)
    assert made["status"] == "completed" and made["role"] == "reference" and made["ref_log_probs"] == "computed"
    readers = [manifest(d) for d in (root / "dpo").iterdir()]
    assert len(readers) == 2
    for m in readers:
        assert m["status"] == "completed" and m["ref_log_probs"] == "cache" and m["reference_forwards"] == 0
        assert when(m["first_start_time"]) >= when(made["end_time"])
    assert len([p for p in (root / ".ref_log_probs").iterdir() if p.is_dir()]) == 1


def submit(path: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dpo_hpc.submit", path.name, *args], cwd=path.parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def status(path: Path) -> dict[str, dict]:
    result = subprocess.run([sys.executable, "-m", "dpo_hpc.status", path.name, "--json"], cwd=path.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return {row["run_id"]: row for row in map(json.loads, result.stdout.splitlines())}


def wait_settled(path: Path, timeout: float = 600) -> dict[str, dict]:
    settled = ("done", "failed", "cancelled", "stopped")
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = status(path)
        if all(r["state"] in settled for r in rows.values()):
            return rows
        time.sleep(3)
    pytest.fail(f"runs did not settle in {timeout} s: {rows}")


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_manifest.json").read_text())


def when(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z")


def test_chain_runs_in_order_and_resubmission_is_idempotent(tmp_path, micro_model, reverse_data):
    path = experiment(tmp_path, micro_model, reverse_data, SFT + DPO)
    first = submit(path)
    assert "stage sft: 1 run(s) as Slurm job" in first.stdout
    assert "stage dpo: 2 run(s) as Slurm job" in first.stdout and "(afterok:" in first.stdout
    # Submitting again while queued or running duplicates nothing.
    again = submit(path)
    assert "nothing to submit" in again.stdout, again.stdout
    rows = wait_settled(path)
    assert {r["state"] for r in rows.values()} == {"done"}, rows
    root = tmp_path / "out/exp"
    (sft_dir,) = (root / "sft").iterdir()
    sft_end = when(manifest(sft_dir)["end_time"])
    for dpo_dir in (root / "dpo").iterdir():
        m = manifest(dpo_dir)
        assert m["status"] == "completed" and when(m["first_start_time"]) >= sft_end
        assert m["slurm"]["SLURM_ARRAY_JOB_ID"] and (dpo_dir / "model.safetensors").exists()
        assert json.loads((dpo_dir / "config.resolved.json").read_text())["policy_name"] == str(sft_dir)
        assert list((dpo_dir / "tensorboard").glob("events.out.tfevents.*"))
    ledger_lines = (root / ".submit/ledger.jsonl").read_text().splitlines()
    assert len(ledger_lines) == 3
    # And once everything is done, submitting again is a no-op too.
    assert "nothing to submit" in submit(path).stdout
    assert (root / ".submit/ledger.jsonl").read_text().splitlines() == ledger_lines


def test_reference_pass_runs_as_its_own_job_before_the_runs_that_read_it(tmp_path, micro_model, reverse_data):
    path = experiment(tmp_path, micro_model, reverse_data, SFT + PRECOMPUTED_DPO, name="refpass")
    out = submit(path, "--wait").stdout
    sft_job = out.split("stage sft: 1 run(s) as Slurm job ")[1].split()[0]
    pass_job = out.split("stage dpo: 1 reference pass(es) as Slurm job ")[1].split()[0]
    assert f"Slurm job {pass_job} (afterok:{sft_job})" in out, out
    assert "2 run(s) as Slurm job" in out and f"(afterok:{sft_job}:{pass_job})" in out, out
    rows = status(path)
    assert [r["state"] for r in rows.values()] == ["done"] * 4
    assert [r["role"] for r in rows.values()].count("reference") == 1
    check_reference_pass(tmp_path / "out/refpass")


def test_failed_parent_cancels_its_children(tmp_path, micro_model, reverse_data):
    path = experiment(tmp_path, micro_model, tmp_path / "missing.jsonl", SFT + DPO, name="broken")
    submit(path, "--no-preflight")  # the failure must happen in the job (the pre-flight would refuse it)
    rows = wait_settled(path)
    states = {r["stage"]: r["state"] for r in rows.values()}
    assert states == {"sft": "failed", "dpo": "cancelled"}, rows
    details = [r["detail"] for r in rows.values() if r["stage"] == "dpo"]
    assert all("parent" in d for d in details)
    # A resubmission retries the SFT and its children (still behind afterok); nothing is skipped.
    from dpo_hpc.experiment import load_plan
    from dpo_hpc.launch.jobs import plan_status
    from dpo_hpc.launch.submission import decide, ledger_of

    plan = load_plan(path)
    statuses = plan_status(plan, ledger_of(plan).latest())
    assert set(decide(plan, plan.runs, statuses).values()) == {"submit"}


def test_a_stage_sbatch_refuses_is_one_line_and_a_resubmission_sends_only_the_rest(tmp_path, micro_model,
                                                                                     reverse_data):
    refused = DPO + '[stages.dpo.slurm]\npartition = "no_such_partition"\n'
    path = experiment(tmp_path, micro_model, reverse_data, SFT + refused, name="refused")
    result = subprocess.run([sys.executable, "-m", "dpo_hpc.submit", path.name, "--no-preflight"], cwd=path.parent,
                            capture_output=True, text=True, timeout=300)
    try:
        assert result.returncode == 1, result.stdout + result.stderr
        assert "stage sft: 1 run(s) as Slurm job" in result.stdout
        (line,) = [l for l in result.stderr.splitlines() if l.startswith("error:")]
        assert "sbatch refused stage dpo:" in line and "invalid partition" in line.lower(), line
        assert "the 1 run(s) of the stages before it are queued" in line and "Traceback" not in result.stderr
        ledger = (tmp_path / "out/refused/.submit/ledger.jsonl").read_text().splitlines()
        assert [json.loads(l)["stage"] for l in ledger] == ["sft"]
        path.write_text(path.read_text().replace('partition = "no_such_partition"', ""))
        again = submit(path).stdout
        assert "stage sft: " not in again and "stage dpo: 2 run(s) as Slurm job" in again, again
    finally:
        jobs = {row["job"].split("_")[0] for row in status(path).values() if row["job"]}
        subprocess.run(["scancel", *jobs], check=False)


def test_stop_signal_checkpoints_requeues_and_resumes_exactly(tmp_path, micro_model, reverse_data):
    """USR2 (what --signal=USR2@LEAD sends before the time limit) mid-run: the task checkpoints,
    requeues itself, resumes, and ends with the same weights as an uninterrupted run."""
    # long enough that the signal lands mid-run on a loaded machine too (status polls take seconds)
    long_sft = SFT.replace("max_steps = 4, logging_steps = 1", "max_steps = 240, logging_steps = 1")
    path = experiment(tmp_path, micro_model, reverse_data, long_sft, name="preempt")
    submit(path)
    root = tmp_path / "out/preempt"
    deadline = time.time() + 180
    while time.time() < deadline:
        rows = status(path)
        (row,) = rows.values()
        if row["step"] is not None and row["step"] >= 5:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the run never got going: {rows}")
    subprocess.run(["scancel", "--signal=USR2", row["job"]], check=True)
    rows = wait_settled(path)
    (row,) = rows.values()
    assert (row["state"], row["requeues"]) == ("done", 1), rows
    (run_dir,) = (root / "sft").iterdir()
    m = manifest(run_dir)
    assert m["starts"] == 2 and m["final_step"] == 240
    requeue = json.loads((run_dir / "requeues.jsonl").read_text().splitlines()[0])
    assert 5 <= requeue["step"] < 240

    # The uninterrupted run of the same config, trained directly through the CLI.
    config = json.loads((run_dir / "config.resolved.json").read_text())
    trainer = config.pop("trainer")
    config["sft_training"]["save_dir"] = str(tmp_path / "uninterrupted")
    (tmp_path / "straight.json").write_text(json.dumps(config))
    straight_run = subprocess.run([sys.executable, "-m", "dpo_hpc", "train", trainer, "--config", str(tmp_path / "straight.json")],
                                  capture_output=True, text=True, timeout=600)
    assert straight_run.returncode == 0, straight_run.stderr[-3000:]
    from safetensors.torch import load_file

    resumed, straight = load_file(run_dir / "model.safetensors"), load_file(tmp_path / "uninterrupted/model.safetensors")
    assert resumed.keys() == straight.keys()
    for name in resumed:
        assert torch.equal(resumed[name], straight[name]), name


def wait_for(path: Path, ready, what: str, timeout: float = 180) -> dict:
    """The status row once ``ready(row)`` holds for the experiment's one run."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        (row,) = status(path).values()
        if ready(row):
            return row
        time.sleep(0.5)
    pytest.fail(f"{what}: {row}")


def test_requeues_stop_at_their_cap_and_a_resubmission_starts_counting_again(tmp_path, micro_model, reverse_data):
    """max_requeues = { preemption = 1 }: the first USR2 requeues, the second stops the run with
    its reason; a resubmission is a new job (its first USR2 requeues again), and a plain scancel
    (SIGTERM, which submitit would otherwise ignore; sent by ``dpo_hpc.cancel``) checkpoints and
    stops at once."""
    long_sft = SFT.replace("max_steps = 4, logging_steps = 1", "max_steps = 100000, logging_steps = 1")
    path = experiment(tmp_path, micro_model, reverse_data, long_sft, name="caps")
    path.write_text(path.read_text().replace("signal_lead_s = 30", "signal_lead_s = 30\nmax_requeues = { preemption = 1 }"))
    seen = 0  # the step reached so far: a new attempt is training once its steps pass it

    def stopped_at() -> int:  # the step of the last requeue: the attempt that requeued never passes it
        found = list((tmp_path / "out/caps/sft").glob("*/requeues.jsonl"))
        return json.loads(found[0].read_text().splitlines()[-1])["step"] if found else 0

    def training_past(step: int, requeues: int):
        # An attempt that has asked for its requeue still shows as running with the new count, so a
        # new attempt is one past the step the last requeue stopped at (on a fast machine the old
        # one trains many steps between the signal and its checkpoint).
        return wait_for(path, lambda r: r["state"] == "running" and r["requeues"] == requeues
                        and (r["step"] or 0) > max(step, stopped_at() if requeues else 0) + 5,
                        f"not training past step {step} with {requeues} requeue(s)")

    for job_round in (1, 2):
        submit(path)
        row = training_past(seen, requeues=0)
        job, seen = row["job"], row["step"]
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        row = training_past(seen, requeues=1)  # requeued, resumed, training again in the same job
        assert row["job"] == job
        seen = row["step"]
        if job_round == 1:
            subprocess.run(["scancel", "--signal=USR2", job], check=True)
            row = wait_for(path, lambda r: r["state"] == "stopped", "the second USR2 did not stop the run")
            assert row["detail"].startswith("stopped: preemption cap 1 reached; checkpoint kept, resubmit to resume"), row
            seen = row["step"]
    (run_dir,) = (tmp_path / "out/caps/sft").iterdir()
    assert [e["cause"] for e in map(json.loads, (run_dir / "requeues.jsonl").read_text().splitlines())] == \
        ["preemption", "preemption"]
    cancel = [sys.executable, "-m", "dpo_hpc.cancel", path.name]  # scancel on the experiment's own jobs
    dry = subprocess.run([*cancel, "--dry-run"], cwd=path.parent, capture_output=True, text=True, timeout=60)
    assert f"{run_dir.name}: Slurm job {job} (running) would be cancelled" in dry.stdout, dry.stdout + dry.stderr
    started = time.time()
    done = subprocess.run(cancel, cwd=path.parent, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "[cancel] 1 run(s) cancelled" in done.stdout, done.stdout + done.stderr
    row = wait_for(path, lambda r: r["state"] == "stopped", "scancel did not stop the run", timeout=60)
    assert time.time() - started < 30 and "stopped by SIGTERM" in row["detail"], row
    m = manifest(run_dir)
    assert m["status"] == "interrupted" and m["reason"] == "SIGTERM" and Path(m["checkpoint"]).is_dir()


TWO_NODES = """
[stages.dpo]
trainer = "dpo"
[stages.dpo.slurm]
partition = "two"
nodes = 2
ntasks_per_node = 1
[stages.dpo.config]
policy_name = "MODEL"
dataset = { dataset_name = "DATA", val_ratio = 0.1, max_length = 96, max_prompt_length = 64 }
dpo_training = { learning_rate = 1e-3, batch_size = 2, max_steps = 90, save_steps = 30, logging_steps = 1 }
deepspeed = { zero_stage = 3 }
"""


def two_nodes_or_skip() -> None:
    """The namespace nodes of hpc/slurm-up.sh, or a skip that says why they are not there."""
    status = Path("/run/dpo-hpc-two-nodes.status")
    said = status.read_text().strip() if status.exists() else "hpc/slurm-up.sh has not run"
    found = subprocess.run(["sinfo", "-h", "-p", "two", "-o", "%D %T"], capture_output=True, text=True, timeout=30)
    if not found.stdout.startswith("2 "):
        pytest.skip(f"no two-node partition: {said}")


def test_two_nodes_train_zero3_across_a_network_and_resume_bit_identical(tmp_path, micro_model, reverse_data):
    """Two slurmd in their own network namespaces (hpc/slurm-up.sh): one rank per node, ZeRO-3
    over gloo, MASTER_ADDR from the node list; a USR2 to both nodes mid-run checkpoints, requeues
    and resumes to the weights of an uninterrupted two-node run."""
    two_nodes_or_skip()
    from safetensors.torch import load_file

    runs = {}
    for name, preempt in (("straight", False), ("preempted", True)):
        path = experiment(tmp_path, micro_model, reverse_data, TWO_NODES, name=name)
        submit(path)
        if preempt:
            row = wait_for(path, lambda r: r["state"] == "running" and (r["step"] or 0) >= 10, "the run never got going",
                           timeout=240)
            subprocess.run(["scancel", "--signal=USR2", row["job"]], check=True)
        rows = wait_settled(path)
        (row,) = rows.values()
        assert row["state"] == "done", rows
        (run_dir,) = (tmp_path / f"out/{name}/dpo").iterdir()
        runs[name] = run_dir
        m = manifest(run_dir)
        assert m["world_size"] == 2 and m["slurm"]["SLURM_JOB_NODELIST"] == "dpo-n[1-2]"
    assert manifest(runs["preempted"])["starts"] == 2 and row["requeues"] == 1
    straight, resumed = (load_file(runs[k] / "model.safetensors") for k in ("straight", "preempted"))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


TWO_RANKS = """
[stages.sft]
trainer = "sft"
[stages.sft.slurm]
ntasks_per_node = 2
[stages.sft.config]
policy_name = "MODEL"
dataset = { dataset_name = "DATA", val_ratio = 0.1, max_length = 96, max_prompt_length = 64 }
sft_training = { learning_rate = 1e-3, batch_size = 4, max_steps = 3, logging_steps = 1 }
deepspeed = { zero_stage = 2 }

[stages.dyn]
trainer = "dynamic_beta_dpo"
from = "sft"
[stages.dyn.slurm]
ntasks_per_node = 2
[stages.dyn.config]
dataset = { dataset_name = "DATA", val_ratio = 0.1, max_length = 96, max_prompt_length = 64 }
dpo_training = { learning_rate = 1e-4, batch_size = 2, max_steps = 5, save_steps = 4, logging_steps = 1 }
risk_test = { beta_warmup = 2 }
beta_update = { alpha = 0.5 }
deepspeed = { zero_stage = 3 }

[stages.pairs]
from = "sft"
generate = { prompts = "PROMPTS", reward_model = "RM", samples = 2, max_new_tokens = 4, batch_size = 3, limit = 10 }
[stages.pairs.slurm]
ntasks_per_node = 2
"""


def test_two_ranks_under_srun_in_one_array_task(tmp_path, micro_model, reverse_data, reward_model):
    """ntasks_per_node = 2: srun starts two ranks in the array task; they train together over gloo
    (ZeRO-2, then ZeRO-3) and hold the same dynamic beta and tau; two ranks of a generate stage
    share its chunks and write the pairs that one process writes."""
    stages = TWO_RANKS.replace("PROMPTS", str(reverse_data.parent / "test.jsonl")).replace("RM", str(reward_model))
    path = experiment(tmp_path, micro_model, reverse_data, stages, name="ranks")
    submit(path)
    rows = wait_settled(path)
    assert {r["state"] for r in rows.values()} == {"done"}, rows
    (pairs_job,) = [r["job"] for r in rows.values() if r["stage"] == "pairs"]
    check_pairs_of_two_ranks(tmp_path / "out/ranks", pairs_job, reverse_data, reward_model)
    for stage in ("sft", "dyn"):
        (run_dir,) = (tmp_path / "out/ranks" / stage).iterdir()
        m = manifest(run_dir)
        assert m["world_size"] == 2 and m["status"] == "completed" and m["slurm"]["SLURM_JOB_ID"]
    ckpt = run_dir / "checkpoints" / layout.step_dir_name(4)
    assert ckpt.is_dir()
    states = [torch.load(ckpt / layout.rank_file(r), weights_only=True)["objective"]["dynamic_beta"] for r in (0, 1)]
    assert states[0]["warmup_done"] and states[0]["beta"] != 0.1  # beta moved after the warmup
    assert (states[0]["beta"], states[0]["tau"]) == (states[1]["beta"], states[1]["tau"])


def check_pairs_of_two_ranks(root: Path, job: str, reverse_data: Path, reward_model: Path) -> None:
    """Both ranks of the generate task ran, and the pairs they drew equal one process's at one
    thread (each rank's, cpus_per_task)."""
    from dpo_hpc.experiment.schema import GenerationSection
    from dpo_hpc.pairs import make_pairs

    assert all((root / ".submit/logs" / job / f"{job}_{rank}_log.err").exists() for rank in (0, 1))
    (sft_dir,), (pairs_dir,) = (root / "sft").iterdir(), (root / "pairs").iterdir()
    settings = GenerationSection(prompts=str(reverse_data.parent / "test.jsonl"), reward_model=str(reward_model),
                                 samples=2, max_new_tokens=4, batch_size=3, limit=10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_pairs(str(sft_dir), settings, root / "alone", say=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    for name in ("pairs.jsonl", "samples.jsonl"):
        assert (pairs_dir / name).read_bytes() == (root / "alone" / name).read_bytes(), name


SHAPED = """
[stages.dpo]
trainer = "dpo"
[stages.dpo.slurm]
ntasks_per_node = 2
max_requeues = { preemption = 0 }
[stages.dpo.config]
policy_name = "MODEL"
dataset = { dataset_name = "DATA", val_ratio = 0.1, max_length = 96, max_prompt_length = 64 }
deepspeed = { zero_stage = 2 }
[stages.dpo.config.dpo_training]
learning_rate = 1e-3
batch_size = 2
global_batch_size = 4
max_steps = 160
logging_steps = 1
"""


def test_a_stage_given_fewer_ranks_resumes_its_run_on_them(tmp_path, micro_model, reverse_data):
    """global_batch_size: a run stopped on 2 ranks, resubmitted with ntasks_per_node = 1, is the same
    run (same id); its task converts the ZeRO-2 checkpoint and trains on with twice the accumulation."""
    path = experiment(tmp_path, micro_model, reverse_data, SHAPED, name="shape")
    submit(path)
    row = wait_for(path, lambda r: r["state"] == "running" and (r["step"] or 0) >= 3, "not training on 2 ranks")
    subprocess.run(["scancel", "--signal=USR2", row["job"]], check=True)
    row = wait_for(path, lambda r: r["state"] == "stopped", "the USR2 did not stop the run")
    (run_dir,) = (tmp_path / "out/shape/dpo").iterdir()
    stopped = manifest(run_dir)["step"]
    assert manifest(run_dir)["world_size"] == 2 and 3 <= stopped < 160
    assert (run_dir / "checkpoints" / layout.step_dir_name(stopped) / "engine" /
            "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    path.write_text(path.read_text().replace("ntasks_per_node = 2", "ntasks_per_node = 1"))
    submit(path)
    rows = wait_settled(path)
    assert [r["state"] for r in rows.values()] == ["done"], rows
    assert [p.name for p in (tmp_path / "out/shape/dpo").iterdir()] == [run_dir.name]  # the same run
    m = manifest(run_dir)
    assert m["status"] == "completed" and m["world_size"] == 1 and m["starts"] == 2 and m["final_step"] == 160
    log = "\n".join(p.read_text() for p in (tmp_path / "out/shape/.submit").rglob("*.out"))
    assert f"checkpoint {layout.step_dir_name(stopped)} was written with world size 2, this run has 1" in log
    assert f"at step {stopped}/160" in log


def test_train_sbatch_template_runs_one_trainer(tmp_path, micro_model, reverse_data):
    """hpc/train.sbatch: a single trainer config as a plain sbatch job (srun, USR2 handling)."""
    config = {"policy_name": str(micro_model), "precision": "fp32",
              "dataset": {"dataset_name": str(reverse_data), "val_ratio": 0.1, "max_length": 96, "max_prompt_length": 64},
              "sft_training": {"learning_rate": 1e-3, "batch_size": 8, "max_steps": 3, "save_dir": str(tmp_path / "run")}}
    (tmp_path / "sft.json").write_text(json.dumps(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["sbatch", "--wait", "--parsable", "--cpus-per-task=1", "--time=5",
                             str(REPO / "hpc/train.sbatch"), "sft", "sft.json"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert result.returncode == 0, result.stderr + log
    assert manifest(tmp_path / "run")["status"] == "completed" and manifest(tmp_path / "run")["slurm"]["SLURM_JOB_ID"]
    assert "[train.sbatch] job" in log


FLAKY_TRAINER = """
import os, sys
from dpo_hpc.trainers.trainer import Trainer

real_step = Trainer.train_step


def flaky_step(self, step):  # the first attempt meets a network fault at step 3
    if step == 2 and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
        raise RuntimeError("NCCL error: unhandled system error (injected by the test)")
    return real_step(self, step)


Trainer.train_step = flaky_step
from dpo_hpc.cli import main
sys.exit(main(["train", "sft", "--config", "sft.json"]))
"""


def test_an_unexpected_failure_requeues_and_resumes_from_the_last_checkpoint(tmp_path, micro_model, reverse_data):
    config = {"policy_name": str(micro_model), "precision": "fp32",
              "dataset": {"dataset_name": str(reverse_data), "val_ratio": 0.1, "max_length": 96, "max_prompt_length": 64},
              "sft_training": {"learning_rate": 1e-3, "batch_size": 8, "max_steps": 5, "save_steps": 2,
                               "save_dir": str(tmp_path / "run")}}
    (tmp_path / "sft.json").write_text(json.dumps(config))
    (tmp_path / "flaky.py").write_text(FLAKY_TRAINER)
    result = subprocess.run(["sbatch", "--parsable", "--requeue", "--cpus-per-task=1", "--time=5", "--output=flaky-%j.out",
                             "--open-mode=append", f"--wrap={sys.executable} flaky.py"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    deadline = time.time() + 240
    while time.time() < deadline and not (tmp_path / "run/model.safetensors").exists():
        time.sleep(1)
    log = "\n".join(p.read_text() for p in tmp_path.glob("flaky-*.out"))
    m = manifest(tmp_path / "run")
    assert m["status"] == "completed" and m["starts"] == 2, log[-3000:]
    (requeued,) = map(json.loads, (tmp_path / "run/requeues.jsonl").read_text().splitlines())
    assert (requeued["cause"], requeued["step"], requeued["job_id"]) == ("failure", 2, result.stdout.strip())
    assert "failed (RuntimeError: NCCL error: unhandled system error (injected by the test)); requeued" in log
    assert "resumed from" in log and "at step 2/5" in log


def test_without_a_signal_the_job_end_time_still_checkpoints_and_requeues_in_time(tmp_path, micro_model, reverse_data):
    """A plain sbatch job with no --signal (as if the signal were lost): the run reads its end
    time from Slurm and stops with a checkpoint the signal lead (40 s) before it, then requeues."""
    config = {"policy_name": str(micro_model), "precision": "fp32",
              "dataset": {"dataset_name": str(reverse_data), "val_ratio": 0.1, "max_length": 96, "max_prompt_length": 64},
              "sft_training": {"learning_rate": 1e-3, "batch_size": 8, "max_steps": 10**6, "logging_steps": 50,
                               "save_dir": str(tmp_path / "run")}}
    (tmp_path / "sft.json").write_text(json.dumps(config))
    env = {**os.environ, "DPO_HPC_SIGNAL_LEAD_S": "40"}
    result = subprocess.run(["sbatch", "--parsable", "--requeue", "--cpus-per-task=1", "--time=1", "--output=run-%j.out",
                             "--open-mode=append", f"--wrap={sys.executable} -m dpo_hpc train sft --config sft.json"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip()

    def job_log() -> str:
        return "\n".join(p.read_text() for p in tmp_path.glob("run-*.out"))

    try:
        deadline = time.time() + 150  # the record, then the job's last line (printed before scontrol requeue)
        while time.time() < deadline and not ((tmp_path / "run/requeues.jsonl").exists()
                                              and "(time limit); " in job_log()):
            time.sleep(1)
        log = job_log()
        assert (tmp_path / "run/requeues.jsonl").exists(), log[-3000:]
    finally:
        subprocess.run(["scancel", job], check=False)
    (requeued,) = map(json.loads, (tmp_path / "run/requeues.jsonl").read_text().splitlines())
    assert requeued["cause"] == "time_limit" and requeued["step"] > 0
    assert f"deadline: checkpoint {tmp_path / 'run/checkpoints'}" in log and "(time limit); requeued" in log
    ran = when(requeued["time"]) - when(manifest(tmp_path / "run")["first_start_time"])
    assert 5 <= ran.total_seconds() <= 40, ran  # well before the 60 s limit: the lead was kept


def test_zip_pairing_waits_for_the_corresponding_task_only(tmp_path, micro_model, reverse_data):
    stages = SFT + '[stages.sft.grid]\n"sft_training.seed" = [1, 2]\n' + \
        DPO.replace('from = "sft"', 'from = "sft"\npairing = "zip"').replace('"dpo_training.beta" = [0.1, 0.3]',
                                                                              '"dpo_training.seed" = [1, 2]')
    path = experiment(tmp_path, micro_model, reverse_data, stages, name="zip")
    out = submit(path, "--wait").stdout  # --wait: returns once every run settled, 0 if all are done
    sft_array = out.split("stage sft: 2 run(s) as Slurm job ")[1].split()[0]
    assert f"(aftercorr:{sft_array})" in out, out
    assert "4 done; TensorBoard" in out
    assert {r["state"] for r in status(path).values()} == {"done"}
