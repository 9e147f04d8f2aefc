"""The fused LoRA Linear (orchestrator/passes/training/lora/fused.py) against peft's own forward, on a real tiny Phi-3.

Same seed, same batch: the fused layers must give peft's loss and peft's adapter gradients (fp32: to rounding;
bf16 autocast: to bf16 rounding), the same training trajectory over several optimizer steps, no more saved
activation bytes, and peft's behaviour wherever the fast path does not apply (adapters disabled, merged).
"""

from __future__ import annotations

import pytest
import torch

from orchestrator.passes.training.lora.fused import FUSED_ATTR, fuse_lora_layers, unfuse_lora_layers
from tests.conftest import saved_activation_bytes

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.fixture(params=["lora_first", "base_first", "k_concat", "wide_backward"])
def gemm_order(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every arrangement of the fused functions' GEMMs: both orders (fused.LORA_FIRST, the plan's `lora_first`
    option), the LoRA term inside the base GEMM of the wide layers (fused.K_CONCAT, `k_concat`), and their
    backward through the same buffer (fused.WIDE_BACKWARD, `wide_backward`)."""
    from orchestrator.passes.training.lora import fused

    monkeypatch.setattr(fused, "LORA_FIRST", request.param != "base_first")
    monkeypatch.setattr(fused, "K_CONCAT", request.param in ("k_concat", "wide_backward"))
    monkeypatch.setattr(fused, "WIDE_BACKWARD", request.param == "wide_backward")
    return request.param != "base_first"


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory: pytest.TempPathFactory):
    from orchestrator.passes.models.tiny_model import build_tiny_phi3

    return build_tiny_phi3(tmp_path_factory.mktemp("tiny") / "model", num_layers=2, seed=3)


def _peft_model(path, dropout: float, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    model = _with_lora(base, dropout, seed)
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False  # what lora_cuda does under autocast
    return model


def _with_lora(base, dropout: float, seed: int):
    import peft

    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, cfg)
    # lora_B starts at zero: give it values so the LoRA path contributes and its gradients are not trivial
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 900, (2, 24), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


def _loss_and_grads(model, batch, *, seed: int, autocast: bool = False):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_matches_peft_in_fp32(tiny_phi3, dropout: float, gemm_order: bool) -> None:
    ref = _peft_model(tiny_phi3, dropout)
    fused = _peft_model(tiny_phi3, dropout)
    assert fuse_lora_layers(fused) == 2 * len(TARGETS)
    batch = _batch()
    loss_ref, g_ref = _loss_and_grads(ref, batch, seed=5)
    loss_fused, g_fused = _loss_and_grads(fused, batch, seed=5)
    assert torch.allclose(loss_fused, loss_ref, atol=1e-6, rtol=1e-6)
    assert g_ref.keys() == g_fused.keys() and len(g_ref) == 4 * len(TARGETS)
    for name, g in g_ref.items():
        assert g.abs().max() > 0, name
        assert torch.allclose(g_fused[name], g, atol=1e-6, rtol=1e-4), name


def _qlora_model(path, dropout: float, seed: int = 0):
    """peft LoRA on a base whose decoder Linears are bitsandbytes nf4 + double quant (QLoRA's base, as
    BitsAndBytesConfig loads it; built here layer by layer because transformers' loader wants CUDA for it)."""
    import bitsandbytes as bnb
    import transformers

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    for layer in base.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if type(lin) is torch.nn.Linear:
                    q = bnb.nn.Linear4bit(
                        lin.in_features, lin.out_features, bias=lin.bias is not None,
                        compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True,
                    )  # fmt: skip
                    q.weight = bnb.nn.Params4bit(
                        lin.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
                    )
                    setattr(parent, name, q.to("cpu"))  # .to() quantizes
    base.is_loaded_in_4bit = True  # what the 4-bit loader marks: peft then wraps these in its bnb LoRA layers
    return _with_lora(base, dropout, seed)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_layers_take_a_4bit_base_as_peft_does(tiny_phi3, dropout: float, gemm_order: bool) -> None:
    """QLoRA: the fused functions dequantize the nf4 weight themselves (forward and backward) and give peft's
    bitsandbytes layers' loss and adapter gradients; the packed weight is all they keep."""
    from orchestrator.passes.training.lora.fused import _fast_path_parts

    ref = _qlora_model(tiny_phi3, dropout)
    fused = _qlora_model(tiny_phi3, dropout)
    lora_layers = [m for m in fused.modules() if type(m).__module__ == "peft.tuners.lora.bnb"]
    assert len(lora_layers) == 2 * len(TARGETS)
    assert fuse_lora_layers(fused) == 2 * len(TARGETS)
    x = torch.randn(3, lora_layers[0].in_features)
    parts = _fast_path_parts(lora_layers[0], x, (), {})
    assert parts is not None and parts[1].dtype == torch.uint8 and parts[2] is not None  # packed weight + state
    batch = _batch(2)
    loss_ref, g_ref = _loss_and_grads(ref, batch, seed=9)
    loss_fused, g_fused = _loss_and_grads(fused, batch, seed=9)
    assert torch.allclose(loss_fused, loss_ref, atol=1e-5, rtol=1e-5), (float(loss_fused), float(loss_ref))
    assert g_ref.keys() == g_fused.keys() and len(g_ref) == 4 * len(TARGETS)
    for name, g in g_ref.items():
        assert g.abs().max() > 0, name
        assert torch.allclose(g_fused[name], g, atol=1e-5, rtol=1e-3), name


def test_fused_matches_peft_under_bf16_autocast(tiny_phi3, gemm_order: bool) -> None:
    ref = _peft_model(tiny_phi3, 0.05)
    fused = _peft_model(tiny_phi3, 0.05)
    fuse_lora_layers(fused)
    batch = _batch(1)
    loss_ref, g_ref = _loss_and_grads(ref, batch, seed=7, autocast=True)
    loss_fused, g_fused = _loss_and_grads(fused, batch, seed=7, autocast=True)
    assert abs(float(loss_fused) - float(loss_ref)) < 2e-2  # bf16 rounds at different points
    for name, g in g_ref.items():
        assert g_fused[name].dtype == torch.float32  # the adapter's own dtype, as peft gives
        cos = torch.nn.functional.cosine_similarity(g_fused[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


def test_training_trajectory_is_peft_s(tiny_phi3) -> None:
    def train(model, steps: int = 6) -> list[float]:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(steps):
            loss, _ = _loss_and_grads(model, _batch(step), seed=100 + step)
            opt.step()
            losses.append(float(loss))
        return losses

    ref = _peft_model(tiny_phi3, 0.05)
    fused = _peft_model(tiny_phi3, 0.05)
    fuse_lora_layers(fused)
    l_ref, l_fused = train(ref), train(fused)
    assert l_ref[-1] != l_ref[0]  # it trained
    assert max(abs(a - b) for a, b in zip(l_ref, l_fused, strict=True)) < 1e-4, (l_ref, l_fused)


def test_fused_saves_no_more_activation_bytes(tiny_phi3) -> None:
    def saved_bytes(model) -> int:
        """Bytes of the tensors autograd keeps for the backward, parameters excluded (they exist anyway)."""
        model.train()
        torch.manual_seed(0)
        return saved_activation_bytes(lambda: model(**_batch()), model.parameters())

    ref = _peft_model(tiny_phi3, 0.05)
    fused = _peft_model(tiny_phi3, 0.05)
    fuse_lora_layers(fused)
    assert saved_bytes(fused) <= saved_bytes(ref)


def test_disabled_and_merged_adapters_fall_back_to_peft(tiny_phi3) -> None:
    import transformers

    fused = _peft_model(tiny_phi3, 0.0).eval()
    fuse_lora_layers(fused)
    ids = _batch()["input_ids"]
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_phi3, attn_implementation="eager").eval()
    with torch.no_grad():
        with_lora = fused(input_ids=ids).logits
        with fused.disable_adapter():
            disabled = fused(input_ids=ids).logits
        plain = base(input_ids=ids).logits
        fused.merge_adapter()
        merged = fused(input_ids=ids).logits
        fused.unmerge_adapter()
    assert torch.allclose(disabled, plain, atol=1e-6)
    assert not torch.allclose(with_lora, plain, atol=1e-3)  # the adapter does something
    assert torch.allclose(merged, with_lora, atol=1e-4)


def test_unfuse_restores_peft_forward(tiny_phi3) -> None:
    fused = _peft_model(tiny_phi3, 0.0)
    n = fuse_lora_layers(fused)
    assert fuse_lora_layers(fused) == 0  # idempotent
    assert unfuse_lora_layers(fused) == n
    assert not any(getattr(m, FUSED_ATTR, False) or "forward" in vars(m) for m in fused.modules())


def test_dropout_inside_the_fused_function_is_peft_arithmetic(gemm_order: bool) -> None:
    """The CUDA path's function (dropout drawn inside, its mask kept for the input gradient) on CPU tensors: the
    same output and gradients as peft's graph with the mask native_dropout draws for the same seed."""
    from orchestrator.passes.training.lora.fused import _dropout_fn

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 32, generator=gen, requires_grad=True)
    w = torch.randn(24, 32, generator=gen)
    a = torch.randn(16, 32, generator=gen, requires_grad=True)
    b = torch.randn(24, 16, generator=gen, requires_grad=True)
    g = torch.randn(6, 5, 24, generator=gen)
    torch.manual_seed(3)
    out = _dropout_fn().apply(x, w, None, None, a, b, 0.5, 0.1, torch.float32, None)  # seed None: native_dropout
    out.backward(g)

    torch.manual_seed(3)
    _, mask = torch.native_dropout(x.detach().reshape(-1, 32), 0.1, True)
    x2, a2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    flat = x2.reshape(-1, 32)
    ref = flat @ w.t() + 0.5 * ((flat * mask / 0.9) @ a2.t()) @ b2.t()
    ref.backward(g.reshape(-1, 24))
    assert torch.allclose(out.reshape(-1, 24), ref, atol=1e-5)
    for got, want in ((x.grad, x2.grad), (a.grad, a2.grad), (b.grad, b2.grad)):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert 0 < int((~mask).sum()) < mask.numel()  # some elements were dropped, not all


@pytest.mark.parametrize("with_bias", [False, True])
def test_both_gemm_orders_give_the_lora_linear_arithmetic(gemm_order: bool, with_bias: bool) -> None:
    """x @ W^T + bias + s * (x @ A^T) @ B^T and its gradients, whichever GEMM writes the output first (LoRA first:
    the base GEMM accumulates into the LoRA term, forward and backward), with and without a bias (the bias rides in
    the first GEMM)."""
    from orchestrator.passes.training.lora.fused import _fn

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, 32, generator=gen, dtype=torch.float64)
    bias = torch.randn(24, generator=gen, dtype=torch.float64) if with_bias else None
    a = torch.randn(8, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 7, 24, generator=gen, dtype=torch.float64)
    out = _fn().apply(x, x, w, None, bias, a, b, 0.75, torch.float64)
    grads = torch.autograd.grad(out, (x, a, b), g)
    ref = x @ w.t() + 0.75 * (x @ a.t()) @ b.t() + (0 if bias is None else bias)
    ref_grads = torch.autograd.grad(ref, (x, a, b), g)
    assert torch.allclose(out, ref, atol=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-10)


def test_fused_dropout_runs_inside_only_on_cuda_with_triton() -> None:
    from orchestrator.passes.training.lora.fused import _fused_dropout_p

    drop = torch.nn.Dropout(0.05).train()
    assert _fused_dropout_p(drop, torch.zeros(2, 3), 64) is None  # CPU: the layer's own module, as peft
    assert _fused_dropout_p(torch.nn.Identity(), torch.zeros(2, 3), 64) is None


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_swiglu_down_recompute_is_the_mlp_tail_arithmetic(p: float, gemm_order: bool) -> None:
    """SwiGLU + LoRA down_proj as one function that keeps only u (fused.swiglu_down's function), against the same
    arithmetic in eager torch with the same dropout mask: output and gradients of u, A and B."""
    import torch

    from orchestrator.passes.training.lora.fused import _swiglu_down_fn
    from orchestrator.passes.training.lora.kernels import swiglu_reference

    gen = torch.Generator().manual_seed(5)
    tokens, inter, out_f, rank, scaling = 12, 24, 10, 4, 0.7
    u = torch.randn(2, tokens // 2, 2 * inter, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out_f, inter, generator=gen, dtype=torch.float64)
    a = torch.randn(rank, inter, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_f, rank, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, tokens // 2, out_f, generator=gen, dtype=torch.float64)

    torch.manual_seed(11)
    out = _swiglu_down_fn().apply(u, w, None, None, a, b, scaling, p, torch.float64, None, False)  # native_dropout
    grads = torch.autograd.grad(out, (u, a, b), g)

    torch.manual_seed(11)  # the same mask: native_dropout of the SwiGLU output, as the function draws it
    c = swiglu_reference(u.reshape(tokens, -1))
    xd = torch.native_dropout(c, p, True)[0] if p > 0 else c
    ref = c @ w.t() + scaling * (xd @ a.t()) @ b.t()
    ref_grads = torch.autograd.grad(ref.view_as(out), (u, a, b), g)
    assert torch.allclose(out, ref.view_as(out), atol=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-10)


def test_swiglu_down_writes_us_gradient_over_u_only_when_asked() -> None:
    """overwrite_u (the MLP's own gate_up output): the backward writes du over u, saving a (tokens x 2 I) tensor;
    the gradients are unchanged, and a second backward through the graph is refused instead of reading du as u."""
    from orchestrator.passes.training.lora.fused import _swiglu_down_fn

    gen = torch.Generator().manual_seed(6)
    leaf = torch.randn(10, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    a = torch.randn(4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    results = {}
    for overwrite in (False, True):
        u = leaf * 1  # an intermediate, as gate_up's output is
        before = u.detach().clone()
        out = _swiglu_down_fn().apply(u, w, None, None, a, b, 0.5, 0.0, torch.float64, None, overwrite)
        grads = torch.autograd.grad(out, (leaf, a, b), g, retain_graph=True)
        results[overwrite] = grads
        if overwrite:
            assert torch.equal(u.detach(), grads[0])  # du (= d leaf, the product by 1) now lives in u's memory
            with pytest.raises(RuntimeError, match="inplace"):  # autograd sees u changed
                torch.autograd.grad(out, (leaf, a, b), g)
        else:
            assert torch.equal(u.detach(), before)
            torch.autograd.grad(out, (leaf, a, b), g)  # the graph still runs a second time
    for got, want in zip(results[True], results[False], strict=True):
        assert torch.equal(got, want)


def test_swiglu_down_saves_one_activation_fewer(tiny_phi3) -> None:
    """With recompute, down_proj's (tokens x intermediate) input is not kept for the backward."""

    from orchestrator.passes.training.lora import phi3_patches

    def saved_bytes(recompute: bool) -> int:
        model = _peft_model(tiny_phi3, dropout=0.0)
        fuse_lora_layers(model)
        phi3_patches.orch_swiglu_mlp(model, recompute=recompute)
        return saved_activation_bytes(lambda: model(**_batch()))

    cfg = __import__("transformers").AutoConfig.from_pretrained(tiny_phi3)
    tokens = _batch()["input_ids"].numel()
    saved = saved_bytes(False) - saved_bytes(True)
    assert saved >= cfg.num_hidden_layers * tokens * cfg.intermediate_size * 4  # fp32 here: one (T x I) per layer


def test_swiglu_down_recompute_keeps_peft_loss_and_gradients(tiny_phi3) -> None:
    from orchestrator.passes.training.lora import phi3_patches

    ref = _peft_model(tiny_phi3, dropout=0.0)
    new = _peft_model(tiny_phi3, dropout=0.0)
    fuse_lora_layers(new)
    assert phi3_patches.orch_swiglu_mlp(new, recompute=True) == 2
    l_ref, g_ref = _loss_and_grads(ref, _batch(), seed=1)
    l_new, g_new = _loss_and_grads(new, _batch(), seed=1)
    assert torch.allclose(l_new, l_ref, atol=1e-6)
    for name, g in g_ref.items():
        assert torch.allclose(g_new[name], g, atol=1e-6, rtol=1e-4), name


def test_k_concat_is_the_lora_linear_arithmetic_in_one_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    """K_CONCAT: a weight at least twice as wide out as in becomes the first columns of an (out, in + r) buffer
    and the forward is [x | h] [W | sB]^T; output and gradients are the LoRA Linear's (float64: exact to rounding),
    the weight's values, shape and Parameter object are unchanged, a narrow weight is left alone, and
    unwiden_weights gives the weight its own storage back."""
    from orchestrator.passes.training.lora import fused

    monkeypatch.setattr(fused, "K_CONCAT", True)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(72, 32, generator=gen, dtype=torch.float64), requires_grad=False)
    w_before = w.detach().clone()
    bias = torch.randn(72, generator=gen, dtype=torch.float64)
    a = torch.randn(8, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(72, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 7, 72, generator=gen, dtype=torch.float64)
    assert fused.widen_weight(w, 8)
    wide = getattr(w, fused.WIDE_ATTR)
    assert wide.shape == (72, 40) and w.data_ptr() == wide.data_ptr() and w.stride() == (40, 1)
    assert torch.equal(w, w_before) and w.shape == (72, 32)
    for with_bias in (None, bias):
        out = fused._fn().apply(x, x, w, None, with_bias, a, b, 0.75, torch.float64)
        grads = torch.autograd.grad(out, (x, a, b), g)
        ref = x @ w_before.t() + 0.75 * (x @ a.t()) @ b.t() + (0 if with_bias is None else with_bias)
        ref_grads = torch.autograd.grad(ref, (x, a, b), g)
        assert torch.allclose(out, ref, atol=1e-12)
        assert torch.allclose(wide[:, 32:], 0.75 * b.detach())  # s B written into the buffer's last r columns
        for got, want in zip(grads, ref_grads, strict=True):
            assert torch.allclose(got, want, atol=1e-10)
    narrow = torch.nn.Parameter(torch.randn(24, 32, dtype=torch.float64), requires_grad=False)
    assert not fused.widen_weight(narrow, 8) and narrow.is_contiguous()  # 24 < 2 x 32: no gain
    assert not fused.widen_weight(torch.nn.Parameter(torch.randn(72, 32)), 8)  # trainable: not a frozen base weight
    holder = torch.nn.Module()
    holder.w = w
    assert fused.unwiden_weights(holder) == 1
    assert w.is_contiguous() and torch.equal(w, w_before) and getattr(w, fused.WIDE_ATTR, None) is None


def test_k_concat_widens_only_the_wide_layers_and_unfuse_restores_them(
    tiny_phi3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the tiny Phi-3: qkv_proj (3x) and gate_up_proj (5.5x) get the (out, in + r) buffer when the layers are
    fused, o_proj and down_proj do not; the state dict's values are unchanged and a step gives peft's loss; unfuse
    gives every weight its own contiguous storage back."""
    from orchestrator.passes.training.lora import fused as lora_fused

    monkeypatch.setattr(lora_fused, "K_CONCAT", True)
    model = _peft_model(tiny_phi3, 0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_lora_layers(model)
    loss, _ = _loss_and_grads(model, _batch(), seed=1)
    loss_ref, _ = _loss_and_grads(_peft_model(tiny_phi3, 0.0), _batch(), seed=1)
    assert torch.allclose(loss, loss_ref, atol=1e-6, rtol=1e-6)
    widened = {n for n, p in model.named_parameters() if getattr(p, lora_fused.WIDE_ATTR, None) is not None}
    assert all(("qkv_proj" in n or "gate_up_proj" in n) and n.endswith("base_layer.weight") for n in widened)
    assert len(widened) == 4  # 2 layers x (qkv_proj, gate_up_proj)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if "lora_" not in k)
    unfuse_lora_layers(model)
    assert all(p.is_contiguous() and getattr(p, lora_fused.WIDE_ATTR, None) is None for p in model.parameters())


def test_k_concat_widens_again_a_weight_moved_after_fusing(tiny_phi3, monkeypatch: pytest.MonkeyPatch) -> None:
    """The LoRA pass fuses a model still on the CPU and the Trainer then moves it to the GPU, which gives every
    weight new storage: the first forward after the move widens the weight where it now is (H100 runs 10 and 11
    ran without k_concat, its buffer left on the CPU), and the loss is still peft's."""
    from orchestrator.passes.training.lora import fused as lora_fused

    monkeypatch.setattr(lora_fused, "K_CONCAT", True)
    model = _peft_model(tiny_phi3, 0.0)
    fuse_lora_layers(model)
    _loss_and_grads(model, _batch(), seed=1)  # widened where it is
    wide_weights = [
        m.get_base_layer().weight for n, m in model.named_modules() if n.endswith(("qkv_proj", "gate_up_proj"))
    ]
    assert len(wide_weights) == 4 and all(lora_fused._wide_of(w, 8) is not None for w in wide_weights)
    model.to(torch.float64).to(torch.float32)  # what a move to another device does to the weights: new storage
    assert all(lora_fused._wide_of(w, 8) is None for w in wide_weights)  # the old buffer is no view of them now
    loss, _ = _loss_and_grads(model, _batch(), seed=1)
    assert all(lora_fused._wide_of(w, 8) is not None for w in wide_weights)  # widened again, in its new place
    loss_ref, _ = _loss_and_grads(_peft_model(tiny_phi3, 0.0), _batch(), seed=1)
    assert torch.allclose(loss, loss_ref, atol=1e-6, rtol=1e-6)
    model.to(torch.float64).to(torch.float32)
    with torch.inference_mode():  # an evaluation first: no inference tensor may become the weight's storage
        model(**_batch())
    assert all(lora_fused._wide_of(w, 8) is None and not w.is_inference() for w in wide_weights)
    loss_after_eval, _ = _loss_and_grads(model, _batch(), seed=1)  # trains (widened now), peft's loss
    assert torch.allclose(loss_after_eval, loss_ref, atol=1e-6, rtol=1e-6)


def _widened_case(seed: int, spare: int) -> tuple:
    """(buf, w, w_ref, a, b, g): rows of 32 inputs with `spare` free columns after each, a frozen (72, 32) weight
    widened for r = 8 (K_CONCAT on), its values, A, B and an output gradient; float64."""
    from orchestrator.passes.training.lora import fused

    gen = torch.Generator().manual_seed(seed)
    buf = torch.randn(3, 7, 32 + spare, generator=gen, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(72, 32, generator=gen, dtype=torch.float64), requires_grad=False)
    w_ref = w.detach().clone()
    a = torch.randn(8, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(72, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 7, 72, generator=gen, dtype=torch.float64)
    assert fused.widen_weight(w, 8)
    return buf, w, w_ref, a, b, g


@pytest.mark.parametrize("spare", [8, 12])
def test_k_concat_writes_h_into_the_producers_free_columns(monkeypatch: pytest.MonkeyPatch, spare: int) -> None:
    """An input whose producer left free columns after each row (add_norm's normed rows, tagged WIDE_INPUT_ATTR):
    the widened layer writes h there and runs [x | h] [W | sB]^T on that storage (no cat); output and gradients
    are the LoRA Linear's, with dropout inside too (native_dropout's mask); x's values and autograd version are
    untouched. Fewer free columns than the rank: the copy, same result."""
    from orchestrator.passes.training.lora import fused

    monkeypatch.setattr(fused, "K_CONCAT", True)
    buf, w, w_ref, a, b, g = _widened_case(seed=6, spare=spare)
    for rank_room in (spare, 4):  # 4 < r = 8: not enough room, the cat path
        x = buf[..., :32].requires_grad_(True)  # a leaf view: its rows are 32 + spare apart
        setattr(x, fused.WIDE_INPUT_ATTR, rank_room)
        x_before, version = x.detach().clone(), x._version
        out = fused._fn().apply(x, x, w, None, None, a, b, 0.5, torch.float64)
        grads = torch.autograd.grad(out, (x, a, b), g)
        xr = x_before.clone().requires_grad_(True)
        ref = xr @ w_ref.t() + 0.5 * (xr @ a.t()) @ b.t()
        ref_grads = torch.autograd.grad(ref, (xr, a, b), g)
        assert torch.allclose(out, ref, atol=1e-12)
        for got, want in zip(grads, ref_grads, strict=True):
            assert torch.allclose(got, want, atol=1e-10)
        assert torch.equal(x.detach(), x_before) and x._version == version
        h = (x_before @ a.detach().t()).reshape(-1, 8)
        wrote = torch.allclose(buf[..., 32:40].reshape(-1, 8), h, atol=1e-12)
        assert wrote == (rank_room >= 8)
        buf[..., 32:] = 0.0
    # dropout inside (the CUDA path's function, native_dropout's mask on CPU tensors)
    x = buf[..., :32].requires_grad_(True)
    setattr(x, fused.WIDE_INPUT_ATTR, spare)
    torch.manual_seed(3)
    out = fused._dropout_fn().apply(x, w, None, None, a, b, 0.5, 0.1, torch.float64, None)
    torch.manual_seed(3)
    _, mask = torch.native_dropout(x.detach().reshape(-1, 32), 0.1, True)
    flat = x.detach().reshape(-1, 32)
    ref = flat @ w_ref.t() + 0.5 * ((flat * mask / 0.9) @ a.detach().t()) @ b.detach().t()
    assert torch.allclose(out.reshape(-1, 72), ref, atol=1e-12)
    assert torch.allclose(buf[..., 32:40].reshape(-1, 8), (flat * mask / 0.9) @ a.detach().t(), atol=1e-12)


def test_dropout_over_the_producers_whole_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """An input in add_norm's wider rows: native_dropout runs over the whole contiguous rows (CUDA's vectorized
    kernel; forced here on CPU tensors) and the function keeps the first columns of its outputs, with the rows'
    stride. Output and gradients are the LoRA Linear's under that mask; the free columns' contents (NaN here, as
    uninitialized memory may be) reach nothing."""
    from orchestrator.passes.training.lora import fused

    monkeypatch.setattr(fused, "K_CONCAT", True)  # free columns after add_norm's rows exist for k_concat
    buf, w, w_ref, a, b, g = _widened_case(seed=12, spare=8)
    rows = buf.reshape(-1, 40)
    rows[:, 32:] = float("nan")
    x2 = rows[:, :32]
    torch.manual_seed(5)
    xd2, mask = fused.dropout_rows(x2, 0.25, 8)
    torch.manual_seed(5)
    want_xd, want_mask = torch.native_dropout(rows.clone(), 0.25, True)
    assert xd2.shape == mask.shape == x2.shape and xd2.stride(0) == mask.stride(0) == 40
    assert torch.equal(mask, want_mask[:, :32]) and torch.equal(xd2, want_xd[:, :32])
    assert torch.isfinite(xd2).all() and torch.allclose(xd2, x2 * mask / 0.75, rtol=1e-15, atol=0)
    torch.manual_seed(5)
    xd_plain, _ = fused.dropout_rows(x2, 0.25, 0)  # no free columns: the input itself
    assert xd_plain.is_contiguous() and xd_plain.shape == x2.shape

    monkeypatch.setattr(fused, "_vectorized_dropout", lambda x2: True)
    buf, w, w_ref, a, b, g = _widened_case(seed=12, spare=8)
    buf[..., 32:] = float("nan")
    x = buf[..., :32].requires_grad_(True)
    setattr(x, fused.WIDE_INPUT_ATTR, 8)
    x_before = x.detach().clone()
    torch.manual_seed(3)
    out = fused._dropout_fn().apply(x, w, None, None, a, b, 0.5, 0.1, torch.float64, None)
    gx, ga, gb = torch.autograd.grad(out, (x, a, b), g)
    torch.manual_seed(3)
    rows_before = torch.cat([x_before, torch.zeros_like(x_before[..., :8])], -1).reshape(-1, 40)
    mask = torch.native_dropout(rows_before, 0.1, True)[1][:, :32].reshape(x_before.shape)
    xr = x_before.clone().requires_grad_(True)
    ref = xr @ w_ref.t() + 0.5 * ((xr * mask / 0.9) @ a.t()) @ b.t()
    assert torch.allclose(out, ref, atol=1e-12)
    for got, want in zip((gx, ga, gb), torch.autograd.grad(ref, (xr, a, b), g), strict=True):
        assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("tagged", [True, False])
def test_wide_backward_takes_gh_from_the_base_gemm(monkeypatch: pytest.MonkeyPatch, tagged: bool) -> None:
    """WIDE_BACKWARD: a widened layer's backward is g [W | sB] = [g W | s g B] in one GEMM, no skinny GEMM over g
    for gh, and the LoRA Linear's gradients. The input gradient keeps the buffer's row stride where x's producer
    left free columns (add_norm, whose backward takes strided rows), else comes back in storage of its own."""
    from orchestrator.passes.training.lora import fused, kernels

    monkeypatch.setattr(fused, "K_CONCAT", True)
    monkeypatch.setattr(fused, "WIDE_BACKWARD", True)
    buf, w, w_ref, a, b, g = _widened_case(seed=9, spare=8)
    x = (buf[..., :32] if tagged else buf[..., :32].contiguous()).requires_grad_(True)
    if tagged:
        setattr(x, fused.WIDE_INPUT_ATTR, 8)
    x_before = x.detach().clone()
    out = fused._fn().apply(x, x, w, None, None, a, b, 0.5, torch.float64)

    def no_skinny_gemm(*args, **kwargs):
        raise AssertionError("gh by a GEMM of its own")

    monkeypatch.setattr(kernels, "lora_tall", no_skinny_gemm)
    gx, ga, gb = torch.autograd.grad(out, (x, a, b), g)
    xr = x_before.clone().requires_grad_(True)
    ref = xr @ w_ref.t() + 0.5 * (xr @ a.t()) @ b.t()
    for got, want in zip((gx, ga, gb), torch.autograd.grad(ref, (xr, a, b), g), strict=True):
        assert torch.allclose(got, want, atol=1e-10)
    assert gx.stride(-2) == (40 if tagged else 32)  # [g W + gh A | gh]'s first columns, or a copy
    # dropout inside the fused function (native_dropout's mask on CPU tensors): the mask's term added in place
    monkeypatch.undo()
    monkeypatch.setattr(fused, "K_CONCAT", True)
    monkeypatch.setattr(fused, "WIDE_BACKWARD", True)
    x = (buf[..., :32] if tagged else buf[..., :32].contiguous()).requires_grad_(True)
    if tagged:
        setattr(x, fused.WIDE_INPUT_ATTR, 8)
    torch.manual_seed(3)
    out = fused._dropout_fn().apply(x, w, None, None, a, b, 0.5, 0.1, torch.float64, None)
    monkeypatch.setattr(kernels, "lora_tall", no_skinny_gemm)
    gx, ga, gb = torch.autograd.grad(out, (x, a, b), g)
    torch.manual_seed(3)
    _, mask = torch.native_dropout(x_before.reshape(-1, 32), 0.1, True)
    xr = x_before.clone().requires_grad_(True)
    ref = xr @ w_ref.t() + 0.5 * ((xr * mask.reshape(xr.shape) / 0.9) @ a.t()) @ b.t()
    for got, want in zip((gx, ga, gb), torch.autograd.grad(ref, (xr, a, b), g), strict=True):
        assert torch.allclose(got, want, atol=1e-10)
    assert gx.stride(-2) == (40 if tagged else 32)
