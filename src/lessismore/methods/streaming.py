"""StreamingLLM: attention sinks plus a window of the most recent tokens.

G. Xiao, Y. Tian, B. Chen, S. Han, M. Lewis. "Efficient Streaming Language Models with Attention Sinks".
ICLR 2024, arXiv 2309.17453.

The s first positions and the last K - s positions, one set for all heads, in every non-full layer.
Nothing is evicted from the cache (the same memory as the other methods, so the comparison is on
selection alone).
"""
from __future__ import annotations

import torch

from lessismore.methods.base import Method, mask_to_selection, register, valid_ranks


def streaming_mask(valid: torch.Tensor, budget: int, sinks: int) -> torch.Tensor:
    rank, n = valid_ranks(valid)
    keep = (rank < sinks) | (rank >= (n - (budget - sinks)).unsqueeze(-1))
    return valid & keep


@register
class Streaming(Method):
    name = "streaming"
    settings = {"budget": 2048, "sink_tokens": 4, "full_layers": (0, 1)}
    query_independent = True

    def select(self, cfg, q, k, valid):
        return mask_to_selection(streaming_mask(valid, cfg.budget, cfg.sink_tokens), min(cfg.budget, valid.shape[-1]))
