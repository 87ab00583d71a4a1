"""The real workload: ``Engine.generate`` over long generations, per method, against the memory floor.

    PYTHONPATH=src python3 benchmarks/long_generation.py --batches 8 --new-tokens 16384 --modes sampled \
        --methods full,lessismore,tidaldecode,quest --deadline-s 540 --out long-generation-b8.json
    PYTHONPATH=src python3 benchmarks/long_generation.py --profile --methods full,lessismore,tidaldecode,quest \
        --out long-generation-profile.json

Qwen3-8B shape, random bf16 weights drawn once on the GPU and shared by every engine. For each batch B,
new-token count N, method (and budget K) a fresh engine is built with max_len = prompt + N (the
previous one freed first); for each mode (sampled: T=0.6, top-p 0.95; greedy) it runs two short
warm-up generations (compiling kernels, capturing the step's CUDA graph, and timing a few steps to
predict the run), then ``generate(prompts, max_new_tokens=N, ignore_eos=True)`` over B prompts of
random token ids. Figures come from ``engine.stats``: tokens/s = decode tokens / decode seconds, ms
per step = decode seconds / decode steps (host looks every ``sync_every`` steps included: this is the
real loop). The floor of the run is the sum over its steps of the bytes each step must read at its
own context (``common.Floor``; the context grows by one token per step) over the copy bandwidth
measured at the start of the same run; x floor = mean step / mean floor step; vs full = full's ms per
step / this one's at the same (B, N, mode). A table is printed per (B, N, mode); the JSON is written
after every run, so a run cut short keeps what it finished. ``--deadline-s`` skips a run whose
predicted time would end past that many seconds from the start.

``--profile`` (instead of the table): one short sampled generation per method (B=8, 1024 new tokens
by default): (1) on an eager engine (cuda_graphs=False, so every kernel is its own profiler event;
PDL off, or a kernel's time would include its wait for the one before) the per-kernel GPU time of
the decode steps, top kernels with total and per-step microseconds, kernel groups, and the GPU's
busy share and idle gaps; (2) the graphs-on step time of the same generation,
sampled and greedy (their difference: the sampling's cost per step), with no profiler; (3) the same
graphs-on generation under the profiler: the GPU's busy share vs the host in the real loop (CUPTI
reports the kernels of graph replays too; if it did not, the eager kernel time over the graphs-on
step time is the estimate given). Profiled generations are cut to about --profile-max-kernels kernel
events (the profiler's buffers are finite); the count used is recorded.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
import traceback

T_START = time.perf_counter()  # --deadline-s counts from here: torch's import included

import torch  # noqa: E402

from common import (DTYPE, SMOKE_MODEL, new_engine, Floor, bandwidth_and_weights, cfg_summary, device_events,  # noqa: E402
                    environment, free_memory, kernel_summary, method_cfg, print_kernel_table, sync, write_json)
from lessismore.engine import Engine, ModelConfig  # noqa: E402
from lessismore.ops import pdl  # noqa: E402

DEV = "cuda"  # --smoke: "cpu"
GIB = 2**30


# ---- inputs ----------------------------------------------------------------------------------------


def parse_ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    return out


def parse_prompt_len(text: str) -> tuple[int, int]:
    """"256" or "256-1024" (each prompt's length drawn uniformly from the range)."""
    lo, _, hi = text.partition("-")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise SystemExit(f"--prompt-len: expected N or A-B with 1 <= A <= B, got {text!r}")
    return lo, hi


def make_prompts(batch: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    """Random token ids; the same prompts for every method at a given batch size."""
    rng = random.Random(seed * 1000 + batch)
    gen = torch.Generator().manual_seed(seed * 1000 + batch)
    sizes = [rng.randint(*lengths) for _ in range(batch)]
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in sizes]


def sampling_of(mode: str, args) -> dict:
    if mode == "sampled":
        return {"temperature": args.temperature, "top_p": args.top_p}
    if mode == "greedy":
        return {"temperature": 0.0}
    raise SystemExit(f"--modes: unknown mode {mode!r} (sampled, greedy)")


def cache_bytes(mcfg: ModelConfig, batch: int, max_len: int) -> int:
    return mcfg.num_layers * batch * max_len * mcfg.kv_bytes_per_token(2)


def free_bytes() -> int:
    if DEV == "cuda":
        return torch.cuda.mem_get_info()[0]
    return 1 << 62


# ---- one generation --------------------------------------------------------------------------------


def stats_dict(s) -> dict:
    return {"prefill_tokens": s.prefill_tokens, "prefill_s": s.prefill_s, "decode_steps": s.decode_steps,
            "decode_tokens": s.decode_tokens, "decode_s": s.decode_s,
            "bucket_steps": {str(k): v for k, v in s.bucket_steps.items()}}


def generate(engine: Engine, prompts, new: int, sampling: dict, seed: int = 0):
    """(results, wall seconds, stats dict) of one generation of ``new`` tokens per prompt."""
    sync(DEV)
    t0 = time.perf_counter()
    results = engine.generate(prompts, max_new_tokens=new, ignore_eos=True, seed=seed, **sampling)
    sync(DEV)
    return results, time.perf_counter() - t0, stats_dict(engine.stats)


def figures(stats: dict, floor: Floor, prompt_lens: list[int], bw: float) -> dict:
    """tokens/s, ms per step and the floor over the run from a generation's stats."""
    steps = max(1, stats["decode_steps"])
    decode_s = max(stats["decode_s"], 1e-12)
    # Step j of row i attends over prompt_i + 1 + j tokens (the first new token came from the prefill).
    floor_s = floor.run_bytes([n + 1 for n in prompt_lens], stats["decode_steps"]) / bw
    ms = decode_s / steps * 1e3
    floor_ms = floor_s / steps * 1e3
    return {"tokens_per_s": stats["decode_tokens"] / decode_s, "ms_per_step": ms, "floor_s": floor_s,
            "floor_ms_per_step": floor_ms, "x_floor": ms / floor_ms if floor_ms > 0 else None,
            "rows_active_every_step": stats["decode_tokens"] == len(prompt_lens) * stats["decode_steps"]}


def predict_s(warm: dict, floor: Floor, prompt_lens: list[int], new: int, bw: float) -> float:
    """Seconds the full run should take: the warm-up's step time at the start of the context, plus
    the bytes the context adds later on at 85% of the copy bandwidth, plus a prefill."""
    warm_steps = max(1, warm["decode_steps"])
    step_s = warm["decode_s"] / warm_steps
    firsts = [n + 1 for n in prompt_lens]
    steps = new - 1
    start_bytes = floor.run_bytes(firsts, warm_steps) / warm_steps
    growth = max(0.0, floor.run_bytes(firsts, steps) - steps * start_bytes)
    return steps * step_s + growth / (0.85 * bw) + warm["prefill_s"]


def kv_stats(engine: Engine):
    try:
        return engine.kv_stats()
    except Exception as exc:  # noqa: BLE001  (informational)
        return f"failed: {exc!r}"


# ---- the table -------------------------------------------------------------------------------------


def attach_ratios(points: list[dict], reference: list[dict] = ()) -> None:
    """vs full (speedup), ceiling vs full (floor ratio) and, for sampled runs, the sampling's cost per
    step (sampled - greedy) wherever the partner run exists. Full's runs come from this run, else from
    ``reference`` (the points of an earlier run's JSON, --full-from)."""
    done, full_at, ours = {}, {}, {id(q) for q in points}
    for p in list(reference) + points:  # this run's full wins over the reference's
        if p.get("status") == "ok":
            key = (p["batch"], p["new_tokens"], p["mode"])
            if id(p) in ours:
                done[key + (p["method"], p["budget"])] = p
            if p["method"] == "full":
                full_at[key] = p
    for p in points:
        if p.get("status") != "ok":
            continue
        full = full_at.get((p["batch"], p["new_tokens"], p["mode"]))
        if full is not None:
            p["speedup_vs_full"] = full["ms_per_step"] / p["ms_per_step"]
            p["ceiling_vs_full"] = full["floor_ms_per_step"] / p["floor_ms_per_step"]
            p["full_from"] = "this run" if id(full) in ours else "--full-from"
        if p["mode"] == "sampled":
            greedy = done.get((p["batch"], p["new_tokens"], "greedy", p["method"], p["budget"]))
            if greedy is not None:
                p["sampling_ms_per_step"] = p["ms_per_step"] - greedy["ms_per_step"]


def print_table(points: list[dict], batch: int, new: int, mode: str, bw: float, args) -> None:
    rows = [p for p in points if (p["batch"], p["new_tokens"], p["mode"]) == (batch, new, mode)]
    if not rows:
        return
    how = f"T={args.temperature}, top-p {args.top_p}" if mode == "sampled" else "argmax"
    print(f"\n== B={batch}, {new} new tokens, {mode} ({how}); prompts {args.prompt_len} tokens; "
          f"floor at {bw / 1e12:.2f} TB/s ==")
    print(f"{'method':<12}{'K':>6}{'tok/s':>9}{'ms/step':>9}{'floor ms':>10}{'x floor':>9}{'vs full':>9}"
          f"{'ceiling':>9}{'sample ms':>10}{'wall s':>8}  status")
    for p in rows:
        def f(key, fmt):
            value = p.get(key)
            return format(value, fmt) if isinstance(value, (int, float)) else format("-", ">" + fmt.split(".")[0].lstrip(">"))
        print(f"{p['method']:<12}{str(p['budget'] or '-'):>6}{f('tokens_per_s', '9.0f')}{f('ms_per_step', '9.2f')}"
              f"{f('floor_ms_per_step', '10.2f')}{f('x_floor', '9.2f')}{f('speedup_vs_full', '9.2f')}"
              f"{f('ceiling_vs_full', '9.2f')}{f('sampling_ms_per_step', '10.3f')}{f('wall_s', '8.0f')}  {p.get('status')}")
    print(flush=True)


# ---- the workload ----------------------------------------------------------------------------------


def runs_of(args) -> list[tuple[str, int | None]]:
    out = []
    for method in args.methods.split(","):
        if method == "full":
            out.append(("full", None))
        else:
            out.extend((method, k) for k in parse_ints(args.budgets))
    return out


def extra_settings(args) -> dict:
    return {"page_size": args.quest_page_size} if args.quest_page_size else {}


def run_table(args, mcfg, weights, bw, result, save, t_start) -> None:
    points = result["points"]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    lengths = parse_prompt_len(args.prompt_len)
    for batch in parse_ints(args.batches):
        prompts = make_prompts(batch, lengths, mcfg.vocab_size, args.seed)
        prompt_lens = [len(p) for p in prompts]
        for new in parse_ints(args.new_tokens):
            max_len = max(prompt_lens) + new
            base = {"batch": batch, "new_tokens": new, "max_len": max_len,
                    "prompt_tokens": {"min": min(prompt_lens), "max": max(prompt_lens), "mean": sum(prompt_lens) / batch}}
            for method, budget in runs_of(args):
                cfg = method_cfg(method, budget, **extra_settings(args))
                floor = Floor.of(mcfg, cfg)
                records = [dict(base, method=method, budget=budget, mode=mode, config=cfg_summary(cfg)) for mode in modes]
                elapsed = time.perf_counter() - t_start
                free_memory(DEV)
                need, free = cache_bytes(mcfg, batch, max_len), free_bytes()
                if need + args.headroom_gib * GIB > free:
                    status = (f"skipped: KV cache {need / GIB:.1f} GiB + {args.headroom_gib} GiB headroom "
                              f"> {free / GIB:.1f} GiB free")
                elif args.deadline_s and elapsed > args.deadline_s:
                    status = f"skipped: past the deadline ({elapsed:.0f} s > {args.deadline_s} s)"
                else:
                    status = None
                if status is not None:
                    for r in records:
                        r["status"] = status
                        points.append(r)
                    print(f"B={batch} new={new} {method} K={budget}: {status}", flush=True)
                    save()
                    continue
                engine = None
                try:
                    engine = new_engine(mcfg, weights, cfg, batch, max_len, DEV)
                    result.setdefault("engine", {"sync_every": engine.sync_every, "cuda_graphs": engine.use_graphs})
                    for r in records:
                        points.append(r)
                        run_one(engine, r, prompts, prompt_lens, floor, bw, args, t_start)
                        attach_ratios(points, args.reference)
                        save()
                except Exception as exc:  # noqa: BLE001  (one failed run must not lose the others)
                    if args.smoke:
                        raise
                    for r in records:
                        if "status" not in r:
                            r["status"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
                            r["traceback"] = traceback.format_exc()[-2000:]
                        if not any(r is q for q in points):
                            points.append(r)
                    print(f"B={batch} new={new} {method} K={budget}: failed: {exc!r}", flush=True)
                    save()
                finally:
                    del engine
                    free_memory(DEV)
            for mode in modes:
                print_table(points, batch, new, mode, bw, args)


def run_one(engine: Engine, r: dict, prompts, prompt_lens, floor: Floor, bw: float, args, t_start: float) -> None:
    """Warm up, predict, and (deadline permitting) time one generation; fills record ``r``."""
    new, sampling = r["new_tokens"], sampling_of(r["mode"], args)
    label = f"B={r['batch']} new={new} {r['mode']} {r['method']} K={r['budget']}"
    try:
        t0 = time.perf_counter()
        generate(engine, prompts, min(new, 4), sampling)  # compile, capture this mode's graph
        _, _, warm = generate(engine, prompts, min(new, args.warm_tokens + 1), sampling)
        r["warmup_s"] = time.perf_counter() - t0
        r["warm_ms_per_step"] = warm["decode_s"] / max(1, warm["decode_steps"]) * 1e3
        r["predicted_s"] = predict_s(warm, floor, prompt_lens, new, bw)
        elapsed = time.perf_counter() - t_start
        if args.deadline_s and elapsed + r["predicted_s"] > args.deadline_s:
            r["status"] = (f"skipped: predicted {r['predicted_s']:.0f} s would end at {elapsed + r['predicted_s']:.0f} s, "
                           f"past the deadline {args.deadline_s} s")
            print(f"{label}: {r['status']} (warm-up {r['warm_ms_per_step']:.2f} ms/step)", flush=True)
            return
        print(f"{label}: warm-up {r['warm_ms_per_step']:.2f} ms/step, predicted {r['predicted_s']:.0f} s "
              f"(at {elapsed:.0f} s)", flush=True)
        results, wall, stats = generate(engine, prompts, new, sampling, seed=args.seed)
        r["wall_s"] = wall
        r["stats"] = stats
        r.update(figures(stats, floor, prompt_lens, bw))
        r["lengths_ok"] = all(len(x.token_ids) == new for x in results)
        r["kv_stats"] = kv_stats(engine)
        r["status"] = "ok"
        print(f"{label}: {r['tokens_per_s']:.0f} tok/s, {r['ms_per_step']:.2f} ms/step, floor {r['floor_ms_per_step']:.2f} ms, "
              f"x{r['x_floor']:.2f}, wall {wall:.0f} s (predicted {r['predicted_s']:.0f} s)", flush=True)
    except Exception as exc:  # noqa: BLE001
        if args.smoke:
            raise
        r["status"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        r["traceback"] = traceback.format_exc()[-2000:]
        print(f"{label}: {r['status']}", flush=True)
        if isinstance(exc, torch.OutOfMemoryError):
            raise  # the engine's buffers may be in any state: build the next one afresh


# ---- the profile -----------------------------------------------------------------------------------


def profiled_generation(engine: Engine, prompts, new: int, sampling: dict) -> dict:
    """One generation under the torch profiler; the decode steps' kernel summary."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = DEV == "cuda"
    activity = ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU
    sync(DEV)
    with profile(activities=[activity]) as prof:
        t0 = time.time_ns()
        engine.generate(prompts, max_new_tokens=new, ignore_eos=True, **sampling)
        sync(DEV)
        t1 = time.time_ns()
    stats = stats_dict(engine.stats)
    events = device_events(prof, on_gpu)
    prefill_ns = int(stats["prefill_s"] * 1e9)
    window, aligned = (t0 + prefill_ns, t1), True
    inside = sum(1 for e in events if t0 - 10**6 <= e[1] <= t1 + 10**6)
    if events and inside < 0.9 * len(events):  # the profiler's clock is not the host's: use the events' span
        lo, hi = min(e[1] for e in events), max(e[2] for e in events)
        window, aligned = (lo + prefill_ns, hi + 1), False
    return {
        "new_tokens": new, "wall_s": (t1 - t0) / 1e9, "stats": stats,
        "ms_per_step_under_profiler": stats["decode_s"] / max(1, stats["decode_steps"]) * 1e3,
        "clock_aligned": aligned,
        "decode": kernel_summary(events, window, stats["decode_steps"]),
    }


def profile_engine(engine: Engine, prompts, new: int, sampling: dict, args) -> dict:
    """A short probe to count kernels per step, then a generation cut to about --profile-max-kernels."""
    generate(engine, prompts, min(new, 4), sampling)  # compile, capture
    probe = profiled_generation(engine, prompts, min(new, 17), sampling)
    per_step = max(1.0, probe["decode"].get("launches_per_step", 1.0))
    n = min(new, max(33, int(args.profile_max_kernels / per_step) + 1))
    out = profiled_generation(engine, prompts, n, sampling)
    out["probe_kernels_per_step"] = per_step
    return out


def run_profile(args, mcfg, weights, bw, result, save, t_start) -> None:
    batch, new = args.profile_batch, args.profile_new_tokens
    prompts = make_prompts(batch, parse_prompt_len(args.prompt_len), mcfg.vocab_size, args.seed)
    prompt_lens = [len(p) for p in prompts]
    max_len = max(prompt_lens) + new
    budget = parse_ints(args.budgets)[0]
    sampled = sampling_of("sampled", args)
    out = result["profile"] = {"batch": batch, "new_tokens": new, "budget": budget, "prompt_tokens": prompt_lens,
                               "sampling": sampled, "methods": {}}
    # Eager profiles and graphs-on timings of every method first, then the graphs-on profiles (the
    # profiler on graph replays is the riskiest part: whatever it does, the rest is already saved).
    passes = [
        [("eager", False, lambda engine, floor: profile_engine(engine, prompts, new, sampled, args)),
         ("graphs", None, lambda engine, floor: timed_modes(engine, prompts, prompt_lens, new, floor, bw, args))],
        [("graphs_profiled", None, lambda engine, floor: profile_engine(engine, prompts, new, sampled, args))],
    ]
    methods_run = args.methods.split(",")
    for stages in passes:
        for method in methods_run:
            elapsed = time.perf_counter() - t_start
            if args.deadline_s and elapsed > args.deadline_s:
                for name, _, _ in stages:
                    out["methods"].setdefault(method, {})[name] = f"skipped: past the deadline ({elapsed:.0f} s)"
                save()
                continue
            cfg = method_cfg(method, budget, **extra_settings(args))
            floor = Floor.of(mcfg, cfg)
            entry = out["methods"].setdefault(method, {"config": cfg_summary(cfg)})
            print(f"\n== profile {method} (B={batch}, {new} new tokens, sampled): "
                  f"{', '.join(name for name, _, _ in stages)} ==", flush=True)
            for name, graphs, fn in stages:
                engine = None
                try:
                    # The eager profile runs without PDL: an early-launched kernel is recorded from its
                    # launch, its wait for the kernel before included.
                    with pdl.disabled() if graphs is False else contextlib.nullcontext():
                        engine = new_engine(mcfg, weights, cfg, batch, max_len, DEV, cuda_graphs=graphs)
                        entry[name] = fn(engine, floor)
                except Exception as exc:  # noqa: BLE001  (a diagnostic: keep going)
                    if args.smoke:
                        raise
                    entry[name] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
                    print(f"  {name}: {entry[name]}", flush=True)
                finally:
                    del engine
                    free_memory(DEV)
                report_stage(entry, name)
                save()
            eager, graphs = entry.get("eager"), entry.get("graphs")
            if "gpu_share_estimate" not in entry and isinstance(eager, dict) and isinstance(graphs, dict) \
                    and "kernel_us_per_step" in eager["decode"]:
                step_us = graphs["sampled"]["ms_per_step"] * 1e3
                entry["gpu_share_estimate"] = eager["decode"]["kernel_us_per_step"] / step_us
                entry["host_or_idle_us_per_step_estimate"] = step_us - eager["decode"]["kernel_us_per_step"]
                print(f"  graphs-on step {step_us:.0f} us vs {eager['decode']['kernel_us_per_step']:.0f} us of kernels "
                      f"(eager): GPU busy ~{entry['gpu_share_estimate'] * 100:.0f}%", flush=True)
            save()


def timed_modes(engine: Engine, prompts, prompt_lens, new: int, floor: Floor, bw: float, args) -> dict:
    """Graphs-on step time of the generation, sampled and greedy, no profiler."""
    out = {}
    for mode in ("sampled", "greedy"):
        sampling = sampling_of(mode, args)
        generate(engine, prompts, min(new, 4), sampling)  # capture
        results, wall, stats = generate(engine, prompts, new, sampling, seed=args.seed)
        out[mode] = dict(figures(stats, floor, prompt_lens, bw), wall_s=wall, stats=stats,
                         lengths_ok=all(len(x.token_ids) == new for x in results))
    out["sampling_ms_per_step"] = out["sampled"]["ms_per_step"] - out["greedy"]["ms_per_step"]
    return out


def report_stage(entry: dict, name: str) -> None:
    value = entry.get(name)
    if not isinstance(value, dict):
        return
    if name == "graphs":
        s, g = value["sampled"], value["greedy"]
        print(f"  graphs on: sampled {s['ms_per_step']:.3f} ms/step ({s['tokens_per_s']:.0f} tok/s), greedy "
              f"{g['ms_per_step']:.3f} ms/step: sampling costs {value['sampling_ms_per_step']:.3f} ms/step; "
              f"floor {s['floor_ms_per_step']:.3f} ms, x{s['x_floor']:.2f}", flush=True)
        return
    print(f"  {name}: {value['new_tokens']} new tokens profiled ({value['probe_kernels_per_step']:.0f} kernels/step), "
          f"{value['ms_per_step_under_profiler']:.2f} ms/step under the profiler", flush=True)
    print_kernel_table(value["decode"], indent="    ")


# ---- main ------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", default="8192,16384,32768", help="comma list; 16k = 16384")
    ap.add_argument("--methods", default="full,lessismore,tidaldecode,quest")
    ap.add_argument("--budgets", default="2048", help="K for the sparse methods, e.g. 2048,4096")
    ap.add_argument("--modes", default="sampled,greedy")
    ap.add_argument("--prompt-len", default="256", help="N, or A-B for lengths drawn per prompt")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--quest-page-size", type=int, default=None, help="Quest's page size (default: the method's, 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warm-tokens", type=int, default=64, help="steps of the warm-up that predicts a run")
    ap.add_argument("--deadline-s", type=float, default=None, help="skip runs predicted to end later than this (s from start)")
    ap.add_argument("--headroom-gib", type=float, default=6.0, help="free memory beyond the KV cache a point needs")
    ap.add_argument("--profile", action="store_true", help="profile instead of the table (see above)")
    ap.add_argument("--profile-batch", type=int, default=8)
    ap.add_argument("--profile-new-tokens", type=int, default=1024)
    ap.add_argument("--profile-max-kernels", type=int, default=200_000)
    ap.add_argument("--full-from", default=None, help="an earlier run's JSON whose full-attention runs give "
                    "the vs-full ratios where this run does not run full")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model: checks the script, measures nothing")
    args = ap.parse_args()
    args.reference = []
    if args.full_from:
        with open(args.full_from) as f:
            data = json.load(f)  # a run's JSON, or one of several runs ("runs": [run, ...])
        points = data.get("points", []) + [p for run in data.get("runs", []) for p in run.get("points", [])]
        args.reference = [p for p in points if p.get("method") == "full"]
    t_start = T_START
    global DEV
    if args.smoke:
        DEV = "cpu"
        torch.set_num_threads(1)
        for name, default, tiny in (("batches", "1,8,32", "1,3"), ("new_tokens", "8192,16384,32768", "24"),
                                    ("budgets", "2048", "16"), ("prompt_len", "256", "20-40"), ("warm_tokens", 64, 6)):
            if getattr(args, name) == default:  # defaults shrink to the tiny model; given values stay
                setattr(args, name, tiny)
        args.profile_batch, args.profile_new_tokens, args.profile_max_kernels = 2, 24, 20_000
        args.headroom_gib = 0.0
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke to check the script on the CPU")
    mcfg = SMOKE_MODEL if args.smoke else ModelConfig.qwen3_8b()
    if args.smoke:  # the floor model's closed-form run sum against the loop
        for name in ("full", "lessismore", "tidaldecode", "quest", "streaming"):
            floor = Floor.of(mcfg, method_cfg(name, 16))
            for firsts, steps in (([1], 40), ([21, 21, 30], 7), ([5, 16, 17], 33), ([100], 0)):
                loop = steps * floor.weight_bytes + sum(floor.kv_bytes(c + j) for c in firsts for j in range(steps))
                assert floor.run_bytes(firsts, steps) == loop, (name, firsts, steps)

    result = environment(DEV)
    result.update({
        "model": f"{'tiny' if args.smoke else 'Qwen3-8B'} shape, random {str(DTYPE).split('.')[-1]} weights",
        "settings": {"temperature": args.temperature, "top_p": args.top_p, "prompt_len": args.prompt_len,
                     "seed": args.seed, "ignore_eos": True, "warm_tokens": args.warm_tokens,
                     "deadline_s": args.deadline_s, "full_from": args.full_from},
        "floor_model": "every weight but the embedding table + K/V rows read (full and selection layers: the whole "
                       "context; sparse layers: min(K, context), x Hq/Hkv for per-head methods; Quest: whole pages "
                       "and every page's key min/max), summed over the run's steps at their own context, over the "
                       "copy bandwidth",
        "points": [],
    })

    def save():
        write_json(args.out, result)

    bw, weights = bandwidth_and_weights(mcfg, result, DEV, args.smoke)
    save()
    if args.profile:
        run_profile(args, mcfg, weights, bw, result, save, t_start)
    else:
        run_table(args, mcfg, weights, bw, result, save, t_start)
        if len(parse_ints(args.batches)) * len(parse_ints(args.new_tokens)) > 1:
            print("\n==== all tables ====")
            modes = [m.strip() for m in args.modes.split(",") if m.strip()]
            for batch in parse_ints(args.batches):
                for new in parse_ints(args.new_tokens):
                    for mode in modes:
                        print_table(result["points"], batch, new, mode, bw, args)
    result["total_s"] = time.perf_counter() - t_start
    save()
    print(f"done in {result['total_s']:.0f} s" + (f"; wrote {args.out}" if args.out else ""), flush=True)


if __name__ == "__main__":
    main()
