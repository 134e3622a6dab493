"""The requeue policy and the parsing of Slurm's output: pure decisions."""

from __future__ import annotations

from dpo_hpc.launch.jobs import error_line, expand_array_ids
from dpo_hpc.launch.task import requeue_decision


def test_requeue_policy_caps_requeues_and_needs_progress():
    assert requeue_decision([], step=5, max_requeues=3) == ""
    assert requeue_decision([{"step": 5}], step=9, max_requeues=3) == ""
    assert "no progress" in requeue_decision([{"step": 9}], step=9, max_requeues=3)
    assert "max_requeues = 2" in requeue_decision([{"step": 1}, {"step": 2}], step=9, max_requeues=2)
    assert "max_requeues = 0" in requeue_decision([], step=9, max_requeues=0)


def test_slurm_output_parsing():
    assert expand_array_ids("12_[0-2,5%4]") == ["12_0", "12_1", "12_2", "12_5"]
    assert expand_array_ids("12_3") == ["12_3"] and expand_array_ids("40") == ["40"]
    log = ("Traceback (most recent call last):\n  File x\n[rank0]: dpo_hpc.data.sources.DataError: dataset.dataset_name: "
           "local path 'x' does not exist\nsrun: error: task 0: Exited with exit code 1\n")
    assert error_line(log) == "dpo_hpc.data.sources.DataError: dataset.dataset_name: local path 'x' does not exist"
    assert error_line("all good\n") == ""
