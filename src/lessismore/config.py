"""SparseConfig: the one description of a sparse-attention run, validated before any work starts."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Selection-layer defaults from the papers: TidalDecode picked 13 for Llama-3.1-8B, LessIsMore 12 for
# Qwen3-8B and 20 for Qwen3-4B. Keyed by (model_type, num_layers, hidden_size).
KNOWN_SELECTION_LAYERS = {
    ("qwen3", 36, 4096): (2, 12),
    ("qwen3", 36, 2560): (2, 20),
    ("llama", 32, 4096): (2, 13),
}


def default_selection_layers(model_type: str, num_layers: int, hidden_size: int) -> tuple[int, ...]:
    """Layer 2 plus a middle layer: the papers' choice where known, else about num_layers / 3."""
    known = KNOWN_SELECTION_LAYERS.get((model_type, num_layers, hidden_size))
    if known is not None:
        return known
    middle = max(3, round(num_layers / 3))
    return (2, middle) if middle < num_layers else (2,)


@dataclass(frozen=True)
class SparseConfig:
    """Settings of one sparse-attention method.

    method:           a registered method name (see ``lessismore.methods.available()``).
    budget:           K, the number of KV positions a sparse layer reads per sequence (per head for
                      per-head methods).
    recent_ratio:     r, the share of K given to the most recent positions (LessIsMore); the sinks
                      come out of this share.
    sink_tokens:      s, the first positions always kept (LessIsMore, StreamingLLM).
    selection_layers: layers that attend fully and choose the set for the layers after them
                      (LessIsMore, TidalDecode). None: the model's default (see
                      ``default_selection_layers``).
    full_layers:      layers that always attend fully (TidalDecode's schedule: 0 and 1). Quest in the
                      SeerAttention-R setting uses ``full_layers=()``.
    page_size:        Quest's page size P.
    """

    method: str = "lessismore"
    budget: int = 2048
    recent_ratio: float = 0.25
    sink_tokens: int = 4
    selection_layers: tuple[int, ...] | None = None
    full_layers: tuple[int, ...] = (0, 1)
    page_size: int = 16

    def __post_init__(self):
        from lessismore.methods import available

        if self.method not in available():
            raise ValueError(f"method: unknown method {self.method!r}; allowed: {', '.join(available())}")
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget <= 0:
            raise ValueError(f"budget: must be a positive integer, got {self.budget!r}")
        if not (0.0 <= float(self.recent_ratio) <= 1.0):
            raise ValueError(f"recent_ratio: must be in [0, 1], got {self.recent_ratio!r}")
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0 or self.sink_tokens >= self.budget:
            raise ValueError(
                f"sink_tokens: must be an integer in [0, budget) = [0, {self.budget}), got {self.sink_tokens!r}"
            )
        if not isinstance(self.page_size, int) or self.page_size <= 0:
            raise ValueError(f"page_size: must be a positive integer, got {self.page_size!r}")
        for name in ("selection_layers", "full_layers"):
            layers = getattr(self, name)
            if layers is None:
                continue
            layers = tuple(layers)
            if any((not isinstance(x, int)) or x < 0 for x in layers):
                raise ValueError(f"{name}: layer indices must be non-negative integers, got {layers!r}")
            object.__setattr__(self, name, tuple(sorted(set(layers))))
        if self.selection_layers is not None and set(self.selection_layers) & set(self.full_layers):
            raise ValueError(
                f"selection_layers: {self.selection_layers} overlap full_layers {self.full_layers}"
            )

    @property
    def recent_share(self) -> int:
        """R = round(K * r), Python's round (half to even); the sinks are part of it when R >= s."""
        return int(round(self.budget * float(self.recent_ratio)))

    @property
    def effective_sinks(self) -> int:
        """Sinks are dropped when the recent share cannot hold them (R < s)."""
        return self.sink_tokens if self.recent_share >= self.sink_tokens else 0

    @property
    def ranked_share(self) -> int:
        """k = K - R positions chosen by score."""
        return self.budget - self.recent_share

    def resolve(self, model_type: str, num_layers: int, hidden_size: int) -> "SparseConfig":
        """Fill in the model's default selection layers and check every layer index against the model."""
        cfg = self
        if cfg.selection_layers is None:
            cfg = dataclasses.replace(cfg, selection_layers=default_selection_layers(model_type, num_layers, hidden_size))
        for name in ("selection_layers", "full_layers"):
            bad = [x for x in getattr(cfg, name) if x >= num_layers]
            if bad:
                raise ValueError(
                    f"{name}: layer {bad[0]} is out of range; the model has {num_layers} layers (allowed 0..{num_layers - 1})"
                )
        return cfg
