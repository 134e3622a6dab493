"""The Slurm side, torch-free at submit time: submission file names (``layout``), sbatch rendering
(``sbatch``), the ledger of submissions (``ledger``), job states (``jobs``), submission and
waiting (``submission``), the local executor (``local``), the status table (``table``), and what
one array task runs (``task``). ``dpo_hpc.submit`` and ``dpo_hpc.status`` are thin CLIs over it."""
