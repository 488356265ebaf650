"""``sgl_kernel`` as SGLang's spawned processes see it on a CPU-only machine; not a module of lynx_sglang.

``lynx_sglang.runtime.cpu.support.install()`` puts this directory first on ``sys.path`` of the
launcher, and multiprocessing's spawn copies that ``sys.path`` into every child before it
unpickles its target, which imports ``sgl_kernel`` before the child loads any plugin.
Importing this file swaps in the pure-torch stand-in.
"""

import sys

from lynx_sglang.runtime.cpu.support import install_sgl_kernel_standin

sys.modules[__name__] = install_sgl_kernel_standin()
