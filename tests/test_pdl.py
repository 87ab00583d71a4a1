"""Programmatic dependent launch (``ops.pdl``) on the GPU (marked ``gpu``; needs compute capability 9.0).

Each kernel that takes part is launched while a slow producer still runs: the producer (a Triton
kernel of this file) lets its dependents launch at once, spins for ~0.1 ms, then writes the consumer's
input over NaNs. A consumer that read before its ``griddepcontrol.wait`` would see NaNs or a stale
input, so these tests fail if a kernel skips the wait. Then the engine's decode step: the same greedy
tokens with PDL on and off (eager and in CUDA graphs).
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                       reason="needs a CUDA device of compute capability >= 9.0"),
]

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lessismore.engine import Engine, ModelConfig  # noqa: E402
from lessismore.engine.kernels import add_rmsnorm, qk_norm_rope_store, silu_mul  # noqa: E402
from lessismore.ops import naive, pdl, skinny, triton_decode  # noqa: E402
from lessismore.config import SparseConfig  # noqa: E402

SPINS = 200_000  # ~0.1 ms of dependent FMAs per producer program


@triton.jit
def _slow_copy_kernel(SRC, DST, n, spins, BLOCK: tl.constexpr):
    tl.extra.cuda.gdc_launch_dependents()  # the consumer may launch now; DST is written much later
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(SRC + offs, mask=mask)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(spins):
        acc = acc * 0.999 + 1.0  # stays positive: the select below always keeps v
    tl.store(DST + offs, tl.where(acc < 0.0, acc.to(v.dtype), v), mask=mask)


def _slow_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    dst.fill_(float("nan"))
    n = src.numel()
    _slow_copy_kernel[(triton.cdiv(n, 1024),)](src, dst, n, SPINS, BLOCK=1024)


def _consumers():
    """name -> (input, the kernel's call on the produced copy of it, the reference's call)."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    w = rand(4096, 4096, scale=0.02)
    norm_w = rand(4096)
    k_cache, v_cache = rand(8, 8, 1024, 128), rand(8, 8, 1024, 128)
    idx = torch.sort(torch.randperm(1024, generator=gen, device="cuda")[:300])[0].to(torch.int32).expand(8, 300).contiguous()
    counts = torch.full((8,), 300, device="cuda", dtype=torch.int32)
    cos = torch.rand(2048, 64, generator=gen, device="cuda")
    sin = torch.rand(2048, 64, generator=gen, device="cuda")
    positions = torch.arange(8, device="cuda", dtype=torch.int32) * 100 + 50
    slots = torch.arange(8, device="cuda", dtype=torch.int32)
    qkv_norm = rand(2, 128)

    def rope(qkv, impl):
        kc, vc = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
        q = qk_norm_rope_store(qkv, 32, 8, 128, slots, positions, cos, sin, kc, vc, qkv_norm, 1e-6, impl=impl)
        return torch.cat([q.flatten(), kc.flatten(), vc.flatten()])

    return {
        "skinny_linear": (rand(8, 4096), lambda x: skinny.skinny_linear(x, w), lambda x: naive.linear(x.float(), w.float())),
        "skinny_linear_split": (rand(8, 4096),
                                lambda x: skinny.skinny_linear(x, w, block_n=32, block_k=128, split_k=4, num_warps=4,
                                                               num_stages=3, swap_ab=True),
                                lambda x: naive.linear(x.float(), w.float())),
        "add_rmsnorm": (rand(8, 4096), lambda x: add_rmsnorm(x, torch.ones_like(x), norm_w, 1e-6, impl="triton"),
                        lambda x: add_rmsnorm(x, torch.ones_like(x), norm_w, 1e-6, impl="torch")),
        "silu_mul": (rand(8, 2 * 4096), lambda x: silu_mul(x, impl="triton"), lambda x: silu_mul(x, impl="torch")),
        "qk_norm_rope_store": (rand(8, 48 * 128), lambda x: rope(x, "triton"), lambda x: rope(x, "torch")),
        "sparse_attention": (rand(8, 32, 128),
                             lambda q: triton_decode.sparse_decode_attention(q, k_cache, v_cache, idx, counts),
                             lambda q: naive.sparse_decode_attention(q.float(), k_cache.float(), v_cache.float(),
                                                                     idx.long(), counts)),
        "dense_attention_split": (rand(2, 32, 128),
                                  lambda q: triton_decode.dense_decode_attention(q, k_cache[:2], v_cache[:2], counts[:2] * 3),
                                  lambda q: naive.dense_decode_attention(q.float(), k_cache[:2].float(), v_cache[:2].float(),
                                                                         counts[:2] * 3)),
    }


CONSUMERS = _consumers() if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9 else {}


def _close(got, want):
    assert not torch.isnan(got.float()).any(), "read its input before the producer wrote it"
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=5e-2)  # bf16 references round each step


@pytest.mark.parametrize("name", list(CONSUMERS) or ["none"])
def test_consumer_waits_for_a_slow_producer(name):
    assert pdl.enabled(torch.empty(1, device="cuda")), "PDL is off on this GPU"
    src, run, ref = CONSUMERS[name]
    want = ref(src)
    dst = torch.empty_like(src)
    for _ in range(3):  # eager, compiled on the first pass
        _slow_copy(src, dst)
        _close(run(dst), want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _slow_copy(src, dst)
        out = run(dst)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        _close(out, want)
    with pdl.disabled():
        _slow_copy(src, dst)
        off = run(dst)
    assert torch.equal(out, off), "PDL changed the arithmetic"


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("method", ["full", "lessismore", "tidaldecode"])
def test_decode_same_bits_with_and_without_pdl(method, graphs):
    """Greedy tokens of a random bf16 Qwen3 (6 layers) equal with PDL on and off, for a batch of 4."""
    mcfg = ModelConfig(model_type="qwen3", vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=6,
                       num_heads=8, num_kv_heads=2, head_dim=128, qk_norm=True)
    cfg = SparseConfig.for_method(method, budget=64, selection_layers=(2,), sink_tokens=4)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1024, (n,), generator=gen).tolist() for n in (90, 130, 200, 257)]

    def tokens():
        engine = Engine(mcfg, cfg, device="cuda", max_batch=4, max_len=512, cuda_graphs=graphs, seed=1)
        out = engine.generate(prompts, max_new_tokens=40, ignore_eos=True)
        return [r.token_ids for r in out]

    on = tokens()
    with pdl.disabled():
        off = tokens()
    assert on == off
