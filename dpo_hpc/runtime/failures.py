"""The failures users hit, each as one line that says what to do (the traceback goes to a log).

``explain`` reads an exception by its type and message only, so it needs no library imported:
permission denied, a full disk, running out of GPU memory, and a ``RunFailure`` raised where the
cause is known (``model_not_found``: a local path with a typo, a hub name not in the cache while
offline).
"""

from __future__ import annotations

import errno
import os
import re
import shutil

from ..fsutil import looks_local


class RunFailure(RuntimeError):
    """A failure already worded for the user (what failed, what to do)."""


def model_not_found(name: str) -> RunFailure:
    """A model or tokenizer that could not be loaded by ``name``: a local path that does not
    exist, or a hub name that is neither cached (offline) nor reachable."""
    local = looks_local(name) or os.path.isdir(os.path.dirname(name) or "\0")  # "runs/sft" beside runs/
    if local and not os.path.exists(name):
        return RunFailure(f"model or tokenizer '{name}': no such local folder; check policy_name / ref_name / "
                          "tokenizer_name (relative paths are relative to the working directory, or to the "
                          "experiment file's folder in an experiment)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return RunFailure(f"model or tokenizer '{name}' is not in the Hugging Face cache and HF_HUB_OFFLINE=1; on a "
                          f"login node run `hf download {name}` with the jobs' HF_HOME, or fix the name")
    return RunFailure(f"model or tokenizer '{name}' could not be loaded: not a local folder, and not fetched from the "
                      f"hub (no network, or no such repository); check the name, or run `hf download "
                      f"{name}` where there is network")


def out_of_memory(batch_size: int, unit: str, options_off: list[str]) -> RunFailure:
    """Out of device memory at a micro-batch: what to lower, and the options not yet on that cut memory."""
    helps = " or ".join(options_off) if options_off else "more GPUs with a higher deepspeed.zero_stage"
    return RunFailure(f"out of GPU memory at a micro-batch of {batch_size} {unit}: lower batch_size (raise "
                      f"gradient_accumulation_steps to keep the global batch), or set {helps}")


LOW_SPACE_BYTES = 16 * 2**20
"""Free space below which a failed write is put down to a full disk (writers fail in many ways
when it fills: ``OSError(ENOSPC)``, PyTorch's ``unexpected pos``, ``basic_ios::clear``)."""


def disk_full(exc: BaseException, folder: str | os.PathLike) -> bool:
    """Whether ``exc``, raised while writing into ``folder``, came from a full disk. Call it before
    cleaning up what was written, which frees space again."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left on device" in str(exc):
        return True
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE_BYTES
    except OSError:
        return False


def no_space(folder: str | os.PathLike, what: str) -> RunFailure:
    return RunFailure(f"no space left on the device holding {folder} while {what}: free space, lower "
                      "save_total_limit, or move save_dir (what was half-written has been removed)")


def _name_in(text: str) -> str:
    """The path an error message quotes (``... Permission denied: '/shared/out'``), or ""."""
    found = re.search(r"'([^']+)'", text)
    return found.group(1) if found else ""


def explain(exc: BaseException) -> str:
    """One line for the user: what failed and what to do; ``Type: message`` when not known."""
    text = " ".join(str(exc).split())
    kind = type(exc).__name__
    if isinstance(exc, RunFailure):
        return text
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C twice: stopped without a checkpoint; run again to resume from the last one)"
    if kind == "OutOfMemoryError" or "CUDA out of memory" in text:
        return ("out of GPU memory: lower batch_size (raise gradient_accumulation_steps to keep the global batch), "
                "or set gradient_checkpointing = true, precompute_ref_log_probs = true, a [lora] section, "
                "or a higher deepspeed.zero_stage")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left on device" in text \
            or "basic_ios::clear" in text:
        where = f" while writing {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
        return f"no space left on the device{where}: free space, lower save_total_limit, or move save_dir"
    if isinstance(exc, PermissionError) or "Permission denied" in text:
        path = exc.filename if isinstance(exc, OSError) and exc.filename else _name_in(text)
        return f"permission denied: {path or text}; choose a save_dir (or output_root) you can write to"
    return f"{kind}: {text}" if text else kind
