"""Tests of kernels/flash_attention.py and kernels/decode_attention.py against their float64 PyTorch reference.

On CPU the Triton kernels run under the interpreter (fp32, small head dims to keep the run short); with a GPU the same
tests compile them for real, plus the bf16/fp16 and long-sequence cases marked requires_cuda.
"""
import pytest
import torch

from kernels.decode_attention import _ARRIVALS, _decode_plan, decode_attention
from kernels.flash_attention import flash_attention, reference
from tests._kernel_helpers import requires_cuda

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# one tolerance per dtype, relative to the size of the expected tensor (atol = tol * max(1, max|expected|))
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def assert_close(actual, expected, dtype, what=""):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    tol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def make_qkv(B, H, Tq, Tk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for T in (Tq, Tk, Tk))
    return [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]


def random_key_start(B, Tk, seed=0):
    """Different left padding per row: row 0 unpadded, the others random in [0, Tk - 1]."""
    g = torch.Generator().manual_seed(seed + 1)
    ks = torch.randint(0, max(Tk, 1), (B,), generator=g)
    ks[0] = 0
    return ks.to(DEVICE)


def check_against_reference(q, k, v, key_start, dtype, seed=0):
    """Forward and gradients (incoming gradient random, not 1) of the Triton path vs the float64 reference."""
    out = flash_attention(q, k, v, key_start, impl="triton")
    assert out.dtype == q.dtype and out.shape == q.shape
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE, dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, key_start)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    assert_close(out, ref, dtype, "out")
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close(got, want, dtype, name)
    return out, (dq, dk, dv)


# ---------------------------------------------------------------------------------------------------------------------
# flash_attention: forward + backward
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B, H, Tq, Tk, D, padded", [
    (1, 1, 1, 1, 16, False),      # T = 1
    (2, 3, 7, 7, 16, True),       # T = 7, smaller than every block
    (2, 2, 65, 65, 32, False),    # T = 65: one past a block boundary
    (2, 2, 65, 65, 32, True),
    (1, 2, 129, 129, 16, False),  # T = 129, several blocks
    (2, 1, 129, 129, 16, True),
    (4, 4, 20, 20, 16, True),     # B x H = 16 (many programs)
    (2, 2, 40, 40, 64, True),     # GPT-2 head dim
    (1, 1, 17, 17, 128, False),   # head dim 128
    (2, 2, 5, 37, 16, True),      # Tq < Tk: queries aligned to the end of the keys
    (2, 1, 20, 70, 32, True),
], ids=lambda x: str(x) if not isinstance(x, bool) else ("leftpad" if x else "nopad"))
def test_flash_matches_reference(B, H, Tq, Tk, D, padded):
    q, k, v = make_qkv(B, H, Tq, Tk, D, seed=Tq * 7 + D)
    key_start = random_key_start(B, Tk, seed=Tk) if padded else None
    check_against_reference(q, k, v, key_start, torch.float32)


@pytest.mark.parametrize("Tq, Tk", [(20, 34), (9, 39), (3, 50)])
def test_flash_queries_offset_into_the_keys(Tq, Tk):
    """Tq < Tk with offsets Tk - Tq of 14, 30 and 47 (not multiples of a block, and 14 = 30 = -2 mod 16): the
    backward's key blocks must switch from masked to unmasked query blocks exactly past the last query that does not
    see the block's last key; an end of the masked range that rounds one query block short lets a query see keys after
    its own position in dk and dv. With left padding (key_start past a block start) and a random incoming gradient."""
    q, k, v = make_qkv(2, 1, Tq, Tk, 16, seed=Tk)
    key_start = torch.tensor([0, Tk - Tq - 3], device=DEVICE)
    check_against_reference(q, k, v, key_start, torch.float32)


def test_flash_fully_padded_row_gives_zeros_not_nan():
    """Row 1 is all padding; row 2's key_start is past the first blocks: padded query rows give exactly 0 out and
    0 gradient, and pad keys get 0 gradient."""
    B, H, T, D = 3, 2, 45, 16
    q, k, v = make_qkv(B, H, T, T, D, seed=3)
    key_start = torch.tensor([0, T, 38], device=DEVICE)
    out, (dq, dk, dv) = check_against_reference(q, k, v, key_start, torch.float32)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (out[2, :, :38] == 0).all() and (dq[2, :, :38] == 0).all()
    assert (dk[2, :, :38] == 0).all() and (dv[2, :, :38] == 0).all()


def test_flash_negative_key_start_is_zero():
    """A negative start offset means no padding, as in the reference (the kernel must not read keys before the row)."""
    q, k, v = make_qkv(2, 2, 40, 75, 16, seed=9)
    key_start = torch.tensor([-20, 3], device=DEVICE)
    out, grads = check_against_reference(q, k, v, key_start, torch.float32)
    zero = flash_attention(q, k, v, torch.tensor([0, 3], device=DEVICE), impl="triton")
    assert_close(out, zero, torch.float32, "negative start == 0")


def test_flash_key_start_none_equals_zeros():
    """No padding given as None or as zeros (int64 or int32): the same result (up to rounding: the padded variant
    adds its per-key bias inside the scaling FMA)."""
    q, k, v = make_qkv(2, 2, 33, 33, 16, seed=5)
    a = flash_attention(q, k, v, None, impl="triton")
    for dtype in (torch.int64, torch.int32):
        b = flash_attention(q, k, v, torch.zeros(2, dtype=dtype, device=DEVICE), impl="triton")
        assert_close(b, a, torch.float32, f"key_start zeros {dtype}")


def test_flash_strided_inputs_and_gradient():
    """q, k, v as the (B, T, H, D) -> (B, H, T, D) views a model makes, and an expanded (stride 0) gradient."""
    B, T, H, D = 2, 37, 3, 16
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(DEVICE).requires_grad_()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # B, H, T, D, not contiguous
    key_start = torch.tensor([4, 0], device=DEVICE)
    out = flash_attention(q, k, v, key_start, impl="triton")
    grad = torch.randn(1, 1, 1, D, generator=g).to(DEVICE).expand(B, H, T, D)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    qkv64 = qkv.detach().double().requires_grad_()
    q64, k64, v64 = (qkv64[:, :, i].transpose(1, 2) for i in range(3))
    ref = reference(q64, k64, v64, key_start)
    (rqkv,) = torch.autograd.grad(ref, qkv64, grad.double())
    assert_close(out, ref, torch.float32, "out")
    assert_close(dqkv, rqkv, torch.float32, "dqkv")


def test_flash_sm_scale_and_torch_impl():
    q, k, v = make_qkv(1, 2, 9, 9, 16, seed=13)
    ks = torch.tensor([2], device=DEVICE)
    out = flash_attention(q, k, v, ks, sm_scale=0.3, impl="triton")
    ref = reference(q.double(), k.double(), v.double(), ks, sm_scale=0.3)
    assert_close(out, ref, torch.float32, "sm_scale")
    assert_close(flash_attention(q, k, v, ks, sm_scale=0.3, impl="torch"), ref, torch.float32, "impl=torch")


def test_flash_rejects_bad_inputs():
    q, k, v = make_qkv(1, 1, 8, 8, 16)
    with pytest.raises(ValueError):
        flash_attention(q, k[:, :, :4], v[:, :, :4])  # Tq > Tk
    q48, k48, v48 = make_qkv(1, 1, 8, 8, 48)
    with pytest.raises(ValueError):
        flash_attention(q48, k48, v48, impl="triton")  # head dim not a power of two
    with pytest.raises(ValueError):
        flash_attention(q, k, v, torch.zeros(2, dtype=torch.long, device=DEVICE))  # key_start of the wrong size


# ---------------------------------------------------------------------------------------------------------------------
# decode_attention
# ---------------------------------------------------------------------------------------------------------------------

def make_cache(B, H, S_max, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S_max, D, generator=g).to(DEVICE, dtype) for _ in range(2)]


@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("num_programs", [None, 6, 1, 4, 11, 24, 30])
def test_decode_matches_reference(Tq, num_programs):
    """Every way of sharing the 6 rows x 5 key blocks between programs: planned, one row each (6), several rows each
    (1, 4), shares ending mid-row (11, 24), one block each (30)."""
    B, H, S_max, L, D = 3, 2, 90, 70, 16
    k_cache, v_cache = make_cache(B, H, S_max, D, seed=Tq)
    q = torch.randn(B, H, Tq, D, generator=torch.Generator().manual_seed(17)).to(DEVICE)
    key_start = torch.tensor([0, 23, L], device=DEVICE)  # unpadded, padded, fully padded
    out = decode_attention(q, k_cache, v_cache, key_start, kv_len=L, impl="triton", num_programs=num_programs)
    ref = reference(q.double(), k_cache[:, :, :L].double(), v_cache[:, :, :L].double(), key_start)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, torch.float32, "decode")
    assert (out[2] == 0).all()
    assert all((buf == 0).all() for buf in _ARRIVALS.values()), "the merge must leave its counters at zero"


@pytest.mark.parametrize("num_programs", [10, 13])
def test_decode_split_merge_with_large_scores(num_programs):
    """Split rows merged by their partial log-sum-exps when the scores are in the hundreds (q scaled up, so the
    base-2 lse of a piece passes 128 where 2^lse overflows fp32): the merge must weight the pieces relative to their
    maximum, not by 2^lse itself. 10 programs for 6 rows x 5 key blocks give shares of 3 blocks, and a row then meets
    3 shares (the workspace must hold that many pieces per row); 13 give uneven shares. A fully padded row (every piece
    without a visible key) must still give exactly 0."""
    B, H, S_max, L, D = 3, 2, 80, 70, 16
    k_cache, v_cache = make_cache(B, H, S_max, D, seed=4)
    q = (torch.randn(B, H, 2, D, generator=torch.Generator().manual_seed(23)) * 60).to(DEVICE)
    key_start = torch.tensor([0, 37, L], device=DEVICE)
    out = decode_attention(q, k_cache, v_cache, key_start, kv_len=L, impl="triton", num_programs=num_programs)
    ref = reference(q.double(), k_cache[:, :, :L].double(), v_cache[:, :, :L].double(), key_start)
    assert_close(out, ref, torch.float32, "decode")
    assert (out[2] == 0).all()


@pytest.mark.parametrize("D, L", [(64, 70), (32, 1)])
def test_decode_equals_last_rows_of_full_attention(D, L):
    """Decoding the last query against the cache gives the last row of full causal attention over the sequence."""
    B, H, S_max = 2, 2, 96
    k_cache, v_cache = make_cache(B, H, S_max, D, seed=D)
    q_all = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(19)).to(DEVICE)
    key_start = torch.tensor([min(5, L - 1), 0], device=DEVICE)
    full = flash_attention(q_all, k_cache[:, :, :L], v_cache[:, :, :L], key_start, impl="triton")
    for num_programs in (None, 7):
        dec = decode_attention(q_all[:, :, -1:], k_cache, v_cache, key_start, kv_len=L, impl="triton",
                               num_programs=num_programs)
        assert_close(dec, full[:, :, -1:], torch.float32, f"decode vs full ({num_programs} programs)")


def test_decode_plan_splits_until_half_the_sms_are_busy():
    """The launch plan (pure arithmetic): split a row's keys only while fewer than half the SMs have a program, with
    at least two key blocks per split. The block shapes are checked for what they must be, not copied: a key block is
    a power of two of at least 16 (tl.dot), and a row streamed alone (fewer programs than SMs) gets longer blocks and
    a deeper pipeline than rows sharing the SMs."""
    bf16 = torch.bfloat16
    cases = [((96, 1024, 64, bf16, 132), 96),  # B=8 GPT-2: 96 of 132 SMs busy, no split
             ((48, 1024, 64, bf16, 132), 96),  # B=4: each row in 2 splits
             ((12, 1024, 64, bf16, 132), 48),  # B=1: 6 splits wanted, 4 = two 128-key blocks each
             ((12, 300, 64, bf16, 132), 12),  # too few keys to split
             ((768, 1024, 64, bf16, 132), 768),  # B=64
             ((1, 70, 16, torch.float32, None), 2)]  # the interpreter plans as a 4-SM GPU
    configs = {}
    for (bh, kv_len, *rest), programs in cases:
        n, cfg = _decode_plan(bh, kv_len, *rest)
        assert n == programs, (bh, kv_len)
        block = cfg["BLOCK_N"]
        assert block >= 16 and block & (block - 1) == 0
        assert n == bh or kv_len // (n // bh) >= 2 * block  # two key blocks per split at least
        configs[bh] = cfg
    alone, shared = configs[96], configs[768]
    assert alone["BLOCK_N"] > shared["BLOCK_N"] and alone["num_stages"] > shared["num_stages"]


def test_decode_torch_impl_and_errors():
    k_cache, v_cache = make_cache(2, 1, 20, 16)
    q = torch.randn(2, 1, 1, 16, device=DEVICE)
    ks = torch.tensor([3, 0], device=DEVICE)
    ref = reference(q.double(), k_cache[:, :, :12].double(), v_cache[:, :, :12].double(), ks)
    assert_close(decode_attention(q, k_cache, v_cache, ks, kv_len=12, impl="torch"), ref, torch.float32, "torch")
    with pytest.raises(ValueError):
        decode_attention(q, k_cache, v_cache, ks, kv_len=21)  # past the cache


# ---------------------------------------------------------------------------------------------------------------------
# GPU only: half precision and long sequences with the real compiler
# ---------------------------------------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B, H, Tq, Tk, D", [(2, 4, 1024, 1024, 64), (3, 2, 300, 300, 128), (2, 3, 100, 1000, 64)])
def test_flash_half_precision_gpu(dtype, B, H, Tq, Tk, D):
    q, k, v = make_qkv(B, H, Tq, Tk, D, dtype=dtype, seed=D)
    key_start = torch.tensor([0, Tk // 3, Tk - 7][:B], device=DEVICE)
    check_against_reference(q, k, v, key_start, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B, L, D", [(8, 1000, 64), (64, 513, 64), (2, 777, 128)])
@pytest.mark.parametrize("num_programs", [None, 131], ids=["planned", "131-programs"])
def test_decode_half_precision_gpu(dtype, B, L, D, num_programs):
    H = 12 if D == 64 else 4
    k_cache, v_cache = make_cache(B, H, 1024, D, dtype=dtype, seed=B)
    q = torch.randn(B, H, 1, D, device=DEVICE, dtype=dtype)
    key_start = torch.randint(0, L // 2, (B,), device=DEVICE)
    out = decode_attention(q, k_cache, v_cache, key_start, kv_len=L, impl="triton", num_programs=num_programs)
    ref = reference(q.double(), k_cache[:, :, :L].double(), v_cache[:, :, :L].double(), key_start)
    assert_close(out, ref, dtype, "decode")
