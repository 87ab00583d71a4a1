"""The paged decode kernels (lessismore.ops.paged: triton_decode's split-K kernel with PAGED on) against
the contiguous ones, and ``PagedCache`` through the decode-step executor against the contiguous cache.

The paged cache is laid out as vLLM's GPU backends lay it out: per layer a tensor of logical shape
[num_blocks, Hkv, block_size, 2 * D] (keys then values in the last dim), physically NHD or HND, read
through ``kv_cache.transpose(1, 2).split(D, -1)``; rows own shuffled blocks, with blocks of garbage
between them. Runs on CPU under the Triton interpreter (tests/conftest.py), no vLLM needed; on a GPU
machine run with TRITON_INTERPRET=0.
"""
import pytest
import torch

pytest.importorskip("triton")

from lessismore.config import SparseConfig  # noqa: E402
from lessismore.decode import DecodeCache, DecodeExecutor  # noqa: E402
from lessismore.methods import Selection  # noqa: E402
from lessismore.ops import paged, triton_decode  # noqa: E402

ON_GPU = torch.cuda.is_available() and not triton_decode.INTERPRETED
if not ON_GPU and not triton_decode.INTERPRETED:
    pytest.skip("no GPU and the Triton interpreter is off", allow_module_level=True)
DEVICE = "cuda" if ON_GPU else "cpu"


def paged_layout(k, v, lengths, block_size, layout="NHD", seed=0):
    """Contiguous k, v [B, Hkv, L, D] -> (key_cache, value_cache [num_blocks, block_size, Hkv, D] views of
    one packed vLLM-style cache, block_table [B, max_blocks] int32). Each row owns ceil(L / block_size)
    shuffled blocks (only the first ceil(n / block_size) hold its tokens); spare blocks hold garbage."""
    b, hkv, length, d = k.shape
    per_row = -(-length // block_size)
    g = torch.Generator().manual_seed(seed)
    num_blocks = b * per_row + 5
    block_table = torch.randperm(num_blocks, generator=g)[: b * per_row].view(b, per_row).to(torch.int32)
    if layout == "NHD":
        raw = torch.randn(num_blocks, block_size, hkv, 2 * d, generator=g).to(k.dtype) * 100
        kv_cache = raw.permute(0, 2, 1, 3)  # logical (num_blocks, Hkv, block_size, 2D)
    else:
        kv_cache = torch.randn(num_blocks, hkv, block_size, 2 * d, generator=g).to(k.dtype) * 100
    kv_cache = kv_cache.to(DEVICE)
    key_cache, value_cache = kv_cache.transpose(1, 2).split(d, dim=-1)
    for row in range(b):
        for p in range(int(lengths[row])):
            blk, slot = int(block_table[row, p // block_size]), p % block_size
            key_cache[blk, slot] = k[row, :, p]
            value_cache[blk, slot] = v[row, :, p]
    return key_cache, value_cache, block_table.to(DEVICE)


def data(b, hkv, g, d, length, dtype, integer=False, seed=0):
    torch.manual_seed(seed)
    if integer:  # small integers: every q.k is exact in fp32, so score ties are real ties
        draw = lambda *s: torch.randint(-3, 4, s).float()  # noqa: E731
    else:
        draw = torch.randn
    q, k, v = draw(b, hkv * g, d), draw(b, hkv, length, d), draw(b, hkv, length, d)
    return q.to(dtype).to(DEVICE), k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE)


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# (B, Hkv, G, D, L, block_size, layout)
SHAPES = [(3, 2, 2, 32, 150, 16, "NHD"), (2, 1, 4, 64, 200, 32, "HND"), (1, 2, 1, 32, 90, 16, "HND")]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_paged_dense_with_scores_equals_contiguous(shape, dtype, num_splits):
    b, hkv, g, d, length, bs, layout = shape
    q, k, v = data(b, hkv, g, d, length, dtype)
    lengths = torch.tensor([length, length // 2 + 3, 7][:b], dtype=torch.int32, device=DEVICE)
    key_cache, value_cache, table = paged_layout(k, v, lengths, bs, layout)
    ref_scores = torch.empty(b, hkv * g, length, device=DEVICE)
    ref = triton_decode.split_decode(q, k, v, None, lengths, dense=True, scores=ref_scores, score_lo=2,
                                     score_window=3, num_splits=num_splits)
    scores = torch.full((b, hkv * g, length), 7.0, device=DEVICE)
    out = paged.paged_decode(q, key_cache, value_cache, table, length, lengths=lengths, scores=scores, score_lo=2,
                             score_window=3, num_splits=num_splits)
    # The same kernel reading the same numbers in the same order: identical bits.
    assert torch.equal(out, ref)
    assert torch.equal(scores, ref_scores)
    plain = paged.paged_decode(q, key_cache, value_cache, table, length, lengths=lengths, num_splits=num_splits)
    assert torch.equal(plain, ref)


def _sets(b, length, kmax, lengths, heads=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, heads) if heads else (b,)
    idx = torch.zeros(*shape, kmax, dtype=torch.long)
    counts = torch.zeros(*shape, dtype=torch.int32)
    for flat in range(int(torch.tensor(shape).prod())):
        row = flat // heads if heads else flat
        n = int(lengths[row])
        c = int(torch.randint(1, min(kmax, n) + 1, (1,), generator=g))
        chosen = torch.randperm(n, generator=g)[:c].sort().values
        filled = torch.cat([chosen, chosen[-1:].expand(kmax - c)])  # padding repeats a valid position
        idx.view(-1, kmax)[flat], counts.view(-1)[flat] = filled, c
    return Selection(indices=idx.to(DEVICE), counts=counts.to(DEVICE))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_head", [False, True])
def test_paged_sparse_equals_contiguous(shape, dtype, per_head):
    b, hkv, g, d, length, bs, layout = shape
    q, k, v = data(b, hkv, g, d, length, dtype, seed=1)
    lengths = torch.tensor([length - 1, length // 3, 40][:b], dtype=torch.int32, device=DEVICE)
    key_cache, value_cache, table = paged_layout(k, v, lengths, bs, layout, seed=1)
    sel = _sets(b, length, 37, lengths.cpu(), heads=hkv * g if per_head else None)
    from lessismore import ops

    ref = ops.decode_attention(q, k, v, sel, triton=True)
    out = paged.paged_decode(q, key_cache, value_cache, table, length, selection=sel)
    assert torch.equal(out, ref)
    for splits in (1, 2):
        ref_s = triton_decode.split_decode(q, k, v, sel.indices, sel.counts, per_head=per_head, num_splits=splits)
        out_s = paged.paged_decode(q, key_cache, value_cache, table, length, selection=sel, num_splits=splits)
        assert torch.equal(out_s, ref_s)


def test_paged_block_table_too_short_is_refused():
    q, k, v = data(1, 1, 1, 32, 64, torch.float32)
    lengths = torch.tensor([64], dtype=torch.int32)
    key_cache, value_cache, table = paged_layout(k, v, lengths, 16)
    with pytest.raises(ValueError, match="pages"):
        paged.paged_decode(q, key_cache, value_cache, table[:, :2], 64, lengths=lengths.to(DEVICE))


def test_paged_gather_and_cache_views():
    b, hkv, g, d, length, bs = 3, 2, 2, 32, 70, 16
    q, k, v = data(b, hkv, g, d, length, torch.float32)
    lengths = torch.tensor([70, 33, 1], dtype=torch.int32, device=DEVICE)
    key_cache, value_cache, table = paged_layout(k, v, lengths, bs, "NHD")
    cache = paged.PagedCache(key_cache, value_cache, table, lengths, span=80, kernels=False)
    valid = cache.valid()
    assert valid.shape == (b, 80) and torch.equal(valid.sum(-1), lengths.long())
    keys, values = cache.keys(), cache.values()
    assert keys.shape == (b, hkv, 80, d)
    for row in range(b):
        n = int(lengths[row])
        assert torch.equal(keys[row, :, :n], k[row, :, :n])
        assert torch.equal(values[row, :, :n], v[row, :, :n])
        assert torch.equal(keys[row, :, n:], k[row, :, n - 1 : n].expand(-1, 80 - n, -1))  # repeats, never valid


def test_paged_rows_without_tokens_leave_other_rows_alone():
    """CUDA-graph padding rows: length 0 (and block 0 in their table)."""
    b, hkv, g, d, length, bs = 3, 2, 2, 32, 64, 16
    q, k, v = data(b, hkv, g, d, length, torch.float32)
    lengths = torch.tensor([64, 0, 20], dtype=torch.int32, device=DEVICE)
    key_cache, value_cache, table = paged_layout(k, v, lengths, bs)
    table[1] = 0
    scores = torch.empty(b, hkv * g, length, device=DEVICE)
    out = paged.paged_decode(q, key_cache, value_cache, table, length, lengths=lengths, scores=scores)
    ref = triton_decode.split_decode(q[[0, 2]], k[[0, 2]], v[[0, 2]], None, lengths[[0, 2]], dense=True)
    assert torch.equal(out[[0, 2]], ref)
    assert torch.isneginf(scores[1]).all()


CONFIGS = [
    SparseConfig(method="lessismore", budget=24, recent_ratio=0.5, sink_tokens=2, selection_layers=(2,)),
    SparseConfig(method="lessismore", budget=40, recent_ratio=0.25, sink_tokens=4, selection_layers=(2, 4)),
    SparseConfig(method="lessismore", budget=16, recent_ratio=1.0, sink_tokens=4, selection_layers=(2,)),
    SparseConfig(method="lessismore", budget=512, selection_layers=(2,)),  # budget >= context: every position
    SparseConfig(method="tidaldecode", budget=16, selection_layers=(2,)),
    SparseConfig.for_method("streaming", budget=16, sink_tokens=4),
    SparseConfig(method="full"),
]


TOPK = [False] + ([True] if paged.triton_topk_available() else [])


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.method}-{c.budget}")
@pytest.mark.parametrize("triton_topk", TOPK, ids=lambda t: "triton-topk" if t else "torch-topk")
def test_paged_cache_through_executor_equals_contiguous(cfg, triton_topk):
    """Six layers of one decode step on each cache: the paged cache (fused selection where the method
    has one) selects exactly the sets of the contiguous cache's reference path and attends alike."""
    b, hkv, g, d, length, bs, layers = 3, 2, 2, 32, 130, 16, 6
    lengths = torch.tensor([130, 61, 19], dtype=torch.int32, device=DEVICE)
    span = 144  # static span past the longest row, as vLLM's max_model_len
    steps = []
    for layer in range(layers):
        q, k, v = data(b, hkv, g, d, length, torch.float32, integer=True, seed=10 + layer)
        key_cache, value_cache, table = paged_layout(k, v, lengths, bs, "NHD" if layer % 2 else "HND", seed=layer)
        pad = torch.zeros(b, hkv, span - length, d, device=DEVICE)
        steps.append((q, torch.cat([k, pad], 2), torch.cat([v, pad], 2), key_cache, value_cache, table))

    def run(make_cache, fused):
        executor = DecodeExecutor(cfg, layers, fused=fused)
        seen = []
        executor.observers.append(lambda i, role, *rest: seen.append((i, role, rest[-2], rest[-1])))
        executor.begin_step()
        outs = [executor.layer(i, s[0], make_cache(s), d**-0.5) for i, s in enumerate(steps)]
        executor.end_step()
        return outs, seen, executor.stats()

    scores = torch.empty(b * hkv * g * span, device=DEVICE)
    got, got_seen, got_stats = run(lambda s: paged.PagedCache(s[3], s[4], s[5], lengths, span, scores=scores,
                                                              kernels=triton_topk), True)
    ref, ref_seen, ref_stats = run(lambda s: DecodeCache(s[1], s[2], lengths=lengths, kernels=False), False)
    assert got_stats == ref_stats
    for (i, role, sel, out), (_, ref_role, ref_sel, ref_out) in zip(got_seen, ref_seen):
        assert role == ref_role
        if ref_sel is None:
            assert sel is None
        else:
            assert sel is not None and torch.equal(sel.counts, ref_sel.counts), f"layer {i}"
            live = torch.arange(ref_sel.indices.shape[-1], device=DEVICE) < ref_sel.counts.unsqueeze(-1)
            assert torch.equal(torch.where(live, sel.indices, -1), torch.where(live, ref_sel.indices, -1)), f"layer {i}"
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    for out, ref_out in zip(got, ref):
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)


def test_paged_cache_small_score_buffer_allocates():
    b, hkv, g, d, length, bs = 2, 2, 2, 32, 50, 16
    q, k, v = data(b, hkv, g, d, length, torch.float32)
    lengths = torch.tensor([50, 30], dtype=torch.int32, device=DEVICE)
    key_cache, value_cache, table = paged_layout(k, v, lengths, bs)
    small = torch.empty(10, device=DEVICE)
    cache = paged.PagedCache(key_cache, value_cache, table, lengths, span=64, scores=small, kernels=False)
    out, scores = cache.dense_with_scores(q, None, 0, 1)
    assert scores.shape == (b, hkv * g, 64) and scores.data_ptr() != small.data_ptr()
    big = torch.empty(b * hkv * g * 64 + 3, device=DEVICE)
    cache = paged.PagedCache(key_cache, value_cache, table, lengths, span=64, scores=big, kernels=False)
    out2, scores2 = cache.dense_with_scores(q, None, 0, 1)
    assert scores2.data_ptr() == big.data_ptr() and torch.equal(scores2, scores) and torch.equal(out2, out)
