"""Data parallelism under torchrun (minirlhf/distributed.py through minirlhf/run.py), on CPU with gloo and 2 ranks,
against one process as the reference: SFT and RM on 2 ranks end with the weights and losses of one process on the
same global batch (DDP, and FSDP2 for SFT); one PPO update of 2 ranks on their halves of a batch equals the update of
one process on all of it, and so do the global whitening and statistics; a 2-rank PPO run trains, saves a checkpoint
that loads in one process, resumes exactly, and equals its FSDP twin; a SIGTERM to the whole job saves once and every
rank exits 143; a refused --out stops every rank.

Tiny models (the helpers of test_sft.py, test_rm.py, test_ppo_train.py), one thread per rank."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import train_ppo
import train_rm
import train_sft
from minirlhf.checkpoint import load_policy, load_reward_model, read_meta
from minirlhf.config import UserError
from minirlhf.hf import read_weights
from minirlhf.ppo import explained_variance, masked_mean, whiten
from minirlhf.reward import score_sequences
from minirlhf.run import OptimizerStep
from minirlhf.actor_critic import load_models
from test_ppo_train import files, make_config, random_rollout  # noqa: F401 (files is a fixture)
from test_rm import toy_preferences
from test_run import sft_args, wait_for_steps
from test_sft import ANIMALS, TINY, metrics_of, run_script, sft_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), "MINIRLHF_NO_PROGRESS": "1",
       "OMP_NUM_THREADS": "1"}
PPO_UPDATE = dict(ppo_epochs=2, max_grad_norm=0.5, ent_coef=0.01, temperature=0.9)  # clipping on: the global norm


def torchrun(script: str, argv) -> None:
    """``torchrun --standalone --nproc_per_node=2 script argv`` to a clean end (the test fails if it hangs)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, script), *map(str, argv)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, argv) -> list[subprocess.Popen]:
    """2 ranks of ``script`` started as torchrun starts them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and _PORT),
    without its agent (2 s less per run), in one process group, as a scheduler sees a job."""
    port, procs = free_port(), []
    for r in range(2):
        env = {**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, argv)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      process_group=procs[0].pid if procs else 0))
    return procs


def finish(procs: list[subprocess.Popen]) -> tuple[list[int], list[str]]:
    """Every rank's exit status and stderr; a rank still running after 300 s fails the test (and is killed)."""
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], errs


def two_ranks(script: str, argv) -> None:
    codes, errs = finish(launch(script, argv))
    assert codes == [0, 0], errs


def assert_same_run(one, two, keys, atol=1e-5, weights_atol=1e-5, world_sizes=(1, 2)) -> None:
    """Same weights and the same logged ``keys`` at every step; the runs' recorded world sizes."""
    w1, w2 = read_weights(one / "model.safetensors"), read_weights(two / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=weights_atol, msg=k)
    m1, m2 = metrics_of(one), metrics_of(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] and len(m1) > 1
    for r1, r2 in zip(m1, m2):
        assert {k for k in keys if k in r1} == {k for k in keys if k in r2}
        for k in keys:
            if k in r1:
                assert r2[k] == pytest.approx(r1[k], rel=atol, abs=atol), (r1["step"], k)
    assert ({r["world_size"] for r in m1}, {r["world_size"] for r in m2}) == tuple({w} for w in world_sizes)


# ---------------------------------------------------------------------------------------------------------------------
# SFT and RM: 2 ranks with global batch B == 1 process with B


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_sft_on_two_ranks_equals_one_process(tmp_path, fsdp):
    """Micro-batches of 4 split 2 + 2, examples of different lengths: each rank divides its NLL by the global count
    of target tokens and the gradients add up, so the step is the single process's; evaluation and sampling run on
    every rank (under FSDP they gather the weights). The FSDP run stops after step 2 and resumes (whole weights and
    Adam states gathered into the checkpoint, sharded again on --resume)."""
    args = TINY + ["--data", sft_data(tmp_path / "sft.jsonl", n=30), "--batch-size", 4, "--grad-accum", 2,
                   "--lr", 3e-3, "--schedule", "constant", "--warmup", 0, "--val-fraction", 0.2, "--eval-every", 2,
                   "--samples", 1, "--sample-tokens", 4, "--threads", 1, "--out"]  # the same lr whatever --max-steps
    run_script(train_sft, args + [tmp_path / "one", "--max-steps", 3])
    if fsdp:
        two_ranks("train_sft.py", args + [tmp_path / "two", "--max-steps", 2, "--fsdp"])
        two_ranks("train_sft.py", args + [tmp_path / "two", "--max-steps", 3, "--fsdp", "--resume"])
    else:
        torchrun("train_sft.py", args + [tmp_path / "two", "--max-steps", 3])
    assert_same_run(tmp_path / "one", tmp_path / "two", ("loss", "grad_norm", "tokens", "val_loss"))
    config = read_meta(tmp_path / "two")["train_config"]
    assert config["world_size"] == 2 and config["rank_batch_size"] == 2 and config["fsdp"] is fsdp
    assert "world_size" not in read_meta(tmp_path / "one")["train_config"]  # alone: the config as given


def test_rm_on_two_ranks_equals_one_process(tmp_path):
    """Comparisons and rankings (3 pairs each) split over 2 ranks: the loss is a mean over groups, the accuracy over
    pairs (all-reduced counts), and the normalisation (sampled on every rank with the same seed) is the same. The
    weights agree to 1e-4, not 1e-5: the Bradley-Terry loss does not depend on a shift of every score, so the head's
    bias (and the normalisation's bias after it) has a gradient that is rounding noise, which Adam scales up to steps
    of about the learning rate; the normalised scores, which do not see that shift, agree to 1e-5."""
    args = TINY + ["--data", toy_preferences(tmp_path / "prefs.jsonl", n=24), "--batch-size", 4, "--max-steps", 3,
                   "--lr", 1e-3, "--val-fraction", 0.25, "--normalise-samples", 4, "--normalise-max-new-tokens", 4,
                   "--threads", 1]
    run_script(train_rm, args + ["--out", tmp_path / "one"])
    two_ranks("train_rm.py", args + ["--out", tmp_path / "two"])
    assert_same_run(tmp_path / "one", tmp_path / "two", ("loss", "accuracy", "grad_norm", "tokens", "val_loss",
                                                         "val_accuracy"), weights_atol=1e-4)
    (rm1, tok), (rm2, _) = (load_reward_model(str(tmp_path / d)) for d in ("one", "two"))
    seqs = [tok.encode(f"Say {a}: a {w} {a}.") + [tok.eos_id] for a in ANIMALS for w in ("good", "bad")]
    torch.testing.assert_close(score_sequences(rm2, seqs, tok.pad_id), score_sequences(rm1, seqs, tok.pad_id),
                               rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# PPO: the same rollouts on 2 ranks or on one


def statistics_batch():
    """(8, 5) values, a second tensor and a mask with rows of 1-5 real tokens: the two halves hold different numbers of
    tokens, so a mean of the ranks' means would differ from the global mean."""
    g = torch.Generator().manual_seed(3)
    mask = (torch.arange(5)[None] < torch.tensor([5, 4, 5, 3, 1, 2, 1, 1])[:, None]).long()
    return 3 + 2 * torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g), mask


def test_ppo_update_and_statistics_on_two_ranks_equal_one_process(files, tmp_path):  # noqa: F811
    """tests/distributed_worker.py on 2 ranks, each with its half of the rows: reward and advantage whitening, the
    masked mean, explained variance and the batch KL (as run.log averages it) equal those of the whole batch; 2 PPO
    epochs with clipping on (SGD, lr 1), under DDP and under FSDP, end with the weights and statistics of one process
    on the whole batch. A NaN in rank 1's advantages alone makes both ranks skip both steps (no rank waits for
    another), the weights untouched."""
    two_ranks("tests/distributed_worker.py", [files, tmp_path])
    got = torch.load(tmp_path / "result.pt", weights_only=False)
    x, y, mask = statistics_batch()
    torch.testing.assert_close(got["whiten_rewards"], whiten(x, mask, shift_mean=False), rtol=0, atol=1e-5)
    torch.testing.assert_close(got["whiten_advantages"], whiten(x, mask, shift_mean=True), rtol=0, atol=1e-5)
    assert got["scalars"]["masked_mean"] == pytest.approx(masked_mean(x, mask).item(), abs=1e-6)
    assert got["scalars"]["explained_variance"] == pytest.approx(explained_variance(y, x, mask).item(), abs=1e-6)
    assert got["scalars"]["kl"] == pytest.approx(x.sum(1).mean().item(), abs=1e-5)
    assert got["skipped"] == [PPO_UPDATE["ppo_epochs"]] * 2 and got["unchanged"]

    cfg = make_config(files, tmp_path, **PPO_UPDATE)
    actor_critic = load_models(cfg, torch.device("cpu"))[0]
    batch, fn = random_rollout(actor_critic, cfg.temperature)
    start = {k: v.clone() for k, v in actor_critic.state_dict().items()}
    stats = train_ppo.ppo_update(actor_critic, torch.optim.SGD(actor_critic.parameters(), lr=1.0), batch, cfg, 8,
                                 torch.Generator().manual_seed(1), fn, OptimizerStep(5))
    assert max((v - start[k]).abs().max().item() for k, v in actor_critic.state_dict().items()) > 1e-3
    for mode in ("ddp", "fsdp"):
        for k, v in actor_critic.state_dict().items():
            torch.testing.assert_close(got[mode]["weights"][k], v, rtol=0, atol=1e-5, msg=f"{mode} {k}")
        assert got[mode]["stats"].keys() == stats.keys()
        for k, v in stats.items():
            assert got[mode]["stats"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (mode, k)


def ppo_args(files, out, steps: int, *extra) -> list:
    return ["--policy", files / "sft", "--reward", files / "rm", "--prompts", files / "prompts.jsonl", "--out", out,
            "--steps", steps, "--batch-size", 8, "--max-new-tokens", 6, "--sample-every", 1, "--save-every", 0,
            "--device", "cpu", "--lr", 3e-3, "--lr-schedule", "constant", "--num-minibatches", 2, "--critic",
            "separate", "--kl-horizon", 100, "--threads", 1, *extra]


def test_ppo_on_two_ranks_trains_saves_resumes_and_fsdp_agrees(files, tmp_path):  # noqa: F811
    """A 2-rank PPO run (each rank samples 4 of the 8 prompts with its own seed) trains and saves a checkpoint that
    loads in one process; a DDP run stopped after step 1 and resumed on 2 ranks (every rank's random streams come
    back) ends as an uninterrupted FSDP run of the same flags; one process refuses to resume it."""
    a, f = tmp_path / "ddp", tmp_path / "fsdp"
    two_ranks("train_ppo.py", ppo_args(files, a, 1))
    two_ranks("train_ppo.py", ppo_args(files, a, 2, "--resume"))
    two_ranks("train_ppo.py", ppo_args(files, f, 2, "--fsdp"))
    keys = ("score", "kl_k1", "kl_coef", "entropy", "policy_loss", "value_loss", "grad_norm", "explained_variance")
    assert_same_run(a, f, keys, atol=1e-5, world_sizes=(2, 2))
    m = metrics_of(a)
    assert m[1]["kl_coef"] != m[0]["kl_coef"] and m[1]["kl_k1"] != 0  # the controller moved, on the global KL
    samples = [json.loads(line) for line in open(a / "samples.jsonl")]
    assert len(samples) == 2 * 4  # rank 0's half of each step's batch
    policy, _ = load_policy(str(a))  # in one process
    assert policy(torch.tensor([[1, 2, 3]])).shape == (1, 3, 300)
    assert read_meta(a)["train_config"]["rank_batch_size"] == 4
    with pytest.raises(UserError, match=r"ran on 2 process\(es\), this one on 1"):
        train_ppo.main(make_config(files, a, steps=3, resume=True, lr=3e-3, lr_schedule="constant", num_minibatches=2,
                                   critic="separate", kl_horizon=100, sample_every=1, threads=1))


# ---------------------------------------------------------------------------------------------------------------------
# Signals and refusals reach every rank


def test_sigterm_to_the_job_saves_once_and_every_rank_exits_143(tmp_path):
    """SIGTERM to the job's process group (a scheduler's preemption): each rank finishes the same step, rank 0 saves
    it, and both exit 143 naming that step."""
    out = tmp_path / "out"
    procs = launch("train_sft.py", sft_args(tmp_path, out, "--max-steps", 400, "--threads", 1))
    wait_for_steps(out, 3, procs[0])
    os.killpg(procs[0].pid, signal.SIGTERM)
    codes, errs = finish(procs)
    assert codes == [143, 143], errs
    step = read_meta(out)["step"]
    for err in errs:
        assert err.count(f"stopped by SIGTERM after step {step}: saved {out} (step {step})") == 1
    assert 3 <= step < 400 and [r["step"] for r in metrics_of(out)] == list(range(1, step + 1))


def test_a_refused_out_stops_every_rank(tmp_path):
    """Rank 0 alone checks and locks --out; its refusal reaches rank 1, which stops too instead of waiting in a
    collective, and nothing in the folder changes."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    codes, errs = finish(launch("train_sft.py", sft_args(tmp_path, out, "--max-steps", 2, "--threads", 1)))
    assert codes == [2, 2]
    last = [err.strip().splitlines()[-1] for err in errs]
    assert last[0].startswith(f"error: {out} already holds other things (notes.txt)")
    assert last[1] == last[0].replace("error: ", "error: rank 0 stopped: ")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
