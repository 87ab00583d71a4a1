"""What every selection method shares: the Selection result, the layer schedule and the method registry.

All selection code is tensor code on the device that holds the cache: fixed output shapes, no host
synchronization, so it runs batched and can be captured in a CUDA graph.

Positions are cache slots. ``valid`` [B, L] marks the slots that hold tokens of each row (left padding
and unfilled slots are False); sinks and recent windows count valid slots only, so a padded row selects
exactly what it would select alone.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from lessismore.config import SparseConfig
from lessismore.ops import naive


@dataclass
class Selection:
    """The positions a sparse layer reads.

    indices: int64, ascending, [B, Kmax] for a set shared by all heads or [B, H, Kmax] per query head.
             Entries at or past ``counts`` repeat a valid position and must be ignored.
    counts:  int32, [B] or [B, H]: how many entries of each row are real.
    """

    indices: torch.Tensor
    counts: torch.Tensor

    @property
    def per_head(self) -> bool:
        return self.indices.dim() == 3


class LayerRole(enum.Enum):
    FULL = "full"  # dense attention over the whole cache
    SELECT_DENSE = "select_dense"  # dense attention, then choose the set for the layers after it
    SELECT_SPARSE = "select_sparse"  # choose a set for this layer, then attend over it
    SPARSE = "sparse"  # attend over the last chosen set


class Method:
    """A selection method. Subclasses set ``name``, ``settings``, ``per_head`` and implement ``select``.

    settings: the SparseConfig fields the method uses, with their defaults (None: filled in later, as
    ``selection_layers`` is by ``SparseConfig.resolve``). Any other field must be left unset.
    """

    name: str = ""
    settings: dict = {}
    per_head: bool = False
    # True: the set depends on the row lengths alone (StreamingLLM), so one selection per step serves
    # every layer.
    query_independent: bool = False
    # True: every layer attends over the whole cache (full attention), so callers may run a model
    # unpatched and count every KV row as read.
    dense: bool = False

    @property
    def uses_selection_layers(self) -> bool:
        """True: selections are made at cfg.selection_layers, which attend fully (TidalDecode's
        schedule); False: every non-full layer selects for itself (Quest, oracle, StreamingLLM)."""
        return "selection_layers" in self.settings

    def validate(self, cfg: SparseConfig) -> None:
        """Checks of the method's own (beyond each field's range, which SparseConfig checks). Raises
        ValueError naming the field."""

    def layer_roles(self, cfg: SparseConfig, num_layers: int) -> list[LayerRole]:
        full = set(cfg.full_layers)
        roles = []
        if not self.uses_selection_layers:
            return [LayerRole.FULL if i in full else LayerRole.SELECT_SPARSE for i in range(num_layers)]
        selection = set(cfg.selection_layers or ())
        seen_selection = False
        for i in range(num_layers):
            if i in full:
                roles.append(LayerRole.FULL)
            elif i in selection:
                roles.append(LayerRole.SELECT_DENSE)
                seen_selection = True
            else:
                # Before the first selection layer there is no set to reuse: attend fully.
                roles.append(LayerRole.SPARSE if seen_selection else LayerRole.FULL)
        return roles

    def select(self, cfg: SparseConfig, q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> Selection:
        """The reference selection. q [B, Hq, D] (the current query), k [B, Hkv, L, D] (the cache,
        current token included), valid [B, L] bool. Returns the Selection for the sparse layers."""
        raise NotImplementedError

    def select_sharded(self, cfg: SparseConfig, q, k, valid, group=None) -> Selection:
        """``select`` for one tensor-parallel rank holding a share of the heads (q and k are its
        heads); the set must be the one of the whole model. Per-head and query-independent sets need
        nothing from the other ranks; a set shared by all heads that depends on the queries must
        override this."""
        if group is not None and not (self.per_head or self.query_independent):
            raise NotImplementedError(f"method {self.name!r}: no selection across tensor-parallel ranks")
        return self.select(cfg, q, k, valid)

    def fused_attention(self, cfg: SparseConfig, q: torch.Tensor, cache, scale: float | None):
        """A selection layer's fused GPU path, in two parts: (dense attention output [B, Hq, D],
        finish), where ``finish()`` makes the Selection equal to ``select`` from what the attention
        left (its scores); None where the method or the cache (a ``decode.DecodeCache``) has none.
        The executor may run ``finish`` on a second stream, beside the rest of the layer."""
        return None

    def fused_select(self, cfg: SparseConfig, q: torch.Tensor, cache, scale: float | None):
        """``fused_attention`` in one call: (dense attention output, Selection), or None."""
        found = self.fused_attention(cfg, q, cache, scale)
        if found is None:
            return None
        out, finish = found
        return out, finish()

    # ---- per-layer decode state (the engine keeps one per non-full layer; HF and vLLM keep none) ----

    def decode_state(self, cfg: SparseConfig, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                     device, dtype):
        """The state a cache of ``batch`` rows of ``max_len`` slots keeps for this method at one layer
        (e.g. Quest's page bounds), handed to the executor as ``DecodeCache.state``; None: no state.
        A fresh state describes empty rows."""
        return None

    def fill_state(self, cfg: SparseConfig, state, k: torch.Tensor, row: int, length: int) -> None:
        """(Re)build row ``row`` of ``state`` from its cache: k [batch, Hkv, max_len, D] is the layer's
        whole key cache, the row's tokens at slots 0..length-1 (the engine calls it after a prefill).
        Whatever the row held before is forgotten."""

    def update_state(self, cfg: SparseConfig, cache) -> None:
        """Bring ``cache.state`` up to date with ``cache`` (a ``decode.DecodeCache`` in the lengths
        layout, this step's token written at slot n-1) at a non-full layer, whichever path selects.
        Fixed shapes, no host sync: it runs inside captured CUDA graphs, for inactive rows too (their
        n does not move, so an update must be idempotent)."""

    def fast_select(self, cfg: SparseConfig, q: torch.Tensor, cache) -> Selection | None:
        """A SELECT_SPARSE layer's selection from ``cache.state`` (after ``update_state``), equal to
        ``select`` on the live entries; None where the method has none (the executor then runs
        ``select``)."""
        return None


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"method: unknown method {name!r}; allowed: {', '.join(available())}")
    return _REGISTRY[name]


def available() -> list[str]:
    return sorted(_REGISTRY)


def budget_grid(names, budgets=()) -> list[tuple[str, int | None]]:
    """(method, budget) cells in the order given: each method with each budget (none given: its default
    budget), a method without a budget (full attention) once, with budget None."""
    cells = []
    for name in names:
        settings = get(name).settings
        if "budget" not in settings:
            cells.append((name, None))
        else:
            cells.extend((name, b) for b in (tuple(dict.fromkeys(budgets)) or (settings["budget"],)))
    return cells


# ---- tensor helpers shared by the methods -------------------------------------------------------


def valid_ranks(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rank [B, L]: index of each slot among its row's valid slots; n [B]: valid slots per row."""
    rank = valid.to(torch.int32).cumsum(-1) - 1
    return rank, valid.sum(-1)


def grouped_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Pre-softmax scores q_h . k_j for every query head: [B, Hq, L] in fp32 (unscaled: the scale does
    not change any ranking)."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.view(b, hkv, hq // hkv, d).float()
    return torch.matmul(qg, k.float().transpose(-1, -2)).reshape(b, hq, k.shape[2])


def mask_to_selection(mask: torch.Tensor, kmax: int) -> Selection:
    """A boolean mask [..., L] with at most kmax True per row -> ascending indices [..., kmax] + counts."""
    length = mask.shape[-1]
    positions = torch.arange(length, device=mask.device)
    key = torch.where(mask, positions, positions + length)
    ordered = key.topk(kmax, dim=-1, largest=False, sorted=True).values
    # Pad with the last slot, a valid position, so gathers stay in range; counts mark it unused.
    indices = torch.where(ordered < length, ordered, torch.full_like(ordered, length - 1))
    return Selection(indices=indices, counts=mask.sum(-1).to(torch.int32))


def fits_budget(n: torch.Tensor, budget: int) -> torch.Tensor:
    """[B] bool: rows whose every token fits in the budget; they read everything (exact)."""
    return n <= budget


def per_head_top(scores: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """Mask [B, H, L] of each head's top-k eligible positions by score (the top-k rule of
    ``naive.topk_desc``: equal scores, lower position first)."""
    masked = scores.masked_fill(~eligible, float("-inf"))
    top = naive.topk_desc(masked, k)[1]
    chosen = torch.zeros_like(masked, dtype=torch.bool).scatter_(-1, top, True)
    return chosen & eligible
