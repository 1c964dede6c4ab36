"""PPO for language models: the whole loop, one iteration per ``step()``.

Every formula lives in the functional core (rewards, advantages, losses, buffer, rollout; one
micro-batch's loss in objective.py); this file only orders the calls, the way CleanRL's ppo.py
reads. To change the policy loss, register one (``losses.register_policy_loss``) and name it in
``config.policy_loss``, name a ``file.py:function`` there, or pass ``policy_loss=``; to change the
advantages, register an estimator (``register_advantage_estimator``) and name it in
``config.advantage_estimator``, or name a ``file.py:function`` there (extensions.py). ``loss_fn=``
(``config.loss_fn``) replaces the policy, value and entropy terms together. Every run logs its
invariant checks (``check/*``, rlhf_core/checks.py) and warns once when one breaks.

References: Schulman et al. 2017 (PPO); Ziegler et al. 2019 (KL-penalized RLHF, adaptive KL);
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (numbered steps below).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import checks, distributed as D, fsdp, precision, signals
from ..checkpoint import save_checkpoint
from ..config import PPOConfig
from ..errors import DataError, NumericError, RewardError, UserCodeError
from ..models import fast_activations
from ..optim import can_fuse, count_skip, finish_step, make_optimizer
from ..tracking import MeanMetrics, MetricsLogger, progress
from .advantages import AdvantageEstimator
from .buffer import RolloutBuffer, micro_batches
from .experience import Experience
from .extensions import (declared_estimator, resolve_estimator, resolve_loss_fn, resolve_policy_loss,
                         resolve_rollout_correction)
from .losses import PolicyLoss, explained_variance, first_step_invariants
from .objective import Denominators, LossFn, micro_batch_loss, ppo_loss  # noqa: F401 (ppo_loss: importable here)
from .policy import PolicyWithValue
from .reward_sources import RewardFn, checked_reward
from .rewards import AdaptiveKLController, FixedKLController
from .resume import Resumable
from .experience_maker import make_experience
from .rollout import evaluate, next_prompt_batch
from .vllm_engine import VLLMEngine, check_settings


@contextlib.contextmanager
def _naming_iteration(iteration: int) -> Iterator[None]:
    """Re-raise a UserCodeError (an estimator or loss breaking its contract) with the iteration named."""
    try:
        yield
    except UserCodeError as e:
        raise UserCodeError(f"ppo iteration {iteration}: {e}") from e


class PPOTrainer(Resumable):
    """PPO with a KL-penalized reward on an HF causal LM wrapped in :class:`PolicyWithValue`.

    Args:
        config, policy, tokenizer: PPOConfig (validated here); the trained policy, whose ``reference()``
            supplies π_ref; its tokenizer (pad distinct from EOS).
        reward_fn: ``(prompts, responses) -> list[float]`` (see ``reward_sources.make_reward_fn``).
        prompts / eval_prompts: training prompts, held-out prompts for evaluation.
        logger: MetricsLogger (metrics go under phase "ppo"); gold_fn: the true judge, if known.
        loss_fn: replaces the policy, value and entropy terms together (:func:`ppo_loss`'s keywords);
            default ``config.loss_fn`` (``file.py:function``) or none (the objective's terms).
        estimator: an advantage estimator function (declared with ``advantages.advantage_estimator``)
            used instead of the one ``config.advantage_estimator`` names.
        policy_loss: a policy-loss function (declared with ``losses.policy_loss_term``) used instead of
            the one ``config.policy_loss`` names.

    The estimator's declarations (``advantages.advantage_estimator``) decide the rest: a critic-free
    one (rloo, grpo, dr_grpo, reinforce_pp) needs a policy built with ``value_model="none"``, one with
    a critic (gae) a policy with a value head.
    """

    def __init__(self, config: PPOConfig, policy: PolicyWithValue, tokenizer: Any, reward_fn: RewardFn,
                 prompts: list[str], eval_prompts: list[str] | None = None, logger: MetricsLogger | None = None,
                 gold_fn: RewardFn | None = None, loss_fn: LossFn | None = None,
                 estimator: AdvantageEstimator | None = None, policy_loss: PolicyLoss | None = None):
        config.validate(world_size=D.world_size())  # each rank rolls out batch_size/world rows
        if not prompts:
            raise DataError("ppo.prompts", "no training prompts")
        self.estimator = resolve_estimator(config) if estimator is None else declared_estimator(estimator, config)
        self.estimator.check_policy(policy.has_critic)
        self.policy_loss = resolve_policy_loss(config, policy.has_critic, policy_loss)
        self.cfg, self.policy, self.tokenizer = config, policy, tokenizer
        self.reward = checked_reward(reward_fn)
        self.gold = checked_reward(gold_fn, "gold") if gold_fn is not None else None
        self.prompts, self.eval_prompts = list(prompts), list(eval_prompts or [])
        self.logger = logger or MetricsLogger(None)
        self.loss_fn = loss_fn or resolve_loss_fn(config)
        self.correction = resolve_rollout_correction(config, whole_loss=self.loss_fn is not None)  # None: π_old = μ
        self.kl_ctl = (AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
                       if config.adaptive_kl else FixedKLController(config.kl_coef))
        self.device = policy.lm_head_weight.device
        self.sample_gen = torch.Generator(device=self.device).manual_seed(config.seed + D.rank())  # generation
        check_settings(config)  # --ppo.rollout_engine vllm: an in-process engine per rank samples instead
        self.engine = (VLLMEngine(policy.model, config, tokenizer.eos_token_id, tokenizer.pad_token_id, policy.is_lora,
                                  self.device.type) if config.rollout_engine == "vllm" else None)
        self.shuffle_gen = torch.Generator().manual_seed(config.seed + 1)  # prompt order, minibatches
        if config.fast_activations:  # policy, reference, value trunk and a reward model's network
            fast_activations(policy, getattr(reward_fn, "model", None))
        if config.parallel == "fsdp2":  # shard before the optimizer sees the parameters
            policy.shard_fsdp2(config.mixed_precision == "bf16", config.shard_reference)
        self.sharded = fsdp.is_sharded(policy)
        self.params = policy.trainable_parameters()
        self.optimizer, self.scheduler = make_optimizer(
            self.params, config.learning_rate, config.weight_decay, config.lr_schedule, config.warmup_steps,
            config.num_iterations * config.ppo_epochs * config.num_mini_batches, eps=config.adam_eps,
            fused=can_fuse(self.params))
        self.iteration, self.skipped_steps, self.skipped_in_row, self.episodes = 0, 0, 0, 0
        self.stepped = False  # an optimizer step happened in the current iteration (resume.Resumable)
        self.warned: set[str] = set()  # checks (rlhf_core/checks.py) already warned about
        self._order: list[int] = []  # data cursor: prompt indices not yet used in this epoch
        self.train_seconds, self.evals = 0.0, {"before": {}, "last": {}}
        self.responses, self.trace = {"before": [], "last": []}, {}  # eval responses; iteration 1's tensors (docs)

    def _clock(self) -> float:
        """perf_counter after the queued GPU work is done, so each phase's time is its own."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step(self) -> dict[str, float]:
        """One PPO iteration, numbered like docs/how_ppo_works.md; returns its metrics."""
        with _naming_iteration(self.iteration + 1), precision.autocast(self.cfg, self.device):  # bf16 on one device
            cfg = self.cfg
            self.iteration += 1
            t_start = self._clock()
            # 1-7. prompts, generation (dynamic sampling), scores, logprobs, rewards, advantages (experience_maker.py)
            exp, rollout_metrics, extras = make_experience(
                self.policy, self.tokenizer, self.reward, self.estimator, cfg, self.kl_ctl.value, self._draw_prompts,
                self.sample_gen, self.iteration, self.sharded, self.correction, self.engine)
            if cfg.trace and self.iteration == 1:
                self.trace = {**extras, **vars(exp), "kl_coef": self.kl_ctl.value, "kl_row_weights": exp.kl_coef}
            t_rollout = self._clock()
            # 8. the update: PPO epochs over shuffled minibatches of the buffer
            update = self.update(RolloutBuffer([exp]))
            t_update = self._clock()
            # 9. KL controller: adapt beta to the sequence KL the penalty uses (equal rows per rank)
            penalty_kl = D.reduce_metrics({"kl": rollout_metrics.get("objective/kl", 0.0)})["kl"]
            self.kl_ctl.update(penalty_kl, cfg.batch_size)
            # 10. metrics, computed once here (update stats: token means pooled over the minibatch steps)
            self.episodes += cfg.batch_size
            elapsed = t_update - t_start
            critic = {}  # explained variance of the global batch (each rank holds batch_size / world rows)
            if exp.values is not None:
                critic["val/explained_variance"] = float(explained_variance(
                    exp.values, exp.returns, exp.mask, variance=lambda x, m: D.global_masked_moments(x, m)[1]))
            metrics = D.reduce_metrics({
                **update, **rollout_metrics, **critic, "objective/kl_coef": self.kl_ctl.value,
                "lr": self.scheduler.get_last_lr()[0],
                "perf/episodes_per_s": cfg.batch_size / elapsed,
                "perf/tokens_per_s": D.global_count(float(exp.mask.sum())) / elapsed,
                "perf/skipped_steps": self.skipped_steps,
                **({"check/bf16": 1.0} if precision.precision(cfg) == "bf16 autocast" else {}),
                "time/score": t_rollout - t_start - rollout_metrics["time/generate"],
                "time/rollout": t_rollout - t_start,
                "time/update": t_update - t_rollout,
            })
            checks.warn_breaches(metrics, self.iteration, self.warned)
            return metrics

    def _draw_prompts(self) -> list[str]:
        """The next global batch of prompts (groups contiguous), advancing the data cursor."""
        batch, self._order = next_prompt_batch(self.prompts, self._order, self.cfg.batch_size, self.cfg.group_size,
                                               self.shuffle_gen)
        return batch

    def update(self, buffer: RolloutBuffer) -> dict[str, float]:
        """ppo_epochs passes of minibatch steps; stops early when approx KL exceeds target_kl."""
        cfg, metrics = self.cfg, MeanMetrics()
        for epoch in range(cfg.ppo_epochs):
            for i, minibatch in enumerate(buffer.minibatches(cfg.num_mini_batches, self.shuffle_gen)):
                stats = self.minibatch_step(minibatch, first=epoch == 0 and i == 0)  # None: skipped (non-finite)
                metrics.add(stats or {}, weight=self.step_tokens)  # pooled over the tokens (tracking.MeanMetrics)
                if stats and cfg.target_kl and stats.get("policy/approx_kl", 0.0) > cfg.target_kl:
                    return {**metrics.mean(), "policy/early_stop": 1.0}
        return {**metrics.mean(), "policy/early_stop": 0.0}

    def minibatch_step(self, minibatch: Experience, first: bool = False) -> dict[str, float] | None:
        """One optimizer step on a minibatch, accumulated over micro-batches.

        Each micro-batch's loss is its share of the global minibatch loss (objective.py: the aggregate
        divides by the whole minibatch's counts, summed over ranks), so the summed backward passes give
        the un-accumulated one-process gradient. A non-finite loss or gradient skips the step: weights and
        optimizer state stay untouched. ``first``: the first minibatch of the iteration's first epoch, where
        no weight has moved yet: adds the ``check/first_ratio_dev`` and (π_old = μ) ``check/logprob_gap`` invariants.
        """
        cfg = self.cfg
        den = Denominators.of(minibatch.loss_tokens, cfg.loss_aggregation, total=D.global_count)
        self.step_tokens = den.tokens  # the global minibatch's loss tokens (metric weights)
        self.optimizer.zero_grad(set_to_none=True)
        stats_sum: dict[str, float] = {}
        gap_sum, ratio_dev, finite = 0.0, 0.0, True  # the first minibatch's invariants
        for part in micro_batches(minibatch, cfg.micro_batch_size or len(minibatch)):
            if not part.loss_tokens.any() and D.world_size() == 1:  # ranks keep one set of stat keys
                continue
            loss, stats, out = micro_batch_loss(self.policy, part, cfg, self.policy_loss, den, self.loss_fn)
            if not torch.isfinite(loss):
                finite = False
                if not self.sharded:
                    break
            loss.backward()
            if self.trace and self.iteration == 1:  # for docs: what each update step saw
                self.trace.setdefault("updates", []).append(
                    {"response_ids": part.response_ids, **{k: v.detach() for k, v in out.items() if v is not None},
                     **{k: torch.tensor(v) for k, v in stats.items()}})
            for k, v in stats.items():  # shares: they sum to the minibatch's values
                stats_sum[k] = stats_sum.get(k, 0.0) + v
            if first:
                gap, dev = first_step_invariants(out["logprobs"], part.logprobs, part.mask)
                gap_sum, ratio_dev = gap_sum + gap, max(ratio_dev, dev)
        D.all_reduce_gradients(self.params)  # sum: the shares already make it the global aggregate
        grad_norm = finish_step(self.params, self.optimizer, self.scheduler, cfg.max_grad_norm, finite)
        self.stepped = self.stepped or grad_norm is not None  # the weights moved this iteration
        self.skipped_steps, self.skipped_in_row = count_skip(grad_norm is not None, self.skipped_steps,
                                                             self.skipped_in_row, cfg.max_skipped_steps,
                                                             f"ppo iteration {self.iteration}")
        if grad_norm is None:
            return None
        stats_sum = D.sum_metrics(stats_sum)
        if first:  # with a rollout correction, step() reports the rollout's μ-vs-π_old gap instead
            stats_sum["check/logprob_gap"] = D.global_count(gap_sum) / max(D.global_count(minibatch.mask.sum()), 1)
            stats_sum["check/first_ratio_dev"] = D.global_max(ratio_dev)
        return {**stats_sum, "policy/grad_norm": float(grad_norm)}

    def evaluate(self, when: str = "last") -> dict[str, float]:
        """Gold reward, reward-source score and KL to the reference on the held-out prompts; the
        responses are kept in ``self.responses[when]`` ("before" training, or the "last" evaluation)."""
        c = self.cfg
        with precision.autocast(c, self.device):
            metrics, self.responses[when] = evaluate(
                self.policy, self.tokenizer, self.eval_prompts, self.reward, self.gold, max_new_tokens=c.response_length,
                max_prompt_length=c.max_prompt_length, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                seed=c.seed + 7919, backend=c.kernel_backend)  # the same draws at every evaluation
        return metrics

    def train(self, checkpoint_dir: str | Path | None = None) -> dict[str, float]:
        """Iterations up to ``num_iterations`` (a resumed trainer goes on from ``self.iteration``); evaluation
        before, every eval_every and at the end; a checkpoint under ``checkpoint_dir`` every save_every and
        at the end. Returns eval metrics ``*_before`` / ``*_after``, ``episodes_per_s`` (training time only),
        ``wall_seconds`` (everything), skipped steps and iterations."""
        cfg = self.cfg
        t0 = time.perf_counter()
        if self.iteration == 0 and self.eval_prompts:
            self.evals["before"] = self.evaluate("before")
            self.logger.log("ppo", 0, self.evals["before"])
        todo = range(self.iteration + 1, cfg.num_iterations + 1)
        for it in progress(todo, total=len(todo), desc="ppo"):
            t_it, before = time.perf_counter(), self.before_iteration()
            try:
                metrics = self.step()
            except (RewardError, UserCodeError, NumericError) as e:  # one line, and how to go on
                raise type(e)(f"{e}; {self.save_before(before, checkpoint_dir)}") from e
            self.train_seconds += time.perf_counter() - t_it
            final = it == cfg.num_iterations
            evaluated = bool(self.eval_prompts) and (final or (cfg.eval_every > 0 and it % cfg.eval_every == 0))
            if evaluated:
                self.evals["last"] = self.evaluate()
                metrics.update(self.evals["last"])
            if evaluated or final or it % cfg.log_every == 0:
                self.logger.log("ppo", it, metrics)
            stop = signals.stop_requested()  # SIGTERM: checkpoint this iteration, then stop (every rank alike)
            if checkpoint_dir is not None and (stop or final or (cfg.save_every > 0 and it % cfg.save_every == 0)):
                state = self.state()  # every rank: each one's sampling generator goes into the checkpoint
                if D.is_main():
                    save_checkpoint(checkpoint_dir, it, *state, keep=cfg.keep_checkpoints)
            if stop and not final:
                raise signals.preempted("ppo", it, checkpoint_dir)
        summary = {f"{k.split('/')[1]}_before": v for k, v in self.evals["before"].items()}
        summary.update({f"{k.split('/')[1]}_after": v for k, v in self.evals["last"].items()})
        summary.update({"episodes_per_s": self.episodes / max(self.train_seconds, 1e-9),
                        "wall_seconds": time.perf_counter() - t0, "skipped_steps": self.skipped_steps,
                        "iterations": self.iteration})
        return summary
