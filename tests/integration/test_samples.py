"""Sample generations during evaluation (``generate_during_eval``) through the real trainer: the
files and TensorBoard text read back, the completions equal to an independent greedy decode of
the saved model, and the training untouched by them (no random draw, bit-equal losses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_config
from dpo_hpc.config import validate_mapping
from dpo_hpc.trainers.samples import last_trained_span, sample_prompts
from dpo_hpc.data.tokenize import TokenizedConversation, TokenizedPair

pytestmark = pytest.mark.slow


def read_samples(run_dir: Path) -> dict[int, list[dict]]:
    return {int(path.stem.split("_")[1]): [json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted((run_dir / "samples").glob("step_*.jsonl"))}


def naive_greedy(model, prompt_ids: list[int], stop_ids: set[int], max_new_tokens: int) -> list[int]:
    """One prompt, no padding, no KV cache: the argmax of the full forward, token by token."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        if token in stop_ids:
            break
    return ids[len(prompt_ids):]


def text_summaries(logdir: Path) -> dict[int, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("eval/samples/text_summary")}


def test_prompts_are_the_first_validation_rows_with_the_datas_reply():
    pair = TokenizedPair([1, 5, 6], [7, 2], [8, 2])
    sft = TokenizedConversation([1, 5, 6, 7, 2, 5, 9, 2], [0, 0, 0, 1, 1, 0, 1, 1])
    assert last_trained_span(sft.loss_mask) == (6, 8)
    prompts = sample_prompts([pair, sft, TokenizedConversation([7, 2], [1, 1]), pair], 3)
    assert [(p.prompt_ids, p.reply_ids) for p in prompts] == [([1, 5, 6], [7, 2]), ([1, 5, 6, 7, 2, 5], [9, 2]),
                                                              ([1, 5, 6], [7, 2])]  # no prompt: skipped


@pytest.mark.parametrize("section, trainer", [("dpo_training", "dpo"), ("sft_training", "sft")])
def test_samples_at_each_evaluation_match_a_naive_greedy_decode_and_leave_training_unchanged(
        tmp_path, micro_model, reverse_data, section, trainer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_hpc.trainers.trackers import read_scalars
    from dpo_hpc.trainers.trainer import train

    raw = run_config(tmp_path, micro_model, reverse_data, section, max_steps=4, batch_size=4, eval_steps=2,
                     generate_during_eval=True, generation_samples=3, max_new_tokens=12)
    train(validate_mapping(raw, trainer), trainer)
    run_dir = Path(raw[section]["save_dir"])
    found = read_samples(run_dir)
    assert sorted(found) == [0, 2, 4]  # before training, at each evaluation, at the end
    assert all(len(rows) == 3 for rows in found.values())
    final = found[4]

    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    stop = {tokenizer.eos_token_id}
    for row in final:
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        expected = naive_greedy(model, prompt_ids, stop, 12)
        assert row["completion"] == tokenizer.decode(expected, skip_special_tokens=False)
        assert row["completion_tokens"] == len(expected) and row["stopped"] == (expected[-1] in stop)
        assert row["reference"] and row["step"] == 4
    assert [r["prompt"] for r in found[0]] == [r["prompt"] for r in final]  # the same prompts every time

    shown = text_summaries(run_dir / "tensorboard")
    assert sorted(shown) == [0, 2, 4]
    assert "**sample 0**" in shown[4] and "*the policy's completion*" in shown[4]
    assert "\n".join("    " + line for line in final[0]["completion"].split("\n")) in shown[4]

    plain = run_config(tmp_path / "plain", micro_model, reverse_data, section, max_steps=4, batch_size=4, eval_steps=2)
    train(validate_mapping(plain, trainer), trainer)
    with_samples, without = read_scalars(run_dir / "tensorboard"), read_scalars(Path(plain[section]["save_dir"]) /
                                                                                 "tensorboard")
    for tag in ("train/loss", "eval/loss", "train/grad_norm"):
        assert with_samples[tag] == without[tag], tag  # bit-equal: generation took no random draw


@pytest.mark.parametrize("attn_implementation, compiled", [("sdpa", False), ("varlen_attn", False), ("sdpa", True)])
def test_batched_greedy_completions_equal_one_prompt_at_a_time(micro_model, attn_implementation, compiled):
    """Left-padded prompts of different lengths decode as each alone would; a varlen_attn model
    (whole sequences only) decodes through sdpa and comes back as it was; compiled blocks run eager."""
    from dpo_hpc.trainers.engine import compile_blocks, load_causal_lm
    from dpo_hpc.trainers.samples import decoding, greedy_completions

    model = load_causal_lm(str(micro_model), "fp32", trainable=False, attn_implementation=attn_implementation)
    with torch.no_grad():  # larger weights than the init's: completions that differ from prompt to prompt
        for parameter in model.parameters():
            parameter.mul_(8.0)
    prompts = [[1, 40, 41, 42, 43, 44, 45], [1, 50], [1, 60, 61, 62]]
    expected = [naive_greedy(model, p, set(), 6) for p in prompts]
    assert len({tuple(e) for e in expected}) == 3, expected  # the test can tell prompts apart
    if compiled:
        compile_blocks(model)
    with decoding(model):
        assert greedy_completions(model, prompts, pad_id=0, stop_ids=[], max_new_tokens=6) == expected
        stop = expected[1][2]  # a stop token ends that completion, kept as its last token
        cut = greedy_completions(model, prompts, pad_id=0, stop_ids=[stop], max_new_tokens=6)
    assert cut[1] == expected[1][:expected[1].index(stop) + 1]
    assert model.config._attn_implementation == attn_implementation


@pytest.mark.multiproc
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_two_ranks_generate_samples_rank_0_writes_them(tmp_path, micro_model, zero_stage):
    """torchrun, 2 ranks: rank 0 generates (under ZeRO-3 both do, each forward gathering the
    partitioned weights); the final samples are the saved model's own greedy completions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from test_training import small_data, torchrun_train, write_config

    raw = run_config(tmp_path, micro_model, small_data(tmp_path, 40), "dpo_training", max_steps=3, batch_size=4,
                     eval_steps=2, generate_during_eval=True, generation_samples=2, max_new_tokens=6)
    raw["deepspeed"] = {"zero_stage": zero_stage}
    result = torchrun_train(write_config(tmp_path, raw))
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = Path(raw["dpo_training"]["save_dir"])
    found = read_samples(run_dir)
    assert sorted(found) == [0, 2, 3] and all(len(rows) == 2 for rows in found.values())
    assert result.stdout.count("samples at step 3:") == 1  # said (and written) once, by rank 0
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    for row in found[3]:
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        expected = naive_greedy(model, prompt_ids, {tokenizer.eos_token_id}, 6)
        assert row["completion"] == tokenizer.decode(expected, skip_special_tokens=False)
