"""A fused forward/backward for peft's LoRA Linear layers: the LoRA update rides in the base GEMM's epilogue.

peft computes `result = base(x) + lora_B(lora_A(dropout(x))) * scaling`. Every term there is a full-size tensor
of the layer's output: the LoRA product is written, read back and multiplied by `scaling`, written again, then read
with the base output and added into a third tensor; the backward runs the `* scaling` again over the output
gradient and sums two input gradients. On an H100 those elementwise passes over (tokens x out_features) bf16
tensors cost about as much as a tenth of a training step of a Phi-3-mini-sized model once the attention and the
norms are fused (Liger) and there is no padding left to remove.

Here the same arithmetic shares one output tensor: the skinny GEMM writes `scaling * (h @ B^T)` (alpha=scaling)
and the base GEMM accumulates into it (`addmm_`, beta=1: a compute-bound GEMM reads it in its epilogue at almost
no cost; `LORA_FIRST`, the plan's `lora_first`; the other order adds the LoRA term into the base output with a
memory-bound K=r GEMM that reads and writes the whole output once more), and a backward written by hand that:
- computes the small (tokens x r) gradient `scaling * g @ B` once and uses it for A's gradient and the input's;
- writes the LoRA path's input gradient first and lets the base GEMM `g @ W` accumulate into it, likewise (with
  dropout the Triton kernel writes `(gh @ A) * mask / (1 - p)`; without it the LoRA input is the layer input
  itself and the term is one `gh @ A`);
- saves at most what peft's autograd graph saves (the dropped-out input, or with Philox dropout the input itself
  and no mask, and the (tokens x r) intermediate), so peak memory is not higher.

Dropout (peft's `lora_dropout`, 0.05 in Olive's and the benchmark's configs) on CUDA with Triton runs inside the
fused function, its mask in one of three modes (cuda.py's dropout_mask_mode picks one):
- `PHILOX_DROPOUT` (the plan's `philox_dropout`): the mask comes from a Philox seed, one 64-bit seed per layer
  call drawn from torch's CPU generator (no GPU sync; checkpointing's recompute restores that generator and draws
  the same seed), and Triton kernels use it (philox_dropout.py): `h = dropout(x) @ A^T` reading x once, A's gradient
  from x, and the LoRA path's input gradient `((g B s) A) * keep / (1 - p)`. The backward keeps x (not a
  dropped-out copy). With `BIT_MASKS` (the plan's `bit_masks`: checkpointed steps, or where only it avoids
  checkpointing) the forward's kernel also writes the mask as 1 bit per element and the backward kernels read it;
  without, they regenerate it (nothing kept, Philox run again: 0.97x). The masks have the distribution of
  nn.Dropout's, not its random numbers: with the same seed the loss differs from peft's by dropout's sampling, not
  by rounding.
- otherwise (the default where the step fits: the fastest, run 6): `torch.native_dropout`, the very call `nn.Dropout`
  makes on CUDA (same random numbers for the same seed, so the masks are peft's; except where the input is the first
  columns of add_norm's wider rows: dropout_rows), keeping its mask for the backward,
  where the LoRA path's input gradient `((g B s) A) * mask / (1 - p)` is added into the base path's by one Triton
  kernel (lora_kernels.py) instead of eager autograd's four passes (write `gh @ A`, dropout's backward, then the sum
  of the two input gradients). Under CUDA-graph capture this mode runs either way (a host seed would be frozen).
Elsewhere (CPU, no Triton, a LoRA rank the kernels do not take, `-fused_dropout`) dropout runs through the layer's
own `nn.Dropout` module outside the fused function, as before: the masks are peft's there (tests compare losses and
gradients with peft's own forward).

The wide layers (output at least twice the input: Phi-3's qkv_proj and gate_up_proj) go further under `K_CONCAT`
(the plan's `k_concat`): their frozen W becomes the first columns of an (out, in + r) buffer when the layers are
fused, and the forward is one GEMM [x | h] [W | sB]^T (K = in + r), no full-size LoRA term written at all (H100 run
9: 1.012x tokens/s). unfuse_lora_layers gives the weights their own storage back.

Only the plain case is fused: one active adapter, vanilla LoRA (no DoRA or other variant), no LoRA bias, adapters
enabled and not merged, a frozen base that is a plain `torch.nn.Linear` or a bitsandbytes `Linear4bit` (QLoRA: its
nf4/fp4 weight is dequantized to the compute dtype inside the function, in the forward and again in the backward,
and never kept, as bitsandbytes' own matmul does), no `adapter_names` mixed batches, and either an autocast region
or one dtype throughout. Anything
else falls back to peft's own forward at call time, so disabling adapters, merging or loading a second adapter
after fusing stays correct.

`fuse_lora_layers(model)` installs it on every eligible layer and returns their count; `unfuse_lora_layers(model)`
takes it away again.
"""

from __future__ import annotations

import types
from dataclasses import replace
from typing import Any

from orchestrator.passes.training.lora.adapter_casts import compute_copies, invalidate, may_keep_tensors, release

FUSED_ATTR = "_orch_fused_lora"


# lora_cuda's plan sets it (ORCH_CUDA_FASTPATH=-lora_first: the base GEMM first, the LoRA term added after it)
LORA_FIRST = True
# lora_cuda's plan sets it (masks drawn from a Philox seed by Triton kernels, kept as bits or regenerated where used:
# where that memory matters, see cuda.py's dropout_mask_mode)
PHILOX_DROPOUT = False
# lora_cuda's plan sets it: the Philox masks drawn in the forward kept as keep bits (1 bit per element) for the
# backward kernels to read, instead of being regenerated there (philox_dropout.py, "bit masks")
BIT_MASKS = False
# lora_cuda's plan sets it: LoRA's skinny products over the tokens (h = x A^T, A's gradient gh^T x, the input
# gradient's gh A) by philox_dropout's Triton kernels at p = 0 (split for enough programs in flight) instead of cuBLAS
TRITON_SKINNY = False
# lora_cuda's plan sets it: where a layer's output is at least K_CONCAT_MIN_RATIO times as wide as its input (Phi-3's
# qkv_proj and gate_up_proj), the LoRA term rides inside the base GEMM as extra reduction columns: [x | h] [W | sB]^T
# (one GEMM, K = in + r) instead of a skinny GEMM writing s h B^T over the whole output for the base GEMM to read
K_CONCAT = False
K_CONCAT_MIN_RATIO = 2.0
# lora_cuda's plan sets it: a widened layer's backward reads the same buffer, g [W | sB] = [g W | gh] in one GEMM
# (gh needs no skinny GEMM re-reading the whole output gradient), with or without dropout inside the fused function
WIDE_BACKWARD = False
# lora_cuda's plan sets it: A and B in the compute dtype kept between calls, refreshed once per optimizer step for all
# layers together (adapter_casts.py), instead of two casts per call
CACHED_CASTS = False
WIDE_ATTR = "_orch_wide_weight"  # on a base weight that is a view of its (out, in + r) buffer [W | s B]
# on an activation whose producer left this many free columns after each of its rows (add_norm's normed copy): a
# widened layer writes h there and runs [x | h] [W | sB]^T on that storage, no copy of x into a wider tensor
WIDE_INPUT_ATTR = "_orch_spare_cols"


def base_plus_lora(
    x2: Any,
    xd2: Any,
    weight: Any,
    qstate: Any,
    bias: Any,
    a16: Any,
    b16: Any,
    scaling: float,
    dtype: Any,
    h: Any = None,
    x_spare: int = 0,
) -> tuple[Any, Any]:
    """(x2 @ W^T + bias + scaling * h @ B^T, h = xd2 @ A^T), every fused function's forward; h is what B's
    gradient needs (given, xd2 is not read: Philox dropout computes h with the mask inside).

    LoRA first: the skinny GEMM writes `scaling * h @ B^T (+ bias)` once, then the base GEMM accumulates into it
    (beta=1: the compute-bound GEMM reads that tensor in its epilogue, nearly free). The other order writes the base
    output and then reads and writes it again in the memory-bound K=r GEMM: 2 bytes per output element more. Where
    the weight was widened (K_CONCAT, widen_weight) neither: s B goes into the buffer's last r columns and one GEMM
    runs [x | h] [W | sB]^T, [x | h] being x's own storage where its producer left `x_spare` >= r free columns per
    row (add_norm's normed rows), else a copy.
    """
    import torch

    from orchestrator.passes.training.lora.kernels import scaled_mm

    w = dense_weight(weight, qstate, dtype)
    if h is None:
        h = lora_a_product(xd2, a16)
    wide = _wide_of(weight, h.shape[1]) if qstate is None else None
    if wide is not None:  # [x | h] [W | sB]^T: one GEMM, no full-size LoRA term written and read back
        torch.mul(b16, scaling, out=wide[:, x2.shape[1] :])
        xh = _spare_columns_view(x2, h.shape[1], x_spare)
        if xh is None:
            xh = torch.cat([x2, h], dim=1)
        else:  # the producer's free columns: h written there (not through x's autograd view: x is unchanged)
            xh[:, x2.shape[1] :].copy_(h)
        out = torch.mm(xh, wide.t()) if bias is None else torch.addmm(bias, xh, wide.t())
        return out, h
    if LORA_FIRST:
        # scaling as the GEMM's alpha (without a bias kernels.scaled_mm: beta=0, the empty output never read)
        out = scaled_mm(h, b16.t(), scaling) if bias is None else torch.addmm(bias, h, b16.t(), alpha=scaling)
        out.addmm_(x2, w.t())
    else:
        out = torch.nn.functional.linear(x2, w, bias)
        out.addmm_(h, b16.t(), alpha=scaling)
    return out, h


def _spare_columns_view(x2: Any, rank: int, spare: int) -> Any:
    """[x | free columns] as one (T, in + rank) matrix over x2's own storage where its producer left `spare` >= rank
    free columns after each row (WIDE_INPUT_ATTR), else None. Built from x2.data: writing h there must not bump
    the version of x, which autograd may hold (its values do not change)."""
    import torch

    n_cols = x2.shape[1]
    if spare < rank or x2.stride(1) != 1 or x2.stride(0) != n_cols + spare or x2.shape[0] == 0:
        return None
    base = x2.data
    return torch.as_strided(base, (x2.shape[0], n_cols + rank), (x2.stride(0), 1), base.storage_offset())


def _vectorized_dropout(x2: Any) -> bool:
    """Whether native_dropout runs a vectorized kernel that a contiguous input would gain (CUDA's); on the CPU the
    strided input costs nothing extra, and the masks stay peft's (the CPU tests compare with peft's draws)."""
    return bool(x2.is_cuda)


def dropout_rows(x2: Any, p: float, spare: int = 0) -> tuple[Any, Any]:
    """native_dropout(x2) -> (dropped-out x2, bool mask). Where x2 is the first columns of contiguous rows `spare`
    columns wider (add_norm's normed rows with room for h), dropout runs over those whole rows and the first
    columns of its outputs are returned (row stride in + spare, which every reader takes): PyTorch's vectorized
    dropout kernel needs a contiguous input, and the strided one ran 128 us per Phi-3-mini qkv_proj / gate_up_proj
    input where the contiguous one runs at memory speed (H100 run 13's profile: 8.1 ms of 14.1 ms of dropout per
    step). The free columns hold no values yet: their dropout results are never read. The masks then come from
    wider rows than peft's (the strided kernel's differ from peft's too): dropout's distribution, not its draws."""
    import torch

    rows = _spare_columns_view(x2, spare, spare) if spare > 0 else None
    if rows is None:
        return torch.native_dropout(x2, p, True)
    xd, mask = torch.native_dropout(rows, p, True)
    return xd[:, : x2.shape[1]], mask[:, : x2.shape[1]]


def _wide_of(weight: Any, rank: int) -> Any:
    """The (out, in + r) buffer [W | s B] a base weight is the first `in` columns of (K_CONCAT), or None."""
    wide = getattr(weight, WIDE_ATTR, None) if K_CONCAT else None
    if wide is None or wide.shape != (weight.shape[0], weight.shape[1] + rank):
        return None
    if weight.data_ptr() != wide.data_ptr() or weight.stride() != wide.stride():
        return None  # the weight was replaced since (a loaded state dict, a cast): it is no view of this buffer now
    return wide


def widens(weight: Any) -> bool:
    """Whether K_CONCAT gives this base weight the (out, in + r) buffer: a frozen float matrix whose output is at
    least K_CONCAT_MIN_RATIO times its input (the [x | h] copy, 4 bytes per input element, must cost less than the
    full-size LoRA term's write and read back, 4 per output element)."""
    if not K_CONCAT or not weight.is_floating_point() or weight.requires_grad or weight.dim() != 2:
        return False
    return weight.shape[0] >= K_CONCAT_MIN_RATIO * weight.shape[1]


def widen_weight(weight: Any, rank: int) -> bool:
    """Make a frozen base weight (out, in) the first `in` columns of an (out, in + r) buffer, so base_plus_lora can
    run [x | h] [W | s B]^T as one GEMM, where `widens(weight)`. Done when the layers are fused (weights already on
    a GPU) and again by the first forward after the weight got new storage: the LoRA pass fuses a model still on
    the CPU, which the Trainer then moves (run 10 and 11 ran the LoRA-first path for that reason, k_concat's buffer
    left behind on the CPU); a forward in another dtype than the weight's does not use the buffer. Costs r / in
    more weight memory (2% at r = 64 on Phi-3-mini's widths); unwiden_weights undoes it. True where the buffer is
    in place."""
    import torch

    if not widens(weight):
        return False
    if _wide_of(weight, rank) is not None:
        return True
    out_f, in_f = weight.shape
    with torch.no_grad():
        wide = torch.empty((out_f, in_f + rank), dtype=weight.dtype, device=weight.device)
        wide[:, :in_f].copy_(weight.data)
        weight.data = wide[:, :in_f]  # the Parameter object stays: optimizers, hooks and state_dict keys unchanged
    setattr(weight, WIDE_ATTR, wide)
    return True


def unwiden_weights(model: Any) -> int:
    """Give every widened base weight its own contiguous storage back (before saving or merging); returns how many."""
    count = 0
    for param in model.parameters():
        if getattr(param, WIDE_ATTR, None) is not None:
            param.data = param.data.contiguous()
            delattr(param, WIDE_ATTR)
            count += 1
    return count


def _compute_copies(a: Any, b: Any, dtype: Any) -> tuple[Any, Any]:
    """A and B in the compute dtype: the cached copies (CACHED_CASTS) or a cast in this call."""
    return compute_copies(a, b, dtype) if CACHED_CASTS else (a.to(dtype), b.to(dtype))


def _skinny(*tensors: Any, rank: int) -> bool:
    from orchestrator.passes.training.lora import philox_dropout

    return TRITON_SKINNY and philox_dropout.kernels_apply(*tensors, rank=rank)


def lora_a_product(x2: Any, a16: Any) -> Any:
    """h = x2 @ A^T (T, r): cuBLAS (lora_tall), or the p = 0 Triton kernel where TRITON_SKINNY is on."""
    from orchestrator.passes.training.lora import philox_dropout
    from orchestrator.passes.training.lora.kernels import lora_tall

    if _skinny(x2, a16, rank=a16.shape[0]):
        return philox_dropout.dropout_lora_a(x2, a16, 0.0, 0)
    return lora_tall(x2, a16)


def lora_a_grad(gh: Any, x2: Any, philox: Any = None) -> Any:
    """A's gradient gh^T @ x2 (r, K) in fp32: cuBLAS (lora_wgrad), or the p = 0 Triton kernel (TRITON_SKINNY); with
    a PhiloxMask, x2 is the input before dropout and the Triton kernel applies the mask (its bits, or regenerated)."""
    from orchestrator.passes.training.lora import philox_dropout
    from orchestrator.passes.training.lora.kernels import lora_wgrad

    if philox is not None:
        return philox_dropout.dropout_lora_a_wgrad(x2, gh, philox.p, philox.seed, bits=philox.bits)
    if _skinny(x2, gh, rank=gh.shape[1]):
        return philox_dropout.dropout_lora_a_wgrad(x2, gh, 0.0, 0)
    return lora_wgrad(gh, x2)


def input_grad(g: Any, w: Any, gh: Any, a16: Any, mask: Any, keep_scale: float) -> Any:
    """g @ W plus the LoRA path's input gradient (gh @ A, times the dropout mask and 1 / (1 - p) when `mask` is
    given: a bool tensor, or a PhiloxMask whose kernels regenerate it), in the order LORA_FIRST picks: the small
    term written first and the base GEMM accumulating into it."""
    import torch

    from orchestrator.passes.training.lora import philox_dropout
    from orchestrator.passes.training.lora.kernels import lora_dropout_grad, lora_dropout_grad_add_

    philox = isinstance(mask, philox_dropout.PhiloxMask)
    if LORA_FIRST:
        if mask is None:
            skinny = _skinny(gh, a16, rank=gh.shape[1]) and g.dtype in (torch.float16, torch.bfloat16, torch.float32)
            lora = philox_dropout.dropout_grad(gh, a16, 0.0, 0, g.dtype) if skinny else torch.mm(gh, a16)
        elif philox:
            lora = philox_dropout.dropout_grad(gh, a16, mask.p, mask.seed, g.dtype, bits=mask.bits)
        else:
            lora = lora_dropout_grad(gh, a16, mask, keep_scale, g.dtype)
        return lora.addmm_(g, w)
    out = g @ w
    if mask is None:
        return out.addmm_(gh, a16)
    if philox:
        return philox_dropout.dropout_grad_add_(out, gh, a16, mask.p, mask.seed, bits=mask.bits)
    return lora_dropout_grad_add_(out, gh, a16, mask, keep_scale)


def lora_out_grads(g: Any, h: Any, b16: Any, scaling: float, b_dtype: Any) -> tuple[Any, Any]:
    """From the output gradient g: (gh = scaling * g @ B, the small (tokens x r) gradient A's and the input's
    gradients start from; B's gradient scaling * g^T @ h in B's own dtype, or None when h is None)."""
    from orchestrator.passes.training.lora.kernels import lora_tall, lora_wgrad

    gh = lora_tall(g, b16.t().contiguous(), scale=scaling)  # B^T: contiguous already (adapter_casts), no copy
    grad_b = None if h is None else lora_wgrad(g, h, scale=scaling).to(b_dtype)
    return gh, grad_b


def _lora_function() -> Any:
    import torch

    class LoraLinearFunction(torch.autograd.Function):
        """out = x @ W^T + bias + scaling * (xd @ A^T) @ B^T, with xd the (possibly dropped-out) LoRA input.

        a, b are the adapter's own parameters (peft keeps them in fp32), cast to the compute dtype inside; their
        gradients come back in the parameters' dtype, accumulated in fp32 (no bf16 round trip).
        """

        @staticmethod
        def forward(
            ctx: Any,
            x: Any,
            xd: Any,
            weight: Any,
            qstate: Any,
            bias: Any,
            a: Any,
            b: Any,
            scaling: float,
            dtype: Any,
        ) -> Any:
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])
            same = xd is x
            xd2 = x2 if same else xd.reshape(-1, xd.shape[-1])
            with torch.autocast(device_type=x.device.type, enabled=False):
                a16, b16 = _compute_copies(a, b, dtype)
                out, h = base_plus_lora(
                    x2, xd2, weight, qstate, bias, a16, b16, scaling, dtype, x_spare=getattr(x, WIDE_INPUT_ATTR, 0)
                )
            ctx.same = same
            ctx.scaling = scaling
            ctx.dtypes = (a.dtype, b.dtype)
            ctx.qstate, ctx.dtype = qstate, dtype
            # x's producer left free columns after its rows (add_norm): its backward reads a gradient with that
            # row stride, so the wide backward may hand it [g W + gh A | gh]'s first columns without a copy
            ctx.strided_grad_ok = getattr(x, WIDE_INPUT_ATTR, 0) > 0
            # keep only what the gradients asked for need (a frozen first layer's input needs no gradient)
            need_x, need_xd, _, _, _, need_a, need_b, _, _ = ctx.needs_input_grad
            need_x = need_x or (same and need_xd)
            ctx.save_for_backward(
                xd2 if need_a else None,
                h if need_b else None,
                weight if need_x else None,
                a16 if (need_x or need_xd) else None,
                b16,
            )
            return out.view(*lead, out.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> tuple[Any, ...]:
            xd2, h, weight, a16, b16 = ctx.saved_tensors
            need_x, need_xd, _, _, _, need_a, need_b, _, _ = ctx.needs_input_grad
            if ctx.same:
                need_x = need_x or need_xd
            lead = grad_out.shape[:-1]
            g = grad_out.reshape(-1, grad_out.shape[-1])
            grad_x = grad_xd = grad_a = grad_b = None
            wide = _backward_wide(weight, b16, g, ctx) if ctx.same else None
            if wide is not None:
                with torch.autocast(device_type=g.device.type, enabled=False):
                    grad_x, grad_a, grad_b = _wide_backward(g, wide, xd2, h, a16, ctx, need_a, need_b)
                return grad_x.view(*lead, grad_x.shape[-1]), None, None, None, None, grad_a, grad_b, None, None
            with torch.autocast(device_type=g.device.type, enabled=False):
                gh, grad_b = lora_out_grads(g, h if need_b else None, b16, ctx.scaling, ctx.dtypes[1])
                if need_a:
                    grad_a = lora_a_grad(gh, xd2).to(ctx.dtypes[0])
                if need_x:
                    w = dense_weight(weight, ctx.qstate, ctx.dtype)
                    # one tensor: the LoRA path's input gradient joins the base path's inside a GEMM
                    grad_x = input_grad(g, w, gh, a16, None, 1.0) if ctx.same else g @ w
                if need_xd and not ctx.same:
                    grad_xd = gh @ a16
            if grad_x is not None:
                grad_x = grad_x.view(*lead, grad_x.shape[-1])
            if grad_xd is not None:
                grad_xd = grad_xd.view(*lead, grad_xd.shape[-1])
            # when x and xd are one tensor, grad_x holds both paths' gradients and the xd slot stays None
            return grad_x, grad_xd, None, None, None, grad_a, grad_b, None, None

    return LoraLinearFunction


def _backward_wide(weight: Any, b16: Any, g: Any, ctx: Any) -> Any:
    """The [W | sB] buffer a fused function's backward reads under WIDE_BACKWARD (a saved, widened, unquantized
    weight in g's dtype), else None."""
    if not WIDE_BACKWARD or weight is None or ctx.qstate is not None:
        return None
    wide = _wide_of(weight, b16.shape[1])
    return wide if wide is not None and wide.dtype == g.dtype else None


def _wide_backward(
    g: Any, wide: Any, xd2: Any, h: Any, a16: Any, ctx: Any, need_a: bool, need_b: bool, drop: Any = None
) -> tuple:
    """A widened layer's backward (WIDE_BACKWARD): g [W | sB] = [g W | gh] in one GEMM, the forward's buffer read
    the other way, so gh = s g B costs no GEMM of its own over g (on Phi-3-mini's gate_up_proj a read of 268 MB
    per layer); then g W + gh A (times the dropout mask / (1 - p) where `drop` is given: native_dropout's bool mask
    or a PhiloxMask) in place and the adapters' gradients. (grad_x, grad_a, grad_b); grad_x has the buffer's row
    stride where x's producer takes that (ctx.strided_grad_ok), else its own storage."""
    from orchestrator.passes.training.lora import philox_dropout
    from orchestrator.passes.training.lora.kernels import lora_dropout_grad_add_, lora_wgrad

    n_in = wide.shape[1] - a16.shape[0]
    gxh = g @ wide  # (T, in + r)
    gh = gxh[:, n_in:]
    grad_b = lora_wgrad(g, h, scale=ctx.scaling).to(ctx.dtypes[1]) if need_b else None
    philox = isinstance(drop, philox_dropout.PhiloxMask)
    # xd2: the dropped-out input, or with Philox dropout the input itself (the mask regenerated or read)
    grad_a = lora_a_grad(gh, xd2, drop if philox else None).to(ctx.dtypes[0]) if need_a else None
    grad_x = gxh[:, :n_in]  # disjoint columns of one buffer: gh is read, the LoRA path's term accumulated into g W
    if drop is None:
        grad_x.addmm_(gh, a16)
    elif philox:
        philox_dropout.dropout_grad_add_(grad_x, gh, a16, drop.p, drop.seed, bits=drop.bits)
    else:
        lora_dropout_grad_add_(grad_x, gh, a16, drop, ctx.keep_scale)
    return (grad_x if ctx.strided_grad_ok else grad_x.contiguous()), grad_a, grad_b


def _lora_dropout_function() -> Any:
    import torch

    from orchestrator.passes.training.lora import philox_dropout

    class LoraLinearDropoutFunction(torch.autograd.Function):
        """out = x @ W^T + bias + scaling * (dropout(x) @ A^T) @ B^T, dropout drawn inside: from `seed` by the
        Philox kernels (x kept for the backward, no mask), or by native_dropout when seed is None (xd and the mask
        kept)."""

        @staticmethod
        def forward(
            ctx: Any,
            x: Any,
            weight: Any,
            qstate: Any,
            bias: Any,
            a: Any,
            b: Any,
            scaling: float,
            p: float,
            dtype: Any,
            seed: int | None,
        ) -> Any:
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])
            with torch.autocast(device_type=x.device.type, enabled=False):
                a16, b16 = _compute_copies(a, b, dtype)
                spare = getattr(x, WIDE_INPUT_ATTR, 0)
                if seed is None:
                    xd2, mask = dropout_rows(x2, p, spare if _vectorized_dropout(x2) else 0)
                    out, h = base_plus_lora(x2, xd2, weight, qstate, bias, a16, b16, scaling, dtype, x_spare=spare)
                else:  # the mask from the seed, inside the kernels (kept as bits or regenerated): A's gradient reads x
                    xd2, mask = x2, (philox_dropout.new_bits(*x2.shape, x2.device) if BIT_MASKS else None)
                    h = philox_dropout.dropout_lora_a(x2, a16, p, seed, bits=mask)
                    out, h = base_plus_lora(
                        x2, None, weight, qstate, bias, a16, b16, scaling, dtype, h=h, x_spare=spare
                    )
            ctx.scaling = scaling
            ctx.keep_scale = 1.0 / (1.0 - p)
            ctx.strided_grad_ok = spare > 0  # see LoraLinearFunction
            ctx.philox = None if seed is None else philox_dropout.PhiloxMask(seed, p)
            ctx.dtypes = (a.dtype, b.dtype)
            ctx.qstate, ctx.dtype = qstate, dtype
            need_x, _, _, _, need_a, need_b, _, _, _, _ = ctx.needs_input_grad
            ctx.save_for_backward(
                xd2 if need_a else None,
                h if need_b else None,
                weight if need_x else None,
                a16 if need_x else None,
                b16,
                mask if need_x or (need_a and seed is not None) else None,  # keep bits: A's gradient reads them too
            )
            return out.view(*lead, out.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> tuple[Any, ...]:
            xd2, h, weight, a16, b16, mask = ctx.saved_tensors
            need_x, _, _, _, need_a, need_b, _, _, _, _ = ctx.needs_input_grad
            lead = grad_out.shape[:-1]
            g = grad_out.reshape(-1, grad_out.shape[-1])
            grad_x = grad_a = grad_b = None
            drop = ctx.philox if ctx.philox is None or mask is None else replace(ctx.philox, bits=mask)
            wide = _backward_wide(weight, b16, g, ctx)
            if wide is not None:
                with torch.autocast(device_type=g.device.type, enabled=False):
                    grad_x, grad_a, grad_b = _wide_backward(
                        g, wide, xd2, h, a16, ctx, need_a, need_b, drop=mask if drop is None else drop
                    )
                return grad_x.view(*lead, grad_x.shape[-1]), None, None, None, grad_a, grad_b, None, None, None, None
            with torch.autocast(device_type=g.device.type, enabled=False):
                gh, grad_b = lora_out_grads(g, h if need_b else None, b16, ctx.scaling, ctx.dtypes[1])
                if need_a:  # xd2: the dropped-out input, or with Philox dropout the input itself
                    grad_a = lora_a_grad(gh, xd2, drop).to(ctx.dtypes[0])
                if need_x:
                    w = dense_weight(weight, ctx.qstate, ctx.dtype)
                    grad_x = input_grad(g, w, gh, a16, mask if drop is None else drop, ctx.keep_scale)
            if grad_x is not None:
                grad_x = grad_x.view(*lead, grad_x.shape[-1])
            return grad_x, None, None, None, grad_a, grad_b, None, None, None, None

    return LoraLinearDropoutFunction


def _swiglu_down_function() -> Any:
    import torch

    from orchestrator.passes.training.lora import philox_dropout
    from orchestrator.passes.training.lora.kernels import (
        swiglu_backward_2d,
        swiglu_dropout_2d,
        swiglu_forward_2d,
    )

    class LoraSwigluDownFunction(torch.autograd.Function):
        """out = c @ W^T + bias + scaling * (dropout(c) @ A^T) @ B^T with c = silu(gate) * up of u = [gate | up].

        Phi-3's MLP tail (SwiGLU, then the LoRA down_proj) as one function that keeps u, which the SwiGLU backward
        needs anyway, and recomputes c (and its dropped-out copy from the kept mask) in the backward instead of
        keeping them: one (tokens x intermediate) activation fewer per layer, for one extra SwiGLU pass. With a
        Philox `seed` the mask is kept as bits (BIT_MASKS) or regenerated by the kernels (philox_dropout.py).
        """

        @staticmethod
        def forward(
            ctx: Any,
            u: Any,
            weight: Any,
            qstate: Any,
            bias: Any,
            a: Any,
            b: Any,
            scaling: float,
            p: float,
            dtype: Any,
            seed: int | None,
            overwrite_u: bool,
        ) -> Any:
            lead = u.shape[:-1]
            u2 = u.reshape(-1, u.shape[-1])
            if u2.stride(-1) != 1:
                u2 = u2.contiguous()
            with torch.autocast(device_type=u.device.type, enabled=False):
                a16, b16 = _compute_copies(a, b, dtype)
                c = swiglu_forward_2d(u2)
                mask = None
                if p > 0 and seed is not None:  # Philox: the mask from the seed, inside the kernels (bits kept or not)
                    mask = philox_dropout.new_bits(*c.shape, c.device) if BIT_MASKS else None
                    h = philox_dropout.dropout_lora_a(c, a16, p, seed, bits=mask)
                    out, h = base_plus_lora(c, None, weight, qstate, bias, a16, b16, scaling, dtype, h=h)
                else:
                    xd, mask = torch.native_dropout(c, p, True) if p > 0 else (c, None)
                    out, h = base_plus_lora(c, xd, weight, qstate, bias, a16, b16, scaling, dtype)
            ctx.scaling = scaling
            ctx.keep_scale = 1.0 / (1.0 - p) if p > 0 else 1.0
            ctx.philox = philox_dropout.PhiloxMask(seed, p) if p > 0 and seed is not None else None
            ctx.dtypes = (a.dtype, b.dtype)
            ctx.lead = u.shape
            ctx.qstate, ctx.dtype = qstate, dtype
            ctx.overwrite_u = overwrite_u
            ctx.save_for_backward(u2, h, weight, a16, b16, mask)
            return out.view(*lead, out.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> tuple[Any, ...]:
            u2, h, weight, a16, b16, mask = ctx.saved_tensors
            g = grad_out.reshape(-1, grad_out.shape[-1])
            with torch.autocast(device_type=g.device.type, enabled=False):
                gh, grad_b = lora_out_grads(g, h, b16, ctx.scaling, ctx.dtypes[1])
                drop = ctx.philox if ctx.philox is None or mask is None else replace(ctx.philox, bits=mask)
                if drop is not None:  # c again; A's gradient kernel applies the mask (its bits, or regenerated)
                    c = swiglu_forward_2d(u2)
                    grad_a = lora_a_grad(gh, c, drop).to(ctx.dtypes[0])
                    del c
                else:  # c again, or straight its dropped-out copy from the kept mask (one pass either way)
                    xd = swiglu_forward_2d(u2) if mask is None else swiglu_dropout_2d(u2, mask, ctx.keep_scale)
                    grad_a = lora_a_grad(gh, xd).to(ctx.dtypes[0])
                    del xd
                w = dense_weight(weight, ctx.qstate, ctx.dtype)
                grad_c = input_grad(g, w, gh, a16, mask if drop is None else drop, ctx.keep_scale)
                del w, gh
                # overwrite_u: written over u2, which nothing reads after this (gate_up's output, the MLP's own
                # intermediate): one (tokens x 2 intermediate) tensor less at the MLP's backward, where QLoRA's
                # checkpointed step peaks (a second backward through this graph is refused: u2's version changed)
                du = swiglu_backward_2d(u2, grad_c, out=u2 if ctx.overwrite_u else None)
            return du.view(ctx.lead), None, None, None, grad_a, grad_b, None, None, None, None, None

    return LoraSwigluDownFunction


_FUNCTION: Any = None
_DROPOUT_FUNCTION: Any = None
_SWIGLU_DOWN_FUNCTION: Any = None


def _swiglu_down_fn() -> Any:
    global _SWIGLU_DOWN_FUNCTION
    if _SWIGLU_DOWN_FUNCTION is None:
        _SWIGLU_DOWN_FUNCTION = _swiglu_down_function()
    return _SWIGLU_DOWN_FUNCTION


def swiglu_down(down_proj: Any, u: Any, overwrite_u: bool = False) -> Any:
    """down_proj(silu(gate) * up) for u = [gate | up] through LoraSwigluDownFunction, or None where it does not
    apply (down_proj not a fused-eligible LoRA layer for this call, an odd width, LoRA dropout that cannot run inside
    the function: the caller then runs the SwiGLU and down_proj separately).

    overwrite_u: the backward writes u's gradient over u (the caller's own intermediate, read by nothing else)."""
    import torch

    if not getattr(down_proj, FUSED_ATTR, False) or u.shape[-1] % 2:
        return None
    parts = _fast_path_parts(down_proj, u, (), {})
    if parts is None:
        return None
    dropout, weight, qstate, bias, a, b, scaling = parts
    dtype = _compute_dtype(u, None if qstate is not None else weight, a, b)
    if dtype is None:
        return None
    if isinstance(dropout, torch.nn.Identity) or not down_proj.training:
        p = 0.0
    else:
        p = _fused_dropout_p(dropout, u, a.shape[0])  # CUDA + Triton: Philox or native_dropout (peft's masks)
        if p is None:
            return None
    uc = u.to(dtype)
    bias_c = None if bias is None else bias.to(dtype)
    w = weight if qstate is not None else weight.to(dtype)
    seed = philox_seed(uc, a.shape[0]) if p > 0 else None
    return _swiglu_down_fn().apply(uc, w, qstate, bias_c, a, b, float(scaling), p, dtype, seed, overwrite_u)


def _fn() -> Any:
    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _lora_function()
    return _FUNCTION


def _dropout_fn() -> Any:
    global _DROPOUT_FUNCTION
    if _DROPOUT_FUNCTION is None:
        _DROPOUT_FUNCTION = _lora_dropout_function()
    return _DROPOUT_FUNCTION


def _fused_dropout_p(dropout: Any, x: Any, rank: int) -> float | None:
    """The dropout probability when the dropout can run inside the fused function, else None."""
    import torch

    from orchestrator.passes.training.lora.kernels import dropout_grad_add_supported, use_triton

    if type(dropout) is not torch.nn.Dropout or not dropout.training or dropout.inplace:
        return None
    p = float(dropout.p)
    # CUDA tensors (or CPU ones under Triton's interpreter: the interpreter tests)
    if not 0.0 < p < 1.0 or not use_triton(x) or not dropout_grad_add_supported(rank):
        return None
    return p


def philox_seed(x: Any, rank: int) -> int | None:
    """The Philox seed of this dropout call (a fresh draw from torch's CPU generator), or None for native_dropout:
    PHILOX_DROPOUT off, the kernels not applying to x, or a CUDA graph being captured (a host seed would be frozen
    into the graph: every replay would drop the same elements)."""
    import torch

    from orchestrator.passes.training.lora import philox_dropout

    if not PHILOX_DROPOUT or not philox_dropout.kernels_apply(x, rank=rank):
        return None
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    return philox_dropout.draw_seed()


def _compute_dtype(x: Any, *weights: Any) -> Any:
    """The dtype the matmuls run in: autocast's when it is on for x's device, else x's own if all agree, else None."""
    import torch

    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if all(w.dtype == x.dtype for w in weights if w is not None):
        return x.dtype
    return None


def dense_weight(weight: Any, qstate: Any, dtype: Any) -> Any:
    """The base layer's weight as a dense matrix: itself, or a bitsandbytes 4-bit weight dequantized (a transient
    copy, made in the forward and again in the backward, never kept: QLoRA's memory stays 4-bit)."""
    if qstate is None:
        return weight
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(weight, qstate).to(dtype)


def _base_weight(base: Any) -> tuple[Any, Any] | None:
    """(weight, quant_state) of a base layer the fused functions take: a plain Linear's float weight (state None),
    or a bitsandbytes Linear4bit's packed weight and its quant state (QLoRA); None for anything else."""
    import torch

    if type(base) is torch.nn.Linear:
        return (base.weight, None) if base.weight.is_floating_point() else None
    if type(base).__name__ == "Linear4bit" and type(base).__module__.startswith("bitsandbytes"):
        state = getattr(base.weight, "quant_state", None)
        if state is not None and getattr(state, "shape", None) is not None:
            return base.weight, state
    return None


def _fast_path_parts(layer: Any, x: Any, args: tuple, kwargs: dict) -> tuple | None:
    """(dropout, weight, quant_state, bias, A, B, scaling) when this call can be fused, else None."""
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
    weight_state = _base_weight(base)
    if weight_state is None or base.weight.requires_grad:
        return None
    if base._forward_hooks or base._forward_pre_hooks:
        return None
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear:
        return None
    if lora_a.bias is not None or lora_b.bias is not None:
        return None
    if not x.is_floating_point():
        return None
    weight, state = weight_state
    return layer.lora_dropout[name], weight, state, base.bias, lora_a.weight, lora_b.weight, layer.scaling[name]


def fused_lora_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Drop-in for peft's `lora.Linear.forward`: fused when the call allows it, peft's own forward otherwise."""
    parts = _fast_path_parts(self, x, args, kwargs)
    if parts is None:
        return type(self).forward(self, x, *args, **kwargs)
    dropout, weight, qstate, bias, a, b, scaling = parts
    dtype = _compute_dtype(x, None if qstate is not None else weight, a, b)
    if dtype is None:
        return type(self).forward(self, x, *args, **kwargs)
    self._check_forward_args(x)
    xc = x.to(dtype)  # no copy when x is in the compute dtype already (the usual case)
    w = weight if qstate is not None else weight.to(dtype)  # a 4-bit weight is dequantized inside, per call
    bias_c = None if bias is None else bias.to(dtype)
    if K_CONCAT and w is weight and may_keep_tensors(weight):  # moved since fused: widened here, once
        widen_weight(weight, a.shape[0])
    p = _fused_dropout_p(dropout, xc, a.shape[0])
    if p is not None:
        seed = philox_seed(xc, a.shape[0])  # drawn here: a checkpoint's recompute draws it again, the same
        return _dropout_fn().apply(xc, w, qstate, bias_c, a, b, float(scaling), p, dtype, seed)
    xd = dropout(xc)  # the layer's own module: the same random mask peft would draw
    # the output is in the compute dtype, as peft's is (the base layer's output under autocast)
    return _fn().apply(xc, xd, w, qstate, bias_c, a, b, float(scaling), dtype)


def fuse_lora_layers(model: Any) -> int:
    """Give every peft LoRA Linear in `model` the fused forward (and with K_CONCAT the wide ones' base weight its
    (out, in + r) buffer); returns how many layers got it."""
    import torch
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        # peft's LoRA Linear, or its bitsandbytes 4-bit one (QLoRA: same LoRA attributes, a Linear4bit base)
        qlora = type(module).__name__ == "Linear4bit" and type(module).__module__ == "peft.tuners.lora.bnb"
        if (type(module) is LoraLinear or qlora) and not getattr(module, FUSED_ATTR, False):
            module.forward = types.MethodType(fused_lora_forward, module)
            setattr(module, FUSED_ATTR, True)
            count += 1
            base = module.get_base_layer()
            if type(base) is torch.nn.Linear and base.weight.is_cuda and len(module.active_adapters) == 1:
                name = module.active_adapters[0]
                if name in module.lora_A:  # (a weight still to move is widened by its first forward instead)
                    widen_weight(base.weight, module.lora_A[name].weight.shape[0])
    invalidate()  # adapters loaded or changed since the last fused step are copied afresh
    return count


def unfuse_lora_layers(model: Any) -> int:
    """Put peft's own forward back on every layer fuse_lora_layers changed (and their base weights in storage of
    their own again); returns how many."""
    unwiden_weights(model)
    release(model.parameters())
    return restore_class_forwards(model, FUSED_ATTR)


def restore_class_forwards(model: Any, marker: str) -> int:
    """Drop the instance forward of every module marked with the attribute `marker` (its class's forward runs
    again) and the mark; returns how many modules had one."""
    count = 0
    for module in model.modules():
        if getattr(module, marker, False):
            del module.forward
            delattr(module, marker)
            count += 1
    return count
