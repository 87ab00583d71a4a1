"""Quest's decode-step selection in three Triton kernels, each the same contract as its reference in
``naive`` (``quest_fold``, ``quest_page_scores``, ``quest_page_positions``).

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

Loads are cast to fp32 at once (the interpreter computes bf16 wrongly; min/max/products in fp32 are
exact for bf16/fp16 inputs). Fixed shapes, no host synchronization: each launch can be captured.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    m = (p[:, None] < num_pages) & (d[None, :] < D)
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


__all__ = ["quest_fold", "quest_page_scores", "quest_page_positions", "positions_fit", "INTERPRETED"]
