"""A synthetic visual question answering set: one coloured shape per image, questions about
its colour and its position, single-word answers (chance 25 % for each question type).

Images are drawn with PIL on generated backgrounds (low-saturation gradients with noise) or on
greyscale crops of the offline sample photos (``fusedvlm.samples``), so colour stays
unambiguous. Records are LLaVA-style (``{"image", "conversations": [{"from", "value"}]}``)
with the ``<image>`` tag in the first human turn, exactly what :mod:`fusedvlm.train.data` reads.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (35, 70, 225),
    "yellow": (235, 210, 25),
}
POSITIONS = ("left", "right", "top", "bottom")
SHAPES = ("circle", "square", "triangle")
COLOUR_QUESTIONS = ("What colour is the shape?", "What color is the object?", "Which colour does the shape have?")
POSITION_QUESTIONS = ("Where is the shape?", "Where is the object in the image?", "On which side is the shape?")
BACKGROUNDS = ("generated", "photo")


@dataclass(frozen=True)
class ShapeSample:
    image: Image.Image
    colour: str
    position: str
    shape: str


def _generated_background(rng: np.random.Generator, size: int) -> np.ndarray:
    # A grey level gradient plus noise: texture for the encoder to ignore, no hue to confuse.
    base = rng.uniform(60, 200)
    slope = rng.uniform(-60, 60, size=2)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    grey = base + slope[0] * xx + slope[1] * yy + rng.normal(0, 12, size=(size, size))
    tint = rng.uniform(-8, 8, size=3)
    return np.clip(grey[..., None] + tint, 0, 255).astype(np.uint8)


def _photo_background(rng: np.random.Generator, size: int) -> np.ndarray:
    from fusedvlm.samples import SAMPLE_NAMES, sample_image

    name = SAMPLE_NAMES[int(rng.integers(len(SAMPLE_NAMES)))]
    photo = sample_image(name)
    photo = photo if isinstance(photo, Image.Image) else Image.fromarray(np.asarray(photo))
    grey = photo.convert("L")
    w, h = grey.size
    side = int(min(w, h) * rng.uniform(0.5, 1.0))
    x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    crop = grey.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR)
    return np.repeat(np.asarray(crop)[..., None], 3, axis=2)


def draw_sample(rng: np.random.Generator, size: int = 112, background: str = "generated") -> ShapeSample:
    """One image with one shape; colour, position and shape drawn uniformly."""
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; choose from {BACKGROUNDS}")
    if size < 32:
        raise ValueError(f"image size must be >= 32 px, got {size}")
    canvas = _generated_background(rng, size) if background == "generated" else _photo_background(rng, size)
    image = Image.fromarray(canvas)
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    position = POSITIONS[int(rng.integers(len(POSITIONS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    radius = size * rng.uniform(0.10, 0.15)
    along = rng.uniform(0.18, 0.24)  # distance of the centre from its side, in image sides
    across = rng.uniform(0.35, 0.65)
    cx, cy = {
        "left": (along, across), "right": (1 - along, across), "top": (across, along), "bottom": (across, 1 - along),
    }[position]
    cx, cy = cx * size, cy * size
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    draw = ImageDraw.Draw(image)
    fill = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=fill)
    return ShapeSample(image, colour, position, shape)


def sample_questions(sample: ShapeSample, rng: random.Random, num_questions: int = 2) -> list[tuple[str, str]]:
    """(question, answer) pairs alternating colour/position questions, in random order."""
    if num_questions < 1:
        raise ValueError(f"num_questions must be >= 1, got {num_questions}")
    kinds = ["colour", "position"]
    rng.shuffle(kinds)
    turns = []
    for i in range(num_questions):
        if kinds[i % 2] == "colour":
            turns.append((rng.choice(COLOUR_QUESTIONS), sample.colour))
        else:
            turns.append((rng.choice(POSITION_QUESTIONS), sample.position))
    return turns


def candidate_answers(question: str) -> tuple[str, ...]:
    """The closed answer set a question of this data set draws from."""
    if question in COLOUR_QUESTIONS:
        return tuple(COLOURS)
    if question in POSITION_QUESTIONS:
        return POSITIONS
    raise ValueError(f"{question!r} is not a question of the synthetic shapes set")


def write_dataset(
    out_dir: str,
    num_images: int,
    seed: int = 0,
    size: int = 112,
    background: str = "generated",
    num_questions: int = 2,
    name: str = "data.jsonl",
) -> str:
    """Write ``num_images`` PNGs under ``out_dir/images`` and a JSONL of LLaVA-style records;
    returns the JSONL path. Image paths in the records are relative to ``out_dir``."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    np_rng = np.random.default_rng(seed)
    py_rng = random.Random(seed)
    path = os.path.join(out_dir, name)
    stem = os.path.splitext(name)[0]
    with open(path, "w") as f:
        for i in range(num_images):
            sample = draw_sample(np_rng, size, background)
            rel = os.path.join("images", f"{stem}-{i:06d}.png")
            sample.image.save(os.path.join(out_dir, rel))
            conversations = []
            for j, (q, a) in enumerate(sample_questions(sample, py_rng, num_questions)):
                conversations.append({"from": "human", "value": f"<image>\n{q}" if j == 0 else q})
                conversations.append({"from": "gpt", "value": a})
            f.write(json.dumps({"id": f"{stem}-{i}", "image": rel, "conversations": conversations}) + "\n")
    return path
