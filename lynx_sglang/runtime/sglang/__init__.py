"""The SGLang 0.5.23 integration: the plugin entry point (``plugin.register``), our flags
(``options``), every hook (``hooks.HOOKS``), the per-layer stage (``stage``), the decode phase
(``phase``), Prometheus metrics (``metrics``) and ``--moe-a2a-backend lynx`` (``a2a_dispatcher``)."""
