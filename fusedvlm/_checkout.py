"""Bare-name imports of a checkout's top-level folders.

``kernels/`` and ``train/`` install as ``fusedvlm.kernels`` and ``fusedvlm.train``. Python started at
the checkout root (``python -c``, ``python -m pytest``, an interactive shell) has the root on
``sys.path`` before site-packages, so the folders are also found under their bare names, where
they would hide installed distributions of the same name: transformers 5 imports the PyPI package
``kernels`` from ``transformers.activations``. A folder imported under its bare name therefore
hands the import to the installed distribution, or fails as if the folder were not there.
"""

import importlib.util
import os
import sys
from importlib.machinery import PathFinder


def defer_to_installed(name: str, init_file: str) -> None:
    """Replace the module being imported as ``name`` (whose ``__init__.py`` is ``init_file``)
    with the distribution that ``sys.path`` would find without this checkout's root."""
    root = os.path.realpath(os.path.dirname(os.path.dirname(init_file)))
    path = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    spec = PathFinder.find_spec(name, path)
    if spec is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the folder {name}/ in {root} is fusedvlm.{name}: import it under that name)",
            name=name,
        )
    module = importlib.util.module_from_spec(spec)
    # The import system returns whatever sys.modules holds for the name once this __init__ ends.
    sys.modules[name] = module
    spec.loader.exec_module(module)
