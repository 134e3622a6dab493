"""Model loading options that fail before any weight is read."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dpo_hpc.config import ConfigError
from dpo_hpc.trainers.engine import load_causal_lm


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_the_package_is_one_clear_line():
    with pytest.raises(ConfigError, match="attn_implementation = 'flash_attention_2' needs the flash_attn package"):
        load_causal_lm("any/model", "bf16", trainable=True, attn_implementation="flash_attention_2")


def _llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).train()


def _saved_bytes_and_grads(model, input_ids):
    """Bytes the forward keeps for the backward, and the gradients the backward gives."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return sum(saved), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("every, checkpointed", [(1, [0, 1, 2, 3]), (2, [0, 2]), (3, [0, 3]), (8, [0])])
def test_checkpointing_every_kth_block_trades_memory_and_keeps_the_gradients(every, checkpointed):
    from dpo_hpc.trainers.engine import checkpoint_blocks

    input_ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    kept, grads = {}, {}
    for name, k in (("none", None), ("all", 1), ("selected", every)):
        model = _llama(4)
        if k is not None:
            assert checkpoint_blocks(model, k) == ((4, 4) if k == 1 else (len(checkpointed), 4))
        kept[name], grads[name] = _saved_bytes_and_grads(model, input_ids)
    assert [i for i, block in enumerate(model.model.layers) if block.gradient_checkpointing] == checkpointed
    for name, grad in grads["none"].items():  # recomputed activations are the same numbers
        torch.testing.assert_close(grads["selected"][name], grad, rtol=0, atol=0)
    assert kept["all"] < kept["none"] / 3
    # a checkpointed block keeps only its input; every other block all it kept before
    per_block = (kept["none"] - kept["all"]) / 4
    assert kept["selected"] == pytest.approx(kept["all"] + per_block * (4 - len(checkpointed)), rel=0.01)


def test_checkpointing_every_needs_checkpointing_on():
    from dpo_hpc.config.schema import TrainingConfig

    with pytest.raises(ValueError, match="every_n_layers = 2 applies with gradient_checkpointing = true"):
        TrainingConfig(learning_rate=1e-3, batch_size=1, save_dir="x", gradient_checkpointing_every_n_layers=2)


def test_one_rank_under_zero0_skips_the_gradient_allreduce_and_trains_bit_for_bit_the_same():
    """Averaging over one rank is the identity; DeepSpeed's ZeRO-0 path would still copy every
    gradient into flat buckets and back. Without it, the weights after 3 steps are the same bits."""
    from dpo_hpc.config import DeepSpeedConfig, SFTTrainingConfig
    from dpo_hpc.runtime import init_distributed
    from dpo_hpc.trainers.engine import build_engine, deepspeed_config

    init_distributed()
    training = SFTTrainingConfig(learning_rate=1e-2, batch_size=2, save_dir="unused")
    input_ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    weights = []
    for allreduce in (False, True):
        engine, _, _ = build_engine(_llama(2), training, deepspeed_config(training, DeepSpeedConfig(), "fp32", 1), 3)
        assert engine.enable_backward_allreduce is False
        engine.enable_backward_allreduce = allreduce
        for _ in range(3):
            engine.backward(engine(input_ids=input_ids, labels=input_ids).loss)
            engine.step()
        weights.append({name: p.detach().clone() for name, p in engine.module.named_parameters()})
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    start = dict(_llama(2).named_parameters())
    assert not all(torch.equal(weights[0][name], start[name]) for name in weights[0])  # it trained
