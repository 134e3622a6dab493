"""Sample generations (``generate_during_eval``, TRL's name): the policy's greedy completions of a
fixed handful of validation prompts at each evaluation, beside the data's reply, so a researcher
reads what the model says as it trains, not only its margins.

Greedy decoding in eval mode draws no random number, so a run trains the same, and resumes bit
for bit the same, with samples or without.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..config.schema import VARLEN_ATTN
from ..data.tokenize import TokenizedCompletion, TokenizedPair


@dataclass(frozen=True)
class Sampling:
    """Drawing completions instead of taking the greedy one (transformers' names)."""

    samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no cut (transformers' own default is 50)."""


@dataclass(frozen=True)
class SamplePrompt:
    prompt_ids: list[int]
    reply_ids: list[int]
    """The data's reply: a pair's chosen completion, or an SFT conversation's last trained reply."""


def last_trained_span(loss_mask: Sequence[int]) -> tuple[int, int]:
    """[start, end) of the last run of trained tokens."""
    end = max(i for i, m in enumerate(loss_mask) if m) + 1
    start = end
    while start > 0 and loss_mask[start - 1]:
        start -= 1
    return start, end


def sample_prompts(examples: Sequence, count: int) -> list[SamplePrompt]:
    """The first ``count`` examples with a prompt to complete (the same ones at every evaluation)."""
    prompts = []
    for example in examples:
        if isinstance(example, TokenizedPair):
            prompt = SamplePrompt(list(example.prompt_ids), list(example.chosen_ids))
        elif isinstance(example, TokenizedCompletion):  # KTO's: a desirable completion is the data's reply
            if not example.label:
                continue
            prompt = SamplePrompt(list(example.prompt_ids), list(example.completion_ids))
        else:  # an SFT conversation: everything before its last reply is the prompt
            start, end = last_trained_span(example.loss_mask)
            prompt = SamplePrompt(list(example.input_ids[:start]), list(example.input_ids[start:end]))
        if prompt.prompt_ids:
            prompts.append(prompt)
        if len(prompts) == count:
            break
    return prompts


def stop_token_ids(tokenizer, model) -> list[int]:
    """EOS and the ids the model's generation config stops at (a chat model's end of turn, such as
    Llama 3's ``<|eot_id|>`` or Qwen's ``<|im_end|>``)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]
    return sorted({i for i in ids if i is not None})


@contextlib.contextmanager
def decoding(model):
    """The model made fit to decode from a KV cache for the call: ``varlen_attn`` (whole sequences
    only) swapped for sdpa, and compiled blocks run eagerly (each new length would recompile them)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a LoRA model's own
    implementation = getattr(base.config, "_attn_implementation", None)
    if implementation == VARLEN_ATTN:
        base.set_attn_implementation("sdpa")
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        if implementation == VARLEN_ATTN:
            base.set_attn_implementation(implementation)


@torch.no_grad()
def greedy_completions(model, prompts: Sequence[Sequence[int]], pad_id: int, stop_ids: Sequence[int],
                       max_new_tokens: int, synced: bool = False) -> list[list[int]]:
    """Each prompt's greedy continuation, up to and including its first stop token. ``synced``:
    every rank calls with the same prompts (ZeRO-3, whose forwards gather weights from all ranks)."""
    return completions(model, prompts, pad_id, stop_ids, max_new_tokens, synced=synced)


@torch.no_grad()
def completions(model, prompts: Sequence[Sequence[int]], pad_id: int, stop_ids: Sequence[int], max_new_tokens: int,
                synced: bool = False, sampling: Optional[Sampling] = None) -> list[list[int]]:
    """Each prompt's continuations, up to and including the first stop token: its greedy one, or
    ``sampling.samples`` drawn from the global generator (prompt by prompt, in order)."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, row in enumerate(prompts):  # left-padded, so that every row's next token is at the same place
        input_ids[i, width - len(row):] = torch.tensor(list(row))
        attention[i, width - len(row):] = 1
    device = next(model.parameters()).device
    # A config of its own: the model's may sample (temperature, top_p) where greedy is asked, and
    # its top_k (transformers' default 50) would cut the distribution that sampling asks for whole
    drawn = dict(do_sample=False) if sampling is None else dict(
        do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        num_return_sequences=sampling.samples)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids), pad_token_id=pad_id,
                              use_cache=True, **drawn)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                         generation_config=config, synced_gpus=synced)
    found = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stop_ids), len(row))
        found.append(row[:end])
    return found


def sample_rows(step: int, prompts: Sequence[SamplePrompt], completions: Sequence[list[int]], tokenizer,
                stop_ids: Sequence[int]) -> list[dict[str, Any]]:
    """One record per sample, as ``samples/step_<N>.jsonl`` holds them; special tokens are shown
    (a chat template's markers are part of what the model learned to write)."""
    def text(ids):
        return tokenizer.decode(ids, skip_special_tokens=False)

    return [{"step": step, "sample": i, "prompt": text(p.prompt_ids), "reference": text(p.reply_ids),
             "completion": text(c), "completion_tokens": len(c), "stopped": bool(c) and c[-1] in stop_ids}
            for i, (p, c) in enumerate(zip(prompts, completions))]
