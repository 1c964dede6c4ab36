"""What each rollout correction trains when a behavior policy μ ≠ π_old sampled: exact expected gradients.

The tree of benchmarks/kl_gradients.py (vocabulary V = 3, every response T = 3 tokens, random π_old logits at
each of the 13 states, a random score per response) gets a behavior policy μ: π_old's logits plus Gaussian
noise (``behavior_theta``), standing in for a rollout engine whose logprobs differ from the trainer's.
Responses are sampled from μ, so an expectation is a sum over the 27 responses weighted by μ(y).

For each correction (none, tis, mis, icepop; token and sequence level) the expected surrogate the trainer
minimises, S(θ) = Σ_y μ(y)·mean_t w_t(y)·ℓ_t(y; θ), is built from the trainer's own functions —
``experience_maker.apply_rollout_correction`` (the registered correction's weights from π_old and μ) and
``objective.loss_terms`` (the ppo policy term times the weights) — and differentiated at θ = θ_old. It is
compared with
1. the correction's closed form, written here as plain loops independent of rlhf_core:
   g = Σ_y μ(y)·(1/T)·Σ_t w_t(y)·A(y)·∇log π(a_t|s_t), ∇_θ[s] log π(a|s) = e_a − π(·|s), with
   w = 1 (none), min(ρ, C) (tis), ρ·1[1/C ≤ ρ ≤ C] (mis), ρ·1[low ≤ ρ ≤ high] (icepop), ρ = π_old/μ per token
   or the product over the response;
2. ∇J, J(θ) = E_{y~π_θ}[score(y)] (autograd), what PPO claims to follow: only the sequence-level ratio with
   nothing cut away (C = ∞, or every ratio inside the mask's bounds) gives it exactly; the deviation of every
   other row is its bias, stated in the table.
A(y) = score(y) − E_π_old[score] (a constant baseline).

Off-policy (``off_policy_table``): the same at θ ≠ θ_old (loss_gradients.off_policy_theta, far enough that PPO's
clip is active on a good share of the tokens), where the code's gradient is compared with
3. the corrected clipped surrogate written as plain loops, Σ_y μ(y)·(1/T)·Σ_t w_t(y)·min(r_t·A, clip(r_t, 1 − ε,
   1 + ε)·A), r_t = π_θ/π_old, differentiated by autograd (``corrected_ppo_objective``);
4. PPO's own update had π_old sampled, ∇ Σ_y π_old(y)·(1/T)·Σ_t min(r_t·A, clip(r_t)·A)
   (loss_gradients.paper_objective): the sequence-level ratio with nothing cut away gives it exactly at every
   θ, clip included, because Σ_y μ(y)·π_old(y)/μ(y)·f(y) = Σ_y π_old(y)·f(y) for any f of the response.

    python benchmarks/rollout_correction.py          # the tables of docs/rollout.md

tests/ppo/test_rollout_correction.py asserts every claim and that docs/rollout.md shows these numbers.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kl_gradients import Tree  # noqa: E402
from loss_gradients import _fmt, _rows, advantages_of, off_policy_theta, paper_objective  # noqa: E402

from rlhf_core.config import PPOConfig  # noqa: E402
from rlhf_core.ppo.correction import ROLLOUT_CORRECTIONS  # noqa: E402
from rlhf_core.ppo.experience import Experience  # noqa: E402
from rlhf_core.ppo.experience_maker import apply_rollout_correction  # noqa: E402
from rlhf_core.ppo.losses import POLICY_LOSSES  # noqa: E402
from rlhf_core.ppo.objective import loss_terms  # noqa: E402

INF = math.inf
# label: (correction, level, C, low, high); C is tis/mis's threshold, low/high icepop's bounds.
CASES = {
    "none": ("none", "token", INF, 0.0, INF),
    "tis, token, C = ∞": ("tis", "token", INF, 0.0, INF),
    "tis, token, C = 1.5": ("tis", "token", 1.5, 0.0, INF),
    "tis, sequence, C = ∞": ("tis", "sequence", INF, 0.0, INF),
    "tis, sequence, C = 2": ("tis", "sequence", 2.0, 0.0, INF),
    "mis, token, C = 1.5": ("mis", "token", 1.5, 0.0, INF),
    "mis, sequence, C = 2": ("mis", "sequence", 2.0, 0.0, INF),
    "mis, sequence, C = 1e6": ("mis", "sequence", 1e6, 0.0, INF),
    "icepop, token, [0.8, 1.5]": ("icepop", "token", 2.0, 0.8, 1.5),
    "icepop, sequence, [0.5, 5]": ("icepop", "sequence", 2.0, 0.5, 5.0),
}
EXACT = ("tis, sequence, C = ∞", "mis, sequence, C = 1e6")  # sequence ratio, nothing cut: ∇J exactly
SIZE = 0.5  # σ of the noise on μ's logits in the main table


def behavior_theta(tree: Tree, size: float = SIZE, seed: int = 50) -> torch.Tensor:
    """μ's logits: π_old's plus N(0, size²) noise at every state."""
    g = torch.Generator().manual_seed(seed)
    return tree.theta + size * torch.randn(tree.theta.shape, generator=g, dtype=torch.float64)


def code_surrogate(tree: Tree, mu: torch.Tensor, case: str, theta: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(Σ_y μ(y)·mean_t policy term of the trainer (weights × ppo loss), the μ-weighted share of tokens whose
    weight the correction changed: truncated or masked)."""
    name, level, c, low, high = CASES[case]
    cfg = PPOConfig(rollout_correction=name, rollout_correction_level=level, rollout_correction_threshold=c,
                    rollout_correction_low=low, rollout_correction_high=high)
    old, behavior = _rows(tree, tree.theta).detach(), _rows(tree, mu).detach()  # (R, T) each
    n = len(tree.responses)
    exp = Experience(query_ids=torch.zeros(n, 1, dtype=torch.long), query_mask=torch.ones(n, 1, dtype=torch.long),
                     response_ids=torch.tensor(tree.responses), mask=tree.mask, logprobs=old, ref_logprobs=old,
                     scores=tree.scores, advantages=advantages_of(tree), behavior_logprobs=behavior)
    p_mu = behavior.sum(-1).exp()  # (R,) μ(y)
    changed = 0.0
    if name != "none":
        exp, _ = apply_rollout_correction(exp, ROLLOUT_CORRECTIONS[name], cfg)
        ratio = torch.exp(old - behavior) if level == "token" else torch.exp((old - behavior).sum(-1, keepdim=True))
        changed = float((p_mu.unsqueeze(-1) * (exp.correction_weights != ratio).double()).sum(0).mean())
    lp = _rows(tree, theta)  # (R, T) with grad
    terms, _ = loss_terms(logprobs=lp, values=None, entropy=torch.zeros_like(lp), kl=None, exp=exp, config=cfg,
                          policy_loss=POLICY_LOSSES["ppo"])
    return (p_mu * terms["policy"][1].mean(-1)).sum(), changed


def plain_weights(tree: Tree, mu: torch.Tensor, case: str) -> list[list[float]]:
    """w_t(y) of every response, as plain loops from π_old's and μ's logits (independent of rlhf_core)."""
    name, level, c, low, high = CASES[case]
    logp, logq = tree.theta.log_softmax(-1), mu.log_softmax(-1)  # (S, V) π_old, μ
    out = []
    for y in tree.responses:
        logs = [float(logp[tree.state[y[:t]], a] - logq[tree.state[y[:t]], a]) for t, a in enumerate(y)]
        ratios = [math.exp(x) for x in logs] if level == "token" else [math.exp(sum(logs))] * len(y)
        if name == "none":
            out.append([1.0] * len(y))
        elif name == "tis":
            out.append([min(r, c) for r in ratios])
        else:
            lo, hi = (1 / c, c) if name == "mis" else (low, high)
            out.append([r if lo <= r <= hi else 0.0 for r in ratios])
    return out


def closed_form(tree: Tree, mu: torch.Tensor, case: str) -> torch.Tensor:
    """g = Σ_y μ(y)·(1/T)·Σ_t w_t(y)·A(y)·(e_{a_t} − π_old(·|s_t)) at the states s_t, as plain loops over
    responses and tokens (independent of rlhf_core). Shapes: -> (S, V), the gradient w.r.t. the logits."""
    logp, logq = tree.theta.log_softmax(-1), mu.log_softmax(-1)  # (S, V) π_old, μ
    prob = logp.exp()
    paths = [[(tree.state[y[:t]], a) for t, a in enumerate(y)] for y in tree.responses]
    p_old = [math.exp(sum(float(logp[s, a]) for s, a in path)) for path in paths]
    baseline = sum(p * float(r) for p, r in zip(p_old, tree.scores))
    g = torch.zeros_like(tree.theta)
    for path, score, weights in zip(paths, tree.scores.tolist(), plain_weights(tree, mu, case)):
        p_mu = math.exp(sum(float(logq[s, a]) for s, a in path))
        for (s, a), w in zip(path, weights):
            g[s] += p_mu * w * (score - baseline) * (torch.nn.functional.one_hot(torch.tensor(a), tree.vocab) - prob[s])
    return g / tree.length


def deviations(tree: Tree, case: str, size: float = SIZE) -> dict[str, float]:
    """‖−∇S − g‖/‖g‖ (the closed form), ‖−T·∇S − ∇J‖/‖∇J‖ (the bias), and the share changed."""
    mu = behavior_theta(tree, size)
    theta = tree.theta.clone().requires_grad_()
    surrogate, changed = code_surrogate(tree, mu, case, theta)
    (code,) = torch.autograd.grad(surrogate, theta)
    theta = tree.theta.clone().requires_grad_()
    (true,) = torch.autograd.grad(tree.objective(theta, 0.0), theta)
    closed = closed_form(tree, mu, case)
    return {"closed": float((-code - closed).norm() / closed.norm()),
            "bias": float((-code * tree.length - true).norm() / true.norm()), "changed": changed}


def table(seeds: tuple[int, ...] = (0, 1, 2)) -> list[tuple[str, float, float, float, float]]:
    """(case, max over trees of the closed-form deviation, max and min of the bias, min share changed)."""
    trees = [Tree(seed=s) for s in seeds]
    rows = []
    for case in CASES:
        devs = [deviations(t, case) for t in trees]
        rows.append((case, max(d["closed"] for d in devs), max(d["bias"] for d in devs),
                     min(d["bias"] for d in devs), min(d["changed"] for d in devs)))
    return rows


def corrected_ppo_objective(tree: Tree, mu: torch.Tensor, case: str, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """Σ_y μ(y)·(1/T)·Σ_t w_t(y)·min(r_t·A, clip(r_t, 1 − ε, 1 + ε)·A), r_t = π_θ(a_t|s_t)/π_old(a_t|s_t), as loops
    over responses and tokens (Schulman et al. 2017, eq. 7, with the correction's weights); to maximise."""
    logp, logp_old, logq = theta.log_softmax(-1), tree.theta.log_softmax(-1), mu.log_softmax(-1)  # (S, V)
    adv = advantages_of(tree)[:, 0]
    total = torch.zeros((), dtype=torch.float64)
    for y, a, weights in zip(tree.responses, adv.tolist(), plain_weights(tree, mu, case)):
        states = [tree.state[y[:t]] for t in range(len(y))]
        p_mu = math.exp(sum(float(logq[s, t]) for s, t in zip(states, y)))
        terms = [w * torch.minimum(r * a, r.clamp(1 - eps, 1 + eps) * a)
                 for w, r in zip(weights, (torch.exp(logp[s, t] - logp_old[s, t]) for s, t in zip(states, y)))]
        total = total + p_mu * sum(terms) / len(y)
    return total


def off_policy_deviations(tree: Tree, case: str) -> dict[str, float]:
    """At θ = off_policy_theta(tree): ‖−∇S − ∇closed‖/‖∇closed‖ (the corrected clipped surrogate as loops),
    ‖−∇S − ∇PPO_π_old‖/‖∇PPO_π_old‖ (PPO's update had π_old sampled) and the μ-weighted share of tokens the clip
    stops (policy/clipfrac)."""
    mu, at = behavior_theta(tree), off_policy_theta(tree)
    eps = PPOConfig().clip_range
    theta = at.clone().requires_grad_()
    surrogate, _ = code_surrogate(tree, mu, case, theta)
    (code,) = torch.autograd.grad(surrogate, theta)
    theta = at.clone().requires_grad_()
    (closed,) = torch.autograd.grad(corrected_ppo_objective(tree, mu, case, theta, eps), theta)
    theta = at.clone().requires_grad_()
    (ppo,) = torch.autograd.grad(paper_objective(tree, "ppo", theta), theta)
    old, new, behavior = _rows(tree, tree.theta), _rows(tree, at), _rows(tree, mu)  # (R, T) each
    ratio, adv = torch.exp(new - old), advantages_of(tree)
    stopped = ((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps))  # (R, T) gradient 0 there
    return {"closed": float((-code - closed).norm() / closed.norm()), "ppo": float((-code - ppo).norm() / ppo.norm()),
            "clipped": float((behavior.sum(-1).exp().unsqueeze(-1) * stopped.double()).sum(0).mean())}


def off_policy_table(seeds: tuple[int, ...] = (0, 1, 2)) -> list[tuple[str, float, float, float, float]]:
    """(case, min share clipped, max closed-form deviation, min and max deviation from PPO under π_old)."""
    trees = [Tree(seed=s) for s in seeds]
    rows = []
    for case in CASES:
        devs = [off_policy_deviations(t, case) for t in trees]
        rows.append((case, min(d["clipped"] for d in devs), max(d["closed"] for d in devs),
                     min(d["ppo"] for d in devs), max(d["ppo"] for d in devs)))
    return rows


def gap_of(tree: Tree, size: float) -> float:
    """E_μ[mean_t |log μ(a_t|s_t) − log π_old(a_t|s_t)|]: the logprob gap the trainer would log."""
    mu = behavior_theta(tree, size)
    old, behavior = _rows(tree, tree.theta), _rows(tree, mu)
    return float((behavior.sum(-1).exp() * (old - behavior).abs().mean(-1)).sum())


GAP_CASES = ("none", "tis, token, C = ∞", "tis, token, C = 1.5", "tis, sequence, C = 2", "tis, sequence, C = ∞")


def gap_table(sizes: tuple[float, ...] = (0.02, 0.1, 0.3, 1.0), seed: int = 0) -> list[tuple[float, float, list]]:
    """(σ of μ's noise, the logprob gap, the bias ‖T·∇ − ∇J‖/‖∇J‖ of each of ``GAP_CASES``) on one tree."""
    tree = Tree(seed=seed)
    return [(size, gap_of(tree, size), [deviations(tree, case, size)["bias"] for case in GAP_CASES])
            for size in sizes]


def markdown(rows: list[tuple[str, float, float, float, float]]) -> str:
    lines = ["| correction, level, bounds | share of μ's tokens truncated or masked (min over trees) | "
             "‖∇ − closed form‖/‖closed form‖ | bias ‖T·∇ − ∇J‖/‖∇J‖ (min – max over trees) |",
             "|---|---:|---:|---:|"]
    for case, closed, bias_max, bias_min, changed in rows:
        bias = _fmt(bias_max) if bias_max < 1e-12 else f"{bias_min:.3f} – {bias_max:.3f}"
        lines.append(f"| {case} | {changed:.2f} | {_fmt(closed)} | {bias} |")
    return "\n".join(lines)


def markdown_gaps(rows: list[tuple[float, float, list]]) -> str:
    lines = ["| σ of μ's logit noise | mean \\|log μ − log π_old\\| under μ | "
             + " | ".join(f"bias: {c}" for c in GAP_CASES) + " |", "|---:|---:|" + "---:|" * len(GAP_CASES)]
    for size, gap, biases in rows:
        lines.append(f"| {size:g} | {gap:.3f} | " + " | ".join(_fmt(b) for b in biases) + " |")
    return "\n".join(lines)


def markdown_off_policy(rows: list[tuple[str, float, float, float, float]]) -> str:
    clipped = min(r[1] for r in rows)
    lines = [f"At θ ≠ θ_old (PPO's clip stops the gradient of at least {clipped:.0%} of μ's tokens on every tree):",
             "", "| correction, level, bounds | ‖∇ − ∇ corrected clipped surrogate‖/‖…‖ | "
             "‖∇ − ∇ PPO had π_old sampled‖/‖…‖ (min – max over trees) |", "|---|---:|---:|"]
    for case, _, closed, ppo_min, ppo_max in rows:
        ppo = _fmt(ppo_max) if ppo_max < 1e-12 else f"{ppo_min:.3f} – {ppo_max:.3f}"
        lines.append(f"| {case} | {_fmt(closed)} | {ppo} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(table()))
    print()
    print(markdown_off_policy(off_policy_table()))
    print()
    print(markdown_gaps(gap_table()))
