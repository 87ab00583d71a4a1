"""Exact top-k over the last dimension of fp32 scores, in Triton: ``naive.topk_desc``'s contract and
results bit for bit (values, indices, ties: equal scores go to the lower position).

Every float maps to an int32 key whose signed order is the float order (-0.0 gets +0.0's key, so the
two zeros tie). One program owns one row (its first ``n`` slots, n = lengths[b] or L; nothing past n is
read) and finds the kk = min(k, n) survivors:

1. group maxima: gm[j] = max over the positions p = j (mod M), M >= k a power of two. One read of the
   row, a float max per element. Interleaved groups keep the bound below tight when the large scores
   sit together (a hot span of up to M slots lands in M different groups).
2. a lower bound: at least kk group maxima >= t means at least kk entries >= t, so the kk-th largest
   entry T >= t. t_lo = the kk-th largest group maximum cut to its top 32 - gm_stop bits, found bit by
   bit (one block reduction per bit over gm in registers; bits the min and max of gm decide are free).
3. candidates: a second read of the row counts each thread's entries >= t_lo, one block scan gives
   each thread its first slot, and a third read (from L2) writes them there as (value bits, position)
   in one int64, to a per-row buffer of ``cap`` slots. For continuous data that is ~1.8 kk entries
   (k = 1536, L = 32K: ~2.7K of 32K, measured). Appending tile by tile instead took a block scan per
   tile: 184.0 against 174.2 us at B = 32 x 32K, k = 1024 (H100, same run).
4. T exactly: the kk-th largest candidate key, by a ternary search over the candidates held in
   registers; then how many are > T, so need = kk - that many ties at T to keep, and (only when ties
   are cut) the need-th lowest position among the ties, by a bit-by-bit search.
5. survivors as unique int64 composites (key, then position reversed, then a -0.0 bit) in a per-row
   [K_PAD] workspace; rows shorter than k get positions n, n+1, ... as -inf.
6. a bitonic ``tl.sort`` of the composites, descending = (score desc, position asc), decoded into
   values and int64 indices. With ``fused_sort=False`` (default only for k > 8192) ``torch.sort`` does
   this step instead. ``topk_positions`` (a per-head set, TidalDecode's) stores 2^31 - 1 - position
   instead and sorts it as int32: the positions ascending, for half the data the sort moves.

A buffer that overflows (more than ``cap`` candidates: heavy ties, say) is not an error: steps 4-5 then
read the row itself (slower, same result). No host synchronization and fixed shapes: every loop bound
that depends on the data is inside the kernel and the grid is (rows,), so the call can be captured in
a CUDA graph. Workspace per call (allocated by the call): [rows, cap] int64 candidates and
[rows, K_PAD] int64 survivors (K_PAD = next power of two >= k).

On the H200 (benchmarks/topk.py; B=32, H=32, L=32K, k=1536) the kernel takes ~290 us against
torch.topk's ~530 us. Measured by stage (8 warps): step 1 ~32 us (one read of the 128 MB at copy
speed), step 2 ~8 us, step 3 ~58 us, steps 4-5 ~85 us, the fused sort ~150 us; torch.sort of the
survivors costs about as much (int64 141 us; int32 stable 72 us). The sort is the largest single cost;
a kernel of its own sorting 1-4 rows per program measured 356-501 us in all (against 287 fused).
TidalDecode's k = 2047 as positions (``topk_positions``, B=32, L=16K): 215 us, against 882 us for the
previous group count's top-k then torch.sort and 435 us for torch.topk then torch.sort.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Imported for the flag, and because importing triton_decode patches the interpreter's loop bounds.
from lessismore.ops.triton_decode import INTERPRETED

_NONE = tl.constexpr(-2147483648)  # key of "no entry" (int32 min): below every float's key
_NEG_INF = tl.constexpr(-2139095041)  # key of -inf


@triton.jit
def _key(x):
    """fp32 -> int32, order-preserving under signed comparison; -0.0 and +0.0 both map to 0."""
    b = x.to(tl.int32, bitcast=True)
    key = b ^ ((b >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits
    return tl.where(b == -2147483648, 0, key)


@triton.jit
def _slots(hit):
    """Compaction slots for a [TW, E] tile of 0/1 laid out one row per thread (TW = the program's
    threads, the E columns in-thread): an exclusive prefix count in row-major order, and the total. Only
    the per-row totals are scanned across threads; a cumsum in position order runs a warp scan for each
    element a thread holds (~3x the instructions, measured in an earlier step 3)."""
    per = tl.sum(hit, 1)
    return (tl.cumsum(per, 0) - per)[:, None] + tl.cumsum(hit, 1) - hit, tl.sum(per, 0)


@triton.jit
def _hits(s_row, offs, n, t_f, MASKED: tl.constexpr):
    """The entries >= t_f among slots `offs` (a [TW, E] tile): (values, 0/1 int32). Masked slots load as
    NaN, which compares false."""
    if MASKED:
        x = tl.load(s_row + offs, mask=offs < n, other=float("nan"))
    else:
        x = tl.load(s_row + offs)
    return x, (x >= t_f).to(tl.int32)


@triton.jit
def _store_hits(s_row, offs, n, t_f, cc_row, first, MASKED: tl.constexpr):
    """Write the entries >= t_f among slots `offs` as (value bits << 32 | position) at each thread's next
    slots, from `first` on; returns the threads' next slots."""
    x, hit = _hits(s_row, offs, n, t_f, MASKED)
    slot = first[:, None] + tl.cumsum(hit, 1) - hit
    packed = (x.to(tl.int32, bitcast=True).to(tl.int64) << 32) | offs.to(tl.int64)
    tl.store(cc_row + slot, packed, mask=hit == 1)
    return first + tl.sum(hit, 1)


@triton.jit
def _count_row(t, thr, p, s_row, n, tile, STEP: tl.constexpr, TIES: tl.constexpr, STRICT: tl.constexpr):
    """The row itself, for an overflowed buffer: how many keys >= t (> t if STRICT), or with TIES how
    many keys == thr at positions < p. tile: offsets 0..STEP-1."""
    acc = tl.zeros_like(tile)
    for start in range(0, n, STEP):
        offs = start + tile
        key = _key(tl.load(s_row + offs, mask=offs < n, other=float("-inf")))
        if TIES:
            hit = (key == thr) & (offs < p)
        else:
            hit = (key > t) if STRICT else (key >= t)
        acc += ((offs < n) & hit).to(tl.int32)
    return tl.sum(acc)


@triton.jit
def _count(t, keys, s_row, n, over, tile, STEP: tl.constexpr, STRICT: tl.constexpr):
    """How many entries have key >= t (> t if STRICT), for t >= t_lo: over the candidates' keys (in
    registers), or over the row when the buffer overflowed."""
    res = n & 0
    if over:
        res = _count_row(t, t, n, s_row, n, tile, STEP, False, STRICT)
    else:
        res = tl.sum(((keys > t) if STRICT else (keys >= t)).to(tl.int32))
    return res


@triton.jit
def _composite(key, pos, x, BY_POS: tl.constexpr):
    """int64 whose descending order is (key descending, position ascending), unique per position:
    key << 32 | (2^31 - 1 - pos) << 1 | (x is -0.0), the last bit so that the value decodes bit-exact.
    BY_POS: 2^31 - 1 - pos alone (descending = position ascending; it fits in int32)."""
    if BY_POS:
        return (2147483647 - pos).to(tl.int64)
    neg_zero = (x.to(tl.int32, bitcast=True) == -2147483648).to(tl.int64)
    return (key.to(tl.int64) << 32) | ((2147483647 - pos).to(tl.int64) << 1) | neg_zero


@triton.jit
def _unkey(key, neg_zero=False):
    """The float of a key (_key is its own inverse on the bits; key 0 gives +0.0, or -0.0 if neg_zero)."""
    bits = tl.where(neg_zero, -2147483648, key ^ ((key >> 31) & 0x7FFFFFFF))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _decode(c):
    """(value fp32, position int64) of a _composite."""
    low = c - ((c >> 32) << 32)  # the low 32 bits, as a non-negative int64
    return _unkey((c >> 32).to(tl.int32), (low & 1) == 1), 2147483647 - (low >> 1)


@triton.jit
def _sorted_store(comp, val_ptr, idx_ptr, mask, BY_POS: tl.constexpr):
    """Sort composites along the last dimension (descending) and store them decoded: values and
    positions, or (BY_POS) the positions alone, as int32 keys (half the data the sort moves)."""
    if BY_POS:
        tl.store(idx_ptr, 2147483647 - tl.sort(comp.to(tl.int32), descending=True).to(tl.int64), mask=mask)
    else:
        value, pos = _decode(tl.sort(comp, descending=True))
        tl.store(val_ptr, value, mask=mask)
        tl.store(idx_ptr, pos, mask=mask)


@triton.jit(do_not_specialize=["K", "row_len", "cap"])
def _topk_kernel(
    S, LEN, ACTIVE, CC, COMP, VAL, IDX, L, row_len, K, rows_per_len, cap,
    HAS_LEN: tl.constexpr, HAS_ACTIVE: tl.constexpr, M: tl.constexpr, R: tl.constexpr, TW: tl.constexpr, E: tl.constexpr,
    CE: tl.constexpr, K_PAD: tl.constexpr, GM_STOP: tl.constexpr, SORT: tl.constexpr, BY_POS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_ACTIVE:
        if tl.load(ACTIVE + row // rows_per_len) == 0:
            return
    n = L
    if HAS_LEN:
        n = tl.minimum(tl.maximum(tl.load(LEN + row // rows_per_len).to(tl.int32), 0), L)
    kk = tl.minimum(K, n)
    s_tiles = S + row * L  # step 1's loads: 16 bytes wide (L's divisibility is known)
    # Steps 3-5 work in [TW, E] tiles, slot (t, e) = e * TW + t, one row per thread: through a row pointer
    # of unknown alignment (row_len == L, not specialized) their loads take that layout, the one of the
    # scattered stores, so no tile changes layout (through shared memory) on the way.
    s_row = S + row * row_len
    cc_row = CC + row * cap
    comp_row = COMP + row * K_PAD
    tile = tl.arange(0, TW)[:, None] + tl.arange(0, E)[None, :] * TW

    # 1. Interleaved group maxima (as floats: one max per element; groups with no slot stay -inf, which
    # cannot make the bound below too high). Whole tiles of R x M slots load unmasked (16-byte loads; a
    # mask at an arbitrary n would split them), the tail in rows of M, masked.
    gm_tile = tl.arange(0, R)[:, None] * M + tl.arange(0, M)[None, :]
    gm = tl.full([M], float("-inf"), tl.float32)
    n_tiles = n // (R * M) * (R * M)
    for start in range(0, n_tiles, R * M):
        gm = tl.maximum(gm, tl.max(tl.load(s_tiles + start + gm_tile), 0))
    for start in range(n_tiles, n, M):
        offs = start + tl.arange(0, M)
        gm = tl.maximum(gm, tl.load(s_tiles + offs, mask=offs < n, other=float("-inf")))
    gm = _key(gm)
    gm_lo = tl.min(gm, 0)
    gm_hi = tl.max(gm, 0)

    # 2. t_lo: the top bits of the kk-th largest group maximum. The search builds the threshold's bits
    # in unsigned order (u = key ^ int32 min) from the top; a threshold <= gm_lo passes without
    # counting (all M >= kk maxima are above it), one > gm_hi fails.
    p = gm_lo & 0
    for i in range(32 - GM_STOP):
        c = p | (tl.full([], 1, tl.int32) << (31 - i))  # int32: bit 31 is the sign bit
        t = c ^ _NONE
        take = t <= gm_lo
        if (t > gm_lo) & (t <= gm_hi):
            take = tl.sum((gm >= t).to(tl.int32), 0) >= kk
        p = tl.where(take, c, p)
    t_lo = p ^ _NONE

    # 3. Candidates (key >= t_lo) to the buffer, in thread order (not position order: step 4 settles ties
    # by position itself): one read counts each thread's hits, one block scan gives each thread its first
    # slot, and another read (from L2) writes them there (a scan per tile cost four barriers each).
    # The test is a float compare with t_lo's value: the same set (no NaN in the scores) for fewer
    # instructions than the key's.
    t_f = tl.where(t_lo <= _NEG_INF, float("-inf"), _unkey(t_lo))
    per = tl.zeros([TW], tl.int32)
    n_full = n // (E * TW) * (E * TW)
    for start in range(0, n_full, E * TW):
        per += tl.sum(_hits(s_row, start + tile, n, t_f, False)[1], 1)
    for start in range(n_full, n, E * TW):
        per += tl.sum(_hits(s_row, start + tile, n, t_f, True)[1], 1)
    cnt = tl.sum(per, 0)
    over = cnt > cap  # then steps 4-5 read the row instead
    if not over:
        first = tl.cumsum(per, 0) - per
        for start in range(0, n_full, E * TW):
            first = _store_hits(s_row, start + tile, n, t_f, cc_row, first, False)
        for start in range(n_full, n, E * TW):
            first = _store_hits(s_row, start + tile, n, t_f, cc_row, first, True)
    tl.debug_barrier()  # the buffer's slots were written by other threads of this program

    # 4. T, exact: the kk-th largest candidate key, by ternary search on [t_lo, gm_hi] (keys as
    # unsigned, in int64): each round counts the candidates >= two thresholds in one reduction (two
    # 16-bit counts in an int32; cap < 2^16), so ~15 dependent reductions instead of ~24 bit by bit.
    ct = tl.arange(0, TW)[:, None] + tl.arange(0, CE)[None, :] * TW
    live = (ct < cnt) & ~over
    packed = tl.load(cc_row + ct, mask=live, other=0)
    xs = (packed >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    poss = (packed & 0xFFFFFFFF).to(tl.int32)
    keys = tl.where(live, _key(xs), _NONE)
    lo = t_lo.to(tl.int64) + 2147483648  # count(key >= lo) >= kk
    hi = gm_hi.to(tl.int64) + 2147483648  # T <= hi
    while lo < hi:
        d = (hi - lo + 2) // 3
        a = (lo + d - 2147483648).to(tl.int32)
        b = (tl.minimum(lo + 2 * d, hi) - 2147483648).to(tl.int32)
        n_a = n & 0
        n_b = n & 0
        if over:
            n_a = _count_row(a, a, n, s_row, n, tile, E * TW, False, False)
            n_b = _count_row(b, b, n, s_row, n, tile, E * TW, False, False)
        else:
            both = tl.sum((keys >= a).to(tl.int32) + ((keys >= b).to(tl.int32) << 16))
            n_a = both & 0xFFFF
            n_b = (both >> 16) & 0xFFFF
        if n_b >= kk:
            lo = b.to(tl.int64) + 2147483648
        elif n_a >= kk:
            lo = a.to(tl.int64) + 2147483648
            hi = b.to(tl.int64) + 2147483647
        else:
            hi = a.to(tl.int64) + 2147483647
    thr = (lo - 2147483648).to(tl.int32)
    n_gt = _count(thr, keys, s_row, n, over, tile, E * TW, True)
    need = kk - n_gt  # ties at T to keep, lowest positions first
    n_eq = _count(thr, keys, s_row, n, over, tile, E * TW, False) - n_gt
    # The last tie kept: all of them, or the need-th lowest position among them, found bit by bit (the
    # largest p with fewer than `need` ties at positions < p).
    p_tie = n
    if need < n_eq:
        p_tie = n & 0
        for i in range(31):
            c = p_tie | (tl.full([], 1, tl.int32) << (30 - i))
            if c < n:
                below = n & 0
                if over:
                    below = _count_row(thr, thr, c, s_row, n, tile, E * TW, True, False)
                else:
                    below = tl.sum(((keys == thr) & (poss < c)).to(tl.int32))
                p_tie = tl.where(below < need, c, p_tie)

    # 5. The kk survivors, as composite keys: key > T, and the ties at T at positions <= p_tie.
    if over:
        n_sel = kk & 0
        for start in range(0, n, E * TW):
            offs = start + tile
            x = tl.load(s_row + offs, mask=offs < n, other=float("-inf"))
            key = _key(x)
            sel = (offs < n) & ((key > thr) | ((key == thr) & (offs <= p_tie)))
            slot, total = _slots(sel.to(tl.int32))
            tl.store(comp_row + n_sel + slot, _composite(key, offs, x, BY_POS), mask=sel)
            n_sel += total
    else:
        sel = live & ((keys > thr) | ((keys == thr) & (poss <= p_tie)))
        slot, total = _slots(sel.to(tl.int32))
        tl.store(comp_row + slot, _composite(keys, poss, xs, BY_POS), mask=sel)
    # Rows shorter than k (kk = n): slots n..k-1 hold positions n..k-1, which count as -inf; slots
    # k..K_PAD-1 hold the smallest int64, which sorts last.
    for start in range(kk, K_PAD, TW):
        j = start + tl.arange(0, TW)
        pad = _composite(tl.full([TW], _NEG_INF, tl.int32), j, tl.full([TW], float("-inf"), tl.float32), BY_POS)
        tl.store(comp_row + j, tl.where(j < K, pad, tl.full([TW], _NONE, tl.int64) << 32), mask=j < K_PAD)

    # 6. Sorted (descending composite = score descending, position ascending), decoded.
    if SORT:
        tl.debug_barrier()
        j = tl.arange(0, K_PAD)
        _sorted_store(tl.load(comp_row + j), VAL + row * K + j, IDX + row * K + j, j < K, BY_POS)


def default_cap(k: int, length: int) -> int:
    """Candidate slots per row: 2x k's power of two (continuous data with the default groups needs
    ~1.1-1.3 k), at most the row."""
    return min(length, 32768, max(1024, 2 * triton.next_power_of_2(k)))


def default_group(k: int, length: int) -> int:
    """Step 1's group count M: the power of two >= 4k/3 (at least 1024), at most the row's power of
    two. The bound is the kk-th largest of M group maxima, so M close to k makes it loose: for Gaussian
    scores in a 32K-slot row, k = 2047 has ~5.8 k candidates at M = 2048 (an overflow every time) and
    ~1.3 k at 4096; k = 1536 has ~1.8 k at M = 2048. More groups than that cost more in steps 1-2 than
    they save (H200, k = 1536: 288 us at M = 2048, 342 us at 8192)."""
    return max(16, min(triton.next_power_of_2(length), max(1024, triton.next_power_of_2(-(-4 * k // 3)))))


def _check(scores, k, lengths, active=None):
    if k < 0:
        raise ValueError(f"k={k} < 0")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    if lengths is not None and (scores.dim() < 2 or lengths.numel() != scores.shape[0]):
        raise ValueError("lengths: one entry per scores.shape[0] row, for scores of 2+ dimensions")
    if active is not None and (scores.dim() < 2 or active.numel() != scores.shape[0] or active.dtype != torch.int32):
        raise ValueError("active: one int32 entry per scores.shape[0] row, for scores of 2+ dimensions")


def _launch(scores, k, lengths, by_position, active=None, *, cap=None, fused_sort=None, group=None, gm_stop=16, gm_rows=None,
            block=4096, num_warps=16):
    """The kernels behind topk_desc and topk_positions, with their tuning and its defaults (see
    ``topk_desc``); returns (values or None, indices)."""
    length = scores.shape[-1]
    k = min(k, length)
    scores = scores.float()  # a no-op for fp32
    if lengths is not None:
        lengths = lengths.reshape(-1)
    lead = scores.shape[:-1]
    device = scores.device
    values = None if by_position else torch.empty((*lead, k), device=device, dtype=torch.float32)
    indices = torch.empty((*lead, k), device=device, dtype=torch.int64)
    if k == 0 or scores.numel() == 0:
        return values, indices
    s = scores.reshape(-1, length)
    if s.stride(-1) != 1 or s.stride(0) != length:
        s = s.contiguous()
    rows = s.shape[0]
    cap = default_cap(k, length) if cap is None else max(1, min(int(cap), length, 65535))
    group = default_group(k, length) if group is None else group
    if group < k or group & (group - 1):
        raise ValueError(f"group={group}: a power of two >= k={k}")
    k_pad = triton.next_power_of_2(k)
    fused_sort = k_pad <= 8192 if fused_sort is None else fused_sort  # past that: torch.sort
    threads = 32 * num_warps  # the tiles of steps 3-5 have one row per thread
    candidates = torch.empty((rows, cap), device=device, dtype=torch.int64)
    comp = torch.empty((rows, k_pad), device=device, dtype=torch.int64)
    has_len = lengths is not None
    out_values = indices if values is None else values  # an unused pointer when by_position
    has_active = active is not None
    if has_active:
        active = active.reshape(-1)
    _topk_kernel[(rows,)](
        s, lengths if has_len else s, active if has_active else s, candidates, comp, out_values, indices, length, length, k,
        rows // scores.shape[0] if has_len or has_active else 1, cap,
        HAS_LEN=has_len, HAS_ACTIVE=has_active, M=group, R=gm_rows or max(1, 8192 // group),
        TW=threads, E=max(1, block // threads), CE=max(1, triton.next_power_of_2(cap) // threads), K_PAD=k_pad,
        GM_STOP=gm_stop, SORT=fused_sort, BY_POS=by_position, num_warps=num_warps,
    )
    if fused_sort:
        return values, indices
    c = torch.sort(comp, dim=-1, descending=True).values[:, :k]  # the same decoding as _decode, in torch
    if by_position:
        indices.copy_((2147483647 - c).view(*lead, k))
        return values, indices
    key = (c >> 32).to(torch.int32)
    low = c & 0xFFFFFFFF
    bits = torch.where((low & 1) == 1, -2147483648, key ^ ((key >> 31) & 0x7FFFFFFF))
    values.copy_(bits.to(torch.int32).view(torch.float32).view(*lead, k))
    indices.copy_((2147483647 - (low >> 1)).view(*lead, k))
    return values, indices


def topk_desc(scores: torch.Tensor, k: int, lengths: torch.Tensor | None = None, active: torch.Tensor | None = None,
              **tuning):
    """``naive.topk_desc`` (same arguments, same results) for scores [..., L] on CUDA, or on CPU under
    the Triton interpreter; fp32 (other float dtypes are upcast first, as the reference does).
    Returns (values fp32 [..., k], indices int64 [..., k]); k > L gives all L.

    lengths (scores.shape[0] ints, int32 or int64): row b's candidates are positions < lengths[b].
    active (scores.shape[0] int32s, optional): rows b with active[b] == 0 are skipped, their outputs left
    unspecified (a fixed grid whose programs return at once: a data-dependent subset of the rows
    within a CUDA graph).
    Tuning (keywords; results do not depend on it; defaults in ``_launch``): cap, candidate slots per
    row (default ``default_cap``; held in registers in step 4, so keep it to a few thousand; at most
    65535); fused_sort, sort inside the kernel (default: when k <= 8192; a kernel of its own sorting
    1-4 rows per program measured slower) or else with torch.sort; group, step 1's M (default
    ``default_group``); gm_stop (16), low bits the bound of step 2 leaves out; gm_rows, rows of M slots
    per load of step 1 (default: 8192 slots a load); block (4096), slots per tile of steps 3 and 5;
    num_warps (16, measured fastest on the H200: 288 us against 335 at 8 and 473 at 4).
    """
    _check(scores, k, lengths, active)
    return _launch(scores, k, lengths, False, active, **tuning)


def topk_positions(scores: torch.Tensor, k: int, lengths: torch.Tensor | None = None, active: torch.Tensor | None = None,
                   **tuning) -> torch.Tensor:
    """``naive.topk_positions``: the positions of ``topk_desc``'s k entries, ascending (int64 [..., k]).
    The same kernel, sorting 32-bit positions instead of 64-bit (score, position) pairs. active and
    tuning as ``topk_desc``'s."""
    _check(scores, k, lengths, active)
    return _launch(scores, k, lengths, True, active, **tuning)[1]


__all__ = ["topk_desc", "topk_positions", "default_cap", "default_group", "INTERPRETED"]
