"""The run report: report.md with the summary table, the PPO run's health (rlhf_core/checks.py) and one
PNG of curves per phase. ``rlhf report DIR`` rebuilds it from DIR/metrics.jsonl (:func:`regenerate`) for
a finished, running or killed run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checks import CHECKS, find_breaches, unjudged
from .errors import DataError
from .trackers import Trackers
from .tracking import read_metrics

# Curves worth a panel, in the order they are drawn; other namespaced keys follow if room is left.
PREFERRED = ("loss/train", "loss/eval", "eval/perplexity", "eval/accuracy", "eval/margin",
             "objective/scores", "eval/gold_reward", "objective/kl", "objective/rlhf_reward",
             "loss/policy", "loss/value", "policy/clipfrac", "val/explained_variance")
PREFIXES = ("loss/", "eval/", "objective/", "policy/", "val/")
MAX_PANELS = 6


def _keys(records: list[dict[str, Any]]) -> list[str]:
    present = {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k.startswith(PREFIXES)}
    ordered = [k for k in PREFERRED if k in present] + sorted(present - set(PREFERRED))
    return ordered[:MAX_PANELS]


def plot_phase(phase: str, records: list[dict[str, Any]], path: Path) -> bool:
    """One figure with a panel per metric; False when the phase logged nothing to draw."""
    keys = _keys(records)
    if not keys:
        return False
    # Here, not at the top: pyplot takes ~0.5 s to import, only reports need it, and the headless
    # Agg backend must be chosen before it loads.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("iteration" if phase == "ppo" else "step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(phase)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def check_lines(records: list[dict[str, Any]], num_iterations: int | None = None) -> list[str]:
    """The PPO run's health: whether the run is complete (of ``num_iterations``, the planned length), one
    line per check of rlhf_core/checks.py whose metric was logged, either what broke (metric, value,
    threshold, iteration, the function that computes it) or that it held, and what could not be judged."""
    done = max((r["step"] for r in records), default=0)
    head = ([f"- **incomplete**: {done} of {num_iterations} iterations logged (the run stopped, or is still "
             "running; `--resume` continues it)", ""] if num_iterations and done < num_iterations else [])
    broken = {b.check.metric: b for b in find_breaches(records, num_iterations)}
    present = [c for c in CHECKS if any(c.metric in r for r in records)]
    if not present:
        return head + ["No check metrics were logged."]
    lines = [f"- **flagged**: {broken[c.metric].line()}" if c.metric in broken else f"- ok: `{c.metric}` {c.held()}"
             for c in present]
    lines += [f"- not judged: {note}" for note in unjudged(records)]
    return head + lines + ["", "Found nothing." if not broken else f"{len(broken)} of {len(present)} checks flagged."]


def write_report(out: Path, records: list[dict[str, Any]], summary: dict[str, Any],
                 planned_iterations: int | None = None) -> Path:
    """report.md of a run: summary table, PPO health (against ``planned_iterations``, the configured length,
    so a stopped run says how far it got), curves and sample generations."""
    # After a resume, steps between the last checkpoint and the crash were logged twice: keep the last.
    records = list({(r["phase"], r["step"], tuple(sorted(r))): r for r in records}.values())
    lines = ["# Run report", "", f"Folder: `{out}`", "", "## Summary", "", "| phase | key | value |", "|---|---|---|"]
    for phase, values in summary.items():
        for k, v in values.items():
            lines.append(f"| {phase} | {k} | {_fmt(v)} |")
    ppo = [r for r in records if r["phase"] == "ppo"]
    if ppo:
        planned = planned_iterations or summary.get("ppo", {}).get("iterations")
        lines += ["", "## Health", ""] + check_lines(ppo, planned)
    lines += ["", "## Curves", ""]
    for phase in dict.fromkeys(r["phase"] for r in records):
        png = out / "plots" / f"{phase}.png"
        if plot_phase(phase, [r for r in records if r["phase"] == phase], png):
            lines += [f"### {phase}", "", f"![{phase}](plots/{phase}.png)", ""]
    samples = out / "ppo" / "samples.md"
    if samples.exists():
        lines += ["## Sample generations", "", samples.read_text()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding one object, or a one-line DataError naming the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(str(path), f"not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(str(path), f"not valid JSON ({e.msg})", record=e.lineno) from None
    if not isinstance(data, dict):
        raise DataError(str(path), f"expected a JSON object, found a {type(data).__name__}")
    return data


def regenerate(out: Path, trackers: list[str] | None = None) -> Path:
    """report.md (and plots/) of the run in ``out`` from its metrics.jsonl and, if present, summary.json;
    with ``trackers`` (names, ``trackers.parse_report_to``) every record is exported to them too.

    Raises:
        DataError: no metrics.jsonl in ``out``; a line of it that is not JSON, not UTF-8 or lacks its phase
            and step (a torn last line, from a run killed while writing, is skipped); a summary.json or
            config.json that is not a JSON object (each names the file and line).
    """
    out = Path(out)
    records = read_metrics(out / "metrics.jsonl")
    summary_path = out / "summary.json"
    summary = read_json_object(summary_path) if summary_path.is_file() else {}
    if not all(isinstance(v, dict) for v in summary.values()):
        raise DataError(str(summary_path), "expected one object of values per phase")
    config = out / "config.json"
    run_config = read_json_object(config) if config.is_file() else {}
    planned = (run_config.get("ppo") or {}).get("num_iterations") if isinstance(run_config.get("ppo"), dict) else None
    report = write_report(out, records, summary, planned if isinstance(planned, int) else None)
    if trackers:
        export = Trackers(trackers, out, run_config)
        for r in records:
            export.log(r.get("phase", "run"), int(r.get("step", 0)), r)
        for path in (report, out / "ppo" / "samples.md", summary_path):
            export.artifact(path)
        export.close()
    return report
