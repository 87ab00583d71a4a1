"""Quest: query-aware page selection from per-page key bounds.

J. Tang, Y. Zhao, K. Zhu, G. Xiao, B. Kasikci, S. Han. "Quest: Query-Aware Sparsity for Efficient
Long-Context LLM Inference". ICML 2024, arXiv 2406.10774.

Pages of P valid positions (counted from each row's first token). Per page and KV head, the
elementwise min and max of its keys; query head h scores a page sum_d max(q_d*min_d, q_d*max_d), an
upper bound of q.k for every key in it. Each head reads its top ceil(K/P) pages, the page holding the
current token always among them, so a head reads at most ceil(K/P)*P positions. Every non-full layer
selects for itself. The LessIsMore paper ran Quest with P=64 and every layer sparse:
``SparseConfig(method="quest", page_size=64, full_layers=())``.

In the engine (contiguous rows, slots 0..n-1) Quest keeps the page bounds incrementally, as real Quest
does: ``QuestState`` holds each layer's per-page min and max, built at a row's prefill and extended
by one token per decode step; the selection then reads the bounds only (``fast_select``), never the
keys, and gives exactly the reference set.
"""
from __future__ import annotations

import torch

from lessismore import ops
from lessismore.methods.base import Method, Selection, mask_to_selection, register, valid_ranks


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


def pages_taken(budget: int, page_size: int, num_pages: int) -> int:
    """How many pages a head reads: ceil(K/P), at most the pages there are."""
    return min(-(-budget // page_size), num_pages)


def top_pages(scores: torch.Tensor, budget: int, page_size: int) -> torch.Tensor:
    """Each head's pages, from scores [B, Hq, NP] (``ops.quest_page_scores``: the current page +inf,
    pages past it -inf): the top ``pages_taken`` by score, equal scores lower page first; some of
    them non-existent pages when a row has fewer. [B, Hq, T] page ids."""
    return ops.topk_desc(scores, pages_taken(budget, page_size, scores.shape[-1]))[1]


def quest_mask(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, budget: int, page_size: int) -> torch.Tensor:
    """Per-head mask [B, Hq, L]."""
    lo, hi, page = page_bounds(k, valid, page_size)
    _, n = valid_ranks(valid)
    # The bounds in the keys' dtype (exact: they are keys), as the engine's state holds them, so both
    # paths give ops.quest_page_scores the same inputs.
    scores = ops.quest_page_scores(q, lo.to(k.dtype), hi.to(k.dtype), n, page_size)
    top = top_pages(scores, budget, page_size)
    exists = torch.arange(scores.shape[-1], device=q.device) < (-(-n.long() // page_size)).unsqueeze(-1)
    chosen_pages = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True) & exists.unsqueeze(1)
    # Slot -> its page's choice; invalid slots look up the dropped page NP (False).
    chosen_pages = torch.cat([chosen_pages, chosen_pages.new_zeros(*chosen_pages.shape[:2], 1)], dim=-1)
    return chosen_pages.gather(-1, page.unsqueeze(1).expand(-1, q.shape[1], -1))


class QuestState:
    """One layer's page bounds for a cache of ``batch`` rows: lo, hi [batch, Hkv, ceil(max_len/P), D]
    in the cache's dtype (the min and max of keys of that dtype are keys' values: exact), +inf / -inf
    where a page holds no key yet.

    Invariant, for a row of n tokens (slots 0..n-1): every page holds the bounds of its keys at slots
    0..n-2 at least (token n-1, the one a decode step has just written, may be missing) and of no other
    slot. The current page's bounds never matter (it is always taken), so the bounds of every page a
    selection compares are complete; and a step folds in only slot n-2, a token of an earlier step that
    no later step rewrites, which keeps out the K/V a step writes for rows that are not decoding (an
    inactive row, or a graph warmup, writes at slot n-1 past its tokens)."""

    def __init__(self, batch: int, num_kv_heads: int, max_len: int, head_dim: int, page_size: int, device, dtype):
        num_pages = -(-max_len // page_size)
        shape = (batch, num_kv_heads, num_pages, head_dim)
        self.page_size = page_size
        self.lo = torch.full(shape, float("inf"), device=device, dtype=dtype)
        self.hi = torch.full(shape, float("-inf"), device=device, dtype=dtype)

    def fill(self, k: torch.Tensor, row: int, length: int) -> None:
        """Row ``row``'s bounds from its keys k[row, :, :length] (k: the layer's key cache); pages past
        them reset."""
        lo, hi = self.lo[row], self.hi[row]  # [Hkv, NP, D]
        lo.fill_(float("inf"))
        hi.fill_(float("-inf"))
        if length:
            valid = torch.ones(1, length, dtype=torch.bool, device=k.device)
            page_lo, page_hi, _ = page_bounds(k[row : row + 1, :, :length], valid, self.page_size)
            lo[:, : page_lo.shape[2]] = page_lo[0]  # min/max of keys are keys: exact in the cache dtype
            hi[:, : page_hi.shape[2]] = page_hi[0]

    def update(self, k: torch.Tensor, lengths: torch.Tensor) -> None:
        """Fold slot n-2 of each row (rows with n >= 2) into its page: k [b, Hkv, L, D] the first b
        rows' keys, lengths [b] their n. Idempotent; fixed shapes, no host sync."""
        b = k.shape[0]
        ops.quest_fold(self.lo[:b], self.hi[:b], k, lengths, self.page_size)


@register
class Quest(Method):
    name = "quest"
    settings = {"budget": 2048, "page_size": 16, "full_layers": (0, 1)}
    per_head = True

    def validate(self, cfg):
        if cfg.page_size > cfg.budget:
            raise ValueError(f"page_size: must be in [1, budget] = [1, {cfg.budget}] (a head reads whole pages), got {cfg.page_size}")

    def select(self, cfg, q, k, valid):
        mask = quest_mask(q, k, valid, cfg.budget, cfg.page_size)
        kmax = min(-(-cfg.budget // cfg.page_size) * cfg.page_size, valid.shape[-1])
        return mask_to_selection(mask, kmax)

    def decode_state(self, cfg, batch, num_kv_heads, max_len, head_dim, device, dtype):
        return QuestState(batch, num_kv_heads, max_len, head_dim, cfg.page_size, device, dtype)

    def fill_state(self, cfg, state, k, row, length):
        state.fill(k, row, length)

    def update_state(self, cfg, cache):
        cache.state.update(cache.k, cache.lengths)

    def fast_select(self, cfg, q, cache):
        """From the page bounds alone: the same fp32 page scores as ``select`` (``ops.quest_page_scores``
        on the same values in the same dtype, over the same ceil(L/P) pages), the same top pages, the
        positions built from them. On CUDA: three kernels a layer (fold, scores, then the top pages as
        positions in one launch: ``ops.quest_select``)."""
        state = cache.state
        if not isinstance(state, QuestState) or cache.lengths is None or state.page_size != cfg.page_size:
            return None
        b, p, length = q.shape[0], cfg.page_size, cache.span
        num_pages = -(-length // p)
        if num_pages > state.lo.shape[2]:
            return None
        scores = ops.quest_page_scores(q, state.lo[:b, :, :num_pages], state.hi[:b, :, :num_pages], cache.lengths, p)
        kmax = min(-(-cfg.budget // p) * p, length)
        indices, counts = ops.quest_select(scores, cache.lengths, p, pages_taken(cfg.budget, p, num_pages), kmax)
        return Selection(indices=indices, counts=counts)
