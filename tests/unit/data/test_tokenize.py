"""Tokenization and collation: one BOS/EOS convention, masks from lengths, truncation rules."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from dpo_hpc.data.collate import collate_conversations, collate_pairs
from dpo_hpc.data.hh import TOO_LONG, PreferencePair, parse_sft_row
from dpo_hpc.data.tokenize import BatchEncodings, SpecialTokens, texts_encoded, tokenize_conversation, tokenize_pair
from dpo_hpc.tiny_model import build_byte_tokenizer

P = "\n\nHuman: Reverse: abcd\n\nAssistant:"


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def special(tok):
    return SpecialTokens.of(tok)


def test_pair_convention_bos_prompt_completion_eos(tok, special):
    stats = Counter()
    pair, reason = tokenize_pair(tok, PreferencePair(P, " dcba", " abcd"), special, 128, 96, stats)
    assert reason is None and not stats
    assert pair.prompt_ids[0] == tok.bos_token_id and pair.prompt_ids.count(tok.bos_token_id) == 1
    assert pair.chosen_ids[-1] == tok.eos_token_id and pair.rejected_ids[-1] == tok.eos_token_id
    assert tok.decode(pair.prompt_ids[1:]) == P
    assert tok.decode(pair.chosen_ids[:-1]) == " dcba"


def test_prompt_truncated_from_the_left_then_completion_from_the_right(tok, special):
    stats = Counter()
    pair, _ = tokenize_pair(tok, PreferencePair(P, " dcba", " abcd"), special, 30, 20, stats)
    assert len(pair.prompt_ids) == 20 and tok.decode(pair.prompt_ids).endswith("Assistant:")
    assert len(pair.prompt_ids) + len(pair.chosen_ids) <= 30
    assert stats["prompt_truncated"] == 1
    stats = Counter()
    long = PreferencePair(P, " " + "x" * 40, " y")
    pair, _ = tokenize_pair(tok, long, special, 50, 30, stats)
    assert len(pair.chosen_ids) == 20 and tok.eos_token_id not in pair.chosen_ids  # cut, so no EOS
    assert pair.rejected_ids == tok(" y", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert stats["completion_truncated"] == 1


def test_row_with_no_room_for_a_completion_is_dropped(tok):
    no_bos = SpecialTokens(bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=0)
    pair, reason = tokenize_pair(tok, PreferencePair(P, " a", " b"), no_bos, 20, 20, Counter())
    assert pair is None and reason == TOO_LONG


def test_boundary_merge_is_detected_and_counted():
    """A BPE whose merges cross the prompt/response boundary: the completion is tokenized alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator([": yes"] * 50 + ["Q:", " yes"] * 5,
                             trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merged_tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    stats = Counter()
    pair, _ = tokenize_pair(merged_tok, PreferencePair("Q:", " yes", " no"), SpecialTokens.of(merged_tok), 64, 32, stats)
    assert stats["prompt_boundary_merge"] >= 1
    assert merged_tok.decode(pair.prompt_ids[1:]) == "Q:"
    assert merged_tok.decode(pair.chosen_ids[:-1]) == " yes"
    # through a batched encoder the same: the completion alone is not in the batch, so it is encoded then
    pair_ = PreferencePair("Q:", " yes", " no")
    batched_stats = Counter()
    encoder = BatchEncodings(merged_tok, list(texts_encoded(pair_)), offsets=False)
    assert tokenize_pair(encoder, pair_, SpecialTokens.of(merged_tok), 64, 32, batched_stats) == (pair, None)
    assert batched_stats == stats


def test_batch_encodings_answer_every_call_as_the_tokenizer_does(tok, special):
    pairs = [PreferencePair(P, " dcba", " abcd"), PreferencePair(P, " x", " y"), PreferencePair("Q", " a", " b")]
    conversations = [parse_sft_row({"chosen": P + " dcba"})[0], parse_sft_row({"prompt": "Q:", "chosen": " a"})[0]]
    texts = [t for item in pairs + conversations for t in texts_encoded(item)]  # P repeats: encoded once
    encoder = BatchEncodings(tok, texts, offsets=True)
    assert len(encoder.index) == len(set(texts)) < len(texts)
    for text in texts + ["not in the batch"]:
        for special_tokens in (False, True):
            for offsets in (False, True):
                want = tok(text, add_special_tokens=special_tokens, return_offsets_mapping=offsets)
                got = encoder(text, add_special_tokens=special_tokens, return_offsets_mapping=offsets)
                assert {k: list(got[k]) for k in want if k in ("input_ids", "offset_mapping")} == \
                       {k: list(want[k]) for k in want if k in ("input_ids", "offset_mapping")}
    for pair in pairs:
        assert tokenize_pair(encoder, pair, special, 12, 8, Counter()) == tokenize_pair(tok, pair, special, 12, 8,
                                                                                        Counter())
    for conversation in conversations:
        assert tokenize_conversation(encoder, conversation, special, 20, Counter()) == \
               tokenize_conversation(tok, conversation, special, 20, Counter())


def test_sft_loss_only_on_assistant_text_and_final_eos(tok, special):
    row = {"chosen": "\n\nHuman: a b\n\nAssistant: one\n\nHuman: c\n\nAssistant: two"}
    conv, _ = tokenize_conversation(tok, parse_sft_row(row)[0], special, 128, Counter())
    trained = "".join(tok.decode([i]) for i, m in zip(conv.input_ids, conv.loss_mask) if m)
    assert trained == " one two</s>"
    assert conv.input_ids[0] == tok.bos_token_id and conv.loss_mask[0] == 0
    last, _ = tokenize_conversation(tok, parse_sft_row(row, "last")[0], special, 128, Counter())
    assert "".join(tok.decode([i]) for i, m in zip(last.input_ids, last.loss_mask) if m) == " two</s>"


def test_sft_prompt_completion_trains_only_the_completion_and_eos(tok, special):
    conversation, _ = parse_sft_row({"prompt": "Reverse: abcd", "chosen": " dcba"})
    conv, _ = tokenize_conversation(tok, conversation, special, 128, Counter())
    assert "".join(tok.decode([i]) for i, m in zip(conv.input_ids, conv.loss_mask) if m) == " dcba</s>"


def test_sft_truncation_keeps_final_reply_or_drops(tok, special):
    conversation, _ = parse_sft_row({"chosen": "\n\nHuman: " + "q" * 50 + "\n\nAssistant: answer"})
    stats = Counter()
    conv, _ = tokenize_conversation(tok, conversation, special, 30, stats)
    assert len(conv.input_ids) == 30 and stats["prompt_truncated"] == 1
    assert tok.decode(conv.input_ids).endswith("Assistant: answer</s>")
    assert tokenize_conversation(tok, conversation, special, 5, Counter()) == (None, TOO_LONG)


def test_pair_collation_masks_never_cover_prompt_or_padding(tok, special):
    pairs = [tokenize_pair(tok, PreferencePair(P, c, r), special, 128, 96, Counter())[0]
             for c, r in [(" dcba", " abcd"), (" x", " a much longer rejected reply")]]
    batch = collate_pairs(pairs, pad_id=special.eos_id)  # pad == EOS, as with Llama tokenizers
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    assert ids.shape[0] == 4
    for row, pair in enumerate(pairs + pairs):
        completion = pair.chosen_ids if row < 2 else pair.rejected_ids
        start, end = len(pair.prompt_ids), len(pair.prompt_ids) + len(completion)
        assert mask[row, :start].sum() == 0 and mask[row, end:].sum() == 0
        assert mask[row, start:end].all() and attn[row, :end].all() and attn[row, end:].sum() == 0
        assert ids[row, end - 1] == special.eos_id  # the real EOS stays in the loss though pad == EOS
    assert (mask <= attn).all()


def test_conversation_collation(tok, special):
    short, _ = tokenize_conversation(tok, parse_sft_row({"chosen": P + " dcba"})[0], special, 128, Counter())
    batch = collate_conversations([short, short], pad_id=0)
    assert torch.equal(batch["loss_mask"][0], torch.tensor(short.loss_mask))
