"""CPU-side tests of orch's CUDA fast path for LoRA: the planning (pure) and the padding-free attention function.

The plan is a pure function of plain dicts, so every choice is tested with the device facts a GPU would report.
The attention function is tested for what matters most: samples laid end to end in one row give exactly the
logits each sample gives alone (no attention across samples), on a real tiny Phi-3 with real transformers.
"""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.passes.training.lora import cuda as lora_cuda
from orchestrator.passes.training.lora import fused_loss, phi3_patches, step_trainer, varlen_attention
from orchestrator.passes.training.lora.cuda import estimate_step_memory_gib, parse_options, plan_cuda
from orchestrator.passes.training.lora.varlen_attention import VARLEN_ATTN

H100 = {
    "name": "NVIDIA H100 80GB HBM3",
    "capability": (9, 0),
    "total_memory_gib": 79.2,
    "has_liger": True,
    "has_varlen_attn": True,
    "has_flash_attn": False,
}
T4 = {"name": "Tesla T4", "capability": (7, 5), "total_memory_gib": 15.0, "has_liger": True, "has_varlen_attn": True}
PHI3_MINI = {
    "model_type": "phi3",
    "n_params": 3_821_079_552,
    "trainable_params": 100_000_000,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_layers": 32,
    "vocab_size": 32064,
    "tokens_per_step": 8 * 1024,
    "quantized_4bit": False,
}


def test_h100_phi3_mini_gets_the_full_fast_path() -> None:
    plan = plan_cuda(H100, PHI3_MINI, {"per_device_train_batch_size": 8})
    assert plan.bf16
    assert plan.padding_free and plan.attn_implementation == VARLEN_ATTN
    assert plan.disable_input_cast
    assert plan.liger == {
        "rope": True,
        "rms_norm": True,
        "swiglu": False,  # orch's SwiGLU kernel instead (reads gate/up in place)
        "cross_entropy": False,
        "fused_linear_cross_entropy": False,  # never Liger's model patch: orch's trainer calls Liger's FLCE itself
    }
    assert plan.gradient_checkpointing is False  # fits in 80 GB without it (the anchor ran at 47 GiB)
    assert plan.fused_lora
    assert plan.qkv_split and plan.swiglu and plan.flce and plan.fused_adamw and plan.splitk
    assert plan.cudnn_attn  # Hopper: equal-length rows through cuDNN's attention
    assert not plan.compile_layers
    assert len(plan.reasons) >= 5


def test_new_choices_each_turn_off_and_need_their_packages() -> None:
    off = plan_cuda(H100, PHI3_MINI, {}, parse_options("-qkv_split,-swiglu,-flce,-fused_adamw"))
    assert not (off.qkv_split or off.swiglu or off.flce or off.fused_adamw)
    assert off.liger is not None and off.liger["swiglu"]  # Liger's SwiGLU is back when orch's is off
    bare = plan_cuda({**H100, "has_liger": False, "has_triton": False}, PHI3_MINI, {})
    assert not bare.swiglu and not bare.flce and bare.qkv_split  # the split needs no kernel
    llama = plan_cuda(H100, {**PHI3_MINI, "model_type": "llama"}, {})
    assert not llama.qkv_split and not llama.swiglu  # separate q/k/v and gate/up projections: nothing to split
    assert not plan_cuda(H100, PHI3_MINI, {"optim": "adamw_8bit"}).fused_adamw  # another optimizer is kept
    assert not plan_cuda(H100, PHI3_MINI, {}, {"cudnn_attn": False}).cudnn_attn
    assert not plan_cuda({**H100, "capability": (8, 0)}, PHI3_MINI, {}).cudnn_attn  # measured on Hopper only
    assert not plan_cuda(H100, PHI3_MINI, {}, {"fused_lora": False}).splitk


def test_split_gemms_compute_the_plain_products() -> None:
    import torch

    from orchestrator.passes.training.lora import kernels as lora_kernels

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1030, 48, generator=gen, dtype=torch.float64)
    b = torch.randn(1030, 16, generator=gen, dtype=torch.float64)
    for s in (1, 2, 4, 8):  # 1030 rows: the split leaves a remainder the plain GEMM adds
        assert torch.allclose(lora_kernels._wgrad_split(a, b, s).double(), a.t() @ b, atol=1e-4)
    x = torch.randn(300, 64, generator=gen)
    bt = torch.randn(16, 64, generator=gen)
    for s in (1, 2, 4):
        assert torch.allclose(lora_kernels._tall_split(x, bt, s), x @ bt.t(), atol=1e-4)
        # the LoRA scaling inside the GEMM (alpha) and, in bf16, one rounding of the fp32 sum of the parts
        scaled = lora_kernels._tall_split(x.bfloat16(), bt.bfloat16(), s, scale=2.0)
        assert scaled.dtype == torch.bfloat16
        assert torch.allclose(
            scaled.float(), 2.0 * (x.bfloat16().float() @ bt.bfloat16().float().t()), rtol=2e-2, atol=0.1
        )
    for s in (1, 2, 4, 8):
        assert torch.allclose(lora_kernels._wgrad_split(a, b, s, scale=0.5).double(), 0.5 * (a.t() @ b), atol=1e-4)
    assert torch.equal(lora_kernels.lora_wgrad(a.float(), b.float()), (a.float().t() @ b.float()))  # CPU: plain


def test_flce_chunks_hold_about_a_gib_of_logits() -> None:
    assert fused_loss.flce_chunk_mem_const(8192, 3072) == 21  # Phi-4-mini, 8 x 1024: chunks of 2048 tokens
    assert fused_loss.flce_chunk_mem_const(1 << 20, 4096) == 1  # never below Liger's default


def test_flash_attn_package_is_preferred_when_installed() -> None:
    plan = plan_cuda({**H100, "has_flash_attn": True}, PHI3_MINI, {})
    assert plan.padding_free and plan.attn_implementation == "flash_attention_2"


def test_no_varlen_kernel_keeps_padded_batches() -> None:
    plan = plan_cuda({**H100, "has_varlen_attn": False}, PHI3_MINI, {})
    assert not plan.padding_free and plan.attn_implementation is None
    assert any("no variable-length attention kernel" in r for r in plan.reasons)


def test_pre_ampere_gpu_gets_no_bf16_and_no_varlen() -> None:
    plan = plan_cuda(T4, PHI3_MINI, {})
    assert not plan.bf16 and not plan.padding_free and not plan.disable_input_cast


def test_user_fp16_is_kept() -> None:
    plan = plan_cuda(H100, PHI3_MINI, {"fp16": True})
    assert not plan.bf16
    assert any("fp16" in r for r in plan.reasons)


def test_unknown_model_type_gets_neither_liger_nor_padding_free() -> None:
    plan = plan_cuda(H100, {**PHI3_MINI, "model_type": "bloom"}, {})
    assert plan.liger is None and not plan.padding_free and plan.bf16


def test_no_liger_installed() -> None:
    plan = plan_cuda({**H100, "has_liger": False}, PHI3_MINI, {})
    assert plan.liger is None and plan.padding_free


def test_checkpointing_only_when_memory_demands_it() -> None:
    small_gpu = {**H100, "total_memory_gib": 24.0}
    assert plan_cuda(small_gpu, PHI3_MINI, {}).gradient_checkpointing is True
    long_steps = {**PHI3_MINI, "tokens_per_step": 8 * 4096}
    assert plan_cuda(H100, long_steps, {}).gradient_checkpointing is True
    # the QLoRA pass / the user asked for it: kept (None = leave the kwarg as it is)
    assert plan_cuda(H100, PHI3_MINI, {"gradient_checkpointing": True}).gradient_checkpointing is None
    assert plan_cuda(H100, PHI3_MINI, {"activation_checkpointing": True}).gradient_checkpointing is None


def test_memory_estimate_matches_the_h100_anchor() -> None:
    # plain transformers + peft, Phi-3-mini, 8 x 1024 tokens, no checkpointing: 47 GiB measured on an H100
    est = estimate_step_memory_gib(PHI3_MINI, checkpointing=False)
    assert 40 < est < 55
    assert estimate_step_memory_gib(PHI3_MINI, checkpointing=True) < 15
    assert estimate_step_memory_gib({**PHI3_MINI, "quantized_4bit": True}, checkpointing=False) < est


def test_qlora_keeps_peft_input_cast() -> None:
    plan = plan_cuda(H100, {**PHI3_MINI, "quantized_4bit": True}, {"gradient_checkpointing": True})
    assert not plan.disable_input_cast and plan.padding_free and plan.gradient_checkpointing is None
    # bitsandbytes' 4-bit layers go through the fused layers too (the weight dequantized inside, never kept)
    assert plan.fused_lora and plan.fused_dropout and plan.mlp_recompute
    assert any("4-bit base weight dequantized inside" in r for r in plan.reasons)
    assert not plan_cuda(H100, {**PHI3_MINI, "quantized_4bit": True}, {}, {"fused_lora": False}).fused_lora


def test_options_override_the_plan() -> None:
    opts = parse_options("+compile, -liger,-padding_free,+gc,-fused_lora")
    assert opts == {"compile": True, "liger": False, "padding_free": False, "gc": True, "fused_lora": False}
    plan = plan_cuda(H100, PHI3_MINI, {}, opts)
    assert plan.compile_layers and plan.liger is None and not plan.padding_free and plan.gradient_checkpointing
    assert not plan.fused_lora
    with pytest.raises(ValueError, match="unknown option 'ligr'"):
        parse_options("-ligr")


def test_wrapped_packing_is_left_alone() -> None:
    plan = plan_cuda(H100, PHI3_MINI, {"packing": True, "packing_strategy": "wrapped"})
    assert not plan.padding_free


def test_apply_plan_sets_sft_kwargs_and_model_attention(tiny_phi3) -> None:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3)
    plan = plan_cuda(H100, {**PHI3_MINI, "model_type": "phi3"}, {}, {"liger": False})
    out = lora_cuda.apply_plan(plan, model, {"pad_to_multiple_of": 1024, "orch_max_len": 64, "fp16": False})
    assert out["bf16"] is True and out["padding_free"] is True and out["gradient_checkpointing"] is False
    assert "pad_to_multiple_of" not in out and "orch_max_len" not in out and "fp16" not in out
    assert model.config._attn_implementation == VARLEN_ATTN
    lora_cuda.restore_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_apply_plan_picks_fused_adamw_for_adamw_torch(tiny_phi3) -> None:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3)
    opts = {"liger": False, "padding_free": False, "fused_lora": False, "qkv_split": False, "swiglu": False}
    plan = plan_cuda(H100, PHI3_MINI, {"optim": "adamw_torch"}, opts)
    assert lora_cuda.apply_plan(plan, model, {"optim": "adamw_torch"})["optim"] == "adamw_torch_fused"
    other = plan_cuda(H100, PHI3_MINI, {"optim": "sgd"}, opts)
    assert lora_cuda.apply_plan(other, model, {"optim": "sgd"})["optim"] == "sgd"


def _loss_and_grads(model, batch, *, loss_fn=None):
    import torch

    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _lora_model(path, seed: int = 0):
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _ids(seed: int = 0, batch: int = 2, length: int = 20):
    import torch

    ids = torch.randint(10, 900, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.mark.parametrize("rope", [False, True])
def test_split_qkv_and_orch_swiglu_leave_loss_and_gradients_unchanged(tiny_phi3, rope: bool) -> None:
    """rope: q, k, v and RoPE through lora_kernels.qkv_rope (its torch reference here; the Triton kernels are checked
    against it through Triton's interpreter by tests/test_lora_kernels_interpreted.py, on the GPU by
    bench/gpu_kernels.py)."""
    import torch

    ref = _lora_model(tiny_phi3)
    patched = _lora_model(tiny_phi3)
    n_layers = patched.get_base_model().config.num_hidden_layers
    assert phi3_patches.split_qkv_attention(patched, rope=rope) == n_layers
    assert phi3_patches.orch_swiglu_mlp(patched) == n_layers
    batch = _ids()
    l_ref, g_ref = _loss_and_grads(ref, batch)
    l_new, g_new = _loss_and_grads(patched, batch)
    assert torch.allclose(l_new, l_ref, atol=1e-6)
    assert g_ref.keys() == g_new.keys() and g_ref
    for name, g in g_ref.items():
        assert torch.allclose(g_new[name], g, atol=1e-6, rtol=1e-5), name


def test_swiglu_reference_is_phi3_mlp_arithmetic() -> None:
    import torch

    from orchestrator.passes.training.lora.kernels import swiglu

    u = torch.randn(5, 3, 16, dtype=torch.bfloat16)
    gate, up = u.chunk(2, dim=-1)
    assert torch.equal(swiglu(u), up * torch.nn.functional.silu(gate))  # CPU: the torch reference


class _TrainerStub:
    """What fused_ce_loss reads of TRL's SFTTrainer."""

    def __init__(self) -> None:
        from collections import defaultdict
        from types import SimpleNamespace

        self.args = SimpleNamespace(loss_type="nll", world_size=1)
        self.compute_loss_func = None
        self.label_smoother = None
        self.aux_loss_enabled = False
        self._metrics = {"train": defaultdict(list)}
        self._total_train_tokens = 0


@pytest.mark.parametrize("padding_free", [False, True])
def test_fused_ce_loss_is_the_models_own_loss(tiny_phi3, padding_free: bool) -> None:
    import torch

    ref = _lora_model(tiny_phi3)
    new = _lora_model(tiny_phi3)
    batch = _ids(3)
    if padding_free:  # two samples laid end to end, as TRL's padding-free collator gives them
        ids = batch["input_ids"].reshape(1, -1)
        labels = ids.clone()
        labels[0, 20] = -100  # the second sample's first token is not predicted from the first sample
        pos = torch.cat([torch.arange(20), torch.arange(20)]).unsqueeze(0)
        batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    else:
        batch["labels"][1, 15:] = -100  # padding
    stub = _TrainerStub()

    def orch_loss(model, b):
        return fused_loss.fused_ce_loss(stub, model, b, None, fused_loss.reference_flce)

    # use_cache=False as TRL's compute_loss sets it (with a cache, transformers masks a packed row as one sequence)
    l_ref, g_ref = _loss_and_grads(ref, {**batch, "use_cache": False})
    l_new, g_new = _loss_and_grads(new, batch, loss_fn=orch_loss)
    assert torch.allclose(l_new, l_ref, atol=1e-5), (float(l_new), float(l_ref))
    for name, g in g_ref.items():
        assert torch.allclose(g_new[name], g, atol=1e-6, rtol=1e-4), name
    assert len(stub._metrics["train"]["mean_token_accuracy"]) == 1
    assert stub._total_train_tokens == (40 if padding_free else 40)


def test_fused_ce_loss_runs_the_backbone_under_the_trainers_autocast(tiny_phi3) -> None:
    """On a GPU the Trainer's bf16 comes from accelerate wrapping the model's forward: the loss must apply it to the
    backbone itself (a bf16 base with fp32 adapters fails outside autocast)."""
    import torch

    model = _lora_model(tiny_phi3)
    model.get_base_model().to(torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False  # what lora_cuda does under autocast
    stub = _TrainerStub()
    with pytest.raises(RuntimeError, match="dtype"):  # the GPU failure this guards against: no autocast
        fused_loss.fused_ce_loss(stub, model.train(), _ids(), None, fused_loss.reference_flce)

    class Accelerator:
        @staticmethod
        def autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16)

    stub.accelerator = Accelerator()
    loss = fused_loss.fused_ce_loss(stub, model.train(), _ids(), None, fused_loss.reference_flce)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_fused_ce_loss_leaves_eval_and_other_losses_to_trl(tiny_phi3) -> None:
    model = _lora_model(tiny_phi3)
    stub = _TrainerStub()
    batch = _ids()
    model.eval()
    assert fused_loss.fused_ce_loss(stub, model, batch, None, fused_loss.reference_flce) is None
    model.train()
    stub.args.loss_type = "dft"
    assert fused_loss.fused_ce_loss(stub, model, batch, None, fused_loss.reference_flce) is None
    stub.args.loss_type, stub.args.world_size = "nll", 2
    assert fused_loss.fused_ce_loss(stub, model, batch, None, fused_loss.reference_flce) is None


def test_sft_trainer_class_subclasses_only_for_flce_or_nosync() -> None:
    class Base:
        pass

    assert step_trainer.sft_trainer_class(Base, None) is Base
    no = plan_cuda(H100, PHI3_MINI, {}, {"flce": False, "nosync": False})
    assert step_trainer.sft_trainer_class(Base, no) is Base
    for opts in ({}, {"flce": False}, {"nosync": False}):
        cls = step_trainer.sft_trainer_class(Base, plan_cuda(H100, PHI3_MINI, {}, opts))
        assert issubclass(cls, Base) and cls is not Base and hasattr(cls, "compute_loss")


def test_bits_where_byte_masks_would_leave_no_room_for_the_kept_swiglu_outputs() -> None:
    """A GPU where the step fits with byte masks, but only with the SwiGLU outputs rebuilt, while keep bits fit with
    them kept: bits and kept outputs (the faster pair on the H100, run 8); an H100 keeps both byte masks and them."""
    shape = {**PHI3_MINI, "lora_dropout": 0.05}
    need = estimate_step_memory_gib(shape, checkpointing=False, fast_path=True, stored_masks=True)
    with_bits = lora_cuda.mask_mode_need_gib("bits", need, shape, True)
    keep = lora_cuda.mlp_keep_gib(shape)
    assert max(need, with_bits + keep) < need + keep
    limit = (max(need, with_bits + keep) + need + keep) / 2  # between what fits and what does not
    card = {**H100, "name": "a 48 GB card", "capability": (8, 6), "total_memory_gib": limit / lora_cuda.MEMORY_HEADROOM}
    plan = plan_cuda(card, shape, {})
    assert plan.bit_masks and not plan.mlp_recompute and plan.gradient_checkpointing is False
    assert any("no room for keeping the SwiGLU outputs" in r for r in plan.reasons)
    roomy = plan_cuda(H100, shape, {})
    assert not roomy.philox_dropout and not roomy.mlp_recompute  # byte masks and the outputs kept
    # an explicit choice of either is kept as asked
    assert not plan_cuda(card, shape, {}, parse_options("-bit_masks")).bit_masks
    assert plan_cuda(card, shape, {}, parse_options("+mlp_recompute")).mlp_recompute


def test_nosync_planned_and_mlp_recompute_only_where_memory_needs_it() -> None:
    """The SwiGLU output is kept for down_proj's backward where the step fits with it (H100 run 8: 1.02x tokens/s
    for 4 GiB more) and rebuilt where it would not fit or under gradient checkpointing; options force either."""
    plan = plan_cuda(H100, PHI3_MINI, {})
    assert plan.nosync and not plan.mlp_recompute
    assert any("no host sync" in r for r in plan.reasons)
    assert any("kept for down_proj's LoRA backward" in r and "fits" in r for r in plan.reasons)
    assert lora_cuda.mlp_keep_gib(PHI3_MINI) == pytest.approx(8192 * 32 * 8192 * 2 / 2**30)
    assert plan_cuda(H100, PHI3_MINI, {}, parse_options("+mlp_recompute")).mlp_recompute
    off = plan_cuda(H100, PHI3_MINI, {}, parse_options("-nosync,-mlp_recompute"))
    assert not off.nosync and not off.mlp_recompute
    # a 40 GB card: the step fits without gradient checkpointing, but not with the SwiGLU outputs kept as well
    a100_40 = {**H100, "name": "NVIDIA A100-SXM4-40GB", "capability": (8, 0), "total_memory_gib": 39.4}
    tight = plan_cuda(a100_40, PHI3_MINI, {})
    assert tight.mlp_recompute and tight.gradient_checkpointing is False
    assert any("recomputes silu(gate) * up" in r and "keeping it would need" in r for r in tight.reasons)
    # QLoRA's checkpointed step: memory first (4-bit bases are fused too)
    qlora = plan_cuda(H100, {**PHI3_MINI, "quantized_4bit": True}, {"gradient_checkpointing": True})
    assert qlora.mlp_recompute and any("gradient checkpointing is on: a recomputed layer" in r for r in qlora.reasons)
    assert not plan_cuda(H100, PHI3_MINI, {}, {"swiglu": False}).mlp_recompute  # it rides on orch's SwiGLU
    assert not plan_cuda(H100, PHI3_MINI, {}, {"fused_lora": False}).mlp_recompute  # it needs the fused down_proj
    assert not plan_cuda(H100, {**PHI3_MINI, "model_type": "llama"}, {}).mlp_recompute


def test_qkv_rope_and_qlora_bf16_are_planned_where_they_apply() -> None:
    plan = plan_cuda(H100, PHI3_MINI, {})
    assert plan.qkv_rope and not plan.qlora_bf16
    assert not plan_cuda(H100, PHI3_MINI, {}, {"qkv_rope": False}).qkv_rope
    assert not plan_cuda(H100, PHI3_MINI, {}, {"qkv_split": False}).qkv_rope  # it replaces the split forward's slices
    assert not plan_cuda({**H100, "has_triton": False, "has_liger": False}, PHI3_MINI, {}).qkv_rope
    q = plan_cuda(H100, {**PHI3_MINI, "quantized_4bit": True}, {})
    assert q.qlora_bf16 and any("QLoRA: the frozen norms" in r for r in q.reasons)
    assert not plan_cuda(H100, {**PHI3_MINI, "quantized_4bit": True}, {"fp16": True}).qlora_bf16


def test_frozen_params_to_leaves_adapters_in_fp32(tiny_phi3) -> None:
    import torch

    model = _lora_model(tiny_phi3)
    for param in model.parameters():  # what prepare_model_for_kbit_training leaves: everything fp32
        param.data = param.data.float()
    n = lora_cuda.frozen_params_to(model, "bfloat16")
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert n == len(frozen) and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_apply_plan_turns_the_per_step_nan_check_off_unless_the_user_set_it(tiny_phi3) -> None:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3)
    opts = {"liger": False, "padding_free": False, "fused_lora": False, "qkv_split": False, "swiglu": False}
    plan = plan_cuda(H100, PHI3_MINI, {}, opts)
    assert lora_cuda.apply_plan(plan, model, {})["logging_nan_inf_filter"] is False
    assert lora_cuda.apply_plan(plan, model, {"logging_nan_inf_filter": True})["logging_nan_inf_filter"] is True
    off = plan_cuda(H100, PHI3_MINI, {}, {**opts, "nosync": False})
    assert "logging_nan_inf_filter" not in lora_cuda.apply_plan(off, model, {})
    assert "accelerator_config" not in lora_cuda.apply_plan(off, model, {})


def test_nosync_copies_batches_without_waiting_unless_the_user_decided(tiny_phi3, tmp_path) -> None:
    import transformers
    from trl import SFTConfig

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3)
    opts = {"liger": False, "padding_free": False, "fused_lora": False, "qkv_split": False, "swiglu": False}
    plan = plan_cuda(H100, PHI3_MINI, {}, opts)
    out = lora_cuda.apply_plan(plan, model, {"accelerator_config": {"split_batches": False}})
    assert out["accelerator_config"] == {"split_batches": False, "non_blocking": True}
    assert out["dataloader_pin_memory"] is True
    # the kwargs are ones transformers takes: the Trainer's accelerator gets a non-blocking dataloader config
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **lora_cuda.apply_plan(plan, model, {}))
    assert args.accelerator_config.non_blocking is True
    # the user's choice stands: their non_blocking, pinning off, or a config file
    mine = {"accelerator_config": {"non_blocking": False}}
    assert lora_cuda.apply_plan(plan, model, mine)["accelerator_config"] == {"non_blocking": False}
    assert "accelerator_config" not in lora_cuda.apply_plan(plan, model, {"dataloader_pin_memory": False})
    assert lora_cuda.apply_plan(plan, model, {"accelerator_config": "acc.json"})["accelerator_config"] == "acc.json"
    # the plan's DataLoader workers (loader_workers), unless the user set dataloader_num_workers, or turned off
    assert out["dataloader_num_workers"] == 2 and out["dataloader_persistent_workers"] is True
    assert lora_cuda.apply_plan(plan, model, {"dataloader_num_workers": 0})["dataloader_num_workers"] == 0
    no_workers = plan_cuda(H100, PHI3_MINI, {}, {**opts, "loader_workers": False})
    assert "dataloader_num_workers" not in lora_cuda.apply_plan(no_workers, model, {})
    # its own switch (ablation) and nosync's
    for off in ({**opts, "non_blocking": False}, {**opts, "nosync": False}):
        assert "accelerator_config" not in lora_cuda.apply_plan(plan_cuda(H100, PHI3_MINI, {}, off), model, {})


def test_step_metadata_counts_tokens_and_marks_samples_on_the_cpu() -> None:
    import torch

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    packed = {"input_ids": torch.arange(9).unsqueeze(0), "labels": torch.arange(9).unsqueeze(0), "position_ids": pos}
    out = step_trainer.add_step_metadata(dict(packed), padding_free=True)
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and out["cu_seq_lens_q"] is out["cu_seq_lens_k"]
    assert out["max_length_q"] == out["max_length_k"] == 4 and isinstance(out["max_length_q"], int)
    assert out[step_trainer.STEP_TOKENS_KEY] == 9
    # a collator that gave the boundaries already (TRL >= 1.16) keeps its own
    given = step_trainer.add_step_metadata(
        {**packed, "cu_seq_lens_q": torch.tensor([0, 9], dtype=torch.int32)}, padding_free=True
    )
    assert given["cu_seq_lens_q"].tolist() == [0, 9] and "max_length_q" not in given
    mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
    padded = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": mask}
    out = step_trainer.add_step_metadata(dict(padded), padding_free=False)
    assert out[step_trainer.STEP_TOKENS_KEY] == 7 and "cu_seq_lens_q" not in out


def test_orch_trainer_trains_like_trl_with_no_step_sync(tiny_phi3, tmp_path) -> None:
    """The CUDA trainer subclass on CPU (the loss through the torch reference of the fused cross-entropy): the same
    losses as TRL's own SFTTrainer, token counts from the CPU batch, device metrics read when it logs; its batches
    collated by the plan's DataLoader worker processes (loader_workers: the collator wrapper works there); the same
    gradient norm and flop count without the Trainer's per-step walks over every parameter."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    def train(cls, out, **loader):
        model = _lora_model(tiny_phi3)
        ids = [list(range(10 + i, 40 + i)) for i in range(8)]
        args = SFTConfig(
            output_dir=str(out), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=3,
            report_to="none", use_cpu=True, bf16=False, padding_free=True, logging_nan_inf_filter=False,
            dataset_kwargs={"skip_prepare_dataset": True}, include_num_input_tokens_seen="non_padding", seed=3,
            data_seed=3, save_strategy="no", disable_tqdm=True, max_length=None, **loader,
        )  # fmt: skip
        varlen_attention.register_varlen_attention()
        model.base_model.model.config._attn_implementation = VARLEN_ATTN
        trainer = cls(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids}))
        torch.manual_seed(0)
        trainer.train()
        return trainer

    plan = plan_cuda(H100, PHI3_MINI, {})
    orch_cls = step_trainer.sft_trainer_class(SFTTrainer, plan)
    orch_cls.orch_ce = staticmethod(fused_loss.reference_flce)  # no Triton on CPU
    loader = lora_cuda.loader_worker_kwargs({})
    assert loader == {
        "dataloader_num_workers": 2, "dataloader_persistent_workers": True, "dataloader_prefetch_factor": 2,
    }  # fmt: skip
    assert plan.loader_workers and not plan_cuda(H100, PHI3_MINI, {}, {"loader_workers": False}).loader_workers
    assert lora_cuda.loader_worker_kwargs({"dataloader_num_workers": 0}) == {}  # the user's own choice stands
    ref, new = train(SFTTrainer, tmp_path / "ref"), train(orch_cls, tmp_path / "new", **loader)
    assert new.args.dataloader_num_workers == 2 and new.get_train_dataloader().num_workers == 2
    assert isinstance(new.data_collator, step_trainer.StepMetadataCollator)
    ref_logs = [h for h in ref.state.log_history if "loss" in h]
    new_logs = [h for h in new.state.log_history if "loss" in h]
    assert new_logs[-1]["loss"] == pytest.approx(ref_logs[-1]["loss"], rel=1e-5)
    assert isinstance(new_logs[-1]["mean_token_accuracy"], float)
    assert new_logs[-1]["mean_token_accuracy"] == pytest.approx(ref_logs[-1]["mean_token_accuracy"], abs=1e-6)
    assert new.state.num_input_tokens_seen == 3 * 2 * 30  # every token of the 3 padding-free rows of 2 samples
    # no per-step walk over every parameter: the clipping list and the flop count's total made once, same results
    assert new_logs[-1]["grad_norm"] == pytest.approx(ref_logs[-1]["grad_norm"], rel=1e-5)
    assert new.state.total_flos == ref.state.total_flos > 0
    trainable = [p for p in new.model.parameters() if p.requires_grad]
    assert new._orch_trainable is not None and len(new._orch_trainable) == len(trainable) > 0
    assert all(a is b for a, b in zip(new._orch_trainable, trainable, strict=True))
    assert new._orch_flop_params == 6 * new.model.num_parameters(exclude_embeddings=True)


def test_apply_plan_fuses_the_lora_layers(tiny_phi3) -> None:
    import peft
    import transformers

    from orchestrator.passes.training.lora.fused import FUSED_ATTR

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["qkv_proj", "down_proj"]))
    plan = plan_cuda(H100, PHI3_MINI, {}, {"liger": False, "padding_free": False})
    lora_cuda.apply_plan(plan, model, {})
    fused = [name for name, m in model.named_modules() if getattr(m, FUSED_ATTR, False)]
    assert len(fused) == 2 * 2 and all(n.endswith(("qkv_proj", "down_proj")) for n in fused)


def test_lora_first_gemm_order_is_planned_and_turns_off(tiny_phi3, monkeypatch: pytest.MonkeyPatch) -> None:
    import peft
    import transformers

    from orchestrator.passes.training.lora import fused as lora_fused

    monkeypatch.setattr(lora_fused, "LORA_FIRST", lora_fused.LORA_FIRST)  # restored after the test
    plan = plan_cuda(H100, PHI3_MINI, {})
    assert plan.lora_first and any("base GEMM accumulating" in r for r in plan.reasons)
    assert not plan_cuda(H100, PHI3_MINI, {}, {"fused_lora": False}).lora_first  # only the fused layers have it
    off = plan_cuda(H100, PHI3_MINI, {}, parse_options("-lora_first,-liger,-padding_free"))
    assert off.fused_lora and not off.lora_first
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["qkv_proj"]))
    lora_cuda.apply_plan(off, model, {})
    assert lora_fused.LORA_FIRST is False
    lora_cuda.apply_plan(plan_cuda(H100, PHI3_MINI, {}, {"liger": False, "padding_free": False}), model, {})
    assert lora_fused.LORA_FIRST is True


def test_dropout_masks_are_stored_where_they_fit_and_bits_where_memory_decides() -> None:
    """Phi-3-mini at 8 x 1024 tokens, dropout 0.05: ~36 GiB with native_dropout's byte masks, ~31 with the masks as
    bits, ~31 with none (measured on an H100: 35.0, 29.8, 29.2). Byte masks are the fastest (bits 0.99x), so they
    stay where the step fits (the H100); a 40 GB A100 (headroom 0.85 x 39.4 = 33.5) gets bits instead of
    checkpointing, a GPU where only nothing kept fits regenerates them, and checkpointed steps (QLoRA) keep bits."""
    a100 = {**H100, "name": "NVIDIA A100-SXM4-40GB", "capability": (8, 0), "total_memory_gib": 39.4}
    shape = {**PHI3_MINI, "lora_dropout": 0.05, "num_attention_heads": 32, "num_key_value_heads": 32}
    assert lora_cuda.philox_saving_gib(shape) == pytest.approx(5.75)  # (5 x 3072 + 8192) B x 8192 tokens x 32 layers
    assert lora_cuda.bit_masks_gib(shape) == pytest.approx(0.53, abs=0.01)  # (3 x 3072 + 8192) / 8 B per token-layer

    def mode(plan: Any) -> str:
        return "stored" if not plan.philox_dropout else "bits" if plan.bit_masks else "regenerate"

    h100 = plan_cuda(H100, shape, {})
    assert mode(h100) == "stored" and h100.gradient_checkpointing is False
    assert any("stored byte masks" in r and "the fastest mode" in r and "+bit_masks" in r for r in h100.reasons)
    plan = plan_cuda(a100, shape, {})
    assert mode(plan) == "bits" and plan.gradient_checkpointing is False
    assert any("kept as 1 bit per element" in r and "~5.2 GiB less" in r and "instead of gradient checkpointing" in r
               for r in plan.reasons)  # fmt: skip
    assert any("no gradient checkpointing: the step fits (~31 GiB of 39 GiB)" in r for r in plan.reasons)
    # 36.4 GiB (0.85 x 36.4 = 30.9): the bits tip it over, nothing kept fits: regenerated instead of checkpointing
    tight = plan_cuda({**a100, "total_memory_gib": 36.4}, shape, {})
    assert mode(tight) == "regenerate" and tight.gradient_checkpointing is False
    assert any("instead of gradient checkpointing" in r and "with the masks as bits" in r for r in tight.reasons)
    # 32 GiB: no mask mode fits, so checkpointing, with the bits (a recomputed layer's masks are at the peak)
    small = plan_cuda({**a100, "total_memory_gib": 32.0}, shape, {})
    assert small.gradient_checkpointing is True and mode(small) == "bits"
    # checkpointing asked for (the QLoRA pass asks) or forced: bits, wherever the step fits
    for gpu, sft, opts in ((H100, {"gradient_checkpointing": True}, {}), (H100, {}, parse_options("+gc"))):
        assert mode(plan_cuda(gpu, shape, sft, opts)) == "bits"
    # dropout 0: nothing stored either way
    assert not any(
        "instead of gradient checkpointing" in r
        for r in plan_cuda({**a100, "total_memory_gib": 36.4}, {**shape, "lora_dropout": 0.0}, {}).reasons
    )
    # the user's own choices win
    for text, want in (("-philox_dropout", "stored"), ("-bit_masks", "stored"),
                       ("+bit_masks,-philox_dropout", "stored"), ("+philox_dropout", "regenerate"),
                       ("+philox_dropout,-bit_masks", "regenerate"), ("+bit_masks", "bits"),
                       ("+philox_dropout,+bit_masks", "bits")):  # fmt: skip
        got = plan_cuda(a100, shape, {}, parse_options(text))
        assert mode(got) == want, text
        assert got.gradient_checkpointing is (want == "stored"), text  # byte masks do not fit the A100 uncheckpointed
        assert any("asked for by ORCH_CUDA_FASTPATH" in r for r in got.reasons), text
    off = plan_cuda(a100, shape, {}, parse_options("-fused_dropout"))
    assert not off.philox_dropout and not off.bit_masks


def test_the_fast_paths_memory_estimate_follows_the_measured_peaks() -> None:
    """The plan's estimate on the fast path against bench/RESULTS.md's measured peaks (H100, 8 x 1024 tokens): a
    little above each (the plan keeps 15% headroom on top), far under plain transformers + peft's conservative one."""
    phi3 = {**PHI3_MINI, "trainable_params": 100_663_296, "num_attention_heads": 32, "num_key_value_heads": 32}
    phi4 = {**phi3, "n_params": 3_836_021_760, "trainable_params": 92_274_688, "vocab_size": 200_064,
            "num_attention_heads": 24, "num_key_value_heads": 8}  # fmt: skip
    measured = [  # (shape, checkpointing, stored masks, measured peak GiB)
        (phi3, False, False, 29.2), (phi3, False, True, 35.0), (phi4, False, False, 27.7), (phi4, False, True, 33.4),
        ({**phi3, "quantized_4bit": True}, True, True, 5.5),
    ]  # fmt: skip
    for shape, ckpt, masks, peak in measured:
        est = estimate_step_memory_gib(shape, checkpointing=ckpt, fast_path=True, stored_masks=masks)
        assert peak < est < peak * 1.16, (shape["vocab_size"], ckpt, masks, est, peak)
    assert estimate_step_memory_gib(phi3, checkpointing=False) > 40  # plain transformers + peft: 51.3 measured


def test_dropout_mask_modes_reach_the_fused_layers(tiny_phi3, monkeypatch: pytest.MonkeyPatch) -> None:
    """apply_plan sets fused.PHILOX_DROPOUT / BIT_MASKS from the plan's mask mode: stored where the step fits, bits
    with checkpointing or +bit_masks, regenerated with +philox_dropout; none without fused LoRA layers."""
    import peft
    import transformers

    from orchestrator.passes.training.lora import fused as lora_fused

    monkeypatch.setattr(lora_fused, "PHILOX_DROPOUT", lora_fused.PHILOX_DROPOUT)  # restored after the test
    monkeypatch.setattr(lora_fused, "BIT_MASKS", lora_fused.BIT_MASKS)
    assert not plan_cuda(H100, PHI3_MINI, {}, parse_options("+philox_dropout,-fused_dropout")).philox_dropout
    assert not plan_cuda(H100, PHI3_MINI, {}, {"fused_lora": False, "philox_dropout": True}).philox_dropout
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["qkv_proj"]))
    cpu = {"liger": False, "padding_free": False}
    for text, sft, want in (
        ("", {}, (False, False)),
        ("", {"gradient_checkpointing": True}, (True, True)),
        ("+bit_masks", {}, (True, True)),
        ("+philox_dropout", {}, (True, False)),
        ("-philox_dropout", {"gradient_checkpointing": True}, (False, False)),
    ):
        plan = plan_cuda(H100, {**PHI3_MINI, "lora_dropout": 0.1}, sft, {**cpu, **parse_options(text)})
        assert (plan.philox_dropout, plan.bit_masks) == want, text
        lora_cuda.apply_plan(plan, model, {})
        assert want == (lora_fused.PHILOX_DROPOUT, lora_fused.BIT_MASKS), text


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory: pytest.TempPathFactory):
    from orchestrator.passes.models.tiny_model import build_tiny_phi3

    return build_tiny_phi3(tmp_path_factory.mktemp("tiny") / "model", num_layers=2, seed=1)


def test_padding_free_row_gives_each_sample_its_own_logits(tiny_phi3) -> None:
    """Three samples in one row with varlen attention == each sample run alone (no cross-contamination)."""
    import torch
    import transformers

    varlen_attention.register_varlen_attention()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3, attn_implementation="sdpa").eval()
    packed = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3, attn_implementation=VARLEN_ATTN).eval()
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 19, 12]
    samples = [torch.randint(10, 900, (n,), generator=gen) for n in lengths]
    row = torch.cat(samples)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 7, 26, 38], dtype=torch.int32)
    with torch.no_grad():
        alone = torch.cat([ref(input_ids=s[None]).logits[0] for s in samples])
        # as TRL's padding-free collator sends it (cu_seq_lens given) ...
        got = packed(
            input_ids=row,
            position_ids=position_ids,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=19,
            max_length_k=19,
        ).logits[0]
        # ... and from position_ids alone
        got_pos = packed(input_ids=row, position_ids=position_ids).logits[0]
        # the same row through plain SDPA without boundaries attends across samples: the test would notice
        mixed = ref(input_ids=row).logits[0]
    assert torch.allclose(got, alone, atol=1e-5, rtol=1e-4)
    assert torch.allclose(got_pos, alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(mixed[7:], alone[7:], atol=1e-3)


def test_padding_free_gradients_match_separate_samples(tiny_phi3) -> None:
    import torch
    import transformers

    varlen_attention.register_varlen_attention()
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 11]
    samples = [torch.randint(10, 900, (n,), generator=gen) for n in lengths]

    def grads(model, batches):
        model.zero_grad()
        for kwargs in batches:
            model(**kwargs).logits.float().pow(2).mean().backward()
        return model.model.layers[0].self_attn.qkv_proj.weight.grad.clone()

    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3, attn_implementation="sdpa")
    packed = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3, attn_implementation=VARLEN_ATTN)
    # sum of per-token squares over both samples == sum over the row; scale each mean by its token share
    g_ref = sum(
        grads(ref, [{"input_ids": s[None]}]) * (n / sum(lengths)) for s, n in zip(samples, lengths, strict=True)
    )
    row = torch.cat(samples)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    g_packed = grads(packed, [{"input_ids": row, "position_ids": pos}])
    assert torch.allclose(g_packed, g_ref, atol=1e-6, rtol=1e-3)


def test_cu_seqlens_from_position_ids() -> None:
    import torch

    cu, longest = varlen_attention.cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert cu.tolist() == [0, 3, 5, 9] and longest == 4 and cu.dtype == torch.int32


# ---------------------------------------------------------------------------------------------------------------
# orchestrator/passes/quantization/awq_gptq.py (AWQ / GPTQ int4): the refusals, and the GPTQ layout that
# ModelBuilder reads.
# (Kept in this module, the GPU engineer's test file; llm-compressor itself runs in the gpu-quantize environment.)


def _awq_ctx(tmp_path, data_configs=None):
    from orchestrator.core.job import Job
    from orchestrator.passes.base import PassContext

    job = Job(
        job_id="t", pass_name="q", pass_type="GptqQuantizer", output_dir=str(tmp_path), data_configs=data_configs or {}
    )
    return PassContext(job=job, out_dir=tmp_path, emit=lambda e: None)


@pytest.mark.parametrize(
    ("kwargs", "model_kwargs", "match"),
    [
        ({"bits": 8, "data_config": "d"}, {"format": "hf"}, "bits=8 is not supported"),
        ({"data_config": "d"}, {"format": "hf_adapter", "adapter_path": "a"}, "MergeAdapterWeights"),
        ({"data_config": "d"}, {"format": "onnx"}, "needs an HF checkpoint"),
        ({"data_config": "d"}, {"format": "hf", "quantized": True}, "already quantized"),
        ({}, {"format": "hf"}, "needs calibration data"),
    ],
)
def test_awq_gptq_refusals_need_nothing_loaded(tmp_path, kwargs, model_kwargs, match) -> None:
    from orchestrator.core.job import ModelArtifact
    from orchestrator.passes.base import PassError
    from orchestrator.passes.quantization.awq_gptq import AutoAWQQuantizerPass, AwqGptqConfig, GptqQuantizerPass

    model = ModelArtifact(path=str(tmp_path / "nowhere"), **model_kwargs)
    for cls in (GptqQuantizerPass, AutoAWQQuantizerPass):
        with pytest.raises(PassError, match=match):
            cls().run(AwqGptqConfig(**kwargs), model, _awq_ctx(tmp_path))
    assert not any(tmp_path.iterdir())


def test_awq_gptq_config_takes_olive_names() -> None:
    from orchestrator.passes.quantization.awq_gptq import AutoAWQQuantizerPass, AwqGptqConfig, GptqQuantizerPass

    awq = AwqGptqConfig.model_validate({"w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "GEMM"})
    assert awq.bits == 4 and awq.group_size == 64 and not AutoAWQQuantizerPass().symmetric(awq)
    gptq = AwqGptqConfig.model_validate({"bits": 4, "group_size": 128, "desc_act": True, "layers_block_name": "x"})
    assert GptqQuantizerPass().symmetric(gptq) and AutoAWQQuantizerPass().symmetric(gptq) is False
    with pytest.raises(ValueError, match="contradict"):
        AwqGptqConfig(sym=True, zero_point=True)
    with pytest.raises(ValueError, match="multiple of 8"):
        AwqGptqConfig(group_size=100)
    req = GptqQuantizerPass().requirements(gptq)  # llm-compressor's environment; a CPU job gets its CPU sibling
    assert req.environment == "gpu-quantize" and not req.cuda
    from orchestrator.engine.plan import for_accelerator

    assert for_accelerator("gpu-quantize", "cpu") == "cpu-quantize" and for_accelerator("gpu-quantize", "gpu") == (
        "gpu-quantize")  # fmt: skip


def test_awq_without_cuda_is_refused_before_loading(tmp_path) -> None:
    import torch

    from orchestrator.core.job import ModelArtifact
    from orchestrator.passes.base import PassError
    from orchestrator.passes.quantization.awq_gptq import AutoAWQQuantizerPass, AwqGptqConfig

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    big = tmp_path / "big"
    big.mkdir()
    with (big / "model.safetensors").open("wb") as f:  # 1 GiB of weights, sparse: only the size is read
        f.truncate(2**30)
    model = ModelArtifact(format="hf", path=str(big))
    with pytest.raises(PassError, match="AWQ needs a CUDA GPU for this model's 1024 MB.*GPTQ"):
        AutoAWQQuantizerPass().run(AwqGptqConfig(data_config="d"), model, _awq_ctx(tmp_path))


def test_awq_gptq_without_llmcompressor_names_the_environment(tmp_path, monkeypatch) -> None:
    """This venv (transformers 5.23) has no llm-compressor: the error says where AWQ/GPTQ run."""
    import importlib.util

    from orchestrator.passes.base import PassError
    from orchestrator.passes.quantization.awq_gptq import check_llmcompressor

    if importlib.util.find_spec("llmcompressor") is not None:
        pytest.skip("llm-compressor is installed here")
    with pytest.raises(PassError, match="gpu-quantize"):
        check_llmcompressor()


def _rtn_int4(weight, group_size: int):
    """Round-to-nearest asymmetric int4 per group: (scale, zero_point) [out, groups], as llm-compressor gives."""
    import torch

    out_f, in_f = weight.shape
    g = weight.reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    zp = torch.round(-lo / scale).clamp(0, 15)
    return scale, zp


def test_gptq_layout_exports_through_the_model_builder(tmp_path, tiny_phi3) -> None:
    """Grouped int4 in orch's GPTQ layout -> onnxruntime-genai builder: MatMulNBits with the checkpoint's codes,
    and logits that match transformers running the same dequantized weights."""
    import subprocess
    import sys

    import torch
    import transformers

    from orchestrator.passes.common.gptq_layout import load_dequantized, pack_gptq, write_gptq_checkpoint
    from orchestrator.passes.common.onnx_tools import (
        hf_encode,
        hf_logits,
        logits_parity,
        matmulnbits_nodes,
        onnx_model_file,
    )

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_phi3)
    gs = 32
    params = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):  # the LM head too: the builder would RTN-quantize it otherwise
            scale, zp = _rtn_int4(module.weight.data, gs)
            packed, err = pack_gptq(module.weight.data, scale, zp, gs, sym=False)
            assert 0 < err < 0.2 and packed["qweight"].shape == (module.in_features // 8, module.out_features)
            # the reference model runs the dequantized weights (fp16 scales, as the checkpoint stores them)
            s16 = scale.half().float()
            q = torch.clamp(
                torch.round(module.weight.data / s16.repeat_interleave(gs, 1)) + zp.repeat_interleave(gs, 1), 0, 15
            )
            module.weight.data = (q - zp.repeat_interleave(gs, 1)) * s16.repeat_interleave(gs, 1)
            params[name] = (module.weight.data.clone(), s16, zp)
    # fp16 storage of the rest: give the reference the same rounding
    for p in model.parameters():
        p.data = p.data.half().float()
    ref_dir = tmp_path / "ref"
    model.save_pretrained(ref_dir)
    tok.save_pretrained(ref_dir)
    errors = write_gptq_checkpoint(model, params, tmp_path / "gptq", group_size=gs, sym=False, tokenizer=tok)
    assert len(errors) == 2 * 4 + 1 and max(errors.values()) < 1e-3  # weights already sit on the int4 grid
    cfg = __import__("json").loads((tmp_path / "gptq" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq" and cfg["quantization_config"]["group_size"] == gs

    out = tmp_path / "onnx"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tmp_path / "gptq"), "-o", str(out)]
    opts = ["-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache")]
    subprocess.run([*cmd, *opts], check=True, capture_output=True)
    nodes = matmulnbits_nodes(onnx_model_file(out))
    # every linear layer (gate_up split into gate and up by the builder) and the LM head, at the checkpoint's groups
    assert len(nodes) == 2 * 5 + 1 and {n["block_size"] for n in nodes} == {gs}, nodes
    text = "the quick brown fox jumps over the lazy dog"
    parity = logits_parity(ref_dir, out, text)
    # load_dequantized reads the checkpoint back as the same reference model
    ids = hf_encode(ref_dir, text)
    # (the reference rounded its weights to fp16 once more: ~1e-4 apart)
    assert abs(hf_logits(load_dequantized(tmp_path / "gptq"), ids) - hf_logits(ref_dir, ids)).max() < 2e-3
    # what int4 itself changes: the original weights vs their dequantized codes
    int4_effect = float(abs(hf_logits(tiny_phi3, ids) - hf_logits(ref_dir, ids)).max())
    # the export computes with the checkpoint's codes (left: MatMulNBits' int8 activations, accuracy_level 4)
    assert parity["max_abs_diff"] < 0.03 and parity["max_abs_diff"] < int4_effect / 3, (parity, int4_effect)
    assert parity["greedy_agree"] >= 0.75, parity

    # orch's ModelBuilder pass with its defaults on the same checkpoint (what `orch quantize` -> ModelBuilder runs):
    # the parity check against transformers is skipped for a pre-quantized input, and the generation check runs
    from orchestrator.core.job import Job, ModelArtifact
    from orchestrator.passes.base import PassContext
    from orchestrator.passes.onnx.model_builder import ModelBuilderPass

    events: list = []
    job = Job(job_id="j", pass_name="mb", pass_type="ModelBuilder", output_dir=str(tmp_path / "mb"))
    builder = ModelBuilderPass()
    result = builder.run(
        builder.Config(precision="int4"),
        ModelArtifact(format="hf", path=str(tmp_path / "gptq"), quantized=True),
        PassContext(job=job, out_dir=tmp_path / "mb", emit=events.append),
    )
    assert "parity_max_abs_diff" not in result.metrics and result.metrics["check_generated_tokens"] > 0
    assert any("pre-quantized" in str(e.get("message", e)) for e in events)
    assert len(matmulnbits_nodes(onnx_model_file(tmp_path / "mb" / "model"))) == 2 * 5 + 1


def test_offload_checkpoints_is_planned_where_the_checkpointed_step_would_not_fit() -> None:
    """Measured on an H100 (bench/RESULTS.md): 1.1 GiB less for 0.87x the tokens/s on Phi-3-mini QLoRA (run 5), so the
    plan moves the checkpointed inputs to host memory only where memory decides, or when asked."""
    qlora = {**PHI3_MINI, "quantized_4bit": True}
    plan = plan_cuda(H100, qlora, {"gradient_checkpointing": True})
    assert not plan.offload_checkpoints  # an 80 GB card: the checkpointed step fits
    assert any("kept on the GPU" in r and "~1.6 GB" in r and "+offload_checkpoints" in r for r in plan.reasons)
    # a 6 GB laptop GPU: the checkpointed step (~6 GiB estimated, 5.5 measured on an H100) would not fit
    small = {**H100, "total_memory_gib": 6.0}
    tight = plan_cuda(small, qlora, {"gradient_checkpointing": True})
    assert tight.offload_checkpoints
    assert any("pinned host memory" in r and "~1.6 GB" in r and "GiB of 6" in r for r in tight.reasons)
    # 8 GB: the fast path's checkpointed step fits, so its inputs stay on the GPU
    assert not plan_cuda({**H100, "total_memory_gib": 8.0}, qlora, {"gradient_checkpointing": True}).offload_checkpoints
    assert plan_cuda(small, qlora, {"activation_checkpointing": True}).offload_checkpoints  # transformers 5 name
    # without checkpointing there are no checkpointed inputs to move, forced or not
    assert not plan_cuda(H100, qlora, {}).offload_checkpoints
    forced_no_gc = plan_cuda(H100, qlora, {}, parse_options("+offload_checkpoints,-gc"))
    assert not forced_no_gc.offload_checkpoints
    assert any("gradient checkpointing is off" in r for r in forced_no_gc.reasons)
    # the plan's own checkpointing (a step that would not fit) counts as checkpointing
    assert plan_cuda(small, qlora, {}).gradient_checkpointing is True
    assert plan_cuda(small, qlora, {}).offload_checkpoints
    # asked for: on, also for plain LoRA on a big card
    lora = plan_cuda(H100, PHI3_MINI, {"gradient_checkpointing": True})
    assert not lora.offload_checkpoints
    gc_on = {"gradient_checkpointing": True}
    assert plan_cuda(H100, PHI3_MINI, gc_on, parse_options("+offload_checkpoints")).offload_checkpoints
    # ORCH_CUDA_FASTPATH=-offload_checkpoints turns it off; data parallel keeps it off even when asked
    assert not plan_cuda(H100, qlora, gc_on, parse_options("-offload_checkpoints")).offload_checkpoints
    ddp = plan_cuda({**H100, "world_size": 2}, qlora, {"gradient_checkpointing": True}, {"offload_checkpoints": True})
    assert not ddp.offload_checkpoints and any("2 data-parallel processes" in r for r in ddp.reasons)


def test_sft_trainer_class_subclasses_for_offload_checkpoints() -> None:
    class Base:
        def __init__(self) -> None:
            self.callbacks: list = []

        def add_callback(self, callback) -> None:
            self.callbacks.append(callback)

    qlora = {**PHI3_MINI, "quantized_4bit": True}
    plan = plan_cuda(H100, qlora, {"gradient_checkpointing": True}, parse_options("-flce,-nosync,+offload_checkpoints"))
    trainer = step_trainer.sft_trainer_class(Base, plan)()
    assert trainer.orch_offloader is not None and len(trainer.callbacks) == 1
    off = plan_cuda(H100, qlora, {"gradient_checkpointing": True}, parse_options("-flce,-nosync,-offload_checkpoints"))
    assert step_trainer.sft_trainer_class(Base, off) is Base


def test_model_shape_reads_the_adapters_dropout_and_the_step(tiny_phi3) -> None:
    """plan_cuda's memory choices read the shape: the LoRA dropout from the PeftModel's config (the largest of its
    adapters: Philox saves masks only where there are masks), the step's tokens from batch x max length."""
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3)
    cfg = peft.LoraConfig(r=4, lora_dropout=0.1, target_modules=["qkv_proj", "down_proj"])
    model = peft.get_peft_model(base, cfg)
    shape = lora_cuda.model_shape(model, {"per_device_train_batch_size": 2, "max_length": 64})
    assert shape["lora_dropout"] == pytest.approx(0.1)
    assert shape["tokens_per_step"] == 128 and shape["model_type"] == "phi3"
    assert shape["num_layers"] == 2 and shape["hidden_size"] == base.config.hidden_size
    plain = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3)  # (peft wrote its config into `base`)
    assert lora_cuda.model_shape(plain, {})["lora_dropout"] == 0.0  # no adapter, no dropout
