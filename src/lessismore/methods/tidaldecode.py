"""TidalDecode: position-persistent sparse attention, each query head with its own top-K.

L. Yang, Z. Zhang, Z. Chen, Z. Li, Z. Jia. "TidalDecode: Fast and Accurate LLM Decoding with Position
Persistent Sparse Attention". ICLR 2025, arXiv 2410.05076.

Same schedule as LessIsMore (full layers, selection layers, sparse layers). At a selection layer each
query head keeps its top K-1 positions by score plus the current token (always attended, as in
TidalDecode's kernel): K positions per head, no sinks, no recency window.
"""
from __future__ import annotations

import torch

from lessismore import ops
from lessismore.methods.base import (
    Method,
    Selection,
    fits_budget,
    grouped_scores,
    mask_to_selection,
    per_head_top,
    register,
    valid_ranks,
)


def tidaldecode_mask(scores: torch.Tensor, valid: torch.Tensor, budget: int) -> torch.Tensor:
    """Per-head mask [B, H, L]."""
    rank, n = valid_ranks(valid)
    current = valid & (rank == (n - 1).unsqueeze(-1))
    eligible = (valid & ~current).unsqueeze(1).expand_as(scores)
    mask = current.unsqueeze(1).expand_as(scores)
    if budget > 1:
        mask = mask | per_head_top(scores, eligible, min(budget - 1, valid.shape[-1]))
    return torch.where(fits_budget(n, budget)[:, None, None], valid.unsqueeze(1), mask)


def selection_from_scores(scores: torch.Tensor, lengths: torch.Tensor, budget: int, kernels: bool) -> Selection:
    """The set from scores [B, Hq, L] that are -inf outside slots 0..n-2 (n = lengths[b]): each head's
    top budget-1 positions plus the current token n-1, ascending; all n positions when n <= budget."""
    b, h, length = scores.shape
    kmax = min(budget, length)
    n = lengths.long().view(b, 1, 1)
    slot = torch.arange(kmax, device=scores.device)
    whole = torch.where(slot < n, slot, torch.full_like(slot, length - 1))  # [B, 1, kmax]
    if budget > 1 and length > 1:
        top = ops.topk_positions(scores, min(budget - 1, length), lengths, triton=kernels)
        top = torch.cat([top, (n - 1).expand(b, h, 1)], dim=-1)[..., :kmax]
    else:
        top = (n - 1).expand(b, h, kmax)
    indices = torch.where(fits_budget(n, budget), whole, top)
    counts = lengths.view(b, 1).clamp(max=budget).to(torch.int32).expand(b, h).contiguous()
    return Selection(indices=indices, counts=counts)


@register
class TidalDecode(Method):
    name = "tidaldecode"
    settings = {"budget": 2048, "selection_layers": None, "full_layers": (0, 1)}
    per_head = True

    def select(self, cfg, q, k, valid):
        mask = tidaldecode_mask(grouped_scores(q, k), valid, cfg.budget)
        return mask_to_selection(mask, min(cfg.budget, valid.shape[-1]))

    def fused_attention(self, cfg, q, cache, scale):
        found = cache.dense_with_scores(q, scale, 0, 1)  # scores of every slot but the current one
        if found is None:
            return None
        out, scores = found
        return out, lambda: selection_from_scores(scores, cache.lengths, cfg.budget, cache.kernels)
