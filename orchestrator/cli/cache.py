"""`orch cache ls | clean`: the content-addressed pass caches of one workflow or of those found below."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from orchestrator.cli.app import JsonOpt, _say, out
from orchestrator.cli.errors import _guarded, fail
from orchestrator.core.errors import EXIT_FAILED

cache_app = typer.Typer(help="The content-addressed pass cache.", no_args_is_help=True)


CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="a cache folder (default: ./.orch/cache, else every workflow cache in the folders below, 2 deep)",
    ),
]
CacheConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="use this workflow's cache (its engine.cache_dir)")
]


WorkspaceOpt = Annotated[
    bool, typer.Option("--workspace", help="the Azure ML workspace's cache (orch-cache/ in its default datastore)")
]
CACHE_HELP = (
    "a workflow's cache is its engine.cache_dir (default .orch/cache beside its config): "
    "`orch cache ls --config WF.json` or `--cache-dir DIR`"
)


def _cache_roots(cache_dir: Path | None, config: Path | None) -> list[Path]:
    """The caches a cache command acts on: --cache-dir, the --config workflow's, ./.orch/cache, or (from a folder
    above them, e.g. the repository's top) the .orch/cache folders of the workflows 1-2 folders below."""
    if cache_dir is not None and config is not None:
        raise fail("--cache-dir and --config: give one of them")
    if config is not None:
        from orchestrator.olive import load_workflow

        wf = load_workflow(config)
        root = Path(wf.engine.cache_dir or ".orch/cache").expanduser()
        return [root if root.is_absolute() else (Path(wf.base_dir) / root).resolve()]
    if cache_dir is not None:
        if not cache_dir.is_dir():
            what = "is a file" if cache_dir.exists() else "does not exist"
            raise fail(f"--cache-dir {cache_dir}: {what}; {CACHE_HELP}")
        if not (cache_dir / "runs").is_dir():
            raise fail(f"--cache-dir {cache_dir}: not an orch cache (no runs/ inside); {CACHE_HELP}")
        return [cache_dir.resolve()]
    here = Path(".orch/cache")
    if here.is_dir():
        return [here.resolve()]
    found = sorted({p.resolve() for pattern in ("*/.orch/cache", "*/*/.orch/cache") for p in Path().glob(pattern)})
    return [p for p in found if (p / "runs").is_dir()]


@cache_app.command("ls")
def cache_ls(
    cache_dir: CacheDirOpt = None,
    config: CacheConfigOpt = None,
    workspace: WorkspaceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """List cached pass outputs (key, pass, size, duration) of one cache or of the workflow caches found, or with
    --workspace the Azure ML workspace's; damaged
    entries too, marked so (`orch cache clean` removes them)."""
    from rich.table import Table

    from orchestrator.core.cache import Cache, folder_size

    if workspace:
        if cache_dir is not None or config is not None:
            raise fail("--workspace and --cache-dir/--config: give one of them (--workspace is the workspace's cache)")
        workspace_cache_ls(as_json)
        return
    roots = _cache_roots(cache_dir, config)
    if not roots:
        _say(f"no orch cache here (./.orch/cache does not exist, none in the folders below); {CACHE_HELP}")
    rows: list[dict[str, Any]] = []
    for root in roots:
        cache = Cache(root)
        for e in cache.entries():
            rows.append({
                "cache": str(root), "key": e.key, "pass": str(e.meta.get("pass", "")),
                "type": e.result.pass_type, "status": e.result.status.value,
                "size_bytes": folder_size(e.path), "duration_s": round(e.result.duration_s, 3),
            })  # fmt: skip
        for d in cache.damaged_entries():
            rows.append({
                "cache": str(root), "key": d.key, "pass": str(d.meta.get("pass", "")),
                "type": str(d.meta.get("pass_type", "")), "status": "damaged", "reason": d.reason,
                "size_bytes": folder_size(d.path), "duration_s": None,
            })  # fmt: skip
    if as_json:
        out.print_json(json.dumps(rows))
        return
    for root in roots:
        table = Table(title=f"cache {root}")
        for col in ("key", "pass", "type", "status", "size", "duration"):
            table.add_column(col)
        for r in (r for r in rows if r["cache"] == str(root)):
            damaged = r["status"] == "damaged"
            status = Text(f"damaged: {r['reason']}", style="red") if damaged else r["status"]
            duration = "" if damaged else f"{r['duration_s']:.1f}s"
            table.add_row(r["key"][:16], r["pass"], r["type"], status, f"{r['size_bytes'] / 1e6:.1f} MB", duration)
        out.print(table)


@cache_app.command("clean")
def cache_clean(
    cache_dir: CacheDirOpt = None,
    config: CacheConfigOpt = None,
    key: Annotated[str | None, typer.Option("--key", help="remove only entries whose key starts with this")] = None,
    workspace: WorkspaceOpt = False,
) -> None:
    """Remove cached pass outputs (all, or by key prefix) of the caches `orch cache ls` shows, damaged and
    quarantined entries included, or with --workspace of the Azure ML workspace's."""
    from orchestrator.core.cache import Cache

    if workspace:
        if cache_dir is not None or config is not None:
            raise fail("--workspace and --cache-dir/--config: give one of them (--workspace is the workspace's cache)")
        workspace_cache_clean(key or "")
        return
    roots = _cache_roots(cache_dir, config)
    if not roots:
        _say(f"no orch cache here; nothing removed ({CACHE_HELP})")
    for root in roots:
        cache = Cache(root)
        if key:
            n = sum(cache.remove(e.key) for e in cache.entries() if e.key.startswith(key))
            n += cache.remove_damaged(key)
        else:
            n = cache.clean()
        out.print(f"removed {n} cache entr{'y' if n == 1 else 'ies'} from {root}")


@cache_app.command("verify")
def cache_verify(cache_dir: CacheDirOpt = None, config: CacheConfigOpt = None) -> None:
    """Check every entry to the byte (each file's sha256 recorded when it was cached) of the caches `orch cache ls`
    shows; damaged entries are moved to quarantine (the next run computes them again) and the command exits 1."""
    from orchestrator.core.cache import Cache

    def go() -> None:
        roots = _cache_roots(cache_dir, config)
        if not roots:
            _say(f"no orch cache here; nothing verified ({CACHE_HELP})")
        any_damaged = False
        for root in roots:
            sound, damaged = Cache(root).verify()
            for d in damaged:
                out.print(
                    Text(f"damaged {d.key[:16]} ({d.meta.get('pass') or '?'}): {d.reason}; quarantined in {d.path}"),
                    highlight=False,
                )
            total = sound + len(damaged)
            out.print(f"verified {total} cache entr{'y' if total == 1 else 'ies'} in {root}: "
                      f"{sound} sound, {len(damaged)} damaged")  # fmt: skip
            any_damaged |= bool(damaged)
        if any_damaged:
            raise typer.Exit(EXIT_FAILED)

    _guarded(go)


# ---- the Azure ML workspace's cache (--workspace): the one arrow from this group to the Azure verbs
def _workspace_cache() -> Any:
    from orchestrator.cli.azure import _system
    from orchestrator.systems.azureml.workspace_cache import WorkspaceCache

    return WorkspaceCache.for_client(_system().ml)


def workspace_cache_ls(as_json: bool) -> None:
    """`orch cache ls --workspace`: every key under orch-cache/ of the workspace's default datastore."""

    def go() -> None:
        cache = _workspace_cache()
        rows = cache.status()
        if as_json:  # the rows of `orch cache ls --json`, plus the state and the bytes of kept checkpoints
            doc = [{"cache": cache.location, "key": r.key, "pass": r.pass_name, "type": r.pass_type, "state": r.state,
                    "why": r.why, "size_bytes": r.size, "checkpoint_bytes": r.partial, "committed_at": r.committed_at}
                   for r in rows]  # fmt: skip
            print(json.dumps(doc))
            return
        from rich.table import Table

        table = Table(title=f"workspace cache {cache.location}")
        for col in ("key", "pass", "type", "state", "size", "checkpoints"):
            table.add_column(col)
        for r in rows:
            state = r.state + (f" ({r.why})" if r.why else "")
            table.add_row(r.key[:16], r.pass_name, r.pass_type, state, f"{r.size / 1e6:.1f} MB",
                          f"{r.partial / 1e6:.1f} MB" if r.partial else "")  # fmt: skip
        out.print(table)

    from orchestrator.cli.azure import _guard

    _guard(go)


def workspace_cache_clean(key_prefix: str) -> None:
    """`orch cache clean --workspace [--key K]`: keys removed marker first, so no reader sees half an entry."""

    def go() -> None:
        n = _workspace_cache().clean(key_prefix)
        out.print(f"removed {n} workspace cache entr{'y' if n == 1 else 'ies'}")

    from orchestrator.cli.azure import _guard

    _guard(go)
