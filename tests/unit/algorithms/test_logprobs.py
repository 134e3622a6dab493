"""The chunked output head: log-probs and gradients against a naive float64 log-softmax, and the
scorer's split head against the full-logits path on a real (tiny) Llama."""

from __future__ import annotations

import pytest
import torch

from dpo_hpc.algorithms.logprobs import CompletionScorer, sequence_logps, target_logps
from dpo_hpc.data.collate import collate_pairs
from dpo_hpc.data.tokenize import TokenizedPair


def naive(hidden, weight, targets):
    return torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("seed", range(12))
def test_target_logps_and_gradients_match_float64(seed):
    g = torch.Generator().manual_seed(seed)
    n, h, v = int(torch.randint(1, 60, (1,), generator=g)), 16, int(torch.randint(2, 300, (1,), generator=g))
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)
    chunk = int(torch.randint(1, n + 2, (1,), generator=g))
    got = target_logps(hidden, weight, targets, chunk_rows=chunk)
    assert got.dtype == torch.float32 and got.shape == (n,)
    grad_h, grad_w = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    ref_h = hidden.detach().double().requires_grad_()
    ref_w = weight.detach().double().requires_grad_()
    expected = naive(ref_h, ref_w, targets)
    want_h, want_w = torch.autograd.grad((expected * upstream.double()).sum(), (ref_h, ref_w))
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_h.double(), want_h, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_w.double(), want_w, rtol=0, atol=1e-5)


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
