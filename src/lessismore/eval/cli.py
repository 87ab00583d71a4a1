"""``lessismore eval`` and ``lessismore report``: argument definitions and the commands.

The top-level CLI wires them in; bad input raises ValueError naming the field.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lessismore.eval.tasks import DEFAULT_N, TASKS


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from lessismore.cli import METHOD_NAMES, add_sparse_arguments, name_list

    defaults = ", ".join(f"{t} {n}" for t, n in DEFAULT_N.items())
    parser.add_argument("--task", required=True, choices=TASKS, help="benchmark")
    parser.add_argument("--data", default=None, help="data file (JSONL); required for gpqa, which is not shipped")
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a HF model folder or a .gguf file")
    parser.add_argument("--methods", required=True, type=name_list,
                        help=f"comma-separated methods, e.g. lessismore,tidaldecode,full (of {', '.join(METHOD_NAMES)})")
    parser.add_argument("--n", type=int, default=None, help=f"samples per problem (default per task: {defaults})")
    parser.add_argument("--limit", type=int, default=None, help="only the first P problems")
    parser.add_argument("--max-new-tokens", type=int, default=32768, help="generation length limit per sample")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences generated together")
    parser.add_argument("--seed", type=int, default=0, help="base seed; each sample's seed derives from it")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if a GPU is there, else cpu)")
    parser.add_argument("--engine", choices=["hf", "fast"], default="hf",
                        help="hf: transformers generate; fast: lessismore.Engine (batched, CUDA graphs on GPU)")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048, help="fast engine: cache room for a prompt")
    parser.add_argument("--out", required=True, help="output folder (re-run the same command to resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sparse_arguments(parser, sweep=True)
    return parser


def settings_from_args(args):
    """The EvalSettings of the command line, checked (the sparse options by ``lessismore.cli``, which
    names the option in its errors)."""
    from lessismore.cli import sparse_configs, sparse_settings
    from lessismore.eval.runner import EvalSettings

    sparse_configs(args, args.methods)  # every cell's config, before anything loads
    return EvalSettings(
        task=args.task,
        out=args.out,
        methods=list(args.methods),
        budgets=list(args.budgets or ()),
        model=args.model,
        data=args.data,
        n=args.n,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        **sparse_settings(args),
    ).validate()


def run_eval(args) -> int:
    """Run (or resume) the grid; on a single process, print the report table at the end."""
    from lessismore.cli import check_device, check_model
    from lessismore.eval.report import write_report
    from lessismore.eval.runner import bind_folder, evaluate, shard

    settings = settings_from_args(args)
    check_device(settings.device)
    check_model(settings.model)
    bind_folder(settings)  # refuses a folder of other settings before the model loads
    generator = None
    if args.engine == "fast":
        from lessismore.eval.generation import load_engine_generator

        if args.max_prompt_tokens <= 0:
            raise ValueError(f"--max-prompt-tokens: must be a positive integer, got {args.max_prompt_tokens}")
        generator = load_engine_generator(settings.model, settings.device, settings.batch_size,
                                          args.max_prompt_tokens + settings.max_new_tokens)
    result = evaluate(settings, generator=generator, progress=not args.no_progress)
    rank, world = shard()
    print(
        f"rank {rank}/{world}: {result['written']} samples written, {result['skipped']} already done -> {result['file']}",
        file=sys.stderr,
    )
    if world == 1:
        print(write_report(settings.out))
    else:
        print(f"when every rank is done: lessismore report {settings.out}", file=sys.stderr)
    return 0


def add_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("dir", help="an output folder of lessismore eval")
    parser.add_argument("--json", action="store_true", help='print {"rows": [...]} instead of Markdown (writes no files)')
    return parser


def run_report(args) -> int:
    """Print the report; without --json also write report.md and accuracy_vs_budget.png into DIR."""
    from lessismore.eval.report import PLOT_FILE, compute_rows, json_rows, load, write_report

    if args.json:
        _, records = load(args.dir)
        print(json.dumps(json_rows(compute_rows(records)), indent=2))
    else:
        print(write_report(args.dir))
        print(f"wrote {Path(args.dir) / 'report.md'} and {Path(args.dir) / PLOT_FILE}", file=sys.stderr)
    return 0

