"""Decode-attention ops. On CUDA tensors the Triton kernels run when Triton is installed; everywhere
else the PyTorch references in ``naive``. Both have the same contract and are tested against each other."""
from __future__ import annotations

import importlib.util

from lessismore.ops import naive

# Triton is optional (CPU installs use the references); when it is installed, the kernels must import.
_triton = None
if importlib.util.find_spec("triton") is not None:
    from lessismore.ops import triton_decode as _triton


def _use_triton(q) -> bool:
    return _triton is not None and q.is_cuda


def sparse_decode_attention(q, k_cache, v_cache, indices, counts, scale=None):
    """q [B, Hq, D]; k/v_cache [B, Hkv, L, D]; indices [B, Kmax] int32 shared by all heads of a row;
    counts [B] int32 -> out [B, Hq, D]."""
    impl = _triton.sparse_decode_attention if _use_triton(q) else naive.sparse_decode_attention
    return impl(q, k_cache, v_cache, indices, counts, scale)


def sparse_decode_attention_per_head(q, k_cache, v_cache, indices, counts, scale=None):
    """As sparse_decode_attention with indices [B, Hq, Kmax] and counts [B, Hq]."""
    impl = _triton.sparse_decode_attention_per_head if _use_triton(q) else naive.sparse_decode_attention_per_head
    return impl(q, k_cache, v_cache, indices, counts, scale)


def decode_attention(q, k_cache, v_cache, selection, scale=None):
    """Attend over a ``methods.Selection`` (shared or per head)."""
    fn = sparse_decode_attention_per_head if selection.per_head else sparse_decode_attention
    return fn(q, k_cache, v_cache, selection.indices, selection.counts, scale)
