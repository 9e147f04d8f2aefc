"""Artifact references -> local paths + identities for cache keys.

Local folders/files resolve in place (identity: their content hash). azureml://datastores/..., azureml://registries/...
and azureml:name:version references are immutable by version, so their identity is the reference itself; they are
downloaded once into the cache by orchestrator.systems.azureml.download when a local host needs their bytes.
Hugging Face hub ids (a model id, a data config's data_name) are pinned to their commit (identity: hf://<id>@<sha>)
and downloaded into the HF cache before any compute (orchestrator.core.hub), unless `fetch` is False: the system
fetches them where the job runs (Azure ML), and the job carries the pinned hf:// reference.
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


def local_model_path(ref: Any) -> Any:
    """What a local model reference names, as written: its config.path, path or model_path (a dict) or itself."""
    if isinstance(ref, dict):
        return (ref.get("config") or {}).get("path") or ref.get("path") or ref.get("model_path")
    return ref


def resolve_model_ref(
    ref: Any, *, base_dir: Path, cache: Cache, field: str = "input_model", fetch: bool = True
) -> tuple[str, str]:
    """(local path, identity) of the input model; (hf:// reference, identity) for a hub id when not `fetch`."""
    ref = _as_dict(ref)
    if isinstance(ref, dict) and ref.get("type") == "hf_hub":
        return resolve_hub_model(ref["name"], ref.get("revision"), field=f"{field}.model_path", fetch=fetch)
    if is_remote(ref):
        from orchestrator.systems.azureml.download import download_reference

        return download_reference(ref, cache=cache, field=field)
    ref = local_model_path(ref)
    if not ref:
        raise ResourceError(f"{field}: no model given (set model_path or hf_config.model_name to a local folder)")
    path = Path(str(ref)).expanduser()
    if not path.is_absolute():
        path = (base_dir / path).resolve()
    if not path.exists():
        raise ResourceError(
            f"{field}: model {str(ref)!r} not found at {path}; give a local folder with config.json and weights "
            "or a Hugging Face hub id (org/name), or an azureml:// reference"
        )
    return str(path), cache.content_hash(path)


def resolve_hub_model(repo_id: str, revision: str | None, *, field: str, fetch: bool = True) -> tuple[str, str]:
    """A hub model id pinned to its commit; its config, weights and tokenizer in the HF cache when `fetch`."""
    from orchestrator.core import hub

    pinned, files = hub.pin(hub.HubRef(repo_id, "model", revision), field=field)
    wanted = hub.model_files(files)
    if not any(f.endswith((".safetensors", ".bin")) for f in wanted):
        raise ResourceError(
            f"{field}: model {repo_id} has no top-level weights (*.safetensors / *.bin) at {pinned.sha[:12]}; "
            "orch reads transformers checkpoints from the hub (an ONNX repo's folders: download it and give the folder)"
        )
    if not fetch:
        return pinned.uri, pinned.uri
    from orchestrator.engine.model_check import check_model_folder
    from orchestrator.engine.weights_check import machine_matches, remember_on_machine

    local = hub.fetch(pinned, wanted, field=field)
    matched = machine_matches()  # a hub snapshot checked once on this machine is not built on the meta device again
    check_model_folder(local, f"{field} ({repo_id} at {pinned.sha[:12]})", matched=matched)
    remember_on_machine(matched)
    return str(local), pinned.uri


def hub_dataset(data_config: dict[str, Any], *, fetch: bool = True) -> tuple[str, str] | None:
    """(local snapshot folder or hf:// reference, identity) of a data config whose data_name is a hub dataset id
    (subset, data_dir, data_files inside the repo as written); None for any other data config."""
    from orchestrator.core import hub

    params = data_config.get("load_dataset_config") or {}
    params = params.get("params", params)
    name = params.get("data_name")
    if not hub.is_dataset_id(name):
        return None
    field = f"data_configs.{data_config.get('name')}.load_dataset_config.data_name"
    pinned, files = hub.pin(hub.HubRef(name, "dataset", params.get("revision")), field=field)
    wanted = dataset_files(pinned, files, params, field=field)
    ref = hub.HubRef(pinned.repo_id, "dataset", pinned.revision, pinned.sha, tuple(wanted))
    if not fetch:
        return ref.uri, ref.uri
    return str(hub.fetch(pinned, wanted, field=field)), ref.uri


DATASET_META = ("README.md", ".huggingface.yaml", "dataset_infos.json")


def dataset_files(ref: Any, files: list[str], load: dict[str, Any], *, field: str) -> list[str]:
    """What loading one data config reads of a dataset repo: its data_files (repo paths or patterns) if given, else
    every data file of the config (subset) as `datasets` resolves it (all its splits: a local copy must hold each
    file its README names), plus the card and metadata files."""
    from orchestrator.core import hub

    meta = [f for f in files if f in DATASET_META]
    given = load.get("data_files")
    if given:
        values = given.values() if isinstance(given, dict) else [given]
        return meta + sorted({p for v in values for p in ([v] if isinstance(v, str) else v)})
    if hub.offline():
        return files  # the cached snapshot as it is
    import datasets

    try:
        builder = datasets.load_dataset_builder(
            ref.repo_id, load.get("subset"), revision=ref.sha, data_dir=load.get("data_dir")
        )
    except Exception as exc:  # datasets raises many kinds (ValueError for an unknown config, DataFilesNotFoundError)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ResourceError(f"{field}: dataset {ref.repo_id}: {first}") from None
    prefix = f"hf://datasets/{ref.repo_id}@{ref.sha}/"
    found = {str(f).removeprefix(prefix) for split in (builder.config.data_files or {}).values() for f in split}
    return meta + sorted(found)


def resolve_data_files(data_config: dict[str, Any], *, base_dir: Path, cache: Cache) -> Path | None:
    """The local file/folder a data config reads (data_files, or data_name when it is a path); None if neither
    (a hub dataset: hub_dataset)."""
    from orchestrator.core import hub

    params = data_config.get("load_dataset_config") or {}
    params = params.get("params", params)
    if hub.is_dataset_id(params.get("data_name")):
        return None  # data_files / data_dir are paths inside the hub repo
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
