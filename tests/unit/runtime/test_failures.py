"""The failures users hit, each as one line that says what to do."""

from __future__ import annotations

import errno

import torch

from dpo_hpc.runtime.failures import explain


def test_each_known_failure_is_one_line_with_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "lower batch_size"),
        (OSError(errno.ENOSPC, "No space left on device", "/scratch/run/ckpt.pt"),
         "no space left on the device while writing /scratch/run/ckpt.pt"),
        (RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos: basic_ios::clear: iostream error"),
         "no space left on the device"),
        (PermissionError(errno.EACCES, "Permission denied", "/shared/out"), "permission denied: /shared/out"),
        (RuntimeError("File /x.py: [Errno 13] Permission denied: '/shared/out/ckpt'"),  # wrapped by a library
         "permission denied: /shared/out/ckpt; choose a save_dir"),
        (KeyboardInterrupt(), "interrupted"),
        (ValueError("something else"), "ValueError: something else"),
    ]
    for exc, expected in cases:
        line = explain(exc)
        assert expected in line and "\n" not in line, (exc, line)


def test_a_model_that_is_not_there_says_where_it_looked(monkeypatch, tmp_path):
    from dpo_hpc.runtime.failures import model_not_found

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "'runs/tiny/bsae': no such local folder" in explain(model_not_found("runs/tiny/bsae"))
    assert "no such local folder" in explain(model_not_found(str(tmp_path / "nope")))
    hub = explain(model_not_found("meta-llama/Llama-3.2-1B"))
    assert "not in the Hugging Face cache and HF_HUB_OFFLINE=1" in hub
    assert "`hf download meta-llama/Llama-3.2-1B`" in hub


def test_out_of_memory_names_the_micro_batch_and_what_is_not_on_yet():
    from dpo_hpc.runtime.failures import out_of_memory

    line = explain(out_of_memory(16, "pairs", ["gradient_checkpointing = true", "a [lora] section"]))
    assert line == ("out of GPU memory at a micro-batch of 16 pairs: lower batch_size (raise "
                    "gradient_accumulation_steps to keep the global batch), or set gradient_checkpointing = true "
                    "or a [lora] section")
