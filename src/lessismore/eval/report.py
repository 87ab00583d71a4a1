"""Reports of an evaluation folder: the paper's Table 1 layout (accuracy with the mean generation length
in parentheses; methods x budgets), a detailed metrics table, a PNG of accuracy against budget, and
JSON rows."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from lessismore.eval.metrics import summarize
from lessismore.eval.runner import RUN_FILE, SAMPLES_GLOB, read_records

DISPLAY = {
    "quest": "Quest",
    "tidaldecode": "TidalDecode",
    "lessismore": "LessIsMore",
    "streaming": "StreamingLLM",
    "oracle": "Oracle top-k",
    "full": "Full attention",
}
# The paper's row order: baselines, LessIsMore, full attention last; other methods before LessIsMore.
ORDER = ["quest", "tidaldecode", "streaming", "oracle", "lessismore", "full"]
TABLE_FILE = "report.md"
PLOT_FILE = "accuracy_vs_budget.png"


def _method_rank(method: str) -> tuple[int, str]:
    return (ORDER.index(method) if method in ORDER else ORDER.index("lessismore") - 0.5, method)


def load(out: str | Path) -> tuple[dict, list[dict]]:
    """(the folder's fixed settings, its records); ValueError naming ``dir`` when there is nothing."""
    out = Path(out)
    if not out.is_dir():
        raise ValueError(f"dir: no such folder: {out}")
    if not any(out.glob(SAMPLES_GLOB)):
        raise ValueError(f"dir: {out} holds no sample files ({SAMPLES_GLOB}); run lessismore eval --out {out} first")
    records = read_records(out)
    if not records:
        raise ValueError(f"dir: the sample files in {out} hold no finished samples")
    fixed = {}
    if (out / RUN_FILE).exists():
        try:
            fixed = json.loads((out / RUN_FILE).read_text()).get("fixed", {})
        except json.JSONDecodeError:
            fixed = {}
    return fixed, records


def compute_rows(records: list[dict]) -> list[dict]:
    """One row per (method, budget): the metrics of ``summarize``; a method without a budget (full
    attention) once, with budget None."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["method"], r["budget"])].append(r)
    rows = [{"method": m, "budget": b, **summarize(g)} for (m, b), g in groups.items()]
    rows.sort(key=lambda r: (_method_rank(r["method"]), r["budget"] or 0))
    return rows


def _budgetless(rows: list[dict], method: str) -> bool:
    """The method ran without a budget (full attention): its only row has budget None."""
    return all(r["budget"] is None for r in rows if r["method"] == method)


def _length(tokens: float) -> str:
    return f"{tokens / 1000:.1f}K" if tokens >= 1000 else f"{tokens:.0f}"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def table1(rows: list[dict]) -> str:
    """Methods x budgets, each cell "accuracy % (mean generation length)"; the row of a method without
    a budget (full attention) repeats its one value in every budget column, as in the paper."""
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    methods = sorted({r["method"] for r in rows}, key=_method_rank)
    cell = {(r["method"], r["budget"]): f"{_pct(r['pass@1'])} ({_length(r['mean_gen_len'])})" for r in rows}
    header = ["method"] + ([f"K={b}" for b in budgets] or ["full"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        if _budgetless(rows, m):
            values = [cell[(m, None)]] * max(len(budgets), 1)
        else:
            values = [cell.get((m, b), "") for b in budgets]
        lines.append("| " + " | ".join([DISPLAY.get(m, m)] + values) + " |")
    return "\n".join(lines)


def details(rows: list[dict]) -> str:
    """Every metric of every row."""
    ks = sorted({int(k[5:]) for r in rows for k in r if k.startswith("pass@") and k != "pass@1"})
    header = ["method", "budget", "pass@1 %", "± stderr", *[f"pass@{k} %" for k in ks],
              "mean len", "median len", "truncated %", "decode tok/s", "problems", "samples"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        tps = r.get("decode_tokens_per_s")
        values = [
            DISPLAY.get(r["method"], r["method"]), "—" if r["budget"] is None else str(r["budget"]),
            _pct(r["pass@1"]), _pct(r["stderr"]), *[_pct(r.get(f"pass@{k}")) for k in ks],
            f"{r['mean_gen_len']:.1f}", f"{r['median_gen_len']:.1f}", f"{100 * r['truncated_frac']:.1f}",
            "" if tps is None else f"{tps:.1f}", str(r["n_problems"]), str(r["n_samples"]),
        ]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def markdown(fixed: dict, rows: list[dict]) -> str:
    task = fixed.get("task", "?")
    head = f"# lessismore eval: {task}"
    if fixed:
        sampling = "greedy" if fixed.get("temperature") == 0 else f"T={fixed.get('temperature')}, top-p={fixed.get('top_p')}"
        head += (f"\n\nmodel `{fixed.get('model')}`; {sampling}; max new tokens {fixed.get('max_new_tokens')}; "
                 f"seed {fixed.get('seed')}")
    return (
        f"{head}\n\n## Accuracy % (mean generation length in tokens)\n\n{table1(rows)}\n\n"
        f"## All metrics\n\n{details(rows)}\n\n"
        "pass@1: mean over problems of the per-problem mean over samples; ± is its standard error over problems.\n"
    )


def plot(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Accuracy (pass@1 %, with standard error bars) against budget, one line per sparse method, full
    attention as a dashed horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    for m in sorted({r["method"] for r in rows}, key=_method_rank):
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["budget"] or 0)
        label = DISPLAY.get(m, m)
        if _budgetless(rows, m):
            r = mine[0]
            ax.axhline(100 * r["pass@1"], color="black", linestyle="--", label=label)
            continue
        ax.errorbar(
            [r["budget"] for r in mine], [100 * r["pass@1"] for r in mine],
            yerr=[100 * (r["stderr"] or 0) for r in mine], marker="o", capsize=3, label=label,
        )
    if budgets:
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
    top = max(100 * r["pass@1"] for r in rows)
    ax.set_ylim(0, min(100, max(10, 1.15 * top)))
    ax.set_xlabel("token budget K")
    ax.set_ylabel("pass@1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def json_rows(rows: list[dict]) -> dict:
    return {"rows": rows}


def write_report(out: str | Path) -> str:
    """Write report.md and the PNG into ``out``; return the Markdown."""
    fixed, records = load(out)
    rows = compute_rows(records)
    text = markdown(fixed, rows)
    Path(out, TABLE_FILE).write_text(text, encoding="utf-8")
    plot(rows, Path(out, PLOT_FILE), title=f"{fixed.get('task', '')} — accuracy vs budget")
    return text
