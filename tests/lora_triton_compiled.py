"""Compiles every orch Triton kernel, in each mode the wrappers launch it in, with Triton's real compiler for Hopper
(sm_90) and Ampere (sm_80) GPUs, on this machine's CPU (no GPU: Triton lowers to PTX and runs its ptxas), and saves
{case: "ok" or the compile error}.

Why: the interpreter tests run the kernels' Python, which accepts code the compiler refuses (an early return inside
a constexpr branch compiled nowhere: H100 run 8 found it after a GPU machine had started). tests/test_lora_triton
_compiles.py starts it in a subprocess with the pinned Triton of .cache/triton-interpret on PYTHONPATH and
TRITON_INTERPRET unset. Usage: python tests/lora_triton_compiled.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

FLOAT_ARGS = {"scale"}
INT64_ARGS = {"seed", "row_start"}


def signature(fn: Any, pointers: dict[str, str]) -> dict[str, str]:
    """The kernel's parameters typed as the wrappers pass them: *_ptr pointers (bf16 unless `pointers` says),
    seeds int64, scales fp32, other scalars (the dropout threshold among them) int32, constexprs constexpr."""
    sig = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*bf16")
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name in INT64_ARGS:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def cases() -> list[tuple[str, Any, dict[str, Any], dict[str, str], int]]:
    """(name, kernel, constexprs, pointer types, warps) for every mode the wrappers launch (qkv_rope's blocks as
    its wrapper sizes them)."""
    from orchestrator.passes.training.lora import kernels as lora_kernels
    from orchestrator.passes.training.lora import philox_triton as pt
    from orchestrator.passes.training.lora.philox_dropout import PHILOX_ROUNDS

    out = []
    for bits in (0, 1, 2, 3):  # regenerate, write keep bits, read them, no dropout (p = 0)
        for ieee, ptr in ((False, "*bf16"), (True, "*fp32")):
            lanes = {"LANES": 32, "ROUNDS": PHILOX_ROUNDS, "IEEE": ieee, "BITS": bits}
            x = {"x_ptr": ptr, "a_ptr": ptr, "gh_ptr": ptr, "gx_ptr": ptr, "bits_ptr": "*u8"}
            out.append((f"philox lora_a BITS={bits} ieee={ieee}", pt.dropout_lora_a_kernel,
                        {"R": 64, "BLOCK_M": 32, **lanes}, {**x, "h_ptr": "*fp32"}, 4))  # fmt: skip
            out.append((f"philox wgrad BITS={bits} ieee={ieee}", pt.dropout_lora_a_wgrad_kernel,
                        {"R": 64, "BLOCK_T": 64, **lanes}, {**x, "out_ptr": "*fp32"}, 4))  # fmt: skip
            for acc in (False, True):
                out.append((f"philox grad BITS={bits} accumulate={acc} ieee={ieee}", pt.dropout_grad_kernel,
                            {"R": 16, "BLOCK_M": 128, "ACCUMULATE": acc, **lanes}, x, 8))  # fmt: skip
    out.append(("philox halves", pt.halves_kernel, {"BLOCK_M": 16, "LANES": 32, "ROUNDS": PHILOX_ROUNDS},
                {"out_ptr": "*i32"}, 4))  # fmt: skip
    out.append(("philox randint4x", pt.randint4x_kernel, {"BLOCK": 1024, "ROUNDS": PHILOX_ROUNDS},
                {"out_ptr": "*i32", "offsets_ptr": "*i64"}, 4))  # fmt: skip
    dropout_grad_add, swiglu_fwd, swiglu_bwd, swiglu_dropout_fwd = lora_kernels._kernels()
    for acc in (False, True):
        out.append((f"dropout_grad_add accumulate={acc}", dropout_grad_add,
                    {"R": 64, "BLOCK_M": 64, "BLOCK_N": 64, "ACCUMULATE": acc, "IEEE": False},
                    {"m_ptr": "*u8"}, 4))  # fmt: skip
    out.append(("swiglu fwd", swiglu_fwd, {"BLOCK": 1024}, {}, 4))
    out.append(("swiglu bwd", swiglu_bwd, {"BLOCK": 1024}, {}, 4))
    out.append(("swiglu dropout fwd", swiglu_dropout_fwd, {"BLOCK": 1024}, {"m_ptr": "*u8"}, 4))
    rope_fwd, rope_bwd = lora_kernels._rope_kernels()
    for label, hq, hk, d, half in (("phi3-mini", 32, 32, 96, 48), ("phi4-mini partial rotary", 24, 8, 128, 48)):
        blocks = {"BLOCK_T": 16, "BLOCK_HALF": pow2(half), "BLOCK_PASS": pow2(max(d - 2 * half, 1)), "BLOCK_D": pow2(d)}
        dims = {"HQ": hq, "HK": hk, "D": d, "HALF": half, **blocks}
        out.append((f"qkv_rope fwd {label}", rope_fwd, dims, {"cos_ptr": "*fp32", "sin_ptr": "*fp32"}, 4))
        out.append((f"qkv_rope bwd {label}", rope_bwd, dims, {"cos_ptr": "*fp32", "sin_ptr": "*fp32"}, 4))
    return out


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("lora_triton_compiled: unset TRITON_INTERPRET (this compiles the kernels, it does not interpret them)")
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res: dict[str, Any] = {"triton": triton.__version__, "results": {}}
    for arch in (90, 80):
        for name, fn, constexprs, pointers, warps in cases():
            src = ASTSource(fn=fn, signature=signature(fn, pointers), constexprs=constexprs)
            try:
                triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
                res["results"][f"sm_{arch} {name}"] = "ok"
            except Exception as e:  # noqa: BLE001 - every kernel is compiled; the test names the ones that fail
                res["results"][f"sm_{arch} {name}"] = f"{type(e).__name__}: {e}"[:1500]
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
