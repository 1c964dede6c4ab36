"""Which KL penalty trains the objective it claims? Exact enumeration on a tiny tree.

The objective of KL-penalized RLHF is J(θ) = E_{y~π}[score(y)] − β·E_{y~π}[Σ_t KL(π(·|s_t)‖π_ref(·|s_t))].
On a tree small enough to enumerate (vocabulary V, every response T tokens long, random policy and
reference logits at every state, a random score per leaf) J and its gradient are exact (autograd).
For each (kl_estimator, kl_penalty) pair the trainer offers, the expected surrogate loss is built
from the trainer's own functions — ``kernels.fused_logprobs_kl`` for the rollout, ``approx_kl``,
``kl_in_rewards``, ``kl_penalized_rewards``, ``compute_gae`` (γ = λ = 1, no critic), ``policy_loss``,
``kl_penalty_loss`` with ``kernels.fused_logprobs`` / ``kernels.fused_kl`` under the current
parameters — weighted by each sequence's probability, at θ = θ_old, and its gradient compared with −∇J.
Advantages are not whitened here (whitening rescales every placement alike in the trainer, see
rlhf_core/ppo/objective.py).

    python benchmarks/kl_gradients.py            # the table in docs/kl.md (3 trees, V = 3, T = 3)

tests/ppo/test_kl_gradients.py asserts which pairs are unbiased and that docs/kl.md shows these numbers.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import fused_kl, fused_logprobs, fused_logprobs_kl  # noqa: E402
from rlhf_core.ppo import approx_kl, compute_gae, policy_loss  # noqa: E402
from rlhf_core.ppo.losses import kl_penalty_loss  # noqa: E402
from rlhf_core.ppo.rewards import kl_in_rewards, kl_penalized_rewards  # noqa: E402

# Every pair, k1/loss included: the trainer refuses it (config.KL_PENALTIES), this table shows why.
PAIRS = [("k1", "reward"), ("k1", "loss"), ("k2", "reward"), ("k2", "loss"), ("k3", "reward"), ("k3", "loss"),
         ("exact", "reward"), ("exact", "loss"), ("exact", "both")]


class Tree:
    """Every response of ``length`` tokens over a ``vocab``-token alphabet, with random policy and
    reference logits at every state (prefix) and a random score per response (float64)."""

    def __init__(self, vocab: int = 3, length: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.length = vocab, length
        prefixes = [p for t in range(length) for p in itertools.product(range(vocab), repeat=t)]
        self.state = {p: i for i, p in enumerate(prefixes)}
        self.theta = torch.randn(len(prefixes), vocab, generator=g, dtype=torch.float64)  # policy logits
        self.ref = torch.randn(len(prefixes), vocab, generator=g, dtype=torch.float64)  # reference logits
        self.responses = list(itertools.product(range(vocab), repeat=length))  # B = V^T
        self.scores = torch.randn(len(self.responses), generator=g, dtype=torch.float64)  # (B,)
        states = [[self.state[y[:t]] for t in range(length)] for y in self.responses]
        # one-hot state rows: logits = onehot @ theta = hidden @ weight.T with weight = theta.T
        self.hidden = torch.nn.functional.one_hot(torch.tensor(states).reshape(-1), len(prefixes)).double()
        self.targets = torch.tensor(self.responses).reshape(-1)  # (B·T,)
        self.mask = torch.ones(len(self.responses), length, dtype=torch.long)  # (B, T)

    def objective(self, theta: torch.Tensor, beta: float) -> torch.Tensor:
        """J(θ) exactly: Σ_y π(y)·(score(y) − β·Σ_t KL(π(·|s_t)‖π_ref(·|s_t)))."""
        logp, logq = theta.log_softmax(-1), self.ref.log_softmax(-1)  # (S, V)
        kl_state = (logp.exp() * (logp - logq)).sum(-1)  # (S,)
        b, t = self.mask.shape
        rows = self.hidden.argmax(-1)  # (B·T,) state of each token
        seq_logp = logp[rows, self.targets].view(b, t).sum(-1)  # (B,)
        return (seq_logp.exp() * (self.scores - beta * kl_state[rows].view(b, t).sum(-1))).sum()

    def surrogate(self, theta: torch.Tensor, estimator: str, penalty: str, beta: float) -> torch.Tensor:
        """Σ_y π_old(y)·T·(policy_loss + kl_penalty_loss) of the batch {y}: the trainer's loss of each
        response (a token-mean over its T tokens, hence ·T), in expectation over the rollout."""
        b, t = self.mask.shape
        old_lp, ref_lp, kl_exact = (x.view(b, t) for x in fused_logprobs_kl(
            self.hidden, theta.detach().T, self.hidden, self.ref.T, self.targets, backend="torch"))  # rollout
        kl = kl_exact if estimator == "exact" else approx_kl(old_lp, ref_lp, estimator)  # (B, T)
        rewards, _ = kl_penalized_rewards(self.scores, old_lp, ref_lp, self.mask, beta,
                                          kl=kl_in_rewards(kl, self.mask, penalty))
        advantages, _ = compute_gae(rewards, torch.zeros_like(rewards), self.mask, gamma=1.0, lam=1.0)
        lp = fused_logprobs(self.hidden, theta.T, self.targets, backend="torch").view(b, t)  # with grad
        if estimator == "exact":
            kl_now = fused_kl(self.hidden, theta.T, self.hidden, self.ref.T, backend="torch").view(b, t)
        else:
            kl_now = approx_kl(lp, ref_lp, estimator)
        weight = old_lp.sum(-1).exp()  # (B,) π_old(y)
        total = torch.zeros((), dtype=torch.float64)
        for i in range(b):
            row = slice(i, i + 1)
            loss, _ = policy_loss(lp[row], old_lp[row], advantages[row], self.mask[row], clip_range=0.2)
            if penalty != "reward":
                loss = loss + kl_penalty_loss(kl_now[row], self.mask[row], beta)[0]
            total = total + weight[i] * t * loss
        return total


def deviation(tree: Tree, estimator: str, penalty: str, beta: float = 0.5) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(‖∇surrogate + ∇J‖ / ‖∇J‖, −∇surrogate, ∇J): 0 for an unbiased gradient of J."""
    theta = tree.theta.clone().requires_grad_()
    (true,) = torch.autograd.grad(tree.objective(theta, beta), theta)
    theta = tree.theta.clone().requires_grad_()
    (surr,) = torch.autograd.grad(tree.surrogate(theta, estimator, penalty, beta), theta)
    return float((surr + true).norm() / true.norm()), -surr, true


def kl_only_deviation(tree: Tree, estimator: str, penalty: str, beta: float = 0.5) -> float:
    """The same comparison for the KL part alone (all scores 0): how far a pair is from −β·∇KL."""
    scores = tree.scores
    tree.scores = torch.zeros_like(scores)
    try:
        return deviation(tree, estimator, penalty, beta)[0]
    finally:
        tree.scores = scores


def table(seeds: tuple[int, ...] = (0, 1, 2)) -> list[tuple[str, str, float, float]]:
    """(estimator, penalty, max relative deviation of the whole gradient, of the KL part) over seeds."""
    trees = [Tree(seed=s) for s in seeds]
    return [(e, p, max(deviation(t, e, p)[0] for t in trees), max(kl_only_deviation(t, e, p) for t in trees))
            for e, p in PAIRS]


def markdown(rows: list[tuple[str, str, float, float]]) -> str:
    lines = ["| kl_estimator | kl_penalty | ‖∇ − ∇J‖ / ‖∇J‖ | KL part only: ‖∇ − ∇(−β·KL)‖ / ‖∇(β·KL)‖ | unbiased |",
             "|---|---|---:|---:|---|"]
    def fmt(x: float) -> str:  # float64 round-off (~1e-15) differs between machines: print its bound
        return "< 1e-12" if x < 1e-12 else f"{x:.2e}"
    for e, p, whole, kl_part in rows:
        lines.append(f"| {e} | {p} | {fmt(whole)} | {fmt(kl_part)} | {'yes' if whole < 1e-6 else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(table()))
