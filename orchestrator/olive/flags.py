"""Olive's command-line surface, 0.7 to 0.13: which flag table each Olive command orch runs has (COMMANDS), and
the Olive flags orch's own `run` also takes (RUN_FLAGS).

Every flag a released Olive CLI command takes is in its command's table (finetune_quantize_flags, export_flags,
adapter_flags, single_pass_flags, built on shared_flags) with its help text, so that `orch <command>` parses all of
them (never an unknown-flag error for a real Olive flag) and the command's builder (one module per command, named
in olive.commands.BUILDERS) decides for each one: honoured, accepted with a note saying why it changes nothing, or
refused in one line with what to use instead. The CLI builds its typer commands from COMMANDS (cli.olive); tests
walk them. The Olive commands orch does not run are in olive.unsupported.
"""

from __future__ import annotations

from orchestrator.olive.adapter_flags import CONVERT_ADAPTERS, EXTRACT_ADAPTERS, GENERATE_ADAPTER
from orchestrator.olive.export_flags import AUTO_OPT, CAPTURE, OPTIMIZE
from orchestrator.olive.finetune_quantize_flags import FINETUNE, QUANTIZE
from orchestrator.olive.flag_spec import OTHER, OUTPUT, Command, Flag
from orchestrator.olive.shared_flags import telemetry_flags
from orchestrator.olive.single_pass_flags import RUN_PASS, TUNE_SESSION_PARAMS

# `orch run` is orch's own command (typer, in cli.main); these are Olive's flags it also takes.
RUN_FLAGS = (
    Flag(
        "--list_required_packages",
        "list the environments and packages the workflow's passes need, and exit",
        kind="flag",
        group=OTHER,
        aliases=("--packages",),
    ),
    Flag(
        "--setup",
        "Olive 0.7-0.8: build the environments the passes need (side venvs on this host), and exit",
        kind="flag",
        group=OTHER,
    ),
    Flag("--tempdir", "root folder for temporary files", group=OTHER),
    Flag("--package-config", "refused: Olive's pass package registry; orch's passes are built in", group=OTHER),
    Flag("--model_name_or_path", "replace the workflow's input model", short="-m"),
    Flag("--output_path", "replace the workflow's output_dir", short="-o", group=OUTPUT),
    Flag("--task", "task of the replacing model (-m)", short="-t"),
    Flag("--trust_remote_code", "trust remote code of the replacing model (-m)", kind="flag"),
    Flag("--adapter_path", "adapter of the replacing model (-m)", short="-a"),
    Flag(
        "--test",
        "run on a random 2-layer copy of the input model (built once at DIR, default <output_dir>/test_model)",
        kind="optional",
        const="true",
    ),
    Flag("--model_script", "refused: PyTorch model-loader scripts are not run", group=OTHER),
    Flag("--script_dir", "refused with --model_script", group=OTHER),
    Flag("--log_level", "replace the workflow's log_severity_level", kind="int", group=OUTPUT),
    *telemetry_flags(),
)


def run_flag_help(name: str) -> str:
    """The help text of RUN_FLAGS' flag `name`: `orch run`'s typer options read it, so it is written once."""
    for flag in RUN_FLAGS:
        if flag.name == name:
            return flag.help
    raise KeyError(name)


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        FINETUNE,
        QUANTIZE,
        AUTO_OPT,
        OPTIMIZE,
        CAPTURE,
        GENERATE_ADAPTER,
        CONVERT_ADAPTERS,
        EXTRACT_ADAPTERS,
        TUNE_SESSION_PARAMS,
        RUN_PASS,
    )
}
