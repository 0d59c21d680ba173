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

Atomic, finite saves (:func:`save_checkpoint`): nothing is written unless every tensor is finite; the files go to
``.staging/`` inside the directory first, each synced, then a ``COMMIT`` list, then they move into place by renames.
A crash or a full disk before the ``COMMIT`` leaves the previous checkpoint as it was (and says so in one line); a
crash during the renames is completed by whoever reads the directory next. Nothing outside the directory is touched,
and nothing in it but the checkpoint's own files (``metrics.jsonl``, samples and a user's notes stay).

Loading (:func:`load_policy`, :func:`load_reward_model`) reads a minirlhf checkpoint, a Hugging Face GPT-2 directory or
a hub name; the resumable state of a run is read by :mod:`minirlhf.run`.
"""
import io
import json
import math
import os
import pathlib
import pickle
import shutil
import sys
from typing import Any, Optional, Union

import torch
import safetensors.torch

from minirlhf.config import UserError
from minirlhf.hf import HUB_MODELS, from_pretrained, read_config_json, read_weights
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.tokenizer import Tokenizer, get_tokenizer

FORMAT_VERSION = 1
POLICY_STAGES = ("pretrain", "sft", "ppo")
REWARD_STAGES = ("rm",)


# ---------------------------------------------------------------------------------------------------------------------
# Save


class SaveError(UserError):
    """A checkpoint could not be written (a full disk, no permission, a non-finite tensor); the previous one is
    intact and the message says which step it holds."""


def save_checkpoint(directory, model: Union[torch.nn.Module, dict], *, stage: str, config: GPTConfig, step: int = 0,
                    train_config: Optional[dict] = None, metrics: Optional[dict] = None,
                    training_state: Optional[dict] = None, extra_files: Optional[dict[str, dict]] = None
                    ) -> pathlib.Path:
    """Write ``model`` (a GPT or RewardModel, or its state dict) as a checkpoint in ``directory``, atomically, and only
    if every tensor is finite. ``extra_files`` maps a file name to a state dict saved beside the model as safetensors (e.g. a PPO
    value head). Other files in the directory are left alone."""
    if stage not in POLICY_STAGES + REWARD_STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    directory = pathlib.Path(directory)
    tensors = {"model.safetensors": model if isinstance(model, dict) else model.state_dict(), **(extra_files or {})}
    meta = {"minirlhf": FORMAT_VERSION, "stage": stage, "step": step, "model": config.__dict__.copy(),
            "train_config": train_config or {},  # a skipped step's NaN loss is not a number JSON knows: null
            "metrics": {k: None if isinstance(v, float) and not math.isfinite(v) else v
                        for k, v in (metrics or {}).items()}}
    for name, state in [*tensors.items(), ("training_state.pt", training_state or {})]:
        bad = next((k for k, t in _tensors(state) if not torch.isfinite(t).all()), None)
        if bad is not None:
            raise SaveError(f"step {step}: {name} holds non-finite values ({bad}); nothing was written, "
                            f"{_previous(directory)}")
    blobs = {name: safetensors.torch.save(_cpu_state(state)) for name, state in tensors.items()}
    if training_state is not None:
        buffer = io.BytesIO()
        torch.save(training_state, buffer)
        blobs["training_state.pt"] = buffer.getvalue()
    blobs["config.json"] = json.dumps(meta, indent=2).encode()  # last: the file readers look for
    write_files(directory, blobs, what=f"step {step}")
    return directory


def write_files(directory: pathlib.Path, blobs: dict[str, bytes], what: str) -> None:
    """Replace the files ``blobs`` names in ``directory`` as one: each is written and synced to ``directory/.staging``,
    then a ``COMMIT`` list is written there, then they move into place (:func:`finish_save`). A failure before the
    ``COMMIT`` leaves the previous files untouched (the staging folder is removed, and the error says so in a line); a
    crash after it is completed by the next :func:`finish_save`, from the next run or the next reader."""
    previous = _previous(directory)
    staging = directory / STAGING
    try:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for name, data in blobs.items():
            _write_synced(staging / name, data)
        _write_synced(staging / "COMMIT", "\n".join(blobs).encode())
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        cause = os.strerror(e.errno) if e.errno else str(e)
        raise SaveError(f"could not save {what} to {directory}: {cause} (errno {e.errno}); {previous}") from e
    finish_save(directory)


def finish_save(directory: pathlib.Path) -> bool:
    """Move a committed save's files from ``.staging`` into place (again, after a crash halfway: idempotent) and
    remove the staging folder; an uncommitted one is removed. Returns whether a committed save was completed."""
    staging = pathlib.Path(directory) / STAGING
    commit = staging / "COMMIT"
    if not commit.is_file():
        shutil.rmtree(staging, ignore_errors=True)
        return False
    for name in commit.read_text().split():
        if (staging / name).exists():
            os.replace(staging / name, pathlib.Path(directory) / name)
    _sync_dir(pathlib.Path(directory))
    shutil.rmtree(staging, ignore_errors=True)
    return True


STAGING = ".staging"  # a save in progress, inside the checkpoint directory


def _write_synced(path: pathlib.Path, data: bytes) -> None:
    with open(path, "wb") as f:  # created with the user's umask, like any file they write
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _previous(directory: pathlib.Path) -> str:
    """What a failed save leaves: the checkpoint already in ``directory``, if any."""
    meta = directory / "config.json"
    try:
        return f"{directory} keeps its checkpoint of step {json.loads(meta.read_text())['step']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{directory} holds no earlier checkpoint"


def _tensors(obj, prefix: str = ""):
    """Every floating-point tensor in a nested state (dicts, lists), with its path."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def _cpu_state(state: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Load


def read_meta(path) -> dict:
    """The ``config.json`` of a minirlhf checkpoint directory, or a UserError saying what ``path`` is instead."""
    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint directory")
    if (path / STAGING / "COMMIT").is_file() and finish_save(path):
        print(f"note: {path}: completed a save that was interrupted while its files moved into place", file=sys.stderr)
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
        raise UserError(f"{path}: no such checkpoint (a folder, a .safetensors file, or one of "
                        f"{', '.join(HUB_MODELS)})")
    model = from_pretrained(path, **overrides)
    return model, get_tokenizer(model.config.tokenizer)


def load_reward_model(path: str, **overrides) -> tuple[RewardModel, Tokenizer]:
    """A reward model (trunk + head + gain/bias) and its tokenizer from an ``rm`` checkpoint."""
    meta = read_meta(path)
    if meta["stage"] not in REWARD_STAGES:
        raise UserError(f"{path}: is a {meta['stage']!r} checkpoint; a reward model (stage 'rm') is expected here")
    gpt = GPT(GPTConfig.from_dict({**meta.get("model", {}), **overrides}, f"{path}/config.json: \"model\""))
    rm = RewardModel(gpt)
    rm.load_state_dict(read_weights(pathlib.Path(path) / "model.safetensors"))
    return rm, get_tokenizer(gpt.config.tokenizer)


def load_training_state(path) -> Optional[dict[str, Any]]:
    """The resumable state saved beside a checkpoint, or None when there is none."""
    f = pathlib.Path(path) / "training_state.pt"
    if not f.is_file():
        return None
    try:
        return torch.load(f, map_location="cpu", weights_only=False)  # our own file: optimizer + RNG states
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"{f}: damaged, cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); the "
                        "weights beside it may still load, but this run cannot be resumed exactly") from e
