"""The local paths a data config reads, as written and as found: data_files (a string, a list, {split: files},
globs), data_name or data_dir when they are paths. A hub dataset or a remote reference has none.

The pre-flight checks these files; inputs.py hashes them for cache keys and hands them to the job: both read
the same list from here.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

from orchestrator.core.job import is_uri
from orchestrator.schema.resources import REMOTE_TYPES


def hub_dataset_id(data_name: Any) -> bool:
    """data_name names a Hugging Face hub dataset (org/name), not a local path or a datasets builder."""
    from orchestrator.core.hub import is_dataset_id

    return is_dataset_id(data_name)


def local_data_paths(data_config: dict[str, Any], base_dir: Path) -> list[tuple[str, str, list[Path]]]:
    """(field, as written, local matches) for every local path a data config reads: data_files as a string, a
    list or globs, data_name or data_dir when they are paths. Remote references (a hub dataset's files
    included) are left out."""
    load = data_config.get("load_dataset_config") or {}
    out: list[tuple[str, str, list[Path]]] = []
    if hub_dataset_id(load.get("data_name")):
        return out
    files = load.get("data_files")
    if is_resource_dict(files):  # Olive's typed path ({"type": "azureml_datastore", ...}): not a split mapping
        local = (files.get("config") or files).get("path") if files["type"] in ("file", "folder") else None
        files = local if isinstance(local, str) else None
    groups = files.items() if isinstance(files, dict) else [("", files)]  # {split: file(s)}, a list, one file
    for split, group in groups:
        prefix = f"data_files.{split}" if split else "data_files"
        for i, value in enumerate(group if isinstance(group, list) else [group]):
            if not isinstance(value, str) or is_uri(value):
                continue
            name = prefix if not isinstance(group, list) else f"{prefix}[{i}]"
            out.append((name, value, _matches(value, base_dir)))
    for key in ("data_name", "data_dir"):
        value = load.get(key)
        if isinstance(value, str) and not is_uri(value):
            p = data_path(value, base_dir)
            if p.exists() or key == "data_dir" or value.startswith(("./", "../", "/", "~")):
                out.append((key, value, [p] if p.exists() else []))
    return out


RESOURCE_TYPES = frozenset({"file", "folder", "hf_hub", "azureml_data", *REMOTE_TYPES})


def is_resource_dict(value: Any) -> bool:
    """A resource written as Olive's typed dict (its "type" names a resource kind), not a {split: files} map."""
    return isinstance(value, dict) and isinstance(value.get("type"), str) and value["type"] in RESOURCE_TYPES


def data_path(value: str, base_dir: Path) -> Path:
    """A data path as written: ~ expanded, a relative one under the workflow's folder (links kept, as named)."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


def _matches(value: str, base_dir: Path) -> list[Path]:
    p = data_path(value, base_dir)
    if glob.has_magic(str(p)):
        return [Path(m) for m in sorted(glob.glob(str(p), recursive=True))]
    return [p] if p.exists() else []
