"""Running stock SGLang on a CPU-only machine (development and tests); inert wherever a GPU exists.

Fenced off from the rest of the runtime: ``support`` imports only the standard library at module
level and no other part of lynx_sglang.runtime, so nothing on a GPU server depends on it.
"""
