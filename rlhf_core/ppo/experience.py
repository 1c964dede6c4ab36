"""Experience: one batch of rollouts, every tensor with its shape and meaning.

Made by ``rollout.py`` (generate + score, no grad) and ``experience_maker.py`` (rewards, advantages),
consumed by the PPO update through ``RolloutBuffer``. Keeping experience making separate from
training (as OpenRLHF's experience_maker does) lets each half be tested alone.

Shapes: B = rows (episodes), Tq = prompt length (left-padded), T = response length
(right-padded). Fields filled later in the iteration default to None.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["Experience"]

# Fields padded on the left when concatenating rollouts of different lengths (prompts are
# left-padded so generation starts at the same column); every other 2-D field on the right.
_LEFT_PADDED = ("query_ids", "query_mask")
_PER_ROW = ("scores", "group_ids", "kl_coef")  # (B,) fields


@dataclass
class Experience:
    """A batch of rollouts. Rows are episodes; ``len(exp)`` is B.

    Fields (shape, meaning):
        query_ids:     (B, Tq) int64   prompt token ids, left-padded
        query_mask:    (B, Tq) bool    1 on real prompt tokens
        response_ids:  (B, T)  int64   sampled response token ids a_t, right-padded
        mask:          (B, T)  bool    1 on response tokens through the EOS (or truncation point)
        logprobs:      (B, T)  float   log π_old(a_t|s_t): the trainer's policy before the update (without a
                                       rollout correction, read from the sampling loop: π_old = μ)
        ref_logprobs:  (B, T)  float   log π_ref(a_t|s_t)
        scores:        (B,)    float   sequence-level reward-function / reward-model score
        values:        (B, T)  float   V_old(s_t) from the value head (None without a critic)
        rewards:       (B, T)  float   per-token rewards: −kl_coef·kl (where the penalty is in the
                                       reward), + score on the last token
        kl:            (B, T)  float   per-token KL(π_old‖π_ref) the penalty uses (ppo.kl_estimator), 0 on padding
        advantages:    (B, T)  float   A_t (whitened or not), 0 on padding
        returns:       (B, T)  float   value targets R_t, 0 on padding
        kl_exact:      (B, T)  float   exact KL(π_old(·|s_t)‖π_ref(·|s_t)) over the whole vocabulary,
                                       0 on padding (always measured at rollout, whatever the penalty uses)
        group_ids:     (B,)    int64   which prompt of the iteration each row answers (a group's rows share it)
        loss_mask:     (B, T)  bool    the tokens the loss terms count: ``mask`` less what is filtered out
                                       (overlong filtering: truncated responses); None: ``mask``
        kl_coef:       (B,)    float   the KL loss term's weight of each row: β scaled like the row's return
                                       in its advantage (objective.py); None without a KL loss term
        behavior_logprobs: (B, T) float log μ(a_t|s_t), the policy that sampled (the rollout engine's);
                                       None when it is π_old itself (no rollout correction)
        correction_weights: (B, T) float w_t, the rollout correction's detached weight of each token's policy
                                       term (correction.py; from π_old and μ); None without a correction
    """

    query_ids: torch.Tensor  # (B, Tq)
    query_mask: torch.Tensor  # (B, Tq)
    response_ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T)
    logprobs: torch.Tensor  # (B, T)
    ref_logprobs: torch.Tensor  # (B, T)
    scores: torch.Tensor  # (B,)
    values: torch.Tensor | None = None  # (B, T)
    rewards: torch.Tensor | None = None  # (B, T)
    kl: torch.Tensor | None = None  # (B, T)
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T)
    kl_exact: torch.Tensor | None = None  # (B, T)
    group_ids: torch.Tensor | None = None  # (B,)
    loss_mask: torch.Tensor | None = None  # (B, T)
    kl_coef: torch.Tensor | None = None  # (B,)
    behavior_logprobs: torch.Tensor | None = None  # (B, T)
    correction_weights: torch.Tensor | None = None  # (B, T)

    def __post_init__(self) -> None:
        # Catch a (B, T) / (B, T+1) off-by-one at construction, not as a broadcast deep in a loss.
        B, T = self.mask.shape
        for f in fields(self):
            t = getattr(self, f.name)
            if t is None:
                continue
            if f.name in _LEFT_PADDED:
                ok = t.dim() == 2 and t.shape[0] == B and t.shape == self.query_ids.shape
            elif f.name in _PER_ROW:
                ok = t.shape == (B,)
            else:
                ok = t.shape == (B, T)
            if not ok:
                raise ValueError(f"Experience.{f.name} has shape {tuple(t.shape)}; mask is {(B, T)}")

    @property
    def loss_tokens(self) -> torch.Tensor:
        """The mask the loss terms aggregate over: ``loss_mask``, or ``mask`` when nothing is filtered."""
        return self.mask if self.loss_mask is None else self.loss_mask

    def __len__(self) -> int:
        return self.mask.shape[0]

    def _map(self, fn) -> "Experience":
        changed = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: fn(t) for k, t in changed.items() if t is not None})

    def to(self, device: torch.device | str) -> "Experience":
        """A copy with every tensor moved to ``device``."""
        return self._map(lambda t: t.to(device))

    def index(self, idx: torch.Tensor | slice | Sequence[int]) -> "Experience":
        """Select rows.

        Args:
            idx: a slice, a list of row numbers, or a 1-D int64/bool tensor (any device).

        Returns:
            A new Experience with the selected rows, in the order given.
        """
        if not isinstance(idx, slice):
            idx = torch.as_tensor(idx, device=self.mask.device)
        return self._map(lambda t: t[idx])

    @classmethod
    def cat(cls, exps: Sequence["Experience"]) -> "Experience":
        """Concatenate along rows, padding to the longest prompt / response.

        Prompts are padded on the left and responses on the right, with 0 (ids, masks and
        floats alike; the masks mark the padding). A field that is None in any input is
        None in the result.

        Raises:
            ValueError: empty list.
        """
        if not exps:
            raise ValueError("Experience.cat needs at least one Experience")
        out = {}
        for f in fields(cls):
            ts = [getattr(e, f.name) for e in exps]
            if any(t is None for t in ts):
                out[f.name] = None
                continue
            if ts[0].dim() == 2:
                width = max(t.shape[1] for t in ts)
                left = f.name in _LEFT_PADDED
                ts = [F.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1])) for t in ts]
            out[f.name] = torch.cat(ts, dim=0)
        return cls(**out)
