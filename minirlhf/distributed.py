"""Data parallelism under torchrun: the process group, each rank's share of a batch, sums over ranks, DDP and FSDP2
wrapping, and full state dicts for checkpoints. :mod:`minirlhf.run` calls it; scripts reach it through ``run``.

    torchrun --nproc_per_node=W train_sft.py ...                  # one machine, W processes (GPUs)
    torchrun --nnodes=N --nproc_per_node=W --rdzv-backend c10d --rdzv-endpoint HOST:PORT train_ppo.py ...

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; every rank runs the whole script on its share of each global batch (nccl
on CUDA, one GPU per LOCAL_RANK; gloo on CPU). Alone (WORLD_SIZE unset or 1) there is no process group and every
function here is the identity.

The math. A global batch of B rows; rank r takes rows [r B/W, (r + 1) B/W) (:func:`shard`: the order one process would
see, cut in W pieces). A loss that is a mean over the global batch, ``L = (1/n) sum_i l_i`` with n the global count (of
tokens, groups), is the sum of the ranks' shares ``L_r = (1/n) sum_{i in r} l_i``, so ``grad L = sum_r grad L_r``:
each rank divides by the global n (known to every rank, or :func:`all_sum`), and the wrapped model SUMS gradients over
ranks: its outputs pass gradients back multiplied by W (:class:`ScaleGrad`), and DDP's and FSDP's average of the W
gradients ``W grad L_r`` is their sum. (A SUM all-reduce instead would double-count under gradient accumulation: DDP
reduces the accumulated ``.grad``, and the average of ``reduced_1 + W g_2`` is ``reduced_1 + sum_r g_2``.) The
gradient, its norm and therefore the optimizer step are then the single process's, identical on every rank: a
non-finite gradient on one rank is non-finite on all, and all skip the step together. Global statistics come from
all-reduced sums (:func:`all_sum`), e.g. the masked mean ``sum_r s_r / sum_r n_r`` (minirlhf/ppo.py ``across_ranks``).

DDP (``wrap``): a replica per rank, gradients all-reduced in buckets during the backward. FSDP2 (``--fsdp``): every
transformer block, every GPT's own parameters (embeddings, final LayerNorm) and every scalar head become a
``fully_shard`` unit: at rest each rank holds 1/W of each parameter, its gradient and its Adam moments; a unit's
weights are all-gathered just before it runs and freed after. Frozen models (PPO's reference and reward model) are
sharded too. Generation runs a different number of steps on each rank, so under FSDP it runs inside
:func:`gathered` (the whole policy all-gathered once, no collective per token). Checkpoints gather a full state dict
(:func:`full_state_dict`), so a checkpoint of any world size loads in one process.
"""
import contextlib
import os
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from minirlhf.config import UserError
from minirlhf.model import GPT, Block, ScalarHead

# ---------------------------------------------------------------------------------------------------------------------
# Ranks and the process group


def rank() -> int:
    """This process's rank under torchrun (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes run the job (1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(device: torch.device) -> torch.device:
    """Join the job's process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU); returns this rank's device: a
    plain ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    if world_size() == 1 or active():
        return device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a clean end every rank first waits for the others: a rank that tears down its
    gloo connections while a peer still talks to it can abort ("terminate called without an active exception")."""
    if active():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------------
# Shares and sums


def shard(items, what: str = "--batch-size"):
    """This rank's contiguous share of a global batch (a list or a tensor's rows): rows [r B/W, (r + 1) B/W). B must
    be a multiple of W, so that every rank runs the same number of forward and backward passes."""
    B, W = len(items), world_size()
    if B % W:
        raise UserError(f"{what}: a batch of {B} does not split evenly over {W} ranks; use a multiple of {W}")
    return items[rank() * B // W:(rank() + 1) * B // W]


def _reduce(x, op: str):
    if not active():
        return x
    op = getattr(dist.ReduceOp, op)
    if isinstance(x, torch.Tensor):
        out = x.detach().clone()
        dist.all_reduce(out, op=op)
        return out
    out = torch.tensor(float(x), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(out, op=op)
    return type(x)(out.item())


def all_sum(x):
    """``sum_r x_r`` over the ranks (a tensor, or a number: same type back); ``x`` alone."""
    return _reduce(x, "SUM")


def all_max(x):
    """``max_r x_r`` over the ranks; ``x`` alone."""
    return _reduce(x, "MAX")


def mean_over_ranks(metrics: dict) -> dict:
    """Each number of ``metrics`` averaged over the ranks, in one all-reduce: a value already global (the same on every
    rank) stays as it is; a rank's mean over its equal share becomes the global mean."""
    keys = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not active() or not keys:
        return metrics
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(values)
    return {**metrics, **dict(zip(keys, (values / world_size()).tolist()))}


def gather_objects(obj) -> list:
    """``[obj_0, .., obj_{W-1}]`` from every rank, on every rank (``[obj]`` alone)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(failure: Optional[BaseException]) -> None:
    """Every rank's outcome of a step some ranks take alone (rank 0 claims and locks --out), told to every rank: all
    go on, or all raise (a failed rank its own error, the others a UserError with the first failure's message), so
    that none waits in a collective for a rank that is gone."""
    messages = gather_objects(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    first = next(((r, m) for r, m in enumerate(messages) if m is not None), None)
    if first is not None:
        raise UserError(f"rank {first[0]} stopped: {first[1]}")


# ---------------------------------------------------------------------------------------------------------------------
# Wrapping models


class ScaleGrad(torch.autograd.Function):
    """The identity forward; the backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class Call(nn.Module):
    """``fn(module, *args)`` (or ``module(*args)``) as a module's forward, its outputs passing gradients back times
    ``grad_scale``. DDP reduces the gradients of a computation only when it runs through the wrapper's forward, and a
    script may call a model's method (``sft_nll``, ``RewardModel.raw_score``) rather than its forward."""

    def __init__(self, module: nn.Module, fn: Optional[Callable] = None, grad_scale: float = 1.0):
        super().__init__()
        self.module, self.fn, self.grad_scale = module, fn, grad_scale

    def forward(self, *args, **kwargs):
        out = self.fn(self.module, *args, **kwargs) if self.fn else self.module(*args, **kwargs)
        if self.grad_scale == 1.0:
            return out
        scale = lambda t: ScaleGrad.apply(t, self.grad_scale) if t.requires_grad else t  # noqa: E731
        return tuple(map(scale, out)) if isinstance(out, tuple) else scale(out)


FORWARD_METHODS = ("hidden_states", "fp32_logits", "token_logprobs")  # GPT methods that run outside GPT.forward


def _fully_shard(module: nn.Module) -> None:
    """FSDP2 units, innermost first: each Block, each GPT (its embeddings and final LayerNorm; the methods scripts call
    gather them as forward does), each ScalarHead. Every parameter must end up in a unit."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from torch.distributed.tensor import DTensor

    for m in reversed(list(module.modules())):  # children before their parents
        if isinstance(m, (Block, GPT, ScalarHead)):
            fully_shard(m, reshard_after_forward=True)
        if isinstance(m, GPT):
            for name in FORWARD_METHODS:
                register_fsdp_forward_method(m, name)
    left = [n for n, p in module.named_parameters() if not isinstance(p, DTensor)]
    if left:
        raise RuntimeError(f"--fsdp: no sharding unit holds {', '.join(left[:3])} (a module type this function does "
                           "not know: add it to the units above)")


def wrap(module: Optional[nn.Module], fsdp: bool, fn: Optional[Callable] = None, device: Optional[torch.device] = None):
    """The module to train or run under the job's parallelism, called as ``fn(module, *args)`` (default: its forward).
    Alone: ``Call(module, fn)`` (the same computation). Under torchrun, every rank first takes rank 0's weights (a
    random init differs per rank); then a trained module (one with trainable parameters) runs under DDP with summed
    gradients, or, with ``fsdp``, is sharded in place (as is a frozen one; DDP leaves frozen modules alone)."""
    if module is None:
        return None
    if not active():
        return Call(module, fn)
    call = Call(module, fn, grad_scale=float(world_size()))
    for t in module.state_dict().values():
        dist.broadcast(t, src=0)
    if fsdp:
        _fully_shard(module)
        return call
    if not any(p.requires_grad for p in module.parameters()):
        return call
    return nn.parallel.DistributedDataParallel(call, device_ids=[device.index] if device.type == "cuda" else None)


def _fsdp_units(modules: Sequence[Optional[nn.Module]]) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for module in modules if module is not None for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(*modules: Optional[nn.Module]):
    """Within the block, the FSDP-sharded ``modules`` hold their full weights (one all-gather each on entry, freed on
    exit) and run without collectives, so ranks may call them a different number of times (generation stops when its
    rank's responses have ended). Unsharded modules: nothing to do."""
    units = _fsdp_units(modules)
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


# ---------------------------------------------------------------------------------------------------------------------
# Full state dicts: checkpoints of any world size load in one process


def is_sharded(module: nn.Module) -> bool:
    return bool(_fsdp_units([module]))


def full_state_dict(module: nn.Module) -> dict:
    """The module's state dict with every tensor whole, on the CPU of rank 0 (other ranks: ``{}``); a collective
    under FSDP, so every rank calls it."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(module: nn.Module, state: dict) -> None:
    """Load a whole state dict (every rank reads the same file) into the module, sharded or not."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state: its own ``state_dict()``, or under FSDP the whole state keyed by parameter names
    (gathered to rank 0; a collective)."""
    if not is_sharded(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if not is_sharded(module):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
