"""Benchmark of the log-prob kernels (issue 7) on GPT-2 124M shapes, against torch eager, torch.compile and the peers.

What is timed (bf16 inputs, V = 50257, d = 768, N = 8 x 1024 and 64 x 512 tokens, a random incoming gradient):

* LM head fused: per-token log-probs of hidden (N x d) @ W^T (V x d) and the gradients to hidden and W.
  eager = logits, then log_softmax in fp32, then gather (what a plain model does); compile = torch.compile of that;
  ours = kernels.lm_head_logprobs with matmul="torch" (cuBLAS chunks + Triton) and matmul="triton" (fused tiles);
  TRL = trl.kernels.ChunkedLogProbFunction (chunk 32768, as its trainer uses it); Liger = liger-kernel's fused linear
  cross-entropy with reduction="none" (-loss per token). Limit: 6 N d V FLOPs (2 forward, 4 backward) at the bf16
  matmul rate measured here.
* From logits: per-token log-probs of bf16 logits (N x V) and the gradient to the logits. eager / compile as above;
  ours = kernels.logprobs.token_logprobs; TRL = trl.kernels.selective_log_softmax_and_entropy (computes the entropy too;
  so does the "ours + entropy" row); Liger = liger_cross_entropy(reduction="none"). Limit: bytes (forward reads the
  logits, backward reads them and writes their gradient) at the device-copy rate measured here.

Method: correctness first (each implementation against an fp32 reference on a smaller problem; a wrong one is not
timed), then ``triton.testing.do_bench`` medians of forward, and of forward + backward (backward = their difference,
so that no graph is replayed with retain_graph). Peak memory = torch.cuda.max_memory_allocated during one forward +
backward, above what the inputs already held (reset between cases). The two hardware limits are measured once by the
same script: an 8192^3 bf16 matmul and a 1 GiB device copy (bytes read + written).

Run: ``python -m benchmarks.bench_logprobs`` on a GPU (``--quick`` for one shape, ``--out DIR`` to also write the
markdown section and a JSON-lines log there). Writes the ``logprobs`` section of benchmarks/RESULTS.md. On a CPU it
only smoke-tests the code paths on tiny shapes (Triton interpreter) and writes nothing.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time
import types

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU smoke test only

import triton  # noqa: E402

from benchmarks._results import environment, write_section  # noqa: E402
from kernels.lm_head_logprobs import CHUNK_BYTES, DH_MODE, DH_MODES, LMHeadLogprobsFunction, _lm_head_bwd, \
    _lm_head_fwd  # noqa: E402
from kernels.logprobs import GPU_TILES, TokenLogprobsFunction  # noqa: E402


@dataclasses.dataclass
class Config:
    quick: bool = False  # only N = 8 x 1024
    out: str = ""        # also write results_section.md and bench.jsonl here
    keep_going: bool = False  # time our kernels even if a correctness check failed (reported in the table)
    no_compile: bool = False  # skip torch.compile
    no_write: bool = False    # do not touch benchmarks/RESULTS.md


# ----------------------------------------------------------------------------------------------------------------------
# measuring

def bench_ms(fn, grad_to_none=None) -> float:
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mb(fn) -> float:
    """Peak memory above what was allocated before, during one call of fn (a forward + backward)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def hardware_limits():
    """(bf16 matmul TFLOP/s, device copy GB/s counting read + write), measured here."""
    if not torch.cuda.is_available():
        return float("nan"), float("nan")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tflops = 2 * 8192 ** 3 / (bench_ms(lambda: a @ b) * 1e-3) / 1e12
    del a, b
    x = torch.randn(2 ** 29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    gbs = 2 * x.numel() * 2 / (bench_ms(lambda: y.copy_(x)) * 1e-3) / 1e9
    return tflops, gbs


# ----------------------------------------------------------------------------------------------------------------------
# implementations: each maps inputs to per-token logp (fp32 or not), differentiable

def eager_lm_head(h, W, t):
    logits = h @ W.t()
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


def eager_logits(x, t):
    return torch.log_softmax(x.float(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


def ours_lm_head(h, W, t, *, matmul="triton", config=None, chunk_bytes=CHUNK_BYTES, dh_mode=DH_MODE, entropy=False):
    """kernels.lm_head_logprobs' Triton path under a launch plan of the benchmark's choosing (the public function fixes
    it): logp, + the entropy when ``entropy``."""
    logp, ent = LMHeadLogprobsFunction.apply(h, W, t, None, 1.0, matmul, None, chunk_bytes, config, dh_mode)
    return logp + ent if entropy else logp


def ours_logits(x, t, *, tiles=None, entropy=False):
    """kernels.logprobs.token_logprobs' Triton path with these tiles (None: GPU_TILES): logp, + the entropy."""
    logp, ent = TokenLogprobsFunction.apply(x, t, None, 1.0, tiles or GPU_TILES, entropy)
    return logp + ent if entropy else logp


def load_peers():
    """{name: (lm_head_fn or None, logits_fn or None)} for the peers that import, and {name: why not} for the rest."""
    peers, missing = {}, {}
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy
        # its backward imports trl.trainer.utils (for a DeepSpeed context) which needs `datasets`; give it the no-op
        if "trl.trainer.utils" not in sys.modules:
            try:
                import trl.trainer.utils  # noqa: F401
            except ImportError:
                stub = types.ModuleType("trl.trainer.utils")
                stub.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
                sys.modules["trl.trainer.utils"] = stub
        peers["TRL"] = (lambda h, W, t: ChunkedLogProbFunction.apply(h, W, None, t, 1.0, 32768, None, 1.0, ())[0],
                        lambda x, t: selective_log_softmax_and_entropy(x, t)[0])
    except ImportError as e:
        missing["TRL"] = f"not installable here ({e.__class__.__name__}: {e})"
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy, liger_fused_linear_cross_entropy
        peers["Liger"] = (lambda h, W, t: -liger_fused_linear_cross_entropy(h, W, t, reduction="none"),
                          lambda x, t: -liger_cross_entropy(x, t, reduction="none"))
    except ImportError as e:
        missing["Liger"] = f"not installable here ({e.__class__.__name__}: {e})"
    return peers, missing


def impls(cfg, peers, fused_config=None, tiles=None, chunk_bytes=CHUNK_BYTES, dh_mode=DH_MODE):
    """{"lm_head": [(name, fn)], "logits": [(name, fn)]} in the order they are timed."""
    lm = [("torch eager", eager_lm_head)]
    lg = [("torch eager", eager_logits)]
    fused = dict(matmul="triton", config=fused_config, chunk_bytes=chunk_bytes, dh_mode=dh_mode)
    lm += [
        ("ours (fused tiles)", lambda h, W, t: ours_lm_head(h, W, t, **fused)),
        ("ours (cuBLAS chunks)", lambda h, W, t: ours_lm_head(h, W, t, matmul="torch", dh_mode=dh_mode)),
        ("ours + entropy", lambda h, W, t: ours_lm_head(h, W, t, entropy=True, **fused)),
    ]
    lg += [
        ("ours", lambda x, t: ours_logits(x, t, tiles=tiles)),
        ("ours + entropy", lambda x, t: ours_logits(x, t, tiles=tiles, entropy=True)),
    ]
    for name, (lm_fn, lg_fn) in peers.items():
        lm.append((name, lm_fn))
        lg.append((f"{name} (+ entropy)" if name == "TRL" else name, lg_fn))
    if torch.cuda.is_available() and not cfg.no_compile:  # last: its compilation is the slowest part of the run
        lm.append(("torch.compile", torch.compile(eager_lm_head)))
        lg.append(("torch.compile", torch.compile(eager_logits)))
    return {"lm_head": lm, "logits": lg}


# ----------------------------------------------------------------------------------------------------------------------
# tuning (on the first shape): block shapes of our kernels, the vocabulary chunk, and where the backward's time goes

FUSED_CONFIGS = [  # (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages, dot precision) tried for matmul="triton"
    (128, 256, 64, 8, 4, "tf32"),
    (128, 256, 64, 8, 3, "tf32"),
    (128, 256, 32, 8, 5, "tf32"),
]
FWD_TILES = [(4096, 8), (2048, 4), (8192, 16), (4096, 4)]  # from logits, forward (BLOCK_V, num_warps)
BWD_TILES = [(2048, 4), (4096, 8), (1024, 4), (2048, 8)]   # from logits, backward
CHUNKS = [128 * 2 ** 20, 256 * 2 ** 20, 512 * 2 ** 20]      # bytes of one vocabulary chunk of dz (backward)


def tune(record, gbs, n=8 * 1024, d=768, V=50257, device="cuda", dtype=torch.bfloat16):
    """Returns (fused matmul config, from-logits tiles, chunk bytes): the fastest tried, each recorded."""
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    W = (torch.randn(V, d, generator=gen) * 0.07).to(device, dtype).requires_grad_()
    t = torch.randint(0, V, (n,), generator=gen).to(device)
    g = torch.randn(n, generator=gen).to(device)

    def timed(kind, make_fwd, **info):
        try:
            fwd = bench_ms(make_fwd, grad_to_none=[h, W])
            both = bench_ms(lambda: (make_fwd() * g).sum().backward(), grad_to_none=[h, W])
            mem = peak_extra_mb(lambda: (make_fwd() * g).sum().backward())
            h.grad = W.grad = None
            record(kind=kind, fwd_ms=fwd, both_ms=both, peak_mib=mem, **info)
            return both
        except Exception as e:  # a block shape that does not compile or fit here is skipped, and said so
            h.grad = W.grad = None
            record(kind=kind, status=f"{e.__class__.__name__}: {str(e)[:200]}", **info)
            return float("inf")

    best = min(FUSED_CONFIGS, key=lambda c: timed(
        "tune_fused", lambda: ours_lm_head(h, W, t, config=c), config=c))
    chunk = min(CHUNKS, key=lambda cb: timed(
        "tune_chunk", lambda: ours_lm_head(h, W, t, config=best, chunk_bytes=cb), chunk_bytes=cb))
    dh_mode = min(DH_MODES, key=lambda mode: timed(
        "tune_dh", lambda: ours_lm_head(h, W, t, config=best, chunk_bytes=chunk, dh_mode=mode), dh_mode=mode))

    # where the fused backward's time goes: dz kernel alone, + dh, + dW (no autograd, the internal launchers)
    hd, Wd = h.detach(), W.detach()
    logp, ent, lse = _lm_head_fwd(hd, Wd, t, None, 1.0, "triton", None, chunk, best)
    for need_dh, need_dw in ((False, False), (True, False), (False, True), (True, True)):
        ms = bench_ms(lambda: _lm_head_bwd(hd, Wd, t, None, lse, ent, g, None, 1.0, need_dh, need_dw, "triton", None,
                                           chunk, best, dh_mode))
        record(kind="profile_bwd", dh=need_dh, dW=need_dw, ms=ms)
    del h, W, hd, Wd

    x = (torch.randn(n, V, generator=gen) * 3).to(device, dtype).requires_grad_()
    fwd_times = {}
    for ft in FWD_TILES:
        tiles = ft + GPU_TILES[2:]
        fwd_times[ft] = bench_ms(lambda: ours_logits(x, t, tiles=tiles), grad_to_none=[x])
        record(kind="tune_logits_fwd", tiles=ft, fwd_ms=fwd_times[ft],
               pct_bw=100 * n * V * 2 / (fwd_times[ft] * 1e-3) / (gbs * 1e9))
    best_fwd = min(fwd_times, key=fwd_times.get)
    both_times = {}
    for bt in BWD_TILES:
        tiles = best_fwd + bt
        both_times[bt] = bench_ms(lambda: (ours_logits(x, t, tiles=tiles) * g).sum().backward(), grad_to_none=[x])
        record(kind="tune_logits_bwd", tiles=bt, both_ms=both_times[bt], bwd_ms=both_times[bt] - fwd_times[best_fwd])
    best_bwd = min(both_times, key=both_times.get)
    del x
    if device == "cuda":
        torch.cuda.empty_cache()
    return best, best_fwd + best_bwd, chunk, dh_mode


# ----------------------------------------------------------------------------------------------------------------------
# correctness first

def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_lm_head(name, fn, device, n=512, V=50257, d=768):
    gen = torch.Generator().manual_seed(0)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        n, V, d = 16, 1271, 32
    h = torch.randn(n, d, generator=gen).to(device, dt).requires_grad_()
    W = (torch.randn(V, d, generator=gen) * d ** -0.5 * 2).to(device, dt).requires_grad_()
    t = torch.randint(0, V, (n,), generator=gen).to(device)
    g = torch.randn(n, generator=gen).to(device)
    h32, W32 = h.detach().float().requires_grad_(), W.detach().float().requires_grad_()
    ref = torch.log_softmax(h32 @ W32.t(), -1).gather(-1, t[:, None]).squeeze(-1)
    if name == "ours + entropy":
        logq = torch.log_softmax(h32 @ W32.t(), -1)
        ref = ref - (logq.exp() * logq).sum(-1)
    (ref * g).sum().backward()
    out = fn(h, W, t)
    (out.float() * g).sum().backward()
    errs = {"out": rel_err(out, ref), "dh": rel_err(h.grad, h32.grad), "dW": rel_err(W.grad, W32.grad)}
    return errs, all(e < 2e-2 for e in errs.values())


def check_logits(name, fn, device, n=256, V=50257):
    gen = torch.Generator().manual_seed(1)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        n, V = 16, 1271
    x = (torch.randn(n, V, generator=gen) * 3).to(device, dt).requires_grad_()
    t = torch.randint(0, V, (n,), generator=gen).to(device)
    g = torch.randn(n, generator=gen).to(device)
    x32 = x.detach().float().requires_grad_()
    logq = torch.log_softmax(x32, -1)
    ref = logq.gather(-1, t[:, None]).squeeze(-1)
    if name == "ours + entropy":
        ref = ref - (logq.exp() * logq).sum(-1)
    (ref * g).sum().backward()
    out = fn(x, t)
    (out.float() * g).sum().backward()
    errs = {"out": rel_err(out, ref), "dlogits": rel_err(x.grad, x32.grad)}
    return errs, all(e < 2e-2 for e in errs.values())


# ----------------------------------------------------------------------------------------------------------------------
# one case

def run_case(fn, inputs, targets, g):
    """(fwd ms, bwd ms, fwd+bwd ms, peak extra MiB of fwd+bwd)."""
    def fwd():
        fn(*inputs, targets)

    def fwd_bwd():
        (fn(*inputs, targets).float() * g).sum().backward()

    t_fwd = bench_ms(fwd, grad_to_none=list(inputs))
    t_both = bench_ms(fwd_bwd, grad_to_none=list(inputs))
    for x in inputs:
        x.grad = None
    mem = peak_extra_mb(fwd_bwd)
    for x in inputs:
        x.grad = None
    return t_fwd, t_both - t_fwd, t_both, mem


def main(cfg: Config) -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment()
    print(env, flush=True)
    out_dir = pathlib.Path(cfg.out) if cfg.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = open(out_dir / "bench.jsonl", "a") if out_dir else None

    t_start = time.perf_counter()

    def record(**kw):
        kw["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        print(json.dumps(kw), flush=True)
        if log:
            log.write(json.dumps(kw) + "\n")
            log.flush()

    tflops, gbs = hardware_limits()
    record(kind="limits", tflops=tflops, gbs=gbs)
    peers, missing = load_peers() if device == "cuda" else ({}, {"TRL": "GPU only here", "Liger": "GPU only here"})
    for name, why in missing.items():
        record(kind="peer", name=name, status=why)
    fused_config, tiles, chunk_bytes, dh_mode = None, None, CHUNK_BYTES, DH_MODE
    if device == "cuda":
        fused_config, tiles, chunk_bytes, dh_mode = tune(record, gbs)
    candidates = impls(cfg, peers, fused_config, tiles, chunk_bytes, dh_mode)

    # 1. correctness first
    ok = {}
    for what, check in (("lm_head", check_lm_head), ("logits", check_logits)):
        for name, fn in candidates[what]:
            try:
                errs, good = check(name, fn, device)
            except Exception as e:  # a peer that breaks on this stack is reported, not timed
                errs, good = {"error": f"{e.__class__.__name__}: {str(e)[:200]}"}, False
            ok[(name, what)] = good
            record(kind="check", impl=name, what=what, ok=good, **errs)
    ours_ok = all(v for (name, _), v in ok.items() if name.startswith("ours"))
    if not ours_ok and not cfg.keep_going:
        raise SystemExit("correctness check of our kernels failed: not timing")

    # 2. timing
    d, V = 768, 50257
    shapes = [8 * 1024] if cfg.quick else [8 * 1024, 64 * 512]
    if device == "cpu":
        shapes, d, V = [64], 32, 1271
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for n in shapes:
        gen = torch.Generator().manual_seed(n)
        t = torch.randint(0, V, (n,), generator=gen).to(device)
        g = torch.randn(n, generator=gen).to(device)
        for what in ("lm_head", "logits"):
            if what == "lm_head":
                inputs = (torch.randn(n, d, generator=gen).to(device, dt).requires_grad_(),
                          (torch.randn(V, d, generator=gen) * d ** -0.5 * 2).to(device, dt).requires_grad_())
            else:
                inputs = ((torch.randn(n, V, generator=gen) * 3).to(device, dt).requires_grad_(),)
            for name, fn in candidates[what]:
                row = dict(kind="time", what=what, n=n, impl=name, correct=ok.get((name, what), False))
                if not row["correct"] and not name.startswith("ours"):
                    row.update(status="failed the correctness check: not timed")
                else:
                    try:
                        t0 = time.perf_counter()
                        fwd, bwd, both, mem = run_case(fn, inputs, t, g)
                        row.update(fwd_ms=fwd, bwd_ms=bwd, both_ms=both, peak_mib=mem,
                                   wall_s=round(time.perf_counter() - t0, 1))
                    except torch.cuda.OutOfMemoryError as e:
                        row.update(status=f"out of memory: {str(e)[:120]}")
                    except Exception as e:  # reported in the table; the other cases still run
                        row.update(status=f"error {e.__class__.__name__}: {str(e)[:200]}")
                    finally:
                        for x in inputs:
                            x.grad = None
                        torch.cuda.empty_cache() if device == "cuda" else None
                rows.append(row)
                record(**row)
                if out_dir:  # keep a current copy: a run cut short still leaves its table
                    (out_dir / "results_section.md").write_text(
                        markdown(env, tflops, gbs, rows, missing, d, V, fused_config, tiles, chunk_bytes, dh_mode))
            del inputs
    md = markdown(env, tflops, gbs, rows, missing, d, V, fused_config, tiles, chunk_bytes, dh_mode)
    print(md)
    if device == "cuda":
        if out_dir:
            (out_dir / "results_section.md").write_text(md)
        if not cfg.no_write:
            write_section("logprobs", md)
    print(table(rows, tflops, gbs, d, V))
    return md


# ----------------------------------------------------------------------------------------------------------------------
# reporting

def _limit_frac(row, mode, tflops, gbs, d, V):
    n, ms = row["n"], row[f"{mode}_ms"]
    if row["what"] == "lm_head":
        flops = {"fwd": 2, "bwd": 4, "both": 6}[mode] * n * d * V
        return flops / (ms * 1e-3) / (tflops * 1e12)
    nbytes = {"fwd": 1, "bwd": 2, "both": 3}[mode] * n * V * 2  # bf16 logits read (+ gradient written)
    return nbytes / (ms * 1e-3) / (gbs * 1e9)


def markdown(env, tflops, gbs, rows, missing, d, V, fused_config=None, tiles=None, chunk_bytes=None, dh_mode=None):
    lines = [
        "## Log-probs of sampled tokens (kernels/logprobs.py, kernels/lm_head_logprobs.py)",
        "",
        f"Device and versions: {env}.",
        f"Measured limits: bf16 matmul {tflops:.0f} TFLOP/s (8192^3), device copy {gbs:.0f} GB/s (1 GiB, read + write).",
        f"GPT-2 124M shapes: d = {d}, V = {V}, bf16 inputs, random incoming gradient; times are do_bench medians (ms); "
        "bwd = (fwd+bwd) - fwd; peak = extra memory during one fwd+bwd; limit = LM head: 6NdV FLOPs at the matmul "
        "rate; from logits: bytes (read logits, write their gradient) at the copy rate.",
        "",
    ]
    for name, why in missing.items():
        lines.append(f"- {name}: {why}.")
    if fused_config:
        lines.append(f"- ours (fused tiles): block shapes (BLOCK_N, BLOCK_V, BLOCK_K, warps, stages) = "
                     f"{tuple(fused_config[:5])}, vocabulary chunk of dz {chunk_bytes // 2 ** 20} MiB, dh accumulated "
                     f"by \"{dh_mode}\": the fastest of {len(FUSED_CONFIGS)}, {len(CHUNKS)} and {len(DH_MODES)} tried by "
                     f"this script (N = 8192).")
    if tiles:
        lines.append(f"- ours (from logits): (BLOCK_V, warps) = {tiles[:2]} forward, {tiles[2:]} backward, the fastest of "
                     f"{len(FWD_TILES)} and {len(BWD_TILES)} tried by this script (N = 8192).")
    for what, title in (("lm_head", "LM head fused (hidden, W -> logp; grads to hidden and W)"),
                        ("logits", "From logits (logits -> logp; grad to logits)")):
        lines += ["", f"### {title}", "",
                  "| N | implementation | fwd ms | bwd ms | fwd+bwd ms | vs eager | peak MiB | % of limit (fwd+bwd) |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            if row["what"] != what:
                continue
            if "both_ms" not in row:
                lines.append(f"| {row['n']} | {row['impl']} | {row.get('status', '')} | | | | | |")
                continue
            eager = next((r for r in rows if r["what"] == what and r["n"] == row["n"] and r["impl"] == "torch eager"
                          and "both_ms" in r), None)
            speed = f"{eager['both_ms'] / row['both_ms']:.2f}x" if eager else "-"
            flag = "" if row["correct"] else " (FAILED CHECK)"
            lines.append(f"| {row['n']} | {row['impl']}{flag} | {row['fwd_ms']:.3f} | {row['bwd_ms']:.3f} | "
                         f"{row['both_ms']:.3f} | {speed} | {row['peak_mib']:.0f} | "
                         f"{100 * _limit_frac(row, 'both', tflops, gbs, d, V):.0f}% |")
    return "\n".join(lines) + "\n"


def table(rows, tflops, gbs, d, V):
    out = [f"{'what':8} {'N':>6} {'impl':24} {'fwd':>8} {'bwd':>8} {'both':>8} {'MiB':>8} {'%lim':>5}"]
    for r in rows:
        if "both_ms" in r:
            out.append(f"{r['what']:8} {r['n']:6d} {r['impl'][:24]:24} {r['fwd_ms']:8.3f} {r['bwd_ms']:8.3f} "
                       f"{r['both_ms']:8.3f} {r['peak_mib']:8.0f} {100 * _limit_frac(r, 'both', tflops, gbs, d, V):5.0f}")
        else:
            out.append(f"{r['what']:8} {r['n']:6d} {r['impl'][:24]:24} {r.get('status', '')[:60]}")
    return "\n".join(out)


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name.replace('_', '-')}", action="store_true")
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", default=f.default)
    return Config(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    main(parse_args())
