"""rlhf_core/checks.py and the report's health section: synthetic PPO records with known problems."""
from rlhf_core.checks import CHECKS, find_breaches, step_breaches
from rlhf_core.report import check_lines, write_report

HEALTHY = {"check/first_ratio_dev": 1e-6, "check/logprob_gap": 1e-7, "check/truncated_fraction": 0.1,
           "perf/skipped_steps": 0,
           "policy/clipfrac": 0.05, "policy/entropy": 2.0, "val/explained_variance": 0.3, "objective/kl_exact": 1.0}


def records(n=20, evals=None, **overrides):
    """n healthy iterations (and, with ``evals``, {iteration: (scores, gold)} evaluations at those steps);
    overrides: metric -> {iteration: value}."""
    out = []
    for it in range(1, n + 1):
        r = {"phase": "ppo", "step": it, **HEALTHY}
        for metric, values in overrides.items():
            r[metric] = values.get(it, r[metric])
        out.append(r)
    for it, (scores, gold) in (evals or {}).items():
        out.append({"phase": "ppo", "step": it, "eval/scores": scores, "eval/gold_reward": gold})
    return out


def flagged(recs, n=20):
    return {b.check.metric: b for b in find_breaches(recs, n)}


def test_a_healthy_run_flags_nothing_and_says_so():
    recs = records(evals={0: (0.1, 0.0), 20: (1.0, 0.5)})
    assert find_breaches(recs, 20) == []
    lines = check_lines(recs, 20)
    assert lines[-1] == "Found nothing." and sum(line.startswith("- ok") for line in lines) == len(CHECKS)


def test_each_flag_names_metric_value_threshold_iteration_and_source():
    found = flagged(records(**{"check/first_ratio_dev": {4: 0.2, 7: 0.5}, "check/truncated_fraction": {9: 0.8}}))
    assert set(found) == {"check/first_ratio_dev", "check/truncated_fraction"}
    assert found["check/first_ratio_dev"].iteration == 4 and found["check/first_ratio_dev"].value == 0.2
    line = found["check/first_ratio_dev"].line()
    assert "0.2 > 0.01" in line and "iteration 4" in line and "PPOTrainer.minibatch_step" in line
    assert [b.check.metric for b in step_breaches(records()[3] | {"check/first_ratio_dev": 0.2}, 4)] == \
        ["check/first_ratio_dev"]


def test_clip_fraction_entropy_collapse_and_critic():
    found = flagged(records(**{"policy/clipfrac": {5: 0.45}, "policy/entropy": {12: 0.15, 13: 0.1},
                               "val/explained_variance": {i: -0.2 for i in range(11, 21)}}))
    assert set(found) == {"policy/clipfrac", "policy/entropy", "val/explained_variance"}
    assert found["policy/entropy"].iteration == 12  # 0.15 < 0.1 x 2.0
    assert abs(found["val/explained_variance"].value + 0.2) < 1e-12  # the mean over iterations 11..20
    assert "ppo.losses.entropy_bonus" in found["policy/entropy"].line()


def test_a_negative_explained_variance_early_on_is_not_a_flag():
    assert flagged(records(**{"val/explained_variance": {1: -0.5, 2: -0.4, 3: -0.1}})) == {}


def test_kl_running_away_and_kl_that_settles():
    growing = {i: 0.1 * i for i in range(1, 21)}  # second quarter ~0.8, last quarter ~1.8: 2.25x and > 1
    assert "objective/kl_exact" in flagged(records(**{"objective/kl_exact": growing}))
    settled = {i: min(0.2 * i, 2.0) for i in range(1, 21)}  # 1.6 then 2.0: levels off
    assert flagged(records(**{"objective/kl_exact": settled})) == {}
    tiny = {i: 0.01 * i for i in range(1, 21)}  # grows, but far under a nat
    assert flagged(records(**{"objective/kl_exact": tiny})) == {}


def test_reward_hacking_needs_the_score_up_and_the_gold_down():
    hacked = flagged(records(evals={0: (0.1, 0.3), 10: (0.8, 0.2), 20: (1.5, 0.1)}))
    assert set(hacked) == {"eval/gold_reward"} and "reward hacking" in hacked["eval/gold_reward"].line()
    assert flagged(records(evals={0: (0.1, 0.3), 20: (1.5, 0.28)})) == {}  # gold flat: within 0.05
    peaked = flagged(records(evals={0: (-0.4, 0.0), 10: (1.3, 0.13), 20: (1.6, 0.05)}))  # up, then down
    assert peaked["eval/gold_reward"].value == 0.05
    assert flagged(records(evals={0: (-0.4, 0.0), 10: (1.7, 0.13), 20: (1.6, 0.05)})) == {}  # the score fell too
    assert flagged(records(evals={0: (0.9, 0.3), 20: (0.5, 0.1)})) == {}  # both fell: not hacking


def test_the_report_has_the_health_section(tmp_path):
    recs = records(**{"check/logprob_gap": {2: 0.01}})
    text = write_report(tmp_path, recs, {"ppo": {"iterations": 20}}).read_text()
    assert "## Health" in text and "**flagged**: check/logprob_gap = 0.01 > 0.001" in text
    assert "1 of 8 checks flagged." in text


def test_rlhf_report_rebuilds_a_killed_runs_report(tmp_path, capsys):
    """A run killed mid-write: metrics.jsonl ends in a torn line and there is no summary.json."""
    import json
    from rlhf_core.cli import main
    lines = [json.dumps(r) for r in records(**{"policy/clipfrac": {3: 0.5}})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"phase": "ppo", "st')
    assert main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "**flagged**: policy/clipfrac = 0.5 > 0.3 (first at iteration 3" in text
    assert (tmp_path / "plots" / "ppo.png").is_file()


def test_rlhf_report_errors_are_one_line(tmp_path, capsys):
    from rlhf_core.cli import main
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope' / 'metrics.jsonl'}: file not found"
    (tmp_path / "metrics.jsonl").write_text('{"phase": "ppo", "step": 1}\nnot json\n{"phase": "ppo", "step": 2}\n')
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'metrics.jsonl'}:2: not a JSON object"
    assert not (tmp_path / "report.md").exists()


def test_skipped_steps_incomplete_runs_and_unjudged_hacking_are_said():
    recs = records(n=6, **{"perf/skipped_steps": {4: 1, 5: 3, 6: 3}})
    lines = check_lines(recs, num_iterations=8)
    assert lines[0] == ("- **incomplete**: 6 of 8 iterations logged (the run stopped, or is still running; "
                        "`--resume` continues it)")
    text = "\n".join(lines)
    assert "**flagged**: perf/skipped_steps = 1 > 0 (first at iteration 4; optim.finish_step)" in text
    assert "- not judged: reward hacking is not checked: there is no gold judge" in text
    one = check_lines(records(n=6, evals={6: (1.0, 0.2)}), 6)
    assert any("reward hacking is not judged: it needs two evaluations of the gold reward, there is 1" in x
               for x in one)
    assert not any("not judged" in x for x in check_lines(records(n=6, evals={0: (0.1, 0.0), 6: (1.0, 0.5)}), 6))
    assert [b.check.metric for b in step_breaches({"perf/skipped_steps": 2}, 3)] == ["perf/skipped_steps"]  # live


def test_rlhf_report_of_a_killed_run_says_how_far_it_got(tmp_path):
    import json
    from rlhf_core.cli import main
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(n=3)))
    (tmp_path / "config.json").write_text(json.dumps({"ppo": {"num_iterations": 8}}))
    assert main(["report", str(tmp_path)]) == 0
    assert "- **incomplete**: 3 of 8 iterations logged" in (tmp_path / "report.md").read_text()


def test_rlhf_report_turns_every_damaged_input_into_one_line(tmp_path, capsys):
    import json
    from rlhf_core.cli import main
    good = "".join(json.dumps(r) + "\n" for r in records(n=2))
    cases = [
        ({"metrics.jsonl": '{"phase": "ppo", "step": 1}\n{"step": 2, "loss": 1}\n{"phase": "ppo", "step": 3}\n'},
         "metrics.jsonl:2: a metrics record needs a string \"phase\" and an integer \"step\"", []),
        ({"metrics.jsonl": good.encode() + b'{"phase": "ppo", "step": 3, "x": "\xff"}\n'},
         "metrics.jsonl:3: not UTF-8 text", []),
        ({"metrics.jsonl": good, "summary.json": "{not json"}, "summary.json:1: not valid JSON", []),
        ({"metrics.jsonl": good, "summary.json": "[1, 2]"}, "summary.json: expected a JSON object, found a list", []),
        ({"metrics.jsonl": good, "summary.json": '{"ppo": 3}'}, "summary.json: expected one object of values", []),
        ({"metrics.jsonl": good, "config.json": "{broken"}, "config.json:1: not valid JSON",
         ["--report-to", "tensorboard"]),
    ]
    for i, (files, needle, flags) in enumerate(cases):
        run = tmp_path / f"run{i}"
        run.mkdir()
        for name, text in files.items():
            (run / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        assert main(["report", str(run), *flags]) == 2, needle
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {run}") and needle in err and "\n" not in err, err
