"""Test set-up: kernels run in Triton's CPU interpreter unless LYNX_TEST_DEVICE=cuda."""

import os

# Must be decided before triton is imported anywhere.
DEVICE = os.environ.get("LYNX_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """Where kernels and references run in this test session."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("LYNX_TEST_DEVICE=cuda but no CUDA device")
    return torch.device(DEVICE)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same torch seed, so tests drawing random inputs are reproducible."""
    torch.manual_seed(0)
