"""A preference task with an exact reward: reverse a word.

Prompts read ``"\\n\\nHuman: Reverse: abcd\\n\\nAssistant:"``; the correct reply is ``" dcba"``.
The chosen reply is correct and the rejected one a plausible mistake (the word unreversed, two
letters swapped, one letter changed, one dropped), except for a ``label_noise`` fraction of rows
where the two are swapped. A ~2 M-parameter model learns it in CPU minutes (see the shared
verifiable-task notes), so a run's quality can be measured exactly. Generation is deterministic
in the seed, and train and test words never overlap.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from .hh import ASSISTANT, HUMAN

TASK = "reverse"
INSTRUCTION = "Reverse:"


@dataclass(frozen=True)
class TaskSpec:
    min_len: int = 4
    max_len: int = 7
    alphabet: str = string.ascii_lowercase
    multi_turn_ratio: float = 0.2
    """Fraction of rows with one solved exchange before the asked one (exercises multi-turn data)."""


def answer(word: str) -> str:
    return word[::-1]


def prompt_for(word: str, history: tuple[str, ...] = ()) -> str:
    text = "".join(f"{HUMAN} {INSTRUCTION} {w}{ASSISTANT} {answer(w)}" for w in history)
    return f"{text}{HUMAN} {INSTRUCTION} {word}{ASSISTANT}"


def is_task_prompt(prompt: str) -> bool:
    """Whether the prompt asks this task's question last (as ``prompt_for`` writes it)."""
    last = prompt.rsplit(HUMAN, 1)[-1]
    return prompt.endswith(ASSISTANT) and HUMAN in prompt and last.startswith(f" {INSTRUCTION} ") \
        and bool(word_of_prompt(prompt))


def word_of_prompt(prompt: str) -> str:
    """The word the last human turn asks to reverse."""
    last = prompt.rsplit(HUMAN, 1)[-1]
    return last.split(INSTRUCTION, 1)[1].split(ASSISTANT, 1)[0].strip()


def reward(prompt: str, response: str) -> float:
    """Exact reward: 1.0 if the response (up to surrounding whitespace) is the reversed word."""
    return float(response.strip() == answer(word_of_prompt(prompt)))


def wrong_answer(word: str, rng: random.Random, alphabet: str = string.ascii_lowercase) -> str:
    """A plausible mistake, never equal to the correct answer."""
    right = answer(word)
    for _ in range(100):
        kind = rng.randrange(4)
        if kind == 0:
            candidate = word
        elif kind == 1:
            i = rng.randrange(len(right) - 1)
            candidate = right[:i] + right[i + 1] + right[i] + right[i + 2:]
        elif kind == 2:
            i = rng.randrange(len(right))
            candidate = right[:i] + rng.choice(alphabet.replace(right[i], "")) + right[i + 1:]
        else:
            i = rng.randrange(len(right))
            candidate = right[:i] + right[i + 1:]
        if candidate != right:
            return candidate
    raise ValueError(f"could not corrupt {word!r}")  # only for words like 'aaaa' with no variety


def _words(n: int, rng: random.Random, spec: TaskSpec, taken: frozenset = frozenset()) -> list[str]:
    seen: set[str] = set(taken)
    out = []
    while len(out) < n:
        word = "".join(rng.choice(spec.alphabet) for _ in range(rng.randint(spec.min_len, spec.max_len)))
        if word not in seen and answer(word) != word:
            seen.add(word)
            out.append(word)
    return out


def generate(
    n_train: int, n_test: int, seed: int = 0, label_noise: float = 0.0, spec: TaskSpec = TaskSpec(), n_dev: int = 0,
) -> tuple[list[dict], list[dict], list[dict]]:
    """HH-format training rows ({chosen, rejected} transcripts, plus metadata), test prompts and
    dev prompts (for choosing settings, so the test prompts are never used for a choice).

    Test and dev rows are ``{prompt, answer}`` with words never seen in training nor in each other.
    Dev words are drawn last, so adding them leaves the training and test rows as they were.
    """
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must lie in [0, 1], got {label_noise}")
    rng = random.Random(seed)
    words = _words(n_train + n_test, rng, spec)
    train_words, test_words = words[:n_train], words[n_train:]
    train = []
    for word in train_words:
        history = (rng.choice(train_words),) if rng.random() < spec.multi_turn_ratio else ()
        prompt = prompt_for(word, history)
        good, bad = " " + answer(word), " " + wrong_answer(word, rng, spec.alphabet)
        flipped = rng.random() < label_noise
        if flipped:
            good, bad = bad, good
        train.append({"chosen": prompt + good, "rejected": prompt + bad, "label_flipped": flipped})
    dev_words = _words(n_dev, rng, spec, taken=frozenset(words)) if n_dev else []
    test, dev = ([{"prompt": prompt_for(w), "answer": " " + answer(w)} for w in ws] for ws in (test_words, dev_words))
    return train, test, dev


def as_conversation(row: dict) -> dict:
    """An HH training row in TRL's conversational form: ``prompt`` messages, ``chosen`` and
    ``rejected`` as one assistant message each (metadata kept)."""
    from .hh import parse_turns

    def messages(transcript: str) -> list[dict[str, str]]:
        return [{"role": "user" if t.role == "human" else "assistant", "content": t.text.strip()}
                for t in parse_turns(transcript)]

    chosen, rejected = messages(row["chosen"]), messages(row["rejected"])
    extra = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:], **extra}


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_dataset(
    out_dir: str | Path, n_train: int = 4000, n_test: int = 500, seed: int = 0, label_noise: float = 0.0,
    spec: TaskSpec = TaskSpec(), data_format: str = "text", n_dev: int = 0,
) -> dict[str, Path]:
    """Write ``train.jsonl`` (preference rows: HH transcripts, or with ``data_format =
    "conversational"`` TRL's message lists), ``test.jsonl`` (prompts + answers), with ``n_dev``
    ``dev.jsonl`` (more held-out prompts, for choosing settings) and ``task.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test, dev = generate(n_train, n_test, seed=seed, label_noise=label_noise, spec=spec, n_dev=n_dev)
    if data_format == "conversational":
        train = [as_conversation(row) for row in train]
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl", "task": out / "task.json"}
    write_jsonl(train, paths["train"])
    write_jsonl(test, paths["test"])
    if n_dev:
        paths["dev"] = out / "dev.jsonl"
        write_jsonl(dev, paths["dev"])
    meta = {"task": TASK, "format": data_format, "n_train": n_train, "n_test": n_test, "n_dev": n_dev, "seed": seed,
            "label_noise": label_noise,
            "multi_turn_ratio": spec.multi_turn_ratio, "flipped": sum(r["label_flipped"] for r in train)}
    paths["task"].write_text(json.dumps(meta, indent=2) + "\n")
    return paths

