"""The Triton top-k (ops.topk) against the reference (ops.naive.topk_desc): identical values (bit for bit)
and indices, ties included (equal scores -> lower position first).

On CPU the kernel runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before any
kernel is defined) on small shapes; with a GPU (TRITON_INTERPRET=0) larger shapes and CUDA-graph capture
are added. Every check draws fresh random inputs.
"""
import pytest
import torch

pytest.importorskip("triton")

from lessismore.ops import naive, topk  # noqa: E402

ON_GPU = torch.cuda.is_available() and not topk.INTERPRETED
if not ON_GPU and not topk.INTERPRETED:
    pytest.skip("no GPU and the Triton interpreter is off", allow_module_level=True)
DEVICE = "cuda" if ON_GPU else "cpu"
INF = float("inf")

# (B, H, L, k): k below and above the 1024/4096-slot blocks, L off every block size, k == L.
SHAPES = [(2, 3, 300, 37), (1, 2, 640, 640), (2, 2, 777, 1), (1, 3, 4500, 700)]
if ON_GPU:
    SHAPES += [(8, 32, 16384, 1536), (4, 8, 32768 + 17, 2048), (2, 4, 131072, 1536), (32, 32, 4096, 1536)]


def assert_same(scores, k, lengths=None, **tuning):
    """topk_desc and topk_positions against the reference. Unless the tuning says, topk_desc sorts in
    the top-k kernel (the default) and topk_positions with torch.sort."""
    values, indices = topk.topk_desc(scores, k, lengths, **tuning)
    ref_values, ref_indices = naive.topk_desc(scores, k, lengths)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == indices.shape == (*scores.shape[:-1], min(k, scores.shape[-1]))
    assert torch.equal(indices, ref_indices), f"indices differ at {(indices != ref_indices).nonzero()[:5].tolist()}"
    assert torch.equal(values.view(torch.int32), ref_values.view(torch.int32)), "values differ"
    positions = topk.topk_positions(scores, k, lengths, **{"fused_sort": False, **tuning})
    assert positions.dtype == torch.int64
    assert torch.equal(positions, naive.topk_positions(scores, k, lengths)), "positions differ"


def randn(*shape):
    return torch.randn(*shape, device=DEVICE)


def test_reference_tie_rule():
    """Hand-built: equal scores (and -0.0 / +0.0) go lowest position first, -inf last, lengths mask."""
    s = torch.tensor([[[1.0, 3.0, 3.0, -INF, 3.0, 2.0, -0.0, 0.0]]])
    values, indices = naive.topk_desc(s, 8)
    assert indices.tolist() == [[[1, 2, 4, 5, 0, 6, 7, 3]]]
    assert values.view(torch.int32).tolist() == s[..., [1, 2, 4, 5, 0, 6, 7, 3]].view(torch.int32).tolist()
    assert naive.topk_desc(s, 3)[1].tolist() == [[[1, 2, 4]]]
    # Row 0 has 3 candidates (a -inf among them), so the tail is its -inf at 1, then slot 3 (past the length).
    s = torch.tensor([[5.0, -INF, 5.0, 7.0], [2.0, 2.0, 9.0, 2.0]])
    values, indices = naive.topk_desc(s, 4, torch.tensor([3, 4]))
    assert indices.tolist() == [[0, 2, 1, 3], [2, 0, 1, 3]]
    assert values.tolist() == [[5.0, 5.0, -INF, -INF], [9.0, 2.0, 2.0, 2.0]]


@pytest.mark.parametrize("shape", SHAPES)
def test_random(shape):
    b, h, length, k = shape
    assert_same(randn(b, h, length), k)


def test_other_ranks():
    """[L] and [R, L] rows work as well as [B, H, L]."""
    assert_same(randn(1000), 50)
    assert_same(randn(3, 700), 699)


def past_lengths(scores, lengths):
    """scores with NaN in every slot from its row's length on: the kernel reads nothing there."""
    pos = torch.arange(scores.shape[-1], device=DEVICE)
    return scores.masked_fill(pos >= lengths.view(-1, *([1] * (scores.dim() - 1))), float("nan"))


def test_lengths():
    # Empty rows, rows shorter than k (tail of -inf slots), exactly k, full; int32 and int64 lengths;
    # NaN past each row's length, which must not be read.
    lengths = torch.tensor([0, 50, 100, 600, 433], device=DEVICE)
    assert_same(past_lengths(randn(5, 2, 600), lengths), 100, lengths)
    lengths = torch.tensor([2999, 17, 1500], device=DEVICE, dtype=torch.int32)
    assert_same(past_lengths(randn(3, 2, 3000), lengths), 384, lengths)
    if ON_GPU:
        lengths = torch.randint(0, 32768, (32,), device=DEVICE)
        lengths[:4] = torch.tensor([0, 1000, 1536, 32768])
        assert_same(randn(32, 32, 32768), 1536, lengths)


def test_active_rows():
    """active picks the rows computed (with lengths, over [B, H, L] and [B, L] rows); they equal the
    reference. The others are skipped: their outputs are whatever the allocation held."""
    scores = randn(4, 3, 900)
    lengths = torch.tensor([900, 300, 0, 650], device=DEVICE)
    active = torch.tensor([1, 0, 1, 1], device=DEVICE, dtype=torch.int32)
    values, indices = topk.topk_desc(scores, 200, lengths, active)
    ref_values, ref_indices = naive.topk_desc(scores, 200, lengths)
    on = active.bool()
    assert torch.equal(indices[on], ref_indices[on]) and torch.equal(values[on], ref_values[on])
    positions = topk.topk_positions(scores[:, 0], 50, None, active)
    assert torch.equal(positions[on], naive.topk_positions(scores[:, 0], 50)[on])
    with pytest.raises(ValueError, match="active"):
        topk.topk_desc(scores, 10, None, active.long())


def test_ties():
    length, k = (8192, 1536) if ON_GPU else (1200, 150)
    rows = torch.randint(0, 4, (4, 2, length), device=DEVICE).float()  # four values: ties everywhere
    rows[0, 0] = 1.5  # all equal
    rows[0, 1, :-3] = -INF  # fewer than k finite entries
    rows[1, 0, ::2] = -INF  # every other slot -inf
    rows[1, 1] = torch.where(torch.rand(length, device=DEVICE) < 0.5, -0.0, 0.0)  # two zeros, which tie
    assert_same(rows, k)
    assert_same(rows, k, torch.tensor([length, 100, length // 2 + 1, 3], device=DEVICE))
    # Continuous-looking data with many ties near the threshold (the buffer path, not the overflow one).
    assert_same(randn(2, 2, length).round(decimals=1), k)
    assert_same(randn(1, 2, length).round(decimals=2), k)


def test_all_inf_rows():
    s = torch.full((2, 2, 700), -INF, device=DEVICE)
    s[1, 1, 5] = 3.0
    assert_same(s, 64)
    assert_same(s, 64, torch.tensor([0, 700], device=DEVICE))


@pytest.mark.parametrize("data", ["randn", "ties"])
def test_overflow_path(data):
    """A buffer too small for the candidates: steps 4-5 read the row instead; same results."""
    s = randn(2, 2, 2000) if data == "randn" else torch.randint(0, 6, (2, 2, 2000), device=DEVICE).float()
    assert_same(s, 200, cap=64)
    assert_same(s, 200, torch.tensor([1500, 2000], device=DEVICE), cap=100)


def test_tuning_does_not_change_results():
    s = randn(2, 2, 3000)
    tunings = ({"gm_stop": 0}, {"gm_stop": 24, "gm_rows": 1}, {"block": 1024, "num_warps": 4},
               {"group": 512, "cap": 2048}, {"group": 4096}, {"fused_sort": False}, {"fused_sort": True})
    for tuning in tunings:
        assert_same(s, 500, **tuning)


def test_edge_arguments():
    s = randn(2, 3, 100)
    for fn in (topk.topk_desc, naive.topk_desc):
        with pytest.raises(ValueError):
            fn(s, -1)
        with pytest.raises(ValueError):
            fn(s, 5, torch.tensor([1, 2, 3], device=DEVICE))
    values, indices = topk.topk_desc(s, 0)
    assert values.shape == indices.shape == (2, 3, 0)
    assert_same(s, 101)  # k > L: all L entries
    assert_same(s.double(), 7)  # upcast to fp32, as the reference does
    with pytest.raises(ValueError):
        topk.topk_desc(s.int(), 5)
    with pytest.raises(ValueError, match="group"):
        topk.topk_desc(s, 50, group=32)  # fewer groups than k


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture():
    s = randn(8, 32, 16384)
    lengths = torch.randint(1, 16384, (8,), device=DEVICE)
    topk.topk_desc(s, 1536, lengths)  # compile outside the capture
    topk.topk_positions(s, 1536, lengths, fused_sort=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        values, indices = topk.topk_desc(s, 1536, lengths)
        positions = topk.topk_positions(s, 1536, lengths, fused_sort=False)
    for _ in range(2):
        s.copy_(randn(8, 32, 16384))
        lengths.copy_(torch.randint(1, 16384, (8,), device=DEVICE))
        graph.replay()
        ref_values, ref_indices = naive.topk_desc(s, 1536, lengths)
        assert torch.equal(indices, ref_indices)
        assert torch.equal(positions, naive.topk_positions(s, 1536, lengths))
        assert torch.equal(values.view(torch.int32), ref_values.view(torch.int32))
