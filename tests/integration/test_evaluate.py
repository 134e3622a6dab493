"""Evaluation: batched left-padded greedy decoding equals one-by-one decoding, scores/win rates
are computed exactly, and a reward model judges replies as it scores them alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dpo_hpc.data.verifiable import write_dataset
from dpo_hpc.evaluate import answer_logps, greedy_answers, load_test_prompts, load_test_rows, win_rate


def test_batched_greedy_equals_one_at_a_time(micro_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(micro_model)
    tok = AutoTokenizer.from_pretrained(micro_model)
    prompts = ["\n\nHuman: Reverse: ab\n\nAssistant:", "\n\nHuman: Reverse: abcdefg\n\nAssistant:",
               "\n\nHuman: Reverse: xy\n\nAssistant: yx\n\nHuman: Reverse: qrs\n\nAssistant:"]
    batched = greedy_answers(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [greedy_answers(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single and all(isinstance(a, str) for a in batched)


def test_win_rate_counts_ties_as_half():
    assert win_rate([1, 0, 1, 0], [0, 0, 1, 1]) == pytest.approx((1 + 0.5 + 0.5 + 0) / 4)
    with pytest.raises(ValueError):
        win_rate([1], [])


def test_evaluate_cli_reports_accuracy_and_win_rate(tmp_path, micro_model):
    paths = write_dataset(tmp_path, n_train=4, n_test=6, seed=0)
    assert len(load_test_prompts(paths["test"], limit=4)) == 4
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, "-m", "dpo_hpc", "evaluate", str(micro_model), "--data", str(paths["test"]),
                             "--baseline", str(micro_model), "--max-new-tokens", "4", "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["prompts"] == 6 and 0.0 <= data["accuracy"] <= 1.0
    assert data["win_rate_vs_baseline"] == 0.5  # a model against itself ties everywhere
    assert data["answer_logp"] < 0 and data["answer_logp_change_vs_baseline"] == 0.0


def test_answer_logps_equal_one_sequence_scored_by_hand(micro_model):
    """Batched, padded scoring equals the naive sum of log-softmax over the answer and EOS tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(micro_model)
    tok = AutoTokenizer.from_pretrained(micro_model)
    prompts = ["\n\nHuman: Reverse: ab\n\nAssistant:", "\n\nHuman: Reverse: abcdefg\n\nAssistant:"]
    answers = [" ba", " gfedcba"]
    batched = answer_logps(model, tok, prompts, answers)
    for prompt, answer, got in zip(prompts, answers, batched):
        prompt_ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
        target = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt_ids + target])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        expected = sum(logprobs[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(target))
        assert got == pytest.approx(expected, abs=1e-4)


def test_rows_without_answers_give_prompts_only_and_other_data_is_refused(tmp_path, micro_model):
    from dpo_hpc.data.sources import DataError

    path = tmp_path / "prompts.jsonl"
    a, b = "\n\nHuman: Reverse: ab\n\nAssistant:", "\n\nHuman: Reverse: cd\n\nAssistant:"
    path.write_text(json.dumps({"prompt": a}) + "\n\n" + json.dumps({"prompt": b, "answer": " dc"}) + "\n")
    assert load_test_rows(path) == ([a, b], None)
    path.write_text('{"answer": " x"}\n')
    with pytest.raises(DataError, match="prompts.jsonl:1: expected an object with a 'prompt' string"):
        load_test_rows(path)
    # HH-style prompts of another task: the reversal reward would score them silently
    path.write_text(json.dumps({"prompt": "\n\nHuman: What is the capital of France?\n\nAssistant:"}) + "\n")
    result = subprocess.run([sys.executable, "-m", "dpo_hpc", "evaluate", str(micro_model), "--data", str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "prompts.jsonl:1: not a prompt of the verifiable reversal task" in line and "make-data" in line


def test_a_baseline_is_scored_once_per_model_data_and_settings(tmp_path, micro_model):
    """Every run of a sweep is scored against one baseline: its scores come from the cache in its
    folder until the model files, the prompts or the scoring settings change."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_hpc.evaluate import BASELINE_SCORES, baseline_scores, score
    from dpo_hpc.fsutil import sha256_file

    baseline = tmp_path / "sft"
    shutil.copytree(micro_model, baseline)
    paths = write_dataset(tmp_path / "data", n_train=4, n_test=5, seed=0)
    prompts, references = load_test_rows(paths["test"])
    section = {"data": str(paths["test"]), "limit": None, "max_new_tokens": 4, "batch_size": 2}
    scorings = []

    def prompts_of():  # what VerifiablePrompts names as the prompts' identity, read again at each call
        return {"data": sha256_file(paths["test"])}

    def score_it():
        scorings.append(1)
        return score(AutoModelForCausalLM.from_pretrained(baseline), AutoTokenizer.from_pretrained(baseline),
                     prompts, references, section["max_new_tokens"], section["batch_size"])

    first = baseline_scores(baseline, section, prompts_of(), len(prompts), score_it)
    again = baseline_scores(baseline, section, prompts_of(), len(prompts), score_it)
    assert len(scorings) == 1 and again == first and len(first.rewards) == 5 and len(first.logps) == 5
    (cached,) = (baseline / "evaluations" / BASELINE_SCORES).iterdir()
    baseline_scores(baseline, {**section, "max_new_tokens": 5}, prompts_of(), len(prompts), score_it)  # other settings
    assert len(scorings) == 2
    cached.write_text("{not json")  # a damaged cache is scored again, never trusted
    assert baseline_scores(baseline, section, prompts_of(), len(prompts), score_it) == first and len(scorings) == 3
    with open(paths["test"], "a") as f:  # other prompts
        f.write(json.dumps({"prompt": "\n\nHuman: Reverse: abc\n\nAssistant:", "answer": " cba"}) + "\n")
    baseline_scores(baseline, section, prompts_of(), len(prompts), score_it)
    assert len(scorings) == 4
    assert len(list((baseline / "evaluations" / BASELINE_SCORES).iterdir())) == 3  # prompts, settings
    config = json.loads((baseline / "config.json").read_text())
    (baseline / "config.json").write_text(json.dumps({**config, "retrained": True}))  # new model files
    baseline_scores(baseline, section, prompts_of(), len(prompts), score_it)
    assert len(scorings) == 5  # and the scores of the old files, which no key can reach, are gone
    assert len(list((baseline / "evaluations" / BASELINE_SCORES).iterdir())) == 1


@pytest.mark.parametrize("setup, why", [
    ({"deepspeed": {"zero_stage": 3}}, "ZeRO-3 partitions the weights"),
    ({"lora": {"r": 4, "target_modules": "all-linear"}}, "weights do not match the model"),
])
def test_checkpoints_without_whole_weights_are_counted_as_not_scored(tmp_path, micro_model, setup, why):
    """A ZeRO-3 run's checkpoints hold weight partitions, a LoRA run's hold the adapted model: the
    final model is scored, the checkpoints are counted with the reason, never loaded half."""
    from test_training import run_cli, small_data, write_config

    from conftest import run_config
    from dpo_hpc.evaluate import evaluate_run

    if "lora" in setup:
        pytest.importorskip("peft")
    config = {**run_config(tmp_path, micro_model, small_data(tmp_path, 24), "dpo_training", max_steps=2,
                           batch_size=4, save_steps=1, checkpoints_at_end="all"), **setup}
    result = run_cli(["train", "dpo", "--config", str(write_config(tmp_path, config))], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    paths = write_dataset(tmp_path / "data", n_train=4, n_test=3, seed=0)
    section = {"data": str(paths["test"]), "limit": None, "max_new_tokens": 4, "batch_size": 4, "checkpoints": True}
    run_dir = tmp_path / "run"
    scored = evaluate_run({"evaluate": section, "target": str(run_dir), "baseline": None}, str(run_dir / "evaluations/x"))
    written = json.loads((run_dir / "evaluations/x/evaluation.json").read_text())
    assert scored["status"] == "completed" and [p["step"] for p in written["by_step"]] == [2]
    assert [(reason.split(" (")[0], n) for reason, n in written["checkpoints_not_scored"].items()] == [(why, 1)]


def test_a_reward_model_judges_greedy_replies_to_the_runs_validation_prompts(tmp_path, micro_model):
    """Each reward is the reward model's own score (transformers' pooling) of prompt, greedy reply
    and EOS; a judge with another tokenizer, and a reward run as the scored model, are refused."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from dpo_hpc.config import validate_mapping
    from dpo_hpc.data import DataError
    from dpo_hpc.evaluate import evaluate, validation_prompts
    from dpo_hpc.trainers.samples import greedy_completions
    from dpo_hpc.trainers.trainer import train
    from conftest import run_config
    from test_training import small_data

    data = small_data(tmp_path, 40)
    raw = run_config(tmp_path / "dpo", micro_model, data, "dpo_training", max_steps=2, batch_size=4)
    train(validate_mapping(raw, "dpo"), "dpo")
    run_dir = tmp_path / "dpo" / "run"
    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    judge = AutoModelForSequenceClassification.from_pretrained(micro_model, num_labels=1)
    judge.config.pad_token_id = tokenizer.pad_token_id
    judge.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")

    result = evaluate(str(run_dir), reward_model=str(tmp_path / "rm"), baseline=str(micro_model), limit=3,
                      max_new_tokens=4)
    assert result["prompts"] == 3 and {"reward", "baseline_reward", "win_rate_vs_baseline",
                                       "reward_change_vs_baseline"} <= set(result)
    prompt = validation_prompts(run_dir, tokenizer, limit=1)[0]
    reply = greedy_completions(AutoModelForCausalLM.from_pretrained(run_dir).eval(), [prompt], tokenizer.pad_token_id,
                               [tokenizer.eos_token_id], 4)[0]
    ids = prompt + reply + ([] if reply[-1:] == [tokenizer.eos_token_id] else [tokenizer.eos_token_id])
    with torch.no_grad():
        alone = judge.eval()(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert result["examples"][0]["reward"] == pytest.approx(alone, abs=1e-5)

    tokenizer.add_tokens(["<not-in-the-policy>"])
    tokenizer.save_pretrained(tmp_path / "rm")
    with pytest.raises(DataError, match="its tokenizer is not the policy's"):
        evaluate(str(run_dir), reward_model=str(tmp_path / "rm"), limit=3)
    resolved = json.loads((run_dir / "config.resolved.json").read_text())
    (run_dir / "config.resolved.json").write_text(json.dumps({**resolved, "trainer": "reward"}))
    with pytest.raises(DataError, match="a reward run has no policy"):
        validation_prompts(run_dir, tokenizer)
