"""A Triton GEMM for decode's skinny shapes: out[M, N] = x[M, K] @ W[N, K]^T (+ bias), M <= 64.

At decode, M is the batch (1..32) and the weight W is read once per call: the op is a stream of W
through the SMs, and its speed is the share of the copy bandwidth that stream reaches. cuBLAS picks
kernels that leave 10-27% of it unused at Qwen3-8B's shapes on the H200 and adds a split-K reduce
kernel of its own for o and down. Here:

* A program owns ``block_n`` rows of W (a tile of N) and one of ``split_k`` contiguous ranges of K.
  It walks its range in [block_n, block_k] tiles of W, loaded along K (a row's block_k elements are
  contiguous: 16-byte vector loads when K and W's row stride are multiples of 8 elements), pipelined
  over ``num_stages`` buffers, and multiplies each by the matching [BLOCK_M, block_k] tile of x with
  ``tl.dot`` in fp32 (BLOCK_M = max(16, next_pow2(M)): the rows past M are masked to zero and never
  stored). ``swap_ab`` computes W_tile @ x_tile^T instead (W as the dot's left operand).
* split_k == 1: the program adds the bias and writes its [M, block_n] tile of out.
* split_k > 1: each program writes its fp32 partial to a workspace [split_k, M, N] and takes a ticket
  from its tile's counter (an atomic add, acquire-release at GPU scope, after a CTA barrier); the
  program that draws the last ticket sums the split_k partials in order 0..split_k-1, adds the bias,
  writes the tile and sets the counter back to 0. The sum's order is fixed, so the result does not
  depend on which program finishes last: calls are bit-for-bit reproducible (on one device, for one
  config). One launch per call, no separate reduce kernel.
* Under programmatic dependent launch (``ops.pdl``; Hopper and later) the programs are launched while
  the kernel before them (a norm, SiLU, attention) still runs and wait for it before reading x.
  Prefetching their first tiles of W into L2 before that wait was measured no faster, and slower the
  more tiles (lm_head 28% slower at 16; docs/performance.md), so they do not.

The counters are one int32 buffer per device, allocated on the first call outside graph capture and
kept (every call leaves them at 0). So calls on one device must not overlap in time on different
streams (the engine decodes on one stream). The workspace is a ``torch.empty`` per call; nothing
depends on the data: calls can be captured in a CUDA graph.

Under ``TRITON_INTERPRET=1`` (CPU tests) x and W are cast to fp32 at load (the interpreter computes
bf16 wrongly) and fp32 dots are exact (``input_precision="ieee"``, also for fp32 inputs on a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lessismore.ops import pdl
from lessismore.ops.pdl import prior_done
from lessismore.ops.triton_decode import INTERPRETED, num_sms

MAX_M = 64
H200_SMS = 132


@triton.jit
def _skinny_kernel(X, W, BIAS, OUT, WS, CNT, M, N, K, split_len, stride_xm, stride_wn, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT: tl.constexpr, SWAP: tl.constexpr, HAS_BIAS: tl.constexpr,
                   EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                   PDL: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    k_lo = pid_k * split_len
    k_hi = tl.minimum(k_lo + split_len, K)
    m_ok = m < M
    n_ok = n < N
    # The tile's base row in int64 (lm_head's W holds more than 2^31 bytes), offsets in the tile int32.
    w_ptrs = (W + (pid_n * BLOCK_N).to(tl.int64) * stride_wn + tl.arange(0, BLOCK_N)[:, None] * stride_wn
              + (k_lo + kk)[None, :])
    x_ptrs = X + m[:, None] * stride_xm + (k_lo + kk)[None, :]
    prior_done(PDL)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, tl.cdiv(k_hi - k_lo, BLOCK_K)):
        # W is read once per call: evict it first, keep x (read by every program) in L2.
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0, eviction_policy="evict_last")
            if EVEN_N:
                wt = tl.load(w_ptrs, eviction_policy="evict_first")
            else:
                wt = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
        else:
            k_ok = kk < k_hi - k_lo - i * BLOCK_K
            xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_last")
            if EVEN_N:
                wt = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
            else:
                wt = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        if SWAP:
            acc = tl.dot(wt, tl.trans(xt), acc, input_precision=PREC)
        else:
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PREC)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if SWAP:
        acc = tl.trans(acc)
    tile_ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        mn = m[:, None] * N + n[None, :]
        tl.store(WS + pid_k * M * N + mn, acc, mask=tile_ok)
        tl.debug_barrier()  # every thread's partial is written before the ticket releases them
        ticket = tl.atomic_add(CNT + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == tl.num_programs(1) - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, tl.num_programs(1)):  # fixed order: the same bits whoever finishes last
                total += tl.load(WS + s * M * N + mn, mask=tile_ok, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(BIAS + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(OUT + m[:, None] * stride_om + n[None, :], total.to(OUT.dtype.element_ty), mask=tile_ok)
            tl.atomic_xchg(CNT + pid_n, 0)  # ready for the next call
    else:
        if HAS_BIAS:
            acc += tl.load(BIAS + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + m[:, None] * stride_om + n[None, :], acc.to(OUT.dtype.element_ty), mask=tile_ok)


_COUNTERS: dict = {}  # device -> int32 tile counters, all 0 between calls
_RETIRED: list = []  # outgrown counter buffers: a captured graph may still use them, so never freed


def _counters(device: torch.device, tiles: int) -> torch.Tensor:
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is not None and buf.numel() >= tiles:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # Memory allocated now belongs to the graph's pool and its memset runs only on replay: use a
        # buffer of this graph's own (the memset becomes one node of it); warm up eagerly to avoid it.
        return torch.zeros(tiles, device=device, dtype=torch.int32)
    if buf is not None:
        _RETIRED.append(buf)
    buf = torch.zeros(max(tiles, 4096), device=device, dtype=torch.int32)
    _COUNTERS[key] = buf
    return buf


# block_k per block_n: 8-16 KB of W per pipeline stage
BLOCK_K_FOR = {16: 256, 32: 256, 64: 128, 128: 64}


def default_config(m: int, n: int, k: int, sms: int | None = None, waves: float = 1.4) -> dict:
    """The launch settings ``skinny_linear`` uses when none are given, for x [m, k] and W [n, k].

    Measured on the H200 (benchmarks/linear.py, results/linear-h200.json): at Qwen3-8B's five shapes
    and M = 8 and 32, 64 rows of W by 128 of K, W as the dot's left operand (swap_ab), 4 warps and 3
    stages was the best or within 2% of the best of ~40 settings for gate_up, down and lm_head, and
    the fastest split of it for o and qkv. The split: the fewest of 1, 2, 4, 8 (none shorter than four
    K blocks) giving at least ``waves`` programs per SM (``sms``: this GPU's count, else the H200's
    132): qkv 2, o and down 4, gate_up and lm_head 1. When even 8 splits fall short (small N), 32 and
    then 16 rows of W; if nothing reaches it, 16 rows and the most splits."""
    if sms is None:
        sms = num_sms(torch.device("cuda")) if torch.cuda.is_available() and not INTERPRETED else H200_SMS

    def splits(block_n):
        return [s for s in (1, 2, 4, 8) if s == 1 or triton.cdiv(k, s) >= 4 * BLOCK_K_FOR[block_n]]

    choice = None
    for block_n in (64, 32, 16):
        for split_k in splits(block_n):
            if triton.cdiv(n, block_n) * split_k >= waves * sms:
                choice = (block_n, split_k)
                break
        if choice:
            break
    block_n, split_k = choice or (16, splits(16)[-1])
    block_k = min(BLOCK_K_FOR[block_n], max(16, triton.next_power_of_2(k)))  # short K: no block past it
    return {"block_n": block_n, "block_k": block_k, "split_k": split_k, "num_warps": 4, "num_stages": 3,
            "swap_ab": True}


def _pow2_at_least_16(name: str, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"skinny_linear: {name} = {value} must be a power of two >= 16")


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None,
                  swap_ab: bool | None = None) -> torch.Tensor:
    """x [M, K] (M <= 64), weight [N, K] (unit stride over K), bias [N] or None -> [M, N] in x's
    dtype, accumulated in fp32. Settings left None come from ``default_config(M, N, K)``. split_k is
    an upper bound: the K range is cut in blocks of block_k, so fewer splits run when K is short."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"skinny_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} must be 2-D")
    M, K = x.shape
    N = weight.shape[0]
    if not 0 <= M <= MAX_M:
        raise ValueError(f"skinny_linear: M = x.shape[0] = {M} is out of range: 0 <= M <= {MAX_M}")
    if weight.shape[1] != K:
        raise ValueError(f"skinny_linear: weight.shape[1] = {weight.shape[1]} != K = x.shape[1] = {K}")
    if weight.dtype != x.dtype:
        raise ValueError(f"skinny_linear: weight dtype {weight.dtype} != x dtype {x.dtype}")
    if weight.stride(1) != 1:
        raise ValueError("skinny_linear: weight needs unit stride over K")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        raise ValueError(f"skinny_linear: bias {tuple(bias.shape)} must be [N] = [{N}]")
    cfg = default_config(M, N, K) if None in (block_n, block_k, split_k, num_warps, num_stages, swap_ab) else {}
    block_n = block_n or cfg["block_n"]
    block_k = block_k or cfg["block_k"]
    split_k = split_k or cfg["split_k"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    swap_ab = cfg["swap_ab"] if swap_ab is None else swap_ab
    _pow2_at_least_16("block_n", block_n)
    _pow2_at_least_16("block_k", block_k)
    if split_k < 1:
        raise ValueError(f"skinny_linear: split_k = {split_k} must be >= 1")

    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    if K == 0:
        out.zero_()
        return out if bias is None else out.add_(bias.to(out.dtype))
    if x.stride(1) != 1:
        x = x.contiguous()
    split_len = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, split_len)  # no empty split
    tiles = triton.cdiv(N, block_n)
    if split_k > 1:
        workspace = torch.empty((split_k, M, N), device=x.device, dtype=torch.float32)
        counters = _counters(x.device, tiles)
    else:
        workspace = counters = out  # unused pointers
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    _skinny_kernel[(tiles, split_k)](
        x, weight, bias if bias is not None else out, out, workspace, counters, M, N, K, split_len,
        x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_K=block_k,
        SPLIT=split_k > 1, SWAP=bool(swap_ab), HAS_BIAS=bias is not None,
        EVEN_N=N % block_n == 0, EVEN_K=K % block_k == 0, UPCAST=INTERPRETED,
        PREC="ieee" if (INTERPRETED or x.dtype == torch.float32) else "tf32",
        num_warps=num_warps, num_stages=num_stages, **pdl.launch_options(x),
    )
    return out


__all__ = ["skinny_linear", "default_config", "MAX_M", "INTERPRETED"]
