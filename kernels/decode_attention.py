"""Attention for cached decoding: a few new queries per sequence against the KV cache of a left-padded batch.

What it computes
    q (B, H, Tq, D) with small Tq (1 for token-by-token decoding; up to 64), k_cache and v_cache (B, H, S_max, D)
    preallocated, of which the first ``kv_len`` positions are filled (a python int shared by all rows; None = S_max).
    With Tk = kv_len the semantics are exactly those of ``kernels.flash_attention``: query i sits at position
    Tk - Tq + i and sees key j iff key_start[b] <= j <= Tk - Tq + i; a query that sees no key outputs 0. Forward only
    (decoding runs under torch.no_grad). Output dtype = q's dtype.

The math (flash-decoding, with stream-K shares)
    The work is reading the cache once (bytes = 2 * B * H * kv_len * D * itemsize): the kernel is bound by memory
    bandwidth, not by arithmetic. A row (b, h) runs the online softmax of flash attention over its keys, in blocks of
    BLOCK_N. With one program per row, a small batch leaves the GPU mostly idle (B = 2 gives 24 programs for 132
    SMs). So the launch takes P programs for the U = B*H*cdiv(kv_len, BLOCK_N) key blocks, laid out row after row,
    and gives program p the blocks [p*U // P, (p+1)*U // P) (the partition of stream-K, Osama et al. 2023): every
    program gets the same work whatever P is, a share can end in the middle of a row, and a row whose blocks span
    several shares is a "split" row. Each program that holds a piece of a split row writes its normalised partial
    output o_s and log-sum-exp lse_s (base 2, -inf for a piece with no visible key); the last of them to finish
    (counted with an atomic) merges the pieces:
        out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),   M = max_s lse_s.
    One launch in all. P = B*H is the plain kernel (program p = row p, output written directly); the launcher picks
    P (``_decode_plan``). The merge is not free, so it splits only until about half the SMs have a program.
    Measured (benchmarks/RESULTS.md, H100, GPT-2 heads, context 1024, kernel time in a CUDA graph): 96% of the copy
    bandwidth at B = 64; 65% at B = 8 (12.8 us for 25 MB, SDPA 13.5 us, one program per row), where a plain read of
    the same bytes in one launch reaches 86%: 96 programs on 132 SMs leave a quarter of the SMs idle, while rows cut
    into equal halves (192 programs) give some SMs two programs and others one. P = one program per SM balances the
    SMs exactly; the benchmark has that row ("ours, one program per SM"), not yet measured. The Python launch path
    costs tens of microseconds per call on the host, so token-by-token decoding at small batch is host-bound.

Shapes and limits: D a power of two from 16 to 128; Tq <= 64; fp32/fp16/bf16 with fp32 accumulation; the last
dimension of each tensor must be contiguous (copied otherwise). Under the CPU interpreter fp32 only.

Test:  python -m pytest tests/test_kernel_attention.py -q -k decode
Bench: python -m benchmarks.bench_attention
"""
import functools
import math

import torch
import triton
import triton.language as tl

from kernels._attention_common import check_triton_inputs, dot_precision, key_start_arg, last_dim_contiguous
from kernels._common import use_triton
from kernels.flash_attention import reference as flash_reference

LOG2E = 1.4426950408889634
MAX_QUERIES = 64  # new queries per row at most (the query tile is padded to 16 rows for the tensor cores)


# ---------------------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------------------

def reference(q, k_cache, v_cache, key_start=None, kv_len=None, sm_scale=None):
    """Plain PyTorch: flash attention's reference on the filled part of the cache."""
    L = k_cache.shape[2] if kv_len is None else kv_len
    return flash_reference(q, k_cache[:, :, :L], v_cache[:, :, :L], key_start, sm_scale)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _attend(q_ptr, k_ptr, v_ptr, ks_ptr, row, H, Tq, kv_len, lo, hi, qk_scale,
            stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
            HAS_KS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            DOT_PREC: tl.constexpr):
    """The queries of (batch, head) row ``row`` against its keys [lo, hi), lo a multiple of BLOCK_N: the online
    softmax of flash attention. Returns the normalised output (BLOCK_M, HEAD_DIM) fp32 and the log-sum-exp
    (BLOCK_M,) in base 2: -inf, with output 0, for a query that sees no key in the range."""
    b = row // H
    h = row % H
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
    for start_n in range(tl.maximum(lo, (ks // BLOCK_N) * BLOCK_N), hi, BLOCK_N):  # wholly padded blocks skipped
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
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def _store_row(o_ptr, row, H, Tq, out, stride_ob, stride_oh, stride_ot, HEAD_DIM: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """Write the Tq outputs (BLOCK_M, HEAD_DIM) of (batch, head) row ``row``."""
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o_base = o_ptr + (row // H).to(tl.int64) * stride_ob + (row % H).to(tl.int64) * stride_oh
    tl.store(o_base + rows[:, None] * stride_ot + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=rows[:, None] < Tq)


@triton.jit
def _owner(block, num_units, num_programs):
    """The program whose share [p * U // P, (p + 1) * U // P) of the U = num_units key blocks holds ``block``."""
    return (((block + 1) * tl.cast(num_programs, tl.int64) - 1) // num_units).to(tl.int32)


@triton.jit
def _merge(part_o_ptr, part_lse_ptr, row, Tq, num_segments, max_segments, HEAD_DIM: tl.constexpr,
           BLOCK_M: tl.constexpr):
    """Merge the num_segments partial outputs o_s of a row by their log-sum-exps (loaded with ".cg": from L2, never a
    stale L1 line, since other programs wrote them):
        out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),   M = max_s lse_s.
    Returns (BLOCK_M, HEAD_DIM) fp32."""
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    part = tl.cast(row, tl.int64) * max_segments * Tq + rows  # segment 0 of the workspace (B*H, S, Tq[, D])
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, num_segments):
        m = tl.maximum(m, tl.load(part_lse_ptr + part + s * Tq, mask=rows < Tq, other=0.0, cache_modifier=".cg"))
    m = tl.where(m == float("-inf"), 0.0, m)  # no segment saw a key: every weight is 0
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    out = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for s in range(0, num_segments):
        w = tl.math.exp2(tl.load(part_lse_ptr + part + s * Tq, mask=rows < Tq, other=float("-inf"),
                                 cache_modifier=".cg") - m)  # BLOCK_M
        o_s = tl.load(part_o_ptr + (part + s * Tq)[:, None] * HEAD_DIM + offs_d[None, :], mask=rows[:, None] < Tq,
                      other=0.0, cache_modifier=".cg")
        out += w[:, None] * o_s
        l += w
    return out / tl.where(l > 0.0, l, 1.0)[:, None]


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, o_ptr, part_o_ptr, part_lse_ptr, count_ptr,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                   H, Tq, kv_len, num_blocks, num_units, num_programs, max_segments, qk_scale,
                   HAS_KS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    if not SPLIT:  # one program per (batch, head) row, all of its keys
        out, lse = _attend(q_ptr, k_ptr, v_ptr, ks_ptr, pid, H, Tq, kv_len, 0, kv_len, qk_scale,
                           stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                           stride_vb, stride_vh, stride_vt, HAS_KS, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PREC)
        _store_row(o_ptr, pid, H, Tq, out, stride_ob, stride_oh, stride_ot, HEAD_DIM, BLOCK_M)
    else:
        # this program's share of the num_units = B*H*num_blocks key blocks taken row after row: a piece of one
        # row, the end of one row and the start of the next, or several whole rows
        first = (pid.to(tl.int64) * num_units // num_programs).to(tl.int32)
        last = ((pid + 1).to(tl.int64) * num_units // num_programs).to(tl.int32)
        for row in range(first // num_blocks, (last - 1) // num_blocks + 1):
            row_first = row * num_blocks
            lo = tl.maximum(first - row_first, 0) * BLOCK_N
            hi = tl.minimum(tl.minimum(last - row_first, num_blocks) * BLOCK_N, kv_len)
            out, lse = _attend(q_ptr, k_ptr, v_ptr, ks_ptr, row, H, Tq, kv_len, lo, hi, qk_scale,
                               stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                               stride_vb, stride_vh, stride_vt, HAS_KS, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PREC)
            owner = _owner(row_first, num_units, num_programs)  # the programs owner..last_owner share this row
            num_segments = _owner(row_first + num_blocks - 1, num_units, num_programs) - owner + 1
            if num_segments == 1:
                _store_row(o_ptr, row, H, Tq, out, stride_ob, stride_oh, stride_ot, HEAD_DIM, BLOCK_M)
            else:
                rows = tl.arange(0, BLOCK_M)
                # this program's piece of the row in the workspace (B*H, max_segments, Tq[, D])
                part = (tl.cast(row, tl.int64) * max_segments + (pid - owner)) * Tq + rows
                tl.store(part_o_ptr + part[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], out,
                         mask=rows[:, None] < Tq)
                tl.store(part_lse_ptr + part, lse, mask=rows < Tq)
                # the last of the row's programs to finish merges: count arrivals with an atomic whose release
                # (after a barrier: every thread's stores above) and acquire (before the loads below) order the
                # partial results between programs; the counter is left at zero for the next call
                tl.debug_barrier()
                arrived = tl.atomic_add(count_ptr + row, 1, sem="acq_rel")
                if arrived == num_segments - 1:
                    out = _merge(part_o_ptr, part_lse_ptr, row, Tq, num_segments, max_segments, HEAD_DIM, BLOCK_M)
                    _store_row(o_ptr, row, H, Tq, out, stride_ob, stride_oh, stride_ot, HEAD_DIM, BLOCK_M)
                    tl.atomic_xchg(count_ptr + row, 0)


# ---------------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _decode_plan(bh: int, kv_len: int, D: int, dtype: torch.dtype, sm_count) -> tuple:
    """(num_programs, config) for B*H = bh rows of kv_len keys: how many programs share the key blocks, and the block
    shape. sm_count None: the CPU interpreter (tiny tiles; it plans as for a 4-SM GPU).

    More programs than rows split rows, which uses more SMs but costs a merge (partials written, an atomic, a second
    read). Sweeps on an H100 (132 SMs, bf16, GPT-2 heads, 1024 keys; ``benchmarks/bench_attention.py --sweep decode``)
    with each row cut into equal splits put the balance at about half the SMs busy: B = 8 (bh = 96) unsplit 12.5 us,
    best split 13.9 us; B = 4 (bh = 48) 2 splits 9.7 us, 8 splits 10.4 us, unsplit 11.3 us. So: split only until
    half the SMs have a program (with at least two key blocks per split). Block shape: with at most one program per
    SM, each streams a long row alone and a deeper pipeline (128-key blocks, 3 stages) keeps more bytes in flight;
    with several per SM, 64-key blocks and 2 stages (B = 64: 70.1 us against 71.8 us). fp32 (full-precision dots on
    CUDA cores, a correctness path) uses small tiles that do not spill."""
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
    return bh * splits, cfg


_ARRIVALS = {}  # device -> int32 zeros: the merge's arrival counters (each left at zero after use)
_RETIRED = []  # counters replaced by a larger buffer, kept alive: a CUDA graph captured before may still use them


def _arrival_counters(device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least n counters, kept per device: the kernel resets what it used, so there is no
    memset per call, and a CUDA graph captured after a first (eager) call reuses the same buffer, allocated outside
    the capture. The price: two split calls running at the same time on one device (two streams, or two graphs
    replayed concurrently) would share counters and must not happen; minirlhf runs one stream."""
    buf = _ARRIVALS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # the zeroing would only be captured
            raise RuntimeError(f"decode_attention: run it once with these shapes ({n} rows) before capturing it in a "
                               "CUDA graph, so that its merge counters are allocated and zeroed outside the capture")
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _ARRIVALS[device] = buf
    return buf


def _decode_fwd(q, k_cache, v_cache, key_start, kv_len, sm_scale, num_programs=None, config=None):
    """Launch the kernel on num_programs programs (None: ``_decode_plan``). Returns (B, H, Tq, D)."""
    check_triton_inputs(q)
    q, k_cache, v_cache = (last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    B, H, Tq, D = q.shape
    sm = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) if q.is_cuda else None
    planned, cfg = _decode_plan(B * H, kv_len, D, q.dtype, sm)
    cfg = dict(config or cfg)
    block_n = cfg.pop("BLOCK_N")
    block_m = max(16, triton.next_power_of_2(Tq))
    o = torch.empty((B, H, Tq, D), device=q.device, dtype=q.dtype)
    if kv_len == 0:
        return o.zero_()
    num_blocks = triton.cdiv(kv_len, block_n)
    num_units = B * H * num_blocks  # key blocks in all, rows one after another
    num_programs = max(1, min(planned if num_programs is None else num_programs, num_units))
    split = num_programs != B * H  # else program p takes exactly row p
    # a row's num_blocks blocks meet at most this many programs' shares (each at least num_units // P long)
    max_segments = 1 + triton.cdiv(num_blocks - 1, num_units // num_programs) if split else 1
    if split:
        work = torch.empty(B * H * max_segments * Tq * (D + 1), device=q.device, dtype=torch.float32)
        part_o, part_lse = work[: B * H * max_segments * Tq * D], work[B * H * max_segments * Tq * D:]
        count = _arrival_counters(q.device, B * H)
    else:
        part_o = part_lse = count = o  # unused
    ks, has_ks = key_start_arg(key_start, q)
    _decode_kernel[(num_programs,)](
        q, k_cache, v_cache, ks, o, part_o, part_lse, count,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, Tq, kv_len, num_blocks, num_units, num_programs, max_segments, sm_scale * LOG2E,
        HAS_KS=has_ks, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=split,
        DOT_PREC=dot_precision(q.dtype), **cfg)
    return o


# ---------------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------------

def decode_attention(q, k_cache, v_cache, key_start=None, *, kv_len=None, sm_scale=None, impl="auto",
                     num_programs=None):
    """Attention of a few new queries against a left-padded KV cache (forward only); see the module docstring.

    q (B, H, Tq, D); k_cache/v_cache (B, H, S_max, D) of which the first kv_len positions are valid; key_start (B,)
    int or None. Returns (B, H, Tq, D) in q's dtype. num_programs: how many programs share the B*H rows' key blocks
    (None: ``_decode_plan`` decides; B*H: one row each; more: rows are split; fewer: a program takes several rows).
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
    if Tq > MAX_QUERIES:
        raise ValueError(f"decode_attention takes at most {MAX_QUERIES} queries per row (got {Tq}); use "
                         "flash_attention")
    return _decode_fwd(q, k_cache, v_cache, key_start, L, scale, num_programs)
