"""ModelBuilder pass on a tiny random Phi-3: fp32 parity with transformers, int4 graph, refused inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.core.job import Job, ModelArtifact
from orchestrator.passes.base import PassContext, PassError, PassOutput
from orchestrator.passes.common import onnx_tools
from orchestrator.passes.models.tiny_model import build_tiny_phi3
from orchestrator.passes.onnx.model_builder import ModelBuilderPass, lm_head_impostors, resolve_execution_provider


def run_builder_pass(
    out: Path, model: ModelArtifact, providers: list[str] | None = None, **cfg: Any
) -> tuple[PassOutput, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    job = Job(
        job_id="j",
        pass_name="mb",
        pass_type="ModelBuilder",
        output_dir=str(out),
        execution_providers=providers or ["CPUExecutionProvider"],
    )
    ctx = PassContext(job=job, out_dir=out, emit=events.append)
    p = ModelBuilderPass()
    return p.run(p.Config(**cfg), model, ctx), events


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_phi3(tmp_path_factory.mktemp("mb") / "hf")


@pytest.fixture(scope="module")
def fp32_build(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PassOutput, list]:
    out = tmp_path_factory.mktemp("mb_fp32")
    result, events = run_builder_pass(out, ModelArtifact(format="hf", path=str(tiny_hf)), precision="fp32")
    return out, result, events


@pytest.fixture(scope="module")
def int4_build(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PassOutput, list]:
    out = tmp_path_factory.mktemp("mb_int4")
    result, events = run_builder_pass(out, ModelArtifact(format="hf", path=str(tiny_hf)), precision="int4")
    return out, result, events


def test_fp32_logits_match_transformers(tiny_hf: Path, fp32_build: tuple[Path, PassOutput, list]) -> None:
    out, result, events = fp32_build
    assert result.model is not None and result.model.format == "onnx_genai" and result.model.path == "model"
    model_dir = out / "model"
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    assert not (out / ".model.tmp").exists() and not (out / ".builder_cache").exists()
    assert result.metrics["parity_max_abs_diff"] < 1e-4
    assert result.metrics["greedy_token_agreement"] == 1.0
    assert result.metrics["matmulnbits_nodes"] == 0
    assert result.metrics["model_size_bytes"] > 0 and result.metrics["build_s"] > 0
    # An independent check on a different prompt, and that the builder's prints reached the job log.
    parity = onnx_tools.logits_parity(tiny_hf, model_dir, "I am so scared of the dark. What a wonderful morning!")
    print("fp32 parity", parity)
    assert parity["max_abs_diff"] < 1e-4 and parity["greedy_agree"] == 1.0
    logs = [e["message"] for e in events if e["type"] == "log"]
    assert any("Reading LM head" in m for m in logs)
    assert {e["name"] for e in events if e["type"] == "metric"} >= {"parity_max_abs_diff", "build_s"}


def test_int4_has_matmulnbits_and_generates(
    int4_build: tuple[Path, PassOutput, list], fp32_build: tuple[Path, PassOutput, list]
) -> None:
    out, result, _ = int4_build
    nodes = onnx_tools.matmulnbits_nodes(out / "model")
    assert len(nodes) == result.metrics["matmulnbits_nodes"] > 0
    assert all(n["bits"] == 4 and n["block_size"] == 32 and n["accuracy_level"] == 4 for n in nodes)
    assert result.metrics["model_size_bytes"] < fp32_build[1].metrics["model_size_bytes"]
    assert 0.0 <= result.metrics["greedy_token_agreement"] <= 1.0
    print("int4 metrics", result.metrics)
    text, n_tokens, seconds = onnx_tools.generate(out / "model", "What a wonderful", 10, chat=True)
    assert n_tokens > 0 and seconds > 0 and isinstance(text, str)


def test_search_defaults_written(tiny_hf: Path, tmp_path: Path) -> None:
    run_builder_pass(
        tmp_path,
        ModelArtifact(format="hf", path=str(tiny_hf)),
        precision="int4",
        search={"max_length": 64, "top_k": 5},
        check_parity=False,
        check_generation=False,
    )
    search = json.loads((tmp_path / "model" / "genai_config.json").read_text())["search"]
    assert search["max_length"] == 64 and search["top_k"] == 5


def test_lm_head_trap_refused(tiny_hf: Path, tmp_path: Path) -> None:
    """2 * intermediate_size == vocab_size: Phi-3's fused gate_up_proj would be taken for the LM head."""
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = json.loads((tiny_hf / "config.json").read_text())
    vocab = cfg["vocab_size"]
    bad = tmp_path / "trap"
    config = Phi3Config(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=vocab // 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=cfg["pad_token_id"],
        bos_token_id=cfg["bos_token_id"],
        eos_token_id=cfg["eos_token_id"],
    )
    Phi3ForCausalLM(config).save_pretrained(bad)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bad / f).write_bytes((tiny_hf / f).read_bytes())
    assert lm_head_impostors(bad) == ["model.layers.0.mlp.gate_up_proj", "model.layers.1.mlp.gate_up_proj"]
    with pytest.raises(PassError, match=r"gate_up_proj.*LM head.*silently"):
        run_builder_pass(tmp_path / "out", ModelArtifact(format="hf", path=str(bad)), precision="int4")
    assert not (tmp_path / "out" / "model").exists()
    assert lm_head_impostors(tiny_hf) == []


def test_refusals(tiny_hf: Path, tmp_path: Path) -> None:
    hf = ModelArtifact(format="hf", path=str(tiny_hf))
    qlora = ModelArtifact(format="hf_adapter", path=str(tiny_hf), adapter_path=str(tmp_path), quantized=True)
    with pytest.raises(PassError, match="QLoRA adapter .*MergeAdapterWeights"):
        run_builder_pass(tmp_path, qlora)
    with pytest.raises(PassError, match="fp16 is not supported on cpu"):
        run_builder_pass(tmp_path, hf, precision="fp16")
    with pytest.raises(PassError, match="MergeAdapterWeights"):
        run_builder_pass(tmp_path, hf, extra_options={"adapter_path": str(tmp_path)})
    with pytest.raises(PassError, match="format 'hf'"):
        run_builder_pass(tmp_path, ModelArtifact(format="onnx", path=str(tmp_path)))


def test_execution_provider_resolution() -> None:
    cfg = ModelBuilderPass.Config
    assert resolve_execution_provider(cfg(), ["CUDAExecutionProvider"]) == "cuda"
    assert resolve_execution_provider(cfg(), ["CPUExecutionProvider"]) == "cpu"
    assert resolve_execution_provider(cfg(device="gpu"), ["CPUExecutionProvider"]) == "cuda"
    assert resolve_execution_provider(cfg(execution_provider="cpu", device="gpu"), []) == "cpu"
    with pytest.raises(PassError, match="unknown execution provider"):
        resolve_execution_provider(cfg(execution_provider="tpu"), [])
