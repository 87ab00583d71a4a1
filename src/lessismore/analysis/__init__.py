"""Attention recall and output fidelity of sparse-attention methods along real reasoning traces.

``analyze(model, tokenizer, encode_traces(tokenizer, load_traces()), AnalysisOptions(base=cfg))``
teacher-forces the traces in decode mode and returns the summary; ``write_report`` writes
summary.json, summary.md and the plots. The command is ``lessismore analyze``.
"""
from lessismore.analysis.metrics import attention_recall, ground_truth_attention, next_token_fidelity, selection_mask
from lessismore.analysis.runner import DEFAULT_METHODS, DEFAULT_RECENT_RATIOS, AnalysisOptions, analyze
from lessismore.analysis.traces import PACKAGED_TRACES, Trace, encode_traces, load_traces

__all__ = [
    "DEFAULT_METHODS", "DEFAULT_RECENT_RATIOS", "PACKAGED_TRACES", "AnalysisOptions", "Trace", "analyze",
    "attention_recall", "encode_traces", "ground_truth_attention", "load_traces", "next_token_fidelity",
    "selection_mask",
]
