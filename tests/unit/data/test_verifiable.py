"""The reversal preference task: determinism, exact reward, noise rate, held-out words."""

from __future__ import annotations

import random

import pytest

from dpo_hpc.data.hh import ASSISTANT, parse_preference_row
from dpo_hpc.data.verifiable import answer, generate, prompt_for, reward, word_of_prompt, write_dataset, wrong_answer


def test_generation_is_deterministic_in_the_seed():
    assert generate(50, 10, seed=3, label_noise=0.2) == generate(50, 10, seed=3, label_noise=0.2)
    assert generate(50, 10, seed=3) != generate(50, 10, seed=4)


def test_rows_are_hh_pairs_with_exact_rewards():
    train, test, _ = generate(300, 50, seed=0, label_noise=0.0)
    for row in train:
        pair, reason = parse_preference_row(row)
        assert reason is None
        assert reward(pair.prompt, pair.chosen) == 1.0 and reward(pair.prompt, pair.rejected) == 0.0
    assert all(reward(t["prompt"], t["answer"]) == 1.0 for t in test)


def test_label_noise_flips_the_stated_fraction():
    train, _, _ = generate(2000, 0, seed=1, label_noise=0.3)
    flipped = [r for r in train if r["label_flipped"]]
    assert 0.26 < len(flipped) / 2000 < 0.34
    for row in flipped:
        pair, _ = parse_preference_row(row)
        assert reward(pair.prompt, pair.chosen) == 0.0 and reward(pair.prompt, pair.rejected) == 1.0


def test_test_words_never_appear_in_training():
    train, test, _ = generate(500, 100, seed=2)
    train_words = {word_of_prompt(parse_preference_row(r)[0].prompt) for r in train}
    assert not train_words & {word_of_prompt(t["prompt"]) for t in test}


def test_multi_turn_rows_ask_about_the_last_word():
    prompt = prompt_for("abcd", history=("xyz",))
    assert prompt.count("Human:") == 2 and word_of_prompt(prompt) == "abcd"
    assert reward(prompt, " dcba") == 1.0 and reward(prompt, " zyx") == 0.0


@pytest.mark.parametrize("seed", range(20))
def test_wrong_answers_are_never_right(seed):
    rng = random.Random(seed)
    for word in ["abcd", "hello", "ab", "qwertyu"]:
        assert wrong_answer(word, rng) != answer(word)


def test_write_dataset(tmp_path):
    paths = write_dataset(tmp_path, n_train=20, n_test=5, seed=0, label_noise=0.5)
    assert len(paths["train"].read_text().splitlines()) == 20 and len(paths["test"].read_text().splitlines()) == 5
    with pytest.raises(ValueError):
        generate(5, 1, label_noise=1.5)


def test_dev_prompts_are_disjoint_and_leave_train_and_test_as_they_were():
    train, test, dev = generate(200, 50, seed=4, n_dev=30)
    assert (train, test, []) == generate(200, 50, seed=4)
    assert len(dev) == 30
    trained = {prompt_for(word_of_prompt(row["chosen"].rsplit(ASSISTANT, 1)[0] + ASSISTANT)) for row in train}
    test_prompts, dev_prompts = ({row["prompt"] for row in rows} for rows in (test, dev))
    assert len(dev_prompts) == 30 and not dev_prompts & test_prompts and not dev_prompts & trained
