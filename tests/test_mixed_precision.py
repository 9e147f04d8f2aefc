"""Olive >= 0.10's PyTorch quantization flow on the tiny Phi-3 (tied embeddings, as Qwen3-0.6B):
SelectiveMixedPrecision kld_gradient -> Gptq (Olive format) -> Rtn (lm_head, embeds at 8 bits) -> ModelBuilder
int4 (the builder's Olive loader) -> GraphSurgeries TieWordEmbeddings. Real torch, builder and onnxruntime-genai."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.core.job import Job, ModelArtifact
from orchestrator.passes.base import PassContext, PassError
from tests.conftest import tone_data_config

PROMPTS = ["### Text: the meeting moved to friday\n### The tone is:\n", "thanks so much for the help", "why is it late"]


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The tiny Phi-3 with lm_head tied to the embedding (Qwen3-0.6B ties them)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    dest = tmp_path_factory.mktemp("tied") / "tiny-tied"
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(dest)
    return dest


def _run(pass_type: str, cfg: dict[str, Any], model: ModelArtifact, out: Path, tone_data: Path) -> Any:
    from orchestrator.passes.registry import load_pass

    cls = load_pass(pass_type)
    config = cls.Config.model_validate(cfg)
    job = Job(
        job_id=pass_type, pass_name=pass_type, pass_type=pass_type, model=model, output_dir=str(out),
        data_configs={"calib": tone_data_config(tone_data, "calib")},
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    events: list[dict[str, Any]] = []
    result = cls().run(config, model, PassContext(job=job, out_dir=out, emit=events.append))
    assert result.model is not None
    path = result.model.path if Path(result.model.path).is_absolute() else str(out / result.model.path)
    logs = [e["message"] for e in events if e["type"] == "log"]
    return result.model.model_copy(update={"path": path}), result.metrics, logs


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, tied_model: Path, tone_data: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("chain")
    m0 = ModelArtifact(format="hf", path=str(tied_model))
    q = {"bits": 4, "sym": False, "group_size": 128}
    smp = {"algorithm": "kld_gradient", "high_bits": 8, "ratio": 0.65, "data_config": "calib", **q}
    m1, met1, _ = _run("SelectiveMixedPrecision", smp, m0, root / "s", tone_data)
    m2, _, log2 = _run("Gptq", {**q, "data_config": "calib"}, m1, root / "g", tone_data)
    rtn = {**q, "bits": 8, "lm_head": True, "embeds": True,
           "overrides": {"lm_head": {"bits": 8}, "model.embed_tokens": {"bits": 8}}}  # fmt: skip
    m3, _, _ = _run("Rtn", rtn, m2, root / "r", tone_data)
    m4, met4, _ = _run("ModelBuilder", {"precision": "int4"}, m3, root / "m", tone_data)
    tie = {"surgeries": [{"surgeon": "TieWordEmbeddings"}]}
    m5, met5, log5 = _run("GraphSurgeries", tie, m4, root / "t", tone_data)
    return {"smp": m1, "smp_metrics": met1, "gptq": m2, "gptq_log": log2, "rtn": m3, "built": m4, "tied": m5,
            "built_metrics": met4, "tied_metrics": met5, "tie_log": log5, "root": root}  # fmt: skip


def test_decision_is_written_and_readable(chain: dict[str, Any]) -> None:
    cfg = json.loads((Path(chain["smp"].path) / "config.json").read_text())
    decision = cfg["olive_mixed_precision"]
    report = json.loads((chain["root"] / "s" / "mixed_precision.json").read_text())
    assert len(report["layers"]) == 8  # 2 layers x qkv, o, gate_up, down
    assert len(decision["overrides"]) == 3  # 8 - round(0.65 * 8)
    assert all(v == {"bits": 8} for v in decision["overrides"].values())


def test_checkpoint_is_olive_format_with_per_layer_bits(chain: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    rtn_dir = Path(chain["rtn"].path)
    quant = json.loads((rtn_dir / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "olive" and quant["bits"] == 4
    high = set(json.loads((Path(chain["smp"].path) / "config.json").read_text())["olive_mixed_precision"]["overrides"])
    state = load_file(str(rtn_dir / "model.safetensors"))
    for name in high | {"lm_head", "model.embed_tokens"}:
        assert quant["overrides"][name]["bits"] == 8
        assert state[f"{name}.qweight"].dtype.is_floating_point is False
    down = "model.layers.0.mlp.down_proj"  # 352 inputs: groups of 128 do not fit, the block size is 32
    assert quant["overrides"][down]["group_size"] == 32
    assert state[f"{down}.qweight"].shape[0] == 128


def test_matmulnbits_bits_follow_the_decision(chain: dict[str, Any]) -> None:
    import onnx

    from orchestrator.passes.common import onnx_tools

    high = json.loads((Path(chain["smp"].path) / "config.json").read_text())["olive_mixed_precision"]["overrides"]
    g = onnx.load(str(onnx_tools.onnx_model_file(chain["built"].path)), load_external_data=False).graph
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in g.node if n.op_type == "MatMulNBits"}
    assert bits["/lm_head/MatMulNBits"] == 8
    for name, b in bits.items():
        if name.startswith("/model/layers."):
            layer, kind = name.split("/")[2].split(".")[1], name.split("/")[4]
            hf = [h for h in high if h.split(".")[2] == layer and h.endswith(kind)]
            assert b == (8 if hf else 4), (name, b)
    assert sorted(set(bits.values())) == [4, 8]


def _parity(hf_dir: Path, onnx_dir: Path) -> tuple[float, float]:
    """Max |logit diff| and greedy agreement of the ONNX model vs the fp32 PyTorch model over PROMPTS."""
    from orchestrator.passes.common import onnx_tools

    diffs, agree, n = [], 0, 0
    for p in PROMPTS:
        ids = onnx_tools.hf_encode(hf_dir, p)
        ref = np.asarray(onnx_tools.hf_logits(hf_dir, ids))
        got = np.asarray(onnx_tools.ort_logits(onnx_dir, ids))
        diffs.append(float(np.abs(ref - got).max() / np.abs(ref).max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        n += ref.shape[0]
    return max(diffs), agree / n


def test_final_model_close_to_fp32_and_smaller(chain: dict[str, Any], tied_model: Path) -> None:
    from orchestrator.passes.common import onnx_tools

    tied = Path(chain["tied"].path)
    rel, agree = _parity(tied_model, tied)
    print(f"tied int4/int8 vs fp32: max |diff| / max |logit| {rel:.3f}, greedy agreement {agree:.2f}")
    assert rel < 0.25 and agree > 0.5
    rel_b, _ = _parity(tied_model, Path(chain["built"].path))
    assert abs(rel - rel_b) < 0.02  # the tie changes nothing: the embedding was the LM head's 8-bit grid
    assert chain["tied_metrics"]["model_size_bytes"] < chain["tied_metrics"]["size_before_bytes"]
    text, n_tokens, _ = onnx_tools.generate(tied, PROMPTS[0], 8)
    assert n_tokens > 0


def test_tie_refused_for_untied_model(tmp_path: Path, tiny_model: Path, tone_data: Path) -> None:
    m0 = ModelArtifact(format="hf", path=str(tiny_model))
    m1, _, _ = _run("Rtn", {"bits": 4, "lm_head": True, "embeds": True,
                            "overrides": {"lm_head": {"bits": 8}, "model.embed_tokens": {"bits": 8}}},
                    m0, tmp_path / "r", tone_data)  # fmt: skip
    m2, _, _ = _run("ModelBuilder", {"precision": "int4"}, m1, tmp_path / "m", tone_data)
    with pytest.raises(PassError, match="not tied"):
        _run("GraphSurgeries", {"surgeries": [{"surgeon": "TieWordEmbeddings"}]}, m2, tmp_path / "t", tone_data)


def test_config_refusals() -> None:
    from orchestrator.passes.onnx.graph_surgeries import GraphSurgeriesPass
    from orchestrator.passes.quantization.mixed_precision import SelectiveMixedPrecisionPass
    from orchestrator.passes.quantization.olive_gptq import OliveGptqPass

    smp = SelectiveMixedPrecisionPass.Config.model_validate({"algorithm": "kld_gradient"})
    # no data_config: not refused, Olive's default calibration set (the workflow reader adds it, tests/test_hub.py)
    assert SelectiveMixedPrecisionPass.config_problems(smp) == []
    assert SelectiveMixedPrecisionPass.default_data_config(smp)["name"] == "wikitext2_train"
    assert OliveGptqPass.default_data_config(OliveGptqPass.Config.model_validate({}))["name"] == "wikitext2_train"
    bad = SelectiveMixedPrecisionPass.Config.model_validate({"algorithm": "kld_gradient", "bits": 8, "high_bits": 4})
    assert "high_bits" in SelectiveMixedPrecisionPass.config_problems(bad)[0]
    gs = GraphSurgeriesPass.Config.model_validate({"surgeries": [{"surgeon": "RemoveRopeMultiCache"}]})
    assert "TieWordEmbeddings" in GraphSurgeriesPass.config_problems(gs)[0]
    with pytest.raises(ValueError):
        SelectiveMixedPrecisionPass.Config.model_validate({"algorithm": "hqq"})
