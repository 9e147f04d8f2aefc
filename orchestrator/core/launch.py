"""How a system starts the runner: one process, or torchrun with N data-parallel processes per node.

One code path for N = 1 and N > 1: the command differs only in the launcher in front of `-m orchestrator.runner`.
LocalSystem and DockerSystem run `runner_command(...)`; AzureMLSystem does not use torchrun but asks Azure ML for
the same shape (PyTorchDistribution(process_count_per_instance=N), instance_count=M), whose launcher sets the same
RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT variables torchrun would, so the runner cannot tell them
apart. Under either, every rank runs the pass and rank 0 alone writes result.json / events.jsonl (see runner.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from orchestrator.core.gpu import visible_cuda_gpus, wants_gpu
from orchestrator.core.job import JOB_FILE, Job

ProcessesPerNode = Annotated[int, Field(ge=1)] | Literal["auto"]


def runner_command(
    job: Job, python: str, job_path: str | Path | None = None, *, rdzv_endpoint: str | None = None
) -> list[str]:
    """argv that runs `job`: plain `python -m orchestrator.runner` for one process on one node, else torchrun.

    `job_path` is the job file as the launched process sees it (default <output_dir>/job.json). One node uses
    torchrun's standalone rendezvous (a free local port, so concurrent jobs never collide); several nodes need the
    c10d `rdzv_endpoint` (host:port of node 0) that the cluster provides.
    """
    path = str(job_path) if job_path is not None else str(Path(job.output_dir) / JOB_FILE)
    runner = ["-m", "orchestrator.runner", "--job", path]
    n, nodes = job.processes_per_node, job.nodes
    if n == 1 and nodes == 1:
        return [python, *runner]
    launcher = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--nnodes", str(nodes)]
    if nodes == 1:
        launcher.append("--standalone")
    else:
        if not rdzv_endpoint:
            raise ValueError(f"job {job.job_id}: {nodes} nodes need a rendezvous endpoint (host:port of node 0)")
        launcher += ["--rdzv_backend", "c10d", "--rdzv_endpoint", rdzv_endpoint, "--rdzv_id", job.job_id]
    # a failing rank ends the job at once (no elastic restarts: a rerun is the engine's decision)
    return [*launcher, "--max_restarts", "0", *runner]


def resolve_processes(setting: ProcessesPerNode, accelerators: Iterable[Any] | None, *, data_parallel: bool) -> int:
    """Processes per node for one pass: 1 unless the pass is data-parallel; "auto" = visible GPUs when the
    system's accelerators ask for a GPU, else 1 (CPU data parallel is for tests: set an integer)."""
    if not data_parallel:
        return 1
    if setting == "auto":
        return max(1, visible_cuda_gpus()) if wants_gpu(accelerators) else 1
    return int(setting)
