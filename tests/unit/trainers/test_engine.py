"""Model loading options that fail before any weight is read."""

from __future__ import annotations

import importlib.util

import pytest

from dpo_hpc.config import ConfigError
from dpo_hpc.trainers.engine import load_causal_lm


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_the_package_is_one_clear_line():
    with pytest.raises(ConfigError, match="attn_implementation = 'flash_attention_2' needs the flash_attn package"):
        load_causal_lm("any/model", "bf16", trainable=True, attn_implementation="flash_attention_2")
