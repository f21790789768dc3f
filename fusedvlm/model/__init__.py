"""Model: vision tower, fusion decoder, projection and the frozen LLM."""

from fusedvlm.model.fusion import FusionCache, FusionDecoder
from fusedvlm.model.fusion_module import FusedTokens, FusionModule, FusionModuleConfig, VisionPrefix
from fusedvlm.model.vlm import FusedVLM

__all__ = [
    "FusedTokens",
    "FusedVLM",
    "FusionCache",
    "FusionDecoder",
    "FusionModule",
    "FusionModuleConfig",
    "VisionPrefix",
]
