"""LessIsMore's unified selection across tensor-parallel ranks.

Under tensor parallelism each rank holds a contiguous share of the query heads (rank r: heads
r*H_local .. (r+1)*H_local - 1, with their KV heads). LessIsMore ranks tokens across *all* query heads,
so a per-rank union would neither be the paper's algorithm nor give the ranks the same set. Here each
rank computes its heads' top-k candidates (each head's list depends on that head alone), the candidates
are all-gathered over the group (B x H_local x k int32 per rank), and every rank applies the same
rank-major union (``reference.unified_union``) to the heads in global order: identical sets
on every rank, equal to the single-process selection.

No host synchronization and fixed shapes: one all-gather per selection layer and step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lessismore.config import SparseConfig
from lessismore.methods.base import Selection, grouped_scores, mask_to_selection
from lessismore.methods.lessismore.reference import fixed_and_middle, head_lists, unified_union


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def all_gather_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """x [B, H_local, ...] on every rank -> [B, world * H_local, ...], ranks' heads in rank order
    (the global head order of a tensor-parallel split). A group of one rank returns x."""
    world = _world(group)
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=1)


def cross_rank_union(top: torch.Tensor, top_ok: torch.Tensor, length: int, k: int, group=None) -> torch.Tensor:
    """``unified_union`` over the heads of every rank: top [B, H_local, k'] (each local head's list,
    best first), top_ok [B, H_local, k'] -> mask [B, length], the same on every rank. Sends int32
    (entries that are not real travel as -1)."""
    packed = torch.where(top_ok, top, torch.full_like(top, -1)).to(torch.int32)
    gathered = all_gather_heads(packed, group).long()
    ok = gathered >= 0
    return unified_union(gathered.clamp_min(0), ok, length, k)


def lessismore_mask_cross_rank(
    scores: torch.Tensor, valid: torch.Tensor, budget: int, recent: int, sinks: int, group=None
) -> torch.Tensor:
    """``reference.lessismore_mask`` for a rank that holds scores [B, H_local, L] of its own
    heads only; every rank of ``group`` must call it (with the same valid, budget, recent, sinks)."""
    fixed, middle = fixed_and_middle(valid, budget, recent, sinks)
    k = budget - recent
    if k <= 0:
        return fixed
    values, top = head_lists(scores, middle, k)
    return fixed | cross_rank_union(top, values > float("-inf"), scores.shape[-1], k, group)


def select_across_ranks(cfg: SparseConfig, q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, group=None) -> Selection:
    """The LessIsMore ``select`` for one tensor-parallel rank: q [B, Hq_local, D] and k [B, Hkv_local,
    L, D] are this rank's heads. Returns the set of the whole model (all ranks)."""
    mask = lessismore_mask_cross_rank(grouped_scores(q, k), valid, cfg.budget, cfg.recent_share, cfg.effective_sinks, group)
    return mask_to_selection(mask, min(cfg.budget, valid.shape[-1]))
