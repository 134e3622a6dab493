"""Config loading: the seed files load, and every class of bad input is one clear line."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO
import pytest

from dpo_hpc.cli import load_with_overrides
from dpo_hpc.config import (
    BetaDPORunConfig,
    ConfigError,
    DynamicBetaDPORunConfig,
    SFTRunConfig,
    load_config,
    to_dict,
    validate_mapping,
)
from dpo_hpc.algorithms.objectives import build_loss
from dpo_hpc.config.losses import LOSSES
from dpo_hpc.config.schema import DeepSpeedConfig, TrainingConfig
from dpo_hpc.trainers.engine import deepspeed_config

SEED = REPO / "experiments" / "seed"
VALID_DPO = {
    "policy_name": "m",
    "dataset": {"dataset_name": "d"},
    "dpo_training": {"learning_rate": 1e-6, "batch_size": 2, "save_dir": "out"},
}


def errors(data, trainer="dpo") -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_mapping(data, trainer, source="f.yaml")
    return info.value.problems


def with_(section, **values):
    data = json.loads(json.dumps(VALID_DPO))
    data.setdefault(section, {}).update(values)
    return data


def test_seed_configs_load_with_original_values():
    sft = load_config(SEED / "config_sft.yaml")
    assert isinstance(sft, SFTRunConfig)
    assert sft.sft_training.learning_rate == 5e-6  # YAML '5e-6' is a float, not a string
    assert (sft.precision, sft.dataset.subset, sft.dataset.val_ratio) == ("bf16", "train", 0.1)
    dyn = load_config(SEED / "config_dpo.yaml")
    assert isinstance(dyn, DynamicBetaDPORunConfig)
    assert (dyn.risk_test.delta, dyn.risk_test.lambda_, dyn.risk_test.beta_warmup) == (0.1, 0.1, 120)
    assert (dyn.beta_update.beta_0, dyn.beta_update.alpha, dyn.beta_update.beta_max) == (0.1, 0.005, 2.0)
    beta = load_config(SEED / "config_beta_dpo.yaml")
    assert isinstance(beta, BetaDPORunConfig)
    assert (beta.beta_dpo.m, beta.beta_dpo.rho, beta.beta_dpo.alpha, beta.beta_dpo.min_beta) == (0.9, 0.8, 0.6, 0.001)


def test_to_dict_uses_file_key_names_and_round_trips():
    cfg = load_config(SEED / "config_dpo.yaml")
    data = to_dict(cfg)
    assert data["risk_test"]["lambda"] == 0.1 and "lambda_" not in data["risk_test"]
    assert validate_mapping(data, "dynamic_beta_dpo") == cfg


def test_toml_and_json_load(tmp_path):
    (tmp_path / "c.toml").write_text(
        'policy_name = "m"\n[dataset]\ndataset_name = "d"\n[dpo_training]\nlearning_rate = 1e-6\nbatch_size = 2\nsave_dir = "o"\n'
    )
    (tmp_path / "c.json").write_text(json.dumps(VALID_DPO))
    assert load_config(tmp_path / "c.toml").dpo_training.batch_size == 2
    assert load_config(tmp_path / "c.json").beta == 0.1


def test_misspelled_key_suggests_the_nearest():
    assert errors(with_("dpo_training", learnin_rate=1e-6)) == [
        "f.yaml: dpo_training.learnin_rate: unknown key; did you mean 'learning_rate'?"
    ]
    assert errors({**VALID_DPO, "polcy_name": "x"}) == ["f.yaml: polcy_name: unknown key; did you mean 'policy_name'?"]


def test_a_trl_config_is_told_each_settings_name_here():
    """TRL's names are said, never silently read as aliases (one name per setting)."""
    trl = {**VALID_DPO, "bf16": True, "dpo_training": {**VALID_DPO["dpo_training"], "per_device_train_batch_size": 8,
                                                      "num_train_epochs": 1, "max_length": 1024}}
    assert sorted(errors(trl)) == [
        "f.yaml: bf16: unknown key; that is TRL's name: here it is the top-level precision = \"bf16\"",
        "f.yaml: dpo_training.max_length: unknown key; that is TRL's name: here it is dataset.max_length",
        "f.yaml: dpo_training.num_train_epochs: unknown key; that is TRL's name: here it is epochs",
        "f.yaml: dpo_training.per_device_train_batch_size: unknown key; that is TRL's name: here it is batch_size",
    ]
    left_out = with_("dpo_training", activation_offloading=True, router_aux_loss_coef=0.01, truncation_mode="keep_end",
                     resume_from_checkpoint=True)
    assert sorted(errors(left_out)) == [
        "f.yaml: dpo_training.activation_offloading: unknown key; that is TRL's option: not offered; "
        "gradient_checkpointing cuts activation memory",
        "f.yaml: dpo_training.resume_from_checkpoint: unknown key; that is TRL's option: a run resumes by itself "
        "from its save_dir's newest verified checkpoint",
        "f.yaml: dpo_training.router_aux_loss_coef: unknown key; that is TRL's name: here it is the top-level "
        "router_aux_loss_coef",
        "f.yaml: dpo_training.truncation_mode: unknown key; that is TRL's name: here it is dataset.truncation_mode",
    ]
    assert errors(with_("dpo_training", push_to_hub=True)) == [
        "f.yaml: dpo_training.push_to_hub: unknown key; that is TRL's option: compute nodes are offline; save_dir "
        "holds the final model (save_pretrained) with its model card, to push from a login node: hf upload ORG/NAME "
        "SAVE_DIR --exclude 'checkpoints/*'"]


def test_tr_dpo_needs_a_reference_model_that_can_move():
    assert validate_mapping(with_("dpo_training", sync_ref_model=True, ref_model_sync_steps=64), "dpo").training\
        .ref_model_mixup_alpha == 0.6
    assert errors(with_("dpo_training", ref_model_sync_steps=64)) == [
        "f.yaml: dpo_training: ref_model_sync_steps applies with sync_ref_model = true; set that too, or leave the "
        "key out"]
    (table,) = errors(with_("dpo_training", sync_ref_model=True, precompute_ref_log_probs=True))
    assert "precompute_ref_log_probs: a table of a fixed reference" in table
    (simpo,) = errors(with_("dpo_training", sync_ref_model=True, loss_type="simpo"))
    assert "loss_type simpo has no reference at all" in simpo
    (adapters,) = errors({**with_("dpo_training", sync_ref_model=True), "lora": {"r": 8}})
    assert "sync_ref_model with [lora]" in adapters


def test_unknown_section_lists_valid_keys():
    (problem,) = errors({**VALID_DPO, "zzz": 1})
    assert problem.startswith("f.yaml: zzz: unknown key; valid keys: ") and "dpo_training" in problem


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("dpo_training", "batch_size", "16", "f.yaml: dpo_training.batch_size: expected a valid integer, got '16' (str)"),
        ("dpo_training", "batch_size", 2.5, "f.yaml: dpo_training.batch_size: expected a valid integer, got 2.5 (float)"),
        ("dpo_training", "learning_rate", "fast", "f.yaml: dpo_training.learning_rate: expected a valid number, got 'fast' (str)"),
        ("dpo_training", "epochs", True, "f.yaml: dpo_training.epochs: expected a valid integer, got True (bool)"),
        ("dataset", "dataset_name", 3, "f.yaml: dataset.dataset_name: expected a valid string, got 3 (int)"),
    ],
)
def test_wrong_types_are_refused(section, key, value, expected):
    assert errors(with_(section, **{key: value})) == [expected]


@pytest.mark.parametrize(
    "trainer, section, values, fragment",
    [
        ("dynamic_beta_dpo", "risk_test", {"delta": 1.0}, "risk_test.delta: expected less than 1, got 1.0"),
        ("dynamic_beta_dpo", "risk_test", {"delta": 0}, "risk_test.delta: expected greater than 0, got 0"),
        ("dynamic_beta_dpo", "risk_test", {"beta_warmup": 0}, "risk_test.beta_warmup: expected greater than or equal to 1"),
        ("beta_dpo", "beta_dpo", {"rho": 0}, "beta_dpo.rho: expected greater than 0"),
        ("beta_dpo", "beta_dpo", {"rho": 1.5}, "beta_dpo.rho: expected less than or equal to 1"),
        ("dynamic_beta_dpo", "beta_update", {"beta_0": 3.0}, "beta_update: need beta_min <= beta_0 <= beta_max"),
        ("dynamic_beta_dpo", "beta_update", {"beta_min": 0.2}, "beta_update: need beta_min <= beta_0 <= beta_max"),
        ("dpo", "dataset", {"val_ratio": 1.0}, "dataset.val_ratio: expected less than 1"),
        ("dpo", "dataset", {"val_ratio": -0.1}, "dataset.val_ratio: expected greater than or equal to 0"),
        ("dpo", "dpo_training", {"learning_rate": 0}, "dpo_training.learning_rate: expected greater than 0"),
        ("dpo", "dataset", {"max_prompt_length": 512},
         "dataset.max_prompt_length (512) must be smaller than dataset.max_length (512)"),
        ("beta_dpo", "dataset", {"max_length": 64}, "dataset.max_prompt_length (256) must be smaller than"),
        ("dpo", "deepspeed", {"zero_stage": 4}, "deepspeed.zero_stage: expected less than or equal to 3"),
    ],
)
def test_out_of_range_values_are_refused(trainer, section, values, fragment):
    problems = errors(with_(section, **values), trainer)
    assert len(problems) == 1 and fragment in problems[0], problems


def test_sft_has_no_prompt_budget_to_fit():
    """SFT truncates whole conversations: a short max_length needs no max_prompt_length below it."""
    data = {"policy_name": "m", "dataset": {"dataset_name": "d", "max_length": 128},
            "sft_training": {"learning_rate": 1e-5, "batch_size": 2, "save_dir": "out"}}
    assert validate_mapping(data, "sft", source="f.yaml").dataset.max_length == 128


def test_every_problem_is_reported_at_once():
    data = with_("dpo_training", learnin_rate=1, batch_size="x")
    data["precision"] = "bf17"
    problems = errors(data)
    assert len(problems) == 3
    assert any("precision: expected 'fp32', 'bf16' or 'fp16', got 'bf17'" in p for p in problems)
    assert any("dpo_training.learnin_rate" in p for p in problems)


def test_missing_required_key():
    data = json.loads(json.dumps(VALID_DPO))
    del data["dpo_training"]["save_dir"]
    assert errors(data) == ["f.yaml: dpo_training.save_dir: required key is missing"]


def test_fixed_beta_refused_where_beta_is_adaptive():
    (problem,) = errors(with_("dpo_training", beta=0.2), "dynamic_beta_dpo")
    assert "takes its initial beta from beta_update.beta_0" in problem


def test_loss_type_and_the_options_of_each_loss_are_checked():
    (problem,) = errors(with_("dpo_training", loss_type="kto"))
    assert "dpo_training.loss_type" in problem and all(name in problem for name in LOSSES)
    (problem,) = errors(with_("dpo_training", loss_type="hinge", label_smoothing=0.1))
    assert "label_smoothing applies to loss_type sigmoid, robust, exo_pair, simpo, not hinge; set label_smoothing = 0.0" in problem
    (problem,) = errors(with_("dpo_training", discopop_tau=0.1))
    assert "discopop_tau applies to loss_type discopop, not sigmoid; set discopop_tau = 0.05" in problem
    (problem,) = errors(with_("dpo_training", loss_type="exo_pair"))
    assert "loss_type exo_pair needs label_smoothing > 0" in problem
    (problem,) = errors(with_("dpo_training", loss_type="apo_zero", f_divergence_type="js_divergence"))
    assert "f_divergence_type = 'js_divergence' applies to loss_type sigmoid, robust, hinge, ipo, sigmoid_norm, " \
        "exo_pair, discopop, sft, not apo_zero" in problem
    (problem,) = errors(with_("dpo_training", f_alpha_divergence_coef=0.3))
    assert 'f_alpha_divergence_coef applies with f_divergence_type = "alpha_divergence"' in problem
    cfg = validate_mapping(with_("dpo_training", loss_type="discopop", discopop_tau=0.1), "dpo")
    assert build_loss(cfg.training).tau == 0.1  # each loss gets the options it reads
    assert errors(with_("dpo_training", label_smoothing=0.5))  # robust DPO divides by 1 - 2 eps
    cfg = validate_mapping(with_("dpo_training", loss_type="robust", label_smoothing=0.2, rpo_alpha=1.0), "beta_dpo")
    assert (cfg.training.loss_type, cfg.training.label_smoothing, cfg.training.rpo_alpha) == ("robust", 0.2, 1.0)


def test_torch_compile_is_refused_under_zero3():
    data = with_("dpo_training", torch_compile=True)
    data["deepspeed"] = {"zero_stage": 3}
    (problem,) = errors(data)
    assert problem.startswith("f.yaml: ") and "torch_compile does not work with deepspeed.zero_stage = 3" in problem
    data["deepspeed"] = {"zero_stage": 2}
    assert validate_mapping(data, "dpo").training.torch_compile


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(ConfigError, match="unknown config format '.ini'"):
        load_config(tmp_path / "c.ini")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping of keys at the top level"):
        load_config(tmp_path / "list.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    (tmp_path / "evil.yaml").write_text("policy_name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "evil.yaml")


def test_overrides_use_toml_values(tmp_path):
    cfg, trainer = load_with_overrides(str(SEED / "config_sft.yaml"), None,
                              ["sft_training.max_steps=3", "policy_name=some/model", "precision=\"fp32\""])
    assert (cfg.sft_training.max_steps, cfg.policy_name, cfg.precision) == (3, "some/model", "fp32")
    assert trainer == "sft"


def test_deepspeed_json_merge_fills_auto_and_refuses_contradictions(tmp_path):
    training = TrainingConfig(learning_rate=1e-3, batch_size=4, save_dir="o", gradient_accumulation_steps=2)
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": "auto",
                                "overlap_comm": True}}))
    merged = deepspeed_config(training, DeepSpeedConfig(zero_stage=2, config_file=str(good)), "bf16", world_size=2)
    assert merged["train_batch_size"] == 16 and merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert merged["bf16"] == {"enabled": True}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError) as info:
        deepspeed_config(training, DeepSpeedConfig(config_file=str(bad)), "fp32", world_size=1)
    assert len(info.value.problems) == 2
    assert "train_micro_batch_size_per_gpu = 8 contradicts the trainer config (4)" in info.value.problems[0]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dpo_hpc", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize(
    "content, line",
    [
        ("dpo_training:\n  learnin_rate: 1\n", "dpo_training.learnin_rate: unknown key; did you mean 'learning_rate'?"),
        ("dpo_training:\n  batch_size: sixteen\n", "dpo_training.batch_size: expected a valid integer, got 'sixteen' (str)"),
        ("risk_test:\n  delta: 1.5\n", "risk_test.delta: expected less than 1, got 1.5 (float)"),
    ],
)
def test_cli_prints_one_line_per_error_exit_2_no_traceback(tmp_path, content, line):
    path = tmp_path / "c.yaml"
    base = "policy_name: m\ndataset: {dataset_name: d}\ndpo_training: {learning_rate: 1.0e-6, batch_size: 2, save_dir: o}\n"
    data = {**__import__("yaml").safe_load(base)}
    extra = __import__("yaml").safe_load(content)
    for section, values in extra.items():
        data.setdefault(section, {}).update(values)
    path.write_text(__import__("yaml").safe_dump(data))
    result = _cli("validate", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {path}: {line}"]


def test_cli_validate_prints_resolved_config():
    result = _cli("validate", str(SEED / "config_beta_dpo.yaml"), "--no-preflight")  # its model is a placeholder
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["trainer"] == "beta_dpo" and resolved["dpo_training"]["gradient_accumulation_steps"] == 1


def test_cli_validate_takes_the_file_as_train_does_too():
    result = _cli("validate", "--config", str(SEED / "config_beta_dpo.yaml"), "--no-preflight")
    assert result.returncode == 0 and json.loads(result.stdout)["trainer"] == "beta_dpo", result.stderr
    for args in ([], [str(SEED / "config_dpo.yaml"), "--config", str(SEED / "config_beta_dpo.yaml")]):
        result = _cli("validate", *args, "--no-preflight")
        assert result.returncode == 2 and result.stderr.strip() == \
            "error: validate takes one config file: dpo-hpc validate CONFIG (or --config CONFIG)"


def test_cli_wrong_trainer_for_file_says_so():
    result = subprocess.run([sys.executable, "-c", "from dpo_hpc.cli import legacy_main; raise SystemExit(legacy_main(command='train-sft'))",
                             "--config", str(SEED / "config_dpo.yaml")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "look like a 'dynamic_beta_dpo' config, not 'sft'" in result.stderr


def test_a_list_of_losses_mixes_them_where_they_can_mix():
    mpo = validate_mapping(with_("dpo_training", loss_type=["sigmoid", "bco_pair", "sft"],
                                 loss_weights=[0.8, 0.2, 1.0]), "dpo")
    assert mpo.training.loss_type == ["sigmoid", "bco_pair", "sft"]
    assert validate_mapping(with_("dpo_training", loss_type=["simpo", "sft"]), "dpo").training.loss_weights is None
    (problem,) = errors(with_("dpo_training", loss_type=["sigmoid", "kto"]))
    assert problem.startswith("f.yaml: dpo_training.loss_type.1: expected 'sigmoid', ")
    (problem,) = errors(with_("dpo_training", loss_type=["sigmoid", "ipo"], loss_weights=[1.0]))
    assert "loss_weights: [1.0]: one weight > 0 for each of the 2 losses of loss_type (sigmoid + ipo)" in problem
    (problem,) = errors(with_("dpo_training", loss_type=["sigmoid", "sigmoid"]))
    assert "name each loss once" in problem
    (problem,) = errors(with_("dpo_training", loss_type=["sigmoid", "simpo"]))
    assert "simpo scores the policy alone (no reference), so it does not mix with losses that read the reference" \
        in problem
    (problem,) = errors(with_("dpo_training", loss_type=["ipo", "exo_pair"]))
    assert "loss_type exo_pair needs label_smoothing > 0" in problem
    (problem,) = errors(with_("dpo_training", loss_type=["ipo", "hinge"], discopop_tau=0.1))
    assert "discopop_tau applies to loss_type discopop, not ipo + hinge" in problem
    assert validate_mapping(with_("dpo_training", loss_type=["ipo", "discopop"], discopop_tau=0.1), "dpo")


def test_readme_losses_table_has_a_row_per_loss():
    text = (REPO / "README.md").read_text()
    start = text.index("| `loss_type` | per-pair loss |")
    table = text[start:text.index("\n\n", start)]
    rows = [line.split("|")[1].strip().split()[0].strip("`") for line in table.splitlines()[2:]]
    assert rows == list(LOSSES)
    for name, spec in LOSSES.items():  # each loss's options named in its row
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}`"))
        assert all(f"`{option}`" in row for option in spec.options), name


def test_readme_configuration_reference_matches_the_schema():
    from dpo_hpc.reference import splice

    readme = (REPO / "README.md").read_text()
    assert splice(readme) == readme, "regenerate: python -m dpo_hpc.reference --write README.md"


def test_lora_section_is_validated_and_merge_refused_under_zero3():
    data = with_("dpo_training")
    data["lora"] = {"r": 8, "target_modules": ["q_proj", "v_proj"], "merge": True}
    cfg = validate_mapping(data, "dpo")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (8, 32.0, ["q_proj", "v_proj"])
    data["deepspeed"] = {"zero_stage": 3}
    (problem,) = errors(data)
    assert "lora.merge does not work with deepspeed.zero_stage = 3" in problem
    data["lora"] = {"rank": 8}
    assert any("lora.rank" in p for p in errors(data))


def test_lora_without_peft_says_how_to_install_it(monkeypatch):
    import sys

    from dpo_hpc.trainers import lora

    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'dpo-hpc\[peft\]'"):
        lora.add_adapters(object(), validate_mapping({**VALID_DPO, "lora": {}}, "dpo").lora)


def test_a_run_never_writes_over_what_it_reads(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for save_dir in (str(model), str(model / "run"), str(tmp_path)):
        data = json.loads(json.dumps(VALID_DPO))
        data["policy_name"] = str(model)
        data["dpo_training"]["save_dir"] = save_dir
        (problem,) = errors(data)
        assert f"overlaps policy_name '{model}'" in problem and "a run would overwrite what it reads" in problem
    assert "save_dir is empty" in errors(with_("dpo_training", save_dir=" "))[0]
    data = json.loads(json.dumps(VALID_DPO))
    data["policy_name"], data["dpo_training"]["save_dir"] = str(model), str(tmp_path / "elsewhere")
    assert validate_mapping(data, "dpo")


def test_warmup_ratio_is_a_rounded_up_share_of_the_run_and_excludes_warmup_steps():
    from dpo_hpc.config import validate_mapping

    ratio = validate_mapping(with_("dpo_training", warmup_ratio=0.25), "dpo").dpo_training
    assert [ratio.warmup(n) for n in (10, 12, 1)] == [3, 3, 1]  # HF's ceil(total x ratio)
    assert validate_mapping(with_("dpo_training", warmup_steps=4), "dpo").dpo_training.warmup(10) == 4
    (problem,) = errors(with_("dpo_training", warmup_steps=4, warmup_ratio=0.1))
    assert problem == "f.yaml: dpo_training: warmup_steps = 4 and warmup_ratio = 0.1 both set the warmup; keep one"


def test_global_batch_size_derives_the_accumulation_from_the_world_size():
    training = validate_mapping(with_("dpo_training", batch_size=2, global_batch_size=8), "dpo").dpo_training
    assert [training.accumulation_steps(world) for world in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ValueError, match="global_batch_size = 8 cannot be shared by 3 ranks"):
        training.accumulation_steps(3)
    with pytest.raises(ValueError, match="global_batch_size = 8 on 8 ranks is 1 per rank, not a multiple of "
                                         "batch_size = 2; choose a batch_size that divides 1"):
        training.accumulation_steps(8)
    assert validate_mapping(with_("dpo_training", gradient_accumulation_steps=3), "dpo").dpo_training \
        .accumulation_steps(4) == 3  # without it, the key as given
    merged = deepspeed_config(training, DeepSpeedConfig(), "fp32", world_size=2)
    assert merged["gradient_accumulation_steps"] == 2 and merged["train_batch_size"] == 8
    (problem,) = errors(with_("dpo_training", global_batch_size=8, gradient_accumulation_steps=2))
    assert problem == ("f.yaml: dpo_training: global_batch_size = 8 and gradient_accumulation_steps = 2 both set the "
                       "accumulation; keep one")
    (problem,) = errors(with_("dpo_training", batch_size=3, global_batch_size=8))
    assert problem == "f.yaml: dpo_training: global_batch_size = 8 is not a multiple of batch_size = 3"


@pytest.mark.parametrize("path", sorted((REPO / "experiments" / "single").glob("*.toml")), ids=lambda p: p.name)
def test_the_single_run_configs_validate_as_their_trainer(path):
    """experiments/single/: the README's one-trainer configs, each detected by its sections."""
    from dpo_hpc.config import detect_trainer, load_config, read_mapping

    assert detect_trainer(read_mapping(path)) == path.stem
    assert load_config(path).training.save_dir == f"runs/tiny-single/{path.stem}"


def test_a_reward_config_refuses_what_a_reward_model_cannot_do():
    reward = {"policy_name": "m", "dataset": {"dataset_name": "d"},
              "reward_training": {"learning_rate": 1e-5, "batch_size": 2, "save_dir": "out"}}
    cfg = validate_mapping(reward, "reward")
    assert cfg.training.center_rewards_coefficient is None and not hasattr(cfg, "ref_name")
    generating = json.loads(json.dumps(reward))
    generating["reward_training"]["generate_during_eval"] = True
    assert "a reward model scores replies and writes none" in errors(generating, "reward")[0]
    routed = {**reward, "router_aux_loss_coef": 0.02}
    assert "return no router loss to weigh" in errors(routed, "reward")[0]
    for key, value in (("ref_name", "m"), ("reward_training.beta", 0.1)):
        data = json.loads(json.dumps(reward))
        section, _, name = key.rpartition(".")
        (data[section] if section else data)[name] = value
        assert any(name in problem for problem in errors(data, "reward")), key
