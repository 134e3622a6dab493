"""``attn_implementation = "varlen_attn"``: packed sequences through PyTorch's own variable-length
flash-attention kernel (``torch.nn.attention.varlen``, CUDA, torch >= 2.9). Padding-free training
with no extra package and nothing to compile, unlike flash-attn (a CUDA build per cluster) and
flex attention (minutes of inductor compiling on the first batches, again per new shape).

Registered with transformers' ``AttentionInterface``; no mask function is registered, so
transformers builds no mask at all. The sequence boundaries come as the flash-attention kwargs
transformers passes down to every layer (``cu_seq_lens_q``/``_k``, ``max_length_q``/``_k``:
``dpo_hpc.data.collate``'s flat layout carries them). A batch without them is one sequence per
row, which is right for the unpadded and right-padded rows this package makes: under causal
attention no real token sees the padding after it.

Where the kernel cannot run (a CPU, fp32 inputs, a GPU older than Ampere, torch < 2.9) each
sequence goes through sdpa on its own: the same math, no padding either, slower on a GPU.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..config.schema import VARLEN_ATTN as NAME

# Set by load_kernel(), not at import: torch.nn.attention.varlen imports torch._dynamo (about a
# second per process), which every run that does not use varlen_attn would pay.
_varlen_attn = None
# The keyword arguments this torch's kernel takes: 2.9 has is_causal; later ones window_size and
# scale; 2.12 enable_gqa. Read once, so a compiled block traces none of it.
_KERNEL_OPTIONS: frozenset = frozenset()


def load_kernel():
    """Import PyTorch's kernel (idempotent); None where this torch has none (< 2.9)."""
    global _varlen_attn, _KERNEL_OPTIONS
    if _varlen_attn is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:  # torch < 2.9
            return None
        _varlen_attn, _KERNEL_OPTIONS = varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)
    return _varlen_attn


def _ampere_or_newer(device: torch.device) -> bool:
    # get_device_properties, which torch.compile folds to a constant: no graph break per layer
    return device.type == "cuda" and torch.cuda.get_device_properties(device).major >= 8


def kernel_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether PyTorch's flash kernel takes these inputs (else each sequence runs through sdpa)."""
    return _varlen_attn is not None and dtype in (torch.float16, torch.bfloat16) and _ampere_or_newer(device)


def describe(device: torch.device, dtype: torch.dtype, padding_free: bool) -> str:
    """The run's line on which path its attention takes."""
    load_kernel()
    if kernel_runs(device, dtype):
        line = "varlen_attn: PyTorch's variable-length flash-attention kernel"
    else:
        why = ("this torch has no torch.nn.attention.varlen (2.9 or later has)" if _varlen_attn is None
               else "the kernel runs on CUDA GPUs from Ampere on" if not _ampere_or_newer(device)
               else f"the kernel takes bf16 or fp16, not {str(dtype).removeprefix('torch.')}")
        line = f"varlen_attn: each sequence through sdpa ({why})"
    return line + ("" if padding_free else "; padded rows as they are (padding_free = true puts every sequence "
                                           "in one row, without padding)")


def _flash(q, k, v, cu_seq_lens, max_length: int, scale: float, causal: bool):
    options, kwargs = _KERNEL_OPTIONS, {}
    if "window_size" in options:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if "scale" in options:
        kwargs["scale"] = scale
    elif scale != q.shape[-1] ** -0.5:
        q = q * (scale * q.shape[-1] ** 0.5)  # the kernel's own scale is 1/sqrt(head_dim)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in options:
            kwargs["enable_gqa"] = True
        else:  # an older kernel wants one key/value head per query head
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return _varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, **kwargs)


def _per_sequence(q, k, v, cu_seq_lens, scale: float, causal: bool):
    bounds = cu_seq_lens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(f"varlen_attn: cu_seq_lens {bounds[0]}..{bounds[-1]} do not cover the {q.shape[0]} tokens")
    out = [F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                          is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
           for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(out, dim=1).transpose(0, 1)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             is_causal=None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers' attention signature: query (B, Hq, T, D), key/value (B, Hkv, T, D) ->
    ((B, T, Hq, D), None)."""
    batch, heads, length, head_dim = query.shape
    if key.shape[2] != length:
        raise ValueError("varlen_attn scores whole sequences (training, reference passes); it does not decode "
                         "from a KV cache: generate with attn_implementation = \"sdpa\"")
    if dropout:
        raise ValueError("varlen_attn has no attention dropout (dpo-hpc trains with dropout off)")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scale = scaling if scaling is not None else head_dim ** -0.5
    if cu_seq_lens_q is None:  # one sequence per row
        cu_seq_lens_q = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=query.device)
        max_length_q = length
    # (B, H, T, D) -> (B * T, H, D): the kernels' token-major layout
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], head_dim) for x in (query, key, value))
    if kernel_runs(query.device, query.dtype):
        out = _flash(q, k, v, cu_seq_lens_q.to(torch.int32), int(max_length_q), scale, causal)
    else:
        out = _per_sequence(q, k, v, cu_seq_lens_q, scale, causal)
    return out.reshape(batch, length, heads, head_dim), None


def register() -> None:
    """Make ``attn_implementation = "varlen_attn"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    load_kernel()
    AttentionInterface.register(NAME, varlen_attention_forward)
