"""Oracle: each query head attends to its exact top-K positions by its true scores, in every layer
that is not a full layer. Not a practical method (it reads every key to choose), but an upper bound on
the attention recall any K-token selection can reach; used by the analysis tools."""
from __future__ import annotations

import torch

from lessismore.methods.base import Method, fits_budget, grouped_scores, mask_to_selection, per_head_top, register, valid_ranks


def oracle_mask(scores: torch.Tensor, valid: torch.Tensor, budget: int) -> torch.Tensor:
    _, n = valid_ranks(valid)
    eligible = valid.unsqueeze(1).expand_as(scores)
    mask = per_head_top(scores, eligible, min(budget, valid.shape[-1]))
    return torch.where(fits_budget(n, budget)[:, None, None], eligible, mask)


@register
class Oracle(Method):
    name = "oracle"
    settings = {"budget": 2048, "full_layers": (0, 1)}
    per_head = True

    def select(self, cfg, q, k, valid):
        return mask_to_selection(oracle_mask(grouped_scores(q, k), valid, cfg.budget), min(cfg.budget, valid.shape[-1]))
