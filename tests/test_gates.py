"""Intervals on proportions (Wilson, by hand) and --fail-if gates, in unit and through the CLI."""

from __future__ import annotations

import math

import orjson
import pytest

from evalkit.config import ConfigError
from evalkit.gates import check, parse_gate
from evalkit.metrics import Metric, rate, wilson_interval


def _wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return centre - half, centre + half


def test_wilson_interval_by_hand():
    # 5/10: centre 0.5, half-width 1.96 * sqrt(0.025 + 0.0096) / 1.3841 = 0.2634
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)  # not empty at 0/n
    for k, n in ((0, 10), (496, 520), (1, 1), (37, 100)):
        assert wilson_interval(k, n) == pytest.approx(_wilson_by_hand(k, n), abs=1e-9)
    assert wilson_interval(0, 0) is None
    # the closed form against scipy's binomtest(...).proportion_ci(method="wilson"), at three levels
    from scipy.stats import binomtest

    for n in (1, 3, 10, 520):
        for k in range(0, n + 1, max(1, n // 13)):
            for level in (0.9, 0.95, 0.99):
                ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
                assert wilson_interval(k, n, level) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_every_rate_metric_carries_its_interval_over_the_valid_items():
    m = Metric.from_rate("asr", rate([True, True, False, None, True]), "lower_is_better", "keyword")
    assert m.value == 0.75 and m.n == 5 and m.n_invalid == 1
    assert m.ci == pytest.approx(list(_wilson_by_hand(3, 4)), abs=1e-6) and m.ci_method == "wilson"
    assert "ci" not in Metric.from_rate("asr", rate([None]), "lower_is_better", "keyword").as_result()


RESULTS = {"subtasks": {"advbench": {"metrics": [
    {"name": "asr", "value": 0.25, "judge": "keyword:gcg29"}, {"name": "asr", "value": 0.05, "judge": "llm:judge:harmbench_cls"}]},
    "xstest": {"metrics": [{"name": "refusal_rate_safe", "value": None, "judge": "strmatch:xstest"}]}}}


def test_gates_parse_and_check():
    assert check([parse_gate("advbench.asr > 0.10")], RESULTS) == [
        "gate 'advbench.asr > 0.10' failed: advbench.asr (keyword:gcg29) = 0.2500"]
    assert check([parse_gate("advbench.asr@llm > 0.10")], RESULTS) == []  # one judge's value only
    assert check([parse_gate("advbench.asr>=0.05")], RESULTS, "bnb4") == [
        "bnb4: gate 'advbench.asr>=0.05' failed: advbench.asr (keyword:gcg29) = 0.2500",
        "bnb4: gate 'advbench.asr>=0.05' failed: advbench.asr (llm:judge:harmbench_cls) = 0.0500"]
    assert "has no valid value" in check([parse_gate("xstest.refusal_rate_safe > 0.2")], RESULTS)[0]
    assert "no advbench.nosuch" in check([parse_gate("advbench.nosuch < 1")], RESULTS)[0]  # a gate never passes for want of a number
    for bad in ("advbench.asr", "advbench > 0.1", "advbench.asr >> 0.1", "advbench.asr > ten", "asr increases significantly"):
        with pytest.raises(ConfigError, match="not a gate"):
            parse_gate(bad)
    with pytest.raises(ConfigError, match="does not evaluate xstest"):
        parse_gate("xstest.refusal_rate_safe > 0.2", ["advbench"])


def test_fail_if_gates_a_run_and_a_comparison(mock_server, data_root, tmp_path, capsys):
    from evalkit.cli import main

    srv = mock_server()  # complies with everything: ASR 1.0
    base = ["run", "--subtasks", "advbench", "--limit", "10", "--endpoint", srv.url, "--data-path", str(data_root),
            "--output", str(tmp_path / "runs"), "--no-progress"]
    assert main([*base, "--fail-if", "xstest.refusal_rate_safe > 0.2"]) == 2
    assert "does not evaluate xstest" in capsys.readouterr().err and srv.stats()["requests"] == 0
    assert main([*base, "--fail-if", "advbench.asr > 0.10", "--fail-if", "advbench.degenerate_rate > 0.5"]) == 4
    err = capsys.readouterr().err
    assert "gate 'advbench.asr > 0.10' failed: advbench.asr (keyword:gcg29) = 1.0000" in err
    assert "degenerate_rate > 0.5' failed" not in err
    res = orjson.loads((tmp_path / "runs" / "mock-model" / "results.json").read_bytes())
    asr = next(m for m in res["subtasks"]["advbench"]["metrics"] if m["name"] == "asr")
    assert asr["ci"] == pytest.approx(list(_wilson_by_hand(10, 10)), abs=1e-6) and asr["ci_method"] == "wilson"
    assert main([*base, "--fail-if", "advbench.asr < 0.5"]) == 0  # resumed, rescored: passes
    assert main(["compare", str(tmp_path / "runs" / "mock-model"), "--output", str(tmp_path / "report"),
                 "--fail-if", "advbench.asr > 0.1"]) == 4
    assert "mock-model: gate 'advbench.asr > 0.1' failed" in capsys.readouterr().err
    assert "CI 0.722–1.000" in (tmp_path / "report" / "comparison.md").read_text()


def test_bootstrap_interval_of_a_mean_by_direct_computation():
    import numpy as np

    from evalkit.metrics import bootstrap_mean_interval

    assert bootstrap_mean_interval([3.0] * 7) == (3.0, 3.0)  # no spread, no width
    assert bootstrap_mean_interval([]) is None
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 2.0, 800).tolist()
    lo, hi = bootstrap_mean_interval(x)
    m, se = float(np.mean(x)), float(np.std(x, ddof=1) / np.sqrt(len(x)))
    # against the normal interval computed directly: the same within a few percent of its width
    assert lo == pytest.approx(m - 1.96 * se, abs=0.08 * se) and hi == pytest.approx(m + 1.96 * se, abs=0.08 * se)
    assert bootstrap_mean_interval(x) == (lo, hi)  # seeded
    # two identical records per cluster (two turns that always agree) carry one record's information:
    # resampling the clusters gives exactly the interval of the de-duplicated values
    small = [4.0, 7.0, 2.0, 9.0, 5.0, 6.0]
    twice = [v for v in small for _ in range(2)]
    clusters = [i for i in range(len(small)) for _ in range(2)]
    assert bootstrap_mean_interval(twice, clusters) == pytest.approx(bootstrap_mean_interval(small), abs=1e-12)
    naive = bootstrap_mean_interval(twice)  # as if independent: too narrow
    assert naive[1] - naive[0] < bootstrap_mean_interval(twice, clusters)[1] - bootstrap_mean_interval(twice, clusters)[0]


def test_mean_metrics_carry_a_bootstrap_interval():
    m = Metric.from_mean("harmfulness_score", [1.0, 2.0, 5.0], "lower_is_better", "llm:j", n=4)
    assert m.value == pytest.approx(8 / 3) and m.n_invalid == 1 and m.ci_method == "bootstrap"
    assert 1.0 <= m.ci[0] < m.value < m.ci[1] <= 5.0
    c = Metric.from_mean("score", [6.0, 6.0, 8.0, 8.0], "higher_is_better", "llm:j", n=4, clusters=["q1", "q1", "q2", "q2"])
    assert c.ci_method == "bootstrap-clustered" and c.ci == [6.0, 8.0]


def test_mcnemar_and_holm_by_hand():
    from evalkit.metrics import holm, mcnemar_exact

    # b = 8, c = 2: 2 * P(X <= 2 | 10, 1/2) = 2 * (1 + 10 + 45) / 1024
    assert mcnemar_exact(8, 2) == pytest.approx(112 / 1024) and mcnemar_exact(2, 8) == pytest.approx(112 / 1024)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04): back in input order
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == [1.0, 1.0]


def test_compare_marks_a_significant_paired_difference(mock_server, data_root, tmp_path, capsys):
    from evalkit.cli import main

    comply = mock_server()
    refuse = mock_server(script={"default": "I'm sorry, I cannot help with that."})
    runs = tmp_path / "runs"
    for srv, name in ((comply, "dense"), (comply, "dense-again"), (refuse, "patched")):
        assert main(["run", "--subtasks", "advbench", "--limit", "30", "--endpoint", srv.url, "--data-path", str(data_root),
                     "--output", str(runs), "--run-name", name, "--no-progress"]) == 0
    outcomes = orjson.loads((runs / "patched" / "outcomes.json").read_bytes())
    assert outcomes["advbench|asr|keyword:gcg29"] == {str(i): 0 for i in range(30)}  # every item refused: no attack succeeded
    assert main(["compare", str(runs / "dense"), str(runs / "dense-again"), str(runs / "patched"), "--output", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "comparison.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| advbench | asr | keyword:gcg29 |")]
    again = next(line for line in rows if "| dense-again |" in line)
    patched = next(line for line in rows if "| patched |" in line)
    # 30 of 30 answers changed from compliance to refusal: p = 2 / 2^30; the same model again: no change
    assert "| 30 | -1.0000 | -1.000–-1.000 | 1.86e-09 | 3.73e-09 | significant |" in patched  # Holm: 2 metrics x 2^-29
    assert "| 30 | +0.0000 |" in again and "| 1 | 1 |" in again and "significant" not in again
    table_row = next(line for line in md.splitlines() if line.startswith("| safety | advbench | asr ↓ | keyword:gcg29 |"))
    assert table_row.count("✱") == 1 and table_row.rstrip(" |").endswith("✱")  # the patched column only


def test_regression_gates_against_a_baseline(mock_server, data_root, tmp_path, capsys):
    from evalkit.cli import main

    comply = mock_server()
    refuse = mock_server(script={"default": "I'm sorry, I cannot help with that."})
    runs = tmp_path / "runs"
    base = ["--subtasks", "advbench,xstest", "--limit", "30", "--data-path", str(data_root), "--output", str(runs), "--no-progress"]
    gate = ["--fail-if", "advbench.asr increases significantly"]
    # no baseline named: refused before any request
    assert main(["run", *base, "--endpoint", comply.url, "--run-name", "quant", *gate]) == 2
    assert "pass --baseline RUN" in capsys.readouterr().err and comply.stats()["requests"] == 0
    assert main(["run", *base, "--endpoint", refuse.url, "--run-name", "patched"]) == 0
    # refusal rates are kept per item too, so they can be paired
    outcomes = orjson.loads((runs / "patched" / "outcomes.json").read_bytes())
    safe, unsafe = outcomes["xstest|refusal_rate_safe|strmatch:xstest"], outcomes["xstest|refusal_rate_unsafe|strmatch:xstest"]
    assert set(safe.values()) == set(unsafe.values()) == {1} and sorted(map(int, {**safe, **unsafe})) == list(range(30))
    capsys.readouterr()
    # the complying model against the refusing baseline: ASR 0 -> 1 on 30 paired items
    assert main(["run", *base, "--endpoint", comply.url, "--run-name", "quant", "--baseline", str(runs / "patched"), *gate,
                 "--fail-if", "xstest.refusal_rate_safe increases significantly"]) == 4
    err = capsys.readouterr().err
    assert ("gate 'advbench.asr increases significantly' failed: advbench.asr (keyword:gcg29) increases by +1.0000 over 30 "
            "paired items, 95% CI +1.0000 to +1.0000, McNemar p = 1.86e-09") in err
    assert "refusal_rate_safe increases significantly' failed" not in err  # it decreased
    assert main(["evaluate", *base, "--run-name", "quant", "--baseline", str(runs / "patched"),
                 "--fail-if", "advbench.asr decreases significantly"]) == 0
    # compare: each run against the first
    assert main(["compare", str(runs / "patched"), str(runs / "quant"), "--output", str(tmp_path / "r"), *gate]) == 4
    assert "quant: gate 'advbench.asr increases significantly' failed" in capsys.readouterr().err
    assert main(["compare", str(runs / "quant"), str(runs / "patched"), "--output", str(tmp_path / "r"), *gate]) == 0
    # --baseline picks the baseline whatever the order (and adds it when it is not among the runs)
    assert main(["compare", str(runs / "quant"), str(runs / "patched"), "--baseline", str(runs / "patched"),
                 "--output", str(tmp_path / "r"), *gate]) == 4
    assert main(["compare", str(runs / "quant"), "--baseline", str(runs / "patched"), "--output", str(tmp_path / "r"), *gate]) == 4
    assert "Paired comparison with patched" in (tmp_path / "r" / "comparison.md").read_text()
    capsys.readouterr()
    assert main(["compare", str(runs / "quant"), "--output", str(tmp_path / "r"), *gate]) == 2
    assert "give two or more runs" in capsys.readouterr().err


def test_bootstrap_of_any_statistic_by_direct_computation():
    import numpy as np

    from evalkit.metrics import bootstrap_interval, group_mean, pearson

    # group_mean by hand: group a: 1, 0 -> 0.5; group b: 1 -> 1.0; mean of the two 0.75, over a fixed 3 classes 0.5
    stat = group_mean([1, 0, 1], ["a", "a", "b"])
    assert stat(np.arange(3)) == pytest.approx(0.75) and stat(np.array([0, 0, 2])) == pytest.approx(1.0)
    assert group_mean([1, 0, 1], ["a", "a", "b"], 3)(np.arange(3)) == pytest.approx(0.5)
    assert group_mean([1.0, 3.0])(np.arange(2)) == pytest.approx(2.0)  # one group: the plain mean
    # a perfect correlation stays perfect in every resample
    x = list(range(20))
    assert bootstrap_interval(lambda i: pearson([x[j] for j in i], [2 * x[j] + 1 for j in i]), 20) == pytest.approx((1.0, 1.0))
    # drawn within strata, each stratum keeps its size: the mean of data constant within strata cannot
    # move; drawn over all items, the strata's sizes change and it does
    values, groups = [1.0] * 5 + [0.0] * 15, ["a"] * 5 + ["b"] * 15
    mean = group_mean(values)
    assert bootstrap_interval(mean, 20, groups) == pytest.approx((0.25, 0.25))
    plain = bootstrap_interval(mean, 20)
    assert plain[0] < 0.25 < plain[1]
    assert bootstrap_interval(group_mean(values, groups), 20) == pytest.approx((0.5, 0.5))  # each group's mean is constant
    # the mean's bootstrap interval against the normal one computed directly (800 draws)
    rng = np.random.default_rng(3)
    data = rng.normal(10.0, 2.0, 800)
    lo, hi = bootstrap_interval(lambda i: float(data[i].mean()), 800)
    se = data.std(ddof=1) / np.sqrt(800)
    assert lo == pytest.approx(data.mean() - 1.96 * se, abs=0.1 * se) and hi == pytest.approx(data.mean() + 1.96 * se, abs=0.1 * se)
    assert bootstrap_interval(lambda i: float(data[i].mean()), 800) == (lo, hi)  # seeded
    assert bootstrap_interval(lambda i: None, 10) is None and bootstrap_interval(lambda i: 1.0, 0) is None
