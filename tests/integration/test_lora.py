"""LoRA through peft with the real trainer and DeepSpeed on CPU: only adapters train, the DPO
reference is the policy with its adapters off (no second model), checkpoints hold the adapter
and its optimizer state without the frozen base, a stopped run resumes to the same adapter, and
a DPO stage starts from a LoRA SFT run's adapter folder."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import BIN, REPO, run_config, stop_at
from dpo_hpc.checkpoint import layout
from dpo_hpc.config import validate_mapping

pytest.importorskip("peft")
pytestmark = pytest.mark.slow

LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}


def lora_dpo(tmp_path, model, data, name, zero_stage=0, **training):
    raw = run_config(tmp_path / name, model, data, "dpo_training", max_steps=4, batch_size=4, learning_rate=5e-3,
                     **training)
    raw["lora"] = dict(LORA)
    raw["deepspeed"] = {"zero_stage": zero_stage}
    return raw


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_lora_dpo_trains_adapters_against_its_own_base_and_resumes_exactly(tmp_path, micro_model, reverse_data,
                                                                           zero_stage):
    from dpo_hpc.trainers.trainer import Trainer, train
    from dpo_hpc.config import algorithm

    straight = lora_dpo(tmp_path, micro_model, reverse_data, "straight", zero_stage, eval_steps=2)
    trainer = Trainer(validate_mapping(straight, "dpo"), algorithm("dpo"))
    summary = trainer.train()
    assert summary["reference"] == "policy with adapters off" and summary["reference_forwards"] > 0
    run_dir = Path(straight["dpo_training"]["save_dir"])
    adapter = load_file(run_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter) and not (run_dir / "model.safetensors").exists()
    assert json.loads((run_dir / "adapter_config.json").read_text())["r"] == 4
    from test_training import scalars

    assert scalars(run_dir / "tensorboard")["loss"][0][1] == pytest.approx(math.log(2), abs=1e-5)  # B = 0 at start

    # Stopped after step 2 (checkpoint), then resumed: the same adapter as the straight run, with
    # sample generations on the way (they change nothing).
    resumed = lora_dpo(tmp_path, micro_model, reverse_data, "resumed", zero_stage, eval_steps=2,
                       generate_during_eval=True, max_new_tokens=4)
    cfg = validate_mapping(resumed, "dpo")
    assert train(cfg, "dpo", stop=stop_at(2))["status"] == "preempted"
    ckpt = Path(resumed["dpo_training"]["save_dir"]) / "checkpoints" / layout.step_dir_name(2)
    engine_files = list((ckpt / layout.ENGINE_TAG).glob("*model_states.pt"))
    module = torch.load(engine_files[0], weights_only=False)["module"]  # our own file, written just now
    # The frozen base is not in the checkpoint; DeepSpeed keeps the tied head under its second name.
    assert [key for key in module if "lora_" not in key] == ["base_model.model.lm_head.weight"]
    assert train(cfg, "dpo")["status"] == "completed"
    again = load_file(Path(resumed["dpo_training"]["save_dir"]) / "adapter_model.safetensors")
    assert again.keys() == adapter.keys() and all(torch.equal(again[k], adapter[k]) for k in adapter)
    assert sorted(p.name for p in (Path(resumed["dpo_training"]["save_dir"]) / "samples").iterdir()) == \
        ["step_00000000.jsonl", "step_00000002.jsonl", "step_00000004.jsonl"]


def test_the_reference_with_adapters_off_is_the_base_model(micro_model):
    from dpo_hpc.config.schema import LoraConfig
    from dpo_hpc.trainers.engine import load_causal_lm
    from dpo_hpc.trainers.lora import AdaptersOff, add_adapters

    base = load_causal_lm(str(micro_model), "fp32", trainable=False)
    policy = add_adapters(load_causal_lm(str(micro_model), "fp32", trainable=True), LoraConfig(r=4))
    with torch.no_grad():  # move the adapters off zero, so the policy differs from its base
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    ids = torch.randint(3, 200, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        assert not torch.equal(policy(**batch).logits, base(**batch).logits)
        assert torch.equal(AdaptersOff(policy)(**batch).logits, base(**batch).logits)


def test_lora_sft_then_dpo_from_its_adapter_folder_and_merged_output(tmp_path, micro_model, reverse_data):
    from transformers import AutoModelForCausalLM

    from dpo_hpc.trainers.trainer import train

    sft = run_config(tmp_path / "sft", micro_model, reverse_data, "sft_training", max_steps=3, batch_size=8,
                     learning_rate=5e-3)
    sft["lora"] = {**LORA, "target_modules": "all-linear"}
    train(validate_mapping(sft, "sft"), "sft")
    sft_dir = Path(sft["sft_training"]["save_dir"])
    assert (sft_dir / "adapter_config.json").exists() and not (sft_dir / "config.json").exists()
    dpo = lora_dpo(tmp_path, sft_dir, reverse_data, "dpo")  # policy and reference: the SFT adapter merged in
    dpo["lora"]["merge"] = True
    summary = train(validate_mapping(dpo, "dpo"), "dpo")
    assert summary["status"] == "completed" and summary["reference"] == "policy with adapters off"
    dpo_dir = Path(dpo["dpo_training"]["save_dir"])
    assert (dpo_dir / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(dpo_dir / "merged")
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    from dpo_hpc.trainers.engine import load_causal_lm

    on_load = load_causal_lm(str(dpo_dir), "fp32", trainable=True)  # the adapter folder, merged when loaded
    for name, weight in merged.state_dict().items():
        torch.testing.assert_close(on_load.state_dict()[name], weight)
    # The model cards say how each folder loads, and it loads so: the SFT adapter with peft (the
    # card replaces peft's blank one), the DPO run (an adapter on an adapter) from merged/.
    from peft import AutoPeftModelForCausalLM

    from dpo_hpc.checkpoint.model_card import PEFT_TEMPLATE

    sft_card, dpo_card = ((d / "README.md").read_text() for d in (sft_dir, dpo_dir))
    assert PEFT_TEMPLATE not in sft_card
    assert f'AutoPeftModelForCausalLM.from_pretrained("{sft_dir.resolve()}")' in sft_card
    assert f'AutoModelForCausalLM.from_pretrained("{(dpo_dir / "merged").resolve()}")' in dpo_card
    assert "library_name: transformers" in (dpo_dir / "merged/README.md").read_text()  # the folder people push
    tokens = torch.tensor([[1, 5, 9, 20, 33, 7]])
    with torch.no_grad():
        torch.testing.assert_close(AutoPeftModelForCausalLM.from_pretrained(sft_dir).eval()(input_ids=tokens).logits,
                                   load_causal_lm(str(sft_dir), "fp32", trainable=False)(input_ids=tokens).logits)

    # Under ZeRO-3 the SFT adapter is merged in slices, not by peft, yet the run is the same: its
    # new adapters are drawn from the seed alone (to summation order, as ZeRO-3 sums otherwise).
    zero3 = lora_dpo(tmp_path, sft_dir, reverse_data, "dpo3", zero_stage=3)
    assert train(validate_mapping(zero3, "dpo"), "dpo")["status"] == "completed"
    a, b = (load_file(d / "adapter_model.safetensors") for d in (dpo_dir, Path(zero3["dpo_training"]["save_dir"])))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


def saved_adapter(model, folder: Path, base: str, **options) -> Path:
    """``model`` with fresh LoRA adapters moved off zero, saved by peft naming ``base``."""
    import peft

    policy = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **options))
    policy.peft_config["default"].base_model_name_or_path = base
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    policy.save_pretrained(folder)
    return folder


def test_zero3_loads_a_lora_chain_in_slices_equal_to_peft_merging_it_whole(tmp_path, micro_model):
    """An adapter over an adapter over the model (a LoRA DPO run from a LoRA SFT run) loads under
    ZeRO-3 with its base in slices and each adapter added layer by layer: the same weights, bit
    for bit, as peft merging both into a whole model. An adapter that is more than plain LoRA
    (here DoRA) is merged by peft, which needs the base whole."""
    import deepspeed
    from test_training import clean_env, free_port

    from dpo_hpc.runtime import init_distributed
    from dpo_hpc.trainers import lora
    from dpo_hpc.trainers.engine import load_causal_lm

    init_distributed()  # one rank, in this process

    def load(name, partition_with=None):
        return load_causal_lm(str(name), "fp32", trainable=True, partition_with=partition_with)

    sft = saved_adapter(load(micro_model), tmp_path / "sft", str(micro_model), r=4, lora_alpha=8.0,
                        target_modules="all-linear")
    dpo = saved_adapter(load(sft), tmp_path / "dpo", str(sft), r=2, lora_alpha=4.0, use_rslora=True,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    assert lora.merges_in_slices(str(dpo))
    zero3 = {"train_batch_size": 2, "zero_optimization": {"stage": 3}}  # 1 or 2 ranks
    sliced, whole = load(dpo, zero3), load(dpo)
    assert all(p.numel() == 0 for p in sliced.parameters())  # no rank held it whole
    with deepspeed.zero.GatheredParameters(list(sliced.parameters())):
        gathered = {name: p.detach().clone() for name, p in sliced.named_parameters()}
    expected = dict(whole.named_parameters())
    assert gathered.keys() == expected.keys()
    assert all(torch.equal(gathered[name], expected[name]) for name in gathered)
    assert not torch.equal(expected["model.layers.0.self_attn.q_proj.weight"],
                           dict(load(micro_model).named_parameters())["model.layers.0.self_attn.q_proj.weight"])

    # Two ranks, each merging into its own slices: the slices put together are the same weights.
    script = tmp_path / "two_ranks.py"
    script.write_text(
        "import deepspeed, torch\n"
        "from safetensors.torch import save_file\n"
        "from dpo_hpc.runtime import init_distributed\n"
        "from dpo_hpc.trainers.engine import load_causal_lm\n"
        "rank = init_distributed().rank\n"
        f"model = load_causal_lm({str(dpo)!r}, 'fp32', True, partition_with={zero3!r})\n"
        "with deepspeed.zero.GatheredParameters(list(model.parameters())):\n"
        "    whole = {n: p.detach().clone() for n, p in model.named_parameters()}\n"
        f"save_file(whole, {str(tmp_path)!r} + f'/rank{{rank}}.safetensors')\n")
    result = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                             str(script)], capture_output=True, text=True, env=clean_env(OMP_NUM_THREADS="1"),
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        merged = load_file(tmp_path / f"rank{rank}.safetensors")
        assert merged.keys() == expected.keys() and all(torch.equal(merged[n], expected[n]) for n in merged)

    # An adapter that does not fit its base is one line naming the folder and the layer.
    from safetensors.torch import save_file

    from dpo_hpc.config import ConfigError

    tensors = load_file(dpo / "adapter_model.safetensors")
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj"
    for other, said in (("model.layers.0.mlp.up_proj", "is for a (64, 64) weight; its base model's is (128, 64)"),
                        ("model.layers.9.self_attn.q_proj", "which is not a layer of its base model")):
        bad = tmp_path / f"bad-{other}"
        bad.mkdir()
        (bad / "adapter_config.json").write_text((dpo / "adapter_config.json").read_text())
        save_file({key.replace(q_proj, f"base_model.model.{other}"): t for key, t in tensors.items()},
                  bad / "adapter_model.safetensors")
        with pytest.raises(ConfigError, match=re.escape(said)) as refused:
            load(bad, zero3)
        assert str(bad) in str(refused.value) and other in str(refused.value)

    dora = saved_adapter(load(micro_model), tmp_path / "dora", str(micro_model), r=4, use_dora=True,
                         target_modules=["q_proj"])
    assert not lora.merges_in_slices(str(dora))
    assert all(p.numel() > 0 for p in load(dora, zero3).parameters())
