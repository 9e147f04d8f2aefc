"""OrtSessionParamsTuning and IncDynamicQuantization on real onnxruntime / neural-compressor, and the LocalSystem
side environment that runs INC (its numpy<2 / onnx 1.16 pins cannot live beside orch's install)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.core.job import RESULT_FILE, Job, JobResult, ModelArtifact
from orchestrator.passes.base import PassContext, PassError

DUMMY = {
    "name": "dummy",
    "type": "DummyDataContainer",
    "load_dataset_config": {"input_names": ["x"], "input_shapes": [[4, 256]], "input_types": ["float32"]},
}


@pytest.fixture(scope="module")
def matmul_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-MatMul fp32 graph (x[4,256] @ W1 @ W2) in its own folder, as a plain ONNX model."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((256, 512)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((512, 128)).astype(np.float32), "W2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 128])],
        [w1, w2],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder = tmp_path_factory.mktemp("matmul") / "model"
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def _tune(out: Path, model_dir: Path, eps: list[str] | None = None, **cfg: Any) -> Any:
    from orchestrator.passes.evaluation.session_tuning import OrtSessionParamsTuningPass

    p = OrtSessionParamsTuningPass()
    job = Job(job_id="j", pass_name="t", pass_type=p.type_name, output_dir=str(out), data_configs={"dummy": DUMMY},
              execution_providers=eps or ["CPUExecutionProvider"])  # fmt: skip
    logs: list[str] = []
    ctx = PassContext(job=job, out_dir=out, emit=lambda e: logs.append(e.get("message", "")))
    model = ModelArtifact(format="onnx", path=str(model_dir))
    return p.run(p.Config(**cfg), model, ctx), logs


def test_session_tuning_times_every_combination_and_writes_olives_inference_settings(
    tmp_path: Path, matmul_model: Path
) -> None:
    from orchestrator.passes.common import onnx_tools

    res, logs = _tune(tmp_path, matmul_model, data_config="dummy", io_bind=True, intra_thread_num_list=[1, 2],
                      execution_mode_list=0, repeat_test_num=5, warmup_num=1)  # fmt: skip
    out = tmp_path / res.model.path
    settings = json.loads((out / onnx_tools.SETTINGS_FILE).read_text())
    assert set(settings) == {"execution_provider", "provider_options", "session_options", "io_bind"}
    assert settings["execution_provider"] == ["CPUExecutionProvider"] and settings["io_bind"] is False
    assert (out / "model.onnx").exists()  # the model itself passes on unchanged
    assert res.metrics["settings_tried"] == 3  # onnxruntime's defaults + sequential x {1, 2} intra-op threads
    assert 0 < res.metrics["latency_ms_tuned"] <= res.metrics["latency_ms_baseline"]
    assert any("io_bind: CPUExecutionProvider" in line for line in logs)  # said, not silently dropped
    session, used = onnx_tools.tuned_session(out / "model.onnx", "CPUExecutionProvider")
    assert used == settings  # the evaluator's latency runs under the tuned settings
    if settings["session_options"]:
        opts = session.get_session_options()
        assert opts.intra_op_num_threads == settings["session_options"]["intra_op_num_threads"]


def test_session_tuning_refuses_a_provider_this_onnxruntime_lacks(tmp_path: Path, matmul_model: Path) -> None:
    with pytest.raises(PassError) as exc:
        _tune(tmp_path, matmul_model, eps=["CUDAExecutionProvider"], data_config="dummy")
    assert "CUDAExecutionProvider not in this onnxruntime" in str(exc.value)


def test_session_tuning_lists_accept_one_value_and_refuse_unknown_modes() -> None:
    from pydantic import ValidationError

    from orchestrator.passes.evaluation.session_tuning import SessionTuningConfig

    assert SessionTuningConfig(intra_thread_num_list=4).intra_thread_num_list == [4]
    with pytest.raises(ValidationError, match="execution modes"):
        SessionTuningConfig(execution_mode_list=[3])


def test_inc_config_refuses_what_it_would_not_honour() -> None:
    from pydantic import ValidationError

    from orchestrator.passes.quantization.inc_quantize import IncDynamicConfig

    with pytest.raises(ValidationError, match="accuracy-aware tuning"):
        IncDynamicConfig(metric={"name": "acc", "type": "accuracy"})
    with pytest.raises(ValidationError, match="tuning_criterion"):
        IncDynamicConfig(tuning_criterion={"max_trials": 3})
    with pytest.raises(ValidationError):
        IncDynamicConfig(device="gpu")


def test_local_system_runs_side_environments_in_their_own_venv(tmp_path: Path) -> None:
    from orchestrator.systems.local import LocalSystem

    job = Job(job_id="j", pass_name="q", pass_type="IncDynamicQuantization", output_dir=str(tmp_path / "o"))
    envs = {"q": "cpu-inc", "e": "cpu-export"}
    system = LocalSystem(environment_for=lambda j: envs[j.pass_name], env_cache=tmp_path / "envs")
    assert system.side_environment("cpu-inc") == "cpu-inc" and system.side_environment("cpu-export") is None
    assert system.python_for(job.model_copy(update={"pass_name": "e"})) == sys.executable
    fingerprint = system.environment_fingerprint(("neural-compressor",), "cpu-inc")
    assert set(fingerprint) == {"env_spec"}  # the spec's hash names the venv, as an image's does
    pinned = LocalSystem(python_environment_path=sys.executable, environment_for=lambda j: "cpu-inc")
    assert pinned.python_for(job) == sys.executable  # the user's interpreter runs every job


def test_inc_dynamic_quantization_runs_in_the_cpu_inc_venv(tmp_path: Path, matmul_model: Path) -> None:
    """The real thing: LocalSystem builds (or reuses) the cpu-inc venv and INC quantizes the graph there."""
    import onnx

    from orchestrator.systems.local import LocalSystem

    out = tmp_path / "job"
    job = Job(job_id="inc", pass_name="q", pass_type="IncDynamicQuantization", output_dir=str(out),
              model=ModelArtifact(format="onnx", path=str(matmul_model)), pass_config={})  # fmt: skip
    system = LocalSystem(environment_for=lambda j: "cpu-inc")
    python = system.python_for(job)
    assert python != sys.executable and "cpu-inc-" in python
    handle = system.submit(job)
    assert handle.wait(timeout=600).value == "Completed", (out / "job.log").read_text()[-2000:]
    result = JobResult.model_validate_json((out / RESULT_FILE).read_text())
    q = onnx.load(str(out / "model" / "model.onnx"))
    ops = {n.op_type for n in q.graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    m = result.metrics
    assert m["int8_nodes"] >= 2 and m["size_after_bytes"] < m["size_before_bytes"]
