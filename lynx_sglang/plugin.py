"""SGLang plugin entry point (group ``sglang.srt.plugins``).

SGLang calls ``register()`` in every process before it parses arguments. The
hooks that add ``--moe-backend lynx`` and rewrite top-k are the SGLang
integration's work (issue 3); until they land, loading the plugin changes
nothing, so a server started without our flags behaves exactly as stock SGLang.
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
    logger.debug("lynx-sglang plugin loaded (no hooks registered yet)")
