"""Which Azure ML workspace orch talks to, and a real MLClient for it.

Why a resolver: workflow files are shared between people and machines, so the workspace should not be repeated
in each of them. Every setting is taken from, in order: the workflow's `azureml_client` (system or top level) >
environment variables (AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, AZUREML_WORKSPACE_NAME, AZURE_KEYVAULT_URL,
ORCH_AZURE_CLOUD + ORCH_AZURE_CLOUD_METADATA) > the per-machine profile written by `orch config set`
(~/.config/orch/profile.json, or $ORCH_PROFILE).

Cloud metadata (sovereign clouds, or a local stand-in) is a JSON object with the SDK's keys (resource_manager,
active_directory, aml_resource_id, storage_endpoint, registry_discovery_endpoint, azure_portal), given inline or as
the path of a file holding it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.core.errors import UserError

PROFILE_KEYS = {
    "subscription_id": "Azure subscription id",
    "resource_group": "resource group of the workspace",
    "workspace_name": "Azure ML workspace name",
    "key_vault_url": "Key Vault URL holding secrets (https://<name>.vault.azure.net/)",
    "hf_token_secret_name": "name of the Hugging Face token secret in the Key Vault (default hf-token)",
    "compute": "default compute cluster for `orch submit` when the workflow names none",
    "experiment_name": "Azure ML experiment for submitted jobs (default orch)",
    "cloud": "cloud name (AzureCloud, AzureChinaCloud, AzureUSGovernment, or a custom one with cloud_metadata)",
    "cloud_metadata": "JSON (or the path of a JSON file) with the cloud's endpoints, for a custom cloud",
    "tenant_id": "Entra tenant id (optional)",
}
ENV_KEYS = {
    "subscription_id": "AZURE_SUBSCRIPTION_ID",
    "resource_group": "AZURE_RESOURCE_GROUP",
    "workspace_name": "AZUREML_WORKSPACE_NAME",
    "key_vault_url": "AZURE_KEYVAULT_URL",
    "hf_token_secret_name": "ORCH_HF_TOKEN_SECRET_NAME",
    "compute": "ORCH_AZURE_COMPUTE",
    "experiment_name": "ORCH_AZURE_EXPERIMENT",
    "cloud": "ORCH_AZURE_CLOUD",
    "cloud_metadata": "ORCH_AZURE_CLOUD_METADATA",
    "tenant_id": "AZURE_TENANT_ID",
}
CONFIG_KEYS = {"subscription_id", "resource_group", "workspace_name"}  # Olive's azureml_client fields we read
PUBLIC_AUTHORITIES = ("login.microsoftonline.com", "login.chinacloudapi.cn", "login.microsoftonline.us")


class WorkspaceError(UserError):
    """A workspace setting is missing or malformed: one line naming the setting and how to give it."""


def profile_path() -> Path:
    explicit = os.environ.get("ORCH_PROFILE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "orch" / "profile.json"


def read_profile(path: Path | None = None) -> dict[str, Any]:
    path = path or profile_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise WorkspaceError(f"{path}: not valid JSON ({exc}); fix or delete it, then `orch config set`") from None
    return data if isinstance(data, dict) else {}


def write_profile_value(key: str, value: str, path: Path | None = None) -> Path:
    """`orch config set KEY VALUE`: atomically update one key of the per-machine profile."""
    from orchestrator.core.fs import atomic_write_text

    if key.startswith("price."):  # price.<vm_size>[.low_priority]: USD per node-hour (systems/azureml/prices.py)
        from orchestrator.systems.azureml.prices import check_price_setting

        if value != "":
            value = str(check_price_setting(key, value))
    elif key not in PROFILE_KEYS:
        raise WorkspaceError(
            f"unknown setting {key!r}; known: {', '.join(PROFILE_KEYS)}, price.<vm_size>[.low_priority]"
        )
    if key == "cloud_metadata":
        _parse_metadata(value)  # refuse a bad one now, not at the next submit
    path = path or profile_path()
    data = read_profile(path)
    if value == "":
        data.pop(key, None)
    else:
        data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _parse_metadata(value: str | dict[str, Any] | None) -> dict[str, str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        return value
    text = value.strip()
    if not text.startswith("{"):
        p = Path(text).expanduser()
        if not p.is_file():
            raise WorkspaceError(f"cloud_metadata: {text!r} is neither JSON nor an existing file")
        text = p.read_text()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise WorkspaceError(f"cloud_metadata: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "resource_manager" not in data:
        raise WorkspaceError("cloud_metadata: expected a JSON object with at least resource_manager")
    return data


@dataclass(frozen=True)
class WorkspaceSettings:
    """Everything needed to reach one workspace. `sources` says where each value came from (for `config show`)."""

    subscription_id: str
    resource_group: str
    workspace_name: str
    key_vault_url: str | None = None
    hf_token_secret_name: str = "hf-token"
    compute: str | None = None
    experiment_name: str = "orch"
    cloud: str = "AzureCloud"
    cloud_metadata: dict[str, str] | None = None
    tenant_id: str | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def workspace_id(self) -> str:
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.MachineLearningServices/workspaces/{self.workspace_name}"
        )

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "sources"}


def resolve_settings(
    config: dict[str, Any] | None = None,
    *,
    environ: dict[str, str] | None = None,
    profile: dict[str, Any] | None = None,
) -> WorkspaceSettings:
    """config (azureml_client json form) > env vars > profile; raises WorkspaceError naming what is missing."""
    environ = dict(os.environ) if environ is None else environ
    profile = read_profile() if profile is None else profile
    config = {k: v for k, v in (config or {}).items() if v not in (None, "")}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in PROFILE_KEYS:
        if key in config and (key in CONFIG_KEYS or key == "keyvault_name"):
            values[key], sources[key] = config[key], "workflow config"
        elif environ.get(ENV_KEYS[key]):
            values[key], sources[key] = environ[ENV_KEYS[key]], f"${ENV_KEYS[key]}"
        elif profile.get(key) not in (None, ""):
            values[key], sources[key] = profile[key], f"profile {profile_path()}"
    if config.get("keyvault_name") and "key_vault_url" not in config:
        values["key_vault_url"] = f"https://{config['keyvault_name']}.vault.azure.net/"
        sources["key_vault_url"] = "workflow config (keyvault_name)"
    missing = [k for k in ("subscription_id", "resource_group", "workspace_name") if not values.get(k)]
    if missing:
        hint = "; ".join(f"`orch config set {k} ...` or ${ENV_KEYS[k]}" for k in missing)
        raise WorkspaceError(f"no Azure ML workspace {', '.join(missing)} given ({hint}, or azureml_client)")
    metadata = _parse_metadata(values.pop("cloud_metadata", None))
    cloud = values.pop("cloud", None) or ("OrchCustomCloud" if metadata else "AzureCloud")
    return WorkspaceSettings(cloud=cloud, cloud_metadata=metadata, sources=sources, **values)


# ---- clients -------------------------------------------------------------------------------------------
RETRY_SETTINGS: dict[str, Any] = {
    # azure-core RetryPolicy: 408/429/500/502/503/504 and connection/read errors, exponential backoff,
    # honouring Retry-After. Bounded so a dead endpoint fails in about a minute, not ten.
    "retry_total": 6,
    "retry_connect": 4,
    "retry_read": 4,
    "retry_status": 5,
    "retry_backoff_factor": 0.5,
    "retry_backoff_max": 20,
}


def make_credential() -> Any:
    """DefaultAzureCredential; with a non-public authority host (a sovereign cloud or a stand-in) the MSAL
    instance discovery against login.microsoftonline.com is turned off, as it cannot succeed there."""
    from azure.identity import DefaultAzureCredential

    authority = os.environ.get("AZURE_AUTHORITY_HOST", "")
    custom = bool(authority) and not any(h in authority for h in PUBLIC_AUTHORITIES)
    kwargs: dict[str, Any] = {"exclude_interactive_browser_credential": True}
    if custom:
        kwargs["disable_instance_discovery"] = True
        kwargs["additionally_allowed_tenants"] = ["*"]
    return DefaultAzureCredential(**kwargs)


def make_ml_client(settings: WorkspaceSettings, credential: Any = None, **kwargs: Any) -> Any:
    """A real MLClient for the workspace, with bounded transport retries (azure-core RetryPolicy settings)."""
    from azure.ai.ml import MLClient

    extra: dict[str, Any] = dict(RETRY_SETTINGS)
    if settings.cloud_metadata:
        extra.update(cloud=settings.cloud, cloud_metadata=settings.cloud_metadata)
    elif settings.cloud != "AzureCloud":
        extra["cloud"] = settings.cloud
    extra.update(kwargs)
    return MLClient(
        credential or make_credential(),
        settings.subscription_id,
        settings.resource_group,
        settings.workspace_name,
        **extra,
    )


def tracking_uri(ml_client: Any) -> str:
    """The workspace MLflow tracking URI in the https form plain mlflow accepts (azureml-mlflow not needed).

    azureml://<host>/mlflow/v1.0/<ws> -> https://<host>/mlflow/v2.0/<ws> (MLflow >= 2 speaks v2.0 there)."""
    env = os.environ.get("ORCH_AML_MLFLOW_URI")
    if env:
        return env
    ws = ml_client.workspaces.get(ml_client.workspace_name)
    uri = ws.mlflow_tracking_uri or ""
    m = re.match(r"^azureml://([^/]+)/mlflow/v1\.0(/.*)$", uri)
    if m:
        return f"https://{m[1]}/mlflow/v2.0{m[2]}"
    return uri


def mlflow_client(ml_client: Any, credential: Any = None) -> Any:
    """A plain MlflowClient against the workspace tracking server, authenticated with an AAD token."""
    import mlflow

    uri = tracking_uri(ml_client)
    if uri.startswith("https://") and not os.environ.get("MLFLOW_TRACKING_TOKEN"):
        cred = credential or getattr(ml_client, "_credential", None) or make_credential()
        scope = "https://management.azure.com/.default"
        try:
            from azure.ai.ml._azure_environments import _get_base_url_from_metadata

            scope = _get_base_url_from_metadata().rstrip("/") + "/.default"
        except Exception:  # noqa: BLE001 - the default scope works in the public cloud
            pass
        os.environ["MLFLOW_TRACKING_TOKEN"] = cred.get_token(scope).token
    return mlflow.MlflowClient(tracking_uri=uri)
