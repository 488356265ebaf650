"""SGLang plugin entry point (group ``sglang.srt.plugins``).

SGLang calls ``register()`` in every process (launcher, scheduler, TP workers)
before it parses arguments or imports its kernels.
"""

import logging

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Entry point called by ``sglang.srt.plugins.load_plugins``; idempotent."""
    global _registered
    if _registered:
        return
    _registered = True
    from lynx_sglang.runtime.cpu import support as cpu_support
    from lynx_sglang.runtime.sglang import hooks

    # Inert on machines with a GPU; on CPU-only machines it stands in for sgl-kernel's missing CPU build.
    cpu_support.install()
    # Flags are always added; the hot-path hooks pass through unless --moe-backend lynx built a stage.
    hooks.register_hooks()
    logger.debug("lynx-sglang plugin loaded")
