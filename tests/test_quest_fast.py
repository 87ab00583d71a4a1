"""Quest's engine path: page bounds kept incrementally (``QuestState``) and the selection made from
them alone (``Quest.fast_select``) give exactly the reference ``select``; the engine on it gives the
HF path's greedy tokens and the reference path's KV-read counts."""
from __future__ import annotations

import pytest
import torch

import lessismore
from lessismore.config import SparseConfig
from lessismore.decode import DecodeCache
from lessismore.engine import Engine
from lessismore.methods import get
from lessismore.methods.quest import Quest, QuestState, page_bounds
from lessismore.ops import naive


def _check_equal(fast, ref, n):
    """Same shapes and counts, the same live positions; entries past counts are real positions."""
    assert fast is not None
    assert fast.indices.shape == ref.indices.shape
    assert fast.indices.dtype == ref.indices.dtype and fast.counts.dtype == ref.counts.dtype
    assert torch.equal(fast.counts, ref.counts)
    live = torch.arange(ref.indices.shape[-1]) < ref.counts.unsqueeze(-1)
    assert torch.equal(torch.where(live, fast.indices, -1), torch.where(live, ref.indices, -1))
    assert bool((fast.indices >= 0).all()) and bool((fast.indices < n.clamp(min=1).view(-1, 1, 1)).all())


def _draw(shape, quantized, gen, dtype):
    x = torch.randn(shape, generator=gen)
    if quantized:  # multiples of 1/2 in [-1.5, 1.5]: exact scores, ties between pages frequent
        x = (x * 1.5).round().clamp(-3, 3) / 2
    return x.to(dtype)


def _check_bounds(state, k, n, page_size):
    """The invariant: each row's bounds are those of its keys at slots 0..n-2, nothing else."""
    valid = torch.arange(k.shape[2]) < (n - 1).view(-1, 1)
    lo, hi, _ = page_bounds(k, valid, page_size)
    pages = lo.shape[2]
    assert torch.equal(state.lo[: k.shape[0], :, :pages].float(), lo)
    assert torch.equal(state.hi[: k.shape[0], :, :pages].float(), hi)
    assert bool((state.lo[: k.shape[0], :, pages:] == float("inf")).all())


CASES = [  # (page_size, budget, quantized, dtype)
    (4, 8, False, torch.float32),
    (4, 10, True, torch.float32),  # ceil(K/P)*P = 12 > K
    (1, 6, True, torch.float32),
    (8, 16, True, torch.bfloat16),
    (16, 16, False, torch.float32),  # a single page: the current one only
]


def _kernels_on_cpu(monkeypatch):
    """Quest's ops take their Triton kernels (under the interpreter on CPU), as on a GPU. The top-k
    stays the reference: its kernel gives the same bits (tests/test_topk.py) and is slow interpreted."""
    pytest.importorskip("triton")
    from lessismore.ops import triton_decode

    if not triton_decode.INTERPRETED:
        pytest.skip("the Triton interpreter is off")
    monkeypatch.setattr(lessismore.ops, "triton_usable", lambda t: True)
    monkeypatch.setattr(lessismore.ops, "topk_desc", lambda scores, k, lengths=None: naive.topk_desc(scores, k, lengths))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # 0 * inf in unfilled pages, masked after
@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("page_size, budget, quantized, dtype", CASES)
def test_incremental_state_gives_the_reference_selection(page_size, budget, quantized, dtype, kernels, monkeypatch):
    """Four cache rows, prefilled to different lengths and decoded token by token: n <= K (whole row),
    n just over K, pages partially filled, a row that stops (inactive: its n stays, the slot past its
    tokens is rewritten every step, as the engine does), a row of one token, and a slot refilled with a
    short sequence after a long one. Every step: fast_select == select, and the bounds invariant; once
    with the PyTorch ops, once with the Triton kernels on both paths (fp16 for bf16 there: the
    interpreter's bf16 is not trusted)."""
    if kernels:
        _kernels_on_cpu(monkeypatch)
        dtype = torch.float16 if dtype == torch.bfloat16 else dtype
    gen = torch.Generator().manual_seed(page_size * 100 + budget)
    hq, hkv, d, max_len = 6, 2, 8, 72
    batch = 4
    method, cfg = get("quest"), SparseConfig(method="quest", budget=budget, page_size=page_size)
    k = _draw((batch, hkv, max_len, d), quantized, gen, dtype)
    state = method.decode_state(cfg, batch, hkv, max_len, d, "cpu", dtype)
    assert isinstance(state, QuestState) and state.lo.dtype == dtype
    assert state.lo.shape == (batch, hkv, -(-max_len // page_size), d)

    prompt = [budget - 3, budget + 1, 2 * page_size + 1, 1]
    lengths = torch.tensor(prompt, dtype=torch.int32)  # tokens in the cache before a step
    active = torch.tensor([True, True, True, True])
    for row, p in enumerate(prompt):
        method.fill_state(cfg, state, k, row, p)

    def step(span=max_len):
        # The engine's step: every row writes its token at slot lengths (active or not), n = lengths + 1.
        for row in range(batch):
            k[row, :, int(lengths[row])] = _draw((hkv, d), quantized, gen, dtype)
        n = lengths + 1
        q = _draw((batch, hq, d), quantized, gen, dtype)
        cache = DecodeCache(k[:, :, :span], k[:, :, :span], lengths=n, state=state)
        method.update_state(cfg, cache)
        valid = torch.arange(span) < n.view(-1, 1)
        _check_equal(method.fast_select(cfg, q, cache), method.select(cfg, q, k[:, :, :span], valid), n)
        _check_bounds(state, k, n, page_size)
        lengths.add_(active.to(torch.int32))

    # Two page boundaries with the PyTorch ops; one with the kernels, whose interpreter costs ~0.5 s a
    # step (test_quest_ops checks them call by call).
    for t in range((1 if kernels else 2) * page_size + 8):
        if t == 5:
            active[1] = False  # stops; its slot n-1 keeps being rewritten
        if t == page_size + 3:  # slot 2 refilled: a long sequence then a short one
            lengths[2] = 3
            k[2, :, :3] = _draw((hkv, 3, d), quantized, gen, dtype)
            method.fill_state(cfg, state, k, 2, 3)
        step()
    # A cache view shorter than the state's rows (fewer pages scored): still the reference.
    step(span=int(lengths.max()) + 1 + page_size // 2)


def test_page_scores_are_the_bound_of_the_definition():
    """sum_d max(q_d*lo_d, q_d*hi_d), queries of both signs and exact zeros, grouped heads; the current
    page (the last of ceil(n/P)) +inf and pages past it -inf."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 8, generator=g)
    q[0, 1, :3] = 0
    keys = torch.randn(2, 3, 5, 4, 8, generator=g)  # [B, Hkv, NP, P, D]
    lo, hi = keys.amin(3), keys.amax(3)
    qg = q.view(2, 3, 2, 1, 8)
    want = torch.maximum(qg * lo.unsqueeze(2), qg * hi.unsqueeze(2)).sum(-1).reshape(2, 6, 5)
    # n = 5 pages * 4 + 1: the current page is page 5, past the five scored.
    whole = naive.quest_page_scores(q, lo, hi, torch.tensor([21, 21]), 4)
    torch.testing.assert_close(whole, want, rtol=1e-5, atol=1e-5)
    cut = naive.quest_page_scores(q, lo, hi, torch.tensor([9, 20]), 4)  # pages in use: 3 and 5
    assert bool((cut[0, :, 2] == float("inf")).all()) and bool((cut[0, :, 3:] == float("-inf")).all())
    assert bool((cut[1, :, 4] == float("inf")).all())
    torch.testing.assert_close(cut[0, :, :2], want[0, :, :2])
    torch.testing.assert_close(cut[1, :, :4], want[1, :, :4])


def test_fast_select_declines_what_it_cannot_serve():
    cfg = SparseConfig(method="quest", budget=8, page_size=4)
    method = get("quest")
    k = torch.randn(2, 1, 16, 4)
    q = torch.randn(2, 2, 4)
    lengths = torch.tensor([5, 9], dtype=torch.int32)
    other = QuestState(2, 1, 16, 4, 2, "cpu", torch.float32)  # another page size
    assert method.fast_select(cfg, q, DecodeCache(k, k, lengths=lengths, state=other)) is None
    small = QuestState(2, 1, 8, 4, 4, "cpu", torch.float32)  # fewer pages than the cache's span
    assert method.fast_select(cfg, q, DecodeCache(k, k, lengths=lengths, state=small)) is None
    assert get("tidaldecode").decode_state(cfg, 2, 1, 16, 4, "cpu", torch.float32) is None
    with pytest.raises(ValueError, match="lengths"):
        DecodeCache(k, k, valid=torch.ones(2, 16, dtype=torch.bool), state=small)


CFG = SparseConfig(method="quest", budget=32, page_size=4)
NEW = [24, 10, 24]  # the second sequence ends early: its slot is refilled with the third


@pytest.fixture(scope="module")
def prompts(default_model):
    _, tokenizer = default_model
    text = ("The history of the Roman Empire begins with the founding of the city on the banks of the Tiber, "
            "when, according to legend, the twins Romulus and Remus were raised by a she-wolf. Over the "
            "following centuries the small kingdom grew into a republic that ruled the Mediterranean, and its "
            "generals fought wars in Gaul, Spain, Greece and Africa before the republic fell.")
    ids = tokenizer(text)["input_ids"]
    assert len(ids) >= 63
    return [ids[:61], ids[2:59], ids[:63]]


@pytest.fixture(scope="module")
def hf_tokens(default_model, prompts):
    model, tokenizer = default_model
    out = []
    lessismore.enable(model, CFG)
    try:
        for ids, new in zip(prompts, NEW):
            x = torch.tensor([ids])
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                               eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
            out.append(y[0, len(ids):].tolist())
    finally:
        lessismore.disable(model)
    return out


def test_engine_fast_path_equals_hf_and_reference_path(prompts, hf_tokens, monkeypatch):
    """Continuous batching, two slots for three prompts of ~60 tokens (budget 32, pages of 4): the
    engine's greedy tokens on the fast path (the reference ``select`` never called) equal the HF path's
    and the engine's reference path's (``fused=False``: dense scores per step), and so do the KV reads."""
    # fp32 as the HF model. No CUDA graphs: a replay runs no Python, so fast_select's calls can only be counted
    # without them.
    reference = Engine("default", cfg=CFG, max_batch=2, max_len=96, dtype=torch.float32, cuda_graphs=False)
    reference.executor.fused = False
    ref_results = reference.generate(prompts, max_new_tokens=NEW, ignore_eos=True)

    calls = {"fast": 0}
    fast_select = Quest.fast_select

    def counted(self, cfg, q, cache):
        out = fast_select(self, cfg, q, cache)
        calls["fast"] += out is not None
        return out

    def no_reference(*args, **kwargs):
        raise AssertionError("the engine's Quest layers ran the reference selection")

    engine = Engine("default", cfg=CFG, max_batch=2, max_len=96, dtype=torch.float32, cuda_graphs=False)
    monkeypatch.setattr(Quest, "fast_select", counted)
    monkeypatch.setattr(Quest, "select", no_reference)
    results = engine.generate(prompts, max_new_tokens=NEW, ignore_eos=True)
    monkeypatch.undo()

    sparse_layers = sum(s is not None for s in engine.method_state)
    assert sparse_layers == engine.model_config.num_layers - len(engine.cfg.full_layers)
    assert calls["fast"] == engine.stats.decode_steps * sparse_layers
    assert [r.token_ids for r in results] == hf_tokens
    assert [r.token_ids for r in ref_results] == hf_tokens
    stats, ref_stats = engine.kv_stats(), reference.kv_stats()
    assert stats == ref_stats
    assert stats["kv_read_fraction"] < 0.75  # the contexts (57-87 tokens) are well past the budget
