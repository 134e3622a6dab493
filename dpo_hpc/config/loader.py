"""Load TOML / YAML / JSON config files into the typed dataclasses, with errors a person can act on.

Every problem becomes one line ``<file>: <key.path>: <what was expected>``; all problems of a
file are reported together. YAML is read with a safe loader only (configs are data).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import TypeAdapter, ValidationError

from .errors import ConfigError
from .registry import ALGORITHMS, algorithm

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``5e-6`` as a float (YAML 1.1 wants ``5.0e-6``).

    The seed configs write learning rates as ``5e-6``; plain PyYAML would hand the
    strict schema a string and the user a confusing type error.
    """


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|" r"^[-+]?[0-9][0-9_]*\.[0-9_]*$|^[-+]?\.[0-9_]+$"),
    list("-+0123456789."),
)


MAX_CONFIG_BYTES = 4 * 1024 * 1024
"""A config or experiment file is a few kilobytes; anything this big is the wrong file."""
MAX_CONFIG_VALUES = 100_000
"""Values a config may hold once YAML aliases are expanded (an alias bomb expands to billions)."""


def _expanded_size(data: Any, path: Path) -> int:
    """How many values ``data`` holds with every shared (aliased) node counted each time it is
    used, computed once per distinct node; a node that contains itself is refused."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError([f"{path}: a YAML alias refers to a node that contains it; write the values out"])
        open_nodes.add(key)
        children = node.values() if isinstance(node, dict) else node
        sizes[key] = 1 + sum(size(child) for child in children)
        open_nodes.discard(key)
        return sizes[key]

    return size(data)


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise ConfigError([f"{path}: is a folder; expected a TOML, YAML or JSON config file"])
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_CONFIG_BYTES // 2**20} MiB; a config file is a few kilobytes of "
                           "TOML, YAML or JSON (is this the right file?)"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); a config is a "
                           "TOML, YAML or JSON text file"]) from None


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Parse a TOML, YAML or JSON file into a dict; errors name the file."""
    path = Path(path)
    text = _read_text(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - _SafeLoader derives from SafeLoader
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError([f"{path}: unknown config format '{suffix}'; expected .toml, .yaml, .yml or .json"])
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError([f"{path}: not valid {suffix[1:].upper()}: {detail}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply to be a config"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}"])
    try:
        values = _expanded_size(data, path)
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply to be a config"]) from None
    if values > MAX_CONFIG_VALUES:
        raise ConfigError([f"{path}: holds more than {MAX_CONFIG_VALUES:,} values once its YAML aliases (*name) are "
                           "expanded; write the values out"])
    return data


def set_dotted(data: dict, key: str, value: Any, where: str) -> None:
    """Set ``section.sub.key`` in nested tables, creating missing sections; ``where`` names the source in errors."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError([f"{where}: '{key}': '{part}' is a value, not a section"])
    node[parts[-1]] = value


def detect_trainer(data: Mapping[str, Any]) -> str:
    """The trainer whose own sections the file has (the original configs carry no trainer key);
    plain DPO, which has no section of its own, when none matches."""
    for algo in ALGORITHMS.values():
        if any(section in data for section in algo.marker_sections):
            return algo.name
    return "dpo"


def _field_names(cls) -> list[str]:
    """Keys accepted by a config dataclass, by the names a file uses (aliases included)."""
    names = []
    for name, info in getattr(cls, "__pydantic_fields__", {}).items():
        names.append(info.alias or name)
    return names


def _class_at(cls, loc: tuple) -> Any:
    """The dataclass that holds the key at ``loc`` (for 'did you mean' suggestions)."""
    keyed = False  # the previous part was a dict[str, Section]: this part is a free key (a stage name)
    for part in loc[:-1]:
        if keyed:
            keyed = False
            continue
        fields = getattr(cls, "__pydantic_fields__", {})
        info = next((f for n, f in fields.items() if (f.alias or n) == part), None)
        if info is None:
            return None
        annotation = info.annotation
        keyed = typing.get_origin(annotation) is dict
        for candidate in (annotation, *typing.get_args(annotation)):
            if dataclasses.is_dataclass(candidate):
                cls = candidate
                break
        else:
            return None
    return cls


TRL_NAMES = {
    "per_device_train_batch_size": "batch_size", "per_device_eval_batch_size": "eval_batch_size",
    "num_train_epochs": "epochs", "lr_scheduler_type": "lr_scheduler", "output_dir": "save_dir",
    "eval_strategy": "eval_steps (0: only at the end)",
    "save_strategy": "save_steps (0: only at the end)", "bf16": 'the top-level precision = "bf16"',
    "fp16": 'the top-level precision = "fp16"', "model_name_or_path": "policy_name",
    "ref_model": "ref_name", "dataset_train_split": "dataset.subset", "dataset_test_split": "dataset.eval_subset",
    "max_length": "dataset.max_length", "max_seq_length": "dataset.max_length",
    "max_prompt_length": "dataset.max_prompt_length", "max_completion_length": "dataset.max_length (the whole "
    "sequence; completions are cut to fit it)", "chat_template_path": "chat_template (the template's text)",
    "model_init_kwargs": "the top-level torch_dtype, attn_implementation and trust_remote_code",
    "use_peft": "a [lora] section", "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "output_router_logits": "the top-level router_aux_loss_coef (the router's load-balancing loss, with its weight)",
    "router_aux_loss_coef": "the top-level router_aux_loss_coef", "disable_dropout": "always on (no key)",
    "precompute_ref_batch_size": "eval_batch_size (the reference pass's micro-batch too)",
    "truncation_mode": "dataset.truncation_mode", "data_seed": "seed (it orders the data too)",
    "deepspeed": "the top-level [deepspeed] section (zero_stage, config_file)",
}
"""TRL's names of settings this schema names otherwise (the original framework's names, or a
section of their own), for the error a TRL config meets: said, never read as aliases."""

_PUSH_FROM_A_LOGIN_NODE = ("compute nodes are offline; save_dir holds the final model (save_pretrained) with its model "
                           "card, to push from a login node: hf upload ORG/NAME SAVE_DIR --exclude 'checkpoints/*'")
TRL_LEFT_OUT = {
    "activation_offloading": "not offered; gradient_checkpointing cuts activation memory",
    "gradient_checkpointing_kwargs": "gradient_checkpointing is always non-reentrant here; "
                                     "gradient_checkpointing_every_n_layers picks the blocks",
    "resume_from_checkpoint": "a run resumes by itself from its save_dir's newest verified checkpoint",
    "fsdp": "sharding here is DeepSpeed ZeRO (the top-level deepspeed.zero_stage = 3)",
    "fsdp_config": "sharding here is DeepSpeed ZeRO (the top-level deepspeed.zero_stage = 3)",
    "push_to_hub": _PUSH_FROM_A_LOGIN_NODE,
    "hub_model_id": _PUSH_FROM_A_LOGIN_NODE,
    "use_liger_kernel": "not needed: the log-probs come from a chunked head at completion tokens, never from "
                        "full-vocabulary logits",
    "torch_compile_mode": "torch_compile compiles each transformer block with inductor's default mode",
    "torch_compile_backend": "torch_compile compiles each transformer block with inductor's default mode",
    "dataset_num_proc": "rows are tokenized once (on rank 0) and cached by content, not per process",
    "dataloader_num_workers": "batches are collated in the training process from rows tokenized once and cached",
    "pad_to_multiple_of": "rows are padded to the micro-batch's longest; padding_free removes the padding",
    "load_best_model_at_end": "the final model is the last step's; every evaluation is in TensorBoard and the "
                              "experiment report",
    "metric_for_best_model": "the final model is the last step's; every evaluation is in TensorBoard and the "
                             "experiment report",
    "neftune_noise_alpha": "NEFTune's embedding noise is not offered",
}
"""TRL options with no counterpart here, and why: said as such, not as an unknown key."""


def _describe(error: dict, root_cls) -> str:
    loc = tuple(str(p) for p in error["loc"])
    key = ".".join(loc) if loc else "<top level>"
    kind = error["type"]
    value = error.get("input")
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        holder = _class_at(root_cls, loc)
        valid = _field_names(holder) if holder else []
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else (f"; valid keys: {', '.join(sorted(valid))}" if valid else "")
        if loc and loc[-1] in TRL_NAMES:
            hint = f"; that is TRL's name: here it is {TRL_NAMES[loc[-1]]}"
        elif loc and loc[-1] in TRL_LEFT_OUT:
            hint = f"; that is TRL's option: {TRL_LEFT_OUT[loc[-1]]}"
        return f"{key}: unknown key{hint}"
    if kind == "missing":
        return f"{key}: required key is missing"
    message = error["msg"]
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
        return f"{key}: {message}"
    expected = message.removeprefix("Input should be ")
    shown = repr(value) if not isinstance(value, (dict, list)) else "a " + ("table" if isinstance(value, dict) else "list")
    return f"{key}: expected {expected}, got {shown} ({type(value).__name__})"


def validate_mapping(data: Mapping[str, Any], trainer: str, source: str = "<config>"):
    """Validate a dict against the trainer's schema; raise ConfigError listing every problem."""
    return validate_as(algorithm(trainer, source).config, data, source)


def validate_as(cls, data: Mapping[str, Any], source: str = "<config>"):
    """Validate a dict against any of the strict config dataclasses; raise ConfigError listing every problem."""
    try:
        # JSON mode: strict scalars (no "16" -> 16) while nested sections may be plain tables.
        return TypeAdapter(cls).validate_json(json.dumps(dict(data), default=str))
    except ValidationError as exc:
        problems = [f"{source}: {_describe(err, cls)}" for err in _one_per_union(exc.errors())]
        raise ConfigError(problems) from None


_SCALAR_TAGS = {"str", "int", "float", "bool"}


def _is_branch(segment) -> bool:
    """A union member's tag in an error's location (pydantic names each branch it tried:
    ``str``, ``list[str]``, ``literal['a','b']``), not a key."""
    return isinstance(segment, str) and (segment in _SCALAR_TAGS or "[" in segment)


def _one_per_union(errors: list[dict]) -> list[dict]:
    """Pydantic reports a value that fits no member of a union once per member (``loss_type``:
    a name, or a list of names). Keep the member the value was meant for: the one whose errors are
    inside the value (a list with a bad item), else the one that is not a type mismatch (a name
    that is not a loss); if every member's type mismatches, one error naming them all."""
    kept, unions = [], {}
    for error in errors:
        at = next((i for i, segment in enumerate(error["loc"]) if _is_branch(segment)), None)
        if at is None:
            kept.append(error)
        else:
            unions.setdefault(error["loc"][:at], []).append((at, error))
    for field, members in unions.items():
        picked = ([e for at, e in members if len(e["loc"]) > at + 1]
                  or [e for _, e in members if not e["type"].endswith("_type")])
        if picked:
            kept += [{**e, "loc": tuple(s for s in e["loc"] if not _is_branch(s))} for e in picked]
        else:
            expected = " or ".join(dict.fromkeys(e["msg"].removeprefix("Input should be ") for _, e in members))
            kept.append({**members[0][1], "loc": field, "msg": f"Input should be {expected}"})
    return kept


def load_config(path: str | Path, trainer: str | None = None):
    """Load and validate a trainer config file; ``trainer`` is detected from its sections if None."""
    data = read_mapping(path)
    return validate_mapping(data, trainer or detect_trainer(data), source=str(path))


def to_dict(cfg) -> dict[str, Any]:
    """Plain-data form of a config, with the file's key names (``lambda``, not ``lambda_``)."""
    return TypeAdapter(type(cfg)).dump_python(cfg, by_alias=True, mode="json")


def flagged_keys(cls, flag: str) -> set[str]:
    """Names (as files spell them) of the keys of ``cls`` and its sections carrying ``flag`` (see
    ``schema.RESUMABLE``, ``schema.LOCATION`` and ``schema.PERMISSION``)."""
    found = set()
    for name, info in getattr(cls, "__pydantic_fields__", {}).items():
        if (info.json_schema_extra or {}).get(flag):
            found.add(info.alias or name)
        for candidate in (info.annotation, *typing.get_args(info.annotation)):
            if dataclasses.is_dataclass(candidate):
                found |= flagged_keys(candidate, flag)
    return found


def _drop(data: dict, cls, flag: str) -> dict:
    for name, info in getattr(cls, "__pydantic_fields__", {}).items():
        key = info.alias or name
        if (info.json_schema_extra or {}).get(flag):
            data.pop(key, None)
        elif isinstance(data.get(key), dict) and dataclasses.is_dataclass(info.annotation):
            _drop(data[key], info.annotation, flag)
    return data


def to_identity(cfg) -> dict[str, Any]:
    """What makes a run this run: every value that differs from its key's default (sections left
    at their defaults vanish), without the keys that only locate things (``save_dir``) or grant a
    permission (``accept_data_change``). A later
    version that adds a key with a default therefore keeps run ids, completed-run checks and
    resumes of existing runs as they were, and a moved run is the same run."""
    dumped = TypeAdapter(type(cfg)).dump_python(cfg, by_alias=True, mode="json", exclude_defaults=True)
    return _drop(dumped, type(cfg), "outside_identity")


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY.PATH=VALUE`` (``--set``) -> (key, value); the value is read as TOML, a bare word as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {text}: expected KEY.PATH=VALUE"])
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string
    return key.strip(), value
