"""The installed package: entry point, kernel namespace."""

from importlib.metadata import entry_points


def test_sglang_plugin_entry_point_is_registered_and_loads():
    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "lynx"]
    assert len(eps) == 1 and eps[0].value == "lynx_sglang.plugin:register"
    register = eps[0].load()
    register()
    register()  # idempotent: SGLang loads plugins in several processes and paths


def test_kernels_import_under_our_namespace():
    import lynx_sglang.kernels.expert_selection as ks

    assert ks.__file__.replace("\\", "/").endswith("kernels/expert_selection.py")
    assert ks.__name__ == "lynx_sglang.kernels.expert_selection"


def test_sglang_loads_our_plugin():
    import sglang.srt.plugins as plugins

    loaded = plugins.load_plugins_by_group(plugins.GENERAL_PLUGINS_GROUP)
    assert "lynx" in loaded
