"""What an Engine decodes: a model spec (see ``lessismore.models.resolve_spec``) or a ``ModelConfig``
with random weights, loaded onto the device as the engine's fused tensors, and its tokenizer."""
from __future__ import annotations

from pathlib import Path

import torch

from lessismore.engine.model import ModelConfig, Weights, load_folder, load_hf_model, random_weights


def load(model: str | Path | ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
         weights: Weights | None = None):
    """(ModelConfig, Weights, tokenizer or None). A ``ModelConfig`` gets ``weights`` or random weights
    drawn with ``seed`` (no tokenizer)."""
    if isinstance(model, ModelConfig):
        return model, weights if weights is not None else random_weights(model, device, dtype, seed), None
    from lessismore import models

    path = models.resolve_spec(model)
    if path.suffix == ".gguf":
        hf, tokenizer = models.load_model(str(path), "cpu", torch.float32)
        mcfg, weights = load_hf_model(hf, device, dtype)
        return mcfg, weights, tokenizer
    mcfg, weights = load_folder(path, device, dtype)
    return mcfg, weights, models.load_tokenizer(path) if models.has_tokenizer(path) else None
