"""What can go wrong in a PPO run, read from its metrics: invariant checks and health flags.

The trainer logs cheap ``check/*`` metrics every iteration, warns once when a per-iteration check
breaks (:func:`step_breaches`), and the run report lists every check with its verdict
(:func:`find_breaches`, ``report.write_report``'s "Health" section; ``rlhf report DIR`` re-reads a
finished, running or killed run). Each check names the metric, its threshold, the iteration and the
function that computes the metric.

Invariants of the PPO core:
- ``check/first_ratio_dev``: max |ρ − 1| on the first minibatch of the first epoch. No weight has
  changed yet, so ρ must be 1: anything else means the training forward is not the policy that
  sampled (dropout on, a stale or differently-loaded policy, precision).
  Under bf16 autocast (``check/bf16`` = 1) both invariants are judged at looser thresholds (0.25, 0.05):
  bf16 rounds differently for every batch shape, so two forwards of the same tokens differ (measured on
  the demo: max |ρ − 1| up to 0.10, mean |Δ log π| 0.014; the "BF16 mismatch", arXiv 2510.26788).
- ``check/logprob_gap``: mean |log π_rollout − log π_train| over the same tokens: the
  rollout/trainer mismatch (sampling-loop states vs the training forward; in other engines a
  separate inference engine) that biases the ratio. With ``ppo.rollout_correction`` it is μ (the
  sampler's logprobs) against π_old (the trainer's forward) over the rollout, with its max in
  ``check/logprob_gap_max`` (docs/rollout.md).
- ``check/truncated_fraction``: responses cut at ``response_length`` without an EOS: their score
  judges unfinished text.
- ``perf/skipped_steps``: optimizer steps skipped for a non-finite loss or gradient (the count so far).
Health of the optimisation:
- ``policy/clipfrac`` above 0.3: steps too large for the trust region.
- ``policy/entropy`` below a tenth of its first value: entropy collapse.
- ``val/explained_variance`` below 0 over the second half of the run: a critic that explains nothing.
- ``objective/kl_exact`` running away: over the last quarter at least twice the second quarter's
  mean, and above 1 nat.
- ``eval/gold_reward`` falling from its best evaluation to the last by more than 0.05 while
  ``eval/scores`` rises over the same span: reward hacking; only when a gold judge exists and has at
  least two evaluations (:func:`unjudged` says so otherwise).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class Check:
    """A metric, how it is judged (``mode``) against ``threshold``, and where it comes from.

    Modes: ``above`` / ``below`` (any iteration; the trainer also warns live), ``second_half_mean_below``,
    ``below_fraction_of_first``, ``growth`` (last-quarter mean ≥ threshold × second-quarter mean and ≥ 1),
    ``hacking`` (from its best evaluation to the last, this metric, the gold reward, fell by more than
    ``threshold`` while the reward source's eval score rose).
    """
    metric: str
    threshold: float
    mode: str
    source: str  # the function that computes the metric
    meaning: str
    bf16_threshold: float | None = None  # under bf16 autocast (its own rounding moves the invariants)

    def limit(self, bf16: bool = False) -> float:
        """The threshold in force: ``bf16_threshold`` for an iteration trained under bf16 (``check/bf16``)."""
        return self.bf16_threshold if bf16 and self.bf16_threshold is not None else self.threshold

    @property
    def per_iteration(self) -> bool:
        return self.mode in ("above", "below")

    def held(self) -> str:
        """What holding this check means, in words (the report's "ok" lines)."""
        t = f"{self.threshold:g}"
        return {"above": f"stayed <= {t}", "below": f"stayed >= {t}",
                "second_half_mean_below": f"mean over the second half >= {t}",
                "below_fraction_of_first": f"stayed >= {t} x its first value",
                "growth": f"did not run away (last quarter < {t} x the second quarter's mean, or < 1 nat)",
                "hacking": f"did not fall by more than {t} from its best while the reward source's score rose",
                }[self.mode]

    def breached(self, value: float, bf16: bool = False) -> bool:
        t = self.limit(bf16)
        return value > t if self.mode == "above" else value < t


CHECKS = (
    Check("check/first_ratio_dev", 1e-2, "above", "ppo.trainer.PPOTrainer.minibatch_step",
          "the first update's ratio is not 1: the training forward is not the sampling policy", 0.25),
    Check("check/logprob_gap", 1e-3, "above", "ppo.trainer.PPOTrainer.minibatch_step or, with a rollout "
          "correction, ppo.experience_maker.apply_rollout_correction",
          "rollout and training logprobs of the same tokens differ", 0.05),
    Check("check/truncated_fraction", 0.5, "above", "ppo.trainer.PPOTrainer.step",
          "most responses hit response_length without an EOS"),
    Check("perf/skipped_steps", 0.0, "above", "optim.finish_step",
          "optimizer steps were skipped for a non-finite loss or gradient (count so far; weights untouched)"),
    Check("policy/clipfrac", 0.3, "above", "ppo.losses.policy_loss",
          "the clip is active on many tokens: updates too large for the trust region (lower the learning rate)"),
    Check("policy/entropy", 0.1, "below_fraction_of_first", "ppo.losses.entropy_bonus",
          "entropy collapse: the policy became nearly deterministic"),
    Check("val/explained_variance", 0.0, "second_half_mean_below", "ppo.losses.explained_variance",
          "the critic explains none of the returns' variance in the second half of the run"),
    Check("objective/kl_exact", 2.0, "growth", "kernels.fused_logprobs_kl (ppo.rollout.score)",
          "the KL to the reference is running away (raise kl_coef or use adaptive_kl)"),
    Check("eval/gold_reward", 0.05, "hacking", "ppo.rollout.evaluate",
          "reward hacking: the reward source's score rose while the gold reward fell"),
)


@dataclass(frozen=True)
class Breach:
    check: Check
    iteration: int  # the first breaching iteration, or the last one the verdict covers
    value: float
    bf16: bool = False  # judged against the bf16 threshold

    def line(self) -> str:
        c = self.check
        t = f"{c.limit(self.bf16):g}" + (" under bf16" if self.bf16 and c.bf16_threshold is not None else "")
        how = {"above": f"> {t} (first at iteration {self.iteration}",
               "below": f"< {t} (first at iteration {self.iteration}",
               "second_half_mean_below": f"< {c.threshold:g} (mean over the second half, to iteration {self.iteration}",
               "below_fraction_of_first": f"< {c.threshold:g} x its first value (first at iteration {self.iteration}",
               "growth": f">= {c.threshold:g} x the second quarter's mean (last quarter, to iteration {self.iteration}",
               "hacking": f"fell by more than {c.threshold:g} from its best evaluation (to iteration {self.iteration}",
               }[c.mode]
        return f"{c.metric} = {self.value:.4g} {how}; {c.source}): {c.meaning}"


def step_breaches(metrics: dict[str, Any], iteration: int) -> list[Breach]:
    """The per-iteration checks this iteration's metrics break (``check/bf16``: judged at bf16's thresholds)."""
    bf16 = bool(metrics.get("check/bf16"))
    return [Breach(c, iteration, float(metrics[c.metric]), bf16) for c in CHECKS
            if c.per_iteration and isinstance(metrics.get(c.metric), (int, float))
            and c.breached(float(metrics[c.metric]), bf16)]


def warn_breaches(metrics: dict[str, Any], iteration: int, warned: set[str]) -> None:
    """Warn once per check (``warned`` holds those already warned about) for what this iteration breaks."""
    for breach in step_breaches(metrics, iteration):
        if breach.check.metric not in warned:
            warned.add(breach.check.metric)
            warnings.warn(f"ppo check: {breach.line()}", stacklevel=3)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _judge(c: Check, pts: list[tuple[int, float]], records: list[dict[str, Any]], n: int) -> Breach | None:
    """The verdict of one check on its (iteration, value) points; None when it holds."""
    if c.per_iteration:
        bf16 = {r["step"] for r in records if r.get("check/bf16")}
        first = next(((s, v) for s, v in pts if c.breached(v, s in bf16)), None)
        return Breach(c, *first, first[0] in bf16) if first else None
    if c.mode == "second_half_mean_below":
        late = [v for s, v in pts if s > n / 2]
        return Breach(c, pts[-1][0], _mean(late)) if late and _mean(late) < c.threshold else None
    if c.mode == "below_fraction_of_first":
        start = pts[0][1]
        low = next(((s, v) for s, v in pts if start > 0 and v < c.threshold * start), None)
        return Breach(c, *low) if low else None
    if c.mode == "growth":
        quarter = [v for s, v in pts if n / 4 < s <= n / 2]
        last = [v for s, v in pts if s > 3 * n / 4]
        if quarter and last and _mean(last) >= max(c.threshold * _mean(quarter), 1.0):
            return Breach(c, pts[-1][0], _mean(last))
        return None
    # hacking: from the gold reward's best evaluation to the last one, the gold fell while the reward
    # source's evaluation score rose
    scores = {r["step"]: float(r["eval/scores"]) for r in records if isinstance(r.get("eval/scores"), (int, float))}
    best_step, best = max(pts, key=lambda p: p[1])
    last_step, last = pts[-1]
    rose = best_step in scores and last_step in scores and scores[last_step] > scores[best_step]
    if rose and best - last > c.threshold:
        return Breach(c, last_step, last)
    return None


def unjudged(records: Iterable[dict[str, Any]]) -> list[str]:
    """What the health checks could not judge on these PPO records, in words: reward hacking without a gold
    judge, or from fewer than two evaluations."""
    records = list(records)
    gold = [r for r in records if isinstance(r.get("eval/gold_reward"), (int, float))]
    if not gold:
        return ["reward hacking is not checked: there is no gold judge (give --ppo.gold file.py:function, a judge "
                "the reward never sees)"]
    if len(gold) < 2:
        return [f"reward hacking is not judged: it needs two evaluations of the gold reward, there is "
                f"{len(gold)} (evaluate before training and every --ppo.eval_every iterations)"]
    return []


def find_breaches(records: Iterable[dict[str, Any]], num_iterations: int | None = None) -> list[Breach]:
    """Every check's verdict on a PPO run's logged records (``{"step": it, metric: value}``, the ppo
    phase's lines of metrics.jsonl): the breaches, in the order of ``CHECKS``. ``num_iterations``: the
    run's length (default: its last logged step), which the half and quarter windows refer to."""
    records = sorted((r for r in records if isinstance(r.get("step"), int)), key=lambda r: r["step"])
    if not records:
        return []
    n = num_iterations or records[-1]["step"]
    found = []
    for c in CHECKS:
        pts = [(r["step"], float(r[c.metric])) for r in records if isinstance(r.get(c.metric), (int, float))]
        breach = _judge(c, pts, records, n) if pts else None
        if breach:
            found.append(breach)
    return found
