"""PyTorch references for the decode-attention kernels: gather the selected K/V rows, then attend.

These are the CPU path and the ground truth the Triton kernels are tested against. Softmax and the
weighted sum run in fp32; the output has q's dtype.
"""
from __future__ import annotations

import torch


def _attend(q: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, live: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hkv, G, D], ks/vs [B, Hkv|Hq, K, D] gathered rows, live [B, 1|Hkv, 1|G, K] -> [B, Hkv, G, D]."""
    scores = torch.matmul(q.float(), ks.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~live, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vs.float())


def sparse_decode_attention(q, k_cache, v_cache, indices, counts, scale=None):
    """One token set per row, shared by every head.

    q [B, Hq, D]; k_cache, v_cache [B, Hkv, L, D]; indices [B, Kmax] int; counts [B] int.
    Returns [B, Hq, D] = softmax(q K[idx]^T * scale) V[idx], over the first counts[b] entries.
    """
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    kmax = indices.shape[-1]
    scale = d**-0.5 if scale is None else scale
    index = indices.long()[:, None, :, None].expand(b, hkv, kmax, d)
    ks = k_cache.gather(2, index)
    vs = v_cache.gather(2, index)
    live = (torch.arange(kmax, device=q.device) < counts.view(b, 1))[:, None, None, :]
    out = _attend(q.view(b, hkv, hq // hkv, d), ks, vs, live, scale)
    return out.reshape(b, hq, d).to(q.dtype)


def sparse_decode_attention_per_head(q, k_cache, v_cache, indices, counts, scale=None):
    """A token set per query head: indices [B, Hq, Kmax], counts [B, Hq]; otherwise as above."""
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    kmax = indices.shape[-1]
    scale = d**-0.5 if scale is None else scale
    # Query head h reads KV head h // group: gather per KV head with the group's indices side by side.
    index = indices.long().view(b, hkv, group * kmax, 1).expand(b, hkv, group * kmax, d)
    ks = k_cache.gather(2, index).view(b, hkv, group, kmax, d)
    vs = v_cache.gather(2, index).view(b, hkv, group, kmax, d)
    live = torch.arange(kmax, device=q.device) < counts.view(b, hkv, group, 1)
    scores = torch.einsum("bhgd,bhgkd->bhgk", q.view(b, hkv, group, d).float(), ks.float()) * scale
    probs = torch.softmax(scores.masked_fill(~live, float("-inf")), dim=-1)
    out = torch.einsum("bhgk,bhgkd->bhgd", probs, vs.float())
    return out.reshape(b, hq, d).to(q.dtype)


def masked_decode_attention(q, k_cache, v_cache, valid, scale=None):
    """Full decode attention over the slots marked by valid [B, L] (any pattern, e.g. left padding)."""
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    scale = d**-0.5 if scale is None else scale
    out = _attend(q.view(b, hkv, hq // hkv, d), k_cache, v_cache, valid[:, None, None, :], scale)
    return out.reshape(b, hq, d).to(q.dtype)


def dense_decode_attention(q, k_cache, v_cache, lengths, scale=None):
    """Full decode attention over the first lengths[b] slots of each row (the engine's cache layout)."""
    valid = torch.arange(k_cache.shape[2], device=q.device) < lengths.view(-1, 1)
    return masked_decode_attention(q, k_cache, v_cache, valid, scale)


def topk_desc(scores: torch.Tensor, k: int, lengths: torch.Tensor | None = None):
    """The k largest entries of each row of ``scores`` [..., L] (fp32; other dtypes are upcast), in
    descending order: (values fp32 [..., k], indices int64 [..., k]); k > L gives all L.

    Ties go to the lower position: the result is ``sort(descending=True, stable=True)`` cut at k, with
    -0.0 and +0.0 equal (they tie). ``lengths`` (B ints, scores [B, ..., L]): in scores[b], only
    positions < lengths[b] are candidates; the rest count as -inf. When a row has fewer than k finite
    entries the tail is -inf entries, lowest positions first (the tie rule): the row's own -inf
    entries, then positions lengths[b], lengths[b] + 1, ... with value -inf. NaN is not supported.
    Values are the row's own bits (-0.0 stays -0.0).
    """
    if k < 0:
        raise ValueError(f"k={k} < 0")
    masked = scores.float()
    if lengths is not None:
        if scores.dim() < 2 or lengths.numel() != scores.shape[0]:
            raise ValueError("lengths: one entry per scores.shape[0] row, for scores of 2+ dimensions")
        pos = torch.arange(scores.shape[-1], device=scores.device)
        live = pos < lengths.to(scores.device).view(-1, *([1] * (scores.dim() - 1)))
        masked = masked.masked_fill(~live, float("-inf"))
    # + 0.0 turns -0.0 into +0.0, so the two zeros tie on every device's sort.
    indices = torch.sort(masked + 0.0, dim=-1, descending=True, stable=True).indices[..., :k]
    return masked.gather(-1, indices), indices


def topk_positions(scores: torch.Tensor, k: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The positions of ``topk_desc``'s k entries (the same set, the same tie rule), ascending: int64 [..., k]."""
    return topk_desc(scores, k, lengths)[1].sort(dim=-1).values


# ---- Quest's decode-step selection (references of ops.quest) ----------------------------------------


def quest_fold(lo: torch.Tensor, hi: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, page_size: int) -> None:
    """In place: the page bounds lo, hi [b, Hkv, NP, D] take slot n-2 of k [b, Hkv, L, D] for the rows
    with n = lengths[row] >= 2 (the others unchanged)."""
    b, hkv, _, d = k.shape
    n = lengths.long()
    slot = (n - 2).clamp(min=0).view(b, 1, 1, 1)
    key = k.gather(2, slot.expand(b, hkv, 1, d)).to(lo.dtype)
    page = (slot // page_size).expand(b, hkv, 1, d)
    live = (n >= 2).view(b, 1, 1, 1)
    for bounds, fold in ((lo, torch.minimum), (hi, torch.maximum)):
        now = bounds.gather(2, page)
        bounds.scatter_(2, page, torch.where(live, fold(now, key), now))


def quest_page_scores(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, lengths: torch.Tensor,
                      page_size: int) -> torch.Tensor:
    """[B, Hq, NP] fp32: sum_d max(q_d*lo_d, q_d*hi_d) for query head h against KV head h // (Hq/Hkv)'s
    page bounds lo, hi [B, Hkv, NP, D], i.e. max(q, 0).hi + min(q, 0).lo (lo <= hi): two batched
    matrix products. The current page (the last of ceil(n/P), n = lengths[b]) scores +inf, pages past
    it -inf."""
    b, hq, d = q.shape
    hkv, num_pages = lo.shape[1], lo.shape[2]
    qg = q.float().view(b, hkv, hq // hkv, d)
    bound = qg.clamp(min=0) @ hi.float().transpose(-1, -2) + qg.clamp(max=0) @ lo.float().transpose(-1, -2)
    bound = bound.reshape(b, hq, num_pages)
    used = (-(-lengths.long() // page_size)).view(b, 1, 1)
    page = torch.arange(num_pages, device=q.device)
    bound = bound.masked_fill(page >= used, float("-inf"))
    return bound.masked_fill(page == used - 1, float("inf"))


def quest_page_positions(top: torch.Tensor, lengths: torch.Tensor, page_size: int, kmax: int):
    """Each head's pages top [B, Hq, T] as positions: sorted ascending, expanded to their P slots, cut
    at kmax; positions >= n = lengths[b] become n-1 and are not counted. Returns (indices int64
    [B, Hq, kmax], counts int32 [B, Hq])."""
    b = top.shape[0]
    pages = top.long().sort(dim=-1).values
    positions = (pages.unsqueeze(-1) * page_size + torch.arange(page_size, device=top.device)).flatten(-2)[..., :kmax]
    n = lengths.long().view(b, 1, 1)
    live = positions < n
    return torch.where(live, positions, (n - 1).clamp(min=0)), live.sum(-1).to(torch.int32)


def quest_select(scores: torch.Tensor, lengths: torch.Tensor, page_size: int, take: int, kmax: int):
    """Each head's top ``take`` pages by scores [B, Hq, NP] (equal scores: lower page first) as
    positions: ``quest_page_positions`` of ``topk_desc``'s pages."""
    return quest_page_positions(topk_desc(scores, take)[1], lengths, page_size, kmax)


# ---- decode's linear layers (reference of ops.skinny) -----------------------------------------------


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias [N]) -> [..., N] in x's dtype: ``F.linear`` on the inputs
    as given (no upcast), so on a GPU this is cuBLAS with its own fp32 accumulation, and on CPU
    PyTorch's kernels: the engine's prefill and every product the kernel does not take."""
    return torch.nn.functional.linear(x, weight, bias)
