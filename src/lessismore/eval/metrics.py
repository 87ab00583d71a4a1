"""Metrics per (method, budget) from the per-sample records.

- pass@1: the mean over problems of the per-problem mean over samples, with the standard error of that
  mean over problems (sample standard deviation / sqrt(problems); None with one problem).
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) per problem (n samples, c correct), averaged
  over problems, for k = 2, 4, 8, ... up to the smallest n of any problem.
- generation length: mean and median generated tokens; the share of samples cut off at max tokens.
- decode tokens/s: generated tokens after the first, over the decode wall time (each sample carries its
  share of its batch's time, so sums over samples give the batch totals).
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` are correct (needs n >= k)."""
    if not (0 <= c <= n) or k < 1:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if n < k:
        raise ValueError(f"pass_at_k: need n >= k, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and its standard error (sample sd / sqrt(len)); the error is None for fewer than 2 values."""
    if not values:
        raise ValueError("mean_and_stderr: no values")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def ks_for(n_min: int) -> list[int]:
    ks, k = [], 2
    while k <= n_min:
        ks.append(k)
        k *= 2
    return ks


def summarize(records: list[dict]) -> dict:
    """Metrics of one (method, budget) group of records (each with problem_id, correct, gen_tokens,
    truncated, decode_seconds)."""
    if not records:
        raise ValueError("summarize: no records")
    by_problem: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_problem[r["problem_id"]].append(bool(r["correct"]))
    per_problem = [sum(v) / len(v) for v in by_problem.values()]
    p1, err = mean_and_stderr(per_problem)
    lengths = [int(r["gen_tokens"]) for r in records]
    decode_tokens = sum(max(n - 1, 0) for n in lengths)
    decode_seconds = sum(float(r.get("decode_seconds") or 0.0) for r in records)
    row = {
        "pass@1": p1,
        "stderr": err,
        "mean_gen_len": sum(lengths) / len(lengths),
        "median_gen_len": statistics.median(lengths),
        "truncated_frac": sum(bool(r["truncated"]) for r in records) / len(records),
        "decode_tokens_per_s": decode_tokens / decode_seconds if decode_seconds > 0 else None,
        "n_problems": len(by_problem),
        "n_samples": len(records),
    }
    n_min = min(len(v) for v in by_problem.values())
    for k in ks_for(n_min):
        vals = [pass_at_k(len(v), sum(v), k) for v in by_problem.values()]
        row[f"pass@{k}"] = sum(vals) / len(vals)
    return row
