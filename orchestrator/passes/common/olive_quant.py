"""Olive's PyTorch-level quantized checkpoint ("Olive quantized" HF folder), shared by SelectiveMixedPrecision,
Gptq (Olive >= 0.10) and Rtn.

Layout, as onnxruntime-genai's builder reads it (loaders/olive.py, quant_method "olive"): per quantized module
`qweight` uint8 [out, in * bits / 8] packed along the last axis (low bits first, the ORT MatMulNBits byte order),
`scales` [out, groups], `qzeros` uint8 [out, ceil(groups * bits / 8)] packed the same way, unsigned codes:
w ~ (q - zero) * scale. config.json `quantization_config` = {quant_method: olive, bits, group_size, sym,
overrides: {module name: {bits, group_size}}}: the builder's get_layer_bits / get_layer_group_size read
`overrides` by module name, so per-layer bits (the mixed-precision decision) and per-layer group sizes travel there.

Group sizes: MatMulNBits needs in_features to be a whole number of blocks and a power-of-two block >= 16. Where
the asked group_size does not divide a layer's in_features (the tiny model's down_proj has 352 inputs), that layer
gets the largest power of two <= group_size that divides it, recorded in its override and said in the pass log;
a layer with none (in_features not a multiple of 16) is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from orchestrator.core.fs import atomic_dir
from orchestrator.passes.base import PassContext, PassError

CHECKPOINT = "model.safetensors"
MIXED_PRECISION_KEY = "olive_mixed_precision"  # config.json key SelectiveMixedPrecision writes (transformers keeps it)
MIXED_PRECISION_FILE = "mixed_precision.json"  # the human-readable decision


def layer_group_size(in_features: int, group_size: int) -> int:
    """The block size a layer gets: group_size (-1: the whole row) if it is a power of two dividing in_features,
    else the largest power of two below it that does (MatMulNBits blocks are powers of two >= 16)."""
    want = in_features if group_size == -1 else min(group_size, in_features)
    g = 1 << (want.bit_length() - 1)
    while g >= 16 and in_features % g:
        g //= 2
    if g < 16:
        raise PassError(f"in_features {in_features} is not a multiple of 16: no MatMulNBits block size fits it")
    return g


def qparams(w: Any, bits: int, group_size: int, sym: bool) -> tuple[Any, Any]:
    """Round-to-nearest (scale, zero) per row and group: [out, groups] each, zero an integer in 0..2^bits-1."""
    import torch

    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    qmax = 2**bits - 1
    if sym:
        amax = g.abs().amax(dim=2).clamp_min(1e-8)
        scale = amax / (2 ** (bits - 1) - 1)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        lo = g.amin(dim=2).clamp(max=0)
        hi = g.amax(dim=2).clamp(min=0)
        scale = ((hi - lo) / qmax).clamp_min(1e-8)
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero


def quantize_codes(w: Any, scale: Any, zero: Any, bits: int, group_size: int) -> Any:
    """Integer codes [out, in] of w on the grid (scale, zero) given per group."""
    import torch

    s = scale.repeat_interleave(group_size, dim=1)
    z = zero.repeat_interleave(group_size, dim=1)
    return torch.clamp(torch.round(w.float() / s + z), 0, 2**bits - 1)


def _pack(codes: Any, bits: int) -> Any:
    """[rows, n] integers < 2^bits -> uint8 [rows, ceil(n * bits / 8)], low bits first (ORT's order)."""
    import torch

    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    per = 8 // bits
    rows, n = codes.shape
    pad = (-n) % per
    if pad:
        codes = torch.cat([codes, torch.zeros(rows, pad, dtype=torch.uint8)], dim=1)
    codes = codes.reshape(rows, -1, per)
    out = torch.zeros(codes.shape[:2], dtype=torch.uint8)
    for k in range(per):
        out |= codes[:, :, k] << (bits * k)
    return out.contiguous()


def _unpack(packed: Any, bits: int, n: int) -> Any:
    import torch

    if bits == 8:
        return packed[:, :n].long()
    per = 8 // bits
    parts = [(packed.long() >> (bits * k)) & (2**bits - 1) for k in range(per)]
    return torch.stack(parts, dim=2).reshape(packed.shape[0], -1)[:, :n]


def pack_olive(codes: Any, scale: Any, zero: Any, bits: int) -> dict[str, Any]:
    """Codes [out, in], scale / zero [out, groups] -> the Olive tensors (scales kept in fp32: CPU graphs are fp32)."""
    import torch

    if bits not in (4, 8):
        raise PassError(f"bits={bits}: the Olive format onnxruntime-genai reads holds 4- or 8-bit weights")
    return {
        "qweight": _pack(codes, bits),
        "scales": scale.float().contiguous(),
        "qzeros": _pack(zero.round().to(torch.int64), bits),
    }


def unpack_olive(tensors: dict[str, Any], bits: int, group_size: int) -> Any:
    """The Olive tensors of one module -> its dequantized weight [out, in], fp32."""
    scales = tensors["scales"].float()
    out_f, groups = scales.shape
    q = _unpack(tensors["qweight"], bits, groups * group_size).float()
    z = _unpack(tensors["qzeros"], bits, groups).float()
    return (q - z.repeat_interleave(group_size, dim=1)) * scales.repeat_interleave(group_size, dim=1)


def rtn_module(w: Any, bits: int, group_size: int, sym: bool) -> tuple[dict[str, Any], float]:
    """Round-to-nearest one weight into the Olive tensors; also its relative L2 error."""
    scale, zero = qparams(w, bits, group_size, sym)
    codes = quantize_codes(w, scale, zero, bits, group_size)
    tensors = pack_olive(codes, scale, zero, bits)
    deq = unpack_olive(tensors, bits, group_size)
    return tensors, float((deq - w.float()).norm() / w.float().norm().clamp_min(1e-12))


def read_config(hf_dir: Path) -> dict[str, Any]:
    return json.loads((Path(hf_dir) / "config.json").read_text())


def olive_quant_config(cfg: dict[str, Any]) -> dict[str, Any] | None:
    q = cfg.get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == "olive" else None


def load_state(hf_dir: Path) -> dict[str, Any]:
    """Every tensor of the checkpoint's safetensors files (tied weights saved once are re-tied by name later)."""
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise PassError(f"{hf_dir} has no .safetensors weights")
    return state


def linear_names(state: dict[str, Any]) -> list[str]:
    """Decoder-layer Linear modules (2-D `.weight` under model.layers, norms excluded), in checkpoint order."""
    out = []
    for k, v in state.items():
        if k.startswith("model.layers.") and k.endswith(".weight") and v.dim() == 2:
            out.append(k.removesuffix(".weight"))
    return sorted(out, key=lambda n: (int(n.split(".")[2]), n))


def write_checkpoint(
    src_dir: Path, state: dict[str, Any], quant: dict[str, Any], dest: Path, extra_config: dict[str, Any] | None = None
) -> None:
    """Write `state` + config.json (quantization_config = quant) + the tokenizer/generation files of src_dir."""
    import torch
    from safetensors.torch import save_file

    cfg = read_config(src_dir)
    cfg["quantization_config"] = quant
    cfg.update(extra_config or {})
    state = {
        k: (v.to(torch.float16) if v.is_floating_point() and not k.endswith(".scales") else v).contiguous()
        for k, v in state.items()
    }
    cfg["torch_dtype"] = cfg["dtype"] = "float16"
    with atomic_dir(dest) as tmp:
        save_file(state, str(tmp / CHECKPOINT), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for f in Path(src_dir).iterdir():
            skip = ("config.json", "model.safetensors.index.json")
            if f.is_file() and f.suffix != ".safetensors" and f.name not in skip:
                shutil.copy2(f, tmp / f.name)


def module_bits(quant: dict[str, Any], name: str) -> tuple[int, int]:
    """(bits, group_size) of one quantized module, as the builder resolves them."""
    o = quant.get("overrides", {}).get(name, {})
    return int(o.get("bits", quant["bits"])), int(o.get("group_size", quant["group_size"]))


def dequantized_state(hf_dir: Path) -> dict[str, Any]:
    """The Olive checkpoint with every quantized module back as a float `.weight`: the parity reference."""
    quant = olive_quant_config(read_config(hf_dir))
    state = load_state(hf_dir)
    if quant is None:
        return state
    for name in [k.removesuffix(".qweight") for k in state if k.endswith(".qweight")]:
        bits, gs = module_bits(quant, name)
        parts = {key: state.pop(f"{name}.{key}") for key in ("qweight", "scales", "qzeros")}
        state[f"{name}.weight"] = unpack_olive(parts, bits, gs)
    return state


def load_dequantized(hf_dir: Path) -> Any:
    """A plain fp32 transformers model holding the checkpoint's dequantized weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(hf_dir)
    for attr in ("quantization_config", MIXED_PRECISION_KEY):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = {k: v.float() for k, v in dequantized_state(hf_dir).items()}
    model.load_state_dict(state, strict=False)
    return model.eval()


def stage_for_builder(hf_dir: Path, dest: Path) -> Path:
    """A copy of an Olive checkpoint that onnxruntime-genai 0.18's builder builds correctly, else hf_dir unchanged.

    Its loader takes the embedding as a float `model.embed_tokens.weight` only (an Olive
    `model.embed_tokens.qweight` would be read as a decoder layer and crash it): a quantized embedding goes in as
    its dequantized values. And with tie_word_embeddings true and a pre-quantized Olive LM head it emits a
    GatherBlockQuantized whose scales are flattened (onnxruntime refuses the model: "scales must have the same
    rank as data"), so the copy says false: the builder keeps the lookup separate and GraphSurgeries
    TieWordEmbeddings points it at the LM head's quantized weight afterwards."""
    hf_dir = Path(hf_dir)
    cfg = read_config(hf_dir)
    quant = olive_quant_config(cfg)
    if quant is None:
        return hf_dir
    state = load_state(hf_dir)
    quantized_embed = "model.embed_tokens.qweight" in state
    tied_head = bool(cfg.get("tie_word_embeddings")) and "lm_head.qweight" in state
    fused = [k for k in state if k.endswith((".qkv_proj.qzeros", ".gate_up_proj.qzeros"))]
    if not quantized_embed and not tied_head and not fused:
        return hf_dir
    if fused:
        quant = unfuse(state, quant, cfg)
    if quantized_embed:
        bits, gs = module_bits(quant, "model.embed_tokens")
        parts = {key: state.pop(f"model.embed_tokens.{key}") for key in ("qweight", "scales", "qzeros")}
        state["model.embed_tokens.weight"] = unpack_olive(parts, bits, gs)
        overrides = {k: v for k, v in quant.get("overrides", {}).items() if k != "model.embed_tokens"}
        quant = {**quant, "overrides": overrides}
    shutil.rmtree(dest, ignore_errors=True)
    write_checkpoint(hf_dir, state, quant, dest, {"tie_word_embeddings": False})
    return dest


def unfuse(state: dict[str, Any], quant: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Split fused Olive qkv_proj / gate_up_proj (Phi-3) into q/k/v and gate/up modules, in place; returns the
    quantization config with their overrides. The builder's own split of a fused Olive `qzeros` divides the rows
    by the packing factor (right for 8 bits only: 4-bit zero points come out half as many rows as outputs), so the
    split is done here, by output rows, where each tensor's rows are outputs."""
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    q_size, kv_size = heads * head_dim, int(cfg.get("num_key_value_heads", heads)) * head_dim
    inter = int(cfg["intermediate_size"])
    overrides = dict(quant.get("overrides", {}))
    for name in [
        k.removesuffix(".qweight") for k in list(state) if k.endswith((".qkv_proj.qweight", ".gate_up_proj.qweight"))
    ]:
        prefix, kind = name.rsplit(".", 1)
        if kind == "qkv_proj":
            parts = {"q_proj": (0, q_size), "k_proj": (q_size, q_size + kv_size), "v_proj": (q_size + kv_size, None)}
        else:
            parts = {"gate_proj": (0, inter), "up_proj": (inter, None)}
        tensors = {key: state.pop(f"{name}.{key}") for key in ("qweight", "scales", "qzeros")}
        for part, (a, b) in parts.items():
            for key, t in tensors.items():
                state[f"{prefix}.{part}.{key}"] = t[a:b].contiguous()
            if name in overrides:
                overrides[f"{prefix}.{part}"] = overrides[name]
        overrides.pop(name, None)
    return {**quant, "overrides": overrides}


def calibration_texts(ctx: PassContext, data_config: str, limit: int, who: str) -> list[str]:
    """The first `limit` texts of a workflow data config (its "text" column), for calibration."""
    from orchestrator.passes.common.data import load_splits

    data_configs = ctx.job.data_configs
    if data_config not in data_configs:
        known = ", ".join(sorted(data_configs)) or "none"
        raise PassError(f"{who}: data config {data_config!r} is not in the workflow's data_configs ({known})")
    train, _ = load_splits(
        data_configs[data_config], base_dir=Path.cwd(), seed=0, data_files_override=ctx.job.data_files.get(data_config)
    )
    texts = [t for t in train["text"] if t][:limit]
    if not texts:
        raise PassError(f"{who}: data config {data_config!r} has no text to calibrate on")
    return texts


def load_fp_model(hf_dir: Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(fp32 model, tokenizer) of a plain HF checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return model.eval(), tok


def token_batches(tok: Any, texts: list[str], max_len: int) -> list[Any]:
    """One input_ids tensor [1, n] per text (no padding: every token counts)."""
    return [tok(t, return_tensors="pt", truncation=True, max_length=max_len)["input_ids"] for t in texts]
