"""`make demo` in miniature: the tiny preset runs every stage on generated stand-in sentences (never the fetched set),
each stage as its own process, each stage's output loads in the next, the commands in the report rebuild the exact
configs the stages ran with, and the report has every section. Plus the orchestrator's small pieces against
hand-worked cases: flags and --set, a failing or interrupted stage, the threads a stage gets."""
import dataclasses
import json
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys

import pytest
import torch

import redteam
import train_ppo
import train_rm
import train_sft
from minirlhf.checkpoint import load_policy, load_reward_model, read_meta
from minirlhf.config import UserError, build_parser, parse_args, to_dict
from minirlhf.demo import data as demo_data
from minirlhf.demo import pipeline as demo
from minirlhf.training import lr_factor

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = {"data": demo_data.Config, "pretrain": train_sft.Config, "sft": train_sft.Config, "rm": train_rm.Config,
           "ppo": train_ppo.Config, "redteam": redteam.Config, "judge": demo.JudgeConfig}


def parser_flags(stage: str) -> dict[str, str]:
    """What stage_flags reads from a stage's --help, from the script's parser in this process (no process started)."""
    return demo.flag_kinds(build_parser(CLASSES[stage]).format_help())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    threads = torch.get_num_threads()
    try:  # one thread: tiny matrices gain nothing from more, and a busy CI machine loses a lot
        report = demo.main(demo.Config(preset="tiny", out=str(out), device="cpu", threads=1))
    finally:
        torch.set_num_threads(threads)
    return out, report


# ---------------------------------------------------------------------------------------------------------------------
# The whole pipeline


def test_each_stage_loads_in_the_next(tiny_run):
    out, _ = tiny_run
    pre, tok = load_policy(str(out / "pretrain"))
    assert read_meta(out / "pretrain")["stage"] == "pretrain" and tok.name == "gpt2-1k"
    sft, _ = load_policy(str(out / "sft"))
    assert read_meta(out / "sft")["train_config"]["init"] == str(out / "pretrain")
    assert sft.config == pre.config
    rm, _ = load_reward_model(str(out / "rm"))
    assert read_meta(out / "rm")["train_config"]["init"] == str(out / "sft")
    ppo_meta = read_meta(out / "ppo")
    assert ppo_meta["stage"] == "ppo"
    assert (ppo_meta["train_config"]["policy"], ppo_meta["train_config"]["reward"]) == (str(out / "sft"),
                                                                                      str(out / "rm"))
    ppo, _ = load_policy(str(out / "ppo"))
    assert ppo.config == sft.config
    redteam = json.loads((out / "redteam" / "report.json").read_text())
    assert redteam["policies"] == [str(out / "ppo"), str(out / "sft")]


def test_report_has_every_section(tiny_run):
    out, report = tiny_run
    text = report.read_text()
    for heading in ("## Stages", "## Targets", "## Step 1: the pre-trained model", "## Plots",
                    "## Ten prompts, step 1, SFT, PPO", "## Red teaming", "## Reproduce", "## Data"):
        assert heading in text, heading
    for name in ("lm_loss.png", "rm.png", "ppo.png"):
        assert f"(plots/{name})" in text
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stages = text.split("## Stages")[1].split("##")[0]
    assert sum(ln.startswith("| ") for ln in stages.splitlines()) == 1 + len(demo.STAGES)  # header + rows
    section = text.split("## Ten prompts, step 1, SFT, PPO")[1].split("##")[0]
    assert sum(ln.startswith("| ") for ln in section.splitlines()) == 1 + len(demo.FIXED_PROMPTS)  # header + rows
    redteam = text.split("## Red teaming")[1].split("##")[0]
    assert "redteam/report.md" in redteam and "| sentiment |" in redteam and "| any |" in redteam


def test_commands_in_the_report_rebuild_the_configs_that_ran(tiny_run):
    out, _ = tiny_run
    commands = {s["name"]: s["command"] for s in json.loads((out / "stages.json").read_text())}
    for name in ("pretrain", "sft", "rm", "ppo"):
        cls = CLASSES[name]
        argv = shlex.split(commands[name])
        assert argv[:3] == ["python", "-m", cls.__module__]
        assert commands[name] in (out / "report.md").read_text()
        assert to_dict(parse_args(cls, argv[3:])) == read_meta(out / name)["train_config"], name
    rm, ppo = (read_meta(out / name)["train_config"] for name in ("rm", "ppo"))  # normalised on PPO's sampling
    assert (rm["normalise_max_new_tokens"], rm["normalise_temperature"]) == (ppo["max_new_tokens"], ppo["temperature"])


def test_each_stage_logs_the_learning_rate_of_its_schedule(tiny_run):
    """Every step's logged lr is the stage's --lr times lr_factor (hand-worked in test_training.py) at that step, with
    the schedule the stage ran: train_sft.py and train_rm.py warm up for round(--warmup x steps) steps, then decay
    by --schedule; train_ppo.py warms up for --warmup-steps, then --lr-schedule."""
    out, _ = tiny_run
    for name in ("pretrain", "sft", "rm", "ppo"):
        meta = read_meta(out / name)
        cfg, steps = meta["train_config"], meta["step"]
        warmup, schedule = ((cfg["warmup_steps"], cfg["lr_schedule"]) if name == "ppo"
                            else (round(cfg["warmup"] * steps), cfg["schedule"]))
        logged = [(r["step"], r["lr"]) for r in demo.read_metrics(out / name / "metrics.jsonl") if "lr" in r]
        assert [step for step, _ in logged] == list(range(1, steps + 1)), name
        for step, lr in logged:
            expected = cfg["lr"] * lr_factor(step - 1, steps, warmup, schedule)
            assert lr == pytest.approx(expected, rel=1e-12), (name, step)
        assert len({lr for _, lr in logged}) > 1, name  # the schedule moves in every stage (the check can fail)


def test_judge_numbers_match_its_samples(tiny_run):
    """judge.json's shares recomputed from judge_samples.jsonl with a plain loop."""
    out, _ = tiny_run
    judged = json.loads((out / "judge.json").read_text())
    rows = [json.loads(line) for line in (out / "judge_samples.jsonl").read_text().splitlines()]
    assert len(rows) == judged["prompts"] == demo.PRESETS["tiny"]["judge"]["prompts"]
    for name in ("sft", "ppo"):
        positive = 0
        for r in rows:
            positive += demo.vader_compound([r[name]])[0] >= 0.05
        assert judged[name]["vader_positive"] == pytest.approx(positive / len(rows))
        p = positive / len(rows)  # the standard error of a share: sqrt(p (1 - p) / n)
        assert judged[name]["vader_positive_se"] == pytest.approx(math.sqrt(p * (1 - p) / len(rows)))
        words = 0
        for r in rows:
            words += len(r[name].split())
        assert judged[name]["mean_words"] == pytest.approx(words / len(rows))
        assert judged[name]["distinct_continuations"] == len({r[name].strip() for r in rows})
    assert judged["ppo"]["kl_mean"] == pytest.approx(sum(r["ppo_kl"] for r in rows) / len(rows), abs=1e-3)
    assert judged["vader_gain_pp"] == pytest.approx(100 * (judged["ppo"]["vader_positive"]
                                                           - judged["sft"]["vader_positive"]))
    assert 0 <= judged["rm_accuracy"] <= 1 and judged["rm_pairs"] > 0


def test_rm_accuracy_agrees_with_train_rm(tiny_run):
    """The judge scores the held-out sentences itself (score_texts); train_rm.py's last evaluation counted the same
    pairs with its own code."""
    out, _ = tiny_run
    judged = json.loads((out / "judge.json").read_text())
    last = [r for r in demo.read_metrics(out / "rm" / "metrics.jsonl") if "val_accuracy" in r][-1]
    assert judged["rm_pairs"] == last["val_pairs"]
    assert judged["rm_accuracy"] == pytest.approx(last["val_accuracy"], abs=1e-6)


def test_judging_a_policy_against_itself_gives_zero_kl(tiny_run, tmp_path):
    out, _ = tiny_run
    jc = demo.JudgeConfig(prompts=6, max_new_tokens=8, batch_size=4)
    judged = demo.judge(str(out / "sft"), str(out / "sft"), str(out / "rm"), out / "data", tmp_path, jc, seed=3,
                        device=torch.device("cpu"))
    same = dict(judged["ppo"])
    assert same.pop("kl_mean") == 0.0
    assert same == judged["sft"] and judged["vader_gain_pp"] == 0.0  # same seed: the same continuations
    assert [r["sft"] for r in judged["fixed"]] == [r["ppo"] for r in judged["fixed"]]


def test_rerun_starts_over_and_reuse_keeps_finished_unchanged_stages(tiny_run):
    out, _ = tiny_run

    def stamps():
        return {name: (out / name / "model.safetensors").stat().st_mtime_ns for name in ("pretrain", "sft", "rm", "ppo")}

    def rerun(reuse: bool, overrides=()):
        threads = torch.get_num_threads()
        try:
            demo.main(demo.Config(preset="tiny", out=str(out), device="cpu", threads=1, reuse=reuse,
                                  set=list(overrides)))
        finally:
            torch.set_num_threads(threads)

    before = stamps()
    rerun(reuse=False)  # `make demo` twice: every stage runs again over its old output
    after = stamps()
    assert all(after[name] != before[name] for name in before)
    ran = json.loads((out / "stages.json").read_text())
    rerun(reuse=True)
    assert stamps() == after
    stages = json.loads((out / "stages.json").read_text())
    assert [s["reused"] for s in stages] == [True] * (len(demo.STAGES) - 1) + [False]  # only the judge reran
    for old, new in zip(ran[:-1], stages[:-1]):  # a reused stage reports the times of the run that made it
        assert (new["wall_s"], new["cpu_s"]) == (old["wall_s"], old["cpu_s"]) and old["wall_s"] > 0, old["name"]
    # a run interrupted during PPO: stages.json ends before it, though ppo/ holds an intermediate checkpoint
    names = [s["name"] for s in stages]
    (out / "stages.json").write_text(json.dumps(stages[:names.index("ppo")]))
    rerun(reuse=True)
    again = stamps()
    assert [name for name in again if again[name] != after[name]] == ["ppo"]
    # a changed flag (one that changes no number) reruns its stage and every stage after it
    rerun(reuse=True, overrides=["rm.save_every=1000"])
    changed = stamps()
    assert [name for name in changed if changed[name] != again[name]] == ["rm", "ppo"]
    reused = {s["name"]: s["reused"] for s in json.loads((out / "stages.json").read_text())}
    assert reused == {"data": True, "pretrain": True, "sft": True, "rm": False, "ppo": False, "redteam": False,
                      "judge": False}


# ---------------------------------------------------------------------------------------------------------------------
# Pieces


def test_overrides_convert_bools_and_lists_and_reject_unknown_flags():
    """--set keeps a value as written for the stage's program to convert; a bool flag becomes True/False, a list flag
    its comma-separated items; a stage or flag that does not exist (or a prefix of one) is refused."""
    preset = demo.apply_overrides(demo.PRESETS["tiny"], ["ppo.steps=7", "rm.lr=2e-4", "ppo.adaptive_kl=false",
                                                         "judge.temperature=1", "redteam.attack_file=a.txt,b.jsonl",
                                                         "ppo.lr_schedule=constant", "ppo.max-new-tokens=9"],
                                  parser_flags)
    assert preset["ppo"]["steps"] == "7" and preset["rm"]["lr"] == "2e-4" and preset["ppo"]["adaptive_kl"] is False
    assert preset["judge"]["temperature"] == "1" and preset["redteam"]["attack_file"] == ["a.txt", "b.jsonl"]
    assert preset["ppo"]["lr_schedule"] == "constant" and preset["ppo"]["max_new_tokens"] == "9"  # flag spelling too
    assert "adaptive_kl" not in demo.PRESETS["tiny"]["ppo"]  # the preset itself is untouched
    for bad, message in (("ppo.steps", "STAGE.FLAG=VALUE"), ("nope.steps=1", "STAGE.FLAG=VALUE"),
                         ("ppo.stepz=1", r"ppo has no flag --stepz \(see python -m train_ppo --help\)"),
                         ("ppo.step=1", "ppo has no flag --step "),
                         ("judge.temp=1", r"judge has no flag --temp \(its flags: --prompts, --max-new-tokens, "),
                         ("ppo.adaptive_kl=maybe", "not a valid bool")):
        with pytest.raises(UserError, match=message):
            demo.apply_overrides(demo.PRESETS["tiny"], [bad], parser_flags)
    threads = torch.get_num_threads()
    with pytest.raises(UserError, match="the demo sets ppo.seed itself"):  # would be silently overwritten
        demo.main(demo.Config(preset="tiny", set=["ppo.seed=3"], out="/nonexistent/never-written"))
    assert torch.get_num_threads() == threads  # stopped before touching anything


def test_flag_kinds_read_every_scripts_help():
    """flag_kinds finds every flag of every stage's program in its --help text, with its kind."""
    for stage, cls in CLASSES.items():
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        kinds = parser_flags(stage)
        assert set(kinds) == set(hints), stage
        for name, kind in kinds.items():
            expected = "bool" if hints[name] in (bool, "bool") else "list" if str(hints[name]).startswith("list") \
                else "value"
            assert kind == expected, (stage, name)
    assert parser_flags("ppo")["adaptive_kl"] == "bool" and parser_flags("redteam")["attack_file"] == "list"


def test_set_mistakes_fail_before_any_stage_runs(tmp_path):
    """A flag the script does not have (checked against its --help) and a value its argparse refuses (the stage's
    flags followed by --help) stop the demo before it writes anything."""
    out = tmp_path / "demo"
    for bad, message in (("ppo.no_such_flag=1", "ppo has no flag --no-such-flag"),
                         ("ppo.steps=many", "python -m train_ppo rejects the flags of stage ppo:\n.*argument --steps: "
                                            "invalid int value: 'many'")):
        with pytest.raises(UserError, match=message):
            demo.main(demo.Config(preset="tiny", out=str(out), device="cpu", threads=1, set=[bad]))
        assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:  # the judge's flags, by its argparse here
        demo.main(demo.Config(preset="tiny", out=str(out), device="cpu", threads=1, set=["judge.temperature=warm"]))
    assert exit_info.value.code == 2 and not out.exists()


def test_a_failing_stage_stops_the_demo_with_its_stderr(tmp_path):
    """train_sft.py accepts any --tokenizer name and refuses an unknown one when it runs: the demo's error has the
    stage's exit code and its last lines, and no later stage runs."""
    out = tmp_path / "demo"
    with pytest.raises(UserError, match=r"stage pretrain failed with exit code 2; the end of its stderr:\n"
                                        r".*error: unknown tokenizer 'gpt2-nope'"):
        demo.main(demo.Config(preset="tiny", out=str(out), device="cpu", threads=1,
                              set=["pretrain.tokenizer=gpt2-nope"]))
    assert [s["name"] for s in json.loads((out / "stages.json").read_text())] == ["data"]
    assert sorted(p.name for p in out.iterdir()) == ["data", "stages.json"]


def test_a_stage_process_gets_the_demo_threads(monkeypatch):
    """torch in a stage's process starts with the demo's --threads (OMP_NUM_THREADS), not with what the demo's own
    environment says (torch caps the number at the cores it may use)."""
    check = "import sys, torch; n = torch.get_num_threads(); sys.exit(f'{{n}} threads' if n != {} else 0)"
    cores = len(os.sched_getaffinity(0))
    for threads, inherited in ((1, 2), (2, 1))[:cores]:
        monkeypatch.setenv("OMP_NUM_THREADS", str(inherited))
        demo.run_process("check", [sys.executable, "-c", check.format(threads)], threads)  # raises if it exits 1
    with pytest.raises(UserError, match="1 threads"):  # the check itself can fail
        demo.run_process("check", [sys.executable, "-c", check.format(7)], 1)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_demo_stops_the_running_stage(signum):
    """SIGINT or SIGTERM to the demo's process reaches the stage's process (which runs in a session of its own, out
    of reach of a terminal's Ctrl-C) and stops it; the demo exits with 128 + the signal."""
    stage = "import os, time; print(os.getpid(), flush=True); time.sleep(120)"
    demo_process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from minirlhf.demo.pipeline import run_process; "
                               f"run_process('sleep', [sys.executable, '-c', {stage!r}], 1)"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stage_pid = int(demo_process.stdout.readline())
    demo_process.send_signal(signum)
    assert demo_process.wait(timeout=60) == 128 + signum  # the stage would sleep for 120 s
    assert f"interrupted: stage sleep stopped by {signum.name}" in demo_process.stderr.read()
    with pytest.raises(ProcessLookupError):
        os.kill(stage_pid, 0)


def test_the_demo_runs_as_python_m_minirlhf_demo():
    """`make demo`'s command runs the package's __main__.py, and its usage names the package, not that file."""
    shown = subprocess.run([sys.executable, "-m", "minirlhf.demo", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: python -m minirlhf.demo [options]")


def test_command_line_quotes_what_the_shell_would_split():
    cfg = demo.Config(preset="tiny", reuse=True, set=["ppo.steps=3", "rm.lr=1e-3"], out="my dir")
    line = demo.command_line("python -m minirlhf.demo", demo.argv_of(demo.changed_flags(cfg)))
    assert line == "python -m minirlhf.demo --preset tiny --out 'my dir' --set ppo.steps=3 rm.lr=1e-3 --reuse"
    assert parse_args(demo.Config, shlex.split(line)[3:]) == cfg
    flags = {"missing_eos_penalty": -2.0, "adaptive_kl": False, "whiten_rewards": True, "stop_token": "",
             "prompts": "my prompts.jsonl", "out": None}
    line = demo.command_line("python -m train_ppo", demo.argv_of(flags))
    assert line == ("python -m train_ppo --missing-eos-penalty=-2.0 --no-adaptive-kl --whiten-rewards --stop-token '' "
                    "--prompts 'my prompts.jsonl'")
    assert parse_args(train_ppo.Config, shlex.split(line)[3:]) == train_ppo.Config(
        missing_eos_penalty=-2.0, adaptive_kl=False, stop_token="", prompts="my prompts.jsonl")
    line = demo.command_line("python -m redteam", demo.argv_of({"attack_file": ["a.txt", "b c.jsonl"]}))
    assert parse_args(redteam.Config, shlex.split(line)[3:]).attack_file == ["a.txt", "b c.jsonl"]


def test_vader_by_step(tmp_path):
    samples = tmp_path / "samples.jsonl"
    rows = [(5, "a wonderful, great film"), (5, "awful and boring"), (5, "it is a film"), (5, "I love it"),
            (10, "great"), (10, "superb, lovely")]
    samples.write_text("".join(json.dumps({"step": s, "prompt": "x", "response": r}) + "\n" for s, r in rows))
    assert demo.vader_by_step(samples) == [(5, 0.5), (10, 1.0)]


def test_tail_mean_and_time_format():
    records = [{"step": i, "kl": float(i)} for i in range(1, 21)] + [{"step": 21}]
    assert demo.tail_mean(records, "kl", 0.1) == pytest.approx(19.5)  # the last 2 of 20 values
    assert demo.tail_mean(records, "missing") is None
    assert (demo.fmt_time(42), demo.fmt_time(150)) == ("42 s", "2.5 min")


# ---------------------------------------------------------------------------------------------------------------------
# The report's numbers, the KL the judge reports, the stage metrics


def test_judge_kl_is_the_policy_minus_the_reference_log_probs(tiny_run, monkeypatch):
    """sample_and_kl's KL of each continuation is sum_t log pi(y_t) - log pi_ref(y_t), with the log-probs recomputed
    here in float64 from each model's full-forward logits / temperature at the positions before the response tokens
    (the sampled tokens come from a spy on generate). The reference is the pre-trained model, far enough from the
    PPO policy that a flipped sign shows (the check can fail)."""
    out, _ = tiny_run
    policy, tokenizer = load_policy(str(out / "ppo"))
    reference, _ = load_policy(str(out / "pretrain"))
    gens, real_generate = [], demo.generate_batch  # what sample_and_kl samples with
    monkeypatch.setattr(demo, "generate_batch", lambda *a, **k: gens.append(real_generate(*a, **k)) or gens[-1])
    jc = demo.JudgeConfig(prompts=6, max_new_tokens=8, temperature=0.8, batch_size=4)
    prompts = ["The movie", "It's a", "The story", "In the end,", "The acting", "This film is"]
    _, kls = demo.sample_and_kl(policy, reference, tokenizer, prompts, jc, seed=1, desc="kl")
    expected = []
    for gen in gens:  # two batches: 4 prompts, then 2
        P = gen.prompt_len
        with torch.no_grad():
            logp = [torch.log_softmax(m(gen.sequences, gen.attention_mask)[:, P - 1:-1].double() / 0.8, -1)
                    for m in (policy, reference)]
        targets = torch.where(gen.response_mask.bool(), gen.response, 0)[..., None]
        diff = (logp[0].gather(-1, targets) - logp[1].gather(-1, targets))[..., 0] * gen.response_mask
        expected += diff.sum(1).tolist()
    assert len(kls) == len(expected) == 6
    assert kls == pytest.approx(expected, abs=1e-4)
    assert max(abs(k) for k in expected) > 0.1


def test_stage_metrics_read_the_right_numbers(tmp_path):
    """The report's key number per stage from hand-made metrics files: PPO's first score, then the mean score and
    k1 KL of the last 10% of steps (2 of 15, rounded up); the reward model's last held-out accuracy."""
    (tmp_path / "ppo").mkdir()
    rows = [{"step": i, "score": 0.1 * i, "kl_k1": float(i), "kl_k3": 100.0 + i} for i in range(1, 16)]
    (tmp_path / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert demo.stage_metric("ppo", tmp_path).startswith("RM score +0.10 -> +1.45, KL 14.50 nats")
    (tmp_path / "rm").mkdir()
    rows = [{"step": 1, "val_accuracy": 0.5, "val_pairs": 40}, {"step": 2, "loss": 1.0},
            {"step": 3, "val_accuracy": 0.75, "val_pairs": 40}]
    (tmp_path / "rm" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert demo.stage_metric("rm", tmp_path).startswith("held-out pairwise accuracy 0.750 (40 pairs")


def fake_judged(gain_pp: float, kl: float, rm_accuracy: float) -> dict:
    sft = {"vader_positive": 0.40, "vader_positive_se": 0.03, "vader_mean": 0.0, "reward_mean": -0.25,
           "mean_words": 10.6, "mean_tokens": 17.31, "distinct_1": 0.3, "distinct_2": 0.6667,
           "distinct_continuations": 97, "distinct_share": 0.97, "top": [[".", 3], ["", 2]]}
    ppo = {"vader_positive": 0.40 + gain_pp / 100, "vader_positive_se": 0.04, "vader_mean": 0.2, "reward_mean": 0.5,
           "kl_mean": kl, "mean_words": 3.34, "mean_tokens": 5.0, "distinct_1": 0.2, "distinct_2": 0.391,
           "distinct_continuations": 65, "distinct_share": 0.65, "top": [["funny.", 30], ["a | b", 5]]}
    return {"prompts": 100, "config": {"temperature": 0.7, "max_new_tokens": 32}, "sft": sft, "ppo": ppo,
            "vader_gain_pp": gain_pp, "rm_accuracy": rm_accuracy, "rm_pairs": 50, "vader_accuracy": 0.6,
            "fixed": [{"prompt": "The movie", "sft": "is | bad", "ppo": "is good"}]}


def test_report_targets_hand_worked(tmp_path):
    """The Targets table against hand-worked cases: the 95% half-width of the gain is 1.96 x 100 x sqrt(0.03^2 +
    0.04^2) = 9.8 points; the judge's target needs the gain AND the KL limit; the time target is 20 minutes of
    summed wall time (19.98 min met, 20.02 not); reused stages keep their times in the total."""
    plots = {k: tmp_path / "plots" / f"{k}.png" for k in ("lm", "rm", "ppo")}

    def targets(stages, judged):
        text = demo.write_report(tmp_path, "tiny", stages, judged, plots, "cpu").read_text()
        rows = text.split("## Targets")[1].split("##")[0].splitlines()
        return {k: next(r for r in rows if r.startswith(f"| {k}"))
                for k in ("the pipeline", "RM", "VADER", "PPO keeps")}, text

    stages = [demo.StageRecord("data", "data", "d", "cmd", wall_s=599.0, reused=True),
              demo.StageRecord("ppo", "ppo", "p", "cmd", wall_s=600.0)]
    rows_of = lambda judged: targets(stages, judged)[0]  # noqa: E731
    rows, text = targets(stages, fake_judged(gain_pp=30.0, kl=7.5, rm_accuracy=0.8))
    assert rows["the pipeline"].endswith("| 20.0 min | yes |")  # 1199 s
    assert rows["RM"].endswith("| 0.800 on 50 pairs (VADER's lexicon: 0.600) | yes |")
    assert "| 40.0% -> 70.0% (+30.0 +- 9.8 points at 95%), KL 7.50 nats | yes |" in rows["VADER"]
    assert rows["PPO keeps"].endswith("| 10.6 -> 3.3 words (32%), distinct-2 0.667 -> 0.391 (59%) | **no** |")
    assert "10.0 min (reused)" in text
    stages[1].wall_s = 602.0
    rows, _ = targets(stages, fake_judged(gain_pp=30.0, kl=8.5, rm_accuracy=0.7))
    assert rows["the pipeline"].endswith("| **no** |")
    assert rows["RM"].endswith("| **no** |")
    assert rows["VADER"].endswith("KL 8.50 nats | **no** |")  # the gain alone is not enough
    rows, _ = targets(stages, fake_judged(gain_pp=20.0, kl=1.0, rm_accuracy=0.75))
    assert rows["RM"].endswith("| yes |") and rows["VADER"].endswith("| **no** |")  # 0.75 meets >= 0.75
    judged = fake_judged(gain_pp=30.0, kl=1.0, rm_accuracy=0.8)
    judged["ppo"].update(mean_words=0.75 * 10.6, distinct_2=0.85 * 0.6667)  # both exactly at their bounds
    assert rows_of(judged)["PPO keeps"].endswith("(75%), distinct-2 0.667 -> 0.567 (85%) | yes |")
    judged["ppo"]["distinct_2"] = 0.84 * 0.6667
    assert rows_of(judged)["PPO keeps"].endswith("| **no** |")


def test_step1_held_out_loss_is_train_sfts_per_token_and_per_character(tiny_run):
    """The judge's held-out loss of step 1's model equals the val_loss train_sft.py logged at its end (the same
    sentences and tokens, computed independently); per character it is the same total over the texts' characters,
    with one target per token of each text (its tokens after the first, and its EOS)."""
    out, _ = tiny_run
    loss = json.loads((out / "judge.json").read_text())["step1"][demo.STEP1_LABEL]
    val_loss = [r["val_loss"] for r in map(json.loads, (out / "pretrain" / "metrics.jsonl").read_text().splitlines())
                if "val_loss" in r][-1]
    assert loss["nats_per_token"] == pytest.approx(val_loss, rel=1e-5)
    _, tokenizer = load_policy(str(out / "pretrain"))
    texts = [json.loads(line)["text"] for line in (out / "data" / "pretrain_val.jsonl").read_text().splitlines()]
    tokens, chars = sum(len(tokenizer.encode(t)) for t in texts), sum(map(len, texts))
    assert loss["nats_per_char"] == pytest.approx(val_loss * tokens / chars, rel=1e-5)


def test_report_shows_length_and_variety_beside_the_gain(tmp_path):
    """The reward-hacking table from fake_judged's numbers: each row SFT then PPO, rounded as written, the most
    repeated continuations quoted with their counts (a pipe escaped, the empty one named)."""
    plots = {k: tmp_path / "plots" / f"{k}.png" for k in ("lm", "rm", "ppo")}
    text = demo.write_report(tmp_path, "tiny", [], fake_judged(gain_pp=25.0, kl=3.0, rm_accuracy=0.8), plots,
                             "cpu").read_text()
    rows = text.split("## Reward hacking?")[1].split("##")[0].splitlines()
    expected = ["| VADER positive | 40.0% | 65.0% |",
                "| mean length | 10.6 words (17.3 tokens) | 3.3 words (5.0 tokens) |",
                "| distinct-1 (distinct words / words) | 0.300 | 0.200 |",
                "| distinct-2 (distinct bigrams / bigrams) | 0.667 | 0.391 |",
                "| distinct continuations | 97 (97.0%) | 65 (65.0%) |",
                '| most repeated | "." (3), (empty) (2) | "funny." (30), "a \\| b" (5) |']
    assert [r for r in rows if r.startswith("| ") and not r.startswith("| judge's")] == expected


def test_a_missing_optional_module_stops_the_demo_before_any_stage(tmp_path, monkeypatch):
    """One error naming the missing package and the install command, and no stage started; the installed extras
    pass."""
    demo.check_extras(demo.EXTRAS)  # the test environment has them
    monkeypatch.setattr(demo, "EXTRAS", {**demo.EXTRAS, "no_such_module_4d2": "no-such-package"})
    monkeypatch.setattr(demo, "run_process", lambda *a: pytest.fail("a stage ran"))
    with pytest.raises(UserError, match=r"the demo needs no-such-package, not installed: pip install -e '\.\[demo\]'"):
        demo.main(demo.Config(preset="tiny", out=str(tmp_path / "demo"), device="cpu", threads=1))
    assert not (tmp_path / "demo").exists()


def test_overrides_read_every_spelling_of_a_bool():
    """--set STAGE.FLAG=VALUE takes true/false and 1/0 in any case for a bool flag."""
    for value, expected in (("1", True), ("0", False), ("TRUE", True), ("False", False)):
        preset = demo.apply_overrides(demo.PRESETS["tiny"], [f"ppo.adaptive_kl={value}"], parser_flags)
        assert preset["ppo"]["adaptive_kl"] is expected, value


def test_list_defaults_are_not_shared_between_configs():
    """option([]) gives each config its own list: what one run appends to its --set list is not in the next one's."""
    a, b = demo.Config(), demo.Config()
    a.set.append("ppo.steps=2")
    assert b.set == [] and demo.Config().set == [] and parse_args(demo.Config, []).set == []


def test_stage_wiring_and_reuse_with_recording_stages(tmp_path, monkeypatch):
    """The pipeline's plumbing with every stage's process replaced by a recorder of its command (instant): each
    command is python -m SCRIPT with the demo's threads, each stage reads the previous stage's output, PPO's sampling
    flags given with --set reach the reward model's normalisation, and --reuse reruns a stage whose output was deleted
    (and every stage after it) even though stages.json lists it as finished. The --set values are checked by the
    scripts' parsers in this process (the real check starts them with --help: test_set_mistakes_fail_...)."""
    ran = []

    def program_help(module, argv):
        parser = build_parser(CLASSES[{"train_ppo": "ppo"}[module]], f"python -m {module}")
        parser.parse_args(argv)
        return subprocess.CompletedProcess(argv, 0, parser.format_help(), "")

    def recorder(name, argv, threads):
        assert argv[:3] == [sys.executable, "-m", CLASSES[name].__module__] and threads == 1
        ran.append((name, parse_args(CLASSES[name], argv[3:])))
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "config.json").write_text("{}")
        if name == "redteam":
            (tmp_path / name / "report.md").write_text("")

    monkeypatch.setattr(demo, "run_process", recorder)
    monkeypatch.setattr(demo, "program_help", program_help)
    monkeypatch.setattr(demo, "judge", lambda *a: fake_judged(gain_pp=1.0, kl=1.0, rm_accuracy=0.5))
    monkeypatch.setattr(demo, "stage_metric", lambda name, out: "")
    monkeypatch.setattr(demo, "make_plots", lambda out, judged: {k: out / f"{k}.png" for k in ("lm", "rm", "ppo")})
    threads = torch.get_num_threads()

    def run(**kw):
        ran.clear()
        try:
            demo.main(demo.Config(preset="tiny", out=str(tmp_path), device="cpu", threads=1,
                                  set=["ppo.temperature=1.3", "ppo.max_new_tokens=9"], **kw))
        finally:
            torch.set_num_threads(threads)
        return {name: cfg for name, cfg in ran}

    cfg = run()
    assert list(cfg) == ["pretrain", "sft", "rm", "ppo", "redteam"]
    assert cfg["sft"].init == str(tmp_path / "pretrain") and cfg["rm"].init == str(tmp_path / "sft")
    assert (cfg["ppo"].policy, cfg["ppo"].reward) == (str(tmp_path / "sft"), str(tmp_path / "rm"))
    assert (cfg["redteam"].policy, cfg["redteam"].compare) == (str(tmp_path / "ppo"), str(tmp_path / "sft"))
    assert (cfg["ppo"].temperature, cfg["ppo"].max_new_tokens) == (1.3, 9)
    assert (cfg["rm"].normalise_temperature, cfg["rm"].normalise_max_new_tokens) == (1.3, 9)
    assert run(reuse=True) == {}  # everything finished with the same flags
    (tmp_path / "rm" / "config.json").unlink()
    assert list(run(reuse=True)) == ["rm", "ppo", "redteam"]
