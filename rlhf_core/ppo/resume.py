"""What a PPO run carries across a stop: the trainer's checkpoint state, and the state before an iteration
that failed.

:class:`Resumable` is mixed into :class:`~rlhf_core.ppo.trainer.PPOTrainer`: ``state`` / ``load_state`` are
what ``--resume`` restores byte-identically, and ``before_iteration`` / ``save_before`` make an error in
the middle of an iteration (a reward function, an estimator or a loss of the user's raising or breaking
its contract) leave a checkpoint of the iteration before, so the run resumes once the cause is fixed.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from .. import distributed as D
from ..checkpoint import capture_state, latest_checkpoint, restore_state, save_checkpoint


class Resumable:
    """State handling of the PPO trainer (its attributes: policy, optimizer, scheduler, kl_ctl, cfg,
    sample_gen, shuffle_gen, iteration and the counters in ``RESUMED``)."""

    RESUMED = ("iteration", "skipped_steps", "skipped_in_row", "episodes", "train_seconds", "evals", "_order",
               "responses")

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything an exact resume needs: trainable weights (full or adapter) and value head, optimizer,
        LR schedule, KL controller, every RNG (of every rank: a collective under torchrun), the data
        cursor (``_order``) and the counters."""
        tensors, meta = capture_state(self.policy.named_trainable_parameters(), self.optimizer, self.scheduler,
                                      {"sample": self.sample_gen, "shuffle": self.shuffle_gen})
        meta.update(config=self.cfg.to_dict(), kl_ctl=self.kl_ctl.state_dict(),
                    ppo={k: getattr(self, k) for k in self.RESUMED})
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`state` (e.g. from ``checkpoint.load_checkpoint``).

        Under torchrun each rank restores its own generators. A checkpoint from another world size
        loads too (weights, optimizer, schedule, KL controller, data cursor), each rank then samples
        from a new stream seeded by (seed, rank, iteration): deterministic, not the uninterrupted run.
        """
        exact = restore_state(tensors, meta, self.policy.named_trainable_parameters(), self.optimizer, self.scheduler,
                              {"sample": self.sample_gen, "shuffle": self.shuffle_gen})
        self.kl_ctl.load_state_dict(meta["kl_ctl"])
        for key in self.RESUMED:
            setattr(self, key, meta["ppo"].get(key, getattr(self, key)))  # "responses": not in older checkpoints
        if not exact:
            self.sample_gen.manual_seed((self.cfg.seed + D.rank()) * 1_000_003 + self.iteration)

    def before_iteration(self) -> dict[str, Any]:
        """What an iteration changes before its first optimizer step: the RNGs, the data cursor, the counters
        (cheap: no weights). With it, an iteration that fails before updating can be undone exactly."""
        self.stepped = False  # set by the first optimizer step of the iteration
        return {"gens": (self.sample_gen.get_state(), self.shuffle_gen.get_state()),
                **{k: copy.deepcopy(getattr(self, k)) for k in self.RESUMED}}

    def save_before(self, snapshot: dict[str, Any], checkpoint_dir: str | Path | None) -> str:
        """After an error inside an iteration: checkpoint the state from before it when that is still exact
        (no optimizer step yet, one process, an iteration done before it); return what a user can do, in words."""
        failing = snapshot["iteration"] + 1
        exact = checkpoint_dir is not None and not self.stepped and D.world_size() == 1 and failing > 1
        if exact:
            self.sample_gen.set_state(snapshot["gens"][0])
            self.shuffle_gen.set_state(snapshot["gens"][1])
            for key in self.RESUMED:
                setattr(self, key, snapshot[key])
            path = save_checkpoint(checkpoint_dir, self.iteration, *self.state(), keep=self.cfg.keep_checkpoints)
            return (f"the state before iteration {failing} is saved ({path}): fix the cause and rerun the same "
                    "command with --resume")
        last = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
        if last is not None:
            return f"the last checkpoint is {last}: fix the cause and rerun the same command with --resume"
        return "no checkpoint was written yet: fix the cause and rerun"
