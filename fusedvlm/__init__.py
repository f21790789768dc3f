"""fusedvlm: the fused vision-question language model of arXiv 2412.18387.

Importing this package is cheap and never touches CUDA: heavy modules (open_clip,
transformers, triton) are imported where they are used.
"""

__version__ = "0.1.0"
