"""Triton kernels against the PyTorch references.

On CPU they run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before any
kernel is defined); on a GPU machine run them with TRITON_INTERPRET=0 and they run compiled, bf16 too.
Every check draws fresh random inputs; references are computed in fp32 from the same inputs.
"""
import pytest
import torch

pytest.importorskip("triton")

from lessismore.config import SparseConfig  # noqa: E402
from lessismore.methods import Selection, get  # noqa: E402
from lessismore.methods.base import grouped_scores, mask_to_selection  # noqa: E402
from lessismore.methods.lessismore import lessismore_mask, unified_union, union_prefix  # noqa: E402
from lessismore.analysis.metrics import union_depth  # noqa: E402
from lessismore.ops import naive  # noqa: E402
from lessismore.decode import DecodeCache  # noqa: E402
from lessismore.methods.lessismore import triton as lessismore_triton  # noqa: E402
from lessismore.ops import triton_decode  # noqa: E402

ON_GPU = torch.cuda.is_available() and not triton_decode.INTERPRETED
if not ON_GPU and not triton_decode.INTERPRETED:
    pytest.skip("no GPU and the Triton interpreter is off", allow_module_level=True)
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# (B, Hkv, G, D, L, Kmax): Kmax off the 64-token block, GQA groups 1/4/7/8, D 64/128.
SHAPES = [(2, 2, 4, 64, 200, 77), (3, 1, 7, 128, 150, 100), (1, 2, 1, 64, 300, 130), (2, 1, 8, 128, 90, 64)]
if ON_GPU:
    SHAPES += [(4, 8, 4, 128, 5000, 1000), (1, 8, 4, 128, 40000, 4096), (32, 8, 4, 128, 3000, 2048)]


def fused_lessismore(q, k, v, lengths, cfg, prefix=None):
    """LessIsMore's fused selection layer on the kernels (forced: under the interpreter on CPU)."""
    return lessismore_triton.fused_select(cfg, q, DecodeCache(k, v, lengths=lengths, kernels=True), prefix=prefix)


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite or unwritten output"
    return ((out.float() - ref).norm() / ref.norm()).item()


def rand(*shape, dtype):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def cache(b, hkv, length, d, dtype):
    return rand(b, hkv, length, d, dtype=dtype), rand(b, hkv, length, d, dtype=dtype)


def random_sets(rows, length, kmax):
    """rows random sets of kmax distinct positions, ascending, and counts in [1, kmax] with a full row."""
    idx = torch.stack([torch.randperm(length, device=DEVICE)[:kmax].sort().values for _ in range(rows)])
    counts = torch.randint(1, kmax + 1, (rows,), device=DEVICE, dtype=torch.int32)
    counts[0] = kmax
    return idx, counts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_sparse_decode_attention(shape, dtype, num_splits):
    b, hkv, g, d, length, kmax = shape
    q = rand(b, hkv * g, d, dtype=dtype)
    k, v = cache(b, hkv, length, d, dtype)
    idx, counts = random_sets(b, length, kmax)
    idx = idx.to(torch.int32) if num_splits != 3 else idx  # int32 and int64 indices
    tuning = {"num_splits": num_splits, "block_n": 32 if num_splits else None}
    out = triton_decode.sparse_decode_attention(q, k, v, idx, counts, **tuning)
    ref = naive.sparse_decode_attention(q.float(), k.float(), v.float(), idx, counts)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[4:5])
def test_sparse_decode_attention_per_head(shape, dtype):
    b, hkv, g, d, length, kmax = shape
    hq = hkv * g
    q = rand(b, hq, d, dtype=dtype)
    k, v = cache(b, hkv, length, d, dtype)
    idx, counts = random_sets(b * hq, length, kmax)
    idx, counts = idx.view(b, hq, kmax).to(torch.int32), counts.view(b, hq)
    out = triton_decode.sparse_decode_attention_per_head(q, k, v, idx, counts, scale=0.1)
    ref = naive.sparse_decode_attention_per_head(q.float(), k.float(), v.float(), idx, counts, scale=0.1)
    assert rel_err(out, ref) < TOL[dtype]


def test_scale_and_dispatch():
    """An explicit scale, and lessismore.ops dispatching CUDA tensors to the kernels."""
    from lessismore import ops

    q = rand(2, 8, 64, dtype=torch.float32)
    k, v = cache(2, 2, 100, 64, torch.float32)
    idx, counts = random_sets(2, 100, 33)
    ref = naive.sparse_decode_attention(q, k, v, idx, counts, scale=0.3)
    assert rel_err(triton_decode.sparse_decode_attention(q, k, v, idx, counts, scale=0.3), ref) < 1e-5
    assert rel_err(ops.decode_attention(q, k, v, Selection(idx, counts), scale=0.3), ref) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]] + SHAPES[4:5])
def test_dense_attention_writes_scores(shape, dtype):
    b, hkv, g, d, length, _ = shape
    q = rand(b, hkv * g, d, dtype=dtype)
    k, v = cache(b, hkv, length, d, dtype)
    lengths = torch.randint(1, length + 1, (b,), device=DEVICE, dtype=torch.int32)
    lengths[0] = length
    lo, window = 3, 5
    scores = torch.full((b, hkv * g, length), float("nan"), device=DEVICE)
    out = triton_decode.split_decode(q, k, v, None, lengths, dense=True, scores=scores, score_lo=lo, score_window=window)
    assert rel_err(out, naive.dense_decode_attention(q.float(), k.float(), v.float(), lengths)) < TOL[dtype]
    pos = torch.arange(length, device=DEVICE)
    middle = (pos >= lo) & (pos < lengths.view(-1, 1) - window)
    ref = grouped_scores(q, k).masked_fill(~middle[:, None], float("-inf"))
    assert torch.equal(torch.isinf(scores), torch.isinf(ref))
    assert torch.allclose(scores[middle[:, None].expand_as(scores)], ref[middle[:, None].expand_as(ref)],
                          rtol=1e-4, atol=1e-3 * d**0.5)


CONFIGS = [
    SparseConfig(method="lessismore", budget=64, recent_ratio=0.25, sink_tokens=4),
    SparseConfig(method="lessismore", budget=40, recent_ratio=0.1, sink_tokens=8),  # R = 4 < s: no sinks
    SparseConfig(method="lessismore", budget=100, recent_ratio=1.0, sink_tokens=4),  # all recent, no ranked share
    SparseConfig(method="lessismore", budget=37, recent_ratio=0.3, sink_tokens=0),
]


def check_select(cfg, b, hkv, g, d, length, dtype, prefix=None):
    """Exactly the reference set. Inputs are multiples of 1/4 in [-3/4, 3/4], so every score is exact in
    fp32 and the kernel's scores equal grouped_scores bit for bit (ties and all)."""
    q = (torch.randint(-3, 4, (b, hkv * g, d), device=DEVICE) / 4).to(dtype)
    k = (torch.randint(-3, 4, (b, hkv, length, d), device=DEVICE) / 4).to(dtype)
    v = rand(b, hkv, length, d, dtype=dtype)
    # A full row, a row at the budget, one just past it, and a short one.
    lengths = torch.tensor([length, cfg.budget, cfg.budget + 1, 30], device=DEVICE, dtype=torch.int32)[:b]
    out, sel = fused_lessismore(q, k, v, lengths, cfg, prefix)
    valid = torch.arange(length, device=DEVICE) < lengths.view(-1, 1)
    ref = get("lessismore").select(cfg, q, k, valid)
    assert torch.equal(sel.indices, ref.indices) and torch.equal(sel.counts, ref.counts)
    assert sel.indices.dtype == torch.int64 and sel.counts.dtype == torch.int32
    assert rel_err(out, naive.dense_decode_attention(q.float(), k.float(), v.float(), lengths)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_select_lessismore_matches_method(cfg, dtype):
    check_select(cfg, 4, 2, 4, 64, 300, dtype)


@pytest.mark.parametrize("prefix", [1, 5, 1000])
def test_select_lessismore_any_prefix(prefix):
    """The ranks sorted first do not change the set: a prefix of 1 rank (every row past the budget runs
    out and takes the second top-k), 5, or more than k (one top-k)."""
    check_select(CONFIGS[0], 4, 2, 4, 64, 300, torch.float32, prefix)


@pytest.mark.skipif(not ON_GPU, reason="a long cache is slow in the interpreter")
def test_select_lessismore_matches_method_long():
    """Qwen3-8B heads, 32K slots."""
    check_select(SparseConfig(method="lessismore", budget=2048, recent_ratio=0.25, sink_tokens=4), 4, 8, 4, 128, 32768, torch.bfloat16)


def test_select_lessismore_cache_shorter_than_budget():
    cfg = SparseConfig(method="lessismore", budget=256, recent_ratio=0.25, sink_tokens=4)
    q = rand(2, 4, 64, dtype=torch.float32)
    k, v = cache(2, 1, 100, 64, torch.float32)
    lengths = torch.tensor([100, 7], device=DEVICE, dtype=torch.int32)
    _, sel = fused_lessismore(q, k, v, lengths, cfg)
    ref = get("lessismore").select(cfg, q, k, torch.arange(100, device=DEVICE) < lengths.view(-1, 1))
    assert torch.equal(sel.indices, ref.indices) and torch.equal(sel.counts, ref.counts)


@pytest.mark.parametrize("tile", [4096, 16])
@pytest.mark.parametrize("heads,length,budget", [(8, 400, 64), (5, 97, 40)] + ([(32, 32768, 2048)] if ON_GPU else []))
def test_union_matches_reference(heads, length, budget, tile):
    """The fast union on random real-valued scores (same scores for both sides), rows of several lengths;
    tile 16: two ranks a step, so the union crosses many steps before the one that passes k."""
    cfg = SparseConfig(method="lessismore", budget=budget, recent_ratio=0.25, sink_tokens=4)
    b = 3
    lengths = torch.tensor([length, budget + 1, length // 2], device=DEVICE, dtype=torch.int32)
    valid = torch.arange(length, device=DEVICE) < lengths.view(-1, 1)
    recent, sinks = cfg.recent_share, cfg.effective_sinks
    # Heads that agree often: shared structure plus noise, so the lists overlap heavily.
    scores = torch.randn(b, 1, length, device=DEVICE) + 0.5 * torch.randn(b, heads, length, device=DEVICE)
    pos = torch.arange(length, device=DEVICE)
    middle = valid & (pos >= sinks) & (pos < lengths.view(-1, 1) - (recent - sinks))
    values, top = naive.topk_desc(scores.masked_fill(~middle[:, None], float("-inf")), budget - recent)
    sel = lessismore_triton.union_selection(top, values, lengths, length, budget, recent, sinks, tile=tile)
    ref = mask_to_selection(lessismore_mask(scores, valid, budget, recent, sinks), min(budget, length))
    assert torch.equal(sel.indices, ref.indices) and torch.equal(sel.counts, ref.counts)
    # The ranked part alone is unified_union's set.
    full = lengths > budget
    chosen = unified_union(top, values > float("-inf"), length, budget - recent)
    ranked = sel.indices[:, sinks:budget - recent + sinks]
    assert torch.equal(chosen[full].sum(-1), torch.full_like(chosen[full].sum(-1), budget - recent))
    assert torch.equal(ranked[full], chosen[full].nonzero()[:, 1].view(-1, budget - recent))


def test_union_prefix_rule():
    """Half of k's power of two, k itself up to 64."""
    assert [union_prefix(k) for k in (1, 64, 65, 192, 1024, 1536, 3072)] == [1, 64, 64, 128, 512, 1024, 2048]


@pytest.mark.parametrize("tile", [4096, 16])
@pytest.mark.parametrize("prefix", [1, 6, 12])
def test_union_prefix_completes_rows_that_run_out(prefix, tile):
    """The union over the first `prefix` ranks of each head's list: the rows whose union reads deeper
    (``union_depth`` > prefix) and only those get the whole lists, and every row has the reference set.
    Rows: heads that share one list (depth k), independent heads (depth about k / H), heads that agree
    in part, and a row within the budget (nothing ranked)."""
    cfg = SparseConfig(method="lessismore", budget=64, recent_ratio=0.25, sink_tokens=4)
    heads, length = 8, 400
    recent, sinks, k = cfg.recent_share, cfg.effective_sinks, cfg.ranked_share
    lengths = torch.tensor([length, length, 300, 60], device=DEVICE, dtype=torch.int32)
    valid = torch.arange(length, device=DEVICE) < lengths.view(-1, 1)
    scores = torch.randn(4, heads, length, device=DEVICE) * torch.tensor([0.0, 1.0, 0.3, 1.0], device=DEVICE).view(4, 1, 1)
    scores += torch.randn(4, 1, length, device=DEVICE)
    pos = torch.arange(length, device=DEVICE)
    middle = valid & (pos >= sinks) & (pos < lengths.view(-1, 1) - (recent - sinks))
    masked = scores.masked_fill(~middle[:, None], float("-inf"))
    asked = []

    def deeper(rows):
        asked.append(rows.clone())
        return naive.topk_desc(masked, k)

    values, top = naive.topk_desc(masked, prefix)
    sel = lessismore_triton.union_selection(top, values, lengths, length, cfg.budget, recent, sinks, deeper, tile=tile)
    ref = mask_to_selection(lessismore_mask(scores, valid, cfg.budget, recent, sinks), cfg.budget)
    assert torch.equal(sel.indices, ref.indices) and torch.equal(sel.counts, ref.counts)
    depth = union_depth(scores, valid, cfg.budget, cfg.recent_ratio, cfg.sink_tokens)
    assert depth[0] == k and depth[1] < k / 2  # the rows are what they claim to be
    assert len(asked) == 1 and torch.equal(asked[0], (depth > prefix).to(torch.int32))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_capture_in_cuda_graph():
    cfg = SparseConfig(method="lessismore", budget=512, recent_ratio=0.25, sink_tokens=4)
    b, hkv, g, d, length = 4, 8, 4, 128, 8192
    q = rand(b, hkv * g, d, dtype=torch.bfloat16)
    k, v = cache(b, hkv, length, d, torch.bfloat16)
    lengths = torch.tensor([8192, 5000, 513, 100], device=DEVICE, dtype=torch.int32)

    def step():
        out, sel = fused_lessismore(q, k, v, lengths, cfg)
        return out, sel, triton_decode.sparse_decode_attention(q, k, v, sel.indices, sel.counts)

    expect = step()  # compiles the kernels before capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    q.copy_(rand(b, hkv * g, d, dtype=torch.bfloat16))
    graph.replay()
    expect = step()
    torch.cuda.synchronize()
    assert torch.equal(got[1].indices, expect[1].indices) and torch.equal(got[1].counts, expect[1].counts)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[2], expect[2])
