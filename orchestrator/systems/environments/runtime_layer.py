"""orch's runtime layer: the packages orch's own code imports inside a job, added to a user's conda.yaml at fixed
pins (or refused beside a pin that cannot live with them), so that every job environment runs orch whatever the
user's file brings for the passes."""

from __future__ import annotations

from dataclasses import replace

from packaging.utils import canonicalize_name

from orchestrator.systems.environments.spec import EnvSpec, EnvSpecError

# orch's runtime layer: what orch's own code imports inside a job (the runner, the Azure ML driver, the workspace cache,
# MLflow tracking, Key Vault secrets), pinned to versions that install together. orch's source itself travels with
# the job (the code snapshot: the client's version); the user's conda file brings what the passes run on. The layer
# is added to it (`compose_runtime`), never silently swapped for a user's pin: a pin that cannot live beside it is
# refused at submit, naming the file. Docker jobs need the first group; Azure ML jobs all of it.
RUNTIME_LAYER: dict[str, str] = {
    "pydantic": "pydantic==2.14.3",
    "pyyaml": "pyyaml==6.0.3",
    "filelock": "filelock==4.2.12",
    "rich": "rich==15.0.0",
    "typer": "typer==0.29.2",
    "mlflow-skinny": "mlflow-skinny==3.17.2",
}
AZUREML_RUNTIME_LAYER: dict[str, str] = {
    **RUNTIME_LAYER,
    # azureml-mlflow 1.62 (Azure ML sets MLFLOW_TRACKING_URI=azureml://...) caps mlflow-skinny and azure-storage-blob
    "mlflow-skinny": "mlflow-skinny==3.15.0",
    "azureml-mlflow": "azureml-mlflow==1.62.0.post6",
    "azure-identity": "azure-identity==1.27.0",  # the job's identity: Key Vault, the workspace cache's datastore
    "azure-keyvault-secrets": "azure-keyvault-secrets==4.12.0",
    "azure-storage-blob": "azure-storage-blob==12.27.1",  # the workspace cache
    "matplotlib": "matplotlib==3.11.2",  # the driver publishes training.png
}
# Bounds a user's own pin must keep for the layer to install beside it (azureml-mlflow 1.62.0.post6's requirements).
LAYER_BOUNDS: dict[str, str] = {
    "mlflow-skinny": "<=3.15.0",
    "mlflow": "<=3.15.0",
    "azure-storage-blob": ">=12.5.0,<=12.27.1",
    "pydantic": ">=2.5,<3",
}
# Another name a requirement goes by for the layer (a user's full mlflow provides mlflow-skinny's modules).
LAYER_ALIASES: dict[str, tuple[str, ...]] = {"mlflow-skinny": ("mlflow",), "typer": ("typer-slim",)}
# Libraries that come with another one (its declared requirements): a pass needing the first is served by the second.
IMPLIED_BY: dict[str, tuple[str, ...]] = {
    "numpy": ("torch", "onnx", "onnxruntime", "transformers", "datasets", "matplotlib"),
    "safetensors": ("transformers", "peft", "accelerate"),
    "transformers": ("peft", "trl"),
    "accelerate": ("peft", "trl"),
    "datasets": ("trl",),
    "torch": ("peft", "accelerate"),
    "onnx": ("onnxscript", "onnx-ir"),
    "onnx-ir": ("onnxscript",),
    "compressed-tensors": ("llmcompressor",),
}
MIN_PYTHON = (3, 10)


def require_runtime_deps(spec: EnvSpec) -> None:
    """Refuse, before any build, a spec whose pip section lacks a package of RUNTIME_LAYER (or an alias of it):
    orch's source is mounted into the environment, not installed, so its imports must be there already."""
    have = spec.requirement_names()
    missing = [
        name for name in RUNTIME_LAYER
        if not any(canonicalize_name(n) in have for n in (name, *LAYER_ALIASES.get(name, ())))
    ]  # fmt: skip
    if missing:
        raise EnvSpecError(
            f"{spec.source}: dependencies.pip lacks orch's runtime deps {', '.join(missing)} "
            "(orch's source is mounted, not installed: add them to the pip section)"
        )


def compose_runtime(
    spec: EnvSpec, layer: dict[str, str], *, needs: dict[str, tuple[str, ...]] | None = None, what: str = ""
) -> EnvSpec:
    """The user's spec plus orch's runtime layer: each layer package the spec does not name is added at the layer's
    pin; one it names must keep the layer's bound. `needs` ({what needs them: libraries}) must all be in the
    result. Refusals are one EnvSpecError naming the file and what to change (`what` names the config key)."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    where = f"{what} ({spec.source})" if what else str(spec.source)
    if tuple(int(x) for x in spec.python_minor.split(".")) < MIN_PYTHON:
        raise EnvSpecError(f"{where}: python={spec.python}, orch's runtime needs python>=3.10: set python=3.11")
    own: dict[str, Requirement] = {}
    for req in spec.pip_requirements:
        try:
            r = Requirement(req)
        except Exception:  # noqa: BLE001 - URLs / VCS requirements: named by #egg= or not at all
            continue
        own[canonicalize_name(r.name)] = r
    for name, bound in LAYER_BOUNDS.items():
        r = own.get(name)
        pinned = [sp.version for sp in (r.specifier if r else []) if sp.operator in ("==", "===")]
        if r is None or not pinned or SpecifierSet(bound).contains(pinned[0], prereleases=True):
            continue
        by_mlflow = name in ("mlflow", "mlflow-skinny", "azure-storage-blob")
        if by_mlflow and "azureml-mlflow" not in layer:
            continue  # the bound is azureml-mlflow's: only Azure ML's layer has it
        needer = layer["azureml-mlflow"] if by_mlflow else "orch"
        raise EnvSpecError(
            f"{where}: {r} cannot be installed beside orch's runtime layer ({needer} needs {name}{bound}): "
            f"pin {name}{_best(bound)} in that file"
        )
    added = []
    for name, pin in layer.items():
        if name in own or any(a in own for a in LAYER_ALIASES.get(name, ())):
            continue
        added.append(pin)
    have = set(own) | {canonicalize_name(Requirement(p).name) for p in added}
    if needs:
        missing: dict[str, list[str]] = {}
        for who, libs in needs.items():
            for lib in libs:
                lib = canonicalize_name(lib)
                if lib not in have and not any(canonicalize_name(p) in have for p in IMPLIED_BY.get(lib, ())):
                    missing.setdefault(lib, []).append(who)
        if missing:
            names = ", ".join(missing)
            users = sorted({w for ws in missing.values() for w in ws})
            raise EnvSpecError(
                f"{where}: lacks {names}, which {', '.join(users)} import{'s' if len(users) == 1 else ''} in the job: "
                "add them (pinned) to the pip section of that file"
            )
    if not added:
        return spec
    return replace(spec, pip_requirements=(*spec.pip_requirements, *added))


def _best(bound: str) -> str:
    """The pin a bound suggests: its upper end (==X for <=X), else the bound itself."""
    for part in bound.split(","):
        if part.startswith("<="):
            return "==" + part[2:]
    return bound
