"""rlhf_core/checks.py and the report's check section: synthetic PPO records with known breaches."""
from rlhf_core.checks import CHECKS, find_breaches, step_breaches
from rlhf_core.report import check_lines, write_report


def records(n=10, **overrides):
    """n healthy iterations; overrides: metric -> {iteration: value}."""
    out = []
    for it in range(1, n + 1):
        r = {"phase": "ppo", "step": it, "check/first_ratio_dev": 1e-6, "check/logprob_gap": 1e-7,
             "check/truncated_fraction": 0.1, "val/explained_variance": 0.3}
        for metric, values in overrides.items():
            r[metric] = values.get(it, r[metric])
        out.append(r)
    return out


def test_a_healthy_run_breaks_nothing_and_says_so():
    assert find_breaches(records()) == []
    lines = check_lines(records(), 10)
    assert lines[-1] == "Nothing broke." and sum(line.startswith("- ok") for line in lines) == len(CHECKS)


def test_each_breach_names_metric_value_threshold_iteration_and_source():
    recs = records(**{
        "check/first_ratio_dev": {4: 0.2, 7: 0.5}, "check/truncated_fraction": {9: 0.8},
        "val/explained_variance": {i: -0.2 for i in range(6, 11)}})
    found = {b.check.metric: b for b in find_breaches(recs, 10)}
    assert set(found) == {"check/first_ratio_dev", "check/truncated_fraction", "val/explained_variance"}
    assert found["check/first_ratio_dev"].iteration == 4 and found["check/first_ratio_dev"].value == 0.2
    assert found["val/explained_variance"].value == -0.2  # the mean over iterations 6..10
    line = found["check/first_ratio_dev"].line()
    assert "0.2 > 0.01" in line and "iteration 4" in line and "PPOTrainer.minibatch_step" in line
    assert [b.check.metric for b in step_breaches(recs[3], 4)] == ["check/first_ratio_dev"]


def test_a_negative_explained_variance_early_on_is_not_a_breach():
    assert find_breaches(records(**{"val/explained_variance": {1: -0.5, 2: -0.4, 3: -0.1}}), 10) == []


def test_the_report_has_the_check_section(tmp_path):
    recs = records(**{"check/logprob_gap": {2: 0.01}})
    text = write_report(tmp_path, recs, {"ppo": {"iterations": 10}}).read_text()
    assert "## PPO invariant checks" in text and "**broken**: check/logprob_gap = 0.01 > 0.001" in text
    assert "1 of 4 checks broke." in text
