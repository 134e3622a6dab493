"""The Trainer: one run of any registered algorithm, in phases.

    train():  completed? -> setup -> resume -> for each step: train_step, log, maybe_eval (and
              samples), checkpointer.maybe_save, stop? -> finish

``train()`` is the whole story on one screen; each phase below is short. The algorithm (its
objective) only says how a batch becomes a loss; the checkpointer saves named state pieces on
its own interval; the metrics logger owns every output of numbers.
"""

from __future__ import annotations

import random
import resource
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.profiler import record_function

from ..algorithms.kto import weight_advice
from ..algorithms.objectives import batch_layout, build_objective, build_scorer
from ..checkpoint import CheckpointError, RunDir, config_hash
from ..checkpoint.manager import Checkpointer, peek_shared, shared_state
from ..checkpoint.model_card import write_model_card
from ..checkpoint.run_dir import DATA_REPORT
from ..config import Algorithm, ConfigError, algorithm, to_dict, to_identity
from ..config.losses import is_reference_free, loss_types
from ..data.collate import collate_completions, collate_pairs, to_device
from ..data.pipeline import load_splits, report_lines, with_kl_completions, write_report
from ..data.sampler import eval_batch_indices, global_batch_indices, kl_partners, rotated_within, steps_per_epoch
from ..data.tokenize import SpecialTokens
from ..filelock import FileLock
from ..fsutil import atomic_write_bytes
from ..runtime import all_reduce_sum, barrier, init_distributed, main_rank_first
from ..runtime.failures import RunFailure, explain, out_of_memory
from ..runtime.stop import StopSignal
from .engine import (build_engine, check_packing, check_precision, checkpoint_blocks, compile_blocks,
                     deepspeed_config, device, load_causal_lm, load_tokenizer, prepare_reference, router_loss_weight,
                     save_final_model, unclipped_grad_norm)
from . import lora, ref_cache, samples, varlen_attention
from .metrics import MetricsLogger, MetricSums
from .profiling import StepProfiler
from .progress import TrainProgress
from .reference_sync import ReferenceSync
from .trackers import check_available as check_trackers, open_trackers
from .throughput import (FlopsModel, allocator_retries, describe_device, peak_flops, peak_memory_gib,
                         resident_memory_gib)

UNITS = {"sft": "rows", "preference": "pairs", "unpaired": "completions"}
"""What a batch of each data kind counts (``batch_size`` is this many)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Run (or resume, or skip if already completed) one training run. The models, tokenizer and
    data are loaded from the config's names unless passed in (the Python API passes in-memory
    objects). ``stop`` makes a signal end the run with a checkpoint (status ``preempted``)."""

    def __init__(self, cfg, algo: Algorithm, *, model=None, ref_model=None, tokenizer=None, train_rows=None,
                 eval_rows=None, stop: Optional[StopSignal] = None, log: Optional[Callable[[str], None]] = None):
        self.cfg, self.algo, self.training = cfg, algo, cfg.training
        self.model, self.ref_model, self.tokenizer = model, ref_model, tokenizer
        self.train_rows, self.eval_rows = train_rows, eval_rows
        self.stop, self.log = stop, log or (lambda msg: print(msg, flush=True))
        self.run = RunDir(self.training.save_dir)
        self.dist = init_distributed()
        self.ref_summary: dict[str, Any] = {}

    def say(self, message: str) -> None:
        if self.dist.is_main:
            self.log(f"[{self.algo.name}] {message}")

    # ---- the run, top to bottom ------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Returns the run summary; ``status`` is ``completed``, ``preempted`` after the preemption
        signal or ``interrupted`` after SIGINT/SIGTERM (both with a checkpoint). A failure is
        recorded in the manifest (``failed`` and its reason) and raised."""
        previous = self.completed_run()
        if previous is not None:
            return previous
        try:
            return self._train()
        except BaseException as exc:
            self.record_failure(exc)
            raise
        finally:
            if getattr(self, "lock", None) is not None:
                self.lock.release()

    def _train(self) -> dict[str, Any]:
        self.setup()
        start = self.resume()
        self.logger = self.open_logger(start)
        self.say(f"{self.total_steps} steps of {self.global_batch} "
                 f"{UNITS[self.algo.kind]} ({self.steps_per_epoch} steps/epoch, "
                 f"world size {self.dist.world_size}); run dir {self.run.root}")
        if start == 0:
            self.generate_samples(0)  # the policy before training: what each later sample is read against
        with StepProfiler(self.training.profile_steps, self.run.root / "profile", self.dist.rank, self.say) as profiler:
            for step in range(start, self.total_steps):
                done = step + 1
                profiler.before(done)
                try:
                    metrics = self.train_step(step)
                except torch.OutOfMemoryError as exc:
                    raise self.out_of_memory() from exc
                profiler.after(done)
                self.logger.log_step(done, metrics, self.objective.histograms())
                self.maybe_eval(done)
                path = self.checkpointer.maybe_save(done, self.total_steps)
                if path is not None:
                    self.say(f"checkpoint {path}")
                stop = self.stop_agreed(done)
                if stop:
                    return self.stop_with_checkpoint(done, stop)
        return self.finish()

    # ---- phases ------------------------------------------------------------------------------
    def completed_run(self) -> Optional[dict[str, Any]]:
        """The summary of a completed run with this config in save_dir (nothing is repeated)."""
        previous = self.run.read_manifest()
        if not previous or previous.get("status") != "completed":
            return None
        if previous.get("config_hash") != config_hash(self.cfg):
            raise CheckpointError(f"{self.run.root} holds a completed run with a different config; "
                                  "choose another save_dir")
        self.say(f"{self.run.root} is already completed; nothing to do")
        return previous

    def setup(self) -> None:
        """Start the run (data first: a bad dataset fails in seconds), then the models."""
        self.start()
        if self.cfg.attn_implementation == "flex_attention":  # else the first batches look like a hang
            self.say("flex_attention compiles its kernels on the first batches, and once more when lengths "
                     "vary: minutes on a GPU, once per process")
        self.build_models()
        if self.cfg.attn_implementation == varlen_attention.NAME:
            self.say(varlen_attention.describe(self.device, next(self.engine.module.parameters()).dtype,
                                               self.training.padding_free))
        self.progress = self.new_progress()
        moved = {"reference": self.reference_sync} if self.reference_sync is not None else {}  # TR-DPO's
        self.checkpointer = Checkpointer(self.run.checkpoints, self.dist, self.engine,
                                         interval=self.training.save_steps, keep=self.training.save_total_limit,
                                         shared={"progress": self.progress}, per_rank={"objective": self.objective},
                                         replicated=moved, exclude_frozen=self.cfg.lora is not None)

    def start(self) -> None:
        """Check, then record: load the tokenizer and the data and run the resume guard, and only
        then write to the run directory (a refused resume leaves it as it was)."""
        self.run.check_location()
        self.device = device()
        check_precision(self.cfg.precision, self.device)
        check_trackers(self.training.report_to)
        seed_everything(self.training.seed)
        self.tokenizer = self.tokenizer or load_tokenizer(self.cfg.tokenizer_name or self.cfg.policy_name,
                                                          self.cfg.trust_remote_code, self.cfg.pad_token,
                                                          self.cfg.chat_template)
        report = self.load_data()
        self.check_resume()
        self.lock_run_dir()
        self.manifest = self.run.start(self.cfg, self.algo.name, self.dist.world_size, describe_device(self.device)) \
            if self.dist.is_main else {}
        if self.dist.is_main:
            write_report(report, self.run.root / DATA_REPORT)
        barrier()
        self.started = time.time()

    def lock_run_dir(self) -> None:
        """One writer per run directory (rank 0 holds ``.lock``, kept fresh by a heartbeat; a
        stale one, left by a process that is gone, is reclaimed). Every rank learns the outcome."""
        self.lock = FileLock(self.run.root / ".lock") if self.dist.is_main else None
        locked = True
        if self.lock is not None and not self.lock.try_acquire():
            self.lock.reclaim_if_stale(self.say)
            locked = self.lock.try_acquire()
        if all_reduce_sum(torch.tensor(float(locked), dtype=torch.float64, device=self.device)).item() \
                < self.dist.world_size:
            holder = self.lock.holder() if self.lock is not None else "another process"
            self.lock = None
            raise RunFailure(f"{self.run.root} is in use by {holder}, another trainer writing the same save_dir; "
                             "wait for it to finish or stop it (a run never shares its directory)")

    def new_progress(self) -> TrainProgress:
        return TrainProgress(self.algo.name, to_dict(self.cfg), self.global_batch,
                             {"train": self.train_set.fingerprint, "validation": self.val_set.fingerprint})

    def check_resume(self) -> None:
        """The resume guard before anything is written: the newest checkpoint's config and global
        batch must be this run's (the full restore, with verification, comes later)."""
        found = peek_shared(self.run.checkpoints, "progress")
        if found is not None:
            path, state = found
            try:
                self.new_progress().load_state_dict(state)
            except CheckpointError as exc:
                raise CheckpointError(f"{path}: {exc}") from None

    def load_data(self) -> dict:
        """The train and validation examples and the step counts; returns the data report."""
        training, dist = self.training, self.dist

        def load():
            return load_splits(self.cfg.dataset, self.tokenizer, self.algo.kind,
                               getattr(training, "assistant_turns", "all"), train_rows=self.train_rows,
                               eval_rows=self.eval_rows, say=self.say, margins=self.algo.reads_margins)

        # with a cache, rank 0 tokenizes on every core and the other ranks read its files
        self.train_set, self.val_set, report = main_rank_first(dist, load) if self.cfg.dataset.cache_dir else load()
        for line in report_lines(report):
            self.say(line)
        if self.algo.kind == "unpaired":
            self.pair_kl_completions(report)
        if training.generate_during_eval and not self.val_set:
            self.say("note: generate_during_eval has no validation prompts to complete (dataset.val_ratio = 0 and "
                     "no eval_subset): no samples")
        try:
            self.accumulation = training.accumulation_steps(dist.world_size)
        except ValueError as exc:
            raise ConfigError([f"{self.algo.training_section}.{exc}"]) from None
        self.global_batch = training.batch_size * self.accumulation * dist.world_size
        self.steps_per_epoch = steps_per_epoch(len(self.train_set), self.global_batch)
        self.total_steps = training.max_steps or training.epochs * self.steps_per_epoch
        self.lengths = np.array([e.length for e in self.train_set]) if training.group_by_length else None
        return report

    def pair_kl_completions(self, report: dict) -> None:
        """KTO: each example's KL completion, another example's of its micro-batch (``kl_partners``);
        and a note when the loss weights do not balance the labels' counts."""
        training, longest = self.training, self.cfg.dataset.max_length
        self.train_set = with_kl_completions(self.train_set, kl_partners(len(self.train_set), training.batch_size,
                                                                         training.seed), longest)
        eval_batch = training.eval_batch_size or training.batch_size
        self.val_set = with_kl_completions(self.val_set, rotated_within(np.arange(len(self.val_set)), eval_batch),
                                           longest)
        advice = weight_advice(report["train"]["desirable"], report["train"]["undesirable"],
                               training.desirable_weight, training.undesirable_weight)
        if advice:
            self.say(advice)

    def build_models(self) -> None:
        """The reference first: with precomputed log-probs it is gone before the policy and its
        optimizer state exist, so the two never share memory. A LoRA policy whose reference is its
        own base model gets no second model: the reference is the policy with adapters off."""
        cfg, training = self.cfg, self.training
        ds_cfg = deepspeed_config(training, cfg.deepspeed, cfg.precision, self.dist.world_size)
        reference, ref_table = None, None
        reference_free = self.algo.uses_reference and self.algo.kind == "preference" \
            and is_reference_free(training.loss_type)
        needs_reference = self.algo.uses_reference and not reference_free
        base_is_reference = (cfg.lora is not None and self.ref_model is None
                             and getattr(cfg, "ref_name", None) in (None, cfg.policy_name))
        if reference_free:
            self.say(f"loss_type {' + '.join(loss_types(training.loss_type))} is reference-free: no reference model, "
                     "no reference pass")
        if needs_reference and (training.precompute_ref_log_probs or not base_is_reference):
            reference = self.load_reference(ds_cfg)
            if training.precompute_ref_log_probs:
                ref_table, reference = self.reference_table(reference), None
        reward_model = self.algo.model == "reward_model"
        partition_with = ds_cfg if cfg.deepspeed.zero_stage == 3 else None  # no rank holds the whole model
        model = load_causal_lm(self.model if self.model is not None else cfg.policy_name, cfg.precision,
                               trainable=True, attn_implementation=cfg.attn_implementation,
                               trust_remote_code=cfg.trust_remote_code, torch_dtype=cfg.torch_dtype,
                               reward_model=reward_model, partition_with=partition_with)
        if reward_model:  # saved with it, so that transformers' pooling (a pipeline's) finds each reply's end
            model.config.pad_token_id = SpecialTokens.of(self.tokenizer).pad_id
            self.say("reward model: each prompt and reply scored at the reply's last token by the score head of "
                     f"{type(model).__name__} (fresh where the model had none: a causal LM's head is left out)")
        # transformers' sequence-classification models return no router loss (the config refuses a weight)
        router_weight = None if reward_model else router_loss_weight(model, cfg.router_aux_loss_coef)
        if router_weight is not None:
            source = "router_aux_loss_coef" if cfg.router_aux_loss_coef else "the model's config"
            self.say(f"router load-balancing loss added with weight {router_weight:g} (from {source}; "
                     "router_aux_loss_coef = 0 turns it off)")
        partitioned = any(hasattr(p, "ds_shape") for p in model.parameters())
        if partitioned:
            self.say(f"ZeRO-3: the policy was loaded straight into each rank's slice ({self.dist.world_size} "
                     "rank(s)); no rank held it whole")
        if training.padding_free and not partitioned:  # on the training device: its kernels are the ones to check
            check_packing(model.to(self.device), batch_layout(cfg), cfg.precision)
        if training.gradient_checkpointing:
            checkpointed, blocks = checkpoint_blocks(model, training.gradient_checkpointing_every_n_layers)
            self.say(f"gradient checkpointing: {checkpointed} of {blocks} blocks")
        if cfg.lora is not None:
            model = lora.add_adapters(model, cfg.lora, cfg.policy_name if self.model is None else None,
                                      task_type="SEQ_CLS" if reward_model else "CAUSAL_LM", seed=training.seed)
            self.say(lora.trainable_summary(model))
        if training.torch_compile:
            self.say(f"torch.compile: {compile_blocks(model)} blocks of the policy (compiled on first use)")
        if needs_reference and base_is_reference and ref_table is None:
            reference = lora.AdaptersOff(model)
        if self.algo.uses_reference:  # what the run's reference log-probs came from, for its manifest
            self.ref_summary["reference"] = ("none (reference-free loss)" if reference_free else
                                             "table" if ref_table is not None else
                                             "policy with adapters off" if base_is_reference else "model")
        self.objective = build_objective(self.algo, cfg, SpecialTokens.of(self.tokenizer).pad_id, self.dist,
                                         reference, ref_table, router_weight)
        self.flops = FlopsModel.of(model)  # before DeepSpeed partitions the parameters
        self.reference_online = reference is not None
        self.engine, _, self.scheduler = build_engine(model, training, ds_cfg, self.total_steps)
        if training.padding_free and partitioned:  # the engine gathers each layer's slices as it runs
            check_packing(self.engine.module, batch_layout(cfg), cfg.precision)
        self.reference_sync = None
        if self.algo.uses_reference and training.sync_ref_model:
            self.reference_sync = ReferenceSync(self.engine, reference, training.ref_model_mixup_alpha,
                                                training.ref_model_sync_steps, self.dist.is_main)
            self.ref_summary["reference_syncs"] = self.total_steps // training.ref_model_sync_steps
            self.say(f"TR-DPO: the reference moves toward the policy every {training.ref_model_sync_steps} steps "
                     f"(alpha {training.ref_model_mixup_alpha:g}), {self.ref_summary['reference_syncs']} times")
        self.peak_flops = peak_flops(self.device)

    @property
    def reference_source(self):
        """The reference: a model passed in, or its name (ref_name, else the policy's)."""
        return self.ref_model if self.ref_model is not None else (self.cfg.ref_name or self.cfg.policy_name)

    def load_reference(self, ds_cfg: dict):
        cfg = self.cfg
        reference = load_causal_lm(self.reference_source, cfg.precision, trainable=False,
                                   attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code,
                                   torch_dtype=cfg.torch_dtype,
                                   partition_with=ds_cfg if cfg.deepspeed.zero_stage == 3 else None)
        if self.training.torch_compile:
            compile_blocks(reference)
        return prepare_reference(reference, ds_cfg)

    def reference_table(self, reference) -> ref_cache.RefLogpsTable:
        """The reference log-probs of every train and validation pair: read from the cache, or
        computed in one pass and cached (a model passed in, not loaded by name, is never cached)."""
        cfg, training, source = self.cfg, self.training, self.reference_source
        examples = [*self.train_set, *self.val_set]
        pad_id = SpecialTokens.of(self.tokenizer).pad_id
        started = time.perf_counter()

        collate = collate_completions if self.algo.kind == "unpaired" else collate_pairs

        def compute_table():
            return ref_cache.compute(reference, build_scorer(cfg),
                                     lambda rows: collate(rows, pad_id, batch_layout(cfg)), examples,
                                     training.eval_batch_size or training.batch_size, self.dist, self.device, self.say)

        if not isinstance(source, str):
            table, cached = compute_table(), False
        else:
            key, made_of = ref_cache.cache_key(source, self.tokenizer, [self.train_set.fingerprint,
                                               self.val_set.fingerprint], cfg.precision, cfg.attn_implementation,
                                               getattr(training, "ld_alpha", None), ref_cache.kl_pairing(examples))
            root = Path(training.ref_log_probs_cache or self.run.root / "ref_log_probs")
            table, cached = ref_cache.load_or_compute(root / key, made_of, examples, compute_table, self.dist, self.say)
        self.ref_summary = {"ref_log_probs": "cache" if cached else "computed",
                            "ref_precompute_seconds": round(time.perf_counter() - started, 2)}
        return table

    def reference_pass(self) -> dict[str, Any]:
        """Only the reference table, into the shared cache: an experiment's reference pass, run
        as its own job before the runs that read the table (they then never load the reference)."""
        previous = self.completed_run()
        if previous is not None:
            return previous
        try:
            self.start()
            ds_cfg = deepspeed_config(self.training, self.cfg.deepspeed, self.cfg.precision, self.dist.world_size)
            table = self.reference_table(self.load_reference(ds_cfg))
        finally:
            if getattr(self, "lock", None) is not None:
                self.lock.release()
        units = UNITS[self.algo.kind]
        summary = {"status": "completed", "role": "reference", units: len(table.ids), **self.ref_summary}
        if self.dist.is_main:
            self.run.finish(self.manifest, **summary)
            self.say(f"reference pass done: {len(table.ids)} {units} in "
                     f"{self.ref_summary['ref_precompute_seconds']:.0f} s")
        barrier()
        return summary

    def open_logger(self, start: int) -> MetricsLogger:
        """Progress lines and ``progress.json``, and on rank 0 the trackers of ``report_to``."""
        trackers = open_trackers(self.training.report_to, self.run, start, self.training.run_name or self.run.root.name,
                                 to_dict(self.cfg), to_identity(self.cfg)) if self.dist.is_main else []
        return MetricsLogger(self.run, self.total_steps, start, self.training.logging_steps, self.dist.is_main,
                             self.say, trackers)

    def resume(self) -> int:
        """Restore the newest usable checkpoint (if any); returns the step to continue from."""
        step, path = self.checkpointer.resume(self.say)
        if path is not None:
            self.say(f"resumed from {path} at step {step}/{self.total_steps}")
            if self.dist.is_main:  # with the manifest's own world size: whether the run changed shape
                resumed = {"checkpoint": path.name, "step": step, "world_size": shared_state(path)["world_size"]}
                self.manifest["resumed_from"] = resumed
                self.run.annotate(resumed_from=resumed)
        return step

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns the step's global metrics."""
        training, dist, engine, objective = self.training, self.dist, self.engine, self.objective
        started = time.perf_counter()
        learning_rate = self.scheduler.get_last_lr()[0]
        collated = [objective.collate([self.train_set[i] for i in indices])
                    for indices in global_batch_indices(len(self.train_set), step, training.batch_size,
                                                        self.accumulation, dist.world_size, dist.rank, training.seed,
                                                        self.lengths)]
        work = self.work_of(collated)  # counted on the host: no device sync per micro-batch
        batches = [to_device(b, self.device) for b in collated]
        data_seconds = time.perf_counter() - started  # host work before the device has any
        # Each micro-loss is a SUM over its units; scaling by (GA x world) / global units turns
        # DeepSpeed's 1/GA and cross-rank averaging into one mean over the global batch.
        global_units = all_reduce_sum(torch.stack([objective.units(b).to(self.device) for b in batches]).sum())
        scale = self.accumulation * dist.world_size / global_units
        sums, fallback_grad_norm = MetricSums(), None
        for k, batch in enumerate(batches):
            with record_function("dpo_hpc.forward_loss"):  # the phases a profile's table starts with
                loss_sum, stats = objective.loss_and_stats(engine, batch)
            with record_function("dpo_hpc.backward"):
                engine.backward(loss_sum * scale)
            if k == len(batches) - 1:
                fallback_grad_norm = unclipped_grad_norm(engine)
            with record_function("dpo_hpc.optimizer_step"):
                engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            sums.add(stats)
        if self.reference_sync is not None:
            self.reference_sync.after_step(step + 1)  # TR-DPO: on its sync steps, the reference moves
        metrics = sums.reduce(self.device)
        metrics.update(objective.derived(metrics))
        metrics.update(objective.end_step())
        metrics["learning_rate"] = learning_rate
        metrics.update(self.perf_metrics(work, time.perf_counter() - started, data_seconds))
        grad_norm = engine.get_global_grad_norm()
        grad_norm = fallback_grad_norm if grad_norm is None else grad_norm
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        self.progress.step = step + 1
        return metrics

    def work_of(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """[real tokens, FLOPs run on them, token slots incl. padding] of this rank's micro-batches."""
        lengths = torch.cat([b["sequence_lengths"] for b in batches])
        flops = self.flops.train(lengths) + (self.flops.forward(lengths) if self.reference_online else 0.0)
        for b in batches:  # KTO's KL sequences: forward only, the policy's and an online reference's
            if "kl_sequence_lengths" in b:
                flops += self.flops.forward(b["kl_sequence_lengths"]) * (1 + self.reference_online)
        slots = sum(b["input_ids"].numel() for b in batches)
        return torch.tensor([float(lengths.sum()), flops, float(slots)], dtype=torch.float64)

    def perf_metrics(self, work: torch.Tensor, seconds: float, data_seconds: float) -> dict[str, float]:
        """Throughput of the step over every rank (a collective), MFU where the peak is known."""
        tokens, flops, slots = all_reduce_sum(work.to(self.device)).tolist()
        achieved = flops / seconds / self.dist.world_size
        metrics = {"tokens_per_sec": tokens / seconds, "perf/step_seconds": seconds,
                   "perf/tflops_per_device": achieved / 1e12,
                   "perf/padding_fraction": 1.0 - tokens / slots,
                   "perf/data_loading_fraction": data_seconds / seconds,  # rank 0's
                   "perf/peak_memory_gib": peak_memory_gib(self.device)}
        if self.peak_flops:
            metrics["perf/mfu"] = achieved / self.peak_flops
        # After the optimizer step: the state kept between steps, and the allocator's stalls (CUDA only)
        for name, value in (("perf/resident_memory_gib", resident_memory_gib(self.device)),
                            ("perf/alloc_retries", allocator_retries(self.device))):
            if value is not None:
                metrics[name] = float(value)
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Metrics over the whole validation split (every rank calls; ranks run equal batch counts)."""
        sums = MetricSums()
        batch_size = self.training.eval_batch_size or self.training.batch_size
        self.engine.eval()
        for indices in eval_batch_indices(len(self.val_set), batch_size, self.dist.world_size, self.dist.rank):
            weight = 1.0 if indices else 0.0  # an empty slot still runs a forward: ZeRO-3 needs every rank
            batch = to_device(self.objective.collate([self.val_set[i] for i in (indices or [0])]), self.device)
            sums.add(self.objective.eval_stats(self.engine, batch), weight)
        self.engine.train()
        metrics = sums.reduce(self.device)
        return {**metrics, **self.objective.derived(metrics)}

    def maybe_eval(self, step: int) -> None:
        every = self.training.eval_steps
        if self.val_set and every and step % every == 0 and step < self.total_steps:
            self.logger.log_eval(step, self.evaluate())
            self.generate_samples(step)

    def generate_samples(self, step: int) -> None:
        """``generate_during_eval``: the policy's greedy completions of the first validation prompts.
        Rank 0 generates; under ZeRO-3 every rank does, since each forward gathers weights from all."""
        training, dist = self.training, self.dist
        synced = self.cfg.deepspeed.zero_stage == 3 and dist.world_size > 1
        if not training.generate_during_eval or not (dist.is_main or synced):
            return
        prompts = samples.sample_prompts(self.val_set, training.generation_samples)
        if not prompts:
            return
        model = self.engine.module
        stop_ids = samples.stop_token_ids(self.tokenizer, model)
        self.engine.eval()
        try:
            with samples.decoding(model):
                completions = samples.greedy_completions(model, [p.prompt_ids for p in prompts],
                                                         SpecialTokens.of(self.tokenizer).pad_id, stop_ids,
                                                         training.max_new_tokens, synced)
        finally:
            self.engine.train()
        self.logger.log_samples(step, samples.sample_rows(step, prompts, completions, self.tokenizer, stop_ids))

    def stop_agreed(self, step: int) -> Optional[str]:
        """The signal any rank got (its name), or None (a collective: every rank asks at every step)."""
        if self.stop is None or step >= self.total_steps:
            return None
        return self.stop.agreed(self.dist.world_size, self.device, step_s=self.logger.train.get("perf/step_seconds", 0.0),
                                save_s=self.checkpointer.last_save_seconds)

    def stop_with_checkpoint(self, step: int, signal_name: str) -> dict[str, Any]:
        path = self.checkpointer.save(step)
        status = "preempted" if self.stop.is_preemption(signal_name) else "interrupted"
        self.say(f"{signal_name}: checkpoint {path} at step {step}/{self.total_steps}; "
                 + ("exiting to be requeued" if status == "preempted" else "stopping; run again to resume"))
        self.logger.close()
        if self.dist.is_main:
            self.run.mark(self.manifest, status, step=step, checkpoint=str(path), reason=signal_name)
        barrier()
        return {"status": status, "signal": signal_name, "step": step, "total_steps": self.total_steps,
                "checkpoint": str(path)}

    def out_of_memory(self) -> RunFailure:
        """The options that would cut memory and are not on yet, with the micro-batch that did not fit."""
        cfg, training = self.cfg, self.training
        off = [text for text, is_off in (
            ("gradient_checkpointing = true", not training.gradient_checkpointing),
            ("gradient_checkpointing_every_n_layers = 1", training.gradient_checkpointing_every_n_layers > 1),
            ("precompute_ref_log_probs = true", self.reference_online and not training.precompute_ref_log_probs
             and self.reference_sync is None),  # TR-DPO's reference moves: no table of it
            ("a [lora] section", cfg.lora is None and self.reference_sync is None),
            ("deepspeed.zero_stage = 3", cfg.deepspeed.zero_stage < 3)) if is_off]
        return out_of_memory(training.batch_size, UNITS[self.algo.kind], off)

    def record_failure(self, exc: BaseException) -> None:
        """Rank 0, once the run has started: the manifest says ``failed`` (or ``interrupted`` on
        KeyboardInterrupt) with a one-line reason; the traceback goes to ``error.log`` beside it."""
        manifest = getattr(self, "manifest", None)
        if not self.dist.is_main or not manifest:
            return
        import traceback

        try:
            log = self.run.root / "error.log"
            atomic_write_bytes(log, "".join(traceback.format_exception(exc)).encode())
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            self.run.mark(manifest, status, reason=explain(exc), error_log=str(log))
            exc.error_log = str(log)  # the command line points at it
        except Exception:  # a full disk may be the failure itself; the exception still propagates
            pass

    def finish(self) -> dict[str, Any]:
        """Final evaluation and model; the manifest says ``completed``."""
        if self.val_set:
            self.logger.log_eval(self.total_steps, self.evaluate())
            self.generate_samples(self.total_steps)
        save_final_model(self.engine, self.tokenizer, self.run.root, self.dist.is_main,
                         merge_adapter=self.cfg.lora is not None and self.cfg.lora.merge)
        keep = {"all": None, "last": 1, "none": 0}[self.training.checkpoints_at_end]
        if keep is not None and self.dist.is_main:  # the final model is written: older states are disk only
            for path in self.checkpointer.prune(keep):
                self.say(f"removed {path} (checkpoints_at_end = {self.training.checkpoints_at_end!r})")
        summary = {
            "status": "completed",
            "final_step": self.total_steps,
            "train_seconds": round(time.time() - self.started, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            **self.logger.throughput(),
            **self.ref_summary,
            "reference_forwards": getattr(self.objective, "reference_forwards", 0),
            "final_eval": self.logger.eval,
        }
        self.logger.close()
        if self.dist.is_main:
            left = write_model_card(self.run, self.cfg, self.algo.name, {**self.manifest, **summary})
            if left:
                self.say(left)
            self.run.finish(self.manifest, **summary)
            self.say(f"done in {summary['train_seconds']:.0f} s; model: {self.run.root}; "
                     f"TensorBoard: tensorboard --logdir {self.run.tensorboard}")
        barrier()
        return summary


def train(cfg, trainer: str, **kwargs) -> dict[str, Any]:
    """Train one run of the registered algorithm ``trainer`` (see ``Trainer``)."""
    return Trainer(cfg, algorithm(trainer), **kwargs).train()


def reference_pass(cfg, trainer: str, **kwargs) -> dict[str, Any]:
    """Compute (or find cached) the reference log-probs a preference run of ``cfg`` would read."""
    return Trainer(cfg, algorithm(trainer), **kwargs).reference_pass()
