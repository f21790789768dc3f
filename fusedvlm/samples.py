"""Real photographs that ship inside installed wheels, for demos, tests and benchmarks offline.

Sources: scikit-image's bundled data (only images stored in the wheel itself; the ones
scikit-image fetches with pooch are left out) and matplotlib's ``sample_data``. Both packages
are imported lazily, only when a sample is requested.

Aspect ratios (W x H): square (astronaut 512x512, camera 512x512), landscape (chelsea 451x300,
coffee 600x400, rocket 640x427, motorcycle 741x500, hubble_deep_field 1000x872), portrait
(grace_hopper 512x600) and wide (page 384x191, text 448x172). ``camera``, ``page`` and ``text``
are grayscale (PIL mode 'L'); the others are RGB.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

__all__ = ["SAMPLE_NAMES", "sample_image"]


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _motorcycle() -> np.ndarray:
    import skimage.data

    left, _right, _disparity = skimage.data.stereo_motorcycle()
    return left


def _grace_hopper() -> Image.Image:
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        return image.convert("RGB")


_LOADERS: dict[str, Callable[[], np.ndarray | Image.Image]] = {
    "astronaut": _skimage("astronaut"),
    "camera": _skimage("camera"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "motorcycle": _motorcycle,
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "grace_hopper": _grace_hopper,
    "page": _skimage("page"),
    "text": _skimage("text"),
}

SAMPLE_NAMES: tuple[str, ...] = tuple(_LOADERS)


def sample_image(name: str) -> Image.Image:
    """A fresh PIL image (mode 'RGB' or 'L') of the named sample photograph."""
    loader = _LOADERS.get(name)
    if loader is None:
        raise ValueError(f"unknown sample image {name!r}; choose one of: {', '.join(SAMPLE_NAMES)}")
    image = loader()
    return image if isinstance(image, Image.Image) else Image.fromarray(image)
