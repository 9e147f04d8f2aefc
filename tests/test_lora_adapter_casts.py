"""The adapter matrices' compute-dtype copies (orchestrator/passes/training/lora/adapter_casts.py): made once, reused
while the fp32 parameters are unchanged, refreshed after every optimizer step (fused AdamW bumps no version counter),
and the fused layers' training under bf16 autocast is bit for bit the same as with a fresh cast in every call."""

from __future__ import annotations

import pytest
import torch

from orchestrator.passes.training.lora import adapter_casts, fused
from tests.test_lora_fused import _batch, _peft_model


def test_copies_are_reused_until_an_optimizer_step_and_b_is_stored_transposed() -> None:
    a = torch.nn.Parameter(torch.randn(8, 32))
    b = torch.nn.Parameter(torch.randn(48, 8))
    a16, b16 = adapter_casts.compute_copies(a, b, torch.bfloat16)
    assert torch.equal(a16, a.detach().to(torch.bfloat16)) and torch.equal(b16, b.detach().to(torch.bfloat16))
    assert b16.shape == (48, 8) and b16.t().is_contiguous()  # B^T contiguous: the backward's g @ B takes it as is
    again = adapter_casts.compute_copies(a, b, torch.bfloat16)
    assert again[0] is a16 and again[1] is b16  # unchanged parameters: the same copies, nothing cast
    opt = torch.optim.AdamW([a, b], lr=0.1, fused=True)
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    version = a._version
    opt.step()
    assert a._version == version  # fused AdamW leaves the version counter alone: the step hook is what tells
    a16_new, b16_new = adapter_casts.compute_copies(a, b, torch.bfloat16)
    assert a16_new is a16  # refreshed in place, in one foreach copy
    assert torch.equal(a16_new, a.detach().to(torch.bfloat16)) and torch.equal(b16_new, b.detach().to(torch.bfloat16))
    with torch.no_grad():
        a.add_(1.0)  # an in-place change outside an optimizer: the version counter tells
    assert torch.equal(adapter_casts.compute_copies(a, b, torch.bfloat16)[0], a.detach().to(torch.bfloat16))
    adapter_casts.release([a, b])
    assert adapter_casts.compute_copies(a, b, torch.bfloat16)[0] is not a16  # released: a new copy


def test_no_caching_where_a_copy_could_not_be_reused() -> None:
    a = torch.nn.Parameter(torch.randn(4, 16))
    b = torch.nn.Parameter(torch.randn(16, 4))
    assert adapter_casts.compute_copies(a, b, torch.float32) == (a, b)  # already the compute dtype: no copy
    with torch.inference_mode():  # inference tensors could not be saved for a later backward
        a16, _ = adapter_casts.compute_copies(a, b, torch.bfloat16)
    assert a16.is_inference() and not adapter_casts.has_copy(a) and not adapter_casts.has_copy(b)


@pytest.mark.parametrize("k_concat", [False, True])
def test_bf16_training_with_cached_copies_is_fresh_casts_bit_for_bit(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, k_concat: bool
) -> None:
    from orchestrator.passes.models.tiny_model import build_tiny_phi3

    path = build_tiny_phi3(tmp_path_factory.mktemp("tiny") / "model", num_layers=2, seed=3)
    monkeypatch.setattr(fused, "K_CONCAT", k_concat)
    monkeypatch.setattr(fused, "CACHED_CASTS", True)

    def train(model, steps: int = 4) -> list[float]:
        fused.fuse_lora_layers(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
        losses = []
        for step in range(steps):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(100 + step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**_batch(step)).loss
            loss.backward()
            opt.step()
            losses.append(float(loss))
        return losses

    model = _peft_model(path, 0.0)
    cached = train(model)
    with monkeypatch.context() as m:
        m.setattr(fused, "CACHED_CASTS", False)
        fresh = train(_peft_model(path, 0.0))
    assert cached[-1] != cached[0]  # it trained: the adapters changed every step
    assert cached == fresh  # a stale copy after any step would change every later loss
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(adapters) == 16 and all(adapter_casts.has_copy(p) for p in adapters)  # the cached run used copies
    fused.unfuse_lora_layers(model)
    assert not any(adapter_casts.has_copy(p) for p in adapters)  # unfused: the copies' memory back
