"""SparseConfig: the one description of a sparse-attention run, validated before any work starts.

Every setting but ``method`` defaults to None, meaning "the method's default". A method declares the
settings it uses (``Method.settings``, with their defaults); the config fills those in and refuses a
setting the method would ignore, so ``SparseConfig(method="tidaldecode", recent_ratio=0.9)`` is an
error rather than a silent no-op. Full attention is ``SparseConfig(method="full")`` and nothing else.
"""
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

SETTINGS = ("budget", "recent_ratio", "sink_tokens", "selection_layers", "full_layers", "page_size")


def default_selection_layers(model_type: str, num_layers: int, hidden_size: int) -> tuple[int, ...]:
    """Layer 2 plus a middle layer: the papers' choice where known, else about num_layers / 3."""
    known = KNOWN_SELECTION_LAYERS.get((model_type, num_layers, hidden_size))
    if known is not None:
        return known
    middle = max(3, round(num_layers / 3))
    return (2, middle) if middle < num_layers else (2,)


def _settings_of(method: str) -> dict:
    from lessismore import methods

    return methods.get(method).settings


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def _layer_tuple(name: str, value) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name}: expected a sequence of layer indices, got {value!r}")
    layers = tuple(value)
    if any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in layers):
        raise ValueError(f"{name}: layer indices must be non-negative integers, got {layers!r}")
    return tuple(sorted(set(layers)))


@dataclass(frozen=True)
class SparseConfig:
    """Settings of one sparse-attention method (None: the method's default; a setting the method does
    not use must stay None).

    method:           a registered method name (see ``lessismore.methods.available()``).
    budget:           K, the number of KV positions a sparse layer reads per sequence (per head for
                      per-head methods). Default 2048.
    recent_ratio:     r, the share of K given to the most recent positions (LessIsMore); the sinks
                      come out of this share. Default 0.25.
    sink_tokens:      s, the first positions always kept (LessIsMore, StreamingLLM). Default 4.
    selection_layers: layers that attend fully and choose the set for the layers after them
                      (LessIsMore, TidalDecode). None: the model's default (see
                      ``default_selection_layers``), filled in by ``resolve``.
    full_layers:      layers that always attend fully (TidalDecode's schedule: 0 and 1). Quest in the
                      LessIsMore paper's setting uses ``full_layers=()``.
    page_size:        Quest's page size P. Default 16.
    """

    method: str = "lessismore"
    budget: int | None = None
    recent_ratio: float | None = None
    sink_tokens: int | None = None
    selection_layers: tuple[int, ...] | None = None
    full_layers: tuple[int, ...] | None = None
    page_size: int | None = None

    def __post_init__(self):
        from lessismore import methods

        method = methods.get(self.method)
        unused = [name for name in SETTINGS if getattr(self, name) is not None and name not in method.settings]
        if unused:
            uses = ", ".join(method.settings) or "no settings"
            raise ValueError(f"{unused[0]}: not used by method {self.method!r} (it uses {uses})")
        for name, default in method.settings.items():
            if getattr(self, name) is None and default is not None:
                object.__setattr__(self, name, default)
        if self.budget is not None:
            _positive_int("budget", self.budget)
        if self.page_size is not None:
            _positive_int("page_size", self.page_size)
        if self.recent_ratio is not None:
            if isinstance(self.recent_ratio, bool) or not isinstance(self.recent_ratio, (int, float)) \
                    or not 0.0 <= float(self.recent_ratio) <= 1.0:
                raise ValueError(f"recent_ratio: must be a number in [0, 1], got {self.recent_ratio!r}")
            object.__setattr__(self, "recent_ratio", float(self.recent_ratio))
        if self.sink_tokens is not None and (
            not isinstance(self.sink_tokens, int) or isinstance(self.sink_tokens, bool)
            or not 0 <= self.sink_tokens < self.budget
        ):
            raise ValueError(f"sink_tokens: must be an integer in [0, budget) = [0, {self.budget}), got {self.sink_tokens!r}")
        for name in ("selection_layers", "full_layers"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _layer_tuple(name, getattr(self, name)))
        if self.selection_layers is not None and set(self.selection_layers) & set(self.full_layers or ()):
            raise ValueError(f"selection_layers: {self.selection_layers} overlap full_layers {self.full_layers}")
        method.validate(self)

    @classmethod
    def for_method(cls, method: str, **settings) -> "SparseConfig":
        """The config of ``method`` from a shared set of settings, keeping only those the method uses
        (None values are left out too). For sweeps over several methods with one set of options; to
        be told about a setting a method ignores, call ``SparseConfig(...)`` directly."""
        uses = _settings_of(method)
        return cls(method=method, **{k: v for k, v in settings.items() if k in uses and v is not None})

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
        """Fill in the model's default selection layers (methods that use them) and check every layer
        index against the model."""
        cfg = self
        if "selection_layers" in _settings_of(cfg.method) and cfg.selection_layers is None:
            cfg = dataclasses.replace(cfg, selection_layers=default_selection_layers(model_type, num_layers, hidden_size))
        for name in ("selection_layers", "full_layers"):
            bad = [x for x in getattr(cfg, name) or () if x >= num_layers]
            if bad:
                raise ValueError(
                    f"{name}: layer {bad[0]} is out of range; the model has {num_layers} layers (allowed 0..{num_layers - 1})"
                )
        return cfg


def require_sparse_config(value, field: str = "cfg") -> None:
    """The one-line error where a SparseConfig is needed and something else came."""
    if not isinstance(value, SparseConfig):
        raise ValueError(f"{field}: expected a SparseConfig (full attention is SparseConfig(method='full')), got {value!r}")


def __getattr__(name):
    # FULL is built on first use: building a config loads the method registry (and torch), which
    # importing this module alone must not.
    if name == "FULL":
        return SparseConfig(method="full")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
