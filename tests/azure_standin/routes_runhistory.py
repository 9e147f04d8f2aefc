"""Workspace discovery, run history (details with logFiles SAS URLs, rundata), the dataset data plane
(batchGetResolvedUris) and registry discovery."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import ResourceNotFoundError

from . import state as st
from .routes_control import W
from .web import Ctx, Response, arm_error

if TYPE_CHECKING:
    from .server import StandIn
    from .web import Router

LOG_BLOBS = ("user_logs/std_log.txt",)


def discovery(ctx: Ctx, m: re.Match[str]) -> Response:
    base = ctx.standin.base_url
    keys = ("api", "catalog", "experimentation", "gallery", "history", "hyperdrive", "labeling",
            "modelmanagement", "pipelines", "studiometadata")  # fmt: skip
    return Response(200, {k: base for k in keys})


def registry_discovery(ctx: Ctx, m: re.Match[str]) -> Response:
    reg = m["reg"]
    with ctx.standin.state.lock:
        known = reg in ctx.standin.state.registries
    if not known:
        return arm_error(404, "UserError", f"Registry {reg} not found")
    return Response(
        200,
        {
            "registryName": reg,
            "tenantId": st.TENANT,
            "primaryRegion": st.LOCATION,
            "regions": [st.LOCATION],
            "subscriptionId": st.SUBSCRIPTION,
            "resourceGroup": st.RESOURCE_GROUP,
            "workspaceName": None,
            "primaryRegionResourceProviderUri": ctx.standin.base_url + "/",  # must end with "/"
        },
    )


def _job(ctx: Ctx, name: str) -> st.JobRecord | None:
    with ctx.standin.state.lock:
        return ctx.standin.state.jobs.get(name)


def log_prefix(job_name: str) -> str:
    return f"ExperimentRun/dcid.{job_name}/"


def run_dict(s: StandIn, job: st.JobRecord, details: bool) -> dict[str, Any]:
    props = job.body
    d: dict[str, Any] = {
        "runId": job.name,
        "runUuid": job.run_uuid,
        "rootRunId": job.name,
        "parentRunId": None,
        "status": job.status,
        "createdUtc" if not details else "createdTimeUtc": job.created,
        "startTimeUtc": job.start_time,
        "endTimeUtc": job.end_time,
        "target": "local",
        "tags": props.get("tags") or {},
        "properties": props.get("properties") or {},
        "error": {"error": job.error} if job.error else None,
        "warnings": [],
        "runTypeV2": {"orchestrator": "Execution", "traits": ["azureml.commandjob"]},
    }
    if details:
        d["logFiles"] = log_files(s, job)
    else:
        d["experimentId"] = job.mlflow_experiment_id
        d["displayName"] = props.get("displayName")
        d["name"] = job.name
        d["outputs"] = {
            oname: {"assetId": _output_asset_id(s, job.name, oname), "type": "uri_folder"} for oname in job.output_uris
        }
    return d


# ---- logFiles: every blob under the job's log prefix -------------------------------------------------------
def log_files(s: StandIn, job: st.JobRecord) -> dict[str, str]:
    """name -> read SAS URL of every blob under the job's log prefix in the artifact container, as Azure ML lists
    them (azureml-logs/20_image_build_log.txt while Preparing, user_logs/std_log.txt or one
    user_logs/std_log_process_N.txt per rank), plus LOG_BLOBS once the executor has started the job's log."""
    prefix = log_prefix(job.name)
    names = set(LOG_BLOBS) if job.log_path else set()
    try:
        cc = s.azurite.service().get_container_client(st.ARTIFACT_CONTAINER)
        names.update(b.name[len(prefix) :] for b in cc.list_blobs(name_starts_with=prefix))
    except ResourceNotFoundError:  # no artifact container yet: no logs
        pass
    return {name: s.azurite.blob_sas_url(st.ARTIFACT_CONTAINER, prefix + name) for name in sorted(names)}


def _output_asset_id(s: StandIn, job: str, output: str) -> str:
    return (
        f"azureml://locations/{st.LOCATION}/workspaces/{s.workspace_id.rsplit('/', 1)[-1]}"
        f"/data/azureml_{job}_output_data_{output}/versions/1"
    )


def run_details(ctx: Ctx, m: re.Match[str]) -> Response:
    job = _job(ctx, m["run"])
    if job is None:
        return arm_error(404, "UserError", f"Run {m['run']} not found")
    with ctx.standin.state.lock:
        return Response(200, run_dict(ctx.standin, job, details=True))


def run_data(ctx: Ctx, m: re.Match[str]) -> Response:
    body = ctx.json()
    job = _job(ctx, body.get("runId", ""))
    if job is None:
        return arm_error(404, "UserError", f"Run {body.get('runId')!r} not found")
    with ctx.standin.state.lock:
        return Response(200, {"runMetadata": run_dict(ctx.standin, job, details=False)})


def batch_resolved_uris(ctx: Ctx, m: re.Match[str]) -> Response:
    s = ctx.standin
    ids = ctx.json().get("values") or []
    out: dict[str, Any] = {}
    rx = re.compile(r"/data/azureml_(?P<job>.+)_output_data_(?P<out>[^/]+)/versions/1$")
    with s.state.lock:
        for asset_id in ids:
            mm = rx.search(asset_id)
            job = s.state.jobs.get(mm["job"]) if mm else None
            if job and mm["out"] in job.output_uris:
                short = job.output_uris[mm["out"]]  # azureml://datastores/{d}/paths/{p}
                long = short.replace("azureml://", f"azureml://subscriptions/{st.SUBSCRIPTION}/resourcegroups/"
                                     f"{st.RESOURCE_GROUP}/workspaces/{st.WORKSPACE}/", 1)  # fmt: skip
                out[asset_id] = {"uri": long, "type": "UriFolder"}
    return Response(200, {"values": out})


def register(r: Router) -> None:
    r.add("GET", r"/discovery", discovery, api_versions=None, auth="none")
    r.add("GET", r"/registrymanagement/v1\.0/registries/(?P<reg>[^/]+)/discovery", registry_discovery,
          api_versions={"v1.0", None}, auth="bearer")  # fmt: skip
    r.add("GET", r"/history/v1\.0" + W + r"/runs/(?P<run>[^/]+)/details", run_details, api_versions={"v1.0"})
    r.add("POST", r"/history/v1\.0" + W + r"/rundata", run_data, api_versions={"v1.0"})
    r.add("POST", r"/data/v1\.0" + W + r"/dataversion/batchGetResolvedUris", batch_resolved_uris,
          api_versions={"1.5.0"})  # fmt: skip
