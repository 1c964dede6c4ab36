"""Shared inputs and checks for the kernel tests: shapes, dtypes, tolerances, float64 ground truth."""
import os

import torch

from kernels import kl_naive, logprobs_naive

DEVICE = os.environ.get("RLHF_TEST_DEVICE", "cpu")
IGNORE = -100
TEMPERATURE = 0.7
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (forward atol, gradient tolerance as a fraction of the largest reference gradient).
# Inputs are rounded to the dtype *before* the float64 reference sees them, so the error left is
# fp32 accumulation plus rounding the returned gradients (and, on GPU, the half-precision dots).
TOL = {"fp32": (1e-4, 1e-4), "fp16": (1e-3, 5e-3), "bf16": (2e-3, 3e-2)}
# name -> (N, H, H_ref, V, strided views?)
LAYOUTS = {
    "weird": (37, 48, 40, 1271, False),
    "tiny": (2, 8, 8, 5, False),
    "strided": (19, 40, 24, 300, True),
}


def _matrix(g: torch.Generator, rows: int, cols: int, dtype: torch.dtype, strided: bool, scale: float):
    """A [rows, cols] tensor in `dtype`; strided: alternately a transposed or a column-sliced view."""
    if not strided:
        return (torch.randn(rows, cols, generator=g) * scale).to(dtype).to(DEVICE)
    if rows % 2:
        return (torch.randn(cols, rows, generator=g) * scale).to(dtype).to(DEVICE).T  # strides (1, rows)
    return (torch.randn(rows, 2 * cols, generator=g) * scale).to(dtype).to(DEVICE)[:, ::2]  # (2*cols, 2)


def make_inputs(layout: str | tuple, dtype: torch.dtype, seed: int = 0) -> dict:
    """hidden [N,H], weight [V,H], targets [N] (every 5th row ignored), ref_hidden [N,H'], ref_weight [V,H'],
    and upstream grads g_lp, g_ent, g_kl [N] (float64). ``layout``: a LAYOUTS name or its tuple."""
    n, h, hr, v, strided = LAYOUTS[layout] if isinstance(layout, str) else layout
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, v, (2 * n,), generator=g)[::2] if strided else torch.randint(0, v, (n,), generator=g)
    targets[1::5] = IGNORE
    out = dict(
        hidden=_matrix(g, n, h, dtype, strided, 1.0),
        weight=_matrix(g, v, h, dtype, strided, 2.0 / h**0.5),  # logits ~ N(0, 4) before 1/T
        ref_hidden=_matrix(g, n, hr, dtype, strided, 1.0),
        ref_weight=_matrix(g, v, hr, dtype, strided, 2.0 / hr**0.5),
        targets=targets.to(DEVICE),
    )
    for name in ("g_lp", "g_ent", "g_kl"):
        out[name] = torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE)
    if strided:
        assert not out["hidden"].is_contiguous() and not out["weight"].is_contiguous()
    return out


def grads_of(fn, hidden: torch.Tensor, weight: torch.Tensor, *upstream: torch.Tensor):
    """Run fn(hidden, weight) -> outputs, backprop Σ g·out, return (outputs..., d_hidden, d_weight)."""
    hidden = hidden.detach().requires_grad_()  # keeps the view's strides
    weight = weight.detach().requires_grad_()
    outs = fn(hidden, weight)
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum((o.double() * g).sum() for o, g in zip(outs, upstream)).backward()
    return (*outs, hidden.grad, weight.grad)


def expected_logprobs(case: dict) -> tuple:
    """float64 naive (lp, ent, d_hidden, d_weight) on the same rounded inputs."""
    fn = lambda h, w: logprobs_naive(h, w, case["targets"], TEMPERATURE, IGNORE)  # noqa: E731
    return grads_of(fn, case["hidden"].double(), case["weight"].double(), case["g_lp"], case["g_ent"])


def expected_kl(case: dict) -> tuple:
    """float64 naive (kl, d_hidden, d_weight) on the same rounded inputs."""
    ref_h, ref_w = case["ref_hidden"].double(), case["ref_weight"].double()
    fn = lambda h, w: kl_naive(h, w, ref_h, ref_w, TEMPERATURE)  # noqa: E731
    return grads_of(fn, case["hidden"].double(), case["weight"].double(), case["g_kl"])


def assert_forward(actual: torch.Tensor, expected: torch.Tensor, dtype_name: str) -> None:
    assert actual.dtype == torch.float32, actual.dtype
    assert torch.isfinite(actual).all(), "non-finite output (an unwritten NaN-poisoned element?)"
    torch.testing.assert_close(actual.double(), expected.double(), atol=TOL[dtype_name][0], rtol=TOL[dtype_name][0])


def assert_grad(actual: torch.Tensor, expected: torch.Tensor, dtype_name: str, what: str) -> None:
    assert actual is not None, f"{what}: no gradient"
    assert torch.isfinite(actual).all(), f"{what}: non-finite gradient"
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual.double() - expected).abs().max()
    assert err <= TOL[dtype_name][1] * scale, f"{what}: max error {err:.3e} > {TOL[dtype_name][1]} x {scale:.3e}"


def check_logprobs(got: tuple, case: dict, dtype_name: str) -> None:
    """Compare (lp, ent, d_hidden, d_weight) against the float64 reference; ignored rows exactly 0."""
    want = expected_logprobs(case)
    ignored = case["targets"] == IGNORE
    for out in got[:2]:
        assert (out[ignored] == 0).all(), "ignored rows must give exactly 0"
    assert (got[2][ignored] == 0).all(), "ignored rows must get no gradient"
    assert_forward(got[0], want[0], dtype_name)
    assert_forward(got[1], want[1], dtype_name)
    assert_grad(got[2], want[2], dtype_name, "d_hidden")
    assert_grad(got[3], want[3], dtype_name, "d_weight")


def check_kl(got: tuple, case: dict, dtype_name: str) -> None:
    """Compare (kl, d_hidden, d_weight) against the float64 reference."""
    want = expected_kl(case)
    assert (want[0] > 0).all()  # the inputs make two different distributions
    assert_forward(got[0], want[0], dtype_name)
    assert_grad(got[1], want[1], dtype_name, "d_hidden")
    assert_grad(got[2], want[2], dtype_name, "d_weight")
