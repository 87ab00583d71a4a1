"""GPU behaviour of the engine and the executor (marked ``gpu``; skipped without CUDA). Run on the GPU
machine: ``TRITON_INTERPRET=0 python3 -m pytest -m gpu tests/test_gpu.py``.

Models are tiny random checkpoints saved with transformers (peaked logits, so greedy decoding has no
near-ties); fp32 where tokens are compared across different kernels."""
from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

import lessismore as lim  # noqa: E402
from lessismore.config import FULL, SparseConfig  # noqa: E402
from lessismore.decode import DecodeCache  # noqa: E402
from lessismore.methods import LayerRole, get  # noqa: E402

METHODS = ["lessismore", "tidaldecode", "quest", "streaming", "oracle"]
LENGTHS = (20, 45, 70, 100)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 6-layer Qwen3 (GQA 8/2 heads, head_dim 64), saved once."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = tmp_path_factory.mktemp("tiny-qwen3")
    config = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=False, initializer_range=0.2, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(path)
    return path


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 512, (n,), generator=g).tolist() for n in LENGTHS]


def cfg_of(method: str, budget: int) -> SparseConfig:
    return SparseConfig.for_method(method, budget=budget, selection_layers=(2,), sink_tokens=2, page_size=4)


def hf_greedy(checkpoint, cfg: SparseConfig, new: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa").cuda()
    out = []
    with lim.sparse_attention(model, cfg):
        for ids in prompts():
            x = torch.tensor([ids], device="cuda")
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
            out.append(y[0, len(ids):].tolist())
    return out


def engine_greedy(engine, new: int) -> list[list[int]]:
    return [r.token_ids for r in engine.generate(prompts(), max_new_tokens=new, ignore_eos=True)]


@pytest.mark.parametrize("method", ["full"] + METHODS)
def test_engine_greedy_tokens_equal_hf(checkpoint, method):
    """Engine (Triton kernels, fused selections, CUDA graphs) against the HF path (SDPA, reference
    selections), fp32, at budget 24 over contexts of 20-130 tokens."""
    cfg = FULL if method == "full" else cfg_of(method, 24)
    engine = lim.Engine(str(checkpoint), cfg=cfg, device="cuda", dtype=torch.float32, max_batch=4, max_len=160)
    assert engine_greedy(engine, 30) == hf_greedy(checkpoint, cfg, 30)


def test_graph_replay_equals_eager(checkpoint):
    cfg = cfg_of("lessismore", 24)
    graphs = lim.Engine(str(checkpoint), cfg=cfg, device="cuda", max_batch=4, max_len=160)
    eager = lim.Engine(str(checkpoint), cfg=cfg, device="cuda", max_batch=4, max_len=160, cuda_graphs=False)
    assert graphs.executor is not eager.executor
    assert engine_greedy(graphs, 40) == engine_greedy(eager, 40)
    assert graphs.kv_stats() == eager.kv_stats()


@pytest.mark.parametrize("method", ["lessismore", "tidaldecode"])
def test_selection_on_a_second_stream_changes_nothing(checkpoint, method):
    """The fused selection's top-k and union on the side stream (the engine's default on CUDA) against
    the main stream: the same sampled tokens and KV counts, bf16, CUDA graphs, slots refilled."""
    def run(overlap):
        engine = lim.Engine(str(checkpoint), cfg=cfg_of(method, 24), device="cuda", max_batch=2, max_len=160,
                            overlap_selection=overlap)
        results = engine.generate(prompts(), max_new_tokens=[40, 12, 40, 25], ignore_eos=True, temperature=0.6,
                                  top_p=0.95, seed=3)
        return engine, [r.token_ids for r in results], engine.kv_stats()

    on, tokens_on, stats_on = run(True)
    off, tokens_off, stats_off = run(False)
    assert on.executor.overlap and on.executor._side is not None  # the side stream did run
    assert off.executor._side is None
    assert tokens_on == tokens_off and stats_on == stats_off


def test_method_switch_and_second_engine_in_one_process(checkpoint):
    """set_method after graphs were captured, and a second engine, each capturing again (this failed
    with an allocator assert before the graph pool was dropped with its graphs)."""
    engine = lim.Engine(str(checkpoint), cfg=FULL, device="cuda", max_batch=4, max_len=160)
    first = engine_greedy(engine, 20)
    for method in METHODS + ["full"]:
        engine.set_method(FULL if method == "full" else cfg_of(method, 24))
        got = engine_greedy(engine, 20)
        if method == "full":
            assert got == first
    other = lim.Engine(str(checkpoint), cfg=cfg_of("lessismore", 24), device="cuda", max_batch=4, max_len=160)
    engine.set_method(cfg_of("lessismore", 24))
    assert engine_greedy(other, 20) == engine_greedy(engine, 20)


def test_continuous_batching_gives_each_sequence_its_solo_tokens(checkpoint):
    cfg = cfg_of("lessismore", 24)
    solo = lim.Engine(str(checkpoint), cfg=cfg, device="cuda", dtype=torch.float32, max_batch=1, max_len=160)
    alone = [solo.generate([p], max_new_tokens=30, ignore_eos=True)[0].token_ids for p in prompts()]
    two_slots = lim.Engine(str(checkpoint), cfg=cfg, device="cuda", dtype=torch.float32, max_batch=2, max_len=160)
    results = two_slots.generate(prompts(), max_new_tokens=[30, 10, 30, 20], ignore_eos=True)  # slots refilled
    assert [r.token_ids for r in results] == [a[:n] for a, n in zip(alone, (30, 10, 30, 20))]


def _recorded_selections(checkpoint, method, role=LayerRole.SELECT_DENSE, max_batch=4, new=6):
    """(engine, [(q, k, valid, selection)]) at every ``role`` layer of a generation, recorded by an
    observer (steps run eagerly then), bf16 kernels."""
    engine = lim.Engine(str(checkpoint), cfg=cfg_of(method, 24), device="cuda", max_batch=max_batch, max_len=160)
    seen = []

    def record(layer, layer_role, q, k, v, valid, selection, out):
        if layer_role is role:
            seen.append((q.clone(), k.clone(), valid.clone(), selection))

    engine.executor.observers.append(record)
    engine.generate(prompts(), max_new_tokens=new, ignore_eos=True)
    return engine, seen


@pytest.mark.parametrize("method", ["lessismore", "tidaldecode"])
def test_fused_selection_equals_reference_on_engine_data(checkpoint, method):
    """The fused selection (kernel scores, Triton top-k, Triton union) against the method's reference
    on the engine's own q/k. Scores are the same fp32 dots summed in another order, so a pair of
    scores within rounding may swap at the top-k boundary: at most 1% of the (row, head) sets may
    differ, by at most one position each."""
    engine, seen = _recorded_selections(checkpoint, method)
    cfg = engine.cfg
    assert seen
    reference = get(method)
    differing = total = 0
    for q, k, valid, selection in seen:
        expected = reference.select(cfg, q, k, valid)
        assert torch.equal(selection.counts, expected.counts)
        live = torch.arange(expected.indices.shape[-1], device="cuda") < expected.counts.unsqueeze(-1)
        got = torch.where(live, selection.indices, -1).flatten(0, -2)
        want = torch.where(live, expected.indices, -1).flatten(0, -2)
        for a, b in zip(got.tolist(), want.tolist()):
            total += 1
            if a != b:
                differing += 1
                assert len(set(a) ^ set(b)) <= 2
    assert differing <= 0.01 * total, f"{differing} of {total} sets differ"


@pytest.mark.parametrize("method", ["lessismore", "tidaldecode"])
def test_fused_selection_is_exact_on_exact_scores(method):
    """Inputs in multiples of 1/4 make every score exact in fp32 (and ties frequent): the fused path
    must give the reference set exactly, Qwen3-8B heads, rows of 32K, 2049, 2048 and 700 tokens."""
    torch.manual_seed(0)
    b, hkv, g, d, length = 4, 8, 4, 128, 32768
    q = (torch.randint(-3, 4, (b, hkv * g, d), device="cuda") / 4).bfloat16()
    k = (torch.randint(-3, 4, (b, hkv, length, d), device="cuda") / 4).bfloat16()
    v = torch.randn(b, hkv, length, d, device="cuda").bfloat16()
    lengths = torch.tensor([length, 2049, 2048, 700], device="cuda", dtype=torch.int32)
    cfg = SparseConfig.for_method(method, budget=2048)
    out, selection = get(method).fused_select(cfg, q, DecodeCache(k, v, lengths=lengths), None)
    valid = torch.arange(length, device="cuda") < lengths.view(-1, 1)
    expected = get(method).select(cfg, q, k, valid)
    assert torch.equal(selection.counts, expected.counts)
    live = torch.arange(expected.indices.shape[-1], device="cuda") < expected.counts.unsqueeze(-1)
    assert torch.equal(torch.where(live, selection.indices, -1), torch.where(live, expected.indices, -1))


def test_kv_read_fraction_from_the_engine(checkpoint):
    """The engine reports KV reads through the executor's counters, inside CUDA graphs too."""
    engine = lim.Engine(str(checkpoint), cfg=cfg_of("streaming", 16), device="cuda", max_batch=4, max_len=160)
    engine.generate([list(range(1, 101))], max_new_tokens=11, ignore_eos=True)
    stats = engine.kv_stats()
    # 6 layers: 0 and 1 dense, 4 sparse; 10 decode steps at n = 101..110.
    expected = sum(2 * n + 4 * 16 for n in range(101, 111)) / sum(6 * n for n in range(101, 111))
    assert stats["sequence_steps"] == 10
    assert stats["kv_read_fraction"] == pytest.approx(expected)


def test_quest_fast_selection_equals_reference_on_engine_data(checkpoint):
    """Quest in the engine selects from its incremental page bounds (bf16, the cache's dtype; the
    reference reads the keys): bounds are exact min/max and the page scores the same fp32 arithmetic,
    so every SELECT_SPARSE layer's set equals the reference ``select`` exactly, slots refilled too."""
    engine, seen = _recorded_selections(checkpoint, "quest", LayerRole.SELECT_SPARSE, max_batch=2, new=[12, 5, 9, 7])
    assert engine.method_state is not None and len(seen) >= 4 * engine.stats.decode_steps
    reference = get("quest")
    for q, k, valid, selection in seen:
        expected = reference.select(engine.cfg, q, k, valid)
        assert selection.indices.shape == expected.indices.shape
        assert torch.equal(selection.counts, expected.counts)
        live = torch.arange(expected.indices.shape[-1], device="cuda") < expected.counts.unsqueeze(-1)
        assert torch.equal(torch.where(live, selection.indices, -1), torch.where(live, expected.indices, -1))
