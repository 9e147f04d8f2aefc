"""LoRA dropout with masks regenerated from a Philox seed (orchestrator/passes/training/lora/philox_dropout.py).

The references run here, in torch. The Triton kernels run too, on CPU, through Triton's interpreter: in a
subprocess (TRITON_INTERPRET=1 must be set before triton is imported, and triton is not in the shared venv) with the
pinned Triton that `make setup` puts in .cache/triton-interpret (scripts/setup-triton-interpret.sh). The subprocess
(tests/lora_philox_interpreted.py) saves what the kernels and the fused layers computed; the tests compare it with
the references here. The interpreter does not interpret bf16 (see the setup script): fp16 and fp32 run here, bf16
in bench/gpu_kernels.py on the GPU.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from orchestrator.passes.training.lora import philox_dropout as pd
from tests.conftest import run_triton_interpreted

P = 0.1
SEED = 0x1234_5678_9ABC_DEF


def test_philox_reference_gives_random123s_known_answers() -> None:
    """Philox4x32-10's published test vectors (Random123 kat_vectors): counter, key -> output."""
    vectors = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, want in vectors:
        got = pd.philox4x32_reference(key, *(torch.tensor([c]) for c in counter))
        assert tuple(int(t) for t in got) == want


def test_randint4x_reference_runs_the_kernels_7_rounds() -> None:
    """philox4x32_reference(rounds=n) runs n of the rounds whose 10 give the known answers above (the interpreter
    test checks 7 against Triton's randint4x(n_rounds=7)); randint4x_reference's default is the kernels'
    PHILOX_ROUNDS = 7, and the round count changes the output."""
    counter = [torch.tensor([0x243F6A88 + i]) for i in range(4)]
    key = (0xA4093822, 0x299F31D0)
    outs = {n: tuple(int(t) for t in pd.philox4x32_reference(key, *counter, rounds=n)) for n in (6, 7, 10)}
    assert len(set(outs.values())) == 3
    assert pd.PHILOX_ROUNDS == 7
    offsets = torch.tensor([5, 2**33 + 1])
    for got, want in zip(
        pd.randint4x_reference(SEED, offsets),
        pd.philox4x32_reference((SEED & pd.MASK32, SEED >> 32), offsets & pd.MASK32, offsets >> 32, rounds=7),
        strict=True,
    ):
        assert torch.equal(got, want)


def test_drop_threshold_is_p_in_units_of_2_to_the_minus_16() -> None:
    """THRESH = round(p * 65536): p = 0 keeps everything, p quantized by at most 2^-17 < 7.7e-6."""
    assert pd.drop_threshold(0.05) == 3277
    assert pd.drop_threshold(0.0) == 0
    assert pd.drop_threshold(0.1) == 6554
    assert pd.drop_threshold(0.5) == 32768
    assert pd.drop_threshold(1 / 65536) == 1
    assert pd.drop_threshold(0.999999) == 65536  # rounds to "drop everything" (P(keep) = 0)
    for p in (0.0, 1e-6, 0.05, 0.1, 0.3, 0.5, 0.9, 0.99):
        assert abs(pd.drop_threshold(p) / 65536 - p) <= 2**-17 < 7.7e-6
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="dropout probability"):
            pd.drop_threshold(bad)


def test_16_bit_values_and_keep_fraction_one_minus_thresh_over_65536() -> None:
    halves = pd.halves_block_reference(SEED, 512, 1000)
    assert halves.dtype == torch.int32 and halves.shape == (512, 1000)
    assert int(halves.min()) >= 0 and int(halves.max()) < 65536
    assert abs(float(halves.float().mean()) / 65535 - 0.5) < 0.01  # uniform over [0, 65536)
    for p in (0.05, 0.5):
        keep = pd.keep_mask_reference(SEED, 512, 1000, p)
        assert keep.dtype == torch.bool and keep.shape == (512, 1000)
        assert torch.equal(keep, halves >= pd.drop_threshold(p))
        want = 1 - pd.drop_threshold(p) / 65536
        assert abs(float(keep.float().mean()) - want) < 5 * (want * (1 - want) / keep.numel()) ** 0.5
    assert bool(pd.keep_mask_reference(SEED, 512, 1000, 0.0).all())  # THRESH 0: every element kept
    keep = pd.keep_mask_reference(SEED, 512, 1000, 0.05)
    assert not torch.equal(keep, pd.keep_mask_reference(SEED + 1, 512, 1000, 0.05))  # the seed matters
    # rows are independent of how many rows are drawn: row 300 alone is row 300 of the block
    assert torch.equal(pd.keep_mask_reference(SEED, 1, 1000, 0.05, row_start=300), keep[300:301])
    # a column's value is the half its layout names: counter_layout and randint4x_reference, element by element
    rows, cols = torch.tensor([0, 3, 511, 200]), torch.tensor([0, 1, 999, 130])
    offsets, which, half = pd.counter_layout(rows, cols, 1000)
    outs = torch.stack(pd.randint4x_reference(SEED, offsets))
    words = outs.gather(0, which[None]).squeeze(0)
    assert ((words >> (16 * half)) & 0xFFFF).tolist() == halves[rows, cols].tolist()


def test_counter_layout_uses_all_eight_halves_and_64_bit_offsets() -> None:
    """Element (row, col): counter row * W + (col // 128) * 16 + (col % 32) // 2, output (col % 128) // 32, half
    col % 2, W = ceil(n_cols / 128) * 16; distinct elements never share a (counter, output, half) triple, also at
    rows whose counters pass 2^32 and 2^62; every triple of a full group is used."""
    n_cols = 300  # W = 3 * 16 counters per row
    rows = torch.tensor([0, 1, 2**40 // 48, 2**62 // 48])[:, None].expand(4, n_cols)
    cols = torch.arange(n_cols)[None, :].expand(4, n_cols)
    offsets, which, half = pd.counter_layout(rows, cols, n_cols)
    assert offsets.dtype == torch.int64 and int(offsets.max()) > 2**62
    triples = set(zip(offsets.flatten().tolist(), which.flatten().tolist(), half.flatten().tolist(), strict=True))
    assert len(triples) == rows.numel()
    assert int(offsets[1, 0]) == 48 and int(offsets[0, 299]) == 2 * 16 + (299 % 32) // 2
    assert which[0, :128].tolist() == [c // 32 for c in range(128)]
    assert half[0, :4].tolist() == [0, 1, 0, 1] and offsets[0, :4].tolist() == [0, 0, 1, 1]
    # the first full group of a row: its 16 counters x 4 outputs x 2 halves, each once
    first = set(zip(offsets[0, :128].tolist(), which[0, :128].tolist(), half[0, :128].tolist(), strict=True))
    assert first == {(c, o, h) for c in range(16) for o in range(4) for h in range(2)}


def test_seeds_are_checked_and_drawn_from_the_cpu_generator() -> None:
    with pytest.raises(ValueError, match="seed must be in"):
        pd.dropout_lora_a(torch.zeros(2, 16), torch.zeros(16, 16), P, -1)
    with pytest.raises(ValueError, match="seed must be in"):
        pd.keep_mask_reference(2**63, 2, 16, P)
    torch.manual_seed(4)
    first = [pd.draw_seed(), pd.draw_seed()]
    torch.manual_seed(4)
    assert [pd.draw_seed(), pd.draw_seed()] == first and first[0] != first[1]
    assert all(0 <= s < 2**62 for s in first)


def test_without_the_kernels_the_wrappers_run_the_references() -> None:
    """CPU tensors outside the interpreter (this process has no triton): the same arithmetic in torch."""
    gen = torch.Generator().manual_seed(0)
    x, a, gh = torch.randn(9, 40, generator=gen), torch.randn(16, 40, generator=gen), torch.randn(9, 16, generator=gen)
    assert not pd.kernels_apply(x, a, rank=16)
    keep = pd.keep_mask_reference(SEED, 9, 40, P)
    assert not bool(keep.all())
    xd = torch.where(keep, x / (1 - P), 0.0)
    assert torch.allclose(pd.dropout_lora_a(x, a, P, SEED), xd @ a.t(), atol=1e-5)
    assert torch.allclose(pd.dropout_lora_a_wgrad(x, gh, P, SEED), gh.t() @ xd, atol=1e-5)
    assert torch.allclose(pd.dropout_grad(gh, a, P, SEED, torch.float32), (gh @ a) * keep / (1 - P), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The kernels, through Triton's interpreter


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("philox") / "interpreted.pt"
    return run_triton_interpreted("lora_philox_interpreted.py", out, timeout=900)


def test_tl_randint4x_and_the_kernels_halves_are_the_reference_bit_for_bit(interpreted: dict[str, Any]) -> None:
    """Triton's own randint4x(n_rounds=7) (and 10) at offsets past 2^31, 2^32 and 2^62 is philox4x32_reference's
    Philox; the kernels' 16-bit values are halves_block_reference's, also at rows whose counters pass 2^40."""
    for rounds in (pd.PHILOX_ROUNDS, 10):
        got = interpreted[f"randint4x rounds={rounds}"]
        offsets = got["offsets"]
        assert int(offsets.max()) > 2**62 and bool((offsets > 2**32).any())
        want = pd.randint4x_reference(SEED, offsets, rounds=rounds)
        for k in range(4):
            assert torch.equal(got["got"][k], want[k]), (rounds, k)
    assert torch.equal(interpreted["halves"], pd.halves_block_reference(SEED, 5, 300))
    far = interpreted["halves_far"]
    assert far["row_start"] * 48 > 2**39  # Philox counters past 2^32: 64-bit offsets
    assert torch.equal(far["got"], pd.halves_block_reference(SEED, 3, 300, row_start=far["row_start"]))


@pytest.mark.parametrize(
    "case", ["float16 37x300 r16", "float32 37x300 r16", "float16 70x130 r32", "float32 19x257 r64"]
)
def test_each_kernel_is_its_reference(interpreted: dict[str, Any], case: str) -> None:
    dtype_name, shape, rank = case.split()
    got = interpreted[f"kernels torch.{dtype_name} {shape} {rank}"]
    assert got["kernels_apply"]  # the wrappers ran the kernels, not their torch fallback
    x, a, gh, gx = got["x"], got["a"], got["gh"], got["gx"]
    tol = {"atol": 2e-3, "rtol": 2e-3} if x.dtype == torch.float16 else {"atol": 1e-5, "rtol": 1e-5}
    h = pd.dropout_lora_a_reference(x, a, P, SEED)
    for name in ("h", "h_1_split", "h_3_splits"):  # the columns split (fp32 partial sums) or walked by one program
        assert got[name].dtype == x.dtype and got[name].shape == h.shape
        assert torch.allclose(got[name].float(), h.float(), **tol)
    # p = 0: the kernels as plain skinny GEMMs, x itself
    assert torch.allclose(got["h_p0"].float(), (x.float() @ a.float().t()).to(x.dtype).float(), **tol)
    assert torch.allclose(got["wgrad_p0"], gh.float().t() @ x.float(), atol=1e-4, rtol=1e-4)
    plain_grad = gh.float() @ a.float()
    assert torch.allclose(got["grad_p0"].float(), plain_grad.to(x.dtype).float(), **tol)
    assert torch.allclose(got["grad_add_p0"].float(), (plain_grad + gx.float()).to(x.dtype).float(), **tol)
    wgrad = pd.dropout_lora_a_wgrad_reference(x, gh, P, SEED)
    for name in ("wgrad", "wgrad_3_splits"):
        assert got[name].dtype == torch.float32 and got[name].shape == (gh.shape[1], x.shape[1])
        assert torch.allclose(got[name], wgrad, atol=1e-4, rtol=1e-4)
    grad = pd.dropout_grad_reference(gh, a, P, SEED, x.dtype)
    assert got["grad"].dtype == x.dtype and torch.allclose(got["grad"].float(), grad.float(), **tol)
    grad_add = pd.dropout_grad_reference(gh, a, P, SEED, x.dtype, grad_x=gx)
    assert torch.allclose(got["grad_add"].float(), grad_add.float(), **tol)
    # the mask is really applied: the dropped columns of every row give exactly 0 in the written gradient
    keep = pd.keep_mask_reference(SEED, x.shape[0], x.shape[1], P)
    assert int((~keep).sum()) > 0 and bool((got["grad"][~keep] == 0).all())
    assert not torch.allclose(got["h"].float(), (x.float() @ a.float().t()), **tol)  # not the undropped product
    # keep bits: the forward wrote the mask (every byte, columns past the width as 0 bits: the buffer started as
    # garbage), also split over the columns, and the same h; the backward kernels read the bits (they were given a
    # wrong seed) and give the regenerating kernels' results
    want_bits = pd.pack_keep_bits(keep)
    assert got["bits"].dtype == torch.uint8 and got["bits"].shape == (x.shape[0], -(-x.shape[1] // 128) * 16)
    assert torch.equal(got["bits"], want_bits) and torch.equal(got["bits_3_splits"], want_bits)
    assert torch.equal(pd.unpack_keep_bits(got["bits"], x.shape[1]), keep)
    past = pd.bit_position(torch.arange(x.shape[1], -(-x.shape[1] // 128) * 128))  # the last group's padding
    assert not bool(((got["bits"][:, past[0]].int() >> past[1]) & 1).any())
    assert torch.equal(got["h_bits"], got["h"]) and torch.equal(got["h_bits_3_splits"], got["h_3_splits"])
    assert torch.equal(got["wgrad_bits"], got["wgrad"]) and torch.equal(
        got["wgrad_bits_3_splits"], got["wgrad_3_splits"]
    )
    assert torch.equal(got["grad_bits"], got["grad"]) and torch.equal(got["grad_add_bits"], got["grad_add"])


def test_keep_bits_are_counter_major_bytes() -> None:
    """Per row and 128-column group 16 bytes, byte c for the group's Philox counter c: bit 2 j + h of byte 16 g + c is
    column 128 g + 32 j + 2 c + h (output j's half h); widths that are not a multiple of 128 pad with 0 bits."""
    hand = [(0, 0, 0), (1, 0, 1), (2, 1, 0), (31, 15, 1), (32, 0, 2), (33, 0, 3), (127, 15, 7), (128, 16, 0)]
    hand += [(128 + 64 + 2 * 5 + 1, 16 + 5, 5), (2 * 128 + 32 + 2 * 5, 32 + 5, 2), (299, 32 + 5, 3)]
    for col, byte, bit in hand:  # (column, byte, bit) worked out by hand; 300 columns: 3 groups, 48 bytes
        assert pd.bit_position(torch.tensor(col)) == (byte, bit), col
        one = torch.zeros(1, 300, dtype=torch.bool)
        one[0, col] = True
        packed = pd.pack_keep_bits(one)
        assert packed.dtype == torch.uint8 and packed.shape == (1, 48)
        want = torch.zeros(1, 48, dtype=torch.uint8)
        want[0, byte] = 1 << bit
        assert torch.equal(packed, want), col
    # every column of a group: its own (byte, bit), each once, a counter's byte holding its 4 outputs x 2 halves
    byte, bit = pd.bit_position(torch.arange(128))
    assert len(set(zip(byte.tolist(), bit.tolist(), strict=True))) == 128
    offsets, which, half = pd.counter_layout(torch.zeros(128, dtype=torch.int64), torch.arange(128), 128)
    assert torch.equal(byte, offsets) and torch.equal(bit, 2 * which + half)
    assert [pd.bit_bytes(n) for n in (1, 128, 129, 257, 300, 3072)] == [16, 16, 32, 48, 48, 384]


@pytest.mark.parametrize("n_cols", [1, 70, 128, 130, 257, 300])
def test_keep_bits_pack_and_unpack_round_trip(n_cols: int) -> None:
    keep = pd.keep_mask_reference(SEED, 7, n_cols, 0.5)
    bits = pd.pack_keep_bits(keep)
    assert bits.dtype == torch.uint8 and bits.shape == (7, pd.bit_bytes(n_cols))
    assert torch.equal(pd.unpack_keep_bits(bits, n_cols), keep)
    byte, bit = pd.bit_position(torch.arange(n_cols))
    assert torch.equal(((bits[:, byte].int() >> bit) & 1).bool(), keep)  # each column at its (byte, bit)
    # the padding past n_cols: 0 bits, so the bytes are those of the mask padded with False to a group multiple
    padded = torch.zeros(7, -(-n_cols // 128) * 128, dtype=torch.bool)
    padded[:, :n_cols] = keep
    assert torch.equal(pd.pack_keep_bits(padded), bits)
    assert int(bits.int().sum()) > 0 and int(bits.max()) <= 255


def test_without_the_kernels_the_wrappers_write_and_read_the_bits_through_the_references() -> None:
    x, a = torch.randn(9, 70), torch.randn(16, 70) * 0.1
    out = pd.new_bits(9, 70, x.device)
    assert out.dtype == torch.uint8 and out.shape == (9, 16)
    h = pd.dropout_lora_a(x, a, P, SEED, bits=out)
    assert torch.equal(out, pd.pack_keep_bits(pd.keep_mask_reference(SEED, 9, 70, P)))
    assert torch.equal(h, pd.dropout_lora_a_reference(x, a, P, SEED))
    gh = torch.randn(9, 16)
    assert torch.equal(
        pd.dropout_lora_a_wgrad(x, gh, P, SEED + 1, bits=out), pd.dropout_lora_a_wgrad_reference(x, gh, P, SEED)
    )
    assert torch.equal(
        pd.dropout_grad(gh, a, P, SEED + 1, torch.float32, bits=out),
        pd.dropout_grad_reference(gh, a, P, SEED, torch.float32),
    )
    with pytest.raises(ValueError, match=r"keep bits must be a row-contiguous uint8 \(9, 16\)"):
        pd.dropout_grad(gh, a, P, SEED, torch.float32, bits=out[:, :8])
    with pytest.raises(ValueError, match=r"keep bits must be a row-contiguous uint8 \(9, 16\)"):
        pd.dropout_grad(gh, a, P, SEED, torch.float32, bits=out.to(torch.int32))


def _max_grad_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) == 8  # A and B of 2 x (o_proj, down_proj)
    return max(float((a["grads"][n] - b["grads"][n]).abs().max()) for n in a["grads"])


def test_fused_layers_in_philox_mode_are_the_eager_computation_with_the_reference_masks(
    interpreted: dict[str, Any],
) -> None:
    """A tiny Phi-3 with LoRA (dropout 0.1) on o_proj and down_proj, fused, Philox dropout: the loss and every
    LoRA gradient equal peft's eager forward whose dropout applies keep_mask_reference's mask for the same seeds."""
    ref = interpreted["model eager reference"]
    got = interpreted["model fused philox plain"]
    assert torch.allclose(got["loss"], ref["loss"], atol=1e-6)
    assert _max_grad_diff(got, ref) < 1e-6
    # and dropout happened: peft's own nn.Dropout masks (other random numbers) give another loss
    assert abs(float(interpreted["model peft nn.Dropout"]["loss"]) - float(ref["loss"])) > 1e-4


@pytest.mark.parametrize(
    "mode",
    [
        "transformers checkpoint, reentrant",
        "transformers checkpoint, non-reentrant",
        "offload.py CheckpointOffloader",
    ],
)
def test_checkpointing_recompute_draws_the_same_masks(interpreted: dict[str, Any], mode: str) -> None:
    """Under transformers' gradient checkpointing (torch's checkpoint, reentrant or not) and offload.py's
    CheckpointOffloader, the recomputed forward draws the same seeds: the gradients are the un-checkpointed ones."""
    plain = interpreted["model fused philox plain"]
    got = interpreted[f"model fused philox {mode}"]
    assert torch.equal(got["loss"], plain["loss"])
    assert _max_grad_diff(got, plain) == 0.0
    if "Offloader" in mode:
        assert got["offloaded"] >= 1  # a layer input went through the host copy
    # the check can fail: a checkpoint that does not restore the RNG state redraws other masks
    unpreserved = interpreted["model fused philox checkpoint without RNG state"]
    assert _max_grad_diff(unpreserved, plain) > 1e-4


@pytest.mark.parametrize(
    "mode",
    [
        "plain",
        "transformers checkpoint, reentrant",
        "transformers checkpoint, non-reentrant",
        "offload.py CheckpointOffloader",
    ],
)
def test_fused_layers_with_keep_bits_are_the_regenerating_ones(interpreted: dict[str, Any], mode: str) -> None:
    """BIT_MASKS (the default): the masks drawn in the forward and kept as bits give the loss and gradients of the
    regenerating mode, also where checkpointing recomputes the forward (the recompute writes the same bits)."""
    got, want = interpreted[f"model fused bits {mode}"], interpreted[f"model fused philox {mode}"]
    assert torch.equal(got["loss"], want["loss"])
    assert _max_grad_diff(got, want) == 0.0


@pytest.mark.parametrize("bits", [False, True])
def test_widened_layers_backward_through_their_buffer_is_the_separate_gemms(
    interpreted: dict[str, Any], bits: bool
) -> None:
    """qkv_proj and gate_up_proj widened (k_concat) with their backward through the same buffer (wide_backward):
    the Philox masks' term added into [g W | gh]'s first columns by the kernels, the loss and the adapters'
    gradients those of the separate GEMMs (fp32: to rounding)."""
    sep, wide = interpreted[f"model wide bits={bits} separate"], interpreted[f"model wide bits={bits} wide_backward"]
    assert torch.allclose(wide["loss"], sep["loss"], rtol=1e-6, atol=1e-6)
    assert set(wide["grads"]) == set(sep["grads"]) and len(sep["grads"]) == 8
    for name, grad in sep["grads"].items():
        assert torch.allclose(wide["grads"][name], grad, rtol=1e-4, atol=1e-6), name


def test_triton_skinny_products_at_dropout_0_are_pefts_forward(interpreted: dict[str, Any]) -> None:
    """TRITON_SKINNY (ORCH_CUDA_FASTPATH=+triton_skinny) at LoRA dropout 0: h = x A^T, A's gradient and the input
    gradient's LoRA term by the p = 0 kernels give peft's loss and LoRA gradients."""
    want, got = interpreted["model p0 peft"], interpreted["model p0 fused triton_skinny"]
    assert torch.allclose(got["loss"], want["loss"], atol=1e-6)
    assert len(got["grads"]) == len(want["grads"]) > 0
    assert _max_grad_diff(got, want) < 1e-6


def test_without_philox_the_fused_layers_keep_peft_masks(interpreted: dict[str, Any]) -> None:
    """ORCH_CUDA_FASTPATH=-philox_dropout (fused.PHILOX_DROPOUT off): native_dropout inside, its stored mask read
    by the Triton input-gradient kernel: the same loss and gradients as peft's forward with nn.Dropout."""
    peft_own = interpreted["model peft nn.Dropout"]
    got = interpreted["model fused native_dropout"]
    assert torch.allclose(got["loss"], peft_own["loss"], atol=1e-6)
    assert _max_grad_diff(got, peft_own) < 1e-6


def test_swiglu_down_in_philox_mode_is_the_eager_mlp_tail(interpreted: dict[str, Any]) -> None:
    """fused.swiglu_down (SwiGLU recomputed in the backward, the mask regenerated) against silu(gate) * up, then
    the peft layer with keep_mask_reference's mask: output, the gradient of u = [gate | up], A's and B's."""
    outs = interpreted["swiglu_down"]
    eager = outs["eager"]
    # also with the keep bits and u's gradient written over u (the MLP's own gate_up output)
    for fused in (outs["fused"], outs["fused bits, u overwritten"]):
        for name in ("out", "grad_u", "grad_A", "grad_B"):
            assert torch.allclose(fused[name], eager[name], atol=1e-5, rtol=1e-5), name
