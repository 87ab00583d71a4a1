"""Tensor functions of the analysis: ground-truth attention, attention recall, output fidelity, and
the counterfactual selections behind the paper's Figures 2, 3, 8 and 9.

Shapes follow the HF integration's observers: q [B, Hq, D] (the current query), k [B, Hkv, L, D] (the
cache, current token included), valid [B, L] (slots that hold tokens of each row).
"""
from __future__ import annotations

import torch

from lessismore.config import SparseConfig
from lessismore.methods import Selection
from lessismore.methods.base import grouped_scores, valid_ranks
from lessismore.methods.lessismore import lessismore_mask
from lessismore.methods.lessismore.reference import first_occurrence, fixed_and_middle, head_lists
from lessismore.methods.oracle import oracle_mask


def ground_truth_attention(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * q.k) over the valid slots, per query head: [B, Hq, L] fp32 (0 on invalid slots).
    This is the attention a dense layer computes from this q and K."""
    scores = grouped_scores(q, k) * scale
    return scores.masked_fill(~valid.unsqueeze(1), float("-inf")).softmax(-1)


def selection_mask(selection: Selection | None, valid: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The positions a Selection reads, as a mask [B, Hq, L]; None (dense) reads every valid slot."""
    b, length = valid.shape
    if selection is None:
        return valid.unsqueeze(1).expand(b, num_heads, length)
    idx, counts = selection.indices, selection.counts
    real = torch.arange(idx.shape[-1], device=idx.device) < counts.unsqueeze(-1)
    # scatter_add, not scatter: padding entries repeat a real position and must not clear it.
    hits = torch.zeros(*idx.shape[:-1], length, dtype=torch.int32, device=idx.device)
    mask = hits.scatter_add_(-1, idx, real.to(torch.int32)) > 0
    if not selection.per_head:
        mask = mask.unsqueeze(1).expand(b, num_heads, length)
    return mask & valid.unsqueeze(1)


def attention_recall(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R = sum of softmax(W) over the selected positions / sum of softmax(W) (= 1): [B, Hq]. ``mask``
    is [B, Hq, L] or [B, L] (one set for all heads)."""
    if mask.dim() == 2:
        mask = mask.unsqueeze(1)
    return (probs * mask).sum(-1) / probs.sum(-1)


def topk_mask(probs: torch.Tensor, valid: torch.Tensor, budget: int) -> torch.Tensor:
    """Each head's top-``budget`` positions by attention ([B, Hq, L]): the oracle's set; all valid
    slots when n <= budget."""
    return oracle_mask(probs, valid, budget)


def oracle_recall(probs: torch.Tensor, valid: torch.Tensor, budget: int) -> torch.Tensor:
    """The largest recall any set of ``budget`` positions per head can reach on these scores: [B, Hq]."""
    return attention_recall(probs, topk_mask(probs, valid, budget))


def next_token_fidelity(full_logits: torch.Tensor, sparse_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row [B]: KL(full || sparse) of the next-token distributions, top-1 agreement (0/1) and the
    0-based rank under the sparse run of the full run's top-1 token."""
    lf = full_logits.float().log_softmax(-1)
    ls = sparse_logits.float().log_softmax(-1)
    kl = (lf.exp() * (lf - ls)).sum(-1).clamp_min(0.0)
    top = lf.argmax(-1, keepdim=True)
    rank = (ls > ls.gather(-1, top)).sum(-1)
    return {"kl": kl, "top1": (ls.argmax(-1, keepdim=True) == top).squeeze(-1).float(), "rank": rank.float()}


# ---- counterfactual selections (Figures 2, 3, 8, 9) ----------------------------------------------


def head_overlap(top: torch.Tensor) -> torch.Tensor:
    """Pairwise overlap |S_i & S_j| / |S_i| of per-head sets ``top`` [B, Hq, L]: [B, Hq, Hq]."""
    t = top.float()
    inter = torch.matmul(t, t.transpose(-1, -2))
    return inter / t.sum(-1, keepdim=True).clamp_min(1.0)


RELATIVE_BINS = 20


def relative_position_profile(probs: torch.Tensor, top: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the attention lies in the sequence (Fig. 3): the valid slots of each row are split into
    RELATIVE_BINS equal bins from the first token (bin 0) to the current one (last bin). Returns, per
    row [B, bins]: the attention mass in each bin (summed over heads) and the number of top-K
    positions in each bin (summed over heads)."""
    rank, n = valid_ranks(valid)
    bins = (rank.float() / n.unsqueeze(-1).float() * RELATIVE_BINS).long().clamp(0, RELATIVE_BINS - 1)
    bins = torch.where(valid, bins, torch.full_like(bins, RELATIVE_BINS))  # invalid -> dropped bin
    b = valid.shape[0]
    index = bins.unsqueeze(1).expand_as(probs)
    mass = torch.zeros(b, probs.shape[1], RELATIVE_BINS + 1, device=probs.device).scatter_add_(-1, index, probs)
    count = torch.zeros_like(mass).scatter_add_(-1, index, top.float())
    return mass[..., :RELATIVE_BINS].sum(1), count[..., :RELATIVE_BINS].sum(1)


DISTANCE_BINS = 14  # bin j holds distances [2^j - 1, 2^(j+1) - 1): 0, 1-2, 3-6, ..., the last is open


def distance_profile(probs: torch.Tensor, top: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``relative_position_profile`` but by distance d from the current token (0 = itself) in log2
    bins: bin = floor(log2(d + 1)), capped at DISTANCE_BINS - 1."""
    rank, n = valid_ranks(valid)
    dist = (n.unsqueeze(-1) - 1 - rank).clamp_min(0).float()
    bins = torch.log2(dist + 1).floor().long().clamp(0, DISTANCE_BINS - 1)
    bins = torch.where(valid, bins, torch.full_like(bins, DISTANCE_BINS))
    b = valid.shape[0]
    index = bins.unsqueeze(1).expand_as(probs)
    mass = torch.zeros(b, probs.shape[1], DISTANCE_BINS + 1, device=probs.device).scatter_add_(-1, index, probs)
    count = torch.zeros_like(mass).scatter_add_(-1, index, top.float())
    return mass[..., :DISTANCE_BINS].sum(1), count[..., :DISTANCE_BINS].sum(1)


def distance_bin_labels() -> list[str]:
    labels = []
    for j in range(DISTANCE_BINS):
        lo, hi = 2**j - 1, 2 ** (j + 1) - 2
        labels.append(f"{lo}+" if j == DISTANCE_BINS - 1 else (str(lo) if lo == hi else f"{lo}-{hi}"))
    return labels


def lessismore_set(probs_or_scores: torch.Tensor, valid: torch.Tensor, budget: int, recent_ratio: float, sinks: int) -> torch.Tensor:
    """LessIsMore's set [B, L] for recent ratio r, by the method's own rule (its config's recent and
    sink shares, its mask)."""
    cfg = SparseConfig(method="lessismore", budget=budget, recent_ratio=recent_ratio, sink_tokens=sinks)
    return lessismore_mask(probs_or_scores, valid, budget, cfg.recent_share, cfg.effective_sinks)


def union_depth(probs_or_scores: torch.Tensor, valid: torch.Tensor, budget: int, recent_ratio: float,
                sinks: int) -> torch.Tensor:
    """Per row [B]: how many ranks of the heads' lists LessIsMore's rank-major union reads before it
    holds its k = K - R ranked positions: k / Hq when the heads' lists are disjoint, k when they are
    the same list. NaN where the row fits the budget (nothing is ranked).
    A top-k for the selection layer has to order each head's list only this deep."""
    cfg = SparseConfig(method="lessismore", budget=budget, recent_ratio=recent_ratio, sink_tokens=sinks)
    recent, k, length, heads = cfg.recent_share, cfg.ranked_share, valid.shape[-1], probs_or_scores.shape[1]
    nan = torch.full((valid.shape[0],), float("nan"), device=valid.device)
    if k <= 0 or k > length:
        return nan
    _, middle = fixed_and_middle(valid, budget, recent, cfg.effective_sinks)
    values, top = head_lists(probs_or_scores, middle, k)
    first, _ = first_occurrence(top, values > float("-inf"), length)
    kth = first.topk(k, dim=-1, largest=False).values.amax(-1)  # the list index of the k-th distinct position
    return torch.where(middle.sum(-1) >= k, (kth // heads + 1).float(), nan)


def aggregation_sets(probs: torch.Tensor, valid: torch.Tensor, budget: int, num_kv_heads: int,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Three ways of turning per-head top-K choices into what each head reads (Fig. 8), each as a mask
    [B, Hq, L] of at most K positions per head, with no recency window or sinks:
    unified (LessIsMore's rank-major union of the heads' lists, one set), head_to_head (each head its
    own top-K) and random_head (per KV group one randomly chosen query head's top-K, for the group)."""
    b, hq, length = probs.shape
    unified = lessismore_mask(probs, valid, budget, 0, 0).unsqueeze(1).expand(b, hq, length)
    own = topk_mask(probs, valid, budget)
    group = hq // num_kv_heads
    pick = torch.randint(group, (b, num_kv_heads), generator=generator).to(probs.device)
    heads = (torch.arange(num_kv_heads, device=probs.device) * group + pick).repeat_interleave(group, dim=1)
    random_head = own.gather(1, heads.unsqueeze(-1).expand(b, hq, length))
    return {"unified": unified, "head_to_head": own, "random_head": random_head}

