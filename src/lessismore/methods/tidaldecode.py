"""TidalDecode: position-persistent sparse attention, each query head with its own top-K.

L. Yang, Z. Zhang, Z. Chen, Z. Li, Z. Jia. "TidalDecode: Fast and Accurate LLM Decoding with Position
Persistent Sparse Attention". ICLR 2025, arXiv 2410.05076.

Same schedule as LessIsMore (full layers, selection layers, sparse layers). At a selection layer each
query head keeps its top K-1 positions by score plus the current token (always attended, as in
TidalDecode's kernel): K positions per head, no sinks, no recency window.
"""
from __future__ import annotations

import torch

from lessismore.methods.base import Method, grouped_scores, mask_to_selection, per_head_top, register, valid_ranks


def tidaldecode_mask(scores: torch.Tensor, valid: torch.Tensor, budget: int) -> torch.Tensor:
    """Per-head mask [B, H, L]."""
    rank, n = valid_ranks(valid)
    current = valid & (rank == (n - 1).unsqueeze(-1))
    eligible = (valid & ~current).unsqueeze(1).expand_as(scores)
    mask = current.unsqueeze(1).expand_as(scores)
    if budget > 1:
        mask = mask | per_head_top(scores, eligible, min(budget - 1, valid.shape[-1]))
    return torch.where((n <= budget)[:, None, None], valid.unsqueeze(1), mask)


@register
class TidalDecode(Method):
    name = "tidaldecode"
    per_head = True

    def select(self, cfg, q, k, valid):
        mask = tidaldecode_mask(grouped_scores(q, k), valid, cfg.budget)
        return mask_to_selection(mask, min(cfg.budget, valid.shape[-1]))
