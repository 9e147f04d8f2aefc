"""A fused forward/backward for peft's LoRA Linear layers: the LoRA update rides in the base GEMM's epilogue.

peft computes `result = base(x) + lora_B(lora_A(dropout(x))) * scaling`. Every term there is a full-size tensor
of the layer's output: the LoRA product is written, read back and multiplied by `scaling`, written again, then read
with the base output and added into a third tensor; the backward runs the `* scaling` again over the output
gradient and sums two input gradients. On an H100 those elementwise passes over (tokens x out_features) bf16
tensors cost about as much as a tenth of a training step of a Phi-3-mini-sized model once the attention and the
norms are fused (Liger) and there is no padding left to remove.

Here the same arithmetic is done with one `addmm_` that adds `scaling * (h @ B^T)` into the base output inside the
GEMM (beta=1, alpha=scaling), and a backward written by hand that:
- computes the small (tokens x r) gradient `scaling * g @ B` once and uses it for A's gradient and the input's;
- adds the LoRA path's input gradient into the base path's with another `addmm_` when there is no dropout (the
  LoRA input is then the layer input itself);
- saves exactly what peft's autograd graph saves (the dropped-out input and the (tokens x r) intermediate), so
  peak memory is not higher.

Dropout keeps running through the layer's own `nn.Dropout` module outside the fused function, so the random masks
are the ones peft would draw with the same seed (tests compare losses and gradients with peft's own forward).

Only the plain case is fused: one active adapter, vanilla LoRA (no DoRA or other variant), no LoRA bias, adapters
enabled and not merged, a plain `torch.nn.Linear` base with frozen weights (not bitsandbytes 4-bit: QLoRA keeps
peft's forward), no `adapter_names` mixed batches, and either an autocast region or one dtype throughout. Anything
else falls back to peft's own forward at call time, so disabling adapters, merging or loading a second adapter
after fusing stays correct.

`fuse_lora_layers(model)` installs it on every eligible layer and returns their count; `unfuse_lora_layers(model)`
takes it away again.
"""

from __future__ import annotations

import types
from typing import Any

FUSED_ATTR = "_orch_fused_lora"


def _lora_function() -> Any:
    import torch

    class LoraLinearFunction(torch.autograd.Function):
        """out = x @ W^T + bias + scaling * (xd @ A^T) @ B^T, with xd the (possibly dropped-out) LoRA input."""

        @staticmethod
        def forward(ctx: Any, x: Any, xd: Any, weight: Any, bias: Any, a: Any, b: Any, scaling: float) -> Any:
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])
            same = xd is x
            xd2 = x2 if same else xd.reshape(-1, xd.shape[-1])
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = torch.nn.functional.linear(x2, weight, bias)
                h = xd2 @ a.t()
                out.addmm_(h, b.t(), alpha=scaling)
            ctx.same = same
            ctx.scaling = scaling
            # keep only what the gradients asked for need (a frozen first layer's input needs no gradient)
            need_x, need_xd, _, _, need_a, need_b, _ = ctx.needs_input_grad
            need_x = need_x or (same and need_xd)
            ctx.save_for_backward(
                xd2 if need_a else None,
                h if need_b else None,
                weight if need_x else None,
                a if (need_x or need_xd) else None,
                b,
            )
            return out.view(*lead, out.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> tuple[Any, ...]:
            xd2, h, weight, a, b = ctx.saved_tensors
            need_x, need_xd, _, _, need_a, need_b, _ = ctx.needs_input_grad
            if ctx.same:
                need_x = need_x or need_xd
            lead = grad_out.shape[:-1]
            g = grad_out.reshape(-1, grad_out.shape[-1])
            grad_x = grad_xd = grad_a = grad_b = None
            with torch.autocast(device_type=g.device.type, enabled=False):
                gh = (g @ b).mul_(ctx.scaling)  # (tokens, r): small
                if need_b:
                    grad_b = (g.t() @ h).mul_(ctx.scaling)
                if need_a:
                    grad_a = gh.t() @ xd2
                if need_x:
                    grad_x = g @ weight
                    if ctx.same:
                        grad_x.addmm_(gh, a)  # the LoRA path's input gradient, added inside the GEMM
                if need_xd and not ctx.same:
                    grad_xd = gh @ a
            if grad_x is not None:
                grad_x = grad_x.view(*lead, grad_x.shape[-1])
            if grad_xd is not None:
                grad_xd = grad_xd.view(*lead, grad_xd.shape[-1])
            # when x and xd are one tensor, grad_x holds both paths' gradients and the xd slot stays None
            return grad_x, grad_xd, None, None, grad_a, grad_b, None

    return LoraLinearFunction


_FUNCTION: Any = None


def _fn() -> Any:
    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _lora_function()
    return _FUNCTION


def _compute_dtype(x: Any, *weights: Any) -> Any:
    """The dtype the matmuls run in: autocast's when it is on for x's device, else x's own if all agree, else None."""
    import torch

    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if all(w.dtype == x.dtype for w in weights if w is not None):
        return x.dtype
    return None


def _fast_path_parts(layer: Any, x: Any, args: tuple, kwargs: dict) -> tuple | None:
    """(dropout, weight, bias, A, B, scaling) when this call can be fused, else None."""
    import torch

    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}):
        return None
    base = layer.get_base_layer()
    if type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return None
    if base._forward_hooks or base._forward_pre_hooks:
        return None
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear:
        return None
    if lora_a.bias is not None or lora_b.bias is not None:
        return None
    if not (x.is_floating_point() and base.weight.is_floating_point()):
        return None
    return layer.lora_dropout[name], base.weight, base.bias, lora_a.weight, lora_b.weight, layer.scaling[name]


def fused_lora_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Drop-in for peft's `lora.Linear.forward`: fused when the call allows it, peft's own forward otherwise."""
    parts = _fast_path_parts(self, x, args, kwargs)
    if parts is None:
        return type(self).forward(self, x, *args, **kwargs)
    dropout, weight, bias, a, b, scaling = parts
    dtype = _compute_dtype(x, weight, a, b)
    if dtype is None:
        return type(self).forward(self, x, *args, **kwargs)
    self._check_forward_args(x)
    xc = x.to(dtype)  # no copy when x is in the compute dtype already (the usual case)
    xd = dropout(xc)  # the layer's own module: the same random mask peft would draw
    # the output is in the compute dtype, as peft's is (the base layer's output under autocast)
    return _fn().apply(
        xc,
        xd,
        weight.to(dtype),
        None if bias is None else bias.to(dtype),
        a.to(dtype),
        b.to(dtype),
        float(scaling),
    )


def fuse_lora_layers(model: Any) -> int:
    """Give every peft LoRA Linear in `model` the fused forward; returns how many layers got it."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and not getattr(module, FUSED_ATTR, False):
            module.forward = types.MethodType(fused_lora_forward, module)
            setattr(module, FUSED_ATTR, True)
            count += 1
    return count


def unfuse_lora_layers(model: Any) -> int:
    """Put peft's own forward back on every layer fuse_lora_layers changed; returns how many."""
    count = 0
    for module in model.modules():
        if getattr(module, FUSED_ATTR, False):
            del module.forward
            delattr(module, FUSED_ATTR)
            count += 1
    return count
