"""Every training algorithm, declared once.

The CLI's trainer names, the experiment schema's ``trainer`` values, expansion's training
section, config detection and objective building all read this table. Adding an algorithm is
one entry here plus its config class (``schema.py``) and, for a preference method, its beta
policy (``build_objective`` picks the objective by ``kind`` and ``model``). No torch here: the
beta policy is named as ``"module:Class"`` and imported only by the trainer, so configs and
experiments still load on a login node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .errors import ConfigError
from .schema import (BetaDPORunConfig, DPORunConfig, DynamicBetaDPORunConfig, KTORunConfig, RewardRunConfig,
                     SFTRunConfig)


@dataclass(frozen=True)
class Algorithm:
    name: str
    """The schema name: ``trainer = "..."`` in experiments, ``--trainer`` in ``validate``."""
    command: str
    """``dpo-hpc train COMMAND``."""
    config: type
    """The run config dataclass a file of this trainer validates against."""
    training_section: str
    """The section holding the optimisation settings and ``save_dir``."""
    kind: Literal["sft", "preference", "unpaired"]
    """What the data pipeline yields for it: conversations, preference pairs or labelled completions."""
    marker_sections: tuple[str, ...] = ()
    """Sections only this trainer's files have; they identify a file that names no trainer."""
    beta_policy: Optional[str] = None
    """Preference methods: ``"module:Class"`` of the beta policy (with a ``from_config``)."""
    legacy_command: Optional[str] = None
    """The original framework's console command for this trainer, if it had one."""
    model: Literal["causal_lm", "reward_model"] = "causal_lm"
    """What it trains: a causal LM (a policy), or a reward model (a scalar score head on the last token)."""
    method: str = ""
    """The method in a phrase, with its source: the model card's description of how a model was trained."""

    @property
    def reads_margins(self) -> bool:
        """Whether its data's rows give their ``margin`` column (TRL's reward-model column); the other
        trainers neither read nor check it."""
        return self.model == "reward_model"

    @property
    def uses_reference(self) -> bool:
        """Whether its runs read a reference model (or its log-probs): the preference policies' trainers."""
        return self.kind != "sft" and self.model == "causal_lm"


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("sft", "sft", SFTRunConfig, "sft_training", "sft", marker_sections=("sft_training",),
              legacy_command="train-sft", method="supervised fine-tuning on the assistant replies"),
    Algorithm("dpo", "dpo", DPORunConfig, "dpo_training", "preference",
              beta_policy="dpo_hpc.algorithms.beta.fixed:FixedBeta",
              method="Direct Preference Optimization with a fixed beta (DPO; Rafailov et al., 2023)"),
    # The original framework's `train-dpo` is Dynamic-Beta DPO.
    Algorithm("dynamic_beta_dpo", "dynamic-beta-dpo", DynamicBetaDPORunConfig, "dpo_training", "preference",
              marker_sections=("risk_test", "beta_update"),
              beta_policy="dpo_hpc.algorithms.beta.dynamic_beta:DynamicBetaPolicy", legacy_command="train-dpo",
              method="Dynamic-Beta DPO: DPO whose beta a risk test on the reward margin steers (quantile warmup, "
                     "EMA of tau, tanh step, clip)"),
    Algorithm("beta_dpo", "beta-dpo", BetaDPORunConfig, "dpo_training", "preference", marker_sections=("beta_dpo",),
              beta_policy="dpo_hpc.algorithms.beta.beta_dpo:BetaDPOPolicy", legacy_command="train-beta-dpo",
              method="Beta-DPO (Wu et al., 2024): a beta per batch from reward-gap statistics, with Gaussian-weighted "
                     "filtering of the pairs"),
    Algorithm("kto", "kto", KTORunConfig, "kto_training", "unpaired", marker_sections=("kto_training",),
              method="KTO (Ethayarajh et al., 2024) on completions labelled desirable or not"),
    Algorithm("reward", "reward", RewardRunConfig, "reward_training", "preference",
              marker_sections=("reward_training",), model="reward_model",
              method="a Bradley-Terry reward model: a scalar score head trained to rank the chosen reply above the "
                     "rejected one (Ouyang et al., 2022)"),
)}

TrainerName = Literal[tuple(ALGORITHMS)]  # type: ignore[valid-type]  # for schemas that name a trainer


def algorithm(name: str, source: str = "<config>") -> Algorithm:
    """The algorithm called ``name``; a ConfigError listing the valid names otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError([f"{source}: unknown trainer '{name}'; expected one of {', '.join(ALGORITHMS)}"]) from None


def by_command(command: str) -> Algorithm:
    """The algorithm of a ``dpo-hpc train`` command name or an original console command."""
    for algo in ALGORITHMS.values():
        if command in (algo.command, algo.legacy_command):
            return algo
    raise KeyError(command)
