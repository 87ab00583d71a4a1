"""LessIsMore and its baselines inside stock HuggingFace transformers models.

``enable(model, cfg)`` registers an attention function with transformers' ``AttentionInterface`` and,
so that padded batches and chunked prefill get their mask, the SDPA mask builder with
``AttentionMaskInterface`` under the same name; then switches the model to it. Prefill (more than one
query token) runs SDPA unchanged. A decode step is an adapter over ``lessismore.decode``: each layer
hands the executor its query and the cache (slots marked valid by the mask, so left padding works),
with SDPA as the dense attention; sparse layers attend over the selected positions only.
"""
from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lessismore.config import SparseConfig, require_sparse_config
from lessismore.decode import DecodeCache, DecodeExecutor

ATTENTION_NAME = "lessismore"
STATE_ATTR = "_lessismore_state"


class HFDecodeState(DecodeExecutor):
    """The executor of one enabled model, plus what ``disable`` restores and whether the last call
    was a decode step (the first prefill after decoding starts a new generate call: counters reset)."""

    def __init__(self, cfg: SparseConfig, num_layers: int, previous_attn: str):
        super().__init__(cfg, num_layers)
        self.previous_attn = previous_attn
        self.in_decode = False


def _valid_slots(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """[B, L] bool: the cache slots this decode query may attend to (left padding excluded)."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    last = attention_mask[:, 0, -1, :length]
    return last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2


def lessismore_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls in every attention layer: query [B, Hq, q_len, D], key/value
    [B, Hkv, L, D] (the cache, current token included). Returns ([B, q_len, Hq, D], None)."""
    state: HFDecodeState | None = getattr(module, STATE_ATTR, None)
    if state is None:
        raise RuntimeError("lessismore attention is selected but lessismore.enable() was not called on this model")
    if query.shape[2] != 1:
        # Prefill, or a prompt chunk: dense.
        if state.in_decode or state._stats is None:
            state.reset_stats(query.device)
            state.in_decode = False
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    state.in_decode = True
    layer = module.layer_idx
    if layer == 0:
        state.begin_step()
    cache = DecodeCache(key, value, valid=_valid_slots(attention_mask, key.shape[0], key.shape[2], query.device))

    def dense():
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return out[:, 0]

    out = state.layer(layer, query[:, :, 0, :], cache, scaling, dense=dense)
    return out.unsqueeze(1), None


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


def _register() -> None:
    """Our attention function, and (so that padded batches and chunked prefill get their mask) the
    SDPA mask builder under the same name; done by ``enable``, not at import."""
    AttentionInterface.register(ATTENTION_NAME, lessismore_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def enable(model, cfg: SparseConfig) -> SparseConfig:
    """Switch ``model`` to sparse decode attention as described by ``cfg``. Returns the resolved config
    (default selection layers filled in). Raises ValueError, before changing anything, if the model or
    the config cannot be served correctly."""
    require_sparse_config(cfg)
    _check_supported(model)
    config = model.config
    num_layers = config.num_hidden_layers
    cfg = cfg.resolve(config.model_type, num_layers, config.hidden_size)
    modules = _attention_modules(model)
    if len(modules) != num_layers:
        raise ValueError(f"model: found {len(modules)} attention modules for {num_layers} layers")
    existing: HFDecodeState | None = getattr(modules[0], STATE_ATTR, None)
    previous = existing.previous_attn if existing else config._attn_implementation
    state = HFDecodeState(cfg, num_layers, previous)
    _register()
    for module in modules:
        setattr(module, STATE_ATTR, state)
    model.set_attn_implementation(ATTENTION_NAME)
    return cfg


def disable(model) -> None:
    """Restore the attention implementation the model had before ``enable``."""
    modules = _attention_modules(model)
    state: HFDecodeState | None = getattr(modules[0], STATE_ATTR, None)
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


def activate(model, state: HFDecodeState) -> None:
    """Make ``state`` (taken with ``state_of`` after an earlier ``enable``) the one the model's attention
    uses: a caller can keep one state per method on one model and switch between them per forward."""
    for module in _attention_modules(model):
        setattr(module, STATE_ATTR, state)


def state_of(model) -> HFDecodeState:
    state = getattr(_attention_modules(model)[0], STATE_ATTR, None)
    if state is None:
        raise ValueError("model: lessismore is not enabled on this model")
    return state


def stats(model) -> dict:
    """KV reads of the decode steps since the last prefill (i.e. of the last generate call):
    ``kv_positions_per_layer`` is the mean number of KV positions a layer read per sequence and step
    (per-head methods: averaged over query heads); ``kv_read_fraction`` that read over what full
    attention would read."""
    try:
        return state_of(model).stats()
    except ValueError as exc:
        if "decode step" in str(exc):
            raise ValueError("model: no decode step has run since lessismore was enabled") from None
        raise
