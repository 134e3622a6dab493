"""On-policy pairs (``dpo-hpc make-pairs``): samples drawn prompt by prompt, scored by a reward
model as it scores one row alone, the best against the worst; a killed job resumes to the files
of one that never stopped; and DPO trains on what it wrote, in text and in conversational form."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_hpc import pairs
from dpo_hpc.data import DataError
from dpo_hpc.data.tokenize import SpecialTokens, encode_prompt
from dpo_hpc.pairs import PairSettings, RewardModel, make_pairs
from dpo_hpc.trainers.samples import Sampling, completions, greedy_completions

SETTINGS = PairSettings(samples=3, max_new_tokens=6, batch_size=4, limit=10)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, micro_model) -> Path:
    """The micro model with a seeded, untrained one-output head: scores that differ sample by sample."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(micro_model, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(micro_model).save_pretrained(folder)
    return folder


def test_near_zero_temperature_samples_are_each_prompts_greedy_completion(micro_model):
    """The samples come prompt by prompt, in order, each continuing its own (left-padded) prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(micro_model), AutoTokenizer.from_pretrained(micro_model)
    special = SpecialTokens.of(tok)
    prompts = [encode_prompt(tok, text, special) for text in ("\n\nHuman: Reverse: ab\n\nAssistant:", "x",
                                                             "\n\nHuman: Reverse: abcdefg\n\nAssistant:")]
    greedy = greedy_completions(model, prompts, special.pad_id, [special.eos_id], 5)
    drawn = completions(model, prompts, special.pad_id, [special.eos_id], 5, sampling=Sampling(3, temperature=1e-6))
    assert drawn == [g for g in greedy for _ in range(3)]
    torch.manual_seed(1)
    hot = completions(model, prompts, special.pad_id, [special.eos_id], 5, sampling=Sampling(3, temperature=2.0))
    assert len(hot) == 9 and len({tuple(c) for c in hot}) > 3  # drawn, not repeated


def test_reward_model_scores_a_batch_as_each_row_alone(micro_model, reward_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_model)
    judge = RewardModel(str(reward_model), tok, torch.device("cpu"), batch_size=3)
    prompt_ids, replies = [[1, 70, 71], [1, 72], [1, 73, 74, 75]], [[80, 81, tok.eos_token_id], [82], [83, 84]]
    got = judge.scores([], prompt_ids, replies, [])
    naive = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    for prompt, reply, score in zip(prompt_ids, replies, got):
        row = prompt + reply + ([] if reply[-1] == tok.eos_token_id else [tok.eos_token_id])
        with torch.no_grad():  # the head on the last token (EOS) of the row alone, unpadded
            alone = naive.score(naive.model(torch.tensor([row])).last_hidden_state[0, -1])[0]
        assert score == pytest.approx(alone.item(), abs=1e-5)


def test_pairs_resume_after_a_kill_to_the_same_files_and_dpo_trains_on_them(tmp_path, micro_model, reverse_data,
                                                                              reward_model, monkeypatch):
    prompts = reverse_data.parent / "test.jsonl"
    straight = make_pairs(str(micro_model), str(prompts), tmp_path / "straight", SETTINGS,
                          reward_model=str(reward_model), say=lambda line: None)
    out = tmp_path / "straight"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert straight["prompts"] == len(samples) == 10 and straight["pairs"] == len(rows) > 0
    assert straight["pairs"] + straight["skipped"]["no_reward_spread"] == 10
    by_row = {s["row"]: s for s in samples}
    for row in rows:
        drawn = by_row[row["row"]]
        assert len(drawn["samples"]) == 3 and row["prompt"] == drawn["prompt"]
        assert row["chosen_reward"] == max(drawn["rewards"]) > row["rejected_reward"] == min(drawn["rewards"])
        assert drawn["samples"][drawn["rewards"].index(max(drawn["rewards"]))] == row["chosen"]
    assert not (out / pairs.WORK).exists()

    # Killed after its second chunk: the chunks made stay, and the same command goes on from the third.
    made = []
    real = pairs._sampled_chunk

    def killed_after_two(*args):
        if len(made) == 2:
            raise KeyboardInterrupt
        made.append(args[-1])
        return real(*args)

    monkeypatch.setattr(pairs, "_sampled_chunk", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        make_pairs(str(micro_model), str(prompts), tmp_path / "resumed", SETTINGS, reward_model=str(reward_model),
                   say=lambda line: None)
    assert sorted(p.name for p in (tmp_path / "resumed" / pairs.WORK).glob("chunk_*")) == \
        ["chunk_000000.jsonl", "chunk_000001.jsonl"] and not (tmp_path / "resumed" / pairs.DONE).exists()
    monkeypatch.setattr(pairs, "_sampled_chunk", lambda *args: made.append(args[-1]) or real(*args))
    make_pairs(str(micro_model), str(prompts), tmp_path / "resumed", SETTINGS, reward_model=str(reward_model),
               say=lambda line: None)
    assert made == [0, 1, 2]  # 10 prompts in chunks of 4: the third chunk alone was made on resume
    for name in ("pairs.jsonl", "samples.jsonl"):
        assert (tmp_path / "resumed" / name).read_bytes() == (out / name).read_bytes(), name

    # Done is done; other settings in the same folder are refused, not mixed in.
    lines = []
    make_pairs(str(micro_model), str(prompts), out, SETTINGS, reward_model=str(reward_model), say=lines.append)
    assert made == [0, 1, 2] and "already holds these pairs" in lines[-1]
    with pytest.raises(DataError, match="another model, prompts or settings"):
        make_pairs(str(micro_model), str(prompts), out, PairSettings(samples=2, limit=10),
                   reward_model=str(reward_model), say=lambda line: None)

    train_dpo_on(tmp_path, micro_model, out / "pairs.jsonl", straight["pairs"])


def train_dpo_on(tmp_path: Path, model: Path, data: Path, rows: int) -> None:
    config = tmp_path / f"dpo_{data.parent.name}.json"
    config.write_text(json.dumps({
        "policy_name": str(model), "precision": "fp32",
        "dataset": {"dataset_name": str(data), "val_ratio": 0.0, "max_length": 96, "max_prompt_length": 64},
        "dpo_training": {"learning_rate": 1e-3, "batch_size": 2, "max_steps": 2, "logging_steps": 1,
                         "save_dir": str(tmp_path / f"dpo_{data.parent.name}")}}))
    result = subprocess.run([sys.executable, "-m", "dpo_hpc", "train", "dpo", "--config", str(config)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / f"dpo_{data.parent.name}" / "data_report.json").read_text())
    assert report["train"]["kept"] == rows, report


def test_conversational_prompts_give_assistant_replies_that_dpo_renders_with_the_template(tmp_path, micro_model,
                                                                                            reward_model):
    prompts = tmp_path / "chat" / "prompts.jsonl"
    prompts.parent.mkdir()
    rows = [{"prompt": [{"role": "user", "content": f"Reverse: {w}"}]} for w in ("abc", "hello", "xyzzy", "qrst")]
    rows.append({"prompt": [{"from": "human", "value": "Reverse: sharegpt"}]})  # ShareGPT's form reads as TRL's
    rows.append({"text": "no prompt here"})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = make_pairs(str(micro_model), str(prompts), tmp_path / "chat_pairs", SETTINGS,
                       reward_model=str(reward_model), say=lambda line: None)
    assert found["prompts"] == 5 and found["skipped"]["rows_without_prompt"] == 1
    written = [json.loads(line) for line in (tmp_path / "chat_pairs/pairs.jsonl").read_text().splitlines()]
    assert written and all(r["prompt"][0]["role"] == "user" and r["chosen"][0]["role"] == "assistant"
                           and r["rejected"][0]["role"] == "assistant" for r in written)
    train_dpo_on(tmp_path, micro_model, tmp_path / "chat_pairs/pairs.jsonl", found["pairs"])


def test_verifiable_scoring_of_a_model_that_solves_nothing_is_one_line_and_keeps_its_samples(tmp_path, micro_model,
                                                                                           reverse_data):
    out = tmp_path / "none"
    with pytest.raises(DataError, match="every prompt's 3 samples scored alike, so no pair was made"):
        make_pairs(str(micro_model), str(reverse_data.parent / "test.jsonl"), out,
                   PairSettings(samples=3, max_new_tokens=6, batch_size=4, limit=4), say=lambda line: None)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["rewards"] == [0.0, 0.0, 0.0] for s in samples)
    assert not (out / pairs.DONE).exists() and (out / pairs.WORK / "chunk_000000.jsonl").exists()
    with pytest.raises(DataError, match="row 0's prompt is not one of the verifiable task's"):
        chat = tmp_path / "other.jsonl"
        chat.write_text(json.dumps({"prompt": "Tell me a story."}) + "\n")
        make_pairs(str(micro_model), str(chat), tmp_path / "other", SETTINGS, say=lambda line: None)


def test_the_command_line_refuses_bad_settings_in_one_line_each(tmp_path, micro_model, reverse_data):
    result = subprocess.run([sys.executable, "-m", "dpo_hpc", "make-pairs", str(micro_model), "--prompts",
                             str(reverse_data), "--out", str(tmp_path / "x"), "--verifiable", "--samples", "1",
                             "--top-p", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: make-pairs: --samples 1: a pair needs at least 2 samples of a prompt",
        "error: make-pairs: --top-p must lie in (0, 1], got 0.0"]
    assert not (tmp_path / "x").exists()
