"""Shared setup for the PPO-vs-TRL benchmark: scales, hyperparameters, artifacts, timers.

Both frameworks load the *same* saved artifacts (tokenizer, policy, reference, reward, value), so
any difference in speed or learning comes from the trainers, not from the initial weights.
Imported by ``trl_runner.py``, ``ours_runner.py`` and ``bench_ppo_vs_trl.py`` (run as scripts,
so this directory is on ``sys.path``).
"""
from __future__ import annotations

import random
import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

# ----------------------------------------------------------------------------------------------
# What is compared: model scales and the hyperparameters both trainers receive
# ----------------------------------------------------------------------------------------------
SCALES: dict[str, dict[str, Any]] = {
    # The project's `tiny` preset (rlhf_core.config.TinyModelConfig defaults).
    "tiny": {"arch": "llama", "hidden": 64, "layers": 2, "heads": 4, "inter": 192, "vocab": 512},
    # GPT-2 shaped, ~10M parameters with the (tied) embeddings: 8·12·256² + 8192·256 + 256·256.
    "gpt2-10m": {"arch": "gpt2", "hidden": 256, "layers": 8, "heads": 4, "inter": 1024, "vocab": 8192},
    # Llama-shaped, untied embeddings, vocab 8192: 8.4 M (4·(4·256² + 3·256·1024) + 2·8192·256) and
    # 28.8 M (6·(4·512² + 3·512·1536) + 2·8192·512) parameters; the GRPO benchmark's two CPU scales.
    "llama-8m": {"arch": "llama", "hidden": 256, "layers": 4, "heads": 4, "inter": 1024, "vocab": 8192},
    "llama-30m": {"arch": "llama", "hidden": 512, "layers": 6, "heads": 8, "inter": 1536, "vocab": 8192},
    # GPU scales, Pythia-shaped (GPT-NeoX: rotary on 25 % of each head, parallel residual, untied
    # embeddings, vocab 50304), random init: 162 M / 405 M / 1.01 B parameters.
    "pythia-160m": {"arch": "neox", "hidden": 768, "layers": 12, "heads": 12, "inter": 3072, "vocab": 50304},
    "pythia-410m": {"arch": "neox", "hidden": 1024, "layers": 24, "heads": 16, "inter": 4096, "vocab": 50304},
    "pythia-1b": {"arch": "neox", "hidden": 2048, "layers": 16, "heads": 8, "inter": 8192, "vocab": 50304},
    # The GPU scales' architecture at toy size: CI runs every row of the harness on it (bf16, CPU)
    # so the GPT-NeoX path is exercised without a GPU. Not a benchmark.
    "neox-tiny": {"arch": "neox", "hidden": 64, "layers": 2, "heads": 4, "inter": 256, "vocab": 512},
}


@dataclass
class HParams:
    """PPO settings, mapped one to one onto TRL's PPOConfig and ours (see the runners)."""
    batch_size: int = 16  # episodes per rollout (TRL: per_device_train_batch_size, grad accum 1)
    num_mini_batches: int = 2  # TRL: num_mini_batches
    ppo_epochs: int = 2  # TRL: num_ppo_epochs
    response_length: int = 24  # max new tokens (TRL: response_length)
    temperature: float = 0.7  # TRL's default
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    clip_range: float = 0.2  # TRL: cliprange
    clip_range_value: float = 0.2  # TRL: cliprange_value
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    lr: float = 3e-6  # TRL's default; linear decay to 0 over the run in both
    iterations: int = 4  # rollout + update iterations
    seed: int = 0
    group_size: int = 1  # samples per prompt (GRPO: TRL's num_generations)
    max_prompt_length: int = 32
    device: str = "cpu"  # where both trainers run: "cpu" or "cuda"
    dtype: str = "fp32"  # weights and compute of every model in both: "fp32" or "bf16"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.dtype]


def load_model(cls: Any, path: str, hp: HParams, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path)`` in the run's dtype (the same weights for both trainers)."""
    return cls.from_pretrained(path, dtype=hp.torch_dtype, **kwargs)


def sync(hp: HParams) -> None:
    """Wait for queued CUDA work, so a wall-clock reading covers it (no-op on CPU)."""
    if hp.device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# Artifacts: tokenizer + models saved once, loaded by every run
# ----------------------------------------------------------------------------------------------
def bench_tokenizer(vocab: int, seed: int = 0):
    """Byte-level BPE trained locally on the task corpus, padded out to ``vocab`` with pseudo-words.

    The task corpus alone yields ~535 tokens; the pseudo-words give the 8192-vocab scale a real
    vocabulary, so decoded text re-encodes to about the same length (ours re-tokenizes for the RM).
    """
    from rlhf_core.data.movie_reviews import generate_task
    from rlhf_core.data.tokenizer import train_tokenizer
    texts = list(generate_task(seed=seed).corpus)
    if vocab > 600:
        rng = random.Random(seed)
        letters = "abcdefghijklmnopqrstuvwxyz"
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(vocab)]
        texts += [" ".join(rng.choice(words) for _ in range(12)) for _ in range(6 * vocab)]
    return train_tokenizer(texts, vocab_size=vocab)


def model_configs(scale: str, tok) -> tuple[Any, Any]:
    """(causal-LM config, sequence-classifier config with num_labels=1) of the same architecture."""
    s = SCALES[scale]
    vocab = max(len(tok), s["vocab"])
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    if s["arch"] == "neox":
        from transformers import GPTNeoXConfig
        make = lambda: GPTNeoXConfig(vocab_size=vocab, hidden_size=s["hidden"], num_hidden_layers=s["layers"],  # noqa: E731
                                     num_attention_heads=s["heads"], intermediate_size=s["inter"],
                                     max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True,
                                     hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False, **ids)
    elif s["arch"] == "llama":
        from transformers import LlamaConfig
        make = lambda: LlamaConfig(vocab_size=vocab, hidden_size=s["hidden"], num_hidden_layers=s["layers"],  # noqa: E731
                                   num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                                   intermediate_size=s["inter"], max_position_embeddings=256,
                                   tie_word_embeddings=False, **ids)
    else:
        from transformers import GPT2Config
        make = lambda: GPT2Config(vocab_size=vocab, n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],  # noqa: E731
                                  n_inner=s["inter"], n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, **ids)
    lm_cfg, cls_cfg = make(), make()
    cls_cfg.num_labels = 1
    return lm_cfg, cls_cfg


def prepare_artifacts(scale: str, out: Path, seed: int = 0, policy_state: dict | None = None) -> dict[str, str]:
    """Save tokenizer/, policy/, reward/, value/ under ``out`` from one seed; returns their paths.

    The reference is the policy folder loaded a second time (PPO starts with π = π_ref).
    ``policy_state`` (e.g. a warm-started policy) replaces the random policy weights.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    out.mkdir(parents=True, exist_ok=True)
    tok = bench_tokenizer(SCALES[scale]["vocab"], seed)
    tok.save_pretrained(out / "tokenizer")
    lm_cfg, cls_cfg = model_configs(scale, tok)
    paths = {"tokenizer": str(out / "tokenizer")}
    for i, (name, cfg, cls) in enumerate([("policy", lm_cfg, AutoModelForCausalLM),
                                          ("reward", cls_cfg, AutoModelForSequenceClassification),
                                          ("value", cls_cfg, AutoModelForSequenceClassification)]):
        torch.manual_seed(seed * 1000 + i)  # one seed, a distinct stream per model
        model = cls.from_config(cfg)
        if name == "policy" and policy_state is not None:
            model.load_state_dict(policy_state)
        model.save_pretrained(out / name)
        paths[name] = str(out / name)
    return paths


def n_params(path: str) -> int:
    from transformers import AutoModelForCausalLM
    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())


def task_prompts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training prompts, held-out eval prompts) of the embedded movie-review task."""
    from rlhf_core.config import TaskConfig
    from rlhf_core.data.movie_reviews import generate_task
    task = generate_task(TaskConfig(n_prompts=max(n, 1)), seed=seed)
    return task.prompts[:n], task.eval_prompts


# ----------------------------------------------------------------------------------------------
# Warm start for the learning curves: a random policy writes byte soup that the gold judge
# scores -1 whatever PPO does, so both trainers start from the same briefly supervised policy.
# ----------------------------------------------------------------------------------------------
def warm_start_policy(policy_path: str, tok_path: str, steps: int, seed: int = 0, lr: float = 3e-3) -> dict:
    """A few hundred CLM steps on the task's SFT pairs; returns the new policy state dict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from rlhf_core.data.movie_reviews import generate_task
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tok_path)
    model = AutoModelForCausalLM.from_pretrained(policy_path)
    docs = [r["prompt"] + r["completion"] + tok.eos_token for r in generate_task(seed=seed).sft]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        enc = tok(rng.sample(docs, 32), return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)  # (B, L)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------
@dataclass
class PhaseTimer:
    """Wall seconds per phase; nested phases are not double counted (the outer one wins)."""
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    _depth: int = 0

    cuda: bool = False  # synchronize at phase boundaries, so a phase owns the GPU work it queued

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._depth += 1
        if self.cuda and self._depth == 1:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                if self.cuda:
                    torch.cuda.synchronize()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def wrap(self, fn: Callable, name: str | Callable[..., str | None]) -> Callable:
        """``fn`` timed under ``name`` (or under ``name(*args)``; None means: not timed)."""
        def timed(*args, **kwargs):
            label = name(*args, **kwargs) if callable(name) else name
            if label is None:
                return fn(*args, **kwargs)
            with self.phase(label):
                return fn(*args, **kwargs)
        return timed

    def add(self, key: str, n: float) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + n


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, with the number of cores torch uses."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    return f"{name}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()})"


def result_record(framework: str, row: str, scale: str, hp: HParams, timer: PhaseTimer, wall: float,
                  cpu: float, curve: list[tuple[int, float]]) -> dict[str, Any]:
    """The JSON one worker writes: throughput from measured wall time and counted episodes/tokens.

    ``cpu`` is the process CPU time (all threads) of the training loop: on a VM shared with other
    jobs it moves far less than wall time, so the ratios are also reported per CPU second.
    """
    episodes = hp.iterations * hp.batch_size
    tokens = timer.counts.get("response_tokens", 0.0)
    gen, scoring = timer.seconds.get("generation", 0.0), timer.seconds.get("scoring", 0.0)
    return {
        "framework": framework, "row": row, "scale": scale, "hparams": hp.to_dict(),
        "wall_s": wall, "cpu_s_train": cpu, "episodes": episodes, "response_tokens": tokens,
        "episodes_per_s": episodes / wall, "tokens_per_s": tokens / wall,
        "time": {"generation": gen, "scoring": scoring, "update": wall - gen - scoring,
                 "gc": timer.seconds.get("gc", 0.0)},  # gc.collect calls, part of "update"
        "peak_rss_mb": peak_rss_mb(), "curve": curve,
        # GPU: the caching allocator's peak of live tensors (what the memory target reads)
        **({"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2 ** 20} if hp.device == "cuda" else {}),
    }
