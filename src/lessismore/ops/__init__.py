"""Decode-attention ops. Each Triton kernel has a PyTorch reference beside it in ``naive`` with the
same contract; they are tested against each other. ``triton_usable`` is the package's one answer to
"does this tensor take the Triton path?": Triton is installed and the tensor is on a CUDA device (the
CPU tests run the kernels directly, under Triton's interpreter). ``linear`` is decode's skinny GEMM
(``ops.skinny``) beside ``F.linear``."""
from __future__ import annotations

import importlib.util

import torch

from lessismore.ops import naive

HAVE_TRITON = importlib.util.find_spec("triton") is not None
if HAVE_TRITON:
    # When Triton is installed, the kernels must import.
    from lessismore.ops import triton_decode


def triton_usable(t: torch.Tensor) -> bool:
    return HAVE_TRITON and t.is_cuda


# Each op below takes ``triton``: None picks by ``triton_usable``; True/False force one path (the CPU
# tests force the kernels under the interpreter).


def _pick(t: torch.Tensor, triton: bool | None) -> bool:
    return triton_usable(t) if triton is None else triton


def decode_attention(q, k_cache, v_cache, selection, scale=None, triton: bool | None = None):
    """Attention over a ``methods.Selection`` only: q [B, Hq, D]; k/v_cache [B, Hkv, L, D]; a set
    shared by all heads (indices [B, Kmax], counts [B]) or one per query head (indices [B, Hq, Kmax],
    counts [B, Hq]) -> out [B, Hq, D]."""
    if _pick(q, triton):
        impl = triton_decode.sparse_decode_attention_per_head if selection.per_head else triton_decode.sparse_decode_attention
    else:
        impl = naive.sparse_decode_attention_per_head if selection.per_head else naive.sparse_decode_attention
    return impl(q, k_cache, v_cache, selection.indices, selection.counts, scale)


def topk_desc(scores: torch.Tensor, k: int, lengths: torch.Tensor | None = None, active: torch.Tensor | None = None,
              triton: bool | None = None):
    """Each row's k largest scores, descending, equal scores lower position first (the selection
    layers' one top-k rule): (values fp32, indices int64). active ([B] int32, optional): only rows b
    with active[b] != 0 need be computed (the kernel skips the others; the reference computes all)."""
    if _pick(scores, triton):
        from lessismore.ops import topk

        return topk.topk_desc(scores, k, lengths, active)
    return naive.topk_desc(scores, k, lengths)


def topk_positions(scores: torch.Tensor, k: int, lengths: torch.Tensor | None = None, triton: bool | None = None):
    """The positions of ``topk_desc``'s k entries, ascending (int64): a per-head set."""
    if _pick(scores, triton):
        from lessismore.ops import topk

        return topk.topk_positions(scores, k, lengths)
    return naive.topk_positions(scores, k, lengths)


def quest_fold(lo, hi, k, lengths, page_size: int, triton: bool | None = None) -> None:
    """Quest's page bounds lo, hi [b, Hkv, NP, D] take slot n-2 of each row of k (in place)."""
    if _pick(k, triton):
        from lessismore.ops import quest

        return quest.quest_fold(lo, hi, k, lengths, page_size)
    return naive.quest_fold(lo, hi, k, lengths, page_size)


def quest_page_scores(q, lo, hi, lengths, page_size: int, triton: bool | None = None) -> torch.Tensor:
    """Quest's page scores [B, Hq, NP] fp32: the current page +inf, pages past it -inf."""
    if _pick(q, triton):
        from lessismore.ops import quest

        return quest.quest_page_scores(q, lo, hi, lengths, page_size)
    return naive.quest_page_scores(q, lo, hi, lengths, page_size)


def quest_page_positions(top, lengths, page_size: int, kmax: int, triton: bool | None = None):
    """Each head's pages top [B, Hq, T] as ascending positions: (indices [B, Hq, kmax], counts [B, Hq]).
    The kernel holds a head's pages and their slots in registers; a selection too large for that
    (more than ``quest.POSITIONS_MAX_TILE`` slots once padded: budgets past ~8K) takes the reference,
    which gives the same result."""
    if _pick(top, triton):
        from lessismore.ops import quest

        if quest.positions_fit(top.shape[-1], page_size):
            return quest.quest_page_positions(top, lengths, page_size, kmax)
    return naive.quest_page_positions(top, lengths, page_size, kmax)


def quest_select(scores, lengths, page_size: int, take: int, kmax: int, triton: bool | None = None):
    """Each head's top ``take`` pages by scores [B, Hq, NP] fp32 (equal scores: lower page first) as
    ascending positions: ``quest_page_positions(topk_desc(scores, take)[1], ...)``'s (indices, counts).
    The pages past a row's tokens must score -inf (``quest_page_scores`` writes them so).
    The kernel does both in one launch for rows of up to ``quest.SELECT_MAX_PAGES`` pages; longer rows
    take the two ops, which give the same result."""
    if not _pick(scores, triton):
        return naive.quest_select(scores, lengths, page_size, take, kmax)
    from lessismore.ops import quest

    if quest.select_fits(scores.shape[-1], page_size):
        return quest.quest_select(scores, lengths, page_size, take, kmax)
    return quest_page_positions(topk_desc(scores, take, triton=True)[1], lengths, page_size, kmax, triton=True)


def linear(x, weight, bias=None, triton: bool | None = None) -> torch.Tensor:
    """x @ weight^T + bias (``F.linear``'s contract, x's dtype). The Triton kernel (``skinny``) takes
    decode's skinny inputs only: x [M, K] with M <= ``skinny.MAX_M`` (64) and weight of unit stride
    over K; anything else (more rows, more dimensions, a transposed weight) takes the reference,
    ``F.linear``."""
    if _pick(x, triton) and x.dim() == 2 and weight.dim() == 2 and weight.stride(-1) == 1:
        from lessismore.ops import skinny

        if x.shape[0] <= skinny.MAX_M:
            return skinny.skinny_linear(x, weight, bias)
    return naive.linear(x, weight, bias)
