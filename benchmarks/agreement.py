"""Greedy agreement with full attention, per method, on the `make run` prompt (CPU, default model).

    python benchmarks/agreement.py --budget 128 --max-new-tokens 128 --out benchmarks/results/agreement-cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

import lessismore as lim
from lessismore.cli import _agreement
from lessismore.methods import available
from lessismore.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--budgets", default="128")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompt-file", default="examples/aime24_problem60.txt")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": Path(args.prompt_file).read_text()}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids

    def greedy() -> tuple[list[int], float]:
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return out[0, ids.shape[1]:].tolist(), time.perf_counter() - start

    full_tokens, _ = greedy()
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        for method in available():
            if method == "full":
                continue
            with lim.sparse_attention(model, lim.SparseConfig.for_method(method, budget=budget)):
                tokens, seconds = greedy()
                stats = lim.stats(model)
            agreement, first = _agreement(tokens, full_tokens)
            rows.append(dict(method=method, budget=budget, agreement=agreement, first_divergence=first,
                             generated_tokens=len(tokens), kv_read_fraction=stats["kv_read_fraction"],
                             seconds=seconds))
            print(json.dumps(rows[-1]), flush=True)
    result = dict(command=" ".join([sys.executable.split("/")[-1]] + sys.argv), device=platform.processor() or "cpu",
                  date=datetime.date.today().isoformat(), prompt_tokens=ids.shape[1], full_tokens=len(full_tokens),
                  rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
