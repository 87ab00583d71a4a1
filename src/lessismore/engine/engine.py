"""The engine: slots, the decode loop with continuous batching, CUDA graphs per batch-size bucket.

State lives on the device in fixed buffers of ``max_batch`` rows (one row per cache slot): the input
token, length, activity, token count, limits and sampling parameters of each sequence, and its output
tokens. A decode step reads and updates only those buffers (no host synchronization); each layer's
attention runs through the package's one decode-step executor (``lessismore.decode``). On CUDA a step
is captured once per (bucket, sampling) and replayed (``graphs.GraphRunner``). The host looks at the
buffers every few steps: it collects finished sequences, refills their slots from the queue (prefill
into the slot) and streams new tokens to a callback.

A method may keep a per-layer decode state next to the cache (``Method.decode_state``; Quest's page
bounds): allocated with the method for every non-full layer, rebuilt for a slot at its prefill
(``Method.fill_state``), extended by the decode steps (``Method.update_state``, inside the graphs).

Loading is ``loading.py``, the decoder stack ``model.py``, sampling ``sampling.py``.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from lessismore.config import FULL, SparseConfig, require_sparse_config
from lessismore.decode import DecodeExecutor
from lessismore.engine.graphs import GraphRunner
from lessismore.engine.kernels import advance
from lessismore.engine.loading import load
from lessismore.engine.model import Model, ModelConfig, Weights
from lessismore.engine.sampling import sample
from lessismore.methods import LayerRole

MAX_STOP_IDS = 8


@dataclass
class GenerationResult:
    """One prompt's output: the generated ids (prompt excluded), their text when a tokenizer is known,
    why it stopped ("eos" or "length"), and the prompt's length in tokens."""

    token_ids: list[int]
    text: str | None
    finish_reason: str
    prompt_tokens: int
    index: int = 0


@dataclass
class EngineStats:
    """What the last ``generate`` did: steps, tokens and seconds of prefill and decode."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0
    bucket_steps: dict = field(default_factory=dict)


def _available_host_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (no limit known elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n


class Engine:
    """Batched decoding of a Llama / Qwen2 / Qwen3 model with a sparse-attention method.

    model:     "default" (the package's SmolLM2-135M), a local HF checkpoint folder, a .gguf file, or a
               ``ModelConfig`` (random weights at that shape, for benchmarks).
    cfg:       the method (``SparseConfig``; default full attention, ``SparseConfig(method="full")``).
    device, dtype: where and in what precision (default: bf16 on CUDA, fp32 on CPU).
    max_batch: cache slots, i.e. the most sequences decoded at once.
    max_len:   tokens per slot (prompt plus generated).
    cuda_graphs: capture decode steps (default: on CUDA).
    prefill_chunk: prompt tokens per prefill pass.
    sync_every: decode steps between host looks at the state.
    seed, weights: for a ``ModelConfig``: the seed of the random weights, or the weights themselves.
    overlap_selection: a fused selection layer's top-k and union on a second stream, beside the rest
               of the layer (default: on CUDA; ``DecodeExecutor.overlap``).
    """

    def __init__(
        self,
        model: str | Path | ModelConfig = "default",
        cfg: SparseConfig = FULL,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_batch: int = 8,
        max_len: int = 4096,
        cuda_graphs: bool | None = None,
        prefill_chunk: int = 4096,
        sync_every: int = 16,
        seed: int = 0,
        weights: Weights | None = None,
        overlap_selection: bool | None = None,
    ):
        require_sparse_config(cfg)
        if int(max_batch) < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch}")
        if int(max_len) < 2:
            raise ValueError(f"max_len: must be >= 2, got {max_len}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: cuda requested but no CUDA device is available")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.device, self.dtype = device, dtype
        self.max_batch, self.max_len = int(max_batch), int(max_len)
        if isinstance(model, ModelConfig):  # before drawing gigabytes of random weights
            self._check_memory(model)
        mcfg, weights, self.tokenizer = load(model, device, dtype, seed, weights)
        if not isinstance(model, ModelConfig):
            self._check_memory(mcfg)
        self.model_config = mcfg
        self.model = Model(mcfg, weights, self.max_len, device, dtype)
        self.use_graphs = device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self.overlap_selection = device.type == "cuda" if overlap_selection is None else bool(overlap_selection)
        self.prefill_chunk = int(prefill_chunk)
        self.sync_every = max(1, int(sync_every))
        self._graphs = GraphRunner(device, self._step, self._warmup, self._release) if self.use_graphs else None
        self.method_state: list | None = None
        self._alloc_cache()
        self._alloc_state()
        self.set_method(cfg)
        self.stats = EngineStats()

    def _check_memory(self, mcfg: ModelConfig) -> None:
        """Refuse, before allocating, a KV cache that does not fit in the device's free memory."""
        need = 2 * mcfg.num_layers * self.max_batch * mcfg.num_kv_heads * self.max_len * mcfg.head_dim
        need *= torch.empty((), dtype=self.dtype).element_size()
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = _available_host_memory()
        if need > free:
            raise ValueError(
                f"max_batch, max_len: a KV cache of {self.max_batch} x {self.max_len} tokens needs {need / 2**30:.1f} GiB; "
                f"{free / 2**30:.1f} GiB is free on {self.device}"
            )

    def set_method(self, cfg: SparseConfig):
        """Switch the sparse-attention method; captured graphs are dropped."""
        require_sparse_config(cfg)
        mcfg = self.model_config
        if self._graphs is not None:
            self._graphs.reset()
        self.cfg = cfg.resolve(mcfg.model_type, mcfg.num_layers, mcfg.hidden_size)
        self.executor = DecodeExecutor(self.cfg, mcfg.num_layers)
        self.executor.overlap = self.overlap_selection
        self.executor.reset_stats(self.device)
        self._alloc_method_state()

    def _alloc_method_state(self):
        """The method's decode state of every non-full layer (None elsewhere, and for methods without
        one), built from what the cache rows hold now."""
        self.method_state = None  # the old method's buffers go first
        c, method = self.model_config, self.executor.method
        states = [
            None if role is LayerRole.FULL else
            method.decode_state(self.cfg, self.max_batch, c.num_kv_heads, self.max_len, c.head_dim, self.device, self.dtype)
            for role in self.executor.roles
        ]
        if all(s is None for s in states):
            return
        self.method_state = states
        self.rebuild_method_state()

    def rebuild_method_state(self, slots: Sequence[int] | None = None) -> None:
        """Rebuild the method state of cache rows ``slots`` (default: all) from their first
        ``lengths[slot]`` cached tokens. ``prefill`` does it for its slot; call it after writing the
        cache or ``lengths`` any other way (e.g. a benchmark filling the cache with random K/V)."""
        if self.method_state is None:
            return
        slots = range(self.max_batch) if slots is None else slots
        lengths = self.lengths.tolist()
        for slot in slots:
            self._fill_method_state(int(slot), int(lengths[slot]))

    def _fill_method_state(self, slot: int, length: int) -> None:
        method = self.executor.method
        for state, k in zip(self.method_state, self.k_cache):
            if state is not None:
                method.fill_state(self.cfg, state, k, slot, length)

    # ---- buffers ------------------------------------------------------------------------------------

    def _alloc_cache(self):
        c, s = self.model_config, self.max_batch
        shape = (s, c.num_kv_heads, self.max_len, c.head_dim)
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(c.num_layers)]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(c.num_layers)]

    def _alloc_state(self):
        s, dev = self.max_batch, self.device

        def z(dtype, *shape):
            return torch.zeros(*(shape or (s,)), device=dev, dtype=dtype)

        self.slots = torch.arange(s, device=dev, dtype=torch.int32)
        self.tokens = z(torch.int64)  # the next input token of each row
        self.lengths = z(torch.int32)  # tokens in the cache
        self.active = z(torch.bool)
        self.count = z(torch.int64)  # tokens generated
        self.limit = z(torch.int64)  # max new tokens
        self.stop_on_eos = z(torch.bool)
        self.temperature = z(torch.float32)
        self.top_p = torch.ones(s, device=dev)
        self.top_k = z(torch.int64)
        self.seed = z(torch.int64)
        self.stop_ids = torch.full((MAX_STOP_IDS,), -1, device=dev, dtype=torch.int64)
        self.out = z(torch.int64, s, self.max_len)

    # ---- one decode step (captured on CUDA) ----------------------------------------------------------

    def _step(self, b: int, do_sample: bool):
        active = self.active[:b]
        logits = self.model.decode(self.tokens[:b], self.slots[:b], self.lengths[:b], self.k_cache, self.v_cache,
                                   self.executor, rows=active, states=self.method_state)
        nxt = sample(logits, self.temperature[:b], self.top_p[:b], self.top_k[:b], self.seed[:b], self.count[:b], do_sample)
        advance(nxt, active, self.count[:b], self.limit[:b], self.lengths[:b], self.tokens[:b], self.out[:b],
                self.stop_ids, self.stop_on_eos[:b])

    def _warmup(self, b: int, do_sample: bool):
        # Every row inactive: the step leaves the state as it was (inactive rows write K/V only past
        # their tokens) and counts nothing.
        saved = self.active[:b].clone()
        self.active[:b] = False
        self._step(b, do_sample)
        self.active[:b] = saved

    def _release(self):
        self.executor.end_step()

    def _buckets(self) -> list[int]:
        sizes, b = [], 1
        while b < self.max_batch:
            sizes.append(b)
            b *= 2
        return sizes + [self.max_batch]

    def bucket(self, rows: int) -> int:
        """The smallest captured batch size holding rows 0..rows-1."""
        return next(b for b in self._buckets() if b >= rows)

    def step(self, b: int, do_sample: bool = False):
        """One decode step of rows 0..b-1 (b a bucket size): replays its graph on CUDA (eager while
        observers are attached: they run on the host)."""
        if self._graphs is None or self.executor.observers:
            self._step(b, do_sample)
            self.executor.end_step()
        else:
            self._graphs.run(b, do_sample)

    def kv_stats(self) -> dict:
        """KV reads of the last ``generate`` (the executor's counters: the same counting as the HF
        path's ``lessismore.stats``)."""
        return self.executor.stats()

    # ---- prefill and admission -------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, slot: int, prompt: Sequence[int]) -> torch.Tensor:
        """Write the prompt's K/V into cache row ``slot`` (chunked) and rebuild the slot's method state;
        returns its last logits [V]."""
        ids = torch.as_tensor(list(prompt), dtype=torch.int64, device=self.device)
        logits = None
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = ids[start : start + self.prefill_chunk]
            last = start + len(chunk) >= len(ids)
            logits = self.model.prefill(chunk, slot, start, self.k_cache, self.v_cache, logits=last)
        self.lengths[slot] = len(ids)
        if self.method_state is not None:
            self._fill_method_state(slot, len(ids))
        return logits

    def _admit(self, slot: int, prompt: list[int], max_new: int, temperature: float, top_p: float, top_k: int, seed: int, stop_on_eos: bool):
        logits = self.prefill(slot, prompt)
        one = slice(slot, slot + 1)
        self.temperature[slot] = float(temperature)
        self.top_p[slot] = float(top_p)
        self.top_k[slot] = int(top_k)
        self.seed[slot] = int(seed)
        self.count[slot] = 0
        first = sample(logits[None], self.temperature[one], self.top_p[one], self.top_k[one], self.seed[one], self.count[one], temperature > 0)
        self.out[slot, 0] = first[0]
        self.tokens[slot] = first[0]
        self.count[slot] = 1
        self.limit[slot] = max_new
        self.stop_on_eos[slot] = stop_on_eos
        stop = (first[0] == self.stop_ids).any() & stop_on_eos
        self.active[slot] = ~stop & (max_new > 1)

    # ---- the loop ------------------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompts: text needs a tokenizer; this engine has random weights, pass token ids")
            return list(self.tokenizer(prompt)["input_ids"])
        return [int(t) for t in prompt]

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int] = 256,
        temperature: float | Sequence[float] = 0.0,
        top_p: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        seed: int | Sequence[int] = 0,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt (text or token ids), in batches of up to ``max_batch`` with slots
        refilled as sequences finish. Sampling parameters are one value or one per prompt; temperature
        0 is greedy. Prompt i draws from the random stream ``seed + i`` (or ``seed[i]`` for a list of
        seeds), so its tokens do not depend on the batch it ran in. Stops at ``stop_token_ids`` (default: the model's EOS ids) unless
        ``ignore_eos``, or after ``max_new_tokens``. ``on_tokens(i, new_ids)`` streams tokens."""
        n = len(prompts)
        encoded = [self.encode(p) for p in prompts]
        limits = [int(x) for x in _per_prompt(max_new_tokens, n, "max_new_tokens")]
        temps = [float(x) for x in _per_prompt(temperature, n, "temperature")]
        tps = [float(x) for x in _per_prompt(top_p, n, "top_p")]
        tks = [int(x) for x in _per_prompt(top_k, n, "top_k")]
        seeds = [int(x) for x in seed] if isinstance(seed, (list, tuple)) else [seed + i for i in range(n)]
        if len(seeds) != n:
            raise ValueError(f"seed: {len(seeds)} seeds for {n} prompts")
        for i, (ids, lim, tp) in enumerate(zip(encoded, limits, tps)):
            if not ids:
                raise ValueError(f"prompts[{i}]: empty prompt")
            if lim < 1:
                raise ValueError(f"max_new_tokens: must be >= 1, got {lim}")
            if len(ids) + lim > self.max_len:
                raise ValueError(f"prompts[{i}]: {len(ids)} prompt + {lim} new tokens exceed max_len={self.max_len}")
            if not 0.0 < tp <= 1.0:
                raise ValueError(f"top_p: must be in (0, 1], got {tp}")
        stops = list(self.model_config.eos_token_ids if stop_token_ids is None else stop_token_ids)
        if len(stops) > MAX_STOP_IDS:
            raise ValueError(f"stop_token_ids: at most {MAX_STOP_IDS}")
        self.stop_ids.fill_(-1)
        if stops:
            self.stop_ids[: len(stops)] = torch.tensor(stops, device=self.device)
        do_sample = any(t > 0 for t in temps)
        self.stats = stats = EngineStats()
        self.executor.reset_stats(self.device)
        self.active.zero_()
        self.lengths.zero_()

        queue = deque(range(n))
        owner: list[int | None] = [None] * self.max_batch  # prompt index held by each slot
        streamed = [0] * n  # tokens already passed to on_tokens
        results: list[GenerationResult | None] = [None] * n
        count_host = [0] * self.max_batch
        while queue or any(o is not None for o in owner):
            t0 = time.perf_counter()
            for slot in range(self.max_batch):
                if owner[slot] is None and queue:
                    i = queue.popleft()
                    owner[slot] = i
                    self._admit(slot, encoded[i], limits[i], temps[i], tps[i], tks[i], seeds[i], not ignore_eos)
                    count_host[slot] = 1
                    stats.prefill_tokens += len(encoded[i])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t1 = time.perf_counter()
            stats.prefill_s += t1 - t0
            rows = max(s for s in range(self.max_batch) if owner[s] is not None) + 1
            b = self.bucket(rows)
            # Until the next look: never past the earliest length limit, so length stops cost nothing.
            steps = min([self.sync_every] + [limits[owner[s]] - count_host[s] for s in range(rows) if owner[s] is not None])
            for _ in range(max(steps, 0)):
                self.step(b, do_sample)
            active = self.active[:b].tolist()
            counts = self.count[:b].tolist()
            stats.decode_s += time.perf_counter() - t1
            stats.decode_steps += max(steps, 0)
            stats.bucket_steps[b] = stats.bucket_steps.get(b, 0) + max(steps, 0)
            stats.decode_tokens += sum(counts[s] - count_host[s] for s in range(rows) if owner[s] is not None)
            count_host[:b] = counts
            done = [s for s in range(rows) if owner[s] is not None and not active[s]]
            if on_tokens is not None or done:
                width = max(counts[s] for s in range(rows) if owner[s] is not None)
                host = self.out[:rows, :width].tolist()
                if on_tokens is not None:
                    for s in range(rows):
                        i = owner[s]
                        if i is not None and counts[s] > streamed[i]:
                            on_tokens(i, host[s][streamed[i] : counts[s]])
                            streamed[i] = counts[s]
                for s in done:
                    i = owner[s]
                    ids = host[s][: counts[s]]
                    reason = "eos" if (not ignore_eos and ids and ids[-1] in stops) else "length"
                    text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else None
                    results[i] = GenerationResult(token_ids=ids, text=text, finish_reason=reason, prompt_tokens=len(encoded[i]), index=i)
                    owner[s] = None
        return results
