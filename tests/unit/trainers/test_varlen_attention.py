"""``attn_implementation = "varlen_attn"`` against a naive float64 attention with an explicit
block-diagonal causal mask: the per-sequence path here, PyTorch's flash kernel on a GPU, and the
kernel call adapted to each torch's ``varlen_attn`` signature."""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch

from dpo_hpc.trainers import varlen_attention
from dpo_hpc.trainers.varlen_attention import varlen_attention_forward


class Attention(torch.nn.Module):  # what transformers passes as ``module``
    is_causal = True


def naive(query, key, value, lengths, scale):
    """(B=1, Hq, T, D) inputs -> (1, T, Hq, D): softmax over an explicit mask, in float64."""
    q, k, v = (x[0].double() for x in (query, key, value))
    k, v = (x.repeat_interleave(q.shape[0] // x.shape[0], dim=0) for x in (k, v))
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(q.device)
    pos = torch.arange(q.shape[1], device=q.device)
    allowed = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)[None]


def inputs(seed, lengths, heads=4, kv_heads=2, head_dim=8, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(1, heads, total, head_dim, generator=g)
    k, v = (torch.randn(1, kv_heads, total, head_dim, generator=g) for _ in range(2))
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    return [x.to(device, dtype).requires_grad_() for x in (q, k, v)], cu


@pytest.mark.parametrize("seed", range(6))
def test_packed_sequences_attend_only_within_themselves(seed):
    g = torch.Generator().manual_seed(100 + seed)
    lengths = torch.randint(1, 20, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
    (q, k, v), cu = inputs(seed, lengths)
    scale = 0.3 if seed % 2 else None  # a model's own scaling, or 1/sqrt(head_dim)
    out, weights = varlen_attention_forward(Attention(), q, k, v, None, scaling=scale, cu_seq_lens_q=cu,
                                            max_length_q=max(lengths))
    expected = naive(q, k, v, lengths, scale or q.shape[-1] ** -0.5)
    assert weights is None and out.shape == (1, sum(lengths), 4, 8)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    upstream = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    want = torch.autograd.grad((expected * upstream.double()).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=1e-6)


def test_rows_without_boundaries_are_one_sequence_each():
    (q, k, v), _ = inputs(0, [6])
    rows = [x.detach().expand(3, -1, -1, -1) for x in (q, k, v)]  # three rows, one sequence each
    out, _ = varlen_attention_forward(Attention(), *rows, None)
    for row in range(3):
        torch.testing.assert_close(out[row:row + 1].double(), naive(q, k, v, [6], 8 ** -0.5), rtol=0, atol=1e-6)


def test_cached_decoding_and_dropout_are_refused():
    (q, k, v), cu = inputs(0, [5])
    with pytest.raises(ValueError, match="does not decode from a KV cache"):
        varlen_attention_forward(Attention(), q[:, :, -1:], k, v, None)
    with pytest.raises(ValueError, match="no attention dropout"):
        varlen_attention_forward(Attention(), q, k, v, None, dropout=0.1)
    with pytest.raises(ValueError, match="do not cover the 5 tokens"):
        varlen_attention_forward(Attention(), q, k, v, None, cu_seq_lens_q=torch.tensor([0, 3], dtype=torch.int32),
                                 max_length_q=3)


def signature_of(version: str):
    """A float64 stand-in for the kernel with the keyword arguments ``varlen_attn`` took in each torch."""
    def kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **options):
        assert set(options) <= allowed, options
        lengths = (cu_seq_q[1:] - cu_seq_q[:-1]).tolist()
        causal = options.get("is_causal", options.get("window_size") == (-1, 0))
        assert causal
        if key.shape[1] != query.shape[1]:
            assert options.get("enable_gqa"), "fewer key/value heads without enable_gqa"
        scale = options.get("scale", query.shape[-1] ** -0.5)
        return naive(*(x.transpose(0, 1)[None] for x in (query, key, value)), lengths, scale)[0].to(query.dtype)

    allowed = {"2.9": {"is_causal", "return_aux"}, "2.11": {"return_aux", "scale", "window_size"},
               "2.12": {"return_aux", "scale", "window_size", "enable_gqa"}}[version]
    parameters = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                  for n in ("query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k")]
    parameters += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in sorted(allowed)]
    kernel.__signature__ = inspect.Signature(parameters)
    return kernel


@pytest.mark.parametrize("version", ["2.9", "2.11", "2.12"])
def test_the_kernel_call_fits_each_torch_signature(monkeypatch, version):
    """Causality, the model's scaling and grouped key/value heads reach every version's kernel;
    the real kernel runs in the GPU test below."""
    kernel = signature_of(version)
    monkeypatch.setattr(varlen_attention, "_varlen_attn", kernel)
    monkeypatch.setattr(varlen_attention, "_KERNEL_OPTIONS", frozenset(inspect.signature(kernel).parameters))
    lengths = [3, 7, 1, 5]
    (q, k, v), cu = inputs(1, lengths)
    flat = [x.detach().transpose(1, 2)[0] for x in (q, k, v)]
    out = varlen_attention._flash(*flat, cu, max(lengths), 0.3, causal=True)
    torch.testing.assert_close(out[None].double(), naive(q, k, v, lengths, 0.3), rtol=0, atol=1e-6)


@pytest.mark.skipif(varlen_attention.load_kernel() is None, reason="this torch has no varlen_attn")
def test_the_kernel_path_traces_as_one_graph_for_torch_compile(monkeypatch):
    """torch_compile compiles each block whole only if the attention call does not break the graph
    (no host syncs, no device queries that dynamo cannot fold), and once for every batch only if
    the longest length stays symbolic (as the blocks compile: dynamic shapes). Traced here with
    fake tensors; the graph is not run (the kernel needs a GPU)."""
    monkeypatch.setattr(varlen_attention, "kernel_runs", lambda device, dtype: True)
    kernel_calls = []

    class Traced(Exception):
        pass

    def backend(graph, example_inputs):
        kernel_calls.extend(node for node in graph.graph.nodes
                            if node.op == "call_function" and str(node.target) == "torch_attn._varlen_attn")
        raise Traced

    (q, k, v), cu = inputs(0, [5, 15], heads=8, kv_heads=2, head_dim=64, dtype=torch.bfloat16)
    attention = torch.compile(lambda q, k, v, cu, longest: varlen_attention_forward(
        Attention(), q, k, v, None, cu_seq_lens_q=cu, max_length_q=longest)[0],
        backend=backend, fullgraph=True, dynamic=True)
    with pytest.raises(Exception, match="Traced"):
        attention(q.detach(), k.detach(), v.detach(), cu, 15)
    (call,) = kernel_calls
    max_q, max_k = call.args[5:7]
    assert isinstance(max_q, torch.fx.Node) and max_q is max_k  # a graph input, not the constant 15


def test_the_run_says_which_path_its_attention_takes():
    line = varlen_attention.describe(torch.device("cpu"), torch.float32, padding_free=True)
    assert line.startswith("varlen_attn: each sequence through sdpa (") and line.endswith(")")
    assert "padded rows as they are" in varlen_attention.describe(torch.device("cpu"), torch.float32, False)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0)
                    or varlen_attention._varlen_attn is None, reason="needs PyTorch's flash kernel (CUDA, Ampere+)")
def test_the_flash_kernel_is_as_close_to_float64_as_bf16_sdpa():
    """The kernel's outputs and gradients in bf16 against a float64 attention, as close as sdpa's
    own bf16 kernels run one sequence at a time (the per-sequence path) on the same inputs."""
    device = torch.device("cuda")
    assert varlen_attention.kernel_runs(device, torch.bfloat16)
    lengths = [37, 1, 130, 64, 5]
    (q, k, v), cu = inputs(2, lengths, heads=8, kv_heads=2, head_dim=64, dtype=torch.bfloat16, device=device)
    upstream = torch.randn(1, sum(lengths), 8, 64, generator=torch.Generator().manual_seed(3)).to(device)
    expected = naive(q, k, v, lengths, 64 ** -0.5)
    exact = torch.autograd.grad((expected * upstream.double()).sum(), (q, k, v))

    def errors(out):
        grads = torch.autograd.grad((out.float() * upstream).sum(), (q, k, v))
        return [(out.double() - expected).abs().max()] + [(g.double() - e.double()).abs().max()
                                                          for g, e in zip(grads, exact)]

    kernel, _ = varlen_attention_forward(Attention(), q, k, v, None, cu_seq_lens_q=cu, max_length_q=max(lengths))
    flat = [x.transpose(1, 2)[0] for x in (q, k, v)]
    sdpa = varlen_attention._per_sequence(*flat, cu, 64 ** -0.5, causal=True)[None]
    for ours, theirs in zip(errors(kernel), errors(sdpa)):
        assert ours <= 2 * theirs + 1e-3, (ours, theirs)
