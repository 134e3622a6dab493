"""Typed configuration: one dataclass per section, with the original framework's keys.

A trainer config file has the sections its trainer needs:

- ``sft``: ``policy_name``, ``precision``, ``dataset``, ``sft_training``, ``deepspeed``.
- ``dpo`` (fixed beta): ``policy_name``, ``ref_name``, ``precision``, ``dataset``, ``dpo_training``, ``deepspeed``.
- ``dynamic_beta_dpo``: the DPO sections plus ``risk_test`` and ``beta_update``.
- ``beta_dpo``: the DPO sections plus ``beta_dpo``.

Every dataclass forbids unknown keys and is validated strictly (no silent coercion of
``"16"`` to ``16``), so a misspelled or mistyped key is an error, never a default.
No torch here: configs load on a login node in milliseconds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from .losses import LOSS_OPTIONS, LOSSES, REFERENCE_AGNOSTIC, LossType, is_reference_free, loss_types

STRICT = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)
"""The pydantic config of every config dataclass: unknown keys and loose types are errors."""

Precision = Literal["fp32", "bf16", "fp16"]

# Field flags (json_schema_extra), read by ``loader.to_identity`` and the trainer's resume guard:
RESUMABLE = {"resumable": True}
"""May change between a checkpoint and its resumption: it does not alter the math (step counts,
intervals)."""
LOCATION = {"resumable": True, "outside_identity": True}
"""Only says where things are: not part of a run's identity, so a moved run is the same run."""
PERMISSION = {"resumable": True, "outside_identity": True}
"""A one-time permission given when (re)starting a run: not part of what the run is."""

ROW_FIELDS = ("prompt", "chosen", "rejected", "messages", "system", "completion", "label", "margin")
"""The columns dataset rows are read by (``dataset.columns`` maps a dataset's own names onto them)."""


def _check_columns(columns: dict[str, str]) -> None:
    unknown = sorted(set(columns) - set(ROW_FIELDS))
    if unknown:
        raise ValueError(f"columns: unknown field(s) {', '.join(unknown)}; expected {', '.join(ROW_FIELDS)}")


@dataclass(config=STRICT, kw_only=True)
class MixSource:
    """One more dataset whose rows join ``dataset_name``'s (a ``[[dataset.mix]]`` table)."""

    dataset_name: str
    """Hub dataset name or local path, as ``dataset.dataset_name``."""
    subset: str = "train"
    """Its split expression of training rows."""
    eval_subset: Optional[str] = None
    """Its split of validation rows, joining ``dataset.eval_subset``'s (which it needs). Without one
    its rows only train there; under ``val_ratio`` the mixture's rows are split as one."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Its own names for the columns read, as ``dataset.columns``."""
    fraction: float = Field(1.0, gt=0.0, le=1.0)
    """The share of its ``subset`` rows taken: a seeded choice (``dataset.seed``), the same in every
    run (alignment-handbook's ``dataset_mixer`` fractions)."""

    @model_validator(mode="after")
    def _known_columns(self):
        _check_columns(self.columns)
        return self


@dataclass(config=STRICT, kw_only=True)
class DatasetConfig:
    dataset_name: str
    """Hub dataset name (e.g. ``Anthropic/hh-rlhf``) or a local path: a JSON/JSONL/parquet file,
    a folder of such files, or a folder written by ``Dataset.save_to_disk``."""
    subset: str = "train"
    """Split expression passed to ``datasets`` (``train``, ``train[:30%]``, ``test``)."""
    val_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of the loaded rows held out for validation (0 disables evaluation). Not used with
    ``eval_subset``."""
    eval_subset: Optional[str] = None
    """Split expression of the validation rows (TRL's ``dataset_test_split``: ``test``,
    ``test_prefs``, ``test[:1000]``), in place of a ``val_ratio`` share: the whole ``subset`` then
    trains. A local folder's splits are its files' names (``train.jsonl``, ``test.jsonl``)."""
    seed: int = 42
    """Seed of the train/validation split."""
    max_length: int = Field(512, ge=8)
    """Longest tokenized sequence (BOS + prompt + completion + EOS)."""
    max_prompt_length: int = Field(256, ge=1)
    """Preference pairs: prompts longer than this keep their last ``max_prompt_length`` tokens (below
    ``max_length``, so that a completion fits). SFT truncates whole conversations to ``max_length``."""
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    """Which end of a too-long prompt (SFT: conversation) is kept (TRL's name): ``keep_end`` keeps its
    last tokens, next to the reply; ``keep_start`` its first. Completions are then cut at the end."""
    format: Literal["auto", "text", "conversational"] = "auto"
    """How rows are read: ``text`` (HH transcripts, or prompt/chosen/rejected strings), ``conversational``
    (lists of {role, content} messages rendered with the tokenizer's chat template; SFT also reads
    ``messages``), or ``auto``: each row by its values."""
    columns: dict[str, str] = Field(default_factory=dict)
    """The dataset's names for the columns read (``prompt``, ``chosen``, ``rejected``, ``messages``,
    ``system``), e.g. ``{ chosen = "response_j", rejected = "response_k", prompt = "question" }``.
    A ``system`` column holds each row's own system message (Orca's ``system``); a row with one is
    conversational."""
    system_prompt: Optional[str] = None
    """A system message put first in every conversational row that has none of its own (in its
    messages or its ``system`` column); text rows are used as they are."""
    label_noise: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of preference pairs whose chosen and rejected are swapped, to study noisy labels
    on any dataset. Which pairs is fixed by each row's content and ``label_noise_seed``, not by the
    split or training seed, so every method and seed sees the same flipped pairs, and the pairs
    flipped at 0.2 are among those flipped at 0.4. Counted in the data report (``label_flipped``)."""
    label_noise_seed: int = 0
    """Seed of which pairs ``label_noise`` flips."""
    mix: list[MixSource] = Field(default_factory=list)
    """More datasets mixed in (``[[dataset.mix]]`` tables: ``dataset_name``, ``subset``,
    ``eval_subset``, ``columns``, ``fraction``): their rows join ``dataset_name``'s, each source read
    with its own column names, in whatever form its rows take (HH, text or conversational); the
    settings above apply to all. The data report counts the rows taken and kept of each (a source
    with none usable is an error), and names a dropped row by its source (``name[i]``)."""
    cache_dir: Optional[str] = Field(None, json_schema_extra=LOCATION)
    """Folder of tokenized splits, keyed by the rows, the settings above and the tokenizer: a run
    that finds its split there skips tokenizing (every restart, every rank, every run of a sweep
    on the same data). Default: none for a single run; an experiment's runs share
    ``<output_root>/<name>/.data_cache``. Needs a fast tokenizer."""

    @property
    def dataset_names(self) -> list[str]:
        """Every dataset the rows come from: ``dataset_name``, then each ``mix`` source's."""
        return [self.dataset_name, *(source.dataset_name for source in self.mix)]

    @model_validator(mode="after")
    def _known_columns(self):
        _check_columns(self.columns)
        for index, source in enumerate(self.mix):
            if source.eval_subset is not None and self.eval_subset is None:
                raise ValueError(f"mix[{index}].eval_subset: validation rows come from a val_ratio share of the "
                                 "mixture unless dataset.eval_subset is set; set that too, or leave this out")
        if self.format == "text" and (self.system_prompt is not None or "system" in self.columns):
            key = "system_prompt" if self.system_prompt is not None else "columns.system"
            raise ValueError(f"{key} applies to conversational rows; format = 'text' has none")
        return self


@dataclass(config=STRICT, kw_only=True)
class DeepSpeedConfig:
    zero_stage: int = Field(0, ge=0, le=3)
    """ZeRO stage (0 = plain data parallel, 1 = optimizer states, 2 = + gradients, 3 = + parameters)."""
    config_file: Optional[str] = None
    """Optional DeepSpeed JSON config merged over the generated one; values ``"auto"`` are filled
    from this file, explicit values that contradict it are an error."""


@dataclass(config=STRICT, kw_only=True)
class TrainingConfig:
    """Optimisation settings shared by every trainer."""

    learning_rate: float = Field(gt=0.0)
    """Peak learning rate of AdamW."""
    batch_size: int = Field(ge=1, json_schema_extra=RESUMABLE)
    """Micro-batch size per process (rows for SFT, preference pairs for DPO). A run resumes with
    another one, or another ``gradient_accumulation_steps`` or world size, as long as the global
    batch stays the same."""
    save_dir: str = Field(json_schema_extra=LOCATION)
    """Run directory: resolved config, data report, TensorBoard events, checkpoints, final model."""
    epochs: int = Field(1, ge=1, json_schema_extra=RESUMABLE)
    """Passes over the training split (``max_steps`` overrides it)."""
    max_steps: Optional[int] = Field(None, ge=1, json_schema_extra=RESUMABLE)
    """Stop after this many optimizer steps."""
    gradient_accumulation_steps: int = Field(1, ge=1, json_schema_extra=RESUMABLE)
    """Micro-batches per optimizer step; global batch = batch_size x this x world size."""
    global_batch_size: Optional[int] = Field(None, ge=1)
    """The global batch (rows or pairs per optimizer step; DeepSpeed's ``train_batch_size``)
    instead of ``gradient_accumulation_steps``, which is then derived at each start as this /
    (batch_size x world size): the run is the same on any number of GPUs, and resumes on another."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    """Decay after warmup: constant, linear to 0, or cosine to 0."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear learning-rate warmup from 0."""
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Warmup as a fraction of the run's optimizer steps, rounded up (TRL's name), for a run sized
    by ``epochs``; instead of ``warmup_steps``."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW decoupled weight decay."""
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    """AdamW first-moment decay."""
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    """AdamW second-moment decay."""
    adam_epsilon: float = Field(1e-8, gt=0.0)
    """AdamW denominator epsilon."""
    max_grad_norm: float = Field(1.0, ge=0.0)
    """Gradient clipping threshold on the global norm (0 disables clipping)."""
    seed: int = 42
    """Seed of model-side randomness and of the data order."""
    logging_steps: int = Field(10, ge=1, json_schema_extra=RESUMABLE)
    """Print a progress line every this many optimizer steps (TensorBoard gets every step)."""
    eval_steps: int = Field(0, ge=0, json_schema_extra=RESUMABLE)
    """Evaluate every this many optimizer steps (0: only at the end)."""
    eval_batch_size: Optional[int] = Field(None, ge=1, json_schema_extra=RESUMABLE)
    """Micro-batch size for evaluation (defaults to batch_size)."""
    generate_during_eval: bool = Field(False, json_schema_extra=RESUMABLE)
    """At each evaluation, and before the first step, the policy's greedy completions of the first
    ``generation_samples`` validation prompts (TRL's name), beside the data's reply: in TensorBoard's
    Text tab (``eval/samples``), W&B, and ``<save_dir>/samples/step_<N>.jsonl``. Seconds per
    evaluation on a GPU; the training is unchanged (no random draw is taken)."""
    generation_samples: int = Field(4, ge=1, le=64, json_schema_extra=RESUMABLE)
    """Validation prompts completed with ``generate_during_eval``: the same ones at every evaluation."""
    max_new_tokens: int = Field(128, ge=1, json_schema_extra=RESUMABLE)
    """Longest completion generated with ``generate_during_eval`` (generation stops at EOS or the
    chat template's end of turn)."""
    save_steps: int = Field(0, ge=0, json_schema_extra=RESUMABLE)
    """Write a resumable checkpoint every this many optimizer steps (0: none before the end)."""
    save_total_limit: int = Field(2, ge=1, json_schema_extra=RESUMABLE)
    """Checkpoints kept; older ones are removed only after a newer one is complete."""
    checkpoints_at_end: Literal["all", "last", "none"] = Field("last", json_schema_extra=RESUMABLE)
    """Checkpoints kept once the run has completed and saved its final model: the last one (for a
    longer run resumed from it), all that ``save_total_limit`` kept, or none (disk)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward (non-reentrant): much less activation
    memory for about a third more compute."""
    gradient_checkpointing_every_n_layers: int = Field(1, ge=1)
    """With ``gradient_checkpointing``: checkpoint only every n-th transformer block, the first
    included (HF's ``every_n_layers``, torchtitan's selective layer checkpointing). The others keep
    their activations, so 2 spends half the recompute for half the memory saved: for a micro-batch
    that fits without checkpointing every block."""
    optim: Literal["adamw_torch", "adamw_torch_fused"] = "adamw_torch"
    """AdamW implementation (TRL's names): PyTorch's default kernels (multi-tensor on CUDA, a loop
    over parameters on CPU), or its fused kernel (one pass over each parameter's state)."""
    group_by_length: bool = False
    """Fill each global batch, and each micro-batch in it, with rows of similar length (sorted within
    groups of 50 global batches): less padding; the data order stays a function of (seed, step)."""
    padding_free: bool = False
    """Pack each micro-batch's sequences whole into shared rows, position ids restarting per
    sequence (TRL's name); the attention keeps them apart. With ``varlen_attn``, ``flex_attention``
    or ``flash_attention_2``/``_3``, which skip other sequences' tokens, all in one row: no padding.
    With ``sdpa`` or ``eager``, whose mask is dense, into rows of the width that leaves the fewest
    token slots without more attention work than padded rows. The same math as padded batches,
    checked on the model before training."""
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=lambda: ["tensorboard"],
                                                            json_schema_extra=RESUMABLE)
    """Experiment trackers (HF's name): TensorBoard events in the run directory and/or Weights &
    Biases (needs ``dpo-hpc[wandb]``; ``WANDB_MODE=offline`` and ``WANDB_PROJECT`` are honoured);
    ``[]`` for neither. Progress lines and ``progress.json`` are always written."""
    run_name: Optional[str] = Field(None, json_schema_extra=LOCATION)
    """Display name of the run in the trackers (default: the run directory's name; an experiment
    sets the run id and its grid values)."""
    accept_data_change: bool = Field(False, json_schema_extra=PERMISSION)
    """Resume even though the training or validation data differ from what the checkpoint was
    trained on (a fingerprint of the rows' contents, their order and the tokenization): the run
    goes on from its step on the new data. Off, such a resume is refused with both fingerprints."""
    profile_steps: Optional[tuple[int, int]] = Field(None, json_schema_extra=RESUMABLE)
    """First and last optimizer step (1-based, inclusive) to run under ``torch.profiler``: per rank,
    a Chrome trace and a table of the step's phases (forward and loss, backward, optimizer) and
    costliest operators in ``<save_dir>/profile/``. A few steps after the warm-up, e.g. [10, 12]."""
    torch_compile: bool = False
    """Compile each transformer block (the model's ``_no_split_modules``) with ``torch.compile``,
    policy and reference, and for bf16/fp16 models the output head's softmax work on each chunk
    of logits: faster steps after a one-time compile of tens of seconds, with dynamic shapes (no
    recompile as sequence lengths vary). Not with ZeRO-3."""

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.warmup_ratio and self.warmup_steps:
            raise ValueError(f"warmup_steps = {self.warmup_steps} and warmup_ratio = {self.warmup_ratio} both set the "
                             "warmup; keep one")
        return self

    @model_validator(mode="after")
    def _one_accumulation(self):
        if self.global_batch_size is not None:
            if self.gradient_accumulation_steps != 1:
                raise ValueError(f"global_batch_size = {self.global_batch_size} and gradient_accumulation_steps = "
                                 f"{self.gradient_accumulation_steps} both set the accumulation; keep one")
            if self.global_batch_size % self.batch_size:
                raise ValueError(f"global_batch_size = {self.global_batch_size} is not a multiple of batch_size = "
                                 f"{self.batch_size}")
        return self

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on ``world_size`` ranks (ValueError: none fits)."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        if self.global_batch_size % world_size:
            raise ValueError(f"global_batch_size = {self.global_batch_size} cannot be shared by {world_size} ranks; "
                             "run on a number of ranks that divides it")
        share = self.global_batch_size // world_size
        if share % self.batch_size:
            raise ValueError(f"global_batch_size = {self.global_batch_size} on {world_size} ranks is {share} per rank, "
                             f"not a multiple of batch_size = {self.batch_size}; choose a batch_size that divides "
                             f"{share}")
        return share // self.batch_size

    def warmup(self, total_steps: int) -> int:
        """Optimizer steps of warmup in a run of ``total_steps``."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * total_steps)

    @model_validator(mode="after")
    def _checkpointing_every(self):
        if self.gradient_checkpointing_every_n_layers > 1 and not self.gradient_checkpointing:
            raise ValueError(f"gradient_checkpointing_every_n_layers = {self.gradient_checkpointing_every_n_layers} "
                             "applies with gradient_checkpointing = true; set that too, or leave the key out")
        return self

    @model_validator(mode="after")
    def _profile_range(self):
        if self.profile_steps is not None and not 1 <= self.profile_steps[0] <= self.profile_steps[1]:
            raise ValueError(f"profile_steps = {list(self.profile_steps)}: expected [first, last] optimizer "
                             "steps with 1 <= first <= last")
        return self


@dataclass(config=STRICT, kw_only=True)
class SFTTrainingConfig(TrainingConfig):
    assistant_turns: Literal["all", "last"] = "all"
    """Which assistant turns of a transcript carry the loss."""


@dataclass(config=STRICT, kw_only=True)
class ReferenceTrainingConfig(TrainingConfig):
    """The settings of a trainer with a reference model (DPO's, KTO's)."""

    precompute_ref_log_probs: bool = False
    """Compute the reference log-probs of every example once, before training, and train with no
    reference model in memory (TRL's name). The table is cached and reused by any run with the same
    reference, tokenizer, data and precision."""
    ref_log_probs_cache: Optional[str] = Field(None, json_schema_extra=LOCATION)
    """Folder of cached reference log-prob tables (default: ``<save_dir>/ref_log_probs``); point
    the runs of a sweep at one folder to share one reference pass."""
    sync_ref_model: bool = False
    """TR-DPO (Gorbatovski et al., 2024; TRL's name): every ``ref_model_sync_steps`` optimizer steps
    the reference moves toward the policy, ref = alpha * policy + (1 - alpha) * ref. The moved
    reference is checkpointed and resumed with the run. Needs the reference model in memory (not
    ``precompute_ref_log_probs``, a reference-free loss or LoRA's adapters-off reference)."""
    ref_model_mixup_alpha: float = Field(0.6, gt=0.0, le=1.0)
    """With ``sync_ref_model``: the policy's share alpha of each update (TRL's name and default)."""
    ref_model_sync_steps: int = Field(512, ge=1)
    """With ``sync_ref_model``: optimizer steps between updates (TRL's name and default)."""

    @model_validator(mode="after")
    def _sync_options_with_sync(self):
        if not self.sync_ref_model:
            for key in ("ref_model_mixup_alpha", "ref_model_sync_steps"):
                if getattr(self, key) != type(self).__pydantic_fields__[key].default:
                    raise ValueError(f"{key} applies with sync_ref_model = true; set that too, or leave the key out")
        elif self.precompute_ref_log_probs:
            raise ValueError("sync_ref_model moves the reference model during training, which a run without one "
                             "cannot do (precompute_ref_log_probs: a table of a fixed reference); set "
                             "sync_ref_model = false or drop the other")
        return self


@dataclass(config=STRICT, kw_only=True)
class DPOTrainingConfig(ReferenceTrainingConfig):
    beta: Optional[float] = Field(None, gt=0.0)
    """Fixed beta of plain DPO (default 0.1). Dynamic-Beta DPO and Beta-DPO take beta_0 from
    their own sections instead, and refuse this key."""
    loss_type: Union[LossType, list[LossType]] = "sigmoid"
    """Pairwise loss (TRL's names): sigmoid (DPO), robust (rDPO), hinge (SLiC/RSO), ipo (IPO, on
    length-averaged log-probs), sigmoid_norm, exo_pair, discopop, nca_pair, bco_pair, sppo_hard,
    apo_zero, apo_down, simpo (SimPO: no reference model at all), orpo (ORPO: none either) or sft
    (the chosen reply's NLL). Each composes with every beta policy. A list (TRL's) mixes them: the
    per-pair sum weighted by ``loss_weights`` (MPO: ``["sigmoid", "bco_pair", "sft"]``); the beta
    policy reads the first one's margin."""
    loss_weights: Optional[list[float]] = None
    """With a list of ``loss_type``: each loss's weight, in order (TRL's name; default 1 each)."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Assumed fraction of flipped preference labels: conservative DPO with ``sigmoid`` (and
    ``simpo``), robust DPO with ``robust``; with ``exo_pair`` (which needs it > 0) its target's
    weight on the rejected reply."""
    discopop_tau: float = Field(0.05, gt=0.0)
    """With ``discopop``: the temperature of the blend between its logistic and exponential parts
    (TRL's name; the paper's 0.05)."""
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    """The divergence from the reference that the loss regularizes (f-DPO, Wang et al., 2024; TRL's
    name): DPO's reverse KL, or the forward KL, Jensen-Shannon or an alpha divergence, whose
    scores of each side's log-ratio make the margin. For the losses of the chosen-minus-rejected
    score (sigmoid, robust, hinge, ipo, sigmoid_norm, exo_pair, discopop)."""
    f_alpha_divergence_coef: float = Field(0.5, gt=0.0)
    """alpha of ``f_divergence_type = "alpha_divergence"`` (TRL's name and default)."""
    simpo_gamma: float = Field(0.5, ge=0.0)
    """With ``simpo``: the target reward margin gamma (TRL's CPO name and default). SimPO takes a
    larger beta than DPO (its paper's runs use 2 and more)."""
    rpo_alpha: Optional[float] = Field(None, ge=0.0)
    """Weight of an NLL term on the chosen response (RPO, Pang et al. 2024: the chosen's mean token
    NLL per pair) that keeps the chosen likelihood from falling; none by default."""
    ld_alpha: Optional[float] = Field(None, ge=0.0, le=1.0)
    """LD-DPO (Liu et al., 2024; TRL's name): each pair's log-probs, the policy's and the
    reference's, weigh the longer reply's tokens beyond the shorter one's length by this factor,
    so that verbosity alone earns less margin. 1 is plain DPO, 0 masks the tail; none by default.
    A precomputed reference table is made for its value."""
    use_weighting: bool = False
    """WPO (Zhou et al., 2024; TRL's name): each pair's loss is weighted by how likely its two
    replies are under the policy now (the exp of each reply's mean of log p - log sum_v p_v^2, no
    gradient), so off-policy pairs count less; logged as ``wpo_weights``."""
    @model_validator(mode="after")
    def _loss_options_where_they_apply(self):
        names = loss_types(self.loss_type)
        specs, named = [LOSSES[name] for name in names], " + ".join(names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"loss_type: {list(names)}: name each loss once, at least one")
        if self.loss_weights is not None and (len(self.loss_weights) != len(names)
                                              or not all(0 < w < float("inf") for w in self.loss_weights)):
            raise ValueError(f"loss_weights: {self.loss_weights}: one weight > 0 for each of the {len(names)} losses "
                             f"of loss_type ({named})")
        own_margin = [spec.name for spec in specs if spec.reference_free and spec.name not in REFERENCE_AGNOSTIC]
        if own_margin and not is_reference_free(names):
            raise ValueError(f"loss_type {named}: {own_margin[0]} scores the policy alone (no reference), so it does "
                             "not mix with losses that read the reference")
        defaults = {key: type(self).__pydantic_fields__[key].default for key in LOSS_OPTIONS}
        for key in LOSS_OPTIONS:
            if getattr(self, key) != defaults[key] and not any(key in spec.options for spec in specs):
                takes = ", ".join(name for name, spec in LOSSES.items() if key in spec.options)
                raise ValueError(f"{key} applies to loss_type {takes}, not {named}; "
                                 f"set {key} = {defaults[key]} or choose one of those")
        without = [spec.name for spec in specs if not spec.f_divergence]
        if self.f_divergence_type != "reverse_kl" and without:
            takes = ", ".join(name for name, spec in LOSSES.items() if spec.f_divergence)
            raise ValueError(f"f_divergence_type = {self.f_divergence_type!r} applies to loss_type {takes}, not "
                             f"{without[0]} (a loss of each side's log-ratio has no f-divergence form)")
        if self.f_alpha_divergence_coef != 0.5 and self.f_divergence_type != "alpha_divergence":
            raise ValueError("f_alpha_divergence_coef applies with f_divergence_type = \"alpha_divergence\"; set that "
                             "too, or leave the key out")
        if self.sync_ref_model and is_reference_free(self.loss_type):
            raise ValueError(f"sync_ref_model moves the reference model during training, which a run without one "
                             f"cannot do (loss_type {' + '.join(loss_types(self.loss_type))} has no reference at "
                             "all); set sync_ref_model = false or drop the other")
        if "exo_pair" in loss_types(self.loss_type) and not self.label_smoothing:
            raise ValueError("loss_type exo_pair needs label_smoothing > 0 (its target's weight on the rejected "
                             "reply; the EXO paper uses 1e-3)")
        return self


KTOLossType = Literal["kto", "apo_zero_unpaired"]
"""KTO's losses, by TRL's names (``dpo_hpc.algorithms.kto`` computes them)."""


@dataclass(config=STRICT, kw_only=True)
class KTOTrainingConfig(ReferenceTrainingConfig):
    """KTO (Ethayarajh et al., 2024; TRL's KTOTrainer) on unpaired completions, each desirable or not."""

    beta: float = Field(0.1, gt=0.0)
    """How far the policy may move from the reference (TRL's name and default)."""
    loss_type: KTOLossType = "kto"
    """KTO's loss (TRL's names): kto, against a reference point that estimates KL(policy || reference)
    from each prompt with another example's completion in its micro-batch; or apo_zero_unpaired
    (APO-zero's unpaired form, no reference point: for completions better than the model's own)."""
    desirable_weight: float = Field(1.0, gt=0.0)
    """Weight of the desirable completions' losses (TRL's name): with unequal counts, the KTO paper
    asks desirable_weight x desirable / (undesirable_weight x undesirable) in [1, 4/3]; the data
    report counts both and the run says when the weights are outside it."""
    undesirable_weight: float = Field(1.0, gt=0.0)
    """Weight of the undesirable completions' losses (TRL's name)."""


@dataclass(config=STRICT, kw_only=True)
class RewardTrainingConfig(TrainingConfig):
    """A Bradley-Terry reward model (TRL's RewardTrainer): a scalar score of each prompt and reply,
    trained so that the chosen reply scores above the rejected one, -log sigmoid(r_chosen - r_rejected)."""

    center_rewards_coefficient: Optional[float] = Field(None, ge=0.0)
    """Adds coef x (r_chosen + r_rejected)^2 to each pair's loss, so that rewards centre on 0
    (Eisenstein et al., 2023, Eq. 2; TRL's name; it recommends 0.01)."""

    @model_validator(mode="after")
    def _no_generation(self):
        if self.generate_during_eval:
            raise ValueError("generate_during_eval: a reward model scores replies and writes none; leave the key out")
        return self


@dataclass(config=STRICT, kw_only=True)
class RiskTestConfig:
    delta: float = Field(0.1, gt=0.0, lt=1.0)
    """Target tail probability: tau tracks the (1 - delta)-quantile of the margins."""
    lambda_: float = Field(0.1, gt=0.0, le=1.0, alias="lambda")
    """EMA weight of the newest batch quantile in tau."""
    beta_warmup: int = Field(120, ge=1)
    """Updates spent collecting margins before tau_0 is fixed; beta is constant meanwhile."""
    risk_stat: Literal["z", "hoeffding"] = "z"
    """Deviation statistic: z = (p_hat - delta) / sqrt(delta (1 - delta) / n), or the early Hoeffding variant."""
    hoeffding_eps0: float = Field(0.05, gt=0.0, lt=1.0)
    """Confidence parameter of the Hoeffding variant."""
    update_granularity: Literal["optimizer_step", "micro_batch"] = "optimizer_step"
    """One update per optimizer step over all its micro-batches, or one per micro-batch (original framework)."""
    scope: Literal["global", "local"] = "global"
    """Margins of every rank (same beta everywhere), or each rank's own (original framework)."""


@dataclass(config=STRICT, kw_only=True)
class BetaUpdateConfig:
    beta_0: float = Field(0.1, gt=0.0)
    """Initial beta."""
    alpha: float = Field(0.005, ge=0.0)
    """Largest change of log(beta) per update."""
    gamma: float = Field(2.0, gt=0.0)
    """Gain inside tanh."""
    beta_min: float = Field(0.0, ge=0.0)
    """Lower clip of beta."""
    beta_max: float = Field(2.0, gt=0.0)
    """Upper clip of beta."""

    @model_validator(mode="after")
    def _beta_0_within_bounds(self):
        if not self.beta_min <= self.beta_0 <= self.beta_max:
            raise ValueError(
                f"need beta_min <= beta_0 <= beta_max, got {self.beta_min} <= {self.beta_0} <= {self.beta_max}"
            )
        return self


@dataclass(config=STRICT, kw_only=True)
class BetaDPOSectionConfig:
    beta_0: float = Field(0.1, gt=0.0)
    """Base beta."""
    m: float = Field(0.9, ge=0.0, lt=1.0)
    """EMA momentum of the gap mean and standard deviation."""
    rho: float = Field(0.8, gt=0.0, le=1.0)
    """Keep ratio of the Gaussian-weighted data filter."""
    alpha: float = Field(0.6, ge=0.0)
    """Scale of the batch-level beta adjustment."""
    min_beta: float = Field(0.001, gt=0.0)
    """Lower clamp of the batch beta."""
    ema_init: Literal["first_batch", "zeros"] = "first_batch"
    """Start mu/sigma at the first batch's statistics (original framework) or at 0 (official code)."""
    std: Literal["population", "unbiased"] = "population"
    """Standard deviation estimator of the gaps (the official code uses unbiased)."""


@dataclass(config=STRICT, kw_only=True)
class LoraConfig:
    """``[lora]``: train low-rank adapters instead of every weight (needs ``dpo-hpc[peft]``)."""

    r: int = Field(16, ge=1)
    """Adapter rank."""
    alpha: float = Field(32.0, gt=0.0)
    """Scaling numerator (peft's ``lora_alpha``): the update is scaled by alpha / r."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter input (peft's ``lora_dropout``)."""
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    """Module names that get adapters (e.g. ``["q_proj", "v_proj"]``), or every linear layer but
    the output head."""
    merge: bool = False
    """Also save the merged model (base + adapter) in the run directory, beside the adapter."""


VARLEN_ATTN = "varlen_attn"
"""PyTorch's variable-length flash kernel, which dpo-hpc registers with transformers."""
SPARSE_ATTENTION = (VARLEN_ATTN, "flex_attention", "flash_attention_2", "flash_attention_3")
"""Attention backends that skip the token pairs a packed row's mask excludes: with them
``padding_free`` puts a micro-batch's sequences in one row."""
AttnImplementation = Literal[("sdpa", "eager", *SPARSE_ATTENTION)]


@dataclass(config=STRICT, kw_only=True)
class ModelSettings:
    """Top-level keys every trainer has: how models are loaded and run. (Descriptions are given as
    ``description=``: pydantic reads attribute docstrings of the defining class only.)"""

    precision: Precision = Field(
        "fp32", description="Training precision: fp32, bf16 (mixed, CPU and GPU) or fp16 (GPU only).")
    tokenizer_name: Optional[str] = Field(None, description="Tokenizer to load (defaults to policy_name).")
    attn_implementation: AttnImplementation = Field(
        "sdpa", description="Attention kernel of transformers: sdpa (PyTorch's), eager, flash_attention_2/3 "
                            "(needs the flash-attn package), flex_attention, or varlen_attn: PyTorch's own "
                            "variable-length flash kernel (CUDA, bf16/fp16, torch >= 2.9; no package, no "
                            "compiling) for padding_free; elsewhere each sequence runs through sdpa.")
    torch_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = Field(
        None, description="Dtype the weights load in (TRL's model_init_kwargs name). Default: float32 for the "
                          "trained model, which DeepSpeed keeps as master weights while computing in `precision`, "
                          "and `precision` for the reference. \"bfloat16\" with precision = \"fp32\" trains in "
                          "pure bf16 (weights, gradients and AdamW state), as TRL's bf16 does: half the memory, "
                          "bf16-precise updates.")
    trust_remote_code: bool = Field(
        False, description="Let a model or tokenizer run its own Python code (transformers' flag); only for "
                           "sources you trust. Off: such a model is refused with a message naming this key.")
    pad_token: Optional[str] = Field(
        None, description="Padding token (TRL's name); default the tokenizer's, else its EOS (Llama 3 has none). "
                          "Padding never enters a loss: masks come from lengths.")
    chat_template: Optional[str] = Field(
        None, description="Jinja chat template that renders conversational rows, in place of the tokenizer's "
                          "(transformers' attribute, alignment-handbook's key): for a base model without one. "
                          "Saved with the run's tokenizer, so a stage that starts from the run renders as it "
                          "trained.")
    router_aux_loss_coef: Optional[float] = Field(
        None, ge=0.0, description="Mixtures of experts (Mixtral, Qwen-MoE, OLMoE): the weight of the router's "
                                  "load-balancing loss, added to the policy's loss and logged as aux_loss (TRL 1.16's "
                                  "name and rule). Default: the model config's own coefficient (Mixtral's 0.02); 0 "
                                  "turns it off. A dense model refuses a weight.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    lora: Optional[LoraConfig] = Field(
        None, description="LoRA adapters instead of a full fine-tune (a [lora] section; needs dpo-hpc[peft]).")

    @model_validator(mode="after")
    def _outputs_apart_from_inputs(self):
        """A run writes only its save_dir: never empty, never one of its inputs, never inside or
        around one (it would overwrite the model it loads)."""
        training = getattr(self, "training", None)
        if training is None:
            return self
        if not training.save_dir.strip():
            raise ValueError("save_dir is empty: name the folder the run writes (its run directory)")
        out = Path(training.save_dir).expanduser().absolute()
        inputs = {"policy_name": self.policy_name, "ref_name": getattr(self, "ref_name", None),
                  "tokenizer_name": self.tokenizer_name, "dataset.dataset_name": self.dataset.dataset_name}
        for key, name in inputs.items():
            if not name or not Path(name).expanduser().exists():
                continue  # a hub name: nothing on disk to overwrite
            source = Path(name).expanduser().absolute()
            if out == source or source in out.parents or out in source.parents:
                raise ValueError(f"save_dir {training.save_dir!r} overlaps {key} {name!r}: a run would overwrite "
                                 "what it reads; choose a separate folder")
        return self

    @model_validator(mode="after")
    def _merge_without_zero3(self):
        if self.lora is not None and self.lora.merge and self.deepspeed.zero_stage == 3:
            raise ValueError("lora.merge does not work with deepspeed.zero_stage = 3 (the weights to merge are "
                             "partitioned); the run's adapter folder loads merged anyway (a stage that starts from "
                             "it gets the merged model): set lora.merge = false or use zero_stage 0-2")
        return self

    @model_validator(mode="after")
    def _compile_without_zero3(self):
        training = getattr(self, "training", None)
        if training is not None and training.torch_compile and self.deepspeed.zero_stage == 3:
            raise ValueError("torch_compile does not work with deepspeed.zero_stage = 3 (ZeRO-3 gathers each "
                             "layer's weights in hooks the compiled blocks bypass); use zero_stage 0-2 or "
                             "torch_compile = false")
        return self


@dataclass(config=STRICT, kw_only=True)
class SFTRunConfig(ModelSettings):
    """``train-sft`` / ``dpo-hpc train sft``."""

    policy_name: str
    """Hub id or local folder of the model to fine-tune."""
    dataset: DatasetConfig
    sft_training: SFTTrainingConfig

    @property
    def training(self) -> SFTTrainingConfig:
        return self.sft_training


@dataclass(config=STRICT, kw_only=True)
class PromptedRunConfig(ModelSettings):
    """The keys of a run on prompts with replies (DPO's, KTO's, a reward model's); each subclass
    adds its training section and names it in ``training``."""

    policy_name: str = Field(description="Hub id or local folder of the policy (usually the SFT result).")
    dataset: DatasetConfig

    @property
    def training(self) -> TrainingConfig:
        raise NotImplementedError

    @model_validator(mode="after")
    def _prompt_shorter_than_sequence(self):  # here, not in DatasetConfig: SFT has no prompt budget
        data = self.dataset
        if data.max_prompt_length >= data.max_length:
            raise ValueError(f"dataset.max_prompt_length ({data.max_prompt_length}) must be smaller than "
                             f"dataset.max_length ({data.max_length}) so that a completion fits")
        return self


@dataclass(config=STRICT, kw_only=True)
class ReferenceRunConfig(PromptedRunConfig):
    """The keys of a run trained against a reference model (DPO's, KTO's)."""

    ref_name: Optional[str] = Field(None, description="Frozen reference model (defaults to policy_name).")

    @property
    def training(self) -> ReferenceTrainingConfig:
        raise NotImplementedError

    @model_validator(mode="after")
    def _synced_reference_is_a_model(self):
        if self.training.sync_ref_model and self.lora is not None:
            raise ValueError("sync_ref_model with [lora]: a LoRA policy's reference is its base model with the "
                             "adapters off (or another model), not a copy that can move toward base plus adapters "
                             "(TRL refuses it too); train without [lora] or set sync_ref_model = false")
        return self


@dataclass(config=STRICT, kw_only=True)
class DPORunConfig(ReferenceRunConfig):
    """``dpo-hpc train dpo``: DPO with a fixed beta."""

    dpo_training: DPOTrainingConfig

    @property
    def training(self) -> DPOTrainingConfig:
        return self.dpo_training

    @property
    def beta(self) -> float:
        return 0.1 if self.dpo_training.beta is None else self.dpo_training.beta


@dataclass(config=STRICT, kw_only=True)
class KTORunConfig(ReferenceRunConfig):
    """``dpo-hpc train kto``: KTO on completions labelled desirable or not (or on preference pairs,
    each a desirable and an undesirable completion)."""

    kto_training: KTOTrainingConfig

    @property
    def training(self) -> KTOTrainingConfig:
        return self.kto_training


@dataclass(config=STRICT, kw_only=True)
class RewardRunConfig(PromptedRunConfig):
    """``dpo-hpc train reward``: a reward model from preference pairs. ``policy_name`` is the model
    it starts from (usually the SFT result), whose output head gives way to a scalar score head."""

    reward_training: RewardTrainingConfig

    @property
    def training(self) -> RewardTrainingConfig:
        return self.reward_training

    @model_validator(mode="after")
    def _no_router_loss(self):
        if self.router_aux_loss_coef:
            raise ValueError("router_aux_loss_coef: transformers' sequence-classification models (a reward model) "
                             "return no router loss to weigh; leave the key out")
        return self


def _refuse_fixed_beta(cfg, section: str):
    if cfg.dpo_training.beta is not None:
        raise ValueError(f"dpo_training.beta is for plain DPO; this trainer takes its initial beta from {section}.beta_0")
    return cfg


@dataclass(config=STRICT, kw_only=True)
class DynamicBetaDPORunConfig(DPORunConfig):
    """``train-dpo`` / ``dpo-hpc train dynamic-beta-dpo``: beta steered by the margin risk test."""

    risk_test: RiskTestConfig = Field(default_factory=RiskTestConfig)
    beta_update: BetaUpdateConfig = Field(default_factory=BetaUpdateConfig)

    @model_validator(mode="after")
    def _no_fixed_beta(self):
        return _refuse_fixed_beta(self, "beta_update")


@dataclass(config=STRICT, kw_only=True)
class BetaDPORunConfig(DPORunConfig):
    """``train-beta-dpo`` / ``dpo-hpc train beta-dpo``: per-batch beta and Gaussian data filtering."""

    beta_dpo: BetaDPOSectionConfig = Field(default_factory=BetaDPOSectionConfig)

    @model_validator(mode="after")
    def _no_fixed_beta(self):
        return _refuse_fixed_beta(self, "beta_dpo")

