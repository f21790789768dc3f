"""HD-N image preprocessing: one global view plus up to N local crops (design §2).

Local views (the authors' ``HD_transform`` + ``padding_336``):

* transpose portrait images (``Image.TRANSPOSE``, a mirror about the main diagonal, as the
  authors do) so that the long side is horizontal and r = W / H >= 1;
* s = the largest integer with ``s * ceil(s / r) <= N``;
* resize to ``(s * size, int(s * size / r))`` with PIL bilinear (PIL widens the filter support
  when downscaling, i.e. it antialiases);
* pad the height with white (255) to a multiple of ``size``, top = floor(pad / 2);
* transpose back and cut row-major into ``size x size`` crops.

Global view (``global_view="authors"``, the default: the authors' ``image_expand2square`` then
their Phi-3-V processor): a non-square image whose long side exceeds ``size`` is downsized with
PIL LANCZOS to long side ``size`` and short side ``int(short * size / long)``; it is letterboxed
to a square with black (0) padding (left/top = floor(pad / 2)); a square image is left as it
is. The square is normalised, then resized to ``size x size`` with torch bicubic interpolation
**without** antialiasing (a square photo larger than ``size`` is thus subsampled, aliasing
included, exactly as the authors' models saw it in training).
``global_view="antialias"``: PIL bicubic (antialiased) to long side ``size`` (short side
rounded), letterbox, PIL bicubic to ``size x size``: a cleaner view, not the authors'.

Local views are resized by PIL as the authors' torchvision-on-PIL code does, bit for bit.

View order: ``[global, local(0,0), local(0,1), ..., local(R-1,C-1)]``; views are float32 in
CHW layout, normalised with the OpenAI CLIP mean/std.

Input conventions (decided here):

* PIL images of any mode PIL can turn into RGB; 16-bit modes ('I;16*', and 'I' with values
  in [0, 65535]) are scaled to 8 bits; 'F' is read like a float array.
* numpy arrays HxW, HxWx1, HxWx3, HxWx4; torch tensors of the same layouts or CxHxW. A 3-D
  tensor whose first dimension is 1, 3 or 4 is read as CxHxW (torch convention), otherwise as
  HxWxC. dtype uint8, or floating with values in [0, 1] (rounded to 8 bits, as every photo
  source is 8-bit and PIL resamples uint8).
* Transparency (RGBA, LA, PA, palette with a transparent index): ``alpha="drop"`` (the default)
  drops the alpha channel like the authors' ``convert("RGB")``, exposing whatever colour the
  encoder left in transparent pixels; ``alpha="white"`` composites on white (the local-view
  padding colour, what a viewer shows on a white page).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "MAX_SIDE",
    "HDViews",
    "hd_grid",
    "hd_views",
    "hd_views_batch",
    "load_image",
    "upright",
    "num_views",
    "num_vision_tokens",
    "to_rgb",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Largest accepted side, for inputs and for the local-view canvas: beyond this an image is
# almost surely a mistake and the canvas would need gigabytes.
MAX_SIDE = 2**15
# Default limit of an image's decoded size, checked from its header before it is decoded. A
# 12000x12000 PNG of 450 KB took 5.1 GB of memory through load_image + hd_views (2-core AMD EPYC,
# fp32); 8000x5000 (40 MP) takes 1.05 GB. 40 MP passes the photos of 24 MP cameras and phones
# (their 48-50 MP modes need --max-image-pixels). PIL itself refuses above 2 x its
# MAX_IMAGE_PIXELS (179 MP) whatever this limit says.
DEFAULT_MAX_PIXELS = 40_000_000

_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
GLOBAL_VIEWS = ("authors", "antialias")
ALPHA_MODES = ("drop", "white")


@dataclass(frozen=True)
class HDViews:
    """Views of one image: ``views`` (V, 3, size, size) float32, ``grid`` (rows, cols) of the
    local crops, ``image_size`` (W, H) of the input. V = 1 + rows * cols."""

    views: torch.Tensor
    grid: tuple[int, int]
    image_size: tuple[int, int]

    @property
    def num_views(self) -> int:
        return self.views.shape[0]


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _check_image_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image has zero size: {width}x{height} (WxH)")
    if width > MAX_SIDE or height > MAX_SIDE:
        raise ValueError(f"image {width}x{height} (WxH) has a side above the {MAX_SIDE} px limit")


def _local_plan(width: int, height: int, hd_num: int, size: int) -> tuple[bool, int, int]:
    """(transposed, s, resized height) of the local canvas in landscape orientation."""
    width = _check_int("width", width, 0)
    height = _check_int("height", height, 0)
    hd_num = _check_int("hd_num", hd_num, 1)
    size = _check_int("size", size, 1)
    _check_image_size(width, height)
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    s = 1
    while (s + 1) * math.ceil((s + 1) / ratio) <= hd_num:
        s += 1
    new_w = s * size
    if new_w > MAX_SIDE:
        raise ValueError(
            f"hd_num={hd_num}, size={size} gives a local canvas {new_w} px long, above the {MAX_SIDE} px limit"
        )
    # Same float expression as the authors (new_w / ratio, truncated), so grids match exactly.
    new_h = int(new_w / ratio)
    if new_h == 0:
        raise ValueError(
            f"aspect ratio of {width}x{height} is too extreme for hd_num={hd_num}, size={size}: "
            f"local views would be resized to 0 px on the short side"
        )
    return transposed, s, new_h


def hd_grid(width: int, height: int, hd_num: int = 9, size: int = 336) -> tuple[int, int]:
    """(rows, cols) of the local crops for a ``width x height`` image."""
    transposed, s, new_h = _local_plan(width, height, hd_num, size)
    rows = -(-new_h // size)
    return (s, rows) if transposed else (rows, s)


def num_views(width: int, height: int, hd_num: int = 9, size: int = 336) -> int:
    """Number of views (1 global + rows * cols local) of a ``width x height`` image."""
    rows, cols = hd_grid(width, height, hd_num, size)
    return 1 + rows * cols


def num_vision_tokens(width: int, height: int, hd_num: int = 9, tokens_per_view: int = 145, size: int = 336) -> int:
    """Vision-prefix length of one image: ``num_views * tokens_per_view`` (145 = 12x12 + LF)."""
    tokens_per_view = _check_int("tokens_per_view", tokens_per_view, 1)
    return num_views(width, height, hd_num, size) * tokens_per_view


def _float_to_uint8(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError("image contains non-finite values (NaN or inf)")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"float image values must lie in [0, 1], got min {lo:g}, max {hi:g}")
    return np.rint(arr * 255.0).astype(np.uint8)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.float32) * (1.0 / 255.0)
    rgb = rgba[..., :3].astype(np.float32)
    return np.rint(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _array_to_rgb(arr: np.ndarray, what: str, alpha: str = "drop") -> Image.Image:
    """HxW / HxWxC (C in 1, 3, 4) uint8 or float array -> RGB PIL image."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"{what} must be HxW or HxWxC, got shape {tuple(arr.shape)}")
    if arr.ndim == 3 and arr.shape[2] not in (3, 4):
        raise ValueError(f"{what} must have 1, 3 or 4 channels, got shape {tuple(arr.shape)}")
    height, width = arr.shape[:2]
    _check_image_size(width, height)
    if arr.dtype == np.uint8:
        pass
    elif np.issubdtype(arr.dtype, np.floating):
        arr = _float_to_uint8(arr)
    else:
        raise ValueError(f"{what} has unsupported dtype {arr.dtype}: pass uint8, or float in [0, 1]")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.shape[2] == 4:
        arr = _composite_on_white(arr) if alpha == "white" else arr[..., :3]
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def _pil_to_rgb(image: Image.Image, alpha: str = "drop") -> Image.Image:
    _check_image_size(*image.size)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(image).astype(np.int64)
        if mode == "I" and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(
                f"PIL mode 'I' image values must lie in [0, 65535] (read as 16-bit), "
                f"got min {arr.min()}, max {arr.max()}"
            )
        return _array_to_rgb(((arr * 255 + 32767) // 65535).astype(np.uint8), "PIL image")
    if mode == "F":
        return _array_to_rgb(np.asarray(image), "PIL mode 'F' image")
    if alpha == "white" and (mode in _TRANSPARENT_MODES or (mode == "P" and "transparency" in image.info)):
        return _array_to_rgb(np.asarray(image.convert("RGBA")), "PIL image", alpha)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot convert PIL image mode {mode!r} to RGB: {exc}") from None


def to_rgb(image: Any, alpha: str = "drop") -> Image.Image:
    """Validate ``image`` (PIL image, numpy array or torch tensor) and return it as RGB PIL;
    ``alpha``: "drop" or "white" (see the module docstring)."""
    _check_choice("alpha", alpha, ALPHA_MODES)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, alpha)
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
            t = t.float()
        return _array_to_rgb(t.cpu().numpy(), "image tensor", alpha)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, "image array", alpha)
    raise ValueError(f"unsupported image type {type(image).__name__}: pass a PIL image, numpy array or torch tensor")


# (3, 256) lookup table of the normalised value of every 8-bit level: one gather per channel
# is ~4x faster than converting and normalising per pixel. Computed with torchvision's float32
# operations (ToTensor's x / 255, then Normalize's (x - mean) / std), so the views equal the
# authors' bit for bit: with their models' sharp attention a 1-ulp difference in the views
# grows to ~1e-4 in the logits.
_NORM_LUT = (
    (torch.arange(256, dtype=torch.float32)[None, :].div(255) - torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None])
    .div(torch.tensor(CLIP_STD, dtype=torch.float32)[:, None])
    .numpy()
)


def _normalise(crops: np.ndarray) -> torch.Tensor:
    """(V, S, S, 3) uint8 -> (V, 3, S, S) float32, (x / 255 - mean) / std."""
    out = np.empty((crops.shape[0], 3) + crops.shape[1:3], dtype=np.float32)
    for channel in range(3):
        np.take(_NORM_LUT[channel], crops[..., channel], out=out[:, channel])
    return torch.from_numpy(out)


def _letterbox(image: Image.Image, size: int, antialias: bool) -> np.ndarray:
    """The global view's square canvas (side, side, 3) uint8, before the final resize."""
    width, height = image.size
    long_side = max(width, height)
    if antialias and long_side > size:
        width = max(1, round(width * size / long_side))
        height = max(1, round(height * size / long_side))
        image = image.resize((width, height), Image.BICUBIC)
    elif not antialias and width != height and long_side > size:
        # The authors' expression: short * (size / long), truncated.
        short = max(1, int(min(width, height) * (size / long_side)))
        width, height = (size, short) if width > height else (short, size)
        image = image.resize((width, height), Image.LANCZOS)
    side = max(width, height)
    square = np.zeros((side, side, 3), dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = np.asarray(image)
    return square


def _global_view(image: Image.Image, size: int, mode: str = "authors") -> torch.Tensor:
    """(3, size, size) float32, normalised."""
    square = _letterbox(image, size, antialias=(mode == "antialias"))
    if mode == "antialias":
        if square.shape[0] != size:
            square = np.asarray(Image.fromarray(square).resize((size, size), Image.BICUBIC))
        return _normalise(square[None])[0]
    view = _normalise(square[None])
    if square.shape[0] != size:
        view = torch.nn.functional.interpolate(view, size=(size, size), mode="bicubic", align_corners=False)
    return view[0]


def _local_canvas(image: Image.Image, hd_num: int, size: int) -> np.ndarray:
    """Resized, white-padded local canvas (rows * size, cols * size, 3) uint8, original orientation."""
    transposed, s, new_h = _local_plan(*image.size, hd_num, size)
    if transposed:
        image = image.transpose(Image.TRANSPOSE)
    resized = np.asarray(image.resize((s * size, new_h), Image.BILINEAR))
    padded_h = -(-new_h // size) * size
    canvas = np.full((padded_h, s * size, 3), 255, dtype=np.uint8)
    top = (padded_h - new_h) // 2
    canvas[top : top + new_h] = resized
    return canvas.transpose(1, 0, 2) if transposed else canvas


def hd_views(
    image: Any, hd_num: int = 9, size: int = 336, *, global_view: str = "authors", alpha: str = "drop"
) -> HDViews:
    """HD-N views of one image (PIL, numpy or torch; see the module docstring)."""
    hd_num = _check_int("hd_num", hd_num, 1)
    size = _check_int("size", size, 1)
    _check_choice("global_view", global_view, GLOBAL_VIEWS)
    rgb = to_rgb(image, alpha)
    canvas = _local_canvas(rgb, hd_num, size)
    rows, cols = canvas.shape[0] // size, canvas.shape[1] // size
    crops = canvas.reshape(rows, size, cols, size, 3).transpose(0, 2, 1, 3, 4).reshape(-1, size, size, 3)
    views = torch.empty(1 + rows * cols, 3, size, size, dtype=torch.float32)
    views[0] = _global_view(rgb, size, global_view)
    views[1:] = _normalise(np.ascontiguousarray(crops))
    return HDViews(views=views, grid=(rows, cols), image_size=rgb.size)


def hd_views_batch(
    images: Sequence[Any], hd_num: int = 9, size: int = 336, *, global_view: str = "authors", alpha: str = "drop"
) -> tuple[torch.Tensor, list[int]]:
    """Views of several images concatenated in order: ((sum V_i, 3, size, size), [V_i])."""
    size = _check_int("size", size, 1)
    results = [hd_views(image, hd_num, size, global_view=global_view, alpha=alpha) for image in images]
    if not results:
        return torch.empty(0, 3, size, size, dtype=torch.float32), []
    return torch.cat([r.views for r in results]), [r.num_views for r in results]


def load_image(
    source: str | os.PathLike | io.BytesIO, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Open and decode an image (a file, or the bytes of one) with PIL, upright (EXIF applied);
    not yet converted: pass it to ``hd_views``.

    An image of more than ``max_pixels`` pixels is refused from its header, before it is
    decoded (:data:`DEFAULT_MAX_PIXELS`). Missing file -> FileNotFoundError; anything PIL cannot
    decode, or too large -> ValueError naming ``name`` (default: the path)."""
    if isinstance(source, io.BytesIO):
        name = name or "image bytes"
    else:
        source = os.fspath(source)
        name = name or source
        if not os.path.exists(source):
            raise FileNotFoundError(f"image file not found: {source}")
        if os.path.isdir(source):
            raise ValueError(f"image path is a directory, not a file: {source}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    try:
        image = Image.open(source)
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(
                f"image {name} is {width}x{height} (WxH), {width * height / 1e6:.1f} MP, above the "
                f"{max_pixels / 1e6:g} MP limit (raise it with --max-image-pixels)"
            )
        image.load()
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image {name} is too large to decode safely: {exc}") from None
    except ValueError:
        raise
    except (OSError, SyntaxError) as exc:
        # UnidentifiedImageError is an OSError; truncated files raise OSError or SyntaxError.
        raise ValueError(f"cannot read image {name}: {exc}") from None
    _check_image_size(*image.size)
    return upright(image, name)


def upright(image: Image.Image, path: str | None = None) -> Image.Image:
    """The image as it is meant to be seen: phone cameras store the sensor's pixels and record
    the rotation in the EXIF Orientation tag, which viewers apply (PIL does not)."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError) as exc:
        # A broken EXIF block should not cost the picture: keep the stored orientation.
        import warnings

        warnings.warn(
            f"image {path or ''}: unreadable EXIF orientation ({exc}); using the pixels as stored", stacklevel=2
        )
        return image
