"""FLOPs actually run, MFU and peak memory (perf.md section 3: the PaLM / nanoGPT / torchtitan
convention).

Per real (non-pad) token of a sequence of length T: training 6N + 12 L H Q T (4 instead of 6 for
frozen weights, e.g. LoRA's base: no weight gradient), a forward alone 2N + 4 L H Q T, with N the
matmul parameters (the output head counted, the embedding lookup not),
L layers, H query heads, Q the head dimension. Padding is never counted, so padding waste shows as
lower MFU. MFU divides by the device's dense bf16 peak; it is left out where the peak is unknown
(CPUs, unlisted GPUs) rather than guessed.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Optional

import torch

from .engine import param_shape

# Dense bf16 peak (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name(); the
# first match wins, so the specific names come first.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0),
)


def peak_flops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak in FLOP/s, or None where it is not known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


@dataclass(frozen=True)
class FlopsModel:
    matmul_params: int
    layers: int
    heads: int
    head_dim: int
    frozen_matmul_params: int = 0
    """Of those, the frozen ones (LoRA's base): no weight gradient, so 4 FLOPs per token, not 6."""

    @classmethod
    def of(cls, model) -> "FlopsModel":
        """From a transformers causal LM (before DeepSpeed wraps or partitions it)."""
        config = model.config
        embedding = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        seen, params, frozen = set(), 0, 0
        for p in model.parameters():
            if len(param_shape(p)) >= 2 and id(p) not in seen:
                seen.add(id(p))
                params += getattr(p, "ds_numel", p.numel())
                frozen += 0 if p.requires_grad else getattr(p, "ds_numel", p.numel())
        if head is None or head.weight is not embedding:  # an untied embedding is a lookup, not a matmul
            params -= getattr(embedding, "ds_numel", embedding.numel())
            frozen -= 0 if embedding.requires_grad else getattr(embedding, "ds_numel", embedding.numel())
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(params, config.num_hidden_layers, heads, head_dim, frozen)

    def train(self, lengths: torch.Tensor) -> float:
        """FLOPs of forward + backward over sequences of these real lengths."""
        lengths = lengths.double()
        weights = 6 * self.matmul_params - 2 * self.frozen_matmul_params
        return float((lengths * (weights + 12 * self.layers * self.heads * self.head_dim * lengths)).sum())

    def forward(self, lengths: torch.Tensor) -> float:
        """FLOPs of a forward alone (a reference model)."""
        lengths = lengths.double()
        return float((lengths * (2 * self.matmul_params + 4 * self.layers * self.heads * self.head_dim * lengths)).sum())


def describe_device(device: torch.device) -> str:
    """'cuda:0 NVIDIA H100 80GB HBM3, nccl' / 'cpu, gloo': where a run ran (for its manifest)."""
    name = f"{device} {torch.cuda.get_device_name(device)}" if device.type == "cuda" else str(device)
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    return f"{name}, {backend}"


def resident_memory_gib(device: torch.device) -> Optional[float]:
    """CUDA memory held between steps (weights, gradients, optimizer state): the peak above it is
    what a step's activations and temporaries cost. None off CUDA, where no allocator tells."""
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def allocator_retries(device: torch.device) -> Optional[int]:
    """How often the CUDA caching allocator has freed its cache and retried an allocation since
    the process began: above 0, steps near the memory limit stall. None off CUDA."""
    return torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if device.type == "cuda" else None


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak device memory (CUDA: allocated by torch; CPU: resident set)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
