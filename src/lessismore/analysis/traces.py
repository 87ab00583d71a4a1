"""Reasoning traces: loading, tokenizing, truncating, and packing into left-padded batches."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

PACKAGED_TRACES = Path(__file__).resolve().parent.parent / "data" / "traces.jsonl"


@dataclass
class Trace:
    """One trace as tokens: ``ids`` = prompt + trace (truncated), the first ``prompt_len`` the prompt."""

    id: str
    ids: list[int]
    prompt_len: int


def load_traces(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """Rows of a traces JSONL file (fields ``prompt`` and ``trace`` at least; ``id`` optional). The
    default is the packaged file (32 traces, see data/TRACES.md)."""
    from lessismore.eval.tasks import read_jsonl

    path = Path(path) if path is not None else PACKAGED_TRACES
    rows = read_jsonl(path, "traces")
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("trace"), str):
            raise ValueError(f"traces: row {number} of {path} needs string fields 'prompt' and 'trace'")
        row.setdefault("id", f"{path.name}:{number}")
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise ValueError(f"traces: {path} holds no traces")
    return rows


def encode_traces(tokenizer, rows: list[dict], max_tokens: int | None = None) -> list[Trace]:
    """Tokenize prompt (with the tokenizer's special tokens, e.g. BOS) and trace (without) separately,
    so the prompt boundary is exact; truncate prompt + trace to ``max_tokens``."""
    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=True).input_ids
        trace = tokenizer(row["trace"], add_special_tokens=False).input_ids
        ids = (prompt + trace)[: max_tokens or None]
        if len(ids) <= len(prompt):
            raise ValueError(
                f"max_tokens: {max_tokens} leaves no trace token of {row['id']} (its prompt has {len(prompt)} tokens)"
            )
        out.append(Trace(id=str(row["id"]), ids=ids, prompt_len=len(prompt)))
    return out


@dataclass
class Batch:
    """Traces left-padded to one length. Columns [0, start) are prefilled; each column s >= start is
    then fed as one decode step. ``first_trace[i]``: the column of row i's first trace token."""

    traces: list[Trace]
    ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    pad: torch.Tensor  # [B]
    first_trace: torch.Tensor  # [B]
    start: int


def make_batch(traces: list[Trace], pad_id: int) -> Batch:
    length = max(len(t.ids) for t in traces)
    ids = torch.full((len(traces), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    pad = torch.tensor([length - len(t.ids) for t in traces])
    for i, t in enumerate(traces):
        ids[i, pad[i]:] = torch.tensor(t.ids)
        mask[i, pad[i]:] = 1
    first_trace = pad + torch.tensor([t.prompt_len for t in traces])
    start = int(first_trace.min())
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return Batch(traces, ids, mask, position_ids, pad, first_trace, start)


def pack_batches(traces: list[Trace], batch_size: int, pad_id: int) -> list[Batch]:
    """Batches of up to ``batch_size`` traces of similar length. A batch is only formed where every row
    has a real token in the prefill (its padding ends before the shortest prompt does)."""
    order = sorted(traces, key=lambda t: -len(t.ids))
    batches, current = [], []
    for t in order:
        trial = current + [t]
        if current and (len(trial) > batch_size or not _prefill_ok(trial)):
            batches.append(make_batch(current, pad_id))
            trial = [t]
        current = trial
    if current:
        batches.append(make_batch(current, pad_id))
    return batches


def _prefill_ok(traces: list[Trace]) -> bool:
    length = max(len(t.ids) for t in traces)
    pads = [length - len(t.ids) for t in traces]
    start = min(p + t.prompt_len for p, t in zip(pads, traces))
    return max(pads) < start
