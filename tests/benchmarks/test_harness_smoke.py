"""The PPO-vs-TRL harness runs every row on the GPU scales' architecture (GPT-NeoX, bf16).

The GPU benchmark's Pythia scales have never run here (no GPU), and the CPU benchmark uses Llama
and GPT-2 shapes, so this runs the harness's own worker processes on a toy GPT-NeoX ('neox-tiny'):
TRL 1.12, ours with TRL's structure and ours at its best, one iteration each in bf16, with the
artifacts built the way the GPU run builds them. It checks that each row runs and reports a
complete record; it is not a benchmark.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs trl==1.12.0 (.[bench])")


def test_every_row_runs_on_a_gpt_neox_model_in_bf16(tmp_path):
    import bench_ppo_vs_trl as bench
    from common import prepare_artifacts

    args = bench.parse_args(["--scales", "neox-tiny", "--dtype", "bf16"])
    hp = bench.scale_hparams("neox-tiny", args)
    assert (hp.dtype, hp.iterations, hp.batch_size) == ("bf16", 1, 4)
    paths = prepare_artifacts("neox-tiny", tmp_path / "neox-tiny")
    assert '"model_type": "gpt_neox"' in (Path(paths["policy"]) / "config.json").read_text()
    spec = {"paths": paths, "scale": "neox-tiny", "reward": "model", "hp": hp.to_dict()}
    records = {row: bench.spawn(row, spec, threads=1) for row in bench.ROWS}
    for row, rec in records.items():
        assert rec["scale"] == "neox-tiny" and rec["episodes_per_s"] > 0, row
        assert rec["wall_s"] > 0 and rec["peak_rss_mb"] > 0, row
    narrowed = bench.scale_hparams("pythia-1b", bench.parse_args(
        ["--device", "cuda", "--scales", "pythia-1b", "--batch-size", "16", "--response-length", "32"]))
    assert (narrowed.batch_size, narrowed.response_length, narrowed.num_mini_batches, narrowed.dtype) == (16, 32, 4, "bf16")
