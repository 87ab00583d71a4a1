"""Decode attention per layer role, over the engine's cache (row b's tokens in slots 0..lengths[b]-1).

FULL          dense attention over the row's tokens;
SELECT_DENSE  dense attention, then the method's selection for the layers after it;
SELECT_SPARSE the method's selection for this layer, then sparse attention over it;
SPARSE        sparse attention over the last selection of this step.

Selections are always the core library's (``methods.get(name).select``) semantics. On CUDA the
selection layers of LessIsMore and TidalDecode take fused paths (dense attention that also writes the
scores, then top-k and the set on the GPU: ``ops.selection.select_lessismore`` and ``tidal_select``
below); they are tested equal to ``select``. Every other case calls ``select`` itself.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from lessismore import methods, ops
from lessismore.config import SparseConfig
from lessismore.methods import LayerRole, Selection
from lessismore.ops import naive

# (layer, role, q [B,Hq,D], k [B,Hkv,L,D], v, valid [B,L], selection | None, out [B,Hq,D]) -- as the HF
# integration's observers; called in eager steps only (never inside a captured graph).
Observer = Callable[..., None]


# Dense split-K attention over a row of the cache: how many programs per multiprocessor to aim for
# (None: the kernel's own choice, about two waves). benchmarks/e2e.py --sweep times 4, 8 and 16 against
# it on the GPU: on the H200 the kernel's choice was as fast or faster at every point measured.
DENSE_PROGRAMS_PER_SM: int | None = None
_BLOCK_N = 128  # the dense kernel's block of positions


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def dense_tuning(q: torch.Tensor, k_cache: torch.Tensor) -> dict:
    """num_splits for the dense kernel at this (static) shape: programs ~ DENSE_PROGRAMS_PER_SM per
    SM, each at least two blocks of positions."""
    if not q.is_cuda or DENSE_PROGRAMS_PER_SM is None:
        return {}
    rows = q.shape[0] * k_cache.shape[1]
    want = -(-DENSE_PROGRAMS_PER_SM * _sms(q.device.index or 0) // rows)
    blocks = -(-k_cache.shape[2] // _BLOCK_N)
    return {"num_splits": max(1, min(want, blocks // 2))}


def dense_attention(q, k_cache, v_cache, lengths):
    """Full decode attention over slots 0..lengths[b]-1: the Triton split-K kernel on CUDA."""
    if q.is_cuda:
        from lessismore.ops.triton_decode import dense_decode_attention

        return dense_decode_attention(q, k_cache, v_cache, lengths, **dense_tuning(q, k_cache))
    return naive.dense_decode_attention(q, k_cache, v_cache, lengths)


def tidal_selection(scores: torch.Tensor, lengths: torch.Tensor, budget: int) -> Selection:
    """TidalDecode's set from scores [B, Hq, L] that are -inf outside slots 0..n-2 (n = lengths[b]):
    each head's top budget-1 positions plus the current token n-1, ascending; all n positions when
    n <= budget. Equal to ``methods.get("tidaldecode").select`` on a contiguous cache."""
    b, h, length = scores.shape
    kmax = min(budget, length)
    n = lengths.long().view(b, 1, 1)
    slot = torch.arange(kmax, device=scores.device)
    whole = torch.where(slot < n, slot, torch.full_like(slot, length - 1))  # [B, 1, kmax]
    if budget > 1 and length > 1:
        top = scores.topk(min(budget - 1, length), dim=-1, sorted=False).indices.sort(dim=-1).values
        top = torch.cat([top, (n - 1).expand(b, h, 1)], dim=-1)[..., :kmax]
    else:
        top = (n - 1).expand(b, h, kmax)
    indices = torch.where(n <= budget, whole, top)
    counts = lengths.view(b, 1).clamp(max=budget).to(torch.int32).expand(b, h).contiguous()
    return Selection(indices=indices, counts=counts)


class DecodeAttention:
    """One method's per-layer decode attention. ``fused``: use the GPU selection paths (CUDA only)."""

    def __init__(self, cfg: SparseConfig, num_layers: int, fused: bool):
        self.cfg = cfg
        self.method = methods.get(cfg.method)
        self.roles = self.method.layer_roles(cfg, num_layers)
        self.fused = fused
        # StreamingLLM's set depends on the lengths alone: one selection per step serves every layer.
        self.select_once = cfg.method == "streaming"
        self.observers: list[Observer] = []

    def begin_step(self):
        """Forget the previous step's selection (called at the start of every decode step)."""
        self.selection: Selection | None = None

    def _select(self, q, k_cache, v_cache, lengths, dense: bool):
        """(out or None, Selection) for a selection layer."""
        name, cfg = self.cfg.method, self.cfg
        if self.fused and dense and name == "lessismore":
            from lessismore.ops.selection import select_lessismore

            return select_lessismore(q, k_cache, v_cache, lengths, cfg, **dense_tuning(q, k_cache))
        if self.fused and dense and name == "tidaldecode":
            from lessismore.ops.triton_decode import split_decode

            scores = torch.empty(q.shape[0], q.shape[1], k_cache.shape[2], device=q.device, dtype=torch.float32)
            out = split_decode(q, k_cache, v_cache, None, lengths, dense=True, scores=scores, score_lo=0, score_window=1,
                               **dense_tuning(q, k_cache))
            return out, tidal_selection(scores, lengths, cfg.budget)
        out = dense_attention(q, k_cache, v_cache, lengths) if dense else None
        if self.select_once and self.selection is not None:
            return out, self.selection
        valid = torch.arange(k_cache.shape[2], device=q.device) < lengths.view(-1, 1)
        return out, self.method.select(cfg, q, k_cache, valid)

    def __call__(self, layer: int, q, k_cache, v_cache, lengths) -> torch.Tensor:
        """q [B, Hq, D] (this step's queries, RoPE applied); caches [B, Hkv, L, D] with this step's
        token already written; lengths [B] the row lengths including it. Returns [B, Hq, D]."""
        role = self.roles[layer]
        selection = None
        if role is LayerRole.FULL:
            out = dense_attention(q, k_cache, v_cache, lengths)
        elif role is LayerRole.SELECT_DENSE:
            out, selection = self._select(q, k_cache, v_cache, lengths, dense=True)
            self.selection = selection
        else:
            if role is LayerRole.SELECT_SPARSE:
                _, self.selection = self._select(q, k_cache, v_cache, lengths, dense=False)
            selection = self.selection
            out = ops.decode_attention(q, k_cache, v_cache, selection)
        if self.observers:
            valid = torch.arange(k_cache.shape[2], device=q.device) < lengths.view(-1, 1)
            for observer in self.observers:
                observer(layer, role, q, k_cache, v_cache, valid, selection, out)
        return out
