"""What only a GPU machine can show; skipped where no CUDA device exists (CI has none). The
runs go through a subprocess without DS_ACCELERATOR=cpu (which conftest sets for this process)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, run_config
from dpo_hpc.config import ALGORITHMS

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def gpu_env() -> dict:
    drop = ("DS_ACCELERATOR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in drop}


def train_on_gpu(tmp_path: Path, trainer: str, raw: dict) -> dict:
    path = tmp_path / f"{trainer}.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-m", "dpo_hpc", "train", trainer, "--config", str(path)],
                            capture_output=True, text=True, env=gpu_env(), cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    section = ALGORITHMS[trainer].training_section
    manifest = json.loads((Path(raw[section]["save_dir"]) / "run_manifest.json").read_text())
    return {**manifest, "stdout": result.stdout}


def test_bf16_dpo_runs_on_the_gpu_with_nccl_and_reports_mfu_and_memory(tmp_path, micro_model, reverse_data):
    raw = run_config(tmp_path, micro_model, reverse_data, "dpo_training", max_steps=4, batch_size=8, eval_steps=2,
                     generate_during_eval=True, max_new_tokens=8)
    raw["precision"] = "bf16"
    manifest = train_on_gpu(tmp_path, "dpo", raw)
    assert manifest["status"] == "completed"
    samples = sorted((Path(raw["dpo_training"]["save_dir"]) / "samples").glob("step_*.jsonl"))
    assert [len(path.read_text().splitlines()) for path in samples] == [4, 4, 4]  # steps 0, 2, 4
    assert manifest["device"].startswith("cuda") and manifest["device"].endswith("nccl")
    assert 0 < manifest["peak_memory_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30
    assert 0 < manifest["resident_memory_gib"] < manifest["peak_memory_gib"]
    assert manifest["alloc_retries"] >= 0  # expandable segments by default (runtime.init_distributed)
    if "H100" in torch.cuda.get_device_name(0) or "H200" in torch.cuda.get_device_name(0):
        assert 0 < manifest["median_mfu"] < 1


def test_trl_options_of_the_loss_run_in_bf16_on_the_gpu(tmp_path, micro_model, reverse_data):
    """WPO's log sum p^2 from the compiled bf16 head, LD-DPO's weights, TR-DPO's moving reference
    (checkpointed), an MPO mixture: a bf16 run completes with finite losses."""
    raw = run_config(tmp_path, micro_model, reverse_data, "dpo_training", max_steps=4, batch_size=8, save_steps=3,
                     torch_compile=True, use_weighting=True, ld_alpha=0.5, sync_ref_model=True,
                     ref_model_sync_steps=2, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    raw["precision"] = "bf16"
    manifest = train_on_gpu(tmp_path, "dpo", raw)
    assert manifest["status"] == "completed" and manifest["reference_syncs"] == 2
    run = Path(raw["dpo_training"]["save_dir"])
    assert (run / "checkpoints" / "step_00000003" / "replicated" / "reference.safetensors").is_file()
    train = json.loads((run / "progress.json").read_text())["train"]
    assert math.isfinite(train["loss"]) and 0 < train["wpo_weights"] < float("inf")


def test_kto_runs_in_bf16_on_the_gpu_from_a_reference_table(tmp_path, micro_model, reverse_data):
    """KTO with the compiled bf16 head and a precomputed table (completions and KL sequences):
    finite losses, the reference point logged, no reference forward while training."""
    raw = run_config(tmp_path, micro_model, reverse_data, "kto_training", max_steps=4, batch_size=8,
                     torch_compile=True, precompute_ref_log_probs=True)
    raw["precision"] = "bf16"
    manifest = train_on_gpu(tmp_path, "kto", raw)
    assert manifest["status"] == "completed" and manifest["reference_forwards"] == 0
    train = json.loads((Path(raw["kto_training"]["save_dir"]) / "progress.json").read_text())["train"]
    assert math.isfinite(train["loss"]) and train["kl"] >= 0


def test_a_reward_model_trains_packed_in_bf16_on_the_gpu(tmp_path, micro_model, reverse_data):
    """The score read at each sequence's end of packed rows, in bf16 with the compiled blocks."""
    raw = run_config(tmp_path, micro_model, reverse_data, "reward_training", max_steps=4, batch_size=8,
                     torch_compile=True, padding_free=True)
    raw["precision"] = "bf16"
    manifest = train_on_gpu(tmp_path, "reward", raw)
    assert manifest["status"] == "completed" and manifest["median_padding_fraction"] < 0.5
    train = json.loads((Path(raw["reward_training"]["save_dir"]) / "progress.json").read_text())["train"]
    assert math.isfinite(train["loss"]) and 0 <= train["rewards/accuracies"] <= 1


def test_sft_with_checkpointing_and_fused_adamw_on_the_gpu(tmp_path, micro_model, reverse_data):
    raw = run_config(tmp_path, micro_model, reverse_data, "sft_training", max_steps=3, batch_size=8,
                     gradient_checkpointing=True, optim="adamw_torch_fused")
    raw["precision"] = "bf16"
    assert train_on_gpu(tmp_path, "sft", raw)["status"] == "completed"


def test_zero3_loads_into_gpu_slices_with_nccl(tmp_path, micro_model, reverse_data):
    """ZeRO-3 in bf16 over nccl: the policy and reference are built partitioned on the GPU, padded
    rows are checked against packed ones through the engine, and the run completes."""
    raw = run_config(tmp_path, micro_model, reverse_data, "dpo_training", max_steps=4, batch_size=8, save_steps=2,
                     padding_free=True)
    raw.update(precision="bf16", deepspeed={"zero_stage": 3})
    manifest = train_on_gpu(tmp_path, "dpo", raw)
    assert manifest["status"] == "completed" and manifest["device"].endswith("nccl")
    assert "ZeRO-3: the policy was loaded straight into each rank's slice (1 rank(s))" in manifest["stdout"]


def test_padding_free_with_flex_attention_trains_as_padded_rows(tmp_path, micro_model, reverse_data):
    """The flat layout (one row, no padding) through flex attention's block-sparse kernel, whose
    backward exists only on GPUs: the weights after 3 steps match padded rows through sdpa."""
    from safetensors.torch import load_file

    weights, manifests = {}, {}
    for name, options in (("padded", {}), ("flat", {"padding_free": True})):
        raw = run_config(tmp_path / name, micro_model, reverse_data, "dpo_training", max_steps=3, batch_size=8,
                         **options)
        if options:
            raw["attn_implementation"] = "flex_attention"
        (tmp_path / name).mkdir()
        manifests[name] = train_on_gpu(tmp_path / name, "dpo", raw)
        weights[name] = load_file(Path(raw["dpo_training"]["save_dir"]) / "model.safetensors")
    assert manifests["flat"]["median_padding_fraction"] == 0.0 < manifests["padded"]["median_padding_fraction"]
    for key in weights["padded"]:
        torch.testing.assert_close(weights["flat"][key], weights["padded"][key], rtol=1e-4, atol=1e-4)


def test_padding_free_with_varlen_attn_trains_as_padded_rows_in_bf16(tmp_path, micro_model, reverse_data):
    """The flat layout through PyTorch's variable-length flash kernel (bf16, as on a cluster) against
    padded rows through sdpa: bf16 kernels round differently, and Adam turns a rounding-level
    gradient difference into up to a learning rate per step, so the weights (saved in bf16) agree
    to three learning rates plus their rounding, and almost all far closer."""
    from safetensors.torch import load_file

    weights, manifests = {}, {}
    for name, options in (("padded", {}), ("flat", {"padding_free": True, "generate_during_eval": True})):
        raw = run_config(tmp_path / name, micro_model, reverse_data, "dpo_training", max_steps=3, batch_size=8,
                         **options)
        raw["precision"] = "bf16"
        if options:
            raw["attn_implementation"] = "varlen_attn"  # and its samples decode through sdpa
        (tmp_path / name).mkdir()
        manifests[name] = train_on_gpu(tmp_path / name, "dpo", raw)
        weights[name] = load_file(Path(raw["dpo_training"]["save_dir"]) / "model.safetensors")
    assert "varlen_attn: PyTorch's variable-length flash-attention kernel" in manifests["flat"]["stdout"]
    assert manifests["flat"]["stdout"].count("samples at step") == 2  # before training and at the end
    assert manifests["flat"]["median_padding_fraction"] == 0.0 < manifests["padded"]["median_padding_fraction"]
    gaps = torch.cat([(weights["flat"][k].float() - weights["padded"][k].float()).abs().flatten()
                      for k in weights["padded"]])
    learning_rate, bf16_rounding = raw["dpo_training"]["learning_rate"], 1e-2  # weights of magnitude ~1: 2^-8
    assert gaps.max() <= 3 * learning_rate + bf16_rounding and gaps.mean() < 1e-3, (gaps.max(), gaps.mean())
