"""Secret sources: a job carries a secret's *source* (a mounted file, a Key Vault reference), never its value;
the process that needs the value resolves it here. A secret the user wrote into a pass or data config (a hub
token in training_args) is taken out of the job spec the same way: a placeholder in the config, the value in a
private file the job reads (split_secrets / put_secret)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.core.errors import UserError


class SecretError(UserError):
    """A secret source orch cannot read: one line naming it."""


def resolve_secret(source: str) -> str:
    """A secret source is `file:<path>` (Docker mounts) or `keyvault:<vault_url>#<name>` (Azure ML identity)."""
    kind, _, ref = source.partition(":")
    if kind == "file":
        return Path(ref).read_text().strip()
    if kind == "keyvault":
        from azure.identity import DefaultAzureCredential
        from azure.keyvault.secrets import SecretClient

        vault_url, _, name = ref.partition("#")
        client = SecretClient(vault_url=vault_url, credential=DefaultAzureCredential())
        return client.get_secret(name).value or ""
    raise SecretError(f"unknown secret source kind {kind!r} (expected file: or keyvault:)")


# ---- secrets written into a config: taken out of the job spec, passed by reference -----------------------------
CONFIG_SECRET = "config:"  # Job.secrets name prefix: config:<section>:<dotted path> -> a source of the value


def split_secrets(obj: Any, path: str = "") -> tuple[Any, dict[str, str]]:
    """(obj with every string under a secret-looking key replaced by a placeholder, {dotted path: value}).
    A hub token in training_args must reach the pass, never job.json, the cache or MLflow (core.redact's keys)."""
    from orchestrator.core.redact import is_secret_key, redact

    found: dict[str, str] = {}
    if isinstance(obj, dict):
        out: dict[Any, Any] = {}
        for k, v in obj.items():
            where = f"{path}.{k}" if path else str(k)
            if is_secret_key(k) and isinstance(v, str) and v and not v.startswith(PLACEHOLDER):
                out[k] = f"{PLACEHOLDER}{where}>"
                found[where] = v
            else:
                out[k], inner = split_secrets(v, where)
                found.update(inner)
        return out, found
    if isinstance(obj, list):
        items = []
        for i, v in enumerate(obj):
            item, inner = split_secrets(v, f"{path}.{i}")
            items.append(item)
            found.update(inner)
        return items, found
    if isinstance(obj, str) and path and not obj.startswith(PLACEHOLDER) and redact(obj) != obj:
        # a credential inside a value (a SAS URL's sig=, user:password@): the rest, masked, still tells values apart
        found[path] = obj
        return f"{PLACEHOLDER}{path}> {redact(obj)}", found
    return obj, found


PLACEHOLDER = "<secret passed to the job by reference: "


def put_secret(obj: Any, dotted: str, value: str) -> Any:
    """A copy of obj with `value` at `dotted` (the inverse of split_secrets, in the job's own process)."""
    import copy

    out = copy.deepcopy(obj)
    node = out
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


def secret_files(values: dict[str, str], folder: Path) -> dict[str, str]:
    """Each value written to its own 0600 file in `folder` (a private temp folder of this run, never the
    cache): {name: "file:<path>"}, the sources a Job carries (Docker mounts them, the runner reads them)."""
    import os

    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    out = {}
    for i, (name, value) in enumerate(values.items()):
        path = folder / f"secret-{i}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value)
        out[name] = f"file:{path}"
    return out
