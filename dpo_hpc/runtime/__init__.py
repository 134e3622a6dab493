"""The bottom runtime layer under checkpoints and trainers: process-group setup and collectives
(``distributed``), and the stop signal that turns preemption into a collective checkpoint (``stop``)."""

from .distributed import (DistEnv, all_gather_cat, all_reduce_sum, barrier, init_distributed, launched_ranks,
                          main_rank_first, shutdown)

__all__ = ["DistEnv", "all_gather_cat", "all_reduce_sum", "barrier", "init_distributed", "launched_ranks",
           "main_rank_first", "shutdown"]
