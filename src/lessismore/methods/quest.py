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

from lessismore.methods.base import Method, Selection, mask_to_selection, register, valid_ranks
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
    """[B, Hq, NP]: sum_d max(q_d*lo_d, q_d*hi_d) per query head, in fp32. Since lo <= hi that is
    max(q, 0).hi + min(q, 0).lo: two batched matrix products, with no [B, Hq, NP, D] intermediate."""
    b, hq, d = q.shape
    hkv = lo.shape[1]
    qg = q.float().view(b, hkv, hq // hkv, d)
    bound = qg.clamp(min=0) @ hi.float().transpose(-1, -2) + qg.clamp(max=0) @ lo.float().transpose(-1, -2)
    return bound.reshape(b, hq, lo.shape[2])


def top_pages(scores: torch.Tensor, n: torch.Tensor, budget: int, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's pages: scores [B, Hq, NP] (``page_scores``), n [B] tokens per row. The current page
    (the last one, holding token n-1) is always taken, pages past it never; of the rest the top by
    score (equal scores: lower page first), ceil(K/P) pages in all. Returns (top [B, Hq, T] page ids,
    T = min(ceil(K/P), NP), some of them non-existent pages when a row has fewer than T; exists
    [B, NP] bool)."""
    num_pages = scores.shape[-1]
    pages_used = -(-n // page_size)  # [B]
    page_ids = torch.arange(num_pages, device=scores.device)
    exists = page_ids.unsqueeze(0) < pages_used.unsqueeze(-1)
    current = page_ids.unsqueeze(0) == (pages_used - 1).unsqueeze(-1)
    scores = scores.masked_fill(~exists.unsqueeze(1), float("-inf"))
    scores = scores.masked_fill(current.unsqueeze(1), float("inf"))
    take = min(-(-budget // page_size), num_pages)
    return naive.topk_desc(scores, take)[1], exists


def quest_mask(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, budget: int, page_size: int) -> torch.Tensor:
    """Per-head mask [B, Hq, L]."""
    lo, hi, page = page_bounds(k, valid, page_size)
    scores = page_scores(q, lo, hi)
    _, n = valid_ranks(valid)
    top, exists = top_pages(scores, n, budget, page_size)
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
        b, hkv, _, d = k.shape
        n = lengths.long()
        slot = (n - 2).clamp(min=0).view(b, 1, 1, 1)
        key = k.gather(2, slot.expand(b, hkv, 1, d)).to(self.lo.dtype)
        page = (slot // self.page_size).expand(b, hkv, 1, d)
        live = (n >= 2).view(b, 1, 1, 1)
        for bounds, fold in ((self.lo[:b], torch.minimum), (self.hi[:b], torch.maximum)):
            now = bounds.gather(2, page)
            bounds.scatter_(2, page, torch.where(live, fold(now, key), now))


def selection_from_pages(top: torch.Tensor, n: torch.Tensor, page_size: int, kmax: int) -> Selection:
    """The positions of each head's pages, top [B, Hq, T] page ids (``top_pages``), for rows of n [B]
    tokens in slots 0..n-1: ascending indices [B, Hq, kmax], counts [B, Hq]. Sorted, the existing
    pages come first (the current one, the highest existing page, last of them), so the live
    positions, those < n, are a prefix; entries past it repeat position n-1."""
    b, hq, _ = top.shape
    pages = top.sort(dim=-1).values
    offsets = torch.arange(page_size, device=top.device)
    positions = (pages.unsqueeze(-1) * page_size + offsets).flatten(-2)[..., :kmax]
    n = n.long().view(b, 1, 1)
    live = positions < n
    indices = torch.where(live, positions, (n - 1).clamp(min=0))
    return Selection(indices=indices, counts=live.sum(-1).to(torch.int32))


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
        """From the page bounds alone: the same fp32 page scores as ``select`` (``page_scores`` on the
        same values, over the same ceil(L/P) pages), the same top pages, the positions built from them."""
        state = cache.state
        if not isinstance(state, QuestState) or cache.lengths is None or state.page_size != cfg.page_size:
            return None
        b, p, length = q.shape[0], cfg.page_size, cache.span
        num_pages = -(-length // p)
        if num_pages > state.lo.shape[2]:
            return None
        scores = page_scores(q, state.lo[:b, :, :num_pages], state.hi[:b, :, :num_pages])
        top, _ = top_pages(scores, cache.lengths, cfg.budget, p)
        kmax = min(-(-cfg.budget // p) * p, length)
        return selection_from_pages(top, cache.lengths, p, kmax)
