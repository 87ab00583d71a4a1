"""Time the exact Triton top-k (lessismore.ops.topk) against torch.topk and write the results as JSON.

    PYTHONPATH=src TRITON_INTERPRET=0 python3 benchmarks/topk.py --out benchmarks/results/topk-h200.json
    PYTHONPATH=src python3 benchmarks/topk.py --smoke --out /tmp/topk.json   # CPU: interpreter, tiny shapes

Workload: the selection layer's, fp32 scores [B, H, L] (H = 32 query heads), k = 1536, B in {8, 32},
L in {16K, 32K}, all rows full or every row at half length (slots past it -inf, and passed as
``lengths`` to the Triton top-k; torch.topk reads the whole row, as the layer does today). Each timing
is the median over CUDA-graph replays, each replay running ``--inner`` calls back to back on rotating
input sets that together exceed the L2, so no call finds its row in L2 from the call before. Before
timing, every case is checked against ``naive.topk_desc`` (values bit for bit, indices equal).
``breakdown`` splits one call's device time by kernel (torch profiler); ``--sweep`` also times the
tuning knobs of ``topk_desc`` at B = 32, L = 32K; ``--configs`` times launch settings (warps, block,
group-maximum rows) at every point of the grid, each checked against the reference; ``--grid`` picks the
points (full rows). ``positions``: ``topk_positions`` at TidalDecode's
k = 2047 against the top-k then a sort (previous group count, current, torch.topk).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys
import time

import torch

HEADS, K = 32, 1536
L2_BYTES = 60 * 2**20


def make_sets(b, heads, length, half, sets, device):
    """`sets` input sets: (scores [b, heads, L], lengths [b] or None); half: slots from L/2 on are -inf."""
    out = []
    for _ in range(sets):
        s = torch.randn(b, heads, length, device=device)
        lengths = None
        if half:
            lengths = torch.full((b,), length // 2, device=device, dtype=torch.int32)
            s[..., length // 2:] = float("-inf")
        out.append((s, lengths))
    return out


def check(topk_desc, naive_topk, inputs, k):
    for s, lengths in inputs[:2]:
        v, i = topk_desc(s, k, lengths)
        rv, ri = naive_topk(s, k, lengths)
        if not (torch.equal(i, ri) and torch.equal(v.view(torch.int32), rv.view(torch.int32))):
            return False
    return True


def time_calls(call, sets, reps, inner, device):
    """Median seconds per call; call(j) runs on input set j. CUDA: graph replays of `inner` calls."""
    if device == "cpu":
        t0 = time.perf_counter()
        call(0)
        return time.perf_counter() - t0
    from common import graph_seconds_per_call  # here: common loads the kernels, after main() set TRITON_INTERPRET

    return graph_seconds_per_call(lambda j: call(j % sets), inner, reps, warm=max(sets, 3))


def breakdown(call, device):
    """Device microseconds per kernel name over one call (profiler), largest first."""
    if device == "cpu":
        return {}
    from common import kernels_per_call

    per = kernels_per_call(call)
    return dict(sorted(((n[:80], round(us, 2)) for n, (_, us) in per.items()), key=lambda kv: -kv[1]))


def positive_ints(text, sep, form):
    """The positive integers of `text` split at `sep`, as many as `form` names (e.g. 'BxL'); else a
    one-line argparse error."""
    parts, count = text.split(sep), len(form.split(sep))
    if len(parts) != count or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not {form} ({count} positive integers)")
    return [int(p) for p in parts]


def launch_config(text):
    """'WARPS:BLOCK:GM_ROWS' -> (text, topk_desc tuning keywords)."""
    warps, block, gm_rows = positive_ints(text, ":", "WARPS:BLOCK:GM_ROWS")
    return text, {"num_warps": warps, "block": block, "gm_rows": gm_rows}


def grid_point(text):
    """'BxL' -> (B, L, full rows)."""
    return (*positive_ints(text, "x", "BxL"), False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU through the Triton interpreter")
    ap.add_argument("--sweep", action="store_true", help="also time tuning knobs at B=32, L=32K")
    ap.add_argument("--k", type=int, default=K, help="k of the grid and the sweep (the selection layer's prefix: 1024)")
    ap.add_argument("--configs", nargs="*", default=[], type=launch_config, metavar="WARPS:BLOCK:GM_ROWS",
                    help="also time these launch configurations (num_warps, block, gm_rows) at every point of the "
                         "grid, each checked against the reference")
    ap.add_argument("--no-positions", action="store_true", help="skip TidalDecode's topk_positions")
    ap.add_argument("--grid", nargs="*", default=None, type=grid_point, metavar="BxL", help="points of the grid (default: B in 8, 32 x "
                    "L in 16K, 32K, full and half lengths)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--inner", type=int, default=10)
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.smoke:
            sys.exit("no GPU: only --smoke runs here (through the Triton interpreter)")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
    import triton

    from lessismore.ops import naive, topk

    if args.smoke:  # the interpreter runs each row's program in Python: few, short rows
        heads, k, grid = 4, 64, [(2, 1000, False), (2, 1000, True)]
    else:
        heads, k, grid = HEADS, args.k, list(itertools.product([8, 32], [16384, 32768], [False, True]))
        grid = args.grid or grid
    results = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "interpreted": topk.INTERPRETED, "heads": heads, "k": k, "dtype": "float32",
        "timing": "median seconds per call over CUDA-graph replays of back-to-back calls on rotating inputs",
        "grid": [],
    }
    for b, length, half in grid:
        sets = 1 if device == "cpu" else max(2, -(-3 * L2_BYTES // (b * heads * length * 4)))
        inputs = make_sets(b, heads, length, half, sets, device)
        row = {"B": b, "H": heads, "L": length, "k": k, "lengths": "half" if half else None, "sets": sets,
               "exact": check(topk.topk_desc, naive.topk_desc, inputs, k)}
        row["triton_s"] = time_calls(lambda j: topk.topk_desc(inputs[j][0], k, inputs[j][1]), sets, args.reps,
                                     args.inner, device)
        row["torch_topk_s"] = time_calls(lambda j: inputs[j][0].topk(k, dim=-1), sets, args.reps, args.inner, device)
        row["speedup"] = row["torch_topk_s"] / row["triton_s"]
        row["read_floor_s"] = b * heads * (length // 2 if half else length) * 4 / 4.3e12  # one read at ~copy speed
        row["breakdown_us"] = breakdown(lambda: topk.topk_desc(inputs[0][0], k, inputs[0][1]), device)
        for config, tuning in args.configs:
            call = lambda j, tuning=tuning: topk.topk_desc(inputs[j][0], k, inputs[j][1], **tuning)
            exact = check(lambda s, k_, lengths: topk.topk_desc(s, k_, lengths, **tuning), naive.topk_desc, inputs, k)
            t = time_calls(call, sets, args.reps, args.inner, device)
            row.setdefault("configs", {})[config] = {"triton_s": t, "exact": exact}
            row["exact"] = row["exact"] and exact
            print(f"    config {config}: {t * 1e6:9.1f} us exact={exact}", flush=True)
        results["grid"].append(row)
        print(f"B={b:3d} L={length:6d} lengths={row['lengths']!s:5s} exact={row['exact']} "
              f"triton {row['triton_s'] * 1e6:9.1f} us  torch.topk {row['torch_topk_s'] * 1e6:9.1f} us  "
              f"x{row['speedup']:.1f}", flush=True)
    if args.sweep and device == "cuda":
        inputs = make_sets(32, HEADS, 32768, False, 2, device)
        results["sweep"] = []
        knobs = [{}, {"group": 4096}, {"group": 8192}, {"num_warps": 8}, {"num_warps": 4}, {"fused_sort": False}]
        for tuning in knobs:
            t = time_calls(lambda j: topk.topk_desc(inputs[j][0], k, inputs[j][1], **tuning), 2, args.reps,
                           args.inner, device)
            results["sweep"].append({"tuning": tuning, "triton_s": t})
            print(f"sweep {tuning}: {t * 1e6:.1f} us", flush=True)
    if device == "cuda" and not args.no_positions:
        # TidalDecode's selection: each head's top K-1 = 2047 as an ascending set.
        results["positions"] = []
        for b, length in [(8, 16384), (32, 16384), (32, 32768)]:
            inputs = make_sets(b, heads, length, False, max(2, -(-3 * L2_BYTES // (b * heads * length * 4))), device)
            sets = len(inputs)
            row = {"B": b, "H": heads, "L": length, "k": 2047, "exact": all(
                torch.equal(topk.topk_positions(s, 2047), naive.topk_positions(s, 2047)) for s, _ in inputs[:2])}
            row["topk_positions_s"] = time_calls(lambda j: topk.topk_positions(inputs[j][0], 2047), sets, args.reps,
                                                 args.inner, device)
            row["topk_desc_then_torch_sort_s"] = time_calls(
                lambda j: topk.topk_desc(inputs[j][0], 2047)[1].sort(dim=-1).values, sets, args.reps, args.inner, device)
            row["groups_2048_then_torch_sort_s"] = time_calls(  # the previous default
                lambda j: topk.topk_desc(inputs[j][0], 2047, group=2048)[1].sort(dim=-1).values, sets, args.reps,
                args.inner, device)
            row["torch_topk_then_sort_s"] = time_calls(
                lambda j: inputs[j][0].topk(2047, dim=-1).indices.sort(dim=-1).values, sets, args.reps, args.inner,
                device)
            results["positions"].append(row)
            print("positions", {k: (round(v * 1e6, 1) if k.endswith("_s") else v) for k, v in row.items()}, flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")
    if not all(row["exact"] for row in results["grid"] + results.get("positions", [])):
        sys.exit("MISMATCH against naive.topk_desc")


if __name__ == "__main__":
    main()
