"""Kill -9 at several moments, resume, and the final weights are bitwise equal to an uninterrupted run.

Each test runs the real CLI in subprocesses (one torch thread): a reference run, started in
parallel, and a run that is SIGKILLed at chosen moments and resumed with ``--resume`` each time.
"""
import contextlib
import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rlhf_core.cli import main

PPO_ARGS = ["--reward", "gold", "--ppo.num_iterations", "12", "--ppo.save_every", "1", "--ppo.batch_size", "8",
            "--ppo.num_mini_batches", "2", "--ppo.ppo_epochs", "2", "--ppo.response_length", "8",
            "--ppo.num_threads", "1", "--ppo.eval_every", "0", "--ppo.keep_checkpoints", "3"]


def kill_when(proc: subprocess.Popen, ready, delay: float = 0.0, timeout: float = 90) -> None:
    """Poll until ``ready()`` (or the process ends), wait ``delay`` s, then SIGKILL; assert it was killed."""
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill: {proc.stderr.read().decode()[-500:]}"


def has_checkpoint(ckpts: Path, step: int):
    """True once a checkpoint of ``step`` or later exists (older ones get pruned: keep_checkpoints)."""
    return lambda: ckpts.is_dir() and any(p.name.startswith("step-") and int(p.name[5:]) >= step
                                          for p in ckpts.iterdir())


def writing_checkpoint(ckpts: Path, after: int):
    """True while a checkpoint newer than ``after`` is being written (its temporary folder exists)."""
    return lambda: ckpts.is_dir() and any(p.name.startswith(".step-") and int(p.name[6:12]) > after
                                          for p in ckpts.iterdir())


def assert_same_files(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs after resume"


def test_ppo_kill9_resume_is_bitwise_identical(cli, tiny_model_dir, tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    common = ["ppo", "--policy", str(tiny_model_dir), *PPO_ARGS]
    reference = cli.start(*[*common, "--output-dir", str(ref_out)])
    ckpts = out / "checkpoints" / "ppo"
    rng = random.Random(0)
    # 1. right after a checkpoint appears; 2. mid-iteration; 3. during a checkpoint write
    kill_when(cli.start(*[*common, "--output-dir", str(out)]), has_checkpoint(ckpts, 3))
    kill_when(cli.start(*[*common, "--output-dir", str(out), "--resume"]), has_checkpoint(ckpts, 6),
              delay=rng.uniform(0.005, 0.03))
    kill_when(cli.start(*[*common, "--output-dir", str(out), "--resume"]), writing_checkpoint(ckpts, 8))
    final = cli.run(*common, "--output-dir", str(out), "--resume")
    assert final.returncode == 0, final.stderr[-2000:]
    assert reference.wait(timeout=120) == 0, reference.stderr.read().decode()[-2000:]
    assert_same_files(ref_out / "ppo", out / "ppo", ["model.safetensors", "value_head.safetensors"])
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000010", "step-000011", "step-000012"]


def test_resume_of_a_finished_run_keeps_it_and_refuses_a_changed_configuration(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    common = ["ppo", "--policy", str(tiny_model_dir), "--output-dir", str(out), *PPO_ARGS]
    assert cli.run(*common, "--ppo.num_iterations", "2").returncode == 0
    weights = (out / "ppo" / "model.safetensors").stat().st_mtime_ns
    res = cli.run(*common, "--ppo.num_iterations", "2", "--ppo.save_every", "5", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "ppo" / "model.safetensors").stat().st_mtime_ns == weights  # finished phase not rerun
    res = cli.run(*common, "--ppo.num_iterations", "2", "--ppo.learning_rate", "0.5", "--resume")
    assert res.returncode == 2 and "ppo.learning_rate=0.5 differs from the interrupted run's" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("flags, message", [
    (["--resume", "--overwrite"], "exclude each other"),
    (["--resume"], "not an rlhf run folder"),
])
def test_resume_flag_errors(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["ppo", "--output-dir", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def write_phase_data(phase: str, path: Path) -> Path:
    from rlhf_core.config import TaskConfig
    from rlhf_core.data.movie_reviews import generate_task
    task = generate_task(TaskConfig(n_corpus=1, n_sft=48, n_preferences=48, n_prompts=1, n_eval_prompts=1))
    records = task.sft if phase == "sft" else task.preferences
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_sft_and_reward_kill9_resume_are_bitwise_identical(cli, tiny_model_dir, tmp_path):
    """Both phases at once (their processes overlap, so the test costs about one of them)."""
    runs = {}
    for phase in ("sft", "reward"):
        data = write_phase_data(phase, tmp_path / f"{phase}.jsonl")
        common = [phase, "--model", str(tiny_model_dir), "--data", str(data), f"--{phase}.max_steps", "12",
                  f"--{phase}.save_every", "1", f"--{phase}.batch_size", "4", f"--{phase}.eval_fraction", "0.2"]
        out = tmp_path / phase
        runs[phase] = (common, out, cli.start(*common, "--output-dir", str(tmp_path / f"ref-{phase}")),
                       cli.start(*common, "--output-dir", str(out)))
    pending = {phase: (run[3], has_checkpoint(run[1] / "checkpoints" / phase, 4)) for phase, run in runs.items()}
    deadline = time.monotonic() + 90
    while pending and time.monotonic() < deadline:  # kill each as soon as its 4th checkpoint exists
        for phase, (proc, ready) in list(pending.items()):
            if ready() or proc.poll() is not None:
                proc.send_signal(signal.SIGKILL)
                assert proc.wait() == -signal.SIGKILL, f"{phase} finished before the kill"
                del pending[phase]
        time.sleep(0.002)
    resumed = {phase: cli.start(*run[0], "--output-dir", str(run[1]), "--resume") for phase, run in runs.items()}
    for phase, (_, out, reference, _) in runs.items():
        assert resumed[phase].wait(timeout=120) == 0, resumed[phase].stderr.read().decode()[-2000:]
        assert reference.wait(timeout=120) == 0, reference.stderr.read().decode()[-2000:]
        assert_same_files(tmp_path / f"ref-{phase}" / phase, out / phase, ["model.safetensors"])
        assert (out / "checkpoints" / phase / "step-000012").is_dir()


def logged(metrics: Path, phase: str, step: int):
    """True once ``phase`` has logged ``step`` (or later) in metrics.jsonl."""
    def ready():
        if not metrics.is_file():
            return False
        for line in metrics.read_text().splitlines():
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if r.get("phase") == phase and r.get("step", 0) >= step:
                    return True
        return False
    return ready


def terminate_when(proc: subprocess.Popen, ready, timeout: float = 90) -> str:
    """SIGTERM once ``ready()``; the run must stop cleanly with exit code 143. Returns its stderr."""
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 143, f"exit {proc.returncode}: {err[-1500:]}"
    return err


@pytest.mark.parametrize("phase", ["ppo", "sft"])
def test_sigterm_checkpoints_the_step_exits_143_and_resume_is_bitwise_identical(cli, tiny_model_dir, tmp_path, phase):
    """Clusters preempt with SIGTERM: the run finishes the step it is in, writes its checkpoint (even with
    save_every 0), says how to continue, exits 143; --resume then ends byte-identical to an uninterrupted run."""
    if phase == "ppo":
        common = ["ppo", "--policy", str(tiny_model_dir), *PPO_ARGS, "--ppo.save_every", "0"]
    else:
        data = write_phase_data("sft", tmp_path / "sft.jsonl")
        common = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--sft.max_steps", "12",
                  "--sft.save_every", "0", "--sft.batch_size", "4", "--sft.eval_fraction", "0.2", "--sft.log_every", "1"]
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    reference = cli.start(*common, "--output-dir", str(ref_out))
    err = terminate_when(cli.start(*common, "--output-dir", str(out)), logged(out / "metrics.jsonl", phase, 3))
    assert f"stopped: {phase} stopped by SIGTERM after step" in err and "--resume" in err and "Traceback" not in err
    ckpts = sorted(p.name for p in (out / "checkpoints" / phase).iterdir())
    assert len(ckpts) == 1 and not (out / phase).exists()  # the step's checkpoint, no final model yet
    final = cli.run(*common, "--output-dir", str(out), "--resume")
    assert final.returncode == 0, final.stderr[-2000:]
    assert reference.wait(timeout=120) == 0, reference.stderr.read().decode()[-2000:]
    assert_same_files(ref_out / phase, out / phase, ["model.safetensors"])


def test_a_finished_ppo_run_is_extended_by_resume_with_more_iterations(cli, tiny_model_dir, tmp_path):
    """--resume with a larger ppo.num_iterations goes on from the finished run's last checkpoint; the LR
    schedule is re-planned over the new length (linear: the LR after optimizer step s of S is lr·(1 − s/S));
    a smaller num_iterations is refused."""
    out = tmp_path / "run"
    common = ["ppo", "--policy", str(tiny_model_dir), "--output-dir", str(out), *PPO_ARGS, "--ppo.save_every", "0"]
    assert cli.run(*common, "--ppo.num_iterations", "2").returncode == 0
    res = cli.run(*common, "--ppo.num_iterations", "4", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())["ppo"]
    assert summary["iterations"] == 4
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in lines if r["phase"] == "ppo" and "loss/policy" in r}
    assert sorted(logged) == [1, 2, 3, 4]
    per_iteration = 2 * 2  # ppo_epochs x num_mini_batches optimizer steps
    lr = 1e-4  # the PPOConfig default
    assert logged[3]["lr"] == pytest.approx(lr * (1 - 3 * per_iteration / (4 * per_iteration)))
    assert sorted(p.name for p in (out / "checkpoints" / "ppo").iterdir())[-1] == "step-000004"
    res = cli.run(*common, "--ppo.num_iterations", "3", "--resume")
    assert res.returncode == 2 and "ppo.num_iterations=3 is less than the interrupted run's 4" in res.stderr
