"""The runtime: everything ``python -m sglang.launch_server --moe-backend lynx`` imports.

Dependency direction (enforced by tests/test_layout.py; no cycles, no tools):

    selection          the selection core: config, the torch reference (the spec), the
                       ExpertSelector plan/run stage, statistics layout; kernels/ (imported as
                       lynx_sglang.kernels) is its fused Triton backend
      <- expert_parallel   placement, all-to-all dispatch, traffic accounting, lynx_ep,
                           global (DeepEP-family) selection
        <- sglang          the SGLang integration: plugin entry point, flags, hooks, the
                           per-layer stage, phase, metrics, our a2a dispatcher
    cpu                fenced off: SGLang on CPU-only machines (standard library at import;
                       imports no other part of the runtime)

Evaluation, training and benchmark tools live outside (``lynx_sglang.accuracy``,
``lynx_sglang.train_model``, ``benchmarks/`` ...): they may import the runtime, never the
other way round.
"""
