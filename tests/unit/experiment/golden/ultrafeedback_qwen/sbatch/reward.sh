#!/bin/bash

# Parameters
#SBATCH --array=0-0%1
#SBATCH --chdir=<REPO>/experiments
#SBATCH --cpus-per-task=8
#SBATCH --dependency='afterok:<job ids of the sft tasks>'
#SBATCH --error=<REPO>/runs/ultrafeedback_qwen/.submit/logs/%A_%a/%A_%a_0_log.err
#SBATCH --gpus-per-node=4
#SBATCH --job-name=ultrafeedback_qwen.reward
#SBATCH --mem=256G
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output=<REPO>/runs/ultrafeedback_qwen/.submit/logs/%A_%a/%A_%a_0_log.out
#SBATCH --partition=gpu
#SBATCH --requeue
#SBATCH --signal=USR2@300
#SBATCH --time=720
#SBATCH --wckey=submitit

# setup
export HF_DATASETS_OFFLINE=1
export HF_HUB_OFFLINE=1

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <REPO>/runs/ultrafeedback_qwen/.submit/logs/%A_%a/%A_%a_%t_log.out --error <REPO>/runs/ultrafeedback_qwen/.submit/logs/%A_%a/%A_%a_%t_log.err apptainer exec --nv --bind <REPO>/runs --bind $HOME/.cache/huggingface dpo-hpc.sif python -u -m submitit.core._submit <REPO>/runs/ultrafeedback_qwen/.submit/logs/%j
