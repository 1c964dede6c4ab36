"""kernels/triton_logprob.py: the Triton kernels (interpreter on CPU) against float64 references."""
import pytest
import torch
from kernel_cases import DTYPES, IGNORE, LAYOUTS, TEMPERATURE, check_logprobs, grads_of, make_inputs

from kernels import fused_logprobs


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_triton_logprobs_match_float64(layout, dtype_name):
    case = make_inputs(layout, DTYPES[dtype_name])

    def fn(h, w):
        return fused_logprobs(h, w, case["targets"], TEMPERATURE, True, "triton", IGNORE)

    got = grads_of(fn, case["hidden"], case["weight"], case["g_lp"], case["g_ent"])
    assert got[2].dtype == DTYPES[dtype_name] and got[3].dtype == DTYPES[dtype_name]
    check_logprobs(got, case, dtype_name)


def test_triton_logprob_only_with_frozen_weight():
    """HAS_ENT=False and NEED_W=False branches agree with the torch backend."""
    case = make_inputs("weird", torch.float32)
    out = {}
    for backend in ("torch", "triton"):
        h = case["hidden"].detach().requires_grad_()
        lp = fused_logprobs(h, case["weight"], case["targets"], TEMPERATURE, backend=backend)
        (lp.double() * case["g_lp"]).sum().backward()
        out[backend] = (lp, h.grad)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], atol=1e-5, rtol=1e-5)


def test_triton_entropy_gradient_alone():
    """Only the entropy output feeds the loss (g_lp is None in backward)."""
    case = make_inputs("weird", torch.float32)
    grads = {}
    for backend in ("torch", "triton"):
        h = case["hidden"].detach().requires_grad_()
        _, ent = fused_logprobs(h, case["weight"], case["targets"], TEMPERATURE, True, backend)
        ent.sum().backward()
        grads[backend] = h.grad
    assert grads["torch"].abs().max() > 1e-3
    torch.testing.assert_close(grads["triton"], grads["torch"], atol=1e-5, rtol=1e-4)


def test_triton_rejects_two_half_dtypes():
    """fp32 with a half dtype is upcast in the kernel; fp16 with bf16 has no common dot dtype."""
    case = make_inputs("tiny", torch.float32)
    with pytest.raises(TypeError, match="cast one"):
        fused_logprobs(case["hidden"].half(), case["weight"].bfloat16(), case["targets"], backend="triton")
