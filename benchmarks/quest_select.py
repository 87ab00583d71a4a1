"""Time Quest's page selection (the top pages of each head, as positions) and write the results as JSON.

    PYTHONPATH=src TRITON_INTERPRET=0 python3 benchmarks/quest_select.py --out benchmarks/results/quest-select-h200.json
    PYTHONPATH=src python3 benchmarks/quest_select.py --smoke --out /tmp/quest-select.json   # CPU: interpreter, tiny shapes

Workload: one sparse layer of Quest at Qwen3-8B's 32 query heads, page size 16, budget 2048 (the top
128 pages of each head): fp32 page scores [B, 32, L/16] as ``ops.quest_page_scores`` gives them (the
current page +inf; ``--half``: rows at half length, the pages past them -inf). Two ways, each first
checked equal to the reference (``naive.quest_select``): the exact top-k (``ops.topk``) then
``quest_page_positions`` (two launches, the engine's path before ``quest_select``), and ``quest_select``
(one launch). The scores are a few MB and the scores kernel has just written them, so they are read
from L2, as in a decode step: every call reads the same inputs. Medians over CUDA-graph replays of
``--inner`` calls.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HEADS, PAGE, BUDGET = 32, 16, 2048


def page_scores(b, length, half, device):
    pages = length // PAGE
    scores = torch.randn(b, HEADS, pages, device=device)
    n = torch.full((b,), length // 2 if half else length, device=device, dtype=torch.int32)
    used = -(-n.long() // PAGE)
    page = torch.arange(pages, device=device)
    scores = scores.masked_fill(page >= used.view(b, 1, 1), float("-inf"))
    return scores.masked_fill(page == used.view(b, 1, 1) - 1, float("inf")), n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU through the Triton interpreter")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--inner", type=int, default=20)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import environment, graph_seconds_per_call, write_json

    from lessismore.methods.quest import pages_taken
    from lessismore.ops import naive, quest, topk

    points = [(2, 512, False)] if args.smoke else [(b, length, half) for b in (8, 32) for length in (16384, 32768)
                                                   for half in (False, True)]
    result = {**environment(device), "heads": HEADS, "page_size": PAGE, "budget": BUDGET, "points": []}
    for b, length, half in points:
        scores, n = page_scores(b, length, half, device)
        take = pages_taken(BUDGET, PAGE, scores.shape[-1])
        kmax = min(take * PAGE, length)
        ways = {
            "topk_then_positions": lambda: quest.quest_page_positions(topk.topk_desc(scores, take)[1], n, PAGE, kmax),
            "quest_select": lambda: quest.quest_select(scores, n, PAGE, take, kmax),
        }
        want = naive.quest_select(scores, n, PAGE, take, kmax)
        row = {"B": b, "L": length, "pages": scores.shape[-1], "half": half, "take": take}
        for name, call in ways.items():
            got = call()
            row[f"{name}_equal_reference"] = all(torch.equal(x, y) for x, y in zip(got, want))
            if device == "cuda":
                row[f"{name}_us"] = round(graph_seconds_per_call(lambda j: call(), args.inner, args.reps) * 1e6, 2)
        result["points"].append(row)
        print(row, flush=True)
        write_json(args.out, result)
    if not all(v for r in result["points"] for k, v in r.items() if k.endswith("_equal_reference")):
        raise SystemExit("a way of selecting differs from the reference")


if __name__ == "__main__":
    main()
