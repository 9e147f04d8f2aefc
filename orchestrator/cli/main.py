"""`orch`: the command line's entry. The commands live by group (run, the Olive commands, cache, env, demo, ui,
generate, and cli.azure's Azure ML verbs); here they are registered in the order `orch --help` lists them, and
`run_cli` turns a command line into an exit code (root flags hoisted, usage errors as one line)."""

from __future__ import annotations

import os
import sys
from typing import Any

import typer

from orchestrator.cli.app import Verbosity, _say, app, out
from orchestrator.cli.azure import register as _register_azure
from orchestrator.cli.cache import cache_app
from orchestrator.cli.demo import demo, tiny_model
from orchestrator.cli.env import env_app
from orchestrator.cli.errors import _guarded, classify, error_line
from orchestrator.cli.generate import generate
from orchestrator.cli.olive import register as _register_olive
from orchestrator.cli.run import _run_workflow, run
from orchestrator.cli.ui import ui_command
from orchestrator.core.errors import EXIT_INTERRUPTED, EXIT_USAGE


def run_cli(argv: list[str] | None = None) -> int:
    """The CLI as a function: exit code out, every error one line (usage errors too, not click's box), never a
    traceback (an unexpected error is one line + a traceback file: classify)."""
    import signal

    try:  # typer >= 0.20 vendors click; its exceptions are not click's
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover - older typer
        from click import exceptions as cx

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = _hoist_root_flags(list(sys.argv[1:] if argv is None else argv))
    Verbosity.quiet = Verbosity.verbose = False  # run_cli called in-process (tests) starts from the defaults
    Verbosity.command = tuple(_command_words(argv))

    def on_term(signum: int, frame: Any) -> None:  # kill <pid>: stop the job and close the MLflow run KILLED
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGTERM) if threading_main() else None
    if previous is not None:
        signal.signal(signal.SIGTERM, on_term)
    try:
        from orchestrator.cli.olive import normalize

        argv = normalize(argv)  # Olive's list / optional-value flags
        rv = app(args=argv, standalone_mode=False, prog_name="orch")
    except cx.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # plain `orch`: the help, as click prints it
            print(exc.format_message())
            return exc.exit_code
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        error_line(exc.format_message() + hint)
        return EXIT_USAGE
    except cx.ClickException as exc:
        error_line(exc.format_message())
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):  # typer >= 0.26 keeps Abort in typer.exceptions
        error_line("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a command without its own guard: the same one-line mapping
        return int(classify(exc).exit_code)
    finally:
        if previous is not None:  # run_cli called in-process (tests) leaves the caller's handler as it was
            signal.signal(signal.SIGTERM, previous)
    return rv if isinstance(rv, int) else 0


ROOT_FLAGS = ("-q", "--quiet", "-v", "--verbose")


def _hoist_root_flags(argv: list[str]) -> list[str]:
    """`orch run -c wf.json -q` == `orch -q run -c wf.json`: -q/-v after the command move before it (the root
    options), unless that command declares the flag itself (run/demo's -v). Nothing after `--` moves."""
    cut = argv.index("--") if "--" in argv else len(argv)
    head, tail = argv[:cut], argv[cut:]
    if not any(a in ROOT_FLAGS for a in head[1:]):
        return argv
    words, command = _command_of(head)
    own = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} if words else set()
    moved = [a for a in head if a in ROOT_FLAGS and a not in own]
    return moved + [a for a in head if not (a in ROOT_FLAGS and a not in own)] + tail


def _command_words(argv: list[str]) -> list[str]:
    """`cache ls` of `orch -q cache ls --json`: the leading words that name a command or group."""
    return _command_of(argv)[0]


def _command_of(argv: list[str]) -> tuple[list[str], Any]:
    """(the words naming a command or group, that click command) for a command line: `cache ls` -> cache_ls."""
    command: Any = typer.main.get_command(app)
    words = []
    for word in (a for a in argv if not a.startswith("-")):
        sub = getattr(command, "commands", {}).get(word)
        if sub is None:
            break
        words.append(word)
        command = sub
    return words, command


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main() -> None:
    sys.exit(run_cli())


app.add_typer(cache_app, name="cache")
app.add_typer(env_app, name="env")
app.command(context_settings={"allow_extra_args": False})(run)
app.command()(generate)
app.command("tiny-model")(tiny_model)
app.command()(demo)
app.command("ui")(ui_command)
_register_olive(app, run_workflow=lambda wf, **kw: _run_workflow(wf, **kw), guarded=lambda fn: _guarded(fn),
                say=lambda text, **kw: _say(text, **kw), out=out)  # fmt: skip
_register_azure(app)


if __name__ == "__main__":
    main()
