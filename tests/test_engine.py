"""The fast decode engine on CPU: same greedy tokens as transformers, the core library's selections,
batching that changes nothing, and the Llama / Qwen2 / Qwen3 variants against their HF models."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import lessismore
from lessismore import methods
from lessismore.config import SparseConfig
from lessismore.engine import Engine, ModelConfig
from lessismore.engine import kernels
from lessismore.integrations.hf import state_of
from lessismore.methods import LayerRole
from lessismore.methods.base import grouped_scores
from lessismore.methods.tidaldecode import selection_from_scores

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: a decode step is hundreds of tiny ops, and on a shared 2-core machine the
    thread pool's hand-offs cost more than the ops themselves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROMPT = "The history of the Roman Empire begins with"
NEW = 64


def _set(selection, *index):
    """The positions of one row (or one row's head) of a Selection, as a sorted list."""
    ids, count = selection.indices[index], int(selection.counts[index])
    return sorted(ids[:count].tolist())


@pytest.fixture(scope="module")
def hf_full_tokens(default_model):
    model, tokenizer = default_model
    ids = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def engine_full():
    return Engine("default", max_batch=4, max_len=160, dtype=torch.float32)  # HF runs fp32: same precision


def test_full_greedy_equals_hf_generate(engine_full, hf_full_tokens):
    result = engine_full.generate([PROMPT], max_new_tokens=NEW, ignore_eos=True)[0]
    assert len(result.token_ids) == NEW and result.finish_reason == "length"
    assert result.token_ids == hf_full_tokens
    assert result.text == engine_full.tokenizer.decode(hf_full_tokens, skip_special_tokens=True)


def test_lessismore_with_budget_over_context_equals_full(hf_full_tokens):
    engine = Engine("default", cfg=SparseConfig(method="lessismore", budget=128, sink_tokens=4), max_batch=1, max_len=128,
                    dtype=torch.float32)
    result = engine.generate([PROMPT], max_new_tokens=NEW, ignore_eos=True)[0]
    assert result.token_ids == hf_full_tokens
    assert engine.kv_stats()["kv_read_fraction"] == 1.0


def lessismore_by_definition(cfg, q, k, n):
    """LessIsMore's set for one row, straight from the definition (Python loops, no library code): the
    sinks, the last R - s positions, and the first k distinct positions of the heads' top lists taken
    rank by rank (equal scores: lower position first)."""
    if n <= cfg.budget:
        return list(range(n))
    scores = grouped_scores(q[None], k[None, :, :n])[0].tolist()  # [Hq][n]
    r, s = cfg.recent_share, cfg.effective_sinks
    kept = set(range(s)) | set(range(n - (r - s), n))
    middle = [p for p in range(n) if p not in kept]
    lists = [sorted(middle, key=lambda p: (-head[p], p)) for head in scores]
    order = []
    for rank in range(len(middle)):
        for head_list in lists:
            if head_list[rank] not in order:
                order.append(head_list[rank])
    return sorted(kept | set(order[: cfg.budget - r]))


def test_small_budget_selects_what_the_core_library_selects(default_model):
    """Budget 12 over a ~40-token context: the engine's selection at every selection layer equals the
    set computed from the definition on the engine's own q/k, and the HF integration's selection on the
    same step (same model, same tokens)."""
    model, tokenizer = default_model
    cfg = SparseConfig(method="lessismore", budget=12, recent_ratio=0.25, sink_tokens=2)
    prompt = "Question: what is 17 times 23? Think step by step, then give the answer. Answer:"
    steps = 3
    engine = Engine("default", cfg=cfg, max_batch=2, max_len=64)
    seen = []

    def record(layer, role, q, k, v, valid, selection, out):
        if role is LayerRole.SELECT_DENSE:
            seen.append((layer, q.clone(), k.clone(), valid.clone(), selection))

    engine.executor.observers.append(record)
    result = engine.generate([prompt], max_new_tokens=steps + 1, ignore_eos=True)[0]
    selection_layers = engine.cfg.selection_layers
    assert [s[0] for s in seen] == list(selection_layers) * steps
    for layer, q, k, valid, selection in seen:
        assert _set(selection, 0) == lessismore_by_definition(engine.cfg, q[0], k[0], int(valid[0].sum()))
        assert int(selection.counts[0]) == cfg.budget

    # The HF integration on the same prompt and tokens: the same sets, step by step.
    hf_seen = []
    lessismore.enable(model, cfg)
    try:
        state = state_of(model)
        state.observers.append(
            lambda layer, role, q, k, v, valid, selection, out: hf_seen.append((layer, selection))
            if role is LayerRole.SELECT_DENSE else None
        )
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=steps + 1, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    finally:
        lessismore.disable(model)
    assert out[0, ids["input_ids"].shape[1]:].tolist() == result.token_ids
    assert len(hf_seen) == len(seen)
    for (layer, _, _, _, ours), (hf_layer, theirs) in zip(seen, hf_seen):
        assert layer == hf_layer
        assert _set(ours, 0) == _set(theirs, 0)


def test_tidal_selection_equals_core_library():
    """The GPU path's TidalDecode set builder (from masked scores) against ``select``."""
    torch.manual_seed(1)
    b, hq, hkv, length, d = 3, 8, 2, 50, 16
    q, k = torch.randn(b, hq, d), torch.randn(b, hkv, length, d)
    lengths = torch.tensor([50, 9, 31], dtype=torch.int32)
    valid = torch.arange(length) < lengths[:, None].long()
    for budget in (2, 8, 10, 16, 64):
        cfg = SparseConfig(method="tidaldecode", budget=budget)
        eligible = valid & (torch.arange(length) < (lengths[:, None].long() - 1))
        scores = grouped_scores(q, k).masked_fill(~eligible[:, None, :], float("-inf"))
        ours = selection_from_scores(scores, lengths, budget, kernels=False)
        theirs = methods.get("tidaldecode").select(cfg, q, k, valid)
        assert ours.indices.shape == theirs.indices.shape
        assert torch.equal(ours.counts, theirs.counts)
        for row in range(b):
            for head in range(hq):
                assert _set(ours, row, head) == _set(theirs, row, head)


def test_batch_gives_each_sequence_what_it_gets_alone(engine_full):
    """Prompts of different lengths, limits and sampling settings, four of them through two slots
    (so slots are refilled), with a stop token that ends one of them early."""
    prompts = [
        "The capital of France is",
        "Once upon a time, in a small village by the sea, there lived an old fisherman who",
        "def fibonacci(n):",
        "List three colors:",
    ]
    limits = [9, 5, 12, 7]
    temps = [0.0, 0.8, 0.0, 1.0]
    alone = [
        engine_full.generate([p], max_new_tokens=m, temperature=t, top_p=0.9, top_k=50, seed=100 + i, ignore_eos=True)[0].token_ids
        for i, (p, m, t) in enumerate(zip(prompts, limits, temps))
    ]
    # A stop token taken from the third sequence's output (its 4th token) ends it early.
    stop = alone[2][3]
    cut = [ids[: ids.index(stop) + 1] if stop in ids else ids for ids in alone]
    engine = Engine("default", max_batch=2, max_len=160, sync_every=3)
    streamed = {}
    results = engine.generate(
        prompts, max_new_tokens=limits, temperature=temps, top_p=0.9, top_k=50, seed=100,
        stop_token_ids=[stop], on_tokens=lambda i, ids: streamed.setdefault(i, []).extend(ids),
    )
    assert [r.token_ids for r in results] == cut
    assert [streamed[i] for i in range(len(prompts))] == cut
    assert len(cut[2]) < limits[2]
    assert [r.finish_reason for r in results] == ["eos" if ids[-1] == stop else "length" for ids in cut]
    assert engine.stats.bucket_steps and max(engine.stats.bucket_steps) == 2


@pytest.mark.parametrize("variant", ["qwen3", "qwen2", "llama3_rope"])
def test_architectures_match_transformers(tmp_path, variant):
    """Tiny random Qwen3 (q/k norm), Qwen2 (qkv bias) and Llama with llama3 rope scaling, saved as
    safetensors folders: the engine's greedy tokens equal ``generate``'s."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    if variant == "qwen3":
        config = AutoConfig.for_model("qwen3", head_dim=32, **common)
    elif variant == "qwen2":
        config = AutoConfig.for_model("qwen2", **common)
    else:
        config = AutoConfig.for_model("llama", **common, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32, "rope_theta": 10000.0})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # well away from init's near-zero biases and unit norms
    model.save_pretrained(tmp_path)
    prompt = torch.randint(0, 128, (1, 40))
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    # fp32 as the reference (bf16, the CUDA default, would compare precisions, not architectures)
    engine = Engine(str(tmp_path), max_batch=2, max_len=96, prefill_chunk=16, dtype=torch.float32)  # three prefill chunks
    got = engine.generate([prompt[0].tolist()], max_new_tokens=24, ignore_eos=True)[0].token_ids
    assert got == ref[0, 40:].tolist()


TINY = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True)


def test_random_weights_and_validation():
    engine = Engine(TINY, cfg=SparseConfig(method="tidaldecode", budget=8), max_batch=3, max_len=40)
    results = engine.generate([[1, 2, 3], list(range(20))], max_new_tokens=[10, 6], ignore_eos=True)
    assert [len(r.token_ids) for r in results] == [10, 6] and results[0].text is None
    with pytest.raises(ValueError, match="max_len"):
        engine.generate([list(range(30))], max_new_tokens=20)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate(["text"])
    with pytest.raises(ValueError, match="cfg"):
        Engine(TINY, cfg=None)
    with pytest.raises(ValueError, match="max_batch, max_len"):  # a cache far beyond free memory, refused up front
        Engine(TINY, max_batch=1 << 20, max_len=1 << 20)


@pytest.mark.parametrize("method", ["streaming", "quest", "tidaldecode", "lessismore", "oracle"])
def test_sparse_methods_read_what_their_budget_allows(method):
    """Random weights, budget 8 over a 25-token prompt + 5 steps: with the budget at the whole context
    the tokens equal full attention's; at budget 8 the KV read count equals what the schedule implies
    (dense layers read n, sparse layers min(K, n), Quest whole pages of 4)."""
    prompt, new = list(range(25)), 6
    full = Engine(TINY, max_batch=1, max_len=40).generate([prompt], max_new_tokens=new, ignore_eos=True)[0].token_ids
    wide = Engine(TINY, cfg=SparseConfig.for_method(method, budget=40, page_size=4), max_batch=1, max_len=40)
    assert wide.generate([prompt], max_new_tokens=new, ignore_eos=True)[0].token_ids == full
    engine = Engine(TINY, cfg=SparseConfig.for_method(method, budget=8, page_size=4, sink_tokens=2), max_batch=1, max_len=40)
    engine.generate([prompt], max_new_tokens=new, ignore_eos=True)
    roles = engine.executor.roles
    dense = sum(r in (LayerRole.FULL, LayerRole.SELECT_DENSE) for r in roles)
    lengths = range(len(prompt) + 1, len(prompt) + new)  # the decode steps' context lengths
    # Quest: the current (partial) page and one more whole page of 4.
    per_sparse_layer = [4 + (n - 1) % 4 + 1 if method == "quest" else min(8, n) for n in lengths]
    expected = sum(dense * n + (len(roles) - dense) * k for n, k in zip(lengths, per_sparse_layer))
    stats = engine.kv_stats()
    assert stats["sequence_steps"] == new - 1
    assert stats["kv_positions_per_layer"] * (new - 1) * len(roles) == pytest.approx(expected)


_interpreted = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _interpreted, reason="needs Triton under TRITON_INTERPRET=1")
def test_fused_kernels_match_references():
    torch.manual_seed(0)
    x, res, w = torch.randn(3, 576), torch.randn(3, 576), torch.randn(576)
    r1, r2 = res.clone(), res.clone()
    torch.testing.assert_close(kernels.add_rmsnorm(x, r1, w, 1e-6, impl="triton"), kernels.add_rmsnorm(x, r2, w, 1e-6, impl="torch"))
    torch.testing.assert_close(r1, r2)
    gu = torch.randn(2, 2 * 96)
    torch.testing.assert_close(kernels.silu_mul(gu, impl="triton"), kernels.silu_mul(gu, impl="torch"))
    for hq, hkv, d, norm in ((4, 2, 64, True), (3, 1, 32, False)):
        qkv = torch.randn(4, (hq + 2 * hkv) * d)
        slots = torch.tensor([2, 0, 1, 2], dtype=torch.int32)
        pos = torch.tensor([5, 0, 19, 6], dtype=torch.int32)
        angles = torch.arange(20.0)[:, None] * torch.rand(d // 2)
        qk = torch.randn(2, d) if norm else None
        caches = [torch.randn(3, hkv, 20, d) for _ in range(2)]
        c1, c2 = [c.clone() for c in caches], [c.clone() for c in caches]
        q1 = kernels.qk_norm_rope_store(qkv, hq, hkv, d, slots, pos, angles.cos(), angles.sin(), *c1, qk, 1e-6, impl="triton")
        q2 = kernels.qk_norm_rope_store(qkv, hq, hkv, d, slots, pos, angles.cos(), angles.sin(), *c2, qk, 1e-6, impl="torch")
        torch.testing.assert_close(q1, q2)
        torch.testing.assert_close(c1, c2)


@pytest.mark.skipif(not _interpreted, reason="needs Triton under TRITON_INTERPRET=1")
def test_advance_matches_reference():
    """The step's bookkeeping kernel against its PyTorch reference: recording at count (clamped to the
    last column), stop ids where stop_on_eos, limits, inactive rows untouched."""
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        b, max_len = int(torch.randint(1, 40, (1,), generator=g)), 12
        nxt = torch.randint(0, 20, (b,), generator=g)
        limit = torch.randint(1, max_len + 4, (b,), generator=g)
        stop_ids = torch.full((8,), -1)
        stop_ids[: int(torch.randint(0, 3, (1,), generator=g))] = torch.randint(0, 20, (1,), generator=g)
        stop_on_eos = torch.rand(b, generator=g) < 0.5
        state = (torch.rand(b, generator=g) < 0.7, torch.randint(0, max_len + 3, (b,), generator=g),
                 torch.randint(1, 100, (b,), generator=g, dtype=torch.int32), torch.randint(0, 20, (b,), generator=g),
                 torch.randint(0, 20, (b, max_len), generator=g))
        got, ref = [t.clone() for t in state], [t.clone() for t in state]
        for s, impl in ((got, "triton"), (ref, "torch")):
            active, count, lengths, tokens, out = s
            kernels.advance(nxt, active, count, limit, lengths, tokens, out, stop_ids, stop_on_eos, impl=impl)
        assert all(torch.equal(a, r) for a, r in zip(got, ref))
        assert not torch.equal(ref[1], state[1]) or not state[0].any()  # active rows moved on
