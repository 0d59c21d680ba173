"""The run layer (minirlhf/run.py), tested by causing each fault: a folder holding a user's work, two processes on one
folder, a stale lock, NaN and overflowing training, a broken reward model, a real SIGTERM / SIGINT to a real
training process, a full tmpfs, a torn log line, a damaged training state, a judge that raises; and per-rank seeds.

Tiny models on one CPU thread (the helpers of test_sft.py and test_ppo_train.py)."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import safetensors.torch
import torch

import redteam
import train_ppo
import train_rm
import train_sft
from minirlhf import checkpoint
from minirlhf.checkpoint import read_meta, save_checkpoint
from minirlhf.hf import read_weights
from minirlhf.config import UserError, run
from minirlhf.model import GPT, RewardModel
from minirlhf.run import RunConfig, append_jsonl, is_main, resolve_device, seed_everything
from test_ppo_train import files, make_config, tiny_config  # noqa: F401 (files is a fixture)
from test_sft import ANIMALS, TINY, metrics_of, run_script, run_until_first_save_crashes, sft_data, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = TINY + ["--batch-size", 2, "--val-fraction", 0, "--samples", 0, "--lr", 3e-3]


def sft_args(tmp_path, out, *extra):
    return SFT + ["--data", sft_data(tmp_path / "sft.jsonl", n=12), "--out", out, *extra]


def run_cli(module, argv, capsys) -> tuple[int, str]:
    """Run a script's command line in this process: (exit status, the last line of stderr)."""
    with pytest.raises(SystemExit) as e:
        run(module.main, module.Config, [str(a) for a in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    return e.value.code, lines[-1] if lines else ""


def all_finite(directory) -> bool:
    return all(torch.isfinite(t).all() for t in read_weights(directory / "model.safetensors").values())


# ---------------------------------------------------------------------------------------------------------------------
# Ranks


def streams(seed: int) -> tuple:
    """What seed_everything seeds: Python's and torch's global generators, and the data-order generator it returns."""
    data_gen = seed_everything(seed)
    return random.random(), torch.rand(4), torch.rand(4, generator=data_gen)


def test_each_rank_draws_its_own_random_stream(monkeypatch):
    """Pitfall 10: under torchrun (RANK set) every rank seeds with seed + rank, so rank 1 does not repeat rank 0's
    samples or data order; the same rank with the same seed repeats itself exactly."""
    monkeypatch.delenv("RANK", raising=False)
    rank0 = streams(0)
    assert is_main()
    monkeypatch.setenv("RANK", "1")
    rank1 = streams(0)
    assert not is_main()
    assert all(a != b if isinstance(a, float) else not torch.equal(a, b) for a, b in zip(rank0, rank1))
    again = streams(0)
    assert rank1[0] == again[0] and torch.equal(rank1[1], again[1]) and torch.equal(rank1[2], again[2])
    monkeypatch.setenv("RANK", "0")
    assert rank0[0] == streams(0)[0]  # rank 0 is the plain seed


def test_only_rank_zero_writes_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    append_jsonl(tmp_path / "m.jsonl", [{"step": 1}])
    assert not (tmp_path / "m.jsonl").exists()
    monkeypatch.setenv("RANK", "0")
    append_jsonl(tmp_path / "m.jsonl", [{"step": 1}, {"step": 2}])
    assert (tmp_path / "m.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_threads_default_to_the_idle_cores_or_the_environment(monkeypatch):
    """--threads 0: $OMP_NUM_THREADS when set (the demo sets it for its stages), else one thread per idle core (the
    cores, less the 1-minute load average, at least one); a number is taken as given."""
    from minirlhf import run as run_module

    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(run_module.os, "getloadavg", lambda: (0.4, 0.0, 0.0))
        assert run_module.idle_cores() == cores
        monkeypatch.setattr(run_module.os, "getloadavg", lambda: (cores + 3.0, 0.0, 0.0))
        assert run_module.idle_cores() == 1
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert run_module.set_threads(0) == 1 and torch.get_num_threads() == 1
        assert run_module.set_threads(3) == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert run_module.set_threads(0) == 3  # left as the environment (here: the last call) set it
        with pytest.raises(UserError, match="--threads must be 0"):
            run_module.set_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_resolve_device_names_and_errors():
    """--device: "auto" is CUDA when there is one, else the CPU; "cpu" as given; a CUDA device on a machine without
    CUDA, or with fewer devices than the index, and a name that is no device are errors that say so (not a traceback
    from deep inside torch). A CUDA device becomes the current one, where the Triton kernels launch."""
    resolve = resolve_device
    assert resolve("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="not a device"):
        resolve("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve("cuda:0")
    else:
        with pytest.raises(UserError, match="CUDA device"):
            resolve(f"cuda:{torch.cuda.device_count()}")
        current = torch.cuda.current_device()
        try:
            assert resolve(f"cuda:{torch.cuda.device_count() - 1}").index == torch.cuda.current_device()
        finally:
            torch.cuda.set_device(current)


# ---------------------------------------------------------------------------------------------------------------------
# The output folder is the run's own


def test_a_folder_of_other_things_is_refused_and_overwrite_keeps_them(tmp_path, capsys):
    """--out at a folder holding earlier runs and a user's notes: refused (exit 2, nothing touched); with --overwrite
    the checkpoint is written beside them and every one of them is still there, byte for byte."""
    parent = tmp_path / "parent"
    save_checkpoint(parent / "sft", GPT(tiny_config()), stage="sft", config=tiny_config(), step=3)
    (parent / "rm").mkdir()
    (parent / "rm" / "weights.bin").write_bytes(b"precious")
    (parent / "notes.txt").write_text("do not lose")
    before = {p: p.read_bytes() for p in parent.rglob("*") if p.is_file()}
    code, err = run_cli(train_sft, sft_args(tmp_path, parent, "--max-steps", 1), capsys)
    assert code == 2 and err.startswith(f"error: {parent} already holds other things (notes.txt, rm, sft)")
    assert {p: p.read_bytes() for p in parent.rglob("*") if p.is_file()} == before
    run_script(train_sft, sft_args(tmp_path, parent, "--max-steps", 1, "--overwrite"))
    assert all(p.read_bytes() == data for p, data in before.items())
    assert read_meta(parent)["step"] == 1 and read_meta(parent / "sft")["step"] == 3


def test_overwrite_of_an_earlier_run_removes_only_its_files(tmp_path):
    """--overwrite of a run of the same stage replaces that run's files and leaves a file the user put there; a
    failed start (bad data) removes nothing."""
    out = tmp_path / "out"
    run_script(train_sft, sft_args(tmp_path, out, "--max-steps", 2))
    (out / "mine.txt").write_text("keep")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": 1}])
    with pytest.raises(UserError):
        run_script(train_sft, SFT + ["--data", bad, "--out", out, "--overwrite"])
    assert read_meta(out)["step"] == 2 and len(metrics_of(out)) == 2
    run_script(train_sft, sft_args(tmp_path, out, "--max-steps", 1, "--overwrite"))
    assert read_meta(out)["step"] == 1 and len(metrics_of(out)) == 1 and (out / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("where", ["same", "inside"])
def test_out_at_or_inside_the_model_it_reads_is_refused(tmp_path, where):
    """`--init X --out X --overwrite` would destroy the model the run starts from."""
    run_script(train_sft, sft_args(tmp_path, tmp_path / "base", "--max-steps", 1))
    out = tmp_path / "base" if where == "same" else tmp_path / "base" / "next"
    args = SFT[len(TINY):] + ["--data", tmp_path / "sft.jsonl", "--init", tmp_path / "base", "--out", out,
                              "--overwrite"]
    with pytest.raises(UserError, match="is \\(or is inside\\) the input"):
        run_script(train_sft, args)
    assert read_meta(tmp_path / "base")["step"] == 1 and not (tmp_path / "base" / "next").exists()


def test_redteam_refuses_a_checkpoint_and_a_labels_folder(files, tmp_path, capsys):  # noqa: F811
    """redteam.py follows the same rule: at a PPO checkpoint it would have truncated metrics.jsonl; at a labelling
    session's folder it would have replaced failures.jsonl."""
    cfg = make_config(files, tmp_path / "ppo", steps=2)
    train_ppo.main(cfg)
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "failures.jsonl").write_text('{"prompt": "p", "output": "o"}\n')
    (labels / "run.json").write_text('{"stage": "labels"}\n')
    for out, owner in ((tmp_path / "ppo", "the output of a ppo run"), (labels, "the output of a labels run")):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        code, err = run_cli(redteam, ["--policy", files / "sft", "--out", out, "--search-budget", 0], capsys)
        assert code == 2 and f"{out} already holds {owner}" in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---------------------------------------------------------------------------------------------------------------------
# One writer


HOLDER = textwrap.dedent("""
    import sys, time
    from types import SimpleNamespace
    from minirlhf.run import Run
    cfg = SimpleNamespace(out=sys.argv[1], overwrite=False, seed=0, device="cpu", threads=1)
    with Run(cfg, stage="sft", writes=()):
        print("holding", flush=True)
        time.sleep(60)
""")


def test_a_second_process_on_the_same_folder_is_refused(tmp_path):
    """Two real processes: while one holds --out, another run there stops at once, naming the holder's pid; after
    the holder dies (SIGKILL: no cleanup), its leftover lock file is taken over with a note."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(UserError, match=rf"{out} is in use by pid {holder.pid} on .*one run writes to a folder"):
            run_script(train_sft, sft_args(tmp_path, out, "--max-steps", 1, "--overwrite"))
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".lock").is_file()  # a killed process leaves its lock file, not its lock
    run_script(train_sft, sft_args(tmp_path, out, "--max-steps", 1, "--overwrite"))
    assert read_meta(out)["step"] == 1 and not (out / ".lock").exists()


def test_two_concurrent_training_processes_never_both_write(tmp_path):
    """Two training processes started together on one --out: exactly one trains and saves; the other exits 2 with
    the lock's message; the metrics are one run's, not interleaved."""
    out = tmp_path / "out"
    argv = [sys.executable, os.path.join(ROOT, "train_sft.py")] + [str(a) for a in sft_args(
        tmp_path, out, "--max-steps", 6, "--threads", 1)]
    env = {**os.environ, "MINIRLHF_NO_PROGRESS": "1"}
    procs = [subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
             for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 2] and "is in use by pid" in results[1][1]
    assert [r["step"] for r in metrics_of(out)] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------------------------------
# Finite or nothing


def test_a_diverging_run_skips_its_steps_stops_and_never_saves_nan(tmp_path, capsys):
    """--lr 1e30: every step after the first has a non-finite loss; each is skipped (weights untouched, counted in
    skipped_steps), --max-skipped-steps 3 in a row stop the run with exit 3 and a line saying what is kept, and every
    checkpoint written (--save-every 1) is finite."""
    out = tmp_path / "out"
    code, err = run_cli(train_sft, sft_args(tmp_path, out, "--max-steps", 20, "--lr", 1e30, "--save-every", 1,
                                            "--max-skipped-steps", 3, "--warmup", 0), capsys)
    assert code == 3
    assert err == (f"3 optimizer steps in a row had a non-finite loss or gradient (--max-skipped-steps 3): the "
                   f"training diverged (too high a --lr?); {out} keeps the checkpoint of step {read_meta(out)['step']}")
    skipped = [r["skipped_steps"] for r in metrics_of(out) if "loss" in r]
    assert skipped[-2:] == [1, 2] and skipped[0] == 0  # (the third skip stops the run before its log line)
    assert all_finite(out) and "nan" not in (out / "config.json").read_text().lower()


def test_rm_with_an_absurd_learning_rate_stops_without_a_nan_checkpoint(tmp_path, capsys):
    sft = tmp_path / "sft"
    run_script(train_sft, sft_args(tmp_path, sft, "--max-steps", 1))
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"Say {a}:", "chosen": f" {a}.", "rejected": " no."}
                                                   for a in ANIMALS * 2])
    code, err = run_cli(train_rm, ["--init", sft, "--data", prefs, "--out", tmp_path / "rm", "--max-steps", 12,
                                   "--lr", 1e30, "--batch-size", 2, "--val-fraction", 0, "--normalise-on",
                                   "responses", "--max-skipped-steps", 2, "--warmup", 0], capsys)
    assert code == 3 and "the training diverged" in err
    assert not (tmp_path / "rm" / "model.safetensors").exists() or all_finite(tmp_path / "rm")


def test_ppo_names_a_reward_model_that_gives_nan(files, tmp_path):  # noqa: F811
    """A reward model with a NaN gain (written by hand: the checkpoint writer itself refuses NaN) is named in one
    line before anything is trained or saved."""
    save_checkpoint(tmp_path / "rm", RewardModel(GPT(tiny_config())), stage="rm", config=tiny_config())
    weights = read_weights(tmp_path / "rm" / "model.safetensors")
    weights["gain"] = torch.tensor(float("nan"))
    safetensors.torch.save_file(weights, str(tmp_path / "rm" / "model.safetensors"))
    with pytest.raises(UserError, match=r"--reward .*rm: the reward model gave non-finite scores to 8 of 8 responses"):
        train_ppo.main(make_config(files, tmp_path / "out", reward=str(tmp_path / "rm")))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_ppo_with_overflowing_rewards_never_writes_nan(files, tmp_path):  # noqa: F811
    """A reward of +-1e38 is finite, but its square overflows: whitened, the advantages come out finite (0) and the
    run ends with finite weights; unwhitened, the value loss overflows, the PPO steps are skipped and the run stops
    with exit 3. Neither writes a NaN checkpoint."""
    (tmp_path / "huge.py").write_text("def f(p, r):\n    return [1e38 if i % 2 else -1e38 for i in range(len(r))]\n")
    kw = dict(reward=f"{tmp_path / 'huge.py'}:f", steps=5, max_skipped_steps=4, penalize_missing_eos=False)
    train_ppo.main(make_config(files, tmp_path / "whitened", **kw))
    assert read_meta(tmp_path / "whitened")["step"] == 5 and all_finite(tmp_path / "whitened")
    with pytest.raises(UserError, match="non-finite loss or gradient") as e:
        train_ppo.main(make_config(files, tmp_path / "raw", whiten_rewards=False, **kw))
    assert e.value.exit_code == 3 and not (tmp_path / "raw" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Signals


def start_training(tmp_path, out, *extra):
    argv = [sys.executable, os.path.join(ROOT, "train_sft.py")] + [str(a) for a in sft_args(
        tmp_path, out, "--max-steps", 400, "--threads", 1, *extra)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MINIRLHF_NO_PROGRESS": "1"})


def wait_for_steps(out, n, proc):
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {n}")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_step_and_resume_equals_an_uninterrupted_run(tmp_path, sig, code):
    """A real SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) to a real training process: it finishes its step,
    saves a resumable checkpoint, says which step, and exits 143 / 130; --resume then ends with the weights and
    losses of a run that was never interrupted."""
    out = tmp_path / "b"
    proc = start_training(tmp_path, out)
    wait_for_steps(out, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    step = read_meta(out)["step"]
    assert f"stopped by {sig.name} after step {step}: saved {out} (step {step}); the same command with --resume " \
           "continues exactly" in err
    assert 3 <= step < 400 and [r["step"] for r in metrics_of(out)] == list(range(1, step + 1))
    total = step + 3
    run_script(train_sft, sft_args(tmp_path, out, "--max-steps", 400, "--resume", "--threads", 1))
    run_script(train_sft, sft_args(tmp_path, tmp_path / "a", "--max-steps", 400, "--threads", 1))
    a, b = metrics_of(tmp_path / "a"), metrics_of(out)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-6) and len(a) >= total
    wa, wb = read_weights(tmp_path / "a" / "model.safetensors"), read_weights(out / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_a_second_signal_stops_at_once(tmp_path):
    """SIGTERM twice: no save is waited for; the process is gone with the signal's own status and no checkpoint of
    a later step than the last one written (here: none, as --save-every is 0)."""
    out = tmp_path / "out"
    proc = start_training(tmp_path, out, "--max-steps", 100000)
    wait_for_steps(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode in (-signal.SIGTERM, 143)
    if proc.returncode == -signal.SIGTERM:  # killed before its step ended: nothing saved
        assert not (out / "config.json").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Full disks, torn logs, damaged files, stray temporaries


def mount_tmpfs(path, size: int) -> None:
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
                      ).returncode:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, capsys):
    """A real full disk: a tmpfs with room for one checkpoint (weights and optimizer state) and a half, so the second
    save cannot fit beside the first. One line names ENOSPC and the step still there, which loads."""
    run_script(train_sft, sft_args(tmp_path, tmp_path / "probe", "--max-steps", 1))
    size = sum(p.stat().st_size for p in (tmp_path / "probe").iterdir())
    disk = tmp_path / "disk"
    mount_tmpfs(disk, size * 3 // 2)
    try:
        out = disk / "out"
        code, err = run_cli(train_sft, sft_args(tmp_path, out, "--max-steps", 4, "--save-every", 2), capsys)
        assert code == 2
        assert err == (f"error: could not save step 4 to {out}: No space left on device (errno 28); {out} keeps its "
                       "checkpoint of step 2")
        assert read_meta(out)["step"] == 2 and all_finite(out) and not (out / ".staging").exists()
        checkpoint.load_policy(str(out))
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_torn_log_line_is_dropped_on_resume(tmp_path, monkeypatch, capsys):
    """A crash (or a full disk) mid-write leaves half a line at the end of metrics.jsonl: --resume drops it with a
    note instead of failing on JSON, and the log reads like an uninterrupted run."""
    out = tmp_path / "b"
    args = sft_args(tmp_path, out, "--max-steps", 4, "--save-every", 2)
    run_until_first_save_crashes(train_sft, args, monkeypatch)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    run_script(train_sft, args + ["--resume"])
    assert "dropped its last line, torn by an interrupted write" in capsys.readouterr().out
    assert [r["step"] for r in metrics_of(out)] == [1, 2, 3, 4]


def test_a_damaged_training_state_is_a_clear_error(tmp_path):
    out = tmp_path / "out"
    run_script(train_sft, sft_args(tmp_path, out, "--max-steps", 2))
    data = (out / "training_state.pt").read_bytes()
    (out / "training_state.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match=r"training_state.pt: damaged, cannot be read .*cannot be resumed exactly"):
        run_script(train_sft, sft_args(tmp_path, out, "--max-steps", 3, "--resume"))


def test_edited_data_of_the_same_size_is_refused_on_resume(tmp_path):
    out = tmp_path / "out"
    run_script(train_sft, sft_args(tmp_path, out, "--max-steps", 2))
    text = (tmp_path / "sft.jsonl").read_text()
    (tmp_path / "sft.jsonl").write_text(text.replace("cat", "cow"))  # as many records, other words
    with pytest.raises(UserError, match="the data files changed since the run"):
        run_script(train_sft, SFT + ["--data", tmp_path / "sft.jsonl", "--out", out, "--max-steps", 3, "--resume"])


def test_a_stale_staging_folder_is_cleaned_by_the_next_run(tmp_path, capsys):
    """A save killed before its commit leaves .staging behind; the next run in that folder removes it."""
    out = tmp_path / "out"
    run_script(train_sft, sft_args(tmp_path, out, "--max-steps", 2))
    (out / ".staging").mkdir()
    (out / ".staging" / "model.safetensors").write_bytes(b"half")
    run_script(train_sft, sft_args(tmp_path, out, "--max-steps", 3, "--resume"))
    assert not (out / ".staging").exists() and read_meta(out)["step"] == 3


# ---------------------------------------------------------------------------------------------------------------------
# Red teaming keeps what it has


def test_a_judge_that_raises_stops_cleanly_with_the_outputs_on_disk(files, tmp_path, capsys):  # noqa: F811
    """A user's judge raising on the 5th output: the run stops with exit 2 naming the judge and where the outputs
    are, every output generated so far is in samples.jsonl; --skip-failing-judges drops the judge and finishes."""
    (tmp_path / "j.py").write_text(textwrap.dedent("""
        calls = []
        def flaky(sample, ctx):
            calls.append(1)
            if len(calls) == 5:
                raise ValueError("boom")
            return 0.0
    """))
    out = tmp_path / "rt"
    argv = ["--policy", files / "sft", "--judges", f"length,{tmp_path / 'j.py'}:flaky", "--search-budget", 0,
            "--samples-per-prompt", 1, "--batch-size", 4, "--max-new-tokens", 4, "--out", out, "--device", "cpu"]
    code, err = run_cli(redteam, argv, capsys)
    assert code == 2 and "flaky' raised ValueError: boom" in err and f"are in {out / 'samples.jsonl'}" in err
    saved = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(saved) >= 4 and saved[-1]["verdicts"] is None and not (out / "report.md").exists()
    with pytest.warns(UserWarning, match="skipped from now on"):
        redteam.main(redteam.Config(**{**vars(redteam.Config()), "policy": str(files / "sft"),
                                       "judges": f"length,{tmp_path / 'j.py'}:flaky", "search_budget": 0,
                                       "samples_per_prompt": 1, "batch_size": 4, "max_new_tokens": 4,
                                       "out": str(tmp_path / "rt2"), "device": "cpu", "skip_failing_judges": True}))
    assert (tmp_path / "rt2" / "report.md").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# The flags


def test_help_lists_the_essentials_first_and_every_flag_in_a_group():
    """`train_ppo.py --help`: the essentials group first (the handful of flags a user sets), then the numbered steps,
    the run layer's flags last; every flag has one line of help."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_ppo.py"), "--help"], capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "200"}).stdout
    headings = [line[:-1] for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headings[:3] == ["options", "essentials", "1. rollout"] and headings[-1] == "run"
    essentials = out[out.index("essentials:"):out.index("1. rollout:")]
    assert all(f"--{f}" in essentials for f in ("policy", "reward", "prompts", "steps", "kl-coef", "lr"))
    assert "--kl-clamp" not in essentials and "--adam-eps" not in essentials
    assert len(out.splitlines()) < 120


def test_run_config_fields_are_the_run_group():
    assert {f.metadata["group"] for f in RunConfig.__dataclass_fields__.values()} == {"run"}


def test_keep_freed_memory_stops_the_page_faults_of_reallocation():
    """keep_freed_memory (glibc mallopt): a 64 MiB tensor freed and allocated again 20 times is mapped and zero-filled
    by the kernel each time by default (a page fault per 4 KiB page, ~16k per round); after it, malloc reuses the
    freed memory and only the first round or two fault. Counted by the process's minor page faults, in a fresh
    process each way."""
    code = textwrap.dedent("""
        import resource, sys, torch
        from minirlhf.run import keep_freed_memory
        if sys.argv[1] == "keep":
            assert keep_freed_memory()
        torch.empty(16 * 2 ** 20).fill_(1)  # the first round maps the memory either way
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            torch.empty(16 * 2 ** 20).fill_(1)  # 64 MiB, written, freed
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", code, mode], cwd=ROOT, capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        return int(out.stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    assert default > 20 * 10_000  # ~16k faults per round
    assert kept * 5 < default  # (a round or two, then none)
