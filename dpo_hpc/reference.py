"""The README's configuration reference, generated from the dataclasses' field docstrings.

Regenerate the README section with ``python -m dpo_hpc.reference --write README.md``;
a test fails when the README and the schema disagree.
"""

from __future__ import annotations

import dataclasses
import sys
import typing

import annotated_types as at

from .config import schema as S
from .experiment import schema as E

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"

_SECTIONS = [
    ("Top level", S.DPORunConfig, "", None),
    ("`[dataset]`", S.DatasetConfig, "dataset.", None),
    ("`[sft_training]`, `[dpo_training]`, `[kto_training]` and `[reward_training]`", S.TrainingConfig, "", None),
    ("`[sft_training]` only", S.SFTTrainingConfig, "sft_training.", S.TrainingConfig),
    ("`[dpo_training]` and `[kto_training]`", S.ReferenceTrainingConfig, "", S.TrainingConfig),
    ("`[dpo_training]` only", S.DPOTrainingConfig, "dpo_training.", S.ReferenceTrainingConfig),
    ("`[kto_training]` only (kto)", S.KTOTrainingConfig, "kto_training.", S.ReferenceTrainingConfig),
    ("`[reward_training]` only (reward)", S.RewardTrainingConfig, "reward_training.", S.TrainingConfig),
    ("`[deepspeed]`", S.DeepSpeedConfig, "deepspeed.", None),
    ("`[risk_test]` (dynamic_beta_dpo)", S.RiskTestConfig, "risk_test.", None),
    ("`[beta_update]` (dynamic_beta_dpo)", S.BetaUpdateConfig, "beta_update.", None),
    ("`[beta_dpo]` (beta_dpo)", S.BetaDPOSectionConfig, "beta_dpo.", None),
    ("Experiment file: `[experiment]`", E.ExperimentSection, "experiment.", None),
    ("Experiment file: `[stages.NAME]`", E.StageConfig, "", None),
    ("Experiment file: `[stages.NAME.evaluate]`", E.EvaluationSection, "", None),
    ("Experiment file: `[stages.NAME.generate]` (and `dpo-hpc make-pairs`' options)", E.GenerationSection, "", None),
    ("Experiment file: `[slurm]` and `[stages.NAME.slurm]`", E.SlurmConfig, "", None),
    ("Experiment file: `[slurm.container]`", E.ContainerConfig, "container.", None),
    ("Experiment file: `[prepare.tiny_model]`", E.TinyModelAsset, "", None),
    ("Experiment file: `[prepare.reversal_data]`", E.ReversalDataAsset, "", None),
]
_BOUNDS = ((at.Gt, "gt", ">"), (at.Ge, "ge", ">="), (at.Lt, "lt", "<"), (at.Le, "le", "<="))


def _type_name(annotation) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if args and typing.get_origin(annotation) is typing.Union:
        # sorted: typing caches unions that differ only in order, so their order depends on import order
        return " or ".join(sorted(_type_name(a) for a in args))
    if dataclasses.is_dataclass(annotation):
        return "table"
    return getattr(annotation, "__name__", str(annotation))


def _range(metadata) -> str:
    parts = []
    for item in metadata:
        for cls, attr, sign in _BOUNDS:
            if isinstance(item, cls):
                parts.append(f"{sign} {getattr(item, attr)}")
    return ", ".join(parts)


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return ""
    return "none" if field.default is None else f"`{field.default!r}`"


def render() -> str:
    lines = []
    for title, cls, prefix, base in _SECTIONS:
        skip = set(base.__pydantic_fields__) if base else set()
        lines += [f"**{title}**", "", "| key | type | default | range | meaning |", "|---|---|---|---|---|"]
        for name, field in cls.__pydantic_fields__.items():
            if name in skip or dataclasses.is_dataclass(field.annotation):
                continue
            meaning = " ".join((field.description or "").split()).replace("``", "`")
            lines.append(f"| `{prefix}{field.alias or name}` | {_type_name(field.annotation)} | {_default(field)} "
                         f"| {_range(field.metadata)} | {meaning} |")
        lines.append("")
    return "\n".join(lines)


def splice(readme: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{render()}{END}{tail}"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        with open(sys.argv[2], encoding="utf-8") as f:
            text = f.read()
        with open(sys.argv[2], "w", encoding="utf-8") as f:
            f.write(splice(text))
    else:
        print(render())
