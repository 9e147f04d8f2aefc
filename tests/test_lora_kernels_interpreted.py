"""orch's LoRA Triton kernels (orchestrator/passes/training/lora/kernels.py) against their torch references, on CPU.

The kernels run through Triton's interpreter in a subprocess (tests/lora_kernels_interpreted.py; TRITON_INTERPRET=1
must be set before triton is imported, and triton is not in the shared venv) with the pinned Triton that
`make setup` puts in .cache/triton-interpret (scripts/setup-triton-interpret.sh), as tests/test_lora_philox.py runs
the Philox kernels. The subprocess saves inputs, outputs and how often each kernel was launched; the references run
here. Without this, a kernel bug shows only on a GPU (bench/gpu_kernels.py). fp16 and fp32 (the interpreter does
not interpret bf16; bf16 is checked on the GPU). Sizes are odd on purpose: rows and columns that are no multiple of
the kernels' blocks, grouped-query heads, partial rotary.

Tolerances are a rounding's width: in fp16 every element within one unit in the last place of the fp32 reference
and nearly all equal to it; in fp32 a few ulps. lora_wgrad / lora_tall have no Triton path (split cuBLAS GEMMs on
CUDA; their split arithmetic is checked in tests/test_lora_cuda.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from orchestrator.passes.training.lora import kernels
from tests.conftest import run_triton_interpreted

SCALE = 1 / 0.9  # tests/lora_kernels_interpreted.py's dropout scale
DTYPES = ("float16", "float32")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("kernels") / "interpreted.pt"
    return run_triton_interpreted("lora_kernels_interpreted.py", out, timeout=600)


def cases(res: dict[str, Any], prefix: str, dtype: str) -> list[dict[str, Any]]:
    found = [v for k, v in res.items() if k.startswith(f"{prefix} torch.{dtype} ")]
    assert len(found) >= 2, f"no {prefix} cases for {dtype}"
    return found


FP32_EPS = 2.0**-24  # the kernels compute in fp32 whatever the input dtype
FP32_TERMS = 32  # fp32 round-offs allowed per unit of the terms' magnitude (dot products of up to 128 terms)


def ulp(ref: Any, dtype: torch.dtype) -> Any:
    """A unit in the last place of ref rounded to dtype (fp16 or fp32), subnormals included."""
    bits, smallest = {torch.float16: (11, -24), torch.float32: (24, -149)}[dtype]
    _, exp = torch.frexp(ref.to(dtype).double())
    return torch.pow(2.0, (exp - bits).clamp(min=smallest).double())


def assert_rounded(got: Any, ref: Any, magnitude: Any, *, max_ulps: float = 1.0, min_equal: float = 0.0) -> None:
    """got (the kernel's, in its dtype) is the exact ref computed in fp32 and rounded once: every element within
    max_ulps of the result plus fp32 round-off of the terms (magnitude: the sum of the terms' absolute values,
    where cancellation makes the result small), and at least min_equal of them equal to ref rounded to got's dtype."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = (got.double() - ref.double()).abs()
    bound = max_ulps * ulp(ref, got.dtype) + FP32_TERMS * FP32_EPS * magnitude.double()
    worst = int((err / bound).argmax())
    assert bool((err <= bound).all()), (
        f"{int((err > bound).sum())} elements off, worst {float(err.flatten()[worst]):.3g} "
        f"(got {float(got.flatten()[worst]):.6g}, want {float(ref.flatten()[worst]):.6g})"
    )
    equal = float((got == ref.to(got.dtype)).double().mean())
    assert equal >= min_equal, f"{equal:.4f} of the elements equal the rounded reference (min {min_equal})"


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    """fp16: nearly all bit-equal to the rounded reference (the kernel rounds its fp32 result once)."""
    return {"max_ulps": 1.0, "min_equal": 0.99} if dtype == torch.float16 else {"max_ulps": 1.0}


# ---------------------------------------------------------------------------------------------------------------
# LoRA dropout's input gradient: dropout_grad_add_kernel, accumulating and writing


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_grad_kernel_is_the_reference_in_both_modes(interpreted: dict[str, Any], dtype: str) -> None:
    masks = [got["mask"] for got in cases(interpreted, "dropout", dtype)]
    assert {m.stride(0) == m.shape[1] for m in masks} == {True, False}  # contiguous masks and wider rows' columns
    for got in cases(interpreted, "dropout", dtype):
        gx, gh, a, mask = got["gx"], got["gh"], got["a"], got["mask"]
        assert got["add_launches"] == {"dropout_grad_add_kernel": 1}  # the kernel, not the torch fallback
        assert got["write_launches"] == {"dropout_grad_add_kernel": 1}
        exact_lora = kernels.lora_dropout_grad_add_reference(
            torch.zeros(gx.shape, dtype=torch.float64), gh.double(), a.double(), mask, SCALE
        )
        exact_added = kernels.lora_dropout_grad_add_reference(gx.double(), gh.double(), a.double(), mask, SCALE)
        assert got["added"].dtype == gx.dtype and got["written"].dtype == gx.dtype
        terms = (gh.double().abs() @ a.double().abs()) * mask * SCALE
        assert_rounded(got["added"], exact_added, gx.double().abs() + terms, **tolerances(gx.dtype))
        assert_rounded(got["written"], exact_lora, terms, **tolerances(gx.dtype))
        # the mask is applied: dropped elements are exactly 0 (written) or exactly grad_x (accumulated)
        assert int((~mask).sum()) > 0
        assert bool((got["written"][~mask] == 0).all()) and torch.equal(got["added"][~mask], gx[~mask])
        # and the same-dtype torch reference (what the wrapper falls back to) agrees to its own rounding
        fallback = kernels.lora_dropout_grad_add_reference(gx.clone(), gh, a, mask, SCALE)
        assert torch.allclose(got["added"].float(), fallback.float(), atol=4e-3, rtol=4e-3)


def test_dropout_grad_kernel_casts_the_lora_factors_and_skips_other_ranks(interpreted: dict[str, Any]) -> None:
    mixed = interpreted["dropout mixed"]  # fp32 gh, A into an fp16 gradient: cast to fp16 first, then the kernel
    assert mixed["write_launches"] == {"dropout_grad_add_kernel": 1} and mixed["written"].dtype == torch.float16
    gh16, a16 = mixed["gh"].half().double(), mixed["a"].half().double()
    terms = (gh16.abs() @ a16.abs()) * mixed["mask"] * SCALE
    assert_rounded(mixed["written"], (gh16 @ a16) * mixed["mask"] * SCALE, terms, **tolerances(torch.float16))
    rank48 = interpreted["dropout rank 48"]  # tl.dot needs a power-of-two rank: the torch path, no launch
    assert rank48["write_launches"] == {}
    want = (rank48["gh"] @ rank48["a"]) * rank48["mask"] * SCALE
    assert torch.allclose(rank48["written"], want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# SwiGLU: forward, backward, the dropped-out forward, the autograd Function


def liger_swiglu_exact(u: Any) -> Any:
    """silu(gate) rounded to u's dtype (Liger's and transformers' eager rounding), times up, not rounded."""
    gate, up = u.double().chunk(2, dim=-1)
    silu = torch.nn.functional.silu(gate).to(u.dtype).double()
    return silu * up


def swiglu_backward_terms(u: Any, dc: Any) -> Any:
    """|d gate| and |d up| summed term by term: where silu * (1 - sig) + sig cancels, fp32 round-off of the terms."""
    gate, up = u.double().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    dc = dc.double().abs()
    return torch.cat([dc * ((silu * (1 - sig)).abs() + sig) * up.abs(), dc * silu.abs()], dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_kernels_are_the_reference(interpreted: dict[str, Any], dtype: str) -> None:
    for got in cases(interpreted, "swiglu", dtype):
        u2, dc2, mask = got["u2"], got["dc2"], got["mask"]
        assert got["fwd_launches"] == {"swiglu_fwd_kernel": 1}
        assert got["bwd_launches"] == {"swiglu_bwd_kernel": 1}
        assert got["drop_launches"] == {"swiglu_dropout_fwd_kernel": 1}
        tol = tolerances(u2.dtype)
        # forward: Liger's rounding, the product rounded once; equal to the eager reference to its own rounding
        exact_c = liger_swiglu_exact(u2)
        assert_rounded(got["fwd"], exact_c, exact_c.abs(), **tol)
        assert torch.allclose(got["fwd"].float(), kernels.swiglu_reference(u2).float(), atol=1e-6, rtol=2e-3)
        # backward: the fp32 reference's arithmetic, in double here
        exact_du = kernels.swiglu_backward_reference(u2.double(), dc2.double())
        assert got["bwd"].dtype == u2.dtype
        assert_rounded(got["bwd"], exact_du, swiglu_backward_terms(u2, dc2), **tol)
        # the dropped-out forward: the rounded SwiGLU output, times the mask and the scale, rounded once more
        exact_drop = exact_c.to(u2.dtype).double() * mask * SCALE
        assert_rounded(got["drop"], exact_drop, exact_drop.abs(), **tol)
        assert bool((got["drop"][~mask] == 0).all()) and int((~mask).sum()) > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_autograd_function_forward_and_backward(interpreted: dict[str, Any], dtype: str) -> None:
    for got in cases(interpreted, "swiglu", dtype):
        u, dc = got["u"], got["dc"]
        assert got["fn_launches"] == {"swiglu_fwd_kernel": 1, "swiglu_bwd_kernel": 1}
        assert got["c"].shape == (*u.shape[:-1], u.shape[-1] // 2) and got["du"].shape == u.shape
        tol = tolerances(u.dtype)
        exact_c = liger_swiglu_exact(u)
        assert_rounded(got["c"], exact_c, exact_c.abs(), **tol)
        # the gradient autograd gives for silu(gate) * up, in double
        ud = u.double().requires_grad_(True)
        gate, up = ud.chunk(2, dim=-1)
        (torch.nn.functional.silu(gate) * up).backward(dc.double())
        assert_rounded(got["du"], ud.grad, swiglu_backward_terms(u, dc), **tol)


# ---------------------------------------------------------------------------------------------------------------
# q, k, v + RoPE out of the fused qkv: forward and backward


def rope_terms(qkv_abs: Any, cos: Any, hq: int, hk: int, d: int) -> tuple[Any, Any, Any]:
    """|x1 cos| + |x2 sin| per rotated element (at most |x1| + |x2|: |cos|, |sin| <= 1): the reference with cos = 1,
    sin = 0 gives |x|, with cos = 0, sin = 1 the rotated half, whose absolute values add the partner's."""
    ones, zeros = torch.ones_like(cos, dtype=torch.float64), torch.zeros_like(cos, dtype=torch.float64)
    same = kernels.qkv_rope_reference(qkv_abs, ones, zeros, hq, hk, d)
    partner = kernels.qkv_rope_reference(qkv_abs, zeros, ones, hq, hk, d)
    return tuple(a.abs() + b.abs() for a, b in zip(same, partner, strict=True))


def rope_backward_terms(qkv: Any, cos: Any, grads: Any, hq: int, hk: int, d: int) -> Any:
    """The backward's rotated-gradient terms, as rope_terms: |dq1| + |dq2| per element, and |dv|."""
    ones, zeros = torch.ones_like(cos, dtype=torch.float64), torch.zeros_like(cos, dtype=torch.float64)
    total = 0
    for c, s in ((ones, zeros), (zeros, ones)):
        qd = qkv.double().requires_grad_(True)
        ref = kernels.qkv_rope_reference(qd, c, s, hq, hk, d)
        (g,) = torch.autograd.grad(ref, qd, [g.double().abs() for g in grads])
        total = total + g.abs()
    return total


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_rope_kernels_are_the_reference(interpreted: dict[str, Any], dtype: str) -> None:
    seen = set()
    for key in (k for k in interpreted if k.startswith(f"rope torch.{dtype} ")):
        got = interpreted[key]
        _, _, _, heads, _, rot = key.split()
        hq, hk_d = heads.split("/")
        hq, hk, d = int(hq), *map(int, hk_d.split("x"))
        seen.add((hq != hk, int(rot) < d))
        assert got["launches"] == {"qkv_rope_fwd_kernel": 1, "qkv_rope_bwd_kernel": 1}
        qkv, cos, sin, grads = got["qkv"], got["cos"], got["sin"], got["grads"]
        qd = qkv.double().requires_grad_(True)
        ref = kernels.qkv_rope_reference(qd, cos.double(), sin.double(), hq, hk, d)
        magnitude = dict(zip("qkv", rope_terms(qkv.double().abs(), cos, hq, hk, d), strict=True))
        tol = tolerances(qkv.dtype)
        for name, want in zip(("q", "k", "v"), ref, strict=True):
            assert got[name].dtype == qkv.dtype and got[name].is_contiguous()
            assert_rounded(got[name], want, magnitude[name], **tol)
        (want_dqkv,) = torch.autograd.grad(ref, qd, [g.double() for g in grads])
        assert_rounded(got["dqkv"], want_dqkv, rope_backward_terms(qkv, cos, grads, hq, hk, d), **tol)
        # the pass-through part of each partially rotated head and v are copied bit for bit, both ways
        n = qkv.shape[0]
        assert torch.equal(got["q"][..., int(rot) :], qkv[:, : hq * d].view(n, hq, d)[..., int(rot) :])
        assert torch.equal(got["v"], qkv[:, (hq + hk) * d :].view(n, hk, d))
        assert torch.equal(got["dqkv"][:, (hq + hk) * d :], grads[2].reshape(n, hk * d))
    assert {(True, True), (False, False)} <= seen  # grouped-query with partial rotary, and plain heads fully rotated
