"""MatMulNBits quantization of a builder fp32 model (onnx_genai) and of a plain ONNX folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from orchestrator.core.job import Job, ModelArtifact
from orchestrator.passes.base import PassContext, PassError, PassOutput
from orchestrator.passes.common import onnx_tools
from orchestrator.passes.models.tiny_model import build_tiny_phi3
from orchestrator.passes.onnx.model_builder import ModelBuilderPass
from orchestrator.passes.quantization.quantize import MatMulNBitsQuantizePass
from orchestrator.passes.registry import load_pass


def run_pass(p: Any, out: Path, model: ModelArtifact, **cfg: Any) -> PassOutput:
    job = Job(job_id="j", pass_name="p", pass_type=p.type_name, output_dir=str(out))
    return p.run(p.Config(**cfg), model, PassContext(job=job, out_dir=out, emit=lambda e: None))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(hf checkpoint, fp32 onnx_genai folder built from it)."""
    root = tmp_path_factory.mktemp("quant")
    hf = build_tiny_phi3(root / "hf")
    run_pass(ModelBuilderPass(), root / "fp32", ModelArtifact(format="hf", path=str(hf)), precision="fp32")
    return hf, root / "fp32" / "model"


def test_registry_names_resolve() -> None:
    assert load_pass("OnnxMatMul4Quantizer") is MatMulNBitsQuantizePass
    assert load_pass("OnnxBlockWiseRtnQuantization") is MatMulNBitsQuantizePass


def test_quantize_genai_fp32_model(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    hf, fp32 = tiny
    result = run_pass(MatMulNBitsQuantizePass(), tmp_path, ModelArtifact(format="onnx_genai", path=str(fp32)))
    assert result.model is not None and result.model.format == "onnx_genai" and result.model.quantized
    out = tmp_path / "model"
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    nodes = onnx_tools.matmulnbits_nodes(out)
    assert len(nodes) == result.metrics["matmulnbits_nodes"] > 0
    assert all(n["bits"] == 4 and n["block_size"] == 32 for n in nodes)
    assert onnx_tools.op_counts(out).get("MatMul", 0) == 0
    m = result.metrics
    assert m["size_after_bytes"] < m["size_before_bytes"] and m["compression_ratio"] > 2
    assert onnx_tools.model_size_bytes(out) == m["size_after_bytes"]
    # Still an onnxruntime-genai model: it generates, and its logits stay near the transformers reference.
    text, n_tokens, _ = onnx_tools.generate(out, "What a wonderful morning", 10)
    assert n_tokens > 0
    parity = onnx_tools.logits_parity(hf, out)
    print("quantized vs transformers", parity, "metrics", m)
    assert parity["max_abs_diff"] < 1.0
    assert 0 < m["logits_max_abs_diff_vs_input"] < 1.0


def test_quantize_plain_onnx_and_exclude(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """format onnx (no genai_config): external data is rewritten next to the new model; exclusions hold."""
    hf, fp32 = tiny
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(fp32 / name, plain / name)
    shutil.copy(hf / "config.json", plain / "config.json")  # as other exporters leave it: gives the KV shape
    total = onnx_tools.op_counts(plain)["MatMul"]
    result = run_pass(
        MatMulNBitsQuantizePass(),
        tmp_path / "q",
        ModelArtifact(format="onnx", path=str(plain)),
        nodes_to_exclude=["/lm_head/MatMul"],
    )
    assert result.model is not None and result.model.format == "onnx"
    out = tmp_path / "q" / "model"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx", "model.onnx.data"]
    assert result.metrics["matmulnbits_nodes"] == total - 1
    assert onnx_tools.op_counts(out)["MatMul"] == 1
    assert result.metrics["logits_max_abs_diff_vs_input"] < 1.0
    ids = list(range(1, 9))
    assert onnx_tools.ort_logits(out, ids).shape == (8, 1000)


def test_refuses_hf_and_already_quantized(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    hf, fp32 = tiny
    with pytest.raises(PassError, match="quantizes ONNX models"):
        run_pass(MatMulNBitsQuantizePass(), tmp_path, ModelArtifact(format="hf", path=str(hf)))
    first = run_pass(MatMulNBitsQuantizePass(), tmp_path / "a", ModelArtifact(format="onnx_genai", path=str(fp32)))
    assert first.model is not None
    with pytest.raises(PassError, match="already quantized"):
        run_pass(
            MatMulNBitsQuantizePass(),
            tmp_path / "b",
            ModelArtifact(format="onnx_genai", path=str(tmp_path / "a" / "model")),
        )
