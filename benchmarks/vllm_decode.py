"""Decode throughput of vLLM with and without LESSISMORE, beside the project's own engine (issue 13).

    PYTHONPATH=src:$PYTHONPATH python3 benchmarks/vllm_decode.py --out benchmarks/results/vllm-decode-h200.json
    python3 benchmarks/vllm_decode.py --smoke           # CPU: configs, imports, the engine on a tiny model

Qwen3-8B's shape with dummy weights (vLLM ``load_format="dummy"``, the engine's random weights), bf16.
Systems (``--systems``):

- ``vllm-default``:    vLLM's own backend (FLASH_ATTN, FA3 on the H200), torch.compile and CUDA graphs;
- ``vllm-lessismore``: the LESSISMORE backend (vLLM 0.26: the CUSTOM slot, FlashAttention-based),
                       LessIsMore K=2048, selection layers 2 and 12, same compile and graphs;
- ``engine-full`` / ``engine-lessismore``: ``lessismore.Engine(ModelConfig.qwen3_8b(), cfg=...)``.

Points (``--points B:NEW,...``): B prompts of 256 random tokens, NEW tokens each, sampled (T=0.6,
top-p 0.95), ``ignore_eos``; tokens/s = B * NEW / wall time of the whole generate (the 256-token
prefill is a rounding error). The engine also reports its own decode-only rate. Fixed contexts
(``--contexts C,...`` with ``--context-batches`` and ``--context-new n``): B prompts of C tokens; vLLM's
decode rate is B * n / (time of 1 + n tokens - time of 1 token), the engine's its decode-only rate.

Every system runs in a process of its own (one engine sized for the largest point, all points in a
row; GPU memory is returned when the process ends) and its results are written to ``--out`` as soon as
it finishes, so a call cut short keeps what finished. Rough cost on the H200 per system: 1-2 min to
start (vLLM compiles and captures), then about B=8: 60 s / 8K tokens, B=32: 100 s / 8K tokens (16K: more
than double). Pick points and systems to fit a call (see docs/vllm.md for a split).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if not p or os.path.abspath(p) != HERE]  # no shadowing by benchmarks/*.py

SYSTEMS = ("vllm-default", "vllm-lessismore", "engine-full", "engine-lessismore")
PROMPT_LEN = 256
QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096,
            "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": "bfloat16",
            "bos_token_id": 151643, "eos_token_id": 151645, "use_sliding_window": False}


def sparse_section(args) -> dict:
    """The LESSISMORE settings (vLLM's additional_config section; the engine's SparseConfig)."""
    return {"method": "lessismore", "budget": args.budget, "selection_layers": list(args.selection_layers)}


def parse_points(text: str) -> list[tuple[int, int]]:
    points = []
    for item in filter(None, text.split(",")):
        b, n = item.split(":")
        points.append((int(b), int(n)))
    return points


def prompts(batch: int, length: int, vocab: int, salt: int = 0) -> list[list[int]]:
    """Distinct random-looking prompts (no shared prefix: prefix caching has nothing to reuse)."""
    return [[(i * 7919 + j * 104729 + salt * 15485863) % (vocab - 20) + 10 for j in range(length)] for i in range(batch)]


def sizes(spec: dict) -> tuple[int, int]:
    """(max batch, max length) over the points and fixed contexts."""
    batches = [b for b, _ in spec["points"]] + (list(spec["context_batches"]) if spec["contexts"] else [])
    lengths = [PROMPT_LEN + n for _, n in spec["points"]] + [c + spec["context_new"] + 1 for c in spec["contexts"]]
    return max(batches), max(lengths) + 16


# ---- workers (one process per system) -----------------------------------------------------------------


def vllm_worker(spec: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in-process: the patch below holds
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    import vllm.v1.sample.ops.topk_topp_sampler as sampler_ops  # flashinfer is not staged: vLLM's own sampler

    sampler_ops.flashinfer_sampler_supported = lambda *a, **k: False
    try:
        import vllm.v1.worker.gpu.sample.sampler as sampler_v2

        sampler_v2.flashinfer_sampler_supported = lambda *a, **k: False
    except Exception as exc:  # noqa: BLE001
        print("patch:", exc, flush=True)
    import vllm
    from vllm import LLM, SamplingParams

    from lessismore.integrations import vllm as plugin

    plugin.register()
    folder = tempfile.mkdtemp(prefix="qwen3-8b-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(QWEN3_8B, f)
    max_batch, max_len = sizes(spec)
    lessismore = spec["system"] == "vllm-lessismore"
    t0 = time.perf_counter()
    llm = LLM(model=folder, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, max_model_len=max_len,
              max_num_seqs=max_batch, gpu_memory_utilization=spec["gpu_mem"], seed=0, enable_prefix_caching=False,
              enforce_eager=spec["eager"],
              attention_backend="CUSTOM" if lessismore else None,
              additional_config={"lessismore": spec["section"]} if lessismore else {})
    out = {"vllm": vllm.__version__, "init_s": time.perf_counter() - t0, "max_model_len": max_len,
           "max_num_seqs": max_batch, "points": [], "contexts": []}
    vocab = QWEN3_8B["vocab_size"]

    def run(batch, length, new, salt, sampled=True):
        ps = [{"prompt_token_ids": p} for p in prompts(batch, length, vocab, salt)]
        params = (SamplingParams(temperature=0.6, top_p=0.95, max_tokens=new, ignore_eos=True, detokenize=False, seed=0)
                  if sampled else SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False))
        t = time.perf_counter()
        outs = llm.generate(ps, params, use_tqdm=False)
        wall = time.perf_counter() - t
        return wall, sum(len(o.outputs[0].token_ids) for o in outs)

    run(min(max_batch, 8), PROMPT_LEN, 32, salt=99)  # warm-up
    for i, (batch, new) in enumerate(spec["points"]):
        wall, tokens = run(batch, PROMPT_LEN, new, salt=i)
        row = {"batch": batch, "prompt": PROMPT_LEN, "new": new, "sampling": "T=0.6 top-p 0.95", "wall_s": wall,
               "tokens": tokens, "tokens_per_s": tokens / wall}
        out["points"].append(row)
        print("POINT", spec["system"], json.dumps(row), flush=True)
    for c in spec["contexts"]:
        for batch in spec["context_batches"]:
            one, _ = run(batch, c, 1, salt=1000 + c + batch)
            many, tokens = run(batch, c, 1 + spec["context_new"], salt=2000 + c + batch)
            decode = batch * spec["context_new"] / max(many - one, 1e-9)
            row = {"batch": batch, "context": c, "new": spec["context_new"], "prefill_and_1_s": one,
                   f"prefill_and_{1 + spec['context_new']}_s": many, "decode_tokens_per_s": decode}
            out["contexts"].append(row)
            print("CONTEXT", spec["system"], json.dumps(row), flush=True)
    return out


def engine_worker(spec: dict) -> dict:
    import torch

    from lessismore.config import SparseConfig
    from lessismore.engine import Engine, ModelConfig

    smoke = spec.get("smoke")
    mcfg = ModelConfig.qwen3_8b()
    device, dtype = ("cuda", torch.bfloat16)
    if smoke:
        mcfg = ModelConfig(model_type="qwen3", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=14,
                           num_heads=8, num_kv_heads=2, head_dim=64, qk_norm=True)
        device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    cfg = SparseConfig(method="full") if spec["system"] == "engine-full" else SparseConfig(**{
        **spec["section"], "selection_layers": tuple(spec["section"]["selection_layers"])})
    max_batch, max_len = sizes(spec)
    t0 = time.perf_counter()
    engine = Engine(mcfg, cfg=cfg, device=device, dtype=dtype, max_batch=max_batch, max_len=max_len)
    out = {"init_s": time.perf_counter() - t0, "max_len": max_len, "max_batch": max_batch, "cfg": cfg.method,
           "points": [], "contexts": []}

    def run(batch, length, new, salt):
        ps = prompts(batch, length, mcfg.vocab_size, salt)
        t = time.perf_counter()
        results = engine.generate(ps, max_new_tokens=new, temperature=0.6, top_p=0.95, ignore_eos=True, seed=salt)
        wall = time.perf_counter() - t
        s = engine.stats
        return wall, sum(len(r.token_ids) for r in results), s.decode_tokens / max(s.decode_s, 1e-9)

    run(min(max_batch, 8), min(PROMPT_LEN, max_len // 2), 8, salt=99)  # capture, compile
    for i, (batch, new) in enumerate(spec["points"]):
        wall, tokens, decode = run(batch, PROMPT_LEN, new, salt=i)
        row = {"batch": batch, "prompt": PROMPT_LEN, "new": new, "sampling": "T=0.6 top-p 0.95", "wall_s": wall,
               "tokens": tokens, "tokens_per_s": tokens / wall, "engine_decode_tokens_per_s": decode}
        out["points"].append(row)
        print("POINT", spec["system"], json.dumps(row), flush=True)
    for c in spec["contexts"]:
        for batch in spec["context_batches"]:
            wall, tokens, decode = run(batch, c, spec["context_new"], salt=1000 + c + batch)
            row = {"batch": batch, "context": c, "new": spec["context_new"], "wall_s": wall, "decode_tokens_per_s": decode}
            out["contexts"].append(row)
            print("CONTEXT", spec["system"], json.dumps(row), flush=True)
    return out


# ---- the driver -----------------------------------------------------------------------------------------


def environment() -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(shlex.quote(a) for a in sys.argv), "host": platform.node(), "python": platform.python_version()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as exc:  # noqa: BLE001
        env["device"] = f"unknown ({exc})"
    try:
        import vllm

        env["vllm"] = vllm.__version__
    except Exception as exc:  # noqa: BLE001
        env["vllm"] = f"not importable ({type(exc).__name__})"
    return env


def run_system(system: str, spec: dict, timeout: float) -> dict:
    spec = dict(spec, system=system)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f.name]
    t0 = time.perf_counter()
    print(f"== {system}", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return {"error": f"timed out after {timeout:.0f} s", "tail": (exc.stdout or "")[-2000:] if isinstance(exc.stdout, str) else ""}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    for line in proc.stdout.splitlines():
        if line.startswith(("POINT", "CONTEXT")):
            print("  " + line, flush=True)
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}", "stderr": proc.stderr[-4000:], "stdout": proc.stdout[-1500:]}
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_s"] = time.perf_counter() - t0
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="8:8192,32:8192,8:16384,32:16384", help="B:NEW,... (256-token prompts)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    ap.add_argument("--contexts", default="", help="fixed contexts C,... (empty: none)")
    ap.add_argument("--context-batches", default="8,32")
    ap.add_argument("--context-new", type=int, default=128)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--selection-layers", default="2,12")
    ap.add_argument("--gpu-mem", type=float, default=0.85, help="vLLM's gpu_memory_utilization")
    ap.add_argument("--eager", action="store_true", help="vLLM enforce_eager (no torch.compile, no graphs)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per system process")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU check: configs, imports, the engine on a tiny model")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.load(open(args.worker))
        worker = vllm_worker if spec["system"].startswith("vllm") else engine_worker
        print("RESULT " + json.dumps(worker(spec)), flush=True)
        return
    args.selection_layers = tuple(int(x) for x in args.selection_layers.split(",") if x)
    systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        ap.error(f"--systems: unknown {bad[0]!r}; allowed: {', '.join(SYSTEMS)}")
    spec = {"points": parse_points(args.points), "contexts": [int(c) for c in args.contexts.split(",") if c],
            "context_batches": [int(b) for b in args.context_batches.split(",") if b], "context_new": args.context_new,
            "section": sparse_section(args), "gpu_mem": args.gpu_mem, "eager": args.eager}

    # The settings are checked before any GPU work: the vLLM section as the plugin parses it, the
    # engine's config as the engine resolves it.
    from lessismore.config import SparseConfig
    from lessismore.integrations import vllm as plugin

    parsed = plugin.parse_settings(spec["section"]).resolve("qwen3", QWEN3_8B["num_hidden_layers"], QWEN3_8B["hidden_size"])
    spec["resolved"] = {"method": parsed.method, "budget": parsed.budget, "recent_ratio": parsed.recent_ratio,
                        "sink_tokens": parsed.sink_tokens, "selection_layers": list(parsed.selection_layers),
                        "full_layers": list(parsed.full_layers)}
    SparseConfig(method="full")
    result = {"environment": environment(), "spec": spec, "systems": {}}

    def save():
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    if args.smoke:
        spec.update(points=[(2, 8)], contexts=[32], context_batches=[2], context_new=4, smoke=True)
        try:
            from lessismore.integrations import vllm_cuda  # noqa: F401
            result["smoke_vllm_cuda_import"] = "ok"
        except Exception as exc:  # noqa: BLE001 - vLLM's GPU backends need a vLLM build with them
            result["smoke_vllm_cuda_import"] = f"{type(exc).__name__}: {exc}"
        result["smoke_vllm_section"] = spec["resolved"]
        for system in ("engine-full", "engine-lessismore"):
            result["systems"][system] = run_system(system, spec, args.timeout)
            if "error" in result["systems"][system]:
                save()
                raise SystemExit(f"smoke: {system} failed: {result['systems'][system]}")
        save()
        print("SMOKE_OK", json.dumps({k: v for k, v in result.items() if k.startswith("smoke")}), flush=True)
        return
    for system in systems:
        result["systems"][system] = run_system(system, spec, args.timeout)
        save()
    summary = {}
    for system, res in result["systems"].items():
        if "error" in res:
            summary[system] = res["error"]
            continue
        summary[system] = {f"B={p['batch']} new={p['new']}": round(p["tokens_per_s"], 1) for p in res["points"]}
        summary[system].update({f"B={p['batch']} ctx={p['context']}": round(p["decode_tokens_per_s"], 1)
                                for p in res["contexts"]})
    result["summary_tokens_per_s"] = summary
    save()
    print("SUMMARY", json.dumps(summary, indent=1), flush=True)


if __name__ == "__main__":
    main()
