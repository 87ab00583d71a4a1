"""The decode-step executor: one implementation of a sparse decode step, for every integration.

An integration (HF transformers, the engine, vLLM) is an adapter: for each layer of a decode step it
hands the executor this step's queries and a ``DecodeCache`` (its cache seen as keys and values of
each row, with the rows' token counts), and gets the attention output back. The executor owns what
a step means across layers:

- the role of each layer (``Method.layer_roles``): FULL, SELECT_DENSE, SELECT_SPARSE or SPARSE;
- the set a selection layer chooses, carried to the layers after it and dropped at the next step;
- the choice of path: a method's fused GPU selection (``Method.fused_attention``) where the cache can
  give scores, a method's fast selection from its per-layer state (``Method.fast_select``) where the
  cache carries one (``DecodeCache.state``, kept by the engine), else the method's reference ``select``;
- KV-read counting (device tensors, so a captured CUDA graph keeps counting) and observers;
- with ``overlap`` (the engine on CUDA), the fused path's top-k and union on a second stream: they
  run beside the layer's output projection and MLP and the next layer's projections, and the main
  stream waits for them only where a sparse layer first reads the set.

Everything stays on the device: no host synchronization, fixed shapes, capturable in a CUDA graph.
"""
from __future__ import annotations

from typing import Callable

import torch

from lessismore import methods, ops
from lessismore.config import SparseConfig, require_sparse_config
from lessismore.methods import LayerRole, Selection
from lessismore.ops import naive

# (layer, role, q [B,Hq,D], k [B,Hkv,L,D], v, valid [B,L], selection | None, out [B,Hq,D]); called
# in eager steps only (never inside a captured CUDA graph).
Observer = Callable[..., None]


class DecodeCache:
    """One layer's cache for the rows of a decode step, the current token already written.

    Contiguous layout: k, v [B, Hkv, L, D]. Row b's tokens are the slots marked by ``valid`` [B, L]
    (any pattern, e.g. left padding), or, when ``lengths`` [B] is given, slots 0..lengths[b]-1 (the
    layout the Triton kernels read). Integrations with another layout (a paged cache) subclass it
    and override the readers.

    ``state``: the method's per-layer decode state (``Method.decode_state``) for these rows, its first
    B rows being rows 0..B-1 of the cache; None where the integration keeps none (HF, vLLM).
    """

    state = None

    def __init__(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None, kernels: bool | None = None, state=None):
        if (lengths is None) == (valid is None):
            raise ValueError("DecodeCache: give exactly one of lengths and valid")
        if state is not None and lengths is None:
            raise ValueError("DecodeCache: a method state needs the lengths layout")
        self.k, self.v, self.lengths, self._valid = k, v, lengths, valid
        self.state = state
        # Whether the Triton kernels read this cache (None: wherever Triton runs; the CPU tests force
        # them under the interpreter).
        self.kernels = ops.triton_usable(k) if kernels is None else kernels

    @property
    def span(self) -> int:
        """L: the slots a row may occupy (sizes selections and score buffers)."""
        return self.k.shape[2]

    @property
    def triton_readable(self) -> bool:
        """Whether the Triton kernels read this cache (the lengths layout, kernels on): where the dense
        pass and a method's fused selection can run."""
        return self.lengths is not None and self.kernels

    def valid(self) -> torch.Tensor:
        """[B, L] bool: the slots holding row b's tokens."""
        if self._valid is None:
            self._valid = torch.arange(self.span, device=self.lengths.device) < self.lengths.view(-1, 1)
        return self._valid

    def token_counts(self) -> torch.Tensor:
        """[B]: tokens of each row."""
        return self.lengths if self.lengths is not None else self.valid().sum(-1)

    _keys = None

    def keys(self) -> torch.Tensor:
        """[B, Hkv, L, D]: the keys as the reference selections read them (read once per layer)."""
        if self._keys is None:
            self._keys = self._read_all(keys=True)
        return self._keys

    def values(self) -> torch.Tensor:
        return self._read_all(keys=False)

    def _read_all(self, keys: bool) -> torch.Tensor:
        """Every slot of the span, keys or values, contiguous [B, Hkv, L, D] (a paged cache gathers)."""
        return self.k if keys else self.v

    def dense(self, q: torch.Tensor, scale: float | None) -> torch.Tensor:
        """Full attention over each row's tokens: [B, Hq, D]."""
        if self.triton_readable:
            return ops.triton_decode.dense_decode_attention(q, self.k, self.v, self.lengths, scale)
        return naive.masked_decode_attention(q, self.k, self.v, self.valid(), scale)

    def dense_with_scores(self, q: torch.Tensor, scale: float | None, score_lo: int, score_window: int):
        """(out [B, Hq, D], scores [B, Hq, L] fp32) in one pass: the unscaled q.k at slots
        score_lo <= pos < n - score_window, -inf elsewhere. None where this cache has no such kernel
        (the executor then takes the reference path)."""
        if not self.triton_readable:
            return None
        scores = torch.empty(q.shape[0], q.shape[1], self.span, device=q.device, dtype=torch.float32)
        out = ops.triton_decode.split_decode(q, self.k, self.v, None, self.lengths, scale, dense=True, scores=scores,
                                             score_lo=score_lo, score_window=score_window)
        return out, scores

    def sparse(self, q: torch.Tensor, selection: Selection, scale: float | None) -> torch.Tensor:
        """Attention over the selected positions only: [B, Hq, D]."""
        return ops.decode_attention(q, self.k, self.v, selection, scale, triton=self.kernels)


def _selection_readers(roles: list[LayerRole]) -> list[int]:
    """For each layer that chooses a set, how many layers read it (its own SELECT_SPARSE layer and the
    SPARSE layers after it, up to the next choice); 0 for every other layer."""
    readers = [0] * len(roles)
    chooser = None
    for i, role in enumerate(roles):
        if role in (LayerRole.SELECT_DENSE, LayerRole.SELECT_SPARSE):
            chooser = i
        if role in (LayerRole.SELECT_SPARSE, LayerRole.SPARSE) and chooser is not None:
            readers[chooser] += 1
    return readers


class DecodeExecutor:
    """One method's decode step across the layers of a model.

    Call ``begin_step`` once per decode step (before layer 0), then ``layer`` for every layer in
    order. ``fused=False`` keeps the selection layers on the reference path (dense attention, then
    ``Method.select``; a method state is still kept up to date); otherwise a method's fused path runs
    wherever the cache offers it, and its fast path wherever the cache carries a state.
    ``overlap`` (default off; set before the first step): the fused path finishes its set on a
    second CUDA stream (see the module's docstring); the sets and outputs are the same.
    """

    def __init__(self, cfg: SparseConfig, num_layers: int, fused: bool = True):
        require_sparse_config(cfg)
        self.cfg = cfg
        self.method = methods.get(cfg.method)
        self.roles = self.method.layer_roles(cfg, num_layers)
        self._dense_layers = sum(r in (LayerRole.FULL, LayerRole.SELECT_DENSE) for r in self.roles)
        self._readers = _selection_readers(self.roles)
        self.fused = fused
        self.observers: list[Observer] = []
        self.selection: Selection | None = None
        self.shard_group = None  # a process group: the method selects across tensor-parallel ranks
        self.overlap = False
        self._side: torch.cuda.Stream | None = None
        self._pending = None  # (side stream, the finish that runs there): held until the main stream waits
        self._stats: dict[str, torch.Tensor] | None = None
        self._rows: torch.Tensor | None = None

    # ---- counters ---------------------------------------------------------------------------------

    def reset_stats(self, device) -> None:
        """Zero the read counters (in place once they exist: captured graphs keep their addresses)."""
        if self._stats is None or next(iter(self._stats.values())).device != torch.device(device):
            self._stats = {name: torch.zeros((), dtype=torch.float64, device=device)
                           for name in ("selected_read", "tokens", "sequence_steps")}
        else:
            for t in self._stats.values():
                t.zero_()

    def stats(self) -> dict:
        """KV reads of the decode steps since the last ``reset_stats``: ``kv_positions_per_layer`` is the
        mean number of positions a layer read per sequence and step (per-head methods: averaged over
        query heads); ``kv_read_fraction`` that read over what full attention would read."""
        steps = 0 if self._stats is None else int(self._stats["sequence_steps"])
        if steps == 0:
            raise ValueError("no decode step has run since the counters were reset")
        tokens = float(self._stats["tokens"])
        read = float(self._stats["selected_read"]) + tokens * self._dense_layers
        full = tokens * len(self.roles)
        return {
            "method": self.cfg.method,
            "budget": self.cfg.budget,
            "sequence_steps": steps,
            "kv_positions_per_layer": read / (steps * len(self.roles)),
            "kv_read_fraction": read / full if full else 1.0,
        }

    def _count(self, name: str, per_row: torch.Tensor, scale: float = 1.0) -> None:
        """counter += scale * the sum of per_row ([B] or [B, H]) over the counted rows: three launches
        at most (mask, sum in float64, add), as a step counts several times."""
        if self._rows is not None:
            per_row = per_row * (self._rows if per_row.dim() == 1 else self._rows[:, None])
        self._stats[name].add_(per_row.sum(dtype=torch.float64), alpha=scale)

    # ---- the step ---------------------------------------------------------------------------------

    def begin_step(self, rows: torch.Tensor | None = None) -> None:
        """Start a decode step: forget the last step's set. ``rows`` [B] bool: the rows to count (the
        engine's active rows); None counts every row."""
        self._join()
        self.selection = None
        self._rows = rows

    def end_step(self) -> None:
        """Drop the references a step holds (a captured graph's pool must not outlive them)."""
        self._join()
        self.selection = None
        self._rows = None

    def _finish_aside(self, finish: Callable[[], Selection], index: int) -> Selection:
        """Run a fused path's finish (and the count of what its set's readers read) on the side stream,
        after everything queued so far on the main stream."""
        main = torch.cuda.current_stream()
        if self._side is None or self._side.device != main.device:
            self._side = torch.cuda.Stream(main.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            selection = finish()
            self._count_readers(index, selection)
        # finish holds its inputs (the scores) until the main stream has waited: their memory is not
        # handed to the main stream's kernels while the side stream still reads it.
        self._pending = (self._side, finish)
        return selection

    def _join(self) -> None:
        """The main stream waits for the side stream's set, if one is pending."""
        if self._pending is not None:
            torch.cuda.current_stream().wait_stream(self._pending[0])
            self._pending = None

    def _count_readers(self, index: int, selection: Selection) -> None:
        if self._readers[index]:
            counts = selection.counts  # per-head sets: [B, H], averaged over the heads
            self._count("selected_read", counts, self._readers[index] / (counts.shape[-1] if selection.per_head else 1))

    def _select(self, q, cache: DecodeCache) -> Selection:
        """The reference path's set (or the method's fast one from its state where the cache carries
        one); a query-independent set is made once per step."""
        if self.method.query_independent and self.selection is not None:
            return self.selection
        if cache.state is not None and self.fused and self.shard_group is None:
            fast = self.method.fast_select(self.cfg, q, cache)
            if fast is not None:
                return fast
        return self.method.select_sharded(self.cfg, q, cache.keys(), cache.valid(), self.shard_group)

    def layer(self, index: int, q: torch.Tensor, cache: DecodeCache, scale: float | None = None,
              dense: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """Attention of layer ``index`` for this step: q [B, Hq, D] -> [B, Hq, D]. ``dense``: the
        adapter's own full attention (e.g. SDPA with its mask), else ``cache.dense``."""
        role = self.roles[index]
        if index == 0:
            # What a step reads is known from the lengths and the sets, so it is counted once per
            # step (the tokens, which give the dense and full reads) and once per selection.
            if self._stats is None:
                self.reset_stats(q.device)
            n = cache.token_counts()
            self._count("tokens", n)
            steps = self._stats["sequence_steps"]
            steps.add_(n.numel() if self._rows is None else self._rows.sum(dtype=torch.float64))
        if cache.state is not None:
            self.method.update_state(self.cfg, cache)
        selection = None
        counted = False
        if role in (LayerRole.FULL, LayerRole.SELECT_DENSE):
            fused = None
            if role is LayerRole.SELECT_DENSE and self.shard_group is None and self.fused:
                fused = self.method.fused_attention(self.cfg, q, cache, scale)
            if fused is not None:
                out, finish = fused
                if self.overlap and q.is_cuda and not self.observers:
                    selection, counted = self._finish_aside(finish, index), True
                else:
                    selection = finish()
            else:
                out = dense() if dense is not None else cache.dense(q, scale)
                if role is LayerRole.SELECT_DENSE:
                    selection = self._select(q, cache)
            if selection is not None:
                self.selection = selection
        else:
            self._join()
            if role is LayerRole.SELECT_SPARSE:
                self.selection = self._select(q, cache)
            selection = self.selection
            if selection is None:
                raise RuntimeError(f"layer {index}: a sparse layer ran before any selection in this step")
            out = cache.sparse(q, selection, scale)
        if not counted:
            self._count_readers(index, self.selection)
        for observer in self.observers:
            observer(index, role, q, cache.keys(), cache.values(), cache.valid(), selection, out)
        if index == len(self.roles) - 1:
            # A selection in the last layer has no reader to join it: the step must not end (or a
            # CUDA-graph capture close) with work left on the side stream.
            self._join()
        return out
