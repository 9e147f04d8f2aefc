"""Every conda file in environments/ holds what the code that runs in it imports.

Two checks, both against the real files:
- statically, for every environment: the third-party imports of the modules that run there (AST of the module and
  of every orchestrator module it imports, function-level imports included) are all listed in the conda file;
- really, for the environments that build here (CPU ones): the modules are imported inside the built image, with
  orch's source mounted as Docker and Azure ML provide it. cpu-train / cpu-export use DockerSystem's images (the
  ones tests/test_docker.py builds), aml-cpu the Azure stand-in's build of the Environment (tests/test_azureml.py).
  gpu-train / gpu-quantize need the CUDA package index, which this machine cannot reach: static check only.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENVIRONMENTS = REPO / "environments"
PASSES = "orchestrator.passes."
RUNNER = ["orchestrator.runner"]
DRIVER = ["orchestrator.cli", "orchestrator.engine.aml_driver", "orchestrator.engine", "orchestrator.engine.plots"]
AML_JOB = ["azureml.mlflow", "azure.identity", "azure.keyvault.secrets"]  # azureml:// tracking, Key Vault
CPU_TRAIN = [PASSES + "training.lora.train", PASSES + "training.merge"]
CPU_EXPORT = [PASSES + "onnx.model_builder", PASSES + "quantization.quantize", PASSES + "evaluation.evaluate"]
# Which code runs in which environment (passes by their requirements().environment; the driver job runs all).
RUNS_IN: dict[str, list[str]] = {
    "cpu-train": RUNNER + CPU_TRAIN,
    "cpu-export": RUNNER + CPU_EXPORT,
    "aml-cpu": RUNNER + DRIVER + CPU_TRAIN + CPU_EXPORT + AML_JOB,
    "gpu-train": RUNNER + DRIVER + CPU_TRAIN + [PASSES + "training.lora.cuda", PASSES + "training.lora.fused"]
    + CPU_EXPORT
    + AML_JOB,
    "gpu-quantize": RUNNER + [PASSES + "quantization.awq_gptq"],
    "cpu-quantize": RUNNER + [PASSES + "quantization.awq_gptq"],  # its CPU sibling (the engine's for_accelerator)
    "cpu-inc": RUNNER + [PASSES + "quantization.inc_quantize"],  # neural-compressor's numpy<2 / onnx 1.16 pins
}
# import name -> distribution name, where they differ
DIST_OF = {
    "yaml": "pyyaml", "onnxruntime_genai": "onnxruntime-genai", "onnx_ir": "onnx-ir", "mlflow": "mlflow-skinny",
    "azure": None, "azureml": "azureml-mlflow", "llmcompressor": "llmcompressor", "liger_kernel": "liger-kernel",
    "compressed_tensors": "compressed-tensors", "google": None, "PIL": "pillow",
}  # fmt: skip
AZURE_DIST = {"azure.identity": "azure-identity", "azure.keyvault": "azure-keyvault-secrets",
              "azure.storage": "azure-storage-blob", "azure.core": "azure-core", "azure.ai": "azure-ai-ml"}  # fmt: skip
# Imported only behind a guard that turns their absence into a clear error or a fallback (checked by hand):
OPTIONAL = {"docker", "azure.ai", "azure.storage", "torch.distributed", "trustme", "olive"}  # olive: user scripts
# Reached statically but never called there: onnx_tools' genai / peft / torch helpers from IncDynamicQuantization
# (which only times and compares ONNX graphs; tests/test_session_tuning.py runs it in the built cpu-inc venv).
NOT_CALLED = {"cpu-inc": {"torch", "peft", "onnxruntime_genai"}}
# Only on CUDA (lora's fast path, imported when torch.cuda is available): needed in GPU environments only.
CUDA_ONLY = {"bitsandbytes", "liger_kernel"}
# Only in Azure ML jobs (a Key Vault reference is resolved with the job's identity): needed where jobs run on AML.
AML_ONLY = {"azure.identity", "azure.keyvault", "azureml"}
AML_ENVS = {"aml-cpu", "gpu-train"}
LOCAL = {"make_dataset"}  # the demo's data script, imported from jobs/ by `orch demo`
# Installed with what the file lists (a dependency of a listed package, never imported without it).
TRANSITIVE = {"click", "triton", "numpy", "safetensors", "huggingface_hub", "requests", "packaging", "jinja2",
              "tqdm", "jwt", "sentencepiece", "psutil", "urllib3", "ml_dtypes", "azure.core", "google",
              "pydantic_core", "pyarrow"}  # fmt: skip  (pyarrow comes with datasets)


def _env_names() -> list[str]:
    return sorted(p.name.removesuffix(".conda.yaml") for p in ENVIRONMENTS.glob("*.conda.yaml"))


def test_every_environment_and_pass_is_placed() -> None:
    """A new environment file or a new pass module must say where it runs (this table), or this fails."""
    assert sorted(RUNS_IN) == _env_names()
    from orchestrator.passes.registry import PASSES as TABLE

    placed = {m for mods in RUNS_IN.values() for m in mods}
    modules = {t.split(":")[0] for t in TABLE.values()}
    missing = sorted(modules - placed - {PASSES + "quantization.onnx_hqq"} - _cpu_export_extra())
    assert missing == [], f"pass modules not placed in any environment: {missing}"


def _cpu_export_extra() -> set[str]:
    """Pass modules that run in cpu-export besides the fixed list (ONNX passes added to the registry)."""
    from orchestrator.passes.registry import PASSES as TABLE

    return {t.split(":")[0] for t in TABLE.values()} - {m for mods in RUNS_IN.values() for m in mods}


def _top_imports(module: str, seen: set[str]) -> set[str]:
    """Third-party import names (dotted to the second level for azure.*) reached from an orchestrator module."""
    if module in seen:
        return set()
    seen.add(module)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return set()
    tree = ast.parse(Path(spec.origin).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module.startswith("orchestrator"):  # `from orchestrator.x import y` may name module y
                names += [f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")]
        for name in names:
            if name.startswith("orchestrator"):
                found |= _top_imports(name, seen)
            elif name.split(".")[0] not in sys.stdlib_module_names and name != "__future__":
                parts = name.split(".")
                found.add(".".join(parts[:2]) if parts[0] in ("azure", "torch", "matplotlib") else parts[0])
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _listed(conda: Path) -> set[str]:
    from orchestrator.systems.environments.spec import load_env_spec

    spec = load_env_spec(conda)
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in spec.pip_requirements}


def _dist(import_name: str) -> str | None:
    if import_name.startswith("azure."):
        return AZURE_DIST.get(import_name)
    top = import_name.split(".")[0]
    return DIST_OF.get(top, top.replace("_", "-").lower())


@pytest.mark.parametrize("env", _env_names())
def test_conda_file_lists_what_its_code_imports(env: str) -> None:
    listed = _listed(ENVIRONMENTS / f"{env}.conda.yaml")
    modules = RUNS_IN[env] + (sorted(_cpu_export_extra()) if env in ("cpu-export", "aml-cpu", "gpu-train") else [])
    needed: dict[str, str] = {}
    for module in modules:
        if not module.startswith("orchestrator"):
            needed[module] = module
            continue
        for name in _top_imports(module, set()):
            needed.setdefault(name, module)
    missing = {}
    for name, via in sorted(needed.items()):
        if name in OPTIONAL or name.split(".")[0] in TRANSITIVE or name in TRANSITIVE or name in LOCAL:
            continue
        if name.split(".")[0] in NOT_CALLED.get(env, set()):
            continue
        if (name in CUDA_ONLY and not env.startswith("gpu-")) or (name in AML_ONLY and env not in AML_ENVS):
            continue
        if name.startswith("torch.") or name.startswith("matplotlib."):
            name = name.split(".")[0]
        dist = _dist(name)
        if dist is not None and dist not in listed:
            missing[name] = f"{dist} (imported by {via})"
    assert missing == {}, f"environments/{env}.conda.yaml lacks: {missing}"


IMPORT_SCRIPT = """
import importlib, sys
failed = []
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
    except Exception as e:
        failed.append(f"{m}: {type(e).__name__}: {e}")
from importlib.metadata import entry_points
if "azureml.mlflow" in sys.argv[1:]:
    stores = {e.name for e in entry_points(group="mlflow.tracking_store")}
    if "azureml" not in stores:
        failed.append("mlflow has no azureml:// tracking store")
print("\\n".join(failed) or "all imported")
sys.exit(1 if failed else 0)
"""


def _run_imports(image: str, modules: list[str]) -> str:
    import docker

    client = docker.from_env(timeout=600)
    try:
        out = client.containers.run(
            image, ["python", "-c", IMPORT_SCRIPT, *modules], remove=True, network_mode="none",
            volumes={str(REPO / "orchestrator"): {"bind": "/src/orchestrator", "mode": "ro"}}, working_dir="/src",
            environment={"PYTHONPATH": "/src", "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"},
            user=f"{__import__('os').getuid()}:{__import__('os').getgid()}",
        )  # fmt: skip
    except docker.errors.ContainerError as e:
        raise AssertionError(f"imports failed in {image}:\n{e.container.logs().decode()[-3000:]}") from None
    return out.decode()


@pytest.mark.docker
@pytest.mark.parametrize("env", ["cpu-train", "cpu-export"])
def test_docker_image_imports_its_modules(env: str) -> None:
    from orchestrator.systems.docker.images import build_environment

    built = build_environment(env)  # DockerSystem's image of the file (reused when test_docker built it)
    modules = RUNS_IN[env] + (sorted(_cpu_export_extra()) if env == "cpu-export" else [])
    assert "all imported" in _run_imports(built.tag, modules)


@pytest.mark.docker
@pytest.mark.azure
def test_azureml_environment_imports_the_whole_workflow() -> None:
    """The aml-cpu Environment as the Azure stand-in builds it (as Azure ML would): the driver job's modules,
    every CPU pass, azureml-mlflow's tracking store and the Key Vault client import inside the image."""
    from tests.azure_standin.images import ImageBuilder

    lines: list[str] = []
    conda = (ENVIRONMENTS / "aml-cpu.conda.yaml").read_text()
    props = {"image": "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest", "condaFile": conda}
    built = ImageBuilder().ensure(props, "orch-aml-cpu", context_dir=None, log=lines.append)
    modules = RUNS_IN["aml-cpu"] + sorted(_cpu_export_extra())
    assert "all imported" in _run_imports(built.tag, modules)
