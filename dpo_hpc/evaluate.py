"""Scoring trained models on held-out prompts: greedy answers to the verifiable task's prompts,
scored with the task's exact reward; or greedy replies to a training run's validation prompts,
scored by a reward model (the judge). Optionally the win rate against a baseline model (e.g. the
SFT one), prompt by prompt.

    dpo-hpc evaluate runs/tiny-single/dpo --data runs/tiny/data/test.jsonl --baseline runs/tiny-single/sft
    dpo-hpc evaluate runs/tiny-single/dpo --reward-model runs/tiny-single/reward --baseline runs/tiny-single/sft

Prompts use the training convention ([BOS] + prompt, no special tokens added by the tokenizer)
and are left-padded in batches; generation stops at EOS.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .data.collate import pad_rows
from .data.tokenize import SpecialTokens, encode_completion
from .algorithms.logprobs import sequence_logps
from .checkpoint.run_dir import RESOLVED_CONFIG
from .data.sources import DataError
from .data.verifiable import is_task_prompt, prompt_for, reward
from .experiment import EVALUATIONS
from .fsutil import atomic_write_json, files_identity, model_identity, remove_tree, sha256_file
from .trainers.samples import greedy_completions


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 64) -> list[str]:
    special = SpecialTokens.of(tokenizer)
    model.eval()
    answers = []
    for start in range(0, len(prompts), batch_size):
        rows = [special.prefix + tokenizer(p, add_special_tokens=False)["input_ids"]
                for p in prompts[start:start + batch_size]]
        for ids in greedy_completions(model, rows, special.pad_id, [special.eos_id], max_new_tokens):
            answers.append(tokenizer.decode(ids[:-1] if ids[-1:] == [special.eos_id] else ids))
    return answers


def win_rate(rewards: Sequence[float], baseline: Sequence[float]) -> float:
    """P(reward > baseline) + 0.5 P(tie), per prompt."""
    if len(rewards) != len(baseline) or not rewards:
        raise ValueError("win rate needs two equally long, non-empty reward lists")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, baseline)) / len(rewards)


def load_test_rows(path: str | Path, limit: Optional[int] = None) -> tuple[list[str], Optional[list[str]]]:
    """Prompts, and the reference answers when every row has an ``answer`` string (make-data writes them).
    Rows that are not prompts of the verifiable task are refused: its exact reward would score them
    as if they were."""
    prompts, answers = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not a JSON object ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise DataError(f"{path}:{line_no}: expected an object with a 'prompt' string")
            if not is_task_prompt(row["prompt"]):
                raise DataError(f"{path}:{line_no}: not a prompt of the verifiable reversal task (expected "
                                f"'{prompt_for('WORD')!r}', as `dpo-hpc make-data` writes to test.jsonl); "
                                "evaluate scores only that task")
            prompts.append(row["prompt"])
            answers.append(row.get("answer") if isinstance(row.get("answer"), str) else None)
    if limit:
        prompts, answers = prompts[:limit], answers[:limit]
    return prompts, (answers if answers and all(a is not None for a in answers) else None)


def load_test_prompts(path: str | Path, limit: Optional[int] = None) -> list[str]:
    return load_test_rows(path, limit)[0]


@torch.no_grad()
def answer_logps(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 64) -> list[float]:
    """Summed log-prob of each reference answer (and its EOS) after [BOS] + prompt, as training scores it."""
    special = SpecialTokens.of(tokenizer)
    stats: Counter = Counter()
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        rows, masks = [], []
        for prompt, answer in zip(prompts[start:start + batch_size], answers[start:start + batch_size]):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            completion = encode_completion(tokenizer, prompt, prompt_ids, answer, stats) + [special.eos_id]
            rows.append(special.prefix + prompt_ids + completion)
            masks.append([0] * (len(special.prefix) + len(prompt_ids)) + [1] * len(completion))
        batch = pad_rows(rows, masks, special.pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out.extend(sequence_logps(logits, batch["input_ids"], batch["loss_mask"]).tolist())
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


@dataclass
class Scores:
    """One model on one prompt set: greedy answers, their rewards, and (with reference answers)
    the summed log-prob of each right answer."""

    answers: list[str]
    rewards: list[float]
    logps: Optional[list[float]]
    metric: str = "accuracy"
    """What the rewards' mean is: ``accuracy`` (the verifiable task's exact 0/1) or ``reward`` (a
    reward model's scores)."""

    def summary(self) -> dict:
        out = {self.metric: _mean(self.rewards)}
        if self.logps:
            out["answer_logp"] = _mean(self.logps)
        return out

    def against(self, baseline: "Scores") -> dict:
        """Win rate, and the changes of the mean reward and answer log-prob, against a baseline model."""
        out = {"win_rate_vs_baseline": win_rate(self.rewards, baseline.rewards),
               f"{self.metric}_change_vs_baseline": _mean(self.rewards) - _mean(baseline.rewards)}
        if self.logps and baseline.logps:
            out["answer_logp_change_vs_baseline"] = _mean(self.logps) - _mean(baseline.logps)
        return out


def score(model, tokenizer, prompts: Sequence[str], references: Optional[Sequence[str]],
          max_new_tokens: int = 16, batch_size: int = 64) -> Scores:
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    logps = answer_logps(model, tokenizer, prompts, references, batch_size) if references else None
    return Scores(answers, [reward(p, a) for p, a in zip(prompts, answers)], logps)


class VerifiablePrompts:
    """The verifiable task's held-out prompts (``data``), each greedy answer scored by the task's
    exact reward, and the log-prob of the right answer where the rows give it."""

    metric = "accuracy"

    def __init__(self, data: str, limit: Optional[int], max_new_tokens: int, batch_size: int):
        self.prompts, self.references = load_test_rows(data, limit)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.identity = {"data": sha256_file(data)}
        """What the scores depend on besides the scored model (a baseline's cache key)."""

    def score(self, model, tokenizer) -> Scores:
        return score(model, tokenizer, self.prompts, self.references, self.max_new_tokens, self.batch_size)

    def examples(self, scores: Scores, tokenizer) -> list[dict]:
        """The first prompts with the model's answers and their rewards."""
        return [{"prompt": p, "answer": a, "reward": r}
                for p, a, r in list(zip(self.prompts, scores.answers, scores.rewards))[:5]]


def validation_prompts(run_dir: str | Path, tokenizer, limit: Optional[int] = None) -> list[list[int]]:
    """The prompts of a training run's validation split, tokenized as it trained (the split it
    held out, from its resolved config): each pair's or completion's prompt, an SFT conversation's
    part before its last reply."""
    from .config import ALGORITHMS, validate_mapping
    from .data.pipeline import load_splits
    from .trainers.samples import sample_prompts

    path = Path(run_dir) / RESOLVED_CONFIG
    try:
        resolved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable ({exc}); the reward model judges replies to a training run's "
                        "validation prompts, so score a run directory") from None
    trainer = resolved.pop("trainer", None)
    if trainer not in ALGORITHMS or ALGORITHMS[trainer].model != "causal_lm":
        raise DataError(f"{run_dir}: a {trainer} run has no policy whose replies a reward model could judge")
    cfg = validate_mapping(resolved, trainer, source=str(path))
    _, held_out, _ = load_splits(cfg.dataset, tokenizer, ALGORITHMS[trainer].kind,
                                 getattr(cfg.training, "assistant_turns", "all"))
    prompts = [p.prompt_ids for p in sample_prompts(held_out, limit or len(held_out))]
    if not prompts:
        raise DataError(f"{run_dir}: its data holds out no validation prompts (dataset.val_ratio = 0 and no "
                        "eval_subset), so there is nothing unseen to judge; train with a validation split")
    return prompts


def load_reward_model(reward_model: str, tokenizer, device: torch.device, dtype: Optional[torch.dtype] = None):
    """A reward model (``dpo-hpc train reward``, or any sequence-classification model with one
    output) that scores the policy's tokens, so its tokenizer must be the policy's."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if AutoTokenizer.from_pretrained(reward_model).get_vocab() != tokenizer.get_vocab():
        raise DataError(f"reward model {reward_model}: its tokenizer is not the policy's, and it scores the "
                        "policy's tokens; use a reward model trained from the same base (dpo-hpc train reward)")
    return AutoModelForSequenceClassification.from_pretrained(reward_model, dtype=dtype).to(device).eval()


def judged_rows(prompts: Sequence[list[int]], replies: Sequence[list[int]], eos_id: int) -> list[list[int]]:
    """Prompt and reply as a reward model trained on them: + EOS, unless the reply ended with it."""
    return [prompt + reply + ([] if reply[-1:] == [eos_id] else [eos_id]) for prompt, reply in zip(prompts, replies)]


class RewardModelJudge:
    """A training run's validation prompts; each model's greedy reply scored by a reward model
    (``dpo-hpc train reward``, or any sequence-classification model with one output and the
    policy's tokenizer), on a GPU where there is one."""

    metric = "reward"

    def __init__(self, reward_model: str, run_dir: str | Path, tokenizer, limit: Optional[int],
                 max_new_tokens: int, batch_size: int):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.judge = load_reward_model(reward_model, tokenizer, self.device)
        self.prompt_ids = validation_prompts(run_dir, tokenizer, limit)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        prompts = hashlib.sha256(json.dumps(self.prompt_ids).encode()).hexdigest()
        self.identity = {"reward_model": model_identity(reward_model), "prompts": prompts}

    @torch.no_grad()
    def score(self, model, tokenizer) -> Scores:
        from .algorithms.reward import reward_scores
        from .trainers.samples import stop_token_ids

        special, model = SpecialTokens.of(tokenizer), model.to(self.device).eval()
        stops = stop_token_ids(tokenizer, model)
        replies: list[list[int]] = []
        for start in range(0, len(self.prompt_ids), self.batch_size):
            replies += greedy_completions(model, self.prompt_ids[start:start + self.batch_size], special.pad_id,
                                          stops, self.max_new_tokens)
        rewards = reward_scores(self.judge, judged_rows(self.prompt_ids, replies, special.eos_id), special.pad_id,
                                self.batch_size)
        return Scores([tokenizer.decode(r, skip_special_tokens=True) for r in replies], rewards, None, self.metric)

    def examples(self, scores: Scores, tokenizer) -> list[dict]:
        return [{"prompt": tokenizer.decode(p, skip_special_tokens=True), "answer": a, "reward": r}
                for p, a, r in list(zip(self.prompt_ids, scores.answers, scores.rewards))[:5]]


def evaluate(model_dir: str, data: Optional[str] = None, baseline: Optional[str] = None, limit: Optional[int] = None,
             max_new_tokens: int = 16, batch_size: int = 64, reward_model: Optional[str] = None) -> dict:
    """Accuracy (exact reward of greedy answers to ``data``); with reference answers, their mean
    log-prob. Or, with ``reward_model``, the mean reward of greedy replies to the run's validation
    prompts. With a baseline, its figures, the win rate against it and the changes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = RewardModelJudge(reward_model, model_dir, tokenizer, limit, max_new_tokens, batch_size) \
        if reward_model else VerifiablePrompts(data, limit, max_new_tokens, batch_size)

    def scored(path) -> Scores:
        return prompts.score(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path))

    mine = scored(model_dir)
    result = {"model": model_dir, **({"reward_model": reward_model} if reward_model else {"data": data}),
              "prompts": len(mine.rewards), **mine.summary()}
    if baseline:
        base = scored(baseline)
        result.update(baseline=baseline, **{f"baseline_{k}": v for k, v in base.summary().items()},
                      **mine.against(base))
    result["examples"] = prompts.examples(mine, tokenizer)
    return result


# ----- an evaluate stage's task ---------------------------------------------------------------

BASELINE_SCORES = ".baseline_scores"
"""In a baseline run's ``evaluations/``: its scores per prompt set and settings (``<key>.json``)."""
EVALUATION_FILE = "evaluation.json"
"""In ``<run dir>/evaluations/<stage>/``: the scores of the run (final model, checkpoints, baseline)."""
CURVE_METRICS = ("accuracy", "reward", "answer_logp")
"""Scalars written per scored step to the evaluation's TensorBoard folder (``eval/task_<name>``)."""


def checkpoint_weights(checkpoint: Path) -> tuple[Optional[dict], str]:
    """(the model weights a checkpoint holds, "") or (None, why it cannot be scored). Only whole
    weights (ZeRO 0-2) of a checkpoint whose manifest verifies are used."""
    from .checkpoint import layout
    from .checkpoint.manager import verify
    from .checkpoint.safe_load import load_tensors_only

    problem = verify(checkpoint)
    if problem:
        return None, f"not usable ({problem})"
    states = sorted((checkpoint / layout.ENGINE_TAG).glob("mp_rank_*_model_states.pt"))
    if not states and any((checkpoint / layout.ENGINE_TAG).glob("zero_pp_rank_*_model_states.pt")):
        return None, "ZeRO-3 partitions the weights"  # each rank's file holds placeholders, the optimizer the shards
    if len(states) != 1:
        return None, "no single model-states file (pipeline or tensor parallel)"
    return load_tensors_only(states[0], map_location="cpu").get("module") or {}, ""


def _load_weights(model, weights: dict) -> str:
    """Put checkpoint weights into the model; '' or why they do not fit (LoRA adapters alone, another model)."""
    expected = model.state_dict()
    tied = {name for name in expected if name not in weights and "lm_head" in name}
    missing = set(expected) - set(weights) - tied
    if missing or set(weights) - set(expected):
        return f"weights do not match the model ({len(missing)} missing, {len(set(weights) - set(expected))} unexpected)"
    if any(weights[name].shape != expected[name].shape for name in weights):
        return "weight shapes differ from the model's"
    model.load_state_dict({name: t.to(expected[name].dtype) for name, t in weights.items()}, strict=False)
    if tied:
        model.tie_weights()
    return ""


def baseline_scores(baseline: Path, section: dict, identity: dict, n_prompts: int,
                    score_it: Callable[[], Scores]) -> Scores:
    """The baseline's scores, from its cache when they were made from the same model files, prompts
    (``identity``: the data, or the reward model and prompt ids) and settings (every run of a sweep
    is scored against one baseline); else ``score_it()``, cached. The cache is only a saving: a
    baseline folder that cannot be written is scored each time."""
    made_of = json.loads(json.dumps({
        "format": 1, "model": files_identity(baseline), **identity,
        **{key: section[key] for key in ("limit", "max_new_tokens", "batch_size")}}))
    key = hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:16]
    path = baseline / EVALUATIONS / BASELINE_SCORES / f"{key}.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = None
    if isinstance(cached, dict) and cached.get("made_of") == made_of and len(cached.get("rewards") or []) == n_prompts:
        return Scores(cached["answers"], cached["rewards"], cached["logps"], cached.get("metric", "accuracy"))
    scores = score_it()
    try:
        atomic_write_json(path, {"made_of": made_of, "answers": scores.answers, "rewards": scores.rewards,
                                 "logps": scores.logps, "metric": scores.metric})
    except OSError as exc:
        print(f"[evaluate] baseline scores not cached ({exc}); every run scored against it scores it again",
              flush=True)
    else:
        _drop_stale_scores(path.parent, made_of["model"])
    return scores


def _drop_stale_scores(folder: Path, model: dict) -> None:
    """Remove cached scores of model files that are gone (a retrained baseline): no key can match
    them again. Scores of the same files under other settings stay, and so does anything unreadable
    (a file this code did not write, or one being written)."""
    for other in folder.glob("*.json"):
        try:
            if json.loads(other.read_text())["made_of"]["model"] != model:
                other.unlink()
        except (OSError, ValueError, KeyError, TypeError):
            continue


def evaluate_run(config: dict, out_dir: str, run_id: Optional[str] = None) -> dict:
    """An evaluate stage's task: score run ``config["target"]`` (its final model, and with
    ``checkpoints`` each checkpoint it kept) and its baseline, into ``out_dir`` (evaluation.json,
    a manifest, TensorBoard scalars); rewriting on a rerun. The manifest keeps ``run_id`` (the
    scoring's id, a hash of its settings): the folder is the stage's, so a scoring under other
    settings is told from this one by it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import RunDir, published_checkpoints
    from .checkpoint.layout import step_of

    section, target = config["evaluate"], Path(config["target"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = RunDir(out).manifest_path
    recorded = {"kind": "evaluation", "target": str(target), **({"run_id": run_id} if run_id else {})}
    atomic_write_json(manifest_path, {"status": "running", **recorded})
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
        judge = config.get("reward_model")
        prompts = RewardModelJudge(judge, target, tokenizer, section["limit"], section["max_new_tokens"],
                                   section["batch_size"]) if judge else \
            VerifiablePrompts(section["data"], section["limit"], section["max_new_tokens"], section["batch_size"])
        model = AutoModelForCausalLM.from_pretrained(target)

        def scored(m) -> Scores:
            return prompts.score(m, tokenizer)

        final = scored(model)
        final_step = (RunDir(target).read_manifest() or {}).get("final_step")
        result: dict = {"target": str(target), **({"reward_model": judge} if judge else {"data": section["data"]}),
                        "prompts": len(final.rewards), "metric": final.metric,
                        "final": {"step": final_step, **final.summary()}, "baseline": None,
                        "by_step": [], "checkpoints_not_scored": {}}
        if final.metric == "accuracy":  # which prompts were answered right, for paired comparisons
            result["correct"] = "".join("1" if r else "0" for r in final.rewards)
        if config.get("baseline"):
            base = baseline_scores(Path(config["baseline"]), section, prompts.identity, len(final.rewards),
                                   lambda: scored(AutoModelForCausalLM.from_pretrained(config["baseline"])))
            result["baseline"] = {"run": config["baseline"], **base.summary()}
            result["final"].update(final.against(base))
            if config.get("baseline_is_start"):  # the run started from it: the curve's step 0
                result["by_step"].append({"step": 0, **base.summary()})
        if section["checkpoints"]:
            for checkpoint in reversed(published_checkpoints(target / "checkpoints")):
                if step_of(checkpoint) == final_step:
                    continue  # the final model is that step
                weights, why = checkpoint_weights(checkpoint)
                why = why or _load_weights(model, weights)
                if why:
                    result["checkpoints_not_scored"][why] = result["checkpoints_not_scored"].get(why, 0) + 1
                    continue
                result["by_step"].append({"step": step_of(checkpoint), **scored(model).summary()})
        if final_step is not None:
            result["by_step"].append({"step": final_step, **final.summary()})
        result["examples"] = prompts.examples(final, tokenizer)
        result["seconds"] = round(time.perf_counter() - started, 1)
        atomic_write_json(out / EVALUATION_FILE, result)
        _write_curve(out / "tensorboard", result["by_step"])
    except BaseException as exc:
        atomic_write_json(manifest_path, {"status": "failed", **recorded,
                                          "reason": f"{type(exc).__name__}: {exc}"[:500]})
        raise
    atomic_write_json(manifest_path, {"status": "completed", **recorded, "final_step": final_step,
                                      "final_eval": result["final"], "seconds": result["seconds"]})
    skipped = sum(result["checkpoints_not_scored"].values())
    print(f"[evaluate] {target.name}: {final.metric} {result['final'][final.metric]:.3f} on {len(final.rewards)} "
          "prompts, "
          f"{len(result['by_step'])} step(s) scored" + (f", {skipped} checkpoint(s) not scored: "
          f"{result['checkpoints_not_scored']}" if skipped else "") + f" ({result['seconds']} s)", flush=True)
    return {"status": "completed", **result["final"]}


def _write_curve(logdir: Path, by_step: list[dict]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    if logdir.exists():  # a rerun rewrites the curve instead of appending a second one
        remove_tree(logdir)
    writer = SummaryWriter(str(logdir))
    for point in by_step:
        for name in CURVE_METRICS:
            if name in point:
                writer.add_scalar(f"eval/task_{name}", point[name], point["step"])
    writer.close()
