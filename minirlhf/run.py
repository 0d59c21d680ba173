"""The run layer: the machinery every script shares, so that a script shows only its algorithm.

A trainer's ``main`` calls it in a handful of places::

    with Run(cfg, stage="sft", writes=FILES, inputs=[cfg.init], data=[cfg.data]) as run:  # --out claimed, locked
        model = ...; nll_of = run.wrap(model, sft_nll); optimizer = ...   # torchrun: DDP / FSDP; alone: sft_nll
        start = run.restore(model, optimizer)            # --resume: weights, optimizer, RNG; else 0
        for step in run.steps(start, total, "sft"):     # the progress bar
            loss = nll_of(*collate(run.shard(batch))) / n; loss.backward()    # torchrun: this rank's share
            grad_norm = run.optimizer_step(optimizer, model.parameters(), cfg.grad_clip)   # skipped if not finite
            run.log(step + 1, loss=loss, grad_norm=grad_norm)                             # metrics.jsonl, the bar
            run.checkpoint(step + 1, save)   # every --save-every, at the end, and on SIGTERM / SIGINT

What it promises, so that no run loses or corrupts a user's work:

- **The output folder is the run's own.** ``--out`` may be new, empty, or a run of the same stage (continued with
  ``--resume``, or started over with ``--overwrite``); anything else is refused unless ``--overwrite``, and
  ``--overwrite`` removes only the files this stage writes (``writes``), never a folder or a file of the user's.
  ``--out`` equal to or inside one of the run's inputs (``--init``, ``--policy``, ``--reward``) is refused. Nothing
  outside ``--out`` is touched. ``run.json`` names the stage that owns the folder.
- **One writer.** ``.lock`` (an ``flock``, with the holder's pid and host in it) refuses a second run on the same
  ``--out``; a lock left by a dead process is taken over, with a note.
- **Finite or nothing.** An optimizer step whose gradient norm is not finite is skipped (weights untouched), counted
  (``skipped_steps`` in metrics.jsonl) and reported; ``--max-skipped-steps`` in a row stop the run (exit 3). A
  checkpoint with a non-finite tensor is never written (:func:`minirlhf.checkpoint.save_checkpoint`).
- **SIGTERM and SIGINT** (a scheduler's preemption, Ctrl-C) finish the current step, save a resumable checkpoint,
  say which step, and exit 143 / 130; ``--resume`` then continues exactly. A second signal stops at once.
- **A full disk** or a permission error while saving is one line naming the cause; the previous checkpoint is intact
  (:func:`minirlhf.checkpoint.write_files`). A log line torn by a crash is dropped, with a note, on ``--resume``.
- **Exact resumption.** The training state carries the step, the RNG states, the run's named generators and a digest
  of its data files: ``--resume`` refuses other flags (except ``may_change``) and edited data.

Under ``torchrun`` (:mod:`minirlhf.distributed`) every rank seeds ``--seed + rank`` (pitfall 10) and trains on its
share of each global batch (``run.shard``) with the model ``run.wrap`` returns (DDP, or FSDP2 with ``--fsdp``); rank 0
alone prints, locks, logs and saves, and the others learn its outcome (a refused --out stops all). ``run.log`` averages
each metric over the ranks; a signal to any rank stops all of them after the same step; checkpoints hold whole
tensors and every rank's random state, and record ``world_size`` (``--resume`` needs the same one).
"""
import contextlib
import ctypes
import ctypes.util
import datetime
import fcntl
import hashlib
import json
import math
import os
import pathlib
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from minirlhf import distributed
from minirlhf.checkpoint import STAGING, finish_save, load_training_state, read_meta, save_checkpoint, write_files
from minirlhf.config import UserError, option, to_dict
from minirlhf.distributed import all_max, all_sum, gathered, rank, world_size  # noqa: F401 (the scripts' imports)
from minirlhf.hf import read_weights

# ---------------------------------------------------------------------------------------------------------------------
# The flags every run takes


@dataclass
class RunConfig:
    """Flags of every script: where its output goes and on what machine it runs."""

    out: str = option("out", "output folder; a folder holding anything but this stage's own output is refused "
                             "unless --overwrite", group="run")
    overwrite: bool = option(False, "start over in --out: replaces only the files this stage writes", group="run")
    seed: int = option(0, "random seed (each torchrun rank uses seed + rank)", group="run")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto (cuda when available)", group="run")
    threads: int = option(0, "torch CPU threads (0 = $OMP_NUM_THREADS if set, else one per core not already busy, "
                             "so a shared machine is not oversubscribed)", group="run")


@dataclass
class TrainRunConfig(RunConfig):
    """Flags of every trainer: resumable checkpoints and the guard against non-finite steps."""

    resume: bool = option(False, "continue the run in --out exactly where it stopped (same flags and data; the "
                                 "step count may grow)", group="run")
    save_every: int = option(0, "also save a resumable checkpoint every N steps (0 = at the end, and on SIGTERM / "
                                "Ctrl-C)", group="run")
    max_skipped_steps: int = option(5, "stop the run after this many optimizer steps in a row with a non-finite "
                                       "loss or gradient (each is skipped, the weights untouched)", group="run")
    fsdp: bool = option(False, "under torchrun, shard the models with FSDP2 (each transformer block; weights, "
                               "gradients and Adam states split over the ranks) instead of replicating them (DDP)",
                        group="run")


class Stopped(UserError):
    """The run stopped early on purpose (a signal) or on a fault it detected; exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------------------------------
# Processes, seeds, threads, devices


def is_main() -> bool:
    """Only the main process prints, writes metrics and saves checkpoints."""
    return rank() == 0


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python and torch with ``seed + rank`` (distinct streams per rank); return a CPU generator for data order."""
    s = seed + rank()
    random.seed(s)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


def rng_state() -> dict:
    """Every global random state a run consumes, for exact --resume."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def idle_cores() -> int:
    """CPU cores not already busy (the cores this process may use, less the 1-minute load average), at least 1.
    Threads of one process on a machine that other jobs keep busy wait on each other: measured on a 2-core machine, a
    pre-training step ran 5x slower with 2 threads than with 1 while other jobs filled both cores, and 1.6x faster
    with 2 on an idle machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, round(cores - os.getloadavg()[0])))


def set_threads(threads: int) -> int:
    """torch's CPU threads: ``threads``; with 0, what ``OMP_NUM_THREADS`` says if it is set, else one per idle core,
    shared among the torchrun ranks of this machine
    (torch's own default, one per core, runs many times slower on a machine that is already busy: OpenMP threads then
    wait on each other)."""
    if threads < 0:
        raise UserError(f"--threads must be 0 (automatic) or more, got {threads}")
    if threads or not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(threads or max(1, idle_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return torch.get_num_threads()


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel. By default a block
    above malloc's mmap threshold (128 KiB, rising to at most 32 MiB) is a mapping of its own, unmapped when freed, so
    every step maps its large activations afresh and the kernel zero-fills them, a page fault per 4 KiB (the same as
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>`` in the environment). Measured on a GPT-2 124M PPO step (2-core
    CPU, 1 thread, batch 8): half the page faults, kernel time 6.1 -> 2.8 s, the step 17% shorter, peak RSS +0.01 GiB.
    Returns whether it applied (glibc only; elsewhere a no-op)."""
    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))  # 1 = success


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as given (with a clear error if CUDA is missing).
    A CUDA device becomes the current one, where the Triton kernels launch."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name}: not a device (auto, cpu, cuda, cuda:N): {e}") from e
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    return device


# ---------------------------------------------------------------------------------------------------------------------
# Printing, progress, metrics


def log_print(*args) -> None:
    """print() on the main process only."""
    if is_main():
        print(*args, flush=True)


def progress(total: int, desc: str, initial: int = 0):
    """A tqdm progress bar on the main process (disabled elsewhere and when ``MINIRLHF_NO_PROGRESS=1``); when stderr
    is not a terminal (a log file), it redraws at most every 30 s instead of filling the log."""
    from tqdm.auto import tqdm

    disable = not is_main() or os.environ.get("MINIRLHF_NO_PROGRESS") == "1"
    return tqdm(total=total, desc=desc, initial=initial, disable=disable, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


def read_log(path: pathlib.Path) -> list[dict]:
    """The records of a JSONL log; a last line torn by a crash or a full disk is dropped with a note."""
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise UserError(f"{path}:{i + 1}: not JSON; only a last line torn by a crash is dropped") from None
            log_print(f"note: {path}: dropped its last line, torn by an interrupted write ({line[:40]!r}...)")
    return records


def trim_logs(out: pathlib.Path, step: int, names: Sequence[str]) -> None:
    """Keep the log lines up to ``step`` (the checkpoint a run resumes from: it may have crashed between two saves),
    so the resumed run does not log those steps twice; a torn last line goes too."""
    for name in names:
        path = out / name
        if path.is_file():
            kept = [r for r in read_log(path) if r["step"] <= step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def append_jsonl(path: pathlib.Path, records: Sequence[dict]) -> None:
    """Append records to a JSONL log (main process only); a full disk stops the run with a line saying what is safe."""
    if not is_main():
        return
    try:
        with open(path, "a") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    except OSError as e:
        raise Stopped(f"could not write {path}: {os.strerror(e.errno) if e.errno else e}; the checkpoint in "
                      f"{path.parent} is intact", 1) from e


# ---------------------------------------------------------------------------------------------------------------------
# One writer per output folder


class Lock:
    """An exclusive ``flock`` on ``out/.lock``, which holds the holder's pid, host and start time for the message a
    second run gets. The kernel drops an flock when its process dies, so a lock file left by a killed run is free;
    taking it over says so."""

    NAME = ".lock"

    def __init__(self, out: pathlib.Path):
        self.path = out / self.NAME
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise UserError(f"{self.path.parent} is in use by {holder}; one run writes to a folder at a time: "
                                "wait for it to finish or choose another --out") from None
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break  # locked the file that is still there (not one a finishing run just removed)
            os.close(fd)
        stale = os.read(fd, 4096).decode(errors="replace").strip()
        if stale:
            log_print(f"note: took over the lock of {self.path.parent} left by a run that is gone ({stale})")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {datetime.datetime.now():%Y-%m-%d %H:%M:%S}"
                     .encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: the next run locks a new file
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------------------------------------------------
# Finite or nothing


class OptimizerStep:
    """``step(optimizer, params, max_norm)``: one optimizer step on the accumulated gradients, their global norm
    clipped to ``max_norm`` first (0 = no clipping); the gradients are cleared after it. A non-finite norm (a NaN or
    inf loss upstream, an overflow) skips the step, the weights untouched, and counts it (:attr:`skipped`);
    ``max_in_a_row`` skips in a row stop the run (exit 3; ``kept`` says what the output folder still holds). Under
    DDP the norm is computed from the all-reduced gradients (under FSDP from every rank's shards), so every rank takes
    the same decision. Returns the norm."""

    def __init__(self, max_in_a_row: int, kept: Callable[[], str] = lambda: ""):
        self.max_in_a_row, self.kept = max_in_a_row, kept
        self.skipped = self.in_a_row = 0

    def __call__(self, optimizer: torch.optim.Optimizer, params, max_norm: float) -> torch.Tensor:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        if torch.isfinite(grad_norm):
            optimizer.step()
            self.in_a_row = 0
        else:
            self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
            log_print(f"warning: non-finite gradient norm ({grad_norm.item()}): optimizer step skipped, weights "
                      f"unchanged ({self.in_a_row} in a row)")
            if self.in_a_row >= self.max_in_a_row:
                raise Stopped(f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                              f"(--max-skipped-steps {self.max_in_a_row}): the training diverged (too high a --lr?); "
                              f"{self.kept()}", 3)
        optimizer.zero_grad(set_to_none=True)
        return grad_norm


# ---------------------------------------------------------------------------------------------------------------------
# Signals: finish the step, save, exit


class SignalGuard:
    """Turns the first SIGTERM or SIGINT into a request (:attr:`received`) that the run answers at the end of its
    step; the second one stops at once. Installed only in the main thread (Python's rule), restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: Optional[int] = None
        self.previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
            print(f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)
            return
        self.__exit__()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)  # the default action now: terminated, exit 128 + signum


# ---------------------------------------------------------------------------------------------------------------------
# The run


def file_digest(paths: Sequence[str]) -> str:
    """sha256 over the given files' bytes: --resume refuses data edited since the run began."""
    h = hashlib.sha256()
    for p in paths:
        if p and pathlib.Path(p).is_file():
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _folder(path: str) -> Optional[pathlib.Path]:
    """The folder a model path names (a checkpoint folder, or the folder of a weights file), if it exists."""
    p = pathlib.Path(path)
    if not path or not p.exists():
        return None
    return (p.parent if p.is_file() else p).resolve()


class Run:
    """One script run in ``cfg.out``: claims and locks the folder, seeds, handles signals, logs, guards against
    non-finite steps, saves and resumes. Use as a context manager around the script's work.

    ``stage``: what the folder holds ("sft", "rm", "ppo", "redteam", "labels"); ``stages``: the stages a --resume may
    continue (default: ``stage``); ``writes``: the file names this stage writes (what --overwrite may remove);
    ``inputs``: model paths --out must not be or be inside; ``data``: files whose digest --resume checks;
    ``may_change``: flags that may differ between a run and its --resume; ``continues``: a folder of the same stage is
    continued without --resume (the labelling session)."""

    def __init__(self, cfg: Any, *, stage: str, writes: Sequence[str], inputs: Sequence[str] = (),
                 data: Sequence[str] = (), may_change: Sequence[str] = (), stages: Optional[Sequence[str]] = None,
                 continues: bool = False):
        self.cfg, self.stage, self.stages = cfg, stage, tuple(stages or (stage,))
        self.writes = tuple(writes) + ("run.json", "metrics.jsonl")
        self.out = pathlib.Path(cfg.out)
        self.resume = getattr(cfg, "resume", False)
        self.continues = continues
        self.inputs = inputs
        self.may_change = ("resume", "overwrite", "device", "threads", "save_every", "max_skipped_steps", *may_change)
        self.data_digest = file_digest(data)
        self.lock = Lock(self.out)
        self.signals = SignalGuard()
        self.created = False
        self.state: Optional[dict] = None  # the training state of the run being continued
        self.generators: dict[str, torch.Generator] = {}
        self.optimizer_step = OptimizerStep(getattr(cfg, "max_skipped_steps", 1), self._kept)
        self.total = 0
        self.bar = None
        self.show: dict[str, str] = {}
        self.trained: Optional[torch.nn.Module] = None  # the module run.wrap put under DDP / FSDP, for its optimizer
        self.rank_batch: Optional[int] = None  # rows per rank of the last batch run.shard cut

    # -- entering: the folder, the lock, the state to continue, the seeds

    def __enter__(self) -> "Run":
        set_threads(getattr(self.cfg, "threads", 0))
        keep_freed_memory()
        self.device = distributed.init(resolve_device(self.cfg.device))
        try:
            self._together(is_main(), self._claim)
            self._together(not is_main(), self._read_state)  # after rank 0 finished an interrupted save
        except BaseException:
            self._release()
            distributed.shutdown(clean=False)
            raise
        seed_everything(self.cfg.seed)
        self.signals.__enter__()
        return self

    @staticmethod
    def _together(mine: bool, work: Callable[[], None]) -> None:
        """``work()`` on the ranks where ``mine``; its error on any rank is raised on every rank (the others: a
        UserError naming it), so that no rank waits in a collective for one that is gone."""
        failure = None
        if mine:
            try:
                work()
            except Exception as e:  # told to the other ranks, then raised here as it was
                failure = e
        distributed.agree(failure)

    def _claim(self) -> None:
        """Rank 0: check --out, create and lock it, finish an interrupted save, read the state to continue."""
        self._check_out()
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        if finish_save(self.out):
            log_print(f"note: {self.out}: completed a save that was interrupted while its files moved into place")
        self._read_state()

    def __exit__(self, kind, error, tb):
        self.signals.__exit__()
        if self.bar is not None:
            self.bar.close()
        self._release()
        distributed.shutdown(clean=kind is None)
        if kind is KeyboardInterrupt:  # a second Ctrl-C
            raise Stopped(f"interrupted at once; {self._kept()}", 130) from None
        return False

    def _release(self) -> None:
        self.lock.release()
        if self.created and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()  # a run that failed before writing anything leaves no empty folder behind

    def _check_out(self) -> None:
        out = self.out.resolve()
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out}: is a file, not a folder")
        for path in self.inputs:
            folder = _folder(path)
            if folder is not None and out.is_relative_to(folder):
                raise UserError(f"--out {self.out}: is (or is inside) the input {path}; a run never writes into a "
                                "model it reads: choose another --out")

    def _owner(self) -> Optional[str]:
        """The stage whose output ``--out`` holds (from run.json, or a checkpoint's config.json), if any."""
        for name in ("run.json", "config.json"):
            try:
                return json.loads((self.out / name).read_text())["stage"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return None

    def _read_state(self) -> None:
        if not is_main() and not self.resume:
            return
        owner = self._owner()
        theirs = sorted(p.name for p in self.out.iterdir() if p.name not in (Lock.NAME, STAGING))
        has_checkpoint = (self.out / "config.json").is_file() and owner in self.stages
        if self.resume or (self.continues and owner == self.stage):
            if self.resume and not has_checkpoint:
                raise UserError(f"--resume: {self.out} holds no checkpoint of a {'/'.join(self.stages)} run to continue"
                                + (f" (it holds a {owner!r} run)" if owner else ""))
            if self.resume:
                self._check_resumable()
            return
        if theirs and not getattr(self.cfg, "overwrite", False):
            beside = f"or pass --overwrite to write beside it (it replaces only the files a {self.stage} run writes)"
            if has_checkpoint:
                what = "a checkpoint; pass --resume to continue it or --overwrite to start over"
            elif owner == self.stage:
                what = f"the output of a {owner} run; pass --overwrite to start over"
            elif owner:
                what = f"the output of a {owner} run; choose another --out, {beside}"
            else:
                shown = ", ".join(theirs[:5]) + (", ..." if len(theirs) > 5 else "")
                what = f"other things ({shown}); choose an empty or new folder, {beside.replace('it (', 'them (')}"
            raise UserError(f"{self.out} already holds {what}")

    def _check_resumable(self) -> None:
        meta, state = read_meta(self.out), load_training_state(self.out)
        if state is None:
            raise UserError(f"--resume: {self.out} has no training_state.pt (a final export, not a resumable "
                            "checkpoint)")
        changed = [k for k, v in to_dict(self.cfg).items()
                   if k not in self.may_change and meta["train_config"].get(k, v) != v]
        if changed:
            was = ", ".join(f"--{k.replace('_', '-')} {meta['train_config'].get(k)!r} -> {getattr(self.cfg, k)!r}"
                            for k in changed)
            raise UserError(f"--resume: the run in {self.out} used other settings ({was}); resume with the same flags")
        if meta["train_config"].get("world_size", 1) != world_size():
            raise UserError(f"--resume: the run in {self.out} ran on {meta['train_config'].get('world_size', 1)} "
                            f"process(es), this one on {world_size()}; resume with the same number (torchrun "
                            "--nproc_per_node), or load its weights into a new run")
        if state.get("data_digest", self.data_digest) != self.data_digest:
            raise UserError(f"--resume: the data files changed since the run in {self.out} began (their sha256 "
                            "differs); the data order would not continue: resume with the same data")
        self.state = state

    # -- the state of a run being continued

    def new_generator(self, name: str, device: torch.device = torch.device("cpu")) -> torch.Generator:
        """A generator seeded from ``--seed + rank``, saved with every checkpoint and put back by --resume."""
        g = torch.Generator(device=device).manual_seed(self.cfg.seed + rank())
        self.generators[name] = g
        return g

    def restore(self, model: Optional[torch.nn.Module] = None, optimizer=None, **extra: torch.nn.Module) -> int:
        """With --resume: load the saved weights into ``model`` (and each ``extra`` module from ``<name>.safetensors``),
        the optimizer state, the RNG states and the named generators; drop log lines written after the checkpoint.
        Returns the step to start from (0 for a fresh run)."""
        if self.state is None:
            return 0
        for module, file in [(model, "model.safetensors"), *((m, f"{n}.safetensors") for n, m in extra.items())]:
            if module is not None:
                distributed.load_full_state_dict(module, read_weights(self.out / file))
        if optimizer is not None:
            distributed.load_optimizer_state(self.trained or model, optimizer, self.state["optimizer"])
        mine = self.state["ranks"][rank()] if "ranks" in self.state else self.state  # this rank's random streams
        set_rng_state(mine["rng"])
        for name, g in self.generators.items():
            saved = mine["generators"].get(name)
            if saved is not None and saved[0] == g.device.type:
                g.set_state(saved[1])
            else:  # a CPU generator's state means nothing to a CUDA one: the run goes on, not bit for bit
                g.manual_seed(self.cfg.seed + rank() + self.state["step"])
                log_print(f"warning: generator {name!r} resumes on {g.device.type}: reseeded from --seed + step, so "
                          "the continuation is not bit-exact")
        if is_main():
            trim_logs(self.out, self.state["step"], [n for n in self.writes if n.endswith(".jsonl")])
        log_print(f"resuming {self.out} at step {self.state['step']}")
        return self.state["step"]

    # -- data parallelism (minirlhf/distributed.py): alone, the module itself and the whole batch

    def wrap(self, module: Optional[torch.nn.Module], fn: Optional[Callable] = None):
        """``module`` ready to run under torchrun, called as ``fn(module, *args)`` (default: its forward): DDP with
        gradients summed over ranks, or FSDP2 with --fsdp (frozen modules too). Call it before building the optimizer
        (FSDP replaces the parameters)."""
        if module is not None and any(p.requires_grad for p in module.parameters()):
            self.trained = module
        return distributed.wrap(module, getattr(self.cfg, "fsdp", False), fn, self.device)

    def shard(self, items, what: str = "--batch-size"):
        """This rank's share of a global batch: rows [r B/W, (r + 1) B/W) (B a multiple of the world size W)."""
        share = distributed.shard(items, what)
        self.rank_batch = len(share)
        return share

    # -- the loop

    def begin(self) -> None:
        """The point of no return: the inputs were read and the models built, so the previous output may go (with
        --overwrite: only the files this stage writes) and ``run.json`` names the folder's stage."""
        if is_main() and self.state is None and not self.continues:
            for name in self.writes:
                path = self.out / name
                if path.is_file() or path.is_symlink():
                    path.unlink()
            (self.out / "run.json").write_text(json.dumps({"stage": self.stage, "command": sys.argv}) + "\n")
        if is_main() and self.state is None and not self.continues:
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        self.started = time.time()

    def steps(self, start: int, total: int, desc: str) -> Iterator[int]:
        """The steps ``start .. total - 1`` under a progress bar; a run already at ``total`` says so and does
        nothing."""
        self.total = total
        if start >= total:
            log_print(f"{self.out} is already at step {start} of the {total} steps asked; nothing to do")
            return
        self.begin()
        self.bar = progress(total, desc, initial=start)
        for step in range(start, total):
            yield step
            self.bar.set_postfix(self.show, refresh=False)  # drawn by update(), at the bar's redraw interval
            self.bar.update(1)
        self.bar.close()

    def log(self, step: int, show: Sequence[str] = (), **metrics) -> dict:
        """Append ``metrics`` of ``step`` (with ``skipped_steps``) to metrics.jsonl; the keys in ``show`` go beside
        the progress bar. Under torchrun each metric is averaged over the ranks (every rank calls ``log`` with the
        same keys): pass a value already global, or a rank's mean over its equal share; ``world_size`` is recorded."""
        record = distributed.mean_over_ranks({"step": step, "time": round(time.time() - self.started, 3), **{
            k: float(v) if isinstance(v, (int, float, torch.Tensor)) else v for k, v in metrics.items()}})
        record.update(step=step, skipped_steps=self.optimizer_step.skipped, world_size=world_size())
        append_jsonl(self.out / "metrics.jsonl", [record])
        self.show = {k: f"{record[k]:.3g}" for k in show if k in record}
        return record

    def append(self, name: str, records: Sequence[dict]) -> None:
        """Append records to the run's log ``out/name`` (samples)."""
        append_jsonl(self.out / name, records)

    def checkpoint(self, step: int, save: Callable[[int], Any]) -> None:
        """Call ``save(step)`` every --save-every steps, after the last one, and when a signal came; after a signal's
        save, stop with 128 + its number (143 for SIGTERM, 130 for SIGINT)."""
        every = getattr(self.cfg, "save_every", 0)
        received = all_max(self.signals.received or 0)  # a signal to any rank stops every rank after this step
        if step == self.total or (every and step % every == 0) or received:
            save(step)
        if received and step < self.total:
            name = signal.Signals(received).name
            raise Stopped(f"stopped by {name} after step {step}: saved {self.out} (step {step}); the same command "
                          "with --resume continues exactly", 128 + received)

    @property
    def stop_requested(self) -> bool:
        """A signal came: a script without steps (red teaming) stops at its next safe point."""
        return self.signals.received is not None

    def save(self, step: int, model: torch.nn.Module, *, config, optimizer: Optional[torch.optim.Optimizer] = None,
             metrics: Optional[dict] = None, stage: Optional[str] = None, state: Optional[dict] = None,
             extra: Optional[dict[str, torch.nn.Module]] = None) -> pathlib.Path:
        """A resumable checkpoint of ``step`` in --out, written by the main process (every rank calls it: under FSDP
        the whole tensors are gathered): the model, each ``extra`` module as ``<name>.safetensors``, and the training
        state (``state``, the optimizer's, the step, RNG and generator states and the data digest; under torchrun
        every rank's random streams, in ``ranks``, and ``world_size`` and ``rank_batch_size`` in ``train_config``)."""
        streams = {"rng": rng_state(), "generators": {n: (g.device.type, g.get_state())
                                                      for n, g in self.generators.items()}}
        ranks = distributed.gather_objects(streams) if world_size() > 1 else None
        weights = {"model.safetensors": distributed.full_state_dict(model), **{
            f"{n}.safetensors": distributed.full_state_dict(m) for n, m in (extra or {}).items()}}
        if optimizer is not None:
            state = {**(state or {}), "optimizer": distributed.optimizer_state(self.trained or model, optimizer)}
        if is_main():
            training_state = {**(state or {}), **streams, **({"ranks": ranks} if ranks else {}), "step": step,
                              "data_digest": self.data_digest}
            parallel = {"world_size": world_size(), "rank_batch_size": self.rank_batch} if ranks else {}  # alone: 1
            save_checkpoint(self.out, weights.pop("model.safetensors"), stage=stage or self.stage, config=config,
                            step=step, train_config={**to_dict(self.cfg), **parallel}, metrics=metrics,
                            training_state=training_state, extra_files=weights)
        return self.out

    def write(self, name: str, data: bytes) -> None:
        """Replace ``out/name`` atomically (a report: the old one stays whole if this write fails)."""
        if is_main():
            write_files(self.out, {name: data}, what=name)

    def _kept(self) -> str:
        try:
            return f"{self.out} keeps the checkpoint of step {read_meta(self.out)['step']}"
        except UserError:
            return f"{self.out} holds no checkpoint of this run"


@contextlib.contextmanager
def timer(device: torch.device, times: dict, name: str):
    """Adds the wall time of the block to ``times[name]``, after the device has finished its queued work (honest
    GPU timings)."""
    def now():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    t0 = now()
    yield
    times[name] = times.get(name, 0.0) + now() - t0
