"""Full-distribution KL divergence between the policy and the reference, per row, from their two logit tensors.

With temperature T, per row:

    p = softmax(x / T), q = softmax(y / T),  KL(p || q) = sum_v p_v (log p_v - log q_v)

One pass per row with an online log-sum-exp for both distributions (running maxima m_p, m_q, sums S_p, S_q) and the
running sum B = sum_v e^(zp_v - m_p) ((zp_v - m_p) - (zq_v - m_q)), all kept relative to the running maxima so that
large-magnitude logits do not cancel: KL = B / S_p - log S_p + log S_q. When a running maximum moves, B is rescaled:
B <- e^(m_p - m_p') (B + S_p ((m_q' - m_q) - (m_p' - m_p))).
Gradient for the policy side only (the reference is a constant):

    dKL/dx_v = p_v (log p_v - log q_v - KL) / T

Entries where p_v = 0 (logit -inf) contribute nothing, also where q_v = 0 too; where p_v > 0 and q_v = 0 the KL is
+inf, as it should be. (The per-token estimators k1/k2/k3 from the sampled token's log-probs are elementwise PyTorch:
``minirlhf/ppo.py: kl_estimate``.)

Shapes: ``logits``, ``ref_logits``: (..., V) any float dtype (same shape), ``mask``: (...) bool/int/float, rows where it
is 0 give 0 and a zero gradient; returns fp32 (...). The gradient to ``logits`` has the logits' dtype.

Limits: the reference side never gets a gradient; V up to 2^31 - 1; rows are addressed with int64. ``full_kl`` for two
hidden-state tensors and heads is not here: compute both models' logits per chunk of rows and call ``full_kl`` on each
chunk, as ``train_ppo.py: exact_kl`` does (``--exact-kl``).

Test: ``python -m pytest tests/test_kernel_kl.py`` (CPU: Triton interpreter, fp32).
"""
import torch
import triton
import triton.language as tl

from kernels._common import use_triton
from kernels._logprob_common import as_rows, live_rows, mask_rows, tile_shape


# ----------------------------------------------------------------------------------------------------------------------
# reference (the spec): plain PyTorch, fp32 math

def reference(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(softmax(logits/T) || softmax(ref_logits/T)) per row, fp32; gradient to ``logits`` only."""
    x, y = logits.float(), ref_logits.detach().float()
    if mask is not None:  # masked rows may hold anything (-inf everywhere): compute them on zeros, then zero them
        keep = mask.bool().unsqueeze(-1)
        x, y = torch.where(keep, x, 0.0), torch.where(keep, y, 0.0)
    logp = torch.log_softmax(x / temperature, dim=-1)
    logq = torch.log_softmax(y / temperature, dim=-1)
    live = logp > -float("inf")  # p_v = 0 contributes 0, also where q_v = 0 (no -inf - -inf = nan)
    diff = torch.where(live, logp, 0.0) - torch.where(live, logq, 0.0)
    kl = (logp.exp() * diff).sum(-1)
    if mask is not None:
        kl = torch.where(mask.bool(), kl, 0.0)
    return kl


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels

@triton.jit
def _full_kl_fwd_kernel(
    x_ptr, y_ptr, mask_ptr,                  # policy logits, reference logits (rows of V), row mask
    kl_ptr, lse_p_ptr, lse_q_ptr,            # outputs per row (fp32); the two lse are kept for the backward
    n_rows, n_cols, rows_per_batch,
    stride_xb, stride_xr, stride_yb, stride_yr,
    inv_temp,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    keep = live_rows(mask_ptr, rows, row_ok, HAS_MASK)
    b, r_ = rows // rows_per_batch, rows % rows_per_batch
    x_off = b * stride_xb + r_ * stride_xr
    y_off = b * stride_yb + r_ * stride_yr
    lim = tl.where(keep, n_cols, 0)  # masked rows are never read
    n_iter = tl.where(tl.max(keep.to(tl.int32), 0) > 0, tl.cdiv(n_cols, BLOCK_V), 0)
    mp = tl.full((BLOCK_N,), -1e30, tl.float32)  # finite start: e^(m - m') never sees -inf - -inf
    mq = tl.full((BLOCK_N,), -1e30, tl.float32)
    sp = tl.zeros((BLOCK_N,), tl.float32)
    sq = tl.zeros((BLOCK_N,), tl.float32)
    bb = tl.zeros((BLOCK_N,), tl.float32)
    for i in range(0, n_iter):
        cols = i * BLOCK_V + tl.arange(0, BLOCK_V)
        ld = cols[None, :] < lim[:, None]
        zp = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=ld, other=-float("inf")).to(tl.float32) * inv_temp
        zq = tl.load(y_ptr + y_off[:, None] + cols[None, :], mask=ld, other=-float("inf")).to(tl.float32) * inv_temp
        mp_new = tl.maximum(mp, tl.max(zp, 1))
        mq_new = tl.maximum(mq, tl.max(zq, 1))
        ap = tl.exp(mp - mp_new)
        aq = tl.exp(mq - mq_new)
        ep = tl.exp(zp - mp_new[:, None])
        eq = tl.exp(zq - mq_new[:, None])
        t = tl.where(zp > -float("inf"), (zp - mp_new[:, None]) - (zq - mq_new[:, None]), 0.0)
        bb = ap * (bb + sp * ((mq_new - mq) - (mp_new - mp))) + tl.sum(ep * t, 1)
        sp = sp * ap + tl.sum(ep, 1)
        sq = sq * aq + tl.sum(eq, 1)
        mp = mp_new
        mq = mq_new
    log_sp = tl.log(sp)
    log_sq = tl.log(sq)
    tl.store(kl_ptr + rows, tl.where(keep, bb / sp - log_sp + log_sq, 0.0), mask=row_ok)
    tl.store(lse_p_ptr + rows, tl.where(keep, mp + log_sp, 0.0), mask=row_ok)
    tl.store(lse_q_ptr + rows, tl.where(keep, mq + log_sq, 0.0), mask=row_ok)


@triton.jit
def _full_kl_bwd_kernel(
    x_ptr, y_ptr, mask_ptr, kl_ptr, lse_p_ptr, lse_q_ptr, grad_kl_ptr, dx_ptr,
    n_rows, n_cols, rows_per_batch,
    stride_xb, stride_xr, stride_yb, stride_yr, stride_dx,
    inv_temp,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    keep = live_rows(mask_ptr, rows, row_ok, HAS_MASK)
    b, r_ = rows // rows_per_batch, rows % rows_per_batch
    ld = cols[None, :] < tl.where(keep, n_cols, 0)[:, None]
    g = tl.where(keep, tl.load(grad_kl_ptr + rows, mask=row_ok, other=0.0).to(tl.float32), 0.0)
    kl = tl.load(kl_ptr + rows, mask=row_ok, other=0.0)
    lse_p = tl.load(lse_p_ptr + rows, mask=row_ok, other=0.0)
    lse_q = tl.load(lse_q_ptr + rows, mask=row_ok, other=0.0)
    zp = tl.load(x_ptr + (b * stride_xb + r_ * stride_xr)[:, None] + cols[None, :], mask=ld,
                 other=-float("inf")).to(tl.float32) * inv_temp
    zq = tl.load(y_ptr + (b * stride_yb + r_ * stride_yr)[:, None] + cols[None, :], mask=ld,
                 other=0.0).to(tl.float32) * inv_temp
    logp = zp - lse_p[:, None]
    p = tl.exp(logp)
    d = tl.where(zp > -float("inf"), g[:, None] * p * (logp - (zq - lse_q[:, None]) - kl[:, None]) * inv_temp, 0.0)
    tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], d.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols[None, :] < n_cols))


# ----------------------------------------------------------------------------------------------------------------------
# launchers

def _full_kl_fwd(logits, ref_logits, temperature, mask):
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ")
    rows_shape = logits.shape[:-1]
    V = logits.shape[-1]
    x, n_rows, R, sxb, sxr = as_rows(logits)
    y, _, _, syb, syr = as_rows(ref_logits)
    m = mask_rows(mask, rows_shape, logits.device)
    kl = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    lse_p, lse_q = torch.empty_like(kl), torch.empty_like(kl)
    block_n, block = tile_shape(n_rows, V, logits.is_cuda)
    if n_rows:
        _full_kl_fwd_kernel[(triton.cdiv(n_rows, block_n),)](
            x, y, m if m is not None else kl, kl, lse_p, lse_q, n_rows, V, R, sxb, sxr, syb, syr, 1.0 / temperature,
            HAS_MASK=m is not None, BLOCK_N=block_n, BLOCK_V=block, num_warps=8)
    return kl.view(rows_shape), lse_p, lse_q, m


def _full_kl_bwd(logits, ref_logits, kl, lse_p, lse_q, m, grad_kl, temperature):
    V = logits.shape[-1]
    x, n_rows, R, sxb, sxr = as_rows(logits)
    y, _, _, syb, syr = as_rows(ref_logits)
    dx = torch.empty((n_rows, V), device=logits.device, dtype=logits.dtype)
    g = grad_kl.reshape(-1).contiguous()
    block_n, block = tile_shape(n_rows, V, logits.is_cuda)
    if n_rows:
        _full_kl_bwd_kernel[(triton.cdiv(n_rows, block_n), triton.cdiv(V, block))](
            x, y, m if m is not None else g, kl, lse_p, lse_q, g, dx, n_rows, V, R, sxb, sxr, syb, syr, dx.stride(0),
            1.0 / temperature, HAS_MASK=m is not None, BLOCK_N=block_n, BLOCK_V=block, num_warps=8)
    return dx.view(logits.shape)


# ----------------------------------------------------------------------------------------------------------------------
# autograd

class FullKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, temperature, mask):
        kl, lse_p, lse_q, m = _full_kl_fwd(logits, ref_logits, temperature, mask)
        ctx.save_for_backward(logits, ref_logits, kl, lse_p, lse_q, *(() if m is None else (m,)))
        ctx.temperature = temperature
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        logits, ref_logits, kl, lse_p, lse_q, *m = ctx.saved_tensors
        dx = _full_kl_bwd(logits, ref_logits, kl, lse_p, lse_q, m[0] if m else None, grad_kl, ctx.temperature)
        return dx, None, None, None


# ----------------------------------------------------------------------------------------------------------------------
# public function

def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, *, temperature: float = 1.0,
            mask: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """KL(softmax(logits/T) || softmax(ref_logits/T)) per row (fp32, shape logits.shape[:-1]); gradient to ``logits``
    only; rows where ``mask`` is 0 give 0."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if use_triton(impl, logits, ref_logits):
        return FullKLFunction.apply(logits, ref_logits.detach(), float(temperature), mask)
    return reference(logits, ref_logits, temperature, mask)
