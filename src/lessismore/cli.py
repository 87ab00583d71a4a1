"""The ``lessismore`` command: generate, analyze, eval, report."""
from __future__ import annotations

import argparse
import json
import sys
import time


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_sparse_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=int, default=2048, help="K: KV positions read per sparse layer")
    parser.add_argument("--recent-ratio", type=float, default=0.25, help="r: share of K for recent tokens")
    parser.add_argument("--sink-tokens", type=int, default=4, help="s: first tokens always kept")
    parser.add_argument("--selection-layers", type=_int_list, default=None, help="e.g. 2,12 (default: per model)")
    parser.add_argument("--page-size", type=int, default=16, help="Quest's page size")


def sparse_config(args, method: str):
    from lessismore.config import SparseConfig

    return SparseConfig(
        method=method,
        budget=args.budget,
        recent_ratio=args.recent_ratio,
        sink_tokens=args.sink_tokens,
        selection_layers=args.selection_layers,
        page_size=args.page_size,
    )


def _agreement(a: list[int], b: list[int]) -> tuple[float, int | None]:
    n = min(len(a), len(b))
    if n == 0:
        return 0.0, None
    same = [x == y for x, y in zip(a[:n], b[:n])]
    first = next((i for i, s in enumerate(same) if not s), None)
    if first is None and len(a) != len(b):
        first = n
    return sum(same) / n, first


def _hf_generate(model, tokenizer, prompt_ids, args, greedy: bool, stream: bool):
    import torch
    from transformers import TextStreamer

    kwargs = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if greedy or args.temperature == 0:
        kwargs["do_sample"] = False
    else:
        torch.manual_seed(args.seed)
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    if stream:
        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    out = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), **kwargs)
    elapsed = time.perf_counter() - start
    return out[0, prompt_ids.shape[1]:].tolist(), elapsed


def _fast_generate(engine, tokenizer, prompt_ids, args, greedy: bool, stream: bool):
    def show(_, new_ids):
        print(tokenizer.decode(new_ids, skip_special_tokens=True), end="", flush=True)

    start = time.perf_counter()
    (result,) = engine.generate(
        [prompt_ids[0].tolist()],
        max_new_tokens=args.max_new_tokens,
        temperature=0.0 if greedy else args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        on_tokens=show if stream else None,
    )
    elapsed = time.perf_counter() - start
    if stream:
        print()
    return result.token_ids, elapsed


class _Runner:
    """One model behind the two back ends: the HF path (``lessismore.enable``) or the fast engine."""

    def __init__(self, args):
        self.args = args
        if args.engine == "fast":
            from lessismore.engine import Engine

            self.engine = Engine(args.model, cfg=None, device=args.device,
                                 max_batch=1, max_len=args.max_prompt_tokens + args.max_new_tokens)
            self.tokenizer = self.engine.tokenizer
            mc = self.engine.model_config
            self.shape = (mc.model_type, mc.num_layers, mc.hidden_size)
        else:
            from lessismore.models import load_model

            self.model, self.tokenizer = load_model(args.model, device=args.device)
            self.shape = (self.model.config.model_type, self.model.config.num_hidden_layers, self.model.config.hidden_size)

    def generate(self, cfg, prompt_ids, greedy: bool, stream: bool):
        """(tokens, seconds, kv_read_fraction or None) for method ``cfg`` (None: full attention)."""
        import lessismore as lim

        if self.args.engine == "fast":
            self.engine.set_method(cfg)
            tokens, elapsed = _fast_generate(self.engine, self.tokenizer, prompt_ids, self.args, greedy, stream)
            return tokens, elapsed, None
        if cfg is None:
            tokens, elapsed = _hf_generate(self.model, self.tokenizer, prompt_ids, self.args, greedy, stream)
            return tokens, elapsed, 1.0
        with lim.sparse_attention(self.model, cfg):
            tokens, elapsed = _hf_generate(self.model, self.tokenizer, prompt_ids, self.args, greedy, stream)
            return tokens, elapsed, lim.stats(self.model)["kv_read_fraction"]


def cmd_generate(args) -> int:
    cfg = sparse_config(args, args.method)  # validates before the model loads
    if args.prompt is None:
        with open(args.prompt_file, encoding="utf-8") as f:
            args.prompt = f.read()
    runner = _Runner(args)
    tokenizer = runner.tokenizer
    cfg = cfg.resolve(*runner.shape)
    messages = [{"role": "user", "content": args.prompt}]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    prompt_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(args.device)
    if prompt_ids.shape[1] > args.max_prompt_tokens:
        raise ValueError(f"prompt: {prompt_ids.shape[1]} tokens, over --max-prompt-tokens {args.max_prompt_tokens}")
    method_cfg = None if cfg.method == "full" else cfg
    tokens, elapsed, read_fraction = runner.generate(method_cfg, prompt_ids, greedy=args.temperature == 0,
                                                     stream=not args.quiet)
    result = {
        "engine": args.engine,
        "method": cfg.method,
        "budget": cfg.budget,
        "recent_ratio": cfg.recent_ratio,
        "sink_tokens": cfg.sink_tokens,
        "selection_layers": list(cfg.selection_layers or ()),
        "prompt_tokens": prompt_ids.shape[1],
        "generated_tokens": len(tokens),
        "text": tokenizer.decode(tokens, skip_special_tokens=True),
        "tokens_per_s": len(tokens) / elapsed if elapsed > 0 else None,
        "kv_read_fraction": read_fraction,
    }
    read_text = "n/a (fast engine)" if read_fraction is None else f"{read_fraction:.3f}"
    print(f"\n[{cfg.method} K={cfg.budget}, {args.engine}] {len(tokens)} tokens in {elapsed:.1f} s "
          f"({result['tokens_per_s']:.1f} tok/s), KV read fraction {read_text}", file=sys.stderr)
    if args.compare_full:
        if args.temperature != 0:
            # The comparison is of greedy decodes: decode the sparse method greedily too.
            tokens, _, _ = runner.generate(method_cfg, prompt_ids, greedy=True, stream=False)
        full_tokens, _, _ = runner.generate(None, prompt_ids, greedy=True, stream=False)
        agreement, first = _agreement(tokens, full_tokens)
        result.update(full_text=tokenizer.decode(full_tokens, skip_special_tokens=True), agreement=agreement,
                      first_divergence=first)
        print(f"greedy agreement with full attention: {agreement:.3f} over {min(len(tokens), len(full_tokens))} "
              f"tokens, first divergence: {first}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lessismore.methods import available

    parser = argparse.ArgumentParser(prog="lessismore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with a sparse attention method")
    gen.add_argument("--model", default="default", help="'default', a local HF model folder, or a .gguf file")
    gen.add_argument("--method", default="lessismore", help=f"one of {', '.join(available())}")
    add_sparse_arguments(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--engine", choices=["hf", "fast"], default="hf",
                     help="hf: transformers generate with lessismore.enable; fast: lessismore.Engine")
    gen.add_argument("--max-prompt-tokens", type=int, default=4096, help="fast engine: cache room for the prompt")
    gen.add_argument("--compare-full", action="store_true", help="also decode greedily with full attention")
    gen.add_argument("--json", help="write the result object here")
    gen.add_argument("--quiet", action="store_true", help="don't stream the text")
    gen.set_defaults(func=cmd_generate)

    _add_study_commands(sub)
    return parser


def _add_study_commands(sub) -> None:
    """The evaluation and analysis subcommands; their arguments live beside their code."""
    from lessismore.analysis import cli as analysis_cli
    from lessismore.eval import cli as eval_cli

    commands = [
        ("eval", "accuracy on a reasoning benchmark, methods x budgets", eval_cli.add_eval_arguments, eval_cli.run_eval),
        ("report", "tables and plots from an eval run", eval_cli.add_report_arguments, eval_cli.run_report),
        ("analyze", "attention recall and fidelity along reasoning traces", analysis_cli.add_analyze_arguments,
         analysis_cli.run_analyze),
    ]
    for name, help_text, add_arguments, run in commands:
        parser = sub.add_parser(name, help=help_text)
        add_arguments(parser)
        parser.set_defaults(func=run)


def _validate_generate(args) -> None:
    if args.max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens: must be a positive integer, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {args.top_p}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            _validate_generate(args)
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"lessismore {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
