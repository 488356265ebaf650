"""GPU-only: kernels (and lynx_ep) against the reference on CUDA, and CUDA-graph replay equal to eager runs."""

import pytest
import torch

from benchmarks.gpu_checks import agreement, cuda_graph_replay, rank_aware_agreement, residency_graph_replay

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_kernels_agree_with_the_reference_on_cuda():
    rows = agreement(torch.device("cuda"), [(128, 8, 0, 16), (256, 8, 1, 64), (64, 2, 2, 512)])
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


def test_rank_aware_selection_on_cuda_equals_cpu():
    rows = rank_aware_agreement(torch.device("cuda"), [(128, 8, 16), (256, 8, 64), (64, 2, 256)])
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


def test_cuda_graph_replay_equals_eager():
    rows = cuda_graph_replay(torch.device("cuda"))
    assert all(r["ok"] for r in rows), rows


def test_residency_mode_replays_a_resident_set_written_in_place():
    rows = residency_graph_replay(torch.device("cuda"))
    assert all(r["ok"] for r in rows), rows
