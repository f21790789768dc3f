"""Offline sample photographs: every name loads, sizes and aspect ratios are as documented."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image

from fusedvlm.preprocess import hd_views, num_views
from fusedvlm.samples import SAMPLE_NAMES, sample_image

SIZES = {
    "astronaut": ((512, 512), "RGB"),
    "camera": ((512, 512), "L"),
    "chelsea": ((451, 300), "RGB"),
    "coffee": ((600, 400), "RGB"),
    "rocket": ((640, 427), "RGB"),
    "motorcycle": ((741, 500), "RGB"),
    "hubble_deep_field": ((1000, 872), "RGB"),
    "grace_hopper": ((512, 600), "RGB"),
    "page": ((384, 191), "L"),
    "text": ((448, 172), "L"),
}


def test_names_are_documented():
    assert set(SAMPLE_NAMES) == set(SIZES)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_loads_and_preprocesses(name):
    image = sample_image(name)
    assert isinstance(image, Image.Image)
    assert (image.size, image.mode) == SIZES[name]
    # A real photo, not a flat fill.
    lo, hi = image.convert("L").getextrema()
    assert hi - lo > 100
    out = hd_views(image, hd_num=9, size=112)
    assert out.num_views == num_views(*image.size, hd_num=9, size=112)
    assert torch.isfinite(out.views).all()


def test_sample_returns_fresh_image():
    first = sample_image("coffee")
    first.paste((0, 0, 0), (0, 0, 50, 50))
    assert sample_image("coffee").getpixel((0, 0)) != (0, 0, 0)


def test_aspect_ratios_covered():
    ratios = {name: w / h for name, ((w, h), _) in SIZES.items()}
    assert any(r == 1 for r in ratios.values())
    assert any(1.2 < r < 2 for r in ratios.values())
    assert any(r < 1 for r in ratios.values())
    assert any(r >= 2 for r in ratios.values())


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match=r"unknown sample image 'lena'; choose one of: astronaut, .*grace_hopper"):
        sample_image("lena")


def test_import_is_lazy():
    code = "import sys, fusedvlm.samples; print('skimage' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
