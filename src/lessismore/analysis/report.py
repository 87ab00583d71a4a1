"""summary.json, summary.md and the PNG plots of an analysis run."""
from __future__ import annotations

import json
from pathlib import Path

FIGSIZE = (5.0, 3.2)
DPI = 80


def _fmt(x, digits=4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def methods_table(summary: dict) -> list[str]:
    lines = [
        "| method | mean recall | oracle bound (same q/K) | mean KL(full‖sparse) | top-1 agreement | mean rank of full's top-1 | steps |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in summary["methods"].items():
        lines.append(
            f"| {name} | {_fmt(m['mean_recall'])} | {_fmt(m['oracle_bound_recall'])} | {_fmt(m['mean_kl'], 5)} | "
            f"{_fmt(m['top1_agreement'], 3)} | {_fmt(m['mean_rank_of_full_top1'], 2)} | {m['steps']} |"
        )
    return lines


def summary_markdown(summary: dict) -> str:
    cfg = summary["config"]
    run = summary.get("run", {})
    lines = [
        f"# Analysis: budget K = {summary['budget']}",
        "",
        f"Model: {run.get('model', 'n/a')}; {len(summary['traces'])} traces"
        + (f" truncated to {run['max_tokens']} tokens" if run.get("max_tokens") else "")
        + f"; recent ratio {cfg['recent_ratio']}, sinks {cfg['sink_tokens']}, Quest page {cfg['page_size']}, "
        f"full layers {cfg['full_layers']}, selection layers {cfg['selection_layers']} "
        f"({cfg['num_layers']} layers, {cfg['num_query_heads']} query / {cfg['num_kv_heads']} KV heads).",
        "",
        "Means over decode steps whose cache is longer than K, over each method's sparse layers, heads and traces. "
        "Recall is against the softmax of the q and K the method's own run computed; the oracle bound is each "
        "head's top-K attention mass on the same q and K.",
        "",
        *methods_table(summary),
    ]
    if "head_overlap" in summary:
        ho, rr, ag = summary["head_overlap"], summary["recent_ratio"], summary["aggregation"]
        lines += [
            "",
            "## Counterfactual selections on the full-attention run's q and K",
            "",
            f"Head overlap of per-head top-K sets (Fig. 2): within a KV group {_fmt(ho['within_kv_group'], 3)}, "
            f"across KV groups {_fmt(ho['across_kv_groups'], 3)}, all pairs {_fmt(ho['all_pairs'], 3)}.",
            "",
            f"Union depth: the rank-major union reads {_fmt(summary['union_depth']['mean_ranks'], 1)} ranks of each "
            f"head's list on average for its k = {summary['union_depth']['ranked_k']} positions "
            f"({summary['union_depth']['heads']} heads; k / heads if the lists were disjoint, k if equal); "
            f"{_fmt(summary['union_depth']['past_prefix'], 4)} of the steps read past the "
            f"{summary['union_depth']['prefix_ranks']} ranks the GPU selection layer sorts first.",
            "",
            "| recent ratio (Fig. 9) | " + " | ".join(str(r) for r in rr["ratios"]) + " |",
            "| --- | " + " | ".join("---:" for _ in rr["ratios"]) + " |",
            "| LessIsMore recall | " + " | ".join(_fmt(x) for x in rr["recall"]) + " |",
            "",
            "| aggregation (Fig. 8) | unified | head-to-head | random head per group |",
            "| --- | ---: | ---: | ---: |",
        ]
        for mode in ("selection_layers", "every_layer"):
            a = ag[mode]
            lines.append(f"| {mode.replace('_', ' ')} | {_fmt(a['unified'])} | {_fmt(a['head_to_head'])} | {_fmt(a['random_head'])} |")
    return "\n".join(lines) + "\n"


def _cumulative(series: list[dict], key: str):
    """Pool (n, value) over traces; mean per cache length n; cumulative average over increasing n."""
    by_n: dict[int, list[float]] = {}
    for s in series:
        for n, v in zip(s["n"], s[key]):
            by_n.setdefault(n, []).append(v)
    xs = sorted(by_n)
    total = count = 0.0
    ys = []
    for n in xs:
        total += sum(by_n[n])
        count += len(by_n[n])
        ys.append(total / count)
    return xs, ys


def write_plots(summary: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=DPI)
        plt.close(fig)
        written.append(name)

    k = summary["budget"]
    for key, name, ylabel in (("recall", "recall_vs_step.png", "cumulative mean recall"),
                              ("kl", "kl_vs_step.png", "cumulative mean KL(full||sparse)")):
        fig, ax = plt.subplots(figsize=FIGSIZE)
        for method, m in summary["methods"].items():
            xs, ys = _cumulative(m["series"], key)
            if xs:
                ax.plot(xs, ys, label=method)
        ax.set_xlabel("cache length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"K = {k}")
        ax.legend(fontsize=7)
        save(fig, name)
    if "recent_ratio" in summary:
        rr = summary["recent_ratio"]
        fig, ax = plt.subplots(figsize=FIGSIZE)
        ax.plot(rr["ratios"], [float("nan") if y is None else y for y in rr["recall"]], marker="o")
        ax.set_xlabel("recent ratio r")
        ax.set_ylabel("mean recall (LessIsMore set)")
        ax.set_title(f"K = {k}")
        save(fig, "recall_vs_recent_ratio.png")

        ho = summary["head_overlap"]
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        im = ax.imshow(ho["matrix"], vmin=0, vmax=1, cmap="viridis")
        ax.set_xlabel("query head")
        ax.set_ylabel("query head")
        ax.set_title(f"top-K overlap, K = {k}")
        fig.colorbar(im, ax=ax)
        save(fig, "head_overlap.png")

        rec = summary["recency"]
        fig, ax = plt.subplots(figsize=FIGSIZE)
        labels = rec["distance_bins"]
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], rec["distance_mass_share"], width=0.4, label="attention mass")
        ax.bar([x + 0.2 for x in xs], rec["distance_topk_share"], width=0.4, label="top-K positions")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=60, fontsize=6)
        ax.set_xlabel("distance from the current token")
        ax.set_ylabel("share")
        ax.legend(fontsize=7)
        save(fig, "recency.png")

        ag = summary["aggregation"]
        fig, ax = plt.subplots(figsize=FIGSIZE)
        names = ["unified", "head_to_head", "random_head"]
        lowest = 1.0
        for i, mode in enumerate(("selection_layers", "every_layer")):
            vals = [float("nan") if ag[mode][a] is None else ag[mode][a] for a in names]
            lowest = min([lowest] + [v for v in vals if v == v])
            ax.bar([j + 0.4 * i - 0.2 for j in range(3)], vals, width=0.4, label=mode.replace("_", " "))
        ax.set_xticks(range(3))
        ax.set_xticklabels(["unified", "head-to-head", "random head"])
        ax.set_ylabel("mean recall")
        ax.set_ylim(max(0.0, lowest - 0.05), 1.0)
        ax.legend(fontsize=7)
        save(fig, "aggregation.png")
    return written


def write_report(summary: dict, out: str | Path) -> list[str]:
    """Write summary.json, summary.md and the PNGs into ``out``; returns the file names."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in summary.items() if not k.startswith("_")}
    with open(out / "summary.json", "w", encoding="utf-8") as f:
        json.dump(public, f, separators=(",", ":"))  # the per-step series make it large: compact
    (out / "summary.md").write_text(summary_markdown(public), encoding="utf-8")
    return ["summary.json", "summary.md", *write_plots(public, out)]
