"""`orch generate`: a chat with an exported ONNX GenAI model, or one completion for scripts.

The model is loaded once; the conversation is kept and formatted as a whole each turn, in the form the model was
fine-tuned on when orch recorded one (core.prompt: orch_prompt.json beside the model, or the manifest), else with
the tokenizer's chat template, else as plain text. Tokens are printed as they are generated. Lines starting with
`/` are orch's commands (/help, /reset, /exit), never sent to the model.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from orchestrator.core.errors import UserError
from orchestrator.core.prompt import PromptFormat, read_prompt_format

Mode = Literal["trained", "chat", "raw"]
COMMANDS = {
    "/help": "this list",
    "/reset": "forget the conversation (the model stays loaded)",
    "/exit": "leave (also /quit, Ctrl-D)",
}


def recorded_format(model_dir: Path) -> PromptFormat | None:
    """The prompt format recorded for a model folder: its orch_prompt.json, else the manifest.json beside it."""
    found = read_prompt_format(model_dir)
    if found is not None:
        return found
    manifest = model_dir.parent / "manifest.json"
    try:
        recorded = json.loads(manifest.read_text()).get("prompt_format") if manifest.is_file() else None
        return PromptFormat.model_validate(recorded) if recorded else None
    except ValueError:
        return None


class ChatError(UserError):
    """A message the model cannot take (longer than its context): one line, exit 2 for --prompt."""


@dataclass
class Reply:
    text: str
    n_tokens: int
    seconds: float
    context_tokens: int  # the conversation the answer was generated from (history + this message)


@dataclass
class ChatSession:
    """One conversation: history of (message, answer) turns, formatted in `mode` for every new message."""

    model: Any  # passes.common.onnx_tools.GenaiModel
    mode: Mode
    prompt_format: PromptFormat | None
    max_new_tokens: int = 64
    search: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    dropped: int = 0  # turns dropped from the front to fit the context window

    def reset(self) -> None:
        self.history.clear()

    @property
    def trained_chat(self) -> bool:
        """The model was fine-tuned on chat-templated messages (so the chat template is the trained one)."""
        return self.prompt_format is not None and self.prompt_format.kind == "chat_template"

    def describe(self) -> str:
        """Which template is used, in one line."""
        if self.mode == "trained" or (self.mode == "chat" and self.trained_chat):
            assert self.prompt_format is not None
            return f"template: the one the model was fine-tuned with, {self.prompt_format.describe()}"
        if self.mode == "chat":
            return f"template: the tokenizer's chat template{self._trained_note()}"
        return f"template: none (--raw): the text goes to the model as typed{self._trained_note()}"

    def _trained_note(self) -> str:
        if self.prompt_format is None:
            return ""
        if self.prompt_format.answers:
            return f" (it was fine-tuned on {self.prompt_format.describe()}: leave out --chat/--raw to use that)"
        return " (the fine-tune's texts had no template)"

    def conversation_ids(self, message: str, history: list[tuple[str, str]]) -> list[int]:
        """Token ids of the whole conversation up to the model's answer to `message`."""
        m = self.model
        if self.mode == "trained":
            assert self.prompt_format is not None
            eos = m.eos_token_ids[:1]
            ids: list[int] = []
            for said, answered in history:  # as in training: each text, then EOS
                ids += m.encode(self.prompt_format.exchange(said, answered)) + eos
            return ids + m.encode(self.prompt_format.prompt(message))
        if self.mode == "chat":
            messages = [{"role": "system", "content": self.system}] if self.system else []
            for said, answered in history:
                messages += [{"role": "user", "content": said}, {"role": "assistant", "content": answered}]
            messages.append({"role": "user", "content": message})
            custom = self.prompt_format.template if self.trained_chat and self.prompt_format else None
            text = m.tokenizer.apply_chat_template(
                json.dumps(messages), template_str=custom, add_generation_prompt=True
            )
            return m.encode(text)
        return m.encode("".join(said + answered for said, answered in history) + message)

    def fit(self, message: str) -> list[int]:
        """The conversation's ids, oldest turns dropped until the answer fits the context window."""
        while True:
            ids = self.conversation_ids(message, self.history)
            if len(ids) + self.max_new_tokens <= self.model.context_length or not self.history:
                return ids
            self.history.pop(0)
            self.dropped += 1

    def reply(self, message: str, on_text: Callable[[str], None]) -> Reply:
        """Generate the answer to `message`, streaming its text to on_text; the turn joins the history."""
        ids = self.fit(message)
        room = self.model.context_length - len(ids)
        if room <= 0:
            raise ChatError(
                f"the message is {len(ids)} tokens; the model's context is {self.model.context_length} tokens"
            )
        started = time.perf_counter()
        tokens: list[int] = []
        for token, piece in self.model.stream(ids, min(self.max_new_tokens, room), **self.search):
            tokens.append(token)
            on_text(piece)
        seconds = time.perf_counter() - started
        text = self.model.decode(tokens)
        self.history.append((message, text))
        return Reply(text, len(tokens), seconds, len(ids))


def choose_mode(requested: bool | None, prompt_format: PromptFormat | None, has_chat_template: bool) -> Mode:
    """--chat / --raw when given; else the fine-tune's format, else the chat template, else plain text."""
    if requested is True:
        return "chat"
    if requested is False:
        return "raw"
    if prompt_format is not None and prompt_format.answers:
        return "trained"
    if prompt_format is not None and prompt_format.kind == "chat_template":
        return "chat"
    return "chat" if has_chat_template else "raw"


def chat_loop(session: ChatSession, *, out: TextIO, err: TextIO, read: Callable[[str], str] = input) -> None:
    """The interactive loop: readline editing and history where the platform has it, commands handled here,
    answers streamed; Ctrl-C stops an answer (or says how to leave), Ctrl-D leaves."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (input() gains line editing and history; absent on Windows)
    say = _writer(err)
    say(f"{session.describe()}\n/help for commands, /exit or Ctrl-D to leave\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            say("\n")
            return
        except KeyboardInterrupt:
            say("\n(/exit or Ctrl-D to leave)\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            command = text.split()[0].lower()
            if command in ("/exit", "/quit", "/bye"):
                return
            if command == "/reset":
                session.reset()
                say("(conversation cleared)\n")
            elif command in ("/help", "/?"):
                say("".join(f"  {name:<8} {what}\n" for name, what in COMMANDS.items()))
                say("  //text   sends '/text' to the model\n")
                say(f"  {session.describe()}; max_new_tokens {session.max_new_tokens}, {_sampling(session.search)}\n")
            else:
                say(f"unknown command {command}: /help lists them\n")
            continue
        message = line[1:] if text.startswith("//") else line
        dropped = session.dropped
        out.write("model> ")
        out.flush()
        try:
            reply = session.reply(message, _writer(out))
        except KeyboardInterrupt:
            out.write("\n")
            say("(answer stopped; it is not kept in the conversation)\n")
            continue
        except ChatError as exc:
            out.write("\n")
            say(f"orch: {exc}: a shorter message\n")
            continue
        out.write("\n")
        out.flush()
        if session.dropped > dropped:
            say(f"({session.dropped - dropped} oldest turn(s) dropped to fit the context window)\n")
        say(_stats(reply) + "\n")


def one_completion(session: ChatSession, prompt: str, *, out: TextIO, err: TextIO) -> Reply:
    """--prompt: the answer streamed to stdout, the template line and the numbers to stderr."""
    err.write(session.describe() + "\n")
    reply = session.reply(prompt, _writer(out))
    out.write("\n")
    out.flush()
    err.write(_stats(reply) + "\n")
    return reply


def _writer(stream: TextIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    return write


def _stats(reply: Reply) -> str:
    rate = reply.n_tokens / reply.seconds if reply.seconds > 0 else 0.0
    return f"{reply.n_tokens} tokens in {reply.seconds:.3f}s ({rate:.1f} tok/s); context {reply.context_tokens} tokens"


def _sampling(search: dict[str, Any]) -> str:
    if not search.get("do_sample"):
        return "greedy"
    keys = ("temperature", "top_p", "top_k", "random_seed")
    return "sampling " + " ".join(f"{k}={search[k]}" for k in keys if k in search)

