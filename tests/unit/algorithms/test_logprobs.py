"""The chunked output head: log-probs and gradients against a naive float64 log-softmax, and the
scorer's split head against the full-logits path on a real (tiny) Llama."""

from __future__ import annotations

import pytest
import torch

from dpo_hpc.algorithms.logprobs import (EAGER, CompletionScorer, chunk_logps, compiled_chunk_math, log_sum_sq_probs,
                                         sequence_logps, target_logps, target_logps_sum_sq)
from dpo_hpc.algorithms.preference import desensitized_token_weights
from dpo_hpc.data.collate import collate_pairs
from dpo_hpc.data.tokenize import TokenizedPair
from dpo_hpc.trainers import varlen_attention


def naive(hidden, weight, targets):
    return torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("seed, math", [*((seed, EAGER) for seed in range(12)),
                                        *((seed, "compiled") for seed in range(3))])
def test_target_logps_and_gradients_match_float64(seed, math):
    """Eager, and compiled as ``torch_compile`` runs it."""
    math = compiled_chunk_math() if math == "compiled" else math
    g = torch.Generator().manual_seed(seed)
    n, h, v = int(torch.randint(1, 60, (1,), generator=g)), 16, int(torch.randint(2, 300, (1,), generator=g))
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)
    chunk = int(torch.randint(1, n + 2, (1,), generator=g))
    got = target_logps(hidden, weight, targets, chunk_rows=chunk, math=math)
    assert got.dtype == torch.float32 and got.shape == (n,)
    grad_h, grad_w = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    ref_h = hidden.detach().double().requires_grad_()
    ref_w = weight.detach().double().requires_grad_()
    expected = naive(ref_h, ref_w, targets)
    want_h, want_w = torch.autograd.grad((expected * upstream.double()).sum(), (ref_h, ref_w))
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_h.double(), want_h, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_w.double(), want_w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_the_head_gives_log_sum_sq_probs_and_the_same_log_probs_and_gradients(seed):
    """WPO's log sum_v p_v^2 from the chunks (and from full logits) against float64; asking for it
    leaves the log-probs and their gradients bit for bit as they were."""
    g = torch.Generator().manual_seed(seed)
    n, v = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(2, 300, (1,), generator=g))
    hidden = torch.randn(n, 16, generator=g, requires_grad=True)
    weight = torch.randn(v, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    chunk = int(torch.randint(1, n + 2, (1,), generator=g))
    logps, log_sum_sq = target_logps_sum_sq(hidden, weight, targets, chunk_rows=chunk)
    plain = target_logps(hidden, weight, targets, chunk_rows=chunk)
    assert torch.equal(logps, plain) and not log_sum_sq.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(logps.sum(), (hidden, weight)),
                                                  torch.autograd.grad(plain.sum(), (hidden, weight))))
    probs = torch.softmax(hidden.detach().double() @ weight.detach().double().T, -1)
    expected = probs.square().sum(-1).log()
    torch.testing.assert_close(log_sum_sq.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(log_sum_sq_probs(hidden @ weight.T).double(), expected, rtol=0, atol=1e-5)


def test_ld_dpo_weights_are_one_up_to_the_shorter_reply_and_alpha_beyond():
    """Hand values: two pairs, chosen replies of 3 and 2 tokens, rejected of 5 and 2, the tokens in
    packed order (the second pair's rejected first)."""
    sequences = torch.tensor([3, 3, 0, 0, 0, 2, 2, 2, 2, 2, 1, 1])
    got = desensitized_token_weights(sequences, torch.tensor([3, 2, 5, 2]), 0.25)
    assert got.tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 0.25, 0.25, 1, 1]


def test_torch_compile_compiles_the_head_math_of_half_precision_logits_only():
    """fp32 logits are worked on in place already (compiling them adds a copy back)."""
    assert CompletionScorer().chunk_math(torch.bfloat16) is EAGER
    assert CompletionScorer(compiled=True).chunk_math(torch.bfloat16) is compiled_chunk_math()
    assert CompletionScorer(compiled=True).chunk_math(torch.float16) is compiled_chunk_math()
    assert CompletionScorer(compiled=True).chunk_math(torch.float32) is EAGER


def test_the_chunk_logsumexp_is_torchs_on_extreme_rows():
    """Computed in place over the chunk; rows with -inf entries, all -inf or an +inf entry come out
    as torch.logsumexp has them (no nan from inf - inf)."""
    logits = torch.tensor([[0.5, -1.0, 3.0], [float("-inf"), 2.0, 1e4], [float("-inf")] * 3, [1.0, float("inf"), 0.0]])
    targets = torch.tensor([2, 1, 0, 0])
    logps, lse = chunk_logps(logits.clone(), targets)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))
    torch.testing.assert_close(logps, logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1),
                               equal_nan=True)


def test_bf16_hidden_states_give_fp32_log_probs():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(9, 8, generator=g), torch.randn(40, 8, generator=g)
    targets = torch.randint(0, 40, (9,), generator=g)
    got = target_logps(hidden.bfloat16(), weight.bfloat16(), targets, chunk_rows=4)
    assert got.dtype == torch.float32
    # as the model's own head: bf16 logits, then log-softmax accumulated in fp32 (here checked in fp64)
    logits = (hidden.bfloat16() @ weight.bfloat16().T).double()
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


def test_bf16_gradients_are_as_close_as_the_models_own_bf16_head():
    """The chunked backward runs its matmuls in bf16 (GPU tensor cores): its gradients stay as close
    to float64 as those of a bf16 head through autograd, the path it replaces."""
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(64, 32, generator=g).bfloat16(), torch.randn(500, 32, generator=g).bfloat16()
    targets, upstream = torch.randint(0, 500, (64,), generator=g), torch.randn(64, generator=g)

    def grads(logps_of, dtype):
        h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        return torch.autograd.grad((logps_of(h, w).double() * upstream.double()).sum(), (h, w))

    def head(h, w):  # the model's own head: bf16 logits, log-softmax in fp32
        return torch.log_softmax((h @ w.T).float(), -1).gather(-1, targets[:, None]).squeeze(-1)

    exact = grads(lambda h, w: naive(h, w, targets), torch.float64)
    autograd = grads(head, torch.bfloat16)
    for math in (EAGER, compiled_chunk_math()):
        chunked = grads(lambda h, w: target_logps(h, w, targets, chunk_rows=16, math=math), torch.bfloat16)
        for ours, theirs, truth in zip(chunked, autograd, exact):
            assert ours.dtype == torch.bfloat16
            assert (ours.double() - truth).abs().max() <= 1.5 * (theirs.double() - truth).abs().max()


class FullLogits(CompletionScorer):
    @staticmethod
    def splittable_head(model):
        return None


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from dpo_hpc.tiny_model import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("m"), seed=0, hidden_size=32, num_layers=2, num_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_split_head_equals_full_logits_on_a_llama(llama):
    g = torch.Generator().manual_seed(3)
    pairs = [TokenizedPair(*(torch.randint(3, 200, (int(k),), generator=g).tolist() for k in lens))
             for lens in ([4, 6, 2], [9, 1, 5], [1, 3, 3])]
    batch = collate_pairs(pairs, pad_id=0)
    scorer = CompletionScorer(chunk_rows=5)
    assert scorer.splittable_head(llama) is llama.lm_head
    split = scorer.sequence_logps(llama, batch)
    split_grads = torch.autograd.grad(split.sum(), list(llama.parameters()))
    full = FullLogits().sequence_logps(llama, batch)
    full_grads = torch.autograd.grad(full.sum(), list(llama.parameters()))
    logits = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(split, sequence_logps(logits, batch["input_ids"], batch["loss_mask"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(split, full, rtol=0, atol=1e-5)
    for a, b in zip(split_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert llama.lm_head(torch.zeros(1, 32)).shape == (1, llama.config.vocab_size)  # the head is restored


def test_soft_capped_logits_keep_the_full_head(llama, monkeypatch):
    monkeypatch.setattr(llama.config, "final_logit_softcapping", 30.0, raising=False)
    assert CompletionScorer.splittable_head(llama) is None


# ---- padding-free batches -------------------------------------------------------------------

def random_pairs(seed: int, count: int) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (count, 3), generator=g).tolist()
    return [TokenizedPair(*(torch.randint(3, 200, (k,), generator=g).tolist() for k in lens)) for lens in lengths]


@pytest.mark.parametrize("seed", range(8))
def test_packed_rows_hold_every_sequence_whole_and_never_more_slots(seed):
    pairs = random_pairs(seed, 1 + seed)
    layout = "flat" if seed % 2 else "packed"
    padded, packed = collate_pairs(pairs, pad_id=0), collate_pairs(pairs, pad_id=0, layout=layout)
    assert "attention_mask" not in packed and packed["input_ids"].numel() <= padded["input_ids"].numel()
    rows, width = packed["input_ids"].shape
    if layout == "flat":
        assert (rows, width) == (1, padded["sequence_lengths"].sum())
        lengths = padded["sequence_lengths"]
        assert packed["cu_seq_lens"].dtype == torch.int32 and packed["max_length"] == int(lengths.max())
        assert packed["cu_seq_lens"].tolist() == [0, *torch.cumsum(lengths, 0).tolist()]
    else:  # a dense mask over each row: never more attention work than the padded batch
        assert rows * width**2 <= padded["input_ids"].shape[0] * padded["input_ids"].shape[1] ** 2
    for key in ("sequence_lengths", "loss_tokens"):
        assert torch.equal(packed[key], padded[key])
    for batch in (padded, packed):  # found on the host: the hidden states that predict loss tokens
        rows_, positions = batch["loss_mask"][:, 1:].nonzero(as_tuple=True)
        assert torch.equal(batch["loss_rows"], rows_) and torch.equal(batch["loss_positions"], positions)
    for i, length in enumerate(padded["sequence_lengths"].tolist()):
        rows, cols = torch.nonzero(packed["sequence_ids"] == i, as_tuple=True)
        assert rows.unique().numel() == 1 and torch.equal(cols, torch.arange(cols[0], cols[0] + length))  # whole
        assert torch.equal(packed["input_ids"][rows, cols], padded["input_ids"][i, :length])
        assert torch.equal(packed["position_ids"][rows, cols], torch.arange(length))
        assert packed["loss_mask"][rows[0], cols[0]] == 0  # predicted from another sequence's last token
        assert torch.equal(packed["loss_mask"][rows, cols][1:], padded["loss_mask"][i, 1:length])
    tail = packed["sequence_ids"] == -1
    assert not packed["loss_mask"][tail].any()
    assert torch.equal(collate_pairs(pairs, pad_id=0, layout=layout)["input_ids"], packed["input_ids"])  # deterministic


def trl_ld_logps(per_token: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """TRL 1.16's LD-DPO sums over a padded [chosen; rejected] batch, as its trainer writes them."""
    positions, lengths = mask.cumsum(dim=1), mask.sum(dim=1)
    chosen, rejected = lengths.chunk(2)
    shared = torch.minimum(chosen, rejected).repeat(2)
    shared_mask = (positions > 0) & (positions <= shared[:, None]) & mask.bool()
    tail_mask = (positions > shared[:, None]) & mask.bool()
    return (per_token * shared_mask).sum(1) + alpha * (per_token * tail_mask).sum(1)


@pytest.mark.parametrize("layout", ["padded", "packed", "flat"])
def test_ld_dpo_sums_are_trls_in_every_layout(llama, layout):
    llama.config.use_cache = False  # as load_causal_lm leaves every model: packed rows are then kept apart
    pairs = random_pairs(5, 7)
    batch = collate_pairs(pairs, pad_id=0, layout=layout)
    padded = collate_pairs(pairs, pad_id=0)
    logits = llama(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits.double()
    per_token = torch.log_softmax(logits[:, :-1], -1).gather(-1, padded["input_ids"][:, 1:, None]).squeeze(-1)
    expected = trl_ld_logps(per_token, padded["loss_mask"][:, 1:], 0.3)
    for scorer in (CompletionScorer(chunk_rows=5, ld_alpha=0.3), FullLogits(ld_alpha=0.3)):
        with torch.no_grad():
            torch.testing.assert_close(scorer.sequence_logps(llama, batch).double(), expected, rtol=1e-6, atol=1e-5)
    with torch.no_grad():  # 1 weighs every token as plain DPO does: the same sums, bit for bit
        assert torch.equal(CompletionScorer(ld_alpha=1.0).sequence_logps(llama, batch),
                           CompletionScorer().sequence_logps(llama, batch))


@pytest.mark.parametrize("attention, layout, scorer", [
    ("sdpa", "packed", CompletionScorer(chunk_rows=7)), ("eager", "packed", CompletionScorer(chunk_rows=7)),
    ("sdpa", "flat", CompletionScorer(chunk_rows=7)), ("sdpa", "flat", FullLogits()),
    ("varlen_attn", "flat", CompletionScorer(chunk_rows=7))])
def test_packed_batches_score_as_padded_ones_on_a_llama(llama, attention, layout, scorer):
    """Same per-sequence log-probs and gradients: transformers keeps the packed sequences apart
    (split head, and the full logits that ZeRO-3 and soft-capped models use)."""
    varlen_attention.register()
    llama.set_attn_implementation(attention)
    llama.config.use_cache = False  # as load_causal_lm leaves every model
    pairs = random_pairs(11, 6)
    padded, packed = collate_pairs(pairs, pad_id=0), collate_pairs(pairs, pad_id=0, layout=layout)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # sequences do share rows
    results = []
    for batch in (padded, packed):
        logps = scorer.sequence_logps(llama, batch)
        results.append((logps, torch.autograd.grad((logps * torch.arange(1.0, 13.0)).sum(), list(llama.parameters()))))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    for x, y in zip(grads_b, grads_a):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    llama.set_attn_implementation("sdpa")


def test_flex_attention_scores_a_flat_batch_as_sdpa_scores_padded_rows(llama):
    """The flat layout's backend on GPUs, here forward only (its backward exists only on GPUs)."""
    pairs = random_pairs(5, 4)
    llama.config.use_cache = False
    scorer = CompletionScorer()
    with torch.no_grad():
        llama.set_attn_implementation("sdpa")
        padded = scorer.sequence_logps(llama, collate_pairs(pairs, pad_id=0))
        llama.set_attn_implementation("flex_attention")
        try:
            flat = scorer.sequence_logps(llama, collate_pairs(pairs, pad_id=0, layout="flat"))
        finally:
            llama.set_attn_implementation("sdpa")
    torch.testing.assert_close(flat, padded, rtol=0, atol=1e-5)


def test_varlen_attn_needs_the_flat_layout_that_carries_the_boundaries(llama):
    from dpo_hpc.config.errors import ConfigError
    from dpo_hpc.trainers.engine import check_packing

    varlen_attention.register()
    llama.set_attn_implementation("varlen_attn")
    llama.config.use_cache = False
    try:
        check_packing(llama, "flat")
        with pytest.raises(ConfigError, match="with attn_implementation = 'varlen_attn' lets packed sequences"):
            check_packing(llama, "packed")  # rows of several sequences, no boundaries: one sequence per row
    finally:
        llama.set_attn_implementation("sdpa")


def test_a_model_that_does_not_keep_packed_sequences_apart_is_refused(llama):
    from dpo_hpc.config.errors import ConfigError
    from dpo_hpc.trainers.engine import check_packing

    llama.set_attn_implementation("sdpa")
    llama.config.use_cache = False
    check_packing(llama)
    llama.config.use_cache = True  # a KV cache hides the packing from transformers: one causal mask per row
    try:
        with pytest.raises(ConfigError, match="padding_free: LlamaForCausalLM with attn_implementation = 'sdpa' lets "
                                              "packed sequences attend to each other"):
            check_packing(llama)
    finally:
        llama.config.use_cache = False


def test_packed_rows_of_mixed_lengths_keep_little_padding_and_no_more_attention():
    """The README's figure: 64 pairs (128 sequences) of 150-800 tokens, packed under a dense mask."""
    import random

    from dpo_hpc.data.collate import pack_rows, pad_rows

    rng = random.Random(0)
    rows = [[5] * rng.randint(150, 800) for _ in range(128)]
    masks = [[1] * len(r) for r in rows]
    packed, padded = pack_rows(rows, masks, 0), pad_rows(rows, masks, 0)
    (r, w), (n, longest) = packed["input_ids"].shape, padded["input_ids"].shape
    assert (r * w, n * longest, sum(map(len, rows))) == (64_020, 101_760, 62_808)  # 2% of slots padding, not 38%
    assert r * w * w <= n * longest * longest
