"""The scripts of tools/ as modules, for their tests."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def tool_module(name: str):
    """tools/<name>.py as a module, importing its sibling steps.py as its script run would."""
    tools = os.path.join(ROOT, "tools")
    sys.path.insert(0, tools)
    spec = importlib.util.spec_from_file_location(name, os.path.join(tools, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
        sys.modules.pop("steps", None)
        sys.path.remove(tools)
