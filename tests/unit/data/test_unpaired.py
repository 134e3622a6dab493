"""KTO's data: unpaired rows (prompt, completion, bool label) in text and conversational form,
preference rows unpaired into a desirable and an undesirable completion, the label counts in the
data report, label noise, the tokenized cache, and the KL completions that rotate within the
micro-batches the sampler draws."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dpo_hpc.data.cache import SplitCache, tokenizer_identity
from dpo_hpc.data.chat import ChatRenderer
from dpo_hpc.data.collate import collate_completions, collate_unpaired, sub_batch
from dpo_hpc.data.hh import LabelledCompletion, PreferencePair, parse_unpaired_row
from dpo_hpc.data.pipeline import load_splits, report_lines, with_kl_completions
from dpo_hpc.data.sampler import global_batch_indices, kl_partners, rotated_within
from dpo_hpc.data.sources import DataError
from dpo_hpc.data.tokenize import SpecialTokens, TokenizedCompletion, tokenize_completion, tokenize_pair, unpaired
from dpo_hpc.tiny_model import build_byte_tokenizer

from test_formats import assistant, cfg, conversational, user, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "Q:", "completion": " a", "label": True}, (LabelledCompletion("Q:", " a", True), None)),
    ({"prompt": "Q:", "completion": " a", "label": 0}, (LabelledCompletion("Q:", " a", False), None)),
    ({"prompt": "Q:", "completion": " a", "label": "yes"}, (None, "label_not_bool")),
    ({"prompt": "Q:", "completion": " a", "label": 2}, (None, "label_not_bool")),
    ({"prompt": "Q:", "completion": " a"}, (None, "missing_field")),
    ({"prompt": "Q:", "completion": ["a"], "label": True}, (None, "not_string")),
    ({"prompt": "  ", "completion": " a", "label": True}, (None, "empty_prompt")),
    ({"prompt": "Q:", "completion": " ", "label": True}, (None, "empty_response")),
])
def test_unpaired_text_rows_parse_or_name_their_drop_reason(row, expected):
    assert parse_unpaired_row(row) == expected


def test_a_completion_tokenizes_as_the_same_side_of_a_pair(tok):
    special, notes = SpecialTokens.of(tok), Counter()
    pair, _ = tokenize_pair(tok, PreferencePair("Reverse: ab =", " ba", " ab"), special, 96, 64, notes)
    for completion, ids in ((" ba", pair.chosen_ids), (" ab", pair.rejected_ids)):
        one, _ = tokenize_completion(tok, LabelledCompletion("Reverse: ab =", completion, True), special, 96, 64, notes)
        assert (one.prompt_ids, one.completion_ids, one.label) == (pair.prompt_ids, ids, True)
    cut, reason = tokenize_completion(tok, LabelledCompletion("x" * 80, " y" * 40, False), special, 96, 64, notes)
    assert reason is None and len(cut.prompt_ids) == 64 and len(cut.prompt_ids + cut.completion_ids) == 96


def test_a_pair_unpairs_into_a_desirable_and_an_undesirable_completion_with_ids_of_their_own():
    from dpo_hpc.data.tokenize import TokenizedPair

    pair = TokenizedPair([1, 5], [6, 2], [7, 2], example_id="abc")
    chosen, rejected = unpaired(pair)
    assert chosen == TokenizedCompletion([1, 5], [6, 2], True, "abc:chosen")
    assert rejected == TokenizedCompletion([1, 5], [7, 2], False, "abc:rejected")
    assert unpaired(chosen) == (chosen,)


def test_conversational_unpaired_rows_render_as_a_pairs_side_does(tok):
    renderer = ChatRenderer(tok)
    pair, _ = renderer.preference(conversational(3))
    one, reason = renderer.unpaired({"prompt": [user("Reverse: w3")], "completion": [assistant("3w")], "label": True})
    assert reason is None and one == LabelledCompletion(pair.prompt, pair.chosen, True, add_eos=False)
    text_prompt, _ = renderer.unpaired({"prompt": "Reverse: w3", "completion": "nope", "label": False})
    assert text_prompt == LabelledCompletion(pair.prompt, pair.rejected, False, add_eos=False)
    assert renderer.unpaired({"prompt": [user("x")], "completion": [user("y")], "label": True}) == \
        (None, "not_messages")
    assert renderer.unpaired({"prompt": [user("x")], "completion": [assistant("y")], "label": "no"}) == \
        (None, "label_not_bool")


def test_unpaired_and_paired_rows_load_together_and_the_report_counts_the_labels(tmp_path, tok, hf_cache):
    rows = [{"prompt": f"Reverse: w{i} =", "completion": f" {i}w", "label": i % 3 != 0} for i in range(6)]
    rows += [{"prompt": "Reverse: ab =", "chosen": " ba", "rejected": " ab"},
             {"prompt": "Q", "completion": " a", "label": "maybe"}]
    train, _, report = load_splits(cfg(write_jsonl(tmp_path / "d.jsonl", rows)), tok, "unpaired")
    assert len(train) == 8  # 6 completions, and a pair's two sides
    assert [e.label for e in train] == [False, True, True, False, True, True, True, False]
    assert train[-2].example_id.endswith(":chosen") and train[-1].example_id.endswith(":rejected")
    assert report["train"]["kept"] == 7 and report["train"]["dropped"] == {"label_not_bool": 1}
    assert (report["train"]["desirable"], report["train"]["undesirable"]) == (5, 3)
    assert "5 desirable and 3 undesirable examples" in report_lines(report)[0]


def test_no_usable_unpaired_row_names_what_was_expected(tmp_path, tok, hf_cache):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "completion": " a", "label": "x"}] * 2)
    with pytest.raises(DataError, match="0 usable rows out of 2; .*label_not_bool=2.*; expected prompt and "
                                        r"completion \(strings, or messages\) with a bool label"):
        load_splits(cfg(path), tok, "unpaired")
    with pytest.raises(DataError, match="expected columns prompt and completion and label or chosen and rejected"):
        load_splits(cfg(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Q", "answer": " a"}])), tok, "unpaired")


def test_label_noise_negates_a_completions_label_under_an_id_of_its_own(tmp_path, tok, hf_cache):
    rows = [{"prompt": f"Reverse: w{i} =", "completion": f" {i}w", "label": True} for i in range(40)]
    train, _, report = load_splits(cfg(write_jsonl(tmp_path / "d.jsonl", rows), label_noise=0.3), tok, "unpaired")
    flipped = [e for e in train if e.example_id.endswith("~flipped")]
    assert flipped and all(not e.label for e in flipped) and report["train"]["notes"]["label_flipped"] == len(flipped)
    assert report["train"]["undesirable"] == len(flipped)


def test_tokenized_completions_cache_and_read_back_whole(tmp_path, tok):
    examples = [TokenizedCompletion([1, 4], [5, 2], True, "a"), TokenizedCompletion([1], [6, 7, 2], False, "b")]
    cache = SplitCache(tmp_path, tokenizer_identity(tok))
    cache.save("fp", examples, {"rows": 2})
    assert cache.load("fp") == (examples, {"rows": 2})


@pytest.mark.parametrize("world_size, grad_accum", [(1, 1), (2, 1), (1, 3), (2, 2)])
def test_kl_completions_rotate_within_each_first_epoch_micro_batch(world_size, grad_accum):
    n, micro, seed = 50, 4, 7
    partner = kl_partners(n, micro, seed)
    assert sorted(partner) == list(range(n))  # every completion is some prompt's KL completion once
    global_batch = micro * grad_accum * world_size
    for step in range(n // global_batch):
        for rank in range(world_size):
            for batch in global_batch_indices(n, step, micro, grad_accum, world_size, rank, seed):
                assert [int(partner[i]) for i in batch] == [batch[-1], *batch[:-1]]  # TRL's rotation by one


def test_evaluation_chunks_rotate_in_order_and_a_lone_example_is_its_own_partner():
    assert rotated_within(np.arange(7), 3).tolist() == [2, 0, 1, 5, 3, 4, 6]


def test_kto_batches_hold_the_completions_their_labels_and_the_kl_sequences():
    from dpo_hpc.data.pipeline import ExampleSet

    examples = ExampleSet([TokenizedCompletion([1, 4], [5, 2], True, "a"),
                           TokenizedCompletion([1], [6, 7, 2], False, "b")], "fp")
    paired = with_kl_completions(examples, [1, 0], max_length=64)
    assert paired.fingerprint == "fp" and paired[0].kl_completion_ids == [6, 7, 2]
    cut = with_kl_completions(examples, [1, 0], max_length=4)  # the KL sequence fits max_length, as TRL cuts it
    assert cut[0].kl_completion_ids == [6, 7] and cut[1].kl_completion_ids == [5, 2]
    batch = collate_unpaired(paired, pad_id=0)
    assert batch["labels"].tolist() == [True, False]
    assert batch["input_ids"].tolist() == [[1, 4, 5, 2], [1, 6, 7, 2]]
    kl = sub_batch(batch, "kl_")
    assert kl["input_ids"].tolist() == [[1, 4, 6, 7, 2], [1, 5, 2, 0, 0]]
    assert kl["loss_tokens"].tolist() == [3, 2] and batch["loss_tokens"].tolist() == [2, 3]
    both = collate_completions(paired, pad_id=0)  # the reference pass's: completions, then KL sequences
    assert both["input_ids"][:, :4].tolist()[:2] == batch["input_ids"].tolist()
    assert both["loss_tokens"].tolist() == [2, 3, 3, 2]
