"""Small Triton kernels for the CUDA LoRA path, each with a torch reference of the same arithmetic.

Both remove full-size memory passes that eager PyTorch makes around the big GEMMs of a LoRA training step once
padding is gone (bench/RESULTS.md has the profile):

- `lora_dropout_grad_add_(grad_x, gh, a, mask, scale)`: the LoRA path's input gradient under LoRA dropout,
  `grad_x += ((gh @ a) * mask) * scale`, in one kernel that reads `grad_x` and the dropout mask once and writes
  `grad_x` once. Eager autograd writes `gh @ a`, reads it again with the mask in dropout's backward, writes that,
  and reads both input gradients to add them: about 13 bytes per element against 5.
- `swiglu(u)`: Phi-3's fused `gate_up_proj` output `u = [gate | up]` to `silu(gate) * up`, reading the two halves
  in place (Liger's SwiGLU first copies each half into a contiguous tensor) and writing the input gradient as one
  `[d gate | d up]` tensor in the backward (no `cat` of the two halves). Liger's rounding: `silu(gate)` is rounded
  to the activation dtype before the product, as transformers' eager `up * act_fn(gate)` does.

The kernels run only on CUDA tensors with Triton installed (or on CPU tensors under Triton's interpreter,
TRITON_INTERPRET=1, as the interpreter tests run them); anything else takes the torch reference, which the CPU
tests compare against peft / transformers and which the GPU check (bench/gpu_kernels.py) compares the kernels with.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET=1, read by triton at import): kernels run on CPU tensors, in
    numpy. The CPU tests of the kernels run that way in a subprocess (tests/test_lora_kernels_interpreted.py,
    tests/test_lora_philox.py)."""
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: Any) -> bool:
    """The Triton kernels take these tensors: CUDA tensors, or CPU tensors under Triton's interpreter."""
    if not triton_available():
        return False
    return all(t.is_cuda for t in tensors) or (interpreting() and all(t.device.type == "cpu" for t in tensors))


@functools.lru_cache(maxsize=1)
def _kernels() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def dropout_grad_add_kernel(
        gx_ptr,
        gh_ptr,
        a_ptr,
        m_ptr,
        n_rows,
        n_cols,
        stride_gx,
        stride_gh,
        stride_a,
        stride_m,
        scale,
        R: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ACCUMULATE: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ranks = tl.arange(0, R)
        row_ok = rows < n_rows
        col_ok = cols < n_cols
        gh = tl.load(gh_ptr + rows[:, None] * stride_gh + ranks[None, :], mask=row_ok[:, None], other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * stride_a + cols[None, :], mask=col_ok[None, :], other=0.0)
        if IEEE:  # noqa: SIM108 (a constexpr branch; fp32 [BLOCK_M, BLOCK_N])
            acc = tl.dot(gh, a, input_precision="ieee")
        else:
            acc = tl.dot(gh, a)
        ok = row_ok[:, None] & col_ok[None, :]
        keep = tl.load(m_ptr + rows[:, None] * stride_m + cols[None, :], mask=ok, other=0)
        gx_ptrs = gx_ptr + rows[:, None] * stride_gx + cols[None, :]
        gx = tl.where(keep != 0, acc * scale, 0.0)
        if ACCUMULATE:
            gx += tl.load(gx_ptrs, mask=ok, other=0.0).to(tl.float32)
        tl.store(gx_ptrs, gx.to(gx_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def swiglu_fwd_kernel(u_ptr, c_ptr, n_cols, stride_u, stride_c, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_cols
        gate = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0)
        up = tl.load(u_ptr + row * stride_u + n_cols + cols, mask=ok, other=0.0)
        g = gate.to(tl.float32)
        # silu rounded to the activation dtype first (eager's act_fn(gate)), then the product rounded once: a
        # product of two bf16 / fp16 values is exact in fp32, so this is the half-precision multiply's result
        silu = (g * tl.sigmoid(g)).to(up.dtype).to(tl.float32)
        tl.store(c_ptr + row * stride_c + cols, (silu * up.to(tl.float32)).to(c_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def swiglu_bwd_kernel(u_ptr, dc_ptr, du_ptr, n_cols, stride_u, stride_dc, stride_du, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_cols
        g = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(u_ptr + row * stride_u + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        dc = tl.load(dc_ptr + row * stride_dc + cols, mask=ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        d_gate = dc * (silu * (1 - sig) + sig) * up
        d_up = dc * silu
        tl.store(du_ptr + row * stride_du + cols, d_gate.to(du_ptr.dtype.element_ty), mask=ok)
        tl.store(du_ptr + row * stride_du + n_cols + cols, d_up.to(du_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def swiglu_dropout_fwd_kernel(
        u_ptr, m_ptr, c_ptr, n_cols, stride_u, stride_m, stride_c, scale, BLOCK: tl.constexpr
    ):  # fmt: skip
        # silu(gate) * up rounded as swiglu_fwd_kernel does, then the dropout mask and 1 / (1 - p) as native_dropout
        # applies them (one rounding of c * scale): the forward's dropped-out copy, rebuilt from u and the mask
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_cols
        gate = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0)
        up = tl.load(u_ptr + row * stride_u + n_cols + cols, mask=ok, other=0.0)
        keep = tl.load(m_ptr + row * stride_m + cols, mask=ok, other=0)
        g = gate.to(tl.float32)
        silu = (g * tl.sigmoid(g)).to(up.dtype).to(tl.float32)
        c = (silu * up.to(tl.float32)).to(c_ptr.dtype.element_ty).to(tl.float32)
        out = tl.where(keep != 0, c * scale, 0.0)
        tl.store(c_ptr + row * stride_c + cols, out.to(c_ptr.dtype.element_ty), mask=ok)

    return dropout_grad_add_kernel, swiglu_fwd_kernel, swiglu_bwd_kernel, swiglu_dropout_fwd_kernel


# --------------------------------------------------------------------------------------------------------------
# LoRA dropout: the LoRA path's input gradient added into the base path's


DROPOUT_KERNEL_ENABLED = True  # lora_cuda's plan sets it (ORCH_CUDA_FASTPATH=-fused_dropout: dropout outside)


def ieee_dot(t: Any) -> bool:
    """fp32 inputs: tl.dot in full fp32 (its default would be TF32), as torch's fp32 matmul."""
    import torch

    return t.dtype == torch.float32


def dropout_grad_add_supported(rank: int) -> bool:
    """tl.dot needs the inner size to be a power of two of at least 16."""
    return DROPOUT_KERNEL_ENABLED and rank >= 16 and rank & (rank - 1) == 0 and rank <= 256


def lora_dropout_grad_add_reference(grad_x: Any, gh: Any, a: Any, mask: Any, scale: float) -> Any:
    """grad_x += ((gh @ a) * mask) * scale, in torch (what eager autograd computes through dropout's backward)."""
    grad_x += (gh @ a) * mask * scale
    return grad_x


def lora_dropout_grad_add_(grad_x: Any, gh: Any, a: Any, mask: Any, scale: float) -> Any:
    """In place: grad_x (T, K) += ((gh (T, r) @ a (r, K)) * mask (T, K, bool)) * scale; returns grad_x."""
    if not _dropout_kernel_applies(grad_x, gh, a, mask):
        return lora_dropout_grad_add_reference(grad_x, gh, a, mask, scale)
    return _run_dropout_grad(grad_x, gh, a, mask, scale, accumulate=True)


def lora_dropout_grad(gh: Any, a: Any, mask: Any, scale: float, dtype: Any) -> Any:
    """A new (T, K) tensor ((gh @ a) * mask) * scale in `dtype`: the LoRA path's input gradient written once, for
    the base GEMM to accumulate into (fused.py's LoRA-first order)."""
    import torch

    out = torch.empty(mask.shape, dtype=dtype, device=mask.device)
    if not _dropout_kernel_applies(out, gh, a, mask):
        return torch.mul((gh @ a) * mask, scale, out=out)
    return _run_dropout_grad(out, gh, a, mask, scale, accumulate=False)


def _dropout_kernel_applies(out: Any, gh: Any, a: Any, mask: Any) -> bool:
    return use_triton(out, gh, a, mask) and dropout_grad_add_supported(gh.shape[-1])


def _run_dropout_grad(out: Any, gh: Any, a: Any, mask: Any, scale: float, *, accumulate: bool) -> Any:
    import triton

    rank = gh.shape[-1]
    kernel = _kernels()[0]
    assert out.stride(-1) == 1 and mask.stride(-1) == 1 and a.stride(-1) == 1 and gh.stride(-1) == 1
    n_rows, n_cols = out.shape
    gh = gh.to(out.dtype)
    a = a.to(out.dtype)
    block_m, block_n = (64, 128) if rank <= 64 else (64, 64)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    kernel[grid](
        out,
        gh,
        a,
        mask.view(torch_uint8()),
        n_rows,
        n_cols,
        out.stride(0),
        gh.stride(0),
        a.stride(0),
        mask.stride(0),
        float(scale),
        R=rank,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        ACCUMULATE=accumulate,
        IEEE=ieee_dot(out),
        num_warps=4,
    )
    return out


def torch_uint8() -> Any:
    import torch

    return torch.uint8


# --------------------------------------------------------------------------------------------------------------
# SwiGLU over a fused [gate | up] projection


def swiglu_reference(u: Any) -> Any:
    """silu(gate) * up with transformers' eager rounding (silu rounded to u's dtype first)."""
    import torch

    gate, up = u.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _swiglu_function() -> Any:
    import torch
    import triton

    class SwiGLUFunction(torch.autograd.Function):
        """c = silu(u[..., :I]) * u[..., I:]; saves u (what Liger saves, as two halves), returns du in one tensor."""

        @staticmethod
        def forward(ctx: Any, u: Any) -> Any:
            lead, width = u.shape[:-1], u.shape[-1]
            n_cols = width // 2
            u2 = u.reshape(-1, width)
            if u2.stride(-1) != 1:
                u2 = u2.contiguous()
            c = torch.empty((u2.shape[0], n_cols), device=u.device, dtype=u.dtype)
            block = 1024
            _kernels()[1][(u2.shape[0], triton.cdiv(n_cols, block))](
                u2, c, n_cols, u2.stride(0), c.stride(0), BLOCK=block, num_warps=4
            )
            ctx.save_for_backward(u2)
            ctx.lead = lead
            return c.view(*lead, n_cols)

        @staticmethod
        def backward(ctx: Any, dc: Any) -> Any:
            (u2,) = ctx.saved_tensors
            n_cols = u2.shape[-1] // 2
            dc2 = dc.reshape(-1, n_cols)
            if dc2.stride(-1) != 1:
                dc2 = dc2.contiguous()
            du = torch.empty_like(u2)
            block = 1024
            _kernels()[2][(u2.shape[0], triton.cdiv(n_cols, block))](
                u2, dc2, du, n_cols, u2.stride(0), dc2.stride(0), du.stride(0), BLOCK=block, num_warps=4
            )
            return du.view(*ctx.lead, u2.shape[-1])

    return SwiGLUFunction


def swiglu_backward_reference(u: Any, dc: Any) -> Any:
    """d/du of silu(gate) * up for u = [gate | up], at least fp32 (the Triton backward's arithmetic), in u's dtype."""
    import torch

    wide = torch.promote_types(u.dtype, torch.float32)
    gate, up = u.to(wide).chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    dcf = dc.to(wide)
    return torch.cat([dcf * (silu * (1 - sig) + sig) * up, dcf * silu], dim=-1).to(u.dtype)


def swiglu_forward_2d(u2: Any) -> Any:
    """silu(gate) * up of a 2-D contiguous u2 = [gate | up]: the Triton kernel on CUDA, the torch reference else."""
    import torch

    if not use_triton(u2):
        return swiglu_reference(u2)
    import triton

    n_cols = u2.shape[-1] // 2
    c = torch.empty((u2.shape[0], n_cols), device=u2.device, dtype=u2.dtype)
    grid = (u2.shape[0], triton.cdiv(n_cols, 1024))
    _kernels()[1][grid](u2, c, n_cols, u2.stride(0), c.stride(0), BLOCK=1024, num_warps=4)
    return c


def swiglu_dropout_2d(u2: Any, mask: Any, scale: float) -> Any:
    """(silu(gate) * up) * mask * scale, rounded as the SwiGLU output and then native_dropout round them: the
    dropped-out SwiGLU output rebuilt from u and the dropout mask, in one pass on CUDA."""
    import torch

    if not use_triton(u2, mask):
        return swiglu_reference(u2).mul(mask).mul_(scale)
    import triton

    n_cols = u2.shape[-1] // 2
    out = torch.empty((u2.shape[0], n_cols), device=u2.device, dtype=u2.dtype)
    grid = (u2.shape[0], triton.cdiv(n_cols, 1024))
    _kernels()[3][grid](
        u2, mask.view(torch_uint8()), out, n_cols, u2.stride(0), mask.stride(0), out.stride(0), float(scale),
        BLOCK=1024, num_warps=4,
    )  # fmt: skip
    return out


def swiglu_backward_2d(u2: Any, dc2: Any, out: Any = None) -> Any:
    """The gradient of swiglu_forward_2d at u2 for the output gradient dc2, as one [d gate | d up] tensor; written
    into `out` where given, which may be u2 itself (each element is read before it is written, by the same program)
    when the caller needs u2 no more: its autograd version is bumped, so a graph still holding it refuses to run."""
    import torch

    if not use_triton(u2, dc2):
        du = swiglu_backward_reference(u2, dc2)
        return du if out is None else out.copy_(du)
    import triton

    n_cols = u2.shape[-1] // 2
    du = torch.empty_like(u2) if out is None else out
    _kernels()[2][(u2.shape[0], triton.cdiv(n_cols, 1024))](
        u2, dc2, du, n_cols, u2.stride(0), dc2.stride(0), du.stride(0), BLOCK=1024, num_warps=4
    )
    if out is not None:
        torch.autograd.graph.increment_version(out)  # the kernel's write, as an in-place torch op would count it
    return du


_SWIGLU: Any = None


def swiglu(u: Any) -> Any:
    """silu(gate) * up for u = [gate | up] (last dim): the Triton kernel on CUDA, the torch reference elsewhere."""
    global _SWIGLU
    if not use_triton(u) or u.shape[-1] % 2:
        return swiglu_reference(u)
    if _SWIGLU is None:
        _SWIGLU = _swiglu_function()
    return _SWIGLU.apply(u)


# --------------------------------------------------------------------------------------------------------------
# The LoRA matrices' skinny GEMMs, split along their long reduction and autotuned per shape

# LoRA's four small GEMMs per layer and step have one small side (the rank, 64) and a long reduction: the tokens
# (A's and B's weight gradients, T x M -> M x r) or the layer width (h = x A^T, g B: T x K -> T x r). Splitting the
# reduction into s batched GEMMs (one strided bmm) and summing the s partial products in fp32 gives s times the
# tiles, which pays where a GEMM library leaves most SMs idle on such shapes. The first call of each shape (token
# counts bucketed by powers of two) times s in SPLITS and keeps a split only if it beats the plain GEMM by
# SPLIT_MIN_GAIN; that costs a few milliseconds and a device sync once per shape.
# Measured on an H200 (bench/gpu_kernels.py, 8 x 1024 tokens): cuBLAS already streams these at ~3.4 TB/s (plain
# GEMM 0.03-0.08 ms, no split faster by more than the timing noise), so there the plain GEMM is kept.
SPLITS = (1, 2, 4, 8, 16)
SPLIT_MIN_GAIN = 0.05  # a split must be this much faster than the plain GEMM (timing noise is ~3%)
SPLIT_ENABLED = True  # lora_cuda's plan sets it (ORCH_CUDA_FASTPATH=-splitk: always the plain GEMM)
_SPLIT_CACHE: dict[tuple, int] = {}


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def scaled_mm(a: Any, b: Any, scale: float) -> Any:
    """scale * a @ b, the scale in the GEMM's epilogue (alpha; beta=0 never reads the empty output)."""
    if scale == 1.0:
        return a @ b
    return a.new_empty((a.shape[0], b.shape[1])).addmm_(a, b, beta=0, alpha=scale)


def _bmm(a: Any, b: Any, scale: float) -> Any:
    """scale * a @ b batched, the scale as the GEMM's alpha."""
    import torch

    if scale == 1.0:
        return torch.bmm(a, b)
    return torch.baddbmm(a.new_empty((a.shape[0], a.shape[1], b.shape[2])), a, b, beta=0, alpha=scale)


def _wgrad_split(a: Any, b: Any, s: int, scale: float = 1.0) -> Any:
    """scale * a^T @ b (a: (T, M), b: (T, N)) in fp32, the T reduction split into s batched parts."""
    import torch

    if s == 1:
        return scaled_mm(a.t(), b, scale).float()
    n_rows = a.shape[0]
    chunk = n_rows // s
    main = chunk * s
    parts = _bmm(a[:main].reshape(s, chunk, a.shape[1]).transpose(1, 2), b[:main].reshape(s, chunk, b.shape[1]), scale)
    out = parts.sum(0, dtype=torch.float32)
    if main < n_rows:
        out += scaled_mm(a[main:].t(), b[main:], scale).float()
    return out


def _tall_split(a: Any, bt: Any, s: int, scale: float = 1.0) -> Any:
    """scale * a @ bt^T (a: (T, K), bt: (N, K) with N small), the K reduction split into s batched parts."""

    if s == 1:
        return scaled_mm(a, bt.t(), scale)
    n_rows, k = a.shape
    part = k // s
    a3 = a.reshape(n_rows, s, part).transpose(0, 1)  # (s, T, K/s), a strided batch: no copy
    b3 = bt.reshape(bt.shape[0], s, part).permute(1, 2, 0)  # (s, K/s, N)
    # summed in fp32 inside the reduction and written in a's dtype once (no fp32 tensor and cast kernel after it)
    return _bmm(a3, b3, scale).sum(0)


def _pick_split(fn: Any, a: Any, b: Any, ok: Any) -> int:
    import torch

    best, best_ms, plain_ms = 1, float("inf"), float("inf")
    for s in SPLITS:
        if not ok(s):
            continue
        fn(a, b, s)  # warm-up (cuBLAS handles, workspace)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn(a, b, s)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        if s == 1:
            plain_ms = ms
        if ms < best_ms:
            best, best_ms = s, ms
    return best if best_ms < (1 - SPLIT_MIN_GAIN) * plain_ms else 1


def lora_wgrad(a: Any, b: Any, scale: float = 1.0) -> Any:
    """scale * a^T @ b in fp32 for a (T, M), b (T, N): the LoRA matrices' weight gradients (reduction over tokens;
    the scale inside the GEMM, not one more pass over the result)."""
    n_rows = a.shape[0]
    if not (SPLIT_ENABLED and a.is_cuda and n_rows >= 2048 and _unit_rows(a) and _unit_rows(b)):
        return scaled_mm(a.t(), b, scale).float()
    key = ("w", a.shape[1], b.shape[1], _bucket(n_rows), a.dtype, a.device.index, a.stride(0), b.stride(0))
    s = _SPLIT_CACHE.get(key)
    if s is None:
        s = _SPLIT_CACHE[key] = _pick_split(_wgrad_split, a, b, lambda s: n_rows // s >= 256)
    return _wgrad_split(a, b, s, scale)


def _unit_rows(t: Any) -> bool:
    """A 2-D tensor of contiguous rows (row stride >= its width: a contiguous one, or the first columns of a wider
    buffer, as add_norm's normed rows with room for h), which the split GEMMs take as strided batches, no copy."""
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1]


def lora_tall(a: Any, bt: Any, scale: float = 1.0) -> Any:
    """scale * a @ bt^T for a (T, K), bt (N, K) contiguous with N small: h = x A^T and s g B of a LoRA layer."""
    n_rows, k = a.shape
    if not (SPLIT_ENABLED and a.is_cuda and n_rows >= 2048 and _unit_rows(a) and bt.is_contiguous()):
        return scaled_mm(a, bt.t(), scale)
    key = ("t", k, bt.shape[0], _bucket(n_rows), a.dtype, a.device.index, a.stride(0))
    s = _SPLIT_CACHE.get(key)
    if s is None:
        s = _SPLIT_CACHE[key] = _pick_split(_tall_split, a, bt, lambda s: k % s == 0 and k // s >= 256)
    return _tall_split(a, bt, s, scale)


# --------------------------------------------------------------------------------------------------------------
# q, k, v out of Phi-3's fused qkv projection, RoPE applied, in the layouts the attention reads


@functools.lru_cache(maxsize=1)
def _rope_kernels() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def qkv_rope_fwd_kernel(
        qkv_ptr, cos_ptr, sin_ptr, out_ptr, n_tokens, stride_qkv, stride_cs,
        HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # out holds [q (T, HQ, D) | k (T, HK, D) | v (T, HK, D)], each region contiguous; program (tokens, head)
        head = tl.program_id(1)
        rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        row_ok = rows < n_tokens
        src = qkv_ptr + rows[:, None] * stride_qkv + head * D
        if head < HQ + HK:
            if head < HQ:
                dst = out_ptr + rows[:, None] * (HQ * D) + head * D
            else:
                dst = out_ptr + n_tokens * (HQ * D) + rows[:, None] * (HK * D) + (head - HQ) * D
            h = tl.arange(0, BLOCK_HALF)
            m = row_ok[:, None] & (h < HALF)[None, :]
            cs = rows[:, None] * stride_cs + h[None, :]
            c1 = tl.load(cos_ptr + cs, mask=m, other=0.0).to(tl.float32)
            c2 = tl.load(cos_ptr + cs + HALF, mask=m, other=0.0).to(tl.float32)
            s1 = tl.load(sin_ptr + cs, mask=m, other=0.0).to(tl.float32)
            s2 = tl.load(sin_ptr + cs + HALF, mask=m, other=0.0).to(tl.float32)
            x1 = tl.load(src + h[None, :], mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(src + HALF + h[None, :], mask=m, other=0.0).to(tl.float32)
            # transformers' q * cos + rotate_half(q) * sin with rotate_half(x) = [-x2, x1], in fp32
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
            tl.store(dst + h[None, :], o1.to(out_ptr.dtype.element_ty), mask=m)
            tl.store(dst + HALF + h[None, :], o2.to(out_ptr.dtype.element_ty), mask=m)
            if D > 2 * HALF:  # partial rotary: the rest of the head passes through
                p = tl.arange(0, BLOCK_PASS)
                mp = row_ok[:, None] & (p < D - 2 * HALF)[None, :]
                tl.store(dst + 2 * HALF + p[None, :], tl.load(src + 2 * HALF + p[None, :], mask=mp), mask=mp)
        else:
            dst = out_ptr + n_tokens * ((HQ + HK) * D) + rows[:, None] * (HK * D) + (head - HQ - HK) * D
            d = tl.arange(0, BLOCK_D)
            md = row_ok[:, None] & (d < D)[None, :]
            tl.store(dst + d[None, :], tl.load(src + d[None, :], mask=md), mask=md)

    @triton.jit
    def qkv_rope_bwd_kernel(
        dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dqkv_ptr, n_tokens, stride_dqkv, stride_cs,
        HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # dq (T, HQ, D), dk, dv (T, HK, D) contiguous -> dqkv (T, (HQ + 2 HK) D): RoPE undone, the three concatenated
        head = tl.program_id(1)
        rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        row_ok = rows < n_tokens
        dst = dqkv_ptr + rows[:, None] * stride_dqkv + head * D
        if head < HQ + HK:
            if head < HQ:
                src = dq_ptr + rows[:, None] * (HQ * D) + head * D
            else:
                src = dk_ptr + rows[:, None] * (HK * D) + (head - HQ) * D
            h = tl.arange(0, BLOCK_HALF)
            m = row_ok[:, None] & (h < HALF)[None, :]
            cs = rows[:, None] * stride_cs + h[None, :]
            c1 = tl.load(cos_ptr + cs, mask=m, other=0.0).to(tl.float32)
            c2 = tl.load(cos_ptr + cs + HALF, mask=m, other=0.0).to(tl.float32)
            s1 = tl.load(sin_ptr + cs, mask=m, other=0.0).to(tl.float32)
            s2 = tl.load(sin_ptr + cs + HALF, mask=m, other=0.0).to(tl.float32)
            d1 = tl.load(src + h[None, :], mask=m, other=0.0).to(tl.float32)
            d2 = tl.load(src + HALF + h[None, :], mask=m, other=0.0).to(tl.float32)
            # the transpose of the forward's rotation
            g1 = d1 * c1 + d2 * s2
            g2 = d2 * c2 - d1 * s1
            tl.store(dst + h[None, :], g1.to(dqkv_ptr.dtype.element_ty), mask=m)
            tl.store(dst + HALF + h[None, :], g2.to(dqkv_ptr.dtype.element_ty), mask=m)
            if D > 2 * HALF:
                p = tl.arange(0, BLOCK_PASS)
                mp = row_ok[:, None] & (p < D - 2 * HALF)[None, :]
                tl.store(dst + 2 * HALF + p[None, :], tl.load(src + 2 * HALF + p[None, :], mask=mp), mask=mp)
        else:
            src = dv_ptr + rows[:, None] * (HK * D) + (head - HQ - HK) * D
            d = tl.arange(0, BLOCK_D)
            md = row_ok[:, None] & (d < D)[None, :]
            tl.store(dst + d[None, :], tl.load(src + d[None, :], mask=md), mask=md)

    return qkv_rope_fwd_kernel, qkv_rope_bwd_kernel


def qkv_rope_reference(qkv: Any, cos: Any, sin: Any, hq: int, hk: int, d: int) -> tuple[Any, Any, Any]:
    """q, k, v (tokens, heads, head_dim) of qkv (tokens, (hq + 2 hk) d), RoPE on q and k as transformers' Phi-3
    applies it (cos / sin (tokens, rotary_dim), rotate_half over the first rotary_dim of each head), in fp32."""
    import torch

    rot = cos.shape[-1]
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)

    def rope(x: Any, heads: int) -> Any:
        x = x.reshape(-1, heads, d).float()
        c, s = cos.float()[:, None, :], sin.float()[:, None, :]
        xr, xp = x[..., :rot], x[..., rot:]
        half = rot // 2
        rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
        return torch.cat([xr * c + rotated * s, xp], dim=-1).to(qkv.dtype)

    return rope(q, hq), rope(k, hk), v.reshape(-1, hk, d).contiguous()


def _qkv_rope_function() -> Any:
    import torch
    import triton

    def blocks(d: int, half: int) -> dict[str, int]:
        return {
            "BLOCK_T": 16,
            "BLOCK_HALF": triton.next_power_of_2(half),
            "BLOCK_PASS": triton.next_power_of_2(max(d - 2 * half, 1)),
            "BLOCK_D": triton.next_power_of_2(d),
        }

    class QKVRope(torch.autograd.Function):
        """qkv (T, (hq + 2 hk) d) -> q, k (RoPE applied), v as contiguous (T, heads, d) tensors, in one pass; the
        backward writes the qkv gradient in one pass too (RoPE undone, no cat, no contiguous copies)."""

        @staticmethod
        def forward(ctx: Any, qkv: Any, cos: Any, sin: Any, hq: int, hk: int, d: int) -> Any:
            n = qkv.shape[0]
            half = cos.shape[-1] // 2
            out = torch.empty(n * (hq + 2 * hk) * d, device=qkv.device, dtype=qkv.dtype)
            grid = (triton.cdiv(n, 16), hq + 2 * hk)
            _rope_kernels()[0][grid](
                qkv, cos, sin, out, n, qkv.stride(0), cos.stride(0), HQ=hq, HK=hk, D=d, HALF=half, **blocks(d, half)
            )
            ctx.save_for_backward(cos, sin)
            ctx.dims = (hq, hk, d)
            q = out[: n * hq * d].view(n, hq, d)
            k = out[n * hq * d : n * (hq + hk) * d].view(n, hk, d)
            v = out[n * (hq + hk) * d :].view(n, hk, d)
            return q, k, v

        @staticmethod
        def backward(ctx: Any, dq: Any, dk: Any, dv: Any) -> Any:
            cos, sin = ctx.saved_tensors
            hq, hk, d = ctx.dims
            n = cos.shape[0]
            half = cos.shape[-1] // 2
            dq, dk, dv = (
                torch.zeros((n, h, d), device=cos.device, dtype=cos.dtype) if g is None else g.contiguous()
                for g, h in ((dq, hq), (dk, hk), (dv, hk))
            )
            dqkv = torch.empty((n, (hq + 2 * hk) * d), device=dq.device, dtype=dq.dtype)
            grid = (triton.cdiv(n, 16), hq + 2 * hk)
            _rope_kernels()[1][grid](
                dq, dk, dv, cos, sin, dqkv, n, dqkv.stride(0), cos.stride(0),
                HQ=hq, HK=hk, D=d, HALF=half, **blocks(d, half),
            )  # fmt: skip
            return dqkv, None, None, None, None, None

    return QKVRope


_QKV_ROPE: Any = None


def qkv_rope(qkv: Any, cos: Any, sin: Any, hq: int, hk: int, d: int) -> tuple[Any, Any, Any]:
    """q, k, v (tokens, heads, head_dim), RoPE applied to q and k, from the fused qkv output (tokens, (hq + 2 hk) d)
    and cos / sin (tokens, rotary_dim): the Triton kernels on CUDA, the torch reference elsewhere."""
    global _QKV_ROPE
    rot = cos.shape[-1]
    fits = rot % 2 == 0 and rot <= d and qkv.dim() == 2 and qkv.shape[-1] == (hq + 2 * hk) * d
    if not (fits and use_triton(qkv, cos, sin)):
        return qkv_rope_reference(qkv, cos, sin, hq, hk, d)
    if _QKV_ROPE is None:
        _QKV_ROPE = _qkv_rope_function()
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    return _QKV_ROPE.apply(qkv, cos.to(qkv.dtype), sin.to(qkv.dtype), hq, hk, d)
