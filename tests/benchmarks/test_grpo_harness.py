"""The GRPO-vs-TRL harness runs both rows on the tiny preset's shape: TRL 1.16's GRPOTrainer from
its own folder (.bench-envs, first on PYTHONPATH) and ours, each in a fresh process, on the same
prompts. It checks that each row runs the work it was given and reports a complete record; it is
not a benchmark (benchmarks/bench_grpo_vs_trl.py is)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_grpo_vs_trl as bench  # noqa: E402

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs the [bench] extra"),
    pytest.mark.skipif(not (bench.TRL_ENV / "trl" / "__init__.py").is_file(),
                       reason=f"needs trl {bench.TRL_VERSION} in {bench.TRL_ENV} (.ci/run installs it)"),
]


def test_both_rows_run_the_same_grpo_work(tmp_path):
    from common import HParams, prepare_artifacts, task_prompts

    paths = prepare_artifacts("tiny", tmp_path / "tiny")
    hp = HParams(**{**bench.GRPO_HP, "iterations": 2})
    prompts = task_prompts(hp.iterations * hp.batch_size // hp.group_size, 0)[0]
    spec = {"paths": paths, "scale": "tiny", "reward": "gold", "hp": hp.to_dict(), "prompts": prompts}
    records = {row: bench.spawn(row, spec, threads=1) for row in bench.ROWS}
    for row, rec in records.items():
        assert rec["episodes"] == 32 and rec["episodes_per_s"] > 0, row
        # one reward point per iteration: TRL logged once per generation batch, as ours steps once
        assert [e for e, _ in rec["curve"]] == [16, 32], (row, rec["curve"])
        assert all(-1.0 <= y <= 1.0 for _, y in rec["curve"]), row
        # up to 24 tokens for each of the 32 completions, counted through the EOS
        assert 32 <= rec["response_tokens"] <= 32 * 24, row
        assert rec["time"]["generation"] > 0 and rec["time"]["scoring"] > 0, row
    report = {"hparams": hp.to_dict(), "device": "cpu", "threads_per_run": 1, "loadavg_1min_start": 0.0,
              "loadavg_1min_end": 0.0, "versions": {}, "command": "test", "total_wall_s": 1.0,
              "policy_params": {"tiny": 1}, "profiles": [], "curves": list(records.values()),
              "summary": bench.harness.summarize(list(records.values()), bench.ROWS, "trl-grpo",
                                                 key=lambda r: f"{r['scale']}/{r['hparams']['dtype']}")}
    text = bench.markdown(report)
    assert "## tiny, fp32" in text and "TRL 1.16.0 GRPOTrainer" in text and "x |" in text
