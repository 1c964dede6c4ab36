"""What each policy loss, estimator and KL placement trains: exact expected gradients on an enumerable tree.

The tree of benchmarks/kl_gradients.py (vocabulary V = 3, every response T = 3 tokens, random policy and
reference logits at each of the 13 states, a random score per response) is small enough to enumerate, so
an expectation over sampled responses — or over sampled *batches* of responses — is an exact sum.

1. Policy losses. For each registered loss, the expected surrogate the trainer minimises,
   S(θ) = Σ_y π_old(y)·loss(y; θ) (``losses.POLICY_LOSSES[name]`` per token, aggregated over the response),
   is differentiated at θ = θ_old and at an off-policy θ ≠ θ_old (where the clips are active), and compared
   with autograd of the surrogate objective as its paper writes it, coded here independently as plain loops
   over responses and tokens (``paper_objective``). On-policy, each must also equal (1/T)·∇E_π[score] with
   A(y) = score(y) − E_π[score] (a constant baseline).
2. Estimators × KL placements. For each registered estimator and each (kl_estimator, kl_penalty) pair, every
   batch of k = 3 responses (27³ = 19,683 groups, each with its probability) goes through the trainer's own
   functions — ``experience_maker.compute_advantages`` (rewards, KL placement, the estimator with group ids, the KL
   loss term's row weights) and ``objective.loss_terms`` (the ppo policy term and the KL loss term under the
   current parameters, from ``kernels.fused_logprobs`` / ``kernels.fused_kl``) — at θ = θ_old, and the
   expected gradient is compared with the gradient of J = E[score] − β·E[Σ_t KL(π(·|s_t)‖π_ref(·|s_t))]
   times the scale the estimator claims (1; Dr. GRPO's 1 − 1/k). GRPO claims none: its per-group std makes
   its update no multiple of ∇J (Liu et al. 2025); the table gives its direction error. Whitening is off
   here (it divides every placement by the same σ_A in the trainer: ``compute_advantages``).

    python benchmarks/loss_gradients.py          # the tables of docs/losses.md

tests/ppo/test_loss_gradients.py asserts every claim and that docs/losses.md shows these numbers.
"""
from __future__ import annotations

import itertools
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kl_gradients import PAIRS, Tree  # noqa: E402

from kernels import fused_kl, fused_logprobs, fused_logprobs_kl  # noqa: E402
from rlhf_core.config import PPOConfig  # noqa: E402
from rlhf_core.ppo import approx_kl  # noqa: E402
from rlhf_core.ppo.experience import Experience  # noqa: E402
from rlhf_core.ppo.extensions import resolve_estimator  # noqa: E402
from rlhf_core.ppo.losses import POLICY_LOSSES  # noqa: E402
from rlhf_core.ppo.objective import loss_terms, policy_loss_options  # noqa: E402
from rlhf_core.ppo.experience_maker import compute_advantages  # noqa: E402

# The losses of the table: registered name and the config that selects it (the papers' own bounds).
LOSSES = {
    "ppo": ("ppo", {}),
    "ppo (clip-higher)": ("ppo", {"clip_range_high": 0.28}),
    "dual_clip (c = 1.3)": ("dual_clip", {"dual_clip_c": 1.3}),
    "gspo (ε = 0.03 / 0.04)": ("gspo", {"clip_range_low": 0.03, "clip_range_high": 0.04}),
    "cispo": ("cispo", {"clip_range_low": 1.0, "clip_range_high": 0.2}),
    "sapo": ("sapo", {}),
}
ESTIMATORS = ("gae", "rloo", "grpo", "dr_grpo", "reinforce_pp")
GROUP = 3  # k: samples per prompt in part 2
BETA = 0.5


def _rows(tree: Tree, theta: torch.Tensor) -> torch.Tensor:
    """log π_θ(y_t|s_t) of every response, (R, T), through the fused kernel (torch backend)."""
    return fused_logprobs(tree.hidden, theta.T, tree.targets, backend="torch").view(len(tree.responses), tree.length)


def off_policy_theta(tree: Tree, seed: int = 100, size: float = 0.6) -> torch.Tensor:
    """θ ≠ θ_old, far enough that a good share of the ratios leave [0.8, 1.2]."""
    g = torch.Generator().manual_seed(seed)
    return tree.theta + size * torch.randn(tree.theta.shape, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- part 1: policy losses


def advantages_of(tree: Tree) -> torch.Tensor:
    """A(y) = score(y) − E_π_old[score] on every token (R, T)."""
    p_old = _rows(tree, tree.theta).sum(-1).exp()  # (R,)
    adv = tree.scores - (p_old * tree.scores).sum()
    return adv.unsqueeze(-1).expand(-1, tree.length).clone()


def code_surrogate(tree: Tree, name: str, theta: torch.Tensor) -> torch.Tensor:
    """Σ_y π_old(y)·mean_t ℓ_t(y; θ), ℓ the registered loss's per-token terms (to minimise)."""
    loss_name, fields = LOSSES[name]
    cfg = PPOConfig(**fields)
    old = _rows(tree, tree.theta).detach()  # (R, T)
    lp = _rows(tree, theta)
    per_token, _ = POLICY_LOSSES[loss_name](logprobs=lp, old_logprobs=old, advantages=advantages_of(tree),
                                            mask=tree.mask, values=None, **policy_loss_options(cfg))
    return (old.sum(-1).exp() * per_token.mean(-1)).sum()


def paper_objective(tree: Tree, name: str, theta: torch.Tensor) -> torch.Tensor:
    """The surrogate each paper maximises, E_{y~π_old}[...], written as loops over responses and tokens
    from the papers' formulas (independent of rlhf_core.ppo.losses)."""
    _, fields = LOSSES[name]
    eps = 0.2
    low, high = fields.get("clip_range_low", eps), fields.get("clip_range_high", eps)
    logp = theta.log_softmax(-1)  # (S, V) per state
    logp_old = tree.theta.log_softmax(-1)
    adv = advantages_of(tree)[:, 0]
    total = torch.zeros((), dtype=torch.float64)
    for i, y in enumerate(tree.responses):
        states = [tree.state[y[:t]] for t in range(len(y))]
        new = [logp[s, a] for s, a in zip(states, y)]
        old = [logp_old[s, a] for s, a in zip(states, y)]
        p_old, a = math.exp(sum(float(o) for o in old)), float(adv[i])
        if name.startswith("gspo"):  # Zheng et al. 2025, eq. 7: min(s·A, clip(s, 1−ε_l, 1+ε_h)·A), s the geometric mean
            s = torch.exp(sum(n - o for n, o in zip(new, old)) / len(y))
            value = torch.minimum(s * a, s.clamp(1 - low, 1 + high) * a)
        else:
            terms = []
            for n, o in zip(new, old):
                r = torch.exp(n - o)
                if name.startswith("ppo"):  # Schulman et al. 2017, eq. 7 (DAPO: ε_high ≠ ε_low)
                    terms.append(torch.minimum(r * a, r.clamp(1 - low, 1 + high) * a))
                elif name.startswith("dual_clip"):  # Ye et al. 2020, eq. 5
                    ppo = torch.minimum(r * a, r.clamp(1 - eps, 1 + eps) * a)
                    terms.append(torch.maximum(ppo, torch.tensor(fields["dual_clip_c"] * a)) if a < 0 else ppo)
                elif name == "cispo":  # MiniMax-M1, eq. 4: sg(clip(r, 1−ε_l, 1+ε_h))·A·log π
                    terms.append(r.detach().clamp(1 - low, 1 + high) * a * n)
                elif name == "sapo":  # Gao et al. 2025, eq. 6: (4/τ)·σ(τ(r − 1))·A
                    tau = 1.0 if a > 0 else 1.05
                    terms.append(4.0 / tau * torch.sigmoid(tau * (r - 1)) * a)
            value = sum(terms) / len(terms)
        total = total + p_old * value
    return total


def expected_score_gradient(tree: Tree) -> torch.Tensor:
    """∇_θ E_π[score] at θ_old."""
    theta = tree.theta.clone().requires_grad_()
    (g,) = torch.autograd.grad((_rows(tree, theta).sum(-1).exp() * tree.scores).sum(), theta)
    return g


def loss_deviations(tree: Tree, name: str) -> dict[str, float]:
    """‖∇S_code + ∇J_paper‖/‖∇J_paper‖ at θ_old and off-policy, and on-policy ‖−∇S·T − ∇E[score]‖/‖∇E[score]‖."""
    out = {}
    for where, theta0 in (("on", tree.theta), ("off", off_policy_theta(tree))):
        theta = theta0.clone().requires_grad_()
        (code,) = torch.autograd.grad(code_surrogate(tree, name, theta), theta)
        theta = theta0.clone().requires_grad_()
        (paper,) = torch.autograd.grad(paper_objective(tree, name, theta), theta)
        out[where] = float((code + paper).norm() / paper.norm())
        if where == "on":
            target = expected_score_gradient(tree)
            out["score"] = float((-code * tree.length - target).norm() / target.norm())
    return out


def off_policy_activity(tree: Tree, name: str) -> dict[str, float]:
    """The loss's own diagnostics at the off-policy θ, weighted by π_old: how much of its clipping (or soft
    gating) the off-policy comparison exercises (``policy/clipfrac``, ``policy/dual_clipfrac``,
    ``policy/sapo_gate``)."""
    loss_name, fields = LOSSES[name]
    old = _rows(tree, tree.theta)
    weight = old.sum(-1).exp().unsqueeze(-1).expand_as(old).clone() * len(tree.responses)  # mean over rows = E_π_old
    _, stats = POLICY_LOSSES[loss_name](logprobs=_rows(tree, off_policy_theta(tree)), old_logprobs=old,
                                        advantages=advantages_of(tree), mask=weight, values=None,
                                        **policy_loss_options(PPOConfig(**fields)))
    return {k: float(v) for k, v in stats.items() if k != "policy/seq_ratio"}


# --------------------------------------------------------------------------- part 2: estimators x KL placements


class Batches:
    """Every ordered group of ``k`` responses of a tree as one batch of rows with group ids, and each
    group's probability under π_old."""

    def __init__(self, tree: Tree, k: int = GROUP, seed: int = 0):
        self.tree, self.k = tree, k
        n, T = len(tree.responses), tree.length
        combos = torch.tensor(list(itertools.product(range(n), repeat=k)))  # (G, k)
        self.rows = combos.reshape(-1)  # (G·k,) response of each row
        self.group_ids = torch.arange(len(combos)).repeat_interleave(k)  # (G·k,)
        old_lp, ref_lp, kl = (x.view(n, T) for x in fused_logprobs_kl(
            tree.hidden, tree.theta.T, tree.hidden, tree.ref.T, tree.targets, backend="torch"))
        self.p_group = old_lp.sum(-1).exp()[combos].prod(-1)  # (G,)
        g = torch.Generator().manual_seed(seed + 17)
        state_values = torch.randn(len(tree.state), generator=g, dtype=torch.float64)  # a critic V(s)
        values = state_values[tree.hidden.argmax(-1)].view(n, T)
        r = self.rows
        self.exp = Experience(
            query_ids=torch.zeros(len(r), 1, dtype=torch.long), query_mask=torch.ones(len(r), 1, dtype=torch.long),
            response_ids=torch.tensor(tree.responses)[r], mask=tree.mask[r], logprobs=old_lp[r], ref_logprobs=ref_lp[r],
            scores=tree.scores[r], values=values[r], kl_exact=kl[r], group_ids=self.group_ids)

    def surrogate(self, theta: torch.Tensor, estimator: str, kl_estimator: str, penalty: str, beta: float = BETA,
                  **fields) -> torch.Tensor:
        """Σ_groups P(group)·T·(the trainer's token-mean loss of the group): the expected update, times T."""
        tree, r = self.tree, self.rows
        cfg = PPOConfig(advantage_estimator=estimator, kl_estimator=kl_estimator, kl_penalty="reward", kl_coef=beta,
                        group_size=self.k, gamma=1.0, lam=1.0, whiten_advantages="false", ent_coef=0.0, **fields)
        cfg.kl_penalty = penalty  # k1/loss is refused by validate(); set after construction to measure it
        exp, _ = compute_advantages(self.exp, resolve_estimator(cfg), cfg, beta)
        lp = _rows(tree, theta)[r]  # (B, T) with grad
        if penalty == "reward":
            kl_now = None
        elif kl_estimator == "exact":
            kl_now = fused_kl(tree.hidden, theta.T, tree.hidden, tree.ref.T, backend="torch").view(-1, tree.length)[r]
        else:
            kl_now = approx_kl(lp, exp.ref_logprobs, kl_estimator)
        terms, _ = loss_terms(logprobs=lp, values=None, entropy=torch.zeros_like(lp), kl=kl_now, exp=exp, config=cfg,
                              policy_loss=POLICY_LOSSES["ppo"])
        per_row = sum(c * t for c, t in terms.values() if c != 0).sum(-1)  # (B,) Σ_t of the summed terms
        weight = self.p_group[self.group_ids] / (self.k * tree.length)  # token-mean over the group's k·T tokens
        return (weight * per_row).sum() * tree.length


def claimed_scale(estimator: str, k: int = GROUP) -> float | None:
    """The multiple of ∇J each estimator's expected update claims (None: GRPO claims no multiple)."""
    return {"dr_grpo": 1 - 1 / k, "grpo": None}.get(estimator, 1.0)


def placement_deviation(batches: Batches, estimator: str, kl_estimator: str, penalty: str, beta: float = BETA,
                        **fields) -> tuple[float, float]:
    """(‖−∇S − c·∇J‖/‖c·∇J‖ with c the claimed scale (best fit for GRPO), direction error: the part of −∇S
    that no rescaling of ∇J explains, relative to ‖∇S‖)."""
    tree = batches.tree
    theta = tree.theta.clone().requires_grad_()
    (true,) = torch.autograd.grad(tree.objective(theta, beta), theta)
    theta = tree.theta.clone().requires_grad_()
    (surr,) = torch.autograd.grad(batches.surrogate(theta, estimator, kl_estimator, penalty, beta, **fields), theta)
    got, t = -surr.reshape(-1), true.reshape(-1)
    c = claimed_scale(estimator, batches.k)
    if c is None:
        c = float(got @ t / (t @ t))
    off_axis = got - float(got @ t / (t @ t)) * t
    return float((got - c * t).norm() / (c * t).norm()), float(off_axis.norm() / got.norm())


def placement_table(seed: int = 0) -> list[tuple[str, str, str, float, float]]:
    """(estimator, kl_estimator, kl_penalty, deviation from the claimed multiple of ∇J, direction error), and
    for each estimator the row ("", "β = 0") of the score alone (no KL penalty)."""
    batches = Batches(Tree(seed=seed))
    rows = []
    for e in ESTIMATORS:
        rows.append((e, "", "β = 0", *placement_deviation(batches, e, "k1", "reward", 0.0)))
        rows += [(e, ke, p, *placement_deviation(batches, e, ke, p)) for ke, p in PAIRS]
    return rows


def loss_table(seeds: tuple[int, ...] = (0, 1, 2)) -> list[tuple[str, float, float, float, dict[str, float]]]:
    """(loss, max over trees of: on-policy deviation from the paper, off-policy deviation, on-policy deviation
    from (1/T)·∇E[score]; min over trees of each off-policy activity statistic)."""
    trees = [Tree(seed=s) for s in seeds]
    rows = []
    for name in LOSSES:
        devs = [loss_deviations(t, name) for t in trees]
        acts = [off_policy_activity(t, name) for t in trees]
        rows.append((name, max(d["on"] for d in devs), max(d["off"] for d in devs), max(d["score"] for d in devs),
                     {k: min(a[k] for a in acts) for k in acts[0]}))
    return rows


def _fmt(x: float) -> str:  # float64 round-off (~1e-15) differs between machines: print its bound
    return "< 1e-12" if x < 1e-12 else f"{x:.2e}"


def markdown_losses(rows: list[tuple[str, float, float, float, dict[str, float]]]) -> str:
    lines = ["| policy loss | on-policy: ‖∇ − ∇paper‖/‖∇paper‖ | off-policy: ‖∇ − ∇paper‖/‖∇paper‖ | "
             "what the off-policy point exercises (worst tree) | on-policy: ‖T·∇ − ∇E[score]‖/‖∇E[score]‖ |",
             "|---|---:|---:|---|---:|"]
    for name, on, off, score, active in rows:
        what = ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in active.items())
        lines.append(f"| {name} | {_fmt(on)} | {_fmt(off)} | {what} | {_fmt(score)} |")
    return "\n".join(lines)


def markdown_placements(rows: list[tuple[str, str, str, float, float]]) -> str:
    columns = [("", "β = 0")] + PAIRS
    lines = ["| estimator (claimed multiple of ∇J) | " + " | ".join(f"{ke}/{p}" if ke else p for ke, p in columns)
             + " |", "|---|" + "---:|" * len(columns)]
    for e in ESTIMATORS:
        c = claimed_scale(e)
        label = f"{e} ({'none' if c is None else ('1' if c == 1 else f'1 − 1/k = {c:.3g}')})"
        cells = []
        for ke, p in columns:
            dev, direction = next((d, a) for e_, ke_, p_, d, a in rows if (e_, ke_, p_) == (e, ke, p))
            cells.append(f"direction {direction:.1%}" if c is None else _fmt(dev))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_losses(loss_table()))
    print()
    print(markdown_placements(placement_table()))
