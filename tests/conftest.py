import os

# Tests never download: models come from configs, tokenizers are trained locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RLHF_NO_PROGRESS", "1")

# The Triton kernels run in the interpreter on CPU. triton.jit picks compiled vs interpreted when a
# function is decorated, and transformers imports triton.language early, so the switch must be set
# before any test module imports anything (gpu_check.sh sets RLHF_TEST_DEVICE=cuda to skip this).
if os.environ.get("RLHF_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread beats two (OpenMP sync per op costs more than the math, and on a
    shared 2-core machine two threads thrash: measured 10-20x slower, erratic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_fp_state():
    """In-process CLI runs flush denormals (process-wide); hypothesis needs IEEE subnormals back."""
    yield
    torch.set_flush_denormal(False)
