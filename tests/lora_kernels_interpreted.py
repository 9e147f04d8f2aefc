"""Runs orch's LoRA Triton kernels (orchestrator/passes/training/lora/kernels.py) through Triton's interpreter and
saves their inputs, outputs and kernel launch counts (torch.save).

tests/test_lora_kernels_interpreted.py starts it in a subprocess with TRITON_INTERPRET=1 and the pinned Triton of
.cache/triton-interpret on PYTHONPATH (the interpreter is chosen when triton is imported, and triton must not be
importable from the shared venv), then computes the torch references in its own process and compares. Every call
is wrapped so that the launches of each kernel during it are recorded: the parent asserts the kernel ran, so a
silent fallback to the torch reference cannot pass. Usage: python tests/lora_kernels_interpreted.py OUT.pt
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

DTYPES = (torch.float16, torch.float32)  # the interpreter does not interpret bf16 (scripts/setup-triton-interpret.sh)
SCALE = 1 / 0.9
# (rows, cols, rank): rows not a multiple of BLOCK_M (64), cols not of BLOCK_N (128 up to rank 64, 64 above)
DROPOUT_CASES = ((70, 200, 16), (19, 130, 64), (65, 129, 128))
# (rows, intermediate): the intermediate size not a multiple of the kernels' BLOCK (1024), one row block past it
SWIGLU_CASES = ((5, 1100), (3, 300))
# (tokens, hq, hk, head_dim, rotary_dim): tokens not a multiple of BLOCK_T (16), grouped-query heads, partial
# rotary, a head_dim and a half rotary_dim that are not powers of two
ROPE_CASES = ((21, 4, 2, 24, 16), (17, 3, 3, 16, 16), (10, 4, 1, 20, 12))

LAUNCHES: Counter[str] = Counter()


class CountedKernel:
    """A Triton JIT function whose launches (kernel[grid](...)) are counted under its name."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.name = kernel.fn.__name__

    def __getitem__(self, grid: Any) -> Any:
        LAUNCHES[self.name] += 1
        return self.kernel[grid]


def count_launches() -> None:
    from orchestrator.passes.training.lora import kernels

    kernel_sets = {"_kernels": kernels._kernels(), "_rope_kernels": kernels._rope_kernels()}
    for attr, found in kernel_sets.items():
        counted = tuple(CountedKernel(k) for k in found)
        setattr(kernels, attr, lambda counted=counted: counted)


def launched(fn: Callable[..., Any], *args: Any) -> tuple[Any, dict[str, int]]:
    """fn(*args)'s result and the kernels launched while it ran."""
    before = LAUNCHES.copy()
    out = fn(*args)
    return out, dict(LAUNCHES - before)


def dropout_outputs(res: dict[str, Any], gen: torch.Generator) -> None:
    from orchestrator.passes.training.lora import kernels

    for dtype in DTYPES:
        for i, (rows, cols, r) in enumerate(DROPOUT_CASES):
            # grad_x a column slice of a wider tensor: its row stride is not its width
            gx = torch.randn(rows, cols + 7, generator=gen).to(dtype)[:, :cols]
            gh = torch.randn(rows, r, generator=gen).to(dtype)
            a = (torch.randn(r, cols, generator=gen) * 0.1).to(dtype)
            # every other mask the first columns of wider rows, as fused.dropout_rows keeps it for add_norm's inputs
            mask = (torch.rand(rows, cols + 9 * (i % 2), generator=gen) > 0.1)[:, :cols]
            added, add_launches = launched(kernels.lora_dropout_grad_add_, gx.clone(), gh, a, mask, SCALE)
            written, write_launches = launched(kernels.lora_dropout_grad, gh, a, mask, SCALE, dtype)
            res[f"dropout {dtype} {rows}x{cols} r{r}"] = {
                "gx": gx.contiguous(), "gh": gh, "a": a, "mask": mask,
                "added": added, "add_launches": add_launches,
                "written": written, "write_launches": write_launches,
            }  # fmt: skip
    # fp32 LoRA factors into an fp16 gradient: the wrapper casts them to the gradient's dtype
    gh = torch.randn(33, 32, generator=gen)
    a = torch.randn(32, 150, generator=gen) * 0.1
    mask = torch.rand(33, 150, generator=gen) > 0.1
    written, launches = launched(kernels.lora_dropout_grad, gh, a, mask, SCALE, torch.float16)
    res["dropout mixed"] = {"gh": gh, "a": a, "mask": mask, "written": written, "write_launches": launches}
    # rank 48 is no power of two (tl.dot): the torch reference, no launch
    gh = torch.randn(9, 48, generator=gen)
    a = torch.randn(48, 40, generator=gen)
    mask = torch.rand(9, 40, generator=gen) > 0.1
    written, launches = launched(kernels.lora_dropout_grad, gh, a, mask, SCALE, torch.float32)
    res["dropout rank 48"] = {"gh": gh, "a": a, "mask": mask, "written": written, "write_launches": launches}


def swiglu_fwd_bwd(u: Any, dc: Any) -> Any:
    """kernels.swiglu's autograd Function: the output, and .backward(dc) into u.grad."""
    from orchestrator.passes.training.lora import kernels

    c = kernels.swiglu(u)
    c.backward(dc)
    return c.detach()


def swiglu_outputs(res: dict[str, Any], gen: torch.Generator) -> None:
    from orchestrator.passes.training.lora import kernels

    for dtype in DTYPES:
        for rows, inter in SWIGLU_CASES:
            # u2 a column slice of a wider tensor (row stride != 2 * inter), as the 2-D helpers accept
            u2 = (torch.randn(rows, 2 * inter + 5, generator=gen) * 3).to(dtype)[:, : 2 * inter]
            dc2 = torch.randn(rows, inter, generator=gen).to(dtype)
            mask = torch.rand(rows, inter, generator=gen) > 0.1
            fwd, fwd_launches = launched(kernels.swiglu_forward_2d, u2)
            bwd, bwd_launches = launched(kernels.swiglu_backward_2d, u2, dc2)
            drop, drop_launches = launched(kernels.swiglu_dropout_2d, u2, mask, SCALE)
            # the autograd Function on a 3-D activation: forward, then .backward
            u = (torch.randn(2, rows, 2 * inter, generator=gen) * 3).to(dtype).requires_grad_(True)
            dc = torch.randn(2, rows, inter, generator=gen).to(dtype)

            c, fn_launches = launched(swiglu_fwd_bwd, u, dc)
            res[f"swiglu {dtype} {rows}x{inter}"] = {
                "u2": u2.contiguous(), "dc2": dc2, "mask": mask,
                "fwd": fwd, "fwd_launches": fwd_launches,
                "bwd": bwd, "bwd_launches": bwd_launches,
                "drop": drop, "drop_launches": drop_launches,
                "u": u.detach(), "dc": dc, "c": c, "du": u.grad, "fn_launches": fn_launches,
            }  # fmt: skip


def rope_tables(n: int, rot: int, dtype: torch.dtype) -> tuple[Any, Any]:
    """transformers' rotary tables for positions 0..n-1 (cos / sin of [freqs | freqs]), in the activation dtype."""
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    emb = torch.arange(n).float()[:, None] * inv[None, :]
    emb = torch.cat([emb, emb], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def qkv_rope_fwd_bwd(qkv: Any, cos: Any, sin: Any, grads: Any, dims: tuple[int, int, int]) -> tuple[Any, ...]:
    """kernels.qkv_rope's autograd Function: q, k, v and the qkv gradient for the output gradients `grads`."""
    from orchestrator.passes.training.lora import kernels

    q, k, v = kernels.qkv_rope(qkv, cos, sin, *dims)
    (dqkv,) = torch.autograd.grad((q, k, v), qkv, grads)
    return q.detach(), k.detach(), v.detach(), dqkv


def rope_outputs(res: dict[str, Any], gen: torch.Generator) -> None:

    for dtype in DTYPES:
        for n, hq, hk, d, rot in ROPE_CASES:
            cos, sin = rope_tables(n, rot, dtype)
            # qkv a column slice of a wider tensor (row stride != its width), as a fused projection's view may be
            width = (hq + 2 * hk) * d
            qkv = torch.randn(n, width + 3, generator=gen).to(dtype)[:, :width].requires_grad_(True)
            grads = [torch.randn(n, h, d, generator=gen).to(dtype) for h in (hq, hk, hk)]

            (q, k, v, dqkv), launches = launched(qkv_rope_fwd_bwd, qkv, cos, sin, grads, (hq, hk, d))
            res[f"rope {dtype} {n} {hq}/{hk}x{d} rot {rot}"] = {
                "qkv": qkv.detach().contiguous(), "cos": cos, "sin": sin, "grads": grads,
                "q": q, "k": k, "v": v, "dqkv": dqkv, "launches": launches,
            }  # fmt: skip


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("lora_kernels_interpreted: set TRITON_INTERPRET=1 (Triton's interpreter is chosen at import)")
        return 2
    import triton

    count_launches()
    res: dict[str, Any] = {"triton": triton.__version__, "seconds": {}}
    gen = torch.Generator().manual_seed(0)
    for part in (dropout_outputs, swiglu_outputs, rope_outputs):
        start = time.perf_counter()
        part(res, gen)
        res["seconds"][part.__name__] = time.perf_counter() - start
    torch.save(res, sys.argv[1])
    print({k: round(v, 1) for k, v in res["seconds"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
