"""The flags several commands share, each written once with the function that reads it back:
which model to load and where (:func:`add_model_arguments` / :func:`load_model`: chat, build,
eval, bench, and train's --preset / --device / --llm-dtype), lists of n_l (:func:`parse_n_l`),
the LLM decode path and the image size limit. Importing this module does not import torch."""

from __future__ import annotations

import argparse
import os

from fusedvlm.config import LLM_QUANT_CHOICES, PAPER_N_L, PRESETS
from fusedvlm.device import DTYPE_CHOICES, add_device_arguments


def add_model_arguments(
    p,
    *,
    default_preset: str = "smol",
    required: bool = False,
    seed: bool = True,
    quant: bool = True,
    for_training: bool = False,
) -> argparse._ArgumentGroup:
    """The flags :func:`load_model` reads: --preset / --checkpoint, --device / --dtype /
    --llm-dtype, --llm-quant and --seed, in a "model" group of their own.

    ``required``: one of --preset / --checkpoint must be named (a run directory that records
    which model it scored has no implicit one). ``seed=False`` where the command's --seed comes
    from a dataclass of its own (chat's GenerationConfig). ``quant=False`` where every decode
    path is run (bench), which an int8 LLM does not have. ``for_training``: --preset, --device
    and --llm-dtype only (train builds the model itself, from --init's weights rather than a
    --checkpoint; the trained sides stay fp32 master weights under --precision, so there is no
    --dtype; the frozen LLM is fp32 unless --llm-dtype says otherwise; TrainConfig has --seed).
    Returns the group, for a command's own model flags."""
    g = p.add_argument_group("model")
    if for_training:
        g.add_argument(
            "--preset", default=default_preset, choices=sorted(PRESETS), help="model preset (default %(default)s)"
        )
    else:
        src = g.add_mutually_exclusive_group(required=True) if required else g
        src.add_argument(
            "--preset",
            default=None,
            choices=sorted(PRESETS),
            help="model preset, random weights but for its LLM"
            + ("" if required else f" (default {default_preset})")
            + "; not with --checkpoint, which carries its own config",
        )
        src.add_argument(
            "--checkpoint",
            default=None,
            help="a model directory (FusedVLM.save_pretrained, fusedvlm convert-upstream) or "
            "trained weights (safetensors from fusedvlm train or fusedvlm.checkpoint.save_trainable)",
        )
    add_device_arguments(
        g,
        dtype=not for_training,
        dtype_help="weights and activations of the whole model; auto: bf16 on a GPU, fp32 on the CPU",
    )
    g.add_argument(
        "--llm-dtype",
        default="fp32" if for_training else None,
        choices=DTYPE_CHOICES,
        help="the frozen LLM's own weights: bf16/fp16 halve its memory; auto: bf16 on a GPU "
        + ("(default %(default)s)" if for_training else "(default: --dtype)"),
    )
    if quant and not for_training:
        g.add_argument(
            "--llm-quant",
            default="none",
            choices=LLM_QUANT_CHOICES,
            help="int8: the LLM's linear layers in int8 with per-output-channel scales, quantised at load "
            "(activations in the LLM dtype; fast on CPU with bf16; decodes on the hf path)",
        )
    elif not for_training:
        p.set_defaults(llm_quant="none")
    if seed and not for_training:
        g.add_argument(
            "--seed",
            type=int,
            default=0,
            help="seeds the random initialisation of the weights that no checkpoint or pretrained LLM provides",
        )
    p.set_defaults(default_preset=None if required else default_preset)
    return g


def preset_name(args: argparse.Namespace) -> str | None:
    """The preset the model comes from (None: a --checkpoint)."""
    if args.checkpoint is not None:
        return None
    return args.preset or args.default_preset


def model_config(args: argparse.Namespace):
    """The ModelConfig of the model :func:`add_model_arguments`' flags name, without building it;
    every refusal of those flags happens here, before any slow work."""
    from fusedvlm.config import get_preset

    if args.checkpoint is None:
        return get_preset(preset_name(args))
    if args.preset is not None:
        raise ValueError(
            f"--preset {args.preset} and --checkpoint both given: the checkpoint carries its own model "
            "config, so the preset would be ignored; drop --preset"
        )
    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    if os.path.isdir(args.checkpoint):
        from fusedvlm.model.vlm import read_model_config

        return read_model_config(args.checkpoint)
    from fusedvlm.checkpoint import STAGE_KEY, read_config, read_metadata

    if read_metadata(args.checkpoint).get(STAGE_KEY) == "stage1":
        raise ValueError(
            f"{args.checkpoint} is a stage-1 output: its projection into the LLM is untrained (stage 1 "
            "aligns the fusion with text only); train stage 2 with --init on it and use that"
        )
    return read_config(args.checkpoint)


def placement(args: argparse.Namespace, local_rank: int | None = None):
    """(device, dtype, LLM dtype or None) of --device / --dtype / --llm-dtype."""
    from fusedvlm.device import resolve_device, resolve_dtype

    device = resolve_device(args.device, local_rank)
    dtype = resolve_dtype(args.dtype, device)
    llm_dtype = resolve_dtype(args.llm_dtype, device) if args.llm_dtype is not None else None
    return device, dtype, llm_dtype


def load_model(args: argparse.Namespace, *, local_rank: int | None = None):
    """The model :func:`add_model_arguments`' flags name, in eval mode on its device and dtypes;
    --seed seeds the random initialisation of whatever the checkpoint does not hold.
    ``local_rank``: the GPU of a torchrun process when --device names none."""
    import torch

    from fusedvlm.checkpoint import load_trainable
    from fusedvlm.model import FusedVLM
    from fusedvlm.quant import quantize_llm

    cfg = model_config(args)
    device, dtype, llm_dtype = placement(args, local_rank)
    torch.manual_seed(args.seed)
    if args.checkpoint is not None and os.path.isdir(args.checkpoint):
        # Straight onto the device in the final dtypes: a 7B model is never staged in fp32.
        model = FusedVLM.from_pretrained(args.checkpoint, device=device, dtype=dtype, llm_dtype=llm_dtype)
    else:
        model = FusedVLM(cfg).eval()
        if args.checkpoint is not None:
            load_trainable(model, args.checkpoint)
        model.to(device=device, dtype=dtype)
        if llm_dtype is not None:
            model.llm.to(llm_dtype)
    quantize_llm(model.llm, args.llm_quant)
    return model


def add_query_counts(p) -> None:
    """--n-l / --n-s (one value each) from QueryConfig, defaulting to the model's own."""
    from fusedvlm.config import QueryConfig
    from fusedvlm.options import add_options

    add_options(
        p,
        QueryConfig,
        only=("n_l", "n_s"),
        defaults={"n_l": None},
        helps={"n_l": "the model's", "n_s": "the design §5 rule"},
    )


def add_n_l_list(p, more_help: str = "") -> None:
    """--n-l as a comma-separated list, read back by :func:`n_l_list`."""
    p.add_argument(
        "--n-l",
        default=None,
        metavar="N,N,...",
        help=f"comma-separated n_l values (default: the paper's {','.join(map(str, PAPER_N_L))}){more_help}",
    )


def n_l_list(args: argparse.Namespace) -> tuple[int, ...]:
    return PAPER_N_L if args.n_l is None else parse_n_l(args.n_l)


def parse_n_l(text: str) -> tuple[int, ...]:
    """'768,64,1' -> (768, 64, 1): distinct integers >= 1, at least one."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--n-l must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError("--n-l: give at least one value")
    bad = [v for v in values if v < 1]
    if bad:
        raise ValueError(f"--n-l values must be >= 1, got {bad}")
    if len(set(values)) != len(values):
        raise ValueError(f"--n-l has repeated values: {list(values)}")
    return values


def add_decode_args(p) -> None:
    from fusedvlm.decode import DECODE_PATHS

    p.add_argument(
        "--decode",
        default="auto",
        choices=DECODE_PATHS,
        help="LLM decode path: auto (lean static-cache step for Llama-family LLMs, else HF's forward over its "
        "static cache where the model supports one, else HF), lean, hf-static, hf (Hugging Face forward, dynamic cache)",
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="run the lean / hf-static decode step without torch.compile (no compile time; FUSEDVLM_COMPILE=0 does the same)",
    )


def add_max_image_pixels(p) -> None:
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        metavar="N",
        help="largest image accepted, in pixels, checked before it is decoded "
        "(default: fusedvlm.preprocess.DEFAULT_MAX_PIXELS, 40 million)",
    )


def max_image_pixels(args) -> int:
    from fusedvlm.preprocess import DEFAULT_MAX_PIXELS

    value = DEFAULT_MAX_PIXELS if args.max_image_pixels is None else args.max_image_pixels
    if value < 1:
        raise ValueError(f"--max-image-pixels must be >= 1, got {value}")
    return value
