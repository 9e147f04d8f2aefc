"""How the workspace cache reaches its blob container: the workspace's default datastore, with the credentials the
SDK gets for it on the client (`datastores.get(include_secrets=True)`: listSecrets), and inside an Azure ML job the
same two REST calls made with the job's own identity (no secret travels in the job; where the identity may not list
the key, its own blob role)."""

from __future__ import annotations

import os
import re
from typing import Any

from orchestrator.systems.azureml.cache_blobs import CacheUnreadable
from orchestrator.systems.azureml.logstream import describe

DATASTORE_API = "2024-10-01-preview"  # what azure-ai-ml 1.35.2 sends for datastores (GET, listSecrets)
ENV_CACHE = "ORCH_WORKSPACE_CACHE"  # azureml://datastores/<ds>/paths/<prefix>/ : the driver job's cache location
ENV_ARM = "ORCH_ARM_ENDPOINT"  # the cloud's resource manager endpoint, for the job's own datastore lookup


def default_datastore(ml: Any, prefix: str) -> tuple[Any, str]:
    """(container, name) of the workspace's default datastore, with the credentials the SDK gets for it."""
    from orchestrator.systems.azureml.download import datastore_source

    try:
        name = ml.datastores.get_default().name
        src = datastore_source(ml, name, prefix)
    except Exception as exc:  # noqa: BLE001 - SDK/HTTP errors: one line
        raise CacheUnreadable(f"workspace cache: cannot open the default datastore: {describe(exc)}") from None
    return src.container, name


def job_datastore(location: str) -> tuple[Any, str, str]:
    """Inside an Azure ML job: (container, datastore, prefix) of `location` (azureml://datastores/<ds>/paths/<prefix>/),
    reached with the job's identity: GET the datastore and listSecrets, as the SDK does, else the identity itself."""
    import requests
    from azure.storage.blob import ContainerClient

    from orchestrator.systems.azureml.workspace import make_credential

    m = re.match(r"^azureml://datastores/([^/]+)/paths/(.+?)/?$", location)
    if not m:
        raise CacheUnreadable(f"{ENV_CACHE}: not an azureml://datastores/<name>/paths/<prefix> URI: {location!r}")
    datastore, prefix = m[1], m[2]
    arm = os.environ.get(ENV_ARM, "https://management.azure.com/").rstrip("/")
    ws = (f"/subscriptions/{os.environ['AZUREML_ARM_SUBSCRIPTION']}/resourceGroups/"
          f"{os.environ['AZUREML_ARM_RESOURCEGROUP']}/providers/Microsoft.MachineLearningServices/workspaces/"
          f"{os.environ['AZUREML_ARM_WORKSPACE_NAME']}")  # fmt: skip
    credential = make_credential()
    token = credential.get_token(arm + "/.default").token
    headers = {"Authorization": f"Bearer {token}"}
    url = f"{arm}{ws}/datastores/{datastore}"
    try:
        got = requests.get(url, params={"api-version": DATASTORE_API}, headers=headers, timeout=60)
        got.raise_for_status()
        props = got.json()["properties"]
        account_url = f"{props.get('protocol') or 'https'}://{props['accountName']}.blob.{props['endpoint']}"
        secret: Any = None
        if (props.get("credentials") or {}).get("credentialsType") in ("AccountKey", "Sas"):
            sec = requests.post(f"{url}/listSecrets", params={"api-version": DATASTORE_API}, headers=headers,
                                json={"expirableSecret": True, "expireAfterHours": 1}, timeout=60)  # fmt: skip
            if sec.status_code not in (401, 403):  # not allowed to read the key: the identity's own blob role
                sec.raise_for_status()
                body = sec.json()
                secret = body.get("key") or body.get("sasToken")
    except Exception as exc:  # noqa: BLE001 - one line, no URL query (no secret is in it anyway)
        raise CacheUnreadable(f"workspace cache: datastore {datastore}: {describe(exc)}") from None
    container = ContainerClient(account_url, props["containerName"], credential=secret or credential)
    return container, datastore, prefix
