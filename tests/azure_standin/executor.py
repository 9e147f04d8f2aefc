"""Runs submitted command jobs the way Azure ML does, on this machine: fetch the code snapshot from Azurite,
bind ${{inputs.x}} / ${{outputs.y}} to folders, run the command in a subprocess (own process group) with the
environment variables Azure ML sets, stream stdout+stderr to user_logs/std_log.txt in the artifact store,
upload outputs to azureml/{job}/{output}/ on the default datastore, and move the job through
NotStarted -> Queued -> Preparing -> Running -> Finalizing -> Completed | Failed | Canceled.

The job's environment (image + conda file) is recorded, not built: the command runs with the stand-in's
configured python (`python`/`python3` on PATH point at it)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests

from . import state as st
from .routes_runhistory import log_prefix

if TYPE_CHECKING:
    from .server import StandIn

TERMINAL = ("Completed", "Failed", "Canceled")
DS_RX = re.compile(
    r"^azureml://(?:subscriptions/[^/]+/resource[gG]roups/[^/]+/(?:providers/Microsoft\.MachineLearningServices/)?"
    r"workspaces/[^/]+/)?datastores/(?P<ds>[^/]+)/paths/(?P<path>.*)$"
)
REG_MODEL_RX = re.compile(r"^azureml://registries/(?P<reg>[^/]+)/models/(?P<name>[^/]+)/versions/(?P<ver>[^/]+)$")
ASSET_RX = re.compile(r"/(?P<kind>models|data)/(?P<name>[^/]+)/versions/(?P<ver>[^/]+)$")
SHORT_ASSET_RX = re.compile(r"^azureml:(?P<name>[^:/]+):(?P<ver>[^:/]+)$")
# Host variables that must not leak into a job: a job authenticates as its own identity.
SCRUB_PREFIXES = ("AZURE_", "MLFLOW_", "AZUREML_", "MSI_", "IDENTITY_")


class JobError(Exception):
    pass


class Executor:
    def __init__(self, standin: StandIn):
        self.s = standin
        self.threads: dict[str, threading.Thread] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.root = standin.tmp_dir / "jobs"

    # ---- public -----------------------------------------------------------------------------------------
    def submit(self, job: st.JobRecord) -> None:
        t = threading.Thread(target=self._run_safe, args=(job,), name=f"job-{job.name}", daemon=True)
        self.threads[job.name] = t
        t.start()

    def cancel(self, job: st.JobRecord) -> None:
        with self.s.state.lock:
            if job.status in TERMINAL:
                return
            job.cancel_requested = True
            job.status = "CancelRequested"
        with self.lock:
            proc = self.procs.get(job.name)
        if proc is not None:
            _kill_group(proc)

    def shutdown(self) -> None:
        with self.s.state.lock:
            jobs = list(self.s.state.jobs.values())
        for j in jobs:
            self.cancel(j)
        for t in list(self.threads.values()):
            t.join(timeout=15)

    # ---- the run ----------------------------------------------------------------------------------------
    def _set(self, job: st.JobRecord, status: str, **fields: Any) -> None:
        with self.s.state.lock:
            if job.status == "CancelRequested" and status not in TERMINAL:
                return
            job.status = status
            for k, v in fields.items():
                setattr(job, k, v)

    def _run_safe(self, job: st.JobRecord) -> None:
        wd = self.root / job.name
        log_path = wd / "user_logs" / "std_log.txt"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.touch()
        job.log_path = str(log_path)
        status, error = "Failed", None
        try:
            status, error = self._run(job, wd, log_path)
        except JobError as e:
            error = {"code": "UserError", "message": str(e)}
            with open(log_path, "a") as fh:
                fh.write(f"\nazure stand-in: {e}\n")
        except Exception as e:  # noqa: BLE001 - a stand-in bug fails the job with the traceback
            error = {"code": "SystemError", "message": f"stand-in executor: {type(e).__name__}: {e}"}
            with open(log_path, "a") as fh:
                fh.write(traceback.format_exc())
        if job.cancel_requested:
            status, error = "Canceled", None
        try:
            self._upload_log(job, log_path)
        except Exception:  # noqa: BLE001 - the status matters more than a last log upload
            traceback.print_exc()
        self._end_mlflow_run(job, status)
        self._set(job, status, error=error, end_time=st.now_iso())
        with self.s.state.lock:
            job.status = status  # also from CancelRequested

    def _run(self, job: st.JobRecord, wd: Path, log_path: Path) -> tuple[str, dict[str, Any] | None]:
        self._set(job, "Queued")
        self._start_mlflow_run(job)
        if job.cancel_requested:
            return "Canceled", None
        self._set(job, "Preparing", start_time=st.now_iso())
        props = job.body
        code_dir = wd / "code"
        code_dir.mkdir(parents=True, exist_ok=True)
        if props.get("codeId"):
            self._fetch_code(props["codeId"], code_dir)
        bindings: dict[str, str] = {}
        env_inputs: dict[str, str] = {}
        for name, spec in (props.get("inputs") or {}).items():
            value = self._bind_input(name, spec or {}, wd / "inputs" / name)
            bindings[f"inputs.{name}"] = value
            env_inputs[f"AZURE_ML_INPUT_{name}"] = value
        out_dirs: dict[str, Path] = {}
        for name, spec in (props.get("outputs") or {}).items():
            d = wd / "outputs" / name
            d.mkdir(parents=True, exist_ok=True)
            out_dirs[name] = d
            spec = spec or {}
            bindings[f"outputs.{name}"] = str(d / name) if spec.get("jobOutputType") == "uri_file" else str(d)
            env_inputs[f"AZURE_ML_OUTPUT_{name}"] = bindings[f"outputs.{name}"]
        command = _substitute(props.get("command") or "", bindings)
        env = self._job_env(job, env_inputs, wd)
        with open(log_path, "ab") as log:
            if job.cancel_requested:
                return "Canceled", None
            self._set(job, "Running")
            proc = subprocess.Popen(
                ["bash", "-c", command], cwd=str(code_dir), env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            with self.lock:
                self.procs[job.name] = proc
            job.pid = proc.pid
            if job.cancel_requested:
                _kill_group(proc)
            timeout = _timeout_s(props)
            started = time.monotonic()
            last_size, last_upload = -1, 0.0
            while proc.poll() is None:
                time.sleep(0.2)
                now = time.monotonic()
                if timeout and now - started > timeout:
                    _kill_group(proc)
                    proc.wait()
                    return "Failed", {"code": "UserError", "message": f"job exceeded its timeout of {timeout}s"}
                if now - last_upload > 1.0:
                    size = log_path.stat().st_size
                    if size != last_size:
                        self._upload_log(job, log_path)
                        last_size = size
                    last_upload = now
            with self.lock:
                self.procs.pop(job.name, None)
        job.exit_code = proc.returncode
        if job.cancel_requested:
            return "Canceled", None
        self._set(job, "Finalizing")
        for name, d in out_dirs.items():
            uri = self._upload_output(job, name, (props.get("outputs") or {}).get(name) or {}, d)
            with self.s.state.lock:
                job.output_uris[name] = uri
        if proc.returncode != 0:
            tail = _tail(log_path)
            return "Failed", {
                "code": "UserError",
                "message": f"Execution failed. User process 'bash' exited with status code {proc.returncode}. "
                f"Please check log file 'user_logs/std_log.txt' for error details. Error: {tail}",
            }
        return "Completed", None

    # ---- code, inputs, outputs ------------------------------------------------------------------------
    def _fetch_code(self, code_id: str, dest: Path) -> None:
        m = re.search(r"/codes/(?P<name>[^/]+)/versions/(?P<ver>[^/]+)$", code_id)
        if not m:
            raise JobError(f"codeId {code_id!r} is not a code version ARM id")
        with self.s.state.lock:
            body = self.s.state.assets.get(("codes", m["name"]), {}).get(m["ver"])
        if body is None:
            raise JobError(f"code {m['name']}:{m['ver']} not found")
        n = self._download_uri(body["properties"]["codeUri"], dest)
        if n == 0:
            raise JobError(f"code snapshot {body['properties']['codeUri']} is empty")

    def _download_uri(self, uri: str, dest: Path) -> int:
        """Download what an azureml://datastores/..., https blob URL, or asset id names into dest."""
        m = DS_RX.match(uri)
        if m:
            ds = self.s.state.datastores.get(m["ds"])
            if ds is None:
                raise JobError(f"datastore {m['ds']} not found (uri {uri})")
            return self.s.azurite.download_prefix(ds["properties"]["containerName"], m["path"], dest)
        if uri.startswith("https://"):
            u = urlsplit(uri)
            container, _, prefix = u.path.lstrip("/").partition("/")
            return self.s.azurite.download_prefix(container, prefix, dest)
        m = REG_MODEL_RX.match(uri)
        if m:
            with self.s.state.lock:
                body = self.s.state.registry_models.get((m["reg"], m["name"], m["ver"]))
            if body is None:
                raise JobError(f"registry model {uri} not found")
            return self.s.azurite.download_prefix(body["_blob"]["container"], body["_blob"]["prefix"], dest)
        m = ASSET_RX.search(uri) or SHORT_ASSET_RX.match(uri)
        if m:
            kind = m.groupdict().get("kind") or "models"
            with self.s.state.lock:
                body = self.s.state.assets.get((kind, m["name"]), {}).get(m["ver"])
            if body is None:
                raise JobError(f"{kind} asset {uri} not found")
            inner = body["properties"].get("modelUri") or body["properties"].get("dataUri")
            return self._download_uri(inner, dest)
        raise JobError(f"cannot resolve input uri {uri!r}")

    def _bind_input(self, name: str, spec: dict[str, Any], dest: Path) -> str:
        kind = spec.get("jobInputType", "")
        if kind == "literal":
            return str(spec.get("value", ""))
        uri = spec.get("uri") or ""
        if not uri:
            raise JobError(f"input {name!r} has no uri")
        n = self._download_uri(uri, dest)
        if n == 0:
            raise JobError(f"input {name!r}: nothing found at {uri}")
        if kind == "uri_file":
            files = [p for p in dest.rglob("*") if p.is_file()]
            return str(files[0])
        return str(dest)

    def _upload_output(self, job: st.JobRecord, name: str, spec: dict[str, Any], folder: Path) -> str:
        uri = spec.get("uri")
        m = DS_RX.match(uri) if uri else None
        if m:
            ds_name, path = m["ds"], m["path"].strip("/")
        else:
            ds_name, path = "workspaceblobstore", f"azureml/{job.name}/{name}"
        ds = self.s.state.datastores[ds_name]
        files = [p for p in folder.rglob("*") if p.is_file()]
        if files:
            self.s.azurite.upload_folder(folder, ds["properties"]["containerName"], path)
        return f"azureml://datastores/{ds_name}/paths/{path}/"

    def _upload_log(self, job: st.JobRecord, log_path: Path) -> None:
        self.s.azurite.upload_bytes(
            st.ARTIFACT_CONTAINER, log_prefix(job.name) + "user_logs/std_log.txt", log_path.read_bytes()
        )

    # ---- environment -----------------------------------------------------------------------------------
    def _job_env(self, job: st.JobRecord, extra: dict[str, str], wd: Path) -> dict[str, str]:
        s = self.s
        bin_dir = wd / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for exe in ("python", "python3"):
            # A wrapper, not a symlink: a symlinked venv python loses its venv (sys.prefix).
            shim = bin_dir / exe
            shim.write_text(f'#!/bin/sh\nexec {shlex.quote(s.python)} "$@"\n')
            shim.chmod(0o755)
        base = {k: v for k, v in os.environ.items() if not k.startswith(SCRUB_PREFIXES)}
        base.pop("REQUESTS_CA_BUNDLE", None)
        base.pop("SSL_CERT_FILE", None)
        token, exp = s.state.issue_token(st.JOB_IDENTITY_CLIENT_ID, s.base_url + "/", job=job.name)
        exp_name = job.body.get("experimentName") or "Default"
        env = {
            **base,
            "PATH": f"{bin_dir}{os.pathsep}{base.get('PATH', '/usr/bin:/bin')}",
            "AZUREML_RUN_ID": job.name,
            "AZUREML_ROOT_RUN_ID": job.name,
            "AZUREML_ARM_SUBSCRIPTION": st.SUBSCRIPTION,
            "AZUREML_ARM_RESOURCEGROUP": st.RESOURCE_GROUP,
            "AZUREML_ARM_WORKSPACE_NAME": st.WORKSPACE,
            "AZUREML_ARM_PROJECT_NAME": exp_name,
            "AZUREML_EXPERIMENT_ID": job.mlflow_experiment_id or "",
            "AZUREML_WORKSPACE_ID": "00000000-0000-0000-0000-0000000000e1",
            "AZUREML_SERVICE_ENDPOINT": s.base_url,
            "AZUREML_DISCOVERY_SERVICE_ENDPOINT": f"{s.base_url}/discovery",
            "AZUREML_RUN_TOKEN": token,
            "AZUREML_RUN_TOKEN_EXPIRY": str(exp),
            # Cloud: the SDK and azureml-mlflow load "LocalCloud" from the stand-in's ARM metadata route.
            "AZUREML_CURRENT_CLOUD": s.cloud_name,
            "ARM_CLOUD_METADATA_URL": f"{s.base_url}/metadata/endpoints?api-version=2019-05-01",
            # MLflow: https form of the workspace tracking URI (plain mlflow), run/experiment made for the job.
            "MLFLOW_TRACKING_URI": s.mlflow_uri,
            "MLFLOW_TRACKING_TOKEN": token,
            "MLFLOW_RUN_ID": job.mlflow_run_id or "",
            "MLFLOW_EXPERIMENT_ID": job.mlflow_experiment_id or "",
            # Managed identity, as on Azure ML compute: ManagedIdentityCredential -> MSI_ENDPOINT with `secret`.
            "MSI_ENDPOINT": f"{s.base_url}/msi/token",
            "MSI_SECRET": job.msi_secret,
            "DEFAULT_IDENTITY_CLIENT_ID": st.JOB_IDENTITY_CLIENT_ID,
            # The stand-in's CA (Azure's certificates are public; these are not).
            "REQUESTS_CA_BUNDLE": str(s.tls.ca_bundle),
            "SSL_CERT_FILE": str(s.tls.ca_bundle),
            **extra,
        }
        # *.localhost (vault, blob hosts) -> 127.0.0.1 inside the job, without /etc/hosts.
        hook = str(s.resolver_hook_dir())
        env["PYTHONPATH"] = hook + (os.pathsep + base["PYTHONPATH"] if base.get("PYTHONPATH") else "")
        for k, v in (job.body.get("environmentVariables") or {}).items():
            env[k] = str(v)
        return env

    # ---- mlflow -----------------------------------------------------------------------------------------
    def _mlflow(self, method: str, endpoint: str, **kw: Any) -> dict[str, Any]:
        url = f"{self.s.mlflow_uri}/api/2.0/mlflow/{endpoint}"
        r = requests.request(method, url, verify=str(self.s.tls.ca_bundle), timeout=30, **kw)
        if r.status_code >= 400:
            return {"_error": r.status_code, "_text": r.text}
        return r.json()

    def _start_mlflow_run(self, job: st.JobRecord) -> None:
        exp_name = job.body.get("experimentName") or "Default"
        got = self._mlflow("GET", "experiments/get-by-name", params={"experiment_name": exp_name})
        if "experiment" in got:
            exp_id = got["experiment"]["experiment_id"]
        else:
            created = self._mlflow("POST", "experiments/create", json={"name": exp_name})
            exp_id = (
                created.get("experiment_id")
                or self._mlflow("GET", "experiments/get-by-name", params={"experiment_name": exp_name})["experiment"][
                    "experiment_id"
                ]
            )
        run = self._mlflow(
            "POST", "runs/create",
            json={"experiment_id": exp_id, "run_name": job.name, "start_time": int(time.time() * 1000),
                  "tags": [{"key": "mlflow.runName", "value": job.name},
                           {"key": "azureml.runId", "value": job.name}]},
        )  # fmt: skip
        with self.s.state.lock:
            job.mlflow_experiment_id = exp_id
            job.mlflow_run_id = run["run"]["info"]["run_id"]

    def _end_mlflow_run(self, job: st.JobRecord, status: str) -> None:
        if not job.mlflow_run_id:
            return
        ml_status = {"Completed": "FINISHED", "Failed": "FAILED", "Canceled": "KILLED"}[status]
        try:
            self._mlflow("POST", "runs/update", json={"run_id": job.mlflow_run_id, "status": ml_status,
                                                       "end_time": int(time.time() * 1000)})  # fmt: skip
        except requests.RequestException:
            traceback.print_exc()


def _substitute(command: str, bindings: dict[str, str]) -> str:
    """${{inputs.x}} / ${{outputs.y}} -> paths; $[[ ... ]] optional blocks kept only when all their
    references are bound (Azure ML's rule for optional inputs)."""

    def opt(m: re.Match[str]) -> str:
        inner = m.group(1)
        refs = re.findall(r"\$\{\{\s*([\w.]+)\s*\}\}", inner)
        return inner if all(r in bindings for r in refs) else ""

    command = re.sub(r"\$\[\[(.*?)\]\]", opt, command, flags=re.S)

    def sub(m: re.Match[str]) -> str:
        ref = m.group(1)
        if ref not in bindings:
            raise JobError(f"command references ${{{{{ref}}}}} but the job has no such input/output")
        return shlex.quote(bindings[ref]) if " " in bindings[ref] else bindings[ref]

    return re.sub(r"\$\{\{\s*([\w.]+)\s*\}\}", sub, command)


def _timeout_s(props: dict[str, Any]) -> float | None:
    t = ((props.get("limits") or {}).get("timeout")) or ""
    m = re.fullmatch(r"PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?", t)
    if not m or not any(m.groups()):
        return None
    h, mi, se = m.groups()
    return int(h or 0) * 3600 + int(mi or 0) * 60 + float(se or 0)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _kill_group(proc: subprocess.Popen) -> None:
    """Cancel: SIGTERM the job's process group, SIGKILL after 5 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return

    def later() -> None:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    threading.Thread(target=later, daemon=True).start()
