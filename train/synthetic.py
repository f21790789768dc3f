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

# First letters differ from each other and from the positions' (l, r, t, b): a word's first
# letter then names it among all eight answers.
COLOURS = {
    "green": (30, 170, 40),
    "yellow": (235, 210, 25),
    "purple": (140, 40, 190),
    "cyan": (20, 200, 215),
}
POSITIONS = ("left", "right", "top", "bottom")
SHAPES = ("circle", "square", "triangle")
COLOUR_QUESTIONS = ("What colour is the shape?", "What color is the object?", "Which colour does the shape have?")
POSITION_QUESTIONS = ("Where is the shape?", "Where is the object in the image?", "On which side is the shape?")
BACKGROUNDS = ("generated", "photo")
_LETTER_IDS = list(range(ord("a"), ord("z") + 1))  # byte tokenizer: id = byte value


@dataclass(frozen=True)
class ShapeSample:
    image: Image.Image
    colour: str
    position: str
    shape: str


def _generated_background(rng: np.random.Generator, size: int) -> np.ndarray:
    # A grey level gradient plus noise: texture for the encoder to ignore, no hue to confuse.
    base = rng.uniform(60, 200)
    slope = rng.uniform(-25, 25, size=2)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    grey = base + slope[0] * xx + slope[1] * yy + rng.normal(0, 4, size=(size, size))
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
    radius = size * rng.uniform(0.15, 0.20)
    along = rng.uniform(0.20, 0.25)  # distance of the centre from its side, in image sides
    across = rng.uniform(0.35, 0.65)
    cx, cy = {
        "left": (along, across),
        "right": (1 - along, across),
        "top": (across, along),
        "bottom": (across, 1 - along),
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


def pretrain_reader_llm(
    directory: str,
    llm_cfg,
    n_l: int,
    n_s: int,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    num_questions: int = 2,
    noise: float = 0.3,
) -> str:
    """Pretrain a small byte-level Llama (``llm_cfg``'s shapes) into a *reader* of this data
    set's conversations, and save it as a Hugging Face directory (``LLMConfig(source=
    "pretrained", path=directory)`` loads it).

    A random frozen LLM barely responds to its inputs (its logits span about 0.02 * width
    nats), so no prefix can make it spell an answer; the paper's frozen LLM is a pretrained
    one. This stands in for it: in pretraining, the fused slots of a question hold the first
    letter of its answer (which tells the answers of a question type apart), a ``noise`` share
    of them a random letter instead; the model learns the chat layout, to spell the answer
    words and to read which one from the slots. It never sees an image; in stage 2 the fusion module
    has to write the answer into those slots from the pixels."""
    import torch
    import torch.nn.functional as F

    from fusedvlm.chat import IGNORE_INDEX, ChatLayout
    from fusedvlm.model.llm import byte_tokenizer, random_llama
    from fusedvlm.packing import pad_rows

    if llm_cfg.source != "random":
        raise ValueError("pretrain_reader_llm builds a byte-level model from a random LLMConfig")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = byte_tokenizer()
    layout = ChatLayout(llm_cfg.chat_template, tok, llm_cfg.system_prompt)
    model = random_llama(llm_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def conversation():
        colour, position = rng.choice(list(COLOURS)), rng.choice(POSITIONS)
        fake = ShapeSample(None, colour, position, "circle")
        turns = sample_questions(fake, rng, num_questions)
        counts = [n_l] + [n_s] * (len(turns) - 1)
        t = layout.conversation(turns, counts)
        slots = []
        for (_, answer), m in zip(turns, counts):
            # The first letter names the answer within its question type; a share of the
            # slots holds random letters so that reading them means taking the majority.
            first = tok(answer, add_special_tokens=False).input_ids[0]
            slots += [first if rng.random() > noise else rng.choice(_LETTER_IDS) for _ in range(m)]
        it = iter(slots)
        return [next(it) if f else i for i, f in zip(t.ids, t.fused)], t.labels

    model.train()
    for step in range(steps):
        rows = [conversation() for _ in range(batch_size)]
        ids, mask = pad_rows([x for x, _ in rows], layout.placeholder_id)
        labels, _ = pad_rows([y for _, y in rows], IGNORE_INDEX)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / (0.1 * steps))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    with open(os.path.join(directory, "reader.json"), "w") as f:
        json.dump({"steps": steps, "final_loss": float(loss.detach()), "n_l": n_l, "n_s": n_s, "seed": seed}, f)
    return directory
