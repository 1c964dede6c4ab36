"""What both trainer benchmarks share: a run in a fresh process, medians with ratios, an op profile.

``bench_ppo_vs_trl.py`` (TRL 1.12 PPO) and ``bench_grpo_vs_trl.py`` (TRL 1.16 GRPO) run every row
alternately in fresh interpreters (:func:`spawn`), so peak RSS is per run and slow drifts of a
shared machine hit every row alike, then reduce the records to medians (:func:`summarize`).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report_ppo_vs_trl import MATMUL_OPS


def spawn(script: str, row: str, spec: dict, threads: int, env: dict | None = None) -> dict:
    """Run ``script --worker row`` in a fresh interpreter; return its record (raises with its stderr tail).

    ``env`` adds to the environment (e.g. ``PYTHONPATH`` of another TRL version).
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    cmd = [sys.executable, script, "--worker", row, "--spec", json.dumps(spec), "--result", result,
           "--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{row} failed:\n{proc.stderr[-3000:]}")
    rec = json.loads(Path(result).read_text())
    os.unlink(result)
    rec["subprocess_wall_s"] = time.perf_counter() - t0
    rec["loadavg_after"] = os.getloadavg()[0]
    print(f"  {rec['scale']:9s} {row:19s} {rec['hparams'].get('dtype', ''):4s} {rec['episodes_per_s']:7.2f} ep/s  "
          f"cpu {rec['cpu_s_train']:6.1f} s  wall {rec['wall_s']:6.1f} s  rss {rec['peak_rss_mb']:6.0f} MB  "
          f"load {rec['loadavg_after']:.1f}", flush=True)
    return rec


def summarize(runs: list[dict], rows: tuple[str, ...], baseline: str, key=lambda r: r["scale"]) -> dict:
    """Medians per (key, row) and the ratios row/baseline of the medians (CPU time: baseline/row)."""
    table: dict = {}
    for group in sorted({key(r) for r in runs}):
        for row in rows:
            rs = [r for r in runs if key(r) == group and r["row"] == row]
            if not rs:
                continue
            med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
            table.setdefault(group, {})[row] = {
                "n": len(rs), "episodes_per_s": med(lambda r: r["episodes_per_s"]),
                "tokens_per_s": med(lambda r: r["tokens_per_s"]),
                "cpu_s_per_episode": med(lambda r: r["cpu_s_train"] / r["episodes"]),
                "generation_s": med(lambda r: r["time"]["generation"]), "scoring_s": med(lambda r: r["time"]["scoring"]),
                "update_s": med(lambda r: r["time"]["update"]),
                "gc_s": med(lambda r: r["time"].get("gc", 0.0)), "wall_s": med(lambda r: r["wall_s"]),
                "peak_rss_mb": med(lambda r: r["peak_rss_mb"]),
                **({"peak_gpu_mb": med(lambda r: r["peak_gpu_mb"])} if all("peak_gpu_mb" in r for r in rs) else {}),
                "episodes_per_s_all": [round(r["episodes_per_s"], 3) for r in rs]}
        base = table[group].get(baseline)
        for row, s in table[group].items():
            if base and row != baseline:
                s["ratio_vs_trl"] = {"episodes_per_s": s["episodes_per_s"] / base["episodes_per_s"],
                                     "cpu_s_per_episode": base["cpu_s_per_episode"] / s["cpu_s_per_episode"],
                                     "peak_rss_mb": s["peak_rss_mb"] / base["peak_rss_mb"]}
                if "peak_gpu_mb" in s and "peak_gpu_mb" in base:
                    s["ratio_vs_trl"]["peak_gpu_mb"] = s["peak_gpu_mb"] / base["peak_gpu_mb"]
    return table


class OpProfile:
    """torch.profiler over a trainer's training loop only (``cls.name``: TRL's train(), our step()).

    Started at the first call and stopped by :meth:`summary`, so model loading is outside it.
    The profiled run is slower than an unprofiled one and is not used for the timings.
    """

    def __init__(self, cls: type, name: str):
        from torch.profiler import profile
        self.prof, self.started, orig = profile(), False, getattr(cls, name)

        def profiled(trainer, *a, **k):
            if not self.started:
                self.prof.start()
                self.started = True
            return orig(trainer, *a, **k)
        setattr(cls, name, profiled)

    def summary(self, n: int = 10) -> dict:
        """Self CPU seconds of all ops, of the matmul-class ops (MATMUL_OPS) and the top n ops."""
        self.prof.stop()
        events = sorted(self.prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6
        return {"total_op_s": total, "matmul_s": matmul,
                "top": [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6,
                         "share": e.self_cpu_time_total / 1e6 / total} for e in events[:n]]}
