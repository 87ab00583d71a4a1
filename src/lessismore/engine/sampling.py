"""Sampling on the device, batched, with per-sequence parameters and per-sequence random streams.

Every row has its own temperature, top-p, top-k and seed. The random numbers are a counter-based hash
of (seed, token index in the sequence, vocabulary id), so a sequence draws the same tokens whatever
batch or slot it runs in, and the step needs no generator state: it is capturable in a CUDA graph.
Sampling is Gumbel-max over the kept tokens: argmax(logit / T + G) with G = -log(-log U) is a draw
from softmax(logit / T) restricted to them.

The kept set, with x = logit / T, p = softmax(x) and ties meaning equal x (so equal p):

* top-p: token i is kept iff the mass of the tokens with x strictly greater than x_i is < top_p.
  That is the smallest set of highest-probability tokens whose mass reaches top_p, except that tokens
  tied with the last one are all kept (never an arbitrary part of a tie). top_p >= 1 keeps every token.
* top-k (k > 0): token i is kept iff fewer than k tokens have x strictly greater than x_i: the k
  highest, and every token tied with the k-th (k >= V keeps every token).
* the kept set is the intersection; it always holds the most probable token(s).

Both are upper sets in x, so the kept set is {i : key(x_i) >= t} for a threshold t on the
order-preserving 32-bit key of the fp32 value x (-0.0 taken as +0.0). On CUDA, Triton kernels find t
without sorting the vocabulary: a most-significant-digit radix search over the key's 32 bits, by mass
for top-p (the largest t with mass{key >= t} >= top_p * total) and by count for top-k, digits of
4, 4, 4, 10 and 10 bits, one pass over the logits per digit. Each pass histograms, per row, the mass
and the count of the tokens inside the range left by the digits before, over the next digit (the
first three passes by one-hot sums, when most tokens are still in range; the last two by atomics,
when few are), then picks the digit; the pass after it (or the final one) reads the histogram. Masses
are exp(x - max) in fixed point (multiples of 2**-40, int64): the one-hot passes sum in fp32 within a
program and add the program's sums as integers, the atomic passes add each token's integer mass, so
no sum depends on the order of the atomics and the result is deterministic. The threshold is exact
for those masses: it can differ from exact real arithmetic only where mass{x > x_i} is within
rounding (~1e-7 relative) of top_p, as any floating-point implementation can (tokens below 2**-40
of the largest probability weigh 0: they are dropped whenever top_p < 1 - 2e-7). Counts are exact.

Kernels per sampled step: the row maximum (which also stores x = logit / T, so that the kernels after
it divide no more), the five digit passes, and the draw (Gumbel-max over the kept tokens with the same
noise as ``uniform``, the per-row merge done by the last program of a row), plus one memset of a small
workspace: 8 launches, fixed shapes, nothing read back by the host (CUDA-graph capturable); each
kernel reads the row once (about 5 us of HBM time for fp32 [32, 151936]), its loads pipelined. The
kernels are bound by instructions, not bytes: ~75 a token in each pass. Rows whose top_p is >= 1 and
top_k is 0 skip the work of the passes; greedy rows (temperature 0) take the first maximal logit, as
``argmax`` does.

Elsewhere (CPU tensors) a PyTorch version with the same rule sorts each row (float64 masses).
"""
from __future__ import annotations

import torch

from lessismore.engine.kernels import HAVE_TRITON, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

_MASK32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # < 2**27: products of 32-bit values stay inside int64


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * _MULT) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MULT) & _MASK32
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, counter: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """U(0, 1) fp32 [B, V] for seed [B], counter [B] (int64) and vocabulary ids [B, V] or [V]."""
    s = _mix(_mix(seed & _MASK32) ^ (seed >> 32) & _MASK32)
    row = _mix(s ^ _mix(counter & _MASK32))
    h = _mix(row[:, None] ^ _mix(ids.long()))
    return ((h >> 8).float() + 0.5) / 16777216.0  # 24 bits: exact in fp32, strictly inside (0, 1)


def scaled_logits(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """x = logit / T in fp32, [B, V] (T clamped to 1e-6: greedy rows never use it)."""
    return logits.float() / temperature.clamp_min(1e-6)[:, None]


def order_key(x: torch.Tensor) -> torch.Tensor:
    """The order-preserving key of fp32 values as int64 in [0, 2**32): x < y iff key(x) < key(y), and
    key(-0.0) == key(+0.0). The thresholds of ``thresholds`` are on this key."""
    x = torch.where(x == 0, torch.zeros_like(x), x)
    b = x.view(torch.int32).long() & _MASK32
    return torch.where(b >= 2**31, b ^ _MASK32, b | 2**31)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    do_sample: bool,
    impl: str = "auto",
) -> torch.Tensor:
    """Next token ids [B] (int64) from logits [B, V].

    temperature [B] fp32 (0: greedy for that row), top_p [B] fp32 in (0, 1], top_k [B] int (0: all),
    seed/counter [B] int64. ``do_sample=False`` is the greedy-only path. impl "auto": the Triton kernels
    on CUDA tensors, PyTorch elsewhere; "triton" / "torch" force one (tests run the kernels on CPU under
    ``TRITON_INTERPRET=1``)."""
    if not do_sample:
        return logits.argmax(-1)
    if use_triton(logits, impl):
        return _sample_triton(logits, temperature, top_p, top_k, seed, counter)
    return _sample_torch(logits, temperature, top_p, top_k, seed, counter)


def thresholds(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
               impl: str = "auto") -> torch.Tensor:
    """The kept-set threshold t [B] (int64, on ``order_key``) of every row: row b keeps the tokens with
    order_key(scaled_logits) >= t[b]. For tests and inspection (the kernels path runs the same passes
    as ``sample``); greedy rows get 0."""
    if use_triton(logits, impl):
        return _triton_thresholds(logits, temperature, top_p, top_k)
    x = scaled_logits(logits, temperature)
    keep = _kept_torch(x, top_p, top_k)
    t = torch.where(keep, order_key(x), torch.full_like(x, 2**32, dtype=torch.int64)).amin(-1)
    return torch.where(temperature > 0, t, torch.zeros_like(t))


# ---- PyTorch path (CPU): sort each row --------------------------------------------------------------


def _kept_torch(x: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """The kept set [B, V] (bool) of the rule above, by sorting (float64 masses)."""
    vocab = x.shape[-1]
    ordered, order = x.sort(dim=-1, descending=True)
    probs = torch.softmax(ordered.double(), dim=-1)
    rank = torch.arange(vocab, device=x.device).expand_as(ordered)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]  # -0.0 == +0.0: one tie group
    first = torch.where(new, rank, torch.zeros_like(rank)).cummax(-1).values  # start of each tie group
    above = (probs.cumsum(-1) - probs).gather(-1, first)  # mass of the tokens strictly greater
    k = torch.where(top_k > 0, top_k.long(), torch.full_like(top_k, vocab, dtype=torch.long))
    keep = ((above < top_p.double()[:, None]) | (top_p >= 1)[:, None]) & (first < k[:, None])
    keep[:, 0] = True
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def _sample_torch(logits, temperature, top_p, top_k, seed, counter):
    greedy = logits.argmax(-1)
    x = scaled_logits(logits, temperature)
    keep = _kept_torch(x, top_p, top_k)
    ids = torch.arange(x.shape[-1], device=x.device)
    gumbel = -torch.log(-torch.log(uniform(seed, counter, ids)))
    score = torch.where(keep, x + gumbel, torch.full_like(x, float("-inf")))
    return torch.where(temperature > 0, score.argmax(-1), greedy)


def sample_by_sorting(logits, temperature, top_p, top_k, seed, counter, do_sample):
    """The engine's sampler before the sort-free kernels: one full sort of every row per step. Kept as
    the peer the kernels are timed against (benchmarks/sampling.py) and whose draws they must keep
    (tests/test_sampling.py); same noise as ``sample``, fp32 masses, the top-k cut by rank."""
    greedy = logits.argmax(-1)
    if not do_sample:
        return greedy
    vocab = logits.shape[-1]
    scaled = logits.float() / temperature.clamp_min(1e-6)[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True)
    probs = torch.softmax(ordered, dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).long()
    keep = (before < top_p[:, None]) & (rank[None, :] < k[:, None])
    keep[:, 0] = True
    gumbel = -torch.log(-torch.log(uniform(seed, counter, order)))
    score = torch.where(keep, ordered + gumbel, torch.full_like(ordered, float("-inf")))
    drawn = order.gather(-1, score.argmax(-1, keepdim=True))[:, 0]
    return torch.where(temperature > 0, drawn, greedy)


# ---- Triton path ------------------------------------------------------------------------------------

# Radix digits of the 32-bit key, most significant first (bits). The first three passes see most
# tokens (one-hot sums), the last two few (atomics into 1024 bins).
_DIGITS = (4, 4, 4, 10, 10)
_DENSE = 3
_FRAC = 40  # masses exp(x - max) in units of 2**-40 (int64): V * 2**40 < 2**63 for V < 2**23
_BLOCK = 1024  # tokens per step of a program's loop
_DENSE_BLOCK = 512  # the same in the one-hot passes ([16, 512] accumulators)
_NUM_WARPS = 8
_STAGES = 3  # loads in flight per loop (software pipelining: without it each block waits on its own loads)
# Programs per row (the grid is rows x programs, each program a contiguous chunk of the vocabulary):
# at least _ROW_PROGRAMS, and at least _SM_PROGRAMS per SM in all (small batches: no idle SM). H100
# sweep (benchmarks/sampling.py --sweep): ~32 a row was fastest at B = 8 and at B = 32, where the
# old rule of 4 programs per SM in all (17 a row at B = 32) left the last round of the dense passes
# (2 programs fit an SM) nearly empty. At B = 1 the rule gives the old grid (149 programs).
_ROW_PROGRAMS = 32
_SM_PROGRAMS = 2

# Workspace, int64 per row (zeroed each call): the max key, the per-pass histograms (mass and count),
# the search state after each pass (stored by the pass after it), the draw's packed maximum and
# counter, and the final thresholds (for ``thresholds``).
_W_MAX = 0


def _layout(digits):
    """(histogram offsets per pass, state offset, draw offset, row width) of the workspace."""
    hist, off = [], 8
    for bits in digits:
        hist.append(off)
        off += 2 * (1 << bits)  # mass bins, then count bins
    state = off  # 8 int64 per pass: prefix_p, above_p, prefix_k, above_k, total mass
    draw = state + 8 * len(digits)  # packed (score key << 32 | ~id), programs done, t_p, t_k, t
    return hist, state, draw, draw + 8


if HAVE_TRITON:

    @triton.jit
    def _key(x):
        """fp32 -> order-preserving uint32 (-0.0 as +0.0)."""
        x = tl.where(x == 0.0, 0.0, x)
        b = x.to(tl.uint32, bitcast=True)
        return tl.where((b >> 31) != 0, b ^ 0xFFFFFFFF, b | 0x80000000)  # (no ~: the interpreter fails on uint32)

    @triton.jit
    def _unkey(u):
        b = tl.where((u >> 31) != 0, u & 0x7FFFFFFF, u ^ 0xFFFFFFFF)
        return b.to(tl.float32, bitcast=True)

    @triton.jit
    def _hash(x):
        """``_mix`` on uint32."""
        x = x ^ (x >> 16)
        x = x * 0x45D9F3B
        x = x ^ (x >> 16)
        x = x * 0x45D9F3B
        return x ^ (x >> 16)

    @triton.jit
    def _load_x(X, b, V, offs, valid):
        """x = logit / T of row b at ``offs`` (-inf where not valid), as the first kernel stored it."""
        return tl.load(X + b.to(tl.int64) * V + offs, mask=valid, other=float("-inf"))

    @triton.jit
    def _row_params(T, P, K, b, V):
        temp = tl.load(T + b).to(tl.float32)
        top_p = tl.load(P + b).to(tl.float32)
        k = tl.load(K + b).to(tl.int64)
        # (flags through int32: the interpreter mis-broadcasts a scalar comparison in block & scalar)
        active = (temp > 0.0).to(tl.int32) != 0
        do_p = (active & (top_p < 1.0)).to(tl.int32) != 0
        do_k = (active & (k > 0) & (k < V)).to(tl.int32) != 0
        return tl.maximum(temp, 1e-6), top_p, k, active, do_p, do_k

    @triton.jit
    def _advance(H, prefix, above, thr, NB: tl.constexpr, SHIFT: tl.constexpr):
        """One digit of the search: the largest j with above + sum(h[j:]) >= thr (0 if none)."""
        j = tl.arange(0, NB)
        h = tl.load(H + j)
        suffix = tl.sum(h, 0) - tl.cumsum(h, 0) + h
        ok = (above + suffix).to(tl.float64) >= thr
        pick = tl.max(tl.where(ok, j, 0), 0)
        above = above + tl.sum(tl.where(j > pick, h, 0), 0)
        return prefix | (pick.to(tl.int64) << SHIFT), above

    @triton.jit
    def _state(WS, STATE, b, PASS: tl.constexpr, top_p, k, do_p, do_k, store,
               H_OFF: tl.constexpr, NB: tl.constexpr, SHIFT: tl.constexpr, W: tl.constexpr):
        """The search state after pass PASS - 1 from the state after PASS - 2 and the histograms of
        pass PASS - 1; stored by program 0 of the row (the pass after reads it)."""
        ws = WS + b * W
        if PASS == 1:
            pp = tl.zeros((), tl.int64)
            ap = tl.zeros((), tl.int64)
            pk = tl.zeros((), tl.int64)
            ak = tl.zeros((), tl.int64)
            total = tl.zeros((), tl.int64)
        else:
            st = ws + STATE + (PASS - 2) * 8
            pp = tl.load(st)
            ap = tl.load(st + 1)
            pk = tl.load(st + 2)
            ak = tl.load(st + 3)
            total = tl.load(st + 4)
            if PASS == 2:
                total = tl.sum(tl.load(ws + H_OFF + tl.arange(0, NB)), 0)
            # A search that is off keeps prefix 0: every token.
            if do_p:
                pp, ap = _advance(ws + H_OFF, pp, ap, top_p.to(tl.float64) * total.to(tl.float64), NB, SHIFT)
            if do_k:
                pk, ak = _advance(ws + H_OFF + NB, pk, ak, k.to(tl.float64), NB, SHIFT)
            if store:
                st = ws + STATE + (PASS - 1) * 8
                tl.store(st, pp)
                tl.store(st + 1, ap)
                tl.store(st + 2, pk)
                tl.store(st + 3, ak)
                tl.store(st + 4, total)
        return pp, pk

    if not isinstance(_key, triton.runtime.JITFunction):
        # Under the interpreter a call of a jit helper re-patches the language (about 1 ms a call):
        # call the helpers as the plain (rewritten) functions they are there.
        _key, _unkey, _hash, _load_x, _row_params, _advance, _state = (
            f.rewrite() for f in (_key, _unkey, _hash, _load_x, _row_params, _advance, _state))

    @triton.jit
    def _max_kernel(L, X, T, P, K, WS, V, stride, chunk, W: tl.constexpr, W_MAX: tl.constexpr,
                    W_DRAW: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
        """x = logit / T of the sampled rows, stored in X [rows, V] fp32 for the kernels after (one
        division per token instead of one per kernel), and the row's largest key (rows with top-p or
        top-k); on greedy rows the first maximal logit, into the draw's slot."""
        b = tl.program_id(0)
        s = tl.program_id(1)
        t, top_p, k, active, do_p, do_k = _row_params(T, P, K, b, V)
        row = L + b.to(tl.int64) * stride
        if active:
            best = tl.zeros((BLOCK,), tl.uint32)
            for i in tl.range(0, chunk, BLOCK, num_stages=STAGES):
                offs = s * chunk + i + tl.arange(0, BLOCK)
                valid = offs < V
                lg = tl.load(row + offs, mask=valid, other=float("-inf")).to(tl.float32)
                x = tl.math.div_rn(lg, t)
                tl.store(X + b.to(tl.int64) * V + offs, x, mask=valid)
                best = tl.maximum(best, tl.where(valid, _key(x), 0))
            if do_p | do_k:
                tl.atomic_max(WS + b * W + W_MAX, tl.max(best, 0).to(tl.int64), sem="relaxed")
        else:
            first = tl.zeros((BLOCK,), tl.uint64)
            for i in tl.range(0, chunk, BLOCK, num_stages=STAGES):
                offs = s * chunk + i + tl.arange(0, BLOCK)
                valid = offs < V
                lg = tl.load(row + offs, mask=valid, other=float("-inf")).to(tl.float32)
                packed = (_key(lg).to(tl.uint64) << 32) | (offs.to(tl.uint32) ^ 0xFFFFFFFF).to(tl.uint64)
                first = tl.maximum(first, tl.where(valid, packed, 0))
            tl.atomic_max((WS + b * W + W_DRAW).to(tl.pointer_type(tl.uint64)), tl.max(first, 0), sem="relaxed")

    @triton.jit
    def _pass_kernel(X, T, P, K, WS, V, chunk,
                     PASS: tl.constexpr, BITS: tl.constexpr, SHIFT: tl.constexpr, DENSE: tl.constexpr,
                     PREV_NB: tl.constexpr, PREV_SHIFT: tl.constexpr, PREV_OFF: tl.constexpr, H_OFF: tl.constexpr,
                     STATE: tl.constexpr, W: tl.constexpr, W_MAX: tl.constexpr, FRAC: tl.constexpr,
                     BLOCK: tl.constexpr, STAGES: tl.constexpr):
        """Histogram of digit PASS (BITS bits at SHIFT) of the tokens inside the range left by the
        digits before: mass (do_p rows) and count (do_k rows). DENSE: one-hot sums in registers
        ([BLOCK, NB] fp32 / int32, reduced once), merged by one atomic per bin and program; else an
        atomic per token in range."""
        b = tl.program_id(0)
        s = tl.program_id(1)
        NB: tl.constexpr = 1 << BITS
        t, top_p, k, active, do_p, do_k = _row_params(T, P, K, b, V)
        if do_p | do_k:
            pp, pk = _state(WS, STATE, b, PASS, top_p, k, do_p, do_k, s == 0, PREV_OFF, PREV_NB, PREV_SHIFT, W)
            pp = pp.to(tl.uint32)
            pk = pk.to(tl.uint32)
            ws = WS + b * W
            m = _unkey(tl.load(ws + W_MAX).to(tl.uint32))
            scale = (1 << FRAC) * 1.0
            bins = tl.arange(0, NB)
            # One-hot accumulators [NB, BLOCK]: bins along the first axis keep the tokens in the layout
            # they are loaded in (no layout conversion in the loop), reduced once after it.
            if DENSE:
                mass = tl.zeros((NB, BLOCK), tl.float32)
                count = tl.zeros((NB, BLOCK), tl.float32)  # fp32 counts: exact below 2**24, a predicated add too
            for i in tl.range(0, chunk, BLOCK, num_stages=STAGES):
                offs = s * chunk + i + tl.arange(0, BLOCK)
                valid = offs < V
                x = _load_x(X, b, V, offs, valid)
                u = _key(x)
                digit = (u >> SHIFT).to(tl.int32) & (NB - 1)
                if PASS == 1:
                    in_p = valid & do_p
                    in_k = valid & do_k
                else:
                    in_p = valid & do_p & ((u >> (SHIFT + BITS)) == (pp >> (SHIFT + BITS)))
                    in_k = valid & do_k & ((u >> (SHIFT + BITS)) == (pk >> (SHIFT + BITS)))
                e = tl.exp(x - m)
                if DENSE:
                    if do_p:
                        # a select of (sum + e, sum), not sum + select(e, 0): one predicated add a bin
                        hit = bins[:, None] == tl.where(in_p, digit, NB)[None, :]
                        mass = tl.where(hit, mass + e[None, :], mass)
                    if do_k:
                        hit = bins[:, None] == tl.where(in_k, digit, NB)[None, :]
                        count = tl.where(hit, count + 1.0, count)
                else:
                    q = (e * scale).to(tl.int64)
                    tl.atomic_add(ws + H_OFF + digit, q, mask=in_p & (q > 0), sem="relaxed")
                    tl.atomic_add(ws + H_OFF + NB + digit, tl.full((BLOCK,), 1, tl.int64), mask=in_k, sem="relaxed")
            if DENSE:
                if do_p:
                    tl.atomic_add(ws + H_OFF + bins, (tl.sum(mass, 1) * scale).to(tl.int64), sem="relaxed")
                if do_k:
                    tl.atomic_add(ws + H_OFF + NB + bins, tl.sum(count, 1).to(tl.int64), sem="relaxed")

    @triton.jit
    def _draw_kernel(X, T, P, K, SEED, CNT, WS, OUT, V, chunk, programs,
                     LAST_NB: tl.constexpr, LAST_SHIFT: tl.constexpr, LAST_OFF: tl.constexpr, NPASS: tl.constexpr,
                     STATE: tl.constexpr, W: tl.constexpr, W_MAX: tl.constexpr, W_DRAW: tl.constexpr,
                     BLOCK: tl.constexpr, STAGES: tl.constexpr, INTERPRET: tl.constexpr):
        """Gumbel-max over the kept tokens; the last program of a row to finish writes the token (on
        greedy rows, the first kernel's choice). Blocks without a kept token skip the noise."""
        b = tl.program_id(0)
        s = tl.program_id(1)
        t, top_p, k, active, do_p, do_k = _row_params(T, P, K, b, V)
        ws = WS + b * W
        thr = tl.zeros((), tl.uint32)
        if do_p | do_k:
            pp, pk = _state(WS, STATE, b, NPASS + 1, top_p, k, do_p, do_k, False, LAST_OFF, LAST_NB, LAST_SHIFT, W)
            thr = tl.minimum(tl.maximum(pp, pk), tl.load(ws + W_MAX)).to(tl.uint32)
            if s == 0:
                tl.store(ws + W_DRAW + 2, pp)
                tl.store(ws + W_DRAW + 3, pk)
                tl.store(ws + W_DRAW + 4, thr.to(tl.int64))
        seed = tl.load(SEED + b).to(tl.int64)
        ctr = tl.load(CNT + b).to(tl.int64)
        hs = _hash(_hash((seed & 0xFFFFFFFF).to(tl.uint32)) ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
        hrow = _hash(hs ^ _hash((ctr & 0xFFFFFFFF).to(tl.uint32)))
        best = tl.zeros((BLOCK,), tl.uint64)
        if active:
            for i in tl.range(0, chunk, BLOCK, num_stages=STAGES):
                offs = s * chunk + i + tl.arange(0, BLOCK)
                valid = offs < V
                ids = offs.to(tl.uint32)
                x = _load_x(X, b, V, offs, valid)
                keep = valid & (_key(x) >= thr)
                if tl.max(keep.to(tl.int32), 0) > 0:
                    h = _hash(hrow ^ _hash(ids))
                    uni = ((h >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
                    if INTERPRET:
                        g = -tl.log(-tl.log(uni))
                    else:
                        g = -libdevice.log(-libdevice.log(uni))  # CUDA's logf, as torch's log
                    packed = (_key(x + g).to(tl.uint64) << 32) | (ids ^ 0xFFFFFFFF).to(tl.uint64)
                    best = tl.maximum(best, tl.where(keep, packed, 0))
        slot = (ws + W_DRAW).to(tl.pointer_type(tl.uint64))
        tl.atomic_max(slot, tl.max(best, 0), sem="relaxed")
        done = tl.atomic_add(ws + W_DRAW + 1, 1, sem="acq_rel")
        if done == programs - 1:
            final = tl.atomic_max(slot, tl.zeros((), tl.uint64), sem="acq_rel")
            tl.store(OUT + b, ((final & 0xFFFFFFFF).to(tl.uint32) ^ 0xFFFFFFFF).to(tl.int64))


def _interpreted() -> bool:
    """Whether the kernels run under Triton's interpreter (TRITON_INTERPRET=1 when they were defined;
    ``ops.triton_decode`` patches the interpreter on import)."""
    from lessismore.ops import triton_decode

    return triton_decode.INTERPRETED


def _num_sms(device: torch.device) -> int:
    from lessismore.ops import triton_decode

    return triton_decode.num_sms(device)


def _run(logits, temperature, top_p, top_k, seed, counter, *, block=None, dense_block=None, programs=None,
         num_warps=None, waves=None, digits=None, dense=None, stages=None, launches=None):
    """Launch the passes and the draw; returns (tokens [B], workspace [B, W]). The keywords override
    the launch settings (tests, benchmarks/sampling.py); ``launches``, a list, receives a
    (name, relaunch) pair per kernel."""
    interpret = _interpreted()
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    rows, vocab = logits.shape
    if vocab >= 2**23:
        raise ValueError(f"logits: a vocabulary of {vocab} is over the 2**23 the fixed-point masses allow")
    temperature, top_p, top_k = temperature.contiguous(), top_p.contiguous(), top_k.contiguous()
    seed, counter = seed.contiguous(), counter.contiguous()
    block = block or min(_BLOCK, triton.next_power_of_2(vocab))
    dense_block = min(dense_block or _DENSE_BLOCK, block)
    num_warps = num_warps or _NUM_WARPS
    if programs is None:
        sms = _num_sms(logits.device)
        if waves is None:
            programs = max(_ROW_PROGRAMS, -(-_SM_PROGRAMS * sms // rows))
        else:  # the older rule, for benchmarks/sampling.py --sweep: `waves` programs per SM in all
            programs = max(1, -(-waves * sms // rows))
    chunk = -(-vocab // min(programs, -(-vocab // block)))
    chunk = -(-chunk // block) * block
    programs = -(-vocab // chunk)
    digits, dense = digits or _DIGITS, _DENSE if dense is None else dense
    assert sum(digits) == 32
    hist_off, w_state, w_draw, width = _layout(digits)
    ws = torch.zeros(rows, width, dtype=torch.int64, device=logits.device)
    x = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)  # logit / T, written by the first kernel
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    grid = (rows, programs)
    common = dict(W=width, W_MAX=_W_MAX, STAGES=stages or _STAGES, num_warps=num_warps)
    params = (x, temperature, top_p, top_k, ws, vocab, chunk)
    def launch(name, fn):
        fn()
        if launches is not None:
            launches.append((name, fn))

    launch("max", lambda: _max_kernel[grid](logits, x, temperature, top_p, top_k, ws, vocab, logits.stride(0), chunk,
                                            W_DRAW=w_draw, BLOCK=block, **common))
    prev = (1, 0, 0)
    shift = 32
    for j, bits in enumerate(digits):
        shift -= bits
        kw = dict(PASS=j + 1, BITS=bits, SHIFT=shift, DENSE=j < dense, PREV_NB=prev[0], PREV_SHIFT=prev[1],
                  PREV_OFF=prev[2], H_OFF=hist_off[j], STATE=w_state, FRAC=_FRAC,
                  BLOCK=dense_block if j < dense else block, **common)
        launch(f"pass{j + 1}", lambda kw=kw: _pass_kernel[grid](*params, **kw))
        prev = (1 << bits, shift, hist_off[j])
    launch("draw", lambda: _draw_kernel[grid](
        x, temperature, top_p, top_k, seed, counter, ws, out, vocab, chunk, programs,
        LAST_NB=prev[0], LAST_SHIFT=prev[1], LAST_OFF=prev[2], NPASS=len(digits), STATE=w_state, W_DRAW=w_draw,
        INTERPRET=interpret, BLOCK=block, **common))
    return out, ws


def _sample_triton(logits, temperature, top_p, top_k, seed, counter):
    return _run(logits, temperature, top_p, top_k, seed, counter)[0]


def _triton_thresholds(logits, temperature, top_p, top_k, **kw):
    zeros = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
    _, ws = _run(logits, temperature, top_p, top_k, zeros, zeros, **kw)
    return ws[:, _layout(kw.get("digits") or _DIGITS)[2] + 4].clone()
