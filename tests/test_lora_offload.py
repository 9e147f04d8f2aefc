"""Checkpointed layer inputs offloaded to host memory (orchestrator/passes/training/lora/offload.py), on CPU.

A real tiny Phi-3 with peft LoRA (dropout > 0) and transformers' gradient checkpointing: with orch's offloading
checkpoint function installed on its layers, the loss and every LoRA gradient must be those of transformers' own
checkpointing and of no checkpointing at all (the recompute must draw the forward's dropout masks). The offloader
runs with `include_cpu=True`, so CPU tensors take the host-copy path and its bookkeeping (one tensor per layer per
step moved out and back, each layer's input fetched ahead during the next layer's backward, nothing left over).
The CUDA streams themselves are checked on the GPU by bench/gpu_kernels.py.
"""

from __future__ import annotations

import gc

import pytest
import torch

from orchestrator.passes.training.lora import cuda as lora_cuda
from orchestrator.passes.training.lora import step_trainer
from orchestrator.passes.training.lora.offload import CheckpointOffloader, offload_callback

LAYERS = 3
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory: pytest.TempPathFactory):
    from orchestrator.passes.models.tiny_model import build_tiny_phi3

    return build_tiny_phi3(tmp_path_factory.mktemp("tiny") / "model", num_layers=LAYERS, seed=4)


def _lora_model(path, dropout: float, seed: int = 0):
    import peft
    import transformers

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # lora_B starts at zero: give it values so every LoRA gradient is non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _checkpointed(model):
    base = model.base_model.model
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable({"use_reentrant": False})  # what the Trainer does (transformers renamed it in 5.x)
    return model


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 900, (2, 24), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


def _loss_and_grads(model, batch, *, seed: int):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_offloaded_checkpoint_gives_the_loss_and_gradients_of_plain_training(tiny_phi3, dropout: float) -> None:
    plain = _lora_model(tiny_phi3, dropout)
    hf = _checkpointed(_lora_model(tiny_phi3, dropout))
    ours = _checkpointed(_lora_model(tiny_phi3, dropout))
    offloader = CheckpointOffloader(min_bytes=1, include_cpu=True)
    assert offloader.install(ours) >= LAYERS
    for step in range(2):
        batch = _batch(step)
        loss_plain, g_plain = _loss_and_grads(plain, batch, seed=7 + step)
        loss_hf, g_hf = _loss_and_grads(hf, batch, seed=7 + step)
        loss_ours, g_ours = _loss_and_grads(ours, batch, seed=7 + step)
        assert torch.allclose(loss_ours, loss_plain, atol=1e-6, rtol=1e-6)
        assert torch.allclose(loss_hf, loss_plain, atol=1e-6, rtol=1e-6)
        assert g_ours.keys() == g_plain.keys() and len(g_plain) == 2 * LAYERS * len(TARGETS)
        for name, g in g_plain.items():
            assert g.abs().max() > 0, name
            assert torch.allclose(g_ours[name], g, atol=1e-6, rtol=1e-4), name
            assert torch.allclose(g_hf[name], g, atol=1e-6, rtol=1e-4), name
        # one hidden-states input per decoder layer went through the hooks; all but the last layer's (the first
        # one the backward needs) went to the host, and each came back ahead of its unpack, during the backward of
        # the layer after it; nothing stays in the offloader once the backward is done
        assert offloader.packed == offloader.unpacked == LAYERS * (step + 1)
        assert offloader.offloaded == offloader.prefetched == (LAYERS - 1) * (step + 1)
        assert offloader.offloaded_bytes == (LAYERS - 1) * (step + 1) * 2 * 24 * 128 * 4
        assert offloader.pending() == 0


def test_dropout_masks_differ_without_rng_restore(tiny_phi3) -> None:
    """The parity above could not pass by accident: a recompute that draws fresh dropout masks (RNG state not
    restored) gives other gradients."""
    from torch.utils.checkpoint import checkpoint

    plain = _lora_model(tiny_phi3, 0.1)
    fresh = _checkpointed(_lora_model(tiny_phi3, 0.1))
    for module in fresh.modules():
        if getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = lambda f, *a: checkpoint(f, *a, use_reentrant=True,
                                                                         preserve_rng_state=False)  # fmt: skip
    batch = _batch()
    _, g_plain = _loss_and_grads(plain, batch, seed=7)
    _, g_fresh = _loss_and_grads(fresh, batch, seed=7)
    assert any(not torch.allclose(g_fresh[n], g, atol=1e-6, rtol=1e-4) for n, g in g_plain.items())


def test_a_forward_without_backward_leaves_nothing_behind(tiny_phi3) -> None:
    model = _checkpointed(_lora_model(tiny_phi3, 0.1))
    offloader = CheckpointOffloader(min_bytes=1, include_cpu=True)
    offloader.install(model)
    model.train()
    loss = model(**_batch()).loss
    assert offloader.packed == LAYERS and offloader.pending() == LAYERS and offloader.offloaded == LAYERS - 1
    del loss
    gc.collect()
    assert offloader.pending() == 0 and offloader.unpacked == 0


def test_small_tensors_and_cpu_tensors_stay_where_they_are(tiny_phi3) -> None:
    model = _checkpointed(_lora_model(tiny_phi3, 0.0))
    by_default = CheckpointOffloader()  # CUDA tensors only: on CPU nothing moves, the step is HF's
    small_only = CheckpointOffloader(min_bytes=1 << 30, include_cpu=True)
    _, g_ref = _loss_and_grads(_checkpointed(_lora_model(tiny_phi3, 0.0)), _batch(), seed=1)
    for offloader in (by_default, small_only):
        offloader.install(model)
        _, grads = _loss_and_grads(model, _batch(), seed=1)
        assert offloader.packed == 0 and offloader.pending() == 0
        assert all(torch.allclose(grads[n], g, atol=1e-6, rtol=1e-4) for n, g in g_ref.items())


def test_inputs_without_grad_go_through_the_non_reentrant_checkpoint() -> None:
    """A reentrant checkpoint whose inputs need no gradient gives its parameters none: such calls are not offloaded
    but still checkpointed, and the parameters get their gradient."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 16))
    x = torch.randn(4, 16)
    offloader = CheckpointOffloader(min_bytes=1, include_cpu=True)
    torch.manual_seed(3)
    layer(x).square().sum().backward()
    ref = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    offloader.checkpoint(layer, x).square().sum().backward()
    assert offloader.packed == 0
    assert all(torch.allclose(p.grad, g) for p, g in zip(layer.parameters(), ref, strict=True))
    # with a grad-requiring input the same call goes through the hooks (the newest tensor stays on the device),
    # and its keyword arguments reach the function
    layer.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    torch.manual_seed(3)
    out = offloader.checkpoint(lambda h, scale: layer(h) * scale, xg, scale=1.0, use_reentrant=False)
    out.square().sum().backward()
    assert offloader.packed == offloader.unpacked == 1 and offloader.pending() == 0
    assert all(torch.allclose(p.grad, g) for p, g in zip(layer.parameters(), ref, strict=True))


def test_orch_trainer_installs_the_offloader_and_trains_like_trl(tiny_phi3, tmp_path) -> None:
    """The trainer-level wiring: the CUDA plan's trainer subclass with offload_checkpoints on (QLoRA's plan on a GPU
    where the checkpointed step would not fit, with the loss and no-sync choices off so that only the offload
    differs) trains 2 steps with gradient checkpointing and dropout 0.1 exactly like TRL's SFTTrainer, its
    offloader moving one tensor per layer per step."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from orchestrator.passes.training.lora.train import checkpointing_names_for
    from tests.test_lora_cuda import H100, PHI3_MINI

    small_gpu = {**H100, "total_memory_gib": 8.0}
    plan = lora_cuda.plan_cuda(
        small_gpu,
        {**PHI3_MINI, "quantized_4bit": True},
        {"gradient_checkpointing": True},
        {"flce": False, "nosync": False},
    )
    assert plan.offload_checkpoints and not plan.flce and not plan.nosync
    orch_cls = step_trainer.sft_trainer_class(SFTTrainer, plan)
    assert orch_cls is not SFTTrainer

    def train(cls, out):
        model = _lora_model(tiny_phi3, 0.1)
        ids = [list(range(10 + i, 40 + i)) for i in range(4)]
        checkpointing = {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}}
        args = SFTConfig(
            output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
            report_to="none", use_cpu=True, bf16=False, dataset_kwargs={"skip_prepare_dataset": True}, seed=3,
            data_seed=3, save_strategy="no", disable_tqdm=True, max_length=None,
            **checkpointing_names_for(SFTConfig, checkpointing),
        )  # fmt: skip
        trainer = cls(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids}))
        offloader = getattr(trainer, "orch_offloader", None)
        if offloader is not None:  # on CPU: take the host-copy path with this tiny model's small tensors
            offloader.include_cpu, offloader.min_bytes = True, 1
        torch.manual_seed(0)
        trainer.train()
        return trainer

    ref, new = train(SFTTrainer, tmp_path / "ref"), train(orch_cls, tmp_path / "new")
    offloader = new.orch_offloader
    assert isinstance(offloader, CheckpointOffloader)
    assert offloader.packed == offloader.unpacked == 2 * LAYERS and offloader.pending() == 0
    assert offloader.offloaded == offloader.prefetched == 2 * (LAYERS - 1)
    layers = [m for m in new.model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers and all(m._gradient_checkpointing_func == offloader.checkpoint for m in layers)
    ref_losses = [h["loss"] for h in ref.state.log_history if "loss" in h]
    new_losses = [h["loss"] for h in new.state.log_history if "loss" in h]
    assert len(new_losses) == 2 and new_losses == pytest.approx(ref_losses, rel=1e-5)


def test_callback_without_a_model_does_nothing() -> None:
    callback = offload_callback(CheckpointOffloader())
    callback.on_train_begin(None, None, None)
    assert callback.installed == 0


def test_add_norm_layers_still_checkpoint_and_offload(tiny_phi3) -> None:
    """add_norm replaces the Phi-3 layers' forward on the instance, which bypasses transformers' checkpointing
    wrapper of the class forward: the replacement must checkpoint itself, so the offloader sees every layer's input
    and the loss and gradients stay those of transformers' layers."""
    from orchestrator.passes.training.lora.add_norm import fuse_add_norm

    ref = _lora_model(tiny_phi3, 0.1)
    model = _checkpointed(_lora_model(tiny_phi3, 0.1))
    assert fuse_add_norm(model, liger_only=False) == LAYERS
    offloader = CheckpointOffloader(min_bytes=1, include_cpu=True)
    offloader.install(model)
    loss_ref, g_ref = _loss_and_grads(ref, _batch(), seed=2)
    loss, grads = _loss_and_grads(model, _batch(), seed=2)
    assert offloader.packed == offloader.unpacked == LAYERS and offloader.offloaded == LAYERS - 1
    assert offloader.pending() == 0
    assert torch.allclose(loss, loss_ref, atol=1e-6, rtol=1e-6)
    assert all(torch.allclose(grads[n], g, atol=1e-6, rtol=1e-4) for n, g in g_ref.items())
