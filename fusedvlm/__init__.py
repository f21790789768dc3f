"""fusedvlm: the fused vision-question language model of arXiv 2412.18387.

    from fusedvlm import FusedVLM, ChatSession, GenerationConfig, load_image

Importing this package is cheap and never touches CUDA: the public names below are imported on
first use (PEP 562), and heavy modules (open_clip, transformers, triton) where they are used.
"""

__version__ = "0.1.0"

_LAZY = {
    "FusedVLM": "fusedvlm.model",
    "ChatSession": "fusedvlm.session",
    "GenerationConfig": "fusedvlm.generation",
    "load_image": "fusedvlm.preprocess",
    "FusionModule": "fusedvlm.model.fusion_module",
    "FusionModuleConfig": "fusedvlm.config",
    "ModelConfig": "fusedvlm.config",
    "get_preset": "fusedvlm.config",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'fusedvlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
