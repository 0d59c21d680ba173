"""Pieces shared by the kernels that reduce rows of logits over the vocabulary: ``kernels/logprobs.py`` (from logits),
``kernels/lm_head_logprobs.py`` (from hidden states and the LM head) and, for the row helpers, ``kernels/kl.py``.

* Rows: a (..., V) tensor is read as rows without a copy (``as_rows``), a row mask is a flat tensor the kernels load
  (``mask_rows``, ``live_rows``: masked rows are never read), and one program's tile is BLOCK_N rows x BLOCK_V
  columns (``tile_shape``).
* The online log-sum-exp statistics of a row of fp32 logits z (see kernels/logprobs.py for the derivation): running
  maximum m, S = sum e^(z - m) and A = sum e^(z - m) (z - m), folded in tile by tile (``online_update``); partial
  statistics of several parts of a row merge as M = max_j m_j, S = sum_j S_j e^(m_j - M),
  A = sum_j e^(m_j - M) (A_j + S_j (m_j - M)) (``merge_stats``, ``merge_kernel``, launched by ``merge_partials``);
  then lse = m + log S, logp = z_t - lse, H = log S - A / S (``logprob_finish``).
* The backward of a tile of logits x (z = x / T): dL/dx_v = (g ([v == t] - p_v) - h p_v (log p_v + H)) / T with
  g = dL/dlogp, h = dL/dH (``bwd_row_inputs``, ``dlogits``).
"""
import functools

import torch
import triton
import triton.language as tl


# ----------------------------------------------------------------------------------------------------------------------
# Triton helpers

@triton.jit
def live_rows(mask_ptr, rows, row_ok, HAS_MASK: tl.constexpr):
    """The rows a program computes: in range and, with a row mask, not masked out."""
    keep = row_ok
    if HAS_MASK:
        keep = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
    return keep


@triton.jit
def online_update(z, m, s, a):
    """Fold a [rows, cols] tile of fp32 logits z (-inf where excluded) into the running (m, S, A) of each row."""
    m_new = tl.maximum(m, tl.max(z, 1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(z - m_new[:, None])
    zc = tl.where(z > -float("inf"), z - m_new[:, None], 0.0)
    a = alpha * (a + s * (m - m_new)) + tl.sum(e * zc, 1)
    s = s * alpha + tl.sum(e, 1)
    return m_new, s, a


@triton.jit
def merge_stats(m, s, a):
    """Merge [rows, parts] partial (m, S, A) into per-row values."""
    m_row = tl.max(m, 1)
    w = tl.exp(m - m_row[:, None])
    s_row = tl.sum(s * w, 1)
    a_row = tl.sum(w * (a + s * (m - m_row[:, None])), 1)
    return m_row, s_row, a_row


@triton.jit
def logprob_finish(m, s, a, zt, keep):
    """From the merged (m, S, A) and the target logit: logp, entropy, lse (0 where not ``keep``)."""
    log_s = tl.log(s)
    lse = m + log_s
    logp = tl.where(keep, zt - lse, 0.0)
    ent = tl.where(keep, log_s - a / s, 0.0)
    return logp, ent, tl.where(keep, lse, 0.0)


@triton.jit
def finish_rows(m, s, a, zt, keep, rows, row_ok, logp_ptr, ent_ptr, lse_ptr):
    """logprob_finish on a block of rows, and store the results."""
    logp, ent, lse = logprob_finish(m, s, a, zt, keep)
    tl.store(logp_ptr + rows, logp, mask=row_ok)
    tl.store(ent_ptr + rows, ent, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def merge_kernel(
    part_ptr, zt_ptr, mask_ptr, logp_ptr, ent_ptr, lse_ptr,
    n_rows, n_parts, stride_part_k, stride_part_row,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Merge the n_parts partial (m, S, A) of BLOCK_N rows ([3, n_rows, n_parts] at part_ptr) and finish the rows."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    ps = tl.arange(0, BLOCK_P)
    ld = row_ok[:, None] & (ps[None, :] < n_parts)
    offs = rows[:, None] * stride_part_row + ps[None, :]
    m_j = tl.load(part_ptr + offs, mask=ld, other=-1e30)
    s_j = tl.load(part_ptr + stride_part_k + offs, mask=ld, other=0.0)
    a_j = tl.load(part_ptr + 2 * stride_part_k + offs, mask=ld, other=0.0)
    m, s, a = merge_stats(m_j, s_j, a_j)
    keep = live_rows(mask_ptr, rows, row_ok, HAS_MASK)
    zt = tl.load(zt_ptr + rows, mask=row_ok, other=0.0)
    finish_rows(m, s, a, zt, keep, rows, row_ok, logp_ptr, ent_ptr, lse_ptr)


@triton.jit
def bwd_row_inputs(rows, row_ok, col_offset, mask_ptr, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr,
                   HAS_MASK: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr):
    """What the backward needs of each row (a block of rows, or one): keep (in range and not masked), the incoming
    gradients g (for logp) and h (for the entropy), 0 on masked rows, the saved lse and entropy, and the target's
    column within the vocabulary chunk that starts at col_offset."""
    keep = live_rows(mask_ptr, rows, row_ok, HAS_MASK)
    g = tl.zeros(rows.shape, tl.float32)
    if HAS_GLOGP:
        g += tl.load(glogp_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    h = tl.zeros(rows.shape, tl.float32)
    if HAS_GENT:
        h += tl.load(gent_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    t = tl.load(tgt_ptr + rows, mask=row_ok, other=0).to(tl.int64) - col_offset
    return keep, tl.where(keep, g, 0.0), tl.where(keep, h, 0.0), lse, ent, t


@triton.jit
def dlogits(z, cols, t, g, h, lse, ent, inv_temp, HAS_GENT: tl.constexpr):
    """dL/dx of a [rows, cols] tile of fp32 logits z = x / T (cols: vocabulary ids, t: targets, per-row g, h, lse, H)."""
    logq = z - lse[:, None]
    p = tl.exp(logq)
    d = g[:, None] * (tl.where(cols[None, :] == t[:, None], 1.0, 0.0) - p)
    if HAS_GENT:
        d -= tl.where(z > -float("inf"), h[:, None] * p * (logq + ent[:, None]), 0.0)
    return d * inv_temp


# ----------------------------------------------------------------------------------------------------------------------
# launch helpers

def as_rows(x: torch.Tensor):
    """View (..., V) as rows without copying where possible: (tensor, n_rows, rows_per_batch, stride_b, stride_r).

    Row i lives at (i // rows_per_batch) * stride_b + (i % rows_per_batch) * stride_r; this covers 2-D tensors and 3-D
    ones sliced in time (logits[:, :-1]) without the copy that reshape(-1, V) would make."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() > 3:
        x = x.reshape(-1, x.shape[-2], x.shape[-1])
    if x.dim() == 2:
        return x, x.shape[0], max(x.shape[0], 1), 0, x.stride(0)
    return x, x.shape[0] * x.shape[1], max(x.shape[1], 1), x.stride(0), x.stride(1)


def mask_rows(mask: torch.Tensor | None, shape, device) -> torch.Tensor | None:
    """The row mask as a flat contiguous tensor the kernels load (bool viewed as uint8, no copy when contiguous)."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} must be the row shape {tuple(shape)}")
    m = mask.to(device).reshape(-1).contiguous()
    return m.view(torch.uint8) if m.dtype == torch.bool else m


def tile_shape(n_rows: int, n_cols: int, on_gpu: bool, gpu_block: int = 4096) -> tuple[int, int]:
    """(BLOCK_N rows, BLOCK_V columns) of one program's tile: about ``gpu_block`` elements on a GPU (one row of a 50k
    vocabulary, many rows of a small one); under the interpreter, where programs run one after another, up to 64k."""
    cap_v, cap = (gpu_block, gpu_block) if on_gpu else (16384, 65536)
    block_v = min(cap_v, triton.next_power_of_2(max(n_cols, 1)))
    block_n = max(1, min(cap // block_v, triton.next_power_of_2(max(n_rows, 1))))
    return block_n, block_v


@functools.lru_cache(maxsize=None)
def num_sms(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (how many programs fill it)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def merge_partials(part, n_parts, zt, m):
    """Merge the first n_parts partial (m, S, A) of each row (``part``: [3, n_rows, parts]) with the target logits
    ``zt`` into (logp, entropy, lse) per row, fp32; rows masked by ``m`` give 0."""
    n_rows = zt.numel()
    logp, ent, lse = (torch.empty(n_rows, device=zt.device, dtype=torch.float32) for _ in range(3))
    block_p = triton.next_power_of_2(max(n_parts, 1))
    block_n = max(1, min(128, 4096 // block_p))
    if n_rows:
        merge_kernel[(triton.cdiv(n_rows, block_n),)](
            part, zt, m if m is not None else zt, logp, ent, lse, n_rows, n_parts, part.stride(0), part.stride(1),
            HAS_MASK=m is not None, BLOCK_N=block_n, BLOCK_P=block_p)
    return logp, ent, lse


def flat_grad(g):
    """An incoming gradient as the flat contiguous rows the backward kernels load (None stays None)."""
    return None if g is None else g.reshape(-1).contiguous()
