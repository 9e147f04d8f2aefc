"""orch as a package, as users get it from an index: a wheel built from this checkout, installed into a fresh
venv, runs `orch --version` and `orch demo --tiny` in an empty folder and finds its conda environments and the
demo's jobs (package data); every distribution orch imports is declared in pyproject; a submit-only install stays
light; nothing POSIX-only is imported at module level (Windows clients).

The fresh venv holds the wheel and nothing else of orch: its dependencies come from the shared venv through a
.pth line (installing 2 GB again would test pip, not orch). A .pth line adds a folder to sys.path without running
that folder's own .pth files, so the checkout's editable install is not seen: `import orchestrator` is the wheel's.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "orchestrator"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
POSIX_ONLY = ("fcntl", "termios", "pwd", "grp", "resource", "pty", "tty")
# imports of libraries that live only in a pass's own environment (LocalSystem builds it as a venv, Docker and
# Azure ML as an image from that conda file), never in orch's install: module -> (distribution, environment)
SIDE_ENVIRONMENT_IMPORTS = {
    "llmcompressor": ("llmcompressor", "cpu-quantize"),
    "compressed_tensors": ("compressed-tensors", "cpu-quantize"),
    "neural_compressor": ("neural-compressor", "cpu-inc"),
    "bitsandbytes": ("bitsandbytes", "gpu-train"),
    "liger_kernel": ("liger-kernel", "gpu-train"),
}
# imports that are optional by design, each with why
OPTIONAL_IMPORTS = {
    "olive": "a user's Olive data script may import olive's Registry; orch registers without it (schema.user_script)",
    "click": "only for typer < 0.20, which depends on click itself (typer >= 0.20 vendors it)",
    "triton": "torch's CUDA wheels bring it (gpu-train); lora.kernels runs only on CUDA, the CPU wheel has none",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(requirement: str) -> str:
    return _norm(re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0])


def declared() -> dict[str, set[str]]:
    """'core' and each extra -> the distribution names it requires (self-references like orch[...] left out)."""
    project = PYPROJECT["project"]
    out = {"core": {_req_name(r) for r in project["dependencies"]}}
    for extra, reqs in project["optional-dependencies"].items():
        out[extra] = {_req_name(r) for r in reqs if not r.startswith("orch[")}
    return out


def imported_modules() -> dict[str, set[str]]:
    """Dotted names of every non-stdlib, non-orch module imported anywhere in orchestrator/ -> files."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "orchestrator":
                    found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    return found


def providing_distributions(module: str, candidates: list[str]) -> list[str]:
    """The candidate distributions that ship the module's file (azure, mlflow: several share a top-level name, and
    mlflow-skinny and mlflow-tracing both ship mlflow/__init__.py)."""
    if len(candidates) == 1:
        return candidates
    spec = importlib.util.find_spec(module)
    origin = Path(spec.origin if spec and spec.origin else "").resolve()
    return [
        name
        for name in candidates
        if any(Path(importlib.metadata.distribution(name).locate_file(f)).resolve() == origin
               for f in importlib.metadata.distribution(name).files or [])
    ]  # fmt: skip


def test_every_imported_distribution_is_declared() -> None:
    deps = declared()
    everything = set().union(*deps.values())
    top_to_dists = importlib.metadata.packages_distributions()
    envs = {p.name.removesuffix(".conda.yaml"): p for p in (REPO / "environments").glob("*.conda.yaml")}
    problems = []
    for module, files in sorted(imported_modules().items()):
        top = module.split(".")[0]
        where = sorted(files)[0]
        if top in OPTIONAL_IMPORTS:
            continue
        if top in SIDE_ENVIRONMENT_IMPORTS:
            dist, env = SIDE_ENVIRONMENT_IMPORTS[top]
            pins = yaml.safe_load(envs[env].read_text())["dependencies"][-1]["pip"]
            if not any(_req_name(p) == _norm(dist) for p in pins if not p.startswith("-")):
                problems.append(f"{module} ({where}): {dist} not in environments/{env}.conda.yaml")
            continue
        candidates = top_to_dists.get(top)
        if not candidates:
            problems.append(f"{module} ({where}): not installed and not a known side-environment import")
            continue
        dists = providing_distributions(module, candidates)
        if not any(_norm(d) in everything for d in dists):
            problems.append(f"{module} ({where}): none of {dists or candidates} is declared in pyproject")
    assert problems == [], "\n".join(problems)


def test_the_extras_hints_name_the_extra_that_brings_each_library() -> None:
    from orchestrator.core.extras import EXTRA_OF, install_hint

    deps = declared()
    wrong = {mod: (dist, extra) for mod, (dist, extra) in EXTRA_OF.items() if _norm(dist) not in deps.get(extra, ())}
    assert wrong == {}
    assert install_hint("onnxruntime_genai.models.builder") == "needs onnxruntime-genai: pip install 'orch[onnx]'"
    assert install_hint("azure.ai.ml.entities") == "needs azure-ai-ml: pip install 'orch[azure]'"
    assert install_hint("not_a_library") is None


def test_a_submit_only_install_stays_light(tmp_path: Path) -> None:
    """`pip install 'orch[azure]'` is the core + the Azure SDK: MLflow's client (mlflow-skinny), no full mlflow
    (its server and UI: Flask, scikit-learn, pyarrow, ~880 MB), no torch or onnxruntime. And the submit path
    imports none of them: `orch submit --help` and the modules submit runs, with those libraries absent.
    (Measured once by hand: a venv of the core + azure extra is 328 MB, and logs, registers and submits.)"""
    deps = declared()
    light = deps["core"] | deps["azure"]
    assert "mlflow-skinny" in deps["core"] and "mlflow" not in light
    assert not light & {"torch", "transformers", "onnxruntime", "onnxruntime-genai", "docker", "flask", "pyarrow"}
    assert "mlflow" in deps["ui"]
    absent = ("torch", "transformers", "peft", "onnxruntime", "onnx", "docker", "flask", "pandas", "sklearn")
    code = (
        "import sys\n"
        f"for m in {absent!r}: sys.modules[m] = None\n"
        "import orchestrator.engine.aml_driver, orchestrator.systems.azureml.system, orchestrator.cli.azure\n"
        "from orchestrator.cli import run_cli\n"
        "sys.exit(run_cli(['submit', '--help']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.returncode == 0 and "Queue the workflow" in proc.stdout, proc.stderr[-2000:]


def test_no_posix_only_module_is_needed_to_import_orch(tmp_path: Path) -> None:
    """Windows has no fcntl, termios, pwd...: with them absent every orch module imports, `orch --help` runs and
    a file copy falls back from the reflink ioctl to bytes."""
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: a function may import them where they exist
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])  # fmt: skip
            assert not [n for n in names if n.split(".")[0] in POSIX_ONLY], f"{path}: {names}"
    (tmp_path / "a.bin").write_bytes(b"x" * 5000)
    code = (
        "import sys, importlib, pkgutil, pathlib\n"
        f"for m in {POSIX_ONLY!r}: sys.modules[m] = None\n"
        "import orchestrator\n"
        "for info in pkgutil.walk_packages(orchestrator.__path__, 'orchestrator.'):\n"
        "    if not info.name.endswith('__main__'): importlib.import_module(info.name)\n"
        "from orchestrator.core.fs import copy_file\n"
        "copy_file('a.bin', 'b.bin')\n"
        "assert pathlib.Path('b.bin').read_bytes() == pathlib.Path('a.bin').read_bytes()\n"
        "from orchestrator.cli import run_cli\n"
        "sys.exit(run_cli(['--help']))\n"
    )
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---- the wheel -------------------------------------------------------------------------------------------------
def checkout_copy(dest: Path) -> Path:
    """The files a clone has (tracked + new, not ignored), copied: the build writes build/ and *.egg-info there."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = checkout_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
         str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("orch-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A fresh venv with the wheel installed (pip's own installer, no deps) and the shared venv's site-packages
    on its path for the dependencies."""
    root = tmp_path_factory.mktemp("venv") / "v"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
         str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(site, "zz-shared-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


def wheel_env() -> dict[str, str]:
    """No PYTHONPATH (the checkout must not be importable) and no developer MLflow / Azure settings."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("MLFLOW_", "AZURE"))}


def test_the_wheel_carries_the_code_the_environments_and_the_demo_job(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")}
    assert modules - names == set()
    envs = {f"orchestrator/environments/{p.name}" for p in (REPO / "environments").glob("*.conda.yaml")}
    assert envs and envs <= names
    job = {"config.json", "smollm2.json", "make_dataset.py"}
    assert {f"orchestrator/jobs/tone-classification/{n}" for n in job} <= names
    assert not [n for n in names if n.startswith(("tests/", "jobs/", "environments/")) or "/outputs/" in n]
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(meta).decode()
    assert "Project-URL: Source" in metadata and "Classifier: Operating System :: Microsoft :: Windows" in metadata
    requires = [ln.split(":", 1)[1].strip() for ln in metadata.splitlines() if ln.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("mlflow-skinny") for r in core) and not any(re.match(r"mlflow\b(?!-)", r) for r in core)


def test_the_installed_wheel_runs_the_demo_in_an_empty_folder(venv: Path, tmp_path: Path) -> None:
    from orchestrator import __version__

    orch = venv / "bin" / "orch"
    python = venv / "bin" / "python"
    where = subprocess.run([str(python), "-c", "import orchestrator; print(orchestrator.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, env=wheel_env(), check=True).stdout.strip()  # fmt: skip
    assert where.startswith(str(venv)), where  # the wheel's code, not the checkout's

    version = subprocess.run([str(orch), "--version"], cwd=tmp_path, capture_output=True, text=True, env=wheel_env())
    assert version.returncode == 0 and version.stdout.strip() == f"orch {__version__}", version.stderr

    code = "from orchestrator.systems.environments.spec import resolve_env_file as r; print(r('cpu-train'))"
    found = subprocess.run(
        [str(python), "-c", code],
        cwd=tmp_path, capture_output=True, text=True, env=wheel_env(),
    )  # fmt: skip
    assert found.returncode == 0 and found.stdout.strip().startswith(str(venv)), found.stdout + found.stderr

    work = tmp_path / "empty"
    work.mkdir()
    demo = subprocess.run([str(orch), "demo", "--tiny"], cwd=work, capture_output=True, text=True, env=wheel_env(),
                          timeout=900)  # fmt: skip
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-4000:]
    job = work / "jobs" / "tone-classification"
    assert (job / "outputs" / "model" / "genai_config.json").is_file()
    assert {p.name for p in (work / "environments").glob("*.conda.yaml")} >= {"cpu-train.conda.yaml"}
    assert "sample generation:" in demo.stdout
    row = next(ln for ln in demo.stderr.splitlines() if ln.startswith("│ accuracy-accuracy"))  # the demo's table
    assert len(re.findall(r"\d\.\d+|\b[01]\b", row)) == 2, row  # before and after both filled

    # the demo's job is there to run as README says, from that folder
    again = subprocess.run([str(orch), "run", "--config", "jobs/tone-classification/config.json", "--dry-run"],
                           cwd=work, capture_output=True, text=True, env=wheel_env(), timeout=300)  # fmt: skip
    assert again.returncode == 0 and "0 pass(es) would run" in again.stdout, again.stdout + again.stderr
    manifest = json.loads((job / "outputs" / "manifest.json").read_text())
    assert [p["name"] for p in manifest["passes"]][0] == "evaluate_input"


def test_the_checkout_still_reads_its_own_files() -> None:
    """In a clone, environments/ and jobs/ of the repository are the ones used (what README names)."""
    from orchestrator.core.shipped import demo_job_dir, is_checkout
    from orchestrator.systems.environments.spec import ENVIRONMENTS_DIR

    assert is_checkout() and ENVIRONMENTS_DIR == REPO / "environments"
    assert demo_job_dir(create=False) == REPO / "jobs" / "tone-classification"
