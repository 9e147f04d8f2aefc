"""Runs orch's Philox-dropout kernels through Triton's interpreter and saves what they computed (torch.save).

tests/test_lora_philox.py starts it in a subprocess with TRITON_INTERPRET=1 and the pinned Triton of
.cache/triton-interpret on PYTHONPATH (the interpreter is chosen when triton is imported, and triton must not be
importable from the shared venv), then checks the saved numbers against the pure-torch references in its own
process. Usage: python tests/lora_philox_interpreted.py OUT.pt
"""

from __future__ import annotations

import copy
import os
import sys
import time
from typing import Any

import torch

P = 0.1
SEED = 0x1234_5678_9ABC_DEF
# (dtype, tokens, width, rank): odd sizes, several ranks; fp16 / fp32 (the interpreter does not interpret bf16)
KERNEL_CASES = (
    (torch.float16, 37, 300, 16),
    (torch.float32, 37, 300, 16),
    (torch.float16, 70, 130, 32),
    (torch.float32, 19, 257, 64),
)


def kernel_outputs(res: dict[str, Any]) -> None:
    from orchestrator.passes.training.lora import philox_dropout as pd

    offsets = torch.tensor([0, 1, 77, 2**31 - 1, 2**31 + 5, 2**32 + 7, 2**40 + 3, 2**62 + 11, 2**63 - 1])
    for rounds in (pd.PHILOX_ROUNDS, 10):  # the kernels' rounds, and the default (Random123's known answers)
        res[f"randint4x rounds={rounds}"] = {"offsets": offsets, "got": pd.kernel_randint4x(SEED, offsets, rounds)}
    res["halves"] = pd.kernel_halves(SEED, 5, 300)
    # rows whose Philox counters lie beyond 2^40 (W = 48 counters per row of 300 columns): 64-bit offsets
    res["halves_far"] = {"row_start": 2**40 // 48, "got": pd.kernel_halves(SEED, 3, 300, row_start=2**40 // 48)}
    gen = torch.Generator().manual_seed(0)
    for dtype, n, k, r in KERNEL_CASES:
        x = torch.randn(n, k, generator=gen).to(dtype)
        a = (torch.randn(r, k, generator=gen) * 0.1).to(dtype)
        gh = torch.randn(n, r, generator=gen).to(dtype)
        gx = torch.randn(n, k, generator=gen).to(dtype)
        bits = pd.new_bits(n, k, x.device).fill_(0x5A)  # garbage: the forward must write every byte
        h_bits = pd.dropout_lora_a(x, a, P, SEED, bits=bits)
        bits_3_splits = pd.new_bits(n, k, x.device).fill_(0xA5)  # each column split writes its groups' bytes
        h_bits_3_splits = pd.dropout_lora_a(x, a, P, SEED, bits=bits_3_splits, splits=3)
        res[f"kernels {dtype} {n}x{k} r{r}"] = {
            "kernels_apply": pd.kernels_apply(x, a, gh, rank=r),
            "x": x, "a": a, "gh": gh, "gx": gx,
            "h": pd.dropout_lora_a(x, a, P, SEED),
            "h_1_split": pd.dropout_lora_a(x, a, P, SEED, splits=1),
            "h_3_splits": pd.dropout_lora_a(x, a, P, SEED, splits=3),
            # p = 0: the same kernels as plain skinny GEMMs (no mask drawn or read)
            "h_p0": pd.dropout_lora_a(x, a, 0.0, SEED),
            "wgrad_p0": pd.dropout_lora_a_wgrad(x, gh, 0.0, SEED),
            "grad_p0": pd.dropout_grad(gh, a, 0.0, SEED, dtype),
            "grad_add_p0": pd.dropout_grad_add_(gx.clone(), gh, a, 0.0, SEED),
            "wgrad": pd.dropout_lora_a_wgrad(x, gh, P, SEED),
            "wgrad_3_splits": pd.dropout_lora_a_wgrad(x, gh, P, SEED, splits=3),
            "grad": pd.dropout_grad(gh, a, P, SEED, dtype),
            "grad_add": pd.dropout_grad_add_(gx.clone(), gh, a, P, SEED),
            # keep bits: written by the forward, read by the backward kernels (a wrong seed proves they are read)
            "bits": bits, "h_bits": h_bits, "bits_3_splits": bits_3_splits, "h_bits_3_splits": h_bits_3_splits,
            "wgrad_bits": pd.dropout_lora_a_wgrad(x, gh, P, SEED + 1, bits=bits),
            "wgrad_bits_3_splits": pd.dropout_lora_a_wgrad(x, gh, P, SEED + 1, splits=3, bits=bits),
            "grad_bits": pd.dropout_grad(gh, a, P, SEED + 1, dtype, bits=bits),
            "grad_add_bits": pd.dropout_grad_add_(gx.clone(), gh, a, P, SEED + 1, bits=bits),
        }  # fmt: skip


class ReferenceDropout(torch.nn.Module):
    """The eager counterpart of the fused layers' Philox dropout: the same seed draw, keep_mask_reference's mask."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Any) -> Any:
        from orchestrator.passes.training.lora import philox_dropout as pd

        seed = pd.draw_seed()
        x2 = x.reshape(-1, x.shape[-1])
        keep = pd.keep_mask_reference(seed, x2.shape[0], x2.shape[1], self.p)
        out = torch.where(keep, x2.float() * torch.tensor(pd.keep_scale(self.p), dtype=torch.float32), 0.0)
        return out.to(x.dtype).view(x.shape)


def tiny_model(dropout: float = P, targets: tuple[str, ...] = ("o_proj", "down_proj")) -> Any:
    import peft
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Phi3Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    base = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=list(targets))
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # nonzero B: the LoRA path contributes to every gradient
    return model


def lora_grads(model: Any) -> dict[str, Any]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def step(model: Any, ids: Any, checkpointing: dict[str, Any] | None = None, offload: bool = False) -> Any:
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    if offload:
        from orchestrator.passes.training.lora.offload import CheckpointOffloader

        offloader = CheckpointOffloader(min_bytes=0, include_cpu=True)
        assert offloader.install(model) > 0
    torch.manual_seed(5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    out = {"loss": loss.detach(), "grads": lora_grads(model)}
    if offload:
        out["offloaded"] = offloader.offloaded
    return out


def fused_model_outputs(res: dict[str, Any]) -> None:
    from orchestrator.passes.training.lora import fused

    model = tiny_model()
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if hasattr(module, "lora_dropout"):
            for name in list(module.lora_dropout.keys()):
                module.lora_dropout[name] = ReferenceDropout(P)
    res["model eager reference"] = step(reference, ids)
    peft_own = step(copy.deepcopy(model), ids)  # peft's forward with its own nn.Dropout (the -philox_dropout masks)
    res["model peft nn.Dropout"] = peft_own
    fused.fuse_lora_layers(model)
    runs = {
        "plain": {},
        "transformers checkpoint, reentrant": {"checkpointing": {"use_reentrant": True}},
        "transformers checkpoint, non-reentrant": {"checkpointing": {"use_reentrant": False}},
        "offload.py CheckpointOffloader": {"checkpointing": {"use_reentrant": True}, "offload": True},
        "checkpoint without RNG state": {"checkpointing": {"use_reentrant": False, "preserve_rng_state": False}},
    }
    fused.PHILOX_DROPOUT = True  # ORCH_CUDA_FASTPATH=+philox_dropout
    for name, kwargs in runs.items():
        res[f"model fused philox {name}"] = step(copy.deepcopy(model), ids, **kwargs)
    fused.BIT_MASKS = True  # the default: Philox masks kept as bits
    try:
        for name, kwargs in runs.items():
            res[f"model fused bits {name}"] = step(copy.deepcopy(model), ids, **kwargs)
    finally:
        fused.BIT_MASKS = False
    fused.PHILOX_DROPOUT = False  # ORCH_CUDA_FASTPATH=-philox_dropout: native_dropout, the stored-mask kernel
    try:
        res["model fused native_dropout"] = step(copy.deepcopy(model), ids)
    finally:
        fused.PHILOX_DROPOUT = True
    # the widened layers (qkv_proj 3x, gate_up_proj 4x their input): [x | h] [W | sB]^T and the backward through
    # the same buffer (K_CONCAT + WIDE_BACKWARD) against the separate GEMMs, Philox masks regenerated and as bits
    wide = tiny_model(targets=("qkv_proj", "gate_up_proj"))
    fused.fuse_lora_layers(wide)
    for bits in (False, True):
        fused.BIT_MASKS = bits
        try:
            res[f"model wide bits={bits} separate"] = step(copy.deepcopy(wide), ids)
            fused.K_CONCAT = fused.WIDE_BACKWARD = True
            res[f"model wide bits={bits} wide_backward"] = step(copy.deepcopy(wide), ids)
        finally:
            fused.K_CONCAT = fused.WIDE_BACKWARD = fused.BIT_MASKS = False
    # dropout 0: the skinny products by the p = 0 Triton kernels (TRITON_SKINNY) against peft's own forward
    zero = tiny_model(dropout=0.0)
    res["model p0 peft"] = step(copy.deepcopy(zero), ids)
    fused.fuse_lora_layers(zero)
    fused.TRITON_SKINNY = True
    try:
        res["model p0 fused triton_skinny"] = step(copy.deepcopy(zero), ids)
    finally:
        fused.TRITON_SKINNY = False


def swiglu_down_outputs(res: dict[str, Any]) -> None:
    import peft

    from orchestrator.passes.training.lora import fused
    from orchestrator.passes.training.lora.kernels import swiglu_reference

    torch.manual_seed(2)

    class Down(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down_proj = torch.nn.Linear(128, 64, bias=False)

        def forward(self, c: Any) -> Any:
            return self.down_proj(c)

    model = peft.get_peft_model(
        Down(), peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=P, target_modules=["down_proj"])
    )
    layer = model.base_model.model.down_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    reference = copy.deepcopy(layer)
    reference.lora_dropout["default"] = ReferenceDropout(P)
    fused.fuse_lora_layers(layer)
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(21, 256, generator=gen)
    g = torch.randn(21, 64, generator=gen)
    outs = {}
    for name, fn in (
        ("fused", lambda ui: fused.swiglu_down(layer, ui)),
        # u as the MLP passes it: another function's output, its gradient written over it in the backward
        ("fused bits, u overwritten", lambda ui: fused.swiglu_down(layer, ui * 1, overwrite_u=True)),
        ("eager", lambda ui: reference(swiglu_reference(ui))),
    ):
        ui = u.clone().requires_grad_(True)
        owner = layer if name.startswith("fused") else reference
        owner.zero_grad(set_to_none=True)
        torch.manual_seed(9)
        fused.BIT_MASKS = "bits" in name
        try:
            out = fn(ui)
            out.backward(g)
        finally:
            fused.BIT_MASKS = False
        outs[name] = {
            "out": out.detach(),
            "grad_u": ui.grad,
            "grad_A": owner.lora_A["default"].weight.grad,
            "grad_B": owner.lora_B["default"].weight.grad,
        }
    res["swiglu_down"] = outs


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("lora_philox_interpreted: set TRITON_INTERPRET=1 (Triton's interpreter is chosen at import)")
        return 2
    import triton

    res: dict[str, Any] = {"triton": triton.__version__, "seconds": {}}
    for part in (kernel_outputs, fused_model_outputs, swiglu_down_outputs):
        start = time.perf_counter()
        part(res)
        res["seconds"][part.__name__] = time.perf_counter() - start
    torch.save(res, sys.argv[1])
    print({k: round(v, 1) for k, v in res["seconds"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
