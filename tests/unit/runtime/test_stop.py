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
