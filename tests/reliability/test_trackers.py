"""--report-to: TensorBoard, W&B (offline) and trackio, each read back with its own reader; one-line
errors for an unknown tracker or a missing extra; a tracker that fails mid-run never stops training."""
import importlib.util
import json
import sqlite3
import time
import warnings
from pathlib import Path

import pytest

from rlhf_core import trackers
from rlhf_core.cli import main
from rlhf_core.errors import ConfigError
from rlhf_core.tracking import MetricsLogger

RECORDS = [{"phase": "sft", "step": s, "loss/train": 2.0 / s} for s in (1, 2)] + \
          [{"phase": "ppo", "step": s, "loss/policy": 0.1 * s, "policy/clipfrac": 0.05} for s in (1, 2, 3)]


def run_folder(tmp_path: Path) -> Path:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (tmp_path / "config.json").write_text(json.dumps({"seed": 7, "ppo": {"kl_coef": 0.2}}))
    return tmp_path


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_history(run_file: Path) -> list[dict[str, float]]:
    """The history rows of an offline .wandb file: a 7-byte ':W&B' header, then LevelDB log records
    (32 KiB blocks; 4-byte CRC, 2-byte length, 1-byte type) holding wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding to the block's end
            pos += block - pos % block
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in rec.history.item})
    return rows


@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("tensorboard", "wandb", "trackio")),
                    reason="the .[track] extra is not installed")
def test_rlhf_report_exports_to_every_tracker_read_back_with_its_own_reader(tmp_path, capsys):
    out = run_folder(tmp_path)
    assert main(["report", str(out), "--report-to", "tensorboard,wandb,trackio"]) == 0
    scalars = tensorboard_scalars(out / "tensorboard")
    assert scalars["ppo/loss/policy"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3))]
    assert [s for s, _ in scalars["sft/loss/train"]] == [1, 2]
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    rows = wandb_history(runs[0])
    ppo = [r for r in rows if "ppo/loss/policy" in r]
    assert [r["ppo/step"] for r in ppo] == [1, 2, 3] and ppo[-1]["ppo/loss/policy"] == pytest.approx(0.3)
    db = sqlite3.connect(out / "trackio" / "rlhf-core.db")
    logged = [json.loads(m) for (m,) in db.execute("select metrics from metrics order by id")]
    assert [m["ppo/step"] for m in logged if "ppo/step" in m] == [1, 2, 3]
    assert json.loads(db.execute("select config from configs").fetchone()[0])["seed"] == 7


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="the .[track] extra is not installed")
def test_a_phase_logs_to_tensorboard_with_config_and_report(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["ppo", "--policy", str(tiny_model_dir), "--reward", "gold", "--output-dir", str(out),
                 "--report-to", "tensorboard", "--ppo.num_iterations", "2", "--ppo.batch_size", "4",
                 "--ppo.num_mini_batches", "1", "--ppo.response_length", "4", "--ppo.eval_every", "0"]) == 0
    scalars = tensorboard_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["ppo/loss/policy"]] == [1, 2] and "ppo/eval/gold_reward" in scalars
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert scalars["ppo/loss/policy"][-1][1] == pytest.approx([r for r in jsonl if "loss/policy" in r][-1]["loss/policy"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    assert {"config/text_summary", "report.md/text_summary"} <= set(acc.Tags()["tensors"])


def test_unknown_tracker_or_missing_extra_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["ppo", "--output-dir", str(out), "--report-to", "tensorboard,mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --report-to mlflow: unknown tracker (choose none, tensorboard, wandb, trackio)"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--report-to wandb: the wandb package is not installed .*\.\[track\]"):
        trackers.parse_report_to("wandb")
    assert main(["ppo", "--output-dir", str(out), "--report-to", "wandb"]) == 2
    assert "\n" not in capsys.readouterr().err.strip() and not out.exists()
    assert trackers.parse_report_to("none") == [] and trackers.parse_report_to("") == []


def test_a_tracker_that_fails_mid_run_is_dropped_once_and_the_jsonl_goes_on(tmp_path, monkeypatch):
    calls = []

    class Flaky(trackers.Tracker):
        name = "flaky"

        def __init__(self, out, config):
            pass

        def log(self, phase, step, metrics):
            calls.append(step)
            if step == 2:
                raise OSError("No space left on device")

    monkeypatch.setitem(trackers.TRACKERS, "flaky", Flaky)
    logger = MetricsLogger(tmp_path / "metrics.jsonl", trackers=trackers.Trackers(["flaky"], tmp_path, {}))
    with pytest.warns(UserWarning, match="tracker flaky failed .*No space left on device.*dropped") as caught:
        for step in (1, 2, 3, 4):
            logger.log("ppo", step, {"loss/policy": float(step)})
    assert len([w for w in caught if "tracker" in str(w.message)]) == 1 and calls == [1, 2]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4  # nothing lost
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.trackers.close()  # nothing left to close


TB_FAILS = """
import sys, time, warnings
from pathlib import Path
from rlhf_core import trackers
from rlhf_core.tracking import MetricsLogger
out = Path(sys.argv[1])
tb = trackers.TensorBoardTracker(out, {})
def full(*a, **k):
    raise OSError(28, "No space left on device")
tb.writer._get_file_writer().event_writer._async_writer._writer.write = full
logger = MetricsLogger(out / "metrics.jsonl", trackers=trackers.Trackers([], out, {}))
logger.trackers.active.append(tb)
for step in range(1, 6):
    logger.log("ppo", step, {"loss/policy": float(step)})
    time.sleep(0.05)  # let the writer thread take the record (and fail)
"""


def test_tensorboard_failing_in_its_writer_thread_is_one_warning_not_a_traceback(tmp_path):
    """In a fresh process (pytest would catch the thread's exception itself): one warning line, no
    "Exception in thread" traceback, and every metric in metrics.jsonl."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", TB_FAILS, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Exception in thread" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "tracker tensorboard failed" in proc.stderr
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5


def wandb_run_record(run_file: Path):
    """The `run` record (project, name, tags) of an offline .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, block, buf = run_file.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            pos += block - pos % block
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "run":
                return rec.run
    return None


@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("wandb", "trackio")),
                    reason="the .[track] extra is not installed")
def test_project_run_name_and_tags_are_settings(tmp_path, capsys):
    out = run_folder(tmp_path)
    (out / "config.json").write_text(json.dumps({"seed": 7, "project": "my-project", "run_name": "exp-1",
                                                 "tags": ["grpo", "smollm2"]}))
    assert main(["report", str(out), "--report-to", "wandb,trackio"]) == 0
    run = wandb_run_record(next((out / "wandb").glob("offline-run-*/run-*.wandb")))
    assert run.project == "my-project" and run.display_name == "exp-1" and list(run.tags) == ["grpo", "smollm2"]
    import os  # trackio's store: TRACKIO_DIR, set by the first trackio run of this process (setdefault)
    assert (Path(os.environ.get("TRACKIO_DIR", out / "trackio")) / "my-project.db").is_file()
    from rlhf_core.config import PipelineConfig
    cfg = PipelineConfig()
    for key, raw in (("project", "p"), ("run_name", "r"), ("tags", "a,b")):
        cfg.apply_override(key, raw)
    assert (cfg.project, cfg.run_name, cfg.tags) == ("p", "r", ["a", "b"])
    assert PipelineConfig.from_dict(cfg.to_dict()).tags == ["a", "b"]
