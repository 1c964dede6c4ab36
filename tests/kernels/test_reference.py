"""kernels/reference.py: the chunked torch path against a float64 materialized-logits reference."""
import pytest
import torch
from kernel_cases import DEVICE, DTYPES, IGNORE, LAYOUTS, TEMPERATURE, check_kl, check_logprobs, grads_of, make_inputs

from kernels import chunked_kl, chunked_logprobs, fused_kl, fused_logprobs
from kernels import reference


@pytest.fixture(params=[None, 3], ids=["blocks-default", "blocks-3rows"])
def row_block(request, monkeypatch):
    """Rows per elementwise block inside a chunk: the default (~1M logits), or 3 rows so that the
    blocks end inside chunks of 8 and the last block of a chunk is short."""
    if request.param is not None:
        vocab = LAYOUTS[request.node.callspec.params["layout"]][3]
        monkeypatch.setattr(reference, "BLOCK_ELEMENTS", request.param * vocab)
    return request.param


@pytest.mark.parametrize("chunk_size", [None, 8])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_chunked_logprobs_match_float64(layout, dtype_name, chunk_size, row_block):
    case = make_inputs(layout, DTYPES[dtype_name])

    def fn(h, w):
        return chunked_logprobs(h, w, case["targets"], TEMPERATURE, True, IGNORE, chunk_size)

    got = grads_of(fn, case["hidden"], case["weight"], case["g_lp"], case["g_ent"])
    check_logprobs(got, case, dtype_name)


@pytest.mark.parametrize("chunk_size", [None, 8])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_chunked_kl_matches_float64(layout, dtype_name, chunk_size, row_block):
    case = make_inputs(layout, DTYPES[dtype_name])

    def fn(h, w):
        return chunked_kl(h, w, case["ref_hidden"], case["ref_weight"], TEMPERATURE, chunk_size)

    check_kl(grads_of(fn, case["hidden"], case["weight"], case["g_kl"]), case, dtype_name)


@pytest.mark.parametrize("block_rows", [None, 1, 2])
def test_gradcheck_float64(block_rows, monkeypatch):
    """The hand-written backward of both autograd Functions against finite differences."""
    if block_rows is not None:
        monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 7 * block_rows)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, device="cpu").requires_grad_()
    w = torch.randn(7, 4, generator=g, dtype=torch.float64).requires_grad_()
    rh, rw = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 6, IGNORE, 3, 2])
    assert torch.autograd.gradcheck(lambda a, b: chunked_logprobs(a, b, t, 0.7, True, IGNORE, 2), (h, w))
    assert torch.autograd.gradcheck(lambda a, b: chunked_logprobs(a, b, t, 1.3, False, IGNORE, 3), (h, w))
    assert torch.autograd.gradcheck(lambda a, b: chunked_kl(a, b, rh, rw, 0.7, 2), (h, w))


def test_logprob_only_with_frozen_weight():
    """No entropy output and a weight without grad: the other backward branches."""
    case = make_inputs("weird", torch.float32)
    h = case["hidden"].detach().requires_grad_()
    lp = fused_logprobs(h, case["weight"], case["targets"], TEMPERATURE, backend="torch")
    assert isinstance(lp, torch.Tensor) and lp.shape == (37,)
    (lp.double() * case["g_lp"]).sum().backward()
    hh = case["hidden"].double().requires_grad_()
    ref = torch.log_softmax(hh @ case["weight"].double().T / TEMPERATURE, -1)
    keep = case["targets"] != IGNORE
    ref_lp = ref.gather(1, case["targets"].clamp_min(0)[:, None])[:, 0] * keep
    (ref_lp * case["g_lp"]).sum().backward()
    torch.testing.assert_close(lp.double(), ref_lp.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), hh.grad, atol=1e-5, rtol=1e-5)


def test_kl_of_a_model_with_itself_is_zero():
    case = make_inputs("weird", torch.float32)
    h = case["hidden"].detach().requires_grad_()
    kl = fused_kl(h, case["weight"], case["hidden"], case["weight"], TEMPERATURE, backend="torch")
    kl.sum().backward()
    assert kl.abs().max() < 1e-5 and h.grad.abs().max() < 1e-5


def test_temperature_scales_logits():
    """T enters as z / T: logprobs at T equal logprobs of hidden / T at T = 1."""
    case = make_inputs("weird", torch.float32)
    a = fused_logprobs(case["hidden"], case["weight"], case["targets"], 0.5, backend="torch")
    b = fused_logprobs(case["hidden"] / 0.5, case["weight"], case["targets"], 1.0, backend="torch")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert DEVICE in str(a.device)
