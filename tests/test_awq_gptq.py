"""AWQ/GPTQ -> orch's GPTQ layout: the extraction and packing of orchestrator/passes/quantization/awq_gptq.py, fed
the module state llm-compressor leaves, without llm-compressor (this venv has transformers 5.23; llm-compressor 0.14
needs 5.15-5.17, so it runs in the gpu-quantize environment, see bench/gpu_quantize.py).

The state is built here on CPU with llm-compressor's own math, restated from its source:
- `awq_smooth`: llm-compressor 0.14 AWQModifier._apply_smoothing (modifiers/transform/awq/base.py, `_smooth`), with
  Phi-3's mappings (transform/awq/mappings.py `_phi_mappings`): the balance layer's weight times s per input column,
  the smooth layer divided by s (a norm's weight; for qkv_proj -> o_proj and gate_up_proj -> down_proj the last
  rows of the fused Linear: v, up). The model computes the same function, its Linears' weights stay full precision.
- `ct_qparams` / `ct_fake_quantize`: compressed-tensors 0.19's int4 group quantization (quantization/utils/
  helpers.py calculate_qparams, lifecycle/forward_helpers.py _quantize_dequantize): signed codes in [-8, 7];
  asymmetric: scale = (max - min) / 15, zero point = round(clamp(-8 - min / scale, -8, 7)) as int8; symmetric:
  scale = max|w| / 7.5, zero point 0; q = clamp(round(w / scale + zero), -8, 7), w_q = (q - zero) * scale.
  QuantizationModifier attaches them as the Linear's weight_scale / weight_zero_point parameters next to
  `quantization_scheme.weights` (num_bits, type, symmetric), and leaves the weight as it is.

The bug these tests pin down (bench/gpu_quantize.py's first H100 AWQ run): the pass packed compressed-tensors'
signed zero points as if they were the unsigned 0..15 ones of the GPTQ layout, so every code below the zero point
was clipped to 0 and negative zero points wrapped around: int4 vs fp logits rel. L2 1.42 with 0% greedy agreement.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from orchestrator.passes.base import PassError
from orchestrator.passes.common.gptq_layout import load_dequantized, pack_gptq, unpack_gptq, write_gptq_checkpoint
from orchestrator.passes.quantization.awq_gptq import collect_quant_params, unsigned_zero_point

GS = 32


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory: pytest.TempPathFactory):
    from orchestrator.passes.models.tiny_model import build_tiny_phi3

    # hidden 128, intermediate 352: every Linear input width a multiple of GS
    return build_tiny_phi3(tmp_path_factory.mktemp("tiny") / "model", num_layers=2, seed=5)


def ct_args(symmetric: bool) -> SimpleNamespace:
    """compressed-tensors' QuantizationArgs, as far as the pass reads it."""
    return SimpleNamespace(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=GS)


def ct_qparams(weight: torch.Tensor, symmetric: bool, group_size: int = GS) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' min-max scale [out, groups] (weight's dtype) and int8 zero point in [-8, 7]."""
    g = weight.unflatten(-1, (-1, group_size))
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / 7.5
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / 15
        zero = torch.clamp(-8 - lo / scale, -8, 7)
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
    return scale, torch.round(zero).to(torch.int8)


def ct_fake_quantize(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, fp16_scales: bool = False
) -> torch.Tensor:
    """w_q = (clamp(round(w / s + z), -8, 7) - z) * s per group: what llm-compressor's int4 model computes with.
    fp16_scales: the dequantization with the scales rounded to fp16, as a checkpoint stores them."""
    g = weight.float().unflatten(-1, (scale.shape[1], -1))
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = torch.clamp(torch.round(g / s + z), -8, 7)
    return ((q - z) * (s.half().float() if fp16_scales else s)).flatten(-2)


def attach_qparams(module: torch.nn.Linear, symmetric: bool) -> None:
    """What QuantizationModifier leaves on a Linear after AWQ: parameters beside the unchanged weight."""
    scale, zero = ct_qparams(module.weight.data, symmetric)
    module.register_parameter("weight_scale", torch.nn.Parameter(scale, requires_grad=False))
    module.register_parameter("weight_zero_point", torch.nn.Parameter(zero, requires_grad=False))
    module.quantization_scheme = SimpleNamespace(weights=ct_args(symmetric))


def awq_smooth(model, gen: torch.Generator) -> None:
    """Phi-3's four AWQ mappings per layer with random smoothing scales s (AWQ's grid search picks them from the
    activations; any s > 0 keeps the function): smooth layer / s, balance layer's input columns * s."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp

        def scales(n: int) -> torch.Tensor:
            return torch.exp(0.3 * torch.randn(n, generator=gen))

        s = scales(attn.qkv_proj.in_features)
        layer.input_layernorm.weight.data /= s
        attn.qkv_proj.weight.data *= s
        s = scales(attn.o_proj.in_features)
        attn.qkv_proj.weight.data[-s.numel() :] /= s[:, None]  # v
        attn.o_proj.weight.data *= s
        s = scales(mlp.gate_up_proj.in_features)
        layer.post_attention_layernorm.weight.data /= s
        mlp.gate_up_proj.weight.data *= s
        s = scales(mlp.down_proj.in_features)
        mlp.gate_up_proj.weight.data[-s.numel() :] /= s[:, None]  # up
        mlp.down_proj.weight.data *= s


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


def test_signed_zero_points_are_shifted_and_pack_to_the_same_weights() -> None:
    """llm-compressor's zero points (int8, -8..7) -> GPTQ's (0..15): the packed codes read back are
    llm-compressor's fake-quantized weight, including the extreme groups (zero point 0 stored as 15, and 15)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 4 * GS, generator=gen) * 0.02
    weight[0, :GS] = weight[0, :GS].abs()  # all >= 0: compressed-tensors' zero point -8 -> GPTQ zero point 0
    weight[1, :GS] = -weight[1, :GS].abs()  # all <= 0: zero point 7 -> 15
    for symmetric in (False, True):
        linear = torch.nn.Linear(4 * GS, 64, bias=False)
        linear.weight.data = weight.clone()
        attach_qparams(linear, symmetric)
        ((name, (w, scale, zero)),) = collect_quant_params(torch.nn.ModuleDict({"proj": linear})).items()
        assert name == "proj"
        if symmetric:
            assert zero is None
        else:
            assert zero.dtype == torch.float32 and int(zero.min()) == 0 and int(zero.max()) == 15
            assert torch.equal(zero, linear.weight_zero_point.float() + 8)
        packed, err = pack_gptq(w, scale, zero, GS, sym=symmetric)
        expected = ct_fake_quantize(weight, scale, linear.weight_zero_point, fp16_scales=True)
        assert torch.allclose(unpack_gptq(packed), expected, rtol=0, atol=1e-6)
        assert 0.05 < err < 0.2  # the int4 rounding of a weight that is not on the grid (AWQ's case)


def test_pack_refuses_zero_points_outside_the_unsigned_range() -> None:
    """Signed zero points handed straight to pack_gptq (what the pass did) are refused, not clipped."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 2 * GS, generator=gen)
    scale, zero = ct_qparams(weight, symmetric=False)
    assert int(zero.min()) < 0
    with pytest.raises(PassError, match=r"integers in 0\.\.15.*unsigned_zero_point"):
        pack_gptq(weight, scale, zero, GS, sym=False)
    with pytest.raises(PassError, match="integers in 0..15"):
        pack_gptq(weight, scale, zero.float() + 8.5, GS, sym=False)
    with pytest.raises(PassError, match="needs zero points"):
        pack_gptq(weight, scale, None, GS, sym=False)
    with pytest.raises(PassError, match="zero point 8"):
        pack_gptq(weight, scale, torch.zeros_like(scale), GS, sym=True)
    pack_gptq(weight, scale, torch.full_like(scale, 8), GS, sym=True)  # 8 is the symmetric zero point
    with pytest.raises(PassError, match="int8"):
        unsigned_zero_point(zero, SimpleNamespace(num_bits=8, type="int", symmetric=False), "x")
    with pytest.raises(PassError, match="non-zero zero points"):
        unsigned_zero_point(zero, ct_args(symmetric=True), "x")
    with pytest.raises(PassError, match="without zero points"):
        unsigned_zero_point(None, ct_args(symmetric=False), "x")


def test_reference_mismatch_is_refused_before_writing(tmp_path, tiny_phi3) -> None:
    """write_gptq_checkpoint checks the packed codes against the quantizer's own weights (the pass passes
    llm-compressor's): a layout that does not hold the quantized model is never written."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32)
    proj = model.model.layers[0].self_attn.o_proj
    attach_qparams(proj, symmetric=False)
    params = collect_quant_params(model)
    scale, zero = proj.weight_scale, proj.weight_zero_point
    right = {"model.layers.0.self_attn.o_proj": ct_fake_quantize(proj.weight, scale, zero)}
    diffs: dict[str, float] = {}
    write_gptq_checkpoint(
        model, params, tmp_path / "ok", group_size=GS, sym=False, reference=right.get, reference_diffs=diffs
    )
    assert diffs["model.layers.0.self_attn.o_proj"] < 1e-3
    # the reading the pass had: the zero point taken as unsigned, codes clipped at 0
    g = proj.weight.unflatten(-1, (-1, GS))
    s, z = scale[..., None], zero.float()[..., None]
    wrong = {"model.layers.0.self_attn.o_proj": ((torch.clamp(torch.round(g / s) + z, 0, 15) - z) * s).flatten(-2)}
    with pytest.raises(PassError, match="differs from the quantizer's own"):
        write_gptq_checkpoint(model, params, tmp_path / "bad", group_size=GS, sym=False, reference=wrong.get)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.*"))


def test_awq_state_round_trips_through_the_checkpoint_and_the_model_builder(tmp_path, tiny_phi3) -> None:
    """The model as llm-compressor leaves it after AWQ (smoothed norms and Linears, signed zero points beside the
    full-precision weights) -> collect_quant_params -> write_gptq_checkpoint: the checkpoint is the smoothed model
    with llm-compressor's int4 weights (load_dequantized), its int4 error is that of round-to-nearest, and
    onnxruntime-genai's builder reads the same int4 values (zero points 0 included)."""
    import subprocess
    import sys

    import numpy as np
    import transformers
    from safetensors.torch import load_file

    from orchestrator.passes.common.onnx_tools import GenaiModel, hf_encode, matmulnbits_nodes, onnx_model_file

    gen = torch.Generator().manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_phi3)
    fp = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32).eval()
    # groups all of one sign: zero points at both ends of the range (GPTQ zero 0 is stored as 15)
    o_proj = fp.model.layers[1].self_attn.o_proj.weight.data
    o_proj[:8, :GS] = o_proj[:8, :GS].abs()
    o_proj[8:16, :GS] = -o_proj[8:16, :GS].abs()
    text = "the quick brown fox jumps over the lazy dog and then the dog runs after the fox into the woods"
    ids = hf_encode(tiny_phi3, text)
    fp_logits = logits(fp, ids)

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32).eval()
    model.load_state_dict(fp.state_dict())
    awq_smooth(model, gen)
    assert rel_l2(logits(model, ids), fp_logits) < 1e-4  # smoothing keeps the function
    # every Linear, the LM head too (the builder would otherwise round it to int4 itself: a difference of its own)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for module in linears.values():
        attach_qparams(module, symmetric=False)
    assert any(int(m.weight_zero_point.min()) == -8 for m in linears.values())

    params = collect_quant_params(model)
    assert set(params) == set(linears)
    references = {n: ct_fake_quantize(m.weight, m.weight_scale, m.weight_zero_point) for n, m in linears.items()}
    diffs: dict[str, float] = {}
    ckpt = tmp_path / "awq"
    errors = write_gptq_checkpoint(
        model, params, ckpt, group_size=GS, sym=False, tokenizer=tok, reference=references.get, reference_diffs=diffs
    )
    assert max(diffs.values()) < 1e-3 and 0.05 < max(errors.values()) < 0.2, (diffs, errors)
    state = load_file(str(ckpt / "model.safetensors"))
    assert not any(k.endswith(("weight_scale", "weight_zero_point")) for k in state)
    assert (state["model.layers.1.self_attn.o_proj.qzeros"] & 0xF == 15).any()  # a zero point 0, stored as 15

    # the checkpoint read back: the smoothed norms and llm-compressor's int4 weights, fp16 as stored
    deq = load_dequantized(ckpt)
    expected = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32).eval()
    want = {k: v for k, v in model.state_dict().items() if not k.endswith(("weight_scale", "weight_zero_point"))}
    for name, module in linears.items():
        want[f"{name}.weight"] = ct_fake_quantize(
            module.weight, module.weight_scale, module.weight_zero_point, fp16_scales=True
        )
    expected.load_state_dict({k: v.half().float() for k, v in want.items()})
    deq_logits = logits(deq, ids)
    assert (deq_logits - logits(expected, ids)).abs().max() < 1e-3
    for norm in ("input_layernorm", "post_attention_layernorm"):
        got = getattr(deq.model.layers[0], norm).weight
        assert torch.allclose(got, getattr(model.model.layers[0], norm).weight.half().float())

    # int4 vs the full-precision model: round-to-nearest with zero points on the unsmoothed weights as the yardstick
    rtn = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32).eval()
    rtn.load_state_dict(fp.state_dict())
    for module in rtn.modules():
        if isinstance(module, torch.nn.Linear):
            scale, zero = ct_qparams(module.weight.data, symmetric=False)
            module.weight.data = ct_fake_quantize(module.weight.data, scale, zero, fp16_scales=True)
    int4_err, rtn_err = rel_l2(deq_logits, fp_logits), rel_l2(logits(rtn, ids), fp_logits)
    assert int4_err < 2 * rtn_err, (int4_err, rtn_err)  # random s, not searched ones, cost some accuracy

    # onnxruntime-genai's builder keeps the checkpoint's codes and zero points
    out = tmp_path / "onnx"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out)]
    subprocess.run([*cmd, "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache")], check=True, capture_output=True)
    nodes = matmulnbits_nodes(onnx_model_file(out))
    assert len(nodes) == 2 * 5 + 1 and {n["block_size"] for n in nodes} == {GS}, nodes
    got = GenaiModel(out).logits(ids)
    ref = deq_logits.numpy()
    diff = np.abs(got - ref)
    # left: MatMulNBits' int8 activations (accuracy_level 4); a zero point read otherwise moves whole groups
    int4_effect = float((deq_logits - fp_logits).abs().max())
    assert diff.max() < 0.03 and diff.max() < int4_effect / 3, (float(diff.max()), int4_effect)
    assert float((got.argmax(-1) == ref.argmax(-1)).mean()) >= 0.75


def test_awq_on_cpu_for_small_models_or_when_asked(monkeypatch, tmp_path, tiny_phi3) -> None:
    """AWQ without a GPU: small models run (minutes), larger ones are refused with the way out named unless
    ORCH_AWQ_CPU=1 (llm-compressor's AWQ is correct on CPU once its activation cache is not pinned, only slow)."""
    from orchestrator.passes.quantization import awq_gptq

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(awq_gptq.AWQ_CPU_ENV, raising=False)
    big = tmp_path / "big"
    big.mkdir()
    with (big / "model.safetensors").open("wb") as f:  # sparse: only the size is read
        f.truncate(awq_gptq.AWQ_CPU_MAX_BYTES + 1)
    with pytest.raises(PassError, match=f"AWQ needs a CUDA GPU.*{awq_gptq.AWQ_CPU_ENV}=1.*GPTQ"):
        awq_gptq.AutoAWQQuantizerPass().check_device(str(big))
    awq_gptq.AutoAWQQuantizerPass().check_device(str(tiny_phi3))  # ~1 MB of weights: runs
    awq_gptq.GptqQuantizerPass().check_device(str(big))
    monkeypatch.setenv(awq_gptq.AWQ_CPU_ENV, "1")
    awq_gptq.AutoAWQQuantizerPass().check_device(str(big))
