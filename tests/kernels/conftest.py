"""Kernel tests run the Triton kernels under the interpreter on CPU (RLHF_TEST_DEVICE=cuda: on a GPU).

TRITON_INTERPRET must be set before the first ``@triton.jit`` decorator runs; ``kernels`` imports
its Triton modules lazily, so setting it here (at collection) is early enough, and the dispatcher
sets it too on the first CPU ``backend="triton"`` call.
"""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers in kernel_cases.py

if os.environ.get("RLHF_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output buffer the kernels allocate starts as NaN: an unwritten element fails the test."""
    from kernels import _dispatch

    def nan_empty(*shape, device, dtype=torch.float32):
        return torch.full(shape, math.nan, device=device, dtype=dtype)

    monkeypatch.setattr(_dispatch, "empty", nan_empty)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpreter_heavy: a Triton-interpreter case of several seconds (run by default and in CI; "
        "-m 'not interpreter_heavy' leaves them out of a quick local run)")
