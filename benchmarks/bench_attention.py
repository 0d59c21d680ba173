"""Attention kernels (kernels/flash_attention.py, kernels/decode_attention.py) against PyTorch, on GPT-2 shapes.

Training: B x T = 8 x 1024 and 64 x 512, 12 heads of 64, bf16, causal; forward, backward, and both. Compared with
SDPA's flash backend (which cannot take a padding mask, so it runs unpadded), SDPA's memory-efficient backend with the
padding mask, and eager attention (scores, mask, softmax, matmul) with the mask. "ours+pad" runs with random left
padding (up to half of each row); its TFLOP/s still counts the unpadded FLOPs, so it reads as effective throughput.
FLOPs, causal convention (half of dense): forward 2 * B * H * T^2 * D (two matmuls of 2 B H T^2 D, halved), backward
2.5 x forward (five matmuls), both 3.5 x forward.

Decode: one new query per row against a KV cache of 1024 positions, B = 8 and 64; compared with SDPA (default backend,
with the padding mask), SDPA flash (no mask) and eager, all on the sliced cache, and with a plain read of the same
bytes in one launch (no attention: the floor). Bytes = keys + values read once (2 B H L D x 2 bytes); the fraction is
of the measured device copy bandwidth (bytes read + written).

In context: GPT-2 124M forward + backward (8 x 1024, 64 x 512, 64 x 64) and greedy generation (B = 8 and 64) with
attn_impl "triton" against "sdpa" on the same model.

Correctness is asserted first (against the fp32 reference, and against SDPA flash without padding). Two times per
row: the median of triton.testing.do_bench (L2 flushed before each call; Python and launch overhead included where
the host cannot keep ahead of the GPU) and the median per call of a CUDA-graph replay (the kernels' own time; decode
replays rotate over caches together larger than L2). The targets are judged on the graph time. The bf16 matmul peak
(8192^3) and the copy bandwidth (1 GiB) are measured here, once, in the same process.

    python -m benchmarks.bench_attention            # writes the "attention" section of benchmarks/RESULTS.md
    python -m benchmarks.bench_attention --check-only   # correctness only (compiles every kernel variant used)
    python -m benchmarks.bench_attention --sweep [train|decode]  # times block-size configurations instead (no write)
    (--shard i/n: run every n-th sweep job only, to compile in parallel processes first)
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.runtime.errors import OutOfResources

from benchmarks._results import environment, write_section
from kernels.decode_attention import _decode_fwd, decode_attention
from kernels.flash_attention import _flash_bwd, _flash_fwd, allowed_mask, flash_attention, reference
from minirlhf.generate import generate
from minirlhf.model import GPT, GPTConfig

H, D, DTYPE = 12, 64, torch.bfloat16
TRAIN_SHAPES = [(8, 1024), (64, 512)]
DECODE_BATCHES, CONTEXT = [8, 64], 1024
GENERATE_TOKENS = 128
MODEL_SHAPES = [(8, 1024, False), (8, 1024, True), (64, 512, True), (64, 64, True)]  # B, T, left padding


# ---------------------------------------------------------------------------------------------------------------------
# helpers

def sm_count() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def bench(fn, grad_to_none=None) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def measure_peaks():
    """(bf16 matmul TFLOP/s, device copy GB/s counting read + write), measured here."""
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=DTYPE), torch.randn(n, n, device="cuda", dtype=DTYPE)
    tflops = 2 * n ** 3 / bench(lambda: a @ b) * 1e-9
    x = torch.randn(2 ** 29, device="cuda", dtype=torch.float16)  # 1 GiB
    y = torch.empty_like(x)
    gbs = 2 * x.numel() * x.element_size() / bench(lambda: y.copy_(x)) * 1e-6
    del a, b, x, y
    return tflops, gbs


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def make_train(B, T, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=DTYPE, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(B, H, T, D, device="cuda", dtype=DTYPE, generator=g)
    ks = torch.randint(0, T // 2, (B,), device="cuda", generator=g)
    ks[0] = 0
    return q, k, v, do, ks


def eager(q, k, v, allowed):
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def sdpa_flash(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_efficient(q, k, v, bias):
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def padding_bias(allowed, dtype):
    """Additive mask, as a model would pass it: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, device="cuda", dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


# ---------------------------------------------------------------------------------------------------------------------
# correctness

def check_train(B, T):
    q, k, v, do, ks = make_train(B, T, seed=1)
    out = flash_attention(q, k, v, ks, impl="triton")
    grads = torch.autograd.grad(out, (q, k, v), do)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference(q32, k32, v32, ks)
    rgrads = torch.autograd.grad(ref, (q32, k32, v32), do.float())
    errs = [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, rgrads)]
    assert all(e < 1e-2 for e in errs), f"B={B} T={T}: relative errors out/dq/dk/dv {errs}"
    assert all(torch.isfinite(g).all() for g in grads)
    del ref, rgrads, q32, k32, v32
    # unpadded: the same function as SDPA's flash backend
    out = flash_attention(q, k, v, None, impl="triton")
    e = rel_err(out, sdpa_flash(q, k, v))
    assert e < 1e-2, f"B={B} T={T}: vs SDPA flash {e}"
    return max(errs)


def check_decode(B):
    kc, vc, q, ks = make_decode(B, seed=2)
    out = decode_attention(q, kc, vc, ks, kv_len=CONTEXT, impl="triton")
    e = rel_err(out, reference(q.float(), kc.float(), vc.float(), ks))
    assert e < 1e-2, f"decode B={B}: {e}"
    ref = reference(q.float(), kc.float(), vc.float(), None)
    e2 = rel_err(decode_attention(q, kc, vc, None, kv_len=CONTEXT, impl="triton", num_programs=sm_count()), ref)
    assert e2 < 1e-2, f"decode B={B} unpadded, one program per SM: {e2}"
    return max(e, e2)


def make_decode(B, seed=0):
    """Key and value caches (the two halves of one allocation, so the read-only floor reads both in one launch),
    one query per row, and random left padding."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    kc, vc = torch.randn(2, B, H, CONTEXT, D, device="cuda", dtype=DTYPE, generator=g).unbind(0)
    q = torch.randn(B, H, 1, D, device="cuda", dtype=DTYPE, generator=g)
    ks = torch.randint(0, CONTEXT // 2, (B,), device="cuda", generator=g)
    return kc, vc, q, ks


# ---------------------------------------------------------------------------------------------------------------------
# timing

def bench_graph(fns, grad_to_none=None, rep=30) -> float:
    """Median ms per call of fns[0](), fns[1](), ... replayed from a CUDA graph: the kernels' own time, without the
    Python and launch overhead. (Decode passes several fns, each on its own inputs, together larger than L2.)
    NaN if the work cannot be captured in a graph."""
    try:
        return triton.testing.do_bench_cudagraph(lambda: [f() for f in fns], rep=rep, grad_to_none=grad_to_none,
                                                 return_mode="median") / len(fns)
    except RuntimeError as exc:  # reported in the table as n/a, with the reason printed here
        print(f"graph capture failed: {str(exc)[:200]}")
        return float("nan")


def time_train(B, T):
    """Rows (shape, pass, impl, ms do_bench, ms graph, flops, peak MiB or None)."""
    q, k, v, do, ks = make_train(B, T)
    allowed = allowed_mask(T, T, ks, B, "cuda")  # B, 1, T, T
    bias = padding_bias(allowed, DTYPE)
    impls = {
        "ours": lambda: flash_attention(q, k, v, None, impl="triton"),
        "ours+pad": lambda: flash_attention(q, k, v, ks, impl="triton"),
        "sdpa-flash (no pad)": lambda: sdpa_flash(q, k, v),
        "sdpa-efficient+pad": lambda: sdpa_efficient(q, k, v, bias),
        "eager+pad": lambda: eager(q, k, v, allowed),
    }
    fwd_flops = 2.0 * B * H * T * T * D
    rows = []
    for name, fn in impls.items():
        with torch.no_grad():
            t_f = bench(fn)
            g_f = bench_graph([fn])
        o = fn()
        t_b = bench(lambda: o.backward(do, retain_graph=True), grad_to_none=[q, k, v])
        del o
        t_fb = bench(lambda: fn().backward(do), grad_to_none=[q, k, v])
        g_fb = bench_graph([lambda: fn().backward(do)], grad_to_none=[q, k, v])
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn().backward(do)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        q.grad = k.grad = v.grad = None
        shape = f"{B}x{T}"
        rows += [(shape, "fwd", name, t_f, g_f, fwd_flops, None),
                 (shape, "bwd", name, t_b, g_fb - g_f, 2.5 * fwd_flops, None),  # graph: (fwd+bwd) - fwd
                 (shape, "fwd+bwd", name, t_fb, g_fb, 3.5 * fwd_flops, peak)]
    return rows


@triton.jit
def _read_floor_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    """Read BLOCK elements per program and write their sum: a plain streaming read, the floor for decode."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + tl.program_id(0), tl.sum(tl.load(x_ptr + offs).to(tl.float32), 0))


def read_floor(kc):
    """A call that reads the keys and values (laid out back to back by make_decode) once, in one launch."""
    n, block = 2 * kc.numel(), 8192
    out = torch.empty(n // block, device="cuda")
    return lambda: _read_floor_kernel[(n // block,)](kc, out, BLOCK=block, num_warps=8)


def decode_impls(kc, vc, q, ks):
    """[(name, fn, bytes it must read)] on one KV cache."""
    B, L = q.shape[0], CONTEXT
    allowed = allowed_mask(1, L, ks, B, "cuda")  # B, 1, 1, L
    bias = padding_bias(allowed, DTYPE)
    full_bytes = 2 * B * H * L * D * kc.element_size()
    pad_bytes = 2 * H * D * kc.element_size() * int((L - ks).sum())
    k_s, v_s = kc[:, :, :L], vc[:, :, :L]

    def sdpa_flash_decode():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k_s, v_s)

    return [
        ("ours", lambda: decode_attention(q, kc, vc, None, kv_len=L, impl="triton"), full_bytes),
        ("ours+pad", lambda: decode_attention(q, kc, vc, ks, kv_len=L, impl="triton"), pad_bytes),
        ("ours, one program per SM", lambda: decode_attention(q, kc, vc, None, kv_len=L, impl="triton",
                                                               num_programs=sm_count()), full_bytes),
        ("sdpa+pad", lambda: F.scaled_dot_product_attention(q, k_s, v_s, attn_mask=bias), full_bytes),
        ("sdpa-flash (no pad)", sdpa_flash_decode, full_bytes),
        ("eager+pad", lambda: eager(q, k_s, v_s, allowed), full_bytes),
        ("read-only floor (no attention)", read_floor(kc), full_bytes),
    ]


def host_ms(fn, n=100) -> float:
    """Wall time per call of n calls issued back to back (one sync at the end): the larger of the host's launch cost
    and the GPU time."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e3


def time_decode(B):
    """Rows (B, impl, ms with do_bench, ms per call in a CUDA graph, ms per call back to back, bytes)."""
    set_bytes = 2 * B * H * CONTEXT * D * 2
    n_sets = max(2, math.ceil(4 * 64 * 2 ** 20 / set_bytes))  # >= 4 x the 50 MB L2 in rotation
    sets = [decode_impls(*make_decode(B, seed=i)) for i in range(n_sets)]
    rows = []
    with torch.no_grad():
        for j, (name, fn, nbytes) in enumerate(sets[0]):
            t_graph = bench_graph([impls[j][1] for impls in sets])
            rows.append((B, name, bench(fn), t_graph, host_ms(fn), nbytes))
    return rows


def time_model():
    """Rows (B, T, padded, attn_impl, ms per step with do_bench, ms per step in a CUDA graph) for GPT-2 124M (random
    weights): forward of the hidden states under bf16 autocast, a scalar loss, backward. SDPA gets the model's padding
    mask as a bias, as in training (PyTorch then picks its cuDNN or memory-efficient backend)."""
    model = GPT(GPTConfig()).cuda()
    params = list(model.parameters())
    rows = []
    for B, T, padded in MODEL_SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (B, T), device="cuda", generator=g)
        start = (torch.randint(0, T // 2, (B,), device="cuda", generator=g) if padded
                 else torch.zeros(B, dtype=torch.long, device="cuda"))
        mask = (torch.arange(T, device="cuda")[None, :] >= start[:, None]).long()  # B, T

        def step():
            with torch.autocast("cuda", torch.bfloat16):
                h = model.hidden_states(ids, mask)
            h.float().square().mean().backward()

        for impl in ("triton", "sdpa"):
            model.config.attn_impl = impl
            t = triton.testing.do_bench(step, warmup=100, rep=500, grad_to_none=params, return_mode="median")
            rows.append((B, T, padded, impl, t, bench_graph([step], params, rep=300)))
    model.config.attn_impl = "auto"
    return rows


def time_generation():
    """Rows (B, attn_impl, seconds) for generating GENERATE_TOKENS tokens greedily after a 32-token prompt with GPT-2
    124M under bf16 autocast (best of 3): token-by-token decoding through the KV cache, where each step is one small
    launch per layer and the host's launch cost shows."""
    model = GPT(GPTConfig()).cuda().eval()
    V = model.config.vocab_size
    rows = []
    for B in DECODE_BATCHES:
        prompt = torch.randint(0, V, (B, 32), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
        for impl in ("triton", "sdpa"):
            model.config.attn_impl = impl
            best = float("inf")
            for _ in range(3):
                torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.autocast("cuda", torch.bfloat16):
                    generate(model, prompt, torch.ones_like(prompt), max_new_tokens=GENERATE_TOKENS, eos_id=V + 1,
                             pad_id=V, greedy=True)
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            rows.append((B, impl, best))
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# sweep of block sizes (prints only)

SWEEP_FWD = {64: [(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3)], 128: [(64, 64, 4, 3), (64, 32, 4, 3)]}
SWEEP_BWD = {64: [(64, 64, 64, 64, 4, 3), (32, 64, 64, 32, 4, 3)], 128: [(32, 64, 64, 32, 4, 3)]}
SWEEP_DECODE = [(bn, w, st, programs) for programs in ("rows", "2 x rows", "SMs", "2 x SMs")
                for bn, w, st in ((64, 4, 2), (64, 4, 3), (128, 4, 3), (128, 8, 3))]  # BLOCK_N, warps, stages, P
SWEEP_DECODE_BATCHES = [4, 8, 64]  # 4 and 8: either side of the split / no-split rule (B*H vs half the SMs)


def sweep_train_inputs(d):
    """8 x 1024 with padding, head dim d (d = 128: 6 heads, the same bytes)."""
    q, k, v, do, ks = make_train(8, 1024)
    if d == 128:
        q, k, v, do = (t.detach().view(8, 6, 1024, 128).requires_grad_() for t in (q, k, v, do))
    return q, k, v, do, ks, 1 / math.sqrt(d)


def sweep(which="all", shard=0, num_shards=1):
    """Time each configuration (checked against the reference first). With num_shards > 1 only every
    num_shards-th job runs: parallel processes that fill Triton's compile cache before one timed pass."""
    jobs = [("fwd", d, c) for d, cs in SWEEP_FWD.items() for c in cs] if which != "decode" else []
    jobs += [("bwd", d, c) for d, cs in SWEEP_BWD.items() for c in cs] if which != "decode" else []
    jobs += [("decode", B, c) for B in SWEEP_DECODE_BATCHES for c in SWEEP_DECODE] if which != "train" else []
    inputs = {}
    for i, (kind, n, c) in enumerate(jobs):
        if i % num_shards != shard:
            continue
        key = (kind, n)
        if key not in inputs:  # inputs and the reference, once per (kind, size)
            if kind == "decode":
                kc, vc, q, ks = make_decode(n)
                inputs[key] = (kc, vc, q, reference(q.float(), kc.float(), vc.float(), None))
                n_sets = max(2, math.ceil(4 * 64 * 2 ** 20 / (2 * n * H * CONTEXT * D * 2)))
                inputs[("caches", n)] = [make_decode(n, seed=i)[:2] for i in range(n_sets)]
            else:
                q, k, v, do, ks, scale = sweep_train_inputs(n)
                q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
                ref = reference(q32, k32, v32, ks)
                rg = torch.autograd.grad(ref, (q32, k32, v32), do.float()) if kind == "bwd" else None
                o, lse = _flash_fwd(q, k, v, ks, scale)
                inputs[key] = (q, k, v, do, ks, scale, ref.detach(), rg, o, lse)
        try:
            if kind == "fwd":
                q, k, v, do, ks, scale, ref, rg, o, lse = inputs[key]
                cfg = dict(BLOCK_M=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])
                e = rel_err(_flash_fwd(q, k, v, ks, scale, config=cfg)[0], ref)
                t = bench(lambda: _flash_fwd(q, k, v, ks, scale, config=cfg))
                print(f"fwd D={n} {cfg}: {t:.4f} ms  err {e:.1e}")
            elif kind == "bwd":
                q, k, v, do, ks, scale, ref, rg, o, lse = inputs[key]
                cfg = dict(BLOCK_M1=c[0], BLOCK_N1=c[1], BLOCK_M2=c[2], BLOCK_N2=c[3], num_warps=c[4], num_stages=c[5])
                e = max(rel_err(a, b) for a, b in zip(_flash_bwd(do, q, k, v, o, lse, ks, scale, config=cfg), rg))
                t = bench(lambda: _flash_bwd(do, q, k, v, o, lse, ks, scale, config=cfg))
                print(f"bwd D={n} {cfg}: {t:.4f} ms  err {e:.1e}")
            else:
                kc, vc, q, ref = inputs[key]
                cfg = dict(BLOCK_N=c[0], num_warps=c[1], num_stages=c[2])
                programs = {"rows": n * H, "2 x rows": 2 * n * H, "SMs": sm_count(), "2 x SMs": 2 * sm_count()}[c[3]]
                run = lambda kc, vc: _decode_fwd(q, kc, vc, None, CONTEXT, 1 / math.sqrt(D), programs, config=cfg)
                e = rel_err(run(kc, vc), ref)
                tg = bench_graph([lambda cache=cache: run(*cache) for cache in inputs[("caches", n)]])
                nbytes = 2 * n * H * CONTEXT * D * 2
                print(f"decode B={n} programs={programs} ({c[3]}) {cfg}: graph {tg * 1e3:.1f} us "
                      f"{nbytes / tg * 1e-6:.0f} GB/s  err {e:.1e}")
        except OutOfResources as exc:  # a configuration that does not fit in shared memory: report and go on
            print(f"{kind} {n} {c}: does not fit ({exc})")


# ---------------------------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", nargs="?", const="all", choices=["all", "train", "decode"],
                    help="time block-size configurations instead (all, or only the train or decode kernels)")
    ap.add_argument("--check-only", action="store_true", help="run the correctness checks only (compiles the kernels)")
    ap.add_argument("--shard", default="0/1", help="with --sweep: run only jobs i, i+n, ... of 'i/n'")
    ap.add_argument("--no-write", action="store_true", help="print only; don't update RESULTS.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA GPU")
    torch.manual_seed(0)
    if args.sweep:
        shard, num_shards = (int(x) for x in args.shard.split("/"))
        sweep(args.sweep, shard, num_shards)
        return

    # 1. correctness first
    errs = {f"{B}x{T}": check_train(B, T) for B, T in TRAIN_SHAPES}
    errs.update({f"decode B={B}": check_decode(B) for B in DECODE_BATCHES})
    if args.check_only:
        print("correctness:", errs)
        return
    # 2. the two ceilings
    peak_tflops, copy_gbs = measure_peaks()
    # 3. timings
    train_rows = [r for B, T in TRAIN_SHAPES for r in time_train(B, T)]
    decode_rows = [r for B in DECODE_BATCHES for r in time_decode(B)]
    model_rows = time_model()
    generation_rows = time_generation()

    env = environment()
    lines = ["## Attention (kernels/flash_attention.py, kernels/decode_attention.py)", "", env, "",
             f"Measured here: bf16 matmul peak **{peak_tflops:.0f} TFLOP/s** (8192^3), device copy "
             f"**{copy_gbs:.0f} GB/s** (read + write, 1 GiB). GPT-2 shapes: 12 heads of 64, bf16, causal. "
             f"Median of `triton.testing.do_bench`. Correctness asserted first (max relative error vs the fp32 "
             f"reference: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + ").", "",
             "FLOPs: causal convention (half of dense): fwd 2·B·H·T²·D, bwd 2.5x, fwd+bwd 3.5x. `+pad`: random left "
             "padding of up to half of each row (row 0 unpadded), same FLOP count (effective rate). SDPA flash cannot "
             "take a padding mask, so it runs unpadded; peak MiB: extra memory of one fwd+bwd.", "",
             "Two times per row: `do_bench` (median, L2 flushed before each call, Python and launch overhead "
             "included: it shows when the host cannot keep ahead of the GPU) and `graph` (median per call of a "
             "CUDA-graph replay: the kernels' own time; bwd = (fwd+bwd) - fwd). TFLOP/s and % of peak from the graph "
             "time.", "",
             "| B x T | pass | impl | ms (do_bench) | ms (graph) | TFLOP/s | % of peak | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for shape, pas, name, ms, ms_graph, flops, peak in train_rows:
        tf = flops / ms_graph * 1e-9
        lines.append(f"| {shape} | {pas} | {name} | {ms:.3f} | {ms_graph:.3f} | {tf:.0f} | {100 * tf / peak_tflops:.0f}% | "
                     f"{'' if peak is None else f'{peak:.0f}'} |")
    lines += ["", f"Decode: one query per row, KV cache of {CONTEXT} positions (keys + values read once; `ours+pad` "
              "counts only the unpadded keys it must read). `do_bench`: one call after an L2 flush, launch overhead "
              "included; `graph`: per call in a CUDA-graph replay over rotating caches (>= 4x L2), the kernels' own "
              "time; `back to back`: wall time per call of 100 calls issued without a sync (the host's launch cost "
              "when it exceeds the GPU time). GB/s and % of the copy bandwidth from the graph time.", "",
              "| B | impl | us (do_bench) | us (graph) | us (back to back) | GB/s | % of copy bandwidth |",
              "|---|---|---|---|---|---|---|"]
    for B, name, ms, ms_graph, ms_host, nbytes in decode_rows:
        gbs = nbytes / ms_graph * 1e-6
        lines.append(f"| {B} | {name} | {ms * 1e3:.1f} | {ms_graph * 1e3:.1f} | {ms_host * 1e3:.1f} | {gbs:.0f} | "
                     f"{100 * gbs / copy_gbs:.0f}% |")

    lines += ["", "GPT-2 124M in context (random weights): forward of the hidden states under bf16 autocast, a scalar "
              "loss, backward; `attn_impl` switched on the same model. `do_bench`: median wall time per step, host "
              "included: a step of GPT-2 small is launch-bound on this host, so this column measures the host more "
              "than the kernels and moves by tens of percent from run to run; `graph`: the step's GPU time in a "
              "CUDA-graph replay.", "",
              "| B x T | left padding | attn_impl | ms per step (do_bench) | ms per step (graph) |",
              "|---|---|---|---|---|"]
    for B, T, padded, impl, ms, ms_graph in model_rows:
        lines.append(f"| {B}x{T} | {'yes' if padded else 'no'} | {impl} | {ms:.2f} | {ms_graph:.2f} |")

    lines += ["", "Generation with GPT-2 124M (random weights, bf16 autocast, greedy, prompt 32, "
              f"{GENERATE_TOKENS} new tokens through the KV cache; best of 3, wall seconds):", "",
              "| B | attn_impl | seconds | new tokens/s |", "|---|---|---|---|"]
    for B, impl, sec in generation_rows:
        lines.append(f"| {B} | {impl} | {sec:.3f} | {B * GENERATE_TOKENS / sec:.0f} |")

    def t(shape, pas, name, col=3):  # col 3: do_bench, 4: graph
        return next(r[col] for r in train_rows if r[:3] == (shape, pas, name))

    flash = "sdpa-flash (no pad)"
    ratio = t("8x1024", "fwd+bwd", flash, 4) / t("8x1024", "fwd+bwd", "ours", 4)
    ratio_pad = t("8x1024", "fwd+bwd", flash, 4) / t("8x1024", "fwd+bwd", "ours+pad", 4)
    ratio_db = t("8x1024", "fwd+bwd", flash) / t("8x1024", "fwd+bwd", "ours")
    dec = {B: nbytes / msg * 1e-6 / copy_gbs for B, name, ms, msg, msh, nbytes in decode_rows if name == "ours"}
    dec_launch = {B: nbytes / ms * 1e-6 / copy_gbs for B, name, ms, msg, msh, nbytes in decode_rows if name == "ours"}
    floor = {B: nbytes / msg * 1e-6 / copy_gbs
             for B, name, ms, msg, msh, nbytes in decode_rows if name.startswith("read")}
    lines += ["", "Targets (H100), on the kernels' time (graph): fwd+bwd at T = 1024 at least as fast as SDPA flash: "
              f"**{ratio:.2f}x** its speed unpadded, {ratio_pad:.2f}x with padding "
              f"({'met' if ratio >= 1 else 'NOT met'}; do_bench, launch overhead included: {ratio_db:.2f}x); "
              "decode at least 70% of the copy bandwidth: "
              + ", ".join(f"B={B} **{100 * f:.0f}%**" for B, f in dec.items())
              + f" ({'met' if all(f >= 0.7 for f in dec.values()) else 'NOT met'}; do_bench: "
              + ", ".join(f"B={B} {100 * f:.0f}%" for B, f in dec_launch.items()) + "; a plain read of the same bytes "
              "in one launch: " + ", ".join(f"B={B} {100 * f:.0f}%" for B, f in floor.items()) + ")."]
    md = "\n".join(lines)
    if not args.no_write:
        write_section("attention", md)
    print(md)

    # compact table last
    names = ["ours", "ours+pad", flash, "sdpa-efficient+pad", "eager+pad"]
    print(f"\n{env}\nms, graph (do_bench) " + " ".join(f"{n[:15]:>17}" for n in names))
    for B, T in TRAIN_SHAPES:
        for pas in ("fwd", "bwd", "fwd+bwd"):
            print(f"{B}x{T} {pas:13}" + " ".join(f"{t(f'{B}x{T}', pas, n, 4):7.3f} ({t(f'{B}x{T}', pas, n):7.3f})"
                                                for n in names))
    for B, name, ms, ms_graph, ms_host, nbytes in decode_rows:
        print(f"decode B={B:<3} {name:20} graph {ms_graph * 1e3:6.1f} us ({100 * nbytes / ms_graph * 1e-6 / copy_gbs:3.0f}%"
              f" of copy bw)  do_bench {ms * 1e3:6.1f} us  back-to-back {ms_host * 1e3:6.1f} us")
    print(lines[-1])


if __name__ == "__main__":
    main()
