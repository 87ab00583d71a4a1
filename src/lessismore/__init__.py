"""lessismore: training-free sparse attention for reasoning models (LessIsMore and its baselines)."""
from lessismore.config import SparseConfig
from lessismore.integrations.hf import disable, enable, sparse_attention, stats

__all__ = ["SparseConfig", "enable", "disable", "sparse_attention", "stats"]
__version__ = "0.1.0"
