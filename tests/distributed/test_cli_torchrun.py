"""`torchrun --nproc_per_node 2 -m rlhf_core.cli sft|reward|ppo|pipeline` on tiny sizes: it runs, rank 0
alone writes the run folder, and the result matches the same command in one process (same global batch)."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from rlhf_core.config import TaskConfig, TinyModelConfig
    from rlhf_core.data.movie_reviews import generate_task
    from rlhf_core.data.tokenizer import train_tokenizer
    from rlhf_core.models import build_tiny_model
    out = tmp_path_factory.mktemp("tiny") / "model"
    task = generate_task(TaskConfig(n_corpus=200, n_sft=1, n_preferences=1), seed=0)
    tokenizer = train_tokenizer(task.corpus, vocab_size=320)
    model = build_tiny_model(tokenizer, TinyModelConfig(vocab_size=320, hidden_size=32, num_layers=1, num_heads=2,
                                                        intermediate_size=64, max_position_embeddings=128), seed=0)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def rlhf(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RLHF_NUM_THREADS": "1",
           "RLHF_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"] if nproc > 1 else ["-m"]
    proc = subprocess.run([sys.executable, *launcher, "rlhf_core.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


SFT = ["--sft.max_steps", "3", "--sft.batch_size", "8", "--sft.log_every", "1", "--sft.max_length", "64",
       "--sft.learning_rate", "1e-3", "--sft.save_every", "1", "--sft.keep_checkpoints", "3"]


@pytest.fixture(scope="module")
def sft_one(tiny_model, tmp_path_factory) -> Path:
    """The one-process SFT run (3 steps, a checkpoint per step) the 2-rank runs are compared with."""
    out = tmp_path_factory.mktemp("sft") / "one"
    rlhf(["sft", "--model", str(tiny_model), *SFT, "--output-dir", str(out)], nproc=1)
    return out


def copy_run(src: Path, dst: Path, drop_steps: tuple[int, ...]) -> Path:
    """A run folder as if stopped after an earlier checkpoint: no saved model, later checkpoints gone."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "sft")
    for step in drop_steps:
        shutil.rmtree(dst / "checkpoints" / "sft" / f"step-{step:06d}")
    return dst


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5, phase: str = "sft",
                        file: str = "model.safetensors") -> None:
    from safetensors.torch import load_file
    wa, wb = (load_file(d / phase / file) for d in (a, b))
    assert wa.keys() == wb.keys()
    for name, ref in wb.items():
        torch.testing.assert_close(wa[name], ref, rtol=0, atol=atol, msg=name)


def test_torchrun_sft_two_ranks_matches_one_process(tiny_model, sft_one, tmp_path):
    common = ["sft", "--model", str(tiny_model), *SFT]
    two = tmp_path / "two"
    rlhf([*common, "--output-dir", str(two)], nproc=2)
    s2, s1 = (json.loads((d / "summary.json").read_text())["sft"] for d in (two, sft_one))
    assert s2["steps"] == s1["steps"] == 3
    assert s2["train_loss"] == pytest.approx(s1["train_loss"], rel=1e-4)
    assert s2["eval_loss"] == pytest.approx(s1["eval_loss"], rel=1e-4)
    assert s2["eval_loss_before"] == s1["eval_loss_before"]  # sharded evaluation, same weights: exact
    # rank 0 alone wrote: one metrics line per logged step, not one per rank
    lines = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss/train" in r] == [1, 2, 3]
    assert_same_weights(two, sft_one)
    # the 2-rank run's checkpoint 2 resumed on ONE process: SFT does not depend on the world size,
    # so the result is the one-process run's (float tolerance), with a one-line warning
    moved = copy_run(two, tmp_path / "moved", drop_steps=(3,))
    res = rlhf([*common, "--output-dir", str(moved), "--resume"], nproc=1)
    assert "warning: checkpoint written by 2 ranks, resumed on 1" in res.stderr
    assert_same_weights(moved, sft_one)


def test_torchrun_fsdp2_sft_resumes_a_one_process_checkpoint_and_matches_it(tiny_model, sft_one, tmp_path):
    """``--sft.parallel fsdp2`` on 2 ranks, resumed from the one-process run's checkpoint 1: the full
    weights and Adam moments are re-sharded into FSDP2 DTensors, two sharded steps follow, the
    step-3 checkpoint is gathered whole and the model saved from a full state dict. All equal the
    one-process run (float tolerance): FSDP2 computes the same steps as DDP / one process."""
    fsdp = copy_run(sft_one, tmp_path / "fsdp", drop_steps=(2, 3))
    rlhf(["sft", "--model", str(tiny_model), *SFT, "--output-dir", str(fsdp), "--resume", "--sft.parallel", "fsdp2"],
         nproc=2)
    assert_same_weights(fsdp, sft_one)
    from safetensors.torch import load_file
    c1, c = (load_file(d / "checkpoints" / "sft" / "step-000003" / "tensors.safetensors") for d in (sft_one, fsdp))
    shared = [k for k in c1 if k.startswith(("param.", "optimizer."))]
    assert len(shared) > 10 and {k for k in c if k.startswith(("param.", "optimizer."))} == set(shared)
    for name in shared:  # gathered whole (not one rank's shard), equal to the one-process state
        torch.testing.assert_close(c[name], c1[name], rtol=1e-4, atol=1e-6, msg=name)
    assert "rank1.rng.torch" in c and "rank1.rng.torch" not in c1
    s1, s = (json.loads((d / "summary.json").read_text())["sft"] for d in (sft_one, fsdp))
    assert s["eval_loss"] == pytest.approx(s1["eval_loss"], rel=1e-4)


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_torchrun_lora_and_qlora_sft_match_one_process(tiny_model, tmp_path, mode):
    """``--sft.mode lora|qlora`` on 2 ranks (records of 7 split 4 + 3): the LoRA gradients are
    all-reduced like full fine-tuning's, so the merged model (LoRA) / the adapter (QLoRA, over the
    nf4 base) equal one process. LoRA dropout is off: its masks come from each rank's own stream, so
    with dropout the runs agree only in distribution."""
    common = ["sft", "--model", str(tiny_model), "--sft.mode", mode, "--sft.lora_dropout", "0",
              "--sft.max_steps", "3", "--sft.batch_size", "7", "--sft.max_length", "64", "--sft.learning_rate", "1e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    rlhf([*common, "--output-dir", str(one)], nproc=1)
    rlhf([*common, "--output-dir", str(two)], nproc=2)
    if mode == "lora":  # merged: the adapted projections moved, and both runs moved them alike
        from safetensors.torch import load_file
        w1, base = load_file(one / "sft" / "model.safetensors"), load_file(tiny_model / "model.safetensors")
        assert max((w1[k] - base[k]).abs().max() for k in w1) > 1e-4
    assert_same_weights(two, one, atol=1e-6,
                        file="model.safetensors" if mode == "lora" else "adapter_model.safetensors")
    s1, s2 = (json.loads((d / "summary.json").read_text())["sft"] for d in (one, two))
    assert s2["world_size"] == 2 and s2["eval_loss"] == pytest.approx(s1["eval_loss"], rel=1e-6)


def test_torchrun_fsdp2_pretrain_trains_its_tokenizer_on_every_rank_and_matches_one_process(tmp_path):
    """``rlhf pretrain --pretrain.parallel fsdp2`` on 2 ranks from raw text, no tokenizer given: every
    rank trains the BPE tokenizer itself (the trainer is deterministic, so they agree) and the saved
    tokenizer is byte-identical to one process's; batches of 5 blocks split 3 + 2, sharded params,
    weights and perplexities equal one process."""
    import random
    rng = random.Random(0)
    words = "the film was good bad great boring plot actor scene music ending story".split()
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) + "."})
                            + "\n" for _ in range(150)))
    common = ["pretrain", "--data", str(data), "--model.vocab_size", "300", "--model.hidden_size", "32",
              "--model.num_layers", "1", "--model.num_heads", "2", "--model.intermediate_size", "64",
              "--model.max_position_embeddings", "64", "--pretrain.max_steps", "3", "--pretrain.batch_size", "5",
              "--pretrain.block_size", "32"]
    one, two = tmp_path / "one", tmp_path / "two"
    rlhf([*common, "--output-dir", str(one)], nproc=1)
    rlhf([*common, "--pretrain.parallel", "fsdp2", "--output-dir", str(two)], nproc=2)
    assert (two / "pretrain" / "tokenizer.json").read_bytes() == (one / "pretrain" / "tokenizer.json").read_bytes()
    assert_same_weights(two, one, phase="pretrain")
    s1, s2 = (json.loads((d / "summary.json").read_text())["pretrain"] for d in (one, two))
    assert s2["world_size"] == 2 and s2["blocks_train"] == s1["blocks_train"]
    for key in ("eval_perplexity_before", "eval_perplexity"):
        assert s2[key] == pytest.approx(s1[key], rel=1e-5), key


REWARD = ["--reward.max_steps", "3", "--reward.batch_size", "7", "--reward.log_every", "1", "--reward.max_length", "64",
          "--reward.learning_rate", "1e-3"]


def test_torchrun_reward_model_ddp_and_fsdp2_match_one_process(tiny_model, tmp_path):
    """``rlhf reward`` on 2 ranks, DDP and FSDP2: pairs of 7 split 4 + 3, so each rank's Bradley-Terry
    loss must be weighted by its share of the global pairs. The trained model (trunk and the new
    score head) and the sharded evaluation equal one process (float tolerance)."""
    common = ["reward", "--model", str(tiny_model), *REWARD]
    one = tmp_path / "one"
    rlhf([*common, "--output-dir", str(one)], nproc=1)
    s1 = json.loads((one / "summary.json").read_text())["reward"]
    for parallel in ("ddp", "fsdp2"):
        two = tmp_path / parallel
        rlhf([*common, "--reward.parallel", parallel, "--output-dir", str(two)], nproc=2)
        assert_same_weights(two, one, phase="reward")
        s2 = json.loads((two / "summary.json").read_text())["reward"]
        assert s2["world_size"] == 2 and s2["steps"] == s1["steps"] == 3
        assert s2["train_loss"] == pytest.approx(s1["train_loss"], rel=1e-5)
        for key in ("eval_loss", "eval_accuracy", "eval_margin"):
            assert s2[key] == pytest.approx(s1[key], rel=1e-4, abs=1e-6), key


PIPELINE = ["pipeline", "--task.n_corpus", "120", "--task.n_sft", "40", "--task.n_preferences", "8",
            "--task.n_prompts", "8", "--task.n_eval_prompts", "4", "--model.vocab_size", "300", "--model.hidden_size", "32",
            "--model.num_layers", "1", "--model.num_heads", "2", "--model.intermediate_size", "64",
            "--model.max_position_embeddings", "64", "--pretrain.max_steps", "2", "--pretrain.batch_size", "5",
            "--pretrain.block_size", "32", "--pretrain.log_every", "1", "--sft.max_steps", "2", "--sft.batch_size", "5",
            "--sft.log_every", "1", "--sft.max_length", "48", "--reward.max_steps", "2", "--reward.batch_size", "5",
            "--reward.log_every", "1", "--reward.max_length", "48", "--ppo.num_iterations", "2", "--ppo.batch_size", "4",
            "--ppo.num_mini_batches", "2", "--ppo.response_length", "6"]


def test_torchrun_pipeline_all_phases_matches_one_process(tmp_path):
    """``torchrun ... pipeline``, all four phases: rank 0 writes the data, the tokenizer and each
    phase's folder, the next phase reads it on every rank. Batches of 5 blocks split 3 + 2, so
    pretraining's loss must be the global token-mean (a per-rank mean would weigh ranks equally).
    Pretraining, SFT and the reward model equal one process; PPO runs on both ranks' rollouts (each
    rank samples with its own seed, so its weights are not compared with one process here: the
    PPO tests below and tests/distributed/test_distributed.py check PPO's equivalences)."""
    one, two = tmp_path / "one", tmp_path / "two"
    rlhf([*PIPELINE, "--output-dir", str(one)], nproc=1)
    rlhf([*PIPELINE, "--output-dir", str(two)], nproc=2)
    from safetensors.torch import load_file
    for phase in ("pretrain", "sft", "reward"):
        w1, w2 = (load_file(d / phase / "model.safetensors") for d in (one, two))
        for name, ref in w1.items():
            torch.testing.assert_close(w2[name], ref, rtol=0, atol=1e-5, msg=f"{phase} {name}")
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["pretrain"]["eval_perplexity"] == pytest.approx(s1["pretrain"]["eval_perplexity"], rel=1e-5)
    assert s2["sft"]["eval_loss"] == pytest.approx(s1["sft"]["eval_loss"], rel=1e-5)
    assert s2["reward"]["eval_loss"] == pytest.approx(s1["reward"]["eval_loss"], rel=1e-5)
    assert {s2[p]["world_size"] for p in ("pretrain", "sft", "reward", "ppo")} == {2}
    assert (two / "ppo" / "model.safetensors").is_file() and (two / "ppo" / "value_head.safetensors").is_file()
    lines = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in lines if "loss/train" in r] == [
        ("pretrain", 1), ("pretrain", 2), ("sft", 1), ("sft", 2), ("reward", 1), ("reward", 2)]
    assert [r["step"] for r in lines if r["phase"] == "ppo"] == [0, 1, 2]  # rank 0 alone logs PPO
    assert (two / "report.md").is_file() and (two / "tokenizer" / "tokenizer.json").is_file()


def launch(args: list[str], nproc: int) -> subprocess.Popen:
    """``rlhf ARGS`` in the background (stderr kept for failure messages)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RLHF_NUM_THREADS": "1",
           "RLHF_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"] if nproc > 1 else ["-m"]
    return subprocess.Popen([sys.executable, *launcher, "rlhf_core.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant (torchrun starts each rank in its own session, so a
    process-group kill would miss them): a machine crash, as far as the run can tell."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            with contextlib.suppress(OSError):
                pids += [int(c) for c in (task / "children").read_text().split()]
        i += 1
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


PPO_RESUME = ["--reward", "gold", "--ppo.num_iterations", "4", "--ppo.batch_size", "8", "--ppo.num_mini_batches", "2",
              "--ppo.ppo_epochs", "1", "--ppo.response_length", "8", "--ppo.save_every", "1",
              "--ppo.keep_checkpoints", "4", "--ppo.eval_every", "0"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_torchrun_ppo_rank0_writes_and_sigkill_resume_is_bitwise_the_uninterrupted_run(tiny_model, tmp_path, parallel):
    """Rollouts split 4 + 4 over 2 ranks, advantages whitened over all 8. The uninterrupted run:
    one metrics line per iteration and one set of checkpoints and policy (rank 0 alone writes).
    Another run gets SIGKILL (torchrun and both ranks) after checkpoint 2, then ``--resume`` on 2
    ranks: its saved policy and value head are byte-identical to the uninterrupted run's (each
    rank restores its own sampling generator; when every rank restored rank 0's, they differed).
    (Not compared with one process: each rank samples with its own seed, by design.) With
    ``fsdp2`` the checkpoints hold the gathered weights and moments and the resume re-shards them."""
    common = ["ppo", "--policy", str(tiny_model), *PPO_RESUME, "--ppo.parallel", parallel]
    ref, run = tmp_path / "ref", tmp_path / "run"
    reference = launch([*common, "--output-dir", str(ref)], nproc=2)
    victim = launch([*common, "--output-dir", str(run)], nproc=2)
    ckpts = run / "checkpoints" / "ppo"
    deadline = time.monotonic() + 120
    while victim.poll() is None and time.monotonic() < deadline and not (ckpts / "step-000002").is_dir():
        time.sleep(0.005)
    kill_tree(victim.pid)
    assert victim.wait() == -signal.SIGKILL, "finished before the kill"
    done = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert "step-000004" not in done and not (run / "ppo").exists()
    resumed = rlhf([*common, "--output-dir", str(run), "--resume"], nproc=2)
    assert reference.wait(timeout=120) == 0, reference.stderr.read()[-3000:]
    assert json.loads((ref / "summary.json").read_text())["ppo"]["skipped_steps"] == 0
    lines = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss/policy" in r] == [1, 2, 3, 4]
    assert sorted(p.name for p in (ref / "checkpoints" / "ppo").iterdir()) == [f"step-00000{i}" for i in (1, 2, 3, 4)]
    for name in ("model.safetensors", "value_head.safetensors"):
        assert (run / "ppo" / name).read_bytes() == (ref / "ppo" / name).read_bytes(), f"{name} differs"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss/policy" in r][-2:] == [3, 4]
    assert resumed.returncode == 0


def test_torchrun_ppo_fsdp2_with_a_sharded_reward_model_trains_like_its_replica(tiny_model, tmp_path):
    """``--ppo.shard_reward_model``: the reward model's blocks and root sharded over the 2 ranks
    (each rank scores its own rows; the forwards are collectives). Same scores, same training as
    with a reward-model replica per rank."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    rm.config.pad_token_id = AutoTokenizer.from_pretrained(tiny_model).pad_token_id
    rm.save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(rm_dir)
    common = ["ppo", "--policy", str(tiny_model), *PPO_RESUME[2:], "--reward", str(rm_dir), "--ppo.parallel", "fsdp2",
              "--ppo.num_iterations", "2"]
    rlhf([*common, "--output-dir", str(tmp_path / "replica")], nproc=2)
    rlhf([*common, "--ppo.shard_reward_model", "true", "--output-dir", str(tmp_path / "sharded")], nproc=2)
    scores = [[json.loads(x)["objective/scores"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if "objective/scores" in json.loads(x)] for run in ("replica", "sharded")]
    assert len(scores[0]) == 2 and scores[0] == pytest.approx(scores[1], rel=1e-5, abs=1e-6)
    assert len(set(scores[0])) == 2  # the scores are not a constant the comparison could not miss
    sharded = [json.loads((tmp_path / run / "summary.json").read_text())["ppo"]["sharded_models"]
               for run in ("replica", "sharded")]
    assert sharded == [["policy"], ["policy", "reward_model"]]
    a, b = (load_file(tmp_path / run / "ppo" / "model.safetensors") for run in ("replica", "sharded"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_two_nodes_through_the_c10d_rendezvous_match_one_process(tiny_model, sft_one, tmp_path):
    """Two torchrun launchers, one process each, joined by ``--nnodes 2 --rdzv_backend c10d`` (the
    multi-machine launch line of docs/distributed.md, both "machines" on localhost): SFT equals the
    one-process run."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RLHF_NUM_THREADS": "1",
           "RLHF_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "nodes"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "rlhf-test",
           "-m", "rlhf_core.cli", "sft", "--model", str(tiny_model), *SFT, "--output-dir", str(out)]
    nodes = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for node in nodes:
        assert node.wait(timeout=180) == 0, node.stderr.read()[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss/train" in r] == [1, 2, 3]  # one writer, not two
    assert json.loads((out / "summary.json").read_text())["sft"]["world_size"] == 2
    assert_same_weights(out, sft_one)


def test_torchrun_ppo_sigterm_checkpoints_on_every_rank_and_resume_is_bitwise_the_uninterrupted_run(tiny_model,
                                                                                                     tmp_path):
    """SIGTERM to torchrun (a cluster's preemption) reaches both ranks; they agree on the iteration to stop
    at (a collective), rank 0 writes its checkpoint (save_every 0: no other), both exit 143, and the 2-rank
    --resume ends byte-identical to an uninterrupted 2-rank run."""
    common = ["ppo", "--policy", str(tiny_model), *PPO_RESUME, "--ppo.save_every", "0"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    reference = launch([*common, "--output-dir", str(ref)], nproc=2)
    victim = launch([*common, "--output-dir", str(run)], nproc=2)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while victim.poll() is None and time.monotonic() < deadline and not (
            metrics.is_file() and '"step": 1,' in metrics.read_text()):
        time.sleep(0.005)
    victim.send_signal(signal.SIGTERM)
    err = victim.communicate(timeout=120)[1]
    assert "stopped: ppo stopped by SIGTERM after step" in err, err[-3000:]
    ckpts = sorted(p.name for p in (run / "checkpoints" / "ppo").iterdir())
    assert len(ckpts) == 1 and not (run / "ppo").exists(), ckpts
    resumed = rlhf([*common, "--output-dir", str(run), "--resume"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reference.wait(timeout=120) == 0, reference.stderr.read()[-3000:]
    for name in ("model.safetensors", "value_head.safetensors"):
        assert (run / "ppo" / name).read_bytes() == (ref / "ppo" / name).read_bytes(), f"{name} differs"
