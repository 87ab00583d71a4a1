"""The evaluation run: a grid of methods x budgets over a task's problems, written one JSON line per
finished (problem, sample, method, budget), resumable and sharded across torchrun processes.

Layout of an output folder:
- ``run.json``: the settings that must not change between runs into the same folder (task, data,
  model, sampling, and the sparse options resolved to the methods' defaults). Methods, budgets, n and
  limit may grow on a later run.
- ``samples.rank<R>.jsonl``: the records written by rank R (``RANK``/``WORLD_SIZE`` from torchrun;
  rank 0 of 1 without it). Problems go to ranks round-robin. ``report`` merges every file.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lessismore.eval.generation import Generator, SamplingParams
from lessismore.eval.grading import grade_response
from lessismore.eval.prompts import build_prompt, has_chat_template
from lessismore.eval.tasks import DEFAULT_N, TASKS, Problem, data_path, file_sha256, load_task

RUN_FILE = "run.json"
SAMPLES_GLOB = "samples*.jsonl"
# The SparseConfig fields shared by every cell of a run (the budget is the grid's).
SPARSE_FIELDS = ("recent_ratio", "sink_tokens", "selection_layers", "full_layers", "page_size")
# Options added after the first folders were made, with the value those folders ran with.
_ADDED_OPTIONS = {"full_layers": [0, 1], "page_size": 16}


@dataclass
class EvalSettings:
    task: str
    out: str
    methods: list[str]
    budgets: list[int] = field(default_factory=list)
    model: str = "default"
    data: str | None = None
    n: int | None = None  # None: the task's default (16 AIME, 8 MATH500/GPQA)
    limit: int | None = None
    max_new_tokens: int = 32768
    temperature: float = 0.6
    top_p: float = 0.95
    batch_size: int = 8
    seed: int = 0
    # The sparse-attention options shared by the methods (SparseConfig fields but the budget); None:
    # each method's default. Each method takes those it uses (SparseConfig.for_method).
    recent_ratio: float | None = None
    sink_tokens: int | None = None
    selection_layers: tuple[int, ...] | None = None
    full_layers: tuple[int, ...] | None = None
    page_size: int | None = None
    device: str | None = None

    def validate(self) -> "EvalSettings":
        """Check every field (ValueError naming it) and fill in defaults; returns self."""
        from lessismore import methods

        if self.task not in TASKS:
            raise ValueError(f"task: unknown task {self.task!r}; allowed: {', '.join(TASKS)}")
        data_path(self.task, self.data)  # gpqa needs --data
        if self.data is not None and not Path(self.data).is_file():
            raise ValueError(f"data: no such file: {self.data}")
        if not self.out:
            raise ValueError("out: an output folder is required")
        if self.n is None:
            self.n = DEFAULT_N[self.task]
        for name in ("n", "limit", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if value is None and name == "limit":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not (self.temperature >= 0):
            raise ValueError(f"temperature: must be >= 0 (0 is greedy), got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not self.methods:
            raise ValueError("methods: give at least one method")
        self.methods = list(dict.fromkeys(self.methods))
        for m in self.methods:
            if m not in methods.available():
                raise ValueError(f"methods: unknown method {m!r}; allowed: {', '.join(methods.available())}")
        self.budgets = list(dict.fromkeys(self.budgets))
        for b in self.budgets:
            if not isinstance(b, int) or isinstance(b, bool) or b < 1:
                raise ValueError(f"budgets: must be positive integers, got {b!r}")
        budgeted = [m for m in self.methods if "budget" in methods.get(m).settings]
        if self.budgets and not budgeted:
            raise ValueError(f"budgets: not used by {', '.join(self.methods)}")
        for name, value in self.options().items():
            if value is not None and not any(name in methods.get(m).settings for m in self.methods):
                raise ValueError(f"{name}: not used by {', '.join(self.methods)}")
        for name in ("selection_layers", "full_layers"):  # as SparseConfig holds them: sorted, once each
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
                setattr(self, name, tuple(sorted(set(value))) if all(isinstance(x, int) for x in value) else tuple(value))
        for method, budget in self.grid():  # the config checks (sink tokens < budget, ratio, layers)
            self.sparse_config(method, budget)
        return self

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=float(self.temperature), top_p=float(self.top_p), max_new_tokens=self.max_new_tokens)

    def options(self) -> dict:
        """The shared sparse options (None: not given), by SparseConfig field."""
        return {name: getattr(self, name) for name in SPARSE_FIELDS}

    def grid(self) -> list[tuple[str, int | None]]:
        """(method, budget) cells in the order given: each budget (none given: the method's default
        budget); a method without a budget (full attention) once, with budget None."""
        from lessismore import methods

        return methods.budget_grid(self.methods, self.budgets or ())

    def sparse_config(self, method: str, budget: int | None):
        """The SparseConfig of a cell (``SparseConfig(method="full")`` for full attention)."""
        from lessismore.config import SparseConfig

        try:
            return SparseConfig.for_method(method, budget=budget, **self.options())
        except ValueError as e:  # "field: message" -> the command-line field, and the cell
            name, _, message = str(e).partition(": ")
            name = {"budget": "budgets"}.get(name, name)
            cell = f"method {method}" + (f", budget {budget}" if budget is not None else "")
            raise ValueError(f"{name}: {message} ({cell})") from None

    def resolved_options(self) -> dict:
        """Each sparse option as the methods run it: the value given, else the default of the methods
        that use it (a {method: default} map where their defaults differ). Independent of the methods
        chosen, so a later run may add methods to the folder."""
        from lessismore import methods

        out = {}
        for name, value in self.options().items():
            if value is None:
                defaults = {m: methods.get(m).settings[name] for m in methods.available()
                            if name in methods.get(m).settings}
                distinct = {repr(v) for v in defaults.values()}
                value = next(iter(defaults.values())) if len(distinct) == 1 else defaults
            elif name == "recent_ratio":
                value = float(value)  # as SparseConfig holds it: --recent-ratio 1 and 1.0 are one run
            out[name] = _jsonable(value)
        return out

    def fixed(self) -> dict:
        """The settings a folder is bound to (must match when resuming)."""
        path = data_path(self.task, self.data)
        return {
            "task": self.task,
            "data_sha256": file_sha256(path),
            "model": self.model,
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            **self.resolved_options(),
        }


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


def sample_seed(base_seed: int, problem_id: str, sample: int) -> int:
    """A sample's seed: fixed by (base seed, problem, sample index) and the same for every method and
    budget, so methods are compared on the same random draws."""
    digest = hashlib.sha256(f"{base_seed}/{problem_id}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31 - 1)


def shard() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) without it."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError("RANK/WORLD_SIZE: must be integers") from None
    if world < 1 or not (0 <= rank < world):
        raise ValueError(f"RANK/WORLD_SIZE: need 0 <= RANK < WORLD_SIZE, got {rank}/{world}")
    return rank, world


def record_key(r: dict) -> tuple:
    return (str(r["problem_id"]), int(r["sample"]), r["method"], r["budget"])


def read_records(out: str | Path) -> list[dict]:
    """Every record in the folder's sample files (all ranks), first copy of each key kept. A line cut
    short by a kill (not valid JSON) is skipped."""
    seen, records = set(), []
    for path in sorted(Path(out).glob(SAMPLES_GLOB)):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                    key = record_key(r)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue
                if key not in seen:
                    seen.add(key)
                    records.append(r)
    return records


def _repair_tail(path: Path) -> None:
    """Drop a last line cut short by a kill, so new records start on a line of their own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def bind_folder(settings: EvalSettings) -> None:
    """Create the folder and its run.json, or check that an existing one was made with the same
    settings (ValueError naming the first that differs)."""
    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    fixed = settings.fixed()
    path = out / RUN_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())["fixed"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"out: {path} is not a run file of lessismore eval") from None
        for key, value in fixed.items():
            if key not in old and key in _ADDED_OPTIONS:
                old[key] = _ADDED_OPTIONS[key]
            if old.get(key) != value:
                raise ValueError(
                    f"out: {out} holds a run with {key}={old.get(key)!r}, this run has {key}={value!r}; "
                    "use another --out folder"
                )
        return
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"fixed": fixed, "n": settings.n}, indent=2) + "\n")
    os.replace(tmp, path)  # ranks write the same content; the last replace wins


@dataclass
class _Work:
    problem: Problem
    sample: int
    seed: int


def evaluate(settings: EvalSettings, generator: Generator | None = None, progress: bool = True) -> dict:
    """Run the grid and append the records of this rank. Finished samples (any rank's file) are
    skipped. Returns {"written": samples written now, "skipped": already finished, "file": path}."""
    settings.validate()
    rank, world = shard()
    problems = load_task(settings.task, settings.data, settings.limit)[rank::world]
    bind_folder(settings)
    out = Path(settings.out)
    done = {record_key(r) for r in read_records(out)}
    cells = settings.grid()
    todo = {
        cell: [
            _Work(p, s, sample_seed(settings.seed, p.id, s))
            for p in problems
            for s in range(settings.n)
            if (p.id, s, cell[0], cell[1]) not in done
        ]
        for cell in cells
    }
    total = sum(len(v) for v in todo.values())
    skipped = len(problems) * settings.n * len(cells) - total
    path = out / f"samples.rank{rank}.jsonl"
    result = {"written": 0, "skipped": skipped, "file": str(path)}
    if total == 0:
        return result
    if generator is None:
        from lessismore.eval.generation import load_hf_generator

        if progress:
            print(f"eval: loading model {settings.model} ...", file=sys.stderr, flush=True)
        generator = load_hf_generator(settings.model, settings.device)
    _check_against_model(generator, [settings.sparse_config(m, b) for m, b in cells])
    tokenizer = getattr(generator, "tokenizer", None)
    prompts: dict[str, str] = {}

    def prompt_of(p: Problem) -> str:
        if p.id not in prompts:
            prompts[p.id] = build_prompt(tokenizer, p.user_message) if tokenizer is not None else p.user_message
        return prompts[p.id]

    from tqdm.auto import tqdm

    _repair_tail(path)
    templated = tokenizer is not None and has_chat_template(tokenizer)
    # Shown wherever stderr goes (a terminal or a log), as analyze's is: a batch of long generations
    # takes minutes, so the postfix also counts the current batch's tokens (backends with on_step).
    bar = tqdm(total=total, desc=f"eval {settings.task}", unit="sample", disable=not progress, file=sys.stderr)
    cell_label = ""
    last_shown = [0.0]

    def on_step(tokens: int) -> None:
        now = time.monotonic()
        if now - last_shown[0] >= 1.0:
            last_shown[0] = now
            bar.set_postfix_str(f"{cell_label}, batch at token {tokens}")

    stepping = progress and hasattr(generator, "on_step")
    if stepping:
        generator.on_step = on_step
    try:
        with open(path, "a", encoding="utf-8") as f:
            for (method, budget), work in todo.items():
                sparse = settings.sparse_config(method, budget)
                cell_label = method + (f"@{budget}" if budget is not None else "")
                bar.set_postfix_str(cell_label)
                for i in range(0, len(work), settings.batch_size):
                    batch = work[i : i + settings.batch_size]
                    completions = generator.generate(
                        [prompt_of(w.problem) for w in batch], [w.seed for w in batch], settings.sampling, sparse
                    )
                    for w, c in zip(batch, completions):
                        rec = make_record(settings, w, method, budget, c, rank)
                        rec["chat_template"] = templated
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()
                    result["written"] += len(batch)
                    bar.update(len(batch))
    finally:
        if stepping:
            generator.on_step = None
        bar.close()
    return result


def _check_against_model(generator, configs) -> None:
    """Resolve each sparse config against the generator's model (layer indices in range) before any
    work, so a bad cell fails at the start rather than after hours of the cells before it."""
    config = getattr(getattr(generator, "model", None), "config", None)
    engine_config = getattr(getattr(generator, "engine", None), "model_config", None)
    if config is not None:
        shape = (config.model_type, config.num_hidden_layers, config.hidden_size)
    elif engine_config is not None:
        shape = (engine_config.model_type, engine_config.num_layers, engine_config.hidden_size)
    else:
        return
    for cfg in configs:
        cfg.resolve(*shape)


def make_record(settings: EvalSettings, w: _Work, method: str, budget: int | None, c, rank: int) -> dict:
    g = grade_response(c.text, w.problem.answer, multiple_choice=w.problem.is_multiple_choice)
    return {
        "task": settings.task,
        "problem_id": w.problem.id,
        "sample": w.sample,
        "method": method,
        "budget": budget,
        "seed": w.seed,
        "temperature": float(settings.temperature),
        "top_p": float(settings.top_p),
        "max_new_tokens": settings.max_new_tokens,
        "answer": w.problem.answer,
        "extracted": g.extracted,
        "correct": g.correct,
        "grade_reason": g.reason,
        "gen_tokens": c.num_tokens,
        "finished": c.finished,
        "truncated": (not c.finished) and c.num_tokens >= settings.max_new_tokens,
        "prompt_tokens": c.prompt_tokens,
        "prefill_seconds": round(c.prefill_seconds, 6),
        "decode_seconds": round(c.decode_seconds, 6),
        "kv_read_fraction": c.kv_read_fraction,
        "rank": rank,
        "response": c.text,
    }
