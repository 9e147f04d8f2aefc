"""`orch generate`: chat with (or answer one prompt of) an exported ONNX GenAI model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli.errors import _guarded, fail


def generate(
    model: Annotated[Path, typer.Option("--model", "-m", help="an ONNX GenAI model folder (output_dir/model)")],
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="one prompt, answered on stdout; without it, a chat")
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="most tokens to generate per answer")
    ] = 64,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--raw",
            help="--chat: the tokenizer's chat template; --raw: the text as typed (default: the template the model "
            "was fine-tuned with, recorded in the manifest, else the chat template)",
            show_default=False,
        ),
    ] = None,
    do_sample: Annotated[
        bool, typer.Option("--do-sample/--greedy", help="sample the next token, or take the likeliest (default)")
    ] = False,
    temperature: Annotated[float | None, typer.Option("--temperature", min=0.0, help="with --do-sample")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", min=0.0, max=1.0, help="with --do-sample")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, help="with --do-sample")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="random seed of --do-sample")] = None,
    system: Annotated[str | None, typer.Option("--system", help="a system message (chat template only)")] = None,
) -> None:
    """Chat with an exported ONNX model (onnxruntime-genai): history kept, tokens streamed, /help for commands;
    --prompt answers one prompt for scripts."""

    def go() -> None:
        from orchestrator.cli import chat as chat_ui
        from orchestrator.passes.common.onnx_tools import GenaiModel

        model_dir = model / "model" if (model / "model" / "genai_config.json").exists() else model
        if not (model_dir / "genai_config.json").exists():
            raise fail(
                f"--model {model}: no genai_config.json there; give an ONNX GenAI folder (an orch output_dir/model)"
            )
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "random_seed": seed}
        flags = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "random_seed": "--seed"}
        given = [flags[k] for k, v in sampling.items() if v is not None]
        if given and not do_sample:
            raise fail(f"{', '.join(given)} only change sampling: add --do-sample (greedy takes the likeliest token)")
        search: dict[str, Any] = {"do_sample": do_sample, **{k: v for k, v in sampling.items() if v is not None}}
        genai = GenaiModel(model_dir)  # loaded once for the whole conversation
        prompt_format = chat_ui.recorded_format(model_dir)
        mode = chat_ui.choose_mode(chat, prompt_format, genai.has_chat_template())
        if system and mode != "chat":
            raise fail("--system needs the chat template: add --chat")
        session = chat_ui.ChatSession(
            genai, mode, prompt_format, max_new_tokens=max_new_tokens, search=search, system=system
        )
        if prompt is not None:
            chat_ui.one_completion(session, prompt, out=sys.stdout, err=sys.stderr)
        else:
            chat_ui.chat_loop(session, out=sys.stdout, err=sys.stderr)

    _guarded(go)
