"""Generation backends for the evaluation: a small interface and its Hugging Face implementation.

A backend turns chat-formatted prompts into completions under one attention setting. The fast engine
can plug in by implementing :class:`Generator`.

Sampling is seeded per sample, not per batch: each row draws its token from its own generator seeded with
the sample's seed (inverse-CDF on a CPU uniform), so a sample's draws do not depend on which other
samples share its batch. Temperature 0 is greedy.

torch is imported where it is used, so importing this module (and ``lessismore.eval``) stays light.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

from lessismore.config import require_sparse_config


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6  # 0 means greedy
    top_p: float = 0.95
    max_new_tokens: int = 32768

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    text: str
    num_tokens: int  # generated tokens, the end-of-sequence token included when there is one
    finished: bool  # ended with an end-of-sequence token (False: cut off at max_new_tokens)
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0  # this sample's share of its batch's prefill wall time
    decode_seconds: float = 0.0  # this sample's share of its batch's decode wall time
    kv_read_fraction: float | None = None  # from lessismore.stats(), when the backend reports it


@runtime_checkable
class Generator(Protocol):
    """What the evaluation needs from a backend.

    ``generate`` gets chat-formatted prompts, one seed per prompt, the sampling settings and the sparse
    attention setting (a SparseConfig; ``SparseConfig(method="full")`` is full attention), and returns
    one Completion per prompt, in order. A backend may also have an ``on_step`` attribute: the
    evaluation sets it to a callable taking the number of tokens the current batch has generated, for
    its progress bar."""

    def generate(self, prompts: list[str], seeds: list[int], params: SamplingParams, sparse) -> list[Completion]: ...


class _SeededSampler:
    """A logits processor that samples each row with its own seeded generator (temperature, top-p)
    and leaves only the drawn token, so the greedy step of ``generate`` picks it. It also records when
    the first decoding step starts (the end of prefill)."""

    def __init__(self, seeds: list[int], params: SamplingParams, on_step: Callable[[int], None] | None = None):
        import torch

        self.params = params
        self.on_step = on_step
        self.steps = 0
        self.generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        self.first_call: float | None = None

    def __call__(self, input_ids, scores):
        import torch

        if self.first_call is None:
            self.first_call = time.perf_counter()
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self.steps)
        if self.params.greedy:
            return scores
        logits = scores.float() / self.params.temperature
        probs = torch.softmax(logits, dim=-1)
        sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs = sorted_probs.masked_fill(before >= self.params.top_p, 0.0)  # the top token stays
        cdf = sorted_probs.cumsum(dim=-1)
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        target = (u.to(cdf.device, torch.float32) * cdf[:, -1]).unsqueeze(-1)
        pos = torch.searchsorted(cdf, target).clamp_max(cdf.shape[-1] - 1)
        token = sorted_idx.gather(-1, pos)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, token, 0.0)
        return out


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else list(value))
    return ids


def _split(total: float, weights: list[int]) -> list[float]:
    s = sum(weights)
    if s <= 0:
        return [total / len(weights)] * len(weights)
    return [total * w / s for w in weights]


class HFGenerator:
    """Batched ``model.generate`` with left padding, under ``lessismore.sparse_attention`` for sparse
    methods and unpatched for full attention."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.on_step: Callable[[int], None] | None = None  # called with the tokens generated so far
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = _eos_ids(model, tokenizer)
        if not self.eos_ids:
            raise ValueError("model: neither the model nor the tokenizer names an end-of-sequence token")
        self.device = next(model.parameters()).device

    def _attention(self, sparse):
        from lessismore import methods

        if methods.get(sparse.method).dense:  # full attention runs the model unpatched
            return contextlib.nullcontext()
        from lessismore import sparse_attention

        return sparse_attention(self.model, sparse)

    def _kv_read_fraction(self, sparse) -> float | None:
        from lessismore import methods

        if methods.get(sparse.method).dense:
            return 1.0
        from lessismore import stats

        return float(stats(self.model)["kv_read_fraction"])

    def generate(self, prompts: list[str], seeds: list[int], params: SamplingParams, sparse) -> list[Completion]:
        import torch

        require_sparse_config(sparse, "sparse")
        if len(prompts) != len(seeds):
            raise ValueError("seeds: need one seed per prompt")
        with torch.inference_mode():
            return self._generate(prompts, seeds, params, sparse)

    def _generate(self, prompts, seeds, params, sparse) -> list[Completion]:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampler = _SeededSampler(seeds, params, self.on_step)
        config = self.model.generation_config.__class__.from_dict(self.model.generation_config.to_dict())
        config.update(
            do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None, num_beams=1,
            max_new_tokens=params.max_new_tokens, max_length=None, min_new_tokens=None,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(self.eos_ids),
        )
        self._sync()
        with self._attention(sparse) as _:
            start = time.perf_counter()
            out = self.model.generate(**enc, generation_config=config, logits_processor=[sampler])
            self._sync()
            end = time.perf_counter()
            kv_fraction = self._kv_read_fraction(sparse)
        first = sampler.first_call or end
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        counts, finished = [], []
        for row in new:
            stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            counts.append(stop + 1 if stop is not None else len(row))
            finished.append(stop is not None)
        prefill = _split(first - start, [1] * len(new))
        decode = _split(end - first, [max(n - 1, 0) for n in counts])
        return [
            Completion(
                text=self.tokenizer.decode(row[:n], skip_special_tokens=True),
                num_tokens=n, finished=fin, prompt_tokens=int(pl),
                prefill_seconds=pf, decode_seconds=dc, kv_read_fraction=kv_fraction,
            )
            for row, n, fin, pl, pf, dc in zip(new, counts, finished, prompt_lens, prefill, decode)
        ]

    def _sync(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)


class EngineGenerator:
    """The fast engine (``lessismore.Engine``) behind the same interface. Each prompt samples from its
    own seeded stream in the engine, so its tokens do not depend on its batch mates either."""

    def __init__(self, engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._method = object()  # nothing set yet

    def generate(self, prompts: list[str], seeds: list[int], params: SamplingParams, sparse) -> list[Completion]:
        require_sparse_config(sparse, "sparse")
        if len(prompts) != len(seeds):
            raise ValueError("seeds: need one seed per prompt")
        if sparse != self._method:  # switching drops the captured graphs: only when it changes
            self.engine.set_method(sparse)
            self._method = sparse
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        results = self.engine.generate(ids, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                       top_p=params.top_p, seed=list(seeds))
        stats = self.engine.stats
        prefill = _split(stats.prefill_s, [len(x) for x in ids])
        decode = _split(stats.decode_s, [len(r.token_ids) for r in results])
        return [
            Completion(text=r.text, num_tokens=len(r.token_ids), finished=r.finish_reason == "eos",
                       prompt_tokens=r.prompt_tokens, prefill_seconds=pf, decode_seconds=dc)
            for r, pf, dc in zip(results, prefill, decode)
        ]


def load_engine_generator(model_spec: str, device: str | None, max_batch: int, max_len: int) -> EngineGenerator:
    from lessismore.config import FULL
    from lessismore.engine import Engine

    return EngineGenerator(Engine(model_spec, cfg=FULL, device=device or default_device(), max_batch=max_batch,
                                  max_len=max_len))


def load_hf_generator(model_spec: str, device: str | None = None, dtype=None) -> HFGenerator:
    """Load ``model_spec`` ("default", a local HF directory or a .gguf file) into an HFGenerator."""
    from lessismore.models import load_model

    model, tokenizer = load_model(model_spec, device=device or default_device(), dtype=dtype)
    model.eval()
    return HFGenerator(model, tokenizer)


def default_device() -> str:
    """cuda:LOCAL_RANK when a GPU is there (one GPU per torchrun process), else cpu."""
    import os

    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"
