"""Model loading options a TRL user brings: remote code refused unless allowed, the load dtype
(pure bf16 training), the padding token, and which end of a long prompt is kept."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import run_config
from dpo_hpc.config import ConfigError, validate_mapping
from dpo_hpc.data.hh import PreferencePair, RenderedConversation
from dpo_hpc.data.sources import DataError
from dpo_hpc.data.tokenize import SpecialTokens, tokenize_conversation, tokenize_pair
from dpo_hpc.tiny_model import build_byte_tokenizer

pytestmark = pytest.mark.slow


def test_a_model_with_its_own_code_is_refused_unless_trusted(tmp_path, micro_model):
    from dpo_hpc.trainers.engine import load_causal_lm

    folder = tmp_path / "custom"
    folder.mkdir()
    config = json.loads((micro_model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomModel"}
    config["model_type"] = "custom-remote"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ConfigError, match=r"needs its own Python code to load; set trust_remote_code = true"):
        load_causal_lm(str(folder), "fp32", trainable=True)


def test_fp16_off_a_gpu_is_refused_before_anything_is_written(tmp_path, micro_model, reverse_data):
    """Where DeepSpeed's device is a CPU, on a GPU machine too (DS_ACCELERATOR=cpu, as here)."""
    from dpo_hpc.trainers.trainer import train

    raw = run_config(tmp_path, micro_model, reverse_data, "dpo_training", max_steps=2, batch_size=4)
    raw["precision"] = "fp16"
    with pytest.raises(ConfigError, match=r"precision: fp16 needs a CUDA GPU \(this run trains on cpu\)"):
        train(validate_mapping(raw, "dpo"), "dpo")
    assert not (Path(raw["dpo_training"]["save_dir"]) / "data_report.json").exists()


def test_pure_bf16_keeps_weights_and_adam_state_in_bf16(tmp_path, micro_model, reverse_data):
    from dpo_hpc.config import algorithm
    from dpo_hpc.trainers.trainer import Trainer

    raw = run_config(tmp_path, micro_model, reverse_data, "dpo_training", max_steps=2, batch_size=4)
    raw["torch_dtype"] = "bfloat16"  # with precision fp32: TRL's bf16 (no fp32 master weights)
    trainer = Trainer(validate_mapping(raw, "dpo"), algorithm("dpo"))
    assert trainer.train()["status"] == "completed"
    params = list(trainer.engine.module.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    states = [s for s in trainer.engine.optimizer.state.values() if "exp_avg" in s]
    assert states and {s["exp_avg"].dtype for s in states} == {torch.bfloat16}


def test_pad_token_and_truncation_mode(micro_model):
    from dpo_hpc.trainers.engine import load_tokenizer

    assert load_tokenizer(str(micro_model), pad_token="</s>").pad_token == "</s>"
    with pytest.raises(ConfigError, match="pad_token = '<nope>' is not a token of tokenizer"):
        load_tokenizer(str(micro_model), pad_token="<nope>")

    tok = build_byte_tokenizer()
    special = SpecialTokens.of(tok)
    pair = PreferencePair("abcdefghij", "X", "Y")
    end, _ = tokenize_pair(tok, pair, special, 16, 4, Counter(), "keep_end")
    start, _ = tokenize_pair(tok, pair, special, 16, 4, Counter(), "keep_start")
    assert tok.decode(end.prompt_ids) == "ghij" and tok.decode(start.prompt_ids) == "<s>abc"
    conversation = RenderedConversation("question answer", ((9, 15),))
    kept_end, _ = tokenize_conversation(tok, conversation, special, 10, Counter(), "keep_end")
    kept_start, _ = tokenize_conversation(tok, conversation, special, 12, Counter(), "keep_start")
    assert tok.decode(kept_end.input_ids) == "on answer</s>"
    assert tok.decode(kept_start.input_ids) == "<s>question an"
    assert tokenize_conversation(tok, conversation, special, 8, Counter(), "keep_start") == \
        (None, "too_long_after_truncation")  # nothing of the reply left


def test_chat_template_renders_conversational_rows_for_a_base_tokenizer_and_is_saved_with_the_model(tmp_path,
                                                                                                   micro_model):
    """A base model's tokenizer has no chat template (Mistral v0.1, many base models): SFT on
    conversational rows with ``chat_template``, and the run's tokenizer carries it on."""
    from transformers import AutoTokenizer

    from dpo_hpc.data.verifiable import write_dataset
    from dpo_hpc.tiny_model import CHAT_TEMPLATE
    from dpo_hpc.trainers.engine import load_tokenizer
    from dpo_hpc.trainers.trainer import train

    base = build_byte_tokenizer()
    base.chat_template = None
    base.save_pretrained(tmp_path / "base_tokenizer")
    with pytest.raises(ConfigError, match=r"chat_template: not a Jinja template: .* \(line 1\)"):
        load_tokenizer(str(tmp_path / "base_tokenizer"), chat_template="{% for m in messages %}")
    write_dataset(tmp_path / "data", n_train=40, n_test=4, seed=0, label_noise=0.0, data_format="conversational")
    raw = run_config(tmp_path, micro_model, tmp_path / "data/train.jsonl", "sft_training", max_steps=1, batch_size=4)
    raw["tokenizer_name"] = str(tmp_path / "base_tokenizer")
    with pytest.raises(DataError, match="set chat_template, use a tokenizer with one"):
        train(validate_mapping(raw, "sft"), "sft")
    template = CHAT_TEMPLATE.replace("<|", "[").replace("|>", "]")
    raw["chat_template"] = template
    raw["sft_training"]["save_dir"] = str(tmp_path / "with_template")
    assert train(validate_mapping(raw, "sft"), "sft")["status"] == "completed"
    assert AutoTokenizer.from_pretrained(tmp_path / "with_template").chat_template == template
