"""Decode attention over a paged KV cache (vLLM's GPU layout), and the executor's view of one.

Layout: keys and values of one layer are [num_blocks, block_size, Hkv, D] (any strides, unit stride
over D: vLLM's ``kv_cache.transpose(1, 2).split(head_size, -1)`` views); a row's tokens are positions
0..n-1 and position p of row b is slot p % block_size of block block_table[b, p // block_size].

The kernels are ``triton_decode``'s split-K kernel with its ``PAGED`` switch on: the block-table
lookup happens inside the kernel, per K/V row read, so a step gathers nothing. ``paged_gather`` (plain
PyTorch) copies positions out for the reference selections and observers.

``PagedCache`` is the ``decode.DecodeCache`` of such a cache for the decode rows of one step: span is a
static length (vLLM: max_model_len), so every shape is fixed and a step can be captured in a CUDA graph.
"""
from __future__ import annotations

import os

import torch

from lessismore import ops
from lessismore.decode import DecodeCache
from lessismore.methods import Selection


def paged_decode(q, key_cache, value_cache, block_table, span: int, selection: Selection | None = None,
                 lengths: torch.Tensor | None = None, scale=None, scores=None, score_lo=0, score_window=0, **tuning):
    """q [B, Hq, D] over a paged cache. ``selection`` None: dense attention over positions
    0..lengths[b]-1 (``scores``: an fp32 [B, Hq, span] buffer for the unscaled q.k at
    score_lo <= pos < lengths[b] - score_window, -inf elsewhere); else attention over the selected
    positions (a set shared by the heads or one per query head). Returns [B, Hq, D] in q's dtype."""
    td = ops.triton_decode
    pages = (block_table, span)
    if selection is None:
        return td.split_decode(q, key_cache, value_cache, None, lengths, scale, dense=True, scores=scores,
                               score_lo=score_lo, score_window=score_window, pages=pages, **tuning)
    return td.split_decode(q, key_cache, value_cache, selection.indices, selection.counts, scale,
                           per_head=selection.per_head, pages=pages, **tuning)


def paged_gather(cache: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of a paged cache [num_blocks, block_size, Hkv, D] at ``positions`` [B, P] (each row's own
    positions) -> [B, Hkv, P, D]. PyTorch indexing: fixed shapes, no host synchronization."""
    block_size = cache.shape[1]
    positions = positions.long()
    blocks = block_table.long().gather(1, positions // block_size)
    return cache[blocks, positions % block_size].transpose(1, 2)


TOPK_ENV = "LESSISMORE_PAGED_TOPK"  # "torch": the fused selections' top-k in PyTorch (sort) even on CUDA


def triton_topk_available() -> bool:
    """Whether the fused selections' top-k may take ``ops.topk_desc``'s Triton path (not switched off
    with LESSISMORE_PAGED_TOPK=torch)."""
    return os.environ.get(TOPK_ENV, "").strip().lower() != "torch"


class PagedCache(DecodeCache):
    """The decode rows of one step over one layer's paged cache, for ``decode.DecodeExecutor``.

    key_cache, value_cache: [num_blocks, block_size, Hkv, D]; block_table [B, max_blocks];
    lengths [B] (tokens of each row, the current one included, already written); span: the static
    number of positions a row may hold (sizes scores and selections; >= every length).
    scores: an optional fp32 buffer of at least B * Hq * span elements, reused by every selection layer
    (a CUDA graph then needs no allocation of its own for them).
    kernels: whether the top-k of the fused selections takes ``ops.topk``'s Triton path (None: on
    CUDA, where that module is installed). Attention always runs on the paged Triton kernels.
    """

    def __init__(self, key_cache, value_cache, block_table, lengths, span: int, scores: torch.Tensor | None = None,
                 kernels: bool | None = None):
        self.key_cache, self.value_cache, self.block_table = key_cache, value_cache, block_table
        self.k = self.v = None
        self.lengths, self._valid = lengths, None
        self._span = int(span)
        self._scores = scores
        if kernels is None:
            kernels = ops.triton_usable(key_cache) and triton_topk_available()
        self.kernels = kernels

    @property
    def span(self) -> int:
        return self._span

    # Attention always runs on the paged kernels; ``kernels`` picks only the top-k's path.
    triton_readable = True

    def _whole(self, cache) -> torch.Tensor:
        """[B, Hkv, span, D]: every position of each row; slots past a row's end repeat its last token
        (they are never valid)."""
        span = torch.arange(self.span, device=self.lengths.device)
        positions = torch.minimum(span, (self.lengths.long() - 1).clamp_min(0).view(-1, 1))
        return paged_gather(cache, self.block_table, positions)

    def _read_all(self, keys: bool) -> torch.Tensor:
        return self._whole(self.key_cache if keys else self.value_cache)

    def _score_buffer(self, q) -> torch.Tensor:
        b, hq = q.shape[0], q.shape[1]
        need = b * hq * self.span
        if self._scores is not None and self._scores.numel() >= need:
            return self._scores.view(-1)[:need].view(b, hq, self.span)
        return torch.empty(b, hq, self.span, device=q.device, dtype=torch.float32)

    def dense(self, q, scale):
        return paged_decode(q, self.key_cache, self.value_cache, self.block_table, self.span,
                            lengths=self.lengths, scale=scale)

    def dense_with_scores(self, q, scale, score_lo, score_window):
        scores = self._score_buffer(q)
        out = paged_decode(q, self.key_cache, self.value_cache, self.block_table, self.span, lengths=self.lengths,
                           scale=scale, scores=scores, score_lo=score_lo, score_window=score_window)
        return out, scores

    def sparse(self, q, selection: Selection, scale):
        return paged_decode(q, self.key_cache, self.value_cache, self.block_table, self.span, selection=selection,
                            scale=scale)


__all__ = ["PagedCache", "TOPK_ENV", "paged_decode", "paged_gather", "triton_topk_available"]
