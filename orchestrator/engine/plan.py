"""Planning: the steps a workflow makes (its passes, then the evaluator on the target) and each step's cache key.

Cache key of a pass = hash(pass type, pass version + code hash, normalized config, input model identity, the
content of the data it names, the environment's library versions, accelerator, processes, providers). What a
pass's config means (its data, its held-out rows) the pass says itself (Pass.data_refs / held_out).
"""

from __future__ import annotations

from typing import Any

from orchestrator.core.cache import stable_hash
from orchestrator.core.job import Job
from orchestrator.engine.steps import EVALUATE, INPUT_EVAL_STEP, Step
from orchestrator.passes.base import Pass, PassConfig
from orchestrator.passes.registry import load_pass


def code_hash(pass_cls: type) -> str:
    """The pass's module and every orchestrator module it imports (a changed helper must miss the cache)."""
    from orchestrator.core.code_identity import code_hash as _hash

    return _hash(pass_cls.__module__)


def environment_for(job: Job) -> str:
    """The environment family a job's pass asks for (cpu-export, cpu-train, gpu-train): systems that build
    images use it when the workflow names no environment. Keeps systems from importing passes."""
    pass_cls = load_pass(job.pass_type)
    env = pass_cls().requirements(pass_cls.Config.model_validate(job.pass_config)).environment
    return for_accelerator(env, job.accelerator)


def for_accelerator(environment: str, accelerator: str) -> str:
    """A gpu-* family's CPU sibling (gpu-quantize -> cpu-quantize) for a job on a CPU, when there is one: its
    torch is the CPU build, so a CPU system never installs CUDA wheels it cannot use."""
    from orchestrator.systems.environments.spec import ENVIRONMENTS_DIR

    if accelerator == "cpu" and environment.startswith("gpu-"):
        sibling = "cpu-" + environment.removeprefix("gpu-")
        if (ENVIRONMENTS_DIR / f"{sibling}.conda.yaml").exists():
            return sibling
    return environment


def evaluator_config(wf: Any) -> dict[str, Any] | None:
    """The evaluation step's config: the Evaluate pass builds it from the evaluator's metrics and the rows
    a training pass held out of the metrics' data (the engine reads neither pass's keys)."""
    name = getattr(wf.engine, "evaluator", None)
    if not name:
        return None
    ev = wf.evaluators[name]
    metrics = [m.model_dump(mode="json", exclude_none=True) for m in ev.metrics]
    data_names = {m.get("data_config") for m in metrics}
    held = None
    for entry in wf.passes.values():
        held = load_pass(entry.type).held_out(entry.config or {})
        if held is not None and held.data_config in data_names:
            break
        held = None
    return load_pass(EVALUATE).evaluator_config(metrics, held)


def initial_steps(wf: Any, host: str, target: str) -> list[Step]:
    """The workflow's passes on the host, in order, then evaluation on the target (and the input's baseline)."""
    steps = [Step(name, entry.type, dict(entry.config or {}), "host", host) for name, entry in wf.passes.items()]
    evaluator = evaluator_config(wf)
    if evaluator is not None:
        steps.append(Step("evaluate", EVALUATE, evaluator, "target", target))
        if getattr(wf.engine, "evaluate_input_model", False):
            # Olive's baseline: the same metrics on the same rows for the model the workflow starts from
            baseline = load_pass(EVALUATE).baseline_config(evaluator)
            steps.insert(0, Step(INPUT_EVAL_STEP, EVALUATE, baseline, "target", target))
    return steps


def step_key(
    pass_type: str,
    pass_cls: type[Pass],
    config: PassConfig,
    prev: str,
    data_hashes: list[str],
    env: dict[str, str],
    *,
    accelerator: str,
    processes: int,
    providers: list[str],
) -> str:
    """A step's cache key: everything its output depends on (see the module's docstring)."""
    return stable_hash(
        {
            "pass": pass_type,  # the workflow's type name (two names may share one class)
            "pass_version": pass_cls.version,
            "code": code_hash(pass_cls),
            "config": pass_cls.key_config(config),
            "input": prev,
            "data": data_hashes,
            "env": env,
            "accelerator": accelerator,
            "processes": processes,
            "providers": providers,
        }
    )[:32]
