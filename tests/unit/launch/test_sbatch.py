"""Every [slurm] key reaches what is submitted: the rendered sbatch script, or the array task's row."""

from __future__ import annotations

import json

from dpo_hpc.experiment import load_plan
from dpo_hpc.experiment.schema import SlurmConfig
from dpo_hpc.launch.sbatch import render_sbatch
from dpo_hpc.launch.submission import task_row

# key -> (TOML value, what must appear). A new [slurm] key fails this test until it is listed here.
EXPECTED = {
    "partition": ('"p-xyz"', "#SBATCH --partition=p-xyz"),
    "account": ('"acc-xyz"', "#SBATCH --account=acc-xyz"),
    "qos": ('"qos-xyz"', "#SBATCH --qos=qos-xyz"),
    "time": ('"01:07:00"', "#SBATCH --time=67"),
    "nodes": ("3", "#SBATCH --nodes=3"),
    "gpus_per_node": ("5", "#SBATCH --gpus-per-node=5"),
    "ntasks_per_node": ("7", "#SBATCH --ntasks-per-node=7"),
    "cpus_per_task": ("11", "#SBATCH --cpus-per-task=11"),
    "mem": ('"13G"', "#SBATCH --mem=13G"),
    "constraint": ('"c-xyz"', "#SBATCH --constraint=c-xyz"),
    "exclude": ('"node-17"', "#SBATCH --exclude=node-17"),
    "array_parallelism": ("19", "#SBATCH --array=0-39%19"),
    "signal_lead_s": ("23", "#SBATCH --signal=USR2@23"),
    "max_requeues": ("{ failure = 29 }", ("task", "max_requeues", {"preemption": 10, "time_limit": 10, "failure": 29})),
    "sbatch": ('{ mail-type = "END" }', "#SBATCH --mail-type=END"),
    "setup": ('["echo setup-xyz"]', "\necho setup-xyz\n"),
    "env": ('{ ENV_XYZ = "on" }', "\nexport ENV_XYZ=on\n"),
    "container": ('{ image = "/img/x.sif" }', " exec --nv --bind "),
}


def test_every_slurm_key_reaches_the_script_or_the_task(tmp_path):
    assert set(EXPECTED) == set(SlurmConfig.__pydantic_fields__)
    lines = "\n".join(f"{key} = {value}" for key, (value, _) in EXPECTED.items())
    (tmp_path / "exp.toml").write_text(f"""
[experiment]
name = "x"
[slurm]
{lines}
[stages.sft]
trainer = "sft"
config = {{ policy_name = "m", dataset = {{ dataset_name = "d" }}, sft_training = {{ learning_rate = 1.0, batch_size = 1 }} }}
""")
    plan = load_plan(tmp_path / "exp.toml")
    script = render_sbatch(plan, "sft", 40)
    row = task_row(plan, plan.runs[0])
    for key, (_, wanted) in EXPECTED.items():
        if isinstance(wanted, tuple):
            assert row[wanted[1]] == wanted[2], key
        else:
            assert wanted in script, f"{key}: {wanted!r} not in the script"
    assert "/img/x.sif python" in script
    json.dumps(row)  # the task row is plain data
