"""Kernel-level checks and timings of orch's CUDA LoRA path on the GPU, at the bench shapes (one short call).

    python bench/gpu_kernels.py --out OUT          # ~1 min on an H100 / H200: OUT/kernels.json + a table

1. Ceilings of this GPU: a large bf16 GEMM (TFLOP/s) and a device-to-device copy (GB/s, read + write).
2. Correctness on fresh random inputs (bf16, against the torch reference in fp32): orch's LoRA-dropout gradient
   kernel and SwiGLU kernel (lora_kernels.py); the fused LoRA layer with native_dropout inside
   (-philox_dropout) against peft's own layer with the same seed (same dropout masks: native_dropout is what
   nn.Dropout calls on CUDA). The Philox dropout kernels (philox_dropout.py): tl.randint4x (7 rounds) and the
   kernels' 16-bit values against the torch reference bit for bit (mismatch counts, 64-bit counters included), each
   kernel against its reference, the keep fraction, and the fused layer in Philox mode against peft's layer whose
   dropout applies the reference's masks for the same seed.
3. Timings (forward + backward, median of triton.testing.do_bench) at 8 x 1024 tokens: each LoRA projection of a
   Phi-3-mini / Phi-4-mini layer through peft, orch's fused layer with dropout outside (before) and inside
   (Philox, and native_dropout with its stored mask); the dropout kernels alone (native_dropout + the skinny GEMM
   vs dropout_lora_a, A's gradient from the saved xd vs regenerated, the input gradient reading the mask vs
   regenerating it); SwiGLU (Liger vs orch); q/k/v slicing vs split; attention (varlen flash vs SDPA flash vs
   cuDNN); the LM head + loss (TRL's chunked head vs Liger's fused linear cross-entropy); the base GEMMs alone.
4. Checkpointed layer inputs offloaded to pinned host memory (passes/training/lora/offload.py, QLoRA's
   offload_checkpoints): a stack of Phi-3-mini-sized MLP blocks with LoRA and dropout 0.1 (transformers'
   GradientCheckpointingLayer) at 8 x 1024 tokens, without checkpointing, with transformers' checkpointing and with
   the offloader installed: gradients against each other, peak memory of a step, ms per step, and the host copy
   bandwidth each way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import harness

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

T = 8 * 1024
SHAPES = {
    # name: (hidden, intermediate, q heads, kv heads, head_dim, vocab)
    "phi3-mini": (3072, 8192, 32, 32, 96, 32064),
    "phi4-mini": (3072, 8192, 24, 8, 128, 200064),
}


def bench_ms(fn: Any, reps: int = 30) -> float:
    import torch
    from triton.testing import do_bench

    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=5, rep=reps * 4, return_mode="median"))


def rel_err(a: Any, b: Any) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def ceilings(res: dict[str, Any]) -> None:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b)
    res["gemm_8192_tflops"] = 2 * 8192**3 / ms / 1e9
    x = torch.empty(2**29, device="cuda", dtype=torch.uint8).random_()  # 512 MiB
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    res["copy_gbs"] = 2 * x.numel() / ms / 1e6


def lora_layer(d_in: int, d_out: int, dropout: float, seed: int = 0) -> Any:
    """One peft LoRA Linear (r=64, alpha 16) over a frozen bf16 base, adapters in fp32 (peft's default)."""
    import peft
    import torch

    torch.manual_seed(seed)

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(d_in, d_out, bias=False, device="cuda", dtype=torch.bfloat16)

        def forward(self, x: Any) -> Any:
            return self.proj(x)

    model = peft.get_peft_model(
        One(), peft.LoraConfig(r=64, lora_alpha=16, lora_dropout=dropout, target_modules=["proj"])
    )
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)  # nonzero B: the LoRA path contributes
    layer.cast_input_dtype_enabled = False
    layer.train()
    return layer


def fwd_bwd(layer: Any, x: Any, g: Any) -> Any:
    import torch

    def run() -> None:
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x)
        out.backward(g)

    return run


def correctness(res: dict[str, Any]) -> None:
    import torch

    from orchestrator.passes.training.lora import kernels as lora_kernels
    from orchestrator.passes.training.lora.fused import fuse_lora_layers

    checks: dict[str, float] = {}
    for rows, cols, r in ((8192, 3072, 64), (1000, 8192, 64), (777, 3072, 16), (4096, 3072, 128)):
        gx = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        gh = torch.randn(rows, r, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(r, cols, device="cuda", dtype=torch.bfloat16) * 0.1
        mask = torch.rand(rows, cols, device="cuda") > 0.05
        ref = gx.float() + (gh.float() @ a.float()) * mask * (1 / 0.95)
        got = lora_kernels.lora_dropout_grad_add_(gx.clone(), gh, a, mask, 1 / 0.95)
        checks[f"dropout_grad_add {rows}x{cols} r{r}"] = rel_err(got, ref)
        # the write-once variant (LoRA-first order): the LoRA term alone, the base GEMM adds into it after
        got = lora_kernels.lora_dropout_grad(gh, a, mask, 1 / 0.95, torch.bfloat16)
        checks[f"dropout_grad write {rows}x{cols} r{r}"] = rel_err(got, ref - gx.float())
    for rows, inter in ((8192, 8192), (333, 1000)):
        u = torch.randn(rows, 2 * inter, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dc = torch.randn(rows, inter, device="cuda", dtype=torch.bfloat16)
        uf = u.detach().float().requires_grad_(True)
        ref = torch.nn.functional.silu(uf[:, :inter]) * uf[:, inter:]
        ref.backward(dc.float())
        got = lora_kernels.swiglu(u)
        got.backward(dc)
        checks[f"swiglu fwd {rows}x{inter}"] = rel_err(got, ref)
        checks[f"swiglu bwd {rows}x{inter}"] = rel_err(u.grad, uf.grad)
    # fused LoRA layer with dropout inside vs peft's layer: same seed, same masks (native_dropout, the default;
    # Philox: peft's layer with the reference's masks for the seeds the fused layer draws)
    from orchestrator.passes.training.lora import fused as lora_fused

    for philox, bits in ((False, False), (True, False), (True, True)):
        for d_in, d_out in ((3072, 9216), (8192, 3072)):
            ref_layer = lora_layer(d_in, d_out, 0.05)
            fused_layer = lora_layer(d_in, d_out, 0.05)
            fuse_lora_layers(fused_layer)
            if philox:
                ref_layer.lora_dropout["default"] = philox_reference_dropout(0.05)
            x = torch.randn(2048, d_in, device="cuda", dtype=torch.bfloat16)
            g = torch.randn(2048, d_out, device="cuda", dtype=torch.bfloat16)
            outs = []
            saved_philox, saved_bits = lora_fused.PHILOX_DROPOUT, lora_fused.BIT_MASKS
            lora_fused.PHILOX_DROPOUT, lora_fused.BIT_MASKS = philox, bits
            try:
                for layer in (ref_layer, fused_layer):
                    xi = x.clone().requires_grad_(True)
                    torch.manual_seed(11)
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        out = layer(xi)
                    out.backward(g)
                    grads = (layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad)
                    outs.append((out.float(), xi.grad.float(), *grads))
            finally:
                lora_fused.PHILOX_DROPOUT, lora_fused.BIT_MASKS = saved_philox, saved_bits
            mode = "fused dropout layer vs peft"
            if philox:
                mode = f"philox dropout layer{' (keep bits)' if bits else ''} vs peft + reference masks"
            for name, a, b in zip(("out", "grad_x", "grad_A", "grad_B"), outs[1], outs[0], strict=True):
                checks[f"{mode} {d_in}->{d_out} {name}"] = rel_err(a, b)
    philox_correctness(checks)
    # the attention's residual add inside the post-attention norm (add_norm.py: Liger's fused add + RMSNorm) vs
    # the add, then Liger's RMSNorm patched into a Phi-3 norm as apply_liger does: forward (normed, sum), backward
    try:
        from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module
        from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

        from orchestrator.passes.training.lora.add_norm import add_rms_norm, is_liger_rms_norm

        norm = Phi3RMSNorm(3072, eps=1e-5).to("cuda", torch.bfloat16)
        _patch_rms_norm_module(norm, eps=1e-5)
        checks["add_norm: Liger norm recognised"] = 0.0 if is_liger_rms_norm(norm) else float("nan")
        x = torch.randn(8192, 3072, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(8192, 3072, device="cuda", dtype=torch.bfloat16)
        dy, ds = torch.randn_like(x), torch.randn_like(x)
        results = []
        for fused in (False, True):
            xi, ri = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
            y, summed = add_rms_norm(xi, ri, norm) if fused else (norm(ri + xi), ri + xi)
            # clones: Liger's RMSNorm backward writes its input gradient over the incoming one (in_place), which
            # corrupted dy for the fused side here until run 10 (its 0.169 "grad_x" error was this, not the kernel)
            torch.autograd.backward([y, summed], [dy.clone(), ds.clone()])
            results.append((y.float(), summed.float(), xi.grad.float(), ri.grad.float()))
        for name, a, b in zip(("normed", "sum", "grad_x", "grad_residual"), results[1], results[0], strict=True):
            checks[f"add_norm fused vs add + norm {name}"] = rel_err(a, b)
        add_norm_frozen_backward(res, checks, norm, x, r, dy, ds)
    except Exception as e:  # noqa: BLE001 - a missing Liger is a result, the other checks still run
        res.setdefault("errors", {})["add_norm"] = f"{type(e).__name__}: {e}"[:300]
    # cuDNN attention over equal-length samples, grouped-query heads (Phi-4-mini) included, vs per-sample fp32
    from orchestrator.passes.training.lora import fused_loss, varlen_attention

    for hq, hkv, hd in ((32, 32, 96), (24, 8, 128)):
        n, seq = 4, 512
        q = torch.randn(n * seq, hq, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(n * seq, hkv, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(n * seq, hkv, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cu = torch.arange(0, n * seq + 1, seq, device="cuda", dtype=torch.int32)
        g = torch.randn(n * seq, hq, hd, device="cuda", dtype=torch.bfloat16)
        got = varlen_attention._uniform_sdpa(q, k, v, n, seq, hd**-0.5)
        if got is None:
            checks[f"cudnn uniform {hq}/{hkv} heads"] = float("nan")
            continue
        dq, dk, dv = torch.autograd.grad(got, (q, k, v), g)
        rep = hq // hkv
        kf, vf = (t.detach().float().repeat_interleave(rep, dim=1).requires_grad_(True) for t in (k, v))
        qf = q.detach().float().requires_grad_(True)
        ref = varlen_attention._segment_attention(qf, kf, vf, cu, hd**-0.5)
        rq, rk, rv = torch.autograd.grad(ref, (qf, kf, vf), g.float())
        rk = rk.view(rk.shape[0], hkv, rep, hd).sum(2)
        rv = rv.view(rv.shape[0], hkv, rep, hd).sum(2)
        for name, a, b in (("out", got, ref), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
            checks[f"cudnn uniform {hq}/{hkv} heads {name}"] = rel_err(a, b)
    # orch's chunked fused linear cross-entropy (no host sync) vs the fp32 torch reference: loss, accuracy, grad
    for vocab in (32064, 200064):
        h = (torch.randn(2048, 3072, device="cuda", dtype=torch.bfloat16) * 0.5).requires_grad_(True)
        wv = torch.randn(vocab, 3072, device="cuda", dtype=torch.bfloat16) * 0.02
        y = torch.randint(0, vocab, (2048,), device="cuda")
        y[::7] = -100
        loss, acc = fused_loss.chunked_flce(wv, h, y)
        (gh,) = torch.autograd.grad(loss / 1000, h)
        hf = h.detach().float().requires_grad_(True)
        l_ref, a_ref = fused_loss.reference_flce(wv.float(), hf, y)
        (g_ref,) = torch.autograd.grad(l_ref / 1000, hf)
        checks[f"chunked flce vocab {vocab} loss"] = rel_err(loss, l_ref)
        checks[f"chunked flce vocab {vocab} accuracy abs"] = abs(float(acc) - float(a_ref))
        checks[f"chunked flce vocab {vocab} grad"] = rel_err(gh, g_ref)
    # SwiGLU + LoRA down_proj with the SwiGLU output recomputed vs SwiGLU then the fused layer (same seed)
    from orchestrator.passes.training.lora.fused import swiglu_down

    for p in (0.0, 0.05):
        layers = [lora_layer(8192, 3072, p) for _ in range(2)]
        for layer in layers:
            fuse_lora_layers(layer)
        u = torch.randn(4096, 2 * 8192, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16)
        outs = []
        for i, layer in enumerate(layers):
            ui = u.clone().requires_grad_(True)
            torch.manual_seed(13)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = swiglu_down(layer, ui) if i else layer(lora_kernels.swiglu(ui))
            out.backward(g)
            grads = (layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad)
            outs.append((out.float(), ui.grad.float(), *grads))
        for name, a, b in zip(("out", "grad_u", "grad_A", "grad_B"), outs[1], outs[0], strict=True):
            checks[f"swiglu+down recompute vs separate p={p} {name}"] = rel_err(a, b)
    # q, k, v + RoPE out of the fused qkv (Triton, both ways) vs the torch reference in fp32
    for hq, hk, hd, rot in ((32, 32, 96, 96), (24, 8, 128, 96)):
        n = 4096
        qkv = torch.randn(n, (hq + 2 * hk) * hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, device="cuda").float() / rot))
        freqs = torch.arange(n, device="cuda").float()[:, None] % 1024 * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
        got = lora_kernels.qkv_rope(qkv, cos, sin, hq, hk, hd)
        grads = [torch.randn_like(t) for t in got]
        (dqkv,) = torch.autograd.grad(got, qkv, grads)
        qf = qkv.detach().float().requires_grad_(True)
        ref = lora_kernels.qkv_rope_reference(qf, cos.float(), sin.float(), hq, hk, hd)
        (rd,) = torch.autograd.grad(ref, qf, [g.float() for g in grads])
        for name, a, b in zip(("q", "k", "v"), got, ref, strict=True):
            checks[f"qkv_rope {hq}/{hk}x{hd} rot {rot} {name}"] = rel_err(a, b)
        checks[f"qkv_rope {hq}/{hk}x{hd} rot {rot} dqkv"] = rel_err(dqkv, rd)
    u = torch.randn(4096, 2 * 8192, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(4096, 8192, device="cuda") > 0.05
    ref = lora_kernels.swiglu_reference(u.float()) * mask / 0.95
    checks["swiglu_dropout_2d"] = rel_err(lora_kernels.swiglu_dropout_2d(u, mask, 1 / 0.95), ref)
    res["correctness_rel_err"] = checks


def philox_reference_dropout(p: float) -> Any:
    """An nn.Module for peft's lora_dropout slot: the fused layers' Philox seed draw, keep_mask_reference's mask."""
    import torch

    from orchestrator.passes.training.lora import philox_dropout as pd

    class ReferenceDropout(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            x2 = x.reshape(-1, x.shape[-1])
            return pd.dropout_reference(x2, p, pd.draw_seed()).view(x.shape)

    return ReferenceDropout()


def philox_correctness(checks: dict[str, float]) -> None:
    """The Philox dropout kernels on the GPU against philox_dropout.py's torch references."""
    import torch

    from orchestrator.passes.training.lora import philox_dropout as pd

    seed = 0x1234_5678_9ABC_DEF
    offsets = torch.tensor([0, 1, 2**31 - 1, 2**31 + 5, 2**32 + 7, 2**40 + 3, 2**62 + 11], device="cuda")
    offsets = torch.cat([offsets, torch.randint(0, 2**62, (4096,), device="cuda")])
    got4, want4 = pd.kernel_randint4x(seed, offsets), pd.randint4x_reference(seed, offsets)
    checks[f"philox tl.randint4x({pd.PHILOX_ROUNDS} rounds) vs reference (mismatches)"] = float(
        sum(int((g != w).sum()) for g, w in zip(got4, want4, strict=True))
    )
    for row_start in (0, 2**40 // 48):
        got = pd.kernel_halves(seed, 64, 3000, "cuda", row_start=row_start)
        want = pd.halves_block_reference(seed, 64, 3000, "cuda", row_start=row_start)
        checks[f"philox kernel 16-bit values vs reference, rows from {row_start} (mismatches)"] = float(
            (got != want).sum()
        )
    keep = pd.keep_mask_reference(seed, 8192, 3072, 0.05, "cuda")
    want_keep = 1 - pd.drop_threshold(0.05) / 65536
    checks["philox keep fraction - (1 - THRESH / 65536) (abs)"] = abs(float(keep.float().mean()) - want_keep)
    for rows, cols, r in ((8192, 3072, 64), (1000, 8192, 64), (777, 3000, 16), (4096, 8192, 128)):
        x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(r, cols, device="cuda", dtype=torch.bfloat16) * 0.1
        gh = torch.randn(rows, r, device="cuda", dtype=torch.bfloat16)
        gx = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        name = f"{rows}x{cols} r{r}"
        checks[f"philox dropout_lora_a {name}"] = rel_err(
            pd.dropout_lora_a(x, a, 0.05, seed), pd.dropout_lora_a_reference(x, a, 0.05, seed)
        )
        checks[f"philox dropout_lora_a_wgrad {name}"] = rel_err(
            pd.dropout_lora_a_wgrad(x, gh, 0.05, seed), pd.dropout_lora_a_wgrad_reference(x, gh, 0.05, seed)
        )
        checks[f"philox dropout_grad write {name}"] = rel_err(
            pd.dropout_grad(gh, a, 0.05, seed, torch.bfloat16),
            pd.dropout_grad_reference(gh, a, 0.05, seed, torch.bfloat16),
        )
        checks[f"philox dropout_grad add {name}"] = rel_err(
            pd.dropout_grad_add_(gx.clone(), gh, a, 0.05, seed),
            pd.dropout_grad_reference(gh, a, 0.05, seed, torch.bfloat16, grad_x=gx),
        )
        # keep bits: written by the forward kernel, read by the backward ones (given a wrong seed: they must read)
        bits = pd.new_bits(rows, cols, "cuda").fill_(0x5A)
        pd.dropout_lora_a(x, a, 0.05, seed, bits=bits)
        want_bits = pd.pack_keep_bits(pd.keep_mask_reference(seed, rows, cols, 0.05, "cuda"))
        checks[f"bits written vs reference {name} (mismatching bytes)"] = float((bits != want_bits).sum())
        checks[f"bits dropout_lora_a_wgrad {name}"] = rel_err(
            pd.dropout_lora_a_wgrad(x, gh, 0.05, seed + 1, bits=bits),
            pd.dropout_lora_a_wgrad_reference(x, gh, 0.05, seed),
        )
        checks[f"bits dropout_grad add {name}"] = rel_err(
            pd.dropout_grad_add_(gx.clone(), gh, a, 0.05, seed + 1, bits=bits),
            pd.dropout_grad_reference(gh, a, 0.05, seed, torch.bfloat16, grad_x=gx),
        )
    fp32_ieee_checks(checks)


def fp32_ieee_checks(checks: dict[str, float]) -> None:
    """fp32 inputs: the tl.dot kernels run in IEEE fp32 (~1e-6 from float64), not TF32 (~1e-3)."""
    import torch

    from orchestrator.passes.training.lora import kernels as lora_kernels
    from orchestrator.passes.training.lora import philox_dropout as pd

    seed, rows, cols, r = 77, 2048, 3072, 64
    gx = torch.randn(rows, cols, device="cuda")
    gh = torch.randn(rows, r, device="cuda")
    a = torch.randn(r, cols, device="cuda") * 0.1
    mask = torch.rand(rows, cols, device="cuda") > 0.05
    ref = gx.double() + (gh.double() @ a.double()) * mask * (1 / 0.95)
    checks["fp32 dropout_grad_add vs float64"] = rel_err(
        lora_kernels.lora_dropout_grad_add_(gx.clone(), gh, a, mask, 1 / 0.95), ref
    )
    keep = pd.keep_mask_reference(seed, rows, cols, 0.05, "cuda")
    checks["fp32 philox dropout_grad add vs float64"] = rel_err(
        pd.dropout_grad_add_(gx.clone(), gh, a, 0.05, seed), gx.double() + (gh.double() @ a.double()) * keep / 0.95
    )


def splits(res: dict[str, Any]) -> None:
    """The skinny LoRA GEMMs at 8 x 1024 tokens: the plain GEMM vs each split (ms), and the split lora_kernels picks."""
    import torch

    from orchestrator.passes.training.lora import kernels as lora_kernels

    out: dict[str, Any] = {}
    for width in (3072, 8192, 9216, 16384):
        x = torch.randn(T, width, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(T, 64, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(64, width, device="cuda", dtype=torch.bfloat16)
        for s in lora_kernels.SPLITS:
            out[f"wgrad {width}x64 s={s}"] = bench_ms(lambda s=s, x=x, r=r: lora_kernels._wgrad_split(x, r, s))
            out[f"tall {width}->64 s={s}"] = bench_ms(lambda s=s, x=x, a=a: lora_kernels._tall_split(x, a, s))
        lora_kernels.lora_wgrad(x, r)
        lora_kernels.lora_tall(x, a)
    out["picked"] = {" ".join(map(str, k[:4])): v for k, v in lora_kernels._SPLIT_CACHE.items()}
    res["splits_ms"] = out


def fold(res: dict[str, Any], device: str = "cuda", tokens: int = T, dtype: Any = None) -> None:
    """Where the LoRA term could ride inside the base GEMM instead of beside it (the MFU candidates, forward, r=64,
    8 x 1024 tokens, each Phi-3-mini projection): today's LoRA-first order (the skinny GEMM writes s h B^T over
    the whole output, the base GEMM reads it back in its epilogue) against the base GEMM alone (the floor), the
    weight merged per step (x (W + s B A)^T: one GEMM, exact only at dropout 0), and one K-concatenated GEMM
    [x | h] [W | s B]^T with and without building [x | h] (without: what producers writing into a wider buffer
    would give). Also the backward's input gradient at dropout 0 the same ways. Timings only; correctness of each
    form is checked against the LoRA-first result (max abs diff, bf16). `device`, `tokens`, `dtype`: the CPU test
    runs the arithmetic small (its timings then record their error)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    dtype = dtype or torch.bfloat16

    t = _Timings(res)
    checks: dict[str, float] = {}
    s_ = 2.0
    for name, (d_in, d_out) in {"qkv": (3072, 9216), "o": (3072, 3072), "gate_up": (3072, 16384),
                                "down": (8192, 3072)}.items():  # fmt: skip
        x = torch.randn(tokens, d_in, device=device, dtype=dtype)
        w = torch.randn(d_out, d_in, device=device, dtype=dtype) * 0.02
        a = torch.randn(64, d_in, device=device, dtype=dtype) * 0.02
        b = torch.randn(d_out, 64, device=device, dtype=dtype) * 0.02
        g = torch.randn(tokens, d_out, device=device, dtype=dtype)
        h = x @ a.t()
        gh = (g @ b) * s_
        wcat = torch.cat([w, b * s_], dim=1)  # (out, in + r)
        xh = torch.cat([x, h], dim=1)
        wa = torch.cat([w, a], dim=0)  # (out + r, in): the backward's [g | gh] @ [W ; A] = g W + gh A
        ggh = torch.cat([g, gh], dim=1)

        def lora_first(x: Any = x, h: Any = h, w: Any = w, b: Any = b) -> Any:
            out = h.new_empty((h.shape[0], b.shape[0])).addmm_(h, b.t(), beta=0, alpha=s_)
            return out.addmm_(x, w.t())

        ref = lora_first()
        t[f"fold {name} {d_in}->{d_out}: base GEMM alone (floor)"] = lambda x=x, w=w: F.linear(x, w)
        t[f"fold {name} {d_in}->{d_out}: LoRA-first (today)"] = lora_first
        t[f"fold {name} {d_in}->{d_out}: merged weight W + s B A (dropout 0)"] = lambda x=x, w=w, a=a, b=b: F.linear(
            x, torch.addmm(w, b, a, alpha=s_)
        )
        t[f"fold {name} {d_in}->{d_out}: [x | h] [W | sB]^T incl. the cat"] = lambda x=x, h=h, wc=wcat: F.linear(
            torch.cat([x, h], dim=1), wc
        )
        t[f"fold {name} {d_in}->{d_out}: [x | h] [W | sB]^T, buffer given"] = lambda xh=xh, wc=wcat: F.linear(xh, wc)
        checks[f"fold {name} merged weight vs LoRA-first (max abs)"] = float(
            (F.linear(x, torch.addmm(w, b, a, alpha=s_)).float() - ref.float()).abs().max()
        )
        checks[f"fold {name} K-concatenated vs LoRA-first (max abs)"] = float(
            (F.linear(xh, wcat).float() - ref.float()).abs().max()
        )
        # backward input gradient at dropout 0: gh @ A written first, g @ W accumulated (today), or one GEMM
        t[f"fold {name} bwd: LoRA-first (today)"] = lambda g=g, w=w, gh=gh, a=a: torch.mm(gh, a).addmm_(g, w)
        t[f"fold {name} bwd: [g | s gB] [W ; A], buffer given"] = lambda ggh=ggh, wa=wa: ggh @ wa
        checks[f"fold {name} bwd K-concatenated vs LoRA-first (max abs)"] = float(
            ((ggh @ wa).float() - torch.mm(gh, a).addmm_(g, w).float()).abs().max()
        )
        del x, w, a, b, g, h, gh, wcat, xh, wa, ggh, ref
    res.setdefault("correctness_rel_err", {}).update(checks)
    res.setdefault("timings_ms", {}).update(t)


OFFLOAD_LAYERS = 16


def offload_stack(dropout: float, seed: int = 0) -> Any:
    """OFFLOAD_LAYERS transformers GradientCheckpointingLayers, each a Phi-3-mini-sized MLP (frozen bf16 gate_up
    3072 -> 16384 and down 8192 -> 3072) with an r=64 fp32 LoRA on both projections, dropout on the LoRA inputs."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    torch.manual_seed(seed)
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}

    class Block(GradientCheckpointingLayer):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up = torch.nn.Linear(3072, 2 * 8192, bias=False, **bf16).requires_grad_(False)
            self.down = torch.nn.Linear(8192, 3072, bias=False, **bf16).requires_grad_(False)
            self.a1 = torch.nn.Parameter(torch.randn(64, 3072, device="cuda") * 0.02)
            self.b1 = torch.nn.Parameter(torch.randn(2 * 8192, 64, device="cuda") * 0.02)
            self.a2 = torch.nn.Parameter(torch.randn(64, 8192, device="cuda") * 0.02)
            self.b2 = torch.nn.Parameter(torch.randn(3072, 64, device="cuda") * 0.02)
            self.drop = torch.nn.Dropout(dropout)

        def forward(self, h: Any) -> Any:
            u = self.gate_up(h) + self.drop(h) @ self.a1.t() @ self.b1.t() * 0.25
            gate, up = u.chunk(2, dim=-1)
            m = torch.nn.functional.silu(gate) * up
            return h + self.down(m) + self.drop(m) @ self.a2.t() @ self.b2.t() * 0.25

    return torch.nn.ModuleList(Block() for _ in range(OFFLOAD_LAYERS))


def offload(res: dict[str, Any]) -> None:
    """Checkpointed layer inputs in pinned host memory vs on the GPU: gradients, peak memory, ms per step."""
    import functools

    import torch
    from torch.utils.checkpoint import checkpoint

    from orchestrator.passes.training.lora.offload import CheckpointOffloader

    out: dict[str, Any] = {}
    x = torch.randn(T, 3072, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(T, 3072, device="cuda", dtype=torch.bfloat16)
    offloader = CheckpointOffloader()

    def stack_for(mode: str) -> Any:
        stack = offload_stack(0.1)
        for block in stack:
            block.gradient_checkpointing = mode != "none"
            block._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
        if mode == "offload":
            assert offloader.install(stack) == OFFLOAD_LAYERS
        return stack

    def step(stack: Any, seed: int | None = 5) -> Any:
        if seed is not None:
            torch.manual_seed(seed)  # the dropout masks
        h = x.clone().requires_grad_(True)  # as enable_input_require_grads makes the embeddings' output
        out_h = h
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for block in stack:
                out_h = block(out_h)
        out_h.backward(g)
        return h

    grads: dict[str, list[Any]] = {}
    for mode in ("none", "checkpoint", "offload"):
        stack = stack_for(mode)
        h = step(stack)
        if mode == "offload":
            out["offloaded_tensors_per_step"] = offloader.offloaded  # one per layer but the last
            out["offloaded_mib_per_step"] = offloader.offloaded_bytes / 2**20
        grads[mode] = [h.grad.float()] + [p.grad.float() for p in stack.parameters() if p.requires_grad]
        for p in stack.parameters():
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(stack)
        torch.cuda.synchronize()
        out[f"peak_gib {mode}"] = (torch.cuda.max_memory_allocated() - before) / 2**30
        out[f"ms_per_step {mode}"] = bench_ms(lambda stack=stack: step(stack, None))
        del stack
        torch.cuda.empty_cache()
    checks = res.setdefault("correctness_rel_err", {})
    names = ["grad_x"] + [f"grad_{i}" for i in range(len(grads["none"]) - 1)]
    for ref in ("checkpoint", "none"):
        worst = max(rel_err(a, b) for a, b in zip(grads["offload"], grads[ref], strict=True))
        checks[f"offload checkpoint vs {ref} (dropout 0.1, {len(names)} grads, worst)"] = worst
    out["offloader_pending_after_backward"] = offloader.pending()
    out["offload_saved_gib"] = out["peak_gib checkpoint"] - out["peak_gib offload"]
    out["offload_cost_pct"] = 100 * (out["ms_per_step offload"] / out["ms_per_step checkpoint"] - 1)
    host = torch.empty(T, 3072, dtype=torch.bfloat16, pin_memory=True)
    out["d2h_gbs"] = x.numel() * 2 / bench_ms(lambda: host.copy_(x, non_blocking=True)) / 1e6
    out["h2d_gbs"] = x.numel() * 2 / bench_ms(lambda: x.copy_(host, non_blocking=True)) / 1e6
    res["offload"] = out


def add_norm_frozen_backward(
    res: dict[str, Any], checks: dict[str, float], norm: Any, x: Any, r: Any, dy: Any, ds: Any
) -> None:
    """add_norm's backward for a frozen norm weight (Liger's kernel, one row per program) against Liger's own
    backward (one program per SM): the same gradients bit for bit (max abs difference, 0 expected), and both
    backwards' times."""
    import torch
    from liger_kernel.ops import LigerFusedAddRMSNormFunction

    from orchestrator.passes.training.lora.add_norm import fused_add_rms_norm_function

    weight = norm.weight.detach().requires_grad_(False)
    t = _Timings(res)
    grads = []
    for name, fn in (("Liger's", LigerFusedAddRMSNormFunction), ("orch frozen-weight", fused_add_rms_norm_function())):
        xi, ri = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
        y, summed = fn.apply(xi, ri, weight, norm.variance_epsilon, norm.offset, norm.casting_mode, False)
        grads.append(torch.autograd.grad([y, summed], [xi, ri], [dy, ds], retain_graph=True))
        t[f"add_norm backward {tuple(x.shape)}: {name}"] = lambda y=y, s=summed, xi=xi, ri=ri: torch.autograd.grad(
            [y, s], [xi, ri], [dy, ds], retain_graph=True
        )
    for i, name in enumerate(("grad_x", "grad_residual")):
        checks[f"add_norm frozen-weight backward vs Liger's {name} (max abs)"] = float(
            (grads[1][i].float() - grads[0][i].float()).abs().max()
        )
    # the normed rows written with 64 free columns after each (for a widened LoRA layer's h): same values, strides
    xi, ri = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
    y_ref, s_ref = LigerFusedAddRMSNormFunction.apply(
        x, r, weight, norm.variance_epsilon, norm.offset, norm.casting_mode, False
    )
    y, summed = fused_add_rms_norm_function().apply(
        xi, ri, weight, norm.variance_epsilon, norm.offset, norm.casting_mode, False, 64
    )
    wide_ok = y.stride(-2) == x.shape[-1] + 64
    checks["add_norm with 64 free columns: normed vs Liger's (max abs; nan: not wide)"] = (
        float((y.float() - y_ref.float()).abs().max()) if wide_ok else float("nan")
    )
    sum_diff = (summed.float() - s_ref.float()).abs().max()
    checks["add_norm with 64 free columns: sum vs Liger's (max abs)"] = float(sum_diff)
    g_wide = torch.autograd.grad([y, summed], [xi, ri], [dy, ds])
    checks["add_norm with 64 free columns: grad_x vs Liger's (max abs)"] = float(
        (g_wide[0].float() - grads[0][0].float()).abs().max()
    )
    # the incoming gradient with a row stride of its own (wide_backward hands over [g W + gh A | gh]'s first
    # columns): the frozen-weight backward reads the rows where they are, the same gradients
    xi, ri = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
    y, summed = fused_add_rms_norm_function().apply(
        xi, ri, weight, norm.variance_epsilon, norm.offset, norm.casting_mode, False
    )
    dy_strided = torch.empty((*dy.shape[:-1], dy.shape[-1] + 64), dtype=dy.dtype, device=dy.device)[..., : dy.shape[-1]]
    dy_strided.copy_(dy)
    g_strided = torch.autograd.grad([y, summed], [xi, ri], [dy_strided, ds.clone()])
    for i, name in enumerate(("grad_x", "grad_residual")):
        checks[f"add_norm frozen-weight backward, strided incoming rows, {name} vs Liger's (max abs)"] = float(
            (g_strided[i].float() - grads[0][i].float()).abs().max()
        )
    res.setdefault("timings_ms", {}).update(t)


class _Timings(dict):
    """name -> ms; a measurement that fails records its error instead of stopping the others."""

    def __init__(self, res: dict[str, Any]) -> None:
        super().__init__()
        self.res = res

    def __setitem__(self, name: str, fn: Any) -> None:
        if not callable(fn):
            super().__setitem__(name, fn)
            return
        try:
            super().__setitem__(name, bench_ms(fn))
        except Exception as e:  # noqa: BLE001 - one failing variant is a result, the rest still run
            self.res.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:300]


def timings(res: dict[str, Any]) -> None:
    import torch
    import torch.nn.functional as F

    from orchestrator.passes.training.lora import fused as lora_fused
    from orchestrator.passes.training.lora import fused_loss, varlen_attention
    from orchestrator.passes.training.lora import kernels as lora_kernels

    t = _Timings(res)
    res["timings_ms"] = t
    hidden, inter = 3072, 8192
    for name, (d_in, d_out) in {
        "qkv phi3": (hidden, 3 * hidden),
        "qkv phi4": (hidden, hidden + 2 * 1024),
        "o": (hidden, hidden),
        "gate_up": (hidden, 2 * inter),
        "down": (inter, hidden),
    }.items():
        x = torch.randn(T, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(T, d_out, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16)
        t[f"{name}: base GEMM fwd+dgrad"] = lambda x=x, w=w, g=g: (F.linear(x.detach(), w), g @ w)
        peft_layer = lora_layer(d_in, d_out, 0.05)
        t[f"{name}: peft LoRA p=0.05"] = fwd_bwd(peft_layer, x, g)
        fused = lora_layer(d_in, d_out, 0.05)
        lora_fused.fuse_lora_layers(fused)
        saved_philox, saved_bits = lora_fused.PHILOX_DROPOUT, lora_fused.BIT_MASKS
        lora_fused.PHILOX_DROPOUT, lora_fused.BIT_MASKS = False, False  # -philox_dropout: native_dropout's mask
        try:
            t[f"{name}: orch fused, dropout inside (native_dropout, -philox_dropout)"] = fwd_bwd(fused, x, g)
            lora_fused.PHILOX_DROPOUT = True  # ORCH_CUDA_FASTPATH=+philox_dropout: the mask regenerated
            t[f"{name}: orch fused, dropout inside (Philox regenerated, +philox_dropout)"] = fwd_bwd(fused, x, g)
            lora_fused.BIT_MASKS = True  # the default: Philox's mask kept as bits
            t[f"{name}: orch fused, dropout inside (Philox, keep bits)"] = fwd_bwd(fused, x, g)
        finally:
            lora_fused.PHILOX_DROPOUT, lora_fused.BIT_MASKS = saved_philox, saved_bits
        saved = lora_kernels.triton_available
        lora_kernels.triton_available = lambda: False  # type: ignore[assignment]  # the path before this change
        try:
            t[f"{name}: orch fused, dropout outside (before)"] = fwd_bwd(fused, x, g)
        finally:
            lora_kernels.triton_available = saved  # type: ignore[assignment]
        nodrop = lora_layer(d_in, d_out, 0.0)
        lora_fused.fuse_lora_layers(nodrop)
        t[f"{name}: orch fused, p=0"] = fwd_bwd(nodrop, x, g)
        saved_order = lora_fused.LORA_FIRST
        lora_fused.LORA_FIRST = not saved_order  # the other GEMM order (fused.LORA_FIRST): base GEMM first
        try:
            t[f"{name}: orch fused, dropout inside, base GEMM first"] = fwd_bwd(fused, x, g)
            t[f"{name}: orch fused, p=0, base GEMM first"] = fwd_bwd(nodrop, x, g)
        finally:
            lora_fused.LORA_FIRST = saved_order
        del x, g, w, peft_layer, fused, nodrop

    philox_timings(t)

    # SwiGLU
    u = torch.randn(T, 2 * inter, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dc = torch.randn(T, inter, device="cuda", dtype=torch.bfloat16)
    t["swiglu: orch"] = lambda: lora_kernels.swiglu(u).backward(dc)
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        def liger() -> None:
            gate, up = u.chunk(2, dim=-1)
            LigerSiLUMulFunction.apply(gate, up).backward(dc)

        t["swiglu: liger"] = liger
    except ImportError:
        pass

    # q/k/v slicing vs split (backward of the three views into the qkv gradient)
    qkv = torch.randn(T, 3 * hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gq = torch.randn(T, hidden, device="cuda", dtype=torch.bfloat16)

    def sliced() -> None:
        q, k, v = qkv[..., :hidden], qkv[..., hidden : 2 * hidden], qkv[..., 2 * hidden :]
        torch.autograd.backward([q, k, v], [gq, gq, gq])

    def split() -> None:
        q, k, v = qkv.split([hidden, hidden, hidden], dim=-1)
        torch.autograd.backward([q, k, v], [gq, gq, gq])

    t["qkv grad: slices"] = sliced
    t["qkv grad: split"] = split

    # attention: 8 samples of 1024, causal
    for shape, (_, _, hq, hkv, hd, vocab) in SHAPES.items():
        q = torch.randn(T, hq, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(T, hkv, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(T, hkv, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        go = torch.randn(T, hq, hd, device="cuda", dtype=torch.bfloat16)
        cu = torch.arange(0, T + 1, 1024, device="cuda", dtype=torch.int32)
        t[f"attn {shape}: varlen flash"] = lambda q=q, k=k, v=v, cu=cu, go=go, hd=hd: varlen_attention._varlen_call(
            q, k, v, cu, 1024, hd**-0.5
        ).backward(go)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):

            def sdpa(q=q, k=k, v=v, go=go, hq=hq, hkv=hkv, backend=backend) -> None:
                qb = q.view(8, 1024, hq, -1).transpose(1, 2)
                kb = k.view(8, 1024, hkv, -1).transpose(1, 2)
                vb = v.view(8, 1024, hkv, -1).transpose(1, 2)
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=hq != hkv)
                out.transpose(1, 2).reshape(T, hq, -1).backward(go)

            t[f"attn {shape}: sdpa {backend.name}"] = sdpa
        if hq == hkv:
            try:
                ref = varlen_attention._segment_attention(q.float(), k.float(), v.float(), cu, hd**-0.5)
                got = varlen_attention._uniform_sdpa(q, k, v, 8, 1024, hd**-0.5)
                if got is not None:
                    res.setdefault("correctness_rel_err", {})[f"cudnn uniform attention {shape}"] = rel_err(got, ref)
            except Exception as e:  # noqa: BLE001
                res.setdefault("errors", {})[f"cudnn uniform {shape}"] = f"{type(e).__name__}: {e}"[:300]
        # LM head + loss
        h = torch.randn(T, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        wv = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
        y = torch.randint(0, vocab, (T,), device="cuda")
        try:
            from trl.kernels import ChunkedLogProbFunction

            def trl_head(h=h, wv=wv, y=y) -> None:
                lp, _, _, _, _ = ChunkedLogProbFunction.apply(
                    h, wv, None, y, 1.0, 32768, None, 1.0, ("log_probs", "entropy", "is_top1")
                )
                (-lp.sum() / T).backward()

            t[f"lm head+loss {shape}: TRL chunked"] = trl_head
        except ImportError:
            pass
        try:
            ce = fused_loss._liger_flce

            def liger_head(h=h, wv=wv, y=y, ce=ce) -> None:
                loss, _ = ce(wv, h, y)
                (loss / T).backward()

            t[f"lm head+loss {shape}: Liger FLCE"] = liger_head
            l_ref, _ = fused_loss.reference_flce(wv[:4096], h[:512].detach(), y[:512] % 4096)
            l_got, _ = ce(wv[:4096], h[:512].detach(), y[:512] % 4096)
            res.setdefault("correctness_rel_err", {})[f"liger flce vs torch {shape}"] = rel_err(l_got, l_ref)
        except Exception as e:  # noqa: BLE001
            res.setdefault("errors", {})[f"liger flce {shape}"] = f"{type(e).__name__}: {e}"[:300]
        del q, k, v, go, h, wv
        torch.cuda.empty_cache()


def philox_timings(t: Any) -> None:
    """The dropout kernels alone at 8 x 1024 tokens, r=64, p=0.05: stored masks (native_dropout) vs regenerated."""
    import torch

    from orchestrator.passes.training.lora import kernels as lora_kernels
    from orchestrator.passes.training.lora import philox_dropout as pd

    seed, p = 0x1234_5678_9ABC_DEF, 0.05
    for width in (3072, 8192):
        x = torch.randn(T, width, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(64, width, device="cuda", dtype=torch.bfloat16) * 0.1
        gh = torch.randn(T, 64, device="cuda", dtype=torch.bfloat16)
        gx = torch.randn(T, width, device="cuda", dtype=torch.bfloat16)
        xd, mask = torch.native_dropout(x, p, True)
        pre = f"dropout {T}x{width} r64"
        t[f"{pre}: fwd native_dropout + lora_tall"] = lambda x=x, a=a: lora_kernels.lora_tall(
            torch.native_dropout(x, p, True)[0], a
        )
        t[f"{pre}: fwd dropout_lora_a (Philox)"] = lambda x=x, a=a: pd.dropout_lora_a(x, a, p, seed)
        t[f"{pre}: A grad lora_wgrad(gh, saved xd)"] = lambda gh=gh, xd=xd: lora_kernels.lora_wgrad(gh, xd)
        t[f"{pre}: A grad dropout_lora_a_wgrad (Philox)"] = lambda x=x, gh=gh: pd.dropout_lora_a_wgrad(x, gh, p, seed)
        t[f"{pre}: input grad write, mask read"] = lambda gh=gh, a=a, mask=mask: lora_kernels.lora_dropout_grad(
            gh, a, mask, 1 / (1 - p), torch.bfloat16
        )
        t[f"{pre}: input grad write (Philox)"] = lambda gh=gh, a=a: pd.dropout_grad(gh, a, p, seed, torch.bfloat16)
        t[f"{pre}: input grad add, mask read"] = lambda gx=gx, gh=gh, a=a, mask=mask: (
            lora_kernels.lora_dropout_grad_add_(gx, gh, a, mask, 1 / (1 - p))
        )
        t[f"{pre}: input grad add (Philox)"] = lambda gx=gx, gh=gh, a=a: pd.dropout_grad_add_(gx, gh, a, p, seed)
        bits = pd.new_bits(T, width, "cuda")
        t[f"{pre}: fwd dropout_lora_a writing bits"] = lambda x=x, a=a, b=bits: pd.dropout_lora_a(x, a, p, seed, bits=b)
        t[f"{pre}: A grad dropout_lora_a_wgrad, bits read"] = lambda x=x, gh=gh, b=bits: pd.dropout_lora_a_wgrad(
            x, gh, p, seed, bits=b
        )
        t[f"{pre}: input grad write, bits read"] = lambda gh=gh, a=a, b=bits: pd.dropout_grad(
            gh, a, p, seed, torch.bfloat16, bits=b
        )
        t[f"{pre}: input grad add, bits read"] = lambda gx=gx, gh=gh, a=a, b=bits: pd.dropout_grad_add_(
            gx, gh, a, p, seed, bits=b
        )
        del x, a, gh, gx, xd, mask, bits


def philox(res: dict[str, Any]) -> None:
    """The Philox dropout kernels alone (their part of `correctness` and of `timings`): a short GPU call's check."""
    checks: dict[str, float] = {}
    philox_correctness(checks)
    res.setdefault("correctness_rel_err", {}).update(checks)
    t = _Timings(res)
    philox_timings(t)
    res.setdefault("timings_ms", {}).update(t)


def tune_candidates() -> dict[str, list[Any]]:
    """The launch shapes the `tune` step times per kernel (philox_dropout.Launch: rows per program, programs per
    SM, warps, pipeline stages)."""
    from orchestrator.passes.training.lora.philox_dropout import Launch

    # one pipeline depth: each (block, warps, stages) is a Triton compile (~2 s), the programs per SM are not
    return {
        "lora_a": [Launch(b, s, w, 3) for b in (16, 32, 64) for s in (1, 2, 4, 8) for w in (4, 8)],
        "wgrad": [Launch(b, s, w, 3) for b in (32, 64, 128) for s in (2, 4, 8) for w in (4, 8)],
        "grad": [Launch(b, 0, w, 1) for b in (32, 64, 128) for w in (4, 8)],
    }


def tune(res: dict[str, Any], device: str = "cuda", tokens: int = T, widths: tuple[int, ...] = (3072, 8192),
         candidates: dict[str, list[Any]] | None = None) -> None:  # fmt: skip
    """The Philox dropout kernels' launch shapes (philox_dropout.LAUNCH) swept at r=64, 8 x 1024 tokens, Phi-3-mini's
    LoRA input widths: the forward writing keep bits, A's gradient and the input gradient reading them, and each at
    p = 0 (the kernels as plain skinny GEMMs), beside what they replace (native_dropout + cuBLAS, cuBLAS alone) and
    the memory floor (the bytes each must move at the copy rate `ceilings` measures). Per kernel the pick is the
    shape with the least total time over widths and modes. The CPU test runs it tiny (its timings record errors)."""
    from orchestrator.passes.training.lora import philox_dropout as pd

    candidates = candidates or tune_candidates()
    out: dict[str, Any] = {"candidates": {k: [str(c) for c in v] for k, v in candidates.items()}, "runs": {}}
    saved = dict(pd.LAUNCH)
    try:
        for width in widths:
            _tune_width(out, res.get("copy_gbs"), device, tokens, width, candidates)
    finally:
        pd.LAUNCH.update(saved)
    picks: dict[str, Any] = {}
    for kernel, cfgs in candidates.items():
        rows = [r for n, r in out["runs"].items() if n.startswith(kernel + " ")]
        totals = {str(c): sum(r.get(str(c)) or float("inf") for r in rows) for c in cfgs}
        best = min(totals, key=lambda c: totals[c])
        if totals[best] == float("inf"):  # every shape failed in some mode (its errors are under tune's errors)
            picks[kernel] = {"launch": None, "fields": None, "error": "no launch shape ran in every mode"}
            continue
        fields = next(dataclasses.asdict(c) for c in cfgs if str(c) == best)
        picks[kernel] = {
            "launch": best,
            "fields": fields,
            "total_ms": totals[best],
            "default_total_ms": sum(r.get("default_ms") or float("inf") for r in rows),
            "baseline_total_ms": sum(r.get("baseline_ms") or float("inf") for r in rows),
        }
    out["picks"] = picks
    res["tune"] = out
    if device == "cuda":  # the picked shapes compute what the references compute (the rows then run them)
        pd.LAUNCH.update({k: pd.Launch(**v["fields"]) for k, v in picks.items() if v["fields"]})
        try:
            res.setdefault("correctness_rel_err", {}).update(picks_correctness())
        finally:
            pd.LAUNCH.update(saved)
    nan = float("nan")
    for name, row in out["runs"].items():
        pick = picks[name.split()[0]]["launch"] or "none"
        us = {k: 1e3 * (row.get(k) or nan) for k in (pick, "default_ms", "baseline_ms")}
        pick_us, default_us, baseline_us = us.values()
        floor_us = 1e3 * (row.get("floor_ms") or nan)
        print(f"tune {name:28s} pick {pick_us:8.1f} us  default {default_us:8.1f}  baseline {baseline_us:8.1f}  "
              f"floor {floor_us:7.1f}")  # fmt: skip
    for kernel, pick in picks.items():
        print(f"tune pick {kernel}: {pick}")


def _tune_width(
    out: dict[str, Any], copy_gbs: float | None, device: str, tokens: int, width: int, candidates: dict[str, Any]
) -> None:
    """One input width of `tune`: every kernel mode at every candidate launch shape, its baseline and floor."""
    import torch

    from orchestrator.passes.training.lora import kernels as lora_kernels
    from orchestrator.passes.training.lora import philox_dropout as pd

    seed, p, rank = 0x1234_5678_9ABC_DEF, 0.05, 64
    timer = bench_ms if device == "cuda" else _cpu_ms
    x = torch.randn(tokens, width, device=device, dtype=torch.bfloat16)
    a = torch.randn(rank, width, device=device, dtype=torch.bfloat16) * 0.1
    gh = torch.randn(tokens, rank, device=device, dtype=torch.bfloat16)
    bits = pd.new_bits(tokens, width, device)
    pd.dropout_lora_a(x, a, p, seed, bits=bits)
    xd, mask = torch.native_dropout(x, p, True)
    runs = {
        "lora_a bits": lambda: pd.dropout_lora_a(x, a, p, seed, bits=bits),
        "lora_a p0": lambda: pd.dropout_lora_a(x, a, 0.0, seed),
        "wgrad bits": lambda: pd.dropout_lora_a_wgrad(x, gh, p, seed, bits=bits),
        "wgrad p0": lambda: pd.dropout_lora_a_wgrad(x, gh, 0.0, seed),
        "grad bits": lambda: pd.dropout_grad(gh, a, p, seed, torch.bfloat16, bits=bits),
        "grad p0": lambda: pd.dropout_grad(gh, a, 0.0, seed, torch.bfloat16),
    }
    baselines = {
        "lora_a bits": lambda: lora_kernels.lora_tall(torch.native_dropout(x, p, True)[0], a),
        "lora_a p0": lambda: lora_kernels.lora_tall(x, a),
        "wgrad bits": lambda: lora_kernels.lora_wgrad(gh, xd),
        "wgrad p0": lambda: lora_kernels.lora_wgrad(gh, x),
        "grad bits": lambda: lora_kernels.lora_dropout_grad(gh, a, mask, 1 / (1 - p), torch.bfloat16),
        "grad p0": lambda: torch.mm(gh, a),
    }
    for name, fn in runs.items():
        kernel = name.split()[0]
        row: dict[str, Any] = {"baseline_ms": _timed(timer, baselines[name], out, f"{name} {width} baseline")}
        if copy_gbs:  # each moves ~2 bytes per element of x (read, or the gradient written) plus 1/8 of keep bits
            row["floor_ms"] = 2.125 * tokens * width / copy_gbs / 1e6
        saved = pd.LAUNCH[kernel]
        try:
            for cfg in candidates[kernel]:
                pd.LAUNCH[kernel] = cfg
                row[str(cfg)] = _timed(timer, fn, out, f"{name} {width} {cfg}")
        finally:
            pd.LAUNCH[kernel] = saved
        row["default_ms"] = _timed(timer, fn, out, f"{name} {width} default")
        out["runs"][f"{name} {tokens}x{width}"] = row


def picks_correctness() -> dict[str, float]:
    """The Philox kernels at philox_dropout.LAUNCH (tune sets its picks) against the torch references: keep bits
    written and read (the backward given a wrong seed, so it must read them) and p = 0, at the step's widths and
    an odd size."""
    import torch

    from orchestrator.passes.training.lora import philox_dropout as pd

    seed, p, checks = 0x1234_5678_9ABC_DEF, 0.05, {}
    for rows, cols, r in ((8192, 3072, 64), (8192, 8192, 64), (777, 3000, 16)):
        x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(r, cols, device="cuda", dtype=torch.bfloat16) * 0.1
        gh = torch.randn(rows, r, device="cuda", dtype=torch.bfloat16)
        name = f"tune picks {rows}x{cols} r{r}"
        bits = pd.new_bits(rows, cols, "cuda").fill_(0x5A)
        checks[f"{name}: dropout_lora_a writing bits"] = rel_err(
            pd.dropout_lora_a(x, a, p, seed, bits=bits), pd.dropout_lora_a_reference(x, a, p, seed)
        )
        want_bits = pd.pack_keep_bits(pd.keep_mask_reference(seed, rows, cols, p, "cuda"))
        checks[f"{name}: bits written (mismatching bytes)"] = float((bits != want_bits).sum())
        checks[f"{name}: wgrad reading bits"] = rel_err(
            pd.dropout_lora_a_wgrad(x, gh, p, seed + 1, bits=bits), pd.dropout_lora_a_wgrad_reference(x, gh, p, seed)
        )
        checks[f"{name}: grad reading bits"] = rel_err(
            pd.dropout_grad(gh, a, p, seed + 1, torch.bfloat16, bits=bits),
            pd.dropout_grad_reference(gh, a, p, seed, torch.bfloat16),
        )
        checks[f"{name}: p0 lora_a"] = rel_err(pd.dropout_lora_a(x, a, 0.0, seed), x.float() @ a.float().t())
        checks[f"{name}: p0 wgrad"] = rel_err(pd.dropout_lora_a_wgrad(x, gh, 0.0, seed), gh.float().t() @ x.float())
        checks[f"{name}: p0 grad"] = rel_err(pd.dropout_grad(gh, a, 0.0, seed, torch.bfloat16), gh.float() @ a.float())
    return checks


def _cpu_ms(fn: Any) -> float:
    import time as _time

    start = _time.perf_counter()
    fn()
    return (_time.perf_counter() - start) * 1e3


def _timed(timer: Any, fn: Any, out: dict[str, Any], name: str) -> float | None:
    """fn's time in ms, or None with the error recorded: one failing launch shape must not stop the sweep."""
    try:
        return timer(fn)
    except Exception as e:  # noqa: BLE001
        out.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:300]
        return None


STEPS = {
    "ceilings": ceilings,
    "correctness": correctness,
    "splits": splits,
    "timings": timings,
    "offload": offload,
    "philox": philox,
    "fold": fold,
    "tune": tune,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--steps",
        default="ceilings,correctness,splits,timings,offload",
        help="comma list of the parts to run (philox: only the Philox dropout checks and timings; fold: the "
        "LoRA term inside the base GEMM, the MFU candidates)",
    )
    args = p.parse_args(argv)
    names = [n.strip() for n in args.steps.split(",") if n.strip()]
    unknown = [n for n in names if n not in STEPS]
    if unknown:  # before the CUDA check: a misspelt part fails here too, not after a GPU machine started
        print(f"gpu_kernels: --steps: unknown part(s) {', '.join(unknown)}; known: {', '.join(STEPS)}")
        return 2
    import torch

    if not torch.cuda.is_available():
        print("gpu_kernels: needs a CUDA GPU (it checks and times orch's CUDA kernels); this machine has none")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        pass
    t0 = time.perf_counter()
    for step in (STEPS[name] for name in names):
        try:
            step(res)
        except Exception as e:  # noqa: BLE001 - keep what the other steps measured
            import traceback

            res.setdefault("errors", {})[step.__name__] = traceback.format_exc()[-2000:]
            print(f"{step.__name__} FAILED: {e}", flush=True)
        harness.write_json(args.out / "kernels.json", res)
    res["wall_s"] = time.perf_counter() - t0
    harness.write_json(args.out / "kernels.json", res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("timings_ms", "correctness_rel_err")}, indent=1))
    for key in ("correctness_rel_err", "splits_ms", "timings_ms", "offload"):
        for name, value in res.get(key, {}).items():
            print(f"{key[:4]} {value:12.5g}  {name}" if isinstance(value, float) else f"{key[:4]} {name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
