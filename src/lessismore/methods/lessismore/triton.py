"""LessIsMore's selection layer on the GPU: dense decode attention that also writes the pre-softmax
scores (the cache's ``dense_with_scores``), each head's top-k (``ops.topk_desc``, the reference's
own top-k rule) and the rank-major union with sinks and recent window, all with fixed output shapes,
no host synchronization, capturable in a CUDA graph.

The cache holds row b's tokens in slots 0..lengths[b]-1. The result is exactly the reference
``select`` whenever the kernel's scores equal ``grouped_scores`` bit for bit. They are the same fp32
dot products summed in another order, so on real data two scores within rounding of each other may
swap places; on data whose products and sums are exact in fp32 the sets are identical, ties and all
(the tests check that).

The union (``union_selection``) is one kernel, one program per row (fixed grid). It walks the heads'
lists in rank-major order j = rank * H + head, a tile of ranks x heads at a time, and stops at the
tile that brings the k-th distinct position: each entry claims its position in a bitmap of the row
(atomic or), the last tile settles which of its new positions come first in list order (atomic min
of j), and the bitmap's set bits, ascending, are the ranked part, written after the sinks with the
recent window behind them (or 0..n-1 when n <= budget).

The union reads each head's list in rank order and stops at the k-th distinct position, which on real
traces comes after a quarter to a third of the k ranks, past the prefix below in 0.3-0.7% of the
rows (``analysis.metrics.union_depth``). So the
layer's top-k orders only a prefix of each list (``union_prefix``: 1,024 of k = 1,536, the bitonic
sort of half the slots); a row whose prefix runs out of ranks before k positions is flagged by the
union, and a second top-k of all k ranks, whose programs return at once for the other rows, and a
second union pass redoes those rows from their whole lists. Both launches are always made (fixed shapes,
no host look); the set is the same either way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lessismore.config import SparseConfig
from lessismore.methods.base import Selection
from lessismore.methods.lessismore import union_prefix
from lessismore import ops

# List entries (ranks x heads) per step of the union, and its warps: the fastest of tiles 1024-8192 x 8 or 16
# warps on random, partly agreeing and identical heads' lists (H100, benchmarks/kernels.py --union-sweep,
# docs/performance.md): 2048 and 8 warps, 19.7 / 30.5 / 102.5 us at 32 x 32K against 33.9 / 38.8 / 109.8
# for 4096 and 16 warps.
_TILE = 2048
_NUM_WARPS = 8
_WORDS = 1024  # words of the position bitmap per step of its scan


@triton.jit
def _list_tile(top_row, val_row, r0, rank, head, KK, H):
    """Positions and realness of ranks [r0, r0 + R) of every head (a [R, H_PAD] tile of list order)."""
    r = r0 + rank
    live = (r < KK) & (head < H)
    pos = tl.load(top_row + r, mask=live, other=0).to(tl.int32)  # coalesced over ranks
    ok = live & (tl.load(val_row + r, mask=live, other=float("-inf")) > float("-inf"))
    return pos, ok


@triton.jit
def _popcount(x):
    """Set bits of each int32 (arithmetic shifts: every mask clears the bits they smear)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = x + (x >> 8)
    return (x + (x >> 16)) & 0x3F


@triton.jit
def _union_kernel(TOP, VAL, LEN, ACTIVE, FIRST, SEEN, OUT, COUNTS, SHORT, stride_tb, stride_th, stride_vb, stride_vh,
                  H, KK, L, NW, budget, sinks, window, K, KOUT, R: tl.constexpr, H_PAD: tl.constexpr,
                  WB: tl.constexpr, HAS_LISTS: tl.constexpr, HAS_ACTIVE: tl.constexpr):
    """Row b's set (see union_selection). The ranked part: the lists' tiles in list order, each entry
    claiming its position in the row's bitmap SEEN (atomic or: exactly one entry per new position
    sees its bit unset) until K positions are claimed; in the tile that passes K the new positions'
    first list index comes from an atomic min over FIRST and the positions past the K-th are given
    back. FIRST needs no clearing: claimants of earlier tiles mark their positions -1 and those of the
    last tile +inf before the min, and only new positions are read. Then the bitmap's set bits,
    ascending, after the sinks. HAS_ACTIVE: rows with ACTIVE[b] == 0 are left alone."""
    b = tl.program_id(0).to(tl.int64)
    if HAS_ACTIVE:
        if tl.load(ACTIVE + b) == 0:
            return
    n = tl.load(LEN + b).to(tl.int32)
    whole = n <= budget
    out_row = OUT + b * KOUT
    # Sinks and the recent window around the ranked slots, or 0..n-1 (then slot L - 1) for a whole row.
    for i0 in range(0, KOUT, WB):
        i = i0 + tl.arange(0, WB)
        fixed = tl.where(whole, tl.where(i < n, i, L - 1), tl.where(i < sinks, i, n - window + (i - sinks - K)))
        tl.store(out_row + i, fixed.to(tl.int64), mask=(i < KOUT) & (whole | (i < sinks) | (i >= sinks + K)))
    tl.store(COUNTS + b, tl.minimum(n, budget))
    total = n & 0
    if HAS_LISTS:
        if (~whole) & (K > 0):
            seen_row = SEEN + b * NW
            first_row = FIRST + b * L
            for w0 in range(0, NW, WB):
                w = w0 + tl.arange(0, WB)
                tl.store(seen_row + w, tl.zeros([WB], tl.int32), mask=w < NW)
            tl.debug_barrier()  # the bitmap is clear before any thread claims a bit
            rank = tl.arange(0, R)[:, None]
            head = tl.arange(0, H_PAD)[None, :]
            top_row = TOP + b * stride_tb + head * stride_th
            val_row = VAL + b * stride_vb + head * stride_vh
            pos, ok = _list_tile(top_row, val_row, 0, rank, head, KK, H)
            r0 = n & 0
            while (total < K) & (r0 < KK):
                word = seen_row + (pos >> 5)
                bit = tl.full([R, H_PAD], 1, tl.int32) << (pos & 31)
                old = tl.atomic_or(word, bit, mask=ok, sem="relaxed")
                claim = ok & ((old & bit) == 0)
                claimed = tl.sum(tl.sum(claim.to(tl.int32), 1), 0)
                next_pos, next_ok = _list_tile(top_row, val_row, r0 + R, rank, head, KK, H)  # in flight meanwhile
                if total + claimed <= K:
                    tl.store(first_row + pos, tl.full([R, H_PAD], -1, tl.int32), mask=claim)
                    total += claimed
                else:
                    # The last tile: keep its first K - total new positions in list order.
                    tl.store(first_row + pos, tl.full([R, H_PAD], 2147483647, tl.int32), mask=claim)
                    tl.debug_barrier()
                    j = (r0 + rank) * H + head
                    tl.atomic_min(first_row + pos, j, mask=ok, sem="relaxed")
                    tl.debug_barrier()
                    is_first = ok & (tl.load(first_row + pos, mask=ok, other=-1, cache_modifier=".cg") == j)
                    flags = is_first.to(tl.int32)
                    per = tl.sum(flags, 1)
                    order = (tl.cumsum(per, 0) - per)[:, None] + tl.cumsum(flags, 1)  # inclusive, in list order
                    tl.atomic_xor(word, bit, mask=is_first & (order > K - total), sem="relaxed")
                    total = K + 0 * total
                pos, ok = next_pos, next_ok
                r0 += R
            tl.debug_barrier()  # every claim and give-back is done
            # The bitmap's set bits, ascending: each word's place from a scan of the words' counts.
            base = n & 0
            for w0 in range(0, NW, WB):
                w = w0 + tl.arange(0, WB)
                bits = tl.load(seen_row + w, mask=w < NW, other=0, cache_modifier=".cg")
                cnt = _popcount(bits)
                place = base + tl.cumsum(cnt, 0) - cnt + sinks
                for i in tl.static_range(32):
                    hit = ((bits >> i) & 1) == 1
                    tl.store(out_row + place, (w * 32 + i).to(tl.int64), mask=hit)
                    place += hit.to(tl.int32)
                base += tl.sum(cnt, 0)
    tl.store(SHORT + b, ((total < K) & ~whole).to(tl.int32))


def union_selection(top, values, lengths, length, budget, recent, sinks, deeper=None, *, tile=_TILE,
                    num_warps=_NUM_WARPS) -> Selection:
    """The LessIsMore set from each head's top list, as ``lessismore_mask`` + ``mask_to_selection``
    compute it for a contiguous cache (valid slots 0..lengths[b]-1 of ``length``).

    top [B, H, kk] int (positions, each head's list in descending score order), values [B, H, kk]
    (-inf marks entries that are not real), both from ``topk`` over scores masked to the middle slots;
    ``recent`` is R (sinks included), ``sinks`` the sinks kept. None, None when budget == recent.
    The lists may be a prefix of each head's top-(budget - recent) (kk smaller): the union reads
    ranks in order, so a row whose prefix holds k distinct positions has its set. The rows whose
    prefix runs out are completed by ``deeper(rows)``, which gets their [B] int32 flags and returns
    (values, top) of the whole lists (only the flagged rows are read); it is called once, on the
    device, whether or not a row ran out.
    tile: list entries per step (ranks x heads, a power of two; the set does not depend on it);
    num_warps: the program's (one program per row).
    Returns Selection(indices [B, min(budget, length)] int64 ascending, counts [B] int32).
    """
    b = lengths.shape[0]
    device = lengths.device
    k = budget - recent
    indices = torch.empty((b, min(budget, length)), device=device, dtype=torch.int64)
    counts = torch.empty((b,), device=device, dtype=torch.int32)
    short = torch.empty((b,), device=device, dtype=torch.int32)
    words = triton.cdiv(length, 32)
    scratch = (torch.empty((b, length), device=device, dtype=torch.int32),  # FIRST: no clearing needed
               torch.empty((b, words), device=device, dtype=torch.int32))  # SEEN: cleared by the kernel

    def run(top, values, short, active=None):
        has_lists = top is not None and k > 0
        h, kk = (top.shape[1], top.shape[2]) if has_lists else (1, 0)
        if has_lists and (top.stride(-1) != 1 or values.stride(-1) != 1):
            top, values = top.contiguous(), values.contiguous()
        h_pad = triton.next_power_of_2(h)
        lists = (top, values) if has_lists else (indices, indices)  # unused pointers without lists
        _union_kernel[(b,)](
            *lists, lengths, active if active is not None else short, *scratch, indices, counts, short,
            lists[0].stride(0), lists[0].stride(1) if has_lists else 0, lists[1].stride(0),
            lists[1].stride(1) if has_lists else 0, h, kk, length, words, budget, sinks, recent - sinks,
            max(k, 0), indices.shape[1], R=max(1, tile // h_pad), H_PAD=h_pad, WB=_WORDS, HAS_LISTS=has_lists,
            HAS_ACTIVE=active is not None, num_warps=num_warps,
        )

    run(top, values, short)
    if deeper is not None and k > 0:
        values, top = deeper(short)
        # short stays the flags of the rows completed (its second write would race with its reads).
        run(top, values, torch.empty_like(short), active=short)
    return Selection(indices=indices, counts=counts)


def fused_attention(cfg: SparseConfig, q, cache, scale=None, prefix=None):
    """The selection layer as ``Method.fused_attention``: (dense attention output [B, Hq, D] in q's
    dtype, finish), ``finish()`` giving the set of ``methods.get("lessismore").select`` over the
    cache's tokens from the attention's scores (top-k and union); None when ``cache`` (a
    ``decode.DecodeCache`` the kernels read) cannot give scores. prefix: the ranks sorted first
    (default ``union_prefix``; the set does not depend on it)."""
    recent, sinks = cfg.recent_share, cfg.effective_sinks
    length, lengths = cache.span, cache.lengths
    if cfg.budget <= recent:  # nothing ranked: no scores needed
        return cache.dense(q, scale), lambda: union_selection(None, None, lengths, length, cfg.budget, recent, sinks)
    found = cache.dense_with_scores(q, scale, sinks, recent - sinks)
    if found is None:
        return None
    out, scores = found
    kk = min(cfg.budget - recent, length)
    depth = min(union_prefix(kk) if prefix is None else prefix, kk)

    def deeper(rows):
        return ops.topk_desc(scores, kk, lengths, active=rows, triton=cache.kernels)

    def finish():
        values, top = ops.topk_desc(scores, depth, lengths, triton=cache.kernels)
        return union_selection(top, values, lengths, length, cfg.budget, recent, sinks, deeper if depth < kk else None)

    return out, finish


def fused_select(cfg: SparseConfig, q, cache, scale=None, prefix=None):
    """``fused_attention`` in one call: (dense attention output, Selection), or None."""
    found = fused_attention(cfg, q, cache, scale, prefix)
    return None if found is None else (found[0], found[1]())


__all__ = ["fused_attention", "fused_select", "union_selection"]
