"""Fused elementwise stages of a decode step, each one launch on the GPU instead of five to twenty.

A decode step at batch 1 is a chain of ~400 launches per token; what is not a matrix product must cost
as little as possible. Four fusions pay:

* ``add_rmsnorm``: residual += x, then h = RMSNorm(residual) (one read and two writes of a row);
* ``qk_norm_rope_store``: from the fused qkv projection, Qwen3's per-head q/k RMSNorm (when present),
  RoPE on q and k, q written out, k and v written straight into the KV cache at each row's position;
* ``silu_mul``: SiLU(gate) * up from the fused gate/up projection;
* ``advance``: the engine's bookkeeping after a step's draw (record the token, move the active rows
  on, retire the finished ones), ~20 small tensor ops otherwise.

Each has a PyTorch reference: the layer stages follow transformers' arithmetic exactly (so the CPU
engine gives the same greedy tokens as ``model.generate``), and their Triton versions run on CUDA
tensors and compute in fp32 with one rounding at the end; ``advance`` is integer bookkeeping, the same
either way. They take part in programmatic dependent launch (``ops.pdl``): each waits for the
kernel before it, then lets the next one launch.
"""
from __future__ import annotations

import importlib.util

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from lessismore.ops import pdl
    from lessismore.ops.pdl import prior_done

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n_cols, eps, HAS_ADD: tl.constexpr, BLOCK: tl.constexpr,
                            PDL: tl.constexpr = False):
        prior_done(PDL)
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        base = row.to(tl.int64) * n_cols
        r = tl.load(res_ptr + base + offs, mask=mask, other=0.0)
        if HAS_ADD:
            x = tl.load(x_ptr + base + offs, mask=mask, other=0.0)
            r = (r.to(tl.float32) + x.to(tl.float32)).to(r.dtype)
            tl.store(res_ptr + base + offs, r, mask=mask)
        rf = r.to(tl.float32)
        var = tl.sum(rf * rf, axis=0) / n_cols
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = rf * tl.rsqrt(var + eps) * w
        tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_store_kernel(
        qkv_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, pos_ptr, cos_ptr, sin_ptr, qkw_ptr,
        eps, stride_qkv, stride_cb, stride_ch, stride_cl,
        HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        prior_done(PDL)
        row = tl.program_id(0)
        head = tl.program_id(1)  # 0..HQ-1: query heads; HQ..HQ+HKV-1: key heads (which also copy v)
        offs = tl.arange(0, HALF)
        pos = tl.load(pos_ptr + row).to(tl.int64)
        base = qkv_ptr + row.to(tl.int64) * stride_qkv + head * (2 * HALF)
        x1 = tl.load(base + offs).to(tl.float32)
        x2 = tl.load(base + HALF + offs).to(tl.float32)
        if HAS_NORM:
            w_ptr = qkw_ptr + (head >= HQ).to(tl.int32) * (2 * HALF)  # row 0: q_norm, row 1: k_norm
            inv = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
            x1 = x1 * inv * tl.load(w_ptr + offs).to(tl.float32)
            x2 = x2 * inv * tl.load(w_ptr + HALF + offs).to(tl.float32)
        c = tl.load(cos_ptr + pos * HALF + offs)
        s = tl.load(sin_ptr + pos * HALF + offs)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        if head < HQ:
            out = q_out_ptr + (row.to(tl.int64) * HQ + head) * (2 * HALF)
            tl.store(out + offs, y1.to(q_out_ptr.dtype.element_ty))
            tl.store(out + HALF + offs, y2.to(q_out_ptr.dtype.element_ty))
        else:
            kv_head = head - HQ
            slot = tl.load(slot_ptr + row).to(tl.int64)
            off = slot * stride_cb + kv_head * stride_ch + pos * stride_cl
            tl.store(k_cache_ptr + off + offs, y1.to(k_cache_ptr.dtype.element_ty))
            tl.store(k_cache_ptr + off + HALF + offs, y2.to(k_cache_ptr.dtype.element_ty))
            vbase = qkv_ptr + row.to(tl.int64) * stride_qkv + (HQ + HKV + kv_head) * (2 * HALF)
            tl.store(v_cache_ptr + off + offs, tl.load(vbase + offs))
            tl.store(v_cache_ptr + off + HALF + offs, tl.load(vbase + HALF + offs))

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        prior_done(PDL)
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < inter
        g = tl.load(gu_ptr + row.to(tl.int64) * 2 * inter + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row.to(tl.int64) * 2 * inter + inter + offs, mask=mask, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(out_ptr + row.to(tl.int64) * inter + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _advance_kernel(nxt_ptr, active_ptr, count_ptr, limit_ptr, lengths_ptr, tokens_ptr, out_ptr, stop_ptr,
                        stop_on_eos_ptr, b, max_len, stride_out, n_stop, BLOCK: tl.constexpr,
                        PDL: tl.constexpr = False):
        prior_done(PDL)
        rows = tl.arange(0, BLOCK)
        ok = rows < b
        nxt = tl.load(nxt_ptr + rows, mask=ok, other=0)
        active = tl.load(active_ptr + rows, mask=ok, other=0) != 0
        count = tl.load(count_ptr + rows, mask=ok, other=0)
        on = ok & active
        at = tl.minimum(count, max_len - 1)
        tl.store(out_ptr + rows.to(tl.int64) * stride_out + at, nxt, mask=on)
        stop = rows < 0
        for i in range(n_stop):
            stop = stop | (nxt == tl.load(stop_ptr + i))
        stop = stop & (tl.load(stop_on_eos_ptr + rows, mask=ok, other=0) != 0)
        finished = active & (stop | (count + 1 >= tl.load(limit_ptr + rows, mask=ok, other=0)))
        tl.store(lengths_ptr + rows, tl.load(lengths_ptr + rows, mask=on, other=0) + 1, mask=on)
        tl.store(tokens_ptr + rows, nxt, mask=on)
        tl.store(count_ptr + rows, count + 1, mask=on)
        tl.store(active_ptr + rows, active & ~finished, mask=ok)


def use_triton(x: torch.Tensor, impl: str = "auto") -> bool:
    """impl "auto": Triton on CUDA tensors, PyTorch elsewhere; "triton" / "torch" force one (the tests
    run the Triton versions on CPU under ``TRITON_INTERPRET=1``)."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl: expected auto, triton or torch, got {impl!r}")
    return HAVE_TRITON and (impl == "triton" or (impl == "auto" and x.is_cuda))


# ---- RMSNorm ----------------------------------------------------------------------------------------


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm / Qwen3RMSNorm, operation for operation."""
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rmsnorm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "auto") -> torch.Tensor:
    """residual += x (in place; skipped when x is None), returns RMSNorm(residual) * weight. 2-D rows."""
    if use_triton(residual, impl):
        n = residual.shape[-1]
        out = torch.empty_like(residual)
        _add_rmsnorm_kernel[(residual.shape[0],)](
            residual if x is None else x, residual, weight, out, n, eps,
            HAS_ADD=x is not None, BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 4096 else 8,
            **pdl.launch_options(residual),
        )
        return out
    if x is not None:
        residual.add_(x)
    return rmsnorm_ref(residual, weight, eps)


# ---- q/k norm, RoPE, KV-cache store -------------------------------------------------------------------


def _rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, cos/sin [.., D] in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def qk_norm_rope_store(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    slots: torch.Tensor,
    positions: torch.Tensor,
    cos_half: torch.Tensor,
    sin_half: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qk_norm: torch.Tensor | None,
    eps: float,
    impl: str = "auto",
) -> torch.Tensor:
    """qkv [N, (Hq + 2 Hkv) * D] of N tokens; token i belongs to cache row ``slots[i]`` at position
    ``positions[i]``. Writes RoPE'd k and v into k_cache/v_cache [S, Hkv, Lmax, D] there and returns the
    RoPE'd queries [N, Hq, D]. cos_half/sin_half [Lmax, D/2] fp32 tables of the rotary angles; qk_norm
    [2, D] the q and k RMSNorm weights (Qwen3) or None."""
    n = qkv.shape[0]
    if use_triton(qkv, impl):
        q = torch.empty(n, num_heads, head_dim, device=qkv.device, dtype=qkv.dtype)
        has_norm = qk_norm is not None
        _qk_norm_rope_store_kernel[(n, num_heads + num_kv_heads)](
            qkv, q, k_cache, v_cache, slots, positions, cos_half, sin_half,
            qk_norm if has_norm else cos_half,
            eps, qkv.stride(0), *k_cache.stride()[:3],
            HQ=num_heads, HKV=num_kv_heads, HALF=head_dim // 2, HAS_NORM=has_norm, num_warps=1,
            **pdl.launch_options(qkv),
        )
        return q
    dq, dk = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :dq].reshape(n, num_heads, head_dim)
    k = qkv[:, dq : dq + dk].reshape(n, num_kv_heads, head_dim)
    v = qkv[:, dq + dk :].reshape(n, num_kv_heads, head_dim)
    if qk_norm is not None:
        q = rmsnorm_ref(q, qk_norm[0], eps)
        k = rmsnorm_ref(k, qk_norm[1], eps)
    pos = positions.long()
    cos = torch.cat((cos_half[pos], cos_half[pos]), dim=-1).to(qkv.dtype)[:, None, :]
    sin = torch.cat((sin_half[pos], sin_half[pos]), dim=-1).to(qkv.dtype)[:, None, :]
    q = _rope_ref(q, cos, sin)
    k = _rope_ref(k, cos, sin)
    # index_put with (slot, :, pos) broadcasting: k[i] goes to cache[slots[i], :, positions[i]].
    rows = slots.long()
    k_cache[rows, :, pos] = k.to(k_cache.dtype)
    v_cache[rows, :, pos] = v.to(v_cache.dtype)
    return q


# ---- SwiGLU ---------------------------------------------------------------------------------------------


def silu_mul(gate_up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """gate_up [N, 2I] (gate first) -> SiLU(gate) * up [N, I], as transformers' LlamaMLP computes it."""
    inter = gate_up.shape[-1] // 2
    if use_triton(gate_up, impl):
        out = torch.empty(gate_up.shape[0], inter, device=gate_up.device, dtype=gate_up.dtype)
        block = 1024
        _silu_mul_kernel[(gate_up.shape[0], triton.cdiv(inter, block))](
            gate_up, out, inter, BLOCK=block, num_warps=4, **pdl.launch_options(gate_up))
        return out
    return torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]


# ---- the step's bookkeeping -------------------------------------------------------------------------


def advance(nxt: torch.Tensor, active: torch.Tensor, count: torch.Tensor, limit: torch.Tensor,
            lengths: torch.Tensor, tokens: torch.Tensor, out: torch.Tensor, stop_ids: torch.Tensor,
            stop_on_eos: torch.Tensor, impl: str = "auto") -> None:
    """In place, after a step drew nxt [b]: each active row records nxt in out [b, max_len] at column
    count (the last column once count reaches it), takes nxt as its next input token, grows lengths
    and count by one, and stops being active if it drew one of stop_ids (where stop_on_eos) or has
    reached its limit of new tokens. Inactive rows keep everything. One launch on the GPU."""
    if use_triton(nxt, impl):
        b = nxt.shape[0]
        _advance_kernel[(1,)](nxt, active, count, limit, lengths, tokens, out, stop_ids, stop_on_eos, b, out.shape[1],
                              out.stride(0), stop_ids.shape[0], BLOCK=max(16, triton.next_power_of_2(b)),
                              num_warps=1, **pdl.launch_options(nxt))
        return
    at = count.clamp(max=out.shape[1] - 1)[:, None]
    out.scatter_(1, at, torch.where(active[:, None], nxt[:, None], out.gather(1, at)))
    stop = (nxt[:, None] == stop_ids[None, :]).any(-1) & stop_on_eos
    finished = active & (stop | (count + 1 >= limit))
    lengths += active.to(lengths.dtype)
    tokens.copy_(torch.where(active, nxt, tokens))
    count += active.to(count.dtype)
    active &= ~finished
