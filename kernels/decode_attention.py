"""Attention for cached decoding: a few new queries per sequence against the KV cache of a left-padded batch.

What it computes
    q (B, H, Tq, D) with small Tq (1 for token-by-token decoding; up to 64), k_cache and v_cache (B, H, S_max, D)
    preallocated, of which the first ``kv_len`` positions are filled (a python int shared by all rows; None = S_max).
    With Tk = kv_len the semantics are exactly those of ``kernels.flash_attention``: query i sits at position
    Tk - Tq + i and sees key j iff key_start[b] <= j <= Tk - Tq + i; a query that sees no key outputs 0. Forward only
    (decoding runs under torch.no_grad). Output dtype = q's dtype.

The math (flash-decoding)
    The work is reading the cache once (bytes = 2 * B * H * kv_len * D * itemsize): the kernel is bound by memory
    bandwidth, not by arithmetic. One program per (b, h) runs the online softmax of flash attention over the keys.
    When B*H is small the GPU would sit mostly idle (B = 2 gives 24 programs for 132 SMs), so the key range is split
    into num_splits chunks; program (b*h, split) writes its normalised partial output o_s and its log-sum-exp lse_s
    (base 2, -inf for a chunk with no visible key), and the last program of each (b, h) to finish (counted with an
    atomic) loads all of them at once and merges them:
        out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),   M = max_s lse_s.
    One launch in all; unsplit, the kernel writes the output directly. (A separate merge kernel, ``fused=False`` in
    the launcher, measured the same GPU time on an H100 but costs one more launch on the host.) The merge is not free,
    so the launcher splits only until about half the SMs have a program (``_decode_plan``).
    Measured (benchmarks/RESULTS.md, H100, GPT-2 heads, context 1024, kernel time in a CUDA graph): 96% of the copy
    bandwidth at B = 64; 65% at B = 8 (12.8 us for 25 MB, SDPA 13.5 us), where a plain read of the same bytes in one
    launch reaches 85%: at this size the latency of the softmax chain per key block weighs. The Python launch path
    costs tens of microseconds per call on the host, so token-by-token decoding at small batch is host-bound.

Shapes and limits: D a power of two from 16 to 128; Tq <= 64; fp32/fp16/bf16 with fp32 accumulation; the last
dimension of each tensor must be contiguous (copied otherwise). Under the CPU interpreter fp32 only.

Test:  python -m pytest tests/test_kernel_attention.py -q -k decode
Bench: python benchmarks/bench_attention.py
"""
import functools
import math

import torch
import triton
import triton.language as tl

from kernels._common import use_triton
from kernels.flash_attention import _check_triton_inputs, _dot_precision, _key_start_arg, _last_dim_contiguous
from kernels.flash_attention import reference as _flash_reference

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------------------

def reference(q, k_cache, v_cache, key_start=None, kv_len=None, sm_scale=None):
    """Plain PyTorch: flash attention's reference on the filled part of the cache."""
    L = k_cache.shape[2] if kv_len is None else kv_len
    return _flash_reference(q, k_cache[:, :, :L], v_cache[:, :, :L], key_start, sm_scale)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, o_ptr, part_o_ptr, part_lse_ptr, count_ptr,
                         stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                         stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                         H, Tq, kv_len, chunk, num_splits, qk_scale,
                         HAS_KS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         SPLIT: tl.constexpr, FUSED_COMBINE: tl.constexpr, BLOCK_S: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    ks = tl.load(ks_ptr + b).to(tl.int32) if HAS_KS else 0

    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=rows[:, None] < Tq, other=0.0)
    q_pos = kv_len - Tq + rows

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # this split's keys: [split * chunk, (split + 1) * chunk) within [key_start, kv_len); chunk is a multiple of BLOCK_N
    start = split * chunk
    hi = tl.minimum(start + chunk, kv_len)
    lo = tl.maximum(start, (ks // BLOCK_N) * BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_range = cols[:, None] < hi
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=in_range, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=in_range, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # BLOCK_M, BLOCK_N (log2 units)
        allowed = (cols[None, :] >= ks) & (cols[None, :] <= q_pos[:, None]) & (cols[None, :] < hi)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if not SPLIT:
        o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        tl.store(o_base + rows[:, None] * stride_ot + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=rows[:, None] < Tq)
    else:
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        part = (bh.to(tl.int64) * num_splits + split) * Tq + rows  # workspace (B*H, num_splits, Tq[, D])
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=rows[:, None] < Tq)
        tl.store(part_lse_ptr + part, lse, mask=rows < Tq)
        if FUSED_COMBINE:
            # the last split of this (batch, head) to finish merges them all: count arrivals with an atomic whose
            # release (after a barrier: every thread's stores above) and acquire (before the loads below) order
            # the partial results between programs; the counter is left at zero for the next call
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel")
            if arrived == num_splits - 1:
                o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                for row in range(0, Tq):
                    _combine_row(part_o_ptr, part_lse_ptr, o_base + row * stride_ot, bh, row, Tq, num_splits,
                                 HEAD_DIM, BLOCK_S)
                tl.atomic_xchg(count_ptr + bh, 0)


@triton.jit
def _combine_row(part_o_ptr, part_lse_ptr, o_row_ptr, bh, row, Tq, num_splits,
                 HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge the num_splits partial outputs of one query by their log-sum-exps, all loaded at once (".cg": from L2,
    never a stale L1 line, since other programs wrote them)."""
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = splits < num_splits
    part = (bh.to(tl.int64) * num_splits + splits) * Tq + row
    lse = tl.load(part_lse_ptr + part, mask=ok, other=float("-inf"), cache_modifier=".cg")  # BLOCK_S
    o_s = tl.load(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0,
                  cache_modifier=".cg")
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no split saw a key: every weight is 0
    w = tl.math.exp2(lse - m)
    l = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o_s, 0) / tl.where(l > 0.0, l, 1.0)
    tl.store(o_row_ptr + offs_d, out.to(o_row_ptr.dtype.element_ty))


@triton.jit
def _decode_combine_kernel(part_o_ptr, part_lse_ptr, o_ptr, stride_ob, stride_oh, stride_ot, H, Tq, num_splits,
                           HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """The unfused merge: one program per (batch*head, query)."""
    bh = tl.program_id(0)
    row = tl.program_id(1)
    b = bh // H
    h = bh % H
    o_row = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + row * stride_ot
    _combine_row(part_o_ptr, part_lse_ptr, o_row, bh, row, Tq, num_splits, HEAD_DIM, BLOCK_S)


# ---------------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _decode_plan(bh: int, kv_len: int, D: int, dtype: torch.dtype, sm_count) -> tuple:
    """(num_splits, config) for B*H = bh rows of kv_len keys: how to cut the work, and the block shape for it.
    sm_count None: the CPU interpreter (tiny tiles; it plans as for a 4-SM GPU).

    Splitting a row's keys over several programs uses more SMs but costs a merge (partials written, an atomic, a second
    read). Sweeps on an H100 (132 SMs, bf16, GPT-2 heads, 1024 keys; ``benchmarks/bench_attention.py --sweep decode``)
    put the balance at about half the SMs busy: B = 8 (bh = 96) unsplit 12.5 us, best split 13.9 us; B = 4 (bh = 48)
    2 splits 9.7 us, 8 splits 10.4 us, unsplit 11.3 us. So: split only until half the SMs have a program (with at
    least two key blocks per split). Block shape: with at most one program per SM, each streams a long row alone and a
    deeper pipeline (128-key blocks, 3 stages) keeps more bytes in flight; with several per SM, 64-key blocks and 2
    stages (B = 64: 70.1 us against 71.8 us). fp32 (full-precision dots on CUDA cores, a correctness path) uses small
    tiles that do not spill."""
    sm = 4 if sm_count is None else sm_count
    if sm_count is None:
        cfg = dict(BLOCK_N=16, num_warps=4, num_stages=1)
    elif dtype == torch.float32:
        cfg = dict(BLOCK_N=32, num_warps=4 if D <= 64 else 8, num_stages=2)
    elif bh >= sm:
        cfg = dict(BLOCK_N=64, num_warps=4, num_stages=2)
    else:
        cfg = dict(BLOCK_N=128, num_warps=4, num_stages=3)
    splits = 1 if 2 * bh >= sm else max(1, min(triton.cdiv(sm, 2 * bh), kv_len // (2 * cfg["BLOCK_N"])))
    return splits, cfg


_ARRIVALS = {}  # device -> int32 zeros: the fused merge's arrival counters (each left at zero after use)


def _arrival_counters(device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least n counters, kept per device (the kernel resets what it used, so no memset
    per call). Two decode calls running at once on two streams of one device must not share it: not supported."""
    buf = _ARRIVALS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _ARRIVALS[device] = buf
    return buf


def _decode_fwd(q, k_cache, v_cache, key_start, kv_len, sm_scale, num_splits=None, config=None, fused=True):
    """Launch the split kernel (and, with fused=False, the separate merge kernel). Returns (B, H, Tq, D)."""
    _check_triton_inputs(q)
    q, k_cache, v_cache = (_last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    B, H, Tq, D = q.shape
    sm = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) if q.is_cuda else None
    planned_splits, cfg = _decode_plan(B * H, kv_len, D, q.dtype, sm)
    cfg = dict(config or cfg)
    num_splits = planned_splits if num_splits is None else num_splits
    block_n = cfg.pop("BLOCK_N")
    block_m = max(16, triton.next_power_of_2(Tq))
    o = torch.empty((B, H, Tq, D), device=q.device, dtype=q.dtype)
    if kv_len == 0:
        return o.zero_()
    chunk = triton.cdiv(triton.cdiv(kv_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(kv_len, chunk)  # no trailing empty splits
    if num_splits > 1:
        work = torch.empty(B * H * num_splits * Tq * (D + 1), device=q.device, dtype=torch.float32)
        part_o, part_lse = work[: B * H * num_splits * Tq * D], work[B * H * num_splits * Tq * D:]
        count = _arrival_counters(q.device, B * H) if fused else o
    else:
        part_o = part_lse = count = o  # unused
    ks, has_ks = _key_start_arg(key_start, q)
    _decode_split_kernel[(B * H, num_splits)](
        q, k_cache, v_cache, ks, o, part_o, part_lse, count,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, Tq, kv_len, chunk, num_splits, sm_scale * LOG2E,
        HAS_KS=has_ks, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=num_splits > 1,
        FUSED_COMBINE=fused, BLOCK_S=triton.next_power_of_2(num_splits), DOT_PREC=_dot_precision(q.dtype), **cfg)
    if num_splits > 1 and not fused:
        _decode_combine_kernel[(B * H, Tq)](
            part_o, part_lse, o, o.stride(0), o.stride(1), o.stride(2), H, Tq, num_splits,
            HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=1 if num_splits <= 8 else 2)
    return o


# ---------------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------------

def decode_attention(q, k_cache, v_cache, key_start=None, *, kv_len=None, sm_scale=None, impl="auto", num_splits=None):
    """Attention of a few new queries against a left-padded KV cache (forward only); see the module docstring.

    q (B, H, Tq, D); k_cache/v_cache (B, H, S_max, D) of which the first kv_len positions are valid; key_start (B,)
    int or None. Returns (B, H, Tq, D) in q's dtype. num_splits: key-range splits (None: ``_decode_plan`` decides).
    impl: "triton" | "torch" (the reference) | "auto" (Triton on CUDA tensors or under the interpreter).
    """
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be (B, H, Tq, D) and the caches (B, H, S_max, D); got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, H, Tq, D = q.shape
    S_max = k_cache.shape[2]
    L = S_max if kv_len is None else int(kv_len)
    if k_cache.shape[:2] != (B, H) or k_cache.shape[3] != D:
        raise ValueError(f"caches {tuple(k_cache.shape)} do not match q {tuple(q.shape)}")
    if not (Tq <= L <= S_max):
        raise ValueError(f"need Tq <= kv_len <= S_max; got Tq={Tq}, kv_len={L}, S_max={S_max}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q and the caches must share a dtype; got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if key_start is not None and (key_start.shape != (B,) or key_start.is_floating_point()):
        raise ValueError(f"key_start must be an integer tensor of shape ({B},)")
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    if not use_triton(impl, q, k_cache, v_cache):
        return reference(q, k_cache, v_cache, key_start, L, scale)
    if Tq > 64:
        raise ValueError(f"decode_attention takes at most 64 queries per row (got {Tq}); use flash_attention")
    return _decode_fwd(q, k_cache, v_cache, key_start, L, scale, num_splits)
