"""The split-vocabulary forward (kernels/triton_splits.py): the split count, and the merge of the
splits' partial statistics against float64 and against each other.

V = 1271 is 10 vocabulary tiles of 128 (the last 119 wide); the split counts 1, 2, 4 and 10 cut it
into 10 | 5,5 | 3,3,3,1 | 1×10 tiles, so every kind of split edge (a short last split, one tile a
split) is crossed, with a target in every split. Under the interpreter the default is 4 (3 tiles a
split).
"""
import importlib

import pytest
import torch
from kernel_cases import DEVICE, IGNORE, TEMPERATURE, check_kl, check_logprobs, grads_of, make_inputs

from kernels import fused_kl, fused_logprobs, fused_logprobs_kl

SPLIT_COUNTS = (1, 2, 4, 10)  # of the 10 tiles at V = 1271: 1 split, 2 of 5, 3+3+3+1, 10 of 1
TILES_PER_SPLIT = {1: 10, 2: 5, 4: 3, 10: 1}


def _modules():
    return (importlib.import_module("kernels.triton_splits"), importlib.import_module("kernels.triton_logprob"),
            importlib.import_module("kernels.triton_kl"))


@pytest.fixture
def force_splits(monkeypatch):
    """force_splits(S): the next launches use S splits; returns the (S, tiles per split) they used."""
    sp_mod, lp_mod, kl_mod = _modules()
    plans = []

    def spy(*args):
        plans.append(sp_mod.split_plan(*args))
        return plans[-1]

    monkeypatch.setattr(lp_mod, "split_plan", spy)
    monkeypatch.setattr(kl_mod, "split_plan", spy)

    def force(s):
        monkeypatch.setattr(sp_mod, "SPLITS", s)
        plans.clear()
        return plans

    return force


def test_split_count():
    sp_mod, _, _ = _modules()
    plan = sp_mod.plan_splits
    # 132 SMs (H100), V = 128256 (1002 tiles of 128), blocks of 64 rows
    assert plan(16, 1002, 132) == 33  # N = 1024: 528 programs, 4 full waves of 31 tiles
    assert plan(128, 1002, 132) == 3  # N = 8192: 384 programs of 334 tiles
    assert plan(264, 1002, 132) == 1 and plan(10_000, 1002, 132) == 1  # rows alone fill 2 waves
    assert plan(1, 1, 132) == 1 and plan(1, 3, 132) == 3  # never more splits than tiles
    for rows in (1, 2, 3, 7, 16, 50, 100, 131, 200, 263):
        for tiles in (1, 2, 9, 10, 100, 1002, 1187):
            s = plan(rows, tiles, 132)
            per = -(-tiles // s)
            assert 1 <= s <= tiles and -(-tiles // per) == s, (rows, tiles, s)  # no empty split
            assert rows * s >= min(2 * 132, rows * tiles), (rows, tiles, s)  # >= 2 waves where the tiles allow
    cfg = dict(BLOCK_N=64, BLOCK_V=128)
    assert sp_mod.split_plan(300, 1271, cfg, torch.device("cpu")) == (4, 3)  # 3 + 3 + 3 + 1 tiles
    assert sp_mod.split_plan(300, 300, cfg, torch.device("cpu")) == (1, 3)
    assert sp_mod.split_plan(2, 5, cfg, torch.device("cpu")) == (1, 1)


def test_split_count_on_a_gpu_and_its_override(monkeypatch):
    sp_mod, _, _ = _modules()
    asked = []
    monkeypatch.setattr(sp_mod, "sm_count", lambda d: asked.append(d) or 132)
    cfg, gpu = dict(BLOCK_N=64, BLOCK_V=128), torch.device("cuda", 1)
    assert sp_mod.split_plan(1024, 128256, cfg, gpu) == (33, 31) and asked == [gpu]
    assert sp_mod.split_plan(8192, 128256, cfg, gpu) == (3, 334)
    assert sp_mod.split_plan(20_000, 128256, cfg, gpu) == (1, 1002)
    for forced, want in ((2, (2, 5)), (6, (5, 2)), (99, (10, 1)), (0, (1, 10))):  # 6: the empty 6th is dropped
        monkeypatch.setattr(sp_mod, "SPLITS", forced)
        assert sp_mod.split_plan(300, 1271, cfg, gpu) == want


def _targets_in_every_tile(n: int, v: int = 1271) -> torch.Tensor:
    """Targets spread over the whole vocabulary (the first and last columns included), two ignored."""
    t = torch.arange(n) * (v - 1) // (n - 1)
    t[3] = t[11] = IGNORE
    assert set((t[t != IGNORE] // 128).tolist()) == set(range(10))
    return t.to(DEVICE)


def test_logprobs_and_entropy_agree_across_split_counts(force_splits):
    case = make_inputs("weird", torch.float32)  # 37 rows, H = 48, V = 1271
    case["targets"] = _targets_in_every_tile(37)
    runs = []
    for s in SPLIT_COUNTS:
        plans = force_splits(s)

        def fn(h, w):
            return fused_logprobs(h, w, case["targets"], TEMPERATURE, True, "triton", IGNORE)

        got = grads_of(fn, case["hidden"], case["weight"], case["g_lp"], case["g_ent"])
        assert plans == [(s, TILES_PER_SPLIT[s])]
        check_logprobs(got, case, "fp32")  # forward and both gradients against float64
        runs.append(got)
    for got in runs[1:]:  # the same numbers up to fp32 rounding of the merge (1 ulp at lse ≈ 8 measured)
        for a, b in zip(got[:2], runs[0][:2]):
            torch.testing.assert_close(a, b, atol=4e-6, rtol=0)


def _near_identical(n: int = 40, h: int = 64, v: int = 1271, offset: float = 60.0):
    """Logits near 60, the reference head 1e-3 away (KL ~ 1e-5): test_numerics.py's hard case."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g)
    hidden[:, 0] = 1.0
    weight = torch.randn(v, h, generator=g) * 2 / h**0.5
    weight[:, 0] = offset
    return hidden, weight, weight + 1e-3 * torch.randn(weight.shape, generator=g)


def test_kl_of_near_identical_models_for_every_split_count(force_splits):
    h, w, rw = _near_identical()
    lp64 = (h.double() @ w.double().T).log_softmax(-1)
    lq64 = (h.double() @ rw.double().T).log_softmax(-1)
    want = (lp64.exp() * (lp64 - lq64)).sum(-1)
    targets = _targets_in_every_tile(40)
    keep = targets.cpu() != IGNORE
    first = None
    for s in SPLIT_COUNTS:
        plans = force_splits(s)
        kl = fused_kl(h.to(DEVICE), w.to(DEVICE), h.to(DEVICE), rw.to(DEVICE), backend="triton").cpu()
        lp, lq, kl1 = (x.cpu() for x in fused_logprobs_kl(h.to(DEVICE), w.to(DEVICE), h.to(DEVICE), rw.to(DEVICE),
                                                         targets, backend="triton", ignore_index=IGNORE))
        assert plans == [(s, TILES_PER_SPLIT[s])] * 2
        assert (kl >= 0).all() and (kl.double() - want).abs().max() <= 1e-6
        assert torch.equal(kl, kl1)  # the one-pass launch merges the same partials the same way
        t = targets.cpu()[keep]  # log p(t) = z_t − lse: the fp32 logits near 60 are rounded by ~1e-5 themselves
        torch.testing.assert_close(lp[keep].double(), lp64[keep].gather(1, t[:, None])[:, 0], atol=5e-5, rtol=0)
        torch.testing.assert_close(lq[keep].double(), lq64[keep].gather(1, t[:, None])[:, 0], atol=5e-5, rtol=0)
        assert not lp[~keep].any() and not lq[~keep].any()
        if first is None:
            first = (kl, lp, lq)
        torch.testing.assert_close(kl, first[0], atol=1e-8, rtol=0)  # ~1e-9 measured
        for a, b in zip((lp, lq), first[1:]):  # lse ≈ 70: 2 ulp
            torch.testing.assert_close(a, b, atol=1.6e-5, rtol=0)


@pytest.mark.parametrize("tie", [False, True], ids=["alone", "tied-with-split-0"])
def test_largest_logit_alone_in_the_last_split(tie, force_splits):
    """Every row's largest logit is column 1268 (T = 0.1, ~19/T above the rest): with 4 splits the
    last split is the last tile alone, so the merge meets the max only at its last partial. Tied:
    column 0 has the same weights, so two splits hold the max (the merge's n_top)."""
    case = make_inputs("weird", torch.float32, seed=3)
    case["hidden"], case["ref_hidden"] = case["hidden"].abs(), case["ref_hidden"].abs()
    w, rw = case["weight"].clone(), case["ref_weight"].clone()
    w[-3], rw[-1] = 0.5, 0.5
    if tie:
        w[0], rw[0] = 0.5, 0.5
    case.update(weight=w, ref_weight=rw, targets=_targets_in_every_tile(37))
    z = case["hidden"].double() @ w.double().T / 0.1
    assert (z.argmax(-1) == (0 if tie else 1268)).all()
    lp64 = z.log_softmax(-1)
    lq64 = (case["ref_hidden"].double() @ rw.double().T / 0.1).log_softmax(-1)
    keep = case["targets"] != IGNORE
    for s in (1, 4, 10):
        force_splits(s)
        lp, ent = fused_logprobs(case["hidden"], w, case["targets"], 0.1, True, "triton", IGNORE)
        torch.testing.assert_close(lp[keep].double(), lp64[keep].gather(1, case["targets"][keep, None])[:, 0],
                                   atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(ent.double()[keep], -(lp64.exp() * lp64).sum(-1)[keep], atol=1e-6, rtol=1e-5)
        kl = fused_kl(case["hidden"], w, case["ref_hidden"], rw, 0.1, "triton")
        torch.testing.assert_close(kl.double(), (lp64.exp() * (lp64 - lq64)).sum(-1), atol=1e-4, rtol=1e-5)


def test_deterministic_mode_runs_and_repeats_bit_for_bit(force_splits, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) (which the old fp32 atomics ignored) the
    kernels run, and two runs give the same forward outputs and gradients bit for bit. On a GPU,
    torch refuses any cuBLAS GEMM in that mode (the backward's two) unless CUBLAS_WORKSPACE_CONFIG
    is set, as a deterministic training run sets it."""
    if DEVICE == "cuda":
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    case = make_inputs("weird", torch.bfloat16)
    force_splits(4)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            lp = grads_of(lambda h, w: fused_logprobs(h, w, case["targets"], TEMPERATURE, True, "triton", IGNORE),
                          case["hidden"], case["weight"], case["g_lp"], case["g_ent"])
            kl = grads_of(lambda h, w: fused_kl(h, w, case["ref_hidden"], case["ref_weight"], TEMPERATURE, "triton"),
                          case["hidden"], case["weight"], case["g_kl"])
            one = fused_logprobs_kl(case["hidden"], case["weight"], case["ref_hidden"], case["ref_weight"],
                                    case["targets"], TEMPERATURE, "triton", IGNORE)
            runs.append((*lp, *kl, *one))
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    check_logprobs(runs[0][:4], case, "bf16")
    check_kl(runs[0][4:7], case, "bf16")
