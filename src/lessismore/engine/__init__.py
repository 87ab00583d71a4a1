"""The fast decode engine: batched, CUDA-graph decoding of Llama / Qwen2 / Qwen3 with the sparse
attention methods of ``lessismore.methods`` (see docs/engine.md)."""
from lessismore.engine.engine import Engine, EngineStats, GenerationResult
from lessismore.engine.model import ModelConfig

__all__ = ["Engine", "EngineStats", "GenerationResult", "ModelConfig"]
