"""Ground-truth evaluation: batched left-padded greedy decoding equals one-by-one decoding,
and scores/win rates are computed exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dpo_hpc.data.verifiable import write_dataset
from dpo_hpc.evaluate import greedy_answers, load_test_prompts, win_rate


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
