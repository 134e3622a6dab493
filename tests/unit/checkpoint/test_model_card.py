"""The model card (README.md) of a finished run: the hub's metadata, the run's lineage back to a hub
model, its non-default settings as loadable TOML, its final evaluation, and a README.md of
someone else's left alone."""

from __future__ import annotations

import json

import pytest
import yaml

from dpo_hpc.checkpoint.model_card import (CARD, LINEAGE_LIMIT, MARK, flat, lineage, model_card, rewrite_model_card,
                                           toml_key, toml_value, write_model_card)
from dpo_hpc.checkpoint.run_dir import DATA_REPORT, MANIFEST, RESOLVED_CONFIG, RunDir
from dpo_hpc.config import ALGORITHMS, ConfigError, to_dict, validate_mapping

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

MANIFEST_DONE = {"status": "completed", "world_size": 2, "final_step": 30, "train_seconds": 95.2,
                 "device": "cuda, nccl", "median_tokens_per_sec": 12345.6, "package_version": "0.1.0",
                 "python": "3.11.7", "libraries": {"torch": "2.13.0"}, "git_sha": "abc123", "git_dirty": False,
                 "final_eval": {"loss": 0.61234567, "rewards/accuracies": 0.75}}


def dpo_config(**top):
    raw = {"policy_name": "meta-llama/Llama-3.2-1B",
           "dataset": {"dataset_name": "trl-lib/ultrafeedback_binarized", "subset": "train",
                       "mix": [{"dataset_name": "local/pairs/extra.jsonl", "fraction": 0.5}]},
           "dpo_training": {"learning_rate": 5e-7, "batch_size": 4, "gradient_accumulation_steps": 2,
                            "beta": 0.05, "loss_type": ["sigmoid", "sft"], "save_dir": "/out/run"},
           **top}
    return validate_mapping(raw, "dpo")


def front_matter(card: str) -> dict:
    head, _, _ = card.removeprefix("---\n").partition("\n---\n")
    return yaml.safe_load(head)


def block(card: str, fence: str) -> str:
    return card.split(f"```{fence}\n", 1)[1].split("```", 1)[0]


def test_a_dpo_card_holds_the_hub_metadata_settings_and_results(tmp_path):
    cfg = dpo_config()
    card = model_card(cfg, "dpo", MANIFEST_DONE, None, tmp_path, "uf-dpo")
    assert front_matter(card) == {"base_model": "meta-llama/Llama-3.2-1B", "library_name": "transformers",
                                  "model_name": "uf-dpo", "pipeline_tag": "text-generation",
                                  "tags": ["dpo-hpc", "dpo"], "datasets": ["trl-lib/ultrafeedback_binarized"]}
    assert MARK in card and "# uf-dpo\n" in card
    # the settings block is TOML that gives back the run's identity, key by key
    settings = tomllib.loads(block(card, "toml"))
    assert settings["dpo_training"]["beta"] == 0.05 and settings["dpo_training"]["loss_type"] == ["sigmoid", "sft"]
    assert "save_dir" not in settings["dpo_training"]  # where it was written is not what it is
    assert validate_mapping({**settings, "dpo_training": {**settings["dpo_training"], "save_dir": "x"}},
                            "dpo").dpo_training.beta == 0.05
    assert "| steps | 30 optimizer steps of 16 pairs (4 per micro-batch x 2 accumulated x 2 rank(s)), seed 42 |" in card
    assert "`sigmoid`: DPO (Rafailov et al., 2023)" in card and "`sft`: the chosen reply's mean token NLL" in card
    assert "| loss | 0.6123 |" in card and "| rewards/accuracies | 0.75 |" in card
    assert "| compute | 95 s on cuda, nccl, 12,346 tokens/s (median) |" in card
    assert f'AutoModelForCausalLM.from_pretrained("{tmp_path.resolve()}")' in card
    assert "- torch: 2.13.0" in card and "- dpo-hpc source: git abc123\n" in card


def test_the_data_line_counts_what_was_kept_and_dropped(tmp_path):
    report = {"train": {"rows": 100, "kept": 97}, "validation": {"rows": 5, "kept": 5}}
    card = model_card(dpo_config(), "dpo", MANIFEST_DONE, report, tmp_path, "r")
    assert ("| data | `trl-lib/ultrafeedback_binarized` (train) with `local/pairs/extra.jsonl` (0.5 of it): "
            "97 train pairs (3 rows dropped), 5 validation pairs |") in card


def run_directory(folder, trainer: str, policy: str) -> str:
    folder.mkdir(parents=True)
    (folder / RESOLVED_CONFIG).write_text(json.dumps({"trainer": trainer, "policy_name": policy}))
    return str(folder)


def test_the_lineage_runs_back_through_run_directories_to_the_hub_model(tmp_path):
    sft = run_directory(tmp_path / "sft", "sft", "Qwen/Qwen2.5-0.5B")
    dpo = run_directory(tmp_path / "dpo", "dpo", sft)
    assert lineage(dpo) == [(dpo, "dpo"), (sft, "sft"), ("Qwen/Qwen2.5-0.5B", None)]
    card = model_card(dpo_config(policy_name=dpo), "dpo", MANIFEST_DONE, None, tmp_path, "round 2")
    assert front_matter(card)["base_model"] == "Qwen/Qwen2.5-0.5B"
    # an adapter applies to the SFT run's model, not to the hub model: the hub would read it so
    adapter = model_card(dpo_config(policy_name=sft, lora={"r": 8}), "dpo", MANIFEST_DONE, None, tmp_path, "a")
    assert "base_model" not in front_matter(adapter)
    on_hub = model_card(dpo_config(lora={"r": 8}), "dpo", MANIFEST_DONE, None, tmp_path, "a")
    assert front_matter(on_hub)["base_model"] == "meta-llama/Llama-3.2-1B"
    assert (f"| started from | `{dpo}` (a dpo-hpc dpo run), from `{sft}` (a dpo-hpc sft run), from "
            "`Qwen/Qwen2.5-0.5B` |") in card


def test_a_local_base_model_is_no_hub_base_model_and_a_loop_is_cut(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    card = model_card(dpo_config(policy_name=str(base)), "dpo", MANIFEST_DONE, None, tmp_path, "r")
    assert "base_model" not in front_matter(card)
    a = run_directory(tmp_path / "a", "dpo", str(tmp_path / "b"))
    run_directory(tmp_path / "b", "dpo", a)
    assert len(lineage(a)) == 3 and lineage(a)[-1] == (a, None)
    deep = [run_directory(tmp_path / f"d{i}", "dpo", str(tmp_path / f"d{i + 1}")) for i in range(LINEAGE_LIMIT + 5)]
    assert len(lineage(deep[0])) == LINEAGE_LIMIT


def test_an_adapter_and_a_reward_model_say_how_they_load(tmp_path):
    lora = model_card(dpo_config(lora={"r": 8}), "dpo", MANIFEST_DONE, None, tmp_path, "r")
    assert front_matter(lora)["library_name"] == "peft" and "lora" in front_matter(lora)["tags"]
    assert f'AutoPeftModelForCausalLM.from_pretrained("{tmp_path.resolve()}")' in lora
    assert "LoRA r = 8, alpha = 32" in lora
    merged = model_card(dpo_config(lora={"r": 8, "merge": True}), "dpo", MANIFEST_DONE, None, tmp_path, "r")
    assert f'AutoModelForCausalLM.from_pretrained("{tmp_path.resolve()}/merged")' in merged
    inside = model_card(dpo_config(lora={"r": 8, "merge": True}), "dpo", MANIFEST_DONE, None, tmp_path / "merged",
                        "r", merged=True)  # the card of the merged model's own folder: a plain transformers model
    assert front_matter(inside)["library_name"] == "transformers" and "peft" not in inside
    assert f'AutoModelForCausalLM.from_pretrained("{(tmp_path / "merged").resolve()}")' in inside
    reward = validate_mapping({"policy_name": "m", "dataset": {"dataset_name": "d.jsonl"},
                               "reward_training": {"learning_rate": 1e-5, "batch_size": 8, "save_dir": "/o"}}, "reward")
    card = model_card(reward, "reward", {**MANIFEST_DONE, "world_size": 1}, None, tmp_path, "rm")
    assert front_matter(card)["pipeline_tag"] == "text-classification"
    assert "AutoModelForSequenceClassification.from_pretrained" in card and "| loss |" in card
    assert "| steps | 30 optimizer steps of 8 pairs" in card


def test_every_trainer_states_its_method():
    assert all(algo.method for algo in ALGORITHMS.values())


def completed_run(folder, cfg) -> RunDir:
    folder.mkdir()
    (folder / RESOLVED_CONFIG).write_text(json.dumps({"trainer": "dpo", **to_dict(cfg)}))
    (folder / MANIFEST).write_text(json.dumps(MANIFEST_DONE))
    (folder / DATA_REPORT).write_text(json.dumps({"train": {"rows": 9, "kept": 9}}))
    return RunDir(folder)


def test_a_card_is_written_again_from_the_records_but_never_over_someone_elses_readme(tmp_path):
    cfg = dpo_config()
    run = completed_run(tmp_path / "run", cfg)
    assert rewrite_model_card(run.root) == f"wrote {run.root / CARD}"
    written = (run.root / CARD).read_text()
    assert written == model_card(cfg, "dpo", MANIFEST_DONE, {"train": {"rows": 9, "kept": 9}}, run.root, "run")
    assert write_model_card(run, cfg, "dpo", MANIFEST_DONE) is None  # ours: written again
    (run.root / CARD).write_text("# our lab's notes\n")
    assert write_model_card(run, cfg, "dpo", MANIFEST_DONE) == (f"left {run.root / CARD} as it is (not a model "
                                                                 "card dpo-hpc wrote)")
    assert (run.root / CARD).read_text() == "# our lab's notes\n"


def test_only_a_completed_run_directory_gets_a_card(tmp_path):
    with pytest.raises(ConfigError, match="not a dpo-hpc run directory"):
        rewrite_model_card(tmp_path)
    run = completed_run(tmp_path / "run", dpo_config())
    run.annotate(status="preempted")
    with pytest.raises(ConfigError, match=r"has not completed \(status 'preempted'\)"):
        rewrite_model_card(run.root)


def test_settings_are_written_as_toml_that_reads_back_the_same():
    settings = {"a": {"b.c": "q\"uote\\ \u00e9 \U0001F600 \n", "list": [1, 2.5, True, {"x y": -0.0}]},
                "inf": float("inf"), "n": 3}
    text = "\n".join(f"{'.'.join(map(toml_key, path))} = {toml_value(value)}" for path, value in flat(settings))
    assert tomllib.loads(text) == settings


def test_an_adapter_on_another_runs_adapter_loads_through_dpo_hpc(tmp_path):
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "adapter_config.json").write_text("{}")
    card = model_card(dpo_config(policy_name=str(sft), lora={"r": 8}), "dpo", MANIFEST_DONE, None, tmp_path, "r")
    assert f'model = load_causal_lm("{tmp_path.resolve()}", "fp32", trainable=False)' in card
    assert f"whose base, `{sft}`, is another run's adapter" in card and "AutoPeft" not in card


def test_a_link_planted_at_the_cards_place_is_replaced_not_written_through(tmp_path):
    cfg = dpo_config()
    run = completed_run(tmp_path / "run", cfg)
    (tmp_path / "precious").write_text("keep")
    (run.root / CARD).symlink_to(tmp_path / "precious")
    assert write_model_card(run, cfg, "dpo", MANIFEST_DONE) is None
    assert not (run.root / CARD).is_symlink() and MARK in (run.root / CARD).read_text()
    assert (tmp_path / "precious").read_text() == "keep"


def test_a_folder_at_the_cards_place_is_left_and_said(tmp_path):
    cfg = dpo_config()
    run = completed_run(tmp_path / "run", cfg)
    (run.root / CARD).mkdir()
    assert write_model_card(run, cfg, "dpo", MANIFEST_DONE) == f"left {run.root / CARD} as it is (not a model " \
                                                                "card dpo-hpc wrote)"
