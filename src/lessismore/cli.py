"""The ``lessismore`` command: generate, eval, report, analyze.

This module imports nothing heavy (torch, transformers, the engine) at import time or while parsing
arguments: each command imports what it needs, so ``lessismore --help`` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time
from pathlib import Path

# ---- help formatting ----------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, False) or the help
    text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default:" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


# ---- the shared sparse-attention options --------------------------------------------------------

# The methods and their settings' defaults, for help texts only: parsing must not import the methods
# (they import torch). tests/test_cli.py checks these against lessismore.methods.
METHOD_NAMES = ("lessismore", "tidaldecode", "quest", "streaming", "oracle", "full")

_NONE_WORDS = ("", "none", "None", "-")


def layer_list(text: str) -> tuple[int, ...]:
    """Comma-separated layer indices; an empty value (or ``none``) is the empty list."""
    if text.strip() in _NONE_WORDS:
        return ()
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices (or '' / none), got {text!r}") from None


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return values


def name_list(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))


# SparseConfig field -> (option, type, help, the methods' default for the help text)
SPARSE_OPTIONS = {
    "budget": ("--budget", int, "K: KV positions a sparse layer reads", "2048"),
    "recent_ratio": ("--recent-ratio", float, "r: share of K kept for the most recent tokens (lessismore)", "0.25"),
    "sink_tokens": ("--sink-tokens", int, "s: first tokens always kept (lessismore, streaming)", "4"),
    "selection_layers": ("--selection-layers", layer_list,
                         "layers that attend fully and choose the set for the layers after them, e.g. 2,12 "
                         "(lessismore, tidaldecode)", "per model"),
    "full_layers": ("--full-layers", layer_list,
                    "layers that always attend fully, e.g. 0,1; '' or none for no full layer (every method "
                    "but full)", "0,1"),
    "page_size": ("--page-size", int, "Quest's page size P (quest)", "16"),
}


def option_name(field: str, sweep: bool = False) -> str:
    """The command-line option of a SparseConfig field (``--budgets`` where budgets are swept)."""
    return "--budgets" if field == "budget" and sweep else SPARSE_OPTIONS[field][0]


def add_sparse_arguments(parser: argparse.ArgumentParser, sweep: bool = False) -> None:
    """The sparse-attention options of generate, eval and analyze: one per SparseConfig field, each
    defaulting to None (the method's own default). ``sweep``: ``--budgets`` (a comma-separated list)
    instead of ``--budget``."""
    group = parser.add_argument_group("sparse attention (each option applies to the methods that use it)")
    for field, (flag, kind, help_text, default) in SPARSE_OPTIONS.items():
        if field == "budget" and sweep:
            group.add_argument("--budgets", type=int_list, default=None, metavar="K[,K...]",
                               help=f"token budgets K to sweep, e.g. 1024,2048; methods without a budget "
                               f"(full) run once (default: each method's, {default})")
            continue
        metavar = "L[,L...]" if kind is layer_list else None
        group.add_argument(flag, type=kind, default=None, metavar=metavar,
                           help=f"{help_text} (default: the method's, {default})")


def sparse_settings(args) -> dict:
    """The shared settings given on the command line (None: not given), keyed by SparseConfig field;
    ``budget`` is absent where budgets are swept (``--budgets``)."""
    return {field: getattr(args, field) for field in SPARSE_OPTIONS if hasattr(args, field)}


def check_methods(names, flag: str = "--methods") -> tuple[str, ...]:
    """The method names, each registered (ValueError naming ``flag`` otherwise)."""
    from lessismore import methods

    names = tuple(names)
    if not names:
        raise ValueError(f"{flag}: give at least one method")
    for name in names:
        if name not in methods.available():
            raise ValueError(f"{flag}: unknown method {name!r}; allowed: {', '.join(methods.available())}")
    return names


def check_sparse_options(args, method_names, used_anyway=()) -> None:
    """Refuse an option that none of the methods uses (``--page-size: not used by tidaldecode``);
    ``used_anyway``: fields the command itself uses whatever the methods (analyze's budget)."""
    from lessismore import methods

    sweep = hasattr(args, "budgets")
    given = dict(sparse_settings(args))
    if sweep and args.budgets:
        given["budget"] = args.budgets
    for field, value in given.items():
        if value is None or field in used_anyway:
            continue
        if not any(field in methods.get(m).settings for m in method_names):
            users = [m for m in methods.available() if field in methods.get(m).settings]
            raise ValueError(f"{option_name(field, sweep)}: not used by {', '.join(method_names)} "
                             f"(used by {', '.join(users)})")


def _config(method: str, settings: dict, sweep: bool):
    from lessismore.config import SparseConfig

    try:
        return SparseConfig.for_method(method, **settings)
    except ValueError as e:  # "field: message" -> the option, and the method
        field, _, message = str(e).partition(": ")
        flag = option_name(field, sweep) if field in SPARSE_OPTIONS else field
        budget = f", budget {settings['budget']}" if sweep and settings.get("budget") is not None else ""
        raise ValueError(f"{flag}: {message} (method {method}{budget})") from None


def sparse_configs(args, method_names, flag: str = "--methods", used_anyway=()) -> list:
    """The SparseConfig of every method from the shared options (``SparseConfig.for_method``: each
    method takes the options it uses, the others keep its defaults); with ``--budgets`` one per method
    and budget (the method's default budget where none is given), methods without a budget once.
    ValueError naming the option for an option none of the methods uses (nor ``used_anyway``) or a
    value a method refuses."""
    from lessismore import methods

    method_names = check_methods(method_names, flag)
    check_sparse_options(args, method_names, used_anyway)
    settings = sparse_settings(args)
    if not hasattr(args, "budgets"):
        return [_config(m, settings, sweep=False) for m in method_names]
    return [_config(m, settings if b is None else {**settings, "budget": b}, sweep=True)
            for m, b in methods.budget_grid(method_names, args.budgets or ())]


def config_dict(cfg) -> dict:
    """A SparseConfig as JSON-ready values (tuples as lists)."""
    from lessismore.config import SETTINGS

    out = {"method": cfg.method}
    for field in SETTINGS:
        value = getattr(cfg, field)
        out[field] = list(value) if isinstance(value, tuple) else value
    return out


# ---- checks made before any model loads ----------------------------------------------------------

def check_device(device: str | None) -> None:
    """cpu, cuda, cuda:N or mps, and present on this machine (ValueError naming --device)."""
    if device is None or device == "cpu":
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if device == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ValueError("--device: mps requested but no MPS device is available")
        return
    if match is None:
        raise ValueError(f"--device: expected cpu, cuda, cuda:N or mps, got {device!r}")
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"--device: {device} requested but no CUDA device is available")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise ValueError(f"--device: {device} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")


def check_model(spec: str) -> None:
    """``models.check_spec`` (nothing is loaded), and a tokenizer in a model folder: one-line
    ValueError naming --model otherwise."""
    from lessismore import models

    try:
        path = models.check_spec(spec)
    except ValueError as e:
        raise ValueError(f"--model: {str(e).partition(': ')[2]}") from None
    if path is not None and path.suffix != ".gguf" and not models.has_tokenizer(path):
        raise ValueError(f"--model: {path} has no tokenizer (looked for {', '.join(models.TOKENIZER_FILES)})")


def check_writable_file(flag: str, path: str) -> None:
    """The file can be written (it is opened for append; a file made by the check is removed)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag}: {p} is a folder, expected a file path")
    existed = p.exists()
    try:
        with open(p, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise ValueError(f"{flag}: cannot write {p}: {e.strerror or e}") from None
    if not existed:
        p.unlink()


def check_writable_folder(flag: str, path: str) -> None:
    """The folder exists or can be made, and files can be written into it."""
    import tempfile

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag}: {p} exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise ValueError(f"{flag}: cannot write into {p}: {e.strerror or e}") from None


# ---- generate -----------------------------------------------------------------------------------


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
        from lessismore.config import FULL

        self.args = args
        if args.engine == "fast":
            from lessismore.engine import Engine

            self.engine = Engine(args.model, cfg=FULL, device=args.device,
                                 max_batch=1, max_len=args.max_prompt_tokens + args.max_new_tokens)
            self.tokenizer = self.engine.tokenizer
            if self.tokenizer is None:
                raise ValueError(f"--model: {args.model} has no tokenizer")
            mc = self.engine.model_config
            self.shape = (mc.model_type, mc.num_layers, mc.hidden_size)
        else:
            from lessismore.models import load_model

            self.model, self.tokenizer = load_model(args.model, device=args.device)
            self.shape = (self.model.config.model_type, self.model.config.num_hidden_layers, self.model.config.hidden_size)

    def generate(self, cfg, prompt_ids, greedy: bool, stream: bool):
        """(tokens, seconds, kv_read_fraction or None) for the SparseConfig ``cfg``."""
        import lessismore as lim
        from lessismore import methods

        if self.args.engine == "fast":
            self.engine.set_method(cfg)
            tokens, elapsed = _fast_generate(self.engine, self.tokenizer, prompt_ids, self.args, greedy, stream)
            try:  # the executor's counters: the same counting as the HF path's lim.stats
                return tokens, elapsed, self.engine.kv_stats()["kv_read_fraction"]
            except ValueError:  # no decode step ran (one new token)
                return tokens, elapsed, None
        if methods.get(cfg.method).dense:
            tokens, elapsed = _hf_generate(self.model, self.tokenizer, prompt_ids, self.args, greedy, stream)
            return tokens, elapsed, 1.0
        with lim.sparse_attention(self.model, cfg):
            tokens, elapsed = _hf_generate(self.model, self.tokenizer, prompt_ids, self.args, greedy, stream)
            return tokens, elapsed, lim.stats(self.model)["kv_read_fraction"]


def _read_prompt(args) -> str:
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt: the prompt is empty")
        return args.prompt
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"--prompt-file: cannot read {args.prompt_file}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--prompt-file: {args.prompt_file} is not UTF-8 text") from None
    if not text.strip():
        raise ValueError(f"--prompt-file: {args.prompt_file} is empty")
    return text


def _validate_generate(args) -> None:
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens: must be a positive integer, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature: must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p: must be in (0, 1], got {args.top_p}")
    if args.max_prompt_tokens <= 0:
        raise ValueError(f"--max-prompt-tokens: must be a positive integer, got {args.max_prompt_tokens}")


def cmd_generate(args) -> int:
    # Everything that can be checked is checked before the model loads.
    _validate_generate(args)
    (cfg,) = sparse_configs(args, [args.method], flag="--method")
    prompt = _read_prompt(args)
    check_device(args.device)
    check_model(args.model)
    if args.json:
        check_writable_file("--json", args.json)

    from lessismore.config import FULL

    runner = _Runner(args)
    tokenizer = runner.tokenizer
    cfg = cfg.resolve(*runner.shape)
    messages = [{"role": "user", "content": prompt}]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    prompt_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(args.device)
    if prompt_ids.shape[1] == 0:
        raise ValueError("--prompt: the prompt has no tokens")
    if prompt_ids.shape[1] > args.max_prompt_tokens:
        raise ValueError(f"--prompt: {prompt_ids.shape[1]} tokens, over --max-prompt-tokens {args.max_prompt_tokens}")
    tokens, elapsed, read_fraction = runner.generate(cfg, prompt_ids, greedy=args.temperature == 0, stream=not args.quiet)
    result = {
        "engine": args.engine,
        **config_dict(cfg),
        "prompt_tokens": prompt_ids.shape[1],
        "generated_tokens": len(tokens),
        "text": tokenizer.decode(tokens, skip_special_tokens=True),
        "tokens_per_s": len(tokens) / elapsed if elapsed > 0 else None,
        "kv_read_fraction": read_fraction,
    }
    read_text = "n/a (no decode step)" if read_fraction is None else f"{read_fraction:.3f}"
    label = cfg.method + (f" K={cfg.budget}" if cfg.budget is not None else "")
    speed = f"{result['tokens_per_s']:.1f} tok/s" if result["tokens_per_s"] is not None else "n/a tok/s"
    print(f"\n[{label}, {args.engine}] {len(tokens)} tokens in {elapsed:.1f} s ({speed}), "
          f"KV read fraction {read_text}", file=sys.stderr)
    if args.compare_full:
        if args.temperature != 0:
            # The comparison is of greedy decodes: decode the sparse method greedily too.
            tokens, _, _ = runner.generate(cfg, prompt_ids, greedy=True, stream=False)
        full_tokens, _, _ = runner.generate(FULL, prompt_ids, greedy=True, stream=False)
        agreement, first = _agreement(tokens, full_tokens)
        result.update(full_text=tokenizer.decode(full_tokens, skip_special_tokens=True), agreement=agreement,
                      first_divergence=first)
        print(f"greedy agreement with full attention: {agreement:.3f} over {min(len(tokens), len(full_tokens))} "
              f"tokens, first divergence: {first}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


def add_generate_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a local HF model folder, or a .gguf file")
    gen.add_argument("--method", default="lessismore", help=f"one of {', '.join(METHOD_NAMES)}")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user message")
    src.add_argument("--prompt-file", help="a UTF-8 file holding the user message")
    gen.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    gen.add_argument("--engine", choices=["hf", "fast"], default="hf",
                     help="hf: transformers generate with lessismore.enable; fast: lessismore.Engine")
    gen.add_argument("--max-prompt-tokens", type=int, default=4096, help="longest prompt (the fast engine's cache room)")
    gen.add_argument("--compare-full", action="store_true", help="also decode greedily with full attention")
    gen.add_argument("--json", help="write the result object to this file")
    gen.add_argument("--quiet", action="store_true", help="don't stream the text")
    add_sparse_arguments(gen)


# ---- the parser ---------------------------------------------------------------------------------

# name -> (help, "module:function" adding the arguments, "module:function" running the command).
# Each command's module is imported only when that command is parsed or run.
COMMANDS = {
    "generate": ("generate text with a sparse attention method",
                 "lessismore.cli:add_generate_arguments", "lessismore.cli:cmd_generate"),
    "eval": ("accuracy on a reasoning benchmark, methods x budgets",
             "lessismore.eval.cli:add_eval_arguments", "lessismore.eval.cli:run_eval"),
    "report": ("tables and plots from an eval run",
               "lessismore.eval.cli:add_report_arguments", "lessismore.eval.cli:run_report"),
    "analyze": ("attention recall and fidelity along reasoning traces",
                "lessismore.analysis.cli:add_analyze_arguments", "lessismore.analysis.cli:run_analyze"),
}


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or (``only``) with the arguments of that command alone, so the
    other commands' modules are not imported."""
    parser = argparse.ArgumentParser(prog="lessismore", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if only is None or only == name:
            _resolve(add_arguments)(cmd)
            cmd.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    try:
        return int(_resolve(args.func)(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"lessismore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lessismore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
