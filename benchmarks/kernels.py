"""Time the decode kernels on a GPU and write the results as JSON.

    PYTHONPATH=src python3 benchmarks/kernels.py --out benchmarks/results/kernels-h200.json

Every timing is the median over many CUDA-graph replays, each replay running ``--inner`` calls back to
back on rotating input sets (caches, queries and index sets), so the bytes a call reads are not in L2
from the call before; graphs keep Python launch overhead out of the numbers (an eager column is kept for
the kernels that matter). Peers: SDPA full decode (enable_gqa), FlexAttention with a block mask over the
selected tokens, and a naive gather + SDPA; the memory floor is the bytes a kernel must read over the
copy bandwidth measured here (bytes read + written by a large device-to-device copy).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lessismore.analysis.metrics import union_depth
from lessismore.config import SparseConfig
from lessismore.methods.base import mask_to_selection
from lessismore.methods.lessismore import lessismore_mask
from lessismore.ops import triton_decode

from lessismore.decode import DecodeCache
from lessismore.methods.lessismore import union_prefix
from lessismore.methods.lessismore.triton import fused_select, union_selection
from lessismore.ops import topk


def select_lessismore(q, k_cache, v_cache, lengths, cfg, prefix=None):
    """The fused selection layer on a contiguous cache: (dense attention output, Selection); prefix as
    ``fused_select``'s."""
    return fused_select(cfg, q, DecodeCache(k_cache, v_cache, lengths=lengths, kernels=True), prefix=prefix)

HQ, HKV, D = 32, 8, 128  # Qwen3-8B
DTYPE = torch.bfloat16
L2_BYTES = 60 * 2**20
DEVICE = "cuda"  # --smoke on a machine without a GPU: "cpu" under the Triton interpreter


def event_time(fn, reps, inner):
    """Median over reps of the mean time of one call (seconds): fn(j) runs input set j."""
    if DEVICE == "cpu":
        return statistics.median(_wall(fn, r) for r in range(reps)) / inner
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for r in range(reps):
        start.record()
        fn(r)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def _wall(fn, r):
    t0 = time.perf_counter()
    fn(r)
    return time.perf_counter() - t0


def bench(call, sets, reps=30, inner=20, graph=True):
    """call(i) runs on input set i (i < sets). Returns (median seconds per call, 'graph' | 'eager')."""
    if DEVICE == "cpu":
        sets, reps, inner = 1, 1, 1
    for i in range(2 * sets):
        call(i % sets)
    if DEVICE == "cpu":
        graph = False
    else:
        torch.cuda.synchronize()
    if graph:
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for i in range(inner):
                    call(i % sets)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(inner):
                    call(i % sets)
            g.replay()
            torch.cuda.synchronize()
            return event_time(lambda r: g.replay(), reps, inner), "graph"
        except Exception as exc:  # noqa: BLE001  (some peers cannot be captured: time them eagerly)
            print(f"  graph capture failed ({type(exc).__name__}: {str(exc)[:120]}); timing eagerly", flush=True)
            torch.cuda.synchronize()

    def eager(r):
        for j in range(inner):
            call((r * inner + j) % sets)

    return event_time(eager, reps, inner), "eager"


def copy_bandwidth():
    n = 2 * 2**30 if DEVICE == "cuda" else 2**24
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    t = event_time(lambda r: dst.copy_(src), 20, 1)
    return 2 * n / t


class Inputs:
    """Rotating input sets for one (B, L): caches (enough copies that they exceed L2 together), queries
    and index sets per K."""

    def __init__(self, b, length, ks, sets=8):
        self.b, self.length = b, length
        cache_bytes = 2 * b * HKV * length * D * 2
        self.n_cache = max(1, min(sets, math.ceil(4 * L2_BYTES / cache_bytes)))
        self.sets = sets
        self.k = [torch.randn(b, HKV, length, D, device=DEVICE, dtype=DTYPE) for _ in range(self.n_cache)]
        self.v = [torch.randn(b, HKV, length, D, device=DEVICE, dtype=DTYPE) for _ in range(self.n_cache)]
        self.q = [torch.randn(b, HQ, D, device=DEVICE, dtype=DTYPE) for _ in range(sets)]
        self.idx, self.idx_head = {}, {}
        for kk in ks:
            if kk > length:
                continue
            self.idx[kk] = [torch.rand(b, length, device=DEVICE).topk(kk, -1).indices.sort(-1).values.int()
                            for _ in range(sets)]
            self.idx_head[kk] = [torch.rand(b, HQ, length, device=DEVICE).topk(kk, -1).indices.sort(-1).values.int()
                                 for _ in range(sets)]
        self.counts = {kk: torch.full((b,), kk, device=DEVICE, dtype=torch.int32) for kk in self.idx}
        self.counts_head = {kk: torch.full((b, HQ), kk, device=DEVICE, dtype=torch.int32) for kk in self.idx}

    def kv(self, i):
        return self.k[i % self.n_cache], self.v[i % self.n_cache]


def sdpa_full(q, k, v):
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)


def naive_gather_sdpa(q, k, v, idx):
    index = idx.long()[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    return sdpa_full(q, k.gather(2, index), v.gather(2, index))


class Flex:
    """FlexAttention with a block mask (128-token KV blocks) listing the blocks that hold a selected
    token, and a mask_mod reading the token mask. One compiled kernel per (B, L)."""

    def __init__(self):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.create_block_mask = create_block_mask
        torch._dynamo.config.cache_size_limit = 64  # one compile per (B, L); new masks must not fall back
        self.fn = torch.compile(flex_attention, dynamic=False)

    def prepare(self, idx, length):
        b = idx.shape[0]
        token_mask = torch.zeros(b, length, dtype=torch.bool, device=DEVICE)
        token_mask.scatter_(1, idx.long(), True)

        def mask_mod(bi, h, q_idx, kv_idx):
            return token_mask[bi, kv_idx]

        block_mask = self.create_block_mask(mask_mod, b, None, 1, length, device=DEVICE, BLOCK_SIZE=128)
        active = block_mask.kv_num_blocks.float().mean().item() / math.ceil(length / 128)
        return block_mask, active

    def __call__(self, q, k, v, block_mask):
        return self.fn(q.unsqueeze(2), k, v, block_mask=block_mask, enable_gqa=True).squeeze(2)


def free_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def sparse_bytes(b, kk, per_head=False):
    rows = b * (HQ if per_head else HKV) * kk
    return rows * D * 2 * 2 + (b * HQ if per_head else b) * kk * 4 + 2 * b * HQ * D * 2


def dense_bytes(b, length):
    return 2 * b * HKV * length * D * 2 + 2 * b * HQ * D * 2


def check(out, ref, what):
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    if not err < 2e-2:
        raise RuntimeError(f"{what}: relative error {err:.3g} against the reference")
    return err


def run_grid(args, bw, records, flex):
    flex_budget = args.flex_seconds
    for b in args.batch:
        for length in args.length:
            if 2 * b * HKV * length * D * 2 > args.max_cache_gib * 2**30:
                print(f"skip B={b} L={length}: cache over {args.max_cache_gib} GiB", flush=True)
                continue
            inp = Inputs(b, length, args.k)
            t_full, how = bench(lambda i: sdpa_full(inp.q[i], *inp.kv(i)), inp.sets)
            t_full_eager, _ = bench(lambda i: sdpa_full(inp.q[i], *inp.kv(i)), inp.sets, reps=10, graph=False)
            dbytes = dense_bytes(b, length)
            print(f"B={b:3d} L={length:6d} sdpa_full {t_full * 1e3:.4f} ms ({dbytes / t_full / 1e12:.2f} TB/s)", flush=True)
            for kk in sorted(inp.idx):
                idx, cnt = inp.idx[kk], inp.counts[kk]
                rec = {"B": b, "L": length, "K": kk, "sets": inp.sets, "cache_copies": inp.n_cache,
                       "sdpa_full_ms": t_full * 1e3, "sdpa_full_eager_ms": t_full_eager * 1e3,
                       "sdpa_full_floor_ms": dbytes / bw * 1e3}
                q0, (k0, v0) = inp.q[0], inp.kv(0)
                ref = triton_decode.sparse_decode_attention  # the kernel under test
                rec["rel_err"] = check(ref(q0, k0, v0, idx[0], cnt), naive_gather_sdpa(q0, k0, v0, idx[0]), "sparse")

                def ours(i):
                    return triton_decode.sparse_decode_attention(inp.q[i], *inp.kv(i), idx[i], cnt)

                t, _ = bench(ours, inp.sets)
                t_eager, _ = bench(ours, inp.sets, reps=10, graph=False)
                nbytes = sparse_bytes(b, kk)
                rec.update(sparse_ms=t * 1e3, sparse_eager_ms=t_eager * 1e3, sparse_bytes=nbytes,
                           sparse_floor_ms=nbytes / bw * 1e3, sparse_bw_frac=nbytes / t / bw,
                           sparse_tbps=nbytes / t / 1e12, speedup_vs_full=t_full / t)
                t, _ = bench(lambda i: naive_gather_sdpa(inp.q[i], *inp.kv(i), idx[i]), inp.sets)
                rec["naive_gather_sdpa_ms"] = t * 1e3
                hidx, hcnt = inp.idx_head[kk], inp.counts_head[kk]
                t, _ = bench(lambda i: triton_decode.sparse_decode_attention_per_head(inp.q[i], *inp.kv(i), hidx[i], hcnt), inp.sets)
                hbytes = sparse_bytes(b, kk, per_head=True)
                rec.update(per_head_ms=t * 1e3, per_head_bytes=hbytes, per_head_bw_frac=hbytes / t / bw)
                if flex is not None and flex_budget > 0 and (b, length) in args.flex_points:
                    t0 = time.time()
                    try:
                        block_mask, active = flex.prepare(idx[0], length)
                        out = flex(q0, k0, v0, block_mask)
                        rec["flex_rel_err"] = check(out, ref(q0, k0, v0, idx[0], cnt), "flex")
                        t, how_flex = bench(lambda i: flex(inp.q[i], *inp.kv(i), block_mask), inp.sets)
                        rec.update(flex_ms=t * 1e3, flex_timing=how_flex, flex_active_blocks=active)
                    except Exception as exc:  # noqa: BLE001
                        rec["flex_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                        print("  flex failed:", rec["flex_error"], flush=True)
                    flex_budget -= time.time() - t0
                records.append(rec)
                print(f"  K={kk:5d} ours {rec['sparse_ms']:.4f} ms (eager {rec['sparse_eager_ms']:.4f}) "
                      f"{rec['sparse_bw_frac'] * 100:5.1f}% bw | floor {rec['sparse_floor_ms']:.4f} | "
                      f"naive {rec['naive_gather_sdpa_ms']:.4f} | flex {rec.get('flex_ms', float('nan')):.4f} | "
                      f"per-head {rec['per_head_ms']:.4f} ({rec['per_head_bw_frac'] * 100:.0f}%)", flush=True)
            del inp
            free_cache()


def run_selection(args, bw, results):
    """The selection layer and the union at B = 32, 32 heads, L = 32K (and any --sel-shapes)."""
    cfg = SparseConfig(method="lessismore", budget=args.sel_budget, recent_ratio=0.25, sink_tokens=4)
    recent, sinks = cfg.recent_share, cfg.effective_sinks
    k_rank = cfg.budget - recent
    for b, length in args.sel_shapes:
        inp = Inputs(b, length, [])
        lengths = torch.full((b,), length, device=DEVICE, dtype=torch.int32)
        lengths[::2] = length - length // 32  # rows of different lengths
        rec = {"B": b, "L": length, "budget": cfg.budget, "ranked_k": k_rank, "heads": HQ}
        t, _ = bench(lambda i: sdpa_full(inp.q[i], *inp.kv(i)), inp.sets)
        rec["sdpa_full_ms"] = t * 1e3
        depth = union_prefix(k_rank)
        rec["union_prefix"] = depth
        # One top-k of all k ranks (before the prefix), and the prefix's worst case: every row deeper.
        for name, graph, prefix in (("select", True, None), ("select_eager", False, None),
                                    ("select_one_topk", True, k_rank), ("select_every_row_deeper", True, 1)):
            t, _ = bench(lambda i: select_lessismore(inp.q[i], *inp.kv(i), lengths, cfg, prefix), inp.sets, graph=graph)
            rec[f"{name}_ms"] = t * 1e3
        scores = torch.empty(b, HQ, length, device=DEVICE)

        def attn_scores(i):
            return triton_decode.split_decode(inp.q[i], *inp.kv(i), None, lengths, dense=True, scores=scores,
                                              score_lo=sinks, score_window=recent - sinks)

        t, _ = bench(attn_scores, inp.sets)
        rec["attention_with_scores_ms"] = t * 1e3
        rec["attention_with_scores_bw_frac"] = (dense_bytes(b, length) + scores.numel() * 4) / t / bw
        t, _ = bench(lambda i: triton_decode.dense_decode_attention(inp.q[i], *inp.kv(i), lengths), inp.sets)
        rec["attention_only_ms"] = t * 1e3
        attn_scores(0)
        t, _ = bench(lambda i: scores.topk(k_rank, dim=-1), 1)
        rec["topk_ms"] = t * 1e3
        t, _ = bench(lambda i: scores.topk(k_rank, dim=-1, sorted=False), 1)
        rec["topk_unsorted_ms"] = t * 1e3
        for name, kk in (("ours_topk", k_rank), ("ours_topk_prefix", depth)):
            t, _ = bench(lambda i: topk.topk_desc(scores, kk, lengths), 1)
            rec[f"{name}_ms"] = t * 1e3
        rec["select_profile"] = profile_select(lambda: select_lessismore(inp.q[0], *inp.kv(0), lengths, cfg))
        values, top = scores.topk(k_rank, dim=-1)
        for name, graph in (("union", True), ("union_eager", False)):
            t, _ = bench(lambda i: union_selection(top, values, lengths, length, cfg.budget, recent, sinks), 1,
                         graph=graph)
            rec[f"{name}_ms"] = t * 1e3
        valid = torch.arange(length, device=DEVICE) < lengths[:, None]

        def reference_union(i):
            return mask_to_selection(lessismore_mask(scores, valid, cfg.budget, recent, sinks), cfg.budget)

        t, _ = bench(reference_union, 1, reps=10, inner=3, graph=False)
        rec["reference_mask_topk_union_eager_ms"] = t * 1e3  # includes the reference's own top-k
        sel = union_selection(top, values, lengths, length, cfg.budget, recent, sinks)
        ref = reference_union(0)
        rec["union_equal_reference"] = bool(torch.equal(sel.indices, ref.indices) and torch.equal(sel.counts, ref.counts))
        # The union over the prefix, with the second top-k's launch (its rows flagged or not).
        prefix_values, prefix_top = values[..., :depth].contiguous(), top[..., :depth].contiguous()

        def prefix_union(i):
            return union_selection(prefix_top, prefix_values, lengths, length, cfg.budget, recent, sinks,
                                   lambda rows: topk.topk_desc(scores, k_rank, lengths, rows))

        t, _ = bench(prefix_union, 1)
        rec["union_prefix_and_deeper_launch_ms"] = t * 1e3
        sel = prefix_union(0)
        rec["union_prefix_equal_reference"] = bool(torch.equal(sel.indices, ref.indices) and torch.equal(sel.counts, ref.counts))
        # The union stops at the k-th distinct position, so its time depends on how much the heads'
        # lists overlap: random heads (above), heads that agree in part, and one list for all heads.
        middle = scores > float("-inf")
        shared = torch.randn(b, 1, length, device=DEVICE)
        cases = {"random": (values, top)}
        for case, noise in (("agree", 0.5), ("same_list", 0.0)):
            mixed = (shared + noise * torch.randn(b, HQ, length, device=DEVICE)).masked_fill(~middle, float("-inf"))
            case_values, case_top = cases[case] = mixed.topk(k_rank, dim=-1)
            t, _ = bench(lambda i: union_selection(case_top, case_values, lengths, length, cfg.budget, recent, sinks), 1)
            sel = union_selection(case_top, case_values, lengths, length, cfg.budget, recent, sinks)
            ref = mask_to_selection(lessismore_mask(mixed, valid, cfg.budget, recent, sinks), cfg.budget)
            rec[f"union_{case}_ms"] = t * 1e3
            rec[f"union_{case}_depth"] = union_depth(mixed, valid, cfg.budget, 0.25, 4).mean().item()
            rec[f"union_{case}_equal_reference"] = bool(torch.equal(sel.indices, ref.indices)
                                                       and torch.equal(sel.counts, ref.counts))
            del mixed
        if args.union_sweep:  # list entries per step x warps, per case (the set does not depend on them)
            rec["union_sweep_ms"] = {
                f"{case} tile{tile} w{warps}": bench(lambda i: union_selection(
                    lists[1], lists[0], lengths, length, cfg.budget, recent, sinks, tile=tile, num_warps=warps), 1)[0] * 1e3
                for case, lists in cases.items() for tile in (1024, 2048, 4096, 8192) for warps in (8, 16)}
        del cases
        rec["union_random_depth"] = union_depth(scores, valid, cfg.budget, 0.25, 4).mean().item()
        rec["select_over_sdpa_full"] = rec["select_ms"] / rec["sdpa_full_ms"]
        results.append(rec)
        print(json.dumps(rec), flush=True)
        del inp
        free_cache()


SWEEP = {
    "sparse": {"block_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3), "waves": (1, 2, 4)},
    "dense": {"block_n": (64, 128), "num_warps": (4, 8), "num_stages": (2, 3), "waves": (1, 2)},
}


def configs(space):
    keys = list(space)
    for values in itertools.product(*(space[k] for k in keys)):
        yield dict(zip(keys, values))


def profile_select(fn, runs=5):
    """Device time per call of each kernel fn launches (torch profiler), largest first."""
    if DEVICE == "cpu":
        return []
    from common import kernels_per_call  # here: after main() chose the device and the interpreter

    rows = [{"kernel": name[:90], "us_per_call": us, "launches_per_call": launches}
            for name, (launches, us) in kernels_per_call(fn, runs).items() if us > 0]
    return sorted(rows, key=lambda r: -r["us_per_call"])[:16]


def run_sweep(args, bw, results):
    """Launch settings of the sparse kernel at --sweep-points and of the dense kernel with scores at
    --sel-shapes; the settings with the best geometric-mean time over the points become the defaults
    for the rest of the run (recorded in the JSON)."""
    points = [("sparse", p) for p in args.sweep_points] + [("dense", (b, length, 0)) for b, length in args.sel_shapes]
    for kind, (b, length, kk) in points:
        inp = Inputs(b, length, [kk] if kk else [])
        lengths = torch.full((b,), length, device=DEVICE, dtype=torch.int32)
        scores = torch.empty(b, HQ, length, device=DEVICE)
        nbytes = sparse_bytes(b, kk) if kind == "sparse" else dense_bytes(b, length) + scores.numel() * 4
        for cfg in configs(SWEEP[kind]):
            if kind == "sparse":
                idx, cnt = inp.idx[kk], inp.counts[kk]

                def call(i, cfg=cfg):
                    return triton_decode.sparse_decode_attention(inp.q[i], *inp.kv(i), idx[i], cnt, **cfg)
            else:
                def call(i, cfg=cfg):
                    return triton_decode.split_decode(inp.q[i], *inp.kv(i), None, lengths, dense=True, scores=scores,
                                                      score_lo=4, score_window=508, **cfg)
            try:
                t, _ = bench(call, inp.sets, reps=15)
            except Exception as exc:  # noqa: BLE001  (e.g. out of shared memory)
                print("  config failed", kind, cfg, type(exc).__name__, str(exc)[:100], flush=True)
                continue
            results.append({"kernel": kind, "B": b, "L": length, "K": kk, **cfg, "ms": t * 1e3, "bw_frac": nbytes / t / bw})
        del inp
        free_cache()
    chosen = {}
    for kind, defaults in (("sparse", triton_decode.SPARSE_DEFAULTS), ("dense", triton_decode.DENSE_DEFAULTS)):
        rows = [r for r in results if r["kernel"] == kind]
        if not rows:
            continue
        best_at = {}
        for r in rows:
            key = (r["B"], r["L"], r["K"])
            best_at[key] = min(best_at.get(key, float("inf")), r["ms"])
        score = {}
        for r in rows:
            name = tuple(r[k] for k in SWEEP[kind])
            score.setdefault(name, []).append(math.log(r["ms"] / best_at[(r["B"], r["L"], r["K"])]))
        full = [name for name, v in score.items() if len(v) == len(best_at)]
        best = min(full, key=lambda name: sum(score[name]))
        chosen[kind] = dict(zip(SWEEP[kind], best))
        print(f"sweep {kind}: best {chosen[kind]} (geo-mean {math.exp(sum(score[best]) / len(best_at)):.3f}x the per-point best); "
              f"defaults were {defaults} ({math.exp(sum(score.get(tuple(defaults[k] for k in SWEEP[kind]), [float('nan')])) / len(best_at)):.3f}x)",
              flush=True)
        if args.apply_sweep:
            defaults.update(chosen[kind])
    return chosen


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/kernels-h200.json")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--length", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--k", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--max-cache-gib", type=float, default=40.0)
    p.add_argument("--flex-seconds", type=float, default=240.0, help="time allowed for FlexAttention (compiles)")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--flex-points", type=lambda s: tuple(int(x) for x in s.split("x")), nargs="*",
                   default=[(8, 32768), (32, 8192), (1, 131072), (32, 32768)], help="BxL points where FlexAttention runs")
    p.add_argument("--no-grid", action="store_true")
    p.add_argument("--sel-shapes", type=lambda s: tuple(int(x) for x in s.split("x")), nargs="*", default=[(32, 32768)],
                   help="BxL shapes for the selection layer")
    p.add_argument("--sel-budget", type=int, default=2048)
    p.add_argument("--union-sweep", action="store_true", help="time the union at several tiles and warp counts")
    p.add_argument("--sweep-points", type=lambda s: tuple(int(x) for x in s.split("x")), nargs="*", default=[],
                   help="BxLxK points for a kernel-configuration sweep")
    p.add_argument("--apply-sweep", action="store_true", help="use the sweep's best settings for the rest of the run")
    p.add_argument("--smoke", action="store_true", help="no GPU: run every path once on tiny CPU shapes "
                   "(needs TRITON_INTERPRET=1); the numbers mean nothing")
    args = p.parse_args()

    torch.manual_seed(0)
    import triton

    global DEVICE, HQ, HKV, D, L2_BYTES
    if args.smoke:
        DEVICE, HQ, HKV, D, L2_BYTES = "cpu", 8, 2, 64, 2**16
        name, sms = "cpu (smoke)", triton_decode.num_sms(torch.device("cpu"))
    else:
        props = torch.cuda.get_device_properties(0)
        name, sms = props.name, props.multi_processor_count
    bw = copy_bandwidth()
    print(f"{name}: {sms} SMs, copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    result = {
        "command": " ".join(["python3"] + sys.argv),
        "device": name, "sms": sms,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "dtype": "bfloat16", "heads": {"q": HQ, "kv": HKV, "dim": D},
        "copy_bandwidth_Bps": bw,
        "timing": "median over CUDA-graph replays of back-to-back calls on rotating inputs; *_eager_ms: the same without a graph",
        "kernel_defaults_in_code": {"sparse": dict(triton_decode.SPARSE_DEFAULTS), "dense": dict(triton_decode.DENSE_DEFAULTS)},
        "grid": [], "selection": [], "sweep": [],
    }
    flex = None
    if not args.no_flex:
        try:
            flex = Flex()
        except Exception as exc:  # noqa: BLE001
            result["flex_error"] = f"{type(exc).__name__}: {exc}"
    try:
        if args.sweep_points:
            result["sweep_best"] = run_sweep(args, bw, result["sweep"])
        result["kernel_defaults_used"] = {"sparse": dict(triton_decode.SPARSE_DEFAULTS), "dense": dict(triton_decode.DENSE_DEFAULTS)}
        if args.sel_shapes:
            run_selection(args, bw, result["selection"])
        if not args.no_grid:
            run_grid(args, bw, result["grid"], flex)
    finally:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print("wrote", args.out, flush=True)


if __name__ == "__main__":
    main()
