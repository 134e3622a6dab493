"""The original framework's Python API on the tiny model (real DeepSpeed, a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_hpc.data.verifiable import generate

pytestmark = pytest.mark.slow


def load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir),
            AutoTokenizer.from_pretrained(model_dir))


def test_dynamic_beta_dpo_trainer_api(tmp_path, micro_model):
    import datasets

    from dpo_hpc.trainers import DPOTrainingConfig, DynamicBetaDPOConfig, DynamicBetaDPOTrainer

    policy, ref, tok = load(micro_model)
    rows, _, _ = generate(48, 0, seed=1)
    trainer = DynamicBetaDPOTrainer(
        model=policy, ref_model=ref,
        args=DPOTrainingConfig(learning_rate=2e-3, batch_size=4, max_steps=4, save_dir=str(tmp_path / "dyn")),
        dynamic_cfg=DynamicBetaDPOConfig(beta_0=0.1, delta=0.1, warmup_steps=2, alpha=0.05),
        train_dataset=datasets.Dataset.from_list(rows[:40]), eval_dataset=rows[40:], tokenizer=tok,
        max_length=96, max_prompt_length=64,
    )
    summary = trainer.train()
    assert "rewards/accuracies" in summary["final_eval"]
    resolved = json.loads((tmp_path / "dyn" / "config.resolved.json").read_text())
    assert resolved["risk_test"] == {**resolved["risk_test"], "beta_warmup": 2, "lambda": 0.05}
    assert (tmp_path / "dyn" / "model.safetensors").is_file()


def test_beta_dpo_trainer_api_with_dict_args_and_no_eval(tmp_path, micro_model):
    from dpo_hpc.trainers import BetaDPOConfig, BetaDPOTrainer

    policy, ref, tok = load(micro_model)
    rows, _, _ = generate(32, 0, seed=2)
    trainer = BetaDPOTrainer(model=policy, ref_model=ref,
                             args={"learning_rate": 1e-3, "batch_size": 4, "max_steps": 3, "save_dir": str(tmp_path / "b")},
                             beta_dpo_cfg=BetaDPOConfig(beta_0=0.1, m=0.9, rho=0.8), train_dataset=rows,
                             processing_class=tok, max_length=96, max_prompt_length=64)
    assert trainer.train()["final_eval"] == {}
    manifest = json.loads((Path(tmp_path) / "b" / "run_manifest.json").read_text())
    assert manifest["trainer"] == "beta_dpo" and manifest["status"] == "completed"


def test_api_with_precomputed_reference_log_probs_of_an_in_memory_model(tmp_path, micro_model):
    """An in-memory reference has no files to key a cache on: the table is computed, not cached."""
    from dpo_hpc.trainers import BetaDPOTrainer

    policy, ref, tok = load(micro_model)
    rows, _, _ = generate(32, 0, seed=3)
    summary = BetaDPOTrainer(model=policy, ref_model=ref, train_dataset=rows, tokenizer=tok, max_length=96,
                             max_prompt_length=64,
                             args={"learning_rate": 1e-3, "batch_size": 4, "max_steps": 2, "save_dir": str(tmp_path / "p"),
                                   "precompute_ref_log_probs": True}).train()
    assert summary["ref_log_probs"] == "computed" and summary["reference_forwards"] == 0
    assert not (tmp_path / "p" / "ref_log_probs").exists()


def test_api_refuses_a_shared_reference(micro_model):
    from dpo_hpc.trainers import DPOTrainingConfig, DynamicBetaDPOTrainer

    policy, _, tok = load(micro_model)
    with pytest.raises(ValueError, match="ref_model must be a separate frozen copy"):
        DynamicBetaDPOTrainer(model=policy, ref_model=policy, tokenizer=tok, train_dataset=[],
                              args=DPOTrainingConfig(learning_rate=1e-3, batch_size=2, save_dir="x"))


def test_kto_trainer_api_on_labelled_completions(tmp_path, micro_model):
    from dpo_hpc.data.hh import parse_preference_row
    from dpo_hpc.trainers import KTOTrainer, KTOTrainingConfig

    policy, ref, tok = load(micro_model)
    rows, _, _ = generate(24, 0, seed=3)
    pairs = [parse_preference_row(r)[0] for r in rows]  # HH transcripts -> prompt, chosen, rejected
    completions = [{"prompt": p.prompt, "completion": getattr(p, side), "label": side == "chosen"}
                   for p in pairs for side in ("chosen", "rejected")]
    trainer = KTOTrainer(model=policy, ref_model=ref,
                         args=KTOTrainingConfig(learning_rate=1e-3, batch_size=4, max_steps=3, desirable_weight=1.2,
                                                save_dir=str(tmp_path / "kto")),
                         train_dataset=completions[:40], eval_dataset=completions[40:], processing_class=tok,
                         max_length=96, max_prompt_length=64)
    summary = trainer.train()
    assert {"kl", "rewards/margins"} <= set(summary["final_eval"])
    resolved = json.loads((tmp_path / "kto" / "config.resolved.json").read_text())
    assert resolved["kto_training"]["desirable_weight"] == 1.2
    report = json.loads((tmp_path / "kto" / "data_report.json").read_text())
    assert (report["train"]["desirable"], report["validation"]["undesirable"]) == (20, 4)


def test_reward_trainer_api_from_a_model_name_or_a_reward_model(tmp_path, micro_model):
    """As TRL's RewardTrainer: ``model`` a name (a causal LM's, loaded as a reward model) or a
    sequence-classification model; no reference."""
    from transformers import AutoModelForSequenceClassification

    from dpo_hpc.trainers import RewardTrainer, RewardTrainingConfig

    _, _, tok = load(micro_model)
    rows, _, _ = generate(24, 0, seed=3)
    args = dict(learning_rate=1e-3, batch_size=4, max_steps=2, center_rewards_coefficient=0.01)
    by_name = RewardTrainer(model=str(micro_model), args=RewardTrainingConfig(**args, save_dir=str(tmp_path / "a")),
                            train_dataset=rows[:20], eval_dataset=rows[20:], processing_class=tok,
                            max_length=96, max_prompt_length=64).train()
    assert {"rewards/accuracies", "rewards/margins"} <= set(by_name["final_eval"])
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a")
    assert model.config.num_labels == 1
    again = RewardTrainer(model=model, args={**args, "save_dir": str(tmp_path / "b")}, train_dataset=rows[:20],
                          tokenizer=tok, max_length=96, max_prompt_length=64).train()
    assert again["status"] == "completed"
    resolved = json.loads((tmp_path / "b" / "config.resolved.json").read_text())
    assert resolved["reward_training"]["center_rewards_coefficient"] == 0.01 and "ref_name" not in resolved
