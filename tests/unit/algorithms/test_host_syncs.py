"""The GPU fast path's micro-batch (padding-free rows through varlen_attn: policy forward, reference
log-probs, loss, backward) never makes the host wait for the device. Every such wait drains the
launch queue: the GPU idles while Python catches up, which costs most at small micro-batches.

On a CPU the ops that wait on a GPU are caught at the dispatcher: reading a value (``.item()``,
``float()``, ``bool()``), ``nonzero`` and what is built on it (boolean indexing, ``masked_select``),
shapes that depend on values (``unique``, ``repeat_interleave`` without its size). A host copy
(``.cpu()``, ``.tolist()``) is invisible there, as is the attention kernel, which needs CUDA; on a
CUDA machine the same micro-batch also runs under ``torch.cuda.set_sync_debug_mode("error")``,
which catches every kind of wait.

Beta-DPO is left out by design: its filter draws from a CPU generator (the same draw on every
rank and device), so each micro-batch copies its gaps to the host once.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpo_hpc.algorithms.beta import LOCAL
from dpo_hpc.algorithms.beta.dynamic_beta import DynamicBetaController, DynamicBetaPolicy
from dpo_hpc.algorithms.beta.fixed import FixedBeta
from dpo_hpc.algorithms.logprobs import CompletionScorer
from dpo_hpc.algorithms.losses import Sigmoid
from dpo_hpc.algorithms.objectives import PreferenceObjective, SFTObjective
from dpo_hpc.config import BetaUpdateConfig, RiskTestConfig
from dpo_hpc.data.collate import to_device
from dpo_hpc.data.tokenize import TokenizedConversation, TokenizedPair
from dpo_hpc.trainers import varlen_attention

aten = torch.ops.aten
WAITING_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
               aten.nonzero.default, aten.masked_select.default, aten.repeat_interleave.Tensor,
               aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


class HostWaits(TorchDispatchMode):
    """Records every op that would make the host wait for a GPU, with the line that asked for it."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        waits = func in WAITING_OPS or (func in INDEXING and any(
            index is not None and index.dtype in (torch.bool, torch.uint8) for index in args[1]))
        if waits:
            caller = [f for f in traceback.extract_stack() if "/torch/" not in f.filename][-2]
            self.seen.append(f"{func} from {caller.filename}:{caller.lineno} ({caller.name})")
        return func(*args, **(kwargs or {}))


def random_pairs(count: int) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(0)
    return [TokenizedPair(*(torch.randint(3, 200, (int(k),), generator=g).tolist()
                            for k in torch.randint(1, 12, (3,), generator=g))) for _ in range(count)]


def conversations(count: int) -> list[TokenizedConversation]:
    return [TokenizedConversation(pair.prompt_ids + pair.chosen_ids,
                                  [0] * len(pair.prompt_ids) + [1] * len(pair.chosen_ids))
            for pair in random_pairs(count)]


def objectives(reference):
    fixed = PreferenceObjective(reference, Sigmoid(), FixedBeta(0.1), 0, LOCAL, CompletionScorer(), layout="flat")
    dynamic = DynamicBetaPolicy(DynamicBetaController(RiskTestConfig(), BetaUpdateConfig()), LOCAL)
    return {
        "dpo, online reference": (fixed, random_pairs(6)),
        "dpo, precomputed reference": (fixed, random_pairs(6)),
        "dynamic beta with rpo": (PreferenceObjective(reference, Sigmoid(), dynamic, 0, LOCAL, CompletionScorer(),
                                                      rpo_alpha=0.5, layout="flat"), random_pairs(6)),
        "sft": (SFTObjective(0, CompletionScorer(), layout="flat"), conversations(6)),
    }


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.fixture(scope="module")
def tiny_llama_path(tmp_path_factory):
    from dpo_hpc.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("m"), seed=0, hidden_size=32, num_layers=2, num_heads=4,
                           intermediate_size=64, max_position_embeddings=64)


def load(path, device: str):
    from transformers import AutoModelForCausalLM

    varlen_attention.register()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the kernel takes bf16, not fp32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=varlen_attention.NAME)
    model.config.use_cache = False  # as load_causal_lm leaves every model
    return model.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(objectives(None)))
def test_a_padding_free_micro_batch_never_waits_for_the_device(tiny_llama_path, device, case):
    policy, reference = load(tiny_llama_path, device), load(tiny_llama_path, device)
    objective, examples = objectives(reference)[case]
    batch = objective.collate(examples)
    if case == "dpo, precomputed reference":
        batch["ref_logps"] = torch.zeros(2 * len(examples))
    batch = to_device(batch, torch.device(device))  # before the check: the trainer's one host-to-device copy
    waits = HostWaits()
    with waits:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):  # the second time past any first-call setup
                loss_sum, stats = objective.loss_and_stats(policy, batch)
                loss_sum.backward()
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    assert waits.seen == []
    assert loss_sum.isfinite() and policy.lm_head.weight.grad.abs().sum() > 0  # the micro-batch ran for real
    if isinstance(objective, PreferenceObjective):
        assert objective.reference_forwards == (0 if "ref_logps" in batch else 2)


def test_the_check_sees_the_waits_it_names(tiny_llama_path):
    """A padded batch through sdpa: transformers reads its padding mask on the host before every
    forward (whether the rows are padded at all), and the check names that line."""
    model = load(tiny_llama_path, "cpu")
    model.set_attn_implementation("sdpa")
    objective = PreferenceObjective(model, Sigmoid(), FixedBeta(0.1), 0, LOCAL, CompletionScorer())
    batch = objective.collate(random_pairs(4))
    waits = HostWaits()
    with waits:
        objective.loss_and_stats(model, batch)[0].backward()
        torch.tensor([1.0, 2.0]).sum().item()
    assert any("masking_utils.py" in line for line in waits.seen)
    assert "aten._local_scalar_dense.default from" in waits.seen[-1] and __file__ in waits.seen[-1]
