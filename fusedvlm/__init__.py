"""fusedvlm: the fused vision-question language model of arXiv 2412.18387.

Importing this package is cheap and never touches CUDA: heavy modules (open_clip,
transformers, triton) are imported where they are used.
"""

__version__ = "0.1.0"

_LAZY = {
    "FusionModule": "fusedvlm.model.fusion_module",
    "FusionModuleConfig": "fusedvlm.config",
}


def __getattr__(name: str):
    # Module-level __getattr__ (PEP 562): `fusedvlm.FusionModule` imports torch only when used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fusedvlm' has no attribute {name!r}")
