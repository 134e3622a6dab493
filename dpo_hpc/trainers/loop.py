"""The training loop shared by every trainer, readable top to bottom.

setup -> data -> engine -> resume -> for each optimizer step: micro-batches (forward, loss,
backward, step) -> log -> eval -> checkpoint -> final eval -> final model.
"""

from __future__ import annotations

import json
import random
import resource
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..checkpoint import CheckpointError, CheckpointManager
from ..config import to_dict
from ..data.loading import DataError, eval_batch_indices, global_batch_indices, load_splits, report_lines, write_report
from ..data.tokenize import SpecialTokens
from ..run_dir import RunDir, config_hash
from .distributed import DistEnv, all_reduce_sum, barrier, init_distributed, shutdown
from .engine import (
    build_engine,
    check_precision,
    deepspeed_config,
    device,
    load_causal_lm,
    load_tokenizer,
    prepare_reference,
    save_final_model,
    unclipped_grad_norm,
)
from ..controllers import BetaDPOConfig, BetaDPOController, DynamicBetaController, DynamicBetaDPOConfig
from .objectives import BetaDPOObjective, DPOObjective, DynamicBetaDPOObjective, Objective, SFTObjective, Stats
from .preemption import StopSignal

# Keys that may change between a checkpoint and its resumption (they do not alter the math).
_RESUMABLE_CHANGES = {"max_steps", "epochs", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
                      "eval_batch_size"}


class MetricSums:
    """Sums and counts of metrics over an optimizer step (or an eval pass), reduced across ranks."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, stats: Stats, weight: float = 1.0) -> None:
        for name, (total, count) in stats.items():
            total, count = total.detach().double().cpu() * weight, count.detach().double().cpu() * weight
            self.sums[name] = self.sums.get(name, 0) + total
            self.counts[name] = self.counts.get(name, 0) + count

    def reduce(self, dev: torch.device) -> dict[str, float]:
        """Means over every rank (call on every rank: it is a collective)."""
        names = sorted(self.sums)
        flat = torch.tensor([float(self.sums[n]) for n in names] + [float(self.counts[n]) for n in names],
                            dtype=torch.float64, device=dev)
        all_reduce_sum(flat)
        k = len(names)
        return {n: (flat[i] / flat[k + i]).item() if flat[k + i] > 0 else float("nan") for i, n in enumerate(names)}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _to_device(batch: dict[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _progress_line(trainer: str, step: int, total: int, metrics: dict[str, float], step_time: float, eta: float) -> str:
    parts = [f"[{trainer}] step {step}/{total} ({100 * step / total:.0f}%)", f"loss {metrics['loss']:.4f}"]
    if "rewards/accuracies" in metrics:
        parts.append(f"acc {metrics['rewards/accuracies']:.3f}")
        parts.append(f"margin {metrics['rewards/margins']:.4f}")
    for name, label in (("dpo/beta", "beta"), ("beta_dpo/beta_used", "beta")):
        if name in metrics:
            parts.append(f"{label} {metrics[name]:.4f}")
    parts.append(f"lr {metrics['learning_rate']:.2e}")
    if "grad_norm" in metrics:
        parts.append(f"grad_norm {metrics['grad_norm']:.3f}")
    parts.append(f"{metrics['tokens_per_sec'] / 1000:.1f}k tok/s")
    parts.append(f"{step_time:.2f} s/step")
    parts.append(f"eta {_fmt_duration(eta)}")
    return " | ".join(parts)


def _config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _config_changes(a, b, f"{prefix}{key}.")
        elif a != b and key not in _RESUMABLE_CHANGES:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed


def dynamic_beta_config(cfg) -> DynamicBetaDPOConfig:
    """The file's risk_test / beta_update sections as the controller's config."""
    risk, update = cfg.risk_test, cfg.beta_update
    return DynamicBetaDPOConfig(
        beta_0=update.beta_0, delta=risk.delta, momentum=risk.lambda_, warmup_steps=risk.beta_warmup,
        alpha=update.alpha, gamma=update.gamma, beta_min=update.beta_min, beta_max=update.beta_max,
        risk_stat=risk.risk_stat, hoeffding_eps0=risk.hoeffding_eps0,
        update_granularity=risk.update_granularity, scope=risk.scope,
    )


def beta_dpo_config(cfg) -> BetaDPOConfig:
    section = cfg.beta_dpo
    return BetaDPOConfig(beta_0=section.beta_0, m=section.m, rho=section.rho, alpha=section.alpha,
                         min_beta=section.min_beta, ema_init=section.ema_init, std=section.std,
                         seed=cfg.training.seed)


def build_objective(cfg, trainer: str, tokenizer, ds_cfg: dict, dist_env: DistEnv, ref_model=None) -> Objective:
    pad_id = SpecialTokens.of(tokenizer).pad_id
    if trainer == "sft":
        return SFTObjective(pad_id)
    ref_source = ref_model if ref_model is not None else (cfg.ref_name or cfg.policy_name)
    reference = prepare_reference(load_causal_lm(ref_source, cfg.precision, False), ds_cfg)
    if trainer == "dpo":
        return DPOObjective(reference, cfg.beta, pad_id)
    if trainer == "dynamic_beta_dpo":
        return DynamicBetaDPOObjective(reference, DynamicBetaController(dynamic_beta_config(cfg)), pad_id)
    if trainer == "beta_dpo":
        return BetaDPOObjective(reference, BetaDPOController(beta_dpo_config(cfg)), pad_id, dist_env)
    raise NotImplementedError(f"unknown trainer '{trainer}'")


def evaluate(engine, objective: Objective, val_set: list, batch_size: int, dist_env: DistEnv) -> dict[str, float]:
    """Metrics over the whole validation split (every rank calls; ranks run equal batch counts)."""
    dev = device()
    sums = MetricSums()
    engine.eval()
    for indices in eval_batch_indices(len(val_set), batch_size, dist_env.world_size, dist_env.rank):
        weight = 1.0 if indices else 0.0  # an empty slot still runs a forward: ZeRO-3 needs every rank
        batch = _to_device(objective.collate([val_set[i] for i in (indices or [0])]), dev)
        sums.add(objective.eval_stats(engine, batch), weight)
    engine.train()
    return sums.reduce(dev)


def train(
    cfg,
    trainer: str,
    log: Optional[Callable[[str], None]] = None,
    *,
    model=None,
    ref_model=None,
    tokenizer=None,
    train_rows=None,
    eval_rows=None,
    stop: Optional[StopSignal] = None,
) -> dict[str, Any]:
    """Run (or resume, or skip if already completed) one training run; returns its summary, whose
    ``status`` is ``completed``, or ``preempted`` when ``stop`` fired (a checkpoint was written).

    The models, tokenizer and data are loaded from the config's names unless passed in (the
    Python API passes in-memory objects).
    """
    dist_env = init_distributed()
    say = (log or (lambda msg: print(msg, flush=True))) if dist_env.is_main else (lambda msg: None)
    training = cfg.training
    run = RunDir(training.save_dir)
    check_precision(cfg.precision)

    # ---- a completed run with this config is not repeated -------------------------------------
    previous = run.read_manifest()
    if previous and previous.get("status") == "completed":
        if previous.get("config_hash") != config_hash(cfg):
            raise CheckpointError(
                f"{run.root} holds a completed run with a different config; choose another save_dir"
            )
        say(f"[{trainer}] {run.root} is already completed; nothing to do")
        return previous

    # ---- setup ----------------------------------------------------------------------------
    _seed_everything(training.seed)
    manifest = run.start(cfg, trainer, dist_env.world_size) if dist_env.is_main else {}
    barrier()
    started = time.time()
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer_name or cfg.policy_name)
    model = load_causal_lm(model if model is not None else cfg.policy_name, cfg.precision, trainable=True)
    ds_cfg = deepspeed_config(training, cfg.deepspeed, cfg.precision, dist_env.world_size)
    objective = build_objective(cfg, trainer, tokenizer, ds_cfg, dist_env, ref_model)

    train_set, val_set, report = load_splits(
        cfg.dataset, tokenizer, objective.data_kind, getattr(training, "assistant_turns", "all"),
        train_rows=train_rows, eval_rows=eval_rows,
    )
    for line in report_lines(report):
        say(line)
    if dist_env.is_main:
        write_report(report, run.root / "data_report.json")

    global_batch = training.batch_size * training.gradient_accumulation_steps * dist_env.world_size
    steps_per_epoch = len(train_set) // global_batch
    total_steps = training.max_steps or training.epochs * steps_per_epoch
    if steps_per_epoch == 0:
        raise DataError(f"the training split has {len(train_set)} rows, fewer than one global batch ({global_batch})")
    engine, _, scheduler = build_engine(model, training, ds_cfg, total_steps)
    dev = device()

    # ---- resume ---------------------------------------------------------------------------
    checkpoints = CheckpointManager(run.checkpoints, training.save_total_limit, dist_env)
    start_step = 0
    latest = checkpoints.latest_valid(say)
    if latest is not None:
        saved = json.loads((latest / "trainer_state.json").read_text())
        changes = _config_changes(saved["config"], to_dict(cfg))
        if saved["global_batch"] != global_batch:
            changes.append(f"global batch {saved['global_batch']} -> {global_batch}")
        if changes:
            raise CheckpointError(f"{latest} was written with a different config; refusing to resume: "
                                  + "; ".join(changes))
        state, rank_state = checkpoints.load(engine, latest)
        start_step = state["step"]
        objective.load_state_dict(rank_state)
        say(f"[{trainer}] resumed from {latest} at step {start_step}/{total_steps}")

    writer = None
    if dist_env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        # Steps after the checkpoint are logged again; purge what an interrupted attempt wrote for them.
        writer = SummaryWriter(str(run.tensorboard), purge_step=start_step + 1 if start_step else None)
    eval_batch = training.eval_batch_size or training.batch_size
    ckpt_state = {"config": to_dict(cfg), "trainer": trainer, "global_batch": global_batch}
    say(f"[{trainer}] {total_steps} steps of {global_batch} "
        f"{'rows' if objective.data_kind == 'sft' else 'pairs'} ({steps_per_epoch} steps/epoch, "
        f"world size {dist_env.world_size}); run dir {run.root}")

    # ---- training -------------------------------------------------------------------------
    eval_metrics: dict[str, float] = {}
    loop_start, steps_done = time.perf_counter(), 0
    for step in range(start_step, total_steps):
        step_start = time.perf_counter()
        learning_rate = scheduler.get_last_lr()[0]
        batches = [
            _to_device(objective.collate([train_set[i] for i in indices]), dev)
            for indices in global_batch_indices(
                len(train_set), step, training.batch_size, training.gradient_accumulation_steps,
                dist_env.world_size, dist_env.rank, training.seed,
            )
        ]
        # Each micro-loss is a SUM over its units; scaling by (GA x world) / global units turns
        # DeepSpeed's 1/GA and cross-rank averaging into one mean over the global batch.
        global_units = all_reduce_sum(torch.stack([objective.units(b).to(dev) for b in batches]).sum())
        scale = training.gradient_accumulation_steps * dist_env.world_size / global_units
        sums, tokens = MetricSums(), torch.zeros((), dtype=torch.float64, device=dev)
        fallback_grad_norm = None
        for k, batch in enumerate(batches):
            loss_sum, stats = objective.loss_and_stats(engine, batch)
            engine.backward(loss_sum * scale)
            if k == len(batches) - 1:
                fallback_grad_norm = unclipped_grad_norm(engine)
            engine.step()
            sums.add(stats)
            tokens += batch["attention_mask"].sum()
        metrics = sums.reduce(dev)
        metrics.update(objective.after_step())
        histograms = objective.histograms()
        elapsed = time.perf_counter() - step_start
        metrics["learning_rate"] = learning_rate
        metrics["tokens_per_sec"] = all_reduce_sum(tokens).item() / elapsed
        grad_norm = engine.get_global_grad_norm()
        grad_norm = fallback_grad_norm if grad_norm is None else grad_norm
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        steps_done += 1
        done = step + 1

        if writer is not None:
            for name, value in metrics.items():
                writer.add_scalar(name, value, done)
            for name, values in histograms.items():
                if values.numel():
                    writer.add_histogram(name, values.double().cpu(), done)
        if done % training.logging_steps == 0 or done == total_steps or steps_done == 1:
            mean_step = (time.perf_counter() - loop_start) / steps_done
            say(_progress_line(trainer, done, total_steps, metrics, elapsed, mean_step * (total_steps - done)))
            if dist_env.is_main:
                run.write_progress(step=done, total_steps=total_steps, train=metrics, eval=eval_metrics)

        if val_set and training.eval_steps and done % training.eval_steps == 0 and done < total_steps:
            eval_metrics = evaluate(engine, objective, val_set, eval_batch, dist_env)
            _log_eval(writer, say, trainer, eval_metrics, done)
        saved_now = training.save_steps and done % training.save_steps == 0 and done < total_steps
        if saved_now:
            path = checkpoints.save(engine, done, ckpt_state, objective.state_dict())
            say(f"[{trainer}] checkpoint {path}")
        if stop is not None and done < total_steps and stop.agreed(dist_env.world_size, dev):
            if not saved_now:
                path = checkpoints.save(engine, done, ckpt_state, objective.state_dict())
            say(f"[{trainer}] stop signal: checkpoint {path} at step {done}/{total_steps}; exiting to be resumed")
            if dist_env.is_main:
                writer.close()
                run.write_progress(step=done, total_steps=total_steps, train=metrics, eval=eval_metrics)
                run.mark(manifest, "preempted", step=done, checkpoint=str(path))
            barrier()
            return {"status": "preempted", "step": done, "total_steps": total_steps, "checkpoint": str(path)}

    # ---- final eval and model -------------------------------------------------------------
    if val_set:
        eval_metrics = evaluate(engine, objective, val_set, eval_batch, dist_env)
        _log_eval(writer, say, trainer, eval_metrics, total_steps)
    save_final_model(engine, tokenizer, run.root, dist_env.is_main)
    summary = {
        "status": "completed",
        "final_step": total_steps,
        "train_seconds": round(time.time() - started, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "final_eval": eval_metrics,
    }
    if dist_env.is_main:
        writer.close()
        run.finish(manifest, **summary)
        say(f"[{trainer}] done in {summary['train_seconds']:.0f} s; model: {run.root}; "
            f"TensorBoard: tensorboard --logdir {run.tensorboard}")
    barrier()
    return summary


def _log_eval(writer, say, trainer: str, metrics: dict[str, float], step: int) -> None:
    if writer is not None:
        for name, value in metrics.items():
            writer.add_scalar(f"eval/{name}", value, step)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if not k.startswith("logps/"))
    say(f"[{trainer}] eval at step {step}: {shown}")


__all__ = ["train", "evaluate", "build_objective", "shutdown"]
