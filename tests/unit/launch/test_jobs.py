"""The requeue policy and the parsing of Slurm's output: pure decisions."""

from __future__ import annotations

from dpo_hpc.launch.jobs import error_line, expand_array_ids
import errno

import pytest

from dpo_hpc.config import ConfigError
from dpo_hpc.data import DataError
from dpo_hpc.launch.requeue import caps_of, is_transient, read_requeues, requeue_decision, signal_cause
from dpo_hpc.runtime.failures import RunFailure
from dpo_hpc.runtime.slurm import parse_end_time

CAPS = {"preemption": 3, "time_limit": 1, "failure": 2}


def test_requeues_are_capped_per_cause_and_need_progress():
    assert requeue_decision([], "preemption", step=5, caps=CAPS) == ""
    assert requeue_decision([{"step": 5, "cause": "preemption"}], "preemption", step=9, caps=CAPS) == ""
    assert "no progress" in requeue_decision([{"step": 9, "cause": "preemption"}], "failure", step=9, caps=CAPS)
    history = [{"step": 1, "cause": "time_limit"}, {"step": 2, "cause": "preemption"}]
    assert requeue_decision(history, "time_limit", step=9, caps=CAPS) == "time limit cap 1 reached"
    assert requeue_decision(history, "preemption", step=9, caps=CAPS) == ""  # another cause, its own cap
    assert requeue_decision([], "failure", step=9, caps={**CAPS, "failure": 0}) == "failure cap 0 reached"
    assert requeue_decision([{"step": 1}], "preemption", step=9, caps={**CAPS, "preemption": 1}) == \
        "preemption cap 1 reached"  # lines written before causes were recorded were preemptions


def test_caps_come_from_one_number_or_a_table_by_cause():
    assert caps_of(4) == {"preemption": 4, "time_limit": 4, "failure": 4}
    assert caps_of(None) == {"preemption": 10, "time_limit": 10, "failure": 2}
    assert caps_of({"failure": 0}) == {"preemption": 10, "time_limit": 10, "failure": 0}


def test_the_count_is_per_slurm_job_so_a_resubmission_starts_from_zero(tmp_path):
    (tmp_path / "requeues.jsonl").write_text('{"job_id": "5_0", "step": 3, "cause": "preemption"}\n'
                                             '{"job_id": "5_0", "step": 6, "cause": "prea\n'  # torn by a crash
                                             '{"job_id": "9_0", "step": 8, "cause": "time_limit"}\n')
    assert [e["step"] for e in read_requeues(tmp_path, "5_0")] == [3]
    assert [e["step"] for e in read_requeues(tmp_path)] == [3, 8]
    assert read_requeues(tmp_path / "missing") == []


def test_a_signal_near_the_end_of_the_job_is_its_time_limit():
    end = parse_end_time("2026-12-05T23:07:31")
    assert signal_cause(end, lead_s=180, now=end - 200) == "time_limit"
    assert signal_cause(end, lead_s=180, now=end - 600) == "preemption"
    assert signal_cause(None, lead_s=180) == "preemption"
    assert parse_end_time("N/A") is None and parse_end_time("NONE") is None


@pytest.mark.parametrize("exc, transient", [
    (RuntimeError("NCCL error: unhandled system error"), True),
    (ConnectionResetError("peer"), True),
    (ConfigError(["x"]), False),
    (DataError("dataset 'x': 0 usable rows"), False),
    (RunFailure("out of GPU memory at a micro-batch of 4 pairs"), False),
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (KeyboardInterrupt(), False),
])
def test_only_unexpected_failures_are_worth_a_requeue(exc, transient):
    assert is_transient(exc) is transient


def test_slurm_output_parsing():
    assert expand_array_ids("12_[0-2,5%4]") == ["12_0", "12_1", "12_2", "12_5"]
    assert expand_array_ids("12_3") == ["12_3"] and expand_array_ids("40") == ["40"]
    log = ("Traceback (most recent call last):\n  File x\n[rank0]: dpo_hpc.data.sources.DataError: dataset.dataset_name: "
           "local path 'x' does not exist\nsrun: error: task 0: Exited with exit code 1\n")
    assert error_line(log) == "dpo_hpc.data.sources.DataError: dataset.dataset_name: local path 'x' does not exist"
    assert error_line("all good\n") == ""
