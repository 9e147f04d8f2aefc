"""Which device and execution providers each step gets on this host, and what is refused or said about it.

A workflow written for a GPU may meet a host without one: a CUDA-only pass is refused before anything runs (one
line, what to use instead), the other passes run in their CPU environment and the evaluation on the CPU execution
provider, each said once in a note; never a GPU environment built for a machine that cannot use it. Systems on
Azure ML bring their own devices and are left as configured. The engine asks here for a job's accelerator and
execution providers (they key the cache), and the pre-flight for the refusals and notes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestrator.core.gpu import cuda_available, wants_gpu
from orchestrator.engine.plan import for_accelerator, initial_steps
from orchestrator.engine.preflight_error import PreflightError
from orchestrator.engine.steps import Step
from orchestrator.passes.registry import load_pass
from orchestrator.systems.base import System
from orchestrator.systems.registry import is_azureml


def on_azureml(systems: dict[str, Any], name: str) -> bool:
    """A system, by workflow name (its type) or by keyword, runs on Azure ML, which brings its own devices."""
    sys_cfg = systems.get(name)
    kind = str(sys_cfg.model_dump(mode="json").get("type", "")) if sys_cfg is not None else name
    return is_azureml(kind)


class HostDevices:
    """The devices of one run's systems as this machine sees them: `system` builds a system by name (the
    engine's, so each is built once)."""

    def __init__(self, wf: Any, host_name: str, target_name: str, system: Callable[[str], System]) -> None:
        self.wf = wf
        self.host_name = host_name
        self.target_name = target_name
        self.system = system

    def check(self, note: Callable[[str], None]) -> None:
        """A system on this host that asks for a GPU this host lacks: a CUDA-only pass is refused now (one line,
        what to use instead), the others run on CPU in their CPU environment, said once. Never a GPU environment
        built (CUDA wheels downloaded) for a machine that cannot use it."""
        said: set[str] = set()
        for step in initial_steps(self.wf, self.host_name, self.target_name):
            if step.role != "host" or not self.on_this_host(step.system_name):
                continue
            pass_cls = load_pass(step.pass_type)
            req = pass_cls().requirements(pass_cls.Config.model_validate(step.config))
            if req.cuda and not cuda_available():
                why = req.without_cuda or f"{step.pass_type} needs a CUDA GPU; run it on a GPU system"
                raise PreflightError(f"passes.{step.name} ({step.pass_type}): {why}")
            if step.system_name in said or not self.gpu_missing(step.system_name):
                continue
            said.add(step.system_name)
            env = for_accelerator(req.environment, "cpu")
            moved = f" (environment {req.environment} -> {env})" if env != req.environment else ""
            note(
                f"system {step.system_name!r} asks for a GPU and this host has no CUDA GPU: its passes run on the "
                f"CPU{moved}; run on a GPU host (or --host aml) for the GPU path"
            )
        steps = initial_steps(self.wf, self.host_name, self.target_name)
        for step in steps:
            if step.role == "host" and self.step_providers(step) != self.providers():
                note(
                    f"passes.{step.name} ({step.pass_type}) times the model with CUDAExecutionProvider and this host "
                    "has no CUDA GPU: it runs on CPUExecutionProvider (its timings are the CPU's)"
                )
        evaluates = any(s.role == "target" for s in steps)
        if evaluates and self.cpu_evaluation():
            note(
                f"target {self.target_name!r} evaluates with CUDAExecutionProvider and this host has no CUDA GPU: "
                "the evaluation runs on CPUExecutionProvider (its latency is the CPU's); run on a GPU host for CUDA"
            )

    def cpu_evaluation(self) -> bool:
        """The target evaluates with CUDA (its first execution provider) on this host, which has no CUDA GPU:
        evaluation runs on the CPU execution provider instead (said once in check)."""
        return (
            self.providers()[0] == "CUDAExecutionProvider"
            and self.on_this_host(self.target_name)
            and not cuda_available()
        )

    def step_providers(self, step: Step) -> list[str]:
        """The execution providers a step's job gets: the engine's, but the CPU for an evaluation that would ask
        this GPU-less host for CUDA (the passes still build for the configured providers)."""
        if step.role == "target" and self.cpu_evaluation():
            return ["CPUExecutionProvider"]
        providers = self.providers()
        measures = step.role == "host" and getattr(load_pass(step.pass_type), "runs_model_on_provider", False)
        cuda_missing = providers[0] == "CUDAExecutionProvider" and not cuda_available()
        if measures and cuda_missing and self.on_this_host(step.system_name):
            return ["CPUExecutionProvider"]
        return providers

    def gpu_missing(self, system_name: str) -> bool:
        """The system asks for a GPU (its first accelerator, as Olive reads it), runs on this host (not Azure ML)
        and this host has no usable CUDA device."""
        accs = getattr(self.system(system_name), "accelerators", None) or ["cpu"]
        return wants_gpu(accs[:1]) and self.on_this_host(system_name) and not cuda_available()

    def on_this_host(self, system_name: str) -> bool:
        """Local and Docker systems use this machine's devices; Azure ML brings its own."""
        return not on_azureml(self.wf.systems, system_name)

    def accelerator(self, system_name: str) -> str:
        """The device a job runs on: the system's first accelerator decides, as Olive's does; a GPU asked on
        this host without one is the CPU (`check` said so, or refused a CUDA-only pass)."""
        accs = getattr(self.system(system_name), "accelerators", None) or ["cpu"]
        if not wants_gpu(accs[:1]) or self.gpu_missing(system_name):
            return "cpu"
        return "gpu"

    def providers(self) -> list[str]:
        """The workflow's execution providers (engine.execution_providers), the CPU's when none are given."""
        return list(getattr(self.wf.engine, "execution_providers", None) or ["CPUExecutionProvider"])
