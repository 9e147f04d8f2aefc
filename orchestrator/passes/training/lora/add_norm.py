"""Phi-3-family decoder layers with the attention's residual add fused into the post-attention RMSNorm.

transformers' Phi3DecoderLayer adds the attention output to the residual stream (one kernel: read two
(tokens x hidden) tensors, write one) and then normalizes the sum (read it, write the normed copy); in the backward
the norm's input gradient and the residual's gradient are added by another full-size pass. Liger's fused add +
RMSNorm does both directions in one kernel each (forward: read two, write the sum and the normed copy; backward:
the norm's gradient with the residual's gradient added in), with the arithmetic of Liger's RMSNorm the plan already
uses for these layers (same casting mode, same offset). The H100 profile of a Phi-3-mini step (bench/results)
has 3.3 ms of forward residual adds and 2.9 ms of backward gradient adds, half of them this layer's.

The MLP's residual add, which ends a layer, is fused the same way into the next layer's input norm: a layer whose
successor in the decoder stack has Liger's RMSNorm as its input norm returns the sum with the normed copy riding
on it (an attribute of the sum tensor, checked against the norm and the tensor's version), and that layer takes it
instead of normalizing again. The last layer (the model's final norm is not rewritten) and layers under gradient
checkpointing (a recomputed layer must not hand a tensor past its own checkpoint) add as transformers does.

`fuse_add_norm(model)` installs the forward on every Phi3DecoderLayer whose post-attention norm is Liger's RMSNorm
and returns their count; off CUDA (and for any other norm) the same forward adds and normalizes separately.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any

PATCHED_ATTR = "_orch_add_norm"
NEXT_NORM_ATTR = "_orch_next_norm"  # in a layer's __dict__ (not a registered submodule): the next layer's input norm
PRENORMED_ATTR = "_orch_prenormed"  # on a layer's output: (norm, norm(output), output's version) for the next layer
SPARE_COLS_ATTR = "_orch_spare_cols"  # on a norm module: free columns to leave after each row of its output
# the forward signature this file's replacement reproduces (transformers 5.x Phi3DecoderLayer.forward)
PHI3_LAYER_PARAMS = (
    "self",
    "hidden_states",
    "attention_mask",
    "position_ids",
    "past_key_values",
    "use_cache",
    "position_embeddings",
    "kwargs",
)


def is_liger_rms_norm(norm: Any) -> bool:
    """A norm computing Liger's RMSNorm: LigerRMSNorm itself, or a model's own norm module Liger patched in place
    (apply_liger binds LigerRMSNorm.forward to it and gives it the attributes the kernel reads)."""
    forward = getattr(norm, "forward", None)
    func = getattr(forward, "__func__", None)
    liger = getattr(func, "__qualname__", "") == "LigerRMSNorm.forward" and getattr(func, "__module__", "").startswith(
        "liger_kernel"
    )
    return liger and all(hasattr(norm, a) for a in ("variance_epsilon", "offset", "casting_mode"))


def add_rms_norm(x: Any, residual: Any, norm: Any) -> tuple[Any, Any]:
    """(norm(residual + x), residual + x): one Liger kernel each way on CUDA with Liger's RMSNorm, else two steps.
    Where the norm feeds a LoRA layer whose LoRA term rides in its base GEMM (reserve_lora_columns), the normed rows
    are written with that many free columns after each (tagged fused.WIDE_INPUT_ATTR): the layer writes h there and
    runs [x | h] [W | sB]^T without copying x into a wider tensor."""
    if x.is_cuda and is_liger_rms_norm(norm) and getattr(norm, "weight", None) is not None:
        spare = int(vars(norm).get(SPARE_COLS_ATTR, 0))
        normed, summed = fused_add_rms_norm_function().apply(
            x, residual, norm.weight, norm.variance_epsilon, norm.offset, norm.casting_mode, False, spare
        )
        if spare and normed.shape[-1] + spare == normed.stride(-2):
            from orchestrator.passes.training.lora.fused import WIDE_INPUT_ATTR

            setattr(normed, WIDE_INPUT_ATTR, spare)
        return normed, summed
    summed = residual + x
    return norm(summed), summed


@functools.lru_cache(maxsize=1)
def fused_add_rms_norm_function() -> Any:
    """Liger's LigerFusedAddRMSNormFunction with a backward for a frozen norm weight (LoRA's case): Liger's own
    backward kernel, launched one row per program instead of one program per SM looping over its rows.

    Why: Liger sizes the backward for the weight's gradient (each program sums its rows' share into one fp32 row of
    partials), so 132 programs on an H100 walk 62 rows each, one after the other, and the kernel runs at ~0.55x the
    memory rate (H100 run 9: 7.6 ms per Phi-3-mini step over 63 calls, 120 us each against ~67 us for its 200 MB).
    With the weight frozen there is nothing to sum: one row per program (as Liger's forward launches) keeps every
    SM's memory pipes full. Same kernel, same arithmetic, bit for bit. A trainable norm weight, or a Liger without
    the kernels this expects, keeps Liger's own forward and backward (and its rows no free columns)."""
    import torch
    from liger_kernel.ops import LigerFusedAddRMSNormFunction

    try:
        from liger_kernel.ops.fused_add_rms_norm import _fused_add_rms_norm_backward_kernel as kernel
        from liger_kernel.ops.fused_add_rms_norm import _fused_add_rms_norm_forward_kernel as forward_kernel
        from liger_kernel.ops.fused_add_rms_norm import _str_to_casting_mode
        from liger_kernel.ops.utils import calculate_settings, torch_to_triton_dtype
    except ImportError:  # another Liger layout: the same signature, Liger's own arithmetic and launches
        kernel = forward_kernel = None

    class FrozenWeightFusedAddRMSNorm(LigerFusedAddRMSNormFunction):
        @staticmethod
        def forward(
            ctx: Any, x: Any, r: Any, w: Any, eps: float, offset: float = 0.0, casting_mode: Any = "llama",
            in_place: bool = False, spare: int = 0,
        ) -> tuple[Any, Any]:  # fmt: skip
            """Liger's forward; with `spare` > 0 the normed rows are written into an (n, dim + spare) buffer."""
            if spare <= 0 or forward_kernel is None:
                return LigerFusedAddRMSNormFunction.forward(ctx, x, r, w, eps, offset, casting_mode, in_place)
            mode = _str_to_casting_mode[casting_mode] if isinstance(casting_mode, str) else casting_mode
            shape, dim = x.shape, x.shape[-1]
            x2, r2 = x.reshape(-1, dim).contiguous(), r.reshape(-1, dim).contiguous()
            n_rows = x2.shape[0]
            block, warps = calculate_settings(dim)
            y = torch.empty((n_rows, dim + spare), dtype=x.dtype, device=x.device)[:, :dim]
            s = torch.empty_like(x2)
            fp32_rstd = mode in (_str_to_casting_mode["llama"], _str_to_casting_mode["gemma"])
            rstd = torch.empty(n_rows, dtype=torch.float32 if fp32_rstd else x.dtype, device=x.device)
            forward_kernel[(n_rows,)](
                y, y.stride(0), s, s.stride(0), x2, x2.stride(0), r2, r2.stride(0), w, w.stride(0), rstd,
                rstd.stride(0), dim, eps, offset, mode, BLOCK_SIZE=block, num_warps=warps, num_stages=2,
            )  # fmt: skip
            ctx.offset, ctx.casting_mode, ctx.in_place = offset, mode, in_place
            ctx.BLOCK_SIZE, ctx.num_warps, ctx.num_stages = block, warps, 2
            ctx.save_for_backward(s, w, rstd)
            return y.view(*shape[:-1], dim), s.view(shape)

        @staticmethod
        def backward(ctx: Any, d_y: Any, d_s_out: Any) -> tuple[Any, ...]:
            if ctx.needs_input_grad[2] or kernel is None:
                return (*LigerFusedAddRMSNormFunction.backward(ctx, d_y, d_s_out)[:7], None)
            s, w, rstd = ctx.saved_tensors
            shape = d_y.shape
            dim = shape[-1]
            d_y2 = d_y.reshape(-1, dim)  # rows with a stride of their own (the wide backward's grad_x) taken as is
            if d_y2.stride(-1) != 1 or ctx.in_place:
                d_y2 = d_y2.contiguous()
            d_s2 = None if d_s_out is None else d_s_out.reshape(-1, dim).contiguous()
            s2 = s.reshape(-1, dim)
            d_x = d_y2 if ctx.in_place else d_y2.new_empty(d_y2.shape)
            n_rows = d_y2.shape[0]
            kernel[(n_rows,)](
                d_y2, d_y2.stride(0), d_s2, 0 if d_s2 is None else d_s2.stride(0), d_x, d_x.stride(0), s2,
                s2.stride(0), torch_to_triton_dtype[s2.dtype], w, w.stride(0), rstd, rstd.stride(0), None, 0,
                n_rows, dim, ctx.offset, 1, ctx.casting_mode, BLOCK_SIZE=ctx.BLOCK_SIZE, num_warps=ctx.num_warps,
                num_stages=ctx.num_stages, has_dS_out=d_s2 is not None, COMPUTE_DW=False,
            )  # fmt: skip
            d_x = d_x.view(shape)
            return d_x, d_x, None, None, None, None, None, None

    return FrozenWeightFusedAddRMSNorm


def reserve_lora_columns(model: Any) -> int:
    """Give the two norms of every add_norm layer that feed a LoRA layer k_concat widens (fused.widens:
    input_layernorm -> qkv_proj, post_attention_layernorm -> gate_up_proj) the adapter's rank as free columns after
    each output row, so the layer's [x | h] needs no copy of x; returns how many norms got them."""
    import torch

    from orchestrator.passes.training.lora.fused import FUSED_ATTR, widens

    count = 0
    for layer in model.modules():
        if not getattr(layer, PATCHED_ATTR, False):
            continue
        pairs = ((layer.input_layernorm, getattr(layer.self_attn, "qkv_proj", None)),
                 (layer.post_attention_layernorm, getattr(layer.mlp, "gate_up_proj", None)))  # fmt: skip
        for norm, proj in pairs:
            base = getattr(proj, "get_base_layer", lambda: None)()
            if not getattr(proj, FUSED_ATTR, False) or type(base) is not torch.nn.Linear or not widens(base.weight):
                continue
            active = [name for name in proj.active_adapters if name in proj.lora_A]
            if len(active) == 1:
                vars(norm)[SPARE_COLS_ATTR] = proj.lora_A[active[0]].weight.shape[0]
                count += 1
    return count


def _phi3_decoder_forward(
    self: Any,
    hidden_states: Any,
    attention_mask: Any = None,
    position_ids: Any = None,
    past_key_values: Any = None,
    use_cache: bool | None = False,
    position_embeddings: Any = None,
    **kwargs: Any,
) -> Any:
    """Phi3DecoderLayer.forward with `residual + attention output` and post_attention_layernorm as one step."""
    residual = hidden_states
    hidden_states = _input_norm(hidden_states, self.input_layernorm)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    hidden_states, residual = add_rms_norm(
        self.resid_attn_dropout(hidden_states), residual, self.post_attention_layernorm
    )
    hidden_states = self.resid_mlp_dropout(self.mlp(hidden_states))
    next_norm = vars(self).get(NEXT_NORM_ATTR)
    if next_norm is None or (getattr(self, "gradient_checkpointing", False) and self.training):
        return residual + hidden_states
    normed, summed = add_rms_norm(hidden_states, residual, next_norm)
    setattr(summed, PRENORMED_ATTR, (next_norm, normed, summed._version))
    return summed


def _input_norm(hidden_states: Any, norm: Any) -> Any:
    """norm(hidden_states): the copy the previous layer normalized with its residual add where it rides on the
    tensor (same norm module, tensor unchanged since), else computed here."""
    stash = getattr(hidden_states, PRENORMED_ATTR, None)
    if stash is None:
        return norm(hidden_states)
    delattr(hidden_states, PRENORMED_ATTR)  # taken once: the tensor no longer holds the normed copy alive
    stash_norm, normed, version = stash
    return normed if stash_norm is norm and version == hidden_states._version else norm(hidden_states)


def _phi3_decoder_forward_checkpointed(self: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
    """_phi3_decoder_forward under the layer's gradient checkpointing. transformers' GradientCheckpointingLayer puts
    the checkpoint call in a wrapper of the class's forward, which an instance forward replaces: without this the
    patched layers would silently keep all their activations (and nothing would reach an offloading checkpoint)."""
    if getattr(self, "gradient_checkpointing", False) and self.training:
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False  # as transformers' wrapper does: no cache under checkpointing
        if kwargs.get("past_key_values") is not None:
            kwargs["past_key_values"] = None
        return self._gradient_checkpointing_func(
            functools.partial(_phi3_decoder_forward, self, **kwargs), hidden_states, *args
        )
    return _phi3_decoder_forward(self, hidden_states, *args, **kwargs)


def checkpoints_in_call(cls: type) -> bool:
    """Where transformers' GradientCheckpointingLayer checkpoints: in its `__call__` (5.17, the release Unsloth's wheel
    set pins), around whatever forward the instance has, which then must not checkpoint again (a checkpoint inside
    a checkpoint runs each layer's forward three times per step); or, in later releases, in a wrapper of the class's
    forward, which an instance forward replaces, so that forward must checkpoint itself."""
    for klass in cls.__mro__:
        if klass.__name__ == "GradientCheckpointingLayer":
            return "__call__" in vars(klass)
    return False


def _known_phi3_layer(module: Any) -> bool:
    if type(module).__name__ != "Phi3DecoderLayer":
        return False
    params = tuple(inspect.signature(type(module).forward).parameters)
    return params == PHI3_LAYER_PARAMS


def fuse_add_norm(model: Any, *, liger_only: bool = True) -> int:
    """Give every Phi3DecoderLayer with Liger's RMSNorm after its attention the fused add + norm forward; returns
    how many layers got it (a transformers release with another layer signature gets none: nothing changes).
    liger_only=False patches layers with any norm (they add and normalize in two steps: the CPU tests' case)."""
    count = 0
    for module in model.modules():
        if getattr(module, PATCHED_ATTR, False) or not _known_phi3_layer(module):
            continue
        if liger_only and not is_liger_rms_norm(module.post_attention_layernorm):
            continue
        forward = _phi3_decoder_forward if checkpoints_in_call(type(module)) else _phi3_decoder_forward_checkpointed
        module.forward = types.MethodType(forward, module)
        setattr(module, PATCHED_ATTR, True)
        count += 1
    _link_next_norms(model, liger_only)
    return count


def _link_next_norms(model: Any, liger_only: bool) -> None:
    """Each rewritten layer whose successor in its decoder stack (a ModuleList) is rewritten too and normalizes its
    input with Liger's RMSNorm (any norm with liger_only=False) gets that norm: its residual add is fused into it."""
    import torch

    for stack in model.modules():
        if not isinstance(stack, torch.nn.ModuleList):
            continue
        layers = list(stack)
        for layer, nxt in zip(layers, layers[1:], strict=False):
            if not (getattr(layer, PATCHED_ATTR, False) and getattr(nxt, PATCHED_ATTR, False)):
                continue
            if liger_only and not is_liger_rms_norm(nxt.input_layernorm):
                continue
            vars(layer)[NEXT_NORM_ATTR] = nxt.input_layernorm  # not setattr: that would register a submodule


def unfuse_add_norm(model: Any) -> int:
    """Put transformers' own forward back on every layer fuse_add_norm changed; returns how many."""
    from orchestrator.passes.training.lora.fused import restore_class_forwards

    for module in model.modules():
        vars(module).pop(NEXT_NORM_ATTR, None)
        vars(module).pop(SPARE_COLS_ATTR, None)
    return restore_class_forwards(model, PATCHED_ATTR)
