"""The GPTQ checkpoint layout (torch only): `qweight` int32 [in/8, out], `qzeros` int32 [groups, out/8] holding
zero-1, `scales` fp16 [groups, out], `g_idx` [in], config.json quantization_config quant_method "gptq". Written by
the AWQ/GPTQ quantizers (quantization/awq_gptq.py) and read by the ONNX exporters (onnxruntime-genai's builder
keeps its int4 codes; `load_dequantized` is the parity reference), so it sits below both families.

`pack_gptq` / `write_gptq_checkpoint` also turn any grouped int4 (scale, zero point) result into this layout (the
tests use them with a round-to-nearest quantizer, no llm-compressor needed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.core.fs import atomic_dir
from orchestrator.passes.base import PassError

GPTQ_CHECKPOINT = "model.safetensors"
REFERENCE_TOL = 0.01


def pack_gptq(weight: Any, scale: Any, zero_point: Any, group_size: int, sym: bool) -> tuple[dict[str, Any], float]:
    """Grouped int4 (per-output-row scale / zero point per group) -> GPTQ tensors, and the relative error between
    `weight` and its dequantized codes (GPTQ leaves weight at its quantized value: ~0; AWQ / round-to-nearest:
    the int4 rounding error, a few percent).

    weight [out, in]; scale [out, groups]; zero_point [out, groups] in the unsigned convention of GPTQ / AutoAWQ
    checkpoints: codes q in 0..15, w ~ (q - zero_point) * scale, so integers in 0..15 (llm-compressor's signed
    zero points: convert with unsigned_zero_point). Symmetric: zero_point None (the zero point is 8).
    """
    import torch

    w = weight.float().cpu()
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    if in_f % gs or in_f % 8 or out_f % 8:
        raise PassError(f"int4 packing needs in/out features divisible by 8 and by group_size, got {out_f}x{in_f}")
    groups = in_f // gs
    s = scale.float().cpu().reshape(out_f, -1)
    if s.shape[1] != groups:
        raise PassError(f"scale has {s.shape[1]} groups per row, expected {groups} (group_size {gs})")
    if sym:
        if zero_point is not None and bool(zero_point.float().ne(8).any()):
            raise PassError("symmetric int4 has zero point 8 for every group: pass zero_point=None")
        zeros = torch.full_like(s, 8.0)
    else:
        if zero_point is None:
            raise PassError("asymmetric int4 (sym=False) needs zero points")
        zeros = zero_point.float().cpu().reshape(out_f, -1)
        if zeros.shape != s.shape:
            raise PassError(f"zero points have shape {tuple(zeros.shape)}, scales {tuple(s.shape)}")
        if bool(((zeros < 0) | (zeros > 15) | (zeros != zeros.round())).any()):
            raise PassError(
                f"zero points must be integers in 0..15 (codes 0..15, w = (q - zero) * scale), got "
                f"{float(zeros.min()):g}..{float(zeros.max()):g}: llm-compressor's signed zero points (-8..7) need "
                "unsigned_zero_point first"
            )
    s_full = s.repeat_interleave(gs, dim=1)
    z_full = zeros.repeat_interleave(gs, dim=1)
    # as compressed-tensors computes its signed codes, round(w / s + z) with z = zero - 8, then shifted by 8: the
    # same rounding of ties (w / s = k + 1/2 is common with bf16 weights) and of sums, so the same codes
    q = torch.clamp(torch.round(w / s_full + (z_full - 8)) + 8, 0, 15)
    deq = (q - z_full) * s_full
    rel_err = float((deq - w).norm() / w.norm().clamp_min(1e-12))
    q = q.to(torch.int32)  # [out, in]
    zeros_i = zeros.round().to(torch.int32)  # [out, groups]

    qweight = torch.zeros((in_f // 8, out_f), dtype=torch.int32)
    qt = q.t().contiguous()  # [in, out]
    for k in range(8):
        qweight |= qt[k::8, :] << (4 * k)
    qzeros = torch.zeros((groups, out_f // 8), dtype=torch.int32)
    # GPTQ stores zero - 1 (a zero point 0 is stored as 15: readers add 1 and keep 4 bits, see unpack_gptq)
    zt = ((zeros_i - 1) & 0xF).t().contiguous()  # [groups, out]
    for k in range(8):
        qzeros |= zt[:, k::8] << (4 * k)
    tensors = {
        "qweight": qweight,
        "qzeros": qzeros,
        "scales": s.t().contiguous().to(torch.float16),
        "g_idx": torch.arange(in_f, dtype=torch.int32) // gs,
    }
    return tensors, rel_err


def write_gptq_checkpoint(
    model: Any,
    params: dict[str, tuple[Any, Any, Any]],
    dest: Path,
    *,
    group_size: int,
    sym: bool,
    tokenizer: Any = None,
    reference: Any = None,
    reference_diffs: dict[str, float] | None = None,
) -> dict[str, float]:
    """Save `model` with each quantized Linear as qweight/qzeros/scales/g_idx; returns the pack error per layer.

    reference: name -> the layer's weight as the quantizer itself dequantizes it (llmcompressor_reference): the
    packed codes read back (unpack_gptq) must match it to REFERENCE_TOL (relative L2), else PassError before
    anything is written; the differences go to `reference_diffs` when given."""
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    errors: dict[str, float] = {}
    for name, (weight, scale, zp) in params.items():
        tensors, err = pack_gptq(weight, scale, zp, group_size, sym)
        errors[name] = err
        if reference is not None:
            ref = reference(name).detach().float().cpu()
            diff = float((unpack_gptq(tensors) - ref).norm() / ref.norm().clamp_min(1e-12))
            if reference_diffs is not None:
                reference_diffs[name] = diff
            if not diff <= REFERENCE_TOL:
                raise PassError(
                    f"{name}: the packed int4 weight differs from the quantizer's own by {diff:.2e} (relative L2, "
                    f"limit {REFERENCE_TOL:.0e}): the GPTQ layout would not hold the quantized model (internal error)"
                )
        for suffix in ("weight", "weight_scale", "weight_zero_point", "weight_g_idx"):
            state.pop(f"{name}.{suffix}", None)
        for key, value in tensors.items():
            state[f"{name}.{key}"] = value
    # the unquantized rest (embeddings, norms, LM head) in fp16, as GPTQ checkpoints ship it
    state = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    with atomic_dir(dest) as tmp:
        save_file(state, str(tmp / GPTQ_CHECKPOINT), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg["torch_dtype"] = cfg["dtype"] = "float16"
        cfg["quantization_config"] = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group_size,
            "desc_act": False,  # g_idx is in input order whatever the calibration order was
            "sym": sym,
            "checkpoint_format": "gptq",
        }
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return errors


def unpack_gptq(tensors: dict[str, Any]) -> Any:
    """qweight / qzeros / scales / g_idx (GPTQ layout, 4-bit) -> the dequantized weight [out, in], fp32."""
    import torch

    qweight, qzeros, scales, g_idx = (tensors[k] for k in ("qweight", "qzeros", "scales", "g_idx"))
    shifts = [4 * k for k in range(8)]
    q = torch.stack([(qweight >> s) & 0xF for s in shifts], dim=1).reshape(-1, qweight.shape[1])  # [in, out]
    # stored zero - 1; + 1 modulo 16 as onnxruntime-genai's builder reads it (a zero point 0 is stored as 15)
    z = (torch.stack([(qzeros >> s) & 0xF for s in shifts], dim=2).reshape(qzeros.shape[0], -1) + 1) & 0xF
    g = g_idx.long()
    return ((q.float() - z[g].float()) * scales[g].float()).t().contiguous()


def load_dequantized(hf_dir: Path | str) -> Any:
    """The checkpoint written by write_gptq_checkpoint as a plain fp32 transformers model whose Linear weights are
    its dequantized int4 values: a parity reference for the ONNX export (transformers itself would need a GPTQ
    kernel package to load the checkpoint)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir = Path(hf_dir)
    cfg = AutoConfig.from_pretrained(hf_dir)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = load_file(str(hf_dir / GPTQ_CHECKPOINT))
    for name in sorted(k.removesuffix(".qweight") for k in state if k.endswith(".qweight")):
        parts = {key: state.pop(f"{name}.{key}") for key in ("qweight", "qzeros", "scales", "g_idx")}
        state[f"{name}.weight"] = unpack_gptq(parts)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()
