"""Attention recall and output fidelity of sparse-attention methods along real reasoning traces.

``analyze(model, tokenizer, encode_traces(tokenizer, load_traces()), AnalysisOptions(base=cfg))``
teacher-forces the traces in decode mode and returns the summary; ``write_report`` writes
summary.json, summary.md and the plots. The command is ``lessismore analyze``.
"""
import importlib

# Loaded on first use (the runner imports torch and the HF integration; ``lessismore analyze --help``
# must not).
_WHERE = {
    "attention_recall": "metrics", "ground_truth_attention": "metrics", "next_token_fidelity": "metrics",
    "selection_mask": "metrics", "DEFAULT_METHODS": "runner", "DEFAULT_RECENT_RATIOS": "runner",
    "AnalysisOptions": "runner", "analyze": "runner", "PACKAGED_TRACES": "traces", "Trace": "traces",
    "encode_traces": "traces", "load_traces": "traces",
}

__all__ = [
    "DEFAULT_METHODS", "DEFAULT_RECENT_RATIOS", "PACKAGED_TRACES", "AnalysisOptions", "Trace", "analyze",
    "attention_recall", "encode_traces", "ground_truth_attention", "load_traces", "next_token_fidelity",
    "selection_mask",
]


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"lessismore.analysis.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
