"""Real models' decode score rows against two things the GPU selection layer assumes (CPU, no GPU).

    PYTHONPATH=src python3 benchmarks/real_score_rows.py --model default --tokens 8192 --out benchmarks/results/real-score-rows-smollm2.json

The GPU benchmarks run random weights, whose score rows are close to exchangeable noise. Two costs of
the selection layer depend on what real rows look like:

1. the top-k's bound (``ops/topk.py`` steps 1-2): the candidates it keeps (entries >= the kk-th
   largest of M interleaved group maxima, cut to its top 16 bits), against kk. Past ``default_cap``
   candidates a row takes the kernel's slow path, which re-reads the row per search step;
2. the union's depth (``analysis.metrics.union_depth``): how many ranks of each head's list the
   rank-major union reads, and how often that passes ``union_prefix`` (the ranks the layer sorts
   first; deeper rows take the second top-k).

One prefill of real text (the packaged traces, prompt + trace, concatenated to --tokens) records the
post-RoPE queries and keys of the selection layers; every --stride-th position past the budget is then a
decode step's score row (q.k over the tokens up to it). The bound is evaluated as the kernel's steps 1-2
define it, at the settings the layer uses for a cache of --span slots (k = union_prefix(K - R), or
--prefix to weigh another prefix); the same rows shuffled are the control. Caveat: a layer after the
first selection layer sees full attention's inputs here, not a sparse run's.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from common import environment, write_json
from lessismore.analysis.metrics import union_depth
from lessismore.analysis.traces import load_traces
from lessismore.config import SparseConfig
from lessismore.engine.sampling import order_key
from lessismore.methods.lessismore import union_prefix
from lessismore.models import load_model
from lessismore.ops.topk import default_cap, default_group


def capture_qk(model, ids: torch.Tensor, layers: set[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (q [Hq, T, D], k [Hkv, T, D])} after RoPE, from one prefill with SDPA."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = {}

    def recording(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in layers:
            seen[module.layer_idx] = (query[0].clone(), key[0].clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("record_qk", recording)
    model.set_attn_implementation("record_qk")
    try:
        with torch.no_grad():
            model(ids, logits_to_keep=1)
    finally:
        model.set_attn_implementation("sdpa")
    return seen


def bound_candidates(s: torch.Tensor, kk: int, groups: int, gm_stop: int = 16) -> torch.Tensor:
    """Per row of s [H, n]: entries >= t_lo, where t_lo is the kk-th largest of the maxima over
    positions p = j (mod groups), its low gm_stop key bits cleared (ops/topk.py steps 1-2). Compared as
    order keys, which order as the floats do (-0.0 with +0.0)."""
    h, n = s.shape
    padded = torch.cat([s, s.new_full((h, (-n) % groups), float("-inf"))], 1)
    gm = order_key(padded.view(h, -1, groups).amax(1))
    cut = (gm.sort(1, descending=True).values[:, kk - 1] >> gm_stop) << gm_stop
    return (order_key(s) >= cut[:, None]).sum(1)


def quantiles(x: torch.Tensor) -> dict:
    q = x.float().quantile(torch.tensor([0.5, 0.9, 0.99, 1.0])).tolist()
    return dict(zip(("p50", "p90", "p99", "max"), (round(v, 4) for v in q)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="'default', a local HF folder or a .gguf file")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of concatenated traces (the longest context)")
    ap.add_argument("--layers", default=None, help="comma list (default: the model's LessIsMore selection layers)")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--span", type=int, default=None, help="the cache's slots, which set M and the cap (default --tokens)")
    ap.add_argument("--stride", type=int, default=32, help="every stride-th position past the budget is a row")
    ap.add_argument("--prefix", type=int, default=None,
                    help="the ranks sorted first, which the bound selects and the union may pass (default union_prefix)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = SparseConfig(method="lessismore", budget=args.budget)
    if args.tokens <= args.budget:
        ap.error(f"--tokens={args.tokens}: must exceed --budget={args.budget}")
    if args.stride < 1:
        ap.error(f"--stride={args.stride}: must be >= 1")
    span = args.span or args.tokens
    if span < args.tokens:
        ap.error(f"--span={span}: must be >= --tokens={args.tokens}")
    k_ranked = cfg.ranked_share
    prefix = union_prefix(k_ranked) if args.prefix is None else args.prefix
    if not 1 <= prefix <= k_ranked:
        ap.error(f"--prefix={prefix}: must be in 1..{k_ranked} (the ranked share of --budget)")

    model, tokenizer = load_model(args.model, "cpu", torch.float32)
    mc = model.config
    cfg = cfg.resolve(mc.model_type, mc.num_hidden_layers, mc.hidden_size)
    layers = sorted(int(x) for x in args.layers.split(",")) if args.layers else list(cfg.selection_layers)
    if not all(0 <= layer < mc.num_hidden_layers for layer in layers):
        ap.error(f"--layers={args.layers}: each must be in 0..{mc.num_hidden_layers - 1}")
    ids = []
    for row in load_traces():
        ids += tokenizer(row["prompt"] + row["trace"])["input_ids"]
        if len(ids) >= args.tokens:
            break
    if len(ids) < args.tokens:
        ap.error(f"--tokens={args.tokens}: the traces hold {len(ids)} tokens for this tokenizer")
    qk = capture_qk(model, torch.tensor([ids[: args.tokens]]), set(layers))

    groups, cap = default_group(prefix, span), default_cap(prefix, span)
    window = cfg.recent_share - cfg.effective_sinks
    torch.manual_seed(args.seed)
    result = environment("cpu")
    result["device"] = f"CPU, {os.cpu_count()} cores (no GPU is involved)"
    result.update(model=str(args.model), model_type=mc.model_type, query_heads=mc.num_attention_heads,
                  tokens=args.tokens, span=span, budget=args.budget, ranked=k_ranked, prefix=prefix,
                  groups=groups, cap=cap, stride=args.stride, layers={})
    bands = [(args.budget, 2 * args.budget), (2 * args.budget, 4 * args.budget), (4 * args.budget, 8 * args.budget),
             (8 * args.budget, 1 << 30)]
    for layer in layers:
        q, k = qk[layer]
        k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
        found, control, depth, context = [], [], [], []
        for t in range(args.budget + args.stride, args.tokens, args.stride):
            n = t + 1
            s = torch.einsum("hd,hnd->hn", q[:, t], k[:, :n])
            depth.append(float(union_depth(s[None], torch.ones(1, n, dtype=torch.bool), args.budget, cfg.recent_ratio,
                                           cfg.sink_tokens)[0]))
            context.append(n)
            middle = s.clone()  # the layer's scores: -inf at the sinks and the recent window
            middle[:, : cfg.effective_sinks] = float("-inf")
            middle[:, n - window:] = float("-inf")
            found.append(bound_candidates(middle, prefix, groups))  # kk = prefix: every row is past the budget
            control.append(bound_candidates(middle[:, torch.randperm(n)], prefix, groups))
        found, control = torch.cat(found), torch.cat(control)
        depth, context = torch.tensor(depth), torch.tensor(context)
        union = {}
        for lo, hi in bands:
            m = (context >= lo) & (context < hi)
            if m.any():
                union[f"{lo}-{min(hi, args.tokens)}"] = {
                    "steps": int(m.sum()), "depth_mean_over_k": round(float(depth[m].mean() / k_ranked), 4),
                    "depth_max": int(depth[m].max()), "past_prefix": round(float((depth[m] > prefix).float().mean()), 4)}
        result["layers"][str(layer)] = {
            "head_rows": found.numel(), "candidates_over_kk": quantiles(found / prefix),
            "shuffled_over_kk": quantiles(control / prefix), "over_cap": int((found > cap).sum()), "union": union}
        print(layer, json.dumps(result["layers"][str(layer)]), flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
