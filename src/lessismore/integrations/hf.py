"""LessIsMore and its baselines inside stock HuggingFace transformers models.

``enable(model, cfg)`` registers an attention function with transformers' ``AttentionInterface`` and,
so that padded batches and chunked prefill get their mask, the SDPA mask builder with
``AttentionMaskInterface`` under the same name; then switches the model to it. Prefill (more than one
query token) runs SDPA unchanged. A decode step runs each layer in its role: full and selection layers
attend densely (a selection layer also chooses the set), sparse layers gather the selected K/V rows
and attend over those only.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lessismore import methods, ops
from lessismore.config import SparseConfig
from lessismore.methods import LayerRole, Selection

ATTENTION_NAME = "lessismore"
STATE_ATTR = "_lessismore_state"

# Observer signature: (layer_idx, role, q [B,Hq,D], k [B,Hkv,L,D], v, valid [B,L], selection|None, out [B,Hq,D]).
Observer = Callable[..., None]


@dataclass
class DecodeState:
    """Per-model state: the schedule, the set chosen by the last selection layer, KV-read counters."""

    cfg: SparseConfig
    method: methods.Method
    roles: list[LayerRole]
    previous_attn: str
    selection: Selection | None = None
    observers: list[Observer] = field(default_factory=list)
    # KV positions read / that full attention would read, summed over decode steps, layers and rows.
    read: torch.Tensor | None = None
    full_read: torch.Tensor | None = None
    decode_calls: torch.Tensor | None = None
    in_decode: bool = False

    def reset_stats(self, device) -> None:
        self.read = torch.zeros((), dtype=torch.float64, device=device)
        self.full_read = torch.zeros((), dtype=torch.float64, device=device)
        self.decode_calls = torch.zeros((), dtype=torch.int64, device=device)


def _valid_slots(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """[B, L] bool: the cache slots this decode query may attend to (left padding excluded)."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    last = attention_mask[:, 0, -1, :length]
    return last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2


def lessismore_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls in every attention layer: query [B, Hq, q_len, D], key/value
    [B, Hkv, L, D] (the cache, current token included). Returns ([B, q_len, Hq, D], None)."""
    state: DecodeState | None = getattr(module, STATE_ATTR, None)
    if state is None:
        raise RuntimeError("lessismore attention is selected but lessismore.enable() was not called on this model")
    if query.shape[2] != 1:
        # Prefill, or a prompt chunk: dense. The first prefill after decoding starts a new generate call.
        if state.in_decode or state.read is None:
            state.reset_stats(query.device)
            state.in_decode = False
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    if state.read is None:  # decoding on a cache this state did not prefill (e.g. a copied one)
        state.reset_stats(query.device)
    state.in_decode = True
    layer = module.layer_idx
    role = state.roles[layer]
    batch, length = key.shape[0], key.shape[2]
    valid = _valid_slots(attention_mask, batch, length, query.device)
    n_valid = valid.sum()
    q = query[:, :, 0, :]
    selection = None
    if role in (LayerRole.FULL, LayerRole.SELECT_DENSE):
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        state.read += n_valid
        if role is LayerRole.SELECT_DENSE:
            selection = state.selection = state.method.select(state.cfg, q, key, valid)
        out_heads = out[:, 0]
    else:
        if role is LayerRole.SELECT_SPARSE:
            state.selection = state.method.select(state.cfg, q, key, valid)
        selection = state.selection
        out_heads = ops.decode_attention(q, key, value, selection, scaling)
        counts = selection.counts.to(torch.float64)
        state.read += counts.sum() / (counts.shape[1] if selection.per_head else 1)
        out = out_heads.unsqueeze(1)
    state.full_read += n_valid
    if layer == 0:
        state.decode_calls += batch  # sequence-steps
    for observer in state.observers:
        observer(layer, role, q, key, value, valid, selection, out_heads)
    return out, None


AttentionInterface.register(ATTENTION_NAME, lessismore_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _check_supported(model) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError("model: not a transformers PreTrainedModel")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("model: encoder-decoder models are not supported (decoder-only causal LMs only)")
    if not type(model)._supports_attention_backend:
        raise ValueError(
            f"model: {type(model).__name__} does not route attention through transformers' AttentionInterface"
        )
    if getattr(config, "kv_lora_rank", None) or getattr(config, "q_lora_rank", None):
        raise ValueError("model: multi-head latent attention (MLA) is not supported")
    layer_types = getattr(config, "layer_types", None) or []
    sliding = any(t != "full_attention" for t in layer_types)
    if getattr(config, "use_sliding_window", None) is not None:
        sliding = sliding or bool(config.use_sliding_window)
    elif getattr(config, "sliding_window", None) is not None:
        sliding = True
    if sliding:
        raise ValueError("model: sliding-window attention layers are not supported (every layer must attend fully)")


def _attention_modules(model) -> list[torch.nn.Module]:
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]
    if not found:
        raise ValueError("model: no attention modules with a layer_idx were found")
    return found


def enable(model, cfg: SparseConfig) -> SparseConfig:
    """Switch ``model`` to sparse decode attention as described by ``cfg``. Returns the resolved config
    (default selection layers filled in). Raises ValueError, before changing anything, if the model or
    the config cannot be served correctly."""
    if not isinstance(cfg, SparseConfig):
        raise ValueError(f"cfg: expected a SparseConfig, got {type(cfg).__name__}")
    _check_supported(model)
    config = model.config
    num_layers = config.num_hidden_layers
    cfg = cfg.resolve(config.model_type, num_layers, config.hidden_size)
    modules = _attention_modules(model)
    if len(modules) != num_layers:
        raise ValueError(f"model: found {len(modules)} attention modules for {num_layers} layers")
    existing: DecodeState | None = getattr(modules[0], STATE_ATTR, None)
    previous = existing.previous_attn if existing else config._attn_implementation
    method = methods.get(cfg.method)
    state = DecodeState(cfg=cfg, method=method, roles=method.layer_roles(cfg, num_layers), previous_attn=previous)
    for module in modules:
        setattr(module, STATE_ATTR, state)
    model.set_attn_implementation(ATTENTION_NAME)
    return cfg


def disable(model) -> None:
    """Restore the attention implementation the model had before ``enable``."""
    modules = _attention_modules(model)
    state: DecodeState | None = getattr(modules[0], STATE_ATTR, None)
    if state is None:
        return
    model.set_attn_implementation(state.previous_attn)
    for module in modules:
        delattr(module, STATE_ATTR)


@contextlib.contextmanager
def sparse_attention(model, cfg: SparseConfig):
    """``with sparse_attention(model, cfg): model.generate(...)`` — enable, then disable on exit."""
    enable(model, cfg)
    try:
        yield model
    finally:
        disable(model)


def activate(model, state: DecodeState) -> None:
    """Make ``state`` (taken with ``state_of`` after an earlier ``enable``) the one the model's attention
    uses: a caller can keep one state per method on one model and switch between them per forward."""
    for module in _attention_modules(model):
        setattr(module, STATE_ATTR, state)


def state_of(model) -> DecodeState:
    state = getattr(_attention_modules(model)[0], STATE_ATTR, None)
    if state is None:
        raise ValueError("model: lessismore is not enabled on this model")
    return state


def stats(model) -> dict:
    """KV reads of the decode steps since the last prefill (i.e. of the last generate call):
    ``kv_positions_per_layer`` is the mean number of KV positions a layer read per sequence and step
    (per-head methods: averaged over query heads); ``kv_read_fraction`` that read over what full
    attention would read."""
    state = state_of(model)
    steps = 0 if state.decode_calls is None else int(state.decode_calls)
    if steps == 0:
        raise ValueError("model: no decode step has run since lessismore was enabled")
    read, full = float(state.read), float(state.full_read)
    num_layers = len(state.roles)
    return {
        "method": state.cfg.method,
        "budget": state.cfg.budget,
        "sequence_steps": steps,
        "kv_positions_per_layer": read / (steps * num_layers),
        "kv_read_fraction": read / full if full else 1.0,
    }
