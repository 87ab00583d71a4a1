"""lessismore: training-free sparse attention for reasoning models (LessIsMore and its baselines).

Importing the package is light (no transformers, nothing registered): the HF integration loads on
first use of ``enable`` / ``disable`` / ``sparse_attention`` / ``stats``, the engine on first use of
``Engine``."""
from lessismore.config import SparseConfig

__all__ = ["Engine", "SparseConfig", "enable", "disable", "sparse_attention", "stats"]
__version__ = "0.1.0"

_HF = ("enable", "disable", "sparse_attention", "stats")


def __getattr__(name):
    if name in _HF:
        from lessismore.integrations import hf

        return getattr(hf, name)
    if name == "Engine":
        from lessismore.engine import Engine

        return Engine
    raise AttributeError(f"module 'lessismore' has no attribute {name!r}")
