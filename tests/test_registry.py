"""kiln.registry: a registry imports its own plug-in modules, once, when first asked."""
from __future__ import annotations

import sys

import pytest

from kiln.errors import KilnError
from kiln.registry import Registry

PLUGIN = '''
from test_registry_host import REG
REG.register("b")("from the plug-in")
'''


def test_plugins_load_on_first_lookup_and_unknown_names_list_them(tmp_path, monkeypatch):
    (tmp_path / "kiln_test_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("widget", ("kiln_test_plugin",))
    host = type(sys)("test_registry_host")
    host.REG = reg
    monkeypatch.setitem(sys.modules, "test_registry_host", host)
    reg.register("a")("built in")
    assert "kiln_test_plugin" not in sys.modules
    assert reg.get("a") == "built in" and "kiln_test_plugin" not in sys.modules   # known: nothing imported
    assert reg.get("b") == "from the plug-in"
    with pytest.raises(KilnError, match="unknown widget 'c'; known: a, b"):
        reg.get("c")
    monkeypatch.delitem(sys.modules, "kiln_test_plugin")


def test_a_misspelt_plugin_module_is_a_programming_error_not_a_silent_skip():
    with pytest.raises(ModuleNotFoundError):
        Registry("widget", ("kiln_no_such_module",)).names()
