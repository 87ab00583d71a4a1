"""LessIsMore's reference selection (PyTorch, any device): the definition the fused GPU path
(``triton.py``) and the cross-rank union (``distributed.py``) are tested against.

L. Yang, Z. Zhang, A. Jain, S. Cao, B. Yuan, Y. Chen, Z. Jia, R. Netravali. "Less Is More:
Training-Free Sparse Attention with Global Locality for Efficient Reasoning". arXiv 2508.07101, 2025.

For budget K, recent share R = round(K*r) (sinks s come out of it; dropped if R < s) and ranked share
k = K - R, with n valid positions in a row:
  1. n <= K: all n positions.
  2. otherwise each query head ranks the middle positions (after the sinks, before the last R - s
     positions) by its score and takes its top k;
  3. the heads' lists are merged rank by rank (every head's rank-0 pick in head order, then rank 1, ...),
     repeats dropped keeping the first occurrence, and the first k kept;
  4. the set is sinks + those k + the last R - s positions: exactly K positions, one set per sequence.
"""
from __future__ import annotations

import torch

from lessismore.methods.base import fits_budget, valid_ranks
from lessismore.ops import naive


def first_occurrence(top: torch.Tensor, top_ok: torch.Tensor, length: int) -> tuple[torch.Tensor, int]:
    """Where each position first appears in the rank-major list top[:, 0, 0], top[:, 1, 0], ...,
    top[:, H-1, 0], top[:, 0, 1], ... of per-head lists top [B, H, k'] (real entries: top_ok): (first
    [B, length], the list index j = rank * H + head, or ``never`` = H * k' where it does not appear;
    never)."""
    b, h, kk = top.shape
    flat = top.transpose(1, 2).reshape(b, kk * h)
    order = torch.arange(kk * h, device=top.device).expand(b, -1)
    never = kk * h  # larger than any list position
    order = torch.where(top_ok.transpose(1, 2).reshape(b, kk * h), order, torch.full_like(order, never))
    first = torch.full((b, length), never, device=top.device, dtype=order.dtype)
    first.scatter_reduce_(1, flat, order, reduce="amin")
    return first, never


def unified_union(top: torch.Tensor, top_ok: torch.Tensor, length: int, k: int) -> torch.Tensor:
    """Rank-major union of per-head top lists.

    top [B, H, k'] positions (each head's list in descending score order), top_ok [B, H, k'] which
    entries are real; returns a mask [B, length] of the first k distinct positions of the list
    top[:, 0, 0], top[:, 1, 0], ..., top[:, H-1, 0], top[:, 0, 1], ...
    """
    b = top.shape[0]
    first, never = first_occurrence(top, top_ok, length)
    take = min(k, length)
    keys, positions = first.topk(take, dim=-1, largest=False, sorted=False)
    return torch.zeros(b, length, dtype=torch.bool, device=top.device).scatter_(1, positions, keys < never)


def fixed_and_middle(valid: torch.Tensor, budget: int, recent: int, sinks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The score-free part of the selection, masks [B, L]: (fixed: the sinks and the recency window, or
    every valid slot where the row fits in the budget; middle: the slots the ranked share chooses from,
    none where the row fits)."""
    rank, n = valid_ranks(valid)
    sink = valid & (rank < sinks)
    recent_mask = valid & (rank >= (n - (recent - sinks)).unsqueeze(-1))
    fixed = torch.where(fits_budget(n, budget).unsqueeze(-1), valid, sink | recent_mask)
    return fixed, valid & ~fixed


def head_lists(scores: torch.Tensor, middle: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: each head's top-k of the middle slots, (values, positions) [B, H, min(k, L)] in
    descending score order; entries past a row's middle are -inf."""
    return naive.topk_desc(scores.masked_fill(~middle.unsqueeze(1), float("-inf")), min(k, middle.shape[-1]))


def lessismore_mask(scores: torch.Tensor, valid: torch.Tensor, budget: int, recent: int, sinks: int) -> torch.Tensor:
    """The selection as a mask [B, L] from scores [B, H, L]. ``recent`` is R (sinks included), ``sinks``
    the sinks actually kept (0 when R < s)."""
    length = valid.shape[-1]
    fixed, middle = fixed_and_middle(valid, budget, recent, sinks)
    k = budget - recent
    if k <= 0:
        return fixed
    values, top = head_lists(scores, middle, k)
    return fixed | unified_union(top, values > float("-inf"), length, k)
