"""The selection core: router/policy configuration, the torch reference (the spec of every
policy), the ``ExpertSelector`` plan/run stage and its statistics layout. Imports nothing else
of the runtime; its Triton backend is ``lynx_sglang.kernels``."""
