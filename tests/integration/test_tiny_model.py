"""The offline tiny model loads like a hub model, and the byte tokenizer round-trips text."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_hpc.tiny_model import build_byte_tokenizer


def test_tiny_model_loads_offline_and_generates(micro_model):
    model = AutoModelForCausalLM.from_pretrained(micro_model)
    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tokenizer)
    ids = tokenizer("\n\nHuman: Reverse: abc\n\nAssistant:", return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = build_byte_tokenizer()
    text = "\n\nHuman: héllo — 你好 🙂\n\nAssistant: ok"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
