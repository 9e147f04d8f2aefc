"""ARM / MFE control-plane routes: workspace, environments, code snapshots, models, datastores, jobs, and the
registry MFE routes. Response shapes follow the service's own samples (shared/azureml-rest-examples)."""

from __future__ import annotations

import copy
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import state as st
from .azurite import ACCOUNT, ACCOUNT_KEY
from .web import Ctx, HttpError, Response, arm_error

if TYPE_CHECKING:
    from .server import StandIn
    from .web import Router

RP = "Microsoft.MachineLearningServices"
W = (
    r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.MachineLearningServices"
    r"/workspaces/(?P<ws>[^/]+)"
)
REG = (
    r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.MachineLearningServices"
    r"/registries/(?P<reg>[^/]+)"
)
# api-versions azure-ai-ml 1.35.2 sends (measured: tests/test_standin.py leaves request-log.json). Any other one
# fails with 400 and lands in unknown_requests: a new SDK release must be looked at, not silently accepted.
V_WS = {"2024-10-01-preview"}
V_ASSET = {"2023-04-01", "2023-04-01-preview", "2023-08-01-preview"}
V_JOB = {"2025-01-01-preview", "2024-01-01-preview", "2023-04-01-preview"}
V_DS = {"2024-10-01-preview"}
V_REG = {"2021-10-01-dataplanepreview"}
V_COMPUTE = {"2023-08-01-preview", "2024-04-01-preview"}
# The workspace's computes: (vm size, priority, max nodes). Low priority nodes can be preempted (`preempt`).
COMPUTES = {
    "cpu-cluster": ("Standard_DS3_v2", "Dedicated", 4),
    "cpu-lowpri": ("Standard_DS3_v2", "LowPriority", 4),
    "gpu-cluster": ("Standard_NC24ads_A100_v4", "Dedicated", 2),
}
# Job properties Azure ML lets a re-PUT change; any other difference is JobPropertyImmutable.
JOB_MUTABLE = ("tags", "description", "displayName", "properties")
KINDS = {"environments": "environments", "codes": "codes", "models": "models", "data": "data"}
# Properties that make a version immutable: a PUT with other values on an existing version is a 409.
IMMUTABLE = {
    "environments": ("image", "condaFile", "build", "inferenceConfig", "osType"),
    "codes": ("codeUri",),
    "models": ("modelUri", "modelType"),
    "data": ("dataUri", "dataType"),
}


# ---- helpers -------------------------------------------------------------------------------------------
def _check_ws(ctx: Ctx, m: re.Match[str]) -> None:
    if m["sub"] != st.SUBSCRIPTION:
        raise HttpError(404, "SubscriptionNotFound", f"The subscription '{m['sub']}' could not be found.")
    if m["rg"].lower() != st.RESOURCE_GROUP.lower():
        raise HttpError(404, "ResourceGroupNotFound", f"Resource group '{m['rg']}' could not be found.")
    if m["ws"].lower() != st.WORKSPACE.lower():
        raise HttpError(404, "ResourceNotFound", f"Workspace '{m['ws']}' could not be found.")


def ws_id(s: StandIn) -> str:
    return s.workspace_id


def _not_found(what: str) -> HttpError:
    return HttpError(404, "UserError", f"{what} could not be found.")


def workspace_body(s: StandIn) -> dict[str, Any]:
    rg = f"/subscriptions/{st.SUBSCRIPTION}/resourceGroups/{st.RESOURCE_GROUP}/providers"
    return {
        "id": s.workspace_id,
        "name": st.WORKSPACE,
        "type": f"{RP}/workspaces",
        "location": st.LOCATION,
        "kind": "Default",
        "tags": {},
        "identity": {"principalId": st.JOB_IDENTITY_CLIENT_ID, "tenantId": st.TENANT, "type": "SystemAssigned"},
        "sku": {"name": "Basic", "tier": "Basic"},
        "properties": {
            "friendlyName": st.WORKSPACE,
            "description": "orch local Azure ML stand-in",
            "storageAccount": f"{rg}/Microsoft.Storage/storageAccounts/{ACCOUNT}",
            "keyVault": f"{rg}/Microsoft.KeyVault/vaults/orchkv",
            "applicationInsights": f"{rg}/microsoft.insights/components/orchinsights",
            "containerRegistry": f"{rg}/Microsoft.ContainerRegistry/registries/orchacr",
            "discoveryUrl": f"{s.base_url}/discovery",
            "mlFlowTrackingUri": s.mlflow_azureml_uri,
            "workspaceId": "00000000-0000-0000-0000-0000000000e1",
            "hbiWorkspace": False,
            "provisioningState": "Succeeded",
            "publicNetworkAccess": "Enabled",
            "v1LegacyMode": False,
            "enableDataIsolation": False,
            "storageHnsEnabled": False,
            "privateLinkCount": 0,
            "allowPublicAccessWhenBehindVnet": False,
            "tenantId": st.TENANT,
            "notebookInfo": None,
            "serviceProvisionedResourceGroup": None,
        },
        "systemData": st.system_data("2025-01-01T00:00:00.000Z"),
    }


def datastore_body(s: StandIn, name: str, container: str, is_default: bool) -> dict[str, Any]:
    return {
        "id": f"{s.workspace_id}/datastores/{name}",
        "name": name,
        "type": f"{RP}/workspaces/datastores",
        "properties": {
            "description": None,
            "tags": {},
            "isDefault": is_default,
            "properties": {},
            "credentials": {"credentialsType": "AccountKey", "secrets": {"secretsType": "AccountKey"}},
            "datastoreType": "AzureBlob",
            "accountName": ACCOUNT,
            "containerName": container,
            "endpoint": s.azurite.storage_endpoint,
            "protocol": "https",
            "serviceDataAccessAuthIdentity": "None",
        },
        "systemData": st.system_data("2025-01-01T00:00:00.000Z"),
    }


def seed_workspace(s: StandIn) -> None:
    """Default datastores (workspaceblobstore = default, workspaceartifactstore) and their containers."""
    with s.state.lock:
        s.state.datastores["workspaceblobstore"] = datastore_body(s, "workspaceblobstore", st.BLOB_CONTAINER, True)
        s.state.datastores["workspaceartifactstore"] = datastore_body(
            s, "workspaceartifactstore", st.ARTIFACT_CONTAINER, False
        )
    for c in (st.BLOB_CONTAINER, st.ARTIFACT_CONTAINER):
        s.azurite.ensure_container(c)
    with s.state.lock:
        for name, (size, priority, nodes) in COMPUTES.items():
            s.state.computes[name] = compute_body(s, name, size, priority, nodes)


def compute_body(s: StandIn, name: str, vm_size: str, priority: str, max_nodes: int) -> dict[str, Any]:
    """An AmlCompute cluster, shaped like the service's sample (Compute/get/AmlCompute.json)."""
    return {
        "id": f"{s.workspace_id}/computes/{name}",
        "type": f"{RP}/workspaces/computes",
        "name": name,
        "location": st.LOCATION,
        "tags": {},
        "identity": None,
        "sku": None,
        "properties": {
            "description": None,
            "createdOn": "2026-01-01T00:00:00.0000000+00:00",
            "modifiedOn": "2026-01-01T00:00:00.0000000+00:00",
            "computeType": "AmlCompute",
            "computeLocation": st.LOCATION,
            "provisioningState": "Succeeded",
            "provisioningErrors": None,
            "isAttachedCompute": False,
            "disableLocalAuth": True,
            "properties": {
                "vmSize": vm_size,
                "vmPriority": priority,
                "osType": "Linux",
                "virtualMachineImage": None,
                "isolatedNetwork": False,
                "subnet": None,
                "scaleSettings": {"maxNodeCount": max_nodes, "minNodeCount": 0, "nodeIdleTimeBeforeScaleDown": "PT2M"},
                "remoteLoginPortPublicAccess": "Disabled",
                "allocationState": "Steady",
                "allocationStateTransitionTime": "2026-01-01T00:00:00.000Z",
                "errors": None,
                "currentNodeCount": 0,
                "targetNodeCount": 0,
                "nodeStateCounts": {"preparingNodeCount": 0, "runningNodeCount": 0, "idleNodeCount": 0,
                                    "unusableNodeCount": 0, "leavingNodeCount": 0, "preemptedNodeCount": 0},
                "enableNodePublicIp": False,
            },
        },
    }  # fmt: skip


def get_compute(ctx: Ctx, m: re.Match[str]) -> Response:
    _check_ws(ctx, m)
    with ctx.standin.state.lock:
        body = ctx.standin.state.computes.get(m["name"].lower())
    if body is None:
        raise HttpError(404, "ResourceNotFound", f"The Resource '{RP}/workspaces/{st.WORKSPACE}/computes/"
                        f"{m['name']}' under resource group '{st.RESOURCE_GROUP}' was not found.")  # fmt: skip
    return Response(200, body)


def list_computes(ctx: Ctx, m: re.Match[str]) -> Response:
    _check_ws(ctx, m)
    with ctx.standin.state.lock:
        return Response(200, {"value": list(ctx.standin.state.computes.values())})


def get_datastore(s: StandIn, name: str) -> dict[str, Any]:
    with s.state.lock:
        ds = s.state.datastores.get(name)
    if ds is None:
        raise _not_found(f"Datastore {name}")
    return ds


def seed_registry_model(
    s: StandIn, registry: str, name: str, version: str, src: Path, *, model_type: str = "custom_model",
    description: str = "", tags: dict[str, str] | None = None,
) -> str:  # fmt: skip
    container = st.REGISTRY_CONTAINER_PREFIX + re.sub(r"[^a-z0-9-]", "-", registry.lower())
    prefix = f"LocalUpload/{uuid.uuid4().hex}/{src.name}"
    s.azurite.upload_folder(src, container, prefix)
    reg_id = f"/subscriptions/{st.SUBSCRIPTION}/resourceGroups/{st.RESOURCE_GROUP}/providers/{RP}/registries/{registry}"
    body = {
        "id": f"azureml://registries/{registry}/models/{name}/versions/{version}",
        "name": version,
        "type": f"{RP}/registries/models/versions",
        "properties": {
            "description": description,
            "tags": tags or {},
            "properties": {},
            "isAnonymous": False,
            "isArchived": False,
            "flavors": {},
            "modelType": model_type,  # the service keeps the SDK's snake-case asset type
            "modelUri": f"{s.azurite.account_url}/{container}/{prefix}",
            "jobName": None,
            "stage": "Development",
            "provisioningState": "Succeeded",
        },
        "systemData": st.system_data(),
        "_blob": {"container": container, "prefix": prefix},
        "_arm_id": f"{reg_id}/models/{name}/versions/{version}",
    }
    with s.state.lock:
        s.state.registries.add(registry)
        s.state.registry_models[(registry, name, version)] = body
    return f"azureml://registries/{registry}/models/{name}/versions/{version}"


def _public(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if not k.startswith("_")}


# ---- workspace ---------------------------------------------------------------------------------------
def get_workspace(ctx: Ctx, m: re.Match[str]) -> Response:
    _check_ws(ctx, m)
    return Response(200, workspace_body(ctx.standin))


# ---- versioned assets (environments, codes, models, data) ------------------------------------------------
def _container_body(s: StandIn, kind: str, name: str) -> dict[str, Any]:
    with s.state.lock:
        versions = s.state.assets.get((kind, name), {})
        meta = s.state.containers.get((kind, name), {})
    nums = [int(v) for v in versions if v.isdigit()]
    latest = str(max(nums)) if nums else (list(versions)[-1] if versions else None)
    return {
        "id": f"{s.workspace_id}/{kind}/{name}",
        "name": name,
        "type": f"{RP}/workspaces/{kind}",
        "properties": {
            "description": meta.get("description"),
            "tags": meta.get("tags", {}),
            "properties": {},
            "isArchived": False,
            "latestVersion": latest,
            "nextVersion": str(max(nums) + 1) if nums else "1",
            "provisioningState": "Succeeded",
        },
        "systemData": meta.get("systemData") or st.system_data(),
    }


def get_container(ctx: Ctx, m: re.Match[str]) -> Response:
    _check_ws(ctx, m)
    kind, name = m["kind"], m["name"]
    with ctx.standin.state.lock:
        exists = (kind, name) in ctx.standin.state.assets
    if not exists:
        return arm_error(404, "UserError", f"{kind[:-1] if kind != 'data' else 'data'} container {name} not found")
    return Response(200, _container_body(ctx.standin, kind, name))


def put_container(ctx: Ctx, m: re.Match[str]) -> Response:
    _check_ws(ctx, m)
    kind, name = m["kind"], m["name"]
    props = ctx.json().get("properties", {})
    with ctx.standin.state.lock:
        ctx.standin.state.assets.setdefault((kind, name), {})
        ctx.standin.state.containers[(kind, name)] = {
            "description": props.get("description"), "tags": props.get("tags") or {}, "systemData": st.system_data()
        }  # fmt: skip
    return Response(200, _container_body(ctx.standin, kind, name))


def _version_body(s: StandIn, kind: str, name: str, version: str, props: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"{s.workspace_id}/{kind}/{name}/versions/{version}",
        "name": version,
        "type": f"{RP}/workspaces/{kind}/versions",
        "properties": props,
        "systemData": st.system_data(),
    }


def _fill_defaults(kind: str, props: dict[str, Any]) -> dict[str, Any]:
    props = copy.deepcopy(props)
    props.setdefault("description", None)
    props.setdefault("tags", {})
    props.setdefault("properties", {})
    props.setdefault("isAnonymous", False)
    props.setdefault("isArchived", False)
    props["provisioningState"] = "Succeeded"
    if kind == "environments":
        props.setdefault("osType", "Linux")
        props.setdefault("autoRebuild", "Disabled")
        props["environmentType"] = "UserCreated"
        props.setdefault("stage", "Development")
    elif kind == "models":
        props.setdefault("flavors", {})  # without it Model._from_rest_object crashes
        props.setdefault("modelType", "custom_model")
        props.setdefault("jobName", None)
        props.setdefault("stage", "Development")
    elif kind == "data":
        props.setdefault("dataType", "uri_folder")
    return props


def put_version(ctx: Ctx, m: re.Match[str]) -> Response:
    _check_ws(ctx, m)
    s, kind, name, version = ctx.standin, m["kind"], m["name"], m["version"]
    props = _fill_defaults(kind, ctx.json().get("properties", {}))
    with s.state.lock:
        versions = s.state.assets.setdefault((kind, name), {})
        existing = versions.get(version)
        if existing is not None:
            old = existing["properties"]
            changed = [k for k in IMMUTABLE[kind] if (old.get(k) or None) != (props.get(k) or None)]
            if changed:
                why = f"{kind} {name}:{version} exists with different {', '.join(changed)}; versions are immutable"
                return arm_error(409, "UserError", why)
            # Mutable fields (description, tags, stage, isArchived) update in place.
            for k in ("description", "tags", "stage", "isArchived"):
                if k in props:
                    old[k] = props[k]
            return Response(200, existing)
        body = _version_body(s, kind, name, version, props)
        versions[version] = body
        s.state.containers.setdefault((kind, name), {"systemData": st.system_data()})
    return Response(201, body)


def get_version(ctx: Ctx, m: re.Match[str]) -> Response:
    _check_ws(ctx, m)
    kind, name, version = m["kind"], m["name"], m["version"]
    with ctx.standin.state.lock:
        body = ctx.standin.state.assets.get((kind, name), {}).get(version)
    if body is None:
        return arm_error(404, "UserError", f"{kind} {name}:{version} not found")
    return Response(200, body)


def list_versions(ctx: Ctx, m: re.Match[str]) -> Response:
    _check_ws(ctx, m)
    kind, name = m["kind"], m["name"]
    with ctx.standin.state.lock:
        items = list(ctx.standin.state.assets.get((kind, name), {}).values())
    if "hash" in ctx.query:  # code snapshots: find an existing upload by content hash
        h = ctx.query["hash"]
        items = [
            b for b in items
            if (b["properties"].get("properties") or {}).get("hash_sha256") == h
            and (b["properties"].get("properties") or {}).get("hash_version") == ctx.query.get("hashVersion")
        ]  # fmt: skip
    items.sort(key=lambda b: b["systemData"]["createdAt"], reverse="desc" in ctx.query.get("$orderBy", "desc"))
    if "$top" in ctx.query:
        items = items[: int(ctx.query["$top"])]
    return Response(200, {"value": items})


def start_pending_upload(ctx: Ctx, m: re.Match[str]) -> Response:
    """A fresh temporary container per upload, with a container SAS, like the service's TemporaryBlobReference."""
    _check_ws(ctx, m)
    s = ctx.standin
    body = ctx.json()
    if body.get("pendingUploadType") not in ("TemporaryBlobReference", None):
        raise HttpError(400, "UserError", f"unsupported pendingUploadType {body.get('pendingUploadType')!r}")
    container = f"temp-{uuid.uuid4().hex[:24]}"
    s.azurite.ensure_container(container)
    with s.state.lock:
        s.state.pending_uploads[container] = f"{m['kind']}/{m['name']}/{m['version']}"
    return Response(
        200,
        {
            "blobReferenceForConsumption": {
                "blobUri": f"{s.azurite.account_url}/{container}",
                "storageAccountArmId": f"/subscriptions/{st.SUBSCRIPTION}/resourceGroups/{st.RESOURCE_GROUP}"
                f"/providers/Microsoft.Storage/storageAccounts/{ACCOUNT}",
                "credential": {"credentialType": "SAS", "sasUri": s.azurite.container_sas_url(container)},
            },
            "pendingUploadId": body.get("pendingUploadId") or uuid.uuid4().hex,
            "pendingUploadType": "TemporaryBlobReference",
        },
    )


# ---- datastores ----------------------------------------------------------------------------------------
def list_datastores(ctx: Ctx, m: re.Match[str]) -> Response:
    _check_ws(ctx, m)
    with ctx.standin.state.lock:
        items = list(ctx.standin.state.datastores.values())
    if ctx.query.get("isDefault", "").lower() == "true":
        items = [d for d in items if d["properties"]["isDefault"]]
    return Response(200, {"value": items})


def get_datastore_route(ctx: Ctx, m: re.Match[str]) -> Response:
    _check_ws(ctx, m)
    return Response(200, get_datastore(ctx.standin, m["name"]))


def list_secrets(ctx: Ctx, m: re.Match[str]) -> Response:
    _check_ws(ctx, m)
    get_datastore(ctx.standin, m["name"])
    return Response(200, {"secretsType": "AccountKey", "key": ACCOUNT_KEY})


# ---- jobs ----------------------------------------------------------------------------------------------
def job_body(s: StandIn, job: st.JobRecord) -> dict[str, Any]:
    props = copy.deepcopy(job.body)
    props["status"] = job.status
    props.setdefault("services", {})
    props["services"]["Studio"] = {
        "jobServiceType": "Studio", "port": None, "status": None, "errorMessage": None, "properties": None,
        "endpoint": f"{s.base_url}/studio/runs/{job.name}?wsid={s.workspace_id}",
    }  # fmt: skip
    props["services"]["Tracking"] = {
        "jobServiceType": "Tracking", "port": None, "status": None, "errorMessage": None, "properties": None,
        "endpoint": s.mlflow_azureml_uri,
    }  # fmt: skip
    outputs = props.get("outputs") or {}
    for oname, uri in job.output_uris.items():
        if oname in outputs and not outputs[oname].get("uri"):
            outputs[oname]["uri"] = uri
    props["outputs"] = outputs
    return {
        "id": f"{s.workspace_id}/jobs/{job.name}",
        "name": job.name,
        "type": f"{RP}/workspaces/jobs",
        "properties": props,
        "systemData": st.system_data(job.created),
    }


def put_job(ctx: Ctx, m: re.Match[str]) -> Response:
    _check_ws(ctx, m)
    s, name = ctx.standin, m["name"]
    props = ctx.json().get("properties") or {}
    if props.get("jobType") != "Command":
        raise HttpError(400, "UserError", f"stand-in runs Command jobs only, got {props.get('jobType')!r}")
    sent = copy.deepcopy(props)
    with s.state.lock:
        existing = s.state.jobs.get(name)
        if existing is not None:
            changed = sorted(k for k in set(sent) | set(existing.request_props)
                             if sent.get(k) != existing.request_props.get(k))  # fmt: skip
            immutable = [k for k in changed if k not in JOB_MUTABLE]
            if immutable:
                raise HttpError(400, "JobPropertyImmutable",
                                f"The property '{immutable[0]}' of job '{name}' cannot be changed: a job's "
                                f"definition is immutable once created (changed: {', '.join(immutable)})")  # fmt: skip
            for k in changed:  # tags / description / displayName / properties may be updated
                existing.body[k] = copy.deepcopy(sent.get(k))
                existing.request_props[k] = copy.deepcopy(sent.get(k))
            return Response(200, job_body(s, existing))
    _check_job_references(s, props)
    _check_queue_settings(props, ctx.api_version)
    with s.state.lock:
        if name in s.state.jobs:  # a concurrent PUT of the same name won the race: treat as a re-PUT
            return Response(200, job_body(s, s.state.jobs[name]))
        props.setdefault("experimentName", "Default")
        props.setdefault("displayName", name)
        props.setdefault("computeId", None)
        props.setdefault("isArchived", False)
        props.setdefault("properties", {})
        props["properties"].setdefault("_azureml.ComputeTargetType", "local")
        job = st.JobRecord(name=name, body=props, created=st.now_iso(), request_props=sent)
        s.state.jobs[name] = job
    s.executor.submit(job)
    return Response(201, job_body(s, job))


def _check_job_references(s: StandIn, props: dict[str, Any]) -> None:
    """What Azure ML checks at submission: the compute, environment version and code version must exist."""
    compute = props.get("computeId")
    if compute:
        cname = compute.rstrip("/").rsplit("/", 1)[-1]
        with s.state.lock:
            known = cname.lower() in s.state.computes
            names = ", ".join(sorted(s.state.computes))
        if not known:
            raise HttpError(400, "UserError", f"Compute '{cname}' is not found in workspace '{st.WORKSPACE}'. "
                            f"Computes in this workspace: {names}")  # fmt: skip
    for field_name, kind in (("environmentId", "environments"), ("codeId", "codes")):
        ref = props.get(field_name)
        if not ref:
            if field_name == "environmentId":
                raise HttpError(400, "UserError", "A command job needs an environment (environmentId)")
            continue
        mm = re.search(rf"/{kind}/(?P<name>[^/]+)/versions/(?P<ver>[^/]+)$", ref) or re.match(
            r"^azureml:(?P<name>[^:/]+):(?P<ver>[^:/]+)$", ref
        )
        with s.state.lock:
            found = mm is not None and mm["ver"] in s.state.assets.get((kind, mm["name"]), {})
        if not found:
            raise HttpError(404, "UserError", f"{field_name} {ref!r}: no such {kind[:-1]} version in workspace "
                            f"'{st.WORKSPACE}'")  # fmt: skip


def _check_queue_settings(props: dict[str, Any], api_version: str | None) -> None:
    """queueSettings.jobTier: the service binds it to its JobTier enum, so a value outside the api-version's
    definition is refused (the OpenAPI check lets any string through: the enum is modelAsString)."""
    from . import openapi

    tier = (props.get("queueSettings") or {}).get("jobTier")
    if tier is None:
        return
    spec = openapi._spec()["api_versions"].get(api_version or "", {}).get("definitions", {}).get("JobTier", {})
    allowed = spec.get("enum") or []
    if not isinstance(tier, str) or tier.lower() not in {a.lower() for a in allowed}:
        raise HttpError(400, "InvalidRequestContent", f"The request content was invalid: properties.queueSettings."
                        f"jobTier {tier!r} is not one of {', '.join(allowed)} (api-version {api_version})")  # fmt: skip


def preemptible(s: StandIn, job: st.JobRecord) -> bool:
    """A job on a low-priority cluster, or one asking for the Spot job tier, runs on capacity Azure takes back."""
    cname = (job.body.get("computeId") or "").rstrip("/").rsplit("/", 1)[-1].lower()
    compute = s.state.computes.get(cname)
    low = compute is not None and compute["properties"]["properties"]["vmPriority"] == "LowPriority"
    spot = str((job.body.get("queueSettings") or {}).get("jobTier") or "").lower() == "spot"
    return low or spot


def job_action(ctx: Ctx, m: re.Match[str]) -> Response:
    """Admin: make a node stop answering (pause), answer again (resume), or preempt a low-priority / Spot job:
    by default Azure ML requeues it (attempt 2 starts from the top); `{"requeue": false}` ends it Failed instead,
    as a job whose capacity did not come back."""
    s = ctx.standin
    with s.state.lock:
        job = s.state.jobs.get(m["name"])
    if job is None:
        return arm_error(404, "UserError", f"Job {m['name']} not found")
    action = m["action"]
    if action == "preempt":
        if not preemptible(s, job):
            return arm_error(409, "Conflict", f"job {job.name} does not run on a low-priority compute or Spot tier")
        body = ctx.json() if ctx.body else {}
        s.executor.preempt(job, requeue=bool((body or {}).get("requeue", True)))
    elif action == "pause":
        s.executor.pause(job)
    else:
        s.executor.resume(job)
    return Response(200, {"name": job.name, "status": job.status})


def get_job(ctx: Ctx, m: re.Match[str]) -> Response:
    _check_ws(ctx, m)
    with ctx.standin.state.lock:
        job = ctx.standin.state.jobs.get(m["name"])
        if job is None:
            return arm_error(404, "UserError", f"Job {m['name']} not found")
        return Response(200, job_body(ctx.standin, job))


def list_jobs(ctx: Ctx, m: re.Match[str]) -> Response:
    _check_ws(ctx, m)
    with ctx.standin.state.lock:
        items = [job_body(ctx.standin, j) for j in ctx.standin.state.jobs.values()]
    return Response(200, {"value": items})


def cancel_job(ctx: Ctx, m: re.Match[str]) -> Response:
    _check_ws(ctx, m)
    s = ctx.standin
    with s.state.lock:
        job = s.state.jobs.get(m["name"])
    if job is None:
        return arm_error(404, "UserError", f"Job {m['name']} not found")
    s.executor.cancel(job)
    loc = (
        f"{s.base_url}/subscriptions/{st.SUBSCRIPTION}/providers/{RP}/locations/{st.LOCATION}"
        f"/mfeOperationResults/jc:{st.WORKSPACE}:{job.name}?api-version={ctx.api_version}"
    )
    return Response(202, None, {"Location": loc, "Retry-After": "1"})


def cancel_result(ctx: Ctx, m: re.Match[str]) -> Response:
    with ctx.standin.state.lock:
        job = ctx.standin.state.jobs.get(m["job"])
    if job is None:
        return arm_error(404, "UserError", f"Job {m['job']} not found")
    if job.status in ("Completed", "Failed", "Canceled"):
        return Response(200, None)
    return Response(202, None, {"Location": ctx.standin.base_url + ctx.path + f"?api-version={ctx.api_version}",
                                "Retry-After": "1"})  # fmt: skip


# ---- registry (MFE) ------------------------------------------------------------------------------------
def get_registry_model_version(ctx: Ctx, m: re.Match[str]) -> Response:
    with ctx.standin.state.lock:
        body = ctx.standin.state.registry_models.get((m["reg"], m["name"], m["version"]))
    if body is None:
        return arm_error(404, "UserError", f"model {m['name']}:{m['version']} not found in registry {m['reg']}")
    return Response(200, _public(body))


def get_registry_model_container(ctx: Ctx, m: re.Match[str]) -> Response:
    with ctx.standin.state.lock:
        versions = [v for (r, n, v) in ctx.standin.state.registry_models if r == m["reg"] and n == m["name"]]
    if not versions:
        return arm_error(404, "UserError", f"model {m['name']} not found in registry {m['reg']}")
    nums = sorted(int(v) for v in versions if v.isdigit())
    return Response(200, {
        "id": f"azureml://registries/{m['reg']}/models/{m['name']}", "name": m["name"],
        "type": f"{RP}/registries/models",
        "properties": {"description": None, "tags": {}, "properties": {}, "isArchived": False,
                       "latestVersion": str(nums[-1]) if nums else versions[-1],
                       "nextVersion": str(nums[-1] + 1) if nums else None, "provisioningState": "Succeeded"},
        "systemData": st.system_data(),
    })  # fmt: skip


def list_registry_model_versions(ctx: Ctx, m: re.Match[str]) -> Response:
    with ctx.standin.state.lock:
        items = [_public(b) for (r, n, _v), b in ctx.standin.state.registry_models.items()
                 if r == m["reg"] and n == m["name"]]  # fmt: skip
    items.reverse()
    if "$top" in ctx.query:
        items = items[: int(ctx.query["$top"])]
    return Response(200, {"value": items})


def registry_blob_reference(ctx: Ctx, m: re.Match[str]) -> Response:
    """getBlobReferenceSAS: where a registry model's files live, with a read/list SAS (the SDK's registry
    model download calls it before listing the blobs)."""
    with ctx.standin.state.lock:
        body = ctx.standin.state.registry_models.get((m["reg"], m["name"], m["version"]))
    if body is None:
        return arm_error(404, "UserError", f"model {m['name']}:{m['version']} not found in registry {m['reg']}")
    container = body["_blob"]["container"]
    sas = ctx.standin.azurite.container_sas_url(container, write=False)
    return Response(200, {
        "blobReferenceForConsumption": {
            "blobUri": f"{ctx.standin.azurite.account_url}/{container}",
            "credential": {"credentialType": "SAS", "sasUri": sas},
        }
    })  # fmt: skip


def register(r: Router) -> None:
    mfe = r"(?:/mferp/managementfrontend)?"
    kinds = r"(?P<kind>environments|codes|models|data)"
    name = r"(?P<name>[^/]+)"
    r.add("GET", mfe + W, get_workspace, api_versions=V_WS)
    r.add("GET", mfe + W + rf"/{kinds}/{name}", get_container, api_versions=V_ASSET)
    r.add("PUT", mfe + W + rf"/{kinds}/{name}", put_container, api_versions=V_ASSET)
    r.add("GET", mfe + W + rf"/{kinds}/{name}/versions", list_versions, api_versions=V_ASSET)
    r.add("GET", mfe + W + rf"/{kinds}/{name}/versions/(?P<version>[^/]+)", get_version, api_versions=V_ASSET)
    r.add("PUT", mfe + W + rf"/{kinds}/{name}/versions/(?P<version>[^/]+)", put_version, api_versions=V_ASSET)
    r.add("POST", mfe + W + rf"/{kinds}/{name}/versions/(?P<version>[^/]+)/startPendingUpload",
          start_pending_upload, api_versions=V_ASSET)  # fmt: skip
    r.add("GET", mfe + W + r"/computes", list_computes, api_versions=V_COMPUTE)
    r.add("GET", mfe + W + rf"/computes/{name}", get_compute, api_versions=V_COMPUTE)
    r.add("POST", rf"/_standin/jobs/{name}/(?P<action>pause|resume|preempt)", job_action, api_versions=None,
          auth="admin")  # fmt: skip
    r.add("GET", mfe + W + r"/datastores", list_datastores, api_versions=V_DS)
    r.add("GET", mfe + W + rf"/datastores/{name}", get_datastore_route, api_versions=V_DS)
    r.add("POST", mfe + W + rf"/datastores/{name}/listSecrets", list_secrets, api_versions=V_DS)
    r.add("GET", mfe + W + r"/jobs", list_jobs, api_versions=V_JOB)
    r.add("PUT", mfe + W + rf"/jobs/{name}", put_job, api_versions=V_JOB)
    r.add("GET", mfe + W + rf"/jobs/{name}", get_job, api_versions=V_JOB)
    r.add("POST", mfe + W + rf"/jobs/{name}/cancel", cancel_job, api_versions=V_JOB)
    r.add("GET", r"/subscriptions/[^/]+/providers/Microsoft\.MachineLearningServices/locations/[^/]+"
          r"/mfeOperationResults/jc:[^:/]+:(?P<job>[^/]+)", cancel_result, api_versions=V_JOB)  # fmt: skip
    r.add("GET", mfe + REG + rf"/models/{name}", get_registry_model_container, api_versions=V_REG)
    r.add("GET", mfe + REG + rf"/models/{name}/versions", list_registry_model_versions, api_versions=V_REG)
    r.add("GET", mfe + REG + rf"/models/{name}/versions/(?P<version>[^/]+)", get_registry_model_version,
          api_versions=V_REG)  # fmt: skip
    r.add("POST", mfe + REG + rf"/datarefs/{name}/versions/(?P<version>[^/]+)", registry_blob_reference,
          api_versions=V_REG)  # fmt: skip
