"""What orch picks for LoRA / QLoRA training on a CUDA device, so the user's config can stay the seed's.

The LoRA pass calls `cuda_overrides(model, sft_kwargs, notes=None)` once, after get_peft_model and before it builds
the SFTTrainer, only when it trains on CUDA; on CPU nothing here runs. The choice is split in two so that it can be
tested without a GPU:

- `plan_cuda(device, shape, sft_kwargs, options)` is a pure function of plain dicts: what the GPU can do
  (`probe_device()`), the model's shape and step size (`model_shape()`), and the SFTConfig kwargs so far. It returns
  a `CudaPlan` with a reason for every choice.
- `apply_plan(plan, model, sft_kwargs)` does it: SFTConfig kwargs, the attention kernel, Liger kernels, peft flags.

This module is the plan and its application; the mechanisms it turns on live beside it, one job per module:
varlen_attention.py (the "orch_varlen" attention for padding-free rows), phi3_patches.py (Phi-3's split-qkv attention
and SwiGLU MLP forwards), fused_loss.py (the loss through a fused linear cross-entropy), step_trainer.py (the
SFTTrainer subclass: the fused loss, no host sync in the step, offloaded checkpoints), fused.py / kernels.py (the
fused LoRA layers and their Triton kernels), add_norm.py, offload.py, unwrap.py (the model inside a PeftModel).

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
- The loss through Liger's fused linear cross-entropy, called by an SFTTrainer subclass
  (`step_trainer.sft_trainer_class`) with ~1 GiB logits chunks: two vocabulary-size GEMMs per step (TRL's chunked
  head recomputes the logits in its backward: three), same loss (TRL's entropy metric is not computed). Eval, data
  parallel, other loss types and heads with bias / softcapping go to TRL's own compute_loss.
- Fused LoRA layers (passes/training/lora/fused.py) under bf16/fp16 autocast: the LoRA update and the base matmul
  share one output tensor (the small term written first, the base GEMM accumulating into it in its epilogue:
  `lora_first`) and the backward is written by hand, which removes the full-size `* scaling` and `+` passes over
  every projection's output and its input gradient; same saved tensors. A bitsandbytes 4-bit
  base (QLoRA) is dequantized inside them per call (forward and backward), as bitsandbytes' own matmul does.
  LoRA dropout runs inside them, its mask in one of three modes (`dropout_mask_mode`): native_dropout's byte mask
  (peft's random numbers, except for inputs written into wider rows for k_concat: drawn over the whole rows, for
  PyTorch's vectorized kernel) with a Triton kernel reading it for the input gradient; a Philox mask drawn by the Triton
  kernel that computes h = dropout(x) A^T and kept as 1 bit per element for the backward kernels (`bit_masks`); or
  the Philox mask regenerated where it is used, nothing kept (`+philox_dropout`). Measured on an H100 at 8 x 1024
  tokens (runs 5 and 6): byte masks are the fastest, bits 0.99x for 5.2 GiB less on Phi-3-mini, regenerating
  0.97x for 5.8 GiB less. So byte masks where the step fits with them; bits where checkpointing is on (a recomputed
  layer's masks sit at the step's peak: QLoRA 5.1 instead of 5.5 GiB) or where only bits avoid checkpointing;
  regenerated where only nothing kept does. Philox masks have dropout's distribution, not peft's random numbers.
- `+triton_skinny` (opt-in): LoRA's skinny products over the tokens (h = x A^T, A's gradient, the input
  gradient's LoRA term) at dropout 0 by philox_dropout.py's kernels at p = 0 instead of cuBLAS. Measured slower on
  an H100 (run 8: 0.98x tokens/s, 29,664 vs 30,238; cuBLAS's h = x A^T 29 vs 38 us at 8192 x 3072), so off.
- `k_concat`: in the fused layers at least twice as wide out as in (Phi-3's qkv_proj and gate_up_proj) the LoRA
  term rides inside the base GEMM as extra reduction columns, [x | h] [W | sB]^T: no s h B^T written over the whole
  output and read back (~0.8 GB per Phi-3-mini layer at 8 x 1024 tokens), for a copy of the input into [x | h] and
  a GEMM 2% deeper. The frozen W lives as the first columns of an (out, in + r) buffer (fused.widen_weight; unfuse
  gives it its own storage back; +0.2 GiB on Phi-3-mini). H100 run 9, same call: 30,424 -> 30,786 tokens/s at
  dropout 0 (1.012x), 29,262 -> 29,594 at 0.05 (1.011x); bench/gpu_kernels.py `fold` per projection: qkv 0.760 ->
  0.737 ms, gate_up 1.361 -> 1.251 (o and down would lose to the copy: not widened). A 4-bit base is not widened.
- `wide_backward`: a widened layer's backward reads k_concat's buffer too, g [W | sB] = [g W | s g B] in one GEMM
  (N = in + r, 2% wider), instead of a skinny GEMM s g B that reads the whole output gradient again (profile of run
  11: 5.1 ms per Phi-3-mini step for qkv_proj's and gate_up_proj's); g W + gh A is then accumulated in place, and
  the input gradient goes to add_norm's backward with the buffer's row stride (elsewhere copied to its own
  storage); with dropout inside the fused function the mask's term is added there by its Triton kernel. Not yet
  measured on a GPU.
- `cached_casts`: the fused layers' A and B in the compute dtype are kept between calls and refreshed once per
  optimizer step, all stale ones in one foreach copy (adapter_casts.py; B stored transposed, the layout the
  backward's g @ B reads), and the LoRA scaling rides in the backward GEMMs' alpha: ~400 fewer small kernels and
  launches per Phi-3-mini step (run 10's profile: 1.9 ms of casts and transposes, 0.5 ms of scaling passes).
- Phi-3-family layers (fused qkv_proj / gate_up_proj): q, k, v taken by split (one cat in the backward, not three
  zero-filled qkv-size tensors), and orch's SwiGLU kernel reading gate and up in place (lora_kernels.py).
- Phi-3-family layers: the attention's residual add inside the post-attention RMSNorm, and the MLP's inside the
  next layer's input RMSNorm where gradient checkpointing is off (`add_norm`: Liger's fused add + RMSNorm,
  lora/add_norm.py).
- Rows whose samples all have one length (fixed-length data) through cuDNN's SDPA as a causal batch on Hopper.
- adamw_torch as adamw_torch_fused (the same update in one kernel).
- Gradient checkpointing only when the step would not fit: an estimate of weights + activations against the GPU's
  memory, on the fast path from what its layers keep (calibrated on run 5's measured peaks: Phi-3-mini at 8 x 1024
  tokens 35.0 GiB, estimated 36.4; plain transformers + peft's conservative factors elsewhere). Where the stored
  dropout masks tip the step over (e.g. Phi-3-mini at 8 x 1024 on a 40 GB A100), the masks as bits instead. A user's
  or the QLoRA pass's explicit `gradient_checkpointing=True` is kept.
- No host sync in the training step (`nosync`): token counts from the CPU batch (a collator wrapper), TRL's loss
  metrics kept on the device until the Trainer logs, the per-step NaN check of the logged loss off, padding-free
  sample boundaries computed on the CPU where the collator gives none (TRL < 1.16), and the loss through orch's own
  chunk loop around Liger's cross-entropy kernel (Liger's function reads `.item()` in its forward and backward).
  The Trainer's per-step walks over every parameter (its flop count's parameter total, gradient clipping's list) are
  made once per train(): ~30 ms of the host's step under cProfile on Phi-3-mini (run 11's host profile).
  With it, batches go to the GPU from pinned memory without a stream sync (`non_blocking`: accelerate's
  dataloader option; a blocking copy made every step wait for the last one while the host collated the next).
- Batches collated by two persistent DataLoader worker processes ahead of the step (`loader_workers`; a user's own
  `dataloader_num_workers` is kept): in the training process the collation (~8 ms of Python for 8 x 1024
  padding-free tokens on a 2-core host) runs between two steps with nothing queued on the GPU (H100 run 10's profile:
  a 9 ms gap before every step's first kernel; that machine idled 20 ms per step). Not yet measured end to end.
- Phi-3-family attention: q, k (RoPE applied) and v written by one Triton kernel from the fused qkv output, each
  contiguous, and the qkv gradient by one kernel (`qkv_rope`; partial rotary and grouped-query heads).
- Phi-3-family MLP, where memory needs it (the step would not fit with it, or gradient checkpointing is on): SwiGLU
  and the fused LoRA down_proj as one function that keeps only gate_up's output and rebuilds the SwiGLU output in
  the backward (`mlp_recompute`; with byte masks its dropped-out copy, from the stored mask), and writes gate_up's
  gradient over gate_up's output: one (tokens x intermediate) activation fewer per layer (~4 GiB on Phi-3-mini at
  8 x 1024). Elsewhere the SwiGLU output is kept: on an H100 (run 8) keeping it gave 1.02x tokens/s at dropout 0
  (30,238 vs 29,639, 33.2 vs 29.2 GiB) and 1.02x at dropout 0.05 (29,058 vs 28,507, 39.0 vs 35.0 GiB).
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
  compute (GPU idle 80 of 635 ms per step). Measured again after the fix (run 5): 16,160 against 18,490 tokens/s
  (0.87x) for 4.4 instead of 5.5 GiB, so it stays where the checkpointed step would not fit. Off under data
  parallel (torch's reentrant checkpoint, not verified with DDP).
- torch.compile of the decoder layers is implemented but off unless `ORCH_CUDA_FASTPATH=+compile`: not shown to
  pay (the one H100 attempt was still compiling after 70 s, with dynamo warnings on Liger's Triton kernels), and
  padding-free rows change length every step.

Measured on an H100 (bench/RESULTS.md, r=64, 8 x 1024 fixed-length samples, one machine for every row of a run):
Phi-3-mini 2.02x transformers+peft at dropout 0.05 (run 4: 28,440 tokens/s, MFU 45.7%; run 3, before lora_first and
add_norm: 2.00x, 1.07x Unsloth 2026.10.9), 2.08x / 1.05x Unsloth at dropout 0, 35.0 / 29.2 GiB against Unsloth's
42.5 / 36.8; Phi-4-mini 2.04x at dropout 0.05 (run 5b: 28,858 tokens/s, MFU 46.5%; run 3, before lora_first and
add_norm: 1.95x, 1.09x Unsloth), 2.01x / 1.07x Unsloth at dropout 0 (run 3); per-step loss within 0.008 of
Unsloth's and the baseline's; QLoRA 1.01-1.08x Unsloth QLoRA at 5.5 vs 5.3 GiB (runs 3, 4, 5b).

`ORCH_CUDA_FASTPATH` (comma list of +name / -name over OPTION_NAMES) turns single choices on or off, for ablations
and as an escape hatch; the default is the plan.

`restore_attention(model)` puts attn_implementation back to "sdpa" (the pass may call it before it saves or
evaluates a padded batch: "orch_varlen" handles padding-free rows and right-padded causal batches only).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.passes.training.lora import varlen_attention
from orchestrator.passes.training.lora.fused_loss import FLCE_LOGITS_BUDGET
from orchestrator.passes.training.lora.phi3_patches import orch_swiglu_mlp, split_qkv_attention
from orchestrator.passes.training.lora.unwrap import base_model
from orchestrator.passes.training.lora.varlen_attention import VARLEN_ATTN, register_varlen_attention, varlen_fn

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
# On the fast path (fused LoRA layers, q/k/v + RoPE kernel, SwiGLU recompute, fused linear cross-entropy) a layer
# keeps its input and its norm, q/k/v, the attention output and the residual after it, the MLP's norm and gate_up's
# output: (6 x hidden + qkv width + 2 x intermediate) bf16 values per token. Measured peaks on an H100, 8 x 1024
# tokens, dropout 0: Phi-3-mini 29.2 GiB, Phi-4-mini 27.7 (this estimate: 30.6 / 29.0); with stored dropout masks
# 35.0 / 33.4 (36.4 / 34.8); QLoRA checkpointed 5.5 (6.3) (bench/RESULTS.md runs 3 and 5).
FAST_PATH_ACT_HIDDEN_FACTOR = 6
FAST_PATH_ACT_INTERMEDIATE_FACTOR = 2
MEMORY_HEADROOM = 0.85  # plan to use at most this share of the GPU's memory
# What Philox dropout saves per token per decoder layer against stored masks, in bytes: the 1-byte masks of the
# qkv, gate_up and down_proj inputs, and at o_proj (whose input the attention keeps anyway) its dropped-out copy
# and mask, (5 * hidden + intermediate). Measured on an H100 at 8 x 1024 tokens, dropout 0.05: 5.8 GiB on
# Phi-3-mini (35.0 -> 29.2 GiB) and 5.7 on Phi-4-mini (33.4 -> 27.7), for 0.97x tokens/s (bench/RESULTS.md run 5).
PHILOX_SAVED_HIDDEN_FACTOR = 5
# LoRA inputs of hidden width per decoder layer (qkv_proj, o_proj, gate_up_proj; down_proj's is intermediate-wide)
LORA_INPUTS_HIDDEN_FACTOR = 3
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
    "bit_masks",
    "triton_skinny",
    "k_concat",
    "loader_workers",
    "cached_casts",
    "wide_backward",
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
    philox_dropout: bool = False  # fused dropout's mask drawn from a Philox seed by Triton kernels
    bit_masks: bool = False  # with philox_dropout: the mask kept as 1 bit per element, else regenerated where used
    triton_skinny: bool = False  # LoRA's skinny products over the tokens by the p = 0 Triton kernels, not cuBLAS
    k_concat: bool = False  # wide layers' LoRA term inside the base GEMM: [x | h] [W | sB]^T, one GEMM (fused.py)
    loader_workers: bool = False  # batches collated by DataLoader worker processes ahead of the step, not between
    cached_casts: bool = False  # fused layers' A and B in bf16 kept between calls, refreshed once per optimizer step
    wide_backward: bool = False  # widened layers' backward: g [W | sB] = [g W | gh] in one GEMM (k_concat's buffer)
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


def estimate_step_memory_gib(
    shape: Mapping[str, Any],
    *,
    checkpointing: bool,
    fast_path: bool = False,
    stored_masks: bool = False,
    bit_masks: bool = False,
) -> float:
    """Weights + activations + optimizer state of one training step, in GiB (an estimate, not a measurement).

    `fast_path`: the activations and the loss as the plan's measured fast path keeps them (FAST_PATH_ACT_*, the
    fused linear cross-entropy's logits chunk); else the conservative factors of plain transformers + peft.
    `stored_masks`: the fused layers' stored dropout masks (what Philox dropout does not keep) on top; `bit_masks`:
    Philox's masks kept as bits instead.
    """
    n_params = float(shape.get("n_params", 0))
    weight_bytes = n_params * (0.55 if shape.get("quantized_4bit") else 2.0)
    hidden = int(shape.get("hidden_size", 0))
    inter = int(shape.get("intermediate_size", 0) or 4 * hidden)
    layers = int(shape.get("num_layers", 0))
    tokens = int(shape.get("tokens_per_step", 0))
    vocab = int(shape.get("vocab_size", 0))
    if fast_path:
        heads = int(shape.get("num_attention_heads", 0) or 1)
        kv_heads = int(shape.get("num_key_value_heads", 0) or heads)
        qkv_width = hidden + 2 * hidden * kv_heads // heads
        kept = FAST_PATH_ACT_HIDDEN_FACTOR * hidden + qkv_width + FAST_PATH_ACT_INTERMEDIATE_FACTOR * inter
        per_token_layer = kept * 2
        logits = min(FLCE_LOGITS_BUDGET, tokens * vocab * 2)
    else:
        per_token_layer = (ACT_HIDDEN_FACTOR * hidden + ACT_INTERMEDIATE_FACTOR * inter) * 2
        logits = tokens * vocab * 4 * 2
    if stored_masks:
        per_token_layer += stored_mask_bytes(shape)
    elif bit_masks:
        per_token_layer += bit_mask_bytes(shape)
    # with checkpointing: the layer inputs are kept, and one layer's activations live during its recompute
    act = tokens * (layers * hidden * 2 + per_token_layer) if checkpointing else tokens * layers * per_token_layer
    trainable = float(shape.get("trainable_params", 0))
    optimizer = trainable * 16  # fp32 weight + grad + two Adam moments
    return (weight_bytes + act + optimizer + logits) / 2**30


def stored_mask_bytes(shape: Mapping[str, Any]) -> int:
    """Bytes per token per decoder layer of the fused layers' stored dropout masks (and o_proj's dropped-out input)."""
    hidden = int(shape.get("hidden_size", 0))
    return PHILOX_SAVED_HIDDEN_FACTOR * hidden + (int(shape.get("intermediate_size", 0)) or 4 * hidden)


def philox_saving_gib(shape: Mapping[str, Any]) -> float:
    """GiB of stored dropout masks over the whole step that Philox dropout does not keep."""
    return int(shape.get("tokens_per_step", 0)) * int(shape.get("num_layers", 0)) * stored_mask_bytes(shape) / 2**30


def bit_mask_bytes(shape: Mapping[str, Any]) -> float:
    """Bytes per token per decoder layer of Philox's masks kept as bits: one bit per element of each LoRA input."""
    hidden = int(shape.get("hidden_size", 0))
    return (LORA_INPUTS_HIDDEN_FACTOR * hidden + (int(shape.get("intermediate_size", 0)) or 4 * hidden)) / 8


def bit_masks_gib(shape: Mapping[str, Any]) -> float:
    """GiB of keep bits over the whole step (what regenerating the masks saves on top of keeping them as bits)."""
    return int(shape.get("tokens_per_step", 0)) * int(shape.get("num_layers", 0)) * bit_mask_bytes(shape) / 2**30


def mask_mode_need_gib(mode: str, need: float, shape: Mapping[str, Any], masks: bool) -> float:
    """The step's estimate under a mask mode, from `need` (the estimate with native_dropout's byte masks)."""
    if not masks or mode not in ("bits", "regenerate"):
        return need
    return need - philox_saving_gib(shape) + (bit_masks_gib(shape) if mode == "bits" else 0.0)


def dropout_mask_mode(
    opts: Mapping[str, bool],
    sft_kwargs: Mapping[str, Any],
    fused_dropout: bool,
    masks: bool,
    need: float,
    shape: Mapping[str, Any],
    total: float,
    keep_gib: float = 0.0,
) -> tuple[str, str]:
    """(mode, reason) for the fused layers' dropout masks: "stored" (native_dropout's byte mask: PyTorch's own
    draws, peft's where the input is its own tensor), "bits" (drawn by the Philox kernels, kept as 1 bit per element)
    or "regenerate" (drawn again from the seed where used, nothing kept); "none" without fused dropout. `masks`: the
    adapter has dropout (else the choice costs no memory); `need`: the step's estimate with stored masks and without
    checkpointing; `keep_gib`: what keeping the SwiGLU outputs adds (mlp_keep_gib, 0 where that is not the plan's to
    choose): where byte masks fit only with them rebuilt and bits fit with them kept, bits (H100 run 8: bits with the
    outputs kept 28,900 tokens/s, byte masks with them rebuilt 28,507).

    Measured on an H100 at 8 x 1024 tokens (run 6): stored masks are the fastest (bits 0.994x on Phi-3-mini and
    0.991x on Phi-4-mini, regenerating 0.97x) and the largest (bits 5.2 GiB less, regenerating 5.8). So stored
    where the step fits with them; bits where checkpointing is on (asked for, as the QLoRA pass does: a recomputed
    layer's masks are at the step's peak, 5.1 instead of 5.5 GiB for Phi-3-mini QLoRA, 0.98x) or where only they
    let the step fit without it; regenerated where only nothing kept fits. `+bit_masks`, `+philox_dropout` (alone:
    regenerate) and `-philox_dropout` / `-bit_masks` (stored) override.
    """
    if not fused_dropout:
        return "none", "LoRA dropout through the layers' own nn.Dropout (fused dropout off)"
    saving = philox_saving_gib(shape) if masks else 0.0
    bits_cost = bit_masks_gib(shape) if masks else 0.0
    layers = max(1, int(shape.get("num_layers", 1) or 1))
    with_bits = mask_mode_need_gib("bits", need, shape, masks)
    with_none = mask_mode_need_gib("regenerate", need, shape, masks)
    fits = lambda gib: fits_gpu(gib, total)  # noqa: E731
    checkpointing = bool(
        opts.get("gc") or sft_kwargs.get("gradient_checkpointing") or sft_kwargs.get("activation_checkpointing")
    )
    asked = "philox_dropout" in opts or "bit_masks" in opts
    if opts.get("philox_dropout") is False or (opts.get("bit_masks") is False and not opts.get("philox_dropout")):
        mode, why = "stored", "asked for by ORCH_CUDA_FASTPATH"
    elif opts.get("bit_masks"):
        mode, why = "bits", "asked for by ORCH_CUDA_FASTPATH"
    elif opts.get("philox_dropout"):
        mode, why = "regenerate", "asked for by ORCH_CUDA_FASTPATH"
    elif checkpointing:
        mode, why = "bits", "gradient checkpointing is on: a recomputed layer's masks are at the step's peak"
    elif fits(need) and keep_gib and not fits(need + keep_gib) and fits(with_bits + keep_gib):
        mode, why = (
            "bits",
            (
                f"byte masks would leave no room for keeping the SwiGLU outputs (~{need + keep_gib:.0f} GiB of "
                f"{total:.0f}), bits do (~{with_bits + keep_gib:.0f}): faster than byte masks with them rebuilt"
            ),
        )
    elif fits(need):
        mode, why = "stored", f"the step fits with them (~{need:.0f} GiB of {total:.0f}): the fastest mode"
    elif fits(with_bits):
        mode, why = (
            "bits",
            (
                f"instead of gradient checkpointing: the step needs ~{need:.0f} GiB with byte masks, ~{with_bits:.0f} "
                f"with bits, the GPU has {total:.0f} GiB"
            ),
        )
    elif fits(with_none):
        mode, why = (
            "regenerate",
            (
                f"instead of gradient checkpointing: the step needs ~{with_bits:.0f} GiB with the masks as bits, "
                f"~{with_none:.0f} with none kept, the GPU has {total:.0f} GiB"
            ),
        )
    else:
        mode, why = "bits", "the step needs gradient checkpointing even without masks"
        checkpointing = True
    if mode == "stored":
        return mode, (
            "LoRA dropout inside the fused layers with native_dropout's stored byte masks (PyTorch's own draws), "
            f"its input gradient added by one Triton kernel reading the mask; {why}"
            + ("" if asked else " (+bit_masks keeps them as bits: ~5 GiB less on Phi-3-mini at 8 x 1024, 0.99x)")
        )
    if mode == "bits":
        return mode, (
            "LoRA dropout inside the fused layers, its mask drawn from a Philox seed by the Triton kernel that "
            "computes h = dropout(x) A^T and kept as 1 bit per element, which A's and the input's gradient kernels "
            + (
                "read"
                if not masks
                else f"read (~{(saving - bits_cost) / layers:.2f} GiB less than byte masks at a recomputed layer)"
                if checkpointing
                else f"read (~{saving - bits_cost:.1f} GiB less than byte masks here)"
            )
            + f"; same dropout distribution, not peft's random numbers (-philox_dropout keeps peft's); {why}"
        )
    return mode, (
        "LoRA dropout inside the fused layers, its mask regenerated from a Philox seed by Triton kernels where it is "
        f"used (h = dropout(x) A^T, A's gradient, the input gradient), nothing kept (~{saving:.1f} GiB less than "
        f"byte masks); {why} (0.97x tokens/s against stored masks on an H100, bench/RESULTS.md)"
    )


def fits_gpu(gib: float, total: float) -> bool:
    """A step estimated at `gib` fits a GPU of `total` GiB (MEMORY_HEADROOM of it; an unknown size fits anything)."""
    return total <= 0 or gib <= MEMORY_HEADROOM * total


def mlp_keep_gib(shape: Mapping[str, Any]) -> float:
    """GiB over the step of the SwiGLU outputs kept for down_proj's backward: what recomputing them saves."""
    inter = int(shape.get("intermediate_size", 0)) or 4 * int(shape.get("hidden_size", 0))
    return int(shape.get("tokens_per_step", 0)) * int(shape.get("num_layers", 0)) * inter * 2 / 2**30


def mlp_recompute_choice(
    opts: Mapping[str, bool],
    mlp_fused: bool,
    checkpointing: bool,
    need: float,
    shape: Mapping[str, Any],
    total: float,
) -> tuple[bool, str]:
    """(recompute, reason): whether down_proj's LoRA backward rebuilds silu(gate) * up from gate_up's output
    (fused.swiglu_down: one (tokens x intermediate) activation fewer per layer, for one more SwiGLU pass over it in
    the backward) or keeps it. Kept where the step fits with it (the pass costs time), rebuilt where it would not,
    and under gradient checkpointing (a recomputed layer's activations are its peak); `need`: the step's estimate
    with it rebuilt. ORCH_CUDA_FASTPATH's `mlp_recompute` overrides."""
    if not mlp_fused:
        return False, ""
    keep = mlp_keep_gib(shape)
    rebuilt = (
        "MLP: down_proj's LoRA backward recomputes silu(gate) * up from the gate_up output it keeps anyway, "
        f"instead of keeping its own (tokens x intermediate) input (~{keep:.1f} GiB less over the step); "
    )
    kept = "MLP: silu(gate) * up kept for down_proj's LoRA backward (one SwiGLU pass fewer per layer there); "
    if "mlp_recompute" in opts:
        return bool(opts["mlp_recompute"]), (rebuilt if opts["mlp_recompute"] else kept) + "ORCH_CUDA_FASTPATH"
    if checkpointing:
        return True, rebuilt + "gradient checkpointing is on: a recomputed layer's activations are the step's peak"
    if not fits_gpu(need + keep, total):
        return True, rebuilt + f"keeping it would need ~{need + keep:.0f} GiB of {total:.0f}"
    return False, kept + f"the step fits with it (~{need + keep:.0f} GiB of {total:.0f})"


def plan_cuda(
    device: Mapping[str, Any],
    shape: Mapping[str, Any],
    sft_kwargs: Mapping[str, Any],
    options: Mapping[str, bool] | None = None,
) -> CudaPlan:
    """Choose the CUDA fast path. Pure: plain dicts in, a CudaPlan with its reasons out.

    device: capability (major, minor), total_memory_gib, has_liger, has_varlen_attn, has_flash_attn.
    shape: model_type, n_params, trainable_params, hidden_size, num_attention_heads, num_key_value_heads,
           intermediate_size, num_layers, vocab_size, tokens_per_step (batch x max length), quantized_4bit,
           attn_implementation, lora_dropout.
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
    lora_first = bool(fused_lora and opts.get("lora_first", True))
    if lora_first:
        reasons.append(
            "fused LoRA layers: the small LoRA term written first and the base GEMM accumulating into it (forward "
            "and input gradient): the compute-bound GEMM reads it in its epilogue instead of a memory-bound pass "
            "reading and writing the whole output again"
        )
    triton_skinny = bool(fused_lora and opts.get("triton_skinny", False) and device.get("has_triton", True))
    if triton_skinny:
        reasons.append(
            "fused LoRA layers: h = x A^T, A's gradient and the input gradient's LoRA term by Triton kernels "
            "(philox_dropout.py at p = 0) instead of cuBLAS (ORCH_CUDA_FASTPATH; 0.98x on an H100, run 8)"
        )
    k_concat = bool(fused_lora and opts.get("k_concat", True))
    if k_concat:
        reasons.append(
            "fused LoRA layers at least twice as wide out as in (qkv_proj, gate_up_proj): [x | h] [W | sB]^T as one "
            "GEMM (K = in + r; W kept as the first columns of an (out, in + r) buffer, 2% more weight memory) "
            "instead of s h B^T written over the whole output and read back by the base GEMM (H100 run 9: 1.012x "
            "tokens/s at dropout 0, 1.011x at 0.05)"
        )
    wide_backward = bool(k_concat and opts.get("wide_backward", True))
    if wide_backward:
        reasons.append(
            "the widened layers' backward through the same buffer: g [W | sB] = [g W | s g B] as one GEMM (N = in + "
            "r), so s g B needs no skinny GEMM re-reading the whole output gradient (on Phi-3-mini's gate_up_proj "
            "268 MB a layer), and the input gradient handed to add_norm's backward with the buffer's row stride"
        )
    cached_casts = bool(fused_lora and opts.get("cached_casts", True))
    if cached_casts:
        reasons.append(
            "fused LoRA layers: A and B cast to the compute dtype once per optimizer step for all layers (one foreach "
            "copy, B kept transposed for the backward's g @ B) instead of two casts per layer call and a transpose "
            "copy per backward (~400 small kernels and their launches per Phi-3-mini step); the LoRA scaling inside "
            "the backward's GEMMs (alpha), not a pass over their results"
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
            "decoder layers: the attention's residual add inside the post-attention RMSNorm, and without gradient "
            "checkpointing the MLP's inside the next layer's input RMSNorm (Liger's fused add + RMSNorm, one kernel "
            "each way instead of a norm plus a full-size add)"
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
            "padding-free sample boundaries computed with the batch on the CPU; the Trainer's per-step walks over "
            "every parameter (flop count, gradient clipping's list) done once per train()"
        )
    non_blocking = bool(nosync and opts.get("non_blocking", True))
    if non_blocking:
        reasons.append(
            "batches copied to the GPU from pinned memory without waiting (accelerate's non_blocking): a blocking "
            "copy syncs the stream, so each step would start on a drained GPU while the host collates the next batch"
        )
    loader_workers = bool(opts.get("loader_workers", True))
    if loader_workers:
        reasons.append(
            f"batches collated ahead of the step by {LOADER_WORKERS} DataLoader worker processes (persistent, "
            "prefetching): collated in the training process they are made between two steps while the GPU idles "
            "(H100 run 10's profile: a 9 ms gap before each step's first kernel; collating 8 x 1024 padding-free "
            "tokens takes ~8 ms of Python on a 2-core host)"
        )
    mlp_fused = bool(fused_lora and swiglu and model_type in FUSED_GATE_UP_MODEL_TYPES)

    fused_dropout = bool(fused_lora and opts.get("fused_dropout", True) and device.get("has_triton", True))
    # the step's memory, on the measured fast path where it is taken (fused layers, q/k/v + RoPE kernel, SwiGLU
    # recompute, fused linear cross-entropy), with the stored dropout masks counted where there are any
    fast_path = bool(fused_lora and flce and qkv_rope and mlp_fused)
    masks = fused_dropout and float(shape.get("lora_dropout", 0.0) or 0.0) > 0
    total = float(device.get("total_memory_gib", 0.0))
    need = estimate_step_memory_gib(shape, checkpointing=False, fast_path=fast_path, stored_masks=masks)
    keep_gib = mlp_keep_gib(shape) if mlp_fused and "mlp_recompute" not in opts else 0.0
    mask_mode, why_masks = dropout_mask_mode(opts, sft_kwargs, fused_dropout, masks, need, shape, total, keep_gib)
    philox_dropout, bit_masks = mask_mode in ("bits", "regenerate"), mask_mode == "bits"
    need = mask_mode_need_gib(mask_mode, need, shape, masks)
    reasons.append(why_masks)

    gc: bool | None = None
    if "gc" in opts:
        gc = opts["gc"]
        reasons.append(f"gradient checkpointing {'on' if gc else 'off'} (ORCH_CUDA_FASTPATH)")
    elif sft_kwargs.get("gradient_checkpointing") or sft_kwargs.get("activation_checkpointing"):
        reasons.append("gradient checkpointing on: asked for by the config (or the QLoRA pass)")
    elif not fits_gpu(need, total):
        gc = True
        reasons.append(
            f"gradient checkpointing on: the step needs ~{need:.0f} GiB without it, the GPU has {total:.0f} GiB"
        )
    else:
        gc = False
        reasons.append(f"no gradient checkpointing: the step fits (~{need:.0f} GiB of {total:.0f} GiB)")

    checkpointing = (
        bool(gc)
        if gc is not None
        else bool(sft_kwargs.get("gradient_checkpointing") or sft_kwargs.get("activation_checkpointing"))
    )
    mlp_recompute, why_mlp = mlp_recompute_choice(opts, mlp_fused, checkpointing, need, shape, total)
    if why_mlp:
        reasons.append(why_mlp)
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
        need_ckpt = estimate_step_memory_gib(
            shape, checkpointing=True, fast_path=fast_path, stored_masks=mask_mode == "stored", bit_masks=bit_masks
        )
        tight = not fits_gpu(need_ckpt, total)
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
                "0.87x tokens/s for 1.1 GiB less, run 5 in bench/RESULTS.md); ORCH_CUDA_FASTPATH="
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
        bit_masks=bit_masks,
        triton_skinny=triton_skinny,
        k_concat=k_concat,
        loader_workers=loader_workers,
        cached_casts=cached_casts,
        wide_backward=wide_backward,
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
        "has_varlen_attn": varlen_fn() is not None,
        "has_flash_attn": importlib.util.find_spec("flash_attn") is not None,
        "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1),  # torchrun / accelerate launch set it
    }


def model_shape(model: Any, sft_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The model's size and the step's token count, as the plain dict plan_cuda reads."""
    base = base_model(model)
    cfg = base.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    max_len = int(sft_kwargs.get("max_length") or 0) or int(getattr(text_cfg, "max_position_embeddings", 2048))
    max_len = min(max_len, int(sft_kwargs.get("orch_max_len", max_len)))
    batch = int(sft_kwargs.get("per_device_train_batch_size", 8))
    peft_configs = (getattr(model, "peft_config", None) or {}).values()
    return {
        "model_type": getattr(text_cfg, "model_type", getattr(cfg, "model_type", "")),
        "n_params": n_params,
        "trainable_params": trainable,
        "hidden_size": int(getattr(text_cfg, "hidden_size", 0)),
        "num_attention_heads": int(getattr(text_cfg, "num_attention_heads", 0) or 0),
        "num_key_value_heads": int(getattr(text_cfg, "num_key_value_heads", 0) or 0),
        "intermediate_size": int(getattr(text_cfg, "intermediate_size", 0) or 0),
        "num_layers": int(getattr(text_cfg, "num_hidden_layers", 0)),
        "vocab_size": int(getattr(text_cfg, "vocab_size", 0)),
        "tokens_per_step": batch * max_len,
        "quantized_4bit": bool(getattr(base, "is_loaded_in_4bit", False)),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "lora_dropout": max((float(getattr(c, "lora_dropout", 0) or 0) for c in peft_configs), default=0.0),
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
            base = base_model(model)
            if hasattr(base, "enable_input_require_grads"):
                base.enable_input_require_grads()  # LoRA: the embeddings are frozen, checkpoints need a grad path
        elif _is_checkpointing(base_model(model)):
            base_model(model).gradient_checkpointing_disable()
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
    if plan.loader_workers:
        out.update(loader_worker_kwargs(out))
    if plan.fused_adamw and out.get("optim", "adamw_torch") == "adamw_torch":
        out["optim"] = "adamw_torch_fused"
    varlen_attention.CUDNN_UNIFORM = plan.cudnn_attn  # read by varlen_attention_forward
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
        lora_fused.BIT_MASKS = plan.bit_masks
        lora_fused.TRITON_SKINNY = plan.triton_skinny
        lora_fused.K_CONCAT = plan.k_concat
        lora_fused.CACHED_CASTS = plan.cached_casts
        lora_fused.WIDE_BACKWARD = plan.wide_backward
        fuse_lora_layers(model)
        if plan.add_norm and plan.k_concat:
            from orchestrator.passes.training.lora.add_norm import reserve_lora_columns

            reserve_lora_columns(model)  # the norms feeding widened layers leave room for h after each row
    if plan.compile_layers:
        compile_decoder_layers(model)
    return out


LOADER_WORKERS = 2  # collating one 8 x 1024 batch takes less than a step: two workers keep ahead, each 2 batches


def loader_worker_kwargs(sft_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """SFTConfig kwargs that collate batches in DataLoader worker processes ahead of the step (persistent workers,
    prefetching two batches each) instead of in the training process between steps; a user's own
    dataloader_num_workers (0 included) and the options that go with it are kept."""
    if "dataloader_num_workers" in sft_kwargs:
        return {}
    out: dict[str, Any] = {"dataloader_num_workers": LOADER_WORKERS}
    out.setdefault("dataloader_persistent_workers", sft_kwargs.get("dataloader_persistent_workers", True))
    out.setdefault("dataloader_prefetch_factor", sft_kwargs.get("dataloader_prefetch_factor", 2))
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
    base = base_model(model)
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
    if getattr(base_model(model).config, "_attn_implementation", None) == VARLEN_ATTN:
        _set_attn_implementation(model, name)


def apply_liger(model: Any, kwargs: Mapping[str, bool]) -> None:
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=base_model(model), **dict(kwargs))


def compile_decoder_layers(model: Any) -> None:
    """torch.compile each decoder layer (regional compilation: one compiled graph reused by all layers)."""
    base = base_model(model)
    inner = getattr(base, base.base_model_prefix, base)
    for layer in getattr(inner, "layers", []):
        layer.compile(dynamic=True)
