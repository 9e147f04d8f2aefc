"""`python -m orchestrator.runner --job job.json`: the ONE entry point every system executes.

Reads a Job, resolves its secrets (by name, from a mounted file or Key Vault: never from the job spec), runs the
pass, streams metrics (events.jsonl for the host to forward, or straight to MLflow when the job runs where MLflow
is set up for it, as on Azure ML), and leaves result.json in the output folder.
Exit codes: 0 completed, 2 a user-facing pass error (one line on stderr), 1 anything unexpected.
Data parallel (torchrun, or Azure ML's PyTorch distribution): every rank runs the pass; rank 0 (RANK) alone writes
result.json and events.jsonl, the others write nothing of the runner's; a failing rank exits non-zero, which
fails the launcher and so the job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from orchestrator.core.cache import MANIFEST_FILE, folder_manifest
from orchestrator.core.fs import atomic_write_text
from orchestrator.core.job import RESULT_FILE, Job, JobResult, JobState, append_event
from orchestrator.core.progress import ProgressLines
from orchestrator.core.redact import install_masking, mask, remember_secret
from orchestrator.core.secrets import CONFIG_SECRET, SecretError, put_secret
from orchestrator.core.secrets import resolve_secret as _resolve_secret
from orchestrator.core.versions import library_versions
from orchestrator.passes.base import PassContext, PassError
from orchestrator.passes.registry import load_pass

CORE_LIBRARIES = ("torch", "transformers", "peft", "onnxruntime", "onnxruntime-genai", "onnx")


def resolve_secret(source: str) -> str:
    """core.secrets.resolve_secret, its refusal as a PassError: a job's one-line failure, like a pass's."""
    try:
        return _resolve_secret(source)
    except SecretError as exc:
        raise PassError(str(exc)) from exc


class _MlflowDirect:
    """Logs events into the MLflow run the environment names (Azure ML sets MLFLOW_RUN_ID for the job)."""

    def __init__(self, prefix: str) -> None:
        import mlflow

        self.mlflow = mlflow
        self.prefix = prefix
        self.run_id = os.environ.get("MLFLOW_RUN_ID")
        self.logged: set[tuple[str, int]] = set()

    def __call__(self, event: dict[str, Any]) -> None:
        client = self.mlflow.MlflowClient()
        if not self.run_id:
            return
        if event["type"] == "resume":  # a restarted attempt: the run may hold its steps up to the checkpoint
            for name in client.get_run(self.run_id).data.metrics:
                if name.startswith(self.prefix):
                    self.logged.update((name, m.step) for m in client.get_metric_history(self.run_id, name))
        elif event["type"] == "metric":
            name, step = self.prefix + event["name"], event.get("step")
            if step is not None:  # each (metric, step) once, as the engine's Tracker does
                if (name, int(step)) in self.logged:
                    return
                self.logged.add((name, int(step)))
            client.log_metric(self.run_id, name, event["value"], step=step or 0)
        elif event["type"] == "param":
            client.log_param(self.run_id, self.prefix + event["name"], event["value"])


def dist_rank() -> tuple[int, int]:
    """(global rank, world size) as torchrun / Azure ML's launcher set them; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def await_rank0_result(out_dir: Path, timeout: float = 10.0) -> None:
    """A failing rank > 0 waits a little for rank 0 (which usually fails the same way) to write result.json:
    the launcher stops every rank as soon as one exits non-zero, and the cause belongs in the result."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (out_dir / RESULT_FILE).exists():
        time.sleep(0.1)


def _with_config_secrets(job: Job, secrets: dict[str, str]) -> Job:
    """Secrets the engine took out of the pass / data configs (config:pass:<path>, config:data:<name>:<path>)
    put back where the user wrote them: in this process only, never in job.json."""
    pass_config, data_configs = job.pass_config, dict(job.data_configs)
    for name, value in secrets.items():
        if not name.startswith(CONFIG_SECRET):
            continue
        section, _, rest = name[len(CONFIG_SECRET) :].partition(":")
        if section == "pass":
            pass_config = put_secret(pass_config, rest, value)
        elif section == "data":
            data_name, _, dotted = rest.partition(":")
            if data_name in data_configs:
                data_configs[data_name] = put_secret(data_configs[data_name], dotted, value)
    if pass_config is job.pass_config and data_configs == job.data_configs:
        return job
    return job.model_copy(update={"pass_config": pass_config, "data_configs": data_configs})


def fetch_hub_refs(job: Job, emit: Any) -> Job:
    """hf://<id>@<sha> references a system left to the job (Azure ML): downloaded here, into this machine's HF
    cache, exactly the files the pass reads; the job then reads local folders like everywhere else."""
    from orchestrator.core.errors import UserError
    from orchestrator.core.hub import is_hub_uri, materialize

    refs = ([job.model.path] if job.model and is_hub_uri(job.model.path) else []) + [
        v for v in job.data_files.values() if is_hub_uri(v)
    ]
    if not refs:
        return job
    try:
        updates: dict[str, Any] = {}
        if job.model is not None and is_hub_uri(job.model.path):
            local = materialize(job.model.path, field="input_model.model_path")
            updates["model"] = job.model.model_copy(update={"path": str(local)})
        files = dict(job.data_files)
        for name, value in job.data_files.items():
            if is_hub_uri(value):
                files[name] = str(materialize(value, field=f"data_configs.{name}"))
        updates["data_files"] = files
    except UserError as exc:  # HubError: the one line names the reference and the fix
        raise PassError(str(exc)) from None
    shown = ", ".join(r.split("?", 1)[0] for r in refs)
    emit({"t": time.time(), "type": "log", "message": f"runner: downloaded {shown} from the hub"})
    return job.model_copy(update=updates)


def run_job(job: Job) -> JobResult:
    out_dir = Path(job.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = dist_rank()
    writer = rank == 0  # one result.json and one event stream per job, whatever the number of ranks
    direct = _MlflowDirect(job.tracking.metric_prefix) if job.tracking.mode == "direct" and writer else None

    lines = ProgressLines()  # the job log (Docker's, Azure ML's std_log) shows progress as it goes

    def emit(event: dict[str, Any]) -> None:
        if not writer:
            return
        for key in ("message", "value"):  # a log line or param never carries a secret into events.jsonl / MLflow
            if isinstance(event.get(key), str):
                event = {**event, key: mask(event[key])}
        append_event(out_dir, event)
        if event["type"] == "log":
            print(event["message"], flush=True)
        elif event["type"] == "metric":
            lines.metric(event["name"], event["value"])
        elif event["type"] == "progress":
            line = lines.update(
                event["done"], event["total"], t=event.get("t"), tokens=event.get("tokens"), desc=event.get("desc", "")
            )
            if line:
                print(f"progress: {line}", flush=True)
        if direct is not None:
            direct(event)

    started = time.time()
    pass_cls = load_pass(job.pass_type)
    versions = library_versions(tuple(pass_cls.libraries) or CORE_LIBRARIES)
    try:
        if world > 1 and not pass_cls.data_parallel:
            raise PassError(f"{job.pass_type} does not run data-parallel: give it processes_per_node 1 (got {world})")
        secrets = {name: resolve_secret(src) for name, src in job.secrets.items()}
        for value in secrets.values():
            remember_secret(value)  # masked in everything this process prints (core.redact)
        job = _with_config_secrets(job, secrets)
        config = pass_cls.Config.model_validate(job.pass_config)
        if "hf_token" in secrets:  # huggingface_hub reads it from here; it never leaves this process
            os.environ["HF_TOKEN"] = secrets["hf_token"]
        job = fetch_hub_refs(job, emit)
        ctx = PassContext(job=job, out_dir=out_dir, emit=emit, secrets=secrets)
        emit({"t": time.time(), "type": "status", "status": JobState.RUNNING.value})
        if world > 1:
            emit({"t": time.time(), "type": "param", "name": "world_size", "value": str(world)})
            emit({"t": time.time(), "type": "log", "message": f"runner: data parallel, world_size={world}"})
        output = pass_cls().run(config, job.model, ctx)
    except PassError as exc:
        result = JobResult(
            job_id=job.job_id,
            pass_type=job.pass_type,
            status=JobState.FAILED,
            versions=versions,
            duration_s=time.time() - started,
            error=mask(str(exc)),
        )
        if writer:
            result.write(out_dir)
        raise
    result = JobResult(
        job_id=job.job_id,
        pass_type=job.pass_type,
        status=JobState.COMPLETED,
        model=output.model,
        metrics=output.metrics,
        versions=versions,
        duration_s=time.time() - started,
    )
    if writer:
        result.write(out_dir)
    emit({"t": time.time(), "type": "status", "status": JobState.COMPLETED.value})
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orchestrator.runner", description=__doc__)
    ap.add_argument("--job", required=True, help="path of job.json")
    ap.add_argument(
        "--output-dir", help="override the job's output_dir (Azure ML binds ${{outputs.x}} to a path at run time)"
    )
    ap.add_argument(
        "--checkpoint-dir", help="override the job's checkpoint_dir (a folder that outlives this attempt: resume)"
    )
    ap.add_argument("--model-path", help="override the input model's path (bound input on Azure ML)")
    ap.add_argument("--adapter-path", help="override the input model's adapter path")
    ap.add_argument("--data-file", action="append", default=[], help="NAME=PATH override of a data config's files")
    ap.add_argument(
        "--manifest", action="store_true",
        help=f"after the pass, write {MANIFEST_FILE} (every output file's size and sha256): the output goes into a "
        "shared cache entry, whose readers check it",
    )  # fmt: skip
    args = ap.parse_args(argv)
    install_masking()  # this process's output is the job's log: secrets it resolves never reach it

    job = Job.read(args.job)
    updates: dict[str, Any] = {}
    if args.output_dir:
        updates["output_dir"] = args.output_dir
    if args.checkpoint_dir:
        updates["checkpoint_dir"] = args.checkpoint_dir
    if job.model is not None and (args.model_path or args.adapter_path):
        model_updates = {}
        if args.model_path:
            model_updates["path"] = args.model_path
        if args.adapter_path:
            model_updates["adapter_path"] = args.adapter_path
        updates["model"] = job.model.model_copy(update=model_updates)
    if args.data_file:
        files = dict(job.data_files)
        files.update(dict(item.split("=", 1) for item in args.data_file))
        updates["data_files"] = files
    if updates:
        job = job.model_copy(update=updates)
    try:
        run_job(job)
    except PassError as exc:
        print(f"orch: error: {exc}", file=sys.stderr, flush=True)
        if dist_rank()[0] != 0:
            await_rank0_result(Path(job.output_dir))
        return 2
    except Exception as exc:  # the traceback goes to the job log; the result names the cause
        traceback.print_exc()
        if dist_rank()[0] != 0:
            await_rank0_result(Path(job.output_dir))
        else:
            JobResult(
                job_id=job.job_id,
                pass_type=job.pass_type,
                status=JobState.FAILED,
                error=mask(f"{type(exc).__name__}: {exc}"),
            ).write(job.output_dir)
        return 1
    if args.manifest and dist_rank()[0] == 0:  # last: it lists everything the pass and the runner wrote
        out = Path(job.output_dir)
        atomic_write_text(out / MANIFEST_FILE, json.dumps(folder_manifest(out), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
