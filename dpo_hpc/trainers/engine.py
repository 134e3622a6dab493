"""Models and the DeepSpeed engine: precision, ZeRO stage, AdamW, LR schedule, clipping."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..checkpoint.run_dir import SAVED_MODEL_FILES, TOKENIZER_FILES, is_adapter_folder, not_loadable
from ..config import ConfigError, DeepSpeedConfig, TrainingConfig
from ..runtime.failures import RunFailure, model_not_found
from . import lora, varlen_attention

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def check_precision(precision: str, device: torch.device) -> None:
    """The device is DeepSpeed's (not whether CUDA exists: DS_ACCELERATOR=cpu trains on a CPU
    of a GPU machine)."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError([f"precision: fp16 needs a CUDA GPU (this run trains on {device.type}); use fp32 or bf16"])


def _loading(name: str, what: str, files: tuple[str, ...], load):
    """``load()``, with what goes wrong loading by name in one clear line: a model that needs its
    own code (refused unless trusted), one that is not there (a path, the cache, the hub), and a
    local folder without the ``what`` (``files``), such as a run's directory before it finished."""
    problem = not_loadable(name, what, files)
    if problem is not None:
        raise RunFailure(problem)
    try:
        return load()
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ConfigError([f"'{name}' needs its own Python code to load; set trust_remote_code = true if you "
                           "trust its source (that code then runs on every node of the job)"]) from None
    except OSError as exc:
        if isinstance(exc, PermissionError) or exc.errno is not None:  # a real file error: said as such
            raise
        raise model_not_found(name) from exc


def load_tokenizer(name: str, trust_remote_code: bool = False, pad_token: Optional[str] = None,
                   chat_template: Optional[str] = None):
    """The fast tokenizer of ``name``; ``pad_token`` replaces its padding token (which only fills
    rows: loss masks come from lengths), ``chat_template`` its chat template."""
    from transformers import AutoTokenizer

    tokenizer = _loading(name, "tokenizer", TOKENIZER_FILES,
                         lambda: AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code))
    if not tokenizer.is_fast:
        raise ConfigError([f"tokenizer '{name}' is not a fast tokenizer; SFT loss masks need its offsets"])
    if pad_token is not None:
        if tokenizer.convert_tokens_to_ids(pad_token) in (None, tokenizer.unk_token_id):
            raise ConfigError([f"pad_token = {pad_token!r} is not a token of tokenizer '{name}'"])
        tokenizer.pad_token = pad_token
    if chat_template is not None:
        import jinja2

        try:
            jinja2.Environment().parse(chat_template)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError([f"chat_template: not a Jinja template: {exc.message} (line {exc.lineno})"]) from None
        tokenizer.chat_template = chat_template
    return tokenizer


@contextlib.contextmanager
def _attention(attn_implementation: str):
    """Around building a model with ``attn_implementation``: ours (``varlen_attn``) registered with
    transformers, and transformers refusing one for a model (Gemma-2 has no sdpa path: its
    attention scores are soft-capped) said in one line naming the key, where its own message says
    to file an issue."""
    if attn_implementation == varlen_attention.NAME:
        varlen_attention.register()
    try:
        yield
    except ValueError as exc:
        if "does not support" not in str(exc) or "ttention" not in str(exc):
            raise
        model_class = str(exc).split(" does not support")[0]
        raise ConfigError([f"attn_implementation = {attn_implementation!r}: {model_class} does not support it; set "
                           "attn_implementation = \"eager\", which every model supports"]) from None


def check_model(name: str, attn_implementation: str, trust_remote_code: bool = False,
                router_aux_loss_coef: Optional[float] = None) -> None:
    """ConfigError if the model ``name`` refuses ``attn_implementation``, or has no router for a
    ``router_aux_loss_coef`` set: the model is built from its config on the meta device (no weights
    read, no memory), so a pre-flight tells before a job waits in the queue."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    with _attention(attn_implementation), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                 trust_remote_code=trust_remote_code)
    router_loss_weight(model, router_aux_loss_coef)


def router_loss_weight(model, router_aux_loss_coef: Optional[float]) -> Optional[float]:
    """The weight of a mixture of experts' router load-balancing loss, as TRL 1.16 sets it: the
    key's value, else the model config's own coefficient; the model is made to return the loss
    (``aux_loss``) where the weight is not 0. None for a dense model, which refuses a weight."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not hasattr(config, "output_router_logits"):
        if router_aux_loss_coef:
            raise ConfigError([f"router_aux_loss_coef = {router_aux_loss_coef}: {type(model).__name__} has no router "
                               "(it is not a mixture of experts); leave the key out"])
        return None
    weight = getattr(config, "router_aux_loss_coef", 0.0) if router_aux_loss_coef is None else router_aux_loss_coef
    config.output_router_logits = bool(weight)  # what the model was saved with must not decide it
    return weight or None


# attn_implementation -> the package it needs
ATTENTION_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def load_causal_lm(name_or_model, precision: str, trainable: bool, attn_implementation: str = "sdpa",
                   trust_remote_code: bool = False, torch_dtype: Optional[str] = None, reward_model: bool = False,
                   partition_with: Optional[dict] = None):
    """A causal LM (loaded by name, or a model passed in) with dropout off (margins at step 0 must
    be exactly 0, spec pitfall P5); a reference is frozen and in eval mode. Weights load in
    ``torch_dtype`` when given, else fp32 for a trained model (DeepSpeed's master weights) and
    ``precision`` for a reference. With ``reward_model``, the same model as a reward model (a
    sequence-classification model with one output: a causal LM's head gives way to a fresh score
    head, drawn from the seeded generator). ``partition_with``, a ZeRO-3 DeepSpeed config: a model
    loaded by name is built already cut into each rank's slice (``partitioned_loading``)."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto_class, extra = ((AutoModelForSequenceClassification, {"num_labels": 1}) if reward_model
                         else (AutoModelForCausalLM, {}))

    package = ATTENTION_PACKAGES.get(attn_implementation)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError([f"attn_implementation = {attn_implementation!r} needs the {package} package, which is "
                           f"not installed here; install it or use attn_implementation = \"sdpa\""])
    dtype = getattr(torch, torch_dtype) if torch_dtype else torch.float32 if trainable else _DTYPES[precision]

    # an adapter folder (a LoRA run's output) is merged into its base: in slices when it is plain
    # LoRA, else by peft, which needs the base whole
    partition = partition_with is not None and isinstance(name_or_model, str) and (
        not is_adapter_folder(name_or_model) or lora.merges_in_slices(name_or_model))

    def from_pretrained(name: str):
        if is_adapter_folder(name):  # its base may be another run's adapter folder
            return lora.load_merged(name, from_pretrained, in_slices=partition)
        return _loading(name, "model", SAVED_MODEL_FILES, lambda: auto_class.from_pretrained(
            name, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code, **extra))

    with _attention(attn_implementation):
        if isinstance(name_or_model, str):
            with partitioned_loading(partition_with) if partition else contextlib.nullcontext():
                model = from_pretrained(name_or_model)
        else:
            model = name_or_model.to(dtype)
            model.set_attn_implementation(attn_implementation)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for attr in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, attr):
            setattr(model.config, attr, 0.0)
    model.config.use_cache = False
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


@contextlib.contextmanager
def partitioned_loading(ds_cfg: dict):
    """Models loaded by name in this block are built under ``deepspeed.zero.Init`` and read into
    each rank's ZeRO-3 slice (rank 0 reads the files, the others take their slices from it): no
    rank ever holds the whole model, in host or device memory, so a model larger than one node's
    memory per rank loads. transformers reads the setting from a module-level weak reference,
    set only for the block: later loads in this process (a test suite's) build whole models."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    class ZeroThree:  # all transformers asks of the setting; its own class would need accelerate
        config = ds_cfg

        @staticmethod
        def is_zero3() -> bool:
            return True

    setting = ZeroThree()  # the weak reference lives as long as this
    set_hf_deepspeed_config(setting)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del setting


def param_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's full shape, also when ZeRO-3 holds only this rank's slice of it."""
    return getattr(param, "ds_shape", param.shape)


def check_packing(model, layout: str = "packed", precision: str = "fp32") -> None:
    """``padding_free`` relies on transformers keeping packed sequences apart (position ids that
    restart, or the variable-length kernels' boundaries; no attention mask). A model whose
    attention ignored that would train on sequences that see each other, silently: three short
    sequences, in the run's ``layout`` and padded, must agree first. On a GPU under the run's
    ``precision`` (autocast), so that the attention kernels checked are the ones training runs."""
    from ..algorithms.logprobs import model_inputs
    from ..algorithms.reward import position_scores
    from ..data.collate import layout_rows, pad_rows, to_device

    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    rows = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in (6, 3, 3)]
    masks = [[1] * len(r) for r in rows]
    padded, packed = pad_rows(rows, masks, 0), layout_rows(rows, masks, 0, layout)
    device = next(model.parameters()).device
    reward_model = model.get_output_embeddings() is None

    def log_probs(batch):  # called as the trainer calls it; a reward model's scores at every position
        batch = to_device(batch, device)
        if reward_model:
            return position_scores(model, batch).float()[..., None]
        return model(**model_inputs(batch)).logits.float().log_softmax(-1)

    # what training computes in: the weights' dtype (pure bf16 included), or on a GPU DeepSpeed's
    # mixed precision over fp32 master weights
    mixed = device.type == "cuda" and precision != "fp32"
    compute = _DTYPES[precision] if mixed else next(model.parameters()).dtype
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=compute, enabled=mixed):
            a, b = log_probs(padded), log_probs(packed)
    except TypeError as exc:
        raise ConfigError([f"padding_free: {type(model).__name__} does not take position ids ({exc}); "
                           "set padding_free = false"]) from None
    tolerance = 1e-3 if compute == torch.float32 else 5e-2
    for i, row in enumerate(rows):
        r, t = torch.nonzero(packed["sequence_ids"] == i, as_tuple=True)
        gap = (a[i, : len(row)] - b[r, t]).abs().max().item()
        if gap > tolerance:
            raise ConfigError([f"padding_free: {type(model).__name__} with attn_implementation = "
                               f"{model.config._attn_implementation!r} lets packed sequences attend to each other "
                               f"(outputs differ by {gap:.3g} from the padded batch); use another "
                               "attn_implementation or set padding_free = false"])


def checkpoint_blocks(model, every_n_layers: int = 1) -> tuple[int, int]:
    """Gradient checkpointing (non-reentrant) on every ``every_n_layers``-th transformer block, the
    first included (HF's ``every_n_layers``, torchtitan's selective layer checkpointing): the blocks
    left out keep their activations. Returns (checkpointed, blocks)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers: it selects the blocks itself
        model.activation_checkpointing_enable(options, every_n_layers=every_n_layers)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    blocks = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    if every_n_layers > 1 and not blocks:
        raise ConfigError([f"gradient_checkpointing_every_n_layers = {every_n_layers}: {type(model).__name__} has "
                           "no transformer blocks that checkpoint one by one; leave the key out"])
    for index, block in enumerate(blocks):  # the same selection where transformers does not make it
        block.gradient_checkpointing = index % every_n_layers == 0
    return sum(block.gradient_checkpointing for block in blocks), len(blocks)


def compile_blocks(model) -> int:
    """``torch.compile`` each transformer block in place (the classes the model lists in
    ``_no_split_modules``, as torchtitan compiles per block): the head and the loss stay eager,
    parameter names do not change. Returns the number of blocks."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in kinds]
    if not blocks:
        raise ConfigError([f"torch_compile: {type(model).__name__} names no transformer block class "
                           "(_no_split_modules) to compile; set torch_compile = false"])
    for block in blocks:
        # dynamic: sequence lengths change with every batch; a static first compile would be thrown
        # away (and compiled again, dynamic) at the second batch
        block.compile(dynamic=True)
    return len(blocks)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step s (0-based)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(
    training: TrainingConfig, ds: DeepSpeedConfig, precision: str, world_size: int, source: str = "<config>"
) -> dict[str, Any]:
    """The DeepSpeed JSON config: generated from ours, merged with ``deepspeed.config_file``."""
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.batch_size,
        "gradient_accumulation_steps": training.accumulation_steps(world_size),
        "train_batch_size": training.batch_size * training.accumulation_steps(world_size) * world_size,
        "gradient_clipping": training.max_grad_norm,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own progress lines replace DeepSpeed's
        "wall_clock_breakdown": False,
    }
    if ds.config_file is None:
        return generated
    path = Path(ds.config_file)
    if not path.is_file():
        raise ConfigError([f"{source}: deepspeed.config_file: file not found: {path}"])
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{path}: not valid JSON: {exc}"]) from None
    problems: list[str] = []

    def merge(ours: dict, theirs: dict, prefix: str) -> dict:
        out = dict(ours)
        for key, value in theirs.items():
            if value == "auto":
                continue
            if isinstance(value, dict) and isinstance(ours.get(key), dict):
                out[key] = merge(ours[key], value, f"{prefix}{key}.")
            elif key in ours and ours[key] != value and not isinstance(ours[key], dict):
                problems.append(
                    f"{path}: {prefix}{key} = {value!r} contradicts the trainer config ({ours[key]!r}); "
                    f"set it to \"auto\" or change the trainer config"
                )
            else:
                out[key] = value
        return out

    merged = merge(generated, user, "")
    for forbidden in ("optimizer", "scheduler"):
        if forbidden in user:
            problems.append(f"{path}: '{forbidden}' is set by dpo-hpc from the trainer config; remove it")
    if problems:
        raise ConfigError(problems)
    return merged


def build_engine(model, training: TrainingConfig, ds_cfg: dict, total_steps: int):
    """DeepSpeed engine with AdamW (decay on matrices only) and the warmup + decay schedule."""
    import deepspeed

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if len(param_shape(param)) >= 2 else no_decay).append(param)
    fused = training.optim == "adamw_torch_fused"
    groups = [{"params": decay, "weight_decay": training.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(
        [group for group in groups if group["params"]],  # DeepSpeed drops empty groups (LoRA has no vectors)
        lr=training.learning_rate,
        betas=(training.adam_beta1, training.adam_beta2),
        eps=training.adam_epsilon,
        fused=fused,  # else PyTorch's default, as HF's adamw_torch: multi-tensor kernels on CUDA, a loop on CPU
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(training.lr_scheduler, training.warmup(total_steps), total_steps)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg
    )
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # Averaging over one rank changes nothing, yet ZeRO-0 would copy every gradient into flat
        # buckets (up to 500M elements: as much memory again as the gradients) and copy it back.
        engine.enable_backward_allreduce = False
    return engine, optimizer, scheduler


def unclipped_grad_norm(engine) -> Optional[float]:
    """Global gradient norm before clipping, for the one case DeepSpeed does not record it
    (ZeRO-0 without mixed precision clips with torch and drops the norm). Call after the last
    backward of an optimizer step and before its ``engine.step()``; gradients are reduced by then.
    """
    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return torch.stack(grads).norm().item() if grads else 0.0


def prepare_reference(ref_model, ds_cfg: dict):
    """Frozen reference: partitioned by DeepSpeed under ZeRO-3, otherwise a plain module on the device."""
    if ds_cfg["zero_optimization"]["stage"] == 3:
        import deepspeed

        inference_cfg = {
            "train_micro_batch_size_per_gpu": ds_cfg["train_micro_batch_size_per_gpu"],
            "zero_optimization": {"stage": 3},
            "bf16": ds_cfg["bf16"],
            "fp16": ds_cfg["fp16"],
        }
        ref_engine, *_ = deepspeed.initialize(model=ref_model, config=inference_cfg)
        ref_engine.eval()
        return ref_engine
    return ref_model.to(device())


def save_final_model(engine, tokenizer, out_dir: Path, is_main: bool, merge_adapter: bool = False) -> None:
    """save_pretrained model + tokenizer into out_dir (every rank calls: ZeRO-3 gathers weights);
    a LoRA policy saves its adapter (and, with ``merge_adapter``, the merged model).

    Files are written aside and renamed in, so a crash never leaves a half-written model.
    """
    import os

    from ..fsutil import remove_tree
    from ..runtime.failures import disk_full, no_space

    if engine.zero_optimization_stage() == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict()
    if not is_main:
        return
    staging = out_dir / ".final-model.tmp"
    remove_tree(staging)  # an interrupted save of ours (a link there is removed, never followed)
    try:
        _write_final_model(engine.module, state_dict, tokenizer, staging, merge_adapter)
    except Exception as exc:
        full = disk_full(exc, out_dir)  # before the cleanup frees space again
        remove_tree(staging)
        if full:
            raise no_space(out_dir, "saving the final model") from exc
        raise
    for name in sorted(os.listdir(staging)):
        os.replace(staging / name, out_dir / name)
    staging.rmdir()


def _write_final_model(module, state_dict: dict, tokenizer, staging: Path, merge_adapter: bool) -> None:
    from ..fsutil import seal_tree

    module.config.use_cache = True
    state_dict = {k: v.detach().cpu() for k, v in state_dict.items()}
    if lora.uses_adapters(module):
        lora.save_adapter(module, state_dict, tokenizer, staging, merge=merge_adapter)
    else:
        module.save_pretrained(staging, state_dict=state_dict)
    tokenizer.save_pretrained(staging)
    seal_tree(staging)
