#!/usr/bin/env bash
# The tiny end-to-end example on CPU: generate the reversal preference data and a tiny random
# Llama, run SFT, then DPO starting from the SFT result. Run from the repository root with the
# package installed. Re-running resumes or skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -s runs/tiny/data/train.jsonl ] || dpo-hpc make-data runs/tiny/data --n-train 4000 --n-test 500 --seed 0
[ -s runs/tiny/base/model.safetensors ] || dpo-hpc make-tiny-model runs/tiny/base --seed 0
dpo-hpc train sft --config experiments/tiny/sft.toml
dpo-hpc train dpo --config experiments/tiny/dpo.toml
echo
echo "models:      runs/tiny/sft  runs/tiny/dpo  (AutoModelForCausalLM.from_pretrained)"
echo "TensorBoard: tensorboard --logdir runs/tiny"
