"""What the benchmarks that write a doc section share (kl_runs.py, estimators.py): running the CLI in a
fresh process, saving a figure, and replacing the text between a doc's ``<!-- NAME: begin/end -->`` markers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The tiny preset's PPO sizes (its pipeline_config): `rlhf ppo` alone has the chat-model defaults (512 / 256).
DEMO_SIZES = ["--ppo.max_prompt_length", "32", "--ppo.response_length", "24"]


def rlhf(*args: str) -> None:
    """``python -m rlhf_core ARGS`` in a fresh process from the repository root; raises if it fails."""
    subprocess.run([sys.executable, "-m", "rlhf_core", *args], check=True, cwd=ROOT)


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write (dpi 100, parent folders made) and close a matplotlib figure."""
    import matplotlib.pyplot as plt  # the caller chose the Agg backend before pyplot loaded
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def splice_doc(doc: str | Path, name: str, text: str) -> None:
    """Replace what stands between ``<!-- NAME: begin -->`` and ``<!-- NAME: end -->`` in ``doc``."""
    doc = Path(doc)
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    old = doc.read_text(encoding="utf-8")
    start, stop = old.index(begin) + len(begin), old.index(end)
    doc.write_text(old[:start] + "\n" + text + "\n" + old[stop:], encoding="utf-8")


def smollm2_setup(out: Path, sft: Path | None, seed: int = 0) -> tuple[Path, Any, Any]:
    """(the smollm2 preset's SFT policy, its PipelineConfig, its task) for PPO runs in this process: the SFT
    policy ``sft``, or OUT/smollm2/sft, trained first when missing (`rlhf pipeline --stop-after sft`)."""
    from rlhf_core.config import PipelineConfig
    from rlhf_core.models import load_tokenizer
    from rlhf_core.presets import get_preset

    if sft is None:
        sft = out / "smollm2" / "sft"
        if not sft.is_dir():
            rlhf("pipeline", "--preset", "smollm2", "--seed", str(seed), "--stop-after", "sft",
                 "--output-dir", str(out / "smollm2"), "--overwrite")
    preset = get_preset("smollm2")
    cfg = PipelineConfig.from_dict(preset.defaults({"seed": seed}))
    models = {name: locate() for name, locate in preset.models.items()}
    return sft, cfg, preset.make_task(cfg.task, seed, load_tokenizer(str(models[preset.task_tokenizer])))
