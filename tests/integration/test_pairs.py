"""On-policy pairs (``dpo-hpc make-pairs``): samples drawn prompt by prompt, scored by a reward
model as it scores one row alone, the best against the worst; a killed job resumes to the files
of one that never stopped; and DPO trains on what it wrote, in text and in conversational form."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_hpc import pairs
from dpo_hpc.config import to_dict
from dpo_hpc.data import DataError
from dpo_hpc.data.tokenize import SpecialTokens, encode_prompt
from dpo_hpc.experiment.schema import GenerationSection
from dpo_hpc.launch.requeue import caps_of
from dpo_hpc.launch.task import generate_and_requeue
from dpo_hpc.pairs import RewardModel, make_pairs
from dpo_hpc.trainers.samples import Sampling, completions, greedy_completions



def settings(prompts, reward_model=None, **changes) -> GenerationSection:
    """Small draws: 3 samples of up to 6 tokens, chunks of 4 prompts, the first 10 prompts."""
    return GenerationSection(**{"prompts": str(prompts), "samples": 3, "max_new_tokens": 6, "batch_size": 4,
                                "limit": 10, "verifiable": reward_model is None,
                                "reward_model": str(reward_model) if reward_model else None, **changes})


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
    judge = RewardModel(str(reward_model), tok, torch.device("cpu"), torch.float32, batch_size=3)
    prompt_ids, replies = [[1, 70, 71], [1, 72], [1, 73, 74, 75]], [[80, 81, tok.eos_token_id], [82], [83, 84]]
    got = judge.scores([], prompt_ids, replies, [])
    naive = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    for prompt, reply, score in zip(prompt_ids, replies, got):
        row = prompt + reply + ([] if reply[-1] == tok.eos_token_id else [tok.eos_token_id])
        with torch.no_grad():  # the head on the last token (EOS) of the row alone, unpadded
            alone = naive.score(naive.model(torch.tensor([row])).last_hidden_state[0, -1])[0]
        assert score == pytest.approx(alone.item(), abs=1e-5)


def test_pairs_resume_after_a_stop_to_the_same_files_and_dpo_trains_on_them(tmp_path, micro_model, reverse_data,
                                                                              reward_model, monkeypatch, capsys):
    prompts = reverse_data.parent / "test.jsonl"
    straight = make_pairs(str(micro_model), settings(prompts, reward_model), tmp_path / "straight",
                          say=lambda line: None)
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

    # A USR2 during the second chunk: the task stops after it, keeps its chunks and, outside Slurm,
    # is not requeued (exit 3); run again, it draws the third chunk alone and ends with the same files.
    made = []
    real = pairs._sampled_chunk

    def counted(*args):
        made.append(args[-1])
        if args[-1] == 1:
            os.kill(os.getpid(), signal.SIGUSR2)
        return real(*args)

    monkeypatch.setattr(pairs, "_sampled_chunk", counted)
    row = {"run_id": "pairs-x", "run_dir": str(tmp_path / "resumed"), "max_requeues": caps_of(None),
           "config": {"model": str(micro_model), "generate": to_dict(settings(prompts, reward_model))}}
    with pytest.raises(SystemExit) as stopped:
        generate_and_requeue(row)
    manifest = json.loads((tmp_path / "resumed/run_manifest.json").read_text())
    assert stopped.value.code == 3 and manifest["status"] == "preempted" and manifest["chunks"] == 2
    assert "stopped with 2 chunk(s) made (preemption); not requeued: not running under Slurm" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "resumed" / pairs.WORK).glob("chunk_*")) == \
        ["chunk_000000.jsonl", "chunk_000001.jsonl"] and not (tmp_path / "resumed" / pairs.DONE).exists()
    monkeypatch.setattr(pairs, "_sampled_chunk", lambda *args: made.append(args[-1]) or real(*args))
    assert generate_and_requeue(row)["status"] == "completed"
    assert made == [0, 1, 2]  # 10 prompts in chunks of 4: the third chunk alone was made on resume
    for name in ("pairs.jsonl", "samples.jsonl"):
        assert (tmp_path / "resumed" / name).read_bytes() == (out / name).read_bytes(), name

    # Done is done, without loading a model; other settings in the same folder are refused, not mixed in.
    lines = []
    monkeypatch.setattr(pairs, "load_reward_model", lambda *args: pytest.fail("loaded the reward model"))
    make_pairs(str(micro_model), settings(prompts, reward_model), out, say=lines.append)
    assert made == [0, 1, 2] and "already holds these pairs" in lines[-1]
    with pytest.raises(DataError, match="another model, prompts or settings"):
        make_pairs(str(micro_model), settings(prompts, reward_model, samples=2), out, say=lambda line: None)

    train_dpo_on(tmp_path, micro_model, out / "pairs.jsonl", straight["pairs"])


def test_two_ranks_share_the_chunks_and_write_the_files_of_one(tmp_path, micro_model, reverse_data, reward_model):
    """Under torchrun each rank draws every other chunk (its own seeds), so two ranks write the
    pairs one process writes, byte for byte (at one thread each, as torchrun runs them: the float
    sums of a matmul depend on the thread count)."""
    args = [str(micro_model), "--prompts", str(reverse_data.parent / "test.jsonl"), "--reward-model",
            str(reward_model), "--samples", "3", "--max-new-tokens", "6", "--batch-size", "4", "--limit", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    alone = subprocess.run([sys.executable, "-m", "dpo_hpc", "make-pairs", *args, "--out", str(tmp_path / "one")],
                           capture_output=True, text=True, timeout=300, env=env)
    assert alone.returncode == 0, alone.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(29600 + os.getpid() % 1000), "-m", "dpo_hpc", "make-pairs", *args,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert two.stdout.count("pair(s) from 10 prompt(s)") == 1  # rank 0 alone writes and says so
    for name in ("pairs.jsonl", "samples.jsonl"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


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
    found = make_pairs(str(micro_model), settings(prompts, reward_model), tmp_path / "chat_pairs",
                       say=lambda line: None)
    assert found["prompts"] == 5 and found["skipped"]["rows_without_prompt"] == 1
    written = [json.loads(line) for line in (tmp_path / "chat_pairs/pairs.jsonl").read_text().splitlines()]
    assert written and all(r["prompt"][0]["role"] == "user" and r["chosen"][0]["role"] == "assistant"
                           and r["rejected"][0]["role"] == "assistant" for r in written)
    train_dpo_on(tmp_path, micro_model, tmp_path / "chat_pairs/pairs.jsonl", found["pairs"])


def test_verifiable_scoring_of_a_model_that_solves_nothing_is_one_line_and_keeps_its_samples(tmp_path, micro_model,
                                                                                           reverse_data):
    out = tmp_path / "none"
    with pytest.raises(DataError, match="every prompt's 3 samples scored alike, so no pair was made"):
        make_pairs(str(micro_model), settings(reverse_data.parent / "test.jsonl", limit=4), out, say=lambda line: None)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["rewards"] == [0.0, 0.0, 0.0] for s in samples)
    assert not (out / pairs.DONE).exists() and (out / pairs.WORK / "chunk_000000.jsonl").exists()
    with pytest.raises(DataError, match="row 0's prompt is not one of the verifiable task's"):
        chat = tmp_path / "other.jsonl"
        chat.write_text(json.dumps({"prompt": "Tell me a story."}) + "\n")
        make_pairs(str(micro_model), settings(chat), tmp_path / "other", say=lambda line: None)


def test_offset_and_limit_read_a_window_of_the_usable_prompts(micro_model, reverse_data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    first, _ = pairs.read_prompts(str(reverse_data), "train", tokenizer, limit=5)
    window, _ = pairs.read_prompts(str(reverse_data), "train", tokenizer, limit=3, offset=2)
    assert [(p.row, p.text) for p in window] == [(p.row, p.text) for p in first[2:5]]
    total = len(pairs.read_prompts(str(reverse_data), "train", tokenizer, limit=None)[0])
    with pytest.raises(DataError, match=f"{total} usable prompt\\(s\\), none after the first {total} \\(offset"):
        pairs.read_prompts(str(reverse_data), "train", tokenizer, limit=3, offset=total)


def test_the_command_line_refuses_bad_settings_in_one_line_each(tmp_path, micro_model, reverse_data):
    result = subprocess.run([sys.executable, "-m", "dpo_hpc", "make-pairs", str(micro_model), "--prompts",
                             str(reverse_data), "--out", str(tmp_path / "x"), "--verifiable", "--samples", "1",
                             "--top-p", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: make-pairs: samples: expected greater than or equal to 2, got 1 (int)",
        "error: make-pairs: top_p: expected greater than 0, got 0.0 (float)"]
    assert not (tmp_path / "x").exists()


ON_POLICY = """
[stages.pairs]
from = "sft"
generate = { prompts = "PROMPTS", reward_model = "RM", samples = 3, max_new_tokens = 8, batch_size = 4, limit = 8 }

[stages.dpo]
trainer = "dpo"
from = "pairs"
[stages.dpo.config]
dataset = { val_ratio = 0.0, max_length = 96, max_prompt_length = 64 }
dpo_training = { learning_rate = 1e-4, batch_size = 2, max_steps = 3, logging_steps = 1 }
"""


def test_an_experiment_samples_pairs_from_its_sft_model_and_trains_dpo_on_them(tmp_path, micro_model, reverse_data,
                                                                               reward_model):
    """SFT, pairs sampled from the SFT model and judged by a reward model, then DPO from the
    pairs: through the local executor, with status and the report (a reward stage as the judge is
    expanded in tests/unit/experiment)."""
    from test_slurm import SFT, experiment
    from test_submit_local import run

    prompts = reverse_data.parent / "test.jsonl"
    stages = SFT + ON_POLICY.replace("PROMPTS", str(prompts)).replace("RM", str(reward_model))
    path = experiment(tmp_path, micro_model, reverse_data, stages, name="onpolicy")
    dry = run(tmp_path, "dpo_hpc.submit", path.name, "--dry-run")
    assert "stage pairs [generate from sft on" in dry.stdout and "1 pair set(s)" in dry.stdout, dry.stdout
    result = run(tmp_path, "dpo_hpc.submit", path.name, "--local")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 of 3 run(s) done" in result.stdout

    root = tmp_path / "out/onpolicy"
    (sft_dir,), (pairs_dir,), (dpo_dir,) = ((root / s).iterdir() for s in ("sft", "pairs", "dpo"))
    made = json.loads((pairs_dir / "generation.json").read_text())
    assert made["prompts"] == 8 and made["pairs"] + made["skipped"]["no_reward_spread"] == 8 and made["pairs"] > 0
    assert json.loads((pairs_dir / "run_manifest.json").read_text())["status"] == "completed"
    config = json.loads((dpo_dir / "config.resolved.json").read_text())
    assert config["policy_name"] == config["ref_name"] == str(sft_dir)
    assert config["dataset"]["dataset_name"] == str(pairs_dir / "pairs.jsonl")
    assert json.loads((dpo_dir / "data_report.json").read_text())["train"]["kept"] == made["pairs"]

    rows = [json.loads(line) for line in run(tmp_path, "dpo_hpc.status", path.name, "--json").stdout.splitlines()]
    assert {r["stage"]: r["state"] for r in rows} == {"sft": "done", "pairs": "done", "dpo": "done"}
    table = run(tmp_path, "dpo_hpc.status", path.name).stdout
    assert f"{made['pairs']}/8 pairs" in next(line for line in table.splitlines() if line.startswith("pairs")), table
    report = run(tmp_path, "dpo_hpc.report", path.name)
    assert report.returncode == 0, report.stdout + report.stderr
    text = (root / "report/report.md").read_text()
    assert "## pairs (pairs)" in text and f"| {made['prompts']} | {made['pairs']} |" in text, text
    again = run(tmp_path, "dpo_hpc.submit", path.name, "--local")
    assert again.returncode == 0 and "started locally" not in again.stdout, again.stdout

    # A second round: pairs from the DPO model, DPO from it on them; the first round is not run again.
    path.write_text(path.read_text().replace('from = "pairs"', 'from = "pairs"\nrounds = 2'))
    second = run(tmp_path, "dpo_hpc.submit", path.name, "--local")
    assert second.returncode == 0 and "2 of 2 run(s) done" in second.stdout, second.stdout + second.stderr
    (drawn,), (trained,) = ((root / s).iterdir() for s in ("dpo_round2_pairs", "dpo_round2"))
    assert json.loads((drawn / "run_manifest.json").read_text())["status"] == "completed"
    config = json.loads((trained / "config.resolved.json").read_text())
    assert config["policy_name"] == config["ref_name"] == str(dpo_dir)
    assert config["dataset"]["dataset_name"] == str(drawn / "pairs.jsonl")
    assert json.loads((drawn / "generation.json").read_text())["identity"]["settings"]["seed"] == 1
