"""The critic learns: trained alone on fixed rollouts of the tiny task, the value head explains much
of the held-out returns.

Reward: 1 for the prompts that end with a colon ("Review of The Red Moon:", about half of them), 0 for
the others ("I watched The Red Moon and"), plus the fraction of response tokens whose text contains
the letter "e" (test_learning.py's reward: the part of the return the states cannot foresee). Every
state V(s_t) reads includes the prompt, so a working critic explains most of the return's variance;
one that explains nothing (the demo's issue before its critic read the reward model's trunk) fails.

The critic sits on its own trunk (``value_model="separate"``) and only the value loss trains, so the
policy never moves. Returns are Monte Carlo (γ = λ = 1: no bootstrap from V), π = π_ref,
the KL penalty is 0 and R_t is the score on every token: the target does not move while the critic
trains. Explained variance is measured on fresh rollouts, with ``PPOTrainer.step``'s own metric.
Value clipping is off: it keeps V within clip_range_value of the rollouts' old values, which these
40 epochs never refresh (PPO refreshes them every iteration).
"""
import torch

from rlhf_core.config import PPOConfig, TinyModelConfig
from rlhf_core.ppo.losses import value_loss
from rlhf_core.ppo.policy import PolicyWithValue
from rlhf_core.ppo.trainer import PPOTrainer
from rlhf_core.testing import tiny_setup

RESPONSE_LENGTH = 8


def value_only_loss(*, values, exp, config, **kw):
    """The critic's term of ppo_loss alone: the policy gets no gradient."""
    loss, stats = value_loss(values, exp.values, exp.returns, exp.mask, config.clip_range_value)
    return config.vf_coef * loss, stats


def test_value_head_learns_held_out_returns_on_fixed_rollouts():
    tok, model, task = tiny_setup(model_cfg=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                            intermediate_size=64))
    target = {i for t, i in tok.get_vocab().items() if "e" in t}

    def reward(prompts, responses):
        ids = [tok(r, add_special_tokens=False)["input_ids"] for r in responses]
        return [float(p.endswith(":")) + sum(i in target for i in row) / RESPONSE_LENGTH
                for p, row in zip(prompts, ids)]

    torch.manual_seed(0)
    cfg = PPOConfig(batch_size=64, num_mini_batches=4, response_length=RESPONSE_LENGTH, gamma=1.0, lam=1.0,
                    learning_rate=3e-3, lr_schedule="constant", clip_range_value=1e6, eval_every=0)
    policy = PolicyWithValue(model, value_model="separate")  # the critic on its own trunk: π stays fixed
    trainer = PPOTrainer(cfg, policy, tok, reward, task.prompts, loss_fn=value_only_loss)
    rollouts = []
    trainer.update = lambda buffer: rollouts.append(buffer) or {}  # collect, do not train
    first = [trainer.step()["val/explained_variance"] for _ in range(4)]  # 4 x 64 training rollouts
    train = rollouts[:]
    for _ in range(40):  # epochs over the fixed rollouts
        for buffer in train:
            for minibatch in buffer.minibatches(cfg.num_mini_batches, trainer.shuffle_gen):
                trainer.minibatch_step(minibatch)
    held_out = [trainer.step()["val/explained_variance"] for _ in range(2)]  # fresh rollouts, the same π
    assert max(first) < 0.1, first  # the untrained head explains nothing
    assert min(held_out) > 0.6, (first, held_out)  # observed 0.89 (0.78 at learning_rate=1e-4)
