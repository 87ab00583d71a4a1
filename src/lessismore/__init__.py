"""lessismore: training-free sparse attention for reasoning models (LessIsMore and its baselines)."""
from lessismore.config import SparseConfig
from lessismore.integrations.hf import disable, enable, sparse_attention, stats

__all__ = ["Engine", "SparseConfig", "enable", "disable", "sparse_attention", "stats"]


def __getattr__(name):
    # The engine (and its Triton kernels) loads on first use, not with every import of the HF path.
    if name == "Engine":
        from lessismore.engine import Engine

        return Engine
    raise AttributeError(f"module 'lessismore' has no attribute {name!r}")
__version__ = "0.1.0"
