"""Per-token log-probs (and entropy) straight from hidden states and the LM head, never holding the N x V logits.

This is what the PPO loss, the reference pass and the SFT loss call. For rows h_i (hidden states, d wide), the tied
embedding W (V x d, already sliced to the real vocabulary), targets t_i and temperature T:

    z_iv = (h_i . W_v) / T,   logp_i = z_it - lse_i,   H_i = lse_i - sum_v p_iv z_iv      (p_iv = e^(z_iv - lse_i))

The SFT loss is the mean of -logp over the response mask: ``-(lm_head_logprobs(h, W, t, mask=m) * m).sum() / m.sum()``
(masked rows give 0 and no gradient, so no separate cross-entropy function is needed).

How (forward). The vocabulary is cut into chunks (a few thousand to the whole V, so that one chunk of logits for all N
rows stays under ``chunk_bytes``, 128 MiB by default). Per chunk, the chunk's logits are produced and folded at once into
per-row partial statistics (running max m, S = sum e^(z - m), A = sum e^(z - m) (z - m), see kernels/logprobs.py), plus
the target's logit from the chunk holding it; a small kernel merges the partials of all chunks:
M = max_j m_j, S = sum_j S_j e^(m_j - M), A = sum_j e^(m_j - M) (A_j + S_j (m_j - M)), lse = M + log S,
H = log S - A / S. Two ways to produce a chunk's logits (``matmul=``):

* "triton" (fused): a Triton kernel computes tiles of h W^T with ``tl.dot`` (fp32 accumulation) and folds each tile
  into the row statistics in registers; no logits are written to memory at all, not even a chunk's.
* "torch": cuBLAS writes the chunk's logits (N x chunk, input dtype) into one reused buffer and the from-logits kernel
  folds it.

How (backward). With g = dL/dlogp and h = dL/dH per row, the logits gradient is (see kernels/logprobs.py)

    dz_iv = (g_i ([v == t_i] - p_iv) - h_i p_iv (log p_iv + H_i)) / T        (dH/dz_v = -p_v (z_v - sum_k p_k z_k))

and dh = dz W, dW = dz^T h. Nothing of size N x V is saved: per vocabulary chunk the logits are recomputed and turned
into dz (fused in one Triton kernel with ``matmul="triton"``, or cuBLAS then the from-logits backward kernel in place),
then cuBLAS does dh += dz_chunk W_chunk (accumulated in fp32 across chunks) and dW_chunk = dz_chunk^T h (each chunk owns
its rows of dW, so dW is written once). The row statistics (lse, H) saved by the forward make this exact.
Cost: 8 N d V FLOPs for forward + backward (2 forward, 2 recompute, 4 for dh and dW) against 6 N d V for a
materialising implementation; the saving is memory (no N x V tensor, ~13 GB at N = 32768 in fp32) and memory traffic.
On an H100 (benchmarks/RESULTS.md, N = 8192, d = 768, V = 50257, bf16), matmul="triton": forward + backward 5.96 ms,
3.7x torch eager, 1.85x TRL's chunked log-probs, with 212 MiB of extra memory against eager's 4.7 GB; the backward is
1.8 ms of dz tiles, 1.6 ms of dh (fp32 accumulation over chunks) and 1.05 ms of dW. The fused tiles also keep the
logits in fp32 (logp error 2.5e-7 against 2.6e-4 when the logits are rounded to bf16, as cuBLAS chunks and eager do).

Shapes: hidden (..., d), weight (V, d) of the same dtype (bf16/fp16/fp32), targets (...) integer in [0, V), mask (...)
bool/int/float. Returns fp32 (...): logp, or (logp, entropy) with ``return_entropy``. Gradients to hidden and weight
in their dtypes (dh is accumulated in fp32 and rounded once).

Masked rows are zeroed in a copy of the hidden states first (N x d, cheap), so whatever they hold (NaN from a fully
masked attention row) reaches neither the results nor dW.

Limits: no bias (GPT-2's head has none); weight rows beyond the real vocabulary must be sliced off by the caller; masked
rows still cost their share of the matmuls (they are not compacted, which would need a device-to-host sync).

Test: ``python -m pytest tests/test_kernel_lm_head.py``. Bench: ``python -m benchmarks.bench_logprobs``.
"""
import torch
import triton
import triton.language as tl

from kernels._common import use_triton
from kernels._logprob_common import bwd_row_inputs, dlogits, flat_grad, live_rows, mask_rows, merge_partials, \
    num_sms, online_update
from kernels.logprobs import bwd_rows, fwd_partials
from kernels.logprobs import reference as logits_reference

CHUNK_BYTES = 128 * 2 ** 20  # one vocabulary chunk of logits (N x chunk) stays under this (fastest tried on an H100)
DH_MODE = "addmm"  # how dh accumulates over vocabulary chunks in fp32 (see _accumulate_dh)


# ----------------------------------------------------------------------------------------------------------------------
# reference (the spec): plain PyTorch, fp32 math, materialises the logits

def reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
              mask: torch.Tensor | None = None):
    """(logp, entropy) from logits = hidden @ weight^T computed in fp32."""
    logits = hidden.float() @ weight.float().t()
    return logits_reference(logits, targets, temperature, mask)


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels (matmul="triton": the logits tile lives only in registers)

@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, stride_h, stride_w,
                 D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of h[rows] @ w[cols]^T (zeros outside)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    cols = cols.to(tl.int64)
    for k in range(0, D, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        hk = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < D), other=0.0)
        wk = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & (ks[None, :] < D), other=0.0)
        acc = tl.dot(hk, tl.trans(wk), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _lm_head_fwd_kernel(
    h_ptr, w_ptr, tgt_ptr, mask_ptr,          # hidden [N, D], weight [V, D], targets [N], row mask [N]
    part_ptr, zt_ptr,                         # partial (m, S, A) [3, N, n_splits], target logit [N]
    n_rows, n_vocab, stride_h, stride_w, stride_part_k, stride_part_row, inv_temp,
    D: tl.constexpr, TILES: tl.constexpr,     # each program: BLOCK_N rows x TILES * BLOCK_V vocabulary entries
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row_ok = rows < n_rows
    keep = live_rows(mask_ptr, rows, row_ok, HAS_MASK)
    t = tl.load(tgt_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    v_lo = split * (TILES * BLOCK_V)
    m = tl.full((BLOCK_N,), -1e30, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    for i in range(TILES):
        cols = v_lo + i * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < n_vocab
        z = _logits_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, stride_h, stride_w,
                         D, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION) * inv_temp
        z = tl.where(col_ok[None, :], z, -float("inf"))
        m, s, a = online_update(z, m, s, a)
        zt += tl.sum(tl.where(cols[None, :] == t[:, None], z, 0.0), 1)
    p = part_ptr + rows * stride_part_row + split
    tl.store(p, m, mask=row_ok)
    tl.store(p + stride_part_k, s, mask=row_ok)
    tl.store(p + 2 * stride_part_k, a, mask=row_ok)
    has_t = (t >= v_lo) & (t < tl.minimum(v_lo + TILES * BLOCK_V, n_vocab)) & keep
    tl.store(zt_ptr + rows, zt, mask=has_t)


@triton.jit
def _lm_head_dz_kernel(
    h_ptr, w_ptr, tgt_ptr, mask_ptr, lse_ptr, ent_ptr,  # w_ptr: the chunk's first weight row (vocabulary id col_offset)
    glogp_ptr, gent_ptr,
    dz_ptr,                                   # [N, n_cols] gradient of this chunk's logits (row stride stride_dz)
    n_rows, n_cols, col_offset, stride_h, stride_w, stride_dz, inv_temp,
    D: tl.constexpr, HAS_MASK: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)  # within the chunk
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    keep, g, h, lse, ent, t = bwd_row_inputs(rows, row_ok, col_offset, mask_ptr, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr,
                                              gent_ptr, HAS_MASK, HAS_GLOGP, HAS_GENT)
    z = _logits_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, stride_h, stride_w,
                     D, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION) * inv_temp
    d = dlogits(z, cols, t, g, h, lse, ent, inv_temp, HAS_GENT)
    d = tl.where(keep[:, None], d, 0.0)
    tl.store(dz_ptr + rows[:, None] * stride_dz + cols[None, :], d.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# launchers

def _mm_config(on_gpu: bool, dtype: torch.dtype, d: int):
    """(BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages, dot precision) of the fused matmul kernels."""
    if not on_gpu:  # interpreter: big tiles, few programs
        return 64, 256, min(128, triton.next_power_of_2(d)), 4, 1, "ieee"
    if dtype == torch.float32:  # exact fp32 (tests): no tf32
        return 64, 64, 32, 4, 2, "ieee"
    return 128, 256, 64, 8, 3, "tf32"  # the fastest of those tried on an H100 (benchmarks/RESULTS.md)


def _chunks(n_rows: int, V: int, elem_size: int, chunk_size: int | None, chunk_bytes: int):
    """Vocabulary chunks [(v0, v1)]: ``chunk_size`` wide if given, else as even as possible with N x chunk under
    ``chunk_bytes`` (each a multiple of 128 columns but the last, so every buffer row stays 256-byte aligned)."""
    if chunk_size:
        width = min(V, chunk_size)
    else:
        n = triton.cdiv(V, min(V, max(1024, chunk_bytes // max(1, n_rows * elem_size))))
        width = min(V, triton.cdiv(triton.cdiv(V, n), 128) * 128)
    return [(v0, min(v0 + width, V)) for v0 in range(0, V, width)]


DH_MODES = ("addmm", "mm", "transposed")


def _accumulate_dh(acc: torch.Tensor, dz: torch.Tensor, w: torch.Tensor, mode: str) -> None:
    """acc (fp32) += dz @ w without rounding the chunk's product to dz's dtype first (cuBLAS with an fp32 output for
    bf16/fp16 on CUDA). ``mode`` picks the cuBLAS call: "addmm" accumulates in place, "mm" adds a fresh fp32 product,
    "transposed" accumulates acc^T += w^T dz^T (acc is then the (d, N) transposed accumulator)."""
    if dz.dtype == torch.float32:
        if mode == "transposed":
            acc.addmm_(w.t(), dz.t())
        else:
            acc.addmm_(dz, w)
    elif dz.is_cuda:
        if mode == "addmm":
            torch.addmm(acc, dz, w, out_dtype=torch.float32, out=acc)
        elif mode == "mm":
            acc += torch.mm(dz, w, out_dtype=torch.float32)
        else:
            torch.addmm(acc, w.t(), dz.t(), out_dtype=torch.float32, out=acc)
    else:
        acc += (w.t() @ dz.t() if mode == "transposed" else dz @ w).float()


def _chunk_buffer(N: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(N, width) buffer for one chunk of logits or dz, its rows padded to 128 elements so that cuBLAS gets aligned
    leading dimensions (a 50257-wide row is not 16-byte aligned, and cuBLAS then takes much slower kernels)."""
    return torch.empty((N, triton.cdiv(width, 128) * 128), device=like.device, dtype=like.dtype)[:, :width]


def _lm_head_fwd(h, W, t, m, temperature, matmul, chunk_size, chunk_bytes, config):
    N, d = h.shape
    V = W.shape[0]
    inv_temp = 1.0 / temperature
    zt = torch.full((N,), float("nan"), device=h.device, dtype=torch.float32)
    if matmul == "triton":
        bn, bv, bk, warps, stages, prec = config or _mm_config(h.is_cuda, h.dtype, d)
        n_tiles, row_blocks = triton.cdiv(V, bv), triton.cdiv(N, bn)
        tiles = max(1, min(n_tiles, 64))  # vocabulary tiles per program; few rows: fewer, so that the GPU fills
        if h.is_cuda:  # a power of two: TILES is a compile-time constant, and takes 5 values instead of 16
            tiles = max(1, min(16, n_tiles * row_blocks // (2 * num_sms(h.device.index or 0))))
            tiles = 1 << (tiles.bit_length() - 1)
        n_splits = triton.cdiv(V, tiles * bv)
        part = torch.empty((3, N, n_splits), device=h.device, dtype=torch.float32)
        if N:
            _lm_head_fwd_kernel[(triton.cdiv(N, bn), n_splits)](
                h, W, t, m if m is not None else t, part, zt, N, V, h.stride(0), W.stride(0),
                part.stride(0), part.stride(1), inv_temp, D=d, TILES=tiles, HAS_MASK=m is not None,
                BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, DOT_PRECISION=prec, num_warps=warps, num_stages=stages)
        return merge_partials(part, n_splits, zt, m)
    chunks = _chunks(N, V, h.element_size(), chunk_size, chunk_bytes)
    part = torch.empty((3, N, len(chunks)), device=h.device, dtype=torch.float32)
    buf = _chunk_buffer(N, chunks[0][1] - chunks[0][0], h)
    for j, (v0, v1) in enumerate(chunks):
        tile = buf[:, : v1 - v0]
        torch.mm(h, W[v0:v1].t(), out=tile)
        if N:
            fwd_partials(tile, N, N, 0, tile.stride(0), v1 - v0, v0, t, m, part, j, zt, inv_temp, 1)
    return merge_partials(part, len(chunks), zt, m)


def _lm_head_bwd(h, W, t, m, lse, ent, g_logp, g_ent, temperature, need_dh, need_dw, matmul, chunk_size,
                 chunk_bytes, config, dh_mode="addmm"):
    N, d = h.shape
    V = W.shape[0]
    inv_temp = 1.0 / temperature
    dh = None
    if need_dh:
        dh = torch.zeros((d, N) if dh_mode == "transposed" else (N, d), device=h.device, dtype=torch.float32)
    dW = torch.empty_like(W) if need_dw else None
    chunks = _chunks(N, V, h.element_size(), chunk_size, chunk_bytes)
    buf = _chunk_buffer(N, chunks[0][1] - chunks[0][0], h)
    flags = dict(HAS_MASK=m is not None, HAS_GLOGP=g_logp is not None, HAS_GENT=g_ent is not None)
    for v0, v1 in chunks:
        dz = buf[:, : v1 - v0]
        if matmul == "triton":
            bn, bv, bk, warps, stages, prec = config or _mm_config(h.is_cuda, h.dtype, d)
            if N:
                _lm_head_dz_kernel[(triton.cdiv(N, bn), triton.cdiv(v1 - v0, bv))](
                    h, W[v0:], t, m if m is not None else t, lse, ent,  # W[v0:]: a 64-bit offset made on the host
                    *(x if x is not None else lse for x in (g_logp, g_ent)),
                    dz, N, v1 - v0, v0, h.stride(0), W.stride(0), dz.stride(0), inv_temp,
                    D=d, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, DOT_PRECISION=prec, num_warps=warps, num_stages=stages,
                    **flags)
        else:
            torch.mm(h, W[v0:v1].t(), out=dz)  # then in place: dz overwrites the logits it is made from
            bwd_rows(dz, N, N, 0, dz.stride(0), v1 - v0, v0, dz, t, m, lse, ent, g_logp, g_ent, inv_temp)
        if need_dh:
            _accumulate_dh(dh, dz, W[v0:v1], dh_mode)
        if need_dw:
            torch.mm(dz.t(), h, out=dW[v0:v1])
    if need_dh and dh_mode == "transposed":
        dh = dh.t()
    return dh, dW


# ----------------------------------------------------------------------------------------------------------------------
# autograd

class LMHeadLogprobsFunction(torch.autograd.Function):
    """The Triton path with its whole launch plan as arguments: ``config`` is the fused kernels' (BLOCK_N, BLOCK_V,
    BLOCK_K, num_warps, num_stages, dot precision), None for ``_mm_config``'s choice, and ``dh_mode`` one of
    ``DH_MODES``. ``lm_head_logprobs`` passes the defaults; ``benchmarks/bench_logprobs.py`` sweeps them here."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, mask, temperature, matmul, chunk_size, chunk_bytes, config, dh_mode):
        ctx.set_materialize_grads(False)
        rows_shape, d = hidden.shape[:-1], hidden.shape[-1]
        if weight.dim() != 2 or weight.shape[1] != d:
            raise ValueError(f"weight must be (V, {d}), got {tuple(weight.shape)}")
        if weight.dtype != hidden.dtype:
            raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
        if tuple(targets.shape) != tuple(rows_shape):
            raise ValueError(f"targets shape {tuple(targets.shape)} must be hidden.shape[:-1] = {tuple(rows_shape)}")
        h = hidden.reshape(-1, d).contiguous()
        W = weight.contiguous()
        t = targets.reshape(-1).contiguous()
        m = mask_rows(mask, rows_shape, hidden.device)
        if m is not None:  # masked rows may hold anything (NaN from a fully masked attention row): never let it in
            h = torch.where(m.view(-1, 1) != 0, h, 0.0)
        logp, ent, lse = _lm_head_fwd(h, W, t, m, temperature, matmul, chunk_size, chunk_bytes, config)
        ctx.save_for_backward(h, W, t, lse, ent, *(() if m is None else (m,)))
        ctx.cfg = (temperature, matmul, chunk_size, chunk_bytes, config, dh_mode, hidden.shape)
        return logp.view(rows_shape), ent.view(rows_shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, W, t, lse, ent, *m = ctx.saved_tensors
        temperature, matmul, chunk_size, chunk_bytes, config, dh_mode, hidden_shape = ctx.cfg
        g_logp, g_ent = flat_grad(g_logp), flat_grad(g_ent)
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = dW = None
        if (need_dh or need_dw) and not (g_logp is None and g_ent is None):
            dh, dW = _lm_head_bwd(h, W, t, m[0] if m else None, lse, ent, g_logp, g_ent, temperature, need_dh, need_dw,
                                  matmul, chunk_size, chunk_bytes, config, dh_mode)
            dh = dh.to(h.dtype).contiguous().view(hidden_shape) if dh is not None else None
        return dh, dW, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------------
# public function

def lm_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                     mask: torch.Tensor | None = None, return_entropy: bool = False,
                     impl: str = "auto", matmul: str = "auto", chunk_size: int | None = None,
                     chunk_bytes: int = CHUNK_BYTES):
    """log softmax(hidden @ weight^T / temperature)[target] per row (fp32, shape hidden.shape[:-1]) without the logits.

    ``return_entropy`` adds the entropy; rows where ``mask`` is 0 give 0 and no gradient. Gradients flow to ``hidden``
    and ``weight``. As the SFT loss: ``-(logp * mask).sum() / mask.sum()``.

    ``matmul`` (Triton path only): "triton" fuses the logits tiles into the kernels (fp32 logits, never in memory),
    "torch" uses cuBLAS on vocabulary chunks of at most ``chunk_size`` columns (default: as wide as ``chunk_bytes``
    allows; logits rounded to the input dtype, as a plain model does), "auto" picks "triton" on CUDA tensors (the faster
    on an H100, benchmarks/RESULTS.md) and "torch" under the CPU interpreter (where tl.dot is slow).
    Returns logp, or (logp, entropy)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if matmul not in ("auto", "triton", "torch"):
        raise ValueError(f"matmul must be 'auto', 'triton' or 'torch', got {matmul!r}")
    if use_triton(impl, hidden, weight, targets):
        logp, ent = LMHeadLogprobsFunction.apply(
            hidden, weight, targets, mask, float(temperature),
            ("triton" if hidden.is_cuda else "torch") if matmul == "auto" else matmul, chunk_size, chunk_bytes,
            None, DH_MODE)
    else:
        logp, ent = reference(hidden, weight, targets, temperature, mask)
    return (logp, ent) if return_entropy else logp
