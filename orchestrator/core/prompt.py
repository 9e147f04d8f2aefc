"""The prompt format a model was fine-tuned with, kept beside the model so that generation speaks it.

A model fine-tuned on "### Text: {phrase}\\n### The tone is:\\n{tone}" answers that form, not the tokenizer's chat
template. The LoRA pass writes the format it trained on into its adapter folder (PROMPT_FILE); the engine carries
the latest one into the published model folder and the manifest; `orch generate` builds its prompts with it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from orchestrator.core.fs import atomic_write_text

PROMPT_FILE = "orch_prompt.json"
# A text_template's fields: "{column}" (names may hold spaces), "{{" and "}}" are literal braces.
TEMPLATE_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


class PromptFormat(BaseModel):
    """How the training texts were built from the data's columns.

    kind `text_template`: Olive's text_template; its last field is the answer, the text before it the prompt.
    kind `text_cols`: the columns joined by newlines; the last column is the answer.
    kind `chat_template`: each row's messages through a chat template (`template`: a custom one; None: the
    tokenizer's); generation applies the same template to the conversation.
    kind `text`: the texts were used as they are (no format is known: generation falls back to a chat template).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["text_template", "text_cols", "chat_template", "text"]
    template: str | None = None
    columns: list[str] = []
    source: str = ""  # where it was recorded, e.g. "LoRA pass 'lora', data config 'train'"

    @property
    def answers(self) -> bool:
        """True when a prompt/answer split is known (a template or columns with an answer column)."""
        if self.kind == "text_template":
            return bool(self.template and template_fields(self.template))
        return self.kind == "text_cols" and len(self.columns) >= 2

    def prompt(self, message: str) -> str:
        """The text the model saw before an answer, with `message` as the first input field."""
        return self._turn(message, None)

    def exchange(self, message: str, answer: str) -> str:
        """One whole training text: the prompt and its answer (a past turn of a conversation)."""
        return self._turn(message, answer)

    def _turn(self, message: str, answer: str | None) -> str:
        if self.kind == "text_cols" and self.answers:
            inputs = [message] + [""] * (len(self.columns) - 2)
            return "\n".join(inputs) + "\n" + (answer or "")
        if self.kind != "text_template" or not self.answers:
            return message + (answer or "")
        assert self.template is not None
        matches = [m for m in TEMPLATE_FIELD.finditer(self.template) if m.group(1) is not None]
        last = matches[-1]
        head = self.template[: last.start()] if answer is None else self.template
        first_input = matches[0] if len(matches) > 1 else None

        def field(m: re.Match[str]) -> str:
            if m.group(0) in ("{{", "}}"):
                return m.group(0)[0]
            if m.start() == last.start():
                return answer or ""
            return message if first_input is not None and m.start() == first_input.start() else ""

        return TEMPLATE_FIELD.sub(field, head)

    def describe(self) -> str:
        """One line for the user: what the prompt looks like around their message."""
        if self.kind == "chat_template":
            which = "a chat template of its own" if self.template else "the tokenizer's chat template"
            return which + (f" ({self.source})" if self.source else "")
        if not self.answers:
            return "the training texts had no recorded template"
        shown = self.prompt("<your message>")
        return f"{self.kind.replace('_', ' ')} {shown!r}" + (f" ({self.source})" if self.source else "")

    def write(self, folder: Path) -> Path:
        return atomic_write_text(folder / PROMPT_FILE, self.model_dump_json(indent=2) + "\n")


def template_fields(template: str) -> list[str]:
    """The field names of a text_template, in order ("{{" / "}}" are literal braces, not fields)."""
    return [m.group(1) for m in TEMPLATE_FIELD.finditer(template) if m.group(1) is not None]


def read_prompt_format(folder: Path | str) -> PromptFormat | None:
    """The format recorded in a model or adapter folder; None when there is none (or it cannot be read)."""
    path = Path(folder) / PROMPT_FILE
    if not path.is_file():
        return None
    try:
        return PromptFormat.model_validate(json.loads(path.read_text()))
    except (ValueError, OSError):
        return None
