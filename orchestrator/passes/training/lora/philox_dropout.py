"""LoRA dropout whose mask is regenerated from a Philox seed inside Triton kernels instead of being stored.

Why: with `torch.native_dropout` (fused.py's other mode) a LoRA layer's forward reads its input x and writes a
dropped-out copy xd plus a bool mask, the skinny GEMM reads xd again, and the backward reads xd (A's gradient) and
the mask (the input gradient): per element of a LoRA input about 12 bytes of memory traffic, and the saved mask
alone is 1 byte per element (~4.5 GB over Phi-3-mini at 8 x 1024 tokens). Here one 64-bit seed per layer call
stands for the mask, and three kernels regenerate it where it is used:

- `dropout_lora_a(x, A, p, seed)`: h = dropout(x) @ A^T, reading x once (2 bytes per element);
- `dropout_lora_a_wgrad(x, gh, p, seed)`: A's gradient gh^T @ dropout(x), reading x again (2);
- `dropout_grad(gh, A, p, seed, dtype)` / `dropout_grad_add_(grad_x, ...)`: the LoRA path's input gradient
  (gh @ A) * keep / (1 - p), written once (2) or added into the base path's (4);
so ~6 bytes per element, no xd and no mask kept: the backward keeps x itself, which the layer's caller holds anyway.

Regenerating costs compute: the two backward kernels run about twice as long as their stored-mask counterparts on an
H100 (drawing the mask is integer arithmetic, see below). So each kernel also takes the mask as keep bits
(`bits`, a uint8 (n_rows, ceil(n_cols / 128) * 16) tensor, `new_bits`): `dropout_lora_a` draws the mask from the
seed and writes it there as well (1/16 of x's bytes), and the backward kernels read the bits instead of running
Philox. That keeps 1 bit per element instead of native_dropout's byte and its dropped-out copy, with the backward's
memory traffic of the stored mask (fused.py's BIT_MASKS). The bits are counter-major bytes (layout below): per row
and 128-column group 16 bytes, byte c for the group's Philox counter c, its bit 2 j + h the keep flag of the element
that output j's half h decides, column 128 g + 32 j + 2 c + h (`pack_keep_bits`; columns past n_cols are 0 bits).

The random numbers: Triton's Philox4x32 (`tl.randint4x`, the counter-based generator torch's own CUDA dropout uses
with 10 rounds) with PHILOX_ROUNDS = 7 rounds, keyed by the seed, the counter being a 64-bit offset (no overflow at
any tensor size). One Philox call gives four 32-bit outputs and each gives two 16-bit values (its low half, then its
high half), so one call draws eight elements: element (row, col) of an (n_rows, n_cols) input takes half `col % 2`
(0: the low 16 bits) of output `(col % 128) // 32` of the counter `row * W + (col // 128) * 16 + (col % 32) // 2`,
W = ceil(n_cols / 128) * 16 (128-column groups of four 32-column sub-tiles, which is how every kernel walks the
columns: a (rows, 16) tile of counters gives the group's four (rows, 32) sub-tiles, sub-tile j the interleaved low
and high halves of output j). An element is kept when its 16-bit value is >= THRESH = round(p * 65536)
(`drop_threshold`, computed on the host, an integer compare in the kernels): P(keep) = 1 - THRESH / 65536, i.e. p
quantized to a multiple of 1/65536 (off by at most 2^-17 < 7.7e-6; p = 0.05 drops with probability 3277 / 65536 =
0.0500031). Kept values are x * (1 / (1 - p)) in fp32, rounded once to x's dtype, as native_dropout rounds them. The
masks differ from native_dropout's (another generator), the distribution is the same up to that quantization.

Why 7 rounds and 16-bit values: the forward kernel drawing the mask and writing keep bits took 76 us against 38 us
at p = 0 for an 8192 x 3072 input on an H100 (187 against 74 us at 8192 x 8192;
bench/results/gpu_kernels/2026-12-07-h100-8b-tune.json), at 4x the memory floor whatever the launch shape: the
cost is Philox's arithmetic. Philox4x32-10 with four elements per call and tl.rand's float conversion is ~26 integer
operations per element; 7 rounds (the fewest that Random123's authors found Crush-resistant, Salmon et al., SC'11,
"Parallel random numbers: as easy as 1, 2, 3"; a dropout mask needs far less) and eight elements per call cut
Philox's share to 7/10 x 1/2 of it, ~9, plus ~3 to extract and compare a 16-bit value instead of converting to
float: by that count the mask is 2-3x cheaper to draw (bench/gpu_kernels.py's `philox` and `tune` steps measure it).
philox4x32_reference keeps Random123's 10-round known answers as its default (tests/test_lora_philox.py checks them).

Why counter-major bytes: with bit j of an int32 word w the flag of column 32 w + j (the previous format) the forward
writing bits took 77 us against 46 us regenerating (BITS 0) and 38 us at p = 0 for an 8192 x 3072 bf16 input, r=64,
on an H100 (190 / 110 / 75 us at 8192 x 8192): packing a word summed a (rows, 32) tile whose 32 lanes sit in other
threads, a cross-thread reduction per word, four per group. A counter's byte is made from its own four outputs in the
thread that drew them, and a row's 16 bytes of a group are one contiguous store; the readers load a (rows, 32) tile
of bytes per group (lane l reads byte l // 2, two lanes one byte, from L1) and shift out bit 2 j + l % 2.

`keep_mask_reference` is the pure-torch source of truth (bit-exact with the kernels: tests/test_lora_philox.py
runs them through Triton's interpreter, bench/gpu_kernels.py on the GPU), and every kernel has a torch reference of
the same arithmetic, which the wrappers run where the kernels do not apply (no Triton, CPU tensors outside the
interpreter, a rank tl.dot does not take).

The seed is a host integer (`draw_seed`: the CPU generator, no GPU sync). torch.utils.checkpoint restores the CPU
RNG state before a recompute (reentrant or not, and offload.py's checkpoint, which is torch's reentrant one), so a
recomputed forward draws the same seed and the same mask. Not for CUDA-graph capture: a host seed would be frozen
into the graph (fused.py keeps native_dropout there).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from orchestrator.passes.training.lora.kernels import dropout_grad_add_supported, ieee_dot, use_triton

GROUP = 128  # columns per Philox counter block: four sub-tiles of LANES columns share COUNTERS counters
LANES = 32
COUNTERS = LANES // 2  # counters per row of a group: each of a counter's 4 outputs gives 2 columns of a sub-tile
OUTPUTS = GROUP // LANES  # a counter's outputs a group uses, output j for sub-tile j (a keep-bits byte: 2 x 4 bits)
PHILOX_ROUNDS = 7  # the kernels' Philox rounds (Random123's Philox4x32-10 has 10; 7 is Crush-resistant)
HALF_BITS = 16  # the bits of one random value: each 32-bit Philox output gives two
HALF_RANGE = 1 << HALF_BITS
PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)  # Philox4x32's Weyl key increments
PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)  # Philox4x32's round multipliers
MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class PhiloxMask:
    """A dropout mask as the seed and probability that regenerate it, or with `bits` the keep bits drawn from them
    in the forward (fused.py passes it where a bool mask went)."""

    seed: int
    p: float
    bits: Any = field(default=None, compare=False)


@dataclass(frozen=True)
class Launch:
    """How one kernel is spread over the GPU: rows per program (`block`), programs aimed at per SM (`per_sm`, the
    split of the other axis: the forward's columns, A's gradient's tokens; 0 for the input gradient, whose grid is
    its tiles), warps per program and software-pipeline stages. bench/gpu_kernels.py's `tune` step times the
    candidates on the GPU; LAUNCH holds the measured choice."""

    block: int
    per_sm: int
    warps: int
    stages: int


# The tune step's picks on an H100 (bench/results/gpu_kernels/2026-12-07-h100-8b-tune.json, 8 x 1024 tokens, r=64,
# widths 3072 and 8192, keep bits and p = 0): the forward one program per 32 rows walking all columns (no column
# split: every split and block size within 3% of it), A's gradient 64 rows per step and two programs per SM (the
# same), the input gradient 128 rows and 8 warps per program (0.98x the time of 64 rows and 4 warps). The forward
# writing bits runs at 4x the memory floor whatever the shape (76 us against 18 at 8192 x 3072; 38 us at p = 0):
# drawing Philox's numbers and packing the bits is its cost, not how few programs run.
LAUNCH: dict[str, Launch] = {
    "lora_a": Launch(block=32, per_sm=1, warps=4, stages=3),
    "wgrad": Launch(block=64, per_sm=2, warps=4, stages=3),
    "grad": Launch(block=128, per_sm=0, warps=8, stages=1),
}
NO_DROPOUT = 3  # the kernels' BITS mode for p = 0: x itself, nothing drawn or read (plain skinny GEMMs)


def keep_scale(p: float) -> float:
    """1 / (1 - p), what kept elements are multiplied by (in fp32 inside the kernels)."""
    return 1.0 / (1.0 - p)


def draw_seed() -> int:
    """A fresh 62-bit seed from torch's CPU generator: no device sync, reproduced by checkpointing's recompute
    (which restores the CPU RNG state), and by torch.manual_seed / the Trainer's seed."""
    import torch

    return int(torch.randint(2**62, (), dtype=torch.int64))


# --------------------------------------------------------------------------------------------------------------
# The torch references (CPU or any device): Philox4x32 as triton.language.random computes it


def _mul_hi_lo(a: int, b: Any) -> tuple[Any, Any]:
    """(hi, lo) 32-bit halves of a * b for a constant a < 2^32 and an int64 tensor b of values < 2^32, exactly
    (b split in 16-bit halves so no intermediate leaves int64)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    t = a * b_lo  # < 2^48
    u = a * b_hi  # < 2^48
    hi = (u + (t >> 16)) >> 16
    lo = (((u & 0xFFFF) << 16) + t) & MASK32
    return hi, lo


def philox4x32_reference(
    key: tuple[int, int], c0: Any, c1: Any, c2: Any = None, c3: Any = None, rounds: int = 10
) -> tuple[Any, Any, Any, Any]:
    """Philox4x32 with `rounds` rounds (10: Salmon et al., Random123's philox4x32_10) of counters (c0, c1, c2, c3),
    int64 tensors of uint32 values, under key (k0, k1), as triton.language.random.philox_impl(n_rounds=rounds): four
    int64 tensors of uint32 values."""
    import torch

    zero = torch.zeros_like(c0)
    c2 = zero if c2 is None else c2
    c3 = zero if c3 is None else c3
    k0, k1 = key[0] & MASK32, key[1] & MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND[1], c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND[0], c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY[0]) & MASK32
        k1 = (k1 + PHILOX_KEY[1]) & MASK32
    return c0, c1, c2, c3


def randint4x_reference(seed: int, offsets: Any, rounds: int = PHILOX_ROUNDS) -> tuple[Any, Any, Any, Any]:
    """tl.randint4x(seed, offsets, n_rounds=rounds) for int64 offsets (the kernels' PHILOX_ROUNDS by default): the
    key is (seed low 32 bits, seed high 32 bits), the counter (offset low 32 bits, offset high 32 bits, 0, 0); four
    int64 tensors of uint32 values."""
    import torch

    seed = _check_seed(seed)
    offsets = offsets.to(torch.int64)
    if bool((offsets < 0).any()):
        raise ValueError("offsets must be >= 0")
    return philox4x32_reference((seed & MASK32, seed >> 32), offsets & MASK32, offsets >> 32, rounds=rounds)


def drop_threshold(p: float) -> int:
    """THRESH = round(p * 65536), what the kernels compare each element's 16-bit value with (kept where >= THRESH):
    P(keep) = 1 - THRESH / 65536, p quantized to a multiple of 1/65536 (error <= 2^-17 < 7.7e-6). p = 0 gives 0
    (every element kept), p = 0.05 gives 3277."""
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return round(p * HALF_RANGE)


def counter_layout(rows: Any, cols: Any, n_cols: int) -> tuple[Any, Any, Any]:
    """(Philox counter offset, which of its four outputs, which half: 0 the low 16 bits, 1 the high) of elements
    (rows, cols) of an input n_cols wide: counter row * W + (col // 128) * 16 + (col % 32) // 2 with
    W = ceil(n_cols / 128) * 16, output (col % 128) // 32, half col % 2."""
    import torch

    per_row = -(-n_cols // GROUP) * COUNTERS
    offsets = rows.to(torch.int64) * per_row + (cols // GROUP) * COUNTERS + (cols % LANES) // 2
    return offsets, (cols % GROUP) // LANES, cols % 2


def halves_block_reference(seed: int, n_rows: int, n_cols: int, device: Any = "cpu", row_start: int = 0) -> Any:
    """The (n_rows, n_cols) 16-bit values (int32 in [0, 65536)) the kernels draw for rows row_start.. of an input
    n_cols wide, bit-exact: each row's W counters drawn once, each column taking its (counter, output, half) of
    counter_layout."""
    import torch

    per_row = -(-n_cols // GROUP) * COUNTERS
    rows = torch.arange(row_start, row_start + n_rows, dtype=torch.int64, device=device)[:, None]
    counters = rows * per_row + torch.arange(per_row, dtype=torch.int64, device=device)[None, :]
    outs = torch.stack(randint4x_reference(seed, counters), dim=-1).reshape(n_rows, per_row * 4)
    cols = torch.arange(n_cols, dtype=torch.int64, device=device)
    local, which, half = counter_layout(torch.zeros_like(cols), cols, n_cols)  # the counter within the row
    words = outs[:, local * 4 + which]
    return ((words >> (HALF_BITS * half)) & (HALF_RANGE - 1)).to(torch.int32)


def keep_mask_reference(seed: int, n_rows: int, n_cols: int, p: float, device: Any = "cpu", row_start: int = 0) -> Any:
    """The bool keep mask (True: kept, probability 1 - drop_threshold(p) / 65536) the kernels regenerate for `seed`,
    bit-exact."""
    return halves_block_reference(seed, n_rows, n_cols, device, row_start) >= drop_threshold(p)


def bit_bytes(n_cols: int) -> int:
    """Bytes of keep bits per row of an input n_cols wide: 16 per 128-column group (one per Philox counter), n_cols / 8
    when n_cols is a multiple of 128."""
    return -(-n_cols // GROUP) * COUNTERS


def bit_position(col: Any) -> tuple[Any, Any]:
    """(byte within the row, bit within the byte) of column `col`'s keep flag: column 128 g + 32 j + 2 c + h (output
    j's half h of the group's counter c) is bit 2 j + h of byte 16 g + c."""
    return (col // GROUP) * COUNTERS + (col % LANES) // 2, 2 * ((col % GROUP) // LANES) + col % 2


def pack_keep_bits(keep: Any) -> Any:
    """A bool (n_rows, n_cols) keep mask as the kernels' keep bits: uint8 (n_rows, ceil(n_cols / 128) * 16), counter-
    major: bit 2 j + h of byte 16 g + c is column 128 g + 32 j + 2 c + h (columns past n_cols are 0)."""
    import torch

    n_rows, n_cols = keep.shape
    groups = -(-n_cols // GROUP)
    padded = torch.zeros((n_rows, groups * GROUP), dtype=torch.int32, device=keep.device)
    padded[:, :n_cols] = keep.to(torch.int32)
    # (row, group, j, c, h) -> (row, group, c, j, h): a counter's 8 flags, bit 2 j + h
    flags = padded.view(n_rows, groups, OUTPUTS, COUNTERS, 2).permute(0, 1, 3, 2, 4)
    flags = flags.reshape(n_rows, groups, COUNTERS, 2 * OUTPUTS)
    packed = (flags << torch.arange(8, device=keep.device, dtype=torch.int32)).sum(-1)
    return packed.to(torch.uint8).reshape(n_rows, groups * COUNTERS)


def unpack_keep_bits(bits: Any, n_cols: int) -> Any:
    """pack_keep_bits' inverse: the bool (n_rows, n_cols) keep mask."""
    import torch

    n_rows, groups = bits.shape[0], bits.shape[1] // COUNTERS
    shifts = torch.arange(8, device=bits.device, dtype=torch.int32)
    flags = (bits.to(torch.int32).view(n_rows, groups, COUNTERS, 1) >> shifts) & 1  # (row, group, c, 2 j + h)
    flags = flags.view(n_rows, groups, COUNTERS, OUTPUTS, 2).permute(0, 1, 3, 2, 4)  # (row, group, j, c, h)
    return flags.reshape(n_rows, groups * GROUP)[:, :n_cols].bool()


def new_bits(n_rows: int, n_cols: int, device: Any) -> Any:
    """An uninitialized keep-bits tensor for an (n_rows, n_cols) input, for dropout_lora_a to fill: uint8
    (n_rows, bit_bytes(n_cols)), 1 bit per element (n_cols rounded up to a multiple of 128)."""
    import torch

    return torch.empty((n_rows, bit_bytes(n_cols)), dtype=torch.uint8, device=device)


def _keep(seed: int, n_rows: int, n_cols: int, p: float, device: Any, bits: Any) -> Any:
    """The keep mask: read from `bits` where given, else regenerated from the seed."""
    if bits is not None:
        return unpack_keep_bits(bits, n_cols)
    return keep_mask_reference(seed, n_rows, n_cols, p, device)


def dropout_reference(x2: Any, p: float, seed: int, bits: Any = None) -> Any:
    """xd = x * keep * (1 / (1 - p)) computed in fp32 and rounded once to x's dtype (native_dropout's rounding)."""
    import torch

    keep = _keep(seed, x2.shape[0], x2.shape[1], p, x2.device, bits)
    return torch.where(keep, x2.float() * _f32(keep_scale(p)), 0.0).to(x2.dtype)


def dropout_lora_a_reference(x2: Any, a: Any, p: float, seed: int) -> Any:
    """h = dropout(x) @ A^T in x's dtype, accumulated in fp32 (a half-precision GEMM's rounding)."""
    return (dropout_reference(x2, p, seed).float() @ a.float().t()).to(x2.dtype)


def dropout_lora_a_wgrad_reference(x2: Any, gh: Any, p: float, seed: int, bits: Any = None) -> Any:
    """A's gradient gh^T @ dropout(x), (r, K) in fp32 (the mask from `bits` where given)."""
    return gh.to(x2.dtype).float().t() @ dropout_reference(x2, p, seed, bits).float()


def dropout_grad_reference(
    gh: Any, a: Any, p: float, seed: int, dtype: Any, grad_x: Any = None, bits: Any = None
) -> Any:
    """(gh @ A) * keep * (1 / (1 - p)) in fp32 (+ grad_x), rounded once to `dtype`: the LoRA path's input gradient."""
    import torch

    keep = _keep(seed, gh.shape[0], a.shape[1], p, gh.device, bits)
    lora = gh.to(dtype).float() @ a.to(dtype).float()
    out = torch.where(keep, lora * _f32(keep_scale(p)), 0.0)
    if grad_x is not None:
        out = out + grad_x.float()
    return out.to(dtype)


def _f32(value: float) -> Any:
    import torch

    return torch.tensor(value, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------
# The Triton kernels (their source: philox_triton.py)


@functools.lru_cache(maxsize=1)
def _kernels() -> Any:
    from orchestrator.passes.training.lora import philox_triton as k

    return {
        "lora_a": k.dropout_lora_a_kernel,
        "wgrad": k.dropout_lora_a_wgrad_kernel,
        "grad": k.dropout_grad_kernel,
        "halves": k.halves_kernel,
        "randint4x": k.randint4x_kernel,
    }


# --------------------------------------------------------------------------------------------------------------
# The wrappers: the kernel where it applies, the torch reference elsewhere


def kernels_apply(*tensors: Any, rank: int) -> bool:
    """True where the Philox kernels run for these tensors: Triton installed, CUDA tensors (or CPU tensors under
    Triton's interpreter), a rank tl.dot takes (the mask-reading kernel's limits), a floating dtype Triton takes."""
    import torch

    dtypes = {torch.float16, torch.bfloat16, torch.float32}
    return use_triton(*tensors) and dropout_grad_add_supported(rank) and all(t.dtype in dtypes for t in tensors)


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    return seed


def _sm_count(device: Any) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 4  # Triton's interpreter: a few programs keep the tests fast and still split the tokens


def _contiguous_rows(t: Any) -> Any:
    return t if t.stride(-1) == 1 else t.contiguous()


def _bits_args(bits: Any, fallback: Any, mode: int = 2) -> tuple[Any, int, int, int]:
    """(pointer tensor, bytes per row, row stride, BITS mode) for a kernel: `mode` with bits (1 written by the
    forward, 2 read by the backward), 0 and `fallback` as the unused pointer without."""
    if bits is None:
        return fallback, 0, 0, 0
    return bits, bits.shape[1], bits.stride(0), mode


def _check_bits(bits: Any, n_rows: int, n_cols: int) -> None:
    import torch

    width = bit_bytes(n_cols)
    if bits.dtype != torch.uint8 or tuple(bits.shape) != (n_rows, width) or bits.stride(-1) != 1:
        raise ValueError(f"keep bits must be a row-contiguous uint8 ({n_rows}, {width}) tensor, got {bits.dtype} "
                         f"{tuple(bits.shape)}")  # fmt: skip


def dropout_lora_a(x2: Any, a: Any, p: float, seed: int, bits: Any = None, splits: int | None = None) -> Any:
    """h (T, r) = dropout(x2) @ A^T in x2's dtype, the mask drawn from `seed`; x2 is read once. With `bits`
    (new_bits) the mask is also written there, for the backward kernels to read instead of regenerating it. p = 0:
    x2 @ A^T (no mask). The columns are split into `splits` ranges (default: LAUNCH's programs per SM), their fp32
    partial sums added before the one rounding to x2's dtype."""
    seed = _check_seed(seed)
    if bits is not None:
        _check_bits(bits, x2.shape[0], x2.shape[1])
    if not kernels_apply(x2, a, rank=a.shape[0]):
        if bits is not None:
            bits.copy_(pack_keep_bits(keep_mask_reference(seed, x2.shape[0], x2.shape[1], p, x2.device)))
        return dropout_lora_a_reference(x2, a, p, seed)
    import torch
    import triton

    x2, a = _contiguous_rows(x2), _contiguous_rows(a.to(x2.dtype))
    n_rows, n_cols = x2.shape
    rank = a.shape[0]
    launch = LAUNCH["lora_a"]
    block_m = 16 if x2.device.type == "cpu" else launch.block
    row_blocks = triton.cdiv(n_rows, block_m)
    groups = triton.cdiv(n_cols, GROUP)
    if splits is None:
        splits = triton.cdiv(launch.per_sm * _sm_count(x2.device), row_blocks)
    per_split = triton.cdiv(groups, max(1, min(splits, groups))) * GROUP
    splits = triton.cdiv(n_cols, per_split) if n_cols else 1
    h = x2.new_empty((n_rows, rank))
    out = h if splits == 1 else torch.empty((splits, n_rows, rank), device=x2.device, dtype=torch.float32)
    bits_t, n_bytes, stride_b, mode = _bits_args(bits, x2, mode=1)
    if p == 0 and bits is None:
        mode = NO_DROPOUT
    _kernels()["lora_a"][(row_blocks, splits)](
        x2, a, out, bits_t, n_rows, n_cols, n_bytes, per_split, x2.stride(0), a.stride(0),
        out.stride(0) if splits > 1 else 0, out.stride(-2), stride_b, seed, drop_threshold(p), keep_scale(p),
        R=rank, BLOCK_M=block_m, LANES=LANES, ROUNDS=PHILOX_ROUNDS, IEEE=ieee_dot(x2), BITS=mode,
        num_warps=_warps(launch, rank), num_stages=launch.stages,
    )  # fmt: skip
    if splits > 1:
        h.copy_(out.sum(0))  # fp32 sum of the splits, rounded once
    return h


def _warps(launch: Launch, rank: int) -> int:
    return max(launch.warps, 8) if rank > 64 else launch.warps


def dropout_lora_a_wgrad(x2: Any, gh: Any, p: float, seed: int, splits: int | None = None, bits: Any = None) -> Any:
    """A's gradient (r, K) fp32 = gh^T @ dropout(x2), the mask regenerated from `seed` or read from `bits`;
    parallel over 128-column groups and `splits` token ranges (default: enough programs for two per SM), partial
    sums added in fp32."""
    seed = _check_seed(seed)
    if bits is not None:
        _check_bits(bits, x2.shape[0], x2.shape[1])
    if not kernels_apply(x2, gh, rank=gh.shape[1]):
        return dropout_lora_a_wgrad_reference(x2, gh, p, seed, bits)
    import torch
    import triton

    x2, gh = _contiguous_rows(x2), _contiguous_rows(gh.to(x2.dtype))
    n_rows, n_cols = x2.shape
    rank = gh.shape[1]
    launch = LAUNCH["wgrad"]
    block_t = launch.block if x2.device.type == "cuda" else 16
    groups = triton.cdiv(n_cols, GROUP)
    if splits is None:
        splits = max(1, min(launch.per_sm * _sm_count(x2.device) // groups, n_rows // (4 * block_t)))
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, max(1, splits)), block_t) * block_t
    splits = triton.cdiv(n_rows, rows_per_split) if n_rows else 1
    out = torch.empty((splits, rank, n_cols), device=x2.device, dtype=torch.float32)
    bits_t, n_bytes, stride_b, mode = _bits_args(bits, x2)
    if p == 0 and bits is None:
        mode = NO_DROPOUT
    _kernels()["wgrad"][(groups, splits)](
        x2, gh, out, bits_t, n_rows, n_cols, n_bytes, rows_per_split, x2.stride(0), gh.stride(0), out.stride(0),
        out.stride(1), stride_b, seed, drop_threshold(p), keep_scale(p),
        R=rank, BLOCK_T=block_t, LANES=LANES, ROUNDS=PHILOX_ROUNDS, IEEE=ieee_dot(x2), BITS=mode,
        num_warps=_warps(launch, rank), num_stages=launch.stages,
    )  # fmt: skip
    return out[0] if splits == 1 else out.sum(0)


def dropout_grad(gh: Any, a: Any, p: float, seed: int, dtype: Any, bits: Any = None) -> Any:
    """A new (T, K) tensor (gh @ A) * keep / (1 - p) in `dtype`: the LoRA path's input gradient written once, for
    the base GEMM to accumulate into (fused.py's LoRA-first order); the mask from `bits` where given."""
    import torch

    seed = _check_seed(seed)
    if bits is not None:
        _check_bits(bits, gh.shape[0], a.shape[1])
    if not kernels_apply(gh, a, rank=gh.shape[1]) or dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return dropout_grad_reference(gh, a, p, seed, dtype, bits=bits)
    out = torch.empty((gh.shape[0], a.shape[1]), device=gh.device, dtype=dtype)
    return _run_grad(out, gh, a, p, seed, bits, accumulate=False)


def dropout_grad_add_(grad_x: Any, gh: Any, a: Any, p: float, seed: int, bits: Any = None) -> Any:
    """In place: grad_x (T, K) += (gh @ A) * keep / (1 - p) (sum in fp32, rounded once); returns grad_x."""
    seed = _check_seed(seed)
    if bits is not None:
        _check_bits(bits, grad_x.shape[0], grad_x.shape[1])
    if not kernels_apply(grad_x, gh, a, rank=gh.shape[1]) or grad_x.stride(-1) != 1:
        grad_x.copy_(dropout_grad_reference(gh, a, p, seed, grad_x.dtype, grad_x=grad_x, bits=bits))
        return grad_x
    return _run_grad(grad_x, gh, a, p, seed, bits, accumulate=True)


def _run_grad(out: Any, gh: Any, a: Any, p: float, seed: int, bits: Any, *, accumulate: bool) -> Any:
    import triton

    n_rows, n_cols = out.shape
    rank = gh.shape[1]
    gh, a = _contiguous_rows(gh.to(out.dtype)), _contiguous_rows(a.to(out.dtype))
    launch = LAUNCH["grad"]
    block_m = launch.block if out.device.type == "cuda" else 16
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, GROUP))
    bits_t, n_bytes, stride_b, mode = _bits_args(bits, out)
    if p == 0 and bits is None:
        mode = NO_DROPOUT
    _kernels()["grad"][grid](
        out, gh, a, bits_t, n_rows, n_cols, n_bytes, out.stride(0), gh.stride(0), a.stride(0), stride_b, seed,
        drop_threshold(p), keep_scale(p), R=rank, BLOCK_M=block_m, LANES=LANES, ROUNDS=PHILOX_ROUNDS,
        ACCUMULATE=accumulate, IEEE=ieee_dot(out), BITS=mode, num_warps=_warps(launch, rank),
        num_stages=launch.stages,
    )  # fmt: skip
    return out


def kernel_halves(seed: int, n_rows: int, n_cols: int, device: Any = "cpu", row_start: int = 0) -> Any:
    """The (n_rows, n_cols) 16-bit values (int32) the kernels draw for rows row_start.. of an input n_cols wide,
    computed by their own Philox helper (halves_block_reference's counterpart; any row_start, however far beyond
    2^31 elements: the tests and the GPU check compare the two there)."""
    import torch
    import triton

    out = torch.empty((n_rows, n_cols), device=device, dtype=torch.int32)
    block_m = 16
    _kernels()["halves"][(triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, GROUP))](
        out, int(row_start), n_rows, n_cols, _check_seed(seed), BLOCK_M=block_m, LANES=LANES, ROUNDS=PHILOX_ROUNDS
    )
    return out


def kernel_randint4x(seed: int, offsets: Any, rounds: int = PHILOX_ROUNDS) -> tuple[Any, Any, Any, Any]:
    """tl.randint4x(seed, offsets, n_rounds=rounds) for int64 offsets, run as a Triton kernel: four int64 tensors of
    uint32 values (randint4x_reference's ground truth)."""
    import torch
    import triton

    n = offsets.shape[0]
    out = torch.empty((4, n), device=offsets.device, dtype=torch.int32)
    _kernels()["randint4x"][(triton.cdiv(n, 64),)](
        out, offsets.to(torch.int64), n, _check_seed(seed), BLOCK=64, ROUNDS=rounds
    )
    words = out.to(torch.int64) & MASK32  # the uint32 outputs were stored as their int32 bit patterns
    return words[0], words[1], words[2], words[3]


__all__ = [
    "PhiloxMask",
    "draw_seed",
    "drop_threshold",
    "dropout_grad",
    "dropout_grad_add_",
    "dropout_lora_a",
    "dropout_lora_a_wgrad",
    "keep_mask_reference",
    "new_bits",
    "pack_keep_bits",
    "unpack_keep_bits",
]
