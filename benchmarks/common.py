"""What the engine benchmarks (e2e.py, long_generation.py) share: timing on the device, the copy
bandwidth, one config per method, the floor model, the run's environment and the profiler summary.

The floor model: a decode step must read every weight but the embedding table (one row per token)
plus the K/V rows its attention reads. Per sequence and layer at context c (tokens in the cache,
this step's included):

- full-attention layers and selection layers (they attend fully): all c rows;
- sparse layers: min(K, c) rows (Quest: min(ceil(K/P)*P, c), whole pages), times the group factor
  Hq/Hkv for per-head methods (TidalDecode, Quest, oracle: each query head reads its own rows);
- Quest's sparse layers also read the per-page key min and max of every KV head (ceil(c/P) pages).

Bytes over the copy bandwidth measured in the same run (bytes read + written per second by a large
device-to-device copy) give the floor time.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch

from lessismore import methods
from lessismore.config import SparseConfig
from lessismore.engine import Engine, ModelConfig
from lessismore.methods import LayerRole

# The scripts import this module from their own folder (sys.path[0]); take that folder off the path
# now, or benchmarks/kernels.py shadows the `kernels` package that transformers probes for on import.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if not p or os.path.abspath(p) != _HERE]

DTYPE = torch.bfloat16
SELECTION_LAYERS = (2, 12)  # Qwen3-8B's (LessIsMore paper); also in range for SMOKE_MODEL
SMOKE_MODEL = ModelConfig(model_type="qwen3", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=14,
                          num_heads=8, num_kv_heads=2, head_dim=64, qk_norm=True)


# ---- timing ----------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def graph_seconds_per_call(call, inner: int, reps: int, warm: int = 3) -> float:
    """Median seconds per call over ``reps`` replays of one CUDA graph of ``inner`` calls call(0) ..
    call(inner - 1), after ``warm`` calls on a side stream (compilation, autotuning)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for j in range(warm):
            call(j)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(inner):
            call(j)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    del graph
    return statistics.median(times)


class Timer:
    """Seconds of the block in ``.s``: CUDA events on the GPU, the host clock on the CPU."""

    def __init__(self, device: str = "cuda"):
        self.cuda = str(device).startswith("cuda")

    def __enter__(self):
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            self.s = self.a.elapsed_time(self.b) / 1e3
        else:
            self.s = time.perf_counter() - self.t0


def copy_bandwidth(device: str, gib: float = 4.0, reps: int = 10) -> float:
    """Bytes read + written per second by a large device-to-device copy (median of ``reps``)."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = []
    for _ in range(reps + 2):
        with Timer(device) as t:
            dst.copy_(src)
        seconds.append(t.s)
    del src, dst
    free_memory(device)
    return 2 * n * 2 / statistics.median(seconds[2:])


def bandwidth_and_weights(mcfg: ModelConfig, result: dict, device: str, smoke: bool):
    """The copy bandwidth (recorded in ``result``) and one set of random weights at ``mcfg``, shared
    by every engine of a run. Returns (bytes per second, weights)."""
    from lessismore.engine.model import random_weights

    bw = copy_bandwidth(device, 0.25 if smoke else 4.0)
    result["copy_bandwidth_TBps"] = bw / 1e12
    result["weight_bytes_stored"] = mcfg.weight_bytes(2)
    result["weight_bytes_read_per_step"] = mcfg.weight_bytes(2, read_per_step=True)
    print(f"{result.get('device', device)}; copy bandwidth {bw / 1e12:.2f} TB/s; weights "
          f"{mcfg.weight_bytes(2) / 1e9:.2f} GB stored, {mcfg.weight_bytes(2, read_per_step=True) / 1e9:.2f} GB "
          "read per step", flush=True)
    t0 = time.perf_counter()
    weights = random_weights(mcfg, device, DTYPE, seed=0)
    sync(device)
    print(f"random weights in {time.perf_counter() - t0:.1f} s", flush=True)
    return bw, weights


def free_memory(device: str) -> None:
    """After ``del`` of an engine: collect cycles and give cached blocks back."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- configs ---------------------------------------------------------------------------------------


def method_cfg(method: str, budget: int | None = None, selection_layers=SELECTION_LAYERS, **settings) -> SparseConfig:
    """One method's config from the shared benchmark settings: budget K, selection layers (2, 12),
    and any method-specific setting (e.g. ``page_size`` for Quest); settings the method does not use
    are dropped (``SparseConfig.for_method``), so "full" gives ``SparseConfig(method="full")``."""
    return SparseConfig.for_method(method, budget=budget, selection_layers=selection_layers, **settings)


def cfg_summary(cfg: SparseConfig) -> dict:
    """The settings that are set (None ones left out), JSON-friendly."""
    out = {}
    for name in ("method", "budget", "recent_ratio", "sink_tokens", "selection_layers", "full_layers", "page_size"):
        value = getattr(cfg, name)
        if value is not None:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


# ---- the floor model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Floor:
    """The bytes a decode step of one method must read (see the module docstring).

    weight_bytes:  every weight but the embedding table, read once per step.
    row_bytes:     K and V of one token in one layer (all KV heads).
    dense_layers:  layers that read the whole context (full and selection layers).
    sparse_layers: layers that read a selection.
    sparse_rows:   most rows a sparse layer reads per sequence and query-head group (K, or Quest's
                   whole pages ceil(K/P)*P).
    head_factor:   Hq/Hkv for per-head methods, else 1.
    page_size, page_bytes: Quest's page size and the bytes of one page's key min + max over all KV
                   heads (0: no page metadata).
    """

    weight_bytes: int
    row_bytes: int
    dense_layers: int
    sparse_layers: int
    sparse_rows: int
    head_factor: int
    page_size: int = 0
    page_bytes: int = 0

    @classmethod
    def of(cls, mcfg: ModelConfig, cfg: SparseConfig, dtype_bytes: int = 2) -> "Floor":
        method = methods.get(cfg.method)
        resolved = cfg.resolve(mcfg.model_type, mcfg.num_layers, mcfg.hidden_size)
        roles = method.layer_roles(resolved, mcfg.num_layers)
        dense = sum(r in (LayerRole.FULL, LayerRole.SELECT_DENSE) for r in roles)
        sparse = len(roles) - dense
        rows, page_size, page_bytes = 0, 0, 0
        if sparse:
            rows = resolved.budget
            if resolved.method == "quest":
                page_size = resolved.page_size
                rows = -(-resolved.budget // page_size) * page_size
                page_bytes = 2 * mcfg.num_kv_heads * mcfg.head_dim * dtype_bytes
        return cls(
            weight_bytes=mcfg.weight_bytes(dtype_bytes, read_per_step=True),
            row_bytes=mcfg.kv_bytes_per_token(dtype_bytes),
            dense_layers=dense, sparse_layers=sparse, sparse_rows=rows,
            head_factor=mcfg.num_heads // mcfg.num_kv_heads if method.per_head and sparse else 1,
            page_size=page_size, page_bytes=page_bytes,
        )

    def kv_bytes(self, context: int) -> int:
        """K/V (and page metadata) bytes one sequence's step reads at ``context`` tokens."""
        rows = self.dense_layers * context + self.sparse_layers * min(self.sparse_rows, context) * self.head_factor
        meta = self.sparse_layers * -(-context // self.page_size) * self.page_bytes if self.page_size else 0
        return rows * self.row_bytes + meta

    def step_bytes(self, batch: int, context: int) -> int:
        """Bytes of one step of ``batch`` sequences, each at ``context`` tokens."""
        return self.weight_bytes + batch * self.kv_bytes(context)

    def run_bytes(self, first_contexts, steps: int) -> int:
        """Bytes of ``steps`` steps of a batch whose rows start at ``first_contexts`` (one per row;
        the context of the first step, current token included) and grow by one token per step:
        the sum of ``step_bytes`` over the steps, in closed form."""
        total = self.weight_bytes * steps
        for first, rows in Counter(int(c) for c in first_contexts).items():
            total += rows * self.kv_bytes_sum(first, steps)
        return total

    def kv_bytes_sum(self, first: int, steps: int) -> int:
        """sum(kv_bytes(c) for c in range(first, first + steps)) without the loop."""
        n, a, s = steps, first, self.sparse_rows
        dense = n * a + n * (n - 1) // 2
        below = max(0, min(n, s - a))  # contexts under the sparse cap
        sparse = below * a + below * (below - 1) // 2 + (n - below) * s
        total = (self.dense_layers * dense + self.sparse_layers * sparse * self.head_factor) * self.row_bytes
        if self.page_size and n > 0:
            def pages_up_to(x):  # sum of ceil(c / P) for c = 1..x
                q, r = divmod(x, self.page_size)
                return self.page_size * q * (q + 1) // 2 + r * (q + 1)

            total += self.sparse_layers * self.page_bytes * (pages_up_to(a + n - 1) - pages_up_to(a - 1))
        return total


def new_engine(mcfg: ModelConfig, weights, cfg: SparseConfig, batch: int, max_len: int, device: str,
               cuda_graphs: bool | None = None, overlap_selection: bool | None = None) -> Engine:
    """A fresh engine on the shared weights, for ``batch`` rows of up to ``max_len`` tokens."""
    return Engine(mcfg, cfg=cfg, weights=weights, device=device, dtype=DTYPE, max_batch=batch, max_len=max_len,
                  cuda_graphs=cuda_graphs, overlap_selection=overlap_selection)


# ---- environment and output ------------------------------------------------------------------------


def device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
    return "cpu (smoke run: measures nothing)"


def environment(device: str) -> dict:
    """Command, device, date and versions, for the top of a result file."""
    prefix = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    out = {
        "command": prefix + "python3 " + shlex.join(sys.argv),
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    if out["triton"] is not None:
        from lessismore.ops import pdl

        out["pdl"] = pdl.enabled(torch.empty(0, device=device))  # programmatic dependent launch of the kernels
    return out


def write_json(path: str | None, data: dict) -> None:
    """Write atomically (a partial file never replaces a good one)."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


# ---- profiler summary ------------------------------------------------------------------------------

KERNEL_GROUPS = [
    ("gemm", re.compile(r"gemm|nvjet|cutlass|cublas|splitKreduce|xmma|sm90_|sm80_", re.I)),
    ("attention", re.compile(r"decode_split|_reduce_kernel|attention|flash|sparse_decode", re.I)),
    ("sort / top-k / scan", re.compile(r"sort|topk|radix|scan|cumsum|_list_kernel|_position_kernel|select", re.I)),
    ("norm / rope / act", re.compile(r"rmsnorm|rope|silu", re.I)),
    ("memcpy / memset", re.compile(r"memcpy|memset", re.I)),
]


def kernels_per_call(call, calls: int = 5) -> dict[str, tuple[float, float]]:
    """{kernel name: (launches, device µs)} per call of ``call()`` on the GPU: the torch profiler over
    ``calls`` calls, after one unprofiled call."""
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    per: dict[str, tuple[float, float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            launches, us = per.get(e.name, (0.0, 0.0))
            per[e.name] = (launches + 1 / calls, us + e.device_time / calls)
    return per


def device_events(prof, on_gpu: bool) -> list[tuple[str, int, int]]:
    """(name, start_ns, end_ns) of the GPU's kernels, copies and sets from a finished
    ``torch.profiler.profile``. Without a GPU (smoke runs) the host's operators stand in, so the
    summary code runs; those figures mean nothing."""
    try:
        return _kineto_events(prof, on_gpu)
    except AttributeError:  # a profiler without the raw kineto events: its FunctionEvents (microseconds)
        out = []
        for e in prof.events():
            if (e.device_type == torch.autograd.DeviceType.CUDA) == on_gpu:
                out.append((e.name, int(e.time_range.start * 1e3), int(e.time_range.end * 1e3)))
        return out


def _kineto_events(prof, on_gpu: bool) -> list[tuple[str, int, int]]:
    cuda = torch.autograd.DeviceType.CUDA
    out = []
    for e in prof.profiler.kineto_results.events():
        kind = e.activity_type() if hasattr(e, "activity_type") else ""
        if on_gpu:
            # kernels, copies and sets; not annotations or sync records (they span waits)
            if e.device_type() != cuda or (kind and not any(k in kind for k in ("kernel", "memcpy", "memset"))):
                continue
        elif kind != "cpu_op":
            continue
        start = e.start_ns()
        out.append((e.name(), start, start + e.duration_ns()))
    return out


def _merged(intervals):
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def kernel_summary(events, window: tuple[int, int] | None, steps: int, top: int = 15) -> dict:
    """Per-kernel GPU time of the events that start in ``window`` (ns; None: all of them), per step
    over ``steps`` steps; how busy the GPU was over the window (union of its intervals) and the idle
    gaps between them by size."""
    if window is not None:
        lo, hi = window
        events = [e for e in events if lo <= e[1] < hi]
    steps = max(1, steps)
    if not events:
        return {"kernels": 0, "note": "no device events in the window"}
    if window is None:
        lo, hi = min(e[1] for e in events), max(e[2] for e in events)
    by_name: dict[str, list] = {}
    for name, start, end in events:
        entry = by_name.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += end - start
    total_ns = sum(v[1] for v in by_name.values())
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    groups: dict[str, float] = {}
    for name, (count, ns) in rows:
        group = next((g for g, pattern in KERNEL_GROUPS if pattern.search(name)), "other")
        groups[group] = groups.get(group, 0.0) + ns / 1e3 / steps
    merged = _merged([(max(s, lo), min(e, hi)) for _, s, e in events if min(e, hi) > max(s, lo)])
    busy_ns = sum(e - s for s, e in merged)
    gaps = [b[0] - a[1] for a, b in zip(merged, merged[1:])]
    gaps += [merged[0][0] - lo, hi - merged[-1][1]] if merged else []
    buckets = [("<5us", 0, 5e3), ("5-50us", 5e3, 5e4), ("50-500us", 5e4, 5e5), (">=500us", 5e5, float("inf"))]
    gap_table = {}
    for label, a, b in buckets:
        chosen = [g for g in gaps if a <= g < b and g > 0]
        gap_table[label] = {"count_per_step": len(chosen) / steps, "us_per_step": sum(chosen) / 1e3 / steps}
    span_ns = max(1, hi - lo)
    return {
        "steps": steps,
        "kernels": len(events),
        "launches_per_step": len(events) / steps,
        "kernel_us_per_step": total_ns / 1e3 / steps,
        "window_us_per_step": span_ns / 1e3 / steps,
        "gpu_busy_share": busy_ns / span_ns,
        "host_or_idle_share": 1 - busy_ns / span_ns,
        "idle_gaps": gap_table,
        "groups_us_per_step": {g: round(v, 3) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top": [{"kernel": name[:100], "launches_per_step": count / steps, "us_total": ns / 1e3,
                 "us_per_step": ns / 1e3 / steps} for name, (count, ns) in rows[:top]],
    }


def print_kernel_table(summary: dict, indent: str = "  ") -> None:
    if not summary.get("top"):
        print(indent + summary.get("note", "no kernels"), flush=True)
        return
    print(f"{indent}{summary['kernels']} kernels, {summary['launches_per_step']:.0f} per step, "
          f"{summary['kernel_us_per_step']:.1f} us of kernels per step over a {summary['window_us_per_step']:.1f} us step; "
          f"GPU busy {summary['gpu_busy_share'] * 100:.1f}%", flush=True)
    print(f"{indent}groups (us/step): " + ", ".join(f"{g} {v:.1f}" for g, v in summary["groups_us_per_step"].items()))
    print(f"{indent}idle gaps per step: " + ", ".join(
        f"{label}: {v['count_per_step']:.1f} x, {v['us_per_step']:.1f} us" for label, v in summary["idle_gaps"].items()))
    print(f"{indent}{'us/step':>9} {'total ms':>9} {'n/step':>6}  kernel")
    for row in summary["top"]:
        print(f"{indent}{row['us_per_step']:>9.1f} {row['us_total'] / 1e3:>9.1f} {row['launches_per_step']:>6.1f}  {row['kernel'][:90]}")
    sys.stdout.flush()
