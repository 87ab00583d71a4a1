"""``lessismore analyze``: attention recall and output fidelity along reasoning traces."""
from __future__ import annotations

import argparse
import sys


def _methods(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    from lessismore.analysis.runner import DEFAULT_METHODS
    from lessismore.analysis.traces import PACKAGED_TRACES
    from lessismore.cli import add_sparse_arguments

    parser.add_argument("--model", default="default", help="'default', a local HF model folder, or a .gguf file")
    parser.add_argument("--traces", default=str(PACKAGED_TRACES),
                        help="JSONL with 'prompt' and 'trace' per row (default: the 32 packaged traces)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N traces")
    parser.add_argument("--max-tokens", type=int, default=None, help="truncate each prompt + trace to T tokens")
    parser.add_argument("--methods", type=_methods, default=DEFAULT_METHODS,
                        help="comma-separated methods (each run separately; 'full' is also allowed)")
    add_sparse_arguments(parser)
    parser.add_argument("--recent-ratios", type=_ratios, default=(0.0, 0.125, 0.25, 0.5, 0.75, 1.0),
                        help="recent ratios for the recall-vs-ratio curve (Fig. 9)")
    parser.add_argument("--batch-size", type=int, default=4, help="traces decoded together (left-padded)")
    parser.add_argument("--no-extras", action="store_true", help="skip the Fig. 2/3/8/9 counterfactuals")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-head choice (Fig. 8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--out", required=True, help="output folder")


def _validate(args) -> None:
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"limit: must be a positive integer, got {args.limit}")
    if args.max_tokens is not None and args.max_tokens <= 1:
        raise ValueError(f"max_tokens: must be an integer > 1, got {args.max_tokens}")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise ValueError(f"device: expected cpu or cuda[:N], got {args.device!r}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("device: cuda was asked for but torch sees no GPU")


def run_analyze(args) -> int:
    import time

    from lessismore.analysis.report import methods_table, write_report
    from lessismore.analysis.runner import AnalysisOptions, analyze
    from lessismore.analysis.traces import encode_traces, load_traces
    from lessismore.cli import sparse_config
    from lessismore.models import load_model

    _validate(args)
    options = AnalysisOptions(  # validates methods, ratios, batch size, and the SparseConfig, before loading
        base=sparse_config(args, "lessismore"),
        methods=args.methods,
        recent_ratios=args.recent_ratios,
        batch_size=args.batch_size,
        seed=args.seed,
        extras=not args.no_extras,
    )
    rows = load_traces(args.traces, args.limit)
    model, tokenizer = load_model(args.model, device=args.device)
    traces = encode_traces(tokenizer, rows, args.max_tokens)
    start = time.perf_counter()
    summary = analyze(model, tokenizer, traces, options)
    summary["run"] = {
        "model": args.model,
        "traces_file": args.traces,
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
