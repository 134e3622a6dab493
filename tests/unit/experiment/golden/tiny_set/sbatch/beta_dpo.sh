#!/bin/bash

# Parameters
#SBATCH --array=0-0%1
#SBATCH --chdir=<REPO>/experiments
#SBATCH --cpus-per-task=1
#SBATCH --dependency='afterok:<job ids of the sft tasks>'
#SBATCH --error=<REPO>/runs/tiny/.submit/logs/%A_%a/%A_%a_0_log.err
#SBATCH --job-name=tiny.beta_dpo
#SBATCH --mem=3G
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=<REPO>/runs/tiny/.submit/logs/%A_%a/%A_%a_0_log.out
#SBATCH --requeue
#SBATCH --signal=USR2@60
#SBATCH --time=30
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <REPO>/runs/tiny/.submit/logs/%A_%a/%A_%a_%t_log.out --error <REPO>/runs/tiny/.submit/logs/%A_%a/%A_%a_%t_log.err <PYTHON> -u -m submitit.core._submit <REPO>/runs/tiny/.submit/logs/%j
