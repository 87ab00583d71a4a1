"""LessIsMore's selection layer on the GPU: dense decode attention that also writes the pre-softmax
scores (the cache's ``dense_with_scores``), each head's top-k (``ops.topk_desc``, the reference's
own top-k rule) and the rank-major union with sinks and recent window, all with fixed output shapes,
no host synchronization, capturable in a CUDA graph.

The cache holds row b's tokens in slots 0..lengths[b]-1. The result is exactly the reference
``select`` whenever the kernel's scores equal ``grouped_scores`` bit for bit. They are the same fp32
dot products summed in another order, so on real data two scores within rounding of each other may
swap places; on data whose products and sums are exact in fp32 the sets are identical, ties and all
(the tests check that).

The union (``union_selection``) runs in five small kernels, all grids fixed by the shapes:
  over the heads' lists in rank-major order j = rank * H + head (tiles of 32 ranks x H heads):
  1. first[b, pos] = min j over the list entries at pos (atomic min);
  2. flag the first occurrences (first[b, pos] == j) and count them per tile;
  3. the first occurrence whose rank among them is k - 1 (tile prefix + cumsum over the flags) writes
     its j to thresh[b];
  then over the positions: a slot is ranked in iff first[b, pos] <= thresh[b] (exactly k of them)
  4. per block of slots, how many are in;
  5. each in-slot's place (block prefix + cumsum), written after the sinks, with the sinks and the
     recent window around them, or 0..n-1 when n <= budget.

The union reads each head's list in rank order and stops at the k-th distinct position, which on real
traces comes after a quarter to a third of the k ranks, past the prefix below in 0.3-0.7% of the
rows (``analysis.metrics.union_depth``). So the
layer's top-k orders only a prefix of each list (``union_prefix``: 1,024 of k = 1,536, the bitonic
sort of half the slots); a row whose prefix runs out of ranks before k positions is flagged by the
union, and a second top-k of all k ranks, whose programs return at once for the other rows, and a
second union pass over the flagged rows complete it. Both launches are always made (fixed shapes,
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

_RANKS = 32  # ranks per block of the list pass (x H heads)
_POSITIONS = 1024  # positions per block of the position pass


@triton.jit
def _blocks_before(BCOUNT, row, blk, NBLK_PAD: tl.constexpr):
    """Sum of the per-block counts of row ``row`` (NBLK_PAD entries a row) before block ``blk``."""
    offs = tl.arange(0, NBLK_PAD)
    return tl.sum(tl.load(BCOUNT + row * NBLK_PAD + offs, mask=offs < blk, other=0), 0)


@triton.jit
def _list_kernel(TOP, VAL, FIRST, FLAGS, BCOUNT, THRESH, ACTIVE, stride_tb, stride_th, stride_vb, stride_vh,
                 H, KK, L, K, PHASE: tl.constexpr, R: tl.constexpr, H_PAD: tl.constexpr, NBLK_PAD: tl.constexpr,
                 HAS_ACTIVE: tl.constexpr):
    """Ranks [blk*R, blk*R+R) of every head of row b, in list order j = rank * H + head.
    PHASE 0: first[pos] = min j. 1: flag the first occurrences (FLAGS[b, j]) and count them per block.
    2: THRESH[b] = the j of the K-th first occurrence of the row. HAS_ACTIVE: rows with ACTIVE[b] == 0
    are left alone."""
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    if HAS_ACTIVE:
        if tl.load(ACTIVE + b) == 0:
            return
    if PHASE == 2:
        j = blk * R * H + tl.arange(0, R * H_PAD)
        flags = tl.load(FLAGS + b * KK * H + j, mask=(j < (blk + 1) * R * H) & (j < KK * H), other=0).to(tl.int32)
        order = _blocks_before(BCOUNT, b, blk, NBLK_PAD) + tl.cumsum(flags, 0) - 1
        tl.store(THRESH + b + tl.zeros_like(order), j, mask=(flags == 1) & (order == K - 1))
    else:
        rank = blk * R + tl.arange(0, R)[:, None]
        head = tl.arange(0, H_PAD)[None, :]
        live = (rank < KK) & (head < H)
        pos = tl.load(TOP + b * stride_tb + head * stride_th + rank, mask=live, other=0)  # coalesced over ranks
        ok = live & (tl.load(VAL + b * stride_vb + head * stride_vh + rank, mask=live, other=float("-inf"))
                     > float("-inf"))
        j = rank * H + head
        first = FIRST + b * L + pos
        if PHASE == 0:
            tl.atomic_min(first, j, mask=ok)
        else:
            is_first = ok & (tl.load(first, mask=ok, other=-1) == j)
            tl.store(FLAGS + b * KK * H + j, is_first.to(tl.int8), mask=live)
            tl.store(BCOUNT + b * NBLK_PAD + blk, tl.sum(tl.sum(is_first.to(tl.int32), 1), 0))


@triton.jit
def _position_kernel(FIRST, THRESH, LEN, BCOUNT, OUT, COUNTS, ACTIVE, SHORT, L, budget, sinks, window, K, KOUT,
                     PHASE: tl.constexpr, BLOCK: tl.constexpr, NBLK_PAD: tl.constexpr, HAS_ACTIVE: tl.constexpr):
    """Slots [blk*BLOCK, +BLOCK) of row b; a slot is ranked in iff first[pos] <= THRESH[b]. PHASE 0:
    count them. 1: write them ascending after the sinks, and (block 0) the sinks, the recent window, the
    count and SHORT[b] (the lists ran out before K positions: THRESH[b] unset in a row past the budget).
    A row with n <= budget gets 0..n-1. Entries past the count repeat slot L - 1. HAS_ACTIVE: rows with
    ACTIVE[b] == 0 are left alone."""
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    if HAS_ACTIVE:
        if tl.load(ACTIVE + b) == 0:
            return
    pos = blk * BLOCK + tl.arange(0, BLOCK)
    n = tl.load(LEN + b).to(tl.int32)
    whole = n <= budget
    flags = ((pos < L) & (tl.load(FIRST + b * L + pos, mask=pos < L, other=2147483647) <= tl.load(THRESH + b))
             & (K > 0)).to(tl.int32)
    if PHASE == 0:
        tl.store(BCOUNT + b * NBLK_PAD + blk, tl.sum(flags, 0))
    else:
        order = _blocks_before(BCOUNT, b, blk, NBLK_PAD) + tl.cumsum(flags, 0) - 1
        tl.store(OUT + b * KOUT + sinks + order, pos.to(tl.int64), mask=(flags == 1) & ~whole)
        if blk == 0:
            for i0 in range(0, KOUT, BLOCK):
                i = i0 + tl.arange(0, BLOCK)
                fixed = tl.where(whole, tl.where(i < n, i, L - 1), tl.where(i < sinks, i, n - window + (i - sinks - K)))
                tl.store(OUT + b * KOUT + i, fixed.to(tl.int64),
                         mask=(i < KOUT) & (whole | (i < sinks) | (i >= sinks + K)))
            tl.store(COUNTS + b, tl.minimum(n, budget))
            tl.store(SHORT + b, ((tl.load(THRESH + b) < 0) & ~whole & (K > 0)).to(tl.int32))


def union_selection(top, values, lengths, length, budget, recent, sinks, deeper=None) -> Selection:
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
    Returns Selection(indices [B, min(budget, length)] int64 ascending, counts [B] int32).
    """
    b = lengths.shape[0]
    device = lengths.device
    k = budget - recent
    first = torch.full((b, length), 2147483647, device=device, dtype=torch.int32)
    thresh = torch.full((b,), -1, device=device, dtype=torch.int32)
    indices = torch.empty((b, min(budget, length)), device=device, dtype=torch.int64)
    counts = torch.empty((b,), device=device, dtype=torch.int32)
    short = torch.empty((b,), device=device, dtype=torch.int32)
    _union_pass(top, values, lengths, length, budget, recent, sinks, first, thresh, indices, counts, short)
    if deeper is not None and k > 0:
        # The second pass keeps ``first`` and ``thresh``: the whole lists hold the prefix at the same
        # list order j, so the minima only fall further, and a short row's thresh is still unset.
        values, top = deeper(short)
        # short stays the flags of the rows completed (its second write would race with its reads).
        _union_pass(top, values, lengths, length, budget, recent, sinks, first, thresh, indices, counts,
                    torch.empty_like(short), active=short)
    return Selection(indices=indices, counts=counts)


def _union_pass(top, values, lengths, length, budget, recent, sinks, first, thresh, indices, counts, short, active=None):
    """The five kernels of the union over these lists, for every row or (active) the flagged ones."""
    b = lengths.shape[0]
    device = lengths.device
    k = budget - recent
    has_active = active is not None
    flag_ptr = active if has_active else thresh  # an unused pointer without it
    if k > 0:
        h, kk = top.shape[1], top.shape[2]
        if top.stride(-1) != 1 or values.stride(-1) != 1:
            top, values = top.contiguous(), values.contiguous()
        nblk = triton.cdiv(kk, _RANKS)
        bcount = torch.empty((b, triton.next_power_of_2(nblk)), device=device, dtype=torch.int32)
        flags = torch.empty((b, kk * h), device=device, dtype=torch.int8)
        for phase in range(3):
            _list_kernel[(b, nblk)](
                top, values, first, flags, bcount, thresh, flag_ptr, top.stride(0), top.stride(1), values.stride(0),
                values.stride(1), h, kk, length, k, PHASE=phase, R=_RANKS, H_PAD=triton.next_power_of_2(h),
                NBLK_PAD=bcount.shape[1], HAS_ACTIVE=has_active,
            )
    nblk = triton.cdiv(length, _POSITIONS)
    bcount = torch.empty((b, triton.next_power_of_2(nblk)), device=device, dtype=torch.int32)
    for phase in range(2):
        _position_kernel[(b, nblk)](
            first, thresh, lengths, bcount, indices, counts, flag_ptr, short, length, budget, sinks, recent - sinks,
            max(k, 0), indices.shape[1], PHASE=phase, BLOCK=_POSITIONS, NBLK_PAD=bcount.shape[1], HAS_ACTIVE=has_active,
        )


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
