"""Images as they come from cameras: the EXIF Orientation tag must be applied, so that a
phone photo taken upright reaches the model upright."""

import numpy as np
import pytest
from PIL import Image

from fusedvlm.preprocess import hd_views, load_image

# EXIF Orientation value -> the transpose that turns the upright picture into the stored
# pixels (the inverse of what a viewer applies).
STORED = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
}


def _upright() -> Image.Image:
    """40 x 24: red left half, blue right half, a green top band: any rotation or mirror shows."""
    a = np.zeros((24, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    a[:6] = (0, 255, 0)
    return Image.fromarray(a)


def _phone_jpeg(path, orientation: int) -> None:
    stored = _upright().transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    stored.save(path, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied(tmp_path, orientation):
    path = tmp_path / f"phone-{orientation}.jpg"
    _phone_jpeg(path, orientation)
    with Image.open(path) as raw:  # the file really is stored turned
        assert raw.getexif().get(0x0112) == orientation
        assert raw.size == ((24, 40) if orientation in (6, 8) else (40, 24))
    image = load_image(path)
    assert image.size == (40, 24)
    got = np.asarray(image.convert("RGB")).astype(int)
    want = np.asarray(_upright()).astype(int)
    assert np.abs(got - want).mean() < 8  # JPEG noise only
    # And the model's views are those of the upright picture.
    v_file = hd_views(image, 4, 32).views
    v_ref = hd_views(_upright(), 4, 32).views
    assert v_file.shape == v_ref.shape
    assert (v_file - v_ref).abs().mean() < 0.1


def test_image_without_exif_is_unchanged(tmp_path):
    path = tmp_path / "plain.png"
    _upright().save(path)
    assert np.array_equal(np.asarray(load_image(path).convert("RGB")), np.asarray(_upright()))
