"""Time decode's skinny GEMMs: the Triton kernel (lessismore.ops.skinny) against cuBLAS, as JSON.

    PYTHONPATH=src TRITON_INTERPRET=0 python3 benchmarks/linear.py --out benchmarks/results/linear-h200.json
    PYTHONPATH=src python3 benchmarks/linear.py --smoke --out /tmp/linear.json   # CPU: interpreter, tiny shapes

Workload: out[M, N] = x[M, K] @ W[N, K]^T in bf16 (fp32 accumulation) at Qwen3-8B's decode shapes
(qkv, o, gate_up, down, lm_head) for M = 1, 8, 16, 32. Per shape and M:

* ``F.linear``: torch.nn.functional.linear (cuBLAS), the engine's decode products before ``ops.skinny``;
* ``mm_t``: torch.mm(W, x.t()).t() (cuBLAS on the transposed problem);
* ``skinny_default``: skinny_linear with ``default_config``;
* ``skinny_best_m8`` / ``skinny_best_m32``: the fastest configs of a sweep (block_n x block_k x split_k
  x num_warps x num_stages x swap_ab, ~30-45 configs, run at M = 8 and M = 32, or the Ms of
  ``--sweep-ms``), timed at every M; ``skinny_best`` is the fastest of them.

Each time is the median seconds per call over CUDA-graph replays (benchmarks/common.py's
``graph_seconds_per_call``), each replay running back-to-back calls on rotating weights (enough
copies that together exceed 3x the 60 MB L2, so every call streams W from HBM). Reported: the time,
W's bytes over it (TB/s), that over the copy bandwidth measured in the same run (``copy_fraction``;
bytes read + written per second by a large device-to-device copy), the max abs error against
F.linear in fp32, and the kernels one call launches (profiler; at M = 8 and 32). The kernel is also
captured in a CUDA graph and its replay compared with an eager call bit for bit (``graph_exact``).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import time

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288),
          "lm_head": (151936, 4096)}
SMOKE_SHAPES = {"qkv": (96, 64), "o": (64, 64), "gate_up": (160, 64), "down": (64, 160), "lm_head": (200, 64)}
MS = (1, 8, 16, 32)
SWEEP_MS = (8, 32)
L2_BYTES = 60 * 2**20
SMEM_BYTES = 200 * 1024  # skip sweep configs whose pipeline buffers would not fit (H200: 227 KB a block)
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def sweep_grid(m: int, n: int, k: int, sms: int, smoke: bool) -> list[dict]:
    """Tiles of W (block_n x block_k) x the two fewest K splits that give >= one program per SM
    (none shorter than two K blocks) x warps (8 too for tiles of 64+ rows) x stages, plus the dot with
    W on the left (swap_ab) for tiles of 64+ rows; configs whose buffers exceed the shared memory are
    left out."""
    if smoke:
        tiles, stage_set = [(16, 32), (32, 16)], (2,)
    else:
        tiles, stage_set = [(16, 256), (32, 128), (32, 256), (64, 128), (64, 256), (128, 64)], (3, 5)
    block_m = max(16, 1 << (m - 1).bit_length())
    out = []
    for block_n, block_k in tiles:
        valid = [s for s in (1, 2, 4, 8) if s == 1 or -(-k // s) >= 2 * block_k]
        enough = [s for s in valid if -(-n // block_n) * s >= sms]
        splits = enough[:2] or valid[-1:]
        warps = (4, 8) if block_n >= 64 and not smoke else (4,)
        for split_k, num_warps, num_stages in itertools.product(splits, warps, stage_set):
            if num_stages * (block_n + block_m) * block_k * 2 > SMEM_BYTES:
                continue
            out.append({"block_n": block_n, "block_k": block_k, "split_k": split_k, "num_warps": num_warps,
                        "num_stages": num_stages, "swap_ab": False})
        if block_n >= 64:
            for num_stages in stage_set:
                if num_stages * (block_n + block_m) * block_k * 2 <= SMEM_BYTES:
                    out.append({"block_n": block_n, "block_k": block_k, "split_k": splits[0], "num_warps": 4,
                                "num_stages": num_stages, "swap_ab": True})
    return out


def cfg_name(cfg: dict) -> str:
    return (f"n{cfg['block_n']}k{cfg['block_k']}s{cfg['split_k']}w{cfg['num_warps']}p{cfg['num_stages']}"
            + ("-swap" if cfg.get("swap_ab") else ""))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU through the Triton interpreter")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    ap.add_argument("--no-sweep", action="store_true", help="skip the config sweep")
    ap.add_argument("--sweep-ms", default=",".join(map(str, SWEEP_MS)), help="the M values the sweep runs at (comma list)")
    ap.add_argument("--reps", type=int, default=15, help="graph replays per timing (median)")
    ap.add_argument("--inner", type=int, default=12, help="calls per graph (rounded up to whole weight rotations)")
    ap.add_argument("--pdl", action="store_true", help="only the PDL comparison: the default config with "
                    "programmatic dependent launch off and on, alone and after an RMSNorm (M = 8, 32)")
    args = ap.parse_args(argv)
    sweep_ms = [int(m) for m in args.sweep_ms.split(",") if m]
    if not set(sweep_ms) <= set(MS):
        ap.error(f"--sweep-ms: each of {list(MS)}, got {args.sweep_ms}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.smoke:
            sys.exit("no GPU: only --smoke runs here (through the Triton interpreter)")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
    # here: common imports the engine and so the kernels, after TRITON_INTERPRET is set
    from common import copy_bandwidth, environment, graph_seconds_per_call, kernels_per_call, write_json

    import torch.nn.functional as F

    from lessismore.engine.kernels import add_rmsnorm
    from lessismore.ops import pdl, skinny

    dtype = torch.bfloat16 if device == "cuda" else torch.float16  # the interpreter's bf16 is wrong
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    names = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in names if s not in shapes]
    if unknown:
        sys.exit(f"unknown shapes {unknown}; choose from {list(shapes)}")
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 4

    result = environment(device)
    result.update({"interpreted": skinny.INTERPRETED, "dtype": str(dtype).replace("torch.", ""), "sms": sms,
                   "l2_bytes_assumed": L2_BYTES, "timing": "median seconds per call over CUDA-graph replays "
                   "of back-to-back calls on rotating weights (together > 3x L2)", "rows": [], "sweeps": []})
    bw = copy_bandwidth(device, 1 / 64 if device == "cpu" else 4.0)
    result["copy_bandwidth_TBps"] = bw / 1e12
    log(f"{result['device']}; copy bandwidth {bw / 1e12:.3f} TB/s; shapes {names}; M {list(MS)}")

    def seconds(call, sets):
        """Median seconds per call; call(j) uses weight set j % sets."""
        if device == "cpu":
            call(0)
            t = time.perf_counter()
            call(0)
            return time.perf_counter() - t
        inner = sets * -(-args.inner // sets)
        return graph_seconds_per_call(lambda j: call(j % sets), inner, args.reps, warm=max(sets, 3))

    def kernels(call):
        """{kernel name: [launches, us]} per call (profiler over 3 calls); None on CPU or on failure."""
        if device == "cpu":
            return None
        try:
            per = kernels_per_call(call, calls=3)
            return {name[:90]: [round(c, 2), round(us, 2)] for name, (c, us) in per.items()}
        except Exception as err:  # the profiler is a side show: never fail the run over it
            return {"error": repr(err)[:200]}

    def graph_exact(fn, x, w):
        """A captured call replays to the eager result, bit for bit (on new data in x)."""
        if device == "cpu":
            return None
        fn(x, w)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(x, w)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        ok = torch.equal(out, fn(x, w))
        del graph
        return ok

    def measure(fn, xs, ws, ref, m, bytes_w, profile=False):
        x = xs[m]
        t = seconds(lambda j: fn(x, ws[j]), len(ws))
        err = (fn(x, ws[0]).float() - ref[m]).abs().max().item()
        row = {"seconds": t, "TBps": bytes_w / t / 1e12, "copy_fraction": bytes_w / t / bw, "max_abs_err": err}
        if profile:
            row["kernels"] = kernels(lambda: fn(x, ws[0]))
        return row

    def skinny_fn(cfg):
        return lambda x, w: skinny.skinny_linear(x, w, **cfg)

    def pdl_rows(name, n, k, xs, ws, bytes_w):
        """Seconds per call of the default config, PDL off and on, back to back and each call after an
        add_rmsnorm of its input (the engine's pattern before qkv and gate_up)."""
        rows = {"shape": name, "M": {}}
        for m in SWEEP_MS:
            cfg = skinny.default_config(m, n, k, sms=sms)
            res, norm_w = xs[m].clone(), torch.ones(k, device=device, dtype=dtype)
            row = rows["M"][m] = {"config": cfg}
            for label in ("off", "on"):
                with (pdl.disabled() if label == "off" else contextlib.nullcontext()):
                    alone = seconds(lambda j: skinny.skinny_linear(xs[m], ws[j], **cfg), len(ws))
                    chained = seconds(lambda j: skinny.skinny_linear(add_rmsnorm(None, res, norm_w, 1e-6), ws[j], **cfg),
                                      len(ws))
                row[label] = {"seconds": alone, "copy_fraction": bytes_w / alone / bw, "after_norm_seconds": chained}
            log(f"  pdl M={m}: " + ", ".join(f"{lbl} {v['seconds'] * 1e6:.1f}/{v['after_norm_seconds'] * 1e6:.1f} us"
                                           for lbl, v in row.items() if lbl != "config"))
        return rows

    methods_cublas = {"F.linear": lambda x, w: F.linear(x, w), "mm_t": lambda x, w: torch.mm(w, x.t()).t()}
    summary = []
    for name in names:
        n, k = shapes[name]
        bytes_w = n * k * dtype.itemsize
        sets = 1 if device == "cpu" else max(2, -(-3 * L2_BYTES // bytes_w))
        gen = torch.Generator(device=device).manual_seed(0)
        ws = [(torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype) for _ in range(sets)]
        xs = {m: torch.randn(m, k, generator=gen, device=device).to(dtype) for m in MS}
        w32 = ws[0].float()
        ref = {m: F.linear(xs[m].float(), w32) for m in MS}
        del w32
        log(f"{name}: N={n} K={k}, W {bytes_w / 1e6:.1f} MB x {sets} sets")

        if args.pdl:
            result.setdefault("pdl_comparison", []).append(pdl_rows(name, n, k, xs, ws, bytes_w))
            ws = xs = ref = None
            write_json(args.out, result)
            continue

        best = {}
        if not args.no_sweep:
            for m in sweep_ms:
                grid = sweep_grid(m, n, k, sms, args.smoke)
                entries = []
                for cfg in grid:
                    try:
                        t = seconds(lambda j, cfg=cfg: skinny.skinny_linear(xs[m], ws[j], **cfg), sets)
                        entries.append({"config": cfg, "seconds": t, "copy_fraction": bytes_w / t / bw})
                    except Exception as err:  # e.g. out of shared memory or registers
                        entries.append({"config": cfg, "error": repr(err)[:200]})
                timed = sorted((e for e in entries if "seconds" in e), key=lambda e: e["seconds"])
                if timed:
                    best[m] = timed[0]["config"]
                result["sweeps"].append({"shape": name, "M": m, "configs": entries})
                top = ", ".join(f"{cfg_name(e['config'])} {e['copy_fraction'] * 100:.1f}%" for e in timed[:3])
                log(f"  sweep M={m}: {len(grid)} configs, {len(entries) - len(timed)} failed; best: {top}")

        for m in MS:
            row = {"shape": name, "N": n, "K": k, "M": m, "weight_bytes": bytes_w, "sets": sets, "methods": {}}
            prof = m in SWEEP_MS
            for label, fn in methods_cublas.items():
                row["methods"][label] = measure(fn, xs, ws, ref, m, bytes_w, prof)
            cfg = skinny.default_config(m, n, k, sms=sms)
            entry = measure(skinny_fn(cfg), xs, ws, ref, m, bytes_w, prof)
            entry["config"] = cfg
            entry["graph_exact"] = graph_exact(skinny_fn(cfg), xs[m].clone(), ws[0])
            row["methods"]["skinny_default"] = entry
            done = {}
            for sm, bcfg in best.items():
                if cfg_name(bcfg) not in done:  # the two sweeps may agree: time their config once
                    entry = measure(skinny_fn(bcfg), xs, ws, ref, m, bytes_w, prof)
                    entry["config"] = bcfg
                    entry["graph_exact"] = graph_exact(skinny_fn(bcfg), xs[m].clone(), ws[0])
                    done[cfg_name(bcfg)] = entry
                row["methods"][f"skinny_best_m{sm}"] = done[cfg_name(bcfg)]
            if best:
                pick = min((f"skinny_best_m{sm}" for sm in best), key=lambda lbl: row["methods"][lbl]["seconds"])
                row["skinny_best"] = pick
            result["rows"].append(row)
            fr = {lbl: v["copy_fraction"] * 100 for lbl, v in row["methods"].items()}
            line = (f"  M={m:2d}: F.linear {fr['F.linear']:5.1f}%  mm_t {fr['mm_t']:5.1f}%  "
                    f"default {fr['skinny_default']:5.1f}% ({cfg_name(cfg)})")
            if best:
                b = row["methods"][row["skinny_best"]]
                line += f"  best {b['copy_fraction'] * 100:5.1f}% ({cfg_name(b['config'])})"
            us = row["methods"]["F.linear"]["seconds"] * 1e6
            errs = "/".join(f"{v['max_abs_err']:.1e}" for v in row["methods"].values())
            log(f"{line}  [F.linear {us:.1f} us; err {errs}]")
            summary.append((name, m, row))
        ws = xs = ref = None  # free this shape's weights before the next
        if device == "cuda":
            torch.cuda.empty_cache()
        write_json(args.out, result)  # partial results survive a later failure

    if args.pdl:
        write_json(args.out, result)
        log(f"wrote {args.out}")
        return
    print("\ncopy fraction (% of the copy bandwidth; W bytes / time):")
    print(f"{'shape':8s} {'M':>3s} {'F.linear':>9s} {'mm_t':>7s} {'default':>8s} {'best':>7s} {'best/F.linear':>14s}")
    for name, m, row in summary:
        meth = row["methods"]
        b = meth[row["skinny_best"]] if "skinny_best" in row else meth["skinny_default"]
        print(f"{name:8s} {m:3d} {meth['F.linear']['copy_fraction'] * 100:8.1f}% {meth['mm_t']['copy_fraction'] * 100:6.1f}% "
              f"{meth['skinny_default']['copy_fraction'] * 100:7.1f}% {b['copy_fraction'] * 100:6.1f}% "
              f"{meth['F.linear']['seconds'] / b['seconds']:13.2f}x")
    write_json(args.out, result)
    log(f"wrote {args.out}")
    bad = [(r["shape"], r["M"], lbl) for r in result["rows"] for lbl, v in r["methods"].items()
           if v.get("graph_exact") is False]
    if bad:
        sys.exit(f"graph replay differs from the eager call: {bad}")


if __name__ == "__main__":
    main()
