"""Quest's decode-step selection in Triton kernels, each the same contract as its reference in
``naive`` (``quest_fold``, ``quest_page_scores``, ``quest_page_positions``, ``quest_select``).

The PyTorch path runs ~60 small kernels per sparse layer (gathers, casts, masked fills, two sorts),
launch-bound at any context: on the H200 at B=8 and ~600 tokens of context Quest's step took 11.05 ms
against LessIsMore's 5.58 (2,625 kernels a step against 509). Here a layer is four launches: fold,
scores, the shared Triton top-k, positions (821 kernels, 7.15 ms; docs/performance.md).

* ``quest_fold``: slot n-2 of each row folded into its page's key min and max (exact: min and max of
  values of the bounds' dtype).
* ``quest_page_scores``: sum_d max(q_d*lo_d, q_d*hi_d) in fp32 per query head and page, the current
  page (holding token n-1) +inf, pages past it -inf. Its summation order is the kernel's own, so it
  matches the reference to rounding only (exactly on inputs whose sums are exact); both of Quest's
  paths call it with bounds of one dtype, so on one device they agree bit for bit.
* ``quest_page_positions``: each head's pages sorted ascending (in registers), expanded to their
  positions, those >= n replaced by n-1 and counted out.
* ``quest_select``: the top pages and their positions in one launch (the engine's path): the exact
  top-k of a head's page scores by radix select in registers, then the taken pages in page order.
  ``ops.topk_desc`` (built for 16K-128K-slot rows) spent ~19 µs a layer on rows of ~1K pages
  (H200, B = 8 at 16K), most of it ~30 dependent block reductions. H100, top 128 of 32 heads'
  pages (``benchmarks/quest_select.py``): 14.8 / 41.0 µs at B = 8 / 32 and 1K pages, against 24.9 /
  88.8 for the top-k then the positions; at 2K pages (twice the registers and the page pass) 25.1 / 76.8
  against 25.0 / 90.2. Those rows fill the cache; rows at half of it, a long generation's average,
  take 11.3 / 31.1 µs at 1K pages, since the kernel reads only the pages below max(used, take).

Loads are cast to fp32 at once (the interpreter computes bf16 wrongly; min/max/products in fp32 are
exact for bf16/fp16 inputs). Fixed shapes, no host synchronization: each launch can be captured.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lessismore.ops.topk import _NONE, _key, _unkey
from lessismore.ops.triton_decode import INTERPRETED

POSITIONS_MAX_TILE = 16384  # pages x page slots one program holds; larger selections use the reference


@triton.jit
def _fold_kernel(K, LO, HI, LEN, skb, skh, skl, sb, sh, sp, num_kv_heads, page_size,
                 D: tl.constexpr, D_PAD: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // num_kv_heads
    h = pid % num_kv_heads
    n = tl.load(LEN + b).to(tl.int64)
    slot = tl.maximum(n - 2, 0)
    d = tl.arange(0, D_PAD)
    m = (d < D) & (n >= 2)
    key = tl.load(K + b * skb + h * skh + slot * skl + d, mask=m, other=0.0).to(tl.float32)
    at = b * sb + h * sh + (slot // page_size) * sp + d
    lo = tl.load(LO + at, mask=m, other=0.0).to(tl.float32)
    hi = tl.load(HI + at, mask=m, other=0.0).to(tl.float32)
    tl.store(LO + at, tl.minimum(lo, key).to(LO.dtype.element_ty), mask=m)
    tl.store(HI + at, tl.maximum(hi, key).to(HI.dtype.element_ty), mask=m)


def quest_fold(lo: torch.Tensor, hi: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, page_size: int) -> None:
    """In place: lo, hi [b, Hkv, NP, D] (unit stride over D) take slot n-2 of k [b, Hkv, L, D] for
    rows with n = lengths[row] >= 2."""
    b, hkv, _, d = k.shape
    if k.stride(-1) != 1 or lo.stride(-1) != 1 or lo.stride() != hi.stride():
        raise ValueError("quest_fold: k, lo and hi need unit stride over D, lo and hi the same strides")
    _fold_kernel[(b * hkv,)](k, lo, hi, lengths, k.stride(0), k.stride(1), k.stride(2), lo.stride(0),
                             lo.stride(1), lo.stride(2), hkv, page_size, D=d, D_PAD=triton.next_power_of_2(d))


@triton.jit
def _scores_kernel(Q, LO, HI, LEN, OUT, sqb, sqh, slb, slh, slp, num_pages, num_kv_heads, page_size,
                   G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // num_kv_heads
    h = pid % num_kv_heads
    n = tl.load(LEN + b).to(tl.int32)
    used = (n + page_size - 1) // page_size
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D_PAD)
    # Only the row's own pages are read: the rest of the span (most of it early in a long generation)
    # scores -inf below without its bounds.
    m = (p[:, None] < tl.minimum(used, num_pages)) & (d[None, :] < D)
    at = b.to(tl.int64) * slb + h * slh + p[:, None].to(tl.int64) * slp + d[None, :]
    lo = tl.load(LO + at, mask=m, other=0.0).to(tl.float32)
    hi = tl.load(HI + at, mask=m, other=0.0).to(tl.float32)
    for g in tl.static_range(G):
        head = h * G + g
        q = tl.load(Q + b * sqb + head * sqh + d, mask=d < D, other=0.0).to(tl.float32)
        s = tl.sum(tl.maximum(q[None, :] * lo, q[None, :] * hi), 1)
        s = tl.where(p >= used, float("-inf"), s)  # also replaces the NaN of 0 * inf in unfilled pages
        s = tl.where(p == used - 1, float("inf"), s)
        tl.store(OUT + (b.to(tl.int64) * num_kv_heads * G + head) * num_pages + p, s, mask=p < num_pages)


def quest_page_scores(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, lengths: torch.Tensor,
                      page_size: int, block: int = 32) -> torch.Tensor:
    """[B, Hq, NP] fp32 from q [B, Hq, D] and lo, hi [B, Hkv, NP, D] (unit stride over D): see the
    module docstring."""
    b, hq, d = q.shape
    hkv, num_pages = lo.shape[1], lo.shape[2]
    if q.stride(-1) != 1 or lo.stride(-1) != 1 or lo.stride() != hi.stride():
        raise ValueError("quest_page_scores: q, lo and hi need unit stride over D, lo and hi the same strides")
    out = torch.empty((b, hq, num_pages), device=q.device, dtype=torch.float32)
    if out.numel():
        _scores_kernel[(b * hkv, triton.cdiv(num_pages, block))](
            q, lo, hi, lengths, out, q.stride(0), q.stride(1), lo.stride(0), lo.stride(1), lo.stride(2),
            num_pages, hkv, page_size, G=hq // hkv, D=d, D_PAD=triton.next_power_of_2(d), BLOCK=block,
            num_warps=4)
    return out


@triton.jit
def _positions_kernel(TOP, LEN, IDX, CNT, num_heads, take, kmax, page_size,
                      T_PAD: tl.constexpr, P_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.load(LEN + row // num_heads).to(tl.int64)
    t = tl.arange(0, T_PAD)
    pages = tl.load(TOP + row * take + t, mask=t < take, other=2147483647).to(tl.int32)
    pages = tl.sort(pages)  # ascending; the padding (int32 max) last
    o = tl.arange(0, P_PAD)
    pos = pages.to(tl.int64)[:, None] * page_size + o[None, :]
    slot = t[:, None] * page_size + o[None, :]
    kept = (t[:, None] < take) & (o[None, :] < page_size) & (slot < kmax)
    tl.store(IDX + row * kmax + slot, tl.where(pos < n, pos, tl.maximum(n - 1, 0)), mask=kept)
    tl.store(CNT + row, tl.sum((kept & (pos < n)).to(tl.int32)))


def positions_fit(take: int, page_size: int) -> bool:
    return triton.next_power_of_2(take) * triton.next_power_of_2(page_size) <= POSITIONS_MAX_TILE


def quest_page_positions(top: torch.Tensor, lengths: torch.Tensor, page_size: int, kmax: int):
    """(indices int64 [B, Hq, kmax], counts int32 [B, Hq]) from page ids top [B, Hq, T] for rows of
    lengths[b] tokens; needs ``positions_fit(T, page_size)``."""
    b, hq, take = top.shape
    if not positions_fit(take, page_size):
        raise ValueError(f"quest_page_positions: {take} pages of {page_size} exceed one program's tile")
    top = top.contiguous()
    indices = torch.empty((b, hq, kmax), device=top.device, dtype=torch.int64)
    counts = torch.empty((b, hq), device=top.device, dtype=torch.int32)
    if indices.numel():
        _positions_kernel[(b * hq,)](top, lengths, indices, counts, hq, take, kmax, page_size,
                                     T_PAD=triton.next_power_of_2(take), P_PAD=triton.next_power_of_2(page_size))
    return indices, counts


@triton.jit
def _select_kernel(S, LEN, IDX, CNT, num_heads, num_pages, take, kmax, page_size,
                   NP_PAD: tl.constexpr, P_PAD: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.load(LEN + row // num_heads).to(tl.int64)
    s_row = S + row * num_pages
    # Pages past the row's `used` ones score -inf (the contract), so every taken page is below
    # max(used, take): the take-th largest and its ties are found among those pages alone, which are
    # all the pages read and scanned (a row of a long generation spans a fraction of the cache).
    used = tl.minimum((n + page_size - 1) // page_size, num_pages)
    hi = tl.maximum(used, take)  # <= num_pages: the launcher checks take <= num_pages
    j = tl.arange(0, NP_PAD)
    live = j < hi
    x = tl.load(s_row + j, mask=j < used, other=float("-inf"))

    # 1. T, the take-th largest key, one byte a round from the top: a 256-bin histogram of the next byte
    # of the `count` keys that still match T's bytes (keys in unsigned order: key ^ int32 min), then
    # the largest byte d with at least `need` of them at or above it. Four rounds of three reductions
    # (below[d] and hist[d] come out of one, as two 16-bit halves), no data-dependent loop.
    u = _key(x) ^ _NONE  # -0.0 takes +0.0's key
    bins = tl.arange(0, 256)
    match = live
    count = hi.to(tl.int32)
    need = take + 0
    t_u = tl.full([], 0, tl.int32)
    for r in tl.static_range(4):
        byte = (u >> (24 - 8 * r)) & 255
        hist = tl.histogram(byte, 256, mask=match)
        below = tl.cumsum(hist, 0) - hist  # matching keys whose byte is < the bin's
        d = tl.sum((count - below >= need).to(tl.int32), 0) - 1
        at_d = tl.sum(tl.where(bins == d, below | (hist << 16), 0), 0)
        hist_d = at_d >> 16
        need -= count - (at_d & 0xFFFF) - hist_d  # the keys whose byte is above d are all taken
        count = hist_d
        match = match & (byte == d)
        t_u = t_u | (d << (24 - 8 * r))
    # T as a float (scores compare as their keys do: -0.0 == +0.0; no NaN), and the last page taken at T:
    # the `need` lowest of the `count` pages there, so all of them unless ties are cut.
    thr = _unkey(t_u ^ _NONE)
    p_tie = hi.to(tl.int32)
    if need < count:
        ties = match.to(tl.int32)
        p_tie = tl.max(tl.where(match & (tl.cumsum(ties, 0) - ties < need), j, -1), 0)

    # 2. The taken pages in ascending order, expanded to their positions, CHUNK pages at a time: a page's
    # rank among the taken ones gives its slots (no sort: the scan runs in page order).
    c = tl.arange(0, CHUNK)
    o = tl.arange(0, P_PAD)
    last = tl.maximum(n - 1, 0)
    before = tl.full([], 0, tl.int64)  # pages taken so far
    valid = tl.full([], 0, tl.int64)  # their positions < n
    for start in range(0, hi, CHUNK):
        p = start + c
        y = tl.load(s_row + p, mask=p < used, other=float("-inf"))
        taken = ((p < hi) & ((y > thr) | ((y == thr) & (p <= p_tie)))).to(tl.int64)
        rank = before + tl.cumsum(taken, 0) - taken
        pos = p.to(tl.int64)[:, None] * page_size + o[None, :]
        slot = rank[:, None] * page_size + o[None, :]
        kept = (taken[:, None] == 1) & (o[None, :] < page_size) & (slot < kmax)
        tl.store(IDX + row * kmax + slot, tl.where(pos < n, pos, last), mask=kept)
        in_page = tl.minimum(tl.maximum(n - p.to(tl.int64) * page_size, 0), page_size)
        both = tl.sum(taken * (1 + (in_page << 32)), 0)  # pages | positions < n << 32, in one reduction
        before += both & 0xFFFFFFFF
        valid += both >> 32
    # Slots follow positions in order, so the counted ones (slot < kmax and position < n) are a prefix.
    tl.store(CNT + row, tl.minimum(valid, kmax).to(tl.int32))


SELECT_MAX_PAGES = 8192  # pages one program holds in registers; more take top-k + positions (same result)


def select_fits(num_pages: int, page_size: int) -> bool:
    return num_pages <= SELECT_MAX_PAGES and triton.next_power_of_2(page_size) <= 2048


def quest_select(scores: torch.Tensor, lengths: torch.Tensor, page_size: int, take: int, kmax: int):
    """Each head's top ``take`` pages by ``scores`` [B, Hq, NP] (equal scores: lower page first) as
    ascending positions, in one launch: ``quest_page_positions(topk_desc(scores, take)[1], ...)``'s
    result, (indices int64 [B, Hq, kmax], counts int32 [B, Hq]). Needs ``select_fits``. The top-k is
    a radix select on the row in registers (four 256-bin histograms), and the pages come out in
    ascending order from a scan, so nothing is sorted. The pages past a row's tokens must score -inf,
    as ``quest_page_scores`` writes them: they are not read."""
    b, hq, num_pages = scores.shape
    if not select_fits(num_pages, page_size) or not 0 < take <= num_pages or scores.dtype != torch.float32:
        raise ValueError(f"quest_select: fp32 scores of at most {SELECT_MAX_PAGES} pages of at most 2048 slots "
                         f"and 0 < take <= pages; got {num_pages} pages of {page_size}, take {take}, {scores.dtype}")
    scores = scores.contiguous()
    indices = torch.empty((b, hq, kmax), device=scores.device, dtype=torch.int64)
    counts = torch.empty((b, hq), device=scores.device, dtype=torch.int32)
    if indices.numel():
        np_pad = triton.next_power_of_2(num_pages)
        p_pad = triton.next_power_of_2(page_size)
        _select_kernel[(b * hq,)](scores, lengths, indices, counts, hq, num_pages, take, kmax, page_size,
                                  NP_PAD=np_pad, P_PAD=p_pad, CHUNK=max(1, min(np_pad, 2048 // p_pad)),
                                  num_warps=4 if np_pad <= 2048 else 8)
    return indices, counts


__all__ = ["quest_fold", "quest_page_scores", "quest_page_positions", "positions_fit", "quest_select", "select_fits",
           "INTERPRETED"]
