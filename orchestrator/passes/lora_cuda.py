"""What orch picks for LoRA / QLoRA training on a CUDA device, so the user's config can stay the seed's.

The LoRA pass calls `cuda_overrides(model, sft_kwargs, notes=None)` once, after get_peft_model and before it builds
the SFTTrainer, only when it trains on CUDA; on CPU nothing here runs. The choice is split in two so that it can be
tested without a GPU:

- `plan_cuda(device, shape, sft_kwargs, options)` is a pure function of plain dicts: what the GPU can do
  (`probe_device()`), the model's shape and step size (`model_shape()`), and the SFTConfig kwargs so far. It returns
  a `CudaPlan` with a reason for every choice.
- `apply_plan(plan, model, sft_kwargs)` does it: SFTConfig kwargs, the attention kernel, Liger kernels, peft flags.

What it picks, and why (bench/RESULTS.md has the measured effect on an H100):
- bf16 autocast (`bf16=True`) where the GPU has bf16 (Ampere and newer), unless the user asked for fp16.
- Padding-free batches (TRL `padding_free=True`): the batch's sequences are laid end to end in one row with
  `position_ids` restarting at 0 and `cu_seq_lens_*` marking where each sample starts, so no FLOP is spent on
  padding. Samples never see each other: attention runs as variable-length flash attention through
  `torch.nn.attention.varlen.varlen_attn` (registered with transformers as attn_implementation "orch_varlen"), or
  flash-attn's varlen kernel when the flash_attn package is installed. The batches hold the same samples in the
  same order as the padded ones, so the loss curve per step is the padded one (tests/test_lora_cuda.py checks
  packed == separate logits). Needs one of the two kernels; without one, batches stay padded.
- peft's input cast off (`cast_input_dtype_enabled=False` on every LoRA layer) under bf16 autocast: peft keeps the
  adapter weights in fp32 and by default casts each LoRA layer's input to fp32 before the LoRA matmuls, which
  autocast then casts back to bf16 -- two full copies of every projection's input per step, for nothing.
- Liger kernels (liger-kernel, when installed; model types it supports): fused RMSNorm, SwiGLU and RoPE. Not its
  fused linear cross-entropy: TRL's SFTTrainer already computes the loss with a chunked, fused LM head.
- Fused LoRA layers (orchestrator/passes/lora_fused.py) under bf16/fp16 autocast, not for a 4-bit base: the LoRA
  update is added inside the base matmul's epilogue and the backward is written by hand, which removes the
  full-size `* scaling` and `+` passes over every projection's output; same saved tensors, same random masks.
- Gradient checkpointing only when the step would not fit: an estimate of weights + activations against the GPU's
  memory (the constants are calibrated on the H100 anchor: Phi-3-mini, 8 x 1024 tokens, 47 GiB). A user's or the
  QLoRA pass's explicit `gradient_checkpointing=True` is kept.
- torch.compile of the decoder layers is implemented but off unless `ORCH_CUDA_FASTPATH=+compile`: not shown to
  pay (the one H100 attempt was still compiling after 70 s, with dynamo warnings on Liger's Triton kernels), and
  padding-free rows change length every step.

Measured on an H100 (Phi-3-mini shape, r=64, 8 x 1024, bench/RESULTS.md): 2.21x the plain transformers+peft
tokens/s on variable-length samples (padding-free alone 1.71x, Liger +10%), 1.52x on samples that are all 1024
tokens long (fused LoRA layers +8.6% of that), with less peak memory (31.8 / 38.9 vs 51.8 / 51.3 GiB) and the same
per-step loss (within 0.002).

`ORCH_CUDA_FASTPATH` (comma list of +name / -name over liger, padding_free, input_cast, fused_lora, compile, gc)
turns single choices on or off, for ablations and as an escape hatch; the default is the plan.

`restore_attention(model)` puts attn_implementation back to "sdpa" (the pass may call it before it saves or
evaluates a padded batch: "orch_varlen" handles padding-free rows and right-padded causal batches only).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

VARLEN_ATTN = "orch_varlen"
# Model types whose attention goes through transformers' attention interface and reads cu_seq_lens / position_ids
# the way Llama does (decoder-only, causal, no attention sinks).
PADDING_FREE_MODEL_TYPES = frozenset(
    {"phi3", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo2", "phi"}
)
# Liger-kernel's apply_liger_kernel_to_<type> exists for these (0.8.5), with rope/rms_norm/swiglu arguments.
LIGER_MODEL_TYPES = frozenset({"phi3", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo2"})
# Activation bytes per token per decoder layer without checkpointing ~= (12 * hidden + 4 * intermediate) * 2:
# fits the H100 anchor (Phi-3-mini, 32 layers, 8 x 1024 tokens: 47 GiB peak with 7.6 GB of bf16 weights).
ACT_HIDDEN_FACTOR = 12
ACT_INTERMEDIATE_FACTOR = 4
MEMORY_HEADROOM = 0.85  # plan to use at most this share of the GPU's memory
OPTION_NAMES = ("liger", "padding_free", "input_cast", "fused_lora", "compile", "gc")


@dataclass(frozen=True)
class CudaPlan:
    bf16: bool
    attn_implementation: str | None  # None: leave the model's as it is
    padding_free: bool
    disable_input_cast: bool
    liger: dict[str, bool] | None  # kwargs for liger's apply_liger_kernel_to_<type>, None: not applied
    fused_lora: bool  # LoRA update inside the base GEMM's epilogue (orchestrator/passes/lora_fused.py)
    gradient_checkpointing: bool | None  # None: leave sft_kwargs' value
    compile_layers: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)


LAST_PLAN: CudaPlan | None = None  # the plan cuda_overrides applied last (the benchmark prints it)


def parse_options(text: str | None) -> dict[str, bool]:
    """'+compile,-liger' -> {'compile': True, 'liger': False}; unknown names are an error (typos must not pass)."""
    out: dict[str, bool] = {}
    for raw in (text or "").split(","):
        item = raw.strip()
        if not item:
            continue
        sign, name = (item[0], item[1:]) if item[0] in "+-" else ("+", item)
        if name not in OPTION_NAMES:
            raise ValueError(f"ORCH_CUDA_FASTPATH: unknown option {name!r}; known: {', '.join(OPTION_NAMES)}")
        out[name] = sign == "+"
    return out


def estimate_step_memory_gib(shape: Mapping[str, Any], *, checkpointing: bool) -> float:
    """Weights + activations + optimizer state of one training step, in GiB (an estimate, not a measurement)."""
    n_params = float(shape.get("n_params", 0))
    weight_bytes = n_params * (0.55 if shape.get("quantized_4bit") else 2.0)
    hidden = int(shape.get("hidden_size", 0))
    inter = int(shape.get("intermediate_size", 0) or 4 * hidden)
    layers = int(shape.get("num_layers", 0))
    tokens = int(shape.get("tokens_per_step", 0))
    per_token_layer = (ACT_HIDDEN_FACTOR * hidden + ACT_INTERMEDIATE_FACTOR * inter) * 2
    # with checkpointing: the layer inputs are kept, and one layer's activations live during its recompute
    act = tokens * (layers * hidden * 2 + per_token_layer) if checkpointing else tokens * layers * per_token_layer
    trainable = float(shape.get("trainable_params", 0))
    optimizer = trainable * 16  # fp32 weight + grad + two Adam moments
    logits = tokens * int(shape.get("vocab_size", 0)) * 4 * 2
    return (weight_bytes + act + optimizer + logits) / 2**30


def plan_cuda(
    device: Mapping[str, Any],
    shape: Mapping[str, Any],
    sft_kwargs: Mapping[str, Any],
    options: Mapping[str, bool] | None = None,
) -> CudaPlan:
    """Choose the CUDA fast path. Pure: plain dicts in, a CudaPlan with its reasons out.

    device: capability (major, minor), total_memory_gib, has_liger, has_varlen_attn, has_flash_attn.
    shape: model_type, n_params, trainable_params, hidden_size, intermediate_size, num_layers, vocab_size,
           tokens_per_step (batch x max length), quantized_4bit, attn_implementation.
    sft_kwargs: the SFTConfig kwargs so far (the user's training_args plus the pass's).
    options: {name: bool} forced choices (ORCH_CUDA_FASTPATH), names in OPTION_NAMES.
    """
    opts = dict(options or {})
    reasons: list[str] = []
    major = int(tuple(device.get("capability", (0, 0)))[0])
    model_type = str(shape.get("model_type", ""))
    fp16 = bool(sft_kwargs.get("fp16"))

    bf16 = major >= 8 and not fp16
    if bf16:
        reasons.append("bf16 autocast: the GPU has bf16 (compute capability >= 8.0)")
    elif fp16:
        reasons.append("fp16 autocast: the user asked for fp16")
    else:
        reasons.append("no bf16 on this GPU (compute capability < 8.0): fp32")

    # padding-free batches need a variable-length attention kernel and a model that reads cu_seq_lens
    attn: str | None = None
    kernel = None
    if device.get("has_flash_attn") and major >= 8:
        kernel = "flash_attention_2"
    elif device.get("has_varlen_attn") and major >= 8:
        kernel = VARLEN_ATTN
    want_pf = opts.get("padding_free", True)
    padding_free = False
    if not want_pf:
        reasons.append("padding-free batches off (ORCH_CUDA_FASTPATH)")
    elif kernel is None:
        reasons.append("padded batches: no variable-length attention kernel (torch varlen_attn / flash-attn) here")
    elif model_type not in PADDING_FREE_MODEL_TYPES:
        reasons.append(f"padded batches: padding-free attention is not wired for model type {model_type!r}")
    elif sft_kwargs.get("packing") and sft_kwargs.get("packing_strategy") == "wrapped":
        reasons.append("padded batches: the user's 'wrapped' packing already fills every row")
    else:
        padding_free = True
        attn = kernel
        reasons.append(
            f"padding-free batches: samples laid end to end, attention per sample through {kernel} "
            "(no padding FLOPs, no attention across samples)"
        )

    disable_cast = (bf16 or fp16) and opts.get("input_cast", True) and not shape.get("quantized_4bit")
    if disable_cast:
        reasons.append("peft input cast off: autocast runs the LoRA matmuls in half precision anyway")

    fused_lora = False
    if not opts.get("fused_lora", True):
        reasons.append("fused LoRA layers off (ORCH_CUDA_FASTPATH)")
    elif shape.get("quantized_4bit"):
        reasons.append("peft's LoRA forward: the 4-bit base layers are bitsandbytes', not plain Linear")
    elif bf16 or fp16:
        fused_lora = True
        reasons.append(
            "fused LoRA layers: the LoRA update added inside the base matmul (addmm epilogue), hand-written "
            "backward (no full-size scaling/add passes)"
        )

    liger: dict[str, bool] | None = None
    if not opts.get("liger", True):
        reasons.append("Liger kernels off (ORCH_CUDA_FASTPATH)")
    elif not device.get("has_liger"):
        reasons.append("no Liger kernels: liger-kernel is not installed")
    elif model_type not in LIGER_MODEL_TYPES:
        reasons.append(f"no Liger kernels for model type {model_type!r}")
    else:
        liger = {
            "rope": True,
            "rms_norm": True,
            "swiglu": True,
            "cross_entropy": False,
            "fused_linear_cross_entropy": False,  # TRL's SFTTrainer fuses the LM head with the loss itself
        }
        reasons.append("Liger kernels: fused RMSNorm, SwiGLU, RoPE (the loss is TRL's fused LM head)")

    gc: bool | None = None
    total = float(device.get("total_memory_gib", 0.0))
    need = estimate_step_memory_gib(shape, checkpointing=False)
    if "gc" in opts:
        gc = opts["gc"]
        reasons.append(f"gradient checkpointing {'on' if gc else 'off'} (ORCH_CUDA_FASTPATH)")
    elif sft_kwargs.get("gradient_checkpointing") or sft_kwargs.get("activation_checkpointing"):
        reasons.append("gradient checkpointing on: asked for by the config (or the QLoRA pass)")
    elif total > 0 and need > MEMORY_HEADROOM * total:
        gc = True
        reasons.append(
            f"gradient checkpointing on: the step needs ~{need:.0f} GiB without it, the GPU has {total:.0f} GiB"
        )
    else:
        gc = False
        reasons.append(f"no gradient checkpointing: the step fits (~{need:.0f} GiB of {total:.0f} GiB)")

    compile_layers = bool(opts.get("compile", False))
    if compile_layers:
        reasons.append("torch.compile of each decoder layer (ORCH_CUDA_FASTPATH)")

    return CudaPlan(
        bf16=bf16,
        attn_implementation=attn,
        padding_free=padding_free,
        disable_input_cast=bool(disable_cast),
        liger=liger,
        fused_lora=fused_lora,
        gradient_checkpointing=gc,
        compile_layers=compile_layers,
        reasons=tuple(reasons),
    )


# ---------------------------------------------------------------------------------------------------------------
# Reading the device and the model (need torch; not pure)


def probe_device(index: int | None = None) -> dict[str, Any]:
    """What the current CUDA device can do, as the plain dict plan_cuda reads."""
    import importlib.util

    import torch

    idx = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(idx)
    return {
        "name": props.name,
        "capability": (props.major, props.minor),
        "total_memory_gib": props.total_memory / 2**30,
        "has_liger": importlib.util.find_spec("liger_kernel") is not None
        and importlib.util.find_spec("triton") is not None,
        "has_varlen_attn": _varlen_fn() is not None,
        "has_flash_attn": importlib.util.find_spec("flash_attn") is not None,
    }


def _base_model(model: Any) -> Any:
    """The transformers PreTrainedModel inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_shape(model: Any, sft_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The model's size and the step's token count, as the plain dict plan_cuda reads."""
    base = _base_model(model)
    cfg = base.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    max_len = int(sft_kwargs.get("max_length") or 0) or int(getattr(text_cfg, "max_position_embeddings", 2048))
    max_len = min(max_len, int(sft_kwargs.get("orch_max_len", max_len)))
    batch = int(sft_kwargs.get("per_device_train_batch_size", 8))
    return {
        "model_type": getattr(text_cfg, "model_type", getattr(cfg, "model_type", "")),
        "n_params": n_params,
        "trainable_params": trainable,
        "hidden_size": int(getattr(text_cfg, "hidden_size", 0)),
        "intermediate_size": int(getattr(text_cfg, "intermediate_size", 0) or 0),
        "num_layers": int(getattr(text_cfg, "num_hidden_layers", 0)),
        "vocab_size": int(getattr(text_cfg, "vocab_size", 0)),
        "tokens_per_step": batch * max_len,
        "quantized_4bit": bool(getattr(base, "is_loaded_in_4bit", False)),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
    }


def cuda_overrides(model: Any, sft_kwargs: dict[str, Any], notes: list[str] | None = None) -> dict[str, Any]:
    """Plan and apply the CUDA fast path; return the updated SFTConfig kwargs (the input dict is not changed).

    `notes`, when given, receives one line per choice (the pass logs them). `sft_kwargs["orch_max_len"]`, when the
    pass sets it, is the longest sequence it tokenized (used for the memory estimate; removed here).
    """
    global LAST_PLAN
    options = parse_options(os.environ.get("ORCH_CUDA_FASTPATH"))
    plan = plan_cuda(probe_device(), model_shape(model, sft_kwargs), sft_kwargs, options)
    LAST_PLAN = plan
    if notes is not None:
        notes.extend(plan.reasons)
    return apply_plan(plan, model, sft_kwargs)


def apply_plan(plan: CudaPlan, model: Any, sft_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(sft_kwargs)
    out.pop("orch_max_len", None)
    if plan.bf16:
        out["bf16"] = True
        out.pop("fp16", None)
    if plan.padding_free:
        out["padding_free"] = True
        # padding the flat row to a multiple of max_len would add a fake sample of pad tokens: never useful here
        out.pop("pad_to_multiple_of", None)
        if plan.attn_implementation == VARLEN_ATTN:
            register_varlen_attention()
        _set_attn_implementation(model, plan.attn_implementation)
    if plan.gradient_checkpointing is not None:
        # transformers 5 renamed gradient_checkpointing* to activation_checkpointing*: write the name in use
        key = "activation_checkpointing" if "activation_checkpointing" in out else "gradient_checkpointing"
        out[key] = plan.gradient_checkpointing
        if plan.gradient_checkpointing:
            out.setdefault(f"{key}_kwargs", {"use_reentrant": False})
            base = _base_model(model)
            if hasattr(base, "enable_input_require_grads"):
                base.enable_input_require_grads()  # LoRA: the embeddings are frozen, checkpoints need a grad path
        elif _is_checkpointing(_base_model(model)):
            _base_model(model).gradient_checkpointing_disable()
    if plan.disable_input_cast:
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    if plan.liger is not None:
        apply_liger(model, plan.liger)
    if plan.fused_lora:
        from orchestrator.passes.lora_fused import fuse_lora_layers

        fuse_lora_layers(model)
    if plan.compile_layers:
        compile_decoder_layers(model)
    return out


def _is_checkpointing(base: Any) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers renamed it in 5.x
        if hasattr(type(base), name) or hasattr(base, name):
            return bool(getattr(base, name))
    return False


def _set_attn_implementation(model: Any, name: str | None) -> None:
    if name is None:
        return
    base = _base_model(model)
    setter = getattr(base, "set_attn_implementation", None)
    if callable(setter):
        try:
            setter(name)
            return
        except (ValueError, ImportError, TypeError):
            pass  # older transformers check names against a fixed list: set the config field directly
    for module in base.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name


def restore_attention(model: Any, name: str = "sdpa") -> None:
    """Put the model's attention back to a kernel that reads padding masks (before eval on padded batches)."""
    if getattr(_base_model(model).config, "_attn_implementation", None) == VARLEN_ATTN:
        _set_attn_implementation(model, name)


def apply_liger(model: Any, kwargs: Mapping[str, bool]) -> None:
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=_base_model(model), **dict(kwargs))


def compile_decoder_layers(model: Any) -> None:
    """torch.compile each decoder layer (regional compilation: one compiled graph reused by all layers)."""
    base = _base_model(model)
    inner = getattr(base, base.base_model_prefix, base)
    for layer in getattr(inner, "layers", []):
        layer.compile(dynamic=True)


# ---------------------------------------------------------------------------------------------------------------
# Variable-length attention for padding-free rows


def _varlen_fn() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def cu_seqlens_from_position_ids(position_ids: Any) -> tuple[Any, int]:
    """Sample boundaries of a padding-free row from its position_ids (each sample restarts at 0)."""
    import torch

    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([torch.zeros(1, dtype=starts.dtype, device=starts.device), starts])
    cu = torch.cat([starts, torch.tensor([pos.numel()], device=pos.device, dtype=starts.dtype)]).to(torch.int32)
    return cu, int(cu.diff().max())


def _segment_attention(q: Any, k: Any, v: Any, cu: Any, scaling: float | None) -> Any:
    """Reference / fallback: causal SDPA over each sample separately. q, k, v: (T, H, D); returns (T, H, D)."""
    import torch
    import torch.nn.functional as F

    bounds = [int(x) for x in cu.tolist()]
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b <= a:
            continue
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, s, D)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling).transpose(0, 1))
    return torch.cat(outs, dim=0) if outs else q.new_empty((0, *q.shape[1:]))


_VARLEN_KW: dict[str, Any] | None = None


def _varlen_call(q: Any, k: Any, v: Any, cu: Any, max_len: int, scaling: float | None) -> Any:
    """torch's varlen flash attention, whichever of its signatures this torch has; None if it cannot do this call."""
    global _VARLEN_KW
    fn = _varlen_fn()
    if fn is None or not q.is_cuda:
        return None
    if _VARLEN_KW is None:
        params = inspect.signature(fn).parameters
        _VARLEN_KW = {
            "window": "window_size" in params,
            "is_causal": "is_causal" in params,
            "scale": "scale" in params,
            "gqa": "enable_gqa" in params,
        }
    kw: dict[str, Any] = {}
    if _VARLEN_KW["window"]:
        kw["window_size"] = (-1, 0)
    elif _VARLEN_KW["is_causal"]:
        kw["is_causal"] = True
    else:
        return None
    default_scale = q.shape[-1] ** -0.5
    if scaling is not None and abs(scaling - default_scale) > 1e-12:
        if not _VARLEN_KW["scale"]:
            return None
        kw["scale"] = scaling
    if k.shape[1] != q.shape[1]:
        if _VARLEN_KW["gqa"]:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
    return fn(q, k, v, cu, cu, max_len, max_len, **kw)


def varlen_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers attention function: per-sample causal attention over a padding-free row.

    query/key/value come as (batch, heads, seq, head_dim); returns (batch, seq, heads, head_dim) as transformers'
    own functions do. A batch that is not padding-free (batch > 1, or an explicit mask) goes to transformers' SDPA.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    position_ids = kwargs.get("position_ids")
    packed_row = query.shape[0] == 1 and attention_mask is None and (cu is not None or position_ids is not None)
    if not packed_row or (dropout and module.training):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if cu is None:
        cu, max_len = cu_seqlens_from_position_ids(position_ids)
    elif max_len is None:
        max_len = int(cu.diff().max())
    if sliding_window is not None and max_len > sliding_window:
        raise ValueError(
            f"padding-free attention: samples of {max_len} tokens exceed the model's sliding window "
            f"({sliding_window}); set ORCH_CUDA_FASTPATH=-padding_free"
        )
    cu = cu.to(device=query.device, dtype=torch.int32)
    q = query[0].transpose(0, 1)  # (T, H, D)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    out_dtype = q.dtype
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        # flash kernels take half precision only; fp32 reaches here when layers were upcast (QLoRA's
        # prepare_model_for_kbit_training): compute in the autocast dtype, as transformers' flash path does
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = q.to(half), k.to(half), v.to(half)
    out = _varlen_call(q.contiguous(), k.contiguous(), v.contiguous(), cu, int(max_len), scaling)
    if out is not None:
        out = out.to(out_dtype)
    else:
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = _segment_attention(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


def register_varlen_attention() -> None:
    """Make attn_implementation="orch_varlen" known to transformers (idempotent).

    No mask function is registered on purpose: transformers then passes attention_mask=None and builds no
    (tokens x tokens) mask for the padding-free row.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTN, varlen_attention_forward)
