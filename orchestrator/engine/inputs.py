"""What a run starts from, made local and identified for cache keys: the input model (its format told from its
files) and the data configs a step names (every file they read hashed by content)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from orchestrator.core.cache import Cache, stable_hash
from orchestrator.core.job import ModelArtifact
from orchestrator.core.secrets import split_secrets
from orchestrator.engine.data_paths import local_data_paths


def model_format(path: str | Path, *, has_adapter: bool = False) -> str:
    """hf, hf_adapter (a base + an adapter), onnx_genai (a genai_config.json beside the graph) or onnx."""
    path = Path(path)
    fmt = "hf_adapter" if has_adapter else "hf"
    if path.is_dir() and (path / "genai_config.json").exists():
        fmt = "onnx_genai"
    elif path.is_dir() and any(path.glob("*.onnx")) or str(path).endswith(".onnx"):
        fmt = "onnx"
    return fmt


def input_model(im: Any, *, base_dir: Path, cache: Cache, fetch: bool = True) -> tuple[ModelArtifact, str]:
    """The workflow's input model as an artifact, and its identity for cache keys (+ the adapter's content).
    A hub id is downloaded into the HF cache now, or (not `fetch`) left as its pinned hf:// reference."""
    from orchestrator.engine.resources import resolve_model_ref

    path, identity = resolve_model_ref(im.model_ref, base_dir=base_dir, cache=cache, fetch=fetch)
    adapter = getattr(im, "adapter_path", None)
    if adapter:
        p = Path(adapter).expanduser()
        adapter = str(p if p.is_absolute() else (base_dir / p).resolve())
        identity = stable_hash([identity, cache.content_hash(adapter)])
    art = ModelArtifact(
        format=model_format(path, has_adapter=bool(adapter)),
        path=str(path),
        adapter_path=adapter,
        task=im.task or "text-generation",
        trust_remote_code=bool(im.trust_remote_code),
    )
    return art, identity


LOCAL = "<local: hashed by content>"


def without_local_paths(cfg: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """The data config with every local path it reads replaced by a placeholder: those files are hashed by
    content, so a copied data folder (or a moved one) keys the same as the original."""
    written = {w for _, w, _ in local_data_paths(cfg, base_dir)}

    def strip(value: Any) -> Any:
        if isinstance(value, str) and value in written:
            return LOCAL
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        return value

    out = copy.deepcopy(cfg)
    load = out.get("load_dataset_config")
    if isinstance(load, dict):
        for key in ("data_files", "data_name", "data_dir"):
            if key in load:
                load[key] = strip(load[key])
    for key in ("user_script", "script_dir"):  # the script's content is hashed above; its folder is where it lies
        if out.get(key):
            out[key] = LOCAL
    return out


def data_files(
    data_configs: list[Any], *, base_dir: Path, cache: Cache, fetch: bool = True
) -> tuple[dict[str, dict[str, Any]], dict[str, str], list[str]]:
    """Json form of the data configs, local data paths to hand the job, and their content hashes. A hub dataset
    is downloaded into the HF cache now (its snapshot folder goes to the job), or (not `fetch`) handed over as its
    pinned hf:// reference; its identity is the commit and the files read."""
    from orchestrator.engine.resources import hub_dataset, resolve_data_files

    configs, files, hashes = {}, {}, []
    for dc in data_configs:
        cfg = dc.model_dump(mode="json")
        configs[dc.name] = cfg
        hub = hub_dataset(cfg, fetch=fetch)
        if hub is not None:
            files[dc.name], identity = hub
            hashes += [stable_hash(["hub", identity]), stable_hash(split_secrets(cfg)[0])]
            continue
        local = resolve_data_files(cfg, base_dir=base_dir, cache=cache)
        if local is not None:
            files[dc.name] = str(local)
            hashes.append(cache.content_hash(local))
        # every local file the config reads, whatever its form (a path, a list, globs, a folder), by content
        for fld, _, found in local_data_paths(cfg, base_dir):
            hashes.append(stable_hash([fld, [cache.content_hash(p) for p in found]]))
        if cfg.get("user_script"):  # the script's code makes the rows: a changed script is new data
            hashes.append(stable_hash(["user_script", cache.content_hash(Path(cfg["user_script"]))]))
        hashes.append(stable_hash(split_secrets(without_local_paths(cfg, base_dir))[0]))  # content, not place
    return configs, files, hashes
