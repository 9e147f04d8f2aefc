"""The Phi-3 decoder layer with its attention residual add fused into the post-attention norm
(orchestrator/passes/training/lora/add_norm.py): planned where Liger's RMSNorm runs, the same loss and gradients as
transformers' own layer. Liger's kernel itself needs CUDA + Triton: bench/gpu_kernels.py checks it on the GPU
against Liger's add-then-RMSNorm."""

from __future__ import annotations

import pytest
import torch

from orchestrator.passes.training.lora import cuda as lora_cuda
from orchestrator.passes.training.lora.add_norm import fuse_add_norm, is_liger_rms_norm, unfuse_add_norm
from orchestrator.passes.training.lora.cuda import parse_options, plan_cuda
from tests.conftest import saved_activation_bytes

H100 = {"name": "NVIDIA H100 80GB HBM3", "capability": (9, 0), "total_memory_gib": 79.2, "has_liger": True,
        "has_varlen_attn": True}  # fmt: skip
PHI3_MINI = {"model_type": "phi3", "n_params": 3_821_079_552, "hidden_size": 3072, "intermediate_size": 8192,
             "num_layers": 32, "vocab_size": 32064, "tokens_per_step": 8 * 1024, "quantized_4bit": False}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory: pytest.TempPathFactory):
    from orchestrator.passes.models.tiny_model import build_tiny_phi3

    return build_tiny_phi3(tmp_path_factory.mktemp("tiny") / "model", num_layers=3, seed=4)


def test_add_norm_is_planned_with_liger_on_phi3_only() -> None:
    plan = plan_cuda(H100, PHI3_MINI, {})
    assert plan.add_norm and any("post-attention RMSNorm" in r for r in plan.reasons)
    assert not plan_cuda(H100, PHI3_MINI, {}, parse_options("-add_norm")).add_norm
    assert not plan_cuda(H100, PHI3_MINI, {}, parse_options("-liger")).add_norm  # the fused kernel is Liger's
    assert not plan_cuda({**H100, "has_liger": False}, PHI3_MINI, {}).add_norm
    assert not plan_cuda(H100, {**PHI3_MINI, "model_type": "llama"}, {}).add_norm  # only Phi-3's layer is rewritten


def _lora_model(path):
    import peft
    import transformers

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["qkv_proj", "o_proj", "down_proj"])
    model = peft.get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.train()


def _loss_and_grads(model, *, checkpointing: bool):
    if checkpointing:
        model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
        model.base_model.model.enable_input_require_grads()
    ids = torch.randint(10, 900, (2, 20), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)  # LoRA dropout masks
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_layer_forward_gives_transformers_loss_and_gradients(tiny_phi3, checkpointing: bool) -> None:
    ref = _lora_model(tiny_phi3)
    new = _lora_model(tiny_phi3)
    assert fuse_add_norm(new) == 0  # no Liger RMSNorm here: nothing is rewritten by default
    assert fuse_add_norm(new, liger_only=False) == 3
    assert fuse_add_norm(new, liger_only=False) == 0  # idempotent
    loss_ref, g_ref = _loss_and_grads(ref, checkpointing=checkpointing)
    loss_new, g_new = _loss_and_grads(new, checkpointing=checkpointing)
    assert torch.equal(loss_new, loss_ref)  # the same arithmetic, step for step, off CUDA
    assert g_ref.keys() == g_new.keys() and len(g_ref) == 3 * 3 * 2
    for name, g in g_ref.items():
        assert g.abs().max() > 0, name
        assert torch.allclose(g_new[name], g, atol=1e-7), name
    assert unfuse_add_norm(new) == 3
    assert not any("forward" in vars(m) for m in new.base_model.model.model.layers)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_mlp_residual_add_rides_into_the_next_layers_input_norm(tiny_phi3, checkpointing: bool) -> None:
    """Each layer but the last hands the next its input norm with the sum (computed with its residual add); not a
    registered submodule (state_dict unchanged); not under gradient checkpointing; the loss and gradients stay
    transformers' (the test above) and unfuse takes the links away."""
    from orchestrator.passes.training.lora.add_norm import NEXT_NORM_ATTR, PRENORMED_ATTR

    model = _lora_model(tiny_phi3)
    keys = set(model.state_dict())
    fuse_add_norm(model, liger_only=False)
    layers = model.base_model.model.model.layers
    assert [vars(layer).get(NEXT_NORM_ATTR) for layer in layers] == [
        layers[1].input_layernorm,
        layers[2].input_layernorm,
        None,
    ]
    assert set(model.state_dict()) == keys
    handed = []
    for layer in layers:
        layer.register_forward_hook(lambda _m, _a, out: handed.append(hasattr(out, PRENORMED_ATTR)))
    _loss_and_grads(model, checkpointing=checkpointing)
    assert handed == ([False, False, False] if checkpointing else [True, True, False])
    unfuse_add_norm(model)
    assert not any(NEXT_NORM_ATTR in vars(layer) for layer in layers)


def test_apply_plan_rewrites_only_layers_with_liger_norms(tiny_phi3) -> None:
    model = _lora_model(tiny_phi3)
    plan = plan_cuda(H100, PHI3_MINI, {}, {"liger": False, "padding_free": False})
    assert not plan.add_norm
    forced = lora_cuda.CudaPlan(**{**plan.__dict__, "add_norm": True})  # planned, but Liger did not patch the norms
    lora_cuda.apply_plan(forced, model, {})
    layers = model.base_model.model.model.layers
    assert not any(is_liger_rms_norm(layer.post_attention_layernorm) for layer in layers)
    assert not any("forward" in vars(layer) for layer in layers)  # left as transformers wrote them


def _saved_bytes(model) -> int:
    """Bytes of the tensors autograd keeps for the backward (parameters excluded) during one forward."""
    ids = torch.randint(10, 900, (2, 64), generator=torch.Generator().manual_seed(3))
    return saved_activation_bytes(lambda: model(input_ids=ids, labels=ids), model.parameters())


def test_rewritten_layers_stay_checkpointed(tiny_phi3) -> None:
    """transformers wraps the class's forward with the checkpoint call; the instance forward must checkpoint itself,
    or every rewritten layer would silently keep all its activations under gradient checkpointing (QLoRA)."""
    models = {}
    for name, fuse in (("plain", False), ("fused", True)):
        model = _lora_model(tiny_phi3)
        model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
        model.base_model.model.enable_input_require_grads()
        if fuse:
            assert fuse_add_norm(model, liger_only=False) == 3
        models[name] = model
    full = _lora_model(tiny_phi3)
    fuse_add_norm(full, liger_only=False)
    checkpointed, kept_all = _saved_bytes(models["fused"]), _saved_bytes(full)
    assert checkpointed == _saved_bytes(models["plain"])
    assert checkpointed < kept_all / 3, (checkpointed, kept_all)


def _forward_passes_per_step(model) -> int:
    """How many times each decoder layer's MLP ran in one training step (forward + any recomputes)."""
    calls = []
    mlp = model.base_model.model.model.layers[0].mlp
    run_mlp = type(mlp).forward

    def counted(self, *args, **kwargs):  # not a forward hook: torch skips module hooks in a checkpoint's recompute
        calls.append(1)
        return run_mlp(self, *args, **kwargs)

    mlp.forward = counted.__get__(mlp)
    _loss_and_grads(model, checkpointing=False)
    return len(calls)


def test_checkpointed_layers_run_their_forward_twice_per_step(tiny_phi3) -> None:
    """Forward + one recompute, as transformers' own layers: no checkpoint nested inside another (that ran every
    layer three times per step on the GPU machine's transformers 5.17 and cost QLoRA a quarter of its speed)."""
    counts = {}
    for fuse in (False, True):
        model = _lora_model(tiny_phi3)
        model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
        model.base_model.model.enable_input_require_grads()
        if fuse:
            fuse_add_norm(model, liger_only=False)
        counts[fuse] = _forward_passes_per_step(model)
    assert counts == {False: 2, True: 2}


def test_where_transformers_checkpoints_decides_the_forward() -> None:
    """transformers 5.17 checkpoints in GradientCheckpointingLayer.__call__, later releases wrap each layer class's
    forward; the installed one is the latter. The older layout is rebuilt here in two lines (a stand-in for that
    release's class: only where its checkpoint call sits matters)."""
    from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

    from orchestrator.passes.training.lora.add_norm import checkpoints_in_call

    assert checkpoints_in_call(Phi3DecoderLayer) is False

    class GradientCheckpointingLayer(torch.nn.Module):  # transformers 5.17's layout
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    class OldPhi3DecoderLayer(GradientCheckpointingLayer):
        pass

    assert checkpoints_in_call(OldPhi3DecoderLayer) is True
    assert checkpoints_in_call(torch.nn.Linear) is False


def test_norms_feeding_widened_layers_reserve_the_rank_as_free_columns(tiny_phi3, monkeypatch) -> None:
    """With k_concat, input_layernorm (-> qkv_proj) and post_attention_layernorm (-> gate_up_proj) of every add_norm
    layer get the adapter's rank as free columns after each normed row where that layer was widened (on CUDA
    add_rms_norm writes them there, bench/gpu_kernels.py checks it against Liger's); unfuse removes them."""
    from orchestrator.passes.training.lora import fused as lora_fused
    from orchestrator.passes.training.lora.add_norm import SPARE_COLS_ATTR, reserve_lora_columns

    monkeypatch.setattr(lora_fused, "K_CONCAT", True)
    model = _lora_model(tiny_phi3)
    fuse_add_norm(model, liger_only=False)
    lora_fused.fuse_lora_layers(model)
    layers = model.base_model.model.model.layers
    rank = layers[0].self_attn.qkv_proj.lora_A["default"].weight.shape[0]
    # this model's adapters: qkv_proj (3x wider out: widened), o_proj, down_proj (narrower: not); no gate_up_proj
    assert reserve_lora_columns(model) == len(layers)
    for layer in layers:
        assert vars(layer.input_layernorm)[SPARE_COLS_ATTR] == rank
        assert SPARE_COLS_ATTR not in vars(layer.post_attention_layernorm)
    unfuse_add_norm(model)
    assert not any(SPARE_COLS_ATTR in vars(m) for m in model.modules())
    lora_fused.unfuse_lora_layers(model)
    fuse_add_norm(model, liger_only=False)
    assert reserve_lora_columns(model) == 0  # nothing widened: no room reserved
