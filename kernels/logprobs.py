"""Per-token log-probs (and entropy) of the sampled tokens, from logits: the RLHF hot path without N x V temporaries.

For each row (a position) with logits x (V values, any float dtype), target token t and temperature T:

    z = x / T,  lse = log sum_v e^z_v,  logp = z_t - lse,  H = -sum_v p_v log p_v = lse - sum_v p_v z_v

One pass per row with an online log-sum-exp over blocks of the vocabulary, all in fp32: running maximum m, running sum
S = sum e^(z - m) and A = sum e^(z - m) (z - m), rescaled by e^(m - m') when the maximum moves (A also gains
S (m - m')). Then lse = m + log S and H = log S - A / S; keeping A relative to m keeps large-magnitude logits
(|z| ~ 1e4) from cancelling in fp32. The running maximum starts at -1e30 (finite) so -inf logits (excluded tokens) give
e^(-inf) = 0 and never -inf - -inf. When there are few rows, a row is split across several programs (each writes its
partial (m, S, A)) and a small kernel merges them, M = max_j m_j, S = sum_j S_j e^(m_j - M),
A = sum_j e^(m_j - M) (A_j + S_j (m_j - M)). These statistics, their merge and the per-tile gradient below are
``kernels/_logprob_common.py``, shared with ``kernels/lm_head_logprobs.py``, whose cuBLAS path also runs this file's
kernels on its vocabulary chunks (``fwd_partials``, ``bwd_rows``).

Memory-bound details (wide rows, one row per program): the rows of an odd-V bf16 tensor start at any 2-byte boundary,
which keeps Triton from vectorising loads indexed from a row's start; the row kernels walk each row in blocks aligned to
16 bytes of the tensor instead, so every block inside the row is read (and its gradient written) in whole 16-byte
vectors without a mask, and only the two edge blocks are masked. They clamp -inf to a finite floor with one max, and
skip the entropy sums when the entropy is not asked for. Narrow rows (small V, and the CPU interpreter below 16k
columns) use 2-D tiles of several rows instead. On an H100 (benchmarks/RESULTS.md, N = 8192, V = 50257, bf16): forward
+ backward in 0.98 ms, 84% of the measured copy bandwidth, 7x torch eager (forward alone 90%); before the aligned
blocks, 66%.

Backward (one fused kernel, the logits are read once and the gradient written once), with g = dL/dlogp, h = dL/dH and
p_v = e^(z_v - lse):

    dlogp/dz_v = [v == t] - p_v
    dH/dz_v    = -p_v (z_v - sum_k p_k z_k) = -p_v (log p_v + H)
    dL/dx_v    = (g ([v == t] - p_v) - h p_v (log p_v + H)) / T

Masked rows (``mask == 0``: padding, the prompt, anything after EOS) are never read: they return 0 and get a zero
gradient, so they may hold anything, -inf included.

Shapes: logits (..., V) (2-D, or 3-D sliced in time such as logits[:, :-1] without a copy); targets (...) integer in
[0, V) (a target out of range on an unmasked row gives NaN in the Triton path, an error in the reference); mask (...)
bool/int/float. Returns fp32 (...): logp, or (logp, entropy) with ``return_entropy``. The gradient to the logits has
their dtype.

Limits: V < 2^31.

Test: ``python -m pytest tests/test_kernel_logprobs.py`` (CPU: Triton interpreter, fp32; GPU cases run where CUDA is).
Bench: ``python -m benchmarks.bench_logprobs`` (on a GPU; writes benchmarks/RESULTS.md).
"""
import torch
import triton
import triton.language as tl

from kernels._common import use_triton
from kernels._logprob_common import as_rows, bwd_row_inputs, dlogits, finish_rows, flat_grad, live_rows, \
    logprob_finish, mask_rows, merge_partials, num_sms, online_update, tile_shape


# ----------------------------------------------------------------------------------------------------------------------
# reference (the spec): plain PyTorch, fp32 math

def reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, mask: torch.Tensor | None = None):
    """(logp, entropy), fp32, differentiable; materialises fp32 copies of the logits."""
    z = logits.float() / temperature
    if mask is not None:  # masked rows may hold -inf everywhere: compute them on zeros, zero them after
        keep = mask.bool()
        z = torch.where(keep.unsqueeze(-1), z, 0.0)
        targets = torch.where(keep, targets, 0)
    logq = torch.log_softmax(z, dim=-1)
    logp = logq.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    live = logq > -float("inf")  # p = 0 contributes 0 to the entropy (not 0 * -inf)
    entropy = -(logq.exp() * torch.where(live, logq, 0.0)).sum(-1)
    if mask is not None:
        logp, entropy = torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0)
    return logp, entropy


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels

@triton.jit
def _logprob_fwd_kernel(
    x_ptr, tgt_ptr, mask_ptr,                 # logits rows, targets, row mask
    part_ptr, zt_ptr,                         # partial (m, S, A) [3, n_rows, n_parts] and target logit [n_rows]
    logp_ptr, ent_ptr, lse_ptr,               # outputs [n_rows] (FINISH only)
    n_rows, n_cols, col_offset, cols_per_part, part_offset, stride_part_k, stride_part_row,
    rows_per_batch, stride_xb, stride_xr,
    inv_temp,
    HAS_MASK: tl.constexpr, FINISH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # BLOCK_N rows per program
    part = tl.program_id(1)
    row_ok = rows < n_rows
    keep = live_rows(mask_ptr, rows, row_ok, HAS_MASK)
    row_off = (rows // rows_per_batch) * stride_xb + (rows % rows_per_batch) * stride_xr
    lo = part * cols_per_part
    hi = tl.minimum(lo + cols_per_part, n_cols)
    lim = tl.where(keep, hi, lo)  # masked rows are never read
    n_iter = tl.where(tl.max(keep.to(tl.int32), 0) > 0, tl.cdiv(hi - lo, BLOCK_V), 0)
    m = tl.full((BLOCK_N,), -1e30, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    for i in range(0, n_iter):
        cols = lo + i * BLOCK_V + tl.arange(0, BLOCK_V)
        z = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=cols[None, :] < lim[:, None],
                    other=-float("inf")).to(tl.float32) * inv_temp
        m, s, a = online_update(z, m, s, a)
    # the target logit, read once by the program whose columns hold it
    t = tl.load(tgt_ptr + rows, mask=row_ok, other=0).to(tl.int64) - col_offset
    has_t = (t >= lo) & (t < hi) & keep
    zt = tl.load(x_ptr + row_off + tl.where(has_t, t, 0), mask=has_t, other=0.0).to(tl.float32) * inv_temp
    if FINISH:
        zt = tl.where(has_t, zt, float("nan"))  # a target outside [0, V) on a live row: NaN, loudly
        finish_rows(m, s, a, zt, keep, rows, row_ok, logp_ptr, ent_ptr, lse_ptr)
    else:
        p = part_ptr + rows * stride_part_row + part_offset + part
        tl.store(p, m, mask=row_ok)
        tl.store(p + stride_part_k, s, mask=row_ok)
        tl.store(p + 2 * stride_part_k, a, mask=row_ok)
        tl.store(zt_ptr + rows, zt, mask=has_t)


@triton.jit
def _logprob_bwd_kernel(
    x_ptr, tgt_ptr, mask_ptr, lse_ptr, ent_ptr,  # logits rows (may be dx itself: in place), saved row stats
    glogp_ptr, gent_ptr,                         # incoming gradients
    dx_ptr,                                      # gradient rows (2-D, row stride stride_dx)
    n_rows, n_cols, col_offset, rows_per_batch, stride_xb, stride_xr, stride_dx,
    inv_temp,
    HAS_MASK: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    keep, g, h, lse, ent, t = bwd_row_inputs(rows, row_ok, col_offset, mask_ptr, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr,
                                              gent_ptr, HAS_MASK, HAS_GLOGP, HAS_GENT)
    row_off = (rows // rows_per_batch) * stride_xb + (rows % rows_per_batch) * stride_xr
    lim = tl.where(keep, n_cols, 0)
    z = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=cols[None, :] < lim[:, None],
                other=-float("inf")).to(tl.float32) * inv_temp
    d = dlogits(z, cols, t, g, h, lse, ent, inv_temp, HAS_GENT)
    tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], d.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols[None, :] < n_cols))


# One row per program, for wide rows on a GPU. The rows of an odd-V tensor start at any 2-byte boundary, so indexing
# from each row's start gives Triton no 16-byte alignment and it falls back to 2-byte loads and stores. These kernels
# instead walk each row in blocks aligned to 16 bytes of the whole tensor (VEC elements): a block entirely inside the
# row loads (and stores) whole vectors without a mask; only the row's first and last blocks take the masked path.
# (Working in base 2, exp2 of x log2(e)/T, saves a multiply per element but rounds large logits differently in the
# forward and the backward: a one-hot row then gets a non-zero entropy gradient; so natural units, as everywhere else.)

@triton.jit
def _fold_block(x_ptr, idx, lo_abs, hi_abs, inv_temp, m, s, a, MASKED: tl.constexpr, NEED_ENT: tl.constexpr):
    """Fold x[idx] (absolute indices; only lo_abs <= idx < hi_abs when MASKED) into a row's running (m, S, A)."""
    if MASKED:
        x = tl.load(x_ptr + idx, mask=(idx >= lo_abs) & (idx < hi_abs), other=-float("inf"))
    else:
        x = tl.load(x_ptr + idx)
    # -inf (an excluded token) -> a finite floor: e = 0 and e * (z - m) = 0, one max instead of a compare and a select
    z = tl.maximum(x.to(tl.float32) * inv_temp, -3e38, propagate_nan=tl.PropagateNan.ALL)
    m_new = tl.maximum(m, tl.max(z, 0))
    alpha = tl.exp(m - m_new)
    zc = z - m_new
    e = tl.exp(zc)
    if NEED_ENT:
        a = alpha * (a + s * (m - m_new)) + tl.sum(e * zc, 0)
    s = s * alpha + tl.sum(e, 0)
    return m_new, s, a


@triton.jit
def _logprob_fwd_row_kernel(
    x_ptr, tgt_ptr, mask_ptr, part_ptr, zt_ptr, logp_ptr, ent_ptr, lse_ptr,  # as _logprob_fwd_kernel
    n_cols, col_offset, cols_per_part, part_offset, stride_part_k, stride_part_row,
    rows_per_batch, stride_xb, stride_xr,
    inv_temp,
    HAS_MASK: tl.constexpr, FINISH: tl.constexpr, NEED_ENT: tl.constexpr, VEC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    keep = True
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    row_start = (row // rows_per_batch) * stride_xb + (row % rows_per_batch) * stride_xr
    lo = part * cols_per_part
    hi = tl.minimum(lo + cols_per_part, n_cols)
    lo_abs = row_start + lo
    hi_abs = row_start + hi
    first = (lo_abs // VEC) * VEC  # 16-byte aligned in the tensor
    n_iter = tl.where(keep, tl.cdiv(hi_abs - first, BLOCK_V), 0)  # masked rows are never read
    m = -1e30
    s = 0.0
    a = 0.0
    for i in range(0, n_iter):
        start = first + i * BLOCK_V
        idx = start + tl.arange(0, BLOCK_V)
        if (start >= lo_abs) & (start + BLOCK_V <= hi_abs):
            m, s, a = _fold_block(x_ptr, idx, lo_abs, hi_abs, inv_temp, m, s, a, False, NEED_ENT)
        else:
            m, s, a = _fold_block(x_ptr, idx, lo_abs, hi_abs, inv_temp, m, s, a, True, NEED_ENT)
    t = tl.load(tgt_ptr + row).to(tl.int64) - col_offset
    has_t = (t >= lo) & (t < hi) & keep
    zt = tl.load(x_ptr + row_start + tl.where(has_t, t, 0)).to(tl.float32) * inv_temp
    if FINISH:
        zt = tl.where(has_t, zt, float("nan"))  # a target outside [0, V) on a live row: NaN, loudly
        logp, ent, lse = logprob_finish(m, s, a, zt, keep)
        tl.store(logp_ptr + row, logp)
        tl.store(ent_ptr + row, ent)
        tl.store(lse_ptr + row, lse)
    else:
        p = part_ptr + row * stride_part_row + part_offset + part
        tl.store(p, m)
        tl.store(p + stride_part_k, s)
        tl.store(p + 2 * stride_part_k, a)
        tl.store(zt_ptr + row, zt, mask=has_t)


@triton.jit
def _dlogits_block(x_ptr, dx_ptr, x_idx, dx_idx, cols, n_live, n_cols, t, g, h, lse, ent, inv_temp,
                   MASKED: tl.constexpr, HAS_GENT: tl.constexpr):
    """dL/dx for one block of a row; loads only cols < n_live (0 on a masked row), stores cols < n_cols."""
    if MASKED:
        x = tl.load(x_ptr + x_idx, mask=(cols >= 0) & (cols < n_live), other=-float("inf"))
    else:
        x = tl.load(x_ptr + x_idx)
    z = x.to(tl.float32) * inv_temp
    logq = z - lse  # natural units, as the forward computed lse: exactly 0 for a one-hot row
    p = tl.exp(logq)
    d = g * (tl.where(cols == t, 1.0, 0.0) - p)
    if HAS_GENT:
        d -= tl.where(z > -float("inf"), h * p * (logq + ent), 0.0)
    d = (d * inv_temp).to(dx_ptr.dtype.element_ty)
    if MASKED:
        tl.store(dx_ptr + dx_idx, d, mask=(cols >= 0) & (cols < n_cols))
    else:
        tl.store(dx_ptr + dx_idx, d)


@triton.jit
def _logprob_bwd_row_kernel(
    x_ptr, tgt_ptr, mask_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, dx_ptr,
    n_cols, col_offset, rows_per_batch, stride_xb, stride_xr, stride_dx,
    inv_temp,
    HAS_MASK: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr,
    SAME_LAYOUT: tl.constexpr, VEC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    keep, g, h, lse, ent, t = bwd_row_inputs(row, row >= 0, col_offset, mask_ptr, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr,
                                              gent_ptr, HAS_MASK, HAS_GLOGP, HAS_GENT)
    dx_row = row * stride_dx
    start = (dx_row // VEC) * VEC + j * BLOCK_V  # blocks aligned to 16 bytes of dx
    c0 = start - dx_row                          # column of the block's first element (< 0 in the first block)
    cols = c0 + tl.arange(0, BLOCK_V)
    dx_idx = start + tl.arange(0, BLOCK_V)
    if SAME_LAYOUT:  # x rows sit where dx rows do (contiguous logits, or in place): the loads are aligned too
        x_idx = dx_idx
    else:
        x_idx = (row // rows_per_batch) * stride_xb + (row % rows_per_batch) * stride_xr + cols
    n_live = tl.where(keep, n_cols, 0)
    if (c0 >= 0) & (c0 + BLOCK_V <= n_live):
        _dlogits_block(x_ptr, dx_ptr, x_idx, dx_idx, cols, n_live, n_cols, t, g, h, lse, ent, inv_temp,
                       False, HAS_GENT)
    else:
        _dlogits_block(x_ptr, dx_ptr, x_idx, dx_idx, cols, n_live, n_cols, t, g, h, lse, ent, inv_temp,
                       True, HAS_GENT)


# ----------------------------------------------------------------------------------------------------------------------
# launchers (also used by kernels/lm_head_logprobs.py on its vocabulary chunks)

# (forward BLOCK_V, forward num_warps, backward BLOCK_V, backward num_warps) on a GPU; see benchmarks/RESULTS.md (the
# benchmark sweeps others by calling TokenLogprobsFunction with them)
GPU_TILES = (4096, 4, 1024, 4)


def _row_kernels(x, n_rows, n_cols, block_n) -> bool:
    """Use the one-row-per-program kernels: wide rows (on a GPU, when a tile holds one row; under the interpreter,
    rows wider than 16384 so that the CPU tests run them too)."""
    return block_n == 1 if x.is_cuda else n_cols > 16384


def _fwd_launch(x, n_rows, R, sxb, sxr, n_cols, col_offset, t, m, part, part_offset, zt, outs, inv_temp, n_parts,
                finish, need_ent, tiles):
    """Launch the forward over columns [0, n_cols) of the row view x split into ``n_parts`` parts; returns the number of
    parts actually used. ``finish``: write logp, entropy, lse to ``outs``; else partials to ``part``."""
    block_n, block = tile_shape(n_rows, n_cols, x.is_cuda, tiles[0])
    cols_per_part = triton.cdiv(triton.cdiv(n_cols, n_parts), block) * block
    n_parts = triton.cdiv(n_cols, cols_per_part)
    logp, ent, lse = outs
    sp0, sp1 = (part.stride(0), part.stride(1)) if part.dim() == 3 else (0, 0)
    args = (x, t, m if m is not None else t, part, zt, logp, ent, lse)
    flags = dict(HAS_MASK=m is not None, FINISH=finish, BLOCK_V=block, num_warps=tiles[1])
    if _row_kernels(x, n_rows, n_cols, block_n):
        _logprob_fwd_row_kernel[(n_rows, n_parts)](
            *args, n_cols, col_offset, cols_per_part, part_offset, sp0, sp1, R, sxb, sxr,
            inv_temp, NEED_ENT=need_ent, VEC=16 // x.element_size(), **flags)
    else:
        _logprob_fwd_kernel[(triton.cdiv(n_rows, block_n), n_parts)](
            *args, n_rows, n_cols, col_offset, cols_per_part, part_offset, sp0, sp1, R, sxb, sxr,
            inv_temp, BLOCK_N=block_n, **flags)
    return n_parts


def fwd_partials(x, n_rows, R, sxb, sxr, n_cols, col_offset, t, m, part, part_offset, zt, inv_temp, n_parts_here,
                 tiles=GPU_TILES):
    """Partial (m, S, A) of columns [0, n_cols) of the row view x (vocabulary ids col_offset + j), split into
    ``n_parts_here`` parts written to columns part_offset.. of ``part``; the target logit goes to ``zt``."""
    return _fwd_launch(x, n_rows, R, sxb, sxr, n_cols, col_offset, t, m, part, part_offset, zt, (zt,) * 3,
                       inv_temp, n_parts_here, False, True, tiles)


def _logprob_fwd(logits, targets, mask, temperature, tiles=GPU_TILES, need_ent=True):
    rows_shape = logits.shape[:-1]
    if tuple(targets.shape) != tuple(rows_shape):
        raise ValueError(f"targets shape {tuple(targets.shape)} must be logits.shape[:-1] = {tuple(rows_shape)}")
    t = targets.reshape(-1).contiguous()
    m = mask_rows(mask, rows_shape, logits.device)
    V = logits.shape[-1]
    x, n_rows, R, sxb, sxr = as_rows(logits)
    inv_temp = 1.0 / temperature
    block_n, block = tile_shape(n_rows, V, logits.is_cuda, tiles[0])
    n_parts = 1
    if logits.is_cuda:  # few rows: split each row over several programs to fill the GPU, then merge
        n_parts = max(1, min(triton.cdiv(V, block), triton.cdiv(4 * num_sms(logits.device.index or 0), max(n_rows, 1))))
    if n_parts == 1:
        logp, ent, lse = (torch.empty(n_rows, device=logits.device, dtype=torch.float32) for _ in range(3))
        if n_rows:
            _fwd_launch(x, n_rows, R, sxb, sxr, V, 0, t, m, logp, 0, logp, (logp, ent, lse), inv_temp, 1, True,
                        need_ent, tiles)
    else:
        part = torch.empty((3, n_rows, n_parts), device=logits.device, dtype=torch.float32)
        zt = torch.full((n_rows,), float("nan"), device=logits.device, dtype=torch.float32)
        n_parts = fwd_partials(x, n_rows, R, sxb, sxr, V, 0, t, m, part, 0, zt, inv_temp, n_parts, tiles)
        logp, ent, lse = merge_partials(part, n_parts, zt, m)
    return logp, ent, lse, t, m


def bwd_rows(x, n_rows, R, sxb, sxr, n_cols, col_offset, dx, t, m, lse, ent, g_logp, g_ent, inv_temp,
             tiles=GPU_TILES):
    """Gradient of the rows' logits (columns [0, n_cols) of x, vocabulary ids col_offset + j) into dx (2-D, may be x)."""
    block_n, block = tile_shape(n_rows, n_cols, x.is_cuda, tiles[2])
    if n_rows == 0 or n_cols == 0:
        return
    args = (x, t, m if m is not None else t, lse, ent, g_logp if g_logp is not None else lse,
            g_ent if g_ent is not None else lse, dx)
    flags = dict(HAS_MASK=m is not None, HAS_GLOGP=g_logp is not None, HAS_GENT=g_ent is not None,
                 BLOCK_V=block, num_warps=tiles[3])
    if _row_kernels(x, n_rows, n_cols, block_n):
        vec = 16 // dx.element_size()
        same = x.data_ptr() == dx.data_ptr() or (x.element_size() == dx.element_size() and sxr == dx.stride(0)
                                                 and (R == n_rows or sxb == R * sxr))  # a 2-D x, or no batch gaps
        _logprob_bwd_row_kernel[(n_rows, triton.cdiv(n_cols + vec - 1, block))](
            *args, n_cols, col_offset, R, sxb, sxr, dx.stride(0), inv_temp,
            SAME_LAYOUT=same and x.data_ptr() % 16 == dx.data_ptr() % 16, VEC=vec, **flags)
    else:
        _logprob_bwd_kernel[(triton.cdiv(n_rows, block_n), triton.cdiv(n_cols, block))](
            *args, n_rows, n_cols, col_offset, R, sxb, sxr, dx.stride(0), inv_temp, BLOCK_N=block_n, **flags)


# ----------------------------------------------------------------------------------------------------------------------
# autograd

class TokenLogprobsFunction(torch.autograd.Function):
    """The Triton path with its launch plan as arguments: ``tiles`` as ``GPU_TILES``, which ``token_logprobs`` passes
    (``benchmarks/bench_logprobs.py`` sweeps others here); ``need_ent``: compute the entropy too."""

    @staticmethod
    def forward(ctx, logits, targets, mask, temperature, tiles, need_ent):
        ctx.set_materialize_grads(False)
        logp, ent, lse, t, m = _logprob_fwd(logits, targets, mask, temperature, tiles, need_ent)
        if not need_ent:  # not computed (the kernel skips its sums): no gradient can come through it
            ctx.mark_non_differentiable(ent)
        ctx.tiles = tiles
        ctx.save_for_backward(logits, t, lse, ent, *(() if m is None else (m,)))
        ctx.temperature = temperature
        rows_shape = logits.shape[:-1]
        return logp.view(rows_shape), ent.view(rows_shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, t, lse, ent, *m = ctx.saved_tensors
        g_logp, g_ent = flat_grad(g_logp), flat_grad(g_ent)
        dx = None
        if ctx.needs_input_grad[0] and not (g_logp is None and g_ent is None):
            x, n_rows, R, sxb, sxr = as_rows(logits)
            V = logits.shape[-1]
            dx = torch.empty((n_rows, V), device=logits.device, dtype=logits.dtype)
            bwd_rows(x, n_rows, R, sxb, sxr, V, 0, dx, t, m[0] if m else None, lse, ent, g_logp, g_ent,
                      1.0 / ctx.temperature, ctx.tiles)
            dx = dx.view(logits.shape)
        return dx, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------------
# public function

def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   mask: torch.Tensor | None = None, return_entropy: bool = False,
                   impl: str = "auto"):
    """log softmax(logits / temperature)[target] per row, fp32, shape logits.shape[:-1]; gradient to the logits.

    ``return_entropy``: also the entropy of softmax(logits / temperature). Rows where ``mask`` is 0 give 0 and no
    gradient. Returns logp, or (logp, entropy)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if use_triton(impl, logits, targets):
        logp, ent = TokenLogprobsFunction.apply(logits, targets, mask, float(temperature), GPU_TILES, return_entropy)
    else:
        logp, ent = reference(logits, targets, temperature, mask)
    return (logp, ent) if return_entropy else logp
