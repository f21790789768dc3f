"""HD-N preprocessing (design §2): counts, geometry, view order, inputs and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from fusedvlm.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_SIDE,
    hd_grid,
    hd_views,
    hd_views_batch,
    load_image,
    num_views,
    num_vision_tokens,
)

MEAN = np.array(CLIP_MEAN, dtype=np.float64)
STD = np.array(CLIP_STD, dtype=np.float64)
S = 28  # small view size keeps geometry tests fast; the design §2 tests use 336


def to_uint8(views: torch.Tensor) -> np.ndarray:
    """(V, 3, s, s) normalised -> (V, s, s, 3) uint8, inverting the CLIP normalisation."""
    x = views.permute(0, 2, 3, 1).double().numpy() * STD + MEAN
    levels = x * 255.0
    assert np.abs(levels - np.rint(levels)).max() < 1e-3, "normalised values are not 8-bit levels"
    return np.rint(levels).astype(np.uint8)


def assemble(views: torch.Tensor, grid: tuple[int, int], size: int) -> np.ndarray:
    """Local crops (row-major after the global view) -> the (rows*size, cols*size, 3) canvas."""
    rows, cols = grid
    crops = to_uint8(views[1:])
    return crops.reshape(rows, cols, size, size, 3).transpose(0, 2, 1, 3, 4).reshape(rows * size, cols * size, 3)


def blocks(rows: int, cols: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An image of rows x cols uniform size x size blocks, each a distinct colour."""
    colours = np.array(
        [[40 * r + 10, 30 * c + 20, 200 - 25 * (r * cols + c)] for r in range(rows) for c in range(cols)]
    )
    colours = colours.astype(np.uint8).reshape(rows, cols, 3)
    image = np.repeat(np.repeat(colours, size, axis=0), size, axis=1)
    return image, colours


# --- design §2 numbers------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width,height,grid,views,tokens",
    [
        (336, 336, (3, 3), 10, 1450),
        (640, 480, (3, 3), 10, 1450),
        (1920, 1080, (2, 3), 7, 1015),
        (1080, 1920, (3, 2), 7, 1015),
        (480, 640, (3, 3), 10, 1450),
    ],
)
def test_spec_counts(width, height, grid, views, tokens):
    assert hd_grid(width, height) == grid
    assert num_views(width, height) == views
    assert num_vision_tokens(width, height) == tokens
    out = hd_views(np.zeros((height, width, 3), dtype=np.uint8))
    assert out.grid == grid
    assert out.num_views == views
    assert out.views.shape == (views, 3, 336, 336)
    assert out.views.dtype == torch.float32
    assert out.image_size == (width, height)


@pytest.mark.parametrize(
    "width,height,hd_num,grid",
    [
        (640, 480, 1, (1, 1)),
        (50, 4000, 1, (1, 1)),
        (336, 336, 4, (2, 2)),
        (640, 480, 16, (3, 4)),
        (336, 336, 25, (5, 5)),
        (1920, 1080, 25, (4, 6)),
        (1080, 1920, 25, (6, 4)),
    ],
)
def test_other_hd_num(width, height, hd_num, grid):
    assert hd_grid(width, height, hd_num) == grid
    assert num_views(width, height, hd_num) == 1 + grid[0] * grid[1]
    assert grid[0] * grid[1] <= hd_num


def test_wide_image_grid_by_hand():
    # r = 3: s=5 -> 5*ceil(5/3)=10 > 9, s=4 -> 4*ceil(4/3)=8 <= 9; height int(1344/3)=448 -> 2 rows.
    assert hd_grid(3000, 1000, 9) == (2, 4)
    assert num_vision_tokens(3000, 1000, 9, tokens_per_view=145) == 9 * 145
    assert num_vision_tokens(3000, 1000, 9, tokens_per_view=10) == 90


# --- geometry and view order -------------------------------------------------------------------


def test_view_order_row_major_landscape():
    image, colours = blocks(3, 3, S)  # 84x84 == the 3x3 canvas, so the local resize is the identity
    out = hd_views(image, hd_num=9, size=S)
    assert out.grid == (3, 3)
    crops = to_uint8(out.views)
    for r in range(3):
        for c in range(3):
            assert (crops[1 + 3 * r + c] == colours[r, c]).all(), (r, c)
    # The global view is the whole image downsized: block centres keep their colour.
    centre = (np.arange(3) + 0.5) * S / 3
    for r in range(3):
        for c in range(3):
            pixel = crops[0, int(centre[r]), int(centre[c])].astype(int)
            assert np.abs(pixel - colours[r, c]).max() <= 2, (r, c)


def test_view_order_portrait_transposed_grid():
    # 56x84 (WxH) portrait: transposed it is 84x56, r=1.5 -> s=3, 2 rows; back: 3 rows x 2 cols.
    image, colours = blocks(3, 2, S)
    out = hd_views(Image.fromarray(image), hd_num=6, size=S)
    assert out.grid == (3, 2)
    assert hd_grid(56, 84, 6, S) == (3, 2)
    assert hd_grid(84, 56, 6, S) == (2, 3)
    crops = to_uint8(out.views)
    for r in range(3):
        for c in range(2):
            assert (crops[1 + 2 * r + c] == colours[r, c]).all(), (r, c)


@pytest.mark.parametrize("height", [49, 50, 51, 45])
def test_local_white_padding_centred(height):
    width = 84
    out = hd_views(np.zeros((height, width, 3), dtype=np.uint8), hd_num=9, size=S)
    canvas = assemble(out.views, out.grid, S)
    new_h = int(3 * S / (width / height))
    pad = canvas.shape[0] - new_h
    top = pad // 2
    assert canvas.shape == (out.grid[0] * S, 3 * S, 3)
    assert (canvas[:top] == 255).all()
    assert (canvas[top : top + new_h] == 0).all()
    assert (canvas[top + new_h :] == 255).all()
    # Portrait: the same padding lands on the left/right, left = floor(pad / 2).
    out_t = hd_views(np.zeros((width, height, 3), dtype=np.uint8), hd_num=9, size=S)
    assert out_t.grid == out.grid[::-1]
    canvas_t = assemble(out_t.views, out_t.grid, S)
    assert (canvas_t == canvas.transpose(1, 0, 2)).all()


def test_odd_padding_puts_extra_row_at_bottom():
    # The first height whose pad to 56 rows is odd: top = floor(pad / 2), one more row at the bottom.
    for height in range(30, 56):
        new_h = int(84 / (84 / height))
        if (56 - new_h) % 2 == 1:
            break
    out = hd_views(np.zeros((height, 84, 3), dtype=np.uint8), hd_num=9, size=S)
    canvas = assemble(out.views, out.grid, S)
    black = np.flatnonzero((canvas == 0).all(axis=(1, 2)))
    top, bottom = black[0], canvas.shape[0] - 1 - black[-1]
    assert bottom == top + 1


def test_global_letterbox_black_centred():
    # 56x28 white -> downsized to 28x14, black bands of 7 rows above and below.
    out = hd_views(np.full((28, 56, 3), 255, dtype=np.uint8), hd_num=9, size=S)
    glob = to_uint8(out.views[:1])[0]
    assert (glob[:7] == 0).all() and (glob[21:] == 0).all()
    assert (glob[7:21] == 255).all()
    # Portrait: bands on the left and right.
    out = hd_views(np.full((56, 28, 3), 255, dtype=np.uint8), hd_num=9, size=S)
    glob = to_uint8(out.views[:1])[0]
    assert (glob[:, :7] == 0).all() and (glob[:, 21:] == 0).all()
    assert (glob[:, 7:21] == 255).all()


def test_global_small_image_is_upscaled():
    # 14x7 white: letterboxed to 14x14 (3 black rows on top, 4 below), then bicubic up to 28x28.
    out = hd_views(np.full((7, 14, 3), 255, dtype=np.uint8), hd_num=4, size=S, global_view="antialias")
    glob = to_uint8(out.views[:1])[0].astype(int)
    assert glob.shape == (S, S, 3)
    assert (glob[:4] <= 10).all() and (glob[-6:] <= 10).all()
    assert (glob[10:18] >= 245).all()


def _authors_global_view(img: Image.Image, size: int) -> torch.Tensor:
    """The authors' image_expand2square (336 -> size) + Phi-3-V processor's global view:
    ToTensor, Normalize, torch bicubic resize without antialias."""
    import torchvision.transforms as T

    width, height = img.size
    if width != height:
        if width > height:
            if width > size:
                new_w, new_h = size, int(height * (size / width))
                img = img.resize((new_w, new_h), Image.LANCZOS)
                width, height = new_w, new_h
            side, left, top = width, 0, (width - height) // 2
        else:
            if height > size:
                new_w, new_h = int(width * (size / height)), size
                img = img.resize((new_w, new_h), Image.LANCZOS)
                width, height = new_w, new_h
            side, left, top = height, (height - width) // 2, 0
        canvas = Image.new(img.mode, (side, side))
        canvas.paste(img, (left, top))
        img = canvas
    x = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])(img)
    return torch.nn.functional.interpolate(x[None].float(), size=(size, size), mode="bicubic")[0]


@pytest.mark.parametrize("shape", [(100, 100), (90, 160), (160, 61), (20, 50), (51, 17), (56, 56), (28, 28), (13, 13)])
def test_global_view_matches_authors_code(shape):
    # High-frequency content, where antialiasing and the resampling filter matter most.
    rng = np.random.default_rng(sum(shape))
    image = Image.fromarray(rng.integers(0, 256, shape + (3,), dtype=np.uint8))
    out = hd_views(image, hd_num=4, size=S)
    torch.testing.assert_close(out.views[0], _authors_global_view(image, S), rtol=0, atol=1e-5)
    # The antialiased alternative is a different view on such images.
    clean = hd_views(image, hd_num=4, size=S, global_view="antialias")
    assert torch.equal(clean.views[1:], out.views[1:])
    if shape[0] == shape[1] and shape[0] > S:  # subsampled without antialiasing
        assert (clean.views[0] - out.views[0]).abs().mean() > 0.05


def test_normalisation_values():
    white = hd_views(np.full((S, S, 3), 255, dtype=np.uint8), hd_num=1, size=S).views
    black = hd_views(np.zeros((S, S, 3), dtype=np.uint8), hd_num=1, size=S).views
    assert white.shape == (2, 3, S, S)
    expect_white = torch.tensor((1 - MEAN) / STD, dtype=torch.float32).view(1, 3, 1, 1)
    expect_black = torch.tensor(-MEAN / STD, dtype=torch.float32).view(1, 3, 1, 1)
    torch.testing.assert_close(white, expect_white.expand_as(white), rtol=0, atol=1e-6)
    torch.testing.assert_close(black, expect_black.expand_as(black), rtol=0, atol=1e-6)
    grey = hd_views(np.full((S, S, 3), 128, dtype=np.uint8), hd_num=1, size=S).views
    ref = (torch.full((3,), 128 / 255, dtype=torch.float64) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(grey[0, :, 0, 0], ref.float(), rtol=0, atol=1e-6)


def _authors_hd_transform(img: Image.Image, hd_num: int, size: int) -> np.ndarray:
    """The authors' HD_transform + padding_336 (torchvision on PIL), with 336 -> size."""
    import torchvision.transforms.functional as TF

    width, height = img.size
    trans = width < height
    if trans:
        img = img.transpose(Image.TRANSPOSE)
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * size)
    new_h = int(new_w / ratio)
    img = TF.resize(img, [new_h, new_w])
    tar = int(np.ceil(new_h / size) * size)
    top = int((tar - new_h) / 2)
    img = TF.pad(img, [0, top, 0, tar - new_h - top], fill=(255, 255, 255))
    if trans:
        img = img.transpose(Image.TRANSPOSE)
    return np.asarray(img)


@pytest.mark.parametrize("shape,hd_num", [((300, 451), 9), ((600, 512), 9), ((97, 333), 16), ((333, 97), 5)])
def test_local_canvas_matches_authors_code(shape, hd_num):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, shape + (3,), dtype=np.uint8))
    size = 56
    out = hd_views(image, hd_num=hd_num, size=size)
    expected = _authors_hd_transform(image, hd_num, size)
    assert (assemble(out.views, out.grid, size) == expected).all()


# --- input types ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rgb_u8() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (37, 61, 3), dtype=np.uint8)


def _views(image) -> torch.Tensor:
    return hd_views(image, hd_num=4, size=S).views


def test_rgb_input_types_agree(rgb_u8):
    ref = _views(Image.fromarray(rgb_u8))
    t = torch.from_numpy(rgb_u8)
    same = [
        rgb_u8,
        np.asfortranarray(rgb_u8),
        rgb_u8.astype(np.float32) / 255.0,
        rgb_u8.astype(np.float64) / 255.0,
        np.dstack([rgb_u8, np.full(rgb_u8.shape[:2], 255, np.uint8)]),  # opaque RGBA
        t,
        t.permute(2, 0, 1),
        t.permute(2, 0, 1).float() / 255.0,
        (t.float() / 255.0).to(torch.bfloat16).float(),
        t.float().div(255.0).requires_grad_(True),
        Image.fromarray(rgb_u8).convert("RGBA"),
    ]
    for i, image in enumerate(same):
        out = _views(image)
        if i == 8:  # bf16 keeps ~3 significant digits: allow one 8-bit level
            torch.testing.assert_close(out, ref, rtol=0, atol=1.01 / 255 / min(CLIP_STD))
        else:
            assert torch.equal(out, ref), i


def test_grayscale_inputs_replicate_channels(rgb_u8):
    gray = rgb_u8[..., 0]
    ref = _views(np.repeat(gray[..., None], 3, axis=2))
    for image in [
        gray,
        gray[..., None],
        Image.fromarray(gray),
        torch.from_numpy(gray),
        torch.from_numpy(gray)[None],
        Image.fromarray(gray).convert("LA"),
    ]:
        assert torch.equal(_views(image), ref)


def test_alpha_dropped_by_default():
    # The authors' convert("RGB"): transparent pixels keep their stored colour.
    rgba = np.zeros((S, S, 4), dtype=np.uint8)
    rgba[..., 1] = 90
    rgba[:, : S // 2, 3] = 0
    rgba[:, S // 2 :, 3] = 255
    ref = _views(rgba[..., :3].copy())
    for image in [rgba, Image.fromarray(rgba), torch.from_numpy(rgba).permute(2, 0, 1)]:
        assert torch.equal(_views(image), ref)
        assert torch.equal(_views(image), hd_views(Image.fromarray(rgba).convert("RGB"), hd_num=4, size=S).views)
    with pytest.raises(ValueError, match="alpha must be one of"):
        hd_views(rgba, hd_num=1, size=S, alpha="black")
    with pytest.raises(ValueError, match="global_view must be one of"):
        hd_views(rgba, hd_num=1, size=S, global_view="lanczos")


def test_alpha_composited_on_white():
    rgba = np.zeros((S, S, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, : S // 2, 3] = 0  # left half transparent
    rgba[:, S // 2 :, 3] = 255
    expected = np.zeros((S, S, 3), dtype=np.uint8)
    expected[:, : S // 2] = 255
    expected[:, S // 2 :] = (200, 0, 0)
    for image in [rgba, Image.fromarray(rgba), torch.from_numpy(rgba).permute(2, 0, 1)]:
        out = hd_views(image, hd_num=1, size=S, alpha="white")
        assert (to_uint8(out.views[1:2])[0] == expected).all()
    half = rgba.copy()
    half[..., 3] = 128
    out = hd_views(half, hd_num=1, size=S, alpha="white")
    pixel = to_uint8(out.views[1:2])[0, 0, 0]
    assert tuple(pixel) == (round(200 * 128 / 255 + 255 * 127 / 255), round(255 * 127 / 255), round(255 * 127 / 255))


def test_palette_modes():
    rgb = np.zeros((S, S, 3), dtype=np.uint8)
    rgb[:, S // 2 :] = (0, 0, 255)
    pal = Image.fromarray(rgb).convert("P")
    assert torch.equal(_views(pal), _views(rgb))
    pal.info["transparency"] = pal.getpixel((0, 0))  # the black index becomes transparent
    assert torch.equal(_views(pal), _views(rgb))  # dropped, as the authors do
    expected = rgb.copy()
    expected[:, : S // 2] = 255
    white = hd_views(pal, hd_num=4, size=S, alpha="white").views
    assert torch.equal(white, _views(expected))


def test_sixteen_bit_and_float_modes():
    values = np.array([[0, 65535], [32896, 257]], dtype=np.uint16).repeat(S // 2, 0).repeat(S // 2, 1)
    expected = np.array([[0, 255], [128, 1]], dtype=np.uint8).repeat(S // 2, 0).repeat(S // 2, 1)
    ref = _views(expected)
    assert torch.equal(_views(Image.fromarray(values)), ref)  # mode I;16
    assert torch.equal(_views(Image.fromarray(values.astype(np.int32))), ref)  # mode I
    assert torch.equal(_views(Image.fromarray(expected.astype(np.float32) / 255.0)), ref)  # mode F
    assert torch.equal(_views(Image.fromarray(expected > 0)), _views(np.where(expected > 0, 255, 0).astype(np.uint8)))


def test_other_pil_modes_convert(rgb_u8):
    image = Image.fromarray(rgb_u8)
    for mode in ("CMYK", "YCbCr"):
        converted = image.convert(mode)
        assert torch.equal(_views(converted), _views(converted.convert("RGB")))


def test_batch():
    images = [np.zeros((30, 90, 3), np.uint8), np.full((90, 30, 3), 255, np.uint8), np.zeros((28, 28), np.uint8)]
    views, counts = hd_views_batch(images, hd_num=9, size=S)
    assert counts == [num_views(90, 30, 9, S), num_views(30, 90, 9, S), num_views(28, 28, 9, S)]
    assert views.shape == (sum(counts), 3, S, S)
    singles = torch.cat([hd_views(im, 9, S).views for im in images])
    assert torch.equal(views, singles)
    empty, none = hd_views_batch([], hd_num=9, size=S)
    assert empty.shape == (0, 3, S, S) and none == []


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image,match",
    [
        (np.zeros((0, 5, 3), np.uint8), "zero size"),
        (np.zeros((5, 0), np.uint8), "zero size"),
        (torch.zeros(3, 0, 4), "zero size"),
        (np.zeros((2, MAX_SIDE + 1), np.uint8), "above the 32768 px limit"),
        (np.full((4, 4, 3), np.nan, np.float32), "non-finite"),
        (np.full((4, 4), np.inf), "non-finite"),
        (np.full((4, 4, 3), 2.0, np.float32), r"must lie in \[0, 1\]"),
        (np.full((4, 4, 3), -0.1), r"must lie in \[0, 1\]"),
        (torch.full((3, 4, 4), 255.0), r"must lie in \[0, 1\]"),
        (np.zeros((4, 4, 2), np.uint8), "1, 3 or 4 channels"),
        (np.zeros((4, 4, 5), np.uint8), "1, 3 or 4 channels"),
        (torch.zeros(5, 5, 6, dtype=torch.uint8), "1, 3 or 4 channels"),
        (torch.zeros(2, 5, 5, dtype=torch.uint8), "1, 3 or 4 channels"),
        (np.zeros((1, 4, 4, 3), np.uint8), "HxW or HxWxC"),
        (np.zeros(4, np.uint8), "HxW or HxWxC"),
        (np.zeros((4, 4, 3), np.int64), "unsupported dtype int64"),
        (np.zeros((4, 4, 3), np.uint16), "unsupported dtype uint16"),
        (torch.zeros(3, 4, 4, dtype=torch.int32), "unsupported dtype int32"),
        ([[0, 1], [2, 3]], "unsupported image type list"),
        ("photo.jpg", "unsupported image type str"),
        (np.zeros((1, 20000, 3), np.uint8), "too extreme"),
        (Image.fromarray(np.full((3, 3), 70000, np.int32)), r"\[0, 65535\]"),
        (Image.new("RGB", (0, 5)), "zero size"),
    ],
)
def test_bad_images(image, match):
    with pytest.raises(ValueError, match=match):
        hd_views(image, hd_num=9, size=S)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hd_num=0), "hd_num must be >= 1"),
        (dict(hd_num=2.5), "hd_num must be an integer"),
        (dict(hd_num=True), "hd_num must be an integer"),
        (dict(size=0), "size must be >= 1"),
        (dict(hd_num=10**4), "local canvas 33600 px long"),
    ],
)
def test_bad_parameters(kwargs, match):
    args = dict(hd_num=9, size=336) | kwargs
    with pytest.raises(ValueError, match=match):
        hd_views(np.zeros((8, 8, 3), np.uint8), **args)
    with pytest.raises(ValueError, match=match):
        num_views(8, 8, **args)


@pytest.mark.parametrize(
    "width,height,match",
    [
        (0, 10, "zero size"),
        (10, -1, "must be >= 0"),
        (MAX_SIDE + 1, 10, "above the 32768 px limit"),
        (MAX_SIDE, 1, "too extreme"),
        (10.0, 10, "width must be an integer"),
    ],
)
def test_num_views_bad_sizes(width, height, match):
    with pytest.raises(ValueError, match=match):
        num_views(width, height)
    with pytest.raises(ValueError, match="tokens_per_view must be >= 1"):
        num_vision_tokens(640, 480, tokens_per_view=0)


def test_load_image(tmp_path, rgb_u8):
    good = tmp_path / "ok.png"
    Image.fromarray(rgb_u8).save(good)
    image = load_image(good)
    assert image.size == (61, 37)
    assert torch.equal(_views(image), _views(rgb_u8))
    assert load_image(str(good)).size == (61, 37)
    with pytest.raises(FileNotFoundError, match="image file not found"):
        load_image(tmp_path / "missing.png")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(text)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(truncated)
    with pytest.raises(ValueError, match="is a directory"):
        load_image(tmp_path)


# --- property: the arithmetic agrees with the images --------------------------------------------


@settings(max_examples=30, deadline=None)
@given(width=st.integers(1, 400), height=st.integers(1, 400), hd_num=st.integers(1, 30))
@example(width=400, height=10, hd_num=1)  # r = 40 > size: the resized short side would be 0 px
@example(width=10, height=400, hd_num=1)
def test_num_views_matches_hd_views(width, height, hd_num):
    image = np.zeros((height, width, 3), dtype=np.uint8)
    try:
        expected = num_views(width, height, hd_num, S)
    except ValueError as exc:
        with pytest.raises(ValueError, match=str(exc).split(":")[0]):
            hd_views(image, hd_num, S)
        return
    out = hd_views(image, hd_num, S)
    assert out.num_views == expected == out.views.shape[0]
    rows, cols = out.grid
    assert (rows, cols) == hd_grid(width, height, hd_num, S)
    assert rows * cols <= hd_num
    long_cols = cols if width >= height else rows
    ratio = max(width, height) / min(width, height)
    assert long_cols * math.ceil(long_cols / ratio) <= hd_num < (long_cols + 1) * math.ceil((long_cols + 1) / ratio)
