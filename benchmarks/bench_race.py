"""Speed race: minirlhf's PPO step (train_ppo.py --critic separate) against TRL's PPOTrainer (0.29.1, the last TRL
with PPO) and TRL's current GRPOTrainer and RLOOTrainer, on identical work, on this machine's CPU.

Identical work per RL step: ``--batch`` completions of exactly ``--new-tokens`` tokens (no early EOS) for the same
prompt token ids, scored by a reward model of the policy's size, with a frozen reference model, then ``--epochs``
passes over the batch as one minibatch; PPO also trains a separate critic of the same size; GRPO / RLOO draw
``--batch / --group`` prompts with ``--group`` completions each (so the same completions per step) and have
beta > 0 (the reference model runs). Random weights of ``--model-size`` shape (``small`` = GPT-2 124M); no
checkpoints, no evaluation, no logging service. The same precision on every side (``--precision``; bf16 = autocast on
CPU, minirlhf's log-probs still fp32). TRL lives in virtual environments this script builds and caches under
~/.cache/minirlhf/race-venv (torch==2.13.0 from the local CPU wheel, plus trl), never in minirlhf's dependencies;
benchmarks/_race_trl.py is what runs there.

Each system runs in its own process (peak memory = that process's peak RSS), ``--steps`` RL steps each (the first is
the warm-up, dropped), the systems interleaved over ``--rounds`` rounds (the order reversed every other round).
Every result is checked before its times are used: the step count, every response at full length, finite losses.
The table: seconds per step (median of the steps after the warm-up, per round), completions and tokens per second,
minirlhf's phase split (train_ppo.py's time_generate / time_score / time_logprobs / time_train), peak RSS, and the
ratios to TRL PPO.

    python -m benchmarks.bench_race                              # GPT-2 124M shapes, 2 rounds: writes RESULTS.md
    python -m benchmarks.bench_race --model-size tiny --steps 2 --rounds 1 --no-write          # a smoke run
"""
import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
TRL_RUNNER = REPO / "benchmarks" / "_race_trl.py"
VENV_ROOT = pathlib.Path.home() / ".cache" / "minirlhf" / "race-venv"
TORCH = "torch==2.13.0"  # the CPU wheel on this machine's disk (a bare "torch" would download the CUDA build)
TRL_PPO = "0.29.1"  # the last TRL with PPO (trl.experimental.ppo.PPOTrainer)
TRL_LATEST = "1.16.0"  # the newest TRL when this was written: GRPOTrainer, RLOOTrainer
SYSTEMS = {  # name: (what it is, the TRL version whose venv runs it; None = this repository's interpreter)
    "minirlhf": ("minirlhf train_ppo.py --critic separate", None),
    "trl-ppo": ("TRL PPOTrainer (trl.experimental.ppo)", TRL_PPO),
    "trl-grpo": ("TRL GRPOTrainer (beta > 0)", TRL_LATEST),
    "trl-rloo": ("TRL RLOOTrainer (beta > 0)", TRL_LATEST),
}
SIZES = {  # GPT-2 shapes, the full 50,257-token vocabulary
    "small": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),  # GPT-2 124M
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=128),  # a smoke run
}
PHASES = ("time_generate", "time_score", "time_logprobs", "time_train")
RESULT_TAG = "RACE_RESULT "

# ---------------------------------------------------------------------------------------------------------------------
# TRL's environments


def trl_python(version: str) -> pathlib.Path:
    """The Python of a virtual environment holding torch (CPU) and trl==version; built on first use, then cached
    (a ``ready.json`` written after a successful install marks it done)."""
    venv = VENV_ROOT / f"trl-{version}"
    python, ready = venv / "bin" / "python", venv / "ready.json"
    requirements = [TORCH, f"trl=={version}"]
    if ready.exists() and json.loads(ready.read_text()) == requirements:
        return python
    print(f"building {venv}: pip install {' '.join(requirements)}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], check=True)
    ready.write_text(json.dumps(requirements))
    return python


# ---------------------------------------------------------------------------------------------------------------------
# One system, in its own process


def worker_minirlhf(spec: dict) -> dict:
    """minirlhf's side (in a child process): train_ppo.main on random-weight models written by bench_ppo_step."""
    import torch

    import train_ppo
    from benchmarks.bench_ppo_step import inputs, write_inputs
    from minirlhf.model import GPTConfig
    from minirlhf.run import Run

    # no checkpoint on either side (TRL: save_strategy="no"): a save holds the weights and optimizer state as bytes,
    # which would set this process's peak memory, not the training
    Run.checkpoint = lambda self, step, save: None
    with tempfile.TemporaryDirectory() as tmp:
        write_inputs(tmp, GPTConfig(**SIZES[spec["model_size"]]), seed=spec["seed"])
        out = f"{tmp}/ppo"
        bf16 = spec["precision"] == "bf16"
        train_ppo.main(train_ppo.Config(
            **inputs(tmp), out=out, steps=spec["steps"], batch_size=spec["batch"], max_new_tokens=spec["new_tokens"],
            ppo_epochs=spec["epochs"], num_minibatches=1, critic="separate", device="cpu", threads=spec["threads"],
            bf16=bf16, cpu_bf16=bf16, sample_every=0, seed=spec["seed"]))
        records = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    import minirlhf

    return dict(step_times=[sum(r[k] for k in PHASES) for r in records],
                phases={k: [r[k] for r in records] for k in PHASES},
                response_len=[r["response_len"] for r in records],
                losses=[r[k] for r in records for k in ("policy_loss", "value_loss")],
                threads=torch.get_num_threads(),
                versions=f"minirlhf {getattr(minirlhf, '__version__', '?')}, torch {torch.__version__}")


def run_system(system: str, spec: dict) -> dict:
    """Run one system for spec["steps"] RL steps in a child process; its result, with the child's peak RSS."""
    version = SYSTEMS[system][1]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MINIRLHF_NO_PROGRESS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if version is None:
        cmd, cwd = [sys.executable, "-m", "benchmarks.bench_race", "--worker", json.dumps(spec)], REPO
    else:  # outside the repository: its kernels/ would shadow Hugging Face's package of that name, which TRL imports
        cmd, cwd = [str(trl_python(version)), str(TRL_RUNNER), json.dumps({**spec, "system": system})], VENV_ROOT
        env.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        raise RuntimeError(f"{system} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
    return {**json.loads(lines[-1][len(RESULT_TAG):]), "system": system}


# ---------------------------------------------------------------------------------------------------------------------
# Checks and the table (pure functions)


def check_result(result: dict, steps: int, new_tokens: int, precision: str = "") -> list[str]:
    """What is wrong with one system's result (empty when sane): a step time per RL step, every response at the
    full ``new_tokens`` (a mean length within half a token: minirlhf cannot forbid EOS, which random weights sample
    about once in 50,000 tokens), finite losses, and where the runner saw them, the matmul dtypes of ``precision``."""
    name, problems = result["system"], []
    seen = result.get("matmul_dtypes")
    want = {"fp32": ["torch.float32"], "bf16": ["torch.bfloat16"]}.get(precision)
    if seen is not None and want is not None and want[0] not in seen:
        problems.append(f"{name}: asked for {precision}, its matmuls ran in {seen}")
    if len(result["step_times"]) != steps or not all(t > 0 for t in result["step_times"]):
        problems.append(f"{name}: {len(result['step_times'])} step times for {steps} steps: {result['step_times']}")
    if len(result["response_len"]) != steps or any(abs(n - new_tokens) > 0.5 for n in result["response_len"]):
        problems.append(f"{name}: mean response lengths {result['response_len']}, not {new_tokens} in each of "
                        f"{steps} steps")
    if not result["losses"] or not all(isinstance(x, (int, float)) and abs(x) < float("inf")
                                       for x in result["losses"]):
        problems.append(f"{name}: losses not all finite: {result['losses']}")
    return problems


def summarize(results: list[dict], batch: int, new_tokens: int) -> list[dict]:
    """One row per system, from its results (one per round): the median s/step after the warm-up step of each round,
    completions/s and tokens/s from the median over rounds, the phase medians, the largest peak RSS."""
    rows = []
    for system in SYSTEMS:
        mine = [r for r in results if r["system"] == system]
        if not mine:
            continue
        per_round = [statistics.median(r["step_times"][1:] or r["step_times"]) for r in mine]
        step = statistics.median(per_round)
        phases = None
        if mine[0].get("phases"):
            phases = {k: statistics.median(t for r in mine for t in (r["phases"][k][1:] or r["phases"][k]))
                      for k in PHASES}
        rows.append(dict(system=system, per_round=per_round, step=step, completions_s=batch / step,
                         tokens_s=batch * new_tokens / step, phases=phases,
                         peak_rss_gib=max(r["peak_rss_gib"] for r in mine), versions=mine[0]["versions"]))
    return rows


def markdown_table(rows: list[dict], baseline: str = "trl-ppo") -> str:
    base = next((r for r in rows if r["system"] == baseline), None)
    head = ("| system | s/step (per round) | completions/s | tokens/s | generate / score / log-probs / train s | "
            "peak RSS GiB | speed vs TRL PPO | memory vs TRL PPO |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        split = " / ".join(f"{r['phases'][k]:.2f}" for k in PHASES) if r["phases"] else "n/a"
        speed = f"{base['step'] / r['step']:.2f}x" if base else "n/a"
        memory = f"{r['peak_rss_gib'] / base['peak_rss_gib']:.2f}x" if base else "n/a"
        lines.append(f"| {SYSTEMS[r['system']][0]} ({r['versions']}) | "
                     + " / ".join(f"{t:.2f}" for t in r["per_round"])
                     + f" | {r['completions_s']:.2f} | {r['tokens_s']:.1f} | {split} | {r['peak_rss_gib']:.2f} | "
                       f"{speed} | {memory} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# The race


def cpu_description() -> str:
    """The CPU's model name, its usable cores and its bf16 matmul units, from /proc/cpuinfo (Linux)."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "CPU")
    units = [flag for flag in ("amx_bf16", "avx512_bf16") if f" {flag}" in info]
    return f"{name}, {len(os.sched_getaffinity(0))} cores, bf16 units: {', '.join(units) or 'none'}"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all systems")
    ap.add_argument("--steps", type=int, default=3, help="RL steps per system per round (the first is the warm-up)")
    ap.add_argument("--batch", type=int, default=32, help="completions per RL step")
    ap.add_argument("--group", type=int, default=4, help="GRPO/RLOO completions per prompt (batch/group prompts)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per completion (no early EOS)")
    ap.add_argument("--epochs", type=int, default=4, help="PPO epochs / GRPO-RLOO num_iterations, one minibatch")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads of every system")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="every side: fp32, or bf16 "
                    "autocast (minirlhf --cpu-bf16; TRL bf16=True)")
    ap.add_argument("--model-size", default="small", choices=tuple(SIZES), help="small = GPT-2 124M; tiny = smoke")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="print only; don't update RESULTS.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run minirlhf's side with this JSON spec
    args = ap.parse_args(argv)
    if args.batch % args.group:
        ap.error(f"--batch {args.batch} is not a multiple of --group {args.group}")
    return args


def prompt_ids() -> list[list[int]]:
    """bench_ppo_step's prompts as GPT-2 token ids: what every system is given."""
    from benchmarks.bench_ppo_step import PROMPTS
    from minirlhf.tokenizer import get_tokenizer

    tokenizer = get_tokenizer("gpt2")
    return [tokenizer.encode_prompt(p) for p in PROMPTS]


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        result = worker_minirlhf(spec)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        print(RESULT_TAG + json.dumps(result), flush=True)
        return

    systems = args.systems.split(",")
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown --systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    for version in sorted({SYSTEMS[s][1] for s in systems} - {None}):
        trl_python(version)
    spec = dict(model_size=args.model_size, **SIZES[args.model_size], vocab_size=50257, eos_id=50256,
                prompt_ids=prompt_ids(), batch=args.batch, group=args.group, new_tokens=args.new_tokens,
                epochs=args.epochs, steps=args.steps, threads=args.threads, precision=args.precision, seed=args.seed)
    results = []
    for r in range(args.rounds):
        for system in (systems if r % 2 == 0 else systems[::-1]):
            print(f"round {r + 1}/{args.rounds}: {system} ...", flush=True)
            result = run_system(system, spec)
            problems = check_result(result, args.steps, args.new_tokens, args.precision)
            if problems:
                raise SystemExit("insane result, not timed:\n" + "\n".join(problems))
            print(f"  s/step {', '.join(f'{t:.2f}' for t in result['step_times'])}; "
                  f"peak RSS {result['peak_rss_gib']:.2f} GiB", flush=True)
            results.append(result)

    from benchmarks._results import environment, write_section

    rows = summarize(results, args.batch, args.new_tokens)
    env = environment()
    table = markdown_table(rows)
    shape = "GPT-2 124M" if args.model_size == "small" else f"{args.model_size} GPT-2 ({SIZES[args.model_size]})"
    md = (f"## Speed race: minirlhf PPO vs TRL PPO, GRPO, RLOO (CPU, {args.precision})\n\n{env}; {cpu_description()}; "
          f"{args.threads} torch threads\n\n"
          f"{shape} shapes, random weights; policy, reference, reward model (and for PPO a separate critic) of "
          f"that size; {args.batch} completions x {args.new_tokens} new tokens per step (no early EOS; GRPO/RLOO "
          f"{args.batch // args.group} prompts x {args.group}), {args.epochs} epochs of one minibatch, "
          f"{args.precision}; each system in its own process, {args.rounds} interleaved rounds of {args.steps} "
          f"steps, median of steps 2..{args.steps}. The phase split is minirlhf's (train_ppo.py's timers); "
          f"TRL's rows are wall time per step from a trainer callback.\n\n{table}")
    print(env, cpu_description(), sep="; ")
    print(table)
    if not args.no_write:
        write_section(f"race-cpu-{args.model_size}-{args.precision}", md)


if __name__ == "__main__":
    main()
