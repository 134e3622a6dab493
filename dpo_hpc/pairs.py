"""On-policy preference pairs: ``samples`` completions of every prompt drawn from a policy, each
scored by a reward model or by the verifiable task's exact reward, and the best against the worst
written as a preference dataset that the trainers read (the recipe of on-policy DPO data, as in
SimPO's and Llama 3's: sample, judge, keep the extremes).

    dpo-hpc make-pairs runs/x/sft --prompts data/prompts.jsonl --reward-model runs/x/rm --out runs/x/pairs

OUT receives ``pairs.jsonl`` (TRL's prompt/chosen/rejected rows: the prompt as its row gave it,
a string or messages, the replies as strings or as assistant messages to match, plus each side's
reward), ``samples.jsonl`` (every sample, its reward and whether it stopped) and, last,
``generation.json`` (settings, counts, mean rewards). The work goes into ``OUT/.make-pairs/`` in
chunks of ``batch_size`` prompts, each drawn under a seed of its own and written aside, so a job
killed on the way resumes at its first missing chunk and ends with the files of a job that never
stopped (bit for bit on CPU).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .algorithms.reward import reward_scores
from .config import DatasetConfig, to_identity
from .data.chat import ChatRenderer, TemplateRefused, is_messages, standard_messages
from .data.hh import split_prompt
from .data.sources import DataError, load_raw
from .data.tokenize import SpecialTokens, encode_prompt
from .data.verifiable import is_task_prompt, reward as exact_reward
from .evaluate import judged_rows, load_reward_model
from .experiment import GENERATED_PAIRS, GENERATION_FILE
from .experiment.schema import GENERATION_LOCATIONS, GenerationSection
from .fsutil import atomic_write_bytes, atomic_write_json, model_identity, remove_tree
from .trainers.samples import Sampling, completions, stop_token_ids

WORK = ".make-pairs"
"""In OUT: the chunks made so far and the settings they were made with (removed once OUT is complete)."""
DONE = GENERATION_FILE
"""In OUT, written last: a folder that has it holds a complete set of pairs."""
PROGRESS_EVERY_S = 15.0


class PairsStopped(Exception):
    """A stop signal (or the job's deadline) between two chunks: the chunks made so far are kept."""

    def __init__(self, signal: str, chunks: int):
        super().__init__(f"stopped by {signal} after {chunks} chunk(s)")
        self.signal, self.chunks = signal, chunks


@dataclass(frozen=True)
class Prompt:
    row: int
    """Position of its row in the prompt data (``dataset[row]``)."""
    given: Any
    """The prompt as the row gave it: a string, or messages (TRL's role/content form)."""
    text: str
    """What the policy continues: the string, or the messages rendered with the generation prompt."""


def prompt_of(row: dict[str, Any]) -> Optional[Any]:
    """A row's prompt: its ``prompt`` (a string or messages), else the part of an HH ``chosen``
    transcript before the last assistant turn; None if it has neither."""
    prompt = standard_messages(row.get("prompt"))
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    if is_messages(prompt):
        return prompt
    transcript = row.get("chosen")
    split = split_prompt(transcript) if isinstance(transcript, str) else None
    return split[0] if split else None


def read_prompts(source: str, subset: str, tokenizer, limit: Optional[int],
                 offset: int = 0) -> tuple[list[Prompt], Counter]:
    """The usable prompts of ``source`` (a hub name or a local data file or folder) after the first
    ``offset`` of them, and the count of rows dropped by reason."""
    raw = load_raw(DatasetConfig(dataset_name=source, subset=subset), source="prompts")
    renderer = ChatRenderer(tokenizer)
    prompts, dropped, skipped = [], Counter(), 0
    for i, row in enumerate(raw):
        given = prompt_of(row)
        if given is None:
            dropped["no_prompt"] += 1
            continue
        if skipped < offset:
            skipped += 1
            continue
        if isinstance(given, str):
            text = given
        elif tokenizer.chat_template is None:
            raise DataError(f"prompts {source}: row {i} gives its prompt as messages, and the policy's tokenizer "
                            "has no chat template to render them with (set chat_template when training it)")
        else:
            try:
                text = renderer.render(given, generation_prompt=True)
            except TemplateRefused as exc:
                raise DataError(f"prompts {source}: row {i}: the chat template refused its messages: {exc}") from None
        prompts.append(Prompt(i, given, text))
        if limit is not None and len(prompts) == limit:
            break
    if not prompts and skipped:
        raise DataError(f"prompts {source}: {skipped} usable prompt(s), none after the first {offset} (offset; "
                        "round_prompts = 'next' takes the next `limit` each round): use more prompts or fewer rounds")
    if not prompts:
        raise DataError(f"prompts {source}: no row has a prompt (a 'prompt' string or messages, or an HH "
                        f"'chosen' transcript); {sum(dropped.values())} row(s) read")
    return prompts, dropped


class VerifiableJudge:
    """The verifiable task's exact reward (1 for the reversed word, else 0)."""

    def __init__(self, prompts: Sequence[Prompt]):
        wrong = next((p for p in prompts if not is_task_prompt(p.text)), None)
        if wrong is not None:
            raise DataError(f"verifiable: row {wrong.row}'s prompt is not one of the verifiable task's "
                            f"(dpo-hpc make-data writes them): {wrong.text[:80]!r}")

    def scores(self, prompts: Sequence[Prompt], prompt_ids, replies: Sequence[list[int]], texts: Sequence[str]):
        return [exact_reward(p.text, t) for p, t in zip(prompts, texts)]


def judge_identity(reward_model: Optional[str]) -> list | str:
    """What names the judge in a set's identity: a reward model's files (a folder) or hub name."""
    if not reward_model:
        return "verifiable"
    return model_identity(reward_model)


class RewardModel:
    """A reward model's score of the prompt's tokens and the reply's (+ EOS), as it trained."""

    def __init__(self, path: str, tokenizer, device: torch.device, dtype: torch.dtype, batch_size: int):
        self.model = load_reward_model(path, tokenizer, device, dtype)
        self.special, self.batch_size = SpecialTokens.of(tokenizer), batch_size

    @torch.no_grad()
    def scores(self, prompts: Sequence[Prompt], prompt_ids, replies: Sequence[list[int]], texts: Sequence[str]):
        rows = judged_rows(prompt_ids, replies, self.special.eos_id)
        return reward_scores(self.model, rows, self.special.pad_id, self.batch_size)


def best_and_worst(rewards: Sequence[float]) -> Optional[tuple[int, int]]:
    """Indices of the highest and the lowest reward (the first of equals); None when all are equal."""
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    return None if rewards[best] == rewards[worst] else (best, worst)


def pair_row(prompt: Prompt, record: dict) -> Optional[dict]:
    """The training row of a prompt's samples: its best against its worst, in the prompt's form."""
    found = best_and_worst(record["rewards"])
    if found is None:
        return None
    (best, worst), samples = found, record["samples"]
    chosen, rejected = samples[best], samples[worst]
    if not isinstance(prompt.given, str):  # conversational: the replies as the assistant's messages
        chosen, rejected = ([{"role": "assistant", "content": text}] for text in (chosen, rejected))
    return {"prompt": prompt.given, "chosen": chosen, "rejected": rejected, "chosen_reward": record["rewards"][best],
            "rejected_reward": record["rewards"][worst], "row": prompt.row}


def chunk_seed(seed: int, chunk: int) -> int:
    """The draws of chunk ``chunk``: its own seed, so a resumed job draws as an uninterrupted one."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{chunk}".encode()).digest()[:8], "little") >> 1


def _chunk_path(work: Path, chunk: int) -> Path:
    return work / f"chunk_{chunk:06d}.jsonl"


def _read_chunk(path: Path, expected_rows: Sequence[int]) -> Optional[list[dict]]:
    """The chunk's records, or None if it is missing or not what this chunk holds (then made again)."""
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, ValueError):
        return None
    return records if [r.get("row") for r in records] == list(expected_rows) else None


@dataclass(frozen=True)
class Ranks:
    """The processes that share one set of pairs: rank r draws chunks r, r + world, ... (each under
    its own seed, so the files do not depend on how many ranks drew them); rank 0 writes the set."""

    rank: int = 0
    world: int = 1
    device: Optional[torch.device] = None
    """None: the first GPU, else the CPU."""
    barrier: Callable[[], None] = lambda: None


def make_pairs(model: str, settings: GenerationSection, out: str | Path, say: Callable[[str], None] = print,
               stop: Callable[[float], Optional[str]] = lambda chunk_s: None, ranks: Ranks = Ranks()) -> dict:
    """Sample, score, pair (``settings.reward_model`` a folder or hub name here); write OUT's files
    and return what ``generation.json`` holds (on every rank). ``stop(seconds of the last chunk)``,
    asked after each round of chunks (on every rank alike: with several ranks it is a collective),
    names a signal to stop for (then ``PairsStopped``), or None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    device = ranks.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts, dropped = read_prompts(settings.prompts, settings.subset, tokenizer, settings.limit, settings.offset)
    identity = {"model": model_identity(model),
                "judge": judge_identity(settings.reward_model),
                "prompts": hashlib.sha256(json.dumps([[p.row, p.text] for p in prompts]).encode()).hexdigest(),
                "settings": {k: v for k, v in to_identity(settings).items() if k not in GENERATION_LOCATIONS},
                "dtype": str(dtype), "device": device.type}
    identity = json.loads(json.dumps(identity))  # as a file holds it (tuples as lists), to compare with one
    if (out / DONE).exists():
        done = json.loads((out / DONE).read_text())
        if done.get("identity") == identity:
            say(f"[make-pairs] {out} already holds these pairs ({done['pairs']}); nothing to do")
            return done
        raise DataError(f"{out} holds pairs made from another model, prompts or settings; write these into "
                        "another folder (or remove that one)")
    # only now: a set already made loads no model at all
    judge = RewardModel(settings.reward_model, tokenizer, device, dtype, settings.batch_size) if settings.reward_model \
        else VerifiableJudge(prompts)
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    settings_file = work / "identity.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != identity:
        raise DataError(f"{work} holds part of a run with another model, prompts or settings; write these into "
                        f"another folder (or remove {work} to start over)")
    atomic_write_json(settings_file, identity)

    policy = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    special, stops = SpecialTokens.of(tokenizer), stop_token_ids(tokenizer, policy)
    sampling = Sampling(settings.samples, settings.temperature, settings.top_p, settings.top_k)
    size = settings.batch_size
    chunks = [prompts[i:i + size] for i in range(0, len(prompts), size)]
    say(f"[make-pairs] {len(prompts)} prompt(s) x {settings.samples} samples from {model} on {device.type}, "
        f"judged by {settings.judged_by}; {len(chunks)} chunk(s) of {size} in {work}")
    rounds = -(-len(chunks) // ranks.world)
    started = last_line = time.monotonic()
    made = 0
    for k in range(rounds):
        c = k * ranks.world + ranks.rank
        chunk_started = time.monotonic()
        if c < len(chunks) and _read_chunk(_chunk_path(work, c), [p.row for p in chunks[c]]) is None:
            found = _sampled_chunk(policy, tokenizer, judge, chunks[c], special, stops, sampling, settings, c)
            atomic_write_bytes(_chunk_path(work, c), "".join(json.dumps(r) + "\n" for r in found).encode())
            made += len(chunks[c])
        now = time.monotonic()
        signal = stop(now - chunk_started) if k < rounds - 1 else None
        if signal:
            kept = len(list(work.glob("chunk_*.jsonl")))
            say(f"[make-pairs] {signal}: stopping after round {k + 1} of {rounds}; the {kept} chunk(s) made stay "
                f"in {work}")
            raise PairsStopped(signal, kept)
        if now - last_line >= PROGRESS_EVERY_S or k == rounds - 1:
            last_line, done_n = now, min(len(prompts), (k + 1) * ranks.world * size)
            rate = made * ranks.world / (now - started) if made else 0.0  # every rank draws at about this rate
            eta = f" | eta {int((len(prompts) - done_n) / rate)} s" if rate and done_n < len(prompts) else ""
            say(f"[make-pairs] {done_n}/{len(prompts)} prompts ({100 * done_n // len(prompts)}%) | "
                f"{rate:.2f} prompts/s{eta}")
    ranks.barrier()  # every rank's chunks written
    if ranks.rank != 0:
        ranks.barrier()  # rank 0 writes the set
        if not (out / DONE).exists():
            raise DataError(f"rank 0 did not write the pairs into {out} (see its log)")
        return json.loads((out / DONE).read_text())
    try:
        records = []
        for c, chunk in enumerate(chunks):
            found = _read_chunk(_chunk_path(work, c), [p.row for p in chunk])
            if found is None:  # another rank's, written before the barrier: a folder the ranks do not share
                raise DataError(f"{_chunk_path(work, c)} is missing or damaged after every rank finished; is "
                                f"{work} on a filesystem all ranks share? Run again to draw it anew")
            records += found
        return _finish(out, work, prompts, records, dropped, identity, settings, say)
    finally:
        ranks.barrier()


def _sampled_chunk(policy, tokenizer, judge, chunk: Sequence[Prompt], special: SpecialTokens, stops, sampling: Sampling,
                   settings: GenerationSection, index: int) -> list[dict]:
    whole = [encode_prompt(tokenizer, p.text, special) for p in chunk]
    ids = [i[-settings.max_prompt_length:] for i in whole]
    torch.manual_seed(chunk_seed(settings.seed, index))
    replies = completions(policy, ids, special.pad_id, stops, settings.max_new_tokens, sampling=sampling)
    # the texts as training rows hold them: no stop token (the data pipeline ends a reply itself)
    texts = [tokenizer.decode(r[:-1] if r[-1:] and r[-1] in stops else r, skip_special_tokens=True) for r in replies]
    each = [p for p in chunk for _ in range(sampling.samples)]
    rewards = judge.scores(each, [i for i in ids for _ in range(sampling.samples)], replies, texts)
    k = sampling.samples  # the samples come prompt by prompt: prompt i's are [i * k, (i + 1) * k)
    return [{"row": p.row, "samples": texts[i * k:(i + 1) * k],
             "rewards": [float(r) for r in rewards[i * k:(i + 1) * k]],
             "stopped": [bool(r) and r[-1] in stops for r in replies[i * k:(i + 1) * k]],
             "prompt_truncated": len(whole[i]) > settings.max_prompt_length}
            for i, p in enumerate(chunk)]


def _finish(out: Path, work: Path, prompts: Sequence[Prompt], records: Sequence[dict], dropped: Counter,
            identity: dict, settings: GenerationSection, say: Callable[[str], None]) -> dict:
    rows = [pair_row(p, r) for p, r in zip(prompts, records)]
    pairs = [row for row in rows if row is not None]
    samples = [{"row": p.row, "prompt": p.given, **{k: r[k] for k in ("samples", "rewards", "stopped")}}
               for p, r in zip(prompts, records)]
    atomic_write_bytes(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples).encode())
    if not pairs:  # no DONE, and the chunks stay: the same command again answers at once
        raise DataError(f"make-pairs: every prompt's {settings.samples} samples scored alike, so no pair was made "
                        f"({out / 'samples.jsonl'} has them); draw more samples or at a higher temperature, or "
                        "start from a model that solves some of the prompts")
    atomic_write_bytes(out / GENERATED_PAIRS, "".join(json.dumps(p) + "\n" for p in pairs).encode())
    every = [x for r in records for x in r["rewards"]]
    summary = {
        "prompts": len(prompts), "pairs": len(pairs),
        "skipped": {"rows_without_prompt": dropped["no_prompt"], "no_reward_spread": len(prompts) - len(pairs)},
        "samples_per_prompt": settings.samples, "samples_cut_at_max_new_tokens":
            sum(not s for r in records for s in r["stopped"]),
        "prompts_truncated": sum(r["prompt_truncated"] for r in records),
        "mean_reward": sum(every) / len(every),
        "mean_chosen_reward": sum(p["chosen_reward"] for p in pairs) / len(pairs),
        "mean_rejected_reward": sum(p["rejected_reward"] for p in pairs) / len(pairs),
        "identity": identity,
    }
    atomic_write_json(out / DONE, summary)
    remove_tree(work)  # the chunks this command wrote; every one of them is in samples.jsonl now
    skipped = summary["skipped"]
    say(f"[make-pairs] {len(pairs)} pair(s) from {len(prompts)} prompt(s) into {out / GENERATED_PAIRS}; skipped: "
        f"{skipped['no_reward_spread']} prompt(s) whose samples all scored alike, {skipped['rows_without_prompt']} "
        f"row(s) without a prompt; {summary['samples_cut_at_max_new_tokens']} sample(s) cut at max_new_tokens")
    return summary


def generate_run(config: dict, out_dir: str, stop: Callable[[float], Optional[str]] = lambda chunk_s: None,
                 is_preemption: Callable[[str], bool] = lambda signal: False, ranks: Ranks = Ranks()) -> dict:
    """A generate stage's task (on every rank of it): the pairs of ``config["model"]`` into
    ``out_dir``, with a run manifest (running, then completed, preempted, interrupted or failed),
    written by rank 0, that status and submit read. A stopped task goes on from its chunks when
    requeued or resubmitted."""
    from .checkpoint import RunDir

    model, out, main = config["model"], Path(out_dir), ranks.rank == 0
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = RunDir(out).manifest_path

    def record(status: str, **fields) -> None:
        if main:
            atomic_write_json(manifest_path, {"status": status, "kind": "generation", "model": model, **fields})

    record("running")
    started = time.perf_counter()
    try:
        summary = make_pairs(model, GenerationSection(**config["generate"]), out, stop=stop, ranks=ranks,
                             say=lambda line: print(line, flush=True) if main else None)
    except PairsStopped as stopped:
        status = "preempted" if is_preemption(stopped.signal) else "interrupted"
        record(status, reason=stopped.signal, chunks=stopped.chunks)
        return {"status": status, "signal": stopped.signal, "chunks": stopped.chunks}
    except BaseException as exc:
        record("failed", reason=f"{type(exc).__name__}: {exc}"[:500])
        raise
    final = {key: summary[key] for key in ("prompts", "pairs", "mean_chosen_reward", "mean_rejected_reward")}
    record("completed", final_eval=final, seconds=round(time.perf_counter() - started, 1))
    return {"status": "completed", **final}
