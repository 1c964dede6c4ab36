"""Each rollout correction against the estimator it claims, by exact enumeration (benchmarks/rollout_correction.py
builds the expectations over responses sampled from a behavior policy μ ≠ π_old with the trainer's own functions).

- Every correction, at token and sequence level: the expected gradient of the code's corrected loss equals the
  correction's closed form Σ_y μ(y)·(1/T)·Σ_t w_t·A·∇log π (plain loops in the benchmark).
- Sequence level with nothing cut away (tis C = ∞, mis with bounds no ratio reaches) is exact importance
  sampling: ∇J under π_old. Every other row, no correction included, is biased, and the table states by how much.
- Off-policy (θ ≠ θ_old, PPO's clip active on a quarter of the tokens): the code trains the corrected clipped
  surrogate written as loops, and the exact rows give PPO's own update had π_old sampled.
"""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from rlhf_core.ppo.correction import ROLLOUT_CORRECTIONS

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("rollout_correction", ROOT / "benchmarks" / "rollout_correction.py")
rc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rc)


@pytest.fixture(scope="module")
def rows():
    return {case: rest for case, *rest in rc.table()}


@pytest.fixture(scope="module")
def off_rows():
    return rc.off_policy_table()


@pytest.fixture(scope="module")
def gap_rows():
    return rc.gap_table()


def test_every_registered_correction_is_in_the_table_at_both_levels():
    covered = {(name, level) for name, level, *_ in rc.CASES.values()}
    assert {(n, lv) for n in ROLLOUT_CORRECTIONS for lv in ("token", "sequence")} <= covered | {("none", "token")}


def test_each_correction_trains_its_closed_form(rows):
    for case, (closed, *_) in rows.items():
        assert closed < 1e-10, (case, closed)


def test_only_the_untruncated_sequence_ratio_is_unbiased(rows):
    for case, (_, bias_max, bias_min, changed) in rows.items():
        if case in rc.EXACT:
            assert bias_max < 1e-10 and changed == 0.0, case  # exact IS: ∇J under π_old
        else:
            assert bias_min > 0.05, (case, bias_min)  # stated in docs/rollout.md


def test_off_policy_each_correction_trains_its_corrected_clipped_surrogate(off_rows):
    for case, clipped, closed, ppo_min, ppo_max in off_rows:
        assert clipped > 0.2, (case, clipped)  # the clip is exercised, not only the ratio's linear part
        assert closed < 1e-10, (case, closed)
        if case in rc.EXACT:
            assert ppo_max < 1e-10, case  # exact IS: PPO's update with π_old's samples, clip and all
        else:
            assert ppo_min > 0.05, (case, ppo_min)


def test_the_bounds_are_exercised(rows):
    """Each finite threshold truncates or masks a share of μ's tokens on every tree: the finite-C rows are not the
    C = ∞ rows in disguise."""
    for case, (*_, changed) in rows.items():
        name, level, c, low, high = rc.CASES[case]
        if case not in rc.EXACT and name != "none" and (c < math.inf or high < math.inf):
            assert changed > 0.02, (case, changed)


def test_the_closed_forms_differ_so_the_comparison_can_fail():
    """Truncation changes the expected gradient (tis C = 1.5 vs C = ∞), the level changes it, and without a
    correction μ's gradient is not π_old's."""
    tree = rc.Tree(seed=1)
    mu = rc.behavior_theta(tree)
    forms = {case: rc.closed_form(tree, mu, case) for case in rc.CASES}
    pairs = [("tis, token, C = 1.5", "tis, token, C = ∞"), ("tis, sequence, C = 2", "tis, sequence, C = ∞"),
             ("tis, token, C = ∞", "tis, sequence, C = ∞"), ("none", "tis, token, C = ∞"),
             ("mis, token, C = 1.5", "tis, token, C = 1.5"), ("icepop, sequence, [0.5, 5]", "mis, sequence, C = 2")]
    for a, b in pairs:
        assert float((forms[a] - forms[b]).norm() / forms[b].norm()) > 1e-3, (a, b)


def test_the_uncorrected_bias_grows_with_the_gap_and_exact_is_stays_exact(gap_rows):
    gaps = [gap for _, gap, _ in gap_rows]
    none = [biases[rc.GAP_CASES.index("none")] for *_, biases in gap_rows]
    exact = [biases[rc.GAP_CASES.index("tis, sequence, C = ∞")] for *_, biases in gap_rows]
    assert gaps == sorted(gaps) and none == sorted(none) and none[0] > 1e-3
    assert max(exact) < 1e-10


def test_behavior_equal_to_pi_old_needs_no_correction():
    """μ = π_old: every correction's weight is 1 and the uncorrected gradient is already ∇J/T."""
    tree = rc.Tree(seed=0)
    theta = tree.theta.clone().requires_grad_()
    (true,) = torch.autograd.grad(tree.objective(theta, 0.0), theta)
    for case in ("none", "tis, token, C = 1.5", "mis, sequence, C = 2", "icepop, token, [0.8, 1.5]"):
        theta = tree.theta.clone().requires_grad_()
        surrogate, changed = rc.code_surrogate(tree, tree.theta, case, theta)
        (code,) = torch.autograd.grad(surrogate, theta)
        assert changed == 0.0 and float((-code * tree.length - true).norm() / true.norm()) < 1e-10, case


def test_docs_tables_are_this_computation(rows, off_rows, gap_rows):
    page = (ROOT / "docs" / "rollout.md").read_text(encoding="utf-8")
    assert rc.markdown([(case, *rest) for case, rest in rows.items()]) in page
    assert rc.markdown_off_policy(off_rows) in page
    assert rc.markdown_gaps(gap_rows) in page
