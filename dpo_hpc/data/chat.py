"""Conversational rows (lists of ``{role, content}`` messages, TRL's format) -> the strings and
assistant spans the tokenizer sees, rendered with the tokenizer's chat template.

A preference row has ``prompt`` (messages) and ``chosen``/``rejected`` (the assistant reply, one
or more messages), or no prompt and ``chosen``/``rejected`` as whole conversations that share
every message but the last (the implicit prompt); a text ``prompt`` beside them is the user's turn
of replies alone, and beside whole conversations repeats theirs (UltraFeedback-binarized); text
replies beside a prompt are the assistant's (Orca's strings, read through the template). An SFT
row has ``messages`` (or a conversational ``prompt`` + ``chosen``); an unpaired (KTO) row a
``prompt`` and one ``completion`` with its ``label``. ShareGPT's messages
(``{"from": "human" | "gpt", "value": ...}``) read as TRL's. A row's ``system`` text is its system
message, put first unless its messages have one. The prompt is the template's
rendering with the generation prompt, a completion is what the full conversation's rendering adds
after it, and an SFT conversation's trained spans are what each assistant message adds to the
rendering before it: all read from the template itself, never from role names in the text. A
rendering that is not an extension of the previous one (a template that rewrites history) drops
the row, counted.
"""

from __future__ import annotations

from typing import Any, Optional

from .hh import (EMPTY_PROMPT, EMPTY_RESPONSE, IDENTICAL_RESPONSES, MISSING_FIELD, NO_ASSISTANT_TURN, NOT_BOOL_LABEL,
                 PROMPT_MISMATCH, LabelledCompletion, PreferencePair, RenderedConversation, row_label)

NOT_MESSAGES = "not_messages"
TEMPLATE_NOT_PREFIX = "template_not_prefix"
ROLES = ("system", "user", "assistant")
ROLE_NAMES = {**{role: role for role in ROLES}, "human": "user", "gpt": "assistant"}
"""Roles by the names datasets give them: TRL's, and ShareGPT's (``{"from": "human" | "gpt",
"value": ...}`` messages, the SFT format axolotl users bring), which read as TRL's."""


def is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value)


def _text(content: Any) -> Optional[str]:
    """A message's text: a string, or content parts that are all text (``[{"type": "text", "text":
    ...}]``, the multimodal form text-only rows sometimes take); None for anything else (an image)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in content):
        return "".join(part["text"] for part in content)
    return None


def standard_messages(value: Any) -> Any:
    """A list of messages as plain ``{role, content}`` dicts with TRL's role names and text content
    (ShareGPT's ``{from, value}`` and text-only content parts converted); anything else as it is,
    for ``_messages`` to drop."""
    if not isinstance(value, list):
        return value
    messages = []
    for message in value:
        if not isinstance(message, dict):
            return value
        role, content = message.get("role", message.get("from")), _text(message.get("content", message.get("value")))
        if role not in ROLE_NAMES or content is None:
            return value
        messages.append({"role": ROLE_NAMES[role], "content": content})
    return messages


def _standard_row(row: dict[str, Any], replies: tuple[str, ...] = ("chosen", "rejected")) -> dict[str, Any]:
    """The row's messages in TRL's form, and text replies beside a prompt as the assistant's messages."""
    row = {key: standard_messages(value) for key, value in row.items()}
    if row.get("prompt") is not None:
        for key in replies:
            if isinstance(row.get(key), str):
                row[key] = [{"role": "assistant", "content": row[key]}]
    return row


def row_system(row: dict[str, Any]) -> Optional[str]:
    """The row's own system message (its ``system`` column), if it has a non-blank one."""
    system = row.get("system")
    return system if isinstance(system, str) and system.strip() else None


def _messages(row: dict[str, Any], *keys: str) -> Optional[str]:
    """Drop reason if a field is missing or not a list of {role, content} messages."""
    for key in keys:
        if row.get(key) is None:
            return MISSING_FIELD
    return None if all(is_messages(row[key]) for key in keys) else NOT_MESSAGES


def with_system(messages: list[dict], system_prompt: Optional[str]) -> list[dict]:
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


class TemplateRefused(ValueError):
    """The chat template raised on a row's messages (its ``raise_exception``: a system message it
    does not take, roles that do not alternate): a mismatch of template and data, not a bad row."""


class ChatRenderer:
    """The tokenizer's chat template, applied the same way for every row."""

    def __init__(self, tokenizer, system_prompt: Optional[str] = None):
        from jinja2 import TemplateError  # what transformers' template rendering raises

        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self._template_error = TemplateError

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except self._template_error as exc:
            raise TemplateRefused(str(exc)) from None

    def preference(self, row: dict[str, Any]) -> tuple[Optional[PreferencePair], Optional[str]]:
        """A conversational preference row -> (pair of strings, None) or (None, drop reason)."""
        row = _standard_row(row)
        text_prompt = isinstance(row.get("prompt"), str)
        if row.get("prompt") is not None and not text_prompt:
            problem = _messages(row, "prompt", "chosen", "rejected")
            if problem:
                return None, problem
            prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        elif text_prompt and is_messages(row.get("chosen")) and row["chosen"][0]["role"] == "assistant":
            problem = _messages(row, "chosen", "rejected")  # replies alone: the text prompt is the user's turn
            if problem:
                return None, problem
            prompt = [{"role": "user", "content": row["prompt"]}]
            chosen, rejected = row["chosen"], row["rejected"]
        else:  # implicit prompt: every message but the last one is shared. A text prompt beside whole
            # conversations repeats their user turn (UltraFeedback-binarized); TRL reads the conversations too
            problem = _messages(row, "chosen", "rejected")
            if problem:
                return None, problem
            whole_chosen, whole_rejected = row["chosen"], row["rejected"]
            prompt, chosen, rejected = whole_chosen[:-1], whole_chosen[-1:], whole_rejected[-1:]
            if whole_rejected[:-1] != prompt:
                return None, PROMPT_MISMATCH
        if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
            return None, EMPTY_PROMPT
        if not all(m["role"] == "assistant" for m in chosen + rejected):
            return None, NOT_MESSAGES
        if not "".join(m["content"] for m in chosen).strip() or not "".join(m["content"] for m in rejected).strip():
            return None, EMPTY_RESPONSE
        if chosen == rejected:
            return None, IDENTICAL_RESPONSES
        rendered = self._completions(row, prompt, (chosen, rejected))
        if isinstance(rendered, str):
            return None, rendered
        return PreferencePair(rendered[0], *rendered[1], add_eos=False), None

    def unpaired(self, row: dict[str, Any]) -> tuple[Optional[LabelledCompletion], Optional[str]]:
        """A conversational unpaired row (``prompt`` messages or text, ``completion`` messages or
        text, a bool ``label``) -> (labelled completion, None) or (None, drop reason)."""
        row = _standard_row(row, replies=("completion",))
        if row.get("label") is None:
            return None, MISSING_FIELD
        label = row_label(row)
        if label is None:
            return None, NOT_BOOL_LABEL
        if isinstance(row.get("prompt"), str):  # a text prompt is the user's turn
            row = {**row, "prompt": [{"role": "user", "content": row["prompt"]}]}
        problem = _messages(row, "prompt", "completion")
        if problem:
            return None, problem
        prompt, completion = row["prompt"], row["completion"]
        if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
            return None, EMPTY_PROMPT
        if not all(m["role"] == "assistant" for m in completion):
            return None, NOT_MESSAGES
        if not "".join(m["content"] for m in completion).strip():
            return None, EMPTY_RESPONSE
        rendered = self._completions(row, prompt, (completion,))
        if isinstance(rendered, str):
            return None, rendered
        return LabelledCompletion(rendered[0], rendered[1][0], label, add_eos=False), None

    def _completions(self, row: dict[str, Any], prompt: list[dict],
                     replies: tuple[list[dict], ...]) -> tuple[str, list[str]] | str:
        """(the prompt's rendering with the generation prompt, what each reply's full rendering adds
        after it), or the drop reason of a template whose full rendering does not extend the prompt's."""
        prompt = with_system(prompt, row_system(row) or self.system_prompt)
        prompt_text = self.render(prompt, generation_prompt=True)
        completions = []
        for reply in replies:
            full = self.render(prompt + reply)
            if not full.startswith(prompt_text):
                return TEMPLATE_NOT_PREFIX
            completions.append(full[len(prompt_text):])
        return prompt_text, completions

    def conversation(self, messages: list[dict], assistant_turns: str, system: Optional[str] = None,
                     ) -> tuple[Optional[RenderedConversation], Optional[str]]:
        """Messages -> (text with the spans of its assistant replies, None) or (None, drop reason);
        ``system``: the row's own system message, first unless the messages have one.
        A reply's span runs from the end of the rendering with the generation prompt before it to
        the end of the rendering that includes it (its end-of-turn tokens are trained too)."""
        messages = list(messages)
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()  # a trailing user turn has no reply to learn
        if not messages:
            return None, NO_ASSISTANT_TURN
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            return None, EMPTY_PROMPT
        if not messages[-1]["content"].strip():
            return None, EMPTY_RESPONSE
        messages = with_system(messages, system or self.system_prompt)
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if assistant_turns == "last":
            replies = replies[-1:]
        text = self.render(messages)
        spans = []
        for i in replies:
            before = self.render(messages[:i], generation_prompt=True)
            through = self.render(messages[:i + 1])
            if not (text.startswith(through) and through.startswith(before)):
                return None, TEMPLATE_NOT_PREFIX
            spans.append((len(before), len(through)))
        return RenderedConversation(text, tuple(spans), add_eos=False), None

    def sft(self, row: dict[str, Any], assistant_turns: str) -> tuple[Optional[RenderedConversation], Optional[str]]:
        """An SFT row: ``messages``, or a conversational ``prompt`` + ``chosen``."""
        row = _standard_row(row)
        system = row_system(row)
        if row.get("messages") is not None:
            problem = _messages(row, "messages")
            return (None, problem) if problem else self.conversation(row["messages"], assistant_turns, system)
        if isinstance(row.get("prompt"), str):  # a text prompt beside conversational replies, as for preference
            problem = _messages(row, "chosen")
            if problem:
                return None, problem
            user = [{"role": "user", "content": row["prompt"]}] if row["chosen"][0]["role"] == "assistant" else []
            return self.conversation(user + row["chosen"], assistant_turns, system)
        keys = ("prompt", "chosen") if row.get("prompt") is not None else ("chosen",)
        problem = _messages(row, *keys)
        if problem:
            return None, problem
        return self.conversation([m for key in keys for m in row[key]], assistant_turns, system)
