"""Artifact references -> local paths + identities for cache keys.

Local folders/files resolve in place (identity: their content hash). azureml://datastores/..., azureml://registries/...
and azureml:name:version references are immutable by version, so their identity is the reference itself; they are
downloaded once into the cache by orchestrator.systems.azureml.download when a local host needs their bytes.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

from orchestrator.core.cache import Cache
from orchestrator.core.errors import UserError

REMOTE_TYPES = {"azureml_registry_model", "azureml_datastore", "azureml_model", "azureml_data"}


class ResourceError(UserError):
    """A reference that cannot be resolved: one line naming the field and the fix."""


def _as_dict(ref: Any) -> Any:
    if hasattr(ref, "model_dump"):
        return ref.model_dump(mode="json", exclude_none=True)
    return ref


def is_remote(ref: Any) -> bool:
    ref = _as_dict(ref)
    if isinstance(ref, str):
        return ref.startswith("azureml:")
    return isinstance(ref, dict) and ref.get("type") in REMOTE_TYPES


def resolve_model_ref(ref: Any, *, base_dir: Path, cache: Cache, field: str = "input_model") -> tuple[str, str]:
    """(local path, identity) of the input model."""
    ref = _as_dict(ref)
    if is_remote(ref):
        from orchestrator.systems.azureml.download import download_reference

        return download_reference(ref, cache=cache, field=field)
    if isinstance(ref, dict):
        ref = ref.get("config", {}).get("path") or ref.get("path") or ref.get("model_path")
    if not ref:
        raise ResourceError(f"{field}: no model given (set model_path or hf_config.model_name to a local folder)")
    path = Path(str(ref)).expanduser()
    if not path.is_absolute():
        path = (base_dir / path).resolve()
    if not path.exists():
        raise ResourceError(
            f"{field}: model {str(ref)!r} not found at {path}; give a local folder with config.json and weights "
            "(no model hub is reachable from orch jobs), or an azureml:// reference"
        )
    return str(path), cache.content_hash(path)


def resolve_data_files(data_config: dict[str, Any], *, base_dir: Path, cache: Cache) -> Path | None:
    """The local file/folder a data config reads (data_files, or data_name when it is a path); None if neither."""
    params = data_config.get("load_dataset_config") or {}
    params = params.get("params", params)
    for key in ("data_files", "data_name", "data_dir"):
        value = params.get(key)
        if value is None:
            continue
        if is_remote(value):
            from orchestrator.systems.azureml.download import download_reference

            path, _ = download_reference(_as_dict(value), cache=cache, field=f"data_configs.{data_config.get('name')}")
            return Path(path)
        if isinstance(value, str) and glob.has_magic(value):
            return None  # a pattern: data.py expands it where the job runs (the engine hashes every match)
        if isinstance(value, str):
            p = Path(value).expanduser()
            p = p if p.is_absolute() else (base_dir / p)
            if p.exists():
                return p.resolve()
            if key == "data_files":
                raise ResourceError(
                    f"data_configs.{data_config.get('name')}.load_dataset_config.data_files: {value!r} not found "
                    f"(looked at {p})"
                )
    return None
