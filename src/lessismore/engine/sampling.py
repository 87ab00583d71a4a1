"""Sampling on the device, batched, with per-sequence parameters and per-sequence random streams.

Every row has its own temperature, top-p, top-k and seed. The random numbers are a counter-based hash
of (seed, token index in the sequence, vocabulary id), so a sequence draws the same tokens whatever
batch or slot it runs in, and the step needs no generator state: it is capturable in a CUDA graph.
Sampling is Gumbel-max over the kept tokens: argmax(logit / T + G) with G = -log(-log U) is a draw
from softmax(logit / T) restricted to them.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # < 2**27: products of 32-bit values stay inside int64


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * _MULT) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MULT) & _MASK32
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, counter: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """U(0, 1) fp32 [B, V] for seed [B], counter [B] (int64) and vocabulary ids [B, V] or [V]."""
    s = _mix(_mix(seed & _MASK32) ^ (seed >> 32) & _MASK32)
    row = _mix(s ^ _mix(counter & _MASK32))
    h = _mix(row[:, None] ^ _mix(ids.long()))
    return ((h >> 8).float() + 0.5) / 16777216.0  # 24 bits: exact in fp32, strictly inside (0, 1)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    do_sample: bool,
) -> torch.Tensor:
    """Next token ids [B] (int64) from logits [B, V].

    temperature [B] fp32 (0: greedy for that row), top_p [B] fp32 in (0, 1], top_k [B] int (0: all),
    seed/counter [B] int64. ``do_sample=False`` is the greedy-only path (no sort)."""
    greedy = logits.argmax(-1)
    if not do_sample:
        return greedy
    vocab = logits.shape[-1]
    scaled = logits.float() / temperature.clamp_min(1e-6)[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True)
    probs = torch.softmax(ordered, dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).long()
    keep = (before < top_p[:, None]) & (rank[None, :] < k[:, None])
    keep[:, 0] = True
    gumbel = -torch.log(-torch.log(uniform(seed, counter, order)))
    score = torch.where(keep, ordered + gumbel, torch.full_like(ordered, float("-inf")))
    drawn = order.gather(-1, score.argmax(-1, keepdim=True))[:, 0]
    return torch.where(temperature > 0, drawn, greedy)
