"""Time one sampling step (lessismore.engine.sampling.sample) against the sort-based version it replaced,
and write the results as JSON.

    PYTHONPATH=src python3 benchmarks/sampling.py --out benchmarks/results/sampling-h200.json
    PYTHONPATH=src python3 benchmarks/sampling.py --smoke          # CPU (Triton interpreter), tiny

Every timing is the median over CUDA-graph replays of ``--inner`` back-to-back calls (a graph, as the
engine replays one per decode step: no Python launch overhead in the numbers). Inputs: B rows of fp32
logits over V = 151936 (Qwen) of three kinds: "flat" (a random-weight model: nearly uniform, the kept
set is most of the vocabulary at top-p 0.95), "peaked" (a trained model's typical step: a few hundred
tokens hold the mass) and "tied" (bf16-rounded logits: many exact ties); settings T=0.6 / top-p 0.95
(the long sampled generations), T=0.6 / top-p 0.95 / top-k 50, and T=1 / top-k 50 alone. Each row also
records how often the two implementations drew the same token over the timed inputs (they differ only
where the old fp32 cumulative sum put the top-p boundary differently, or on ties at the boundary).
With ``--profile`` the per-kernel CUDA times of one new call are added (torch.profiler). ``--sweep``
instead times launch settings of the new sampler (programs per row, loads in flight, warps, blocks) at
B = 1, 8 and 32 on flat rows, each kernel on its own too: the data behind the defaults in sampling.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

VOCAB = 151936
BATCHES = (1, 8, 32)
KINDS = ("flat", "peaked", "tied")
SETTINGS = {"T0.6-p0.95": (0.6, 0.95, 0), "T0.6-p0.95-k50": (0.6, 0.95, 50), "T1-k50": (1.0, 1.0, 50)}


def make_logits(kind, rows, vocab, device, gen):
    if kind == "flat":
        x = torch.randn(rows, vocab, generator=gen) * 0.3
    elif kind == "peaked":
        x = torch.randn(rows, vocab, generator=gen) * 2.5
        x[:, :20] += 12 + 4 * torch.rand(rows, 20, generator=gen)
    elif kind == "tied":
        x = (torch.randn(rows, vocab, generator=gen) * 2).bfloat16().float()
    else:
        raise ValueError(kind)
    return x[:, torch.randperm(vocab, generator=gen)].to(device)


def timed(fn, reps, inner, device):
    """Median seconds per call of fn() over CUDA-graph replays (one wall-clock call on CPU)."""
    if device == "cpu":
        fn()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    from common import graph_seconds_per_call  # here: common loads the kernels, after main() set TRITON_INTERPRET

    return graph_seconds_per_call(lambda j: fn(), inner, reps)


def profile_new(args, sample):
    from torch.profiler import ProfilerActivity, profile

    sample(*args, True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            sample(*args, True)
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        if evt.device_type.name == "CUDA" and evt.count:
            rows.append({"kernel": evt.key[:80], "us_per_call": evt.self_device_time_total / 5})
    return sorted(rows, key=lambda r: -r["us_per_call"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU under the Triton interpreter")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="add per-kernel CUDA times of the new sampler")
    parser.add_argument("--sweep", action="store_true",
                        help="instead, time launch settings of the new sampler (programs, stages, warps, blocks) on flat rows")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
        torch.set_num_threads(1)
    from lessismore.engine import sampling

    device = "cuda" if cuda else "cpu"
    vocab, batches = (VOCAB, BATCHES) if cuda else (4096, (1, 2))
    kinds = KINDS if cuda else ("flat",)
    settings = SETTINGS if cuda else {"T0.6-p0.95": SETTINGS["T0.6-p0.95"]}
    reps, inner = (args.reps, args.inner) if cuda else (1, 1)

    def new_sample(*a):
        return sampling.sample(*a, impl="triton")

    results = []
    gen = torch.Generator().manual_seed(0)
    for kind in kinds if not args.sweep else ():
        for b in batches:
            logits = make_logits(kind, b, vocab, device, gen)
            for name, (t, p, k) in settings.items():
                temperature = torch.full((b,), t, device=device)
                top_p = torch.full((b,), p, device=device)
                top_k = torch.full((b,), k, dtype=torch.int64, device=device)
                seed = torch.arange(b, device=device) + 17
                counter = torch.zeros(b, dtype=torch.int64, device=device)
                call = (logits, temperature, top_p, top_k, seed, counter)
                same, total = 0, 0
                for c in range(8 if cuda else 1):
                    counter.fill_(c)
                    same += (sampling.sample_by_sorting(*call, True) == new_sample(*call, True)).sum().item()
                    total += b
                t_old = timed(lambda: sampling.sample_by_sorting(*call, True), reps, inner, device)
                t_new = timed(lambda: new_sample(*call, True), reps, inner, device)
                row = {"kind": kind, "batch": b, "vocab": vocab, "setting": name, "temperature": t, "top_p": p,
                       "top_k": k, "old_us": round(t_old * 1e6, 2), "new_us": round(t_new * 1e6, 2),
                       "speedup": round(t_old / t_new, 2), "same_draws": f"{same}/{total}"}
                if args.profile and cuda and name == "T0.6-p0.95":
                    row["new_kernels"] = profile_new(call, new_sample)
                results.append(row)
                print(json.dumps({k_: v for k_, v in row.items() if k_ != "new_kernels"}), flush=True)
                if "new_kernels" in row:
                    for r in row["new_kernels"]:
                        print(f"    {r['us_per_call']:8.2f} us  {r['kernel']}")

    sweep = []
    if args.sweep and cuda:
        # dict(waves=4, stages=1) is the sampler before its loads were pipelined and its grid set per row.
        configs = [dict(), dict(programs=16), dict(programs=48), dict(waves=4), dict(stages=1), dict(waves=4, stages=1),
                   dict(dense_block=256)]
        for b in batches:
            logits = make_logits("flat", b, vocab, device, gen)
            for k in (0, 50) if b == 32 else (0,):
                call = (logits, torch.full((b,), 0.6, device=device), torch.full((b,), 0.95, device=device),
                        torch.full((b,), k, dtype=torch.int64, device=device), torch.arange(b, device=device),
                        torch.zeros(b, dtype=torch.int64, device=device))
                for kw in configs:
                    launches = []
                    sampling._run(*call, **kw, launches=launches)
                    total = timed(lambda: sampling._run(*call, **kw), reps, inner, device)
                    parts = {name: round(timed(fn, reps, inner, device) * 1e6, 2) for name, fn in launches}
                    sweep.append({"batch": b, "top_k": k, **kw, "us": round(total * 1e6, 2), "kernels_us": parts})
                    print(json.dumps(sweep[-1]), flush=True)

    report = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}), Triton interpreter",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "timing": f"median over {reps} CUDA-graph replays of {inner} calls" if cuda else "one wall-clock call (smoke)",
        "results": results,
    }
    if sweep:
        report["sweep"] = sweep
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
