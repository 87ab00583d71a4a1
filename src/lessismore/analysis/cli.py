"""``lessismore analyze``: attention recall and output fidelity along reasoning traces.

Parsing imports nothing heavy; ``run_analyze`` imports the analysis (torch, transformers)."""
from __future__ import annotations

import argparse
import sys

# analysis.runner.DEFAULT_METHODS, repeated here so that parsing does not import the runner (torch);
# tests/test_cli.py checks that the two agree.
DEFAULT_METHODS = ("lessismore", "tidaldecode", "quest", "streaming", "oracle")
DEFAULT_RECENT_RATIOS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    from lessismore.cli import add_sparse_arguments, name_list

    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a local HF model folder, or a .gguf file")
    parser.add_argument("--traces", default=None,
                        help="JSONL with 'prompt' and 'trace' per row (default: the 32 packaged traces)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N traces")
    parser.add_argument("--max-tokens", type=int, default=None, help="truncate each prompt + trace to T tokens")
    parser.add_argument("--methods", type=name_list, default=DEFAULT_METHODS, metavar="M[,M...]",
                        help=f"comma-separated methods, each run separately; 'full' is also allowed "
                        f"(default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--recent-ratios", type=_ratios, default=DEFAULT_RECENT_RATIOS, metavar="R[,R...]",
                        help=f"recent ratios for the recall-vs-ratio curve (Fig. 9) "
                        f"(default: {','.join(map(str, DEFAULT_RECENT_RATIOS))})")
    parser.add_argument("--batch-size", type=int, default=4, help="traces decoded together (left-padded)")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the Fig. 2/3/8/9 counterfactuals (made with LessIsMore's settings)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-head choice (Fig. 8)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sparse_arguments(parser)


def _validate(args) -> None:
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"limit: must be a positive integer, got {args.limit}")
    if args.max_tokens is not None and args.max_tokens <= 1:
        raise ValueError(f"max_tokens: must be an integer > 1, got {args.max_tokens}")


def options_from_args(args):
    """The AnalysisOptions of the command line: each method's config from the shared sparse options.
    The counterfactuals (unless --no-extras) use LessIsMore's config from the same options, so its
    options count as used."""
    from lessismore.analysis.runner import AnalysisOptions
    from lessismore.cli import check_methods, sparse_configs, sparse_settings
    from lessismore.config import SparseConfig

    methods = check_methods(args.methods)
    users = methods if args.no_extras or "lessismore" in methods else methods + ("lessismore",)
    # The budget K is the analysis's own (steps count where the cache is longer, the oracle bound).
    by_method = dict(zip(users, sparse_configs(args, users, used_anyway=("budget",))))
    # The budget K and the counterfactuals' settings: LessIsMore's config.
    base = by_method.get("lessismore") or SparseConfig.for_method("lessismore", **sparse_settings(args))
    return AnalysisOptions(  # validates methods, ratios, batch size and budgets, before loading
        base=base,
        methods=methods,
        configs=tuple(by_method[m] for m in methods),
        recent_ratios=args.recent_ratios,
        batch_size=args.batch_size,
        seed=args.seed,
        extras=not args.no_extras,
        progress=not args.no_progress,
    )


def run_analyze(args) -> int:
    import time

    from lessismore.cli import check_device, check_model, check_writable_folder

    _validate(args)
    options = options_from_args(args)
    check_device(args.device)
    check_model(args.model)
    check_writable_folder("--out", args.out)

    from lessismore.analysis.report import methods_table, write_report
    from lessismore.analysis.runner import analyze
    from lessismore.analysis.traces import PACKAGED_TRACES, encode_traces, load_traces
    from lessismore.models import load_model

    traces_file = args.traces if args.traces is not None else str(PACKAGED_TRACES)
    rows = load_traces(traces_file, args.limit)
    model, tokenizer = load_model(args.model, device=args.device)
    traces = encode_traces(tokenizer, rows, args.max_tokens)
    start = time.perf_counter()
    summary = analyze(model, tokenizer, traces, options)
    summary["run"] = {
        "model": args.model,
        "traces_file": traces_file,
        "limit": args.limit,
        "max_tokens": args.max_tokens,
        "device": args.device,
        "batch_size": args.batch_size,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    files = write_report(summary, args.out)
    print("\n".join(methods_table(summary)))
    print(f"wrote {', '.join(files)} to {args.out}", file=sys.stderr)
    return 0
