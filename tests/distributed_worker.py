"""Run by tests/test_distributed.py on 2 ranks (gloo): the PPO pieces on each rank's share of one fixed batch, the
update under DDP and under FSDP, saved by rank 0 for the test to compare with one process on the whole batch; then a
NaN advantage on rank 1 alone, which both ranks must skip.

    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py FILES OUT
"""
import pathlib
import sys

import torch

import train_ppo
from minirlhf import distributed
from minirlhf.actor_critic import load_models
from minirlhf.ppo import explained_variance, masked_mean, whiten
from minirlhf.run import OptimizerStep
from test_distributed import PPO_UPDATE, statistics_batch
from test_ppo_train import make_config, random_rollout


def main(files: str, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))
    gathered = {}

    # global statistics from each rank's rows
    x, y, mask = statistics_batch()
    rows = distributed.shard(torch.arange(len(x)))
    xr, yr, mr = x[rows], y[rows], mask[rows]
    gathered["whiten_rewards"] = whiten(xr, mr, shift_mean=False, across_ranks=True)
    gathered["whiten_advantages"] = whiten(xr, mr, shift_mean=True, across_ranks=True)
    scalars = {"masked_mean": masked_mean(xr, mr, across_ranks=True).item(),
               "explained_variance": explained_variance(yr, xr, mr, across_ranks=True).item(),
               **distributed.mean_over_ranks({"kl": xr.sum(1).mean().item()})}  # how run.log makes the KL global

    parts = distributed.gather_objects(gathered)
    result = {"scalars": scalars, **{k: torch.cat([p[k] for p in parts]) for k in gathered}}

    # one PPO update on this rank's rows of the same rollouts, under DDP and under FSDP
    cfg = make_config(pathlib.Path(files), out, **PPO_UPDATE)
    for fsdp in (False, True):
        actor_critic = load_models(cfg, torch.device("cpu"))[0]
        batch, _ = random_rollout(actor_critic, cfg.temperature)
        trained = distributed.wrap(actor_critic, fsdp, device=torch.device("cpu"))
        fn = lambda b: trained(b.ids, b.mask, b.prompt_len, b.response, b.response_mask, cfg.temperature)  # noqa: E731
        sgd = torch.optim.SGD(actor_critic.parameters(), lr=1.0)
        stats = train_ppo.ppo_update(actor_critic, sgd, batch.rows(rows), cfg, 2, torch.Generator().manual_seed(1),
                                     fn, OptimizerStep(5))
        result["fsdp" if fsdp else "ddp"] = {"weights": distributed.full_state_dict(actor_critic), "stats": stats}

    # a non-finite loss on rank 1 only: after the all-reduce every rank's gradient norm is NaN, and both skip
    poisoned = batch.rows(rows)
    if distributed.rank() == 1:
        poisoned.advantages = torch.full_like(poisoned.advantages, float("nan"))
    before = {k: v.clone() for k, v in distributed.full_state_dict(actor_critic).items()}
    guard = OptimizerStep(5)
    train_ppo.ppo_update(actor_critic, sgd, poisoned, cfg, 2, torch.Generator().manual_seed(1), fn, guard)
    after = distributed.full_state_dict(actor_critic)
    result["skipped"] = distributed.gather_objects(guard.skipped)
    result["unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
    if distributed.rank() == 0:
        torch.save(result, f"{out}/result.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
