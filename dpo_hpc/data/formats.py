"""Which parser a row goes through, by ``dataset.format``.

- ``text``: strings: HH transcripts in ``chosen``/``rejected`` (the prompt is everything up to the
  last assistant marker), or an explicit ``prompt`` with ``chosen``/``rejected`` completions
  joined as they are.
- ``conversational``: lists of ``{role, content}`` messages (TRL's format), rendered with the
  tokenizer's chat template; for SFT also ``messages``. A text prompt is the user's turn and text
  replies beside a prompt the assistant's, so prompt/completion strings meet an instruct model's
  template; a ``system`` column is each row's system message.
- ``auto`` (default): each row by its values: lists of messages, or a system column, are
  conversational; strings alone text.

Either way a preference row becomes a ``PreferencePair`` of strings, an unpaired (KTO) row
(``prompt``, ``completion``, bool ``label``) a ``LabelledCompletion`` and an SFT row a
``RenderedConversation`` (text and trained spans); tokenization does not know the format. KTO
also reads preference rows, each as a desirable and an undesirable completion.
"""

from __future__ import annotations

from typing import Any, Optional

from ..config import ROW_FIELDS
from .chat import NOT_MESSAGES, TEMPLATE_NOT_PREFIX, ChatRenderer, TemplateRefused, row_system
from .hh import DROP_REASONS as TEXT_DROP_REASONS
from .hh import parse_preference_row, parse_sft_row, parse_unpaired_row, with_margin
from .sources import DataError

DROP_REASONS = TEXT_DROP_REASONS + (NOT_MESSAGES, TEMPLATE_NOT_PREFIX)
"""Every reason a row is dropped, in the order the data report lists them."""


EXPECTED = {
    "text": "prompt/chosen/rejected as strings, or HH transcripts ('\\n\\nHuman: ... \\n\\nAssistant: ...') in "
            "chosen/rejected",
    "conversational": "prompt/chosen/rejected (for SFT: messages) as lists of {role, content} messages with roles "
                      "system, user, assistant, or a text prompt with text or message replies",
}


class RowParser:
    """Row -> (parsed, None) or (None, drop reason), for one kind ('sft', 'preference' or 'unpaired')."""

    def __init__(self, kind: str, fmt: str, tokenizer, dataset: str, system_prompt: Optional[str] = None,
                 assistant_turns: str = "all", margins: bool = False):
        self.kind, self.format, self.dataset = kind, fmt, dataset
        self.margins = margins  # read each preference row's margin column (a reward model's data)
        self.tokenizer, self.system_prompt, self.assistant_turns = tokenizer, system_prompt, assistant_turns
        self._chat: Optional[ChatRenderer] = None

    def format_of(self, row: dict[str, Any]) -> str:
        if self.format != "auto":
            return self.format
        # A system message has a place only in a chat template's rendering; a system column makes
        # every row conversational, blank ones too, so that all of a dataset's rows render alike.
        conversational = any(isinstance(row.get(k), list) for k in ROW_FIELDS) or isinstance(row.get("system"), str)
        return "conversational" if conversational else "text"

    @property
    def chat(self) -> ChatRenderer:
        if self._chat is None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise DataError(f"dataset '{self.dataset}' has conversational rows, but the tokenizer has no chat "
                                "template to render them; set chat_template, use a tokenizer with one "
                                "(tokenizer_name), or use text rows")
            self._chat = ChatRenderer(self.tokenizer, self.system_prompt)
        return self._chat

    def __call__(self, row: dict[str, Any], position: Optional[int] = None):
        """``position``: the row's place in the dataset, named if the chat template refuses it."""
        # KTO reads unpaired rows, and preference pairs as two of them (unpaired after tokenization)
        kind = "preference" if self.kind == "unpaired" and row.get("completion") is None else self.kind
        if self.format_of(row) != "conversational":
            parsed = {"preference": parse_preference_row, "unpaired": parse_unpaired_row,
                      "sft": lambda r: parse_sft_row(r, self.assistant_turns)}[kind](row)
            return with_margin(*parsed, row) if kind == "preference" and self.margins else parsed
        try:
            parsed = {"preference": self.chat.preference, "unpaired": self.chat.unpaired,
                      "sft": lambda r: self.chat.sft(r, self.assistant_turns)}[kind](row)
            return with_margin(*parsed, row) if kind == "preference" and self.margins else parsed
        except TemplateRefused as exc:  # every such row would fail alike: stop, not drop
            where = f" row {position}" if position is not None else ""
            system = (" (its system column adds a system message)" if row_system(row) else
                      " (dataset.system_prompt adds a system message to every row)" if self.system_prompt else "")
            raise DataError(f"dataset '{self.dataset}'{where}: the chat template refused its messages: {exc}; change "
                            f"the rows{system} or the template (chat_template, or tokenizer_name)") from None

    def expected(self) -> str:
        """What rows must look like, for an error about a split with no usable row."""
        unpaired = ("prompt and completion (strings, or messages) with a bool label (true/false or 1/0); or "
                    "preference rows, " if self.kind == "unpaired" else "")
        if self.format != "auto":
            return f"expected {unpaired}format '{self.format}': {EXPECTED[self.format]}"
        return f"expected {unpaired}" + "; or ".join(f"{name}: {text}" for name, text in EXPECTED.items())
