"""Checkpoints: a directory per model, written atomically, that carries its own description.

Layout::

    out/sft/
      config.json          {"minirlhf": 1, "stage": "sft", "step": 800, "model": {GPTConfig}, "train_config": {...},
                            "metrics": {...}}
      model.safetensors    the module's state dict (a GPT: "transformer.*"; a reward model: "gpt.*", "head.*",
                            "gain", "bias")
      training_state.pt    optional, for --resume: the step, optimizer and RNG states (the schedule and the data
                           position are functions of the step)

Stages: ``pretrain`` and ``sft`` and ``ppo`` hold policies (a GPT), ``rm`` holds a reward model. Loading checks the stage,
so passing a reward model where a policy is expected is one clear error instead of a shape mismatch deep inside.

Atomic save: everything is written to a temporary sibling directory, which then replaces the target by two renames
(old -> a ``.old-*`` sibling, new -> target; a failed second rename puts the old one back). A crash while writing
leaves the previous checkpoint intact (at worst a stray ``.tmp-*`` directory); a crash in the instant between the two
renames leaves it in ``.old-<name>-*/ckpt``, which :func:`open_run` points to. Other files of the run in that
directory (``metrics.jsonl``, samples) are carried over into the new one. ``--out`` must not be the current
directory or hold it, since the directory is replaced as a whole.
"""
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from minirlhf.config import UserError, to_dict
from minirlhf.hf import HUB_MODELS, from_pretrained, read_config_json, read_weights
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.tokenizer import Tokenizer, get_tokenizer

FORMAT_VERSION = 1
POLICY_STAGES = ("pretrain", "sft", "ppo")
REWARD_STAGES = ("rm",)


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
# Save


def save_checkpoint(directory, model: torch.nn.Module, *, stage: str, config: GPTConfig, step: int = 0,
                    train_config: Optional[dict] = None, metrics: Optional[dict] = None,
                    training_state: Optional[dict] = None, extra_files: Optional[dict[str, dict]] = None
                    ) -> pathlib.Path:
    """Write ``model`` (a GPT or RewardModel) as a checkpoint directory, atomically. ``extra_files`` maps a file name
    to a state dict saved beside the model as safetensors (e.g. a PPO value head)."""
    if stage not in POLICY_STAGES + REWARD_STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    directory = pathlib.Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
    try:
        meta = {"minirlhf": FORMAT_VERSION, "stage": stage, "step": step, "model": config.__dict__.copy(),
                "train_config": train_config or {}, "metrics": metrics or {}}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        save_file(_cpu_state(model.state_dict()), str(tmp / "model.safetensors"))
        for name, state in (extra_files or {}).items():
            save_file(_cpu_state(state), str(tmp / name))
        if training_state is not None:
            torch.save(training_state, tmp / "training_state.pt")
        if directory.exists():
            _carry_run_files(directory, tmp)
            # swap: old -> trash, tmp -> target, remove trash
            trash = pathlib.Path(tempfile.mkdtemp(prefix=f".old-{directory.name}-", dir=directory.parent))
            os.replace(directory, trash / "ckpt")
            try:
                os.replace(tmp, directory)
            except BaseException:
                os.replace(trash / "ckpt", directory)  # the previous checkpoint goes back in place
                trash.rmdir()
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _carry_run_files(old: pathlib.Path, new: pathlib.Path) -> None:
    """Files of the run that the checkpoint itself does not write (metrics.jsonl, samples, plots) survive the swap:
    hard-linked into the new directory (a copy where links are not possible), so the old directory stays intact
    until the rename."""
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or not entry.is_file():
            continue
        try:
            os.link(entry, target)
        except OSError:
            shutil.copy2(entry, target)


def _cpu_state(state: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Load


def read_meta(path) -> dict:
    """The ``config.json`` of a minirlhf checkpoint directory, or a UserError saying what ``path`` is instead."""
    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint directory")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a checkpoint directory (no config.json)")
    meta = read_config_json(path / "config.json")
    if "minirlhf" not in meta:
        raise UserError(f"{path}: a Hugging Face checkpoint, not a minirlhf one")
    if meta["minirlhf"] > FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {meta['minirlhf']} is newer than this minirlhf ({FORMAT_VERSION})")
    return meta


def is_minirlhf_checkpoint(path) -> bool:
    p = pathlib.Path(path) / "config.json"
    return p.is_file() and "minirlhf" in read_config_json(p)


def load_policy(path: str, **overrides) -> tuple[GPT, Tokenizer]:
    """A policy (GPT) and its tokenizer from a minirlhf policy checkpoint, a Hugging Face GPT-2 directory/file, or a hub
    name. A reward-model checkpoint here (its directory or its model.safetensors) is an error."""
    p = pathlib.Path(path)
    directory = p.parent if p.suffix == ".safetensors" else p
    if directory.is_dir() and is_minirlhf_checkpoint(directory):
        meta = read_meta(directory)
        if meta["stage"] not in POLICY_STAGES:
            raise UserError(f"{path}: is a {meta['stage']!r} checkpoint; a policy ({', '.join(POLICY_STAGES)}) is "
                            "expected here")
    elif not p.exists() and path not in HUB_MODELS:
        raise UserError(f"{path}: no such checkpoint (a directory, a .safetensors file, or one of {', '.join(HUB_MODELS)})")
    model = from_pretrained(path, **overrides)
    return model, get_tokenizer(model.config.tokenizer)


def load_reward_model(path: str, **overrides) -> tuple[RewardModel, Tokenizer]:
    """A reward model (trunk + head + gain/bias) and its tokenizer from an ``rm`` checkpoint."""
    meta = read_meta(path)
    if meta["stage"] not in REWARD_STAGES:
        raise UserError(f"{path}: is a {meta['stage']!r} checkpoint; a reward model (stage 'rm') is expected here")
    gpt = GPT(GPTConfig.from_dict({**meta["model"], **overrides}))
    rm = RewardModel(gpt)
    rm.load_state_dict(read_weights(pathlib.Path(path) / "model.safetensors"))
    return rm, get_tokenizer(gpt.config.tokenizer)


def load_training_state(path) -> Optional[dict[str, Any]]:
    """The resumable state saved beside a checkpoint, or None when there is none."""
    f = pathlib.Path(path) / "training_state.pt"
    if not f.is_file():
        return None
    return torch.load(f, map_location="cpu", weights_only=False)  # our own file: optimizer + RNG states


# ---------------------------------------------------------------------------------------------------------------------
# Starting or resuming a run in --out (shared by the training scripts)


def interruption_note(cfg: Any, started: float) -> str:
    """What a trainer interrupted by Ctrl-C left in its ``--out`` (config with ``out`` and ``resume``), for the line
    :func:`minirlhf.config.run` prints: the step of a resumable checkpoint this run saved, or that it saved nothing."""
    if not (hasattr(cfg, "out") and hasattr(cfg, "resume")):
        return ""
    out = pathlib.Path(cfg.out)
    meta = out / "config.json"
    resumable = meta.is_file() and (out / "training_state.pt").is_file()
    if resumable and meta.stat().st_mtime >= started - 1:  # (coarse file clocks)
        return (f"; {out} holds this run's checkpoint of step {read_meta(out)['step']}: the same command with --resume "
                "continues from there")
    if resumable and cfg.resume:
        return (f"; this run saved nothing new: {out} still holds the checkpoint of step {read_meta(out)['step']}, "
                "where --resume starts again")
    return f"; this run saved nothing in {out} (a trainer saves at the end, and every --save-every steps if set)"


def open_run(cfg: Any, *, may_change: tuple[str, ...], stages: tuple[str, ...]) -> Optional[tuple[dict, dict]]:
    """Guard ``cfg.out`` for a training run. A fresh run (None) never overwrites a checkpoint without ``--overwrite``;
    with ``--resume`` returns ``(meta, training_state)`` after checking the checkpoint is one of ``stages``, resumable,
    and was made with the same flags (except those in ``may_change``), so the continuation is exact."""
    out = pathlib.Path(cfg.out)
    if pathlib.Path.cwd().resolve().is_relative_to(out.resolve()):
        raise UserError(f"--out {cfg.out}: holds the current directory; a checkpoint directory is replaced as a whole "
                        "on every save, so give a subdirectory (e.g. --out out/run)")
    has_checkpoint = (out / "config.json").is_file()
    stranded = sorted(out.resolve().parent.glob(f".old-{out.resolve().name}-*/ckpt/config.json"))
    if not has_checkpoint and stranded:
        raise UserError(f"{out} holds no checkpoint, but {stranded[-1].parent} does: a save was interrupted between "
                        f"its two renames; move that directory to {out} and run again")
    if not cfg.resume:
        if has_checkpoint and not cfg.overwrite:
            raise UserError(f"{out} already holds a checkpoint; pass --resume to continue it or --overwrite to start "
                            "over")
        return None
    if not has_checkpoint:
        raise UserError(f"--resume: {out} holds no checkpoint to continue")
    meta, state = read_meta(out), load_training_state(out)
    if meta["stage"] not in stages:
        raise UserError(f"--resume: {out} holds a {meta['stage']!r} checkpoint, not a {'/'.join(stages)} run")
    if state is None:
        raise UserError(f"--resume: {out} has no training_state.pt (a final export, not a resumable checkpoint)")
    changed = [k for k, v in to_dict(cfg).items() if k not in may_change and meta["train_config"].get(k) != v]
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {meta['train_config'].get(k)!r} -> {getattr(cfg, k)!r}"
                        for k in changed)
        raise UserError(f"--resume: the run in {out} used other settings ({was}); resume with the same flags")
    return meta, state


def trim_logs(out, step: int, names: tuple[str, ...] = ("metrics.jsonl",)) -> None:
    """Drop log lines written after the checkpoint a run resumes from (it crashed between two saves), so the resumed
    run does not log those steps twice."""
    for name in names:
        path = pathlib.Path(out) / name
        if path.is_file():
            kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
            path.write_text("".join(kept))
