"""Log-probabilities of completion tokens under a causal LM."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from .preference import desensitized_token_weights


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t >= 1, shape (B, T - 1), computed in fp32.

    Uses gather - logsumexp rather than a full log_softmax so only one (B, T, V) fp32 copy of
    the logits exists at a time.
    """
    logits = logits[:, :-1].float()
    labels = input_ids[:, 1:].unsqueeze(-1)
    return torch.gather(logits, -1, labels).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log-probs of the tokens where ``loss_mask`` is 1, per row: shape (B,)."""
    mask = loss_mask[:, 1:].to(torch.float32)
    return (token_logps(logits, input_ids) * mask).sum(-1)


# ---- the lm_head at completion positions only, chunked ----------------------------------------
# Full-vocabulary fp32 logits for every position are most of a DPO step's activation memory
# ((B, T, V) x 4 bytes, again for logsumexp and its gradient). Only positions whose next token
# carries loss need the head, and never all of the vocabulary at once.

CHUNK_BYTES = 256 * 2**20
"""fp32 logits held at once by the chunked head (forward and backward)."""


def _target_and_shifted_exp(logits: torch.Tensor, targets: torch.Tensor):
    """(target logit, row peak, exp(logits - peak)) in fp32; the exp overwrites fp32 ``logits``."""
    logits = logits.float()
    target = logits.gather(-1, targets[:, None]).squeeze(-1)
    peak = logits.amax(dim=-1, keepdim=True)
    peak = peak.masked_fill(peak.isinf(), 0.0)  # as torch.logsumexp: an infinite row stays infinite, not nan
    return target, peak.squeeze(-1), logits.sub_(peak).exp_()


def chunk_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each row's target, logsumexp of the row), fp32, from one chunk's logits.
    Overwrites fp32 ``logits`` (the caller's own matmul output): no chunk-sized temporary."""
    target, peak, exp = _target_and_shifted_exp(logits, targets)
    lse = exp.sum(dim=-1).log_().add_(peak)
    return target - lse, lse


def chunk_logps_sum_sq(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``chunk_logps`` and log sum_v p_v^2 of each row (WPO's weights; TRL's ``log_sum_sq_probs``):
    with e = exp(logits - peak), sum p^2 = sum e^2 / (sum e)^2, so one more pass over the chunk."""
    target, peak, exp = _target_and_shifted_exp(logits, targets)
    log_total = exp.sum(dim=-1).log_()
    lse = log_total + peak
    log_sum_sq = exp.square_().sum(dim=-1).log_().sub_(2 * log_total)
    return target - lse, lse, log_sum_sq


def chunk_grad_logits(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor,
                       grad_out: torch.Tensor) -> torch.Tensor:
    """d loss / d logits of one chunk in the logits' dtype: grad_out * (onehot(target) - softmax).
    Overwrites fp32 ``logits`` (the caller's own matmul output): no chunk-sized temporaries."""
    dtype = logits.dtype
    grad = logits.float().sub_(lse[:, None]).exp_().mul_(-grad_out[:, None])
    return grad.scatter_add_(1, targets[:, None], grad_out[:, None].float()).to(dtype)


@dataclass(frozen=True)
class ChunkMath:
    """The elementwise work on a chunk's logits: as written (eager: each op reads or writes the whole
    chunk, about six passes each way; on a GPU, by estimate, as much time as the head's matmuls),
    or compiled into one or two passes each way (``torch_compile``, bf16/fp16 logits)."""

    logps: Callable = chunk_logps
    grad_logits: Callable = chunk_grad_logits
    logps_sum_sq: Callable = chunk_logps_sum_sq


EAGER = ChunkMath()


@functools.cache
def compiled_chunk_math() -> ChunkMath:
    # dynamic: the last chunk of a batch has fewer rows, and batches have different numbers of rows
    return ChunkMath(*(torch.compile(f, dynamic=True) for f in (chunk_logps, chunk_grad_logits, chunk_logps_sum_sq)))


class _TargetLogps(torch.autograd.Function):
    """log softmax(h W^T)[target] per row, in row chunks with fp32 accumulation; the backward
    recomputes each chunk's logits instead of keeping them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, math: ChunkMath, sum_sq: bool):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        log_sum_sq = torch.empty_like(out) if sum_sq else out.new_empty(0)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            if sum_sq:
                out[rows], lse[rows], log_sum_sq[rows] = math.logps_sum_sq(hidden[rows] @ weight.T, targets[rows])
            else:
                out[rows], lse[rows] = math.logps(hidden[rows] @ weight.T, targets[rows])
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_rows, ctx.math = chunk_rows, math
        ctx.mark_non_differentiable(log_sum_sq)
        return out, log_sum_sq

    @staticmethod
    def backward(ctx, grad_out, _grad_log_sum_sq):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            grad_logits = ctx.math.grad_logits(hidden[rows] @ weight.T, lse[rows], targets[rows], grad_out[rows])
            # Both matmuls in the model's dtype (bf16 on a GPU: tensor cores, fp32 accumulation
            # inside; an fp32 matmul there is an order of magnitude slower); the chunks' weight
            # gradients are summed in fp32.
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.add_(grad_logits.T @ hidden[rows])
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None, None


def _default_chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


def target_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 chunk_rows: int | None = None, math: ChunkMath = EAGER) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) under the head ``weight`` (V, H), shape (N,), fp32; never more
    than ``chunk_rows`` rows of logits exist (default: ``CHUNK_BYTES`` of fp32 logits)."""
    rows = chunk_rows or _default_chunk_rows(weight.shape[0])
    return _TargetLogps.apply(hidden, weight, targets, rows, math, False)[0]


def target_logps_sum_sq(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        chunk_rows: int | None = None, math: ChunkMath = EAGER) -> tuple[torch.Tensor, torch.Tensor]:
    """``target_logps``, and log sum_v p_v^2 of each row (detached) from the same chunks."""
    rows = chunk_rows or _default_chunk_rows(weight.shape[0])
    return _TargetLogps.apply(hidden, weight, targets, rows, math, True)


def log_sum_sq_probs(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v p_v^2 of each row of (N, V) ``logits``, fp32, without gradient (the full-logits
    path), ``CHUNK_BYTES`` of fp32 rows at a time: no second full-size fp32 copy."""
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    rows = _default_chunk_rows(logits.shape[-1])
    with torch.no_grad():
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start:start + rows].float()
            out[start:start + rows] = torch.logsumexp(2 * chunk, dim=-1) - 2 * torch.logsumexp(chunk, dim=-1)
    return out


# Config attributes of models whose logits are not plain ``lm_head(h)`` (soft-capping, scaling):
# for those the head is never split off.
_LOGIT_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _identity(hidden):
    return hidden


def model_inputs(batch: dict) -> dict:
    """The forward's arguments for a padded or a packed batch (``dpo_hpc.data.collate``). Packing
    also needs the model's KV cache off (``load_causal_lm`` turns it off), or transformers would
    not look for packed sequences. A flat batch's boundaries go down as transformers'
    flash-attention kwargs, which variable-length kernels read and the others ignore."""
    layout = "position_ids" if "position_ids" in batch else "attention_mask"
    inputs = {"input_ids": batch["input_ids"], layout: batch[layout]}
    if "cu_seq_lens" in batch:
        inputs.update(cu_seq_lens_q=batch["cu_seq_lens"], cu_seq_lens_k=batch["cu_seq_lens"],
                      max_length_q=batch["max_length"], max_length_k=batch["max_length"])
    return inputs


@dataclass(frozen=True)
class Scored:
    """One forward's log-probs of the loss tokens, each with its sequence; and the router's
    load-balancing loss, where the model returns one (a mixture of experts set to output its
    router logits). Optionally each token's weight in its sequence's sum (LD-DPO's) and, with no
    gradient, log sum_v p_v^2 at each token (WPO's)."""

    rows: torch.Tensor
    logps: torch.Tensor
    sequences: int
    aux_loss: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None
    log_sum_sq: torch.Tensor | None = None

    def sequence_sums(self, weighted: bool = True) -> torch.Tensor:
        """Per-sequence sums of the log-probs (weighted by ``token_weights`` unless told not),
        shape (sequences,), fp32."""
        weights = self.token_weights if weighted else None
        return self.per_sequence(self.logps if weights is None else self.logps * weights)

    def per_sequence(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums of per-token ``values``, shape (sequences,)."""
        return torch.zeros(self.sequences, dtype=values.dtype, device=values.device).index_add(0, self.rows, values)


class CompletionScorer:
    """Log-probs of the loss tokens of a batch under a causal LM (a transformers model, or a
    DeepSpeed engine around one).

    Where the output head is a plain bias-free linear layer held whole on this rank, the model
    runs with its head skipped and ``target_logps`` applies the head at loss positions only, in
    chunks: no (B, T, V) tensor exists. Otherwise (ZeRO-3 partitioned weights, soft-capped or
    scaled logits, a model that does not call its head) the full logits are used.
    """

    def __init__(self, chunk_rows: int | None = None, compiled: bool = False, ld_alpha: float | None = None):
        self.chunk_rows = chunk_rows
        self.compiled = compiled
        self.ld_alpha = ld_alpha  # LD-DPO: a pair batch's sums weigh the longer reply's tail by it

    def chunk_math(self, dtype: torch.dtype) -> ChunkMath:
        """Compiled (``torch_compile``) for bf16/fp16 logits, whose fp32 copy the eager ops walk
        about six times; fp32 logits are already worked on in place, and the compiled form would
        add a copy back (``python bench/logprob_head.py``)."""
        return compiled_chunk_math() if self.compiled and dtype != torch.float32 else EAGER

    @staticmethod
    def splittable_head(model):
        module = getattr(model, "module", model)  # a DeepSpeed engine holds the model as .module
        get_head = getattr(module, "get_output_embeddings", None)
        head = get_head() if get_head is not None else None
        if not isinstance(head, torch.nn.Linear) or head.bias is not None or hasattr(head.weight, "ds_id"):
            return None  # ds_id: a ZeRO-3 partition, not the whole weight
        config = getattr(module, "config", None)
        if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_MODIFIERS):
            return None
        return head

    def _forward(self, model, batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(final hidden states, head weight), or (logits, None) on the full-logits path; and the
        router's load-balancing loss where the model returns one."""
        head = self.splittable_head(model)
        if head is None:
            out = model(**model_inputs(batch))
            return out.logits, None, getattr(out, "aux_loss", None)
        head.forward = _identity  # shadows Linear.forward for this call only: the model returns h
        try:
            out = model(**model_inputs(batch))
        finally:
            del head.forward
        aux_loss = getattr(out, "aux_loss", None)
        if out.logits.shape[-1] != head.in_features:  # the model computed logits without calling its head
            return out.logits, None, aux_loss
        return out.logits, head.weight, aux_loss

    def score(self, model, batch, sum_sq: bool = False) -> Scored:
        """The log-prob of every token where ``loss_mask`` is 1, and the sequence it belongs to;
        with ``sum_sq``, also log sum_v p_v^2 at each of those tokens."""
        out, weight, aux_loss = self._forward(model, batch)
        rows, positions = batch["loss_rows"], batch["loss_positions"]  # position t predicts token t + 1
        log_sum_sq = None
        if weight is not None:
            head = (out[rows, positions], weight, batch["input_ids"][rows, positions + 1], self.chunk_rows,
                    self.chunk_math(out.dtype))
            logps, log_sum_sq = target_logps_sum_sq(*head) if sum_sq else (target_logps(*head), None)
        else:
            logps = token_logps(out, batch["input_ids"])[rows, positions]
            if sum_sq:
                log_sum_sq = log_sum_sq_probs(out[rows, positions])
        if "sequence_ids" in batch:  # packed: rows hold several sequences
            rows = batch["sequence_ids"][rows, positions]
        weights = None if self.ld_alpha is None else desensitized_token_weights(rows, batch["loss_tokens"],
                                                                                self.ld_alpha)
        return Scored(rows, logps, batch["sequence_lengths"].shape[0], aux_loss, weights, log_sum_sq)

    def token_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence of each loss token, its log-prob), over the tokens where ``loss_mask`` is 1."""
        scored = self.score(model, batch)
        return scored.rows, scored.logps

    def sequence_logps(self, model, batch) -> torch.Tensor:
        """Per-sequence sums of the loss tokens' log-probs (LD-DPO's weights applied), shape
        (sequences,), fp32."""
        return self.score(model, batch).sequence_sums()
