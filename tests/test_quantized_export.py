"""OnnxConversion of a quantized Hugging Face checkpoint (Olive's awq_onnx / gptq examples: a quantizer, then
OnnxConversion): each quantized Linear becomes a MatMulNBits with the checkpoint's own codes, and the exported
logits equal those of the dequantized model (the pass's own parity check, 1e-4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.core.job import Job, ModelArtifact
from orchestrator.passes.base import PassContext, PassError
from orchestrator.passes.common.onnx_tools import matmulnbits_nodes, onnx_model_file
from orchestrator.passes.onnx.onnx_conversion import OnnxConversionPass

GS = 32


def _run(p: Any, out: Path, model: ModelArtifact, **cfg: Any) -> Any:
    job = Job(job_id="j", pass_name="p", pass_type=p.type_name, output_dir=str(out))
    return p.run(p.Config(**cfg), model, PassContext(job=job, out_dir=out, emit=lambda e: None))


def _gptq_checkpoint(tiny_model: Path, dest: Path, *, act_order: bool = False) -> int:
    """A GPTQ-layout checkpoint of the tiny model (round-to-nearest codes, what AutoAWQQuantizer/GptqQuantizer
    write); returns how many Linears it quantized."""
    import transformers

    from orchestrator.passes.common.gptq_layout import pack_gptq, write_gptq_checkpoint

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    params = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            g = module.weight.data.unflatten(-1, (-1, GS))
            lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
            scale = ((hi - lo) / 15).clamp_min(1e-8)
            zp = torch.clamp(torch.round(-lo / scale), 0, 15)
            pack_gptq(module.weight.data, scale, zp, GS, sym=False)
            params[name] = (module.weight.data.clone(), scale.half().float(), zp)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    write_gptq_checkpoint(model, params, dest, group_size=GS, sym=False, tokenizer=tok)
    if act_order:
        from safetensors.torch import load_file, save_file

        state = load_file(str(dest / "model.safetensors"))
        key = next(k for k in state if k.endswith(".g_idx"))
        state[key] = state[key].flip(0)
        save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return len(params)


def test_gptq_layout_exports_as_matmulnbits_with_its_codes(tmp_path: Path, tiny_model: Path) -> None:
    n = _gptq_checkpoint(tiny_model, tmp_path / "gptq")
    model = ModelArtifact(format="hf", path=str(tmp_path / "gptq"), quantized=True)
    res = _run(OnnxConversionPass(), tmp_path / "c", model)
    assert res.metrics["parity_max_abs_diff"] < 1e-4  # vs the dequantized checkpoint
    nodes = matmulnbits_nodes(onnx_model_file(tmp_path / "c" / res.model.path))
    assert len(nodes) == n and {x["block_size"] for x in nodes} == {GS} and {x["bits"] for x in nodes} == {4}
    # dynamo's graph keeps the weights as a Transpose of [out, in]: found too
    res = _run(OnnxConversionPass(), tmp_path / "d", model, use_dynamo_exporter=True)
    assert len(matmulnbits_nodes(onnx_model_file(tmp_path / "d" / res.model.path))) == n


def test_olive_layout_from_rtn_exports_as_matmulnbits(tmp_path: Path, tiny_model: Path) -> None:
    from orchestrator.passes.quantization.rtn import RtnPass

    rtn = _run(RtnPass(), tmp_path / "r", ModelArtifact(format="hf", path=str(tiny_model)), group_size=GS)
    model = ModelArtifact(format="hf", path=str(tmp_path / "r" / rtn.model.path), quantized=True)
    res = _run(OnnxConversionPass(), tmp_path / "c", model)
    assert res.metrics["parity_max_abs_diff"] < 1e-4
    assert len(matmulnbits_nodes(onnx_model_file(tmp_path / "c" / res.model.path))) == 2 * 4


def test_act_order_groups_are_refused_in_one_line(tmp_path: Path, tiny_model: Path) -> None:
    _gptq_checkpoint(tiny_model, tmp_path / "gptq", act_order=True)
    model = ModelArtifact(format="hf", path=str(tmp_path / "gptq"), quantized=True)
    with pytest.raises(PassError, match="act-order"):
        _run(OnnxConversionPass(), tmp_path / "c", model)
