"""Experiment files: strict loading, the pure expansion (grids, references between stages,
stable ids, errors), and the dry run's sbatch scripts and manifest against golden files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXPERIMENT_BASE as BASE, EXPERIMENT_DPO as DPO, REPO
from dpo_hpc.config import ConfigError
from dpo_hpc.experiment import load_plan, time_to_minutes
from dpo_hpc.launch.submission import _dependency, write_plan_files

GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = ["tiny", "hh_llama3_1b", "chat", "ultrafeedback_qwen"]

def plan_of(tmp_path, text, name="exp.toml"):
    path = tmp_path / name
    path.write_text(text)
    return load_plan(path)


def errors_of(tmp_path, text):
    with pytest.raises(ConfigError) as info:
        plan_of(tmp_path, text)
    return "\n".join(info.value.problems)


def test_grid_is_a_cartesian_product_crossed_with_parents(tmp_path):
    text = BASE + '[stages.sft.grid]\n"sft_training.learning_rate" = [1e-3, 2e-3]\n' + DPO + \
        '[stages.dpo.grid]\n"dpo_training.beta" = [0.1, 0.2, 0.3]\n"dpo_training.learning_rate" = [1e-6, 5e-7]\n'
    plan = plan_of(tmp_path, text)
    sft, dpo = plan.stage_runs("sft"), plan.stage_runs("dpo")
    assert len(sft) == 2 and len(dpo) == 2 * 3 * 2
    assert [r.index for r in dpo] == list(range(12))
    assert {(r.parent, r.grid_values["dpo_training.beta"], r.grid_values["dpo_training.learning_rate"]) for r in dpo} \
        == {(s.run_id, b, lr) for s in sft for b in (0.1, 0.2, 0.3) for lr in (1e-6, 5e-7)}
    for run in dpo:
        parent = plan.run(run.parent)
        assert run.config["policy_name"] == run.config["ref_name"] == str(parent.run_dir)
        assert run.config["dpo_training"]["beta"] == run.grid_values["dpo_training.beta"]
        assert run.config["dpo_training"]["save_dir"] == str(run.run_dir) == str(tmp_path / "out/exp/dpo" / run.run_id)
    assert len({r.run_id for r in plan.runs}) == len(plan.runs)


VARIANTS = """[stages.dpo.variants.dpo]
"dpo_training.beta" = 0.1
[stages.dpo.variants.simpo]
dpo_training = { loss_type = "simpo", beta = 2.0, simpo_gamma = 0.8 }
[stages.dpo.grid]
"dpo_training.seed" = [1, 2]
"""


def test_variants_keep_their_settings_together_and_cross_the_grid(tmp_path):
    """A loss with its own beta and option, which a cartesian grid over loss_type could not hold
    (simpo_gamma is refused with sigmoid); the variant's name is a grid value."""
    plan = plan_of(tmp_path, BASE + DPO + VARIANTS)
    dpo = plan.stage_runs("dpo")
    assert [r.grid_values for r in dpo] == [{"variant": v, "dpo_training.seed": s}
                                            for v in ("dpo", "simpo") for s in (1, 2)]
    for run in dpo:
        training = run.config["dpo_training"]
        expected = {"dpo": ("sigmoid", 0.1, 0.5), "simpo": ("simpo", 2.0, 0.8)}[run.grid_values["variant"]]
        assert (training["loss_type"], training["beta"], training["simpo_gamma"]) == expected
        assert training["run_name"] == f"{run.run_id} variant={run.grid_values['variant']} " \
                                       f"seed={run.grid_values['dpo_training.seed']}"
    assert len({r.run_id for r in dpo}) == 4
    renamed = plan_of(tmp_path, BASE + DPO + VARIANTS.replace("variants.dpo]", "variants.sigmoid]"))
    assert [r.run_id for r in renamed.stage_runs("dpo")] == [r.run_id for r in dpo]  # a name is not a setting


@pytest.mark.parametrize("variants, message", [
    ('[stages.dpo.variants.a]\n"dpo_training.seed" = 3\n[stages.dpo.grid]\n"dpo_training.seed" = [1]\n',
     "variant 'a' sets dpo_training.seed, which the grid varies"),
    ("[stages.dpo.variants.a]\n", "variant 'a' sets nothing"),
    ('[stages.dpo.variants."a b"]\n"dpo_training.beta" = 0.2\n', "variant name 'a b' must be"),
    ('[stages.dpo.variants.a]\n"dpo_training.simpo_gamma" = 0.3\n', "simpo_gamma applies to loss_type simpo"),
    ('[stages.dpo.variants.a]\n"dpo_training.beta" = 0.2\n[stages.dpo.variants.b]\n"dpo_training.beta" = 0.2\n',
     "duplicates another run of stage 'dpo'"),
])
def test_variants_that_cannot_be_are_refused(tmp_path, variants, message):
    assert message in errors_of(tmp_path, BASE + DPO + variants)


def test_an_inline_or_grid_save_dir_is_refused_not_silently_replaced(tmp_path):
    inline = BASE.replace("batch_size = 4 }", 'batch_size = 4, save_dir = "mine" }')
    assert "stages.sft.config.sft_training.save_dir: each run of an experiment writes its own" in errors_of(tmp_path, inline)
    grid = BASE + '[stages.sft.grid]\n"sft_training.save_dir" = ["a", "b"]\n'
    assert "remove save_dir here" in errors_of(tmp_path, grid)


def test_trackers_name_each_run_by_its_id_and_grid_values(tmp_path):
    text = BASE + DPO + '[stages.dpo.grid]\n"dpo_training.beta" = [0.1, 0.2]\n'
    plan = plan_of(tmp_path, text)
    assert [r.config["dpo_training"]["run_name"] for r in plan.stage_runs("dpo")] == \
        [f"{r.run_id} beta={b}" for r, b in zip(plan.stage_runs("dpo"), (0.1, 0.2))]
    assert plan.stage_runs("sft")[0].config["sft_training"]["run_name"] == plan.stage_runs("sft")[0].run_id
    named = plan_of(tmp_path, text.replace("batch_size = 2 }", 'batch_size = 2, run_name = "sweep" }'))
    assert named.stage_runs("dpo")[0].config["dpo_training"]["run_name"] == "sweep beta=0.1"
    assert [r.run_id for r in named.runs] == [r.run_id for r in plan.runs]  # a name is not part of the identity


def test_run_ids_are_stable_and_follow_the_config(tmp_path):
    text = BASE + DPO
    first = [r.run_id for r in plan_of(tmp_path, text).runs]
    assert first == [r.run_id for r in plan_of(tmp_path, text).runs]
    assert first[0].startswith("sft-") and first[1].startswith("dpo-")
    changed = [r.run_id for r in plan_of(tmp_path, text.replace("1e-3", "3e-3")).runs]
    assert changed[0] != first[0] and changed[1] != first[1]  # a new SFT model is a new parent
    moved = plan_of(tmp_path, text.replace('output_root = "out"', 'output_root = "elsewhere"'))
    assert [r.run_id for r in moved.runs] == first  # ids do not depend on where runs live
    # A value spelled out at its default is the same run: ids hash only non-default values, so a
    # later version that adds a key (with a default) keeps every existing id.
    explicit = text.replace("batch_size = 2 }", "batch_size = 2, weight_decay = 0.0, lr_scheduler = \"linear\" }")
    assert [r.run_id for r in plan_of(tmp_path, explicit).runs] == first


def test_a_run_keeps_its_id_on_another_number_of_ranks(tmp_path):
    """The Slurm shape is not part of a run: with global_batch_size, the run is the same on any
    number of ranks, so a stage moved to another shape resumes its runs."""
    text = BASE + DPO.replace("batch_size = 2 }", "batch_size = 2, global_batch_size = 8 }")
    first = [r.run_id for r in plan_of(tmp_path, text).runs]
    wider = plan_of(tmp_path, text + "[stages.dpo.slurm]\nnodes = 2\nntasks_per_node = 2\n")
    assert [r.run_id for r in wider.runs] == first


def test_precomputed_reference_runs_share_one_cache_outside_their_identity(tmp_path):
    text = BASE + DPO.replace("batch_size = 2 }", "batch_size = 2, precompute_ref_log_probs = true }") + \
        '[stages.dpo.grid]\n"dpo_training.beta" = [0.1, 0.2]\n'
    plan = plan_of(tmp_path, text)
    caches = {r.config["dpo_training"]["ref_log_probs_cache"] for r in plan.runs if r.stage == "dpo"}
    assert caches == {str(plan.root / ".ref_log_probs")}
    moved = plan_of(tmp_path, text.replace('output_root = "out"', 'output_root = "elsewhere"'))
    assert [r.run_id for r in moved.runs] == [r.run_id for r in plan.runs]


PRECOMPUTED = BASE + '[stages.sft.grid]\n"sft_training.seed" = [1, 2]\n' + \
    DPO.replace("batch_size = 2 }", "batch_size = 2, precompute_ref_log_probs = true }") + \
    '[stages.dpo.grid]\n"dpo_training.beta" = [0.1, 0.2, 0.3]\n'


def test_runs_that_read_one_reference_table_wait_for_one_reference_pass(tmp_path):
    plan = plan_of(tmp_path, PRECOMPUTED)
    passes, runs = plan.stage_runs("dpo", "reference"), plan.stage_runs("dpo")
    assert plan.arrays() == [("sft", "train"), ("dpo", "reference"), ("dpo", "train")]
    # one pass per reference (each SFT model), before the 3 beta runs that read its table
    assert len(passes) == 2 and [p.index for p in passes] == [0, 1] and len(runs) == 6
    for ref_pass in passes:
        readers = [r for r in runs if r.ref_pass == ref_pass.run_id]
        assert len(readers) == 3 and {r.parent for r in readers} == {ref_pass.parent}
        assert ref_pass.waits_for == [ref_pass.parent] and readers[0].waits_for == [ref_pass.parent, ref_pass.run_id]
        assert ref_pass.run_dir == plan.root / ".ref_passes" / ref_pass.run_id
        cfg = ref_pass.config["dpo_training"]
        assert cfg["save_dir"] == str(ref_pass.run_dir) and cfg["ref_log_probs_cache"] == str(plan.root / ".ref_log_probs")
        assert ref_pass.config["ref_name"] == readers[0].config["ref_name"]
    assert [r.run_id for r in plan.runs].index(passes[0].run_id) < [r.run_id for r in plan.runs].index(runs[0].run_id)
    moved = plan_of(tmp_path, PRECOMPUTED.replace('output_root = "out"', 'output_root = "elsewhere"'))
    assert [r.run_id for r in moved.runs] == [r.run_id for r in plan.runs]


def test_a_lone_run_or_another_dataset_gets_its_own_table(tmp_path):
    lone = PRECOMPUTED.replace("[0.1, 0.2, 0.3]", "[0.1]")
    assert not plan_of(tmp_path, lone).stage_runs("dpo", "reference")  # it computes its own
    online = plan_of(tmp_path, PRECOMPUTED.replace(", precompute_ref_log_probs = true", ""))
    assert not online.stage_runs("dpo", "reference") and all(r.ref_pass is None for r in online.runs)
    two_data = PRECOMPUTED + '"dataset.max_length" = [384, 512]\n'
    assert len(plan_of(tmp_path, two_data).stage_runs("dpo", "reference")) == 2 * 2  # per SFT model x data


def test_ld_dpo_runs_share_a_pass_per_ld_alpha(tmp_path):
    """LD-DPO's ld_alpha weighs the table's sums: a grid over it makes a pass per value (and per SFT
    model), and runs without it keep theirs."""
    grid = PRECOMPUTED.replace('"dpo_training.beta" = [0.1, 0.2, 0.3]',
                               '"dpo_training.beta" = [0.1, 0.2]\n"dpo_training.ld_alpha" = [0.5, 1.0]')
    plan = plan_of(tmp_path, grid)
    passes = plan.stage_runs("dpo", "reference")
    assert len(passes) == 2 * 2
    for ref_pass in passes:
        readers = [r for r in plan.stage_runs("dpo") if r.ref_pass == ref_pass.run_id]
        assert len(readers) == 2 and {r.config["dpo_training"]["ld_alpha"] for r in readers} == \
            {ref_pass.config["dpo_training"]["ld_alpha"]}
    plain = {p.run_id for p in plan_of(tmp_path, PRECOMPUTED).stage_runs("dpo", "reference")}
    assert plain.isdisjoint(p.run_id for p in passes) and len(plain) == 2


def test_kto_runs_share_a_pass_per_pairing_of_their_kl_completions(tmp_path):
    """KTO's table holds its KL completions' log-probs, paired by seed and micro-batch: a grid over
    beta and loss_type shares a pass; one over seed or batch_size makes a pass per value."""
    kto = ('[stages.kto]\ntrainer = "kto"\nfrom = "sft"\n[stages.kto.config]\ndataset = { dataset_name = "data.jsonl" }\n'
           'kto_training = { learning_rate = 1e-6, batch_size = 2, precompute_ref_log_probs = true }\n'
           '[stages.kto.grid]\n"kto_training.beta" = [0.1, 0.2]\n"kto_training.loss_type" = ["kto", "apo_zero_unpaired"]\n')
    plan = plan_of(tmp_path, BASE + kto)
    passes = plan.stage_runs("kto", "reference")
    assert len(passes) == 1 and all(r.ref_pass == passes[0].run_id for r in plan.stage_runs("kto"))
    assert passes[0].config["kto_training"]["save_dir"] == str(passes[0].run_dir)
    seeds = plan_of(tmp_path, BASE + kto + '"kto_training.seed" = [1, 2]\n')
    assert len(seeds.stage_runs("kto", "reference")) == 2
    batches = plan_of(tmp_path, BASE + kto + '"kto_training.batch_size" = [2, 4]\n')
    assert len(batches.stage_runs("kto", "reference")) == 2


def test_a_reference_free_loss_waits_for_no_reference_pass(tmp_path):
    """A grid over loss_type with simpo in it: the simpo runs read no table, so only the others
    share the pass (a lone reader then computes its own)."""
    grid = PRECOMPUTED.replace('"dpo_training.beta" = [0.1, 0.2, 0.3]', '"dpo_training.loss_type" = ["sigmoid", "ipo", "simpo"]')
    plan = plan_of(tmp_path, grid)
    simpo = [r for r in plan.stage_runs("dpo") if r.config["dpo_training"]["loss_type"] == "simpo"]
    assert len(simpo) == 2 and all(r.ref_pass is None and len(r.waits_for) == 1 for r in simpo)
    assert len(plan.stage_runs("dpo", "reference")) == 2  # per SFT model, for sigmoid and ipo


def test_stages_with_the_same_reference_and_data_share_one_reference_pass(tmp_path):
    """A sweep split over stages (DPO, then Beta-DPO, from one SFT model) makes one reference pass
    per SFT model: it belongs to the first stage, the later stage's array waits for it."""
    beta = DPO.replace("stages.dpo", "stages.bdpo").replace('"dpo"', '"beta_dpo"') \
        .replace("batch_size = 2 }", "batch_size = 2, precompute_ref_log_probs = true }")
    plan = plan_of(tmp_path, PRECOMPUTED + beta)
    passes = [r for r in plan.runs if r.role == "reference"]
    assert len(passes) == 2 and {p.stage for p in passes} == {"dpo"} and not plan.stage_runs("bdpo", "reference")
    for ref_pass in passes:
        readers = [r for r in plan.runs if r.ref_pass == ref_pass.run_id]
        assert [r.stage for r in readers] == ["dpo"] * 3 + ["bdpo"] and {r.parent for r in readers} == {ref_pass.parent}
    lone = plan_of(tmp_path, PRECOMPUTED.replace("[0.1, 0.2, 0.3]", "[0.1]") + beta)  # one run in each stage
    assert [(p.stage, p.index) for p in lone.runs if p.role == "reference"] == [("dpo", 0), ("dpo", 1)]
    script = (write_plan_files(plan, tmp_path / "dry") / "sbatch" / "bdpo.sh").read_text()
    assert "afterok:<job ids of the sft tasks>:<job ids of the dpo reference passes>" in script
    assert not (tmp_path / "dry" / "sbatch" / "bdpo.ref.sh").exists()


def test_a_submitted_run_brings_its_reference_pass_and_waits_for_it(tmp_path):
    from dpo_hpc.launch.jobs import RunStatus
    from dpo_hpc.launch.submission import decide

    plan = plan_of(tmp_path, PRECOMPUTED)
    sft = plan.stage_runs("sft")
    ref_pass = plan.stage_runs("dpo", "reference")[0]
    reader = next(r for r in plan.stage_runs("dpo") if r.ref_pass == ref_pass.run_id)
    statuses = {r.run_id: RunStatus("not submitted") for r in plan.runs}
    statuses[sft[0].run_id] = RunStatus("done")
    decisions = decide(plan, [reader], statuses)  # --runs <reader>
    assert decisions == {reader.run_id: "submit", ref_pass.run_id: "submit"}
    statuses[ref_pass.run_id] = RunStatus("done")
    assert decide(plan, [reader], statuses) == {reader.run_id: "submit", ref_pass.run_id: "skip: done"}
    # a pass none of whose readers is submitted is not run
    done = {r.run_id: RunStatus("done") for r in plan.runs if r.role == "train"}
    assert decide(plan, plan.runs, {**statuses, **done, ref_pass.run_id: RunStatus("failed")})[ref_pass.run_id] \
        == "skip: no run to submit reads it"
    # a failed parent blocks the pass, and the pass blocks its readers
    statuses[sft[0].run_id], statuses[ref_pass.run_id] = RunStatus("failed"), RunStatus("not submitted")
    blocked = decide(plan, [reader], statuses)
    assert blocked[ref_pass.run_id] == f"blocked: parent {sft[0].run_id} is failed"
    assert blocked[reader.run_id] == f"blocked: parent {sft[0].run_id} is failed"
    # Slurm: the readers wait for the parent's task and the pass's task
    job_of = {sft[0].run_id: "7_0", ref_pass.run_id: "8_0"}
    assert _dependency(plan, "dpo", [reader], job_of, {}) == "afterok:7_0:8_0"
    assert _dependency(plan, "dpo", [ref_pass], job_of, {}) == "afterok:7_0"


def test_a_dry_run_writes_the_reference_pass_array(tmp_path):
    plan = plan_of(tmp_path, PRECOMPUTED)
    out = write_plan_files(plan, tmp_path / "dry")
    script = (out / "sbatch/dpo.ref.sh").read_text()
    assert "#SBATCH --array=0-1" in script and "#SBATCH --job-name=exp.dpo.ref" in script
    assert "<job ids of the dpo reference passes>" in (out / "sbatch/dpo.sh").read_text()
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["role"] for r in rows].count("reference") == 2


def test_zip_pairs_parent_i_with_grid_point_i(tmp_path):
    text = BASE + '[stages.sft.grid]\n"sft_training.seed" = [1, 2]\n' + DPO.replace('from = "sft"', 'from = "sft"\npairing = "zip"') + \
        '[stages.dpo.grid]\n"dpo_training.seed" = [1, 2]\n'
    plan = plan_of(tmp_path, text)
    for run in plan.stage_runs("dpo"):
        assert plan.run(run.parent).config["sft_training"]["seed"] == run.config["dpo_training"]["seed"]
    bad = text.replace('"dpo_training.seed" = [1, 2]', '"dpo_training.seed" = [1, 2, 3]')
    assert "needs as many grid points (3) as runs of stage 'sft' (2)" in errors_of(tmp_path, bad)


def test_stage_order_puts_parents_first(tmp_path):
    plan = plan_of(tmp_path, DPO + BASE)  # children declared before their parent
    assert plan.stage_order == ["sft", "dpo"]


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.replace('from = "sft"', 'from = "sfx"'), "stages.dpo.from: unknown stage 'sfx'; stages are"),
    (lambda t: t.replace('trainer = "sft"', 'trainer = "sft"\nfrom = "dpo"'), "stages form a cycle"),
    (lambda t: t + '[stages.dpo.grid]\n"dpo_training.beta" = []\n', "grid axis 'dpo_training.beta' is empty"),
    (lambda t: t.replace('trainer = "dpo"', 'trainr = "dpo"'), "stages.dpo.trainr: unknown key; did you mean 'trainer'?"),
    (lambda t: t.replace('trainer = "dpo"', 'trainer = "ppo"'), "stages.dpo.trainer: expected 'sft', 'dpo'"),
    (lambda t: t + '[stages.dpo.grid]\n"dpo_training.bta" = [0.1]\n', "dpo_training.bta: unknown key; did you mean 'beta'?"),
    (lambda t: t + '[stages.dpo.grid]\n"dpo_training.beta" = [0.1, -1.0]\n', "dpo_training.beta: expected greater than 0"),
    (lambda t: t + '[stages.dpo.grid]\n"dpo_training.beta" = [0.1, 0.1]\n', "duplicates another run of stage 'dpo'"),
    (lambda t: t.replace("[stages.dpo.config]", '[stages.dpo.config]\npolicy_name = "x"'), "sets policy_name"),
    (lambda t: t.replace('name = "exp"', 'name = "../escape"'), "experiment.name: expected String should match pattern"),
    (lambda t: t.replace('[experiment]', '[slurm]\ntime = "1 hour"\n\n[experiment]'), "expected a Slurm time"),
    (lambda t: t.replace('[experiment]', '[slurm]\ngpus_per_node = "4"\n\n[experiment]'), "slurm.gpus_per_node: expected a valid integer, got '4'"),
])
def test_bad_experiments_name_the_key(tmp_path, edit, expected):
    text = errors_of(tmp_path, edit(BASE + DPO))
    assert expected in text and str(tmp_path / "exp.toml") in text


def test_missing_config_file_is_named(tmp_path):
    text = BASE.replace('trainer = "sft"', 'trainer = "sft"\nconfig_file = "nope.yaml"')
    assert "nope.yaml: config file not found" in errors_of(tmp_path, text)


def test_config_file_is_relative_to_the_experiment_and_inline_config_wins(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/sft.yaml").write_text(
        "policy_name: m\ndataset:\n  dataset_name: d.jsonl\nsft_training:\n  learning_rate: 1.0e-3\n  batch_size: 8\n  save_dir: ignored\n")
    text = '[experiment]\nname = "e"\n[stages.sft]\ntrainer = "sft"\nconfig_file = "../configs/sft.yaml"\n' \
           '[stages.sft.config.sft_training]\nbatch_size = 16\n'
    (tmp_path / "exps").mkdir()
    plan = plan_of(tmp_path / "exps", text)
    (run,) = plan.runs
    assert run.config["sft_training"]["batch_size"] == 16 and run.config["sft_training"]["learning_rate"] == 1e-3
    assert run.config["sft_training"]["save_dir"] == str(run.run_dir)


@pytest.mark.parametrize("text, minutes", [("90", 90), ("01:30:00", 90), ("1-00:00:00", 1440), ("10:30", 11), ("0:0:30", 1)])
def test_slurm_times(text, minutes):
    assert time_to_minutes(text) == minutes


GOLDEN_CASES = [(name, name, ()) for name in EXAMPLES] + [
    ("tiny_set", "tiny", ("training.max_steps=5", "sft.sft_training.batch_size=16")),  # --set on submit
]


@pytest.mark.parametrize("name, example, overrides", GOLDEN_CASES)
def test_example_experiments_match_golden_dry_run(tmp_path, name, example, overrides):
    """The exact sbatch scripts and manifest.jsonl a dry run writes (regenerate: DPO_HPC_REGEN_GOLDEN=1)."""
    from dpo_hpc.config import parse_override

    plan = load_plan(REPO / "experiments" / f"{example}.toml", overrides=[parse_override(text) for text in overrides])
    out = write_plan_files(plan, tmp_path / "dry")
    golden = GOLDEN / name
    produced = {p.relative_to(out).as_posix(): p.read_text().replace(sys.executable, "<PYTHON>").replace(str(REPO), "<REPO>")
                for p in sorted(out.rglob("*")) if p.is_file()}
    if os.environ.get("DPO_HPC_REGEN_GOLDEN"):
        for rel, text in produced.items():
            (golden / rel).parent.mkdir(parents=True, exist_ok=True)
            (golden / rel).write_text(text)
    expected = {p.relative_to(golden).as_posix(): p.read_text() for p in sorted(golden.rglob("*")) if p.is_file()}
    assert produced.keys() == expected.keys()
    for rel in produced:
        assert produced[rel] == expected[rel], f"{rel} differs from tests/golden/{name}/{rel}"


def test_defaults_and_set_reach_the_stages_that_have_the_key(tmp_path):
    from dpo_hpc.config import parse_override

    text = BASE.replace('dataset = { dataset_name = "data.jsonl" }\n', "") + \
        DPO.replace('dataset = { dataset_name = "data.jsonl" }\n', "") + \
        '[defaults]\ndataset = { dataset_name = "shared.jsonl", max_length = 384 }\n' \
        'dpo_training = { warmup_steps = 7 }\n[stages.dpo.grid]\n"dpo_training.beta" = [0.1, 0.2]\n'
    plan = plan_of(tmp_path, text)
    sft, dpo = plan.stage_runs("sft")[0], plan.stage_runs("dpo")[0]
    assert sft.config["dataset"]["dataset_name"] == dpo.config["dataset"]["dataset_name"] == "shared.jsonl"
    assert dpo.config["dpo_training"]["warmup_steps"] == 7 and sft.config["sft_training"]["warmup_steps"] == 0
    (tmp_path / "exp.toml").write_text(text)

    def with_set(*texts):
        return load_plan(tmp_path / "exp.toml", overrides=[parse_override(t) for t in texts])

    short = with_set("training.max_steps=3", "sft.sft_training.batch_size=16", "dataset.max_length=300")
    assert [r.config[r.trainer + "_training" if r.trainer == "sft" else "dpo_training"]["max_steps"]
            for r in short.runs] == [3, 3, 3]
    assert short.stage_runs("sft")[0].config["sft_training"]["batch_size"] == 16
    assert short.stage_runs("dpo")[0].config["dpo_training"]["batch_size"] == 2
    assert {r.config["dataset"]["max_length"] for r in short.runs} == {300}
    for texts, message in ((("dpo_training.beta=0.5",), "stage 'dpo' varies dpo_training.beta in its grid or variants"),
                           (("risk_test.delta=0.2",), "no stage has this key's section")):
        with pytest.raises(ConfigError, match=message):
            with_set(*texts)


def test_dry_run_of_a_thousand_runs_renders_one_array_per_stage(tmp_path):
    text = BASE + '[stages.sft.grid]\n"sft_training.seed" = [' + ", ".join(map(str, range(10))) + "]\n" + DPO + \
        '[stages.dpo.grid]\n"dpo_training.seed" = [' + ", ".join(map(str, range(100))) + "]\n"
    (tmp_path / "exp.toml").write_text(text)
    result = subprocess.run([sys.executable, "-m", "dpo_hpc.submit", "exp.toml", "--dry-run", "--no-preflight"],
                            cwd=tmp_path, capture_output=True, text=True)  # its model and data are placeholders
    assert result.returncode == 0, result.stderr
    scripts = sorted((tmp_path / "out/exp/.submit/sbatch").iterdir())
    assert [p.name for p in scripts] == ["dpo.sh", "sft.sh"]
    assert "#SBATCH --array=0-999%64" in (tmp_path / "out/exp/.submit/sbatch/dpo.sh").read_text()
    assert "#SBATCH --array=0-9%10" in (tmp_path / "out/exp/.submit/sbatch/sft.sh").read_text()
    rows = (tmp_path / "out/exp/.submit/manifest.jsonl").read_text().splitlines()
    assert len(rows) == 1010 and json.loads(rows[-1])["index"] == 999
    assert "1010 runs planned" in result.stdout and not (tmp_path / "out/exp/dpo").exists()


EVALUATE = """
[stages.eval]
from = ["sft", "dpo"]
evaluate = { data = "test.jsonl", baseline = "sft", checkpoints = true, compare_to = "dpo" }
"""


def test_an_evaluate_stage_scores_every_run_of_its_stages_into_their_run_dirs(tmp_path):
    text = BASE + '[stages.sft.grid]\n"sft_training.seed" = [1, 2]\n' + DPO + \
        '[stages.dpo.grid]\n"dpo_training.beta" = [0.1, 0.2]\n' + EVALUATE
    plan = plan_of(tmp_path, text)
    scored = plan.stage_runs("eval", "evaluate")
    assert plan.stage_order == ["sft", "dpo", "eval"] and plan.arrays()[-1] == ("eval", "evaluate")
    assert [plan.run(r.parent).stage for r in scored] == ["sft"] * 2 + ["dpo"] * 4
    for run in scored:
        target = plan.run(run.parent)
        assert run.run_dir == target.run_dir / "evaluations" / "eval" and run.grid_values == target.grid_values
        assert run.waits_for == [target.run_id] and run.config["target"] == str(target.run_dir)
        if target.stage == "dpo":  # compared with the SFT run it started from, the curve's step 0
            assert run.config["baseline"] == str(plan.run(target.parent).run_dir) and run.config["baseline_is_start"]
        else:
            assert run.config["baseline"] is None
    # report-only keys do not change what is scored, so they leave the ids alone
    again = plan_of(tmp_path, text.replace(', compare_to = "dpo"', ', average_over = ["dpo_training.beta"]'))
    assert [r.run_id for r in again.stage_runs("eval", "evaluate")] == [r.run_id for r in scored]
    other = plan_of(tmp_path, text.replace('checkpoints = true', 'checkpoints = false'))
    assert not {r.run_id for r in other.stage_runs("eval", "evaluate")} & {r.run_id for r in scored}


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.replace('from = ["sft", "dpo"]', 'from = ["sft", "dpx"]'), "stages.eval.from: unknown stage 'dpx'"),
    (lambda t: t.replace('from = ["sft", "dpo"]\n', ''), "an evaluate stage needs 'from'"),
    (lambda t: t.replace('[stages.eval]', '[stages.eval]\ntrainer = "dpo"'), "give one of 'trainer'"),
    (lambda t: t + '[stages.eval.grid]\n"dpo_training.beta" = [0.1]\n', "an evaluate stage takes no grid"),
    (lambda t: t.replace('baseline = "sft"', 'baseline = "dpo"'), "no scored run descends from stage 'dpo'"),
    (lambda t: t.replace('compare_to = "dpo"', 'compare_to = "sftx"'), "evaluate.compare_to: unknown stage 'sftx'"),
    (lambda t: t.replace('from = "sft"', 'from = ["sft"]'), "a training stage starts from one stage"),
    (lambda t: t + '[stages.again]\nfrom = "eval"\nevaluate = { data = "x.jsonl" }\n', "'eval' is an evaluate stage"),
    (lambda t: t.replace('data = "test.jsonl", ', ''), "stages.eval.evaluate: give data (the verifiable task's "
                                                         "prompts, scored exactly) or reward_model"),
    (lambda t: t.replace('data = "test.jsonl", ', 'data = "test.jsonl", reward_model = "rm", '), "one of the two"),
    (lambda t: t.replace('data = "test.jsonl", ', 'reward_model = "dpo", '),
     "stages.eval.evaluate.reward_model: stage 'dpo' trains no reward model"),
])
def test_bad_evaluate_stages_name_the_key(tmp_path, edit, expected):
    text = errors_of(tmp_path, edit(BASE + DPO + EVALUATE))
    assert expected in text


def test_a_dry_run_writes_the_evaluation_array_after_the_runs_it_scores(tmp_path):
    plan = plan_of(tmp_path, BASE + DPO + EVALUATE)
    out = write_plan_files(plan, tmp_path / "dry")
    script = (out / "sbatch" / "eval.sh").read_text()
    assert "--array=0-1" in script and "afterok:<job ids of the sft tasks>:<job ids of the dpo tasks>" in script
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["role"] for r in rows].count("evaluate") == 2


def test_the_quality_benchmark_gives_every_method_the_same_budget():
    plan = load_plan(REPO / "experiments/quality.toml")
    tuning = {stage: plan.stage_runs(stage) for stage in plan.stage_order if stage.startswith("tune_")
              and plan.experiment.stages[stage].trainer not in (None, "sft")}
    assert len(tuning) == 3 and {len(runs) for runs in tuning.values()} == {64}  # 32 settings x 2 noise levels

    def shared_axes(runs, names=("learning_rate", "noise", "rpo")):
        return {tuple(sorted((k.split(".")[-1], v) for k, v in r.grid_values.items() if any(n in k for n in names)))
                for r in runs}

    for stage, runs in tuning.items():  # the same learning rates, noise levels and RPO weights for each
        assert shared_axes(runs) == shared_axes(tuning["tune_dpo"])
    # the NLL-only control: the same learning rates, on clean pairs
    assert shared_axes(plan.stage_runs("tune_sft_more")) == \
        {a for a in shared_axes(tuning["tune_dpo"], ("learning_rate", "noise")) if ("label_noise", 0.0) in a}
    scored = {plan.run(r.parent).stage for stage in plan.stage_order for r in plan.stage_runs(stage, "evaluate")}
    assert scored == {stage for stage in plan.stage_order if plan.experiment.stages[stage].trainer}


def test_the_losses_experiment_gives_every_variant_the_same_budget_and_scores_each():
    plan = load_plan(REPO / "experiments/losses.toml")
    runs = plan.stage_runs("losses")
    variants = plan.experiment.stages["losses"].variants
    assert len(runs) == 3 * len(variants) and {r.grid_values["dpo_training.seed"] for r in runs} == {1, 2, 3}
    budget = {(t["batch_size"], t["max_steps"], t["learning_rate"], t["warmup_steps"])
              for t in (r.config["dpo_training"] for r in runs if r.grid_values["variant"] != "simpo")}
    assert budget == {(64, 40, 1.6e-4, 3)}  # SimPO differs in its beta alone (its paper's 2.0)
    by_variant = {r.grid_values["variant"]: r.config["dpo_training"] for r in runs}
    assert by_variant["mpo"]["loss_type"] == ["sigmoid", "bco_pair", "sft"] and by_variant["tr_dpo"]["sync_ref_model"]
    # one reference pass per table: the plain sums, and LD-DPO's
    passes = plan.stage_runs("losses", "reference")
    assert len(passes) == 2 and {p.config["dpo_training"]["ld_alpha"] for p in passes} == {None, 0.5}
    readers = {r.grid_values["variant"] for r in runs if r.ref_pass}
    assert readers == set(variants) - {"tr_dpo", "orpo", "simpo"}  # a moving reference; no reference at all
    # KTO on the same pairs: 128 completions (64 pairs) a step, the same steps and learning rate;
    # a reference pass per seed (the seed pairs its KL completions)
    kto = plan.stage_runs("kto")
    assert len(kto) == 6 and {(t["batch_size"], t["max_steps"], t["learning_rate"], t["warmup_steps"])
                              for t in (r.config["kto_training"] for r in kto)} == {(128, 40, 1.6e-4, 3)}
    assert len(plan.stage_runs("kto", "reference")) == 3 and all(r.ref_pass for r in kto)
    scored = {plan.run(r.parent).run_id for r in plan.stage_runs("scores", "evaluate")}
    assert scored == {r.run_id for r in runs + kto} | {plan.stage_runs("sft")[0].run_id}


def test_compare_to_names_a_stage_or_one_of_its_variants(tmp_path):
    scores = '[stages.scores]\nfrom = ["dpo"]\nevaluate = { data = "t.jsonl", compare_to = "COMPARED" }\n'
    plan = plan_of(tmp_path, BASE + DPO + VARIANTS + scores.replace("COMPARED", "dpo.simpo"))
    assert len(plan.stage_runs("scores", "evaluate")) == 4
    assert "stage 'dpo' has no variant 'orpo'" in errors_of(tmp_path, BASE + DPO + VARIANTS
                                                            + scores.replace("COMPARED", "dpo.orpo"))
    assert "unknown stage 'nope'" in errors_of(tmp_path, BASE + DPO + VARIANTS + scores.replace("COMPARED", "nope"))


REWARD = ('[stages.rm]\ntrainer = "reward"\nfrom = "sft"\n[stages.rm.config]\n'
          'dataset = { dataset_name = "data.jsonl" }\nreward_training = { learning_rate = 1e-5, batch_size = 2 }\n')


def test_a_reward_stage_starts_from_the_sft_model_and_nothing_starts_from_it(tmp_path):
    """A reward model reads no reference, so the stage gets no ref_name; it is no policy, so neither
    a trainer stage nor an evaluate stage may take it as ``from``."""
    plan = plan_of(tmp_path, BASE + REWARD)
    (run,) = plan.stage_runs("rm")
    assert run.config["policy_name"] == str(plan.stage_runs("sft")[0].run_dir) and "ref_name" not in run.config
    assert run.waits_for == [plan.stage_runs("sft")[0].run_id]
    after = DPO.replace('from = "sft"', 'from = "rm"')
    problem = errors_of(tmp_path, BASE + REWARD + after)
    assert "stages.dpo.from: stage 'rm' trains a reward model, and a trainer starts from a policy" in problem
    scored = '[stages.score]\nfrom = "rm"\n[stages.score.evaluate]\ndata = "test.jsonl"\n'
    problem = errors_of(tmp_path, BASE + REWARD + scored)
    assert "stages.score.from: stage 'rm' trains a reward model" in problem


JUDGED = ('[stages.judged]\nfrom = ["sft", "dpo"]\n'
          'evaluate = { reward_model = "rm", baseline = "sft", max_new_tokens = 64 }\n')


def test_an_evaluate_stage_judged_by_a_reward_stage_waits_for_the_reward_model_of_each_runs_start(tmp_path):
    """Two SFT seeds, a reward model from each, DPO from each: every scoring waits for the reward
    model trained from its own SFT model (listed after it in the file, the stage still runs first)."""
    sft_seeds = '[stages.sft.grid]\n"sft_training.seed" = [1, 2]\n'
    plan = plan_of(tmp_path, BASE + sft_seeds + JUDGED + DPO + REWARD)
    assert plan.stage_order.index("rm") < plan.stage_order.index("judged")
    judges = {r.parent: r for r in plan.stage_runs("rm")}
    scored = plan.stage_runs("judged", "evaluate")
    assert len(scored) == 2 + 2
    for run in scored:
        target = plan.run(run.parent)
        start = target.run_id if target.stage == "sft" else target.parent
        assert run.judge == judges[start].run_id and run.judge in run.waits_for
        assert run.config["reward_model"] == str(judges[start].run_dir) and run.what_is(run.judge) == "reward model"
    write_plan_files(plan, tmp_path / "dry")
    script = (tmp_path / "dry" / "sbatch" / "judged.sh").read_text()
    assert "--dependency='afterok:<job ids of the sft tasks>:<job ids of the dpo tasks>:<job ids of the rm tasks>'" \
        in script
    rows = [json.loads(line) for line in (tmp_path / "dry" / "manifest.jsonl").read_text().splitlines()]
    assert {row.get("judge") for row in rows if row["stage"] == "judged"} == set(judges[s].run_id for s in judges)
    ambiguous = BASE + JUDGED + DPO + REWARD + '[stages.rm.grid]\n"reward_training.seed" = [1, 2]\n'
    assert "2 reward models, and 2 of them start from an ancestor of" in errors_of(tmp_path, ambiguous)
    folder = plan_of(tmp_path, BASE + JUDGED.replace('"rm"', '"judges/rm"') + DPO)  # a model's folder
    assert {r.judge for r in folder.stage_runs("judged", "evaluate")} == {None}
    assert {r.config["reward_model"] for r in folder.stage_runs("judged", "evaluate")} == {"judges/rm"}


GENERATE = ('[stages.pairs]\nfrom = "sft"\n'
            'generate = { prompts = "prompts.jsonl", reward_model = "rm", samples = 4, max_new_tokens = 64 }\n')
ON_POLICY = DPO.replace('from = "sft"', 'from = "pairs"').replace('dataset = { dataset_name = "data.jsonl" }\n', '')


def test_a_generate_stage_samples_each_run_and_a_stage_from_it_trains_its_start_on_its_pairs(tmp_path):
    """Two SFT seeds, a reward model from each, pairs sampled from each SFT model and judged by its
    own reward model, DPO from the pairs: each DPO run starts from (and refers to) the SFT model that
    drew its pairs and trains on them, with [defaults]' dataset replaced; ids do not depend on where
    the experiment lives."""
    sft_seeds = '[stages.sft.grid]\n"sft_training.seed" = [1, 2]\n'
    defaults = '[defaults]\ndataset = { dataset_name = "offline.jsonl", eval_subset = "test", val_ratio = 0.05 }\n'
    text = defaults + BASE + sft_seeds + REWARD + GENERATE + ON_POLICY
    plan = plan_of(tmp_path, text)
    assert plan.stage_order == ["sft", "rm", "pairs", "dpo"] and ("pairs", "generate") in plan.arrays()
    judges = {r.parent: r for r in plan.stage_runs("rm")}
    made = plan.stage_runs("pairs", "generate")
    assert len(made) == 2 and not plan.stage_runs("pairs")
    for run in made:
        sft = plan.run(run.parent)
        assert run.run_dir == plan.root / "pairs" / run.run_id and run.grid_values == sft.grid_values
        assert run.waits_for == [sft.run_id, judges[sft.run_id].run_id] and run.config["model"] == str(sft.run_dir)
        assert run.config["generate"]["reward_model"] == str(judges[sft.run_id].run_dir)
        assert run.config["generate"]["samples"] == 4 and run.config["generate"]["prompts"] == "prompts.jsonl"
    for run in plan.stage_runs("dpo"):
        pairs = plan.run(run.parent)
        assert pairs.stage == "pairs" and run.waits_for == [pairs.run_id]
        assert run.config["policy_name"] == run.config["ref_name"] == pairs.config["model"]
        data = run.config["dataset"]
        assert data["dataset_name"] == str(pairs.run_dir / "pairs.jsonl") and data["subset"] == "train"
        assert data["eval_subset"] is None and data["val_ratio"] == 0.05  # the defaults' other keys stay
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    assert [r.run_id for r in plan_of(moved, text).runs] == [r.run_id for r in plan.runs]
    other = plan_of(tmp_path, text.replace("samples = 4", "samples = 8"))
    assert not {r.run_id for r in other.runs if r.stage in ("pairs", "dpo")} & {r.run_id for r in plan.runs}

    scored = plan_of(tmp_path, text + '[stages.eval]\nfrom = "dpo"\n'
                                      'evaluate = { data = "t.jsonl", baseline = "sft" }\n')
    for run in scored.stage_runs("eval", "evaluate"):  # the SFT model is the DPO run's start: step 0 of its curve
        assert run.config["baseline_is_start"]
    write_plan_files(plan, tmp_path / "dry")
    script = (tmp_path / "dry" / "sbatch" / "pairs.sh").read_text()
    assert "--dependency='afterok:<job ids of the sft tasks>:<job ids of the rm tasks>'" in script


ROUNDS = ON_POLICY.replace('from = "pairs"', 'from = "pairs"\nrounds = 3') + \
    '[stages.dpo.grid]\n"dpo_training.seed" = [1, 2]\n'


def test_rounds_draw_pairs_from_the_round_before_and_continue_each_run_with_its_settings(tmp_path):
    """Iterative DPO: round k draws pairs from each round-(k-1) run with the next seed, judged by the
    reward model of the SFT run it descends from, and trains that run (policy and reference) on them
    with its own grid values; an evaluate stage scores every round, a training stage from the
    iterated one continues from the last, and --set reaches every round."""
    text = BASE + REWARD + GENERATE + ROUNDS + '[stages.eval]\nfrom = ["sft", "dpo"]\n' \
        'evaluate = { data = "t.jsonl", baseline = "sft" }\n[stages.more]\ntrainer = "sft"\nfrom = "dpo"\n' \
        '[stages.more.config]\ndataset = { dataset_name = "d.jsonl" }\nsft_training = { learning_rate = 1e-5, batch_size = 2 }\n'
    plan = plan_of(tmp_path, text)
    assert plan.stage_order == ["sft", "rm", "pairs", "dpo", "dpo_round2_pairs", "dpo_round2", "dpo_round3_pairs",
                                "dpo_round3", "eval", "more"]
    assert plan.copies == {"dpo_round2_pairs": "pairs", "dpo_round2": "dpo", "dpo_round3_pairs": "pairs",
                           "dpo_round3": "dpo"}
    judge = plan.stage_runs("rm")[0]
    before = plan.stage_runs("dpo")
    for k in (2, 3):
        drawn, trained = plan.stage_runs(f"dpo_round{k}_pairs", "generate"), plan.stage_runs(f"dpo_round{k}")
        assert [plan.run(r.parent) for r in drawn] == before and len(trained) == 2
        for pairs, run, previous in zip(drawn, trained, before):
            assert pairs.config["model"] == str(previous.run_dir) and pairs.judge == judge.run_id
            assert pairs.config["generate"]["seed"] == k - 1 and pairs.grid_values == previous.grid_values
            assert run.parent == pairs.run_id and run.grid_values == previous.grid_values
            assert run.config["policy_name"] == run.config["ref_name"] == str(previous.run_dir)
            assert run.config["dpo_training"]["seed"] == previous.config["dpo_training"]["seed"]
            assert run.config["dataset"]["dataset_name"] == str(pairs.run_dir / "pairs.jsonl")
        before = trained
    scored = {plan.run(r.parent).stage for r in plan.stage_runs("eval", "evaluate")}
    assert scored == {"sft", "dpo", "dpo_round2", "dpo_round3"}
    assert {plan.run(r.parent).stage for r in plan.stage_runs("more")} == {"dpo_round3"}
    drawn = plan.stage_runs("dpo_round2_pairs", "generate")  # each round-2 task waits for its own pair set,
    job_of = {r.run_id: f"9_{r.index}" for r in drawn}
    assert _dependency(plan, "dpo_round2", plan.stage_runs("dpo_round2"), job_of, job_of) == "aftercorr:9"
    job_of = {r.run_id: f"8_{r.index}" for r in plan.stage_runs("dpo_round2")}  # and pairs from each round-2 run
    assert _dependency(plan, "dpo_round3_pairs", plan.stage_runs("dpo_round3_pairs", "generate"), job_of, job_of) \
        == "aftercorr:8"

    assert [r.run_id for r in plan_of(tmp_path, text.replace("rounds = 3", "rounds = 2")).runs
            if r.stage in ("sft", "rm", "pairs", "dpo")] == \
        [r.run_id for r in plan.runs if r.stage in ("sft", "rm", "pairs", "dpo")]  # more rounds keep the first
    patched = load_plan(tmp_path / "exp.toml", [("dpo.dpo_training.beta", 0.3)])
    assert {r.config["dpo_training"]["beta"] for r in patched.runs if r.trainer == "dpo"} == {0.3}

    # Fresh prompts each round: round k samples the k-th `limit` of them.
    fresh = plan_of(tmp_path, text.replace("rounds = 3", 'rounds = 3\nround_prompts = "next"')
                    .replace("max_new_tokens = 64", "max_new_tokens = 64, limit = 500, offset = 100"))
    windows = [{(r.config["generate"]["offset"], r.config["generate"]["limit"]) for r in fresh.stage_runs(s, "generate")}
               for s in ("pairs", "dpo_round2_pairs", "dpo_round3_pairs")]
    assert windows == [{(100, 500)}, {(600, 500)}, {(1100, 500)}]


def test_settings_at_their_defaults_leave_a_generate_runs_id_as_it_is(tmp_path):
    """A key written at its default (as a later version's new key would be) keeps the set's id."""
    ids = [[r.run_id for r in plan_of(tmp_path, BASE + REWARD + generate + ON_POLICY).runs]
           for generate in (GENERATE, GENERATE.replace("samples = 4", "samples = 4, top_k = 0, offset = 0"))]
    assert ids[0] == ids[1]
    assert ids[0] != [r.run_id for r in plan_of(tmp_path, BASE + REWARD + GENERATE.replace(
        "samples = 4", "samples = 4, offset = 1") + ON_POLICY).runs]


def test_an_evaluations_id_hashes_only_the_settings_away_from_their_defaults(tmp_path):
    """As for generate sets and training runs: a later version's new key, at its default, keeps
    every evaluation's id (and its scores), and so do the report-only keys."""
    for evaluate in (EVALUATE, EVALUATE.replace("checkpoints = true", "checkpoints = true, max_new_tokens = 16")):
        for run in plan_of(tmp_path, BASE + DPO + evaluate).stage_runs("eval", "evaluate"):
            baseline = run.config["baseline"] and Path(run.config["baseline"]).name
            blob = json.dumps({"evaluate": {"data": "test.jsonl", "baseline": "sft", "checkpoints": True},
                               "target": run.parent, "baseline": baseline}, sort_keys=True)
            assert run.run_id == f"eval-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def test_a_scoring_under_other_settings_is_not_done(tmp_path):
    """A scoring's folder is its stage's (``<run>/evaluations/<stage>``) whatever its settings, so
    its manifest's run id says which settings it was made with: changed ones are scored again."""
    from dpo_hpc.launch.jobs import run_status

    plan = plan_of(tmp_path, BASE + DPO + EVALUATE)
    changed = plan_of(tmp_path, BASE + DPO + EVALUATE.replace("checkpoints = true", "checkpoints = true, limit = 9"))
    run, other = plan.stage_runs("eval", "evaluate")[0], changed.stage_runs("eval", "evaluate")[0]
    assert run.run_dir == other.run_dir and run.run_id != other.run_id
    run.run_dir.mkdir(parents=True)
    for recorded in ({}, {"run_id": run.run_id}):  # scorings from before ids were recorded count as done
        (run.run_dir / "run_manifest.json").write_text(json.dumps({"status": "completed", **recorded}))
        assert run_status(plan, run, None, {}).state == "done"
    status = run_status(changed, other, None, {})
    assert status.state == "not submitted"
    assert status.detail == f"scored under other settings ({run.run_id}): submitting scores it again"


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.replace('from = "pairs"\nrounds = 3', 'from = "sft"\nrounds = 3'),
     "stages.dpo.rounds: each round trains on pairs from the round before, so 'from' must be a generate stage"),
    (lambda t: t.replace('from = "pairs"\nrounds = 3', 'rounds = 3'), "rounds: only a training stage 'from'"),
    (lambda t: t.replace('rounds = 3', 'rounds = 0'), "stages.dpo.rounds: expected greater than or equal to 1"),
    (lambda t: t + '[stages.dpo_round2]\ntrainer = "sft"\nfrom = "sft"\n',
     "stages.dpo_round2: round 2 of stage 'dpo' has this name; rename this stage"),
    (lambda t: t.replace('from = "pairs"\nrounds = 3', 'from = "pairs"\npairing = "match"'),  # no values to match
     "(no grid values) agrees with 2 of the 2 grid points; it needs exactly one"),
    (lambda t: t.replace('rounds = 3', 'rounds = 3\nround_prompts = "next"'),
     "stages.dpo.round_prompts: 'next' takes the next `limit` prompts each round; set stages.pairs.generate.limit"),
])
def test_bad_rounds_name_the_key(tmp_path, edit, expected):
    assert expected in errors_of(tmp_path, edit(BASE + REWARD + GENERATE + ROUNDS))


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.replace('from = "sft"\ngenerate', 'generate'), "a generate stage needs 'from'"),
    (lambda t: t.replace('reward_model = "rm", ', ''), "stages.pairs.generate: give reward_model"),
    (lambda t: t.replace('reward_model = "rm", ', 'reward_model = "rm", verifiable = true, '), "one of the two"),
    (lambda t: t.replace('samples = 4', 'samples = 1'), "stages.pairs.generate.samples"),
    (lambda t: t.replace('reward_model = "rm"', 'reward_model = "sft"'), "stage 'sft' trains no reward model"),
    (lambda t: t + '[stages.pairs.grid]\n"x.y" = [1]\n', "a generate stage takes no grid"),
    (lambda t: t.replace('dpo_training = {', 'dataset = { dataset_name = "mine.jsonl" }\ndpo_training = {'),
     "stages.dpo.config.dataset.dataset_name: a stage from generate stage 'pairs' trains on its pairs"),
    (lambda t: t + '[stages.again]\nfrom = "pairs"\ngenerate = { prompts = "p.jsonl", verifiable = true }\n',
     "stages.again.from: 'pairs' is a generate stage; name training stages"),
    (lambda t: t + '[stages.eval]\nfrom = "pairs"\nevaluate = { data = "t.jsonl" }\n',
     "stages.eval.from: 'pairs' is a generate stage"),
    (lambda t: t + '[stages.eval]\nfrom = "sft"\nevaluate = { data = "t.jsonl" }\n[stages.late]\ntrainer = "dpo"\n'
     'from = "eval"\n', "stages.late.from: 'eval' is an evaluate stage; start from a training stage"),
])
def test_bad_generate_stages_name_the_key(tmp_path, edit, expected):
    assert expected in errors_of(tmp_path, edit(BASE + REWARD + GENERATE + ON_POLICY))
