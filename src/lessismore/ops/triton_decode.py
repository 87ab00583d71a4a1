"""Triton decode-attention kernels: split-K flash decoding over a gathered (or contiguous) token set.

One kernel, ``_decode_split_kernel``, serves three callers:

* ``sparse_decode_attention``: one token set per row, shared by every head. A program owns one KV head
  of one row and one split of the set: it loads the split's indices once, gathers each K/V row once for
  all G query heads of the group (a [G_PAD, D] x [D, BLOCK_N] dot, G padded to 16), and keeps an online
  softmax in fp32.
* ``sparse_decode_attention_per_head``: a token set per query head; a program owns one query head
  (G = 1 in the kernel's terms), its KV head is ``hq // group``.
* the fused selection layers (``DecodeCache.dense_with_scores``): dense attention over slots
  0..lengths[b]-1 (``dense=True``) that also writes each query head's pre-softmax scores for the top-k.

Every caller reads either a contiguous cache [B, Hkv, L, D] or, with ``PAGED``, a paged one (vLLM's):
K/V [num_blocks, block_size, Hkv, D] (any strides, unit stride over D) and a block table [B, max_blocks];
position p of row b is slot p % block_size of block block_table[b, p // block_size], looked up inside
the kernel (``lessismore.ops.paged``), so nothing is gathered before the kernel runs.

Every program writes a partial (m, l, acc); ``_reduce_kernel`` merges the splits. With one split (the
choice whenever the (row, head group) programs alone cover the SMs) the program writes the output
itself (why not merge in the last program instead: docs/performance.md). The number of splits
depends on the static shapes only (never on ``counts``), so launches need no host synchronization
and can be captured in a CUDA graph.

fp32 inputs use exact fp32 dots (``input_precision="ieee"``) and at most 64-token blocks, 2 stages.
Head dims must be powers of two >= 16 (64 and 128 are tested).

Both kernels take part in programmatic dependent launch (``ops.pdl``): they wait for the kernel
before them first, then let the next one launch.

Under ``TRITON_INTERPRET=1`` (CPU tests) every load is cast to fp32 at once: the interpreter computes
bf16 wrongly.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lessismore.ops import pdl
from lessismore.ops.pdl import prior_done

LOG2E = 1.4426950408889634


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: few programs keep the CPU tests fast


def choose_splits(programs: int, kmax: int, block_n: int, sms: int, waves: int = 2) -> int:
    """Splits per (row, head group): none when the programs already cover the SMs (the merge costs more
    than the last partial wave), else about ``waves`` programs per SM, no split shorter than one block."""
    if programs >= sms:
        return 1
    blocks = max(1, triton.cdiv(kmax, block_n))
    return max(1, min(triton.cdiv(waves * sms, max(programs, 1)), blocks))


@triton.jit
def _decode_split_kernel(
    Q, K, V, IDX, CNT, PART_M, PART_L, PART_ACC, OUT, SCORES, BT,
    scale_log2, kmax, split_len, score_lo, score_window, stride_btb,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ib, stride_ih, stride_cb, stride_ch,
    stride_ob, stride_oh,
    stride_sb, stride_sh, num_splits,
    SINGLE: tl.constexpr,
    G: tl.constexpr, G_PAD: tl.constexpr, KV_PER: tl.constexpr,
    D: tl.constexpr, BLOCK_N: tl.constexpr,
    DENSE: tl.constexpr, WRITE_SCORES: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    PAGED: tl.constexpr = False, PAGE: tl.constexpr = 16, PDL: tl.constexpr = False,
):
    prior_done(PDL)
    # PAGED: K/V are [num_blocks, PAGE, Hkv, D] and position p of row b lives in slot p % PAGE of block
    # BT[b, p // PAGE]: stride_kb / stride_vb step over blocks, stride_kl / stride_vl over the slots of
    # a block. Otherwise K/V are [B, Hkv, L, D] (stride_kb over rows, stride_kl over positions).
    b = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)  # a KV head (shared set) or a query head (per-head sets)
    split = tl.program_id(2)
    kvh = (grp // KV_PER).to(tl.int64)
    head0 = grp * G  # first query head of this program

    n = tl.minimum(tl.load(CNT + b * stride_cb + grp * stride_ch).to(tl.int32), kmax)
    lo = split * split_len
    end = tl.minimum(lo + split_len, kmax)  # this split's slice of [0, kmax)
    hi = tl.minimum(end, n)  # ... of which these are live

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    g_live = offs_g < G
    q = tl.load(Q + b * stride_qb + (head0 + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=g_live[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    if PAGED:
        k_base = K + kvh * stride_kh
        v_base = V + kvh * stride_vh
        bt_base = BT + b * stride_btb
    else:
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
    idx_base = IDX + b * stride_ib + grp * stride_ih
    s_base = SCORES + b * stride_sb + (head0 + offs_g)[:, None] * stride_sh

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        live = offs_n < hi
        if DENSE:
            pos = offs_n.to(tl.int64)
        else:
            pos = tl.load(idx_base + offs_n, mask=live, other=0).to(tl.int64)
        if PAGED:
            page = tl.load(bt_base + pos // PAGE, mask=live, other=0).to(tl.int64)
            slot = pos % PAGE
            k_rows = page * stride_kb + slot * stride_kl
            v_rows = page * stride_vb + slot * stride_vl
        else:
            k_rows = pos * stride_kl
            v_rows = pos * stride_vl
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=live[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        raw = tl.dot(q, tl.trans(k), input_precision=PREC)  # [G_PAD, BLOCK_N], unscaled
        if WRITE_SCORES:
            middle = live & (offs_n >= score_lo) & (offs_n < n - score_window)
            tl.store(s_base + offs_n[None, :], tl.where(middle[None, :], raw, float("-inf")),
                     mask=g_live[:, None] & (offs_n < end)[None, :])
        s = tl.where(live[None, :], raw * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=live[:, None], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    if WRITE_SCORES:
        # Slots past the row's length: no token, no score.
        fill_lo = lo + tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N) * BLOCK_N
        for start in range(fill_lo, end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            tl.store(s_base + offs_n[None, :], tl.full([G_PAD, BLOCK_N], float("-inf"), tl.float32),
                     mask=g_live[:, None] & (offs_n < end)[None, :])

    heads = (b * tl.num_programs(1) * G + head0 + offs_g)  # flat query-head index b * Hq + h
    if SINGLE:
        out = acc / l_i[:, None]
        tl.store(OUT + b * stride_ob + (head0 + offs_g)[:, None] * stride_oh + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=g_live[:, None])
    else:
        part = heads * num_splits + split
        tl.store(PART_M + part, m_i, mask=g_live)
        tl.store(PART_L + part, l_i, mask=g_live)
        tl.store(PART_ACC + part[:, None] * D + offs_d[None, :], acc, mask=g_live[:, None])


@triton.jit
def _reduce_kernel(PART_M, PART_L, PART_ACC, OUT, HQ, stride_ob, stride_oh, num_splits,
                   S_PAD: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr = False):
    prior_done(PDL)
    head = tl.program_id(0).to(tl.int64)  # b * Hq + h
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D)
    s_live = offs_s < num_splits
    m = tl.load(PART_M + head * num_splits + offs_s, mask=s_live, other=float("-inf"))
    l = tl.load(PART_L + head * num_splits + offs_s, mask=s_live, other=0.0)
    acc = tl.load(PART_ACC + (head * num_splits + offs_s)[:, None] * D + offs_d[None, :],
                  mask=s_live[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))  # empty splits have m = -inf: weight 0
    out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)
    tl.store(OUT + (head // HQ) * stride_ob + (head % HQ) * stride_oh + offs_d, out.to(OUT.dtype.element_ty))


# Launch settings of the sparse gather kernels and of the selection layer's dense kernel, from the sweep
# in benchmarks/kernels.py on the H200 (docs/performance.md). ``waves``: programs per SM that
# choose_splits aims at when the (row, head group) programs alone do not cover the SMs.
SPARSE_DEFAULTS = {"block_n": 128, "num_warps": 4, "num_stages": 2, "waves": 2}
DENSE_DEFAULTS = {"block_n": 128, "num_warps": 4, "num_stages": 3, "waves": 2}
# Kernels defined while TRITON_INTERPRET=1 run in the interpreter (CPU tensors too).
INTERPRETED = not isinstance(_decode_split_kernel, triton.runtime.JITFunction)


def _fix_interpreter_index():
    """Triton <= 3.6's interpreter converts a scalar (a numpy array of shape (1,)) to a loop bound with
    int(array), an error since numpy 2.4 (triton-lang/triton#9171, fixed upstream by #9172). Patch
    that one conversion; the interpreter is for tests only."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "fixed_index", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.fixed_index = True
    interpreter._patch_lang_tensor = patched


if INTERPRETED:
    _fix_interpreter_index()


def split_decode(q, k_cache, v_cache, indices, counts, scale=None, *, per_head=False, dense=False,
                 scores=None, score_lo=0, score_window=0, num_splits=None, block_n=None,
                 num_warps=None, num_stages=None, waves=None, pages=None):
    """The launcher behind every kernel of this module (see the module docstring).

    dense=True: ``counts`` are the row lengths and ``indices`` is ignored; the set is 0..counts[b]-1 of
    the cache. scores: an fp32 [B, Hq, L] buffer that receives the unscaled scores q.k at slots
    ``score_lo <= pos < counts[b] - score_window`` and -inf elsewhere (dense only).

    pages=(block_table, span): the cache is paged, k/v_cache [num_blocks, block_size, Hkv, D] and
    block_table [B, max_blocks] int (row b's blocks in position order); span is L, the positions a
    row may hold (at most max_blocks * block_size), which sizes the dense set and the scores.
    """
    b, hq, d = q.shape
    if pages is None:
        hkv, length = k_cache.shape[1], k_cache.shape[2]
        block_table, page = counts, 16  # unused pointer, unused size
        stride_kb, stride_kl, stride_kh = k_cache.stride(0), k_cache.stride(2), k_cache.stride(1)
        stride_vb, stride_vl, stride_vh = v_cache.stride(0), v_cache.stride(2), v_cache.stride(1)
        stride_btb = 0
    else:
        block_table, length = pages
        page, hkv = k_cache.shape[1], k_cache.shape[2]
        if block_table.dim() != 2 or block_table.shape[0] != b or length > block_table.shape[1] * page:
            raise ValueError(f"pages: block table {tuple(block_table.shape)} of {page}-slot blocks cannot hold "
                             f"{length} positions for {b} rows")
        if block_table.stride(-1) != 1:
            block_table = block_table.contiguous()
        stride_kb, stride_kl, stride_kh = k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)
        stride_vb, stride_vl, stride_vh = v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)
        stride_btb = block_table.stride(0)
    group = hq // hkv
    if hq % hkv or d & (d - 1) or d < 16 or k_cache.shape[-1] != d or v_cache.shape != k_cache.shape:
        raise ValueError(f"unsupported shapes q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dimension")
    scale = d**-0.5 if scale is None else float(scale)
    defaults = DENSE_DEFAULTS if dense else SPARSE_DEFAULTS
    block_n = block_n or defaults["block_n"]
    num_stages = num_stages or defaults["num_stages"]
    if q.element_size() == 4:  # fp32 tiles: keep the pipelined K/V buffers inside shared memory
        block_n, num_stages = min(block_n, 64), min(num_stages, 2)
    if dense:
        kmax = length
        indices = counts  # unused pointer
        stride_ib = stride_ih = 0
    else:
        kmax = indices.shape[-1]
        if indices.stride(-1) != 1:
            indices = indices.contiguous()
        stride_ib, stride_ih = indices.stride(0), (indices.stride(1) if per_head else 0)
    stride_cb, stride_ch = counts.stride(0), (counts.stride(1) if per_head else 0)
    programs_per_row, g, kv_per = (hq, 1, group) if per_head else (hkv, group, 1)
    if num_splits is None:
        num_splits = choose_splits(b * programs_per_row, kmax, block_n, num_sms(q.device), waves or defaults["waves"])
    split_len = triton.cdiv(triton.cdiv(max(kmax, 1), num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(kmax, split_len))

    out = torch.empty((b, hq, d), device=q.device, dtype=q.dtype)
    if num_splits > 1:
        part_m = torch.empty((b * hq * num_splits,), device=q.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((b * hq * num_splits, d), device=q.device, dtype=torch.float32)
    else:
        part_m = part_l = part_acc = out
    write_scores = scores is not None
    if write_scores:
        if not dense or scores.shape != (b, hq, length) or scores.dtype != torch.float32 or scores.stride(-1) != 1:
            raise ValueError("scores: an fp32 [B, Hq, L] buffer, dense attention only")
    else:
        scores = out
    interp = INTERPRETED
    launch = pdl.launch_options(q)
    _decode_split_kernel[(b, programs_per_row, num_splits)](
        q, k_cache, v_cache, indices, counts, part_m, part_l, part_acc, out, scores, block_table,
        scale * LOG2E, kmax, split_len, score_lo, score_window, stride_btb,
        q.stride(0), q.stride(1),
        stride_kb, stride_kh, stride_kl,
        stride_vb, stride_vh, stride_vl,
        stride_ib, stride_ih, stride_cb, stride_ch,
        out.stride(0), out.stride(1),
        scores.stride(0) if write_scores else 0, scores.stride(1) if write_scores else 0, num_splits,
        SINGLE=num_splits == 1, G=g, G_PAD=max(16, triton.next_power_of_2(g)), KV_PER=kv_per,
        D=d, BLOCK_N=block_n, DENSE=dense, WRITE_SCORES=write_scores, UPCAST=interp,
        PREC="ieee" if (interp or q.dtype == torch.float32) else "tf32",
        PAGED=pages is not None, PAGE=page,
        num_warps=num_warps or defaults["num_warps"], num_stages=num_stages, **launch,
    )
    if num_splits > 1:
        _reduce_kernel[(b * hq,)](
            part_m, part_l, part_acc, out, hq, out.stride(0), out.stride(1), num_splits,
            S_PAD=triton.next_power_of_2(num_splits), D=d, num_warps=4, **launch,
        )
    return out


def sparse_decode_attention(q, k_cache, v_cache, indices, counts, scale=None, **tuning):
    """q [B, Hq, D]; k/v_cache [B, Hkv, L, D]; indices [B, Kmax] int32/int64 shared by all heads of a
    row; counts [B] int -> out [B, Hq, D] (q's dtype). ``tuning``: num_splits (or waves), block_n,
    num_warps, num_stages."""
    return split_decode(q, k_cache, v_cache, indices, counts, scale, **tuning)


def sparse_decode_attention_per_head(q, k_cache, v_cache, indices, counts, scale=None, **tuning):
    """As sparse_decode_attention with indices [B, Hq, Kmax] and counts [B, Hq]."""
    return split_decode(q, k_cache, v_cache, indices, counts, scale, per_head=True, **tuning)


def dense_decode_attention(q, k_cache, v_cache, lengths, scale=None, **tuning):
    """Full decode attention over slots 0..lengths[b]-1 (``naive.dense_decode_attention``'s contract)."""
    return split_decode(q, k_cache, v_cache, None, lengths, scale, dense=True, **tuning)


__all__ = ["sparse_decode_attention", "sparse_decode_attention_per_head", "dense_decode_attention",
           "split_decode", "choose_splits", "INTERPRETED"]
