"""LessIsMore's cross-rank union on several GPUs (NCCL): the set every rank gets equals the
single-process set, and what the all-gather costs next to the selection itself.

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 benchmarks/cross_rank.py --out benchmarks/results/cross-rank-h200x2.json
    torchrun --nproc_per_node 2 benchmarks/cross_rank.py --smoke --out /tmp/cross-rank-smoke.json   (CPU, gloo)

Shapes: Qwen3-32B's attention (64 query / 8 KV heads, head dim 128) split over the ranks, bf16, K=2048.
Times are CUDA-event medians of eager calls (the selection includes its own scores and top-k).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from lessismore.config import SparseConfig
from lessismore.methods import get

from lessismore.methods.lessismore.distributed import all_gather_heads
from lessismore.methods.lessismore.distributed import select_across_ranks as lessismore_select


def median_ms(fn, reps: int = 30) -> float:
    fn()
    if not torch.cuda.is_initialized():  # --smoke on the CPU: the host clock
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--points", default="8x16384,32x16384")
    parser.add_argument("--smoke", action="store_true", help="CPU and gloo, tiny shapes: checks the script, measures nothing")
    args = parser.parse_args()
    if args.smoke:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
        args.points = "2x256"
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
        device = torch.device("cuda", torch.cuda.current_device())
    rank, world = dist.get_rank(), dist.get_world_size()
    hq, hkv, d = 64, 8, 128
    lq, lkv = hq // world, hkv // world
    cfg = SparseConfig(method="lessismore", budget=64 if args.smoke else 2048)
    rows = []
    for point in args.points.split(","):
        b, length = (int(x) for x in point.split("x"))
        gen = torch.Generator(device=device).manual_seed(b * 7 + length)  # the same tensors on every rank
        q = torch.randn(b, hq, d, device=device, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(b, hkv, length, d, device=device, dtype=torch.bfloat16, generator=gen)
        valid = torch.arange(length, device=device) < torch.randint(length // 2, length + 1, (b, 1), device=device, generator=gen)
        q_local, k_local = q[:, rank * lq:(rank + 1) * lq], k[:, rank * lkv:(rank + 1) * lkv]
        whole = get("lessismore").select(cfg, q, k, valid)
        mine = lessismore_select(cfg, q_local, k_local, valid)
        same_as_single = bool(torch.equal(whole.indices, mine.indices) and torch.equal(whole.counts, mine.counts))
        gathered = all_gather_heads(mine.indices.unsqueeze(1).to(torch.int32))
        same_on_ranks = bool((gathered == gathered[:, :1]).all())
        k_ranked = cfg.ranked_share
        candidates = torch.zeros(b, lq, k_ranked, dtype=torch.int32, device=device)
        row = dict(
            batch=b, context=length, heads_per_rank=lq, budget=cfg.budget, world=world,
            equal_to_single_process=same_as_single, identical_on_every_rank=same_on_ranks,
            cross_rank_select_ms=median_ms(lambda: lessismore_select(cfg, q_local, k_local, valid)),
            single_gpu_select_local_heads_ms=median_ms(lambda: get("lessismore").select(cfg, q_local, k_local, valid)),
            all_gather_candidates_ms=median_ms(lambda: all_gather_heads(candidates)),
            candidate_bytes_per_rank=candidates.numel() * 4,
        )
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0:
        result = dict(command="NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node %d " % world + " ".join(sys.argv),
                      device=f"{world} x {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu (smoke)'}", torch=torch.__version__,
                      date=datetime.date.today().isoformat(), nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"), rows=rows)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
