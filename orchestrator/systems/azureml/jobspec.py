"""What one Azure ML command job of orch says, apart from who submits it: the runner's command line for a Job with
its named inputs (local paths uploaded by the SDK, references passed through), the job.json the compute reads, the
PyTorch launcher of a data-parallel pass, the job's environment variables and how its outputs are written. Pure
functions of the Job and the system's settings: the system module keeps the workspace talk (lookups, submits)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.hub import is_hub_uri
from orchestrator.core.job import Job, JobTracking, is_uri
from orchestrator.systems.azureml.names import RESULT_OUTPUT

# Outputs are written to the node's local disk and uploaded when the job ends ("upload"), not written through a
# blobfuse mount ("rw_mount"): orch's writers publish by renaming a finished temp folder, and a directory rename on
# blobfuse over flat-namespace storage is a copy + delete per blob, not atomic (infra/local-azure.md).
OUTPUT_MODE = "upload"
TRAINING_PASSES = ("LoRA", "QLoRA")


def input_for(path: str) -> tuple[str, str]:
    """(Input type, path) for an artifact: references pass through, local copies of references map back."""
    from orchestrator.systems.azureml.download import origin_of

    if not is_uri(path):
        origin = origin_of(path)
        if origin is not None:
            path = origin
    if path.startswith("azureml://registries/") or re.match(r"^azureml:[^/]", path):
        return "custom_model", path
    if is_uri(path):
        return ("uri_file" if not path.endswith("/") and Path(path).suffix else "uri_folder"), path
    return ("uri_file" if Path(path).is_file() else "uri_folder"), path


def _input_name(prefix: str, name: str) -> str:
    return prefix + re.sub(r"[^A-Za-z0-9_]", "_", name)


@dataclass
class RunnerCommand:
    """The runner's command line of one pass job and what it reads."""

    args: list[str]  # `python -m orchestrator.runner ...`, the ${{inputs.x}} / ${{outputs.result}} placeholders in
    inputs: dict[str, Any]  # input name -> azure.ai.ml Input
    refs: dict[str, str]  # model / adapter / data_<name> -> the reference (or local path) it was given as
    remote_job: Job  # the job.json of the snapshot: paths the compute resolves (input:model, hf://..., outputs)
    reads_hub: bool  # the job downloads Hugging Face references itself


def runner_command(job: Job, *, manifest: bool) -> RunnerCommand:
    """The command job's side of `job`: a hub model or dataset stays an hf:// reference the job downloads; every
    other artifact becomes a named input. manifest: the output becomes a workspace cache entry (its readers check
    the files against the manifest the runner writes)."""
    from azure.ai.ml import Input

    inputs: dict[str, Any] = {}
    args = ["python -m orchestrator.runner --job job.json", f"--output-dir ${{{{outputs.{RESULT_OUTPUT}}}}}"]
    if manifest:
        args.append("--manifest")  # the output becomes a workspace cache entry: its readers check the files
    refs: dict[str, str] = {}
    from_hub = job.model is not None and is_hub_uri(job.model.path)  # the job downloads it (runner)
    if job.model is not None and from_hub:
        refs["model"] = job.model.path
        if job.model.adapter_path:
            kind, path = input_for(job.model.adapter_path)
            inputs["adapter"] = Input(type=kind, path=path)
            args.append("--adapter-path ${{inputs.adapter}}")
            refs["adapter"] = path
    elif job.model is not None:
        kind, path = input_for(job.model.path)
        inputs["model"] = Input(type=kind, path=path)
        args.append("--model-path ${{inputs.model}}")
        refs["model"] = path
        if job.model.adapter_path:
            kind, path = input_for(job.model.adapter_path)
            inputs["adapter"] = Input(type=kind, path=path)
            args.append("--adapter-path ${{inputs.adapter}}")
            refs["adapter"] = path
    hub_data = {k: v for k, v in job.data_files.items() if is_hub_uri(v)}
    for data_name, local in job.data_files.items():
        if data_name in hub_data:
            refs[f"data_{data_name}"] = local
            continue
        key = _input_name("data_", data_name)
        kind, path = input_for(local)
        inputs[key] = Input(type=kind, path=path)
        args.append(f"--data-file {data_name}=${{{{inputs.{key}}}}}")
    remote_job = job.model_copy(
        update={
            "output_dir": "outputs",
            "checkpoint_dir": None,  # the client's cache folder does not exist on the compute
            "model": job.model.model_copy(update={"path": job.model.path if from_hub else "input:model",
                                                  "adapter_path": "input:adapter"
                                                  if job.model.adapter_path else None}) if job.model else None,
            "data_files": {k: hub_data.get(k, f"input:{k}") for k in job.data_files},
            "tracking": JobTracking(mode="direct", metric_prefix=job.tracking.metric_prefix),
        }
    )  # fmt: skip
    return RunnerCommand(args=args, inputs=inputs, refs=refs, remote_job=remote_job,
                         reads_hub=from_hub or bool(hub_data))  # fmt: skip


def distribution(
    instance_count: int, resources: dict[str, Any], processes_per_node: int, data_parallel: bool
) -> tuple[Any, Any]:
    """(distribution, resources): Azure ML's PyTorch launcher starts processes_per_node ranks on each of
    instance_count nodes (RANK/WORLD_SIZE/MASTER_ADDR set for the runner) when a pass runs data parallel."""
    from azure.ai.ml import PyTorchDistribution
    from azure.ai.ml.entities import JobResourceConfiguration

    instances = instance_count if data_parallel else 1
    res_kwargs = {k: resources[k] for k in ("instance_type", "shm_size", "docker_args") if k in resources}
    job_resources = JobResourceConfiguration(instance_count=instances, **res_kwargs)
    if data_parallel and (instances > 1 or processes_per_node > 1):
        return PyTorchDistribution(process_count_per_instance=processes_per_node), job_resources
    return None, job_resources


def environment_variables(*, reads_hub: bool, hf_token: bool, extra: dict[str, str] | None) -> dict[str, str]:
    """The job's environment: unbuffered output; the hub endpoint the client pinned references on (HF_ENDPOINT,
    when the client sets one: a mirror) for a job that reads the hub, else the hub off; then `extra`."""
    env_vars = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if reads_hub or hf_token:
        if os.environ.get("HF_ENDPOINT"):
            env_vars["HF_ENDPOINT"] = os.environ["HF_ENDPOINT"]
    else:
        env_vars["HF_HUB_OFFLINE"] = "1"  # nothing to read from the hub: jobs read models from inputs only
    env_vars.update(extra or {})
    return env_vars
