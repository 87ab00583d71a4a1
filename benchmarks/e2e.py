"""End-to-end decode speed of the engine on a GPU, against HF ``generate`` and the memory floor.

    PYTHONPATH=src python3 benchmarks/e2e.py --out benchmarks/results/e2e-h200.json

Qwen3-8B shape with random bf16 weights drawn on the GPU once and shared by every engine. At each
(batch, context) point and for each method a fresh engine is built (the previous one freed first), its
cache filled with random K/V to the context length (decode speed does not depend on the values), and
its decode step, captured as a CUDA graph, replayed back to back and timed with CUDA events (median
over repetitions of the mean step). The floor is the bytes a step must read (``common.Floor``: every
weight but the embedding table, plus the K/V rows the method reads) over the device-to-device copy
bandwidth measured here (bytes read + written). HF ``generate`` (sdpa, DynamicCache filled to the
context) is the outside peer, timed over a few steps. Correctness of the GPU paths is the job of the
test suite (pytest -m gpu), not of this script.

--span-factor F allocates F times the context, so the rows fill 1/F of the cache (F = 2: halfway through a
long generation); it shows what a kernel spends on the part of the span a row has not reached.

Modes: --generate (Engine.generate end to end), --sweep (the full step with the other cuBLAS back end),
--profile (per-kernel GPU time of one eager step per point and method, PDL off), --pdl-off (every point also
timed with programmatic dependent launch off, ``ops.pdl``), --overlap-off (the methods with a
fused selection layer also timed with its top-k and union on the main stream, ``DecodeExecutor.overlap``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from common import (DTYPE, SMOKE_MODEL, Floor, Timer, bandwidth_and_weights, device_events, environment, free_memory,
                    kernel_summary, method_cfg, new_engine, sync, write_json)
from lessismore import methods
from lessismore.config import FULL
from lessismore.methods.base import Method
from lessismore.engine import Engine, ModelConfig
from lessismore.ops import pdl

DEV = "cuda"  # --smoke: "cpu", a tiny model, to check the script itself without a GPU


# ---- engine state (internals: the engine's state buffers, its cache and step) ----------------------


def fill_decode_state(engine: Engine, batch: int, context: int, seed: int = 0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    for k, v in zip(engine.k_cache, engine.v_cache):
        k[:batch, :, :context].normal_(generator=gen)
        v[:batch, :, :context].normal_(generator=gen)
    reset_decode_state(engine, batch, context)
    engine.rebuild_method_state()  # method state derived from the cache (Quest's page bounds)


def reset_decode_state(engine: Engine, batch: int, context: int):
    engine.active.zero_()
    engine.lengths[:batch] = context
    engine.active[:batch] = True
    engine.count[:batch] = 1
    engine.limit[:batch] = 1 << 40
    engine.stop_on_eos.zero_()
    engine.temperature.zero_()
    engine.tokens[:batch] = torch.randint(0, engine.model_config.vocab_size, (batch,), device=DEV)


def time_steps(engine: Engine, batch: int, context: int, steps: int, reps: int) -> list[float]:
    """Mean step time (s) of each repetition of ``steps`` back-to-back steps at this context."""
    reset_decode_state(engine, batch, context)
    for _ in range(3):
        engine.step(batch)  # captures on first use
    sync(DEV)
    out = []
    for _ in range(reps):
        reset_decode_state(engine, batch, context)
        with Timer(DEV) as t:
            for _ in range(steps):
                engine.step(batch)
        out.append(t.s / steps)
    return out


def cache_len(context: int, args) -> int:
    """The engine's max_len at a point: the context and the timed steps, times --span-factor (the rows
    then fill 1/F of the cache, as halfway through a long generation at F = 2)."""
    return args.span_factor * context + 16 * (args.steps + 8)


def timed_point(mcfg, weights, cfg, batch: int, context: int, args, steps=None, reps=None, cuda_graphs=None,
                overlap_selection=None) -> list[float]:
    """A fresh engine at this point, filled, timed, freed."""
    engine = new_engine(mcfg, weights, cfg, batch, cache_len(context, args), DEV, cuda_graphs, overlap_selection)
    try:
        fill_decode_state(engine, batch, context)
        return time_steps(engine, batch, context, steps or args.steps, reps or args.reps)
    finally:
        del engine
        free_memory(DEV)


def hf_generate_step(hf, batch: int, context: int, steps: int, reps: int = 3):
    """Seconds per decode step of HF generate (greedy, sdpa) with a DynamicCache of ``context`` random
    tokens: (time for 1 + steps new tokens - time for 1) / steps; the median of ``reps`` estimates,
    and the estimates."""
    from transformers import DynamicCache

    c = hf.config
    gen = torch.Generator(device=DEV).manual_seed(1)
    cache = DynamicCache(config=c)
    shape = (batch, c.num_key_value_heads, context, c.head_dim)
    for layer in range(c.num_hidden_layers):
        cache.update(torch.randn(shape, device=DEV, dtype=hf.dtype, generator=gen),
                     torch.randn(shape, device=DEV, dtype=hf.dtype, generator=gen), layer)
    ids = torch.randint(0, c.vocab_size, (batch, context + 1), device=DEV, generator=gen)
    mask = torch.ones_like(ids)

    def run(n):
        extra = cache.get_seq_length() - context
        if extra > 0:
            cache.crop(-extra)
        sync(DEV)
        t0 = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
        sync(DEV)
        assert out.shape[1] == context + 1 + n
        return time.perf_counter() - t0

    run(2)  # warm-up
    estimates = []
    for _ in range(reps):
        one, many = run(1), run(1 + steps)
        estimates.append((many - one) / steps)
    del cache
    return statistics.median(estimates), estimates



# ---- BLAS back-end sweep -------------------------------------------------------------------------


def run_sweep(mcfg, weights, points, args) -> dict:
    """Full-attention step time at every point with the default cuBLAS back end and the other one
    (cuBLAS / cuBLASLt), for information; the default is kept. A fresh engine for every timing."""
    steps = max(1, args.steps // 2)

    def full_ms(batch, context):
        return statistics.median(timed_point(mcfg, weights, FULL, batch, context, args, steps, 3)) * 1e3

    table = {}
    for batch, context in points:
        row = table[f"{batch}x{context}"] = {"default": full_ms(batch, context)}
        if DEV == "cuda":
            blas = torch.backends.cuda.preferred_blas_library()
            other = torch._C._BlasBackend.Cublaslt if blas == torch._C._BlasBackend.Cublas else torch._C._BlasBackend.Cublas
            try:
                torch.backends.cuda.preferred_blas_library(other)
                row[f"blas_{str(other).split('.')[-1].lower()}"] = full_ms(batch, context)
            except Exception as exc:
                row["blas_other"] = f"failed: {exc!r}"
            finally:
                torch.backends.cuda.preferred_blas_library(blas)
            row["blas_default"] = str(blas)
        print("sweep", batch, context, row, flush=True)
    return {"step_ms_full": table}


def profile_step(mcfg, weights, cfg, batch: int, context: int, args, top: int = 12) -> dict:
    """GPU time of one decode step's kernels (torch profiler), on an eager engine (cuda_graphs=False:
    the same kernels, each one recorded): the total and the largest. PDL is off here: a kernel
    launched early under PDL is recorded from its launch, its wait for the kernel before included
    (with it on, a SiLU of a few us showed as 36 us at 32 x 8K)."""
    from torch.profiler import ProfilerActivity, profile

    with pdl.disabled():
        engine = new_engine(mcfg, weights, cfg, batch, cache_len(context, args), DEV, cuda_graphs=False)
        try:
            fill_decode_state(engine, batch, context)
            engine.step(batch)  # compile
            sync(DEV)
            reset_decode_state(engine, batch, context)
            activity = ProfilerActivity.CUDA if DEV == "cuda" else ProfilerActivity.CPU
            with profile(activities=[activity]) as prof:
                engine.step(batch)
                sync(DEV)
            return {**kernel_summary(device_events(prof, DEV == "cuda"), None, 1, top=top), "pdl": False}
        finally:
            del engine
            free_memory(DEV)


# ---- main ------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="1x32768,1x131072,8x16384,32x16384")
    ap.add_argument("--methods", default="full,lessismore,tidaldecode")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--hf-steps", type=int, default=12)
    ap.add_argument("--hf-max-batch", type=int, default=8, help="HF peer only where batch <= this (its cache doubles on every step)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--generate", action="store_true", help="also time Engine.generate end to end (8 x 2K prompts)")
    ap.add_argument("--sweep", action="store_true", help="also time the full step with the other cuBLAS back end")
    ap.add_argument("--profile", action="store_true", help="per-kernel GPU time of one step at every point")
    ap.add_argument("--pdl-off", action="store_true", help="also time every point with programmatic dependent launch off")
    ap.add_argument("--overlap-off", action="store_true",
                    help="also time the methods with a fused selection layer with its top-k and union on the main stream")
    ap.add_argument("--span-factor", type=int, default=1,
                    help="a cache of F times the context: rows fill 1/F of it, as in a long generation (F = 2: halfway)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model: checks the script, measures nothing")
    args = ap.parse_args()
    if args.span_factor < 1:
        ap.error(f"--span-factor={args.span_factor}: must be >= 1")
    global DEV
    if args.smoke:
        DEV = "cpu"
        torch.set_num_threads(1)
        args.points, args.steps, args.reps, args.hf_steps, args.budget = "1x64,2x48", 2, 2, 2, 32
    mcfg = SMOKE_MODEL if args.smoke else ModelConfig.qwen3_8b()

    result = environment(DEV)
    result["model"] = f"{'tiny' if args.smoke else 'Qwen3-8B'} shape, random bf16 weights"
    result["span_factor"] = args.span_factor

    def save():
        write_json(args.out, result)

    bw, weights = bandwidth_and_weights(mcfg, result, DEV, args.smoke)

    points = [tuple(int(x) for x in p.split("x")) for p in args.points.split(",")]
    names = args.methods.split(",")
    cfgs = {name: method_cfg(name, args.budget) for name in names}
    result["configs"] = {name: str(cfg) for name, cfg in cfgs.items()}
    if args.sweep:
        result["sweep"] = run_sweep(mcfg, weights, points, args)
        save()
    rows = result["points"] = []
    for batch, context in points:
        t0 = time.perf_counter()
        row = {"batch": batch, "context": context, "methods": {}}
        for name in names:
            cfg = cfgs[name]
            times = timed_point(mcfg, weights, cfg, batch, context, args)
            step = statistics.median(times)
            floor = Floor.of(mcfg, cfg).step_bytes(batch, context + 1) / bw  # the step's own token included
            row["methods"][name] = {
                "ms_per_step": step * 1e3, "ms_spread": [min(times) * 1e3, max(times) * 1e3],
                "tokens_per_s": batch / step, "floor_ms": floor * 1e3, "over_floor": step / floor,
            }
            print(f"B={batch} L={context} {name}: {step * 1e3:.2f} ms/step ({batch / step:.0f} tok/s), "
                  f"floor {floor * 1e3:.2f} ms, x{step / floor:.2f}", flush=True)
            if args.pdl_off:
                with pdl.disabled():
                    off = statistics.median(timed_point(mcfg, weights, cfg, batch, context, args))
                row["methods"][name].update({"ms_per_step_pdl_off": off * 1e3, "pdl_speedup": off / step})
                print(f"  PDL off: {off * 1e3:.2f} ms/step ({off / step:.3f}x the step with PDL)", flush=True)
            if args.overlap_off and type(methods.get(cfg.method)).fused_attention is not Method.fused_attention:
                off = statistics.median(timed_point(mcfg, weights, cfg, batch, context, args, overlap_selection=False))
                row["methods"][name].update({"ms_per_step_overlap_off": off * 1e3, "overlap_speedup": off / step})
                print(f"  overlap off: {off * 1e3:.2f} ms/step ({off / step:.3f}x the step with it)", flush=True)
        if "full" in row["methods"]:
            full = row["methods"]["full"]["ms_per_step"]
            for name, m in row["methods"].items():
                m["speedup_over_full"] = full / m["ms_per_step"]
                m["ceiling_over_full"] = row["methods"]["full"]["floor_ms"] / m["floor_ms"]
        if batch == 1 and context == points[0][1]:
            eager = timed_point(mcfg, weights, FULL, batch, context, args, 3, 2, cuda_graphs=False)
            row["full_eager_ms_per_step"] = statistics.median(eager) * 1e3
        if args.profile:
            row["kernel_profile"] = {}
            for name in names:
                try:
                    row["kernel_profile"][name] = profile_step(mcfg, weights, cfgs[name], batch, context, args)
                except Exception as exc:  # a diagnostic only
                    if args.smoke:
                        raise
                    row["kernel_profile"][name] = f"failed: {exc!r}"
            print("  kernel ms per step:", {n: round(p["kernel_us_per_step"] / 1e3, 3) if isinstance(p, dict) and "kernel_us_per_step" in p else p
                                            for n, p in row["kernel_profile"].items()}, flush=True)
        rows.append(row)
        print(f"  point done in {time.perf_counter() - t0:.0f} s", flush=True)
        save()

    if args.generate:
        gen = torch.Generator().manual_seed(0)
        plen = 64 if args.smoke else 2048
        gen_budget = 32 if args.smoke else 512
        prompts = [torch.randint(0, mcfg.vocab_size, (plen,), generator=gen).tolist() for _ in range(8)]
        result["generate"] = {}
        for name in ("full", "lessismore"):
            engine = new_engine(mcfg, weights, method_cfg(name, gen_budget), 8, plen + 256, DEV)
            engine.generate(prompts[:1], max_new_tokens=4, ignore_eos=True)  # capture, compile
            t0 = time.perf_counter()
            engine.generate(prompts, max_new_tokens=16 if args.smoke else 256, ignore_eos=True)
            wall = time.perf_counter() - t0
            s = engine.stats
            result["generate"][name] = {
                "prompts": f"8 x {plen} tokens, {16 if args.smoke else 256} new, budget {gen_budget}", "wall_s": wall,
                "prefill_tokens_per_s": s.prefill_tokens / s.prefill_s, "decode_tokens_per_s": s.decode_tokens / s.decode_s,
            }
            print(f"generate {name}: {json.dumps(result['generate'][name])}", flush=True)
            del engine
            free_memory(DEV)
        save()

    del weights
    free_memory(DEV)
    if not args.no_hf:
        from transformers import AutoConfig, AutoModelForCausalLM

        t0 = time.perf_counter()
        c = mcfg
        hcfg = AutoConfig.for_model("qwen3", vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                                    num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                                    head_dim=c.head_dim, max_position_embeddings=262144, rope_theta=c.rope_theta, tie_word_embeddings=False)
        with torch.device(DEV):
            hf = AutoModelForCausalLM.from_config(hcfg, dtype=DTYPE, attn_implementation="sdpa").eval()
        print(f"HF model in {time.perf_counter() - t0:.1f} s", flush=True)
        for row in rows:
            if row["batch"] > args.hf_max_batch:
                row["hf_generate"] = "not run: DynamicCache concatenates the whole cache every step (2x its memory)"
                continue
            step, estimates = hf_generate_step(hf, row["batch"], row["context"], args.hf_steps)
            row["hf_generate"] = {"ms_per_step": step * 1e3, "tokens_per_s": row["batch"] / step,
                                  "ms_estimates": [e * 1e3 for e in estimates]}
            for m in row["methods"].values():
                m["speedup_over_hf"] = step * 1e3 / m["ms_per_step"]
            print(f"HF generate B={row['batch']} L={row['context']}: {step * 1e3:.1f} ms/step", flush=True)
            free_memory(DEV)
            save()
        del hf
        free_memory(DEV)

    print("\nB      L  method        ms/step   tok/s  floor ms  x floor  vs full  ceiling  vs HF")
    for row in rows:
        for name, m in row["methods"].items():
            print(f"{row['batch']:<3}{row['context']:>7}  {name:<12}{m['ms_per_step']:>9.2f}{m['tokens_per_s']:>8.0f}"
                  f"{m['floor_ms']:>10.2f}{m['over_floor']:>9.2f}{m.get('speedup_over_full', float('nan')):>9.2f}"
                  f"{m.get('ceiling_over_full', float('nan')):>9.2f}{m.get('speedup_over_hf', float('nan')):>7.1f}")
    save()


if __name__ == "__main__":
    main()
