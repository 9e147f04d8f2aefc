"""`orch env base | build | ls | rm`: the Docker environments (conda.yaml -> content-tagged images)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from orchestrator.cli.app import JsonOpt, _stream_line, out
from orchestrator.cli.errors import _guarded

env_app = typer.Typer(
    help="Docker environments: conda.yaml -> content-tagged images, reused without rebuilding.", no_args_is_help=True
)


@env_app.command("base")
def env_base(force: Annotated[bool, typer.Option("--force", help="rebuild even if the image exists")] = False) -> None:
    """Build orch's default base image locally (debootstrap + docker import); skipped when it exists."""

    def go() -> None:
        from orchestrator.systems.docker.images import build_base_image

        image_id = build_base_image(on_line=_stream_line, force=force)
        out.print(f"base image ready: {image_id[:19]}")

    _guarded(go)


@env_app.command("build")
def env_build(
    env: Annotated[str, typer.Argument(help="a conda.yaml path or an environment family (cpu-export, cpu-train, ...)")],
    base_image: Annotated[
        str | None, typer.Option("--base-image", help="image to build on (default: orch's base)")
    ] = None,
    installer: Annotated[str, typer.Option("--installer", help="auto | uv | pip")] = "auto",
) -> None:
    """Build (or reuse) the image of a conda.yaml; build output streams live."""

    def go() -> None:
        from orchestrator.systems.docker.images import DEFAULT_BASE_IMAGE, build_environment

        built = build_environment(
            env, base_image=base_image or DEFAULT_BASE_IMAGE, installer=installer, on_line=_stream_line
        )
        out.print(f"{built.tag} {'built' if built.built else 'reused (no build)'} in {built.seconds:.1f}s")

    _guarded(go)


@env_app.command("ls")
def env_ls(as_json: JsonOpt = False) -> None:
    """List the environment images orch built."""

    def go() -> None:
        from rich.table import Table

        from orchestrator.systems.docker.images import list_environments

        if as_json:
            out.print_json(json.dumps(list(list_environments()), default=str))
            return
        table = Table(title="orch environments")
        for col in ("tag", "env", "installer", "size", "file"):
            table.add_column(col)
        for row in list_environments():
            table.add_row(row["tag"], row["env"], row["installer"], f"{row['size_mb']} MB", row["file"])
        out.print(table)

    _guarded(go)


@env_app.command("rm")
def env_rm(name: Annotated[str, typer.Argument(help="image tag, environment name or hash prefix")]) -> None:
    """Remove environment images."""

    def go() -> None:
        from orchestrator.systems.docker.images import remove_environment

        removed = remove_environment(name)
        out.print("\n".join(removed) or "nothing removed")

    _guarded(go)
