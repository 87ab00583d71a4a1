"""Quest's Triton kernels (ops.quest) against their references (ops.naive): the fold and the positions
bit for bit, the page scores bit for bit where every sum is exact (quantized inputs) and to fp32
rounding otherwise. On CPU under the Triton interpreter (fp16/fp32: its bf16 is not trusted), on a GPU
also bf16 and larger shapes."""
import pytest
import torch

pytest.importorskip("triton")

from lessismore.ops import naive, quest  # noqa: E402

ON_GPU = torch.cuda.is_available() and not quest.INTERPRETED
if not ON_GPU and not quest.INTERPRETED:
    pytest.skip("no GPU and the Triton interpreter is off", allow_module_level=True)
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# (B, Hq, Hkv, D, pages, page_size); D off a power of two, pages off the kernel's block of 32
SHAPES = [(3, 4, 2, 16, 37, 4), (2, 6, 3, 12, 5, 16), (1, 2, 2, 8, 70, 1)]
if ON_GPU:
    SHAPES += [(8, 32, 8, 128, 1024, 16), (32, 32, 8, 128, 2048, 16)]


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _quantized(shape, gen, dtype):
    """Multiples of 1/2 in [-1.5, 1.5]: products and their sums exact in fp32, ties frequent."""
    return ((torch.randn(shape, generator=gen, device=DEVICE) * 1.5).round().clamp(-3, 3) / 2).to(dtype)


def _lengths(b, pages, page_size, gen):
    """Per row: every page used, 2, 0, 1 tokens, a page boundary, then random lengths."""
    n = torch.randint(0, pages * page_size + 1, (b,), generator=gen, device=DEVICE)
    edge = torch.tensor([pages * page_size, 2, 0, 1, page_size], device=DEVICE)
    n[: min(b, len(edge))] = edge[: min(b, len(edge))]
    return n.to(torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fold_equals_reference(shape, dtype):
    b, _, hkv, d, pages, page_size = shape
    gen = _gen(sum(shape))
    span = pages * page_size
    cache = torch.randn(b, hkv, span + 3, d, generator=gen, device=DEVICE).to(dtype)
    k = cache[:, :, :span]  # a view of the cache, as the engine passes it
    lo = torch.randn(b + 1, hkv, pages, d, generator=gen, device=DEVICE).to(dtype)
    hi = lo + torch.rand(lo.shape, generator=gen, device=DEVICE).to(dtype)
    lo[:, :, -1] = float("inf")  # an unfilled page
    hi[:, :, -1] = float("-inf")
    n = _lengths(b, pages, page_size, gen)
    before = lo.clone()
    want_lo, want_hi = lo.clone(), hi.clone()
    naive.quest_fold(want_lo[:b], want_hi[:b], k, n, page_size)
    quest.quest_fold(lo[:b], hi[:b], k, n, page_size)
    assert torch.equal(lo, want_lo) and torch.equal(hi, want_hi)
    assert not torch.equal(lo, before)  # the rows with n >= 2 moved a bound


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # 0 * inf in unfilled pages, masked after
@pytest.mark.parametrize("quantized", [True, False], ids=["exact", "rounded"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_page_scores_equal_reference(shape, dtype, quantized):
    b, hq, hkv, d, pages, page_size = shape
    gen = _gen(3 * sum(shape))
    draw = (lambda s: _quantized(s, gen, dtype)) if quantized else \
        (lambda s: torch.randn(s, generator=gen, device=DEVICE).to(dtype))
    q = draw((b, hq, d))
    q[0, 0, : d // 2] = 0
    lo = draw((b, hkv, pages, d))
    hi = torch.maximum(lo, draw((b, hkv, pages, d)))
    n = _lengths(b, pages, page_size, gen)
    used = -(-n.long() // page_size)
    for row in range(b):  # pages past the row's tokens hold no key yet: +inf / -inf bounds
        lo[row, :, int(used[row]):] = float("inf")
        hi[row, :, int(used[row]):] = float("-inf")
    got = quest.quest_page_scores(q, lo, hi, n, page_size)
    want = naive.quest_page_scores(q, lo, hi, n, page_size)
    assert got.dtype == torch.float32 and got.shape == (b, hq, pages)
    assert not bool(got.isnan().any())
    if quantized:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_page_positions_equal_reference(shape):
    """Random distinct pages per head (some past the row's tokens, as the top-k gives them when a row
    has fewer pages than T), kmax both T*P and a cut below it."""
    b, hq, _, _, pages, page_size = shape
    gen = _gen(5 * sum(shape))
    take = max(1, pages // 3)
    top = torch.rand(b, hq, pages, generator=gen, device=DEVICE).argsort(-1)[..., :take]
    n = _lengths(b, pages, page_size, gen)
    for kmax in (take * page_size, max(1, take * page_size - page_size // 2 - 1)):
        idx, cnt = quest.quest_page_positions(top, n, page_size, kmax)
        want_idx, want_cnt = naive.quest_page_positions(top, n, page_size, kmax)
        assert idx.dtype == torch.int64 and cnt.dtype == torch.int32
        assert torch.equal(idx, want_idx) and torch.equal(cnt, want_cnt)


def test_positions_too_large_for_a_tile_is_an_error():
    top = torch.zeros(1, 1, 4096, dtype=torch.int64, device=DEVICE)
    assert not quest.positions_fit(4096, 16)
    with pytest.raises(ValueError, match="exceed"):
        quest.quest_page_positions(top, torch.tensor([10], device=DEVICE), 16, 100)


def _page_scores(b, hq, pages, page_size, gen, ties):
    """Page scores as ``quest_page_scores`` gives them (the current page +inf, pages past it -inf) and
    the rows' lengths. ties: halves in [-1.5, 1.5] with -0.0 among them, and one head all equal."""
    scores = torch.randn(b, hq, pages, generator=gen, device=DEVICE)
    if ties:
        scores = (scores * 1.5).round().clamp(-3, 3) / 2
        scores[..., ::5] = -0.0
        scores[0, -1] = 0.25
    n = _lengths(b, pages, page_size, gen)
    used = -(-n.long() // page_size)
    page = torch.arange(pages, device=DEVICE)
    scores = scores.masked_fill(page >= used.view(b, 1, 1), float("-inf"))
    return scores.masked_fill(page == used.view(b, 1, 1) - 1, float("inf")), n


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 1, 8, 300, 16), (1, 2, 1, 8, 2500, 1)])
def test_select_equals_top_pages_then_positions(shape, ties):
    """The one-launch selection (radix select, then the pages in order) gives what the reference top-k
    then positions give: the same pages with ties to the lower page, rows with fewer pages than `take`
    (ties at -inf), rows of 0-2 tokens, kmax at take * P and cut below it, rows longer than a chunk."""
    b, hq, _, _, pages, page_size = shape
    gen = _gen(7 * sum(shape) + ties)
    scores, n = _page_scores(b, hq, pages, page_size, gen, ties)
    for take in sorted({1, max(1, pages // 3), pages}):
        for kmax in (take * page_size, max(1, take * page_size - page_size // 2 - 1)):
            idx, cnt = quest.quest_select(scores, n, page_size, take, kmax)
            want_idx, want_cnt = naive.quest_select(scores, n, page_size, take, kmax)
            assert idx.dtype == torch.int64 and cnt.dtype == torch.int32
            assert torch.equal(idx, want_idx) and torch.equal(cnt, want_cnt), (take, kmax)
            # The pages past a row's tokens (-inf by the contract) are not read: NaN there changes nothing.
            idx, cnt = quest.quest_select(scores.masked_fill(scores == float("-inf"), float("nan")), n, page_size,
                                          take, kmax)
            assert torch.equal(idx, want_idx) and torch.equal(cnt, want_cnt), (take, kmax, "NaN past the rows")


def test_select_out_of_range_is_an_error():
    scores = torch.zeros(1, 1, quest.SELECT_MAX_PAGES + 1, device=DEVICE)
    assert not quest.select_fits(quest.SELECT_MAX_PAGES + 1, 16)
    with pytest.raises(ValueError, match="quest_select"):
        quest.quest_select(scores, torch.tensor([10], device=DEVICE), 16, 4, 64)
    with pytest.raises(ValueError, match="take"):
        quest.quest_select(scores[..., :8], torch.tensor([10], device=DEVICE), 16, 9, 64)
