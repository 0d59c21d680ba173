"""Causal attention for training and prefill, FlashAttention-2 style, with key padding for left-padded batches.

What it computes
    q (B, H, Tq, D), k and v (B, H, Tk, D) with Tq <= Tk. Queries are aligned to the END of the keys ("bottom-right"
    causal): query i sits at absolute position ``Tk - Tq + i``. ``key_start`` (B,) int counts the left-pad slots of each
    row (None = no padding). Query i of row b may see key j iff

        key_start[b] <= j <= Tk - Tq + i

    and  out[i] = sum_j softmax_j(scale * q_i . k_j) v_j  over the keys it may see (scale = 1/sqrt(D) by default).
    A query that sees no key (a padded query row) outputs exactly 0 and passes zero gradient; so does every key that
    no query sees. The output has q's dtype.

The math (FlashAttention-2, Dao 2023)
    Forward: one program per (batch*head, block of BLOCK_M queries) walks the key blocks it may see, keeping the
    running row max m, the running denominator l and the unnormalised output acc ("online softmax"):
        m' = max(m, rowmax(s)),  p = exp(s - m'),  l' = l e^(m-m') + rowsum(p),  acc' = acc e^(m-m') + p v.
    It writes out = acc / l and the log-sum-exp lse = m + log(l) per query (+inf for a query that sees no key); the
    T x T score matrix never exists in memory. Exponentials are taken base 2 with log2(e) folded into the scale.
    Backward: with delta_i = sum_d out_id dout_id (a small preprocessing kernel) and p recomputed from lse,
        dv = p^T dout,   dp = dout v^T,   ds = p (dp - delta),   dq = scale ds k,   dk = scale ds^T q.
    One launch computes both: program n does dk, dv of key block n (looping over the query blocks that see it) and dq
    of query block n (looping over the key blocks it sees). Key block n has less work the later it is, query block n
    more, so the pairs are balanced. No atomics.
    Block skipping: the key blocks before the one holding ``key_start`` are skipped; only the blocks on the causal
    diagonal get a 2-D mask; the others see the padding as a per-key bias (0 or -inf) folded into the scaling. Queries are scheduled heaviest block first.

Shapes and limits
    D a power of two from 16 to 128 (GPT-2: 64); any Tq, Tk (not only multiples of the block); fp32, fp16 or bf16
    inputs with fp32 accumulation (fp32 inputs use full-precision "ieee" dots on the GPU, not tf32); strides are free
    except that the last dimension must be contiguous (copied otherwise). The CPU interpreter (TRITON_INTERPRET=1)
    runs fp32 only: tl.dot on bf16 is silently wrong there.

Measured (benchmarks/RESULTS.md, H100, bf16, GPT-2 heads, kernel time in a CUDA graph): fwd+bwd at 8 x 1024 in
0.19 ms, 1.66x SDPA's flash backend (2.1x with left padding, which flash cannot take); ~280 TFLOP/s forward.

Departures from the paper: the mask is a per-row key offset (left padding) combined with bottom-right causality, not a
dense mask; lse is saved in natural log. No dropout (the RLHF models run without it).

Test:  python -m pytest tests/test_kernel_attention.py -q          (CPU: interpreter, fp32; GPU: also bf16/fp16)
Bench: python -m benchmarks.bench_attention                       (needs a CUDA GPU; writes benchmarks/RESULTS.md)
"""
import math

import torch
import triton
import triton.language as tl

from kernels._attention_common import check_triton_inputs, dot_precision, key_start_arg, last_dim_contiguous
from kernels._common import use_triton

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E); host side
_LOG2E = tl.constexpr(LOG2E)  # the same inside kernels (they may only read constexpr globals)


# ---------------------------------------------------------------------------------------------------------------------
# Reference: plain PyTorch, fp32 math (float64 stays float64), the spec
# ---------------------------------------------------------------------------------------------------------------------

def allowed_mask(Tq: int, Tk: int, key_start=None, batch: int = 1, device=None) -> torch.Tensor:
    """Boolean (B, 1, Tq, Tk): True where query i may see key j (bottom-right causal, keys from key_start[b] on)."""
    i = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)  # absolute position of each query
    j = torch.arange(Tk, device=device)[None, :]
    allowed = (j <= i)[None, None]  # 1, 1, Tq, Tk
    if key_start is not None:
        ks = key_start.to(device=device, dtype=torch.long).view(-1, 1, 1, 1)
        allowed = allowed & (j[None, None] >= ks)  # B, 1, Tq, Tk
    return allowed.expand(batch if key_start is None else allowed.shape[0], 1, Tq, Tk)


def reference(q, k, v, key_start=None, sm_scale=None):
    """Masked causal attention in plain PyTorch (materialises the Tq x Tk scores); rows that see no key give 0."""
    B, H, Tq, D = q.shape  # batch, heads, queries, head dim
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    ct = torch.promote_types(q.dtype, torch.float32)  # fp32 math; float64 stays float64
    s = (q.to(ct) @ k.to(ct).transpose(-1, -2)) * scale  # B, H, Tq, Tk
    allowed = allowed_mask(Tq, Tk, key_start, B, q.device)  # B, 1, Tq, Tk
    row_any = allowed.any(-1, keepdim=True)  # B, 1, Tq, 1
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(~row_any, 0.0)  # empty rows: finite, zeroed below
    p = torch.softmax(s, dim=-1) * allowed  # exact zeros where masked, and on empty rows
    return (p @ v.to(ct)).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, q_pos, ks, lo, hi, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, KEY_PAD: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) with key blocks [lo, hi). MASK: the diagonal blocks (causal, padding
    and length masks on the tile). Otherwise every query of the tile sees every key of the block but the padding:
    KEY_PAD adds a per-key bias of 0 or -inf (folded into the scaling FMA, so the block stays a mask-free loop)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # key positions
        k_ptrs = k_base + cols[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
        if MASK:
            in_range = cols[:, None] < hi
            k = tl.load(k_ptrs, mask=in_range, other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # BLOCK_M, BLOCK_N
        if MASK:
            allowed = (cols[None, :] >= ks) & (cols[None, :] <= q_pos[:, None]) & (cols[None, :] < hi)
            s = tl.where(allowed, s * qk_scale, float("-inf"))  # log2 units
        elif KEY_PAD:
            s = s * qk_scale + tl.where(cols >= ks, 0.0, float("-inf"))[None, :]
        else:
            s = s * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK:
            v = tl.load(v_ptrs, mask=in_range, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_fwd_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, o_ptr, lse_ptr,
                      stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                      stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                      H, Tq, Tk, qk_scale,
                      HAS_KS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      DOT_PREC: tl.constexpr):
    bh = tl.program_id(0)
    start_m = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest (last) query block first
    b = bh // H
    h = bh % H
    ks = tl.maximum(tl.load(ks_ptr + b).to(tl.int32), 0) if HAS_KS else 0  # a negative start is 0, as in reference
    offset = Tk - Tq  # absolute position of query 0

    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < Tq
    q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q_pos = offset + rows

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked block keeps alpha = 1, p = 0
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # key blocks: skip those before the one holding key_start; [lo, diag) are fully visible (but for the padding),
    # [diag, hi) hold the causal diagonal
    p0 = offset + start_m * BLOCK_M  # position of the tile's first query
    lo = (ks // BLOCK_N) * BLOCK_N
    diag = tl.maximum((p0 // BLOCK_N) * BLOCK_N, lo)
    hi = tl.minimum(Tk, p0 + BLOCK_M)
    acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, q_pos, ks, lo, diag,
                                    qk_scale, HEAD_DIM, BLOCK_N, False, HAS_KS, DOT_PREC)
    acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, q_pos, ks, diag, hi,
                                    qk_scale, HEAD_DIM, BLOCK_N, True, HAS_KS, DOT_PREC)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # rows that saw no key: 0 / 1 = 0
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / _LOG2E, float("inf"))
    tl.store(o_base + rows[:, None] * stride_ot + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + bh.to(tl.int64) * Tq + rows, lse, mask=row_ok)


@triton.jit
def _flash_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt,
                            H, Tq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d out[b, h, i, d] * dout[b, h, i, d] (fp32)."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows[:, None] < Tq
    o = tl.load(o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_ot + offs_d[None, :],
                mask=row_ok, other=0.0)
    do = tl.load(do_ptr + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + rows[:, None] * stride_dt + offs_d[None, :],
                 mask=row_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + bh.to(tl.int64) * Tq + rows, delta, mask=rows < Tq)


@triton.jit
def _bwd_dkdv_query_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                           cols, ks, offset, Tq, lo, hi, qk_scale,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dk, dv of one key block (rows ``cols``) over query blocks [lo, hi). Scores are kept transposed
    (keys x queries). Queries past Tq load lse = +inf, so their p is exactly 0 without a mask."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < Tq
        q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * _LOG2E
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # BLOCK_N, BLOCK_M (log2 units)
        pT = tl.math.exp2(sT - lse[None, :])
        if MASK:
            allowed = (cols[:, None] >= ks) & (cols[:, None] <= offset + rows[None, :])
            pT = tl.where(allowed, pT, 0.0)
        do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # BLOCK_N, BLOCK_M
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dq_key_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, q_pos, ks, lo, hi, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, KEY_PAD: tl.constexpr,
                       DOT_PREC: tl.constexpr):
    """Accumulate dq of one query block over key blocks [lo, hi) (same block split and masks as the forward)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
        if MASK:
            in_range = cols[:, None] < hi
            k = tl.load(k_ptrs, mask=in_range, other=0.0)
            v = tl.load(v_ptrs, mask=in_range, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # BLOCK_M, BLOCK_N
        if KEY_PAD and not MASK:
            p = tl.math.exp2(s * qk_scale - lse[:, None] + tl.where(cols >= ks, 0.0, float("-inf"))[None, :])
        else:
            p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASK:
            allowed = (cols[None, :] >= ks) & (cols[None, :] <= q_pos[:, None]) & (cols[None, :] < hi)
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _flash_bwd_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
                      stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                      stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
                      stride_dkb, stride_dkh, stride_dkt,
                      H, Tq, Tk, sm_scale, qk_scale,
                      HAS_KS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
                      BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, DOT_PREC: tl.constexpr):
    bh = tl.program_id(0)
    pid = tl.program_id(1)
    b = bh // H
    h = bh % H
    ks = tl.maximum(tl.load(ks_ptr + b).to(tl.int32), 0) if HAS_KS else 0  # a negative start is 0, as in reference
    offset = Tk - Tq
    offs_d = tl.arange(0, HEAD_DIM)

    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    do_base = do_ptr + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    lse_base = lse_ptr + bh.to(tl.int64) * Tq
    delta_base = delta_ptr + bh.to(tl.int64) * Tq

    # ---- part 1: dk, dv of key block `pid` -------------------------------------------------------------------------
    n0 = pid * BLOCK_N1
    if n0 < Tk:
        cols = n0 + tl.arange(0, BLOCK_N1)
        col_ok = cols[:, None] < Tk
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=col_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=col_ok, other=0.0)
        dk = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
        # query blocks: from the first query that may see this block; masked while the tile overlaps the diagonal
        # (or always, if the block holds key_start); none at all if every key of the block is padding
        end = tl.cdiv(Tq, BLOCK_M1) * BLOCK_M1
        start = (tl.maximum(tl.maximum(n0, ks) - offset, 0) // BLOCK_M1) * BLOCK_M1
        start = tl.minimum(start, end)
        mask_end = tl.cdiv(tl.maximum(n0 + BLOCK_N1 - 1 - offset, 0), BLOCK_M1) * BLOCK_M1
        mask_end = tl.minimum(tl.maximum(mask_end, start), end)
        if n0 < ks:
            mask_end = end
        if n0 + BLOCK_N1 <= ks:
            mask_end = start
            end = start
        dk, dv = _bwd_dkdv_query_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                        cols, ks, offset, Tq, start, mask_end, qk_scale,
                                        HEAD_DIM, BLOCK_M1, True, DOT_PREC)
        dk, dv = _bwd_dkdv_query_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                        cols, ks, offset, Tq, mask_end, end, qk_scale,
                                        HEAD_DIM, BLOCK_M1, False, DOT_PREC)
        dk_base = dk_ptr + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
        dv_base = dv_ptr + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh  # dk, dv share a layout
        tl.store(dk_base + cols[:, None] * stride_dkt + offs_d[None, :], (dk * sm_scale).to(dk_ptr.dtype.element_ty),
                 mask=col_ok)
        tl.store(dv_base + cols[:, None] * stride_dkt + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=col_ok)

    # ---- part 2: dq of query block `pid` ---------------------------------------------------------------------------
    m0 = pid * BLOCK_M2
    if m0 < Tq:
        rows = m0 + tl.arange(0, BLOCK_M2)
        row_ok = rows < Tq
        q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * _LOG2E
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M2, HEAD_DIM], dtype=tl.float32)
        q_pos = offset + rows
        p0 = offset + m0
        lo = (ks // BLOCK_N2) * BLOCK_N2
        diag = tl.maximum((p0 // BLOCK_N2) * BLOCK_N2, lo)
        hi = tl.minimum(Tk, p0 + BLOCK_M2)
        dq = _bwd_dq_key_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, q_pos, ks, lo, diag,
                                qk_scale, HEAD_DIM, BLOCK_N2, False, HAS_KS, DOT_PREC)
        dq = _bwd_dq_key_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, q_pos, ks, diag, hi,
                                qk_scale, HEAD_DIM, BLOCK_N2, True, HAS_KS, DOT_PREC)
        dq_base = dq_ptr + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
        tl.store(dq_base + rows[:, None] * stride_dqt + offs_d[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty),
                 mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------

def _fwd_config(D: int, dtype: torch.dtype, on_gpu: bool) -> dict:
    """Block sizes for the forward. GPU bf16/fp16 values picked from a sweep on an H100
    (``benchmarks/bench_attention.py --sweep``); fp32 (full-precision dots on CUDA cores, a correctness path) uses
    small tiles (at D = 128 they still spill a few hundred bytes of registers, compiled for sm_90); the interpreter
    uses small tiles too (tiny test shapes, BLOCK_M != BLOCK_N)."""
    if not on_gpu:
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4 if D <= 64 else 8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)  # D = 64 and 128 alike


def _bwd_config(D: int, dtype: torch.dtype, on_gpu: bool) -> dict:
    """Block sizes for the backward: (BLOCK_M1 x BLOCK_N1) tiles for dk/dv, (BLOCK_M2 x BLOCK_N2) for dq."""
    if not on_gpu:
        return dict(BLOCK_M1=16, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M1=16, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=16, num_warps=4 if D <= 64 else 8, num_stages=2)
    if D <= 64:
        return dict(BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, num_warps=4, num_stages=3)


def _check_inputs(q, k, v, key_start):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Tq, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"k and v must be (B, H, Tk, D) matching q {tuple(q.shape)}; got {tuple(k.shape)}, {tuple(v.shape)}")
    if Tq > k.shape[2]:
        raise ValueError(f"need Tq <= Tk (queries are aligned to the end of the keys); got Tq={Tq}, Tk={k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_start is not None and (key_start.shape != (B,) or key_start.is_floating_point()):
        raise ValueError(f"key_start must be an integer tensor of shape ({B},); got {key_start.dtype} {tuple(key_start.shape)}")


def _flash_fwd(q, k, v, key_start, sm_scale, config=None):
    """Launch the forward. Returns out (B, H, Tq, D) in q's dtype and lse (B, H, Tq) fp32 (natural log)."""
    check_triton_inputs(q)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    cfg = dict(config or _fwd_config(D, q.dtype, q.is_cuda))
    o = torch.empty((B, H, Tq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)
    ks, has_ks = key_start_arg(key_start, q)
    grid = (B * H, triton.cdiv(Tq, cfg["BLOCK_M"]))
    _flash_fwd_kernel[grid](
        q, k, v, ks, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, Tq, Tk, sm_scale * LOG2E,
        HAS_KS=has_ks, HEAD_DIM=D, DOT_PREC=dot_precision(q.dtype), **cfg)
    return o, lse


def _flash_bwd(do, q, k, v, o, lse, key_start, sm_scale, config=None):
    """Launch the backward. Returns dq, dk, dv in the dtypes of q, k, v."""
    q, k, v, o, do = (last_dim_contiguous(t) for t in (q, k, v, o, do))
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    cfg = dict(config or _bwd_config(D, q.dtype, q.is_cuda))
    delta = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)
    block_delta = 64
    _flash_bwd_delta_kernel[(B * H, triton.cdiv(Tq, block_delta))](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, Tq, HEAD_DIM=D, BLOCK_M=block_delta)
    dq = torch.empty((B, H, Tq, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, H, Tk, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, H, Tk, D), device=q.device, dtype=v.dtype)
    ks, has_ks = key_start_arg(key_start, q)
    n_prog = max(triton.cdiv(Tk, cfg["BLOCK_N1"]), triton.cdiv(Tq, cfg["BLOCK_M2"]))
    _flash_bwd_kernel[(B * H, n_prog)](
        q, k, v, ks, do, lse, delta, dq, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
        H, Tq, Tk, sm_scale, sm_scale * LOG2E,
        HAS_KS=has_ks, HEAD_DIM=D, DOT_PREC=dot_precision(q.dtype), **cfg)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------------------

class FlashAttentionFunction(torch.autograd.Function):
    """Forward and backward through the Triton kernels; saves q, k, v, out and the log-sum-exp (no T x T matrix)."""

    @staticmethod
    def forward(ctx, q, k, v, key_start, sm_scale):
        o, lse = _flash_fwd(q, k, v, key_start, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse, key_start)
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_start = ctx.saved_tensors
        dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, key_start, ctx.sm_scale)
        return dq, dk, dv, None, None


# ---------------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------------

def flash_attention(q, k, v, key_start=None, *, sm_scale=None, impl="auto"):
    """Causal (bottom-right aligned) attention with per-row left padding; see the module docstring.

    q (B, H, Tq, D), k/v (B, H, Tk, D), Tq <= Tk; key_start (B,) int or None. Returns (B, H, Tq, D) in q's dtype.
    impl: "triton" | "torch" (the reference) | "auto" (Triton on CUDA tensors or under the interpreter).
    """
    _check_inputs(q, k, v, key_start)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if not use_triton(impl, q, k, v):
        return reference(q, k, v, key_start, scale)
    return FlashAttentionFunction.apply(q, k, v, key_start, scale)
