"""Decode's skinny GEMM (ops.skinny.skinny_linear) against F.linear in fp32, rounded to the output
dtype: equal to within the last bit of that dtype (and to fp32 summation order for fp32), with and
without a bias, K and N off the blocks, one K split and several (the workspace and the last program's
ordered sum). Repeated calls give the same bits; the dispatcher ``ops.linear`` takes the kernel only
for x [M <= 64, K]. On CPU under the Triton interpreter (fp32/fp16: its bf16 is not trusted); on a GPU
also bf16 at Qwen3-8B's shapes and CUDA-graph capture."""
import pytest
import torch

pytest.importorskip("triton")

from lessismore import ops  # noqa: E402
from lessismore.ops import naive, skinny  # noqa: E402

ON_GPU = torch.cuda.is_available() and not skinny.INTERPRETED
if not ON_GPU and not skinny.INTERPRETED:
    pytest.skip("no GPU and the Triton interpreter is off", allow_module_level=True)
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# (M, N, K): N off every block_n, K off every block_k, N a multiple of 16 with K even, tiny K
SHAPES = [(1, 100, 300), (3, 100, 300), (16, 96, 256), (3, 37, 20)]
# explicit settings: one split, several splits (fewer than asked when K is short), the other dot order
CONFIGS = [
    {"block_n": 32, "block_k": 64, "split_k": 1},
    {"block_n": 16, "block_k": 32, "split_k": 3},
    {"block_n": 64, "block_k": 16, "split_k": 8, "swap_ab": True},
]
# Qwen3-8B's decode GEMMs (N, K): qkv, o, gate_up, down, lm_head
REAL_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288),
               "lm_head": (151936, 4096)}


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _inputs(m, n, k, dtype, seed, bias=True, w_scale=1.0):
    gen = _gen(seed)
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, generator=gen, device=DEVICE) * w_scale).to(dtype)
    b = torch.randn(n, generator=gen, device=DEVICE).to(dtype) if bias else None
    return x, w, b


def _want(x, w, b):
    return naive.linear(x.float(), w.float(), None if b is None else b.float())


def _assert_matches(got, x, w, b):
    """got against the fp32 reference: fp32 to summation order, fp16/bf16 to one unit in the last
    place of the output (two roundings of nearly equal fp32 sums can land one apart)."""
    want = _want(x, w, b)
    assert got.dtype == x.dtype and got.shape == want.shape
    scale = want.abs().max().item() + 1.0
    if x.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale * x.shape[1] ** 0.5)
    else:
        eps = torch.finfo(x.dtype).eps  # one ulp at 1.0
        torch.testing.assert_close(got.float(), want, rtol=eps, atol=eps * 1e-2 * scale)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS + [{}], ids=["split1", "split3", "split8-swap", "default"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_reference(shape, cfg, dtype, bias):
    m, n, k = shape
    x, w, b = _inputs(m, n, k, dtype, seed=m * 1000 + n + k, bias=bias)
    _assert_matches(skinny.skinny_linear(x, w, b, **cfg), x, w, b)


def test_strided_inputs():
    """x with a row stride past K (a view into a wider buffer), W rows of a larger row stride."""
    gen = _gen(7)
    xb = torch.randn(5, 80, generator=gen, device=DEVICE)
    wb = torch.randn(40, 96, generator=gen, device=DEVICE)
    x, w = xb[:, 10:74], wb[:, :64]
    got = skinny.skinny_linear(x, w, block_n=16, block_k=32, split_k=2)
    _assert_matches(got, x, w, None)


def test_deterministic_and_counters_reset():
    """Two calls give the same bits, with splits (the last program's ordered sum) and without; the
    tile counters are all 0 again after each call."""
    x, w, b = _inputs(3, 100, 300, torch.float32, seed=11)
    for cfg in CONFIGS:
        first = skinny.skinny_linear(x, w, b, **cfg)
        second = skinny.skinny_linear(x, w, b, **cfg)
        assert torch.equal(first.view(torch.int32), second.view(torch.int32))
    assert int(skinny._COUNTERS[str(x.device)].abs().sum()) == 0


def test_bad_inputs():
    x = torch.zeros(skinny.MAX_M + 1, 32, device=DEVICE)
    w = torch.zeros(16, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"M = x.shape\[0\] = 65 is out of range: 0 <= M <= 64"):
        skinny.skinny_linear(x, w)
    with pytest.raises(ValueError, match="weight.shape"):
        skinny.skinny_linear(x[:4], torch.zeros(16, 31, device=DEVICE))
    with pytest.raises(ValueError, match="block_k = 24"):
        skinny.skinny_linear(x[:4], w, block_k=24)
    with pytest.raises(ValueError, match="unit stride"):
        skinny.skinny_linear(x[:4], torch.zeros(32, 16, device=DEVICE).t())


def test_empty_and_zero_k():
    w = torch.randn(20, 8, device=DEVICE)
    assert skinny.skinny_linear(torch.zeros(0, 8, device=DEVICE), w).shape == (0, 20)
    b = torch.randn(20, device=DEVICE)
    got = skinny.skinny_linear(torch.zeros(2, 0, device=DEVICE), torch.zeros(20, 0, device=DEVICE), b)
    assert torch.equal(got, b.expand(2, 20))


def test_default_config_rule():
    """The measured rule at Qwen3-8B's shapes: 64 x 128 tiles, the fewest splits reaching 1.4
    programs per SM."""
    splits = {"qkv": 2, "o": 4, "gate_up": 1, "down": 4, "lm_head": 1}
    for name, (n, k) in REAL_SHAPES.items():
        for m in (1, 8, 16, 32):
            cfg = skinny.default_config(m, n, k, sms=132)
            assert (cfg["block_n"], cfg["block_k"], cfg["swap_ab"]) == (64, 128, True)
            assert cfg["split_k"] == splits[name], name
            assert -(-n // cfg["block_n"]) * cfg["split_k"] >= 1.4 * 132
    small = skinny.default_config(1, 16, 64, sms=132)  # cannot fill the GPU: one split, short K
    assert small["split_k"] == 1 and small["block_n"] == 16


def test_dispatcher():
    x, w, b = _inputs(3, 48, 64, torch.float32, seed=5)
    kernel = skinny.skinny_linear(x, w, b)
    assert torch.equal(ops.linear(x, w, b, triton=True), kernel)
    assert torch.equal(ops.linear(x, w, b, triton=False), naive.linear(x, w, b))
    assert torch.equal(ops.linear(x, w, b), kernel if ON_GPU else naive.linear(x, w, b))
    # more rows than the kernel takes, or a batch dimension: the reference
    big = torch.randn(65, 64, device=DEVICE)
    assert torch.equal(ops.linear(big, w, b, triton=True), naive.linear(big, w, b))
    x3 = x.view(1, 3, 64)
    assert torch.equal(ops.linear(x3, w, b, triton=True), naive.linear(x3, w, b))
    wt = w.t().contiguous().t()  # unit stride over N, not K
    assert torch.equal(ops.linear(x, wt, b, triton=True), naive.linear(x, wt, b))


@pytest.mark.skipif(not ON_GPU, reason="bf16 at the real shapes needs a GPU")
@pytest.mark.parametrize("m", [1, 8, 16, 32])
@pytest.mark.parametrize("name", list(REAL_SHAPES))
def test_real_shapes_bf16(name, m):
    n, k = REAL_SHAPES[name]
    x, w, _ = _inputs(m, n, k, torch.bfloat16, seed=m + n, bias=False, w_scale=0.02)
    _assert_matches(skinny.skinny_linear(x, w), x, w, None)
    for cfg in ({"block_n": 32, "block_k": 256, "split_k": 4}, {"block_n": 64, "block_k": 128, "split_k": 1,
                                                               "swap_ab": True}):
        _assert_matches(skinny.skinny_linear(x, w, **cfg), x, w, None)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture():
    """Captured calls (split and not) replay to the eager result, bit for bit, on new inputs."""
    n, k = REAL_SHAPES["o"]
    x, w, b = _inputs(8, n, k, torch.bfloat16, seed=3, w_scale=0.02)
    cfgs = [{}, {"block_n": 64, "block_k": 128, "split_k": 1}]
    for cfg in cfgs:
        skinny.skinny_linear(x, w, b, **cfg)  # compile and allocate the counters outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [skinny.skinny_linear(x, w, b, **cfg) for cfg in cfgs]
    x.copy_(torch.randn(x.shape, generator=_gen(4), device=DEVICE).to(x.dtype))
    graph.replay()
    torch.cuda.synchronize()
    for cfg, out in zip(cfgs, outs):
        assert torch.equal(out, skinny.skinny_linear(x, w, b, **cfg))


@pytest.mark.skipif(not ON_GPU, reason="the race it looks for needs a GPU")
def test_split_reduction_is_reproducible_on_gpu():
    """Many calls with 8 splits (programs finishing in varying order): always the same bits."""
    n, k = REAL_SHAPES["down"]
    x, w, _ = _inputs(8, n, k, torch.bfloat16, seed=9, bias=False, w_scale=0.02)
    cfg = {"block_n": 32, "block_k": 128, "split_k": 8}
    first = skinny.skinny_linear(x, w, **cfg)
    _assert_matches(first, x, w, None)
    for _ in range(50):
        assert torch.equal(skinny.skinny_linear(x, w, **cfg), first)
    assert int(skinny._COUNTERS[str(x.device)].abs().sum()) == 0
