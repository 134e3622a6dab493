"""dpo-hpc: SFT, DPO, Dynamic-Beta DPO and Beta-DPO on DeepSpeed, for Slurm clusters."""

__version__ = "0.1.0"
