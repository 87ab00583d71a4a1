"""Quest: query-aware page selection from per-page key bounds.

J. Tang, Y. Zhao, K. Zhu, G. Xiao, B. Kasikci, S. Han. "Quest: Query-Aware Sparsity for Efficient
Long-Context LLM Inference". ICML 2024, arXiv 2406.10774.

Pages of P valid positions (counted from each row's first token). Per page and KV head, the
elementwise min and max of its keys; query head h scores a page sum_d max(q_d*min_d, q_d*max_d), an
upper bound of q.k for every key in it. Each head reads its top ceil(K/P) pages, the page holding the
current token always among them, so a head reads at most ceil(K/P)*P positions. Every non-full layer
selects for itself. The LessIsMore paper ran Quest with P=64 and every layer sparse:
``SparseConfig(method="quest", page_size=64, full_layers=())``.
"""
from __future__ import annotations

import torch

from lessismore.methods.base import Method, mask_to_selection, register, valid_ranks
from lessismore.ops import naive


def page_bounds(k: torch.Tensor, valid: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-page min and max of the keys, [B, Hkv, NP, D], and the page of every slot [B, L]
    (NP = ceil(L/P); invalid slots map to page NP, dropped)."""
    b, hkv, length, d = k.shape
    num_pages = -(-length // page_size)
    rank, _ = valid_ranks(valid)
    page = torch.where(valid, rank // page_size, torch.full_like(rank, num_pages)).long()
    index = page[:, None, :, None].expand(b, hkv, length, d)
    kf = k.float()
    lo = torch.full((b, hkv, num_pages + 1, d), float("inf"), device=k.device).scatter_reduce_(2, index, kf, "amin")
    hi = torch.full((b, hkv, num_pages + 1, d), float("-inf"), device=k.device).scatter_reduce_(2, index, kf, "amax")
    return lo[:, :, :num_pages], hi[:, :, :num_pages], page


def page_scores(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """[B, Hq, NP]: sum_d max(q_d*lo_d, q_d*hi_d) per query head."""
    b, hq, d = q.shape
    hkv = lo.shape[1]
    qg = q.float().view(b, hkv, hq // hkv, 1, d)
    bound = torch.maximum(qg * lo.unsqueeze(2), qg * hi.unsqueeze(2)).sum(-1)
    return bound.reshape(b, hq, lo.shape[2])


def quest_mask(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, budget: int, page_size: int) -> torch.Tensor:
    """Per-head mask [B, Hq, L]."""
    lo, hi, page = page_bounds(k, valid, page_size)
    scores = page_scores(q, lo, hi)
    num_pages = scores.shape[-1]
    _, n = valid_ranks(valid)
    pages_used = -(-n // page_size)  # [B]
    page_ids = torch.arange(num_pages, device=q.device)
    exists = page_ids.unsqueeze(0) < pages_used.unsqueeze(-1)
    current = page_ids.unsqueeze(0) == (pages_used - 1).unsqueeze(-1)
    scores = scores.masked_fill(~exists.unsqueeze(1), float("-inf"))
    scores = scores.masked_fill(current.unsqueeze(1), float("inf"))
    take = min(-(-budget // page_size), num_pages)
    top = naive.topk_desc(scores, take)[1]
    chosen_pages = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True) & exists.unsqueeze(1)
    # Slot -> its page's choice; invalid slots look up the dropped page NP (False).
    chosen_pages = torch.cat([chosen_pages, chosen_pages.new_zeros(*chosen_pages.shape[:2], 1)], dim=-1)
    return chosen_pages.gather(-1, page.unsqueeze(1).expand(-1, q.shape[1], -1))


@register
class Quest(Method):
    name = "quest"
    settings = {"budget": 2048, "page_size": 16, "full_layers": (0, 1)}
    per_head = True
    uses_selection_layers = False

    def validate(self, cfg):
        if cfg.page_size > cfg.budget:
            raise ValueError(f"page_size: must be in [1, budget] = [1, {cfg.budget}] (a head reads whole pages), got {cfg.page_size}")

    def select(self, cfg, q, k, valid):
        mask = quest_mask(q, k, valid, cfg.budget, cfg.page_size)
        kmax = min(-(-cfg.budget // cfg.page_size) * cfg.page_size, valid.shape[-1])
        return mask_to_selection(mask, kmax)
