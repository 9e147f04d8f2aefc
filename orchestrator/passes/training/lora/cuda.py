"""What orch picks for LoRA / QLoRA training on a CUDA device, so the user's config can stay the seed's.

The LoRA pass calls `cuda_overrides(model, sft_kwargs, notes=None)` once, after get_peft_model and before it builds
the SFTTrainer, only when it trains on CUDA; on CPU nothing here runs. The choice is split in two so that it can be
tested without a GPU:

- `plan_cuda(device, shape, sft_kwargs, options)` is a pure function of plain dicts: what the GPU can do
  (`probe_device()`), the model's shape and step size (`model_shape()`), and the SFTConfig kwargs so far. It returns
  a `CudaPlan` with a reason for every choice.
- `apply_plan(plan, model, sft_kwargs)` does it: SFTConfig kwargs, the attention kernel, Liger kernels, peft flags.

What it picks, and why (bench/RESULTS.md has the measured effect):
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
- Liger kernels (liger-kernel, when installed; model types it supports): fused RMSNorm and RoPE (and SwiGLU where
  orch's own kernel does not apply).
- The loss through Liger's fused linear cross-entropy, called by an SFTTrainer subclass (`sft_trainer_class`) with
  ~1 GiB logits chunks: two vocabulary-size GEMMs per step (TRL's chunked head recomputes the logits in its
  backward: three), same loss (TRL's entropy metric is not computed). Eval, data parallel, other loss types and
  heads with bias / softcapping go to TRL's own compute_loss.
- Fused LoRA layers (passes/training/lora/fused.py) under bf16/fp16 autocast: the LoRA update and the base matmul
  share one output tensor (the small term written first, the base GEMM accumulating into it in its epilogue:
  `lora_first`) and the backward is written by hand, which removes the full-size `* scaling` and `+` passes over
  every projection's output and its input gradient; same saved tensors, same random masks. A bitsandbytes 4-bit
  base (QLoRA) is dequantized inside them per call (forward and backward), as bitsandbytes' own matmul does.
  LoRA dropout runs inside them: native_dropout (peft's masks) with a Triton kernel reading the stored mask for its
  input gradient, or with `+philox_dropout` its mask regenerated from a Philox seed by Triton kernels where it is
  used, never stored (philox_dropout.py: ~6 instead of ~12 bytes moved per element of a LoRA input, 1 byte per
  element less memory; the same dropout distribution, other random numbers than peft's). Philox dropout is opt-in
  until it is measured on a GPU (bench/gpu_kernels.py --steps philox, the orch:fixed:+philox_dropout row): its
  kernels are checked on CPU through Triton's interpreter (fp16/fp32), not yet in bf16 on a GPU.
- Phi-3-family layers (fused qkv_proj / gate_up_proj): q, k, v taken by split (one cat in the backward, not three
  zero-filled qkv-size tensors), and orch's SwiGLU kernel reading gate and up in place (lora_kernels.py).
- Phi-3-family layers: the attention's residual add inside the post-attention RMSNorm (`add_norm`: Liger's fused
  add + RMSNorm, lora/add_norm.py).
- Rows whose samples all have one length (fixed-length data) through cuDNN's SDPA as a causal batch on Hopper.
- adamw_torch as adamw_torch_fused (the same update in one kernel).
- Gradient checkpointing only when the step would not fit: an estimate of weights + activations against the GPU's
  memory (the constants are calibrated on the H100 anchor: Phi-3-mini, 8 x 1024 tokens, 47 GiB). A user's or the
  QLoRA pass's explicit `gradient_checkpointing=True` is kept.
- No host sync in the training step (`nosync`): token counts from the CPU batch (a collator wrapper), TRL's loss
  metrics kept on the device until the Trainer logs, the per-step NaN check of the logged loss off, padding-free
  sample boundaries computed on the CPU where the collator gives none (TRL < 1.16), and the loss through orch's own
  chunk loop around Liger's cross-entropy kernel (Liger's function reads `.item()` in its forward and backward).
  With it, batches go to the GPU from pinned memory without a stream sync (`non_blocking`: accelerate's
  dataloader option; a blocking copy made every step wait for the last one while the host collated the next).
- Phi-3-family attention: q, k (RoPE applied) and v written by one Triton kernel from the fused qkv output, each
  contiguous, and the qkv gradient by one kernel (`qkv_rope`; partial rotary and grouped-query heads).
- Phi-3-family MLP: SwiGLU and the fused LoRA down_proj as one function that keeps only gate_up's output and
  rebuilds the SwiGLU output in the backward (`mlp_recompute`; with `-philox_dropout` its dropped-out copy, from
  the stored mask): one (tokens x intermediate) activation fewer per layer (~4 GiB on Phi-3-mini at 8 x 1024).
- QLoRA: the frozen norms / embeddings / LM head back to bf16 after peft's prepare_model_for_kbit_training upcast
  them to fp32 (`qlora_bf16`).
- QLoRA with gradient checkpointing: each checkpointed decoder layer's input (the only activation checkpointing
  keeps: 32 x 8192 x 3072 bf16 = 1.6 GB on Phi-3-mini at 8 x 1024 tokens) kept in pinned host memory from its
  forward to its backward (`offload_checkpoints`, passes/training/lora/offload.py, as Unsloth's "unsloth"
  checkpointing does): the copies run on a side CUDA stream, overlapped with the layers' compute, and the backward
  brings the next layer's input back while the current one is recomputed. Planned only where the checkpointed step
  would not fit the GPU otherwise (or `ORCH_CUDA_FASTPATH=+offload_checkpoints`): on an H100 it took Phi-3-mini
  QLoRA from 5.5 to 4.4 GiB (Unsloth QLoRA: 5.3) but from 18,668 to 14,344 tokens/s (Unsloth: 17,278). That run's
  profile says the copies were not the main cost: under the GPU image's transformers 5.17 the add_norm layers nested
  a second checkpoint inside transformers' own, so every layer ran its forward three times (fixed since: add_norm's
  forward checkpoints itself only where transformers does not); the copies (58 ms per step) ran mostly beside the
  compute (GPU idle 80 of 635 ms per step). To be measured again before it becomes QLoRA's default. Off under data
  parallel (torch's reentrant checkpoint, not verified with DDP).
- torch.compile of the decoder layers is implemented but off unless `ORCH_CUDA_FASTPATH=+compile`: not shown to
  pay (the one H100 attempt was still compiling after 70 s, with dynamo warnings on Liger's Triton kernels), and
  padding-free rows change length every step.

Measured on an H100 (bench/RESULTS.md, r=64, 8 x 1024 fixed-length samples, one machine for every row of a run):
Phi-3-mini 2.02x transformers+peft at dropout 0.05 (run 4: 28,440 tokens/s, MFU 45.7%; run 3, before lora_first and
add_norm: 2.00x, 1.07x Unsloth 2026.10.9), 2.08x / 1.05x Unsloth at dropout 0, 35.0 / 29.2 GiB against Unsloth's
42.5 / 36.8; Phi-4-mini 1.95x (1.09x Unsloth), 2.01x / 1.07x at dropout 0 (run 3); per-step loss within 0.008 of
Unsloth's and the baseline's; QLoRA 1.08x Unsloth QLoRA (run 4: 18,668 vs 17,278 tokens/s, 5.5 vs 5.3 GiB).

`ORCH_CUDA_FASTPATH` (comma list of +name / -name over OPTION_NAMES) turns single choices on or off, for ablations
and as an escape hatch; the default is the plan.

`restore_attention(model)` puts attn_implementation back to "sdpa" (the pass may call it before it saves or
evaluates a padded batch: "orch_varlen" handles padding-free rows and right-padded causal batches only).
"""

from __future__ import annotations

import contextlib
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
OPTION_NAMES = (
    "liger",
    "padding_free",
    "input_cast",
    "fused_lora",
    "compile",
    "gc",
    "qkv_split",
    "swiglu",
    "flce",
    "fused_adamw",
    "cudnn_attn",
    "splitk",
    "fused_dropout",
    "nosync",
    "mlp_recompute",
    "qkv_rope",
    "qlora_bf16",
    "non_blocking",
    "lora_first",
    "add_norm",
    "offload_checkpoints",
    "philox_dropout",
)
# Model types whose attention is transformers' Phi3Attention (one fused qkv_proj sliced into q, k, v)
QKV_SPLIT_MODEL_TYPES = frozenset({"phi3"})
# Model types whose MLP is one fused gate_up_proj followed by silu(gate) * up (Phi3MLP)
FUSED_GATE_UP_MODEL_TYPES = frozenset({"phi3"})


@dataclass(frozen=True)
class CudaPlan:
    bf16: bool
    attn_implementation: str | None  # None: leave the model's as it is
    padding_free: bool
    disable_input_cast: bool
    liger: dict[str, bool] | None  # kwargs for liger's apply_liger_kernel_to_<type>, None: not applied
    fused_lora: bool  # LoRA update inside the base GEMM's epilogue (orchestrator/passes/training/lora/fused.py)
    gradient_checkpointing: bool | None  # None: leave sft_kwargs' value
    compile_layers: bool
    qkv_split: bool = False  # Phi3Attention's q/k/v taken with split (backward: one cat, not 3 zero-filled copies)
    swiglu: bool = False  # orch's SwiGLU kernel on the fused gate_up output (lora_kernels.swiglu), not Liger's
    flce: bool = False  # the loss through Liger's fused linear cross-entropy instead of TRL's chunked LM head
    fused_adamw: bool = False  # optim adamw_torch -> adamw_torch_fused (the same update in one kernel)
    splitk: bool = False  # the fused LoRA layers' skinny GEMMs split along their reduction (autotuned per shape)
    fused_dropout: bool = False  # LoRA dropout inside the fused layers, its input gradient by one Triton kernel
    cudnn_attn: bool = False  # rows of equal-length samples: cuDNN SDPA over (samples, seq) instead of varlen FA2
    nosync: bool = False  # no host sync in the training step (metrics on the device, token counts from the CPU batch)
    mlp_recompute: bool = False  # down_proj's backward recomputes silu(gate) * up instead of keeping it (memory)
    qkv_rope: bool = False  # q, k, v + RoPE out of the fused qkv in one Triton pass each way (lora_kernels.qkv_rope)
    qlora_bf16: bool = False  # a 4-bit base's frozen fp32-upcast parameters back to bf16 (no fp32 residual stream)
    non_blocking: bool = False  # batches copied to the GPU from pinned memory without a stream sync
    lora_first: bool = False  # fused layers: the LoRA term written first, the base GEMM accumulates into it
    add_norm: bool = False  # Phi-3 layers: the attention's residual add inside the post-attention RMSNorm (Liger)
    offload_checkpoints: bool = False  # checkpointed layer inputs in pinned host memory (offload.py), copies overlapped
    philox_dropout: bool = False  # fused dropout's mask regenerated from a Philox seed in Triton kernels, never stored
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
    elif bf16 or fp16:
        fused_lora = True
        reasons.append(
            "fused LoRA layers: the LoRA update added inside the base matmul (addmm epilogue), hand-written "
            "backward (no full-size scaling/add passes)"
            + (
                "; the 4-bit base weight dequantized inside them, in the forward and again in the backward (never "
                "kept), as bitsandbytes' own matmul does"
                if shape.get("quantized_4bit")
                else ""
            )
        )
    fused_dropout = bool(fused_lora and opts.get("fused_dropout", True) and device.get("has_triton", True))
    philox_dropout = bool(fused_dropout and opts.get("philox_dropout", False))  # opt-in until measured on a GPU
    if philox_dropout:
        reasons.append(
            "LoRA dropout inside the fused layers, its mask regenerated from a Philox seed by Triton kernels where it "
            "is used (h = dropout(x) A^T, A's gradient, the input gradient) instead of stored: ~6 instead of ~12 "
            "bytes moved per LoRA input element, no 1-byte-per-element mask kept; same dropout distribution, not "
            "peft's random numbers (asked for by ORCH_CUDA_FASTPATH=+philox_dropout; not yet measured on a GPU)"
        )
    elif fused_dropout:
        reasons.append(
            "LoRA dropout inside the fused layers (native_dropout: peft's masks), its input gradient added by one "
            "Triton kernel reading the stored mask"
            + (
                "; Philox dropout off (ORCH_CUDA_FASTPATH)"
                if "philox_dropout" in opts
                else "; +philox_dropout regenerates the mask instead of storing it (opt-in until measured on a GPU)"
            )
        )
    lora_first = bool(fused_lora and opts.get("lora_first", True))
    if lora_first:
        reasons.append(
            "fused LoRA layers: the small LoRA term written first and the base GEMM accumulating into it (forward "
            "and input gradient): the compute-bound GEMM reads it in its epilogue instead of a memory-bound pass "
            "reading and writing the whole output again"
        )
    splitk = bool(fused_lora and opts.get("splitk", True))
    if splitk:
        reasons.append(
            "LoRA's skinny GEMMs (rank-sized side, long reduction) split into batched parts where that is faster "
            "(timed once per shape)"
        )

    has_triton = bool(device.get("has_triton", device.get("has_liger")))
    swiglu = False
    if model_type in FUSED_GATE_UP_MODEL_TYPES:
        if not opts.get("swiglu", True):
            reasons.append("orch SwiGLU kernel off (ORCH_CUDA_FASTPATH)")
        elif not has_triton:
            reasons.append("no orch SwiGLU kernel: Triton is not installed")
        else:
            swiglu = True
            reasons.append(
                "SwiGLU: orch's Triton kernel reads gate and up in place from the fused gate_up output and writes "
                "its gradient as one tensor (no contiguous copies of the halves, no cat)"
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
            "swiglu": not swiglu,
            "cross_entropy": False,
            # never through Liger's model patch: TRL's SFTTrainer replaces the model's forward with its fused LM
            # head; orch's trainer subclass calls Liger's fused linear cross-entropy itself (flce below)
            "fused_linear_cross_entropy": False,
        }
        reasons.append(f"Liger kernels: fused RMSNorm, {'' if swiglu else 'SwiGLU, '}RoPE")
    add_norm = bool(liger is not None and model_type in FUSED_GATE_UP_MODEL_TYPES and opts.get("add_norm", True))
    if add_norm:
        reasons.append(
            "decoder layers: the attention's residual add inside the post-attention RMSNorm (Liger's fused add + "
            "RMSNorm, one kernel each way instead of a norm plus a full-size add)"
        )

    flce = False
    if not opts.get("flce", True):
        reasons.append("loss: TRL's chunked LM head (Liger fused linear cross-entropy off by ORCH_CUDA_FASTPATH)")
    elif not device.get("has_liger"):
        reasons.append("loss: TRL's chunked LM head (liger-kernel is not installed)")
    else:
        flce = True
        reasons.append(
            "loss: Liger's fused linear cross-entropy (the LM head GEMM and the loss gradient in one chunked pass: "
            "two vocabulary-size GEMMs per step where TRL's head recomputes the logits in the backward, three)"
        )

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

    qkv_split = False
    if model_type in QKV_SPLIT_MODEL_TYPES:
        if opts.get("qkv_split", True):
            qkv_split = True
            reasons.append(
                "attention: q, k, v split from the fused qkv output (its backward is one cat instead of three "
                "zero-filled qkv-size copies summed)"
            )
        else:
            reasons.append("attention: transformers' q/k/v slicing (qkv_split off by ORCH_CUDA_FASTPATH)")

    optim = str(sft_kwargs.get("optim", "adamw_torch"))
    fused_adamw = optim == "adamw_torch" and opts.get("fused_adamw", True)
    if fused_adamw:
        reasons.append("optimizer: adamw_torch as adamw_torch_fused (the same AdamW update, one kernel per step)")

    cudnn_attn = bool(padding_free and major >= 9 and opts.get("cudnn_attn", True))
    if cudnn_attn:
        reasons.append(
            "attention: rows of equal-length samples (fixed-length data) through cuDNN's SDPA as a causal batch "
            "(Hopper: 0.77 vs 1.06 ms per Phi-3-mini layer for 8 x 1024 tokens, bench/gpu_kernels.py); other "
            "rows through the varlen kernel"
        )

    qkv_rope = bool(qkv_split and has_triton and opts.get("qkv_rope", True))
    if qkv_rope:
        reasons.append(
            "attention: q, k (RoPE applied) and v written by one Triton kernel from the fused qkv output, each "
            "contiguous, and the qkv gradient by one kernel (no strided copies around RoPE and attention, no cat)"
        )
    qlora_bf16 = bool(shape.get("quantized_4bit") and bf16 and opts.get("qlora_bf16", True))
    if qlora_bf16:
        reasons.append(
            "QLoRA: the frozen norms, embeddings and LM head back to bf16 after peft's prepare_model_for_kbit_training "
            "upcast them to fp32 (bf16 autocast computes in bf16 anyway; an fp32 residual stream doubles the bytes "
            "of every norm, residual add and cast, and the memory of every kept activation)"
        )
    nosync = bool(opts.get("nosync", True))
    if nosync:
        reasons.append(
            "no host sync in the training step: token counts from the CPU batch, the loss metrics kept on the device "
            "and read when the Trainer logs, no per-step NaN check of the logged loss (logging_nan_inf_filter off), "
            "padding-free sample boundaries computed with the batch on the CPU"
        )
    non_blocking = bool(nosync and opts.get("non_blocking", True))
    if non_blocking:
        reasons.append(
            "batches copied to the GPU from pinned memory without waiting (accelerate's non_blocking): a blocking "
            "copy syncs the stream, so each step would start on a drained GPU while the host collates the next batch"
        )
    mlp_recompute = bool(
        fused_lora and swiglu and model_type in FUSED_GATE_UP_MODEL_TYPES and opts.get("mlp_recompute", True)
    )
    if mlp_recompute:
        reasons.append(
            "MLP: down_proj's LoRA backward recomputes silu(gate) * up from the gate_up output it keeps anyway, "
            "instead of keeping its own (tokens x intermediate) input: one activation fewer per layer"
        )

    checkpointing = (
        bool(gc)
        if gc is not None
        else bool(sft_kwargs.get("gradient_checkpointing") or sft_kwargs.get("activation_checkpointing"))
    )
    offload_checkpoints = False
    world_size = int(device.get("world_size", 1) or 1)
    want_offload = opts.get("offload_checkpoints")
    if not checkpointing:
        if want_offload:
            reasons.append("checkpointed layer inputs not offloaded: gradient checkpointing is off")
    elif world_size > 1:
        reasons.append(
            f"checkpointed layer inputs kept on the GPU: {world_size} data-parallel processes (the offload runs "
            "torch's reentrant checkpoint, not verified under DDP)"
        )
    elif want_offload is False:
        reasons.append("checkpointed layer inputs kept on the GPU (offload_checkpoints off by ORCH_CUDA_FASTPATH)")
    else:
        layers, hidden = int(shape.get("num_layers", 0)), int(shape.get("hidden_size", 0))
        gb = layers * int(shape.get("tokens_per_step", 0)) * hidden * 2 / 1e9
        need_ckpt = estimate_step_memory_gib(shape, checkpointing=True)
        tight = total > 0 and need_ckpt > MEMORY_HEADROOM * total
        if want_offload or tight:
            offload_checkpoints = True
            why = (
                "ORCH_CUDA_FASTPATH"
                if want_offload
                else f"the checkpointed step needs ~{need_ckpt:.0f} GiB of {total:.0f}"
            )
            reasons.append(
                f"checkpointed layer inputs (~{gb:.1f} GB) kept in pinned host memory from each layer's forward to its "
                f"backward, copied on a side stream ({why})"
            )
        else:
            reasons.append(
                f"checkpointed layer inputs (~{gb:.1f} GB) kept on the GPU: the checkpointed step fits "
                f"(~{need_ckpt:.0f} of {total:.0f} GiB) and moving them to host memory costs time (QLoRA on an H100: "
                "0.77x tokens/s for 1.1 GiB less in the one run so far, bench/RESULTS.md); ORCH_CUDA_FASTPATH="
                "+offload_checkpoints moves them"
            )

    return CudaPlan(
        bf16=bf16,
        attn_implementation=attn,
        padding_free=padding_free,
        disable_input_cast=bool(disable_cast),
        liger=liger,
        fused_lora=fused_lora,
        gradient_checkpointing=gc,
        compile_layers=compile_layers,
        qkv_split=qkv_split,
        swiglu=swiglu,
        flce=flce,
        fused_adamw=fused_adamw,
        cudnn_attn=cudnn_attn,
        splitk=splitk,
        fused_dropout=fused_dropout,
        nosync=nosync,
        mlp_recompute=mlp_recompute,
        qkv_rope=qkv_rope,
        qlora_bf16=qlora_bf16,
        non_blocking=non_blocking,
        lora_first=lora_first,
        add_norm=add_norm,
        offload_checkpoints=offload_checkpoints,
        philox_dropout=philox_dropout,
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
        "has_triton": importlib.util.find_spec("triton") is not None,
        "has_varlen_attn": _varlen_fn() is not None,
        "has_flash_attn": importlib.util.find_spec("flash_attn") is not None,
        "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1),  # torchrun / accelerate launch set it
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
    if plan.qlora_bf16:
        frozen_params_to(model, "bfloat16")
    if plan.nosync:
        out.setdefault("logging_nan_inf_filter", False)  # its isnan/isinf check reads the loss every step
    if plan.non_blocking:
        out.update(non_blocking_batches(out))
    if plan.fused_adamw and out.get("optim", "adamw_torch") == "adamw_torch":
        out["optim"] = "adamw_torch_fused"
    global _CUDNN_UNIFORM
    _CUDNN_UNIFORM = plan.cudnn_attn
    if plan.liger is not None:
        apply_liger(model, plan.liger)
    if plan.add_norm:
        from orchestrator.passes.training.lora.add_norm import fuse_add_norm

        fuse_add_norm(model)  # after Liger: it fuses only where the norm is Liger's
    if plan.qkv_split:
        split_qkv_attention(model, rope=plan.qkv_rope)
    if plan.swiglu:
        orch_swiglu_mlp(model, recompute=plan.mlp_recompute)
    if plan.fused_lora:
        from orchestrator.passes.training.lora import fused as lora_fused
        from orchestrator.passes.training.lora import kernels as lora_kernels
        from orchestrator.passes.training.lora.fused import fuse_lora_layers

        lora_kernels.SPLIT_ENABLED = plan.splitk
        lora_kernels.DROPOUT_KERNEL_ENABLED = plan.fused_dropout
        lora_fused.LORA_FIRST = plan.lora_first
        lora_fused.PHILOX_DROPOUT = plan.philox_dropout
        fuse_lora_layers(model)
    if plan.compile_layers:
        compile_decoder_layers(model)
    return out


def non_blocking_batches(sft_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """SFTConfig kwargs that copy each batch to the GPU from pinned memory without waiting (accelerate's
    `non_blocking`): a blocking copy (the default) synchronizes the stream, so every step starts by waiting for
    the previous step's last kernel and the GPU idles while the host launches the next forward. A user's own
    `accelerator_config.non_blocking`, an accelerator_config given as a file, or pinning turned off are kept."""
    acc = sft_kwargs.get("accelerator_config")
    if not sft_kwargs.get("dataloader_pin_memory", True) or not (acc is None or isinstance(acc, Mapping)):
        return {}
    if acc is not None and "non_blocking" in acc:
        return {}
    return {"accelerator_config": {**dict(acc or {}), "non_blocking": True}, "dataloader_pin_memory": True}


def frozen_params_to(model: Any, dtype_name: str) -> int:
    """Cast the frozen fp32 floating-point parameters (not 4-bit weights, not the adapters) to `dtype_name`;
    returns how many. peft's prepare_model_for_kbit_training upcasts them for fp16 stability."""
    import torch

    dtype = getattr(torch, dtype_name)
    count = 0
    for param in model.parameters():
        if param.requires_grad or param.dtype != torch.float32 or type(param).__name__ == "Params4bit":
            continue
        param.data = param.data.to(dtype)
        count += 1
    return count


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


PATCHED_ATTR = "_orch_patched_forward"


def _phi3_attention_forward(
    self: Any,
    hidden_states: Any,
    position_embeddings: tuple[Any, Any],
    attention_mask: Any,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """transformers' Phi3Attention.forward with q, k, v taken by `split` instead of three slices.

    The same values (split returns the slices' views); the difference is the backward: a slice's backward writes a
    zero tensor of the whole qkv size and copies its part in, and autograd then adds the three (six full-size passes
    over the qkv gradient per layer); split's backward is one cat.
    """
    from transformers.models.phi3 import modeling_phi3

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    qkv = self.qkv_proj(hidden_states)
    n_heads, n_kv = self.config.num_attention_heads, self.num_key_value_heads
    cos, sin = position_embeddings
    if getattr(self, QKV_ROPE_ATTR, False) and past_key_values is None and cos.shape[-1] <= self.head_dim:
        # q, k (RoPE applied) and v written once, each contiguous (tokens, heads, head_dim): no copies around the
        # RoPE and the attention, and one pass back into the qkv gradient
        from orchestrator.passes.training.lora.kernels import qkv_rope

        n = qkv.shape[:-1].numel()
        rows = (*input_shape, cos.shape[-1])
        q, k, v = qkv_rope(
            qkv.reshape(n, -1),
            cos.expand(rows).reshape(n, -1),
            sin.expand(rows).reshape(n, -1),
            n_heads,
            n_kv,
            self.head_dim,
        )
        query_states = q.view(*input_shape, n_heads, self.head_dim).transpose(1, 2)
        key_states = k.view(*input_shape, n_kv, self.head_dim).transpose(1, 2)
        value_states = v.view(*input_shape, n_kv, self.head_dim).transpose(1, 2)
    else:
        q_size = n_heads * self.head_dim
        kv_size = n_kv * self.head_dim
        query_states, key_states, value_states = qkv.split([q_size, kv_size, kv_size], dim=-1)
        query_states = query_states.view(hidden_shape).transpose(1, 2)
        key_states = key_states.view(hidden_shape).transpose(1, 2)
        value_states = value_states.view(hidden_shape).transpose(1, 2)
        # looked up at call time: Liger's RoPE patch replaces the module's function
        query_states, key_states = modeling_phi3.apply_rotary_pos_emb(query_states, key_states, cos, sin)
    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
    attention_interface = modeling_phi3.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, modeling_phi3.eager_attention_forward
    )
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        sliding_window=getattr(self.config, "sliding_window", None),
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    attn_output = self.o_proj(attn_output)
    return attn_output, attn_weights


QKV_ROPE_ATTR = "_orch_qkv_rope"


def split_qkv_attention(model: Any, rope: bool = False) -> int:
    """Give every Phi3Attention of the model the split-qkv forward; returns how many modules got it.

    rope: q, k, v and RoPE through lora_kernels.qkv_rope (one pass each way) instead of slices + apply_rotary_pos_emb.
    """
    import types

    try:
        from transformers.models.phi3 import modeling_phi3
    except ImportError:
        return 0
    needed = ("ALL_ATTENTION_FUNCTIONS", "eager_attention_forward", "apply_rotary_pos_emb")
    if not all(hasattr(modeling_phi3, name) for name in needed):
        return 0  # another transformers layout: keep its own forward
    count = 0
    for module in _base_model(model).modules():
        if type(module).__name__ == "Phi3Attention" and hasattr(module, "qkv_proj"):
            module.forward = types.MethodType(_phi3_attention_forward, module)
            setattr(module, PATCHED_ATTR, True)
            setattr(module, QKV_ROPE_ATTR, rope)
            count += 1
    return count


MLP_RECOMPUTE_ATTR = "_orch_mlp_recompute"


def _fused_gate_up_mlp_forward(self: Any, hidden_states: Any) -> Any:
    """Phi3MLP.forward: down_proj(silu(gate) * up) with gate, up read in place from gate_up_proj's output; with
    recompute on, the SwiGLU and a fused LoRA down_proj run as one function that keeps only gate_up's output."""
    from orchestrator.passes.training.lora.kernels import swiglu

    u = self.gate_up_proj(hidden_states)
    if getattr(self, MLP_RECOMPUTE_ATTR, False):
        from orchestrator.passes.training.lora.fused import swiglu_down

        out = swiglu_down(self.down_proj, u)
        if out is not None:
            return out
    return self.down_proj(swiglu(u))


def orch_swiglu_mlp(model: Any, recompute: bool = False) -> int:
    """Give every fused gate_up MLP (Phi3MLP, or Liger's replacement of it) orch's SwiGLU; returns the count.

    recompute: down_proj's backward recomputes the SwiGLU output (fused.swiglu_down) where down_proj is a fused
    LoRA layer at call time; elsewhere the MLP runs as without it."""
    import types

    count = 0
    for module in _base_model(model).modules():
        cfg = getattr(module, "config", None)
        act = str(getattr(cfg, "hidden_act", ""))
        if (
            type(module).__name__ in ("Phi3MLP", "LigerPhi3SwiGLUMLP")
            and hasattr(module, "gate_up_proj")
            and hasattr(module, "down_proj")
            and act in ("silu", "swish")
        ):
            module.forward = types.MethodType(_fused_gate_up_mlp_forward, module)
            setattr(module, PATCHED_ATTR, True)
            setattr(module, MLP_RECOMPUTE_ATTR, recompute)
            count += 1
    return count


# ---------------------------------------------------------------------------------------------------------------
# The loss: Liger's fused linear cross-entropy in TRL's SFTTrainer


FLCE_LOGITS_BUDGET = 1 << 30  # bytes of transient logits Liger's fused linear cross-entropy may hold per chunk


def flce_chunk_mem_const(tokens: int, hidden: int, budget: int = FLCE_LOGITS_BUDGET) -> int:
    """Liger's chunk_mem_const for ~budget bytes of bf16 logits per chunk.

    Liger sizes its token chunks so that a chunk's logits hold about chunk_mem_const x tokens x hidden values; its
    default (1) cuts a 200,064-token vocabulary into chunks of 128 tokens, GEMMs too thin to run near the GPU's
    rate (bench/gpu_kernels.py: 61 ms for Phi-4-mini's head and loss over 8 x 1024 tokens, 49 ms for TRL's head).
    """
    return max(1, budget // max(1, tokens * hidden * 2))


def _liger_flce(weight: Any, hidden: Any, labels: Any) -> tuple[Any, Any]:
    """(sum of the token losses, token accuracy) through Liger's fused linear cross-entropy (chunked, no logits)."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    loss, _, accuracy, _ = LigerFusedLinearCrossEntropyFunction.apply(
        hidden,
        weight,
        labels,
        None,  # bias
        None,  # ce_weight
        -100,  # ignore_index
        0.0,  # lse_square_scale
        0.0,  # label_smoothing
        "sum",  # reduction
        None,  # softcap
        False,  # return_z_loss
        None,  # accum_dtype
        False,  # use_token_scaling
        True,  # return_token_accuracy
        False,  # return_predicted_tokens
        None,  # ce_impl
        None,  # ce_mode
        flce_chunk_mem_const(hidden.shape[0], hidden.shape[1]),
    )
    return loss, accuracy


def reference_flce(weight: Any, hidden: Any, labels: Any) -> tuple[Any, Any]:
    """What _liger_flce computes, in plain torch (full logits): the CPU tests' stand-in for the Triton kernels."""
    import torch

    logits = (hidden @ weight.to(hidden.dtype).t()).float()
    valid = labels != -100
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    correct = (logits.argmax(-1) == labels) & valid
    return loss, correct.sum() / valid.sum().clamp(min=1)


_CHUNKED_CE: Any = None
# the arguments orch passes to Liger's cross-entropy kernel (liger-kernel 0.8.x); another signature: Liger's own path
_LIGER_CE_ARGS = frozenset(
    {
        "X_ptr",
        "X_stride",
        "Y_ptr",
        "Y_stride",
        "weight_ptr",
        "loss_ptr",
        "z_loss_ptr",
        "loss_stride",
        "token_accuracy_ptr",
        "token_accuracy_stride",
        "predicted_tokens_ptr",
        "predicted_tokens_stride",
        "n_cols",
        "n_non_ignore",
        "sum_non_ignore_weight",
        "weight_sum",
        "ignore_index",
        "lse_square_scale",
        "label_smoothing",
        "reduction",
        "softcap",
        "RETURN_Z_LOSS",
        "RETURN_TOKEN_ACCURACY",
        "RETURN_PREDICTED_TOKENS",
        "BLOCK_SIZE",
        "HAS_WEIGHT",
        "HAS_SOFTCAPPING",
        "HAS_GRADIENTS",
    }
)


def _chunked_ce_function() -> Any:
    """An autograd Function: the LM head GEMM and the cross-entropy in token chunks, Liger's Triton kernel for the
    loss and its gradient, and no host sync (Liger's own fused linear cross-entropy reads the number of labelled
    tokens with .item() in the forward and compares the output gradient with 1.0 on the host in the backward)."""
    import torch
    import triton
    from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel

    if not _LIGER_CE_ARGS.issubset(getattr(liger_cross_entropy_kernel, "arg_names", ())):
        return None

    class ChunkedLinearCrossEntropy(torch.autograd.Function):
        """(sum of token losses, number of correct argmax tokens) of hidden @ weight^T against labels (-100 ignored).

        The sum reduction needs no count of labelled tokens; the caller divides by its own count on the device.
        """

        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, labels: Any) -> Any:
            n_tokens, vocab = hidden.shape[0], weight.shape[0]
            chunk = max(1, min(n_tokens, FLCE_LOGITS_BUDGET // (2 * vocab)))
            loss_1d = torch.zeros(n_tokens, dtype=torch.float32, device=hidden.device)  # ignored rows stay 0
            correct_1d = torch.zeros(n_tokens, dtype=torch.float32, device=hidden.device)
            grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            logits = torch.empty((chunk, vocab), dtype=hidden.dtype, device=hidden.device)
            labels = labels.contiguous()
            for start in range(0, n_tokens, chunk):
                end = min(start + chunk, n_tokens)
                block = logits[: end - start]
                torch.mm(hidden[start:end], weight.t(), out=block)
                liger_cross_entropy_kernel[(end - start,)](
                    X_ptr=block,
                    X_stride=block.stride(-2),
                    Y_ptr=labels[start:end],
                    Y_stride=1,
                    weight_ptr=None,
                    loss_ptr=loss_1d[start:end],
                    z_loss_ptr=None,
                    loss_stride=1,
                    token_accuracy_ptr=correct_1d[start:end],
                    token_accuracy_stride=1,
                    predicted_tokens_ptr=None,
                    predicted_tokens_stride=0,
                    n_cols=vocab,
                    n_non_ignore=1,  # read by the "mean" reduction only
                    sum_non_ignore_weight=1,
                    weight_sum=0.0,
                    ignore_index=-100,
                    lse_square_scale=0.0,
                    label_smoothing=0.0,
                    reduction="sum",
                    softcap=None,
                    RETURN_Z_LOSS=False,
                    RETURN_TOKEN_ACCURACY=True,
                    RETURN_PREDICTED_TOKENS=False,
                    BLOCK_SIZE=min(32768, triton.next_power_of_2(vocab)),
                    HAS_WEIGHT=False,
                    HAS_SOFTCAPPING=False,
                    HAS_GRADIENTS=grad is not None,
                    num_warps=32,
                )
                if grad is not None:  # the kernel left d loss / d logits in the chunk's logits
                    torch.mm(block, weight, out=grad[start:end])
            ctx.save_for_backward(grad)
            return loss_1d.sum(), correct_1d.sum()

        @staticmethod
        def backward(ctx: Any, grad_loss: Any, _grad_correct: Any) -> tuple[Any, None, None]:
            (grad,) = ctx.saved_tensors
            return (None if grad is None else grad * grad_loss.to(grad.dtype)), None, None

    return ChunkedLinearCrossEntropy


def chunked_flce(weight: Any, hidden: Any, labels: Any) -> tuple[Any, Any]:
    """(sum of the token losses, token accuracy) as device tensors, no host sync: orch's chunk loop around Liger's
    cross-entropy kernel (Liger's own function where this liger-kernel has another kernel signature)."""
    global _CHUNKED_CE
    if _CHUNKED_CE is None:
        _CHUNKED_CE = _chunked_ce_function() or False
    if not _CHUNKED_CE:
        return _liger_flce(weight, hidden, labels)
    loss, correct = _CHUNKED_CE.apply(hidden, weight, labels)
    return loss, correct / (labels != -100).sum().clamp(min=1)


def fused_ce_loss(trainer: Any, model: Any, inputs: Mapping[str, Any], num_items_in_batch: Any, ce: Any) -> Any:
    """The training loss of TRL's SFTTrainer.compute_loss through `ce` (a fused linear cross-entropy); None when
    TRL's own path must run (eval, another loss type, a loss function or label smoother, data parallel, a head
    with bias / softcapping / logit scale, or a model without the usual backbone + lm_head layout).

    Same loss as TRL's: the summed negative log-likelihood of the next-token labels (-100 ignored), divided by
    num_items_in_batch (or the number of labelled tokens). TRL's entropy metric is not computed (it needs the full
    softmax); its mean_token_accuracy and num_tokens metrics are kept.
    """
    import torch

    if not model.training or getattr(trainer, "compute_loss_func", None) is not None:
        return None
    if getattr(trainer, "label_smoother", None) is not None or getattr(trainer, "aux_loss_enabled", False):
        return None
    args = trainer.args
    if str(getattr(args, "loss_type", "nll")) != "nll" or int(getattr(args, "world_size", 1)) > 1:
        return None
    labels = inputs.get("labels")
    if labels is None:
        return None
    base = _base_model(model)
    backbone = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if backbone is None or head is None or getattr(head, "bias", None) is not None or backbone is base:
        return None
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    kwargs["use_cache"] = False
    # the Trainer's mixed precision: accelerate applies it by wrapping the prepared model's forward, which this
    # call of the backbone does not go through
    accelerator = getattr(trainer, "accelerator", None)
    amp = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    with amp:
        hidden = backbone(**kwargs).last_hidden_state
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        y = labels[:, 1:].reshape(-1).to(h.device)
        if labels.shape[0] > 1:  # padded batches: score only the labelled positions (padding-free rows have few)
            keep = y != -100
            h, y = h[keep], y[keep]
        weight = head.weight
        if torch.is_autocast_enabled(h.device.type):
            dtype = torch.get_autocast_dtype(h.device.type)
            h, weight = h.to(dtype), weight.to(dtype)  # one cast of an fp32 head per step, not one per chunk
        loss_sum, accuracy = ce(weight, h, y)
    num_tokens = (y != -100).sum() if num_items_in_batch is None else num_items_in_batch
    loss = loss_sum / torch.as_tensor(num_tokens, device=loss_sum.device).clamp(min=1)

    metrics = getattr(trainer, "_metrics", None)
    if isinstance(metrics, Mapping) and "train" in metrics:
        # kept on the device (no host sync in the step): OrchSFTTrainer.log reads them when it logs
        metrics["train"]["mean_token_accuracy"].append(accuracy.detach())
        if hasattr(trainer, "_total_train_tokens"):
            if "attention_mask" in inputs:
                n_tok = inputs["attention_mask"].sum()
            elif "position_ids" in inputs:
                n_tok = int(inputs["position_ids"].size(1))
            else:
                n_tok = int(inputs["input_ids"].numel())
            trainer._total_train_tokens += n_tok // int(getattr(trainer, "_tp_size", 1) or 1)
            metrics["train"]["num_tokens"] = [trainer._total_train_tokens]
    return loss


STEP_TOKENS_KEY = "orch_step_tokens"  # a batch's real token count, counted on the CPU by StepMetadataCollator


def add_step_metadata(batch: dict[str, Any], padding_free: bool) -> dict[str, Any]:
    """A collated batch (CPU tensors) with its real token count under STEP_TOKENS_KEY and, for a padding-free row,
    cu_seq_lens_q/k and max_length_q/k where the collator gave none (TRL < 1.16): computed here on the CPU, since
    the attention would otherwise derive them from position_ids on the GPU with host syncs in every layer."""
    ids = batch.get("input_ids")
    pos = batch.get("position_ids")
    mask = batch.get("attention_mask")
    packed_row = padding_free and pos is not None and ids is not None and ids.shape[0] == 1 and mask is None
    if packed_row and "cu_seq_lens_q" not in batch and not pos.is_cuda:
        cu, longest = cu_seqlens_from_position_ids(pos)
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
        batch["max_length_q"] = batch["max_length_k"] = longest
    if mask is not None and mask.dim() == 2 and not mask.is_cuda:
        batch[STEP_TOKENS_KEY] = int(mask.sum())
    elif packed_row and "cu_seq_lens_q" in batch and not batch["cu_seq_lens_q"].is_cuda:
        batch[STEP_TOKENS_KEY] = int(batch["cu_seq_lens_q"][-1])
    elif ids is not None:
        batch[STEP_TOKENS_KEY] = int(ids.numel())
    return batch


class StepMetadataCollator:
    """The trainer's own data collator, followed by add_step_metadata (attributes read through to the inner one)."""

    def __init__(self, inner: Any, padding_free: bool) -> None:
        self.inner = inner
        self.padding_free = padding_free

    def __call__(self, features: Any) -> Any:
        return add_step_metadata(self.inner(features), self.padding_free)

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def _host_value(value: Any) -> Any:
    """A device scalar as a Python number (one sync, at logging time); anything else unchanged."""
    item = getattr(value, "item", None)
    return item() if callable(item) and getattr(value, "numel", lambda: 0)() == 1 else value


def sft_trainer_class(base_cls: Any, plan: CudaPlan | None) -> Any:
    """base_cls (TRL's SFTTrainer), or a subclass with the plan's training-step choices: the loss through a fused
    linear cross-entropy (plan.flce), no host sync in the step (plan.nosync): token counts from the CPU batch,
    TRL's metrics kept on the device and read when the Trainer logs, and the checkpointed layer inputs in host
    memory (plan.offload_checkpoints: `orch_offloader`, installed on the layers when training begins)."""
    if plan is None or not (plan.flce or plan.nosync or plan.offload_checkpoints):
        return base_cls

    class OrchSFTTrainer(base_cls):  # type: ignore[misc, valid-type]
        orch_ce = staticmethod(chunked_flce)
        orch_plan = plan

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if plan.nosync and getattr(self, "data_collator", None) is not None:
                self.data_collator = StepMetadataCollator(self.data_collator, plan.padding_free)
            self.orch_offloader = None
            if plan.offload_checkpoints:
                from orchestrator.passes.training.lora.offload import CheckpointOffloader, offload_callback

                # installed by the callback: the Trainer sets torch's checkpoint function on every layer in train()
                self.orch_offloader = CheckpointOffloader()
                self.add_callback(offload_callback(self.orch_offloader))

        def _prepare_inputs(self, inputs: Any) -> Any:
            if isinstance(inputs, Mapping) and STEP_TOKENS_KEY in inputs:
                inputs = {k: v for k, v in inputs.items() if k != STEP_TOKENS_KEY}
            return super()._prepare_inputs(inputs)

        def _track_num_input_tokens(self, inputs: Any) -> None:
            count = inputs.get(STEP_TOKENS_KEY) if isinstance(inputs, Mapping) else None
            mode = str(getattr(self.args, "include_num_input_tokens_seen", "no"))
            if count is not None and int(getattr(self.args, "world_size", 1)) == 1 and mode not in ("no", "False"):
                self.state.num_input_tokens_seen += int(count)  # counted on the CPU batch: no .item() on the GPU
                return
            if isinstance(inputs, Mapping):
                inputs = {k: v for k, v in inputs.items() if k != STEP_TOKENS_KEY}
            super()._track_num_input_tokens(inputs)

        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            if plan.flce and not return_outputs:
                loss = fused_ce_loss(self, model, inputs, num_items_in_batch, self.orch_ce)
                if loss is not None:
                    return loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

        def log(self, logs: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            # the metrics the loss kept on the device, read now (the Trainer syncs when it logs anyway)
            for store in (getattr(self, "_metrics", None) or {}).values():
                for key in list(store):
                    store[key] = [_host_value(v) for v in store[key]]
            if hasattr(self, "_total_train_tokens"):
                self._total_train_tokens = _host_value(self._total_train_tokens)
            return super().log({k: _host_value(v) for k, v in logs.items()}, *args, **kwargs)

    OrchSFTTrainer.__qualname__ = OrchSFTTrainer.__name__ = f"Orch{base_cls.__name__}"
    return OrchSFTTrainer


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
    # squeeze, not [0]: an index's backward writes the gradient into a zero-filled (1, H, T, D) tensor (a fill and
    # a transposing copy per q / k / v and layer: 17 ms of a 320 ms Phi-3-mini step on an H100, bench/RESULTS.md);
    # a squeeze's backward is a view, so the gradients keep the (T, H, D) layout the attention kernels wrote
    q = query.squeeze(0).transpose(0, 1)  # (T, H, D)
    k = key.squeeze(0).transpose(0, 1)
    v = value.squeeze(0).transpose(0, 1)
    out_dtype = q.dtype
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        # flash kernels take half precision only; fp32 reaches here when layers were upcast (QLoRA's
        # prepare_model_for_kbit_training): compute in the autocast dtype, as transformers' flash path does
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = q.to(half), k.to(half), v.to(half)
    n_samples = cu.numel() - 1
    if _CUDNN_UNIFORM and q.is_cuda and n_samples > 0 and int(max_len) * n_samples == q.shape[0]:
        # every sample of the row has the same length (fixed-length data): a plain causal batch for cuDNN
        out = _uniform_sdpa(q, k, v, n_samples, int(max_len), scaling)
        if out is not None:
            return out.to(out_dtype).unsqueeze(0), None
    out = _varlen_call(q.contiguous(), k.contiguous(), v.contiguous(), cu, int(max_len), scaling)
    if out is not None:
        out = out.to(out_dtype)
    else:
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = _segment_attention(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


_CUDNN_UNIFORM = False  # set by apply_plan (plan.cudnn_attn)


def _uniform_sdpa(q: Any, k: Any, v: Any, n: int, seq: int, scaling: float | None) -> Any:
    """Causal attention of n equal-length samples laid end to end, (T, H, D) in and out, through cuDNN SDPA."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qb, kb, vb = (t.contiguous().view(n, seq, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = F.scaled_dot_product_attention(
                qb, kb, vb, is_causal=True, scale=scaling, enable_gqa=k.shape[1] != q.shape[1]
            )
    except RuntimeError:
        return None  # this torch / cuDNN cannot run the shape: the varlen kernel does
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], v.shape[2])


def register_varlen_attention() -> None:
    """Make attn_implementation="orch_varlen" known to transformers (idempotent).

    No mask function is registered on purpose: transformers then passes attention_mask=None and builds no
    (tokens x tokens) mask for the padding-free row.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTN, varlen_attention_forward)
