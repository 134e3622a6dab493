"""Dataset formats: TRL's conversational rows (explicit and implicit prompt) rendered with the
tokenizer's chat template, SFT on assistant turns from ``messages``, column mapping, a system
prompt, and clear errors for rows in the wrong format."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from dpo_hpc.config import ConfigError, DatasetConfig, validate_as
from dpo_hpc.data.chat import ChatRenderer
from dpo_hpc.data.hh import PreferencePair
from dpo_hpc.data.pipeline import load_splits
from dpo_hpc.data.sources import DataError
from dpo_hpc.data.tokenize import SpecialTokens, tokenize_pair
from dpo_hpc.tiny_model import build_byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def conversational(i):
    return {"prompt": [user(f"Reverse: w{i}")], "chosen": [assistant(f"{i}w")], "rejected": [assistant("nope")]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg(path, **kw):
    return DatasetConfig(dataset_name=str(path), **{"val_ratio": 0.0, "max_length": 96, "max_prompt_length": 64, **kw})


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def test_conversational_pair_renders_with_the_template_and_keeps_one_bos_and_its_own_eos(tok):
    pair, reason = ChatRenderer(tok).preference(conversational(7))
    assert reason is None
    assert pair == PreferencePair("<s><|user|>\nReverse: w7</s>\n<|assistant|>\n", "7w</s>\n", "nope</s>\n",
                                  add_eos=False)
    special = SpecialTokens.of(tok)
    tokens, _ = tokenize_pair(tok, pair, special, 96, 64, Counter())
    assert tokens.prompt_ids.count(special.bos_id) == 1 and tokens.prompt_ids[0] == special.bos_id
    assert decode(tok, tokens.chosen_ids) == "7w</s>\n"  # the template's end of turn, no EOS appended
    assert decode(tok, tokens.prompt_ids + tokens.chosen_ids) == tok.apply_chat_template(
        [user("Reverse: w7"), assistant("7w")], tokenize=False)


def test_implicit_prompt_is_every_message_but_the_last(tok):
    history = [user("hi"), assistant("hello"), user("Reverse: ab")]
    row = {"chosen": history + [assistant("ba")], "rejected": history + [assistant("ab")]}
    pair, _ = ChatRenderer(tok).preference(row)
    explicit, _ = ChatRenderer(tok).preference({"prompt": history, "chosen": [assistant("ba")],
                                                "rejected": [assistant("ab")]})
    assert pair == explicit and pair.prompt.endswith("<|user|>\nReverse: ab</s>\n<|assistant|>\n")
    diverging = {"chosen": history + [assistant("ba")], "rejected": [user("other")] + [assistant("ab")]}
    assert ChatRenderer(tok).preference(diverging) == (None, "rejected_prompt_mismatch")


def test_system_prompt_is_added_where_a_row_has_none(tok):
    pair, _ = ChatRenderer(tok, system_prompt="Be brief.").preference(conversational(1))
    assert pair.prompt.startswith("<s><|system|>\nBe brief.</s>\n<|user|>")
    row = conversational(1)
    row["prompt"] = [{"role": "system", "content": "Own."}] + row["prompt"]
    assert ChatRenderer(tok, system_prompt="Be brief.").preference(row)[0].prompt.startswith("<s><|system|>\nOwn.")


def test_sft_messages_train_on_assistant_turns_from_the_template(tok, hf_cache, tmp_path):
    messages = [user("a"), assistant("one"), user("b"), assistant("two")]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": messages}] * 3)
    (example, *_), _, report = load_splits(cfg(path), tok, "sft")
    trained = decode(tok, [t for t, m in zip(example.input_ids, example.loss_mask) if m])
    assert trained == "one</s>\ntwo</s>\n"  # replies and their end of turn; nothing of the user turns
    assert decode(tok, example.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    (last, *_), _, _ = load_splits(cfg(path), tok, "sft", assistant_turns="last")
    assert decode(tok, [t for t, m in zip(last.input_ids, last.loss_mask) if m]) == "two</s>\n"
    assert report["train"]["kept"] == 3
    (system, *_), _, _ = load_splits(cfg(path, system_prompt="Be brief."), tok, "sft")
    assert decode(tok, system.input_ids).startswith("<s><|system|>\nBe brief.</s>\n<|user|>\na</s>")
    assert decode(tok, [t for t, m in zip(system.input_ids, system.loss_mask) if m]) == "one</s>\ntwo</s>\n"


def test_mixed_formats_load_and_bad_rows_are_counted_by_reason(tmp_path, tok, hf_cache):
    hh = {"chosen": "\n\nHuman: Reverse: ab\n\nAssistant: ba", "rejected": "\n\nHuman: Reverse: ab\n\nAssistant: ab"}
    standard = {"prompt": "Reverse: cd =", "chosen": " dc", "rejected": " cd"}
    bad = [
        {"prompt": [user("x")], "chosen": [{"role": "robot", "content": "y"}], "rejected": [assistant("z")]},
        {"prompt": [user("x")], "chosen": [assistant("y")], "rejected": 5},
        {"prompt": [user("x")], "chosen": [assistant("y")], "rejected": [assistant("y")]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [conversational(i) for i in range(5)] + [hh, standard] + bad)
    train, _, report = load_splits(cfg(path), tok, "preference")
    assert len(train) == 7
    assert report["train"]["dropped"] == {"identical_responses": 1, "not_messages": 2}
    text_only, _, report = load_splits(cfg(path, format="text"), tok, "preference")
    assert len(text_only) == 2 and report["train"]["dropped"]["not_string"] == 8


def test_rows_in_the_wrong_format_name_the_format_expected(tmp_path, tok, hf_cache):
    hh = {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: z"}
    path = write_jsonl(tmp_path / "d.jsonl", [hh] * 3)
    with pytest.raises(DataError, match=r"0 usable rows out of 3; .*not_messages=3.*expected format "
                                        r"'conversational': prompt/chosen/rejected .* lists of \{role, content\}"):
        load_splits(cfg(path, format="conversational"), tok, "preference")


def test_conversational_rows_need_a_chat_template(tmp_path, hf_cache):
    plain = build_byte_tokenizer()
    plain.chat_template = None
    path = write_jsonl(tmp_path / "d.jsonl", [conversational(1)])
    with pytest.raises(DataError, match="has conversational rows, but the tokenizer has no chat template"):
        load_splits(cfg(path), plain, "preference")


@pytest.mark.parametrize("kind", ["preference", "sft"])
def test_a_text_prompt_beside_conversational_replies_reads_as_the_explicit_form(tmp_path, tok, hf_cache, kind):
    """HuggingFaceH4/ultrafeedback_binarized: ``prompt`` a string that repeats the user turn of the
    whole conversations in ``chosen``/``rejected`` (TRL reads the conversations); and a string
    prompt beside assistant replies alone (the prompt is the user's turn). Both as the explicit form."""
    explicit = [conversational(i) for i in range(3)]
    ultrafeedback = [{"prompt": r["prompt"][0]["content"], "prompt_id": str(i), "score_chosen": 8.0,
                      "chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                     for i, r in enumerate(explicit)]
    replies_only = [{**r, "prompt": r["prompt"][0]["content"]} for r in explicit]
    loaded = []
    for name, rows in (("explicit", explicit), ("ultrafeedback", ultrafeedback), ("replies", replies_only)):
        train, _, report = load_splits(cfg(write_jsonl(tmp_path / f"{name}.jsonl", rows)), tok, kind)
        assert report["train"]["kept"] == 3, (name, report["train"])
        loaded.append([{k: v for k, v in vars(e).items() if k != "example_id"} for e in train])
    assert loaded[0] == loaded[1] == loaded[2]


NO_SYSTEM_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                      "supported') }}{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")
"""Gemma's and Mistral's templates refuse a system message this way (``raise_exception``)."""


@pytest.mark.parametrize("system_prompt, kind", [(None, "preference"), ("Be brief.", "preference"),
                                                 ("Be brief.", "sft")])
def test_a_template_that_refuses_the_messages_stops_the_run_naming_the_row(tmp_path, hf_cache, system_prompt, kind):
    strict = build_byte_tokenizer()
    strict.chat_template = NO_SYSTEM_TEMPLATE
    rows = [conversational(i) for i in range(4)]
    rows[2]["prompt"] = [{"role": "system", "content": "Answer in one word."}, *rows[2]["prompt"]]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    row = 2 if system_prompt is None else 0
    hint = r" \(dataset.system_prompt adds a system message to every row\)" if system_prompt else ""
    with pytest.raises(DataError, match=rf"dataset '{path}' row {row}: the chat template refused its messages: "
                                        rf"System role not supported; change the rows{hint} or the template "
                                        r"\(chat_template, or tokenizer_name\)"):
        load_splits(cfg(path, val_ratio=0.0, system_prompt=system_prompt), strict, kind)
    rows[2]["prompt"] = rows[2]["prompt"][1:]
    write_jsonl(path, rows)
    if system_prompt is None:
        train, _, _ = load_splits(cfg(path, val_ratio=0.0), strict, kind)
        assert len(train) == 4


def test_columns_map_other_names(tmp_path, tok, hf_cache):
    rows = [{"question": f"Reverse: w{i} =", "response_j": f" {i}w", "response_k": " no"} for i in range(4)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    mapped = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    train, _, _ = load_splits(cfg(path, columns=mapped), tok, "preference")
    assert len(train) == 4 and decode(tok, train[0].chosen_ids) == " 0w</s>"
    with pytest.raises(DataError, match=r"dataset.columns.chosen = 'answer', but there is no column 'answer'"):
        load_splits(cfg(path, columns={"chosen": "answer"}), tok, "preference")
    with pytest.raises(DataError, match=r"expected columns chosen and rejected .*map other names with dataset.columns"):
        load_splits(cfg(path), tok, "preference")


def test_dataset_options_are_validated():
    with pytest.raises(ConfigError, match="columns: unknown field.* answer; expected prompt, chosen, rejected, "
                                          "messages, system"):
        validate_as(DatasetConfig, {"dataset_name": "d", "columns": {"answer": "a"}}, source="f")
    with pytest.raises(ConfigError, match="system_prompt applies to conversational rows"):
        validate_as(DatasetConfig, {"dataset_name": "d", "format": "text", "system_prompt": "x"}, source="f")
    with pytest.raises(ConfigError, match="columns.system applies to conversational rows; format = 'text' has none"):
        validate_as(DatasetConfig, {"dataset_name": "d", "format": "text", "columns": {"system": "s"}}, source="f")


def examples(rows):
    return [{k: v for k, v in vars(e).items() if k != "example_id"} for e in rows]


@pytest.mark.parametrize("kind", ["preference", "sft"])
def test_text_rows_with_a_system_column_render_with_the_template(tmp_path, tok, hf_cache, kind):
    """Intel/orca_dpo_pairs (system, question, chosen, rejected as strings) and Open-Orca's SFT rows
    (system_prompt, question, response): the question is the user's turn, the replies the
    assistant's, the system text the row's system message; a blank one is no message, and
    ``dataset.system_prompt`` fills it. Equal to the same rows written as messages."""
    system = ["You are an AI assistant.", "", "Answer briefly."]
    orca = [{"system": s, "question": f"Reverse: w{i}", "chosen": f"{i}w", "rejected": "nope"}
            for i, s in enumerate(system)]
    mapped = {"prompt": "question"}
    if kind == "sft":
        orca = [{"system_prompt": r["system"], "question": r["question"], "response": r["chosen"]} for r in orca]
        mapped = {"prompt": "question", "chosen": "response", "system": "system_prompt"}
    as_messages = [{**conversational(i), "prompt": [{"role": "system", "content": s}] * bool(s) + [
        user(f"Reverse: w{i}")]} for i, s in enumerate(system)]
    path = write_jsonl(tmp_path / "orca.jsonl", orca)
    train, _, report = load_splits(cfg(path, columns=mapped), tok, kind)
    assert report["train"]["kept"] == 3
    expected, _, _ = load_splits(cfg(write_jsonl(tmp_path / "m.jsonl", as_messages)), tok, kind)
    assert examples(train) == examples(expected)
    filled, _, _ = load_splits(cfg(path, columns=mapped, system_prompt="Be brief."), tok, kind)
    as_messages[1]["prompt"].insert(0, {"role": "system", "content": "Be brief."})
    expected, _, _ = load_splits(cfg(write_jsonl(tmp_path / "m.jsonl", as_messages)), tok, kind)
    assert examples(filled) == examples(expected)
    assert examples(filled)[0] == examples(train)[0]  # a row's own system message wins
    strict = build_byte_tokenizer()
    strict.chat_template = NO_SYSTEM_TEMPLATE
    with pytest.raises(DataError, match=r"row 0: the chat template refused its messages: System role not supported; "
                                        r"change the rows \(its system column adds a system message\) or"):
        load_splits(cfg(path, columns=mapped), strict, kind)


def test_text_prompt_and_replies_read_through_the_template_when_asked(tmp_path, tok, hf_cache):
    """Prompt/completion strings for an instruct model: ``format = "conversational"`` renders them as
    a user turn and assistant replies; ``auto`` keeps them text (TRL's standard format), and
    ``text`` says that it leaves a system column unread."""
    rows = [{"prompt": f"Reverse: w{i}", "chosen": f"{i}w", "rejected": "nope"} for i in range(3)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    chat, _, _ = load_splits(cfg(path, format="conversational"), tok, "preference")
    expected, _, _ = load_splits(cfg(write_jsonl(tmp_path / "m.jsonl", [conversational(i) for i in range(3)])),
                                 tok, "preference")
    assert examples(chat) == examples(expected)
    text, _, _ = load_splits(cfg(path), tok, "preference")
    assert decode(tok, text[0].prompt_ids + text[0].chosen_ids) == "<s>Reverse: w00w</s>"
    said = []
    write_jsonl(path, [{**row, "system": "Be brief."} for row in rows])
    as_text, _, _ = load_splits(cfg(path, format="text"), tok, "preference", say=said.append)
    assert examples(as_text) == examples(text)
    assert said[0] == (f"note: dataset '{path}': its system column is not read: format = 'text' renders no chat "
                       "template to put a system message in ('auto' or 'conversational' would)")


@pytest.mark.parametrize("kind", ["preference", "sft"])
def test_sharegpt_messages_and_text_parts_read_as_trls(tmp_path, tok, hf_cache, kind):
    """axolotl users' SFT data: ``conversations`` of ``{"from": "human" | "gpt", "value": ...}``."""
    def sharegpt(messages):
        names = {"user": "human", "assistant": "gpt", "system": "system"}
        return [{"from": names[m["role"]], "value": m["content"]} for m in messages]

    trl = [{**conversational(i), "messages": conversational(i)["prompt"] + conversational(i)["chosen"]}
           for i in range(3)]
    trl[1]["prompt"] = [{"role": "system", "content": "Be brief."}, *trl[1]["prompt"]]
    theirs = [{"conversations": sharegpt(r["messages"]), **{k: sharegpt(r[k]) for k in ("prompt", "chosen", "rejected")}}
              for r in trl]
    loaded = []
    for name, rows, columns in (("trl", trl, {}), ("sharegpt", theirs, {"messages": "conversations"})):
        train, _, report = load_splits(cfg(write_jsonl(tmp_path / f"{name}.jsonl", rows), columns=columns), tok, kind)
        assert report["train"]["kept"] == 3, (name, report["train"])
        loaded.append([{k: v for k, v in vars(e).items() if k != "example_id"} for e in train])
    assert loaded[0] == loaded[1]
    with pytest.raises(DataError, match=r"map other names with dataset.columns = \{ messages = \"conversations\" \} "
                                        r"for ShareGPT rows"):
        load_splits(cfg(write_jsonl(tmp_path / "only.jsonl", [{"conversations": r["conversations"]} for r in theirs])),
                    tok, "sft")
    parts = [{**r, "messages": [{"role": m["role"], "content": [{"type": "text", "text": m["content"][:2]},
                                                                 {"type": "text", "text": m["content"][2:]}]}
                                for m in r["messages"]]} for r in trl]
    train, _, _ = load_splits(cfg(write_jsonl(tmp_path / "parts.jsonl", parts)), tok, "sft")
    if kind == "sft":  # content as text parts, joined
        assert [{k: v for k, v in vars(e).items() if k != "example_id"} for e in train] == loaded[0]
    image = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]},
                           {"role": "assistant", "content": "y"}]}]
    with pytest.raises(DataError, match="not_messages=1"):
        load_splits(cfg(write_jsonl(tmp_path / "image.jsonl", image)), tok, "sft")
    unknown = [{"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}]
    with pytest.raises(DataError, match="not_messages=1"):
        load_splits(cfg(write_jsonl(tmp_path / "unknown.jsonl", unknown), columns={"messages": "conversations"}),
                    tok, "sft")
