"""Sampling: the sort-free top-p/top-k kernels against an exact reference and the sort-based original.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1); on a
GPU machine run this file with TRITON_INTERPRET=0 and they run compiled, at full vocabulary size too.
The reference kept set is computed per row in float64 from the same fp32 x = logit / T, grouping equal
values (the documented tie rule: tokens with equal probability are kept or dropped together).
"""
import math

import pytest
import torch

pytest.importorskip("triton")

from lessismore.engine import sampling  # noqa: E402
from lessismore.engine.sampling import order_key, sample, sample_by_sorting, scaled_logits, thresholds  # noqa: E402

INTERPRETED = sampling._interpreted()
ON_GPU = torch.cuda.is_available() and not INTERPRETED
if not ON_GPU and not INTERPRETED:
    pytest.skip("no GPU and the Triton interpreter is off", allow_module_level=True)
DEVICE = "cuda" if ON_GPU else "cpu"
# A token whose reference "mass strictly above" is this close to top_p may go either way (rounding of
# the masses: fp32 exp and sums in the kernels, float64 here).
BOUNDARY = 1e-6


def reference(logits, temperature, top_p, top_k):
    """(kept [B, V] bool, mass strictly above each token [B, V] float64), exactly, row by row."""
    x = scaled_logits(logits, temperature).cpu()
    top_p, top_k = top_p.cpu(), top_k.cpu()
    x = torch.where(x == 0, torch.zeros_like(x), x).double()  # -0.0 ties with +0.0
    kept, above_all = torch.zeros(x.shape, dtype=torch.bool), torch.zeros(x.shape, dtype=torch.float64)
    for b in range(x.shape[0]):
        vals, inv = torch.unique(x[b], return_inverse=True)  # ascending distinct values
        p = torch.softmax(x[b], 0)
        mass = torch.zeros(len(vals), dtype=torch.float64).index_add_(0, inv, p)
        count = torch.bincount(inv, minlength=len(vals)).double()
        above = mass.flip(0).cumsum(0).flip(0) - mass  # mass of the strictly greater values
        more = count.flip(0).cumsum(0).flip(0) - count  # how many tokens are strictly greater
        keep = torch.ones(len(vals), dtype=torch.bool)
        if top_p[b] < 1:
            keep &= above < float(top_p[b])
        if top_k[b] > 0:
            keep &= more < int(top_k[b])
        kept[b], above_all[b] = keep[inv], above[inv]
    return kept, above_all


def kernel_kept(logits, temperature, top_p, top_k, **kw):
    if kw:
        t = sampling._triton_thresholds(logits, temperature, top_p, top_k, **kw)
    else:
        t = thresholds(logits, temperature, top_p, top_k, impl="triton")
    return (order_key(scaled_logits(logits, temperature)) >= t[:, None]).cpu()


def rows(kind, n, vocab, gen):
    """n rows of logits [n, vocab] of one kind: flat (random-weight models), peaked, or tied (few
    distinct values: every boundary falls inside a tie)."""
    if kind == "flat":
        x = torch.randn(n, vocab, generator=gen) * 0.5
    elif kind == "peaked":
        x = torch.randn(n, vocab, generator=gen) * 4
        x[:, :3] += torch.rand(n, 3, generator=gen) * 20
    elif kind == "tied":
        x = torch.randint(-6, 3, (n, vocab), generator=gen).float() * 0.75
    elif kind == "bf16":  # bf16-rounded: many ties among close values
        x = (torch.randn(n, vocab, generator=gen) * 2).bfloat16().float()
    else:
        raise ValueError(kind)
    return x[:, torch.randperm(vocab, generator=gen)]


PARAMS = [(t, p, k) for t in (0.3, 0.6, 1.0, 1.7) for p in (0.1, 0.5, 0.95, 1.0) for k in (0, 1, 50)]


def batch(kind, vocab, seed, n=None):
    gen = torch.Generator().manual_seed(seed)
    n = n or len(PARAMS)
    params = [PARAMS[i % len(PARAMS)] for i in torch.randperm(len(PARAMS), generator=gen)[:n].tolist()]
    logits = rows(kind, n, vocab, gen)
    temperature = torch.tensor([t for t, _, _ in params])
    top_p = torch.tensor([p for _, p, _ in params])
    top_k = torch.tensor([k for _, _, k in params], dtype=torch.int64)
    return [v.to(DEVICE) for v in (logits, temperature, top_p, top_k)]


def check_kept(logits, temperature, top_p, top_k, **kw):
    got = kernel_kept(logits, temperature, top_p, top_k, **kw)
    want, above = reference(logits, temperature, top_p, top_k)
    differ = got != want
    # Disagreements only where the reference boundary is within rounding of top_p.
    near = (above - top_p.double().cpu()[:, None]).abs() < BOUNDARY
    assert not (differ & ~near).any(), (
        f"kept sets differ away from the boundary in rows {differ.any(-1).nonzero().flatten().tolist()}: "
        f"{(differ & ~near).sum().item()} tokens")
    assert differ.any(-1).sum() <= 1, "more than one row differs at the boundary"
    assert got.any(-1).all()
    return got, want


@pytest.mark.parametrize("kind,vocab", [("flat", 1000), ("flat", 5000), ("peaked", 3000), ("tied", 2000), ("bf16", 3000)])
def test_kept_set_is_exact_top_p_top_k(kind, vocab):
    logits, temperature, top_p, top_k = batch(kind, vocab, seed=vocab + len(kind), n=24)
    got, want = check_kept(logits, temperature, top_p, top_k)
    # The cases are not trivial: some rows keep a part of the vocabulary, some nearly all of it.
    sizes = want.sum(-1)
    assert (sizes < vocab).any() and (sizes > 1).any()


@pytest.mark.parametrize("stages", [1, 3])
def test_kept_set_across_programs_and_blocks(stages):
    """Several programs per row and several blocks per program (the merges of the per-program
    histograms and of the draw), with the loops' loads pipelined or not (``stages``)."""
    logits, temperature, top_p, top_k = batch("flat", 2000, seed=7, n=6)
    check_kept(logits, temperature, top_p, top_k, block=128, programs=5, stages=stages)
    logits, temperature, top_p, top_k = batch("tied", 2000, seed=8, n=6)
    check_kept(logits, temperature, top_p, top_k, block=256, programs=3, stages=stages)


def test_kept_set_of_half_precision_and_masked_logits():
    """bf16/fp16 logits are read as they are (x = float(logit) / T), and -inf logits (masked
    tokens) have probability 0: dropped unless top_p is 1."""
    logits, temperature, top_p, top_k = batch("peaked", 1500, seed=9, n=8)
    logits[:, 100:400] = float("-inf")
    check_kept(logits, temperature, top_p, top_k)
    check_kept(logits.bfloat16(), temperature, top_p, top_k)
    check_kept(logits.half(), temperature, top_p, top_k)


def test_ties_at_the_boundary_are_kept_together():
    vocab = 1000
    logits = torch.zeros(4, vocab)
    logits[1, :10] = 1.0  # 10 tied leaders, then 990 tied others
    logits[2, ::2] = -0.0  # -0.0 and +0.0 tie
    logits[3] = torch.arange(vocab).float().div(10).floor()  # groups of 10 equal values
    temperature = torch.ones(4)
    top_p = torch.tensor([0.5, 0.01, 0.3, 0.9])
    top_k = torch.tensor([50, 3, 0, 15])
    args = [v.to(DEVICE) for v in (logits, temperature, top_p, top_k)]
    got, want = check_kept(*args)
    assert want[0].all() and want[2].all()  # all tied: nobody ranks above anybody
    assert want[1].sum() == 10  # top-1% and top-3: the 10 tied leaders
    assert want[3].sum() == 20  # top-15 reaches into the second group of 10: both groups kept
    assert torch.equal(got, want)


def test_full_vocabulary_on_gpu():
    if not ON_GPU:
        pytest.skip("V=151936 runs on a GPU")
    for kind in ("flat", "peaked", "bf16"):
        logits, temperature, top_p, top_k = batch(kind, 151936, seed=3, n=8)
        check_kept(logits, temperature, top_p, top_k)
        check_kept(logits.bfloat16(), temperature, top_p, top_k)


def test_draws_equal_the_sort_based_original():
    """Same seeds and counters, same kept set: the same tokens (the same Gumbel noise per
    (seed, counter, vocabulary id)) as the implementation this replaced, greedy rows included."""
    for kind, vocab, s in (("flat", 2000, 1), ("peaked", 3000, 2)):
        n = 24
        logits, temperature, top_p, top_k = batch(kind, vocab, seed=s, n=n)
        temperature[::7] = 0.0
        gen = torch.Generator().manual_seed(s)
        seed = torch.randint(-2**62, 2**62, (n,), generator=gen).to(DEVICE)
        counter = torch.randint(0, 10**6, (n,), generator=gen).to(DEVICE)
        old = sample_by_sorting(logits, temperature, top_p, top_k, seed, counter, True)
        new = sample(logits, temperature, top_p, top_k, seed, counter, True, impl="triton")
        torch_path = sample(logits, temperature, top_p, top_k, seed, counter, True, impl="torch")
        assert torch.equal(new, old), (new != old).nonzero().flatten().tolist()
        assert torch.equal(torch_path, old)
        # The draws are random: not the argmax, and they change with the counter.
        sampled = (temperature > 0) & (top_k != 1)
        assert (new[sampled] != logits.argmax(-1)[sampled]).any()
        again = sample(logits, temperature, top_p, top_k, seed, counter + 1, True, impl="triton")
        assert torch.equal(again, sample_by_sorting(logits, temperature, top_p, top_k, seed, counter + 1, True))
        assert (again[sampled] != new[sampled]).any()


def test_bf16_logits_draw_as_their_fp32_widening():
    """The engine hands over the lm_head's bf16 logits as they are: the draws, greedy rows and the
    greedy path included, equal those of the same logits widened to fp32."""
    n = 16
    logits, temperature, top_p, top_k = batch("peaked", 3000, seed=4, n=n)
    logits = logits.bfloat16()
    temperature[::5] = 0.0
    seed = torch.arange(n, device=DEVICE) * 7919
    counter = torch.arange(n, device=DEVICE)
    for impl in ("triton", "torch"):
        assert torch.equal(sample(logits, temperature, top_p, top_k, seed, counter, True, impl=impl),
                           sample(logits.float(), temperature, top_p, top_k, seed, counter, True, impl=impl))
    assert torch.equal(sample(logits, temperature, top_p, top_k, seed, counter, False), logits.float().argmax(-1))


def test_greedy_rows_and_greedy_path_unchanged():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randint(-3, 4, (6, 700), generator=gen).float()  # ties at the max: the first wins
    logits[2, 500] = 1e4
    logits = logits.to(DEVICE)
    temperature = torch.tensor([0.0, 0.7, 0.0, 1.0, 0.0, 0.0], device=DEVICE)
    top_p = torch.tensor([0.9, 0.9, 1.0, 0.5, 0.1, 1.0], device=DEVICE)
    top_k = torch.tensor([0, 5, 1, 0, 0, 50], device=DEVICE)
    seed = torch.arange(6, device=DEVICE)
    counter = torch.zeros(6, dtype=torch.int64, device=DEVICE)
    greedy = logits.argmax(-1)
    for impl in ("triton", "torch"):
        got = sample(logits, temperature, top_p, top_k, seed, counter, True, impl=impl)
        assert torch.equal(got[temperature == 0], greedy[temperature == 0])
        assert torch.equal(sample(logits, temperature, top_p, top_k, seed, counter, False, impl=impl), greedy)
    assert torch.equal(sample(logits, temperature, top_p, top_k, seed, counter, False),
                       sample_by_sorting(logits, temperature, top_p, top_k, seed, counter, False))


DISTRIBUTION_CASES = [(0.8, 0.9, 0), (1.3, 1.0, 3), (0.5, 0.7, 2)]


@pytest.mark.parametrize("impl,case", [("torch", c) for c in DISTRIBUTION_CASES]
                         + [("triton", c) for c in (DISTRIBUTION_CASES if ON_GPU else DISTRIBUTION_CASES[:1])])
def test_draws_follow_the_renormalized_distribution(impl, case):
    """Many draws (one per counter) on V=8 against softmax(logit / T) restricted to the exact kept set
    and renormalized: a chi-square test at p = 1e-4 (fixed seeds: deterministic). The interpreter is
    slow (~50 ms a row): on CPU the kernels draw 400 times, one setting; the PyTorch path (same noise,
    same rule) 20000 times for each."""
    temperature, top_p, top_k = case
    n = 20000 if impl == "torch" or ON_GPU else 400
    logits = torch.tensor([2.0, 1.2, 1.2, 0.5, 0.0, -0.7, -1.5, -4.0])
    x = logits / temperature
    kept, _ = reference(logits[None], torch.tensor([temperature]), torch.tensor([top_p]), torch.tensor([top_k]))
    probs = torch.where(kept[0], torch.softmax(x.double(), 0), torch.zeros(8, dtype=torch.float64))
    probs /= probs.sum()
    assert 1 < (probs > 0).sum() < 8
    args = [logits.expand(n, 8).contiguous(), torch.full((n,), temperature), torch.full((n,), top_p),
            torch.full((n,), top_k, dtype=torch.int64), torch.full((n,), 1234, dtype=torch.int64), torch.arange(n)]
    drawn = sample(*[a.to(DEVICE) for a in args], True, impl=impl).cpu()
    counts = torch.bincount(drawn, minlength=8).double()
    assert (counts[probs == 0] == 0).all(), "a dropped token was drawn"
    expected = probs[probs > 0] * n
    chi2 = ((counts[probs > 0] - expected) ** 2 / expected).sum().item()
    assert chi2 < chi2_critical(len(expected) - 1, 1e-4), (counts.tolist(), expected.tolist(), chi2)
    # The test has power: the same draws fail it against uniform over the kept set.
    wrong = torch.full_like(expected, n / len(expected))
    assert ((counts[probs > 0] - wrong) ** 2 / wrong).sum() > chi2_critical(len(expected) - 1, 1e-4)


def chi2_critical(df, alpha):
    """Upper alpha quantile of chi-square(df) (Wilson-Hilferty; within 1% for df >= 1 at these
    levels)."""
    z = _normal_quantile(1 - alpha)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _normal_quantile(q):
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * math.erfc(-mid / math.sqrt(2)) < q else (lo, mid)
    return lo


def test_cuda_graph_replay():
    if not ON_GPU:
        pytest.skip("CUDA graphs need a GPU")
    logits, temperature, top_p, top_k = batch("flat", 151936, seed=11, n=8)
    seed = torch.arange(8, device=DEVICE)
    counter = torch.zeros(8, dtype=torch.int64, device=DEVICE)
    want = sample(logits, temperature, top_p, top_k, seed, counter, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sample(logits, temperature, top_p, top_k, seed, counter, True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample(logits, temperature, top_p, top_k, seed, counter, True)
    graph.replay()
    assert torch.equal(out, want)
    counter += 1
    graph.replay()
    assert torch.equal(out, sample(logits, temperature, top_p, top_k, seed, counter, True))
    assert torch.equal(out, sample_by_sorting(logits, temperature, top_p, top_k, seed, counter, True))
