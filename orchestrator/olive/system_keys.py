"""Olive's system keys: its older Docker / PythonEnvironment spellings brought to orch's SystemConfig, and the
execution providers taken from the target system's accelerators (refused now where orch cannot build for them).
"""

from __future__ import annotations

from typing import Any

from orchestrator.olive.unsupported import NO_NPU

BUILDABLE_EPS = ("CPUExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider", "WebGpuExecutionProvider")
DEFAULT_EP = {"cpu": "CPUExecutionProvider", "gpu": "CUDAExecutionProvider", "cuda": "CUDAExecutionProvider"}


_DOCKER_IMAGE_KEYS = (
    "image_name",
    "dockerfile",
    "build_context_path",
    "build_args",
    "run_params",
    "base_image",
    "conda_file_path",
)


def system_spellings(raw: dict[str, Any], reader: Any) -> None:
    """Olive's system spellings: a Docker system's image keys at its top level (or local_docker_config) go to
    docker_config; a PythonEnvironment's olive_managed_env / requirements_file are Olive's venv management."""
    systems = raw.get("systems")
    if not isinstance(systems, dict):
        return
    for name, sys_cfg in systems.items():
        if not isinstance(sys_cfg, dict):
            continue
        kind = str(sys_cfg.get("type", ""))
        if kind == "Docker":
            legacy = sys_cfg.pop("local_docker_config", None)
            moved = {k: sys_cfg.pop(k) for k in _DOCKER_IMAGE_KEYS if k in sys_cfg}
            if isinstance(legacy, dict):
                moved = {**legacy, **moved}
            if moved:
                target = sys_cfg.setdefault("docker_config", {})
                if isinstance(target, dict):
                    for k, v in moved.items():
                        target.setdefault(k, v)
                    reader.notes.append(f"systems.{name}: {', '.join(moved)} read as docker_config")
        if sys_cfg.get("olive_managed_env") is not None:
            managed = sys_cfg.pop("olive_managed_env")
            if managed:
                reader.notes.append(
                    f"systems.{name}.olive_managed_env: accepted; orch builds the environment each "
                    "pass needs itself (environments/*.conda.yaml, side venvs on first use)"
                )
        if kind == "LocalSystem" and "requirements_file" in sys_cfg:
            req = sys_cfg.pop("requirements_file")
            reader.notes.append(
                f"systems.{name}.requirements_file {req}: accepted, not installed (orch's passes run "
                "in their own environments; for a prepared interpreter set python_environment_path)"
            )


def execution_providers(raw: dict[str, Any], reader: Any) -> None:
    """Olive takes the execution providers from the target system's accelerators; so does orch, when
    engine.execution_providers does not set them. A gpu accelerator without a list means CUDA, as in Olive."""
    engine = raw.get("engine")
    systems = raw.get("systems")
    if not isinstance(engine, dict) or engine.get("execution_providers") or not isinstance(systems, dict):
        return
    target = engine.get("target") or engine.get("host")
    system = systems.get(target) if isinstance(target, str) else None
    if not isinstance(system, dict):
        return
    accelerators = system.get("accelerators")
    if not isinstance(accelerators, list):
        return
    eps: list[str] = []
    for acc in accelerators:
        if isinstance(acc, str):
            acc = {"device": acc}
        if not isinstance(acc, dict):
            return
        listed = acc.get("execution_providers")
        if isinstance(listed, list):
            eps += [ep for ep in listed if isinstance(ep, str) and ep not in eps]
        elif str(acc.get("device", "cpu")).lower() in DEFAULT_EP:
            ep = DEFAULT_EP[str(acc.get("device", "cpu")).lower()]
            if ep not in eps:
                eps.append(ep)
    unbuildable = [ep for ep in eps if ep not in BUILDABLE_EPS]
    if unbuildable:  # said now, not after the passes before ModelBuilder ran
        reader.problem(
            ["systems", target, "accelerators"],
            f"execution provider(s) {', '.join(unbuildable)}: orch builds models for "
            f"{', '.join(BUILDABLE_EPS)} ({NO_NPU})",
        )
        return
    if eps and eps != ["CPUExecutionProvider"]:
        engine["execution_providers"] = eps
        reader.notes.append(f"execution providers from systems.{target}.accelerators: {', '.join(eps)}")
