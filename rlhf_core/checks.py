"""Invariant checks of a PPO run: cheap ``check/*`` metrics logged every iteration (computed by the
trainer) and the tolerance past which each is a problem. The trainer warns once per check when it
breaks; the run report lists every check with its verdict (``report.write_report``).

What each one catches:
- ``check/first_ratio_dev``: max |ρ − 1| on the first minibatch of the first epoch. No weight has
  changed yet, so ρ must be 1: anything else means the training forward is not the policy that
  sampled (dropout on, a stale or differently-loaded policy, precision).
- ``check/logprob_gap``: mean |log π_rollout − log π_train| over the same tokens: the
  rollout/trainer mismatch (sampling-loop states vs the training forward; in other engines a
  separate inference engine) that biases the ratio.
- ``check/truncated_fraction``: responses cut at ``response_length`` without an EOS: their score
  judges unfinished text.
- ``val/explained_variance``: over the second half of the run, a critic that explains nothing of the
  returns (mean ≤ 0) gives GAE a noise baseline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class Check:
    """A metric, the threshold it must stay under (``above=True``) or over, and where it comes from."""
    metric: str
    threshold: float
    above: bool  # breached when the value is above the threshold (else: below)
    second_half_mean: bool  # judged on the mean over the run's second half, not per iteration
    source: str  # the function that computes the metric
    meaning: str

    def breached(self, value: float) -> bool:
        return value > self.threshold if self.above else value < self.threshold


CHECKS = (
    Check("check/first_ratio_dev", 1e-2, True, False, "ppo.trainer.PPOTrainer.minibatch_step",
          "the first update's ratio is not 1: the training forward is not the sampling policy"),
    Check("check/logprob_gap", 1e-3, True, False, "ppo.trainer.PPOTrainer.minibatch_step",
          "rollout and training logprobs of the same tokens differ"),
    Check("check/truncated_fraction", 0.5, True, False, "ppo.trainer.PPOTrainer.step",
          "most responses hit response_length without an EOS"),
    Check("val/explained_variance", 0.0, False, True, "ppo.losses.explained_variance",
          "the critic explains none of the returns' variance in the second half of the run"),
)


@dataclass(frozen=True)
class Breach:
    check: Check
    iteration: int  # the first breaching iteration (per-iteration checks) or the last one seen
    value: float

    def line(self) -> str:
        where = "mean over the second half, up to" if self.check.second_half_mean else "first at"
        side = ">" if self.check.above else "<"
        return (f"{self.check.metric} = {self.value:.4g} {side} {self.check.threshold:g} ({where} iteration "
                f"{self.iteration}; {self.check.source}): {self.check.meaning}")


def step_breaches(metrics: dict[str, Any], iteration: int) -> list[Breach]:
    """The per-iteration checks this iteration's metrics break."""
    return [Breach(c, iteration, float(metrics[c.metric])) for c in CHECKS
            if not c.second_half_mean and isinstance(metrics.get(c.metric), (int, float))
            and c.breached(float(metrics[c.metric]))]


def find_breaches(records: Iterable[dict[str, Any]], num_iterations: int | None = None) -> list[Breach]:
    """Every check's first breach in a PPO run's logged records (``{"step": it, metric: value}``);
    the second-half checks over the records past ``num_iterations / 2`` (default: the last step)."""
    records = sorted((r for r in records if isinstance(r.get("step"), int)), key=lambda r: r["step"])
    if not records:
        return []
    half = (num_iterations or records[-1]["step"]) / 2
    found: list[Breach] = []
    for c in CHECKS:
        pts = [(r["step"], float(r[c.metric])) for r in records if isinstance(r.get(c.metric), (int, float))]
        if c.second_half_mean:
            late = [v for s, v in pts if s > half]
            if late and c.breached(sum(late) / len(late)):
                found.append(Breach(c, pts[-1][0], sum(late) / len(late)))
        else:
            first = next(((s, v) for s, v in pts if c.breached(v)), None)
            if first:
                found.append(Breach(c, first[0], first[1]))
    return found
