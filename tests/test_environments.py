"""conda.yaml parsing/validation, host pip settings, loopback index serving and local venv realization."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest

from orchestrator.systems.environments.local_venv import realize_venv
from orchestrator.systems.environments.package_indexes import PipSettings, serve_local_indexes
from orchestrator.systems.environments.runtime_layer import require_runtime_deps
from orchestrator.systems.environments.spec import EnvSpecError, load_env_spec

REPO = Path(__file__).resolve().parents[1]
ENV_FILES = sorted((REPO / "environments").glob("*.conda.yaml"))

GOOD = """name: t
channels: [conda-forge]
dependencies:
  - python=3.11
  - pip
  - pip:
      - --extra-index-url https://example.invalid/simple
      - pydantic==2.14.3
      - pyyaml==6.0.3
      - filelock==4.2.12
      - mlflow-skinny==3.17.2
      - rich==15.0.0
      - typer==0.29.2
"""


def _write(tmp_path: Path, text: str, name: str = "env.conda.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# Deliberate departures from constraints.txt: llm-compressor 0.14 supports transformers 5.15-5.17 only;
# azureml-mlflow 1.62 (azureml:// tracking in Azure ML jobs) caps azure-storage-blob at 12.27.
OWN_PINS = {
    "gpu-quantize.conda.yaml": ("transformers",),
    "cpu-quantize.conda.yaml": ("transformers",),  # llm-compressor 0.14: transformers 5.15-5.17
    "cpu-inc.conda.yaml": ("onnx", "numpy", "setuptools"),  # neural-compressor 2.6: onnx<1.17, numpy<2
    "aml-cpu.conda.yaml": ("azure-storage-blob",),
    "gpu-train.conda.yaml": ("azure-storage-blob",),
}


def test_shipped_environments_are_valid_and_pinned_as_constraints() -> None:
    constraints = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, ver = line.split("==")
            constraints[name.strip().lower()] = ver.strip()
    assert {p.name for p in ENV_FILES} >= {"cpu-export.conda.yaml", "cpu-train.conda.yaml", "gpu-train.conda.yaml"}
    for path in ENV_FILES:
        spec = load_env_spec(path)
        require_runtime_deps(spec)
        assert spec.python == "3.11", path  # the default base image's python
        for req in spec.pip_requirements:
            name, _, ver = req.partition("==")
            assert ver, f"{path}: {req} is not pinned"
            if name.lower() in constraints and name.lower() not in OWN_PINS.get(path.name, ()):
                assert constraints[name.lower()] == ver, f"{path}: {req} vs constraints {constraints[name.lower()]}"
    gpu = load_env_spec(REPO / "environments" / "gpu-train.conda.yaml")
    assert {"bitsandbytes", "liger-kernel", "torch", "peft", "trl"} <= gpu.requirement_names()


def test_parse_keeps_pip_options_and_hash_ignores_file_location(tmp_path: Path) -> None:
    a = load_env_spec(_write(tmp_path, GOOD, "a.yaml"))
    b = load_env_spec(_write(tmp_path, GOOD, "b.yaml"))  # same content elsewhere: same hash
    assert a.pip_options == ["--extra-index-url", "https://example.invalid/simple"]
    assert a.python_minor == "3.11" and "pydantic==2.14.3" in a.pip_requirements
    assert a.hash() == b.hash()
    c = load_env_spec(_write(tmp_path, GOOD.replace("rich==15.0.0", "rich==14.0.0"), "c.yaml"))
    assert c.hash() != a.hash()
    # round trip for conda tools / Azure ML keeps the options in front of the requirements
    again = load_env_spec(_write(tmp_path, a.to_conda_yaml(prefix_pip_options=["--find-links", "/w"]), "d.yaml"))
    assert again.pip_options[:2] == ["--find-links", "/w"] and set(again.pip_requirements) == set(a.pip_requirements)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("name: t\ndependencies: [python=3.11\n", "not valid YAML at line"),
        ("name: t\ndependencies:\n  - pip\n  - pip: [pydantic]\n", "must pin python"),
        ("name: t\ndependencies:\n  - python=3.11\n", "no pip section"),
        ("name: t\ndependencies:\n  - python=3.11\n  - pip:\n", "dependencies.pip must be a non-empty list"),
        ("name: t\ndependencies:\n  - python=3.11\n  - pip: [pydantic, {a: 1}]\n", "dependencies.pip[1]"),
        ("name: t\ndependencies:\n  - python=3.11\n  - pip: ['torch>>2']\n", "not a valid requirement"),
        ("name: t\ndependencies:\n  - python=3.11\n  - pip: ['--editable .']\n", "unsupported pip option"),
        ("name: t\ndependencie:\n  - python=3.11\n", "unknown top-level field(s) dependencie"),
        ("name: 'a b'\ndependencies:\n  - python=3.11\n", "name must be a plain name"),
    ],
)
def test_bad_specs_are_one_line_errors_naming_the_file(tmp_path: Path, text: str, needle: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(EnvSpecError) as err:
        load_env_spec(path)
    msg = str(err.value)
    assert str(path) in msg and needle in msg and "\n" not in msg


def test_missing_orch_runtime_deps_and_python_mismatch(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.replace("      - typer==0.29.2\n", "").replace("rich==", "richer=="))
    with pytest.raises(EnvSpecError, match=r"lacks orch's runtime deps rich, typer"):
        require_runtime_deps(load_env_spec(path))
    spec = load_env_spec(_write(tmp_path, GOOD.replace("python=3.11", "python=3.10"), "old.yaml"))
    with pytest.raises(EnvSpecError) as err:
        spec.check_python("3.11.2", image="orch/base:bookworm-py311")
    assert "old.yaml" in str(err.value) and "python=3.10" in str(err.value) and "3.11.2" in str(err.value)
    conda_only = load_env_spec(_write(tmp_path, GOOD.replace("  - pip\n", "  - pip\n  - numpy=2\n"), "c.yaml"))
    with pytest.raises(EnvSpecError, match="numpy=2 need conda"):
        conda_only.check_python("3.11.2", image="x")


def test_pip_settings_from_config_files_and_env(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "[global]\nindex-url = https://corp/simple\nfind-links = /w1\ncert = /ca.pem\n", "p.conf")
    env = {"HOME": str(tmp_path), "XDG_CONFIG_DIRS": str(tmp_path / "none"), "PIP_CONFIG_FILE": str(cfg)}
    s = PipSettings.from_host(env)
    assert s.index_url == "https://corp/simple" and s.cert == "/ca.pem"
    s2 = PipSettings.from_host({**env, "PIP_FIND_LINKS": "/opt/a /opt/b", "PIP_EXTRA_INDEX_URL": "file:///x/simple"})
    assert s2.find_links == ("/opt/a", "/opt/b") and s2.extra_index_urls == ("file:///x/simple",)
    assert s2.as_pip_args()[:2] == ["--index-url", "https://corp/simple"]


def _make_wheel(dest: Path, name: str = "orchprobe", version: str = "1.0") -> Path:
    """A minimal pure-python wheel, so index/venv tests need no package index."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VALUE = {version!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    whl = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return whl


def test_file_index_is_served_on_loopback_and_find_links_carried(tmp_path: Path) -> None:
    root = tmp_path / "mirror"
    (root / "simple" / "orchprobe").mkdir(parents=True)
    (root / "files").mkdir()
    whl = _make_wheel(root / "files")
    (root / "simple" / "orchprobe" / "index.html").write_text(f'<a href="../../files/{whl.name}">{whl.name}</a>')
    settings = PipSettings(extra_index_urls=(f"file://{root}/simple",), find_links=(str(root / "files"),))
    with serve_local_indexes(settings) as served:
        url = served.extra_index_urls[0]
        assert url.startswith("http://127.0.0.1:")
        page = urllib.request.urlopen(url + "orchprobe/", timeout=5).read().decode()
        assert whl.name in page
        assert urllib.request.urlopen(url + f"../files/{whl.name}", timeout=5).read() == whl.read_bytes()
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    assert settings.carry_find_links(ctx) == 1 and (ctx / whl.name).read_bytes() == whl.read_bytes()
    assert settings.without_local_find_links().find_links == ()


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_realize_venv_installs_the_pip_section_and_is_idempotent(tmp_path: Path, installer: str) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _make_wheel(wheels)
    minor = ".".join(str(v) for v in sys.version_info[:2])
    spec = load_env_spec(
        _write(tmp_path, f"name: probe\ndependencies:\n  - python={minor}\n  - pip:\n      - orchprobe==1.0\n")
    )
    lines: list[str] = []
    python = realize_venv(
        spec,
        tmp_path / "venv",
        installer=installer,
        pip_settings=PipSettings(no_index=True, find_links=(str(wheels),)),
        on_line=lines.append,
    )
    out = subprocess.run(
        [str(python), "-c", "import orchprobe; print(orchprobe.VALUE)"], capture_output=True, text=True
    )
    assert out.stdout.strip() == "1.0" and lines
    again: list[str] = []
    assert realize_venv(spec, tmp_path / "venv", installer=installer, on_line=again.append) == python
    assert again == []  # the stamp says this spec is already there


def test_an_unreachable_index_stops_the_build_in_seconds_naming_it(tmp_path: Path) -> None:
    """A package index that accepts connections and never answers (what a firewalled CUDA wheel index looks
    like): realize_venv stops after the probe's timeout with one line naming the index, before any venv or
    install; a reachable loopback index passes the probe. The child process's timeout only guards the test."""
    import socket

    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(8)  # accepted by the kernel, never read: an HTTP request to it waits forever
    url = f"http://127.0.0.1:{black_hole.getsockname()[1]}/simple"
    env_file = _write(tmp_path, f"""name: t
dependencies:
  - python={sys.version_info.major}.{sys.version_info.minor}
  - pip:
      - --extra-index-url {url}
      - numpy
""")
    code = f"""
import sys
from pathlib import Path
from typing import Any
from orchestrator.systems.environments import package_indexes
from orchestrator.systems.environments.local_venv import realize_venv
from orchestrator.systems.environments.spec import EnvSpecError
package_indexes.INDEX_PROBE_TIMEOUT_S = 3
try:
    realize_venv(Path({str(env_file)!r}), Path({str(tmp_path / "venv")!r}),
                 pip_settings=package_indexes.PipSettings(no_index=True))
except EnvSpecError as exc:
    print(exc)
    sys.exit(3)
"""
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})  # fmt: skip
    finally:
        black_hole.close()
    assert proc.returncode == 3, proc.stdout + proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line and url in line and "is unreachable" in line and "nothing was installed" in line
    assert not (tmp_path / "venv").exists()


def test_package_indexes_are_the_ones_the_installer_reads() -> None:
    from orchestrator.systems.environments.package_indexes import PipSettings, package_indexes, probe_indexes

    host = PipSettings(index_url="https://mirror.example/simple", extra_index_urls=("https://extra.example/simple",))
    cuda = "https://download.pytorch.org/whl/cu128"
    assert package_indexes(host, ["--extra-index-url", cuda]) == [
        "https://mirror.example/simple", "https://extra.example/simple", cuda]  # fmt: skip
    assert package_indexes(PipSettings(), ["--index-url=https://own.example/simple"]) == ["https://own.example/simple"]
    assert package_indexes(PipSettings(no_index=True), []) == []
    with pytest.raises(EnvSpecError, match="does not exist on this host"):
        probe_indexes(["file:///nonexistent/simple"], what="t")


def test_a_gpu_system_on_a_host_without_cuda_runs_its_cpu_sibling_or_refuses(tmp_path: Path, tiny_model: Path) -> None:
    """A workflow written for a GPU (a CUDA GptqQuantizer, QLoRA) on this CPU host: GptqQuantizer runs in the
    cpu-quantize environment with one note (the gpu-quantize venv, built from the CUDA index, is never asked
    for); QLoRA is refused at preflight, before any job, in one line."""
    from orchestrator.core.gpu import cuda_available
    from orchestrator.core.job import Job
    from orchestrator.engine import Engine
    from orchestrator.engine.plan import environment_for
    from orchestrator.engine.preflight_error import PreflightError
    from orchestrator.olive import load_workflow

    if cuda_available():
        pytest.skip("this host has a CUDA GPU: the GPU path is the right one here")
    (tmp_path / "d.jsonl").write_text('{"text": "a b c"}\n')
    data = [{"name": "d", "load_dataset_config": {"data_name": "json", "data_files": "d.jsonl"}}]
    gpu = {"gpu": {"type": "LocalSystem", "accelerators": [{"device": "gpu", "execution_providers": [
        "CUDAExecutionProvider"]}]}}  # fmt: skip
    wf = {"input_model": {"type": "HfModel", "model_path": str(tiny_model)}, "systems": gpu, "data_configs": data,
          "passes": {"g": {"type": "GptqQuantizer", "data_config": "d"}},
          "engine": {"host": "gpu", "target": "gpu"}}  # fmt: skip
    notes: list[str] = []

    class Notes:
        def __getattr__(self, name: str) -> Any:
            return notes.append if name == "note" else (lambda *a, **k: None)

    engine = Engine(load_workflow(wf, base_dir=tmp_path), tracking=False, reporter=Notes())
    engine.preflight(tracking=False)
    assert len(notes) == 1 and "no CUDA GPU" in notes[0] and "gpu-quantize -> cpu-quantize" in notes[0]
    step = engine.plan()[0]
    job = Job(job_id="j", pass_name="g", pass_type=step.pass_type, pass_config=step.config, output_dir=str(tmp_path),
              accelerator=engine.devices.accelerator("gpu"))  # fmt: skip
    assert job.accelerator == "cpu" and environment_for(job) == "cpu-quantize"
    wf["passes"] = {"q": {"type": "QLoRA", "train_data_config": "d"}}
    del wf["systems"], wf["engine"]
    with pytest.raises(PreflightError, match=r"passes\.q \(QLoRA\): QLoRA needs a CUDA GPU"):
        Engine(load_workflow(wf, base_dir=tmp_path), tracking=False).preflight(tracking=False)
