"""The process group's start: what it sets before CUDA starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("preset, expected", [(None, "expandable_segments:True"),
                                              ("max_split_size_mb:128", "max_split_size_mb:128")])
def test_the_cuda_allocator_grows_segments_unless_the_user_chose(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    if preset is not None:
        env["PYTORCH_CUDA_ALLOC_CONF"] = preset
    code = ("import os; from dpo_hpc.runtime import init_distributed; init_distributed(); "
            "print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == expected
