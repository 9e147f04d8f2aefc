"""Secret sources: a job carries a secret's *source* (a mounted file, a Key Vault reference), never its value;
the process that needs the value resolves it here."""

from __future__ import annotations

from pathlib import Path

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
