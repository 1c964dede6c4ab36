"""The Triton kernels on a shape that crosses every tile edge, per dtype, against float64.

N = 300 rows: 10 row blocks of 32 (the last one 12 rows), backward chunks of 64 (the last 44);
H = 200: 7 steps of 32 (the last 8 wide), H_ref = 136; V = 1271: 10 vocabulary tiles of 128 (the
last 119 wide). Every 5th row is ignored. The backward runs twice on one graph and must give
bit-identical gradients (no atomics: each dlogits element is written once, then GEMMs).
Under the interpreter these take 5-15 s each (marked ``interpreter_heavy``).
"""
import pytest
import torch
from kernel_cases import DEVICE, DTYPES, IGNORE, TEMPERATURE, check_kl, check_logprobs, make_inputs

from kernels import fused_kl, fused_logprobs

EDGES = (300, 200, 136, 1271, False)
pytestmark = pytest.mark.interpreter_heavy


def _twice(outs, upstream, hidden, weight):
    """Backprop Σ g·out twice through one graph; return the first gradients after checking the
    second are bit-identical."""
    loss = sum((o.double() * g).sum() for o, g in zip(outs, upstream))
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight))
    for a, b, what in zip(first, second, ("d_hidden", "d_weight")):
        assert torch.equal(a, b), f"{what} differs between two identical backward passes"
    return first


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_logprobs_cross_every_tile_edge(dtype_name):
    case = make_inputs(EDGES, DTYPES[dtype_name])
    h, w = case["hidden"].detach().requires_grad_(), case["weight"].detach().requires_grad_()
    outs = fused_logprobs(h, w, case["targets"], TEMPERATURE, True, "triton", IGNORE)
    grads = _twice(outs, (case["g_lp"], case["g_ent"]), h, w)
    check_logprobs((*outs, *grads), case, dtype_name)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_kl_crosses_every_tile_edge(dtype_name):
    case = make_inputs(EDGES, DTYPES[dtype_name], seed=1)
    h, w = case["hidden"].detach().requires_grad_(), case["weight"].detach().requires_grad_()
    kl = fused_kl(h, w, case["ref_hidden"], case["ref_weight"], TEMPERATURE, "triton")
    grads = _twice((kl,), (case["g_kl"],), h, w)
    check_kl((kl, *grads), case, dtype_name)


def test_fp32_hidden_with_bf16_head():
    """Mixed inputs (an fp32 final norm feeding a bf16 LM head) are upcast inside the kernel; the
    float64 truth sees the same values. 70 rows: three row blocks and two backward chunks."""
    case = make_inputs((70, 200, 136, 1271, False), torch.float32, seed=2)
    case["weight"] = case["weight"].bfloat16()
    h, w = case["hidden"].detach().requires_grad_(), case["weight"].detach().requires_grad_()
    outs = fused_logprobs(h, w, case["targets"], TEMPERATURE, True, "triton", IGNORE)
    grads = _twice(outs, (case["g_lp"], case["g_ent"]), h, w)
    assert grads[0].dtype == torch.float32 and grads[1].dtype == torch.bfloat16
    check_logprobs((*outs, *grads), case, "bf16")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_largest_logit_in_the_last_tile_at_temperature_0_1(backend):
    """Every row's largest logit sits in the last, partial vocabulary tile and T = 0.1, so the online
    max, its rescaling and the centred KL all move at the very end of the sweep."""
    case = make_inputs("weird", torch.float32, seed=3)
    n = case["hidden"].shape[0]
    case["hidden"], case["ref_hidden"] = case["hidden"].abs(), case["ref_hidden"].abs()
    w, rw = case["weight"].clone(), case["ref_weight"].clone()
    w[-3], rw[-1] = 0.5, 0.5  # logits 0.5 Σ|h| ≈ 19 against N(0, 4) elsewhere
    case.update(weight=w, ref_weight=rw)
    z = case["hidden"].double() @ w.double().T
    assert (z.argmax(-1) == w.shape[0] - 3).all() and n > 1
    h, wg = case["hidden"].detach().requires_grad_(), w.detach().requires_grad_()
    lp, ent = fused_logprobs(h, wg, case["targets"], 0.1, True, backend, IGNORE)
    ((lp.double() * case["g_lp"]).sum() + (ent.double() * case["g_ent"]).sum()).backward()
    want_lp = (z / 0.1).log_softmax(-1).gather(1, case["targets"].clamp_min(0)[:, None])[:, 0]
    keep = case["targets"] != IGNORE
    torch.testing.assert_close(lp[keep].double(), want_lp[keep], atol=1e-4, rtol=1e-5)
    kl = fused_kl(case["hidden"], w, case["ref_hidden"], rw, 0.1, backend)
    lp64, lq64 = (z / 0.1).log_softmax(-1), (case["ref_hidden"].double() @ rw.double().T / 0.1).log_softmax(-1)
    torch.testing.assert_close(kl.double(), (lp64.exp() * (lp64 - lq64)).sum(-1), atol=1e-4, rtol=1e-5)
    assert torch.isfinite(h.grad).all() and DEVICE in str(kl.device)
