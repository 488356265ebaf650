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


# float32 (the bundled model is stored in bf16) so batching order cannot flip a greedy pick on a near tie.
STOCK_ARGS = ("--dtype", "float32")
STOCK_PROMPTS = 6  # client.PROMPTS[:6]
STOCK_MAX_NEW = 16


@pytest.fixture(scope="session")
def stock(tmp_path_factory):
    """Reference answers of one stock single-process CPU server (no --moe-backend), shared by the server tests:
    ``greedy`` (output ids of the first STOCK_PROMPTS prompts, STOCK_MAX_NEW tokens each) and ``prefill``
    (prompt log-probabilities of the second prompt)."""
    if torch.cuda.is_available():
        pytest.skip("CPU server tests (launch/cpu_server.sh)")
    from lynx_sglang.client import PROMPTS
    from lynx_sglang.server_process import running_server

    with running_server(*STOCK_ARGS, log_dir=tmp_path_factory.mktemp("stock")) as srv:
        greedy = [srv.generate(p, max_new_tokens=STOCK_MAX_NEW)["output_ids"] for p in PROMPTS[:STOCK_PROMPTS]]
        out = srv.post("/generate", {"text": PROMPTS[1], "sampling_params": {"temperature": 0.0, "max_new_tokens": 1},
                                     "return_logprob": True, "logprob_start_len": 0})
        prefill = [lp for lp, _tok, *_ in out["meta_info"]["input_token_logprobs"] if lp is not None]
    return {"greedy": greedy, "prefill": prefill}
