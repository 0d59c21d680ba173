"""benchmarks/bench_race.py's pure parts: the sanity check each system's result must pass before its times count,
the summary (median after the warm-up step, per round), and the table's ratios to TRL PPO. No timing, no TRL."""
import pytest

from benchmarks.bench_race import PHASES, check_result, markdown_table, parse_args, summarize


def result(system, times, lengths=(8.0, 8.0, 8.0), losses=(0.1, -0.2), rss=1.0, phases=None):
    return dict(system=system, step_times=list(times), response_len=list(lengths), losses=list(losses),
                peak_rss_gib=rss, versions="v", phases=phases)


def test_a_sane_result_passes_and_each_fault_is_named():
    assert check_result(result("trl-ppo", [3.0, 2.0, 2.0]), steps=3, new_tokens=8) == []
    assert check_result(result("minirlhf", [3.0, 2.0, 2.0], lengths=(8.0, 7.75, 8.0)), 3, 8) == []  # one early EOS
    faults = {
        "step times": result("trl-ppo", [3.0, 2.0]),  # a step missing
        "response lengths": result("trl-grpo", [3.0, 2.0, 2.0], lengths=(8.0, 6.0, 8.0)),  # early EOS
        "finite": result("trl-rloo", [3.0, 2.0, 2.0], losses=(0.1, float("nan"))),
    }
    for what, bad in faults.items():
        problems = check_result(bad, steps=3, new_tokens=8)
        assert len(problems) == 1 and what in problems[0] and bad["system"] in problems[0]
    assert check_result(result("trl-ppo", [3.0, 2.0, 2.0], losses=()), 3, 8)  # no loss at all is not sane
    ran_fp32 = {**result("trl-ppo", [3.0, 2.0, 2.0]), "matmul_dtypes": ["torch.float32"]}
    assert check_result(ran_fp32, 3, 8, "fp32") == []
    assert "asked for bf16" in check_result(ran_fp32, 3, 8, "bf16")[0]  # a trainer that ignored the precision


def test_summary_drops_the_warm_up_step_and_ratios_are_to_trl_ppo():
    phases = {k: [9.0, 1.0, 1.0] for k in PHASES}
    results = [result("minirlhf", [9.0, 1.0, 1.2], rss=2.0, phases=phases),
               result("trl-ppo", [9.0, 4.0, 4.0], rss=4.0),
               result("minirlhf", [9.0, 1.0, 1.0], rss=2.5, phases=phases),
               result("trl-ppo", [9.0, 4.0, 4.4], rss=3.0)]
    rows = summarize(results, batch=32, new_tokens=8)
    assert [r["system"] for r in rows] == ["minirlhf", "trl-ppo"]
    mini, trl = rows
    assert mini["per_round"] == pytest.approx([1.1, 1.0]) and mini["step"] == pytest.approx(1.05)
    assert trl["per_round"] == pytest.approx([4.0, 4.2]) and trl["step"] == pytest.approx(4.1)
    assert mini["completions_s"] == pytest.approx(32 / 1.05) and mini["tokens_s"] == pytest.approx(256 / 1.05)
    assert mini["phases"] == {k: 1.0 for k in PHASES} and trl["phases"] is None
    assert mini["peak_rss_gib"] == 2.5 and trl["peak_rss_gib"] == 4.0  # the largest over rounds
    table = markdown_table(rows).splitlines()
    assert len(table) == 4 and table[2].startswith("| minirlhf")
    assert "| 3.90x | 0.62x |" in table[2]  # 4.1 / 1.05 faster, 2.5 / 4.0 of the memory
    assert "| n/a | 4.00 | 1.00x | 1.00x |" in table[3]


def test_batch_must_split_into_groups():
    assert parse_args(["--batch", "32", "--group", "4"]).batch == 32
    with pytest.raises(SystemExit):
        parse_args(["--batch", "30", "--group", "4"])
