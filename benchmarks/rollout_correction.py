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
from loss_gradients import _fmt, _rows, advantages_of  # noqa: E402

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


def closed_form(tree: Tree, mu: torch.Tensor, case: str) -> torch.Tensor:
    """g = Σ_y μ(y)·(1/T)·Σ_t w_t(y)·A(y)·(e_{a_t} − π_old(·|s_t)) at the states s_t, as plain loops over
    responses and tokens (independent of rlhf_core). Shapes: -> (S, V), the gradient w.r.t. the logits."""
    name, level, c, low, high = CASES[case]
    logp, logq = tree.theta.log_softmax(-1), mu.log_softmax(-1)  # (S, V) π_old, μ
    prob = logp.exp()
    paths = [[(tree.state[y[:t]], a) for t, a in enumerate(y)] for y in tree.responses]
    p_old = [math.exp(sum(float(logp[s, a]) for s, a in path)) for path in paths]
    baseline = sum(p * float(r) for p, r in zip(p_old, tree.scores))
    g = torch.zeros_like(tree.theta)
    for path, score in zip(paths, tree.scores.tolist()):
        logs = [float(logp[s, a] - logq[s, a]) for s, a in path]
        ratios = [math.exp(x) for x in logs] if level == "token" else [math.exp(sum(logs))] * len(path)
        if name == "none":
            weights = [1.0] * len(path)
        elif name == "tis":
            weights = [min(r, c) for r in ratios]
        else:
            lo, hi = (1 / c, c) if name == "mis" else (low, high)
            weights = [r if lo <= r <= hi else 0.0 for r in ratios]
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


if __name__ == "__main__":
    print(markdown(table()))
    print()
    print(markdown_gaps(gap_table()))
