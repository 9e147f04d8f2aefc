"""The Azure ML Environment a job runs in, from the system's aml_docker_config: the user's conda file plus orch's
runtime layer on a base image (or a Dockerfile build context), named after the spec and versioned by its content
hash, looked up before it is created so it is registered once and reused by every job and every run. Kept apart
from the system so what decides the image (and the pass cache's fingerprint) is read in one place."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from orchestrator.core.fs import atomic_write_text
from orchestrator.systems.azureml.retries import with_retries
from orchestrator.systems.base import SystemFailure


def spec_of(docker_config: dict[str, Any]) -> dict[str, Any]:
    """What decides the image: base image + normalized conda spec, or the build context's content."""
    dc = docker_config
    if dc.get("build_context_path"):
        ctx = Path(dc["build_context_path"])
        h = hashlib.sha256()
        for p in sorted(ctx.rglob("*")):
            if p.is_file():
                h.update(p.relative_to(ctx).as_posix().encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
        return {"build": h.hexdigest(), "dockerfile": dc.get("dockerfile") or "Dockerfile", "name": ctx.name}
    image = dc.get("base_image") or dc.get("image_name")
    if not image:
        raise SystemFailure("AzureML system: give aml_docker_config.base_image + conda_file_path, or dockerfile")
    env = composed(docker_config)
    return {"image": image, "conda": env.hash(), "name": env.name}


def composed(docker_config: dict[str, Any], needs: dict[str, tuple[str, ...]] | None = None) -> Any:
    """The job environment: the user's conda file plus orch's runtime layer (what the runner and the driver
    import on the compute); without a conda file, python + the layer alone. Refused (EnvSpecError, one line
    naming the file) when a pin cannot live beside the layer, or when a pass's libraries are missing."""
    from orchestrator.systems.environments.runtime_layer import AZUREML_RUNTIME_LAYER, compose_runtime
    from orchestrator.systems.environments.spec import EnvSpec, load_env_spec

    dc = docker_config
    if dc.get("conda_file_path"):
        spec = load_env_spec(dc["conda_file_path"])
        what = "aml_docker_config.conda_file_path"
    else:
        spec = EnvSpec(source=Path("(no conda_file_path)"), name="orch-runtime", python="3.11",
                       conda_deps=("pip",), pip_requirements=())  # fmt: skip
        what = "aml_docker_config"
    return compose_runtime(spec, AZUREML_RUNTIME_LAYER, needs=needs, what=what)


def fingerprint(docker_config: dict[str, Any]) -> str:
    """The hash of the Azure ML Environment spec (the system's image + conda file)."""
    spec = spec_of(docker_config)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def ensure(ml: Any, docker_config: dict[str, Any]) -> str:
    """azureml:<name>:<hash> of the job environment, registered once (looked up before it is created)."""
    from azure.ai.ml.entities import BuildContext, Environment
    from azure.core.exceptions import ResourceNotFoundError

    spec = spec_of(docker_config)
    version = fingerprint(docker_config)[:16]
    name = re.sub(r"[^A-Za-z0-9_-]", "-", f"orch-{spec.get('name') or 'env'}").strip("-")[:200]
    try:
        env = with_retries(lambda: ml.environments.get(name, version=version), what="environment lookup")
    except ResourceNotFoundError:
        dc = docker_config
        if "build" in spec:
            entity = Environment(
                name=name, version=version,
                build=BuildContext(path=str(dc["build_context_path"]), dockerfile_path=spec["dockerfile"]),
            )  # fmt: skip
        else:
            conda = composed(docker_config).to_conda_yaml()
            entity = Environment(name=name, version=version, image=spec["image"], conda_file=_conda_file(conda))
        env = with_retries(lambda: ml.environments.create_or_update(entity), what="environment create")
    return f"azureml:{env.name}:{env.version}"


def _conda_file(text: str | None) -> str | None:
    """The SDK takes a conda file path; write the normalized conda yaml next to the code snapshots."""
    if text is None:
        return None
    import tempfile

    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"orch-conda-{digest}.yaml"
    if not path.exists():
        atomic_write_text(path, text)
    return str(path)
