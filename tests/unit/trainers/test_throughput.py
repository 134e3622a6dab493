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
