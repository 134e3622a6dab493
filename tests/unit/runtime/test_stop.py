"""The stop signal's handler only sets a flag, and restores the previous handler."""

from __future__ import annotations

import os
import signal

import torch

from dpo_hpc.runtime.stop import StopSignal


def test_stop_signal_only_sets_a_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGUSR2)
    stop = StopSignal(signal.SIGUSR2).install()
    assert not stop.agreed(1, torch.device("cpu"))
    os.kill(os.getpid(), signal.SIGUSR2)
    assert stop.received_signal == signal.SIGUSR2 and stop.agreed(1, torch.device("cpu"))
    stop.restore()
    assert signal.getsignal(signal.SIGUSR2) == before


def test_interrupts_win_over_preemption_and_a_second_ctrl_c_stops_at_once():
    import pytest

    before = signal.getsignal(signal.SIGINT)
    stop = StopSignal(signal.SIGUSR2).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.agreed(1, torch.device("cpu")) == "SIGUSR2" and stop.is_preemption("SIGUSR2")
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed(1, torch.device("cpu")) == "SIGTERM" and not stop.is_preemption("SIGTERM")
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.agreed(1, torch.device("cpu")) == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) == before


def test_the_deadline_keeps_the_signal_lead_or_what_a_step_and_a_save_took():
    end = 10_000.0
    stop = StopSignal(signal.SIGUSR2, end_time=end, lead_s=180)
    assert not stop.deadline_reached(now=end - 181) and stop.deadline_reached(now=end - 179)
    # a save measured at 200 s (and 10 s steps) needs 2 * 10 + 1.5 * 200 = 320 s, more than the lead
    assert stop.deadline_reached(step_s=10, save_s=200, now=end - 300)
    assert not StopSignal(signal.SIGUSR2, end_time=None, lead_s=180).deadline_reached(now=end)


def test_a_reached_deadline_is_a_stop_to_requeue_and_any_signal_wins_over_it():
    import time

    stop = StopSignal(signal.SIGUSR2, end_time=time.time() + 5, lead_s=60).install()
    try:
        assert stop.agreed(1, torch.device("cpu")) == "deadline" and stop.is_preemption("deadline")
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed(1, torch.device("cpu")) == "SIGTERM"
    finally:
        stop.restore()
