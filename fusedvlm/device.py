"""The one place every command turns ``--device`` and ``--dtype`` into torch objects.

``auto`` device: the (local) GPU when CUDA is available, else the CPU. ``auto`` dtype: bf16 on
a GPU that supports it (fp16 on one that does not), fp32 on the CPU. Asking for a device that
is not there is a one-line error instead of a crash deep inside the first kernel. Importing
this module does not import torch (the CLI builds its parsers from these names).
"""

from __future__ import annotations

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
# Long names are accepted too (results and older scripts spell dtypes the torch way).
_DTYPE_NAMES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}


def resolve_device(name: str = "auto", local_rank: int | None = None):
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> torch.device; ``local_rank`` picks the GPU
    of a torchrun process when no index is given."""
    import torch

    if not isinstance(name, str) or not (name in DEVICE_CHOICES or name.startswith("cuda:")):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name} but no CUDA GPU is available")
    dev = torch.device(name if name != "auto" else "cuda")
    if dev.index is None:
        dev = torch.device("cuda", local_rank or 0)
    if dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def resolve_dtype(name: str, device):
    """``auto`` | ``fp32`` | ``bf16`` | ``fp16`` (or the torch names) -> torch.dtype on ``device``."""
    import torch

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPE_NAMES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    return getattr(torch, _DTYPE_NAMES[name])


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> 'bf16' (the spelling of the flags)."""
    short = {v: k for k, v in _DTYPE_NAMES.items() if len(k) == 4}
    return short[str(dtype).removeprefix("torch.")]


def add_device_arguments(parser, *, dtype: bool = True, dtype_help: str | None = None) -> None:
    """``--device`` and (optionally) ``--dtype``, spelled the same on every command."""
    parser.add_argument(
        "--device",
        default="auto",
        type=_device_arg,
        metavar="{auto,cpu,cuda,cuda:N}",
        help="auto: the GPU when CUDA is available, else the CPU",
    )
    if dtype:
        parser.add_argument(
            "--dtype",
            default="auto",
            choices=DTYPE_CHOICES,
            help=dtype_help or "weights and activations; auto: bf16 on a GPU, fp32 on the CPU",
        )


def _device_arg(text: str) -> str:
    if text in DEVICE_CHOICES or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    import argparse

    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
