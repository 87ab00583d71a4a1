"""End-to-end decode speed of the engine on a GPU (issue 6), against HF ``generate`` and the memory floor.

    PYTHONPATH=src python3 benchmarks/e2e.py --check --out benchmarks/results/e2e-h200.json

Qwen3-8B shape with random bf16 weights drawn on the GPU. At each (batch, context) point the cache is
filled with random K/V to the context length (decode speed does not depend on the values), then each
method's decode step, captured as a CUDA graph, is replayed back to back and timed with CUDA events
(median over repetitions of the mean step). The floor is the bytes a step must read (every weight but
the embedding table, plus the K/V rows the method reads) over the device-to-device copy bandwidth
measured here (bytes read + written). HF ``generate`` (sdpa, DynamicCache filled to the context) is
the outside peer, timed over a few steps. ``--check`` first runs correctness checks on the GPU paths
(fused kernels, fused selections, graphs, batching, a tiny HF model) and records them.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import tempfile
import time

import torch

from lessismore import methods
from lessismore.config import SparseConfig
from lessismore.engine import Engine, ModelConfig, attention, kernels
from lessismore.engine import model as model_module
from lessismore.engine.model import random_weights
from lessismore.methods import LayerRole

DTYPE = torch.bfloat16
SMOKE_MODEL = ModelConfig(model_type="qwen3", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=14,
                          num_heads=8, num_kv_heads=2, head_dim=64, qk_norm=True)
DEV = "cuda"  # --smoke: "cpu", a tiny model, to check the script itself without a GPU


class Timer:
    """CUDA events on the GPU, the host clock on the CPU."""

    def __enter__(self):
        if DEV == "cuda":
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if DEV == "cuda":
            self.b.record()
            self.b.synchronize()
            self.s = self.a.elapsed_time(self.b) / 1e3
        else:
            self.s = time.perf_counter() - self.t0


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(gib: float = 4.0, reps: int = 10) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = []
    for _ in range(reps + 2):
        with Timer() as t:
            dst.copy_(src)
        seconds.append(t.s)
    del src, dst
    return 2 * n * 2 / statistics.median(seconds[2:])


def sparse_cfg(method: str, budget: int) -> SparseConfig | None:
    if method == "full":
        return None
    if method == "tidaldecode":
        return SparseConfig(method="tidaldecode", budget=budget, sink_tokens=0, selection_layers=(2, 12))
    return SparseConfig(method=method, budget=budget, recent_ratio=0.25, selection_layers=(2, 12))


def step_bytes(mcfg: ModelConfig, cfg: SparseConfig | None, batch: int, context: int) -> int:
    """Bytes one decode step must read: weights (not the embedding table) plus the K/V rows."""
    row = mcfg.kv_bytes_per_token()
    group = mcfg.num_heads // mcfg.num_kv_heads
    if cfg is None:
        rows = mcfg.num_layers * context
    else:
        m = methods.get(cfg.method)
        roles = m.layer_roles(cfg.resolve(mcfg.model_type, mcfg.num_layers, mcfg.hidden_size), mcfg.num_layers)
        dense = sum(r in (LayerRole.FULL, LayerRole.SELECT_DENSE) for r in roles)
        sparse_rows = min(cfg.budget, context) * (group if m.per_head else 1)
        rows = dense * context + (len(roles) - dense) * sparse_rows
    return mcfg.weight_bytes(2, read_per_step=True) + batch * rows * row


def fill_decode_state(engine: Engine, batch: int, context: int, seed: int = 0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    for k, v in zip(engine.k_cache, engine.v_cache):
        k[:batch, :, :context].normal_(generator=gen)
        v[:batch, :, :context].normal_(generator=gen)
    reset_decode_state(engine, batch, context)


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
    sync()
    out = []
    for _ in range(reps):
        reset_decode_state(engine, batch, context)
        with Timer() as t:
            for _ in range(steps):
                engine.step(batch)
        out.append(t.s / steps)
    return out


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
        sync()
        t0 = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
        sync()
        assert out.shape[1] == context + 1 + n
        return time.perf_counter() - t0

    run(2)  # warm-up
    estimates = []
    for _ in range(reps):
        one, many = run(1), run(1 + steps)
        estimates.append((many - one) / steps)
    del cache
    return statistics.median(estimates), estimates


def run_sweep(mcfg, weights, points, args) -> dict:
    """Full-attention step time at every point for each dense-split setting (and, at batch 1, each
    batch-1 projection); sets the module constants to the best (lowest summed time relative to the
    kernel's own split choice)."""
    splits = [None, 4, 8, 16]
    table = {}
    for batch, context in points:
        engine = Engine(mcfg, weights=weights, device=DEV, dtype=DTYPE, max_batch=batch, max_len=context + 16 * (args.steps + 8))
        fill_decode_state(engine, batch, context)
        row = table[f"{batch}x{context}"] = {}
        for mult in splits:
            attention.DENSE_PROGRAMS_PER_SM = mult
            engine.set_method(None)
            row[f"splits_{mult}"] = statistics.median(time_steps(engine, batch, context, args.steps // 2, 3)) * 1e3
        attention.DENSE_PROGRAMS_PER_SM = None
        if batch == 1:
            model_module.M1_LINEAR = "mv"
            engine.set_method(None)
            row["linear_mv"] = statistics.median(time_steps(engine, batch, context, args.steps // 2, 3)) * 1e3
            model_module.M1_LINEAR = "linear"
        # For information: the other cuBLAS back end for every projection (not adopted automatically).
        blas = torch.backends.cuda.preferred_blas_library()
        other = torch._C._BlasBackend.Cublaslt if blas == torch._C._BlasBackend.Cublas else torch._C._BlasBackend.Cublas
        try:
            torch.backends.cuda.preferred_blas_library(other)
            engine.set_method(None)
            row[f"blas_{str(other).split('.')[-1].lower()}"] = statistics.median(time_steps(engine, batch, context, args.steps // 2, 3)) * 1e3
        except Exception as exc:
            row["blas_other"] = f"failed: {exc!r}"
        finally:
            torch.backends.cuda.preferred_blas_library(blas)
        row["blas_default"] = str(blas)
        print("sweep", batch, context, row, flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    score = {m: sum(r[f"splits_{m}"] / r["splits_None"] for r in table.values()) for m in splits}
    attention.DENSE_PROGRAMS_PER_SM = min(splits, key=lambda m: score[m])
    ones = [r for r in table.values() if "linear_mv" in r]
    if ones and sum(r["linear_mv"] / r["splits_None"] for r in ones) < 0.99 * len(ones):
        model_module.M1_LINEAR = "mv"
    return {"step_ms_full": table, "relative_sum": {str(m): v for m, v in score.items()},
            "chosen": {"DENSE_PROGRAMS_PER_SM": attention.DENSE_PROGRAMS_PER_SM, "M1_LINEAR": model_module.M1_LINEAR}}


def profile_step(engine: Engine, cfg, batch: int, context: int, top: int = 12) -> dict:
    """GPU time of one decode step's kernels, from the torch profiler: the total and the largest."""
    from torch.profiler import ProfilerActivity, profile

    engine.set_method(cfg)
    reset_decode_state(engine, batch, context)
    graphs, engine.use_graphs = engine.use_graphs, False  # eager: the same kernels, each one recorded
    try:
        engine.step(batch)
        sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.step(batch)
            sync()
    finally:
        engine.use_graphs = graphs
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    events.sort(key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events)
    return {"kernel_ms": total / 1e3, "launches": sum(e.count for e in events),
            "top": [[e.key[:60], e.count, round(getattr(e, key) / 1e3, 4)] for e in events[:top]]}


# ---- correctness on the GPU ---------------------------------------------------------------------


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def run_checks() -> dict:
    out = {}
    torch.manual_seed(0)
    dev = DEV
    # 1. fused elementwise kernels vs their PyTorch references, bf16
    x, res, w = torch.randn(5, 4096, device=dev, dtype=DTYPE), torch.randn(5, 4096, device=dev, dtype=DTYPE), torch.randn(4096, device=dev, dtype=DTYPE)
    r1, r2 = res.clone(), res.clone()
    out["add_rmsnorm_rel_err"] = rel_err(kernels.add_rmsnorm(x, r1, w, 1e-6), kernels.add_rmsnorm(x, r2, w, 1e-6, impl="torch"))
    gu = torch.randn(5, 2 * 12288, device=dev, dtype=DTYPE)
    out["silu_mul_rel_err"] = rel_err(kernels.silu_mul(gu), kernels.silu_mul(gu, impl="torch"))
    qkv = torch.randn(5, 48 * 128, device=dev, dtype=DTYPE)
    slots = torch.tensor([3, 0, 1, 2, 4], device=dev, dtype=torch.int32)
    pos = torch.tensor([7, 0, 99, 5, 63], device=dev, dtype=torch.int32)
    ang = torch.arange(100.0, device=dev)[:, None] * torch.rand(64, device=dev)
    qk = torch.randn(2, 128, device=dev, dtype=DTYPE)
    caches = [torch.randn(5, 8, 100, 128, device=dev, dtype=DTYPE) for _ in range(2)]
    c1, c2 = [c.clone() for c in caches], [c.clone() for c in caches]
    q1 = kernels.qk_norm_rope_store(qkv, 32, 8, 128, slots, pos, ang.cos(), ang.sin(), *c1, qk, 1e-6)
    q2 = kernels.qk_norm_rope_store(qkv, 32, 8, 128, slots, pos, ang.cos(), ang.sin(), *c2, qk, 1e-6, impl="torch")
    out["qk_norm_rope_store_rel_err"] = max(rel_err(q1, q2), rel_err(c1[0], c2[0]), rel_err(c1[1], c2[1]))

    # 2. a tiny Qwen3 from transformers (fp32) against the engine on the GPU: greedy tokens
    from transformers import AutoConfig, AutoModelForCausalLM

    hcfg = AutoConfig.for_model("qwen3", vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                                num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                                tie_word_embeddings=False)
    hf = AutoModelForCausalLM.from_config(hcfg, attn_implementation="sdpa").to(dev).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05)
    prompt = torch.randint(0, 1024, (1, 300), device=dev)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=48, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, 300:].tolist()
        eng = Engine(folder, device=dev, dtype=torch.float32, max_batch=4, max_len=512, prefill_chunk=128)
        got = eng.generate([prompt[0].tolist()], max_new_tokens=48, ignore_eos=True)[0].token_ids
        prefix = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref))
        out["tiny_qwen3_fp32_vs_hf_matching_prefix"] = f"{prefix}/{len(ref)}"

        # 3. graphs vs eager, and batch vs alone (bf16, lessismore with a small budget)
        cfg = SparseConfig(method="lessismore", budget=64, sink_tokens=4)
        prompts = [torch.randint(0, 1024, (n,)).tolist() for n in (300, 120, 200, 90, 250, 170)]
        limits = [40, 25, 33, 17, 40, 9]
        graph = Engine(folder, cfg=cfg, device=dev, dtype=DTYPE, max_batch=4, max_len=512, sync_every=8)
        eager = Engine(folder, cfg=cfg, device=dev, dtype=DTYPE, max_batch=4, max_len=512, cuda_graphs=False, sync_every=8)
        a = [r.token_ids for r in graph.generate(prompts, max_new_tokens=limits, ignore_eos=True)]
        b = [r.token_ids for r in eager.generate(prompts, max_new_tokens=limits, ignore_eos=True)]
        out["graph_equals_eager"] = a == b
        alone = [graph.generate([p], max_new_tokens=m, ignore_eos=True)[0].token_ids for p, m in zip(prompts, limits)]
        out["batch_equals_alone"] = f"{sum(x == y for x, y in zip(a, alone))}/{len(prompts)} sequences"
        sampled = [r.token_ids for r in graph.generate(prompts, max_new_tokens=limits, temperature=0.8, top_p=0.9, top_k=40, seed=5, ignore_eos=True)]
        sampled_alone = [graph.generate([p], max_new_tokens=m, temperature=0.8, top_p=0.9, top_k=40, seed=5 + i, ignore_eos=True)[0].token_ids
                         for i, (p, m) in enumerate(zip(prompts, limits))]
        out["sampled_batch_equals_alone"] = f"{sum(x == y for x, y in zip(sampled, sampled_alone))}/{len(prompts)} sequences"

        # 4. fused selection layers vs the core library on the engine's own q/k (fp32)
        for method in ("lessismore", "tidaldecode"):
            cfg = SparseConfig(method=method, budget=64, sink_tokens=0 if method == "tidaldecode" else 4)
            e = Engine(folder, cfg=cfg, device=dev, dtype=torch.float32, max_batch=4, max_len=512)
            seen = []
            e.attention.observers.append(
                lambda layer, role, q, k, v, valid, sel, o: seen.append((q.clone(), k.clone(), valid.clone(), sel))
                if role is LayerRole.SELECT_DENSE else None)
            e.generate(prompts[:4], max_new_tokens=6, ignore_eos=True)
            same = total = 0
            for q, k, valid, sel in seen:
                ref_sel = methods.get(method).select(e.cfg, q, k, valid)
                ours, theirs = sel.indices, ref_sel.indices
                mask = torch.arange(ours.shape[-1], device=dev) < sel.counts.unsqueeze(-1)
                eq = ((ours == theirs) | ~mask).all(-1) & (sel.counts == ref_sel.counts)
                same += int(eq.sum())
                total += eq.numel()
            out[f"{method}_fused_selection_equal_rows"] = f"{same}/{total}"
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return out


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
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--generate", action="store_true", help="also time Engine.generate end to end (8 x 2K prompts)")
    ap.add_argument("--sweep", action="store_true", help="choose the dense split setting and batch-1 projection first")
    ap.add_argument("--profile", action="store_true", help="per-kernel GPU time of one step at every point")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model: checks the script, measures nothing")
    args = ap.parse_args()
    global DEV
    if args.smoke:
        DEV = "cpu"
        args.points, args.steps, args.reps, args.hf_steps = "1x64,2x48", 2, 2, 2
    mcfg = SMOKE_MODEL if args.smoke else ModelConfig.qwen3_8b()

    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
    else:
        device = "cpu (smoke run)"
    result = {
        "command": "PYTHONPATH=src python3 " + " ".join(sys.argv),
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": f"{'tiny' if args.smoke else 'Qwen3-8B'} shape, random bf16 weights",
    }
    try:
        import transformers
        import triton

        result["triton"], result["transformers"] = triton.__version__, transformers.__version__
    except ImportError:
        pass

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    if args.check:
        t0 = time.perf_counter()
        result["checks"] = run_checks()
        print("checks", json.dumps(result["checks"]), f"({time.perf_counter() - t0:.0f} s)", flush=True)
        save()

    bw = copy_bandwidth(0.25 if args.smoke else 4.0)
    result["copy_bandwidth_TBps"] = bw / 1e12
    result["weight_bytes_stored"] = mcfg.weight_bytes(2)
    result["weight_bytes_read_per_step"] = mcfg.weight_bytes(2, read_per_step=True)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; weights {mcfg.weight_bytes(2) / 1e9:.2f} GB stored, "
          f"{mcfg.weight_bytes(2, read_per_step=True) / 1e9:.2f} GB read per step", flush=True)
    t0 = time.perf_counter()
    weights = random_weights(mcfg, DEV, DTYPE, seed=0)
    sync()
    print(f"random weights in {time.perf_counter() - t0:.1f} s", flush=True)

    points = [tuple(int(x) for x in p.split("x")) for p in args.points.split(",")]
    names = args.methods.split(",")
    if args.sweep:
        result["sweep"] = run_sweep(mcfg, weights, points, args)
        save()
    result["settings"] = {"DENSE_PROGRAMS_PER_SM": attention.DENSE_PROGRAMS_PER_SM, "M1_LINEAR": model_module.M1_LINEAR}
    rows = result["points"] = []
    for batch, context in points:
        t0 = time.perf_counter()
        engine = Engine(mcfg, weights=weights, device=DEV, dtype=DTYPE, max_batch=batch,
                        max_len=context + 16 * (args.steps + 8))
        fill_decode_state(engine, batch, context)
        row = {"batch": batch, "context": context, "methods": {}}
        for name in names:
            cfg = sparse_cfg(name, args.budget)
            engine.set_method(cfg)
            times = time_steps(engine, batch, context, args.steps, args.reps)
            step = statistics.median(times)
            floor = step_bytes(mcfg, cfg, batch, context) / bw
            row["methods"][name] = {
                "ms_per_step": step * 1e3, "ms_spread": [min(times) * 1e3, max(times) * 1e3],
                "tokens_per_s": batch / step, "floor_ms": floor * 1e3, "over_floor": step / floor,
            }
            print(f"B={batch} L={context} {name}: {step * 1e3:.2f} ms/step ({batch / step:.0f} tok/s), "
                  f"floor {floor * 1e3:.2f} ms, x{step / floor:.2f}", flush=True)
        if "full" in row["methods"]:
            full = row["methods"]["full"]["ms_per_step"]
            for name, m in row["methods"].items():
                m["speedup_over_full"] = full / m["ms_per_step"]
                m["ceiling_over_full"] = row["methods"]["full"]["floor_ms"] / m["floor_ms"]
        if batch == 1 and context == points[0][1]:
            engine.set_method(None)
            engine.use_graphs = False
            row["full_eager_ms_per_step"] = statistics.median(time_steps(engine, batch, context, 3, 2)) * 1e3
            engine.use_graphs = True
        if args.profile and DEV == "cuda":
            try:
                row["kernel_profile"] = {name: profile_step(engine, sparse_cfg(name, args.budget), batch, context) for name in names}
                print("  kernel ms per step:", {n: round(p["kernel_ms"], 3) for n, p in row["kernel_profile"].items()}, flush=True)
            except Exception as exc:  # a diagnostic only
                row["kernel_profile"] = f"failed: {exc!r}"
        rows.append(row)
        print(f"  point done in {time.perf_counter() - t0:.0f} s", flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        save()

    if args.generate:
        gen = torch.Generator().manual_seed(0)
        plen = 64 if args.smoke else 2048
        prompts = [torch.randint(0, mcfg.vocab_size, (plen,), generator=gen).tolist() for _ in range(8)]
        result["generate"] = {}
        for name in ("full", "lessismore"):
            engine = Engine(mcfg, cfg=sparse_cfg(name, 512), weights=weights, device=DEV, dtype=DTYPE,
                            max_batch=8, max_len=plen + 256)
            engine.generate(prompts[:1], max_new_tokens=4, ignore_eos=True)  # capture, compile
            t0 = time.perf_counter()
            engine.generate(prompts, max_new_tokens=16 if args.smoke else 256, ignore_eos=True)
            wall = time.perf_counter() - t0
            s = engine.stats
            result["generate"][name] = {
                "prompts": "8 x 2048 tokens, 256 new, budget 512", "wall_s": wall,
                "prefill_tokens_per_s": s.prefill_tokens / s.prefill_s, "decode_tokens_per_s": s.decode_tokens / s.decode_s,
            }
            print(f"generate {name}: {json.dumps(result['generate'][name])}", flush=True)
            del engine
            gc.collect()
            torch.cuda.empty_cache()
        save()

    del weights
    gc.collect()
    torch.cuda.empty_cache()
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
            gc.collect()
            torch.cuda.empty_cache()
            save()

    print("\nB      L  method        ms/step   tok/s  floor ms  x floor  vs full  ceiling  vs HF")
    for row in rows:
        for name, m in row["methods"].items():
            print(f"{row['batch']:<3}{row['context']:>7}  {name:<12}{m['ms_per_step']:>9.2f}{m['tokens_per_s']:>8.0f}"
                  f"{m['floor_ms']:>10.2f}{m['over_floor']:>9.2f}{m.get('speedup_over_full', float('nan')):>9.2f}"
                  f"{m.get('ceiling_over_full', float('nan')):>9.2f}{m.get('speedup_over_hf', float('nan')):>7.1f}")
    save()


if __name__ == "__main__":
    main()
