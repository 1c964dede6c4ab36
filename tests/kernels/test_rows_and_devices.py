"""Rows (N = 1, masked rows at no cost, every row masked, bad targets), bit-identical gradients,
addressing past 2^31 logits, and the device guards (launch device, unsupported GPUs)."""
import importlib
import types
import warnings

import pytest
import torch
from kernel_cases import DEVICE, IGNORE, TEMPERATURE, make_inputs

from kernels import _dispatch, fused_kl, fused_logprobs, reference

BACKENDS = ["torch", "triton"]


def _grads(fn, h, w):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    out = fn(h, w)
    out = out if isinstance(out, tuple) else (out,)
    sum(o.double().mul(i + 1).sum() for i, o in enumerate(out)).backward()
    return (*out, h.grad, w.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_row(backend):
    case = make_inputs("weird", torch.float32)
    h, w, t = case["hidden"][:1], case["weight"], case["targets"][:1]
    lp, ent, dh, dw = _grads(lambda a, b: fused_logprobs(a, b, t, TEMPERATURE, True, backend), h, w)
    logp = (h.double() @ w.double().T / TEMPERATURE).log_softmax(-1)
    torch.testing.assert_close(lp.double(), logp[:, t[0]], atol=1e-5, rtol=1e-5)
    kl = fused_kl(h, w, case["ref_hidden"][:1], case["ref_weight"], TEMPERATURE, backend)
    assert kl.shape == (1,) and kl.item() > 0 and dh.abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_masked(backend):
    case = make_inputs("weird", torch.float32)
    none = torch.full_like(case["targets"], IGNORE)
    lp, ent, dh, dw = _grads(lambda a, b: fused_logprobs(a, b, none, TEMPERATURE, True, backend),
                             case["hidden"], case["weight"])
    assert not lp.any() and not ent.any() and not dh.any() and not dw.any()
    off = torch.zeros_like(none, dtype=torch.bool)
    kl, dh, dw = _grads(lambda a, b: fused_kl(a, b, case["ref_hidden"], case["ref_weight"], TEMPERATURE,
                                              backend, mask=off), case["hidden"], case["weight"])
    assert not kl.any() and not dh.any() and not dw.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_mask_skips_rows(backend):
    """Masked rows read 0 and get no gradient; the others equal an unmasked call."""
    case = make_inputs("weird", torch.float32)
    mask = case["targets"] != IGNORE

    def call(m):
        return _grads(lambda a, b: fused_kl(a, b, case["ref_hidden"], case["ref_weight"], TEMPERATURE, backend,
                                            mask=m), case["hidden"], case["weight"])

    kl, dh, _ = call(mask)
    full, dh_full, _ = call(None)
    assert not kl[~mask].any() and not dh[~mask].any()
    torch.testing.assert_close(kl[mask], full[mask], atol=0, rtol=0)
    torch.testing.assert_close(dh[mask], dh_full[mask], atol=1e-6, rtol=1e-5)


def test_masked_rows_cost_no_flops(monkeypatch):
    """Only kept rows reach a GEMM (torch path) or a kernel program (Triton path)."""
    case = make_inputs("weird", torch.float32)
    kept = int((case["targets"] != IGNORE).sum())
    seen = []
    real = reference._logits
    monkeypatch.setattr(reference, "_logits", lambda h, w, t: seen.append(h.shape[0]) or real(h, w, t))
    _grads(lambda a, b: fused_logprobs(a, b, case["targets"], TEMPERATURE, True, "torch"),
           case["hidden"], case["weight"])
    assert seen == [kept, kept]  # forward, backward
    lp_mod = importlib.import_module("kernels.triton_logprob")
    launched = []
    real_rows = lp_mod.kept_rows
    monkeypatch.setattr(lp_mod, "kept_rows", lambda keep: launched.append(real_rows(keep)) or launched[-1])
    fused_logprobs(case["hidden"], case["weight"], case["targets"], TEMPERATURE, backend="triton")
    assert [r.numel() for r in launched] == [kept]


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_targets_are_one_clear_error(backend):
    case = make_inputs("weird", torch.float32)
    for bad in (1271, -1):
        t = case["targets"].clone()
        t[3] = bad
        with pytest.raises(ValueError, match=rf"target {bad} at row 3 is outside \[0, 1271\)"):
            fused_logprobs(case["hidden"], case["weight"], t, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_bit_identical_run_to_run(backend):
    """Two fresh forward + backward passes (torch: chunks of 8 rows, so d_weight sums 5 chunks)."""
    case = make_inputs("strided", torch.float32)
    kw = dict(chunk_size=8) if backend == "torch" else {}
    runs = []
    for _ in range(2):
        if backend == "torch":
            fn = lambda a, b: reference.chunked_logprobs(a, b, case["targets"], TEMPERATURE, True, IGNORE, **kw)  # noqa: E731
        else:
            fn = lambda a, b: fused_logprobs(a, b, case["targets"], TEMPERATURE, True, backend, IGNORE)  # noqa: E731
        runs.append(_grads(fn, case["hidden"], case["weight"])
                    + _grads(lambda a, b: fused_kl(a, b, case["ref_hidden"], case["ref_weight"], TEMPERATURE,
                                                   backend), case["hidden"], case["weight"]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_past_2_31_logits(backend):
    """N·V = 1.7M × 1271 > 2^31 with H = 4 (27 MB of hidden states): four sampled rows, one of them
    the last, are computed (the rest ignored) through a transposed hidden view, against float64.
    Nothing may flatten a row × vocab index into 32 bits."""
    n, h, v = 1_700_000, 4, 1271
    assert n * v > 2**31
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(h, n, generator=g).to(DEVICE).T  # (N, H) strides (1, N)
    weight = torch.randn(v, h, generator=g).to(DEVICE)
    rows = torch.tensor([0, 7, n - 40, n - 1])
    targets = torch.full((n,), IGNORE, device=DEVICE)
    targets[rows] = torch.tensor([3, v - 1, 600, 1270], device=DEVICE)
    lp, _, dh, _ = _grads(lambda a, b: fused_logprobs(a, b, targets, TEMPERATURE, True, backend), hidden, weight)
    logp = (hidden[rows].double() @ weight.double().T / TEMPERATURE).log_softmax(-1)
    want = logp.gather(1, targets[rows, None].long())[:, 0]
    torch.testing.assert_close(lp[rows].double(), want, atol=1e-5, rtol=1e-5)
    assert int((lp != 0).sum()) == 4 and int((dh.abs().sum(1) > 0).sum()) == 4


def _cuda_stub(index: int = 0):
    return types.SimpleNamespace(device=torch.device("cuda", index), is_cuda=True, dtype=torch.bfloat16)


def test_unsupported_gpu_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    monkeypatch.setattr(torch.version, "hip", None)
    stub = _cuda_stub()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _dispatch.resolve_backend("auto", stub, stub) == "torch"
        assert _dispatch.resolve_backend("auto", stub, stub) == "torch"
    assert len(caught) == 1 and "compute capability 7.5" in str(caught[0].message)
    with pytest.raises(_dispatch.KernelBackendError, match="compute capability 7.5"):
        _dispatch.resolve_backend("triton", stub, stub)
    monkeypatch.setattr(torch.version, "hip", "6.2")  # an MI300
    assert "ROCm" in _dispatch.unsupported(stub, stub)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _dispatch.unsupported(stub, stub) is None
    assert "float64" in _dispatch.unsupported(types.SimpleNamespace(**{**vars(stub), "dtype": torch.float64}), stub)


def test_launch_guard_and_shared_memory_come_from_the_tensors_device(monkeypatch):
    lp_mod = importlib.import_module("kernels.triton_logprob")
    guard = lp_mod.on_device(_cuda_stub(1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # not the current device
    props = types.SimpleNamespace(major=8, minor=9, shared_memory_per_block_optin=101376)
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: asked.append(d) or props)
    assert lp_mod.device_shared_kib(torch.device("cuda", 1)) == 99 and asked == [torch.device("cuda", 1)]
    props.shared_memory_per_block_optin = 0  # a torch without the property: the capability table
    props.major, props.minor = 9, 0
    assert lp_mod.device_shared_kib(torch.device("cuda", 1)) == 227
