"""The Triton source of philox_dropout.py's kernels (philox_dropout.py imports it lazily, where Triton is
installed; without Triton this module imports and defines nothing, as every orch module must import everywhere).
Triton resolves a kernel's helper functions among the module's globals, hence a module of their own rather than a
closure. philox_dropout.py's docstring has the Philox counter layout (PHILOX_ROUNDS rounds, two 16-bit values per
32-bit output, eight elements per call), the integer threshold, the rounding and the keep bits' counter-major bytes
(written by the forward in BITS mode 1, one byte per Philox counter made in the thread that drew it, read by the
backward kernels in BITS mode 2); each kernel there has a torch reference of the same arithmetic."""

# ruff: noqa: ANN001, ANN202, N803 - Triton kernels: untyped pointer/scalar arguments, constexpr names in capitals

try:
    import triton
    import triton.language as tl
except ImportError:  # every orch module imports everywhere; philox_dropout.py loads the kernels only with Triton
    triton = None

if triton is not None:

    @triton.jit
    def _split16(o):
        # a (rows, LANES / 2) tile of 32-bit Philox outputs as the (rows, LANES) tile of their 16-bit halves, column
        # 2 i the low half of o[:, i], 2 i + 1 the high half (randint4x gives uint32, so >> is logical; the mask
        # after the shift keeps it right for a signed type too); int32 values in [0, 65536)
        return tl.interleave(o & 0xFFFF, (o >> 16) & 0xFFFF).to(tl.int32)

    @triton.jit
    def _outputs(seed, rows, c0, per_row, LANES: tl.constexpr, ROUNDS: tl.constexpr):
        # the four (rows, LANES / 2) tiles of 32-bit Philox outputs of the 128-column group starting at column c0 (a
        # multiple of 128): one Philox call per counter, c0 // 8 the group's first counter of a row, output j for
        # sub-tile j
        counters = tl.arange(0, LANES // 2)
        offsets = rows[:, None] * per_row + (c0 // 8 + counters)[None, :]
        o0, o1, o2, o3 = tl.randint4x(seed, offsets, n_rounds=ROUNDS)
        return o0, o1, o2, o3

    @triton.jit
    def _halves(seed, rows, c0, per_row, LANES: tl.constexpr, ROUNDS: tl.constexpr):
        # the four (rows, LANES) 16-bit tiles of the 128-column group at column c0, sub-tile j output j's halves
        o0, o1, o2, o3 = _outputs(seed, rows, c0, per_row, LANES, ROUNDS)
        return _split16(o0), _split16(o1), _split16(o2), _split16(o3)

    @triton.jit
    def _pair_keeps(o, thresh, col, n_cols):
        # the keep flags of a (rows, LANES / 2) tile of outputs' low and high halves, the low half of counter c
        # deciding column col[c] and the high half col[c] + 1 (columns past the input's width: False)
        lo = ((o & 0xFFFF).to(tl.int32) >= thresh) & (col < n_cols)[None, :]
        hi = (((o >> 16) & 0xFFFF).to(tl.int32) >= thresh) & ((col + 1) < n_cols)[None, :]
        return lo, hi

    @triton.jit
    def _bit(flag, shift: tl.constexpr):
        return flag.to(tl.int32) << shift

    @triton.jit
    def _draw_and_write(seed, bits_ptr, rows, row_ok, c0, n_cols, per_row, n_bytes, stride_b, thresh,
                        LANES: tl.constexpr, ROUNDS: tl.constexpr):  # fmt: skip
        # BITS 1: the group's four (rows, LANES) keep tiles, and its keep bits written as counter-major bytes: byte c
        # of the group (one per Philox counter) holds in bit 2 j + h the flag of output j's half h, i.e. of column
        # c0 + 32 j + 2 c + h. Each byte is made from one counter's four outputs in the thread that drew them (no
        # cross-lane reduction), the (rows, LANES / 2) tile of bytes stored at once (16 contiguous bytes per row)
        o0, o1, o2, o3 = _outputs(seed, rows, c0, per_row, LANES, ROUNDS)
        counters = tl.arange(0, LANES // 2)
        col = c0 + 2 * counters
        lo0, hi0 = _pair_keeps(o0, thresh, col, n_cols)
        lo1, hi1 = _pair_keeps(o1, thresh, col + LANES, n_cols)
        lo2, hi2 = _pair_keeps(o2, thresh, col + 2 * LANES, n_cols)
        lo3, hi3 = _pair_keeps(o3, thresh, col + 3 * LANES, n_cols)
        byte = (_bit(lo0, 0) | _bit(hi0, 1) | _bit(lo1, 2) | _bit(hi1, 3) | _bit(lo2, 4) | _bit(hi2, 5)
                | _bit(lo3, 6) | _bit(hi3, 7))  # fmt: skip
        idx = c0 // 8 + counters
        tl.store(bits_ptr + rows[:, None] * stride_b + idx[None, :], byte.to(tl.uint8),
                 mask=row_ok[:, None] & (idx < n_bytes)[None, :])  # fmt: skip
        return tl.interleave(lo0, hi0), tl.interleave(lo1, hi1), tl.interleave(lo2, hi2), tl.interleave(lo3, hi3)

    @triton.jit
    def _read_bits(bits_ptr, rows, row_ok, c0, n_bytes, stride_b, LANES: tl.constexpr):
        # BITS 2: the group's four (rows, LANES) keep tiles from its counter-major bytes: lane l of every sub-tile
        # reads byte c0 // 8 + l // 2 (two lanes share a byte, one (rows, LANES) load for the four sub-tiles), sub-tile
        # j takes its bit 2 j + l % 2
        lanes = tl.arange(0, LANES)
        idx = c0 // 8 + lanes // 2
        packed = tl.load(bits_ptr + rows[:, None] * stride_b + idx[None, :],
                         mask=row_ok[:, None] & (idx < n_bytes)[None, :], other=0).to(tl.int32)  # fmt: skip
        shift = (lanes % 2)[None, :]
        k0 = ((packed >> shift) & 1) != 0
        k1 = ((packed >> (shift + 2)) & 1) != 0
        k2 = ((packed >> (shift + 4)) & 1) != 0
        k3 = ((packed >> (shift + 6)) & 1) != 0
        return k0, k1, k2, k3

    @triton.jit
    def _keeps(seed, bits_ptr, rows, row_ok, c0, n_cols, per_row, n_bytes, stride_b, thresh, LANES: tl.constexpr,
               ROUNDS: tl.constexpr, BITS: tl.constexpr):  # fmt: skip
        # the four (rows, LANES) keep tiles of the 128-column group at column c0: drawn from Philox, kept where the
        # 16-bit value >= thresh (BITS 0; BITS 1 also writes them as keep bits, 16 bytes per row and group, columns
        # past the input's width written as 0), or read back from those bits (BITS 2)
        if BITS == 3:  # no dropout (p = 0): nothing drawn or read, placeholders _dropped never reads
            k0 = row_ok
            k1 = row_ok
            k2 = row_ok
            k3 = row_ok
        elif BITS == 2:
            k0, k1, k2, k3 = _read_bits(bits_ptr, rows, row_ok, c0, n_bytes, stride_b, LANES)
        elif BITS == 1:
            k0, k1, k2, k3 = _draw_and_write(seed, bits_ptr, rows, row_ok, c0, n_cols, per_row, n_bytes, stride_b,
                                             thresh, LANES, ROUNDS)  # fmt: skip
        else:
            h0, h1, h2, h3 = _halves(seed, rows, c0, per_row, LANES, ROUNDS)
            k0, k1, k2, k3 = h0 >= thresh, h1 >= thresh, h2 >= thresh, h3 >= thresh
        return k0, k1, k2, k3

    @triton.jit
    def _dropped(x_ptr, rows, row_ok, cols, n_cols, stride_x, keep, scale, BITS: tl.constexpr):
        # x * keep * scale in fp32, rounded once to x's dtype: one (rows, cols) tile of the dropped-out input (BITS 3,
        # no dropout: x itself)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
        return x if BITS == 3 else tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x_ptr.dtype.element_ty)

    @triton.jit
    def _mm(a, b, acc, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _a_tile_t(a_ptr, cols, n_cols, stride_a, ranks):
        # A^T (cols, ranks) of A (r, K)
        return tl.load(a_ptr + ranks[None, :] * stride_a + cols[:, None], mask=(cols < n_cols)[:, None], other=0.0)

    @triton.jit(do_not_specialize=["seed", "thresh"])
    def dropout_lora_a_kernel(
        x_ptr, a_ptr, h_ptr, bits_ptr, n_rows, n_cols, n_bytes, cols_per_split, stride_x, stride_a, stride_hs,
        stride_h, stride_b, seed, thresh, scale,
        R: tl.constexpr, BLOCK_M: tl.constexpr, LANES: tl.constexpr, ROUNDS: tl.constexpr, IEEE: tl.constexpr,
        BITS: tl.constexpr,
    ):  # fmt: skip
        # h[split, rows] = dropout(x[rows, split's columns]) @ A[:, split's columns]^T: one block of rows, the
        # split's 128-column groups walked in turn (BITS 1: the keep bits written too); with several splits h_ptr
        # holds fp32 partial sums the caller adds, with one it is h itself
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        split = tl.program_id(1)
        row_ok = rows < n_rows
        lanes = tl.arange(0, LANES)
        ranks = tl.arange(0, R)
        per_row = tl.cdiv(n_cols, 4 * LANES).to(tl.int64) * (LANES // 2)
        acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        c_start = split * cols_per_split
        c_end = tl.minimum(c_start + cols_per_split, n_cols)
        for c0 in range(c_start, c_end, 4 * LANES):
            k0, k1, k2, k3 = _keeps(seed, bits_ptr, rows, row_ok, c0, n_cols, per_row, n_bytes, stride_b, thresh,
                                    LANES, ROUNDS, BITS)  # fmt: skip
            cols = c0 + lanes
            acc = _mm(_dropped(x_ptr, rows, row_ok, cols, n_cols, stride_x, k0, scale, BITS),
                      _a_tile_t(a_ptr, cols, n_cols, stride_a, ranks), acc, IEEE)  # fmt: skip
            cols = c0 + LANES + lanes
            acc = _mm(_dropped(x_ptr, rows, row_ok, cols, n_cols, stride_x, k1, scale, BITS),
                      _a_tile_t(a_ptr, cols, n_cols, stride_a, ranks), acc, IEEE)  # fmt: skip
            cols = c0 + 2 * LANES + lanes
            acc = _mm(_dropped(x_ptr, rows, row_ok, cols, n_cols, stride_x, k2, scale, BITS),
                      _a_tile_t(a_ptr, cols, n_cols, stride_a, ranks), acc, IEEE)  # fmt: skip
            cols = c0 + 3 * LANES + lanes
            acc = _mm(_dropped(x_ptr, rows, row_ok, cols, n_cols, stride_x, k3, scale, BITS),
                      _a_tile_t(a_ptr, cols, n_cols, stride_a, ranks), acc, IEEE)  # fmt: skip
        base = h_ptr + split.to(tl.int64) * stride_hs
        tl.store(base + rows[:, None] * stride_h + ranks[None, :], acc.to(h_ptr.dtype.element_ty),
                 mask=row_ok[:, None])  # fmt: skip

    @triton.jit
    def _store_partial(out_ptr, acc, ranks, cols, n_cols, stride_r):
        tl.store(out_ptr + ranks[:, None] * stride_r + cols[None, :], acc, mask=(cols < n_cols)[None, :])

    @triton.jit(do_not_specialize=["seed", "thresh"])
    def dropout_lora_a_wgrad_kernel(
        x_ptr, gh_ptr, out_ptr, bits_ptr, n_rows, n_cols, n_bytes, rows_per_split, stride_x, stride_gh, stride_os,
        stride_or, stride_b, seed, thresh, scale,
        R: tl.constexpr, BLOCK_T: tl.constexpr, LANES: tl.constexpr, ROUNDS: tl.constexpr, IEEE: tl.constexpr,
        BITS: tl.constexpr,
    ):  # fmt: skip
        # out[split, :, group] = gh[split's rows]^T @ dropout(x[split's rows, group]): one 128-column group of A's
        # gradient over one range of tokens, in fp32 (the splits' partial sums are added by the caller)
        c0 = tl.program_id(0) * 4 * LANES
        split = tl.program_id(1)
        lanes = tl.arange(0, LANES)
        ranks = tl.arange(0, R)
        per_row = tl.cdiv(n_cols, 4 * LANES).to(tl.int64) * (LANES // 2)
        acc0 = tl.zeros((R, LANES), dtype=tl.float32)
        acc1 = tl.zeros((R, LANES), dtype=tl.float32)
        acc2 = tl.zeros((R, LANES), dtype=tl.float32)
        acc3 = tl.zeros((R, LANES), dtype=tl.float32)
        start = split * rows_per_split
        end = tl.minimum(start + rows_per_split, n_rows)
        for t0 in range(start, end, BLOCK_T):
            rows = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            row_ok = rows < end
            gh = tl.load(gh_ptr + rows[:, None] * stride_gh + ranks[None, :], mask=row_ok[:, None], other=0.0)
            ght = tl.trans(gh)
            k0, k1, k2, k3 = _keeps(seed, bits_ptr, rows, row_ok, c0, n_cols, per_row, n_bytes, stride_b, thresh,
                                    LANES, ROUNDS, BITS)  # fmt: skip
            acc0 = _mm(ght, _dropped(x_ptr, rows, row_ok, c0 + lanes, n_cols, stride_x, k0, scale, BITS),
                       acc0, IEEE)  # fmt: skip
            acc1 = _mm(ght, _dropped(x_ptr, rows, row_ok, c0 + LANES + lanes, n_cols, stride_x, k1, scale,
                                     BITS), acc1, IEEE)  # fmt: skip
            acc2 = _mm(ght, _dropped(x_ptr, rows, row_ok, c0 + 2 * LANES + lanes, n_cols, stride_x, k2, scale,
                                     BITS), acc2, IEEE)  # fmt: skip
            acc3 = _mm(ght, _dropped(x_ptr, rows, row_ok, c0 + 3 * LANES + lanes, n_cols, stride_x, k3, scale,
                                     BITS), acc3, IEEE)  # fmt: skip
        base = out_ptr + split.to(tl.int64) * stride_os
        _store_partial(base, acc0, ranks, c0 + lanes, n_cols, stride_or)
        _store_partial(base, acc1, ranks, c0 + LANES + lanes, n_cols, stride_or)
        _store_partial(base, acc2, ranks, c0 + 2 * LANES + lanes, n_cols, stride_or)
        _store_partial(base, acc3, ranks, c0 + 3 * LANES + lanes, n_cols, stride_or)

    @triton.jit
    def _grad_tile(gx_ptr, gh, a_ptr, rows, row_ok, cols, n_cols, stride_gx, stride_a, ranks, keep, scale,
                   ACCUMULATE: tl.constexpr, IEEE: tl.constexpr, BITS: tl.constexpr):  # fmt: skip
        col_ok = cols < n_cols
        a = tl.load(a_ptr + ranks[:, None] * stride_a + cols[None, :], mask=col_ok[None, :], other=0.0)
        acc = tl.dot(gh, a, input_precision="ieee") if IEEE else tl.dot(gh, a)
        out = acc if BITS == 3 else tl.where(keep, acc * scale, 0.0)  # BITS 3: no dropout
        ok = row_ok[:, None] & col_ok[None, :]
        ptrs = gx_ptr + rows[:, None] * stride_gx + cols[None, :]
        if ACCUMULATE:
            out += tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        tl.store(ptrs, out.to(gx_ptr.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=["seed", "thresh"])
    def dropout_grad_kernel(
        gx_ptr, gh_ptr, a_ptr, bits_ptr, n_rows, n_cols, n_bytes, stride_gx, stride_gh, stride_a, stride_b, seed,
        thresh, scale, R: tl.constexpr, BLOCK_M: tl.constexpr, LANES: tl.constexpr, ROUNDS: tl.constexpr,
        ACCUMULATE: tl.constexpr, IEEE: tl.constexpr, BITS: tl.constexpr,
    ):  # fmt: skip
        # grad_x[rows, group] (+)= (gh[rows] @ A[:, group]) * keep * scale, one 128-column group per program
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        c0 = tl.program_id(1) * 4 * LANES
        row_ok = rows < n_rows
        lanes = tl.arange(0, LANES)
        ranks = tl.arange(0, R)
        per_row = tl.cdiv(n_cols, 4 * LANES).to(tl.int64) * (LANES // 2)
        gh = tl.load(gh_ptr + rows[:, None] * stride_gh + ranks[None, :], mask=row_ok[:, None], other=0.0)
        k0, k1, k2, k3 = _keeps(seed, bits_ptr, rows, row_ok, c0, n_cols, per_row, n_bytes, stride_b, thresh, LANES,
                                ROUNDS, BITS)  # fmt: skip
        _grad_tile(gx_ptr, gh, a_ptr, rows, row_ok, c0 + lanes, n_cols, stride_gx, stride_a, ranks, k0, scale,
                   ACCUMULATE, IEEE, BITS)  # fmt: skip
        _grad_tile(gx_ptr, gh, a_ptr, rows, row_ok, c0 + LANES + lanes, n_cols, stride_gx, stride_a, ranks, k1,
                   scale, ACCUMULATE, IEEE, BITS)  # fmt: skip
        _grad_tile(gx_ptr, gh, a_ptr, rows, row_ok, c0 + 2 * LANES + lanes, n_cols, stride_gx, stride_a, ranks, k2,
                   scale, ACCUMULATE, IEEE, BITS)  # fmt: skip
        _grad_tile(gx_ptr, gh, a_ptr, rows, row_ok, c0 + 3 * LANES + lanes, n_cols, stride_gx, stride_a, ranks, k3,
                   scale, ACCUMULATE, IEEE, BITS)  # fmt: skip

    @triton.jit(do_not_specialize=["seed", "row_start"])
    def halves_kernel(out_ptr, row_start, n_rows, n_cols, seed, BLOCK_M: tl.constexpr, LANES: tl.constexpr,
                      ROUNDS: tl.constexpr):  # fmt: skip
        # the 16-bit values the kernels draw for rows row_start + (0 .. n_rows) of an input n_cols wide, through their
        # own _halves (the tests check the layout and the 64-bit offsets far beyond 2^31 elements against it)
        local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = row_start + local.to(tl.int64)
        c0 = tl.program_id(1) * 4 * LANES
        lanes = tl.arange(0, LANES)
        per_row = tl.cdiv(n_cols, 4 * LANES).to(tl.int64) * (LANES // 2)
        h0, h1, h2, h3 = _halves(seed, rows, c0, per_row, LANES, ROUNDS)
        base = out_ptr + local[:, None].to(tl.int64) * n_cols
        row_ok = (local < n_rows)[:, None]
        cols = c0 + lanes
        tl.store(base + cols[None, :], h0, mask=row_ok & (cols < n_cols)[None, :])
        cols = c0 + LANES + lanes
        tl.store(base + cols[None, :], h1, mask=row_ok & (cols < n_cols)[None, :])
        cols = c0 + 2 * LANES + lanes
        tl.store(base + cols[None, :], h2, mask=row_ok & (cols < n_cols)[None, :])
        cols = c0 + 3 * LANES + lanes
        tl.store(base + cols[None, :], h3, mask=row_ok & (cols < n_cols)[None, :])

    @triton.jit(do_not_specialize=["seed"])
    def randint4x_kernel(out_ptr, offsets_ptr, n, seed, BLOCK: tl.constexpr, ROUNDS: tl.constexpr):
        # tl.randint4x(seed, offsets, n_rounds=ROUNDS) itself at int64 offsets, its four uint32 outputs stored as
        # int32 bit patterns in rows 0..3 of out (the tests check randint4x_reference against it)
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        offsets = tl.load(offsets_ptr + i, mask=ok, other=0)
        o0, o1, o2, o3 = tl.randint4x(seed, offsets, n_rounds=ROUNDS)
        tl.store(out_ptr + i, o0.to(tl.int32, bitcast=True), mask=ok)
        tl.store(out_ptr + n + i, o1.to(tl.int32, bitcast=True), mask=ok)
        tl.store(out_ptr + 2 * n + i, o2.to(tl.int32, bitcast=True), mask=ok)
        tl.store(out_ptr + 3 * n + i, o3.to(tl.int32, bitcast=True), mask=ok)
