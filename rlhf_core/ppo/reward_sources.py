"""Reward sources: anything that maps (prompts, responses) to one float per response.

``make_reward_fn(spec, policy_tokenizer, task=...)`` accepts
- a Python callable ``(list[str], list[str]) -> list[float]`` (used as is);
- ``"gold"``: the task's judge (default: the embedded movie-review task's,
  :func:`rlhf_core.data.movie_reviews.gold_reward`);
- ``"path/to/file.py:function"``: a function in the user's own Python file;
- a folder holding a reward model or any HF sequence classifier (``num_labels=1``) with its
  *own* tokenizer: the policy's text is decoded, then re-encoded with the reward model's
  tokenizer, so the two need not share a vocabulary (TRL issues #1979, #3595).

:func:`checked_reward` wraps any source so that an exception, a NaN/inf or a wrong number of
scores becomes a one-line :class:`RewardError` naming the batch — raised before the update, so
the weights stay unchanged.
"""
from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..data import movie_reviews
from ..data.batching import chunks, pad
from ..data.tasks import Task
from ..errors import ConfigError, RewardError
from ..models import load_reward_model, module_device
from ..user_code import is_user_spec, load_user_function

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
TextFormat = Callable[[list[str], list[str]], tuple[list[str], list[str]]]


# The reward model's encoding, shared with its training (``phases/reward_model.py``), so PPO
# scores exactly the text layout the model was trained on.
def encode_for_reward(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str],
                      max_length: int) -> list[list[int]]:
    """Token ids of ``prompt + response`` (+ EOS) for each pair, truncated on the right to
    ``max_length`` (the EOS is kept as the last token so the head reads the end of the text)."""
    texts = [p + r for p, r in zip(prompts, responses)]
    eos = tokenizer.eos_token_id
    ids = tokenizer(texts, truncation=True, max_length=max_length - (eos is not None))["input_ids"]
    return [s + [eos] if eos is not None and (not s or s[-1] != eos) else s for s in ids]


def reward_forward(model: torch.nn.Module, seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Scalar rewards for token sequences (right padded in one batch).  Returns (B,) float."""
    dev = module_device(model)
    input_ids = pad(seqs, pad_id).to(dev)                           # (B, T)
    attention_mask = pad([[1] * len(s) for s in seqs], 0).to(dev)   # (B, T)
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()


@torch.no_grad()
def reward_scores(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str],
          max_length: int = 256, batch_size: int = 64) -> torch.Tensor:
    """Reward-model scores of (prompt, response) pairs, the encoding used in training.  Returns (B,)."""
    seqs = encode_for_reward(tokenizer, prompts, responses, max_length)
    return torch.cat([reward_forward(model, [seqs[i] for i in idx], tokenizer.pad_token_id)
                      for idx in chunks(len(seqs), batch_size)])


class RewardModelScorer:
    """A sequence classifier as a reward: text in, the scalar logit out.

    Encoding: :func:`encode_for_reward` (the text ``prompt + response`` in the reward model's
    tokenizer, EOS appended, right padded), the reward phase's own, so PPO scores exactly what the
    reward model was trained on.

    Args:
        model: ``AutoModelForSequenceClassification`` with ``num_labels=1``.
        tokenizer: the reward model's own tokenizer.
        batch_size: texts per forward pass.
        max_length: longest input in the reward model's tokens (longer ones keep their start).
        text_format: ``(prompts, responses) -> (prompts, responses)`` applied first, when the
            reward model was trained on another layout than the policy's text (a task's
            ``reward_text``).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int = 64, max_length: int = 256,
                 text_format: TextFormat | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.text_format = text_format

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Scores of ``prompt + response`` for each pair."""
        if self.text_format is not None:
            prompts, responses = self.text_format(prompts, responses)
        return reward_scores(self.model, self.tokenizer, prompts, responses, self.max_length,
                             self.batch_size).tolist()


def chat_text_format(conversations: dict[str, list[dict]], tokenizer: Any,
                     then: TextFormat | None = None) -> TextFormat:
    """(prompts, responses) in a reward model's own format when the prompts were conversations.

    For a prompt in ``conversations`` (rendered policy text -> its {role, content} turns): with a
    chat template in the reward model's ``tokenizer``, the prompt is the conversation rendered with
    the generation prompt and the response is what the template adds for an assistant turn holding
    the stripped response (the layout ``loaders.messages_to_prompt_completion`` gives SFT data); without one, the
    turns' contents joined by newlines, then the response as it is. Other prompts pass unchanged to
    ``then`` (e.g. a task's ``reward_text``), if given.
    """
    def fmt(prompts: list[str], responses: list[str]) -> tuple[list[str], list[str]]:
        ps, rs = [], []
        for p, r in zip(prompts, responses):
            turns = conversations.get(p)
            if turns is None:
                q, a = then([p], [r]) if then is not None else ([p], [r])
            else:
                q, a = [[x] for x in chat_pair(tokenizer, turns, r)]
            ps.append(q[0]), rs.append(a[0])
        return ps, rs
    return fmt


def chat_pair(tokenizer: Any, turns: list[dict], response: str) -> tuple[str, str]:
    """(prompt text, response text) of a conversation and its answer as a reward model reads them:
    with a chat template, the turns rendered with the generation prompt, then what the template adds
    for an assistant turn holding the stripped response; without one, the turns' contents joined by
    newlines, then the response as it is. Shared by PPO's scoring and the reward phase's training."""
    if not getattr(tokenizer, "chat_template", None):
        return "\n".join(t["content"] for t in turns) + "\n", response
    prefix = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": response.strip()}], tokenize=False)
    return prefix, full[len(prefix):].rstrip() if full.startswith(prefix) else response


def takes_dataset_columns(fn: Callable[..., Any]) -> bool:
    """True for a reward written to TRL's contract, ``fn(prompts, completions, **kwargs)``: it takes
    ``completions`` or ``**kwargs``. Such a function is called with keywords: ``prompts``, ``completions``
    and the dataset's other columns; a two-argument ``fn(prompts, responses)`` is called as before."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD or p.name == "completions" for p in params)


def with_dataset_columns(fn: Callable[..., Any], columns: dict[str, dict[str, Any]],
                         conversations: dict[str, list[dict]] | None = None) -> Callable[..., Any]:
    """``fn`` called the way TRL's GRPOTrainer calls its ``reward_funcs`` (when ``takes_dataset_columns``):
    ``fn(prompts=..., completions=..., **columns)``, each column a list with one value per response (the
    value of the prompt's record; None where a record lacks it). A conversational prompt arrives as its
    list of turns and its completion as ``[{"role": "assistant", "content": text}]``, as TRL passes them;
    a plain prompt and its completion as strings. Other functions are returned as they are.

    Args:
        columns: rendered prompt text -> that record's other columns (``phases.ppo.load_prompts``).
        conversations: rendered prompt text -> its turns, for the conversational prompts.
    """
    if not takes_dataset_columns(fn):
        return fn
    conversations = conversations or {}

    def call(prompts: list[str], responses: list[str]) -> Any:
        rows = [columns.get(p, {}) for p in prompts]
        names = sorted(set().union(*rows)) if rows else []
        turns = [conversations.get(p) for p in prompts]
        return fn(prompts=[t if t is not None else p for t, p in zip(turns, prompts)],
                  completions=[[{"role": "assistant", "content": r}] if t is not None else r
                               for t, r in zip(turns, responses)],
                  **{name: [row.get(name) for row in rows] for name in names})
    call.__name__ = getattr(fn, "__name__", "reward")
    return call


class RewardSet:
    """Several reward functions, each checked on its own (``checked_reward``), combined as TRL combines
    ``reward_funcs`` with ``reward_weights``: score = Σ_i w_i·r_i. ``last`` holds each one's mean on the
    last batch (the trainer logs them as ``objective/reward/NAME``)."""

    def __init__(self, fns: list[tuple[str, RewardFn]], weights: list[float]):
        self.parts = [(name, checked_reward(fn, f"reward {name}")) for name, fn in fns]
        self.weights = weights
        self.last: dict[str, float] = {}

    def __call__(self, prompts: list[str], responses: list[str], batch_index: int = 0) -> torch.Tensor:
        total = torch.zeros(len(responses))
        for (name, fn), w in zip(self.parts, self.weights):
            scores = fn(prompts, responses, batch_index)
            self.last[name] = float(scores.mean())
            total = total + w * scores
        return total


def make_reward_fn(spec: str | RewardFn, policy_tokenizer: Any = None, device: str | torch.device = "cpu",
                   batch_size: int = 64, task: Task | None = None, weights: list[float] | None = None,
                   adapt: Callable[[RewardFn], RewardFn] | None = None) -> RewardFn:
    """Turn a reward spec into a callable ``(prompts, responses) -> list[float]``.

    Args:
        spec: a callable, ``"gold"``, ``"file.py:function"``, or a reward-model / classifier folder.
        policy_tokenizer: the policy's tokenizer (kept for sources that need it; a reward model
            always uses its own).
        device: where a reward model runs.
        task: the task whose judge ``"gold"`` means and whose ``reward_text`` layout a reward
            model reads (default: the movie-review task's judge, the policy's text as it is).
    Raises:
        ConfigError: an empty spec, a missing file/function or a folder that is not a model.
    """
    adapt = adapt or (lambda fn: fn)
    if callable(spec):
        return adapt(spec)
    if not spec:
        raise ConfigError("ppo.reward is empty: give a reward-model folder, 'gold' or 'file.py:function'")
    specs = split_reward_spec(spec)
    if len(specs) > 1 or weights:
        weights = list(weights) if weights else [1.0] * len(specs)
        if len(weights) != len(specs):
            raise ConfigError(f"ppo.reward_weights: {len(weights)} weights for {len(specs)} reward sources")
        fns = [(Path(s.rpartition(":")[2] if is_user_spec(s) else s).name,
                make_reward_fn(s, policy_tokenizer, device, batch_size, task, adapt=adapt)) for s in specs]
        return RewardSet(fns, weights)
    if spec == "gold":
        return task.gold_reward if task is not None else movie_reviews.gold_reward
    if is_user_spec(spec):
        return adapt(load_user_function(spec, "reward"))
    model, tokenizer = load_reward_model(spec)
    return RewardModelScorer(model.to(device), tokenizer, batch_size=batch_size,
                             text_format=task.reward_text if task is not None else None)


def split_reward_spec(spec: str) -> list[str]:
    """``"a.py:f,rm_folder"`` -> ["a.py:f", "rm_folder"]: several reward sources, comma-separated."""
    return [part.strip() for part in spec.split(",") if part.strip()]


def checked_reward(fn: RewardFn, name: str = "reward") -> Callable[..., torch.Tensor]:
    """Wrap a reward source: returns a float32 (B,) tensor or raises a one-line RewardError.

    The wrapper takes ``(prompts, responses, batch_index=0)``; the index (the PPO iteration or
    the evaluation batch) is named in the error so a user can find the offending rollout, and
    ``name`` says which source it was ("reward", "gold").
    """
    def call(prompts: list[str], responses: list[str], batch_index: int = 0) -> torch.Tensor:
        try:
            raw = fn(prompts, responses, batch_index) if isinstance(fn, RewardSet) else fn(prompts, responses)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"{name} batch {batch_index}: the {name} raised {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
        try:
            values = [float(v) for v in (raw.tolist() if hasattr(raw, "tolist") else raw)]
        except (TypeError, ValueError):
            raise RewardError(f"{name} batch {batch_index}: expected a list of floats, "
                              f"got {type(raw).__name__}") from None
        if len(values) != len(responses):
            raise RewardError(f"{name} batch {batch_index}: expected {len(responses)} scores, got {len(values)}")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise RewardError(f"{name} batch {batch_index}: non-finite score {values[bad[0]]} for response "
                              f"{bad[0]} ({len(bad)} of {len(values)} non-finite)")
        return torch.tensor(values, dtype=torch.float32)  # (B,)

    call.source = fn  # type: ignore[attr-defined] (a RewardSet's per-source means: the trainer logs them)
    return call
