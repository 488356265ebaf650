"""Triton kernels of lynx-sglang (importable as ``lynx_sglang.kernels``)."""
