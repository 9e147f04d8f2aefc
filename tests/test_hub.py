"""Hugging Face hub references, as on a user's machine, against the hub stand-in (tests/hub_standin): a model by id
and revision, a dataset by id with subset and split, Olive's implicit calibration defaults, a private repo with and
without a token, offline with and without a cached copy, an unreachable hub. Every run is a real `orch` process
with its own HF cache (HF_HOME) and HF_ENDPOINT pointed at the stand-in; each outcome is asserted: the files in
the cache, the rows read, the exit code and the one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HUB_TOKEN, hub_env
from tests.hub_standin.repos import folder_files

PHI3 = "microsoft/Phi-3-mini-4k-instruct"


def orch(*args: str, cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env={**env, "COLUMNS": "200"},
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("orch: error:")]


def snapshot_files(hf_home: Path, repo: str, kind: str = "models") -> dict[str, list[str]]:
    """{commit sha: files} of a repo in an HF cache."""
    root = hf_home / "hub" / f"{kind}--{repo.replace('/', '--')}" / "snapshots"
    if not root.is_dir():
        return {}
    return {
        snap.name: sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())
        for snap in root.iterdir()
    }


def rtn(model: str, out: str, *extra: str) -> list[str]:
    """`orch quantize --algorithm rtn` (Olive >= 0.10's Rtn: an int4 Hugging Face checkpoint in out/model): the
    quickest pass that reads a whole model."""
    return ["quantize", "--model_name_or_path", model, "--algorithm", "rtn", "--precision", "int4",
            "--output_path", out, "--no-tracking", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def revisions(hub: Any, tiny_model: Path) -> dict[str, str]:
    """acme-corp/tiny-phi3-revs: tag v1 (context 1024), then main with max_position_embeddings 512."""
    files = folder_files(tiny_model)
    v1 = hub.add_repo("acme-corp/tiny-phi3-revs", files, tag="v1", message="v1").sha
    cfg = json.loads(files["config.json"])
    cfg["max_position_embeddings"] = cfg["original_max_position_embeddings"] = 512
    main = hub.add_repo("acme-corp/tiny-phi3-revs", {**files, "config.json": json.dumps(cfg).encode()},
                        message="shorter context").sha  # fmt: skip
    return {"v1": v1, "main": main}


def test_model_by_id_and_revision(hub: Any, revisions: dict[str, str], tmp_path: Path) -> None:
    """A workflow naming a hub id + load_kwargs.revision: the tag's commit is downloaded (only config, weights and
    tokenizer) into HF_HOME before the pass, the pass builds from it, the cache key names the commit."""
    hf_home = tmp_path / "hf"
    wf = {
        "input_model": {"type": "HfModel", "model_path": "acme-corp/tiny-phi3-revs", "load_kwargs": {"revision": "v1"}},
        "passes": {"builder": {"type": "ModelBuilder", "precision": "int4"}},
        "engine": {"output_dir": "out", "cache_dir": "cache"},
    }  # fmt: skip
    (tmp_path / "wf.json").write_text(json.dumps(wf))
    proc = orch("run", "--config", "wf.json", "--no-tracking", cwd=tmp_path, env=hub_env(hub, hf_home))
    assert proc.returncode == 0, proc.stderr[-3000:]
    snaps = snapshot_files(hf_home, "acme-corp/tiny-phi3-revs")
    assert list(snaps) == [revisions["v1"]]  # the tag's commit, not main's
    assert "README.md" not in snaps[revisions["v1"]] and "model.safetensors" in snaps[revisions["v1"]]
    genai = json.loads((tmp_path / "out/model/genai_config.json").read_text())
    assert genai["model"]["context_length"] == 1024  # v1's config (main says 512)
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["input_model_identity"] == f"hf://acme-corp/tiny-phi3-revs@{revisions['v1']}"
    # main, and a rerun of v1 is a cache hit that downloads nothing new
    wf["input_model"]["load_kwargs"] = {}
    (tmp_path / "wf.json").write_text(json.dumps(wf))
    proc = orch("run", "--config", "wf.json", "--no-tracking", cwd=tmp_path, env=hub_env(hub, hf_home))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out/model/genai_config.json").read_text())["model"]["context_length"] == 512
    assert set(snapshot_files(hf_home, "acme-corp/tiny-phi3-revs")) == {revisions["v1"], revisions["main"]}


def test_dataset_by_id_subset_and_split(hub: Any, tmp_path: Path) -> None:
    """data_name Salesforce/wikitext, subset wikitext-2-raw-v1, split train[:50]: the engine downloads that
    config's files (not the others') and the job reads exactly those rows; a LoRA run trains on them."""
    hf_home = tmp_path / "hf"
    dc = {"name": "wiki", "type": "HuggingfaceContainer",
          "load_dataset_config": {"data_name": "Salesforce/wikitext", "subset": "wikitext-2-raw-v1",
                                  "split": "train[:50]"},
          "pre_process_data_config": {"text_cols": ["text"], "source_max_len": 64}}  # fmt: skip
    code = f"""
import json, sys
from pathlib import Path
from orchestrator.core.cache import Cache
from orchestrator.engine.inputs import data_files
from orchestrator.passes.common.data import load_splits
from orchestrator.schema.models import DataConfig
cfg = DataConfig.model_validate({json.dumps(dc)!s})
configs, files, hashes = data_files([cfg], base_dir=Path.cwd(), cache=Cache(Path("cache")))
train, _ = load_splits(configs["wiki"], base_dir=Path.cwd(), data_files_override=files["wiki"])
print(json.dumps({{"folder": files["wiki"], "rows": list(train["text"]), "hashes": hashes}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=hub_env(hub, hf_home), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    import pyarrow.parquet as pq

    commit = hub.repos[("dataset", "Salesforce/wikitext")].commit("main")
    served = pq.read_table(__import__("io").BytesIO(commit.files["wikitext-2-raw-v1/train-00000-of-00001.parquet"]))
    assert out["rows"] == served.column("text").to_pylist()[:50]
    assert Path(out["folder"]).name == commit.sha
    files = snapshot_files(hf_home, "Salesforce/wikitext", "datasets")[commit.sha]
    assert files == ["README.md", *(f"wikitext-2-raw-v1/{s}-00000-of-00001.parquet" for s in ("test", "train",
                                                                                              "validation"))]
    # the same data config in a LoRA workflow on a hub model: trains on those rows, ends with an adapter
    wf = {"input_model": {"type": "HfModel", "model_path": PHI3}, "data_configs": [dc],
          "passes": {"lora": {"type": "LoRA", "train_data_config": "wiki", "r": 4,
                              "training_args": {"max_steps": 2, "per_device_train_batch_size": 4}}},
          "engine": {"output_dir": "out", "cache_dir": "cache"}}  # fmt: skip
    (tmp_path / "wf.json").write_text(json.dumps(wf))
    proc = orch("run", "--config", "wf.json", "--no-tracking", cwd=tmp_path, env=hub_env(hub, hf_home))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out/adapter/adapter_model.safetensors").is_file()


def test_olive_implicit_calibration_defaults_are_hub_data_configs(tmp_path: Path) -> None:
    """No data_config: AutoAWQQuantizer reads AutoAWQ's pileval, GptqQuantizer / Gptq / SelectiveMixedPrecision
    kld_gradient Olive's wikitext-2-raw-v1 train, as hub data configs the workflow shows (one shared), with a note."""
    from orchestrator.olive import load_workflow

    wf = load_workflow({
        "input_model": {"type": "HfModel", "model_path": PHI3},
        "passes": {"smp": {"type": "SelectiveMixedPrecision", "algorithm": "kld_gradient"}, "gptq": {"type": "Gptq"},
                   "awq": {"type": "AutoAWQQuantizer"}, "q2": {"type": "GptqQuantizer"}},
    }, base_dir=tmp_path)  # fmt: skip
    loads = {dc.name: dc.load_dataset_config for dc in wf.data_configs}
    assert sorted(loads) == ["pile_val_backup", "wikitext2_train"]
    assert (loads["pile_val_backup"].data_name, loads["pile_val_backup"].split) == ("mit-han-lab/pile-val-backup",
                                                                                    "validation")  # fmt: skip
    wiki = loads["wikitext2_train"]
    assert (wiki.data_name, wiki.subset, wiki.split) == ("Salesforce/wikitext", "wikitext-2-raw-v1", "train")
    assert {k: p.config["data_config"] for k, p in wf.passes.items()} == {
        "smp": "wikitext2_train", "gptq": "wikitext2_train", "awq": "pile_val_backup", "q2": "wikitext2_train"}
    assert sum("Olive's default calibration data" in n for n in wf.notes) == 4
    k_quant = load_workflow({"input_model": {"type": "HfModel", "model_path": PHI3},
                             "passes": {"smp": {"type": "SelectiveMixedPrecision", "algorithm": "k_quant_mixed"}}},
                            base_dir=tmp_path)  # fmt: skip
    assert k_quant.data_configs == []  # k_quant_mixed reads no data


def test_private_repo_needs_the_token_which_is_never_written(hub: Any, tmp_path: Path) -> None:
    hf_home = tmp_path / "hf"
    no_token = orch(*rtn("acme-corp/private-phi3", "out"), cwd=tmp_path, env=hub_env(hub, hf_home))
    assert no_token.returncode == 2 and "Traceback" not in no_token.stderr
    assert error_lines(no_token) == [
        f"orch: error: input_model.model_path: model acme-corp/private-phi3 was not found on the hub at {hub.url}: "
        "check the id; if it is private or gated, set a token (HF_TOKEN or `hf auth login`)"
    ], no_token.stderr
    assert not (tmp_path / "out").exists() and snapshot_files(hf_home, "acme-corp/private-phi3") == {}
    wrong = orch(*rtn("acme-corp/private-phi3", "out"), cwd=tmp_path, env=hub_env(hub, hf_home, token="hf_wrong"))
    assert wrong.returncode == 2 and "the token is not valid" in error_lines(wrong)[0], wrong.stderr
    ok = orch(*rtn("acme-corp/private-phi3", "out"), cwd=tmp_path, env=hub_env(hub, hf_home, token=HUB_TOKEN))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "out/model/config.json").is_file() and snapshot_files(hf_home, "acme-corp/private-phi3")
    assert all(r["authorized"] for r in hub.requests(pattern="private-phi3") if r["status"] == 200)
    for where in (tmp_path,):  # outputs, the pass cache, logs, manifest: the token appears in none of them
        for f in where.rglob("*"):
            if f.is_file() and not f.is_symlink() and "/hf/" not in str(f):
                assert HUB_TOKEN.encode() not in f.read_bytes(), f
    assert HUB_TOKEN not in ok.stdout + ok.stderr


def test_offline_uses_the_cache_or_says_how_to_get_a_copy(hub: Any, tmp_path: Path) -> None:
    hf_home = tmp_path / "hf"
    before = len(hub.request_log)
    cold = orch(*rtn(PHI3, "out"), cwd=tmp_path, env=hub_env(hub, hf_home, offline=True))
    assert cold.returncode == 2 and "Traceback" not in cold.stderr
    [line] = error_lines(cold)
    assert line.startswith(f"orch: error: input_model.model_path: model {PHI3} is not in the Hugging Face cache ")
    assert f"HF_HUB_OFFLINE=1 forbids downloading it; download it where the hub is reachable (`hf download {PHI3}`" \
        in line
    assert "or give a local folder path" in line
    assert len(hub.request_log) == before  # offline means offline
    warm = orch(*rtn(PHI3, "out"), cwd=tmp_path, env=hub_env(hub, hf_home))  # online once: the cache fills
    assert warm.returncode == 0, warm.stderr[-3000:]
    before = len(hub.request_log)
    again = orch(*rtn(PHI3, "out2"), cwd=tmp_path, env=hub_env(hub, hf_home, offline=True))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "out2/model/config.json").is_file() and len(hub.request_log) == before
    # a dataset, offline without a copy: the same kind of line, for the data config's field
    data = orch("quantize", "--model_name_or_path", PHI3, "--algorithm", "gptq", "--precision", "int4",
                "--output_path", "q", "--no-tracking", "--dry-run", cwd=tmp_path,
                env=hub_env(hub, hf_home, offline=True))  # fmt: skip
    assert data.returncode == 2 and error_lines(data) == [
        "orch: error: data_configs[0].load_dataset_config.data_name: dataset Salesforce/wikitext is not in the "
        f"Hugging Face cache ({hf_home / 'hub'}) and HF_HUB_OFFLINE=1 forbids downloading it; download it where the "
        "hub is reachable (`hf download Salesforce/wikitext --repo-type dataset`, it lands in the HF cache that "
        "HF_HOME names) or give a local folder or data_files instead"
    ], data.stderr


def test_unreachable_hub_and_unknown_id_fail_fast_in_one_line(hub: Any, tmp_path: Path) -> None:
    env = {**hub_env(hub, tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there
    down = orch(*rtn(PHI3, "out"), cwd=tmp_path, env=env)
    assert down.returncode == 2 and "Traceback" not in down.stderr
    [line] = error_lines(down)
    assert line.startswith(f"orch: error: input_model.model_path: model {PHI3}: the hub at http://127.0.0.1:9 is "
                           "unreachable (ConnectError")  # fmt: skip
    assert "and it is not in the Hugging Face cache" in line and f"hf download {PHI3}" in line
    missing = orch(*rtn("microsoft/no-such-model", "out"), cwd=tmp_path,
                   env=hub_env(hub, tmp_path / "hf", token=HUB_TOKEN))  # fmt: skip
    assert missing.returncode == 2
    assert error_lines(missing) == [
        f"orch: error: input_model.model_path: model microsoft/no-such-model was not found on the hub at {hub.url}: "
        "check the id; if it is private or gated, the token in use has no access to it"
    ]
    bad_rev = orch("run", "--config", "wf.json", "--no-tracking", cwd=_write_wf(tmp_path, PHI3, "no-such-branch"),
                   env=hub_env(hub, tmp_path / "hf"))  # fmt: skip
    assert bad_rev.returncode == 2 and "no revision 'no-such-branch' on the hub" in error_lines(bad_rev)[0]


def _write_wf(folder: Path, model: str, revision: str) -> Path:
    wf = {"input_model": {"type": "HfModel", "model_path": model, "load_kwargs": {"revision": revision}},
          "passes": {"b": {"type": "ModelBuilder", "precision": "int4"}}, "engine": {"output_dir": "o"}}  # fmt: skip
    (folder / "wf.json").write_text(json.dumps(wf))
    return folder


def test_job_side_download_of_pinned_references(hub: Any, tmp_path: Path) -> None:
    """What an Azure ML job does with the hf:// references its job.json carries (the runner, on the compute):
    downloads the pinned commit of the model and the data config's files, then runs the pass on the local copies."""
    from orchestrator.core.hub import HubRef
    from orchestrator.core.job import Job, ModelArtifact

    sha = hub.repos[("model", PHI3)].commit("main").sha
    wiki = hub.repos[("dataset", "Salesforce/wikitext")].commit("main").sha
    files = ("README.md", *(f"wikitext-2-raw-v1/{s}-00000-of-00001.parquet" for s in ("test", "train", "validation")))
    dc = {"name": "wiki", "load_dataset_config": {"data_name": "Salesforce/wikitext", "subset": "wikitext-2-raw-v1",
                                                  "split": "train"}, "pre_process_data_config": {"text_cols": ["text"]}}
    job = Job(job_id="j", pass_name="q", pass_type="Gptq", output_dir=str(tmp_path / "out"),
              pass_config={"data_config": "wiki", "num_calibration_samples": 4, "max_seq_len": 32},
              model=ModelArtifact(format="hf", path=f"hf://{PHI3}@{sha}"), data_configs={"wiki": dc},
              data_files={"wiki": HubRef("Salesforce/wikitext", "dataset", None, wiki, files).uri})  # fmt: skip
    job.write(tmp_path / "job.json")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.runner", "--job", str(tmp_path / "job.json")],
                          env=hub_env(hub, tmp_path / "hf"), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"downloaded hf://{PHI3}@{sha}, hf://datasets/Salesforce/wikitext@{wiki} from the hub" in proc.stdout
    assert (tmp_path / "out/model/config.json").is_file()
    assert json.loads((tmp_path / "out/result.json").read_text())["status"] == "Completed"
    assert list(snapshot_files(tmp_path / "hf", PHI3)) == [sha]
    assert snapshot_files(tmp_path / "hf", "Salesforce/wikitext", "datasets") == {wiki: sorted(files)}


def test_docker_mounts_an_hf_cache_snapshot_with_its_blobs(hub: Any, tmp_path: Path) -> None:
    """A snapshot's files link into the repo's blobs/: the container gets the repo folder and the snapshot path
    inside it, so the links resolve there (checked in a real container of orch's base image)."""
    pytest.importorskip("docker")
    import docker

    from orchestrator.core.job import Job, ModelArtifact
    from orchestrator.systems.registry import make_system

    hf_home = tmp_path / "hf"
    code = f"from huggingface_hub import snapshot_download; print(snapshot_download({PHI3!r}))"
    snap = subprocess.run([sys.executable, "-c", code], env=hub_env(hub, hf_home), capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]  # fmt: skip
    assert (Path(snap) / "config.json").is_symlink()
    system = make_system("Docker", {}, base_dir=tmp_path, cache_dir=tmp_path / "cache")
    job = Job(job_id="j", pass_name="p", pass_type="ModelBuilder", output_dir=str(tmp_path / "o"),
              model=ModelArtifact(format="hf", path=snap))  # fmt: skip
    cjob, mounts, _ = system._container_job(job)
    [mount] = [m for m in mounts if m["Target"].endswith("/model")]
    assert Path(mount["Source"]).name == f"models--{PHI3.replace('/', '--')}"
    assert cjob.model.path == f"{mount['Target']}/snapshots/{Path(snap).name}"
    client = docker.from_env()
    base = os.environ.get("ORCH_BASE_IMAGE", "orch/base:bookworm-py311")
    out = client.containers.run(base, ["python3", "-c", f"import json; print(json.load(open("
                                       f"'{cjob.model.path}/config.json'))['model_type'])"],
                                mounts=mounts, network_mode="none", remove=True)  # fmt: skip
    assert out.decode().strip() == "phi3"


def test_hub_stand_in_is_strict(hub: Any) -> None:
    """An unknown route is answered 404 and recorded (the session fixture fails on any left): new client calls
    must be looked at, not silently served."""
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{hub.url}/api/spaces/acme/app")  # noqa: S310 - loopback
    assert exc.value.code == 404 and hub.unknown_requests[-1]["path"] == "/api/spaces/acme/app"
    hub.unknown_requests.clear()  # expected here; the fixture asserts none are left



def test_phi3_target_modules_map_for_a_hub_id(hub: Any, tmp_path: Path) -> None:
    """`finetune -m microsoft/Phi-4-mini-instruct --target_modules q_proj,...`: the model type comes from the hub
    config (Phi-3 family: fused qkv_proj / gate_up_proj), as for a local folder."""
    asked = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
    code = ("from orchestrator.olive.finetune import fused_target_modules as f; "
            f"print(f({asked!r}, 'microsoft/Phi-4-mini-instruct'))")
    proc = subprocess.run([sys.executable, "-c", code], env=hub_env(hub, tmp_path / "hf"), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "['qkv_proj', 'o_proj', 'gate_up_proj']"
    snaps = snapshot_files(tmp_path / "hf", "microsoft/Phi-4-mini-instruct")
    assert list(snaps.values()) == [["config.json"]]  # only what the question needs


def test_azure_ml_driver_workflow_pins_the_clients_commits(hub: Any, tmp_path: Path) -> None:
    """`orch submit`: the driver job reads the hub on the compute, at the commits the client pinned (a branch
    moving in between changes nothing), and its job asks for hub access (no HF_HUB_OFFLINE there)."""
    wf = {"input_model": {"type": "HfModel", "model_path": PHI3},
          "passes": {"g": {"type": "Gptq"}}}  # fmt: skip
    (tmp_path / "wf.json").write_text(json.dumps(wf))
    code = ("import json; from orchestrator.olive import load_workflow; "
            "from orchestrator.engine.aml_driver import _driver_workflow, reads_hub; "
            "doc, binds = _driver_workflow(load_workflow('wf.json')); "
            "print(json.dumps({'doc': doc, 'binds': binds, 'reads_hub': reads_hub(doc)}))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=hub_env(hub, tmp_path / "hf"),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    sha = hub.repos[("model", PHI3)].commit("main").sha
    wiki = hub.repos[("dataset", "Salesforce/wikitext")].commit("main").sha
    assert out["doc"]["input_model"]["model_path"] == {"type": "hf_hub", "name": PHI3, "revision": sha}
    [dc] = out["doc"]["data_configs"]
    assert dc["load_dataset_config"]["revision"] == wiki and out["binds"] == {} and out["reads_hub"] is True
    assert snapshot_files(tmp_path / "hf", PHI3) == {}  # the client downloaded nothing: the compute will


def test_azure_ml_host_needs_hf_token_for_a_private_model(hub: Any, tmp_path: Path) -> None:
    """The Azure ML job downloads the model itself: a private repo without the system's hf_token is refused on the
    client, before anything is uploaded or submitted."""
    wf = {"input_model": {"type": "HfModel", "model_path": "acme-corp/private-phi3"},
          "systems": {"aml": {"type": "AzureML", "config": {"aml_compute": "cpu-cluster"}}},
          "passes": {"b": {"type": "ModelBuilder", "precision": "int4"}}, "host": "aml", "target": "aml"}  # fmt: skip
    (tmp_path / "wf.json").write_text(json.dumps(wf))
    proc = orch("run", "--config", "wf.json", "--dry-run", cwd=tmp_path,
                env=hub_env(hub, tmp_path / "hf", token=HUB_TOKEN))  # fmt: skip
    assert proc.returncode == 2 and error_lines(proc) == [
        "orch: error: input_model.model_path: model acme-corp/private-phi3 is private or gated and the Azure ML job "
        "downloads it: set \"hf_token\": true on system 'aml' (the job reads the workspace Key Vault's hf-token secret)"
    ], proc.stderr[-2000:]
