"""LessIsMore: unified cross-head top-k plus a stable recency window, one set for all heads.

L. Yang, Z. Zhang, A. Jain, S. Cao, B. Yuan, Y. Chen, Z. Jia, R. Netravali. "Less Is More:
Training-Free Sparse Attention with Global Locality for Efficient Reasoning". arXiv 2508.07101, 2025.

``reference.py`` defines the selection; ``triton.py`` is the fused GPU selection layer (dense
attention that writes the scores, top-k, the rank-major union in Triton); ``distributed.py`` the
union across tensor-parallel ranks. All three give the same set.
"""
from __future__ import annotations

from lessismore.methods.base import Method, grouped_scores, mask_to_selection, register
from lessismore.methods.lessismore.reference import lessismore_mask, unified_union

__all__ = ["LessIsMore", "lessismore_mask", "unified_union", "union_prefix"]


def union_prefix(k: int) -> int:
    """Ranks of each head's list the GPU selection layer sorts first: half of k's power of two (1,024
    of k = 1,536), k itself up to 64. On real traces the union reads 0.25-0.32 k on average, and past
    this prefix in 0.3-0.7% of (row, step, selection layer) (``past_prefix`` of ``lessismore
    analyze``, docs/analysis.md); a row that needs more ranks gets its whole lists from a second
    top-k (``triton.union_selection``)."""
    return k if k <= 64 else 1 << ((k - 1).bit_length() - 1)


@register
class LessIsMore(Method):
    name = "lessismore"
    settings = {"budget": 2048, "recent_ratio": 0.25, "sink_tokens": 4, "selection_layers": None, "full_layers": (0, 1)}

    def select(self, cfg, q, k, valid):
        scores = grouped_scores(q, k)
        mask = lessismore_mask(scores, valid, cfg.budget, cfg.recent_share, cfg.effective_sinks)
        return mask_to_selection(mask, min(cfg.budget, valid.shape[-1]))

    def select_sharded(self, cfg, q, k, valid, group=None):
        if group is None:
            return self.select(cfg, q, k, valid)
        from lessismore.methods.lessismore.distributed import select_across_ranks

        return select_across_ranks(cfg, q, k, valid, group)

    def fused_attention(self, cfg, q, cache, scale):
        if not cache.triton_readable:
            return None  # before the import: Triton may not be installed
        from lessismore.methods.lessismore.triton import fused_attention

        return fused_attention(cfg, q, cache, scale)
