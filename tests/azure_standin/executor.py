"""Runs submitted command jobs the way Azure ML does: in a container of the job's own environment image.

Lifecycle (each state held for at least `state_delay_s`, so a client polling sees it):
    NotStarted -> Starting -> Preparing (environment image build; its log is azureml-logs/20_image_build_log.txt)
    -> Queued -> Running -> Finalizing (outputs uploaded) -> Completed | Failed | Canceled
with CancelRequested on cancel, NotResponding while a node stops answering (`pause`), and a preempted low-priority
job going back to Queued and starting again (`preempt`).

A job runs in `instance_count` containers (one per node) of the image built from its registered Environment, with
host networking (the job reaches the stand-in, Azurite and MLflow on 127.0.0.1 as a job reaches the workspace's
endpoints) and nothing from the host's Python: a package missing from the conda file fails the job as it would on
Azure ML. Code snapshot, inputs and outputs are folders bound where Azure ML mounts them
(/mnt/azureml/cr/j/<id>/exe/wd and .../cap/data-capability/wd/...), `${{inputs.x}}` / `${{outputs.y}}` bound to
those paths; a PyTorch distribution starts process_count_per_instance ranks on each node with RANK / LOCAL_RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT / NODE_RANK set, each rank logging to user_logs/std_log_process_<rank>.txt.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests

from . import state as st
from .images import BuildError, ImageBuilder
from .routes_runhistory import log_prefix

if TYPE_CHECKING:
    from .server import StandIn

TERMINAL = ("Completed", "Failed", "Canceled")
DS_RX = re.compile(
    r"^azureml://(?:subscriptions/[^/]+/resource[gG]roups/[^/]+/(?:providers/Microsoft\.MachineLearningServices/)?"
    r"workspaces/[^/]+/)?datastores/(?P<ds>[^/]+)/paths/(?P<path>.*)$"
)
REG_MODEL_RX = re.compile(r"^azureml://registries/(?P<reg>[^/]+)/models/(?P<name>[^/]+)/versions/(?P<ver>[^/]+)$")
ASSET_RX = re.compile(r"/(?P<kind>models|data|environments|codes)/(?P<name>[^/]+)/versions/(?P<ver>[^/]+)$")
SHORT_ASSET_RX = re.compile(r"^azureml:(?P<name>[^:/]+):(?P<ver>[^:/]+)$")
BUILD_LOG = "azureml-logs/20_image_build_log.txt"
CONTAINER_LABEL = "azureml-standin.job"


class JobError(Exception):
    """A user error that fails the job (bad input, missing asset), shown in the job's error."""


class Preempted(Exception):
    pass


class Executor:
    def __init__(self, standin: StandIn):
        self.s = standin
        self.threads: dict[str, threading.Thread] = {}
        self.containers: dict[str, list[Any]] = {}
        self.lock = threading.Lock()
        self.root = standin.tmp_dir / "jobs"
        self.builder = ImageBuilder(standin.image_aliases)

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
        self._stop_containers(job.name)

    def pause(self, job: st.JobRecord) -> None:
        """A node stops answering: the containers freeze, the job reports NotResponding."""
        for c in self._containers(job.name):
            with contextlib.suppress(Exception):
                c.pause()
        with self.s.state.lock:
            job.paused = True

    def resume(self, job: st.JobRecord) -> None:
        for c in self._containers(job.name):
            with contextlib.suppress(Exception):
                c.unpause()
        with self.s.state.lock:
            job.paused = False

    def preempt(self, job: st.JobRecord, requeue: bool = True) -> None:
        """A low-priority node is taken back: the job's containers die and the job is queued again (or, with
        requeue False, ends Failed with the service's preemption error)."""
        with self.s.state.lock:
            job.preempt_requested = True
            job.preempt_requeue = requeue
        self._stop_containers(job.name, timeout=0)

    def shutdown(self) -> None:
        with self.s.state.lock:
            jobs = list(self.s.state.jobs.values())
        for j in jobs:
            self.cancel(j)
        for t in list(self.threads.values()):
            t.join(timeout=30)

    def _containers(self, name: str) -> list[Any]:
        with self.lock:
            return list(self.containers.get(name, []))

    def _stop_containers(self, name: str, timeout: int = 5) -> None:
        for c in self._containers(name):
            with contextlib.suppress(Exception):
                c.unpause()
            with contextlib.suppress(Exception):
                c.stop(timeout=timeout)  # SIGTERM, SIGKILL after `timeout` s: the whole process tree goes

    # ---- the run ----------------------------------------------------------------------------------------
    def _set(self, job: st.JobRecord, status: str, **fields: Any) -> None:
        with self.s.state.lock:
            if job.status == "CancelRequested" and status not in TERMINAL:
                return
            job.status = status
            job.status_history.append(status)
            for k, v in fields.items():
                setattr(job, k, v)

    def _hold(self, job: st.JobRecord) -> None:
        """Keep the current state visible for state_delay_s (returns early on cancel)."""
        end = time.monotonic() + self.s.state_delay_s
        while time.monotonic() < end and not job.cancel_requested:
            time.sleep(0.05)

    def _run_safe(self, job: st.JobRecord) -> None:
        wd = self.root / job.name
        logs = wd / "logs"
        (logs / "user_logs").mkdir(parents=True, exist_ok=True)
        (logs / "azureml-logs").mkdir(parents=True, exist_ok=True)
        job.log_path = str(logs / "user_logs" / "std_log.txt")
        job.log_dir = str(logs)
        status, error = "Failed", None
        try:
            status, error = self._run(job, wd, logs)
        except (JobError, BuildError) as e:
            error = {"code": "UserError", "message": str(e)}
            with open(logs / ("azureml-logs/20_image_build_log.txt" if isinstance(e, BuildError) else
                              "user_logs/std_log.txt"), "a") as fh:  # fmt: skip
                fh.write(f"\nazure stand-in: {e}\n")
        except Exception as e:  # noqa: BLE001 - a stand-in bug fails the job with the traceback
            error = {"code": "SystemError", "message": f"stand-in executor: {type(e).__name__}: {e}"}
            with open(logs / "user_logs" / "std_log.txt", "a") as fh:
                fh.write(traceback.format_exc())
        finally:
            self._remove_containers(job.name)
        if job.cancel_requested:
            status, error = "Canceled", None
        try:
            self._upload_logs(job)
        except Exception:  # noqa: BLE001 - the status matters more than a last log upload
            traceback.print_exc()
        self._end_mlflow_run(job, status)
        with self.s.state.lock:
            job.error, job.end_time = error, st.now_iso()
            job.status = status  # also from CancelRequested
            job.status_history.append(status)

    def _run(self, job: st.JobRecord, wd: Path, logs: Path) -> tuple[str, dict[str, Any] | None]:
        props = job.body
        self._set(job, "Starting")
        self._start_mlflow_run(job)
        self._hold(job)
        if job.cancel_requested:
            return "Canceled", None
        self._set(job, "Preparing", start_time=st.now_iso())
        image = self._prepare_image(job, wd, logs)
        self._hold(job)
        attempt = 0
        while True:
            attempt += 1
            if job.cancel_requested:
                return "Canceled", None
            self._set(job, "Queued")
            self._hold(job)
            if job.cancel_requested:
                return "Canceled", None
            try:
                exit_code, out_dirs = self._attempt(job, wd / f"attempt-{attempt}", logs, image, attempt)
            except Preempted:
                with self.s.state.lock:
                    job.preempt_requested = False
                    requeue = job.preempt_requeue
                    job.preempts += 1
                if not requeue:
                    with open(logs / "user_logs" / "std_log.txt", "a") as fh:
                        fh.write("\nazure stand-in: low-priority node preempted; the job was not requeued\n")
                    return "Failed", {"code": "ServiceError", "message": "The job's low-priority node was "
                                      "preempted and capacity did not come back (JobPreempted): submit it again"}
                with self.s.state.lock:
                    job.attempts = attempt + 1
                with open(logs / "user_logs" / "std_log.txt", "a") as fh:
                    fh.write(f"\nazure stand-in: low-priority node preempted; job requeued (attempt {attempt + 1})\n")
                continue
            break
        job.exit_code = exit_code
        if job.cancel_requested:
            return "Canceled", None
        if exit_code is None:
            return "Failed", {"code": "UserError", "message": f"job exceeded its timeout of {_timeout_s(props)}s"}
        self._set(job, "Finalizing")
        for name, d in out_dirs.items():
            uri = self._upload_output(job, name, (props.get("outputs") or {}).get(name) or {}, d)
            with self.s.state.lock:
                job.output_uris[name] = uri
        self._hold(job)
        if exit_code != 0:
            return "Failed", {
                "code": "UserError",
                "message": f"Execution failed. User process 'bash' exited with status code {exit_code}. "
                f"Please check log file 'user_logs/std_log.txt' for error details. Error: {_tail(logs)}",
            }
        return "Completed", None

    # ---- Preparing: the environment image ---------------------------------------------------------------
    def _prepare_image(self, job: st.JobRecord, wd: Path, logs: Path) -> str:
        env_id = job.body.get("environmentId") or ""
        m = ASSET_RX.search(env_id) or SHORT_ASSET_RX.match(env_id)
        if not m:
            raise JobError(f"environmentId {env_id!r} is not an environment version id")
        with self.s.state.lock:
            env = self.s.state.assets.get(("environments", m["name"]), {}).get(m["ver"])
        if env is None:
            raise JobError(f"environment {m['name']}:{m['ver']} not found")
        env_props = env["properties"]
        build_log = logs / BUILD_LOG
        context_dir = None
        if env_props.get("build"):
            context_dir = wd / "build-context"
            n = self._download_uri(env_props["build"].get("contextUri") or "", context_dir)
            if n == 0:
                raise BuildError(f"environment build context {env_props['build'].get('contextUri')} is empty")
        uploader = _PeriodicUpload(lambda: self._upload_logs(job))
        with open(build_log, "a", buffering=1) as fh, uploader:

            def line(text: str) -> None:
                fh.write(text + "\n")
                uploader.poke()

            built = self.builder.ensure(env_props, m["name"], context_dir=context_dir, log=line)
        job.image = built.tag
        return built.tag

    # ---- Running: containers -----------------------------------------------------------------------------
    def _attempt(
        self, job: st.JobRecord, wd: Path, logs: Path, image: str, attempt: int
    ) -> tuple[int | None, dict[str, Path]]:
        import docker

        props = job.body
        jid = job.run_uuid.replace("-", "")
        root = f"/mnt/azureml/cr/j/{jid}"
        cap = f"{root}/cap/data-capability/wd"
        exe = f"{root}/exe/wd"
        shutil.rmtree(wd, ignore_errors=True)
        code_dir = wd / "code"
        code_dir.mkdir(parents=True)
        if props.get("codeId"):
            self._fetch_code(props["codeId"], code_dir)
        volumes: dict[str, dict[str, str]] = {str(code_dir): {"bind": exe, "mode": "rw"}}
        bindings: dict[str, str] = {}
        env_io: dict[str, str] = {}
        for name, spec in (props.get("inputs") or {}).items():
            spec = spec or {}
            if spec.get("jobInputType") == "literal":
                bindings[f"inputs.{name}"] = str(spec.get("value", ""))
                continue
            if (spec.get("mode") or "").lower() == "direct":
                bindings[f"inputs.{name}"] = spec.get("uri") or ""
                env_io[f"AZURE_ML_INPUT_{name}"] = bindings[f"inputs.{name}"]
                continue
            host = wd / "inputs" / name
            inner = self._bind_input(name, spec, host)
            mount = f"{cap}/INPUT_{name}"
            volumes[str(host)] = {"bind": mount, "mode": "ro"}
            bindings[f"inputs.{name}"] = mount + inner
            env_io[f"AZURE_ML_INPUT_{name}"] = bindings[f"inputs.{name}"]
        out_dirs: dict[str, Path] = {}
        for name, spec in (props.get("outputs") or {}).items():
            spec = spec or {}
            host = wd / "outputs" / name
            host.mkdir(parents=True)
            host.chmod(0o777)
            out_dirs[name] = host
            mount = f"{cap}/{name}"
            volumes[str(host)] = {"bind": mount, "mode": "rw"}
            bindings[f"outputs.{name}"] = f"{mount}/{name}" if spec.get("jobOutputType") == "uri_file" else mount
            env_io[f"AZURE_ML_OUTPUT_{name}"] = bindings[f"outputs.{name}"]
        command = _substitute(props.get("command") or "", bindings)
        dist = props.get("distribution") or {}
        nodes = int((props.get("resources") or {}).get("instanceCount") or 1)
        per_node = int(dist.get("processCountPerInstance") or 1) if dist.get("distributionType") == "PyTorch" else 1
        distributed = bool(dist) and nodes * per_node > 1
        life = wd / "lifecycler"
        life.mkdir()
        (life / "command.sh").write_text(command + "\n")
        (life / "launch.sh").write_text(_LAUNCHER)
        user_logs = logs / "user_logs"
        user_logs.chmod(0o777)
        volumes[str(life)] = {"bind": f"{root}/cap/lifecycler/wd", "mode": "ro"}
        volumes[str(user_logs)] = {"bind": f"{root}/cap/lifecycler/user_logs", "mode": "rw"}
        volumes[str(self.s.tls.ca_bundle)] = {"bind": "/etc/azureml-standin/ca.pem", "mode": "ro"}
        base_env = self._job_env(job, env_io, exe)
        master_port = _free_port()
        client = docker.from_env(timeout=120)
        if job.cancel_requested:
            return None, out_dirs
        started = time.monotonic()
        containers = []
        for node in range(nodes):
            env = {
                **base_env,
                "STANDIN_PROCESSES": str(per_node),
                "STANDIN_NODE_RANK": str(node),
                "STANDIN_DISTRIBUTED": "1" if distributed else "0",
                "STANDIN_LIFECYCLER": f"{root}/cap/lifecycler",
                "AZUREML_CR_NODE_RANK": str(node),
            }
            if distributed:
                env.update(
                    WORLD_SIZE=str(nodes * per_node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port),
                    NODE_RANK=str(node), GROUP_RANK=str(node), LOCAL_WORLD_SIZE=str(per_node),
                    AZ_BATCH_MASTER_NODE=f"127.0.0.1:{master_port}", AZ_BATCHAI_MPI_MASTER_NODE="127.0.0.1",
                )  # fmt: skip
            c = client.containers.run(
                image, ["bash", f"{root}/cap/lifecycler/wd/launch.sh"], detach=True, working_dir=exe,
                environment=env, volumes=volumes, network_mode="host", user=f"{os.getuid()}:{os.getgid()}",
                extra_hosts=self.s.extra_hosts(), labels={CONTAINER_LABEL: job.name}, shm_size="1g",
                name=f"standin-{job.name[:40]}-a{attempt}-n{node}-{jid[:6]}",
            )  # fmt: skip
            containers.append(c)
            with self.lock:
                self.containers.setdefault(job.name, []).append(c)
        self._set(job, "Running")
        timeout = _timeout_s(props)
        uploader = _PeriodicUpload(lambda: self._upload_logs(job))
        with uploader:
            codes: dict[str, int] = {}
            while len(codes) < len(containers):
                time.sleep(0.2)
                uploader.poke()
                if job.preempt_requested:
                    self._stop_containers(job.name, timeout=0)
                    self._remove_containers(job.name)
                    raise Preempted()
                if job.paused:
                    self._set(job, "NotResponding")
                elif job.status == "NotResponding":
                    self._set(job, "Running")
                for c in containers:
                    if c.id in codes:
                        continue
                    c.reload()
                    if c.status in ("exited", "dead"):
                        codes[c.id] = int(c.attrs["State"]["ExitCode"])
                        if codes[c.id] != 0:  # one failed node ends the job, as on Azure ML
                            self._stop_containers(job.name)
                if timeout and time.monotonic() - started > timeout and not job.paused:
                    self._stop_containers(job.name)
                    return None, out_dirs
        return max(codes.values(), key=abs), out_dirs

    def _remove_containers(self, name: str) -> None:
        with self.lock:
            cs = self.containers.pop(name, [])
        for c in cs:
            with contextlib.suppress(Exception):
                c.remove(force=True)

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
        """Download an input into dest; returns the path inside the mount ('' for a folder, /file for a file)."""
        uri = spec.get("uri") or ""
        if not uri:
            raise JobError(f"input {name!r} has no uri")
        n = self._download_uri(uri, dest)
        if n == 0:
            raise JobError(f"input {name!r}: nothing found at {uri}")
        if spec.get("jobInputType") == "uri_file":
            files = [p for p in dest.rglob("*") if p.is_file()]
            return "/" + files[0].relative_to(dest).as_posix()
        return ""

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

    def _upload_logs(self, job: st.JobRecord) -> None:
        """Every log file of the job (user_logs/*, azureml-logs/*) to the run's artifact prefix."""
        if not job.log_dir:
            return
        root = Path(job.log_dir)
        for p in sorted(root.rglob("*.txt")):
            data = p.read_bytes()
            key = p.relative_to(root).as_posix()
            if job.uploaded_sizes.get(key) == len(data):
                continue
            self.s.azurite.upload_bytes(st.ARTIFACT_CONTAINER, log_prefix(job.name) + key, data)
            with self.s.state.lock:
                job.uploaded_sizes[key] = len(data)

    # ---- environment -----------------------------------------------------------------------------------
    def _job_env(self, job: st.JobRecord, extra: dict[str, str], exe: str) -> dict[str, str]:
        s = self.s
        token, exp = s.state.issue_token(st.JOB_IDENTITY_CLIENT_ID, s.aml_audience, job=job.name)
        exp_name = job.body.get("experimentName") or "Default"
        ca = "/etc/azureml-standin/ca.pem"
        env = {
            "HOME": "/tmp",
            "PYTHONUNBUFFERED": "1",
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
            "AZUREML_CR_EXECUTION_WORKING_DIR_PATH": exe,
            # Cloud: azureml-mlflow / the SDK load this cloud's endpoints from the stand-in's ARM metadata route.
            "AZUREML_CURRENT_CLOUD": s.cloud_name,
            "ARM_CLOUD_METADATA_URL": f"{s.base_url}/metadata/endpoints?api-version=2019-05-01",
            # MLflow, as Azure ML sets it: the workspace's azureml:// URI (needs azureml-mlflow in the environment),
            # a token, and the job's run and experiment.
            "MLFLOW_TRACKING_URI": s.mlflow_azureml_uri,
            "MLFLOW_TRACKING_TOKEN": token,
            "MLFLOW_RUN_ID": job.mlflow_run_id or "",
            "MLFLOW_EXPERIMENT_ID": job.mlflow_experiment_id or "",
            "MLFLOW_EXPERIMENT_NAME": exp_name,
            # Managed identity, as on Azure ML compute: ManagedIdentityCredential -> MSI_ENDPOINT with `secret`.
            "MSI_ENDPOINT": f"{s.base_url}/msi/token",
            "MSI_SECRET": job.msi_secret,
            "DEFAULT_IDENTITY_CLIENT_ID": st.JOB_IDENTITY_CLIENT_ID,
            # The stand-in's CA (Azure's certificates are public; these are not).
            "REQUESTS_CA_BUNDLE": ca,
            "SSL_CERT_FILE": ca,
            **extra,
        }
        env.update({k: str(v) for k, v in (job.body.get("environmentVariables") or {}).items()})
        return env

    def _mlflow(self, method: str, endpoint: str, **kw: Any) -> dict[str, Any]:
        r = requests.request(method, f"{self.s.mlflow.uri}/api/2.0/mlflow/{endpoint}", timeout=30, **kw)
        if r.status_code >= 400:
            return {"error": r.status_code, "text": r.text}
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


# Azure ML's lifecycler on each node: start the ranks of this node, each logging to its own file.
_LAUNCHER = r"""#!/bin/bash
n=${STANDIN_PROCESSES:-1}; node=${STANDIN_NODE_RANK:-0}; logs=$STANDIN_LIFECYCLER/user_logs
pids=()
for ((i = 0; i < n; i++)); do
  rank=$((node * n + i))
  if [ "$STANDIN_DISTRIBUTED" = 1 ]; then
    log=$logs/std_log_process_$rank.txt
    RANK=$rank LOCAL_RANK=$i bash "$STANDIN_LIFECYCLER/wd/command.sh" >>"$log" 2>&1 &
  else
    bash "$STANDIN_LIFECYCLER/wd/command.sh" >>"$logs/std_log.txt" 2>&1 &
  fi
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
rc=0
for p in "${pids[@]}"; do wait "$p"; c=$?; [ "$rc" = 0 ] && rc=$c; done
exit $rc
"""


class _PeriodicUpload:
    """Calls `fn` at most once a second while poked, and once more at exit (log files to the artifact store)."""

    def __init__(self, fn: Any, every: float = 1.0):
        self.fn, self.every, self.last = fn, every, 0.0

    def poke(self) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            with contextlib.suppress(Exception):
                self.fn()

    def __enter__(self) -> _PeriodicUpload:
        return self

    def __exit__(self, *exc: Any) -> None:
        with contextlib.suppress(Exception):
            self.fn()


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


def _tail(logs: Path, lines: int = 5) -> str:
    files = sorted((logs / "user_logs").glob("std_log*.txt"))
    for path in files:
        try:
            text = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            continue
        if text:
            return " | ".join(text[-lines:])
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
