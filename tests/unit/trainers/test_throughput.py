"""FLOPs per token against perf.md's hand figures, the device peak table, and MFU left out on CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dpo_hpc.trainers import throughput
from dpo_hpc.trainers.throughput import FlopsModel, peak_flops


def llama(**kw):
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**kw))


def test_llama_3_2_1b_shape_matches_the_hand_count():
    """perf.md section 3: 6N = 7.42 GFLOP/token; 7.82 GFLOP/token for training at T = 1024."""
    model = llama(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
    flops = FlopsModel.of(model)
    assert 6 * flops.matmul_params / 1e9 == pytest.approx(7.414, abs=1e-3)
    assert flops.train(torch.tensor([1024])) / 1024 / 1e9 == pytest.approx(7.817, abs=1e-3)
    assert flops.forward(torch.tensor([1024])) / 1024 / 1e9 == pytest.approx(2 * 1.2357 + 4 * 16 * 32 * 64 * 1024 / 1e9,
                                                                               abs=1e-3)


def test_untied_embedding_is_a_lookup_and_lengths_add_up():
    h, f, layers, vocab = 64, 128, 2, 300
    model = llama(vocab_size=vocab, hidden_size=h, intermediate_size=f, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    per_layer = 4 * h * h + 3 * h * f  # q, k, v, o and the gated MLP
    flops = FlopsModel.of(model)
    assert flops.matmul_params == layers * per_layer + vocab * h  # the head counts, the embedding does not
    lengths = torch.tensor([3, 5])
    assert flops.train(lengths) == sum(t * (6 * flops.matmul_params + 12 * layers * 4 * 16 * t) for t in (3, 5))


def test_peak_flops_by_device_name(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None  # no MFU rather than a guessed peak
    for name, tflops in [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
                         ("NVIDIA A100-SXM4-80GB", 312), ("Tesla V100-SXM2-32GB", None)]:
        monkeypatch.setattr(throughput.torch.cuda, "get_device_name", lambda device, n=name: n)
        got = peak_flops(torch.device("cuda", 0))
        assert got == (None if tflops is None else tflops * 1e12), name


def test_the_manifest_keeps_small_throughput_figures(tmp_path):
    """A tiny model's MFU (1e-5) is kept to 6 significant digits, not rounded to 0 (seen on an H100)."""
    from dpo_hpc.checkpoint import RunDir
    from dpo_hpc.trainers.metrics import MetricsLogger

    logger = MetricsLogger(RunDir(tmp_path), total_steps=3, start_step=0, logging_steps=10, is_main=False,
                           say=lambda _: None)
    for step, mfu in enumerate((9e-6, 1.23456e-5, 2.5e-5), 1):  # the first step is warm-up: left out
        logger.log_step(step, {"loss": 0.7, "learning_rate": 1e-4, "tokens_per_sec": 1234.5678, "perf/mfu": mfu,
                               "perf/step_seconds": 0.25}, {})
    summary = logger.throughput()
    assert summary["median_mfu"] == 1.86728e-5  # the median of the last two
    assert summary["median_tokens_per_sec"] == 1234.57 and summary["median_step_seconds"] == 0.25


@pytest.mark.parametrize("tied, frozen", [(True, False), (False, False), (True, True)])
def test_the_flops_model_counts_what_torch_runs(tied, frozen):
    """Against torch's own FLOP counter over a real forward and backward (full logits, eager
    attention: every matmul in sight of the counter), one sequence at a time, so no padding."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                         tie_word_embeddings=tied, attn_implementation="eager"))
    if frozen:  # as LoRA's base: no weight gradients, the input gradients still flow
        for layer in model.model.layers:
            layer.mlp.requires_grad_(False)
    lengths = torch.tensor([5, 17, 1])
    flops = FlopsModel.of(model)
    # Some transformers versions compute the rotary angles as a matmul (head_dim / 2 frequencies by
    # each position, 2 FLOPs each, forward only); the convention leaves them out
    rotary = 16 * int(lengths.sum())
    counter = FlopCounterMode(display=False)
    with counter:
        for length in lengths.tolist():
            model(input_ids=torch.randint(0, 300, (1, length))).logits.float().sum().backward()
    assert counter.get_total_flops() - flops.train(lengths) in (0, rotary)
    with counter, torch.no_grad():
        for length in lengths.tolist():
            model(input_ids=torch.randint(0, 300, (1, length)))
    assert counter.get_total_flops() - flops.forward(lengths) in (0, rotary)
