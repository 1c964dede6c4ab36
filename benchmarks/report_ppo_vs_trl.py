"""Markdown tables and the learning-curve PNG for ``bench_ppo_vs_trl.py`` (from its JSON report).

Every number printed here is read from the report; nothing is typed in. Re-render without
re-running:  python benchmarks/report_ppo_vs_trl.py benchmarks/results/ppo_vs_trl_cpu.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROW_NAMES = {
    "trl": "TRL 1.12 PPO",
    "ours-trl-structure": "ours, TRL's structure (separate value net, torch backend, model's own GELU)",
    "ours-best": "ours, best (shared-trunk value head, fused logprob, one-kernel GELU)",
}
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
MEMORY_TARGET = 0.5  # the issue's GPU target: ours' peak GPU memory <= 0.5x TRL's on the 1B model
TARGET = 3.0  # the target: ours >= 3x TRL's episodes/s on the CPU ~10M model


def _table(report: dict, scale: str) -> list[str]:
    rows = report["summary"][scale]
    gpu = all("peak_gpu_mb" in s for s in rows.values())
    mem, mem_name = ("peak_gpu_mb", "peak GPU MB (max allocated)") if gpu else ("peak_rss_mb", "peak RSS MB")
    lines = [
        "| row | episodes/s | tokens/s | CPU s / episode | generation s | scoring s | update s "
        f"| of which gc.collect s | {mem_name} | ours/TRL episodes/s | ours/TRL per CPU s |"
        + (" ours/TRL GPU memory |" if gpu else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else ""),
    ]
    for row, s in rows.items():
        ratio = s.get("ratio_vs_trl", {})
        r_eps = f"{ratio['episodes_per_s']:.2f}×" if ratio else "—"
        r_cpu = f"{ratio['cpu_s_per_episode']:.2f}×" if ratio else "—"
        r_mem = (f" {ratio['peak_gpu_mb']:.2f}× |" if ratio else " — |") if gpu else ""
        lines.append(f"| {ROW_NAMES.get(row, row)} | {s['episodes_per_s']:.2f} | {s['tokens_per_s']:.1f} | "
                     f"{s['cpu_s_per_episode']:.3f} | {s['generation_s']:.2f} | {s['scoring_s']:.2f} | "
                     f"{s['update_s']:.2f} | {s['gc_s']:.2f} | {s[mem]:.0f} | {r_eps} | {r_cpu} |{r_mem}")
    return lines


def _curve_lines(report: dict) -> list[str]:
    if not report.get("curves"):
        return []
    lines = ["## Learning curves (gold reward, tiny preset)", "",
             "Mean gold score of each rollout batch (the reward both trainers optimise), same warm-started",
             f"policy, prompts and seed. Plot: `ppo_vs_trl_{report.get('device_kind', 'cpu')}.png`.", "",
             "| run | seed | first batch | last batch | mean of last 3 |", "|---|---:|---:|---:|---:|"]
    for c in report["curves"]:
        ys = [y for _, y in c["curve"]]
        tail = ys[-3:]
        lines.append(f"| {ROW_NAMES.get(c['row'], c['row'])} | {c['hparams']['seed']} | {ys[0]:.3f} | "
                     f"{ys[-1]:.3f} | {sum(tail) / len(tail):.3f} |")
    return lines + [""]


def _profile_lines(report: dict) -> list[str]:
    profiles = report.get("profiles") or []
    if not profiles or "matmul_s" not in profiles[0]:
        return []
    lines = ["## Where the time goes (torch.profiler, self CPU time of ops, one extra run per row)", "",
             "Matmul-class ops: " + ", ".join(f"`{op}`" for op in MATMUL_OPS) + ".", ""]
    for p in profiles:
        lines += [f"**{ROW_NAMES.get(p['row'], p['row'])}**, {p['scale']}: ops {p['total_op_s']:.2f} s, of which "
                  f"matmul-class {p['matmul_s']:.2f} s ({100 * p['matmul_s'] / p['total_op_s']:.0f} %)", "",
                  "| op | calls | self s | share |", "|---|---:|---:|---:|"]
        lines += [f"| `{t['op']}` | {t['calls']} | {t['self_s']:.2f} | {100 * t['share']:.0f} % |" for t in p["top"][:8]]
        lines.append("")
    by_row = {p["row"]: p for p in profiles}
    summary = report["summary"].get(profiles[0]["scale"], {})
    if "trl" in by_row and "ours-best" in by_row and "trl" in summary:
        ours, h = by_row["ours-best"], report["hparams"][profiles[0]["scale"]]
        trl_cpu = summary["trl"]["cpu_s_per_episode"] * h["iterations"] * h["batch_size"]  # unprofiled median
        lines += [f"**Floor.** TRL's training loop takes {trl_cpu:.2f} CPU s per run (median of the throughput runs, "
                  f"Python and gc included); {TARGET:.0f}× its speed leaves ours {trl_cpu / TARGET:.2f} s. Ours spends "
                  f"{ours['matmul_s']:.2f} s in matmul-class ops alone (TRL: {by_row['trl']['matmul_s']:.2f} s), so with "
                  f"every other op and all Python free ours would reach {trl_cpu / ours['matmul_s']:.2f}× TRL.", ""]
    return lines


def write_markdown(report: dict, path: Path) -> None:
    """The results page: device, command, one table per scale, target check, curves."""
    hp = report["hparams"]
    kind = report.get("device_kind", "cpu")
    out = [
        f"# PPO throughput: rlhf_core vs TRL 1.12 ({kind.upper()}, {report.get('dtype', 'fp32')})", "",
        f"- Device: {report['device']}; torch threads per run: {report['threads_per_run']}",
        f"- 1-min load average at start / end: {report['loadavg_1min_start']:.1f} / {report['loadavg_1min_end']:.1f} "
        "(the VM is shared with other jobs: compare rows, which ran interleaved, not absolute numbers)",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}",
        f"- Command: `{report['command']}` (total {report['total_wall_s']:.0f} s)",
        "- Each cell: median over alternating runs (each run a fresh process); phases in seconds per run;",
        "  update = wall − generation − scoring. Ratios are of the medians.", "",
    ]
    for scale in report["summary"]:
        h = hp[scale]
        out += [f"## {scale} ({report['policy_params'][scale] / 1e6:.2f} M policy parameters)", "",
                f"batch {h['batch_size']}, {h['num_mini_batches']} mini-batches, {h['ppo_epochs']} PPO epochs, "
                f"response length {h['response_length']}, temperature {h['temperature']}, kl_coef {h['kl_coef']} "
                f"({h['kl_estimator']}), clip {h['clip_range']}/{h['clip_range_value']}, vf_coef {h['vf_coef']}, "
                f"γ {h['gamma']}, λ {h['lam']}, lr {h['lr']}, {h['iterations']} iterations "
                f"({h['iterations'] * h['batch_size']} episodes) per run.", ""]
        out += _table(report, scale) + [""]
        best = report["summary"][scale].get("ours-best", {}).get("ratio_vs_trl")
        if best and scale == "gpt2-10m":
            met = "met" if best["episodes_per_s"] >= TARGET else "missed"
            out += [f"Target (ours ≥ {TARGET:.0f}× TRL's episodes/s on the ~10M model): **{met}** "
                    f"({best['episodes_per_s']:.2f}× wall, {best['cpu_s_per_episode']:.2f}× per CPU second).", ""]
        if best and scale == "pythia-1b" and "peak_gpu_mb" in best:
            met = ("met" if best["episodes_per_s"] >= TARGET and best["peak_gpu_mb"] <= MEMORY_TARGET
                   else "missed")
            out += [f"Target (ours ≥ {TARGET:.0f}× TRL's episodes/s and ≤ {MEMORY_TARGET}× its peak GPU memory "
                    f"on the 1B model): **{met}** ({best['episodes_per_s']:.2f}× episodes/s, "
                    f"{best['peak_gpu_mb']:.2f}× memory).", ""]
    out += _profile_lines(report)
    out += _curve_lines(report)
    path.write_text("\n".join(out) + "\n")


def write_plot(curve_runs: list[dict], path: Path) -> None:
    """Gold reward per rollout batch vs episodes, one line per (framework, seed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = {"trl": "tab:orange", "ours-best": "tab:blue", "ours-trl-structure": "tab:green"}
    for row in dict.fromkeys(c["row"] for c in curve_runs):
        runs = [c for c in curve_runs if c["row"] == row]
        for c in runs:  # each seed thin, the mean over seeds thick
            xs, ys = zip(*c["curve"])
            ax.plot(xs, ys, "-", lw=0.8, alpha=0.35, color=colors.get(row))
        xs = [x for x, _ in runs[0]["curve"]]
        mean = [sum(c["curve"][i][1] for c in runs) / len(runs) for i in range(len(xs))]
        ax.plot(xs, mean, "-o", ms=3, lw=2, color=colors.get(row),
                label=f"{ROW_NAMES.get(row, row)} (mean of {len(runs)} seeds)")
    ax.set_xlabel("episodes")
    ax.set_ylabel("mean gold reward of the rollout batch")
    ax.set_title("PPO on the embedded movie-review task (tiny preset, CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "ppo_vs_trl_cpu.json")
    rep = json.loads(src.read_text())
    write_markdown(rep, src.with_suffix(".md"))
    if rep.get("curves"):
        write_plot(rep["curves"], src.with_suffix(".png"))
