"""Save and load the trainable parts of a model (everything but the frozen LLM) as safetensors.

Writes are atomic (a temporary file in the same directory, then ``os.replace``), so a crash
never leaves a half-written checkpoint under the final name. Loading is strict: missing,
unexpected and wrongly shaped tensors are all reported, by name, in one error.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from torch import nn

from fusedvlm.config import ModelConfig

CONFIG_KEY = "fusedvlm_config"


def drop_frozen(state: dict[str, torch.Tensor], *submodules: str) -> dict[str, torch.Tensor]:
    """``state`` (changed in place and returned) without the entries of the frozen
    ``submodules`` (dotted names such as ``"llm"``): a frozen LLM or host is never trained,
    so no checkpoint carries it. The one place that decides what "frozen" leaves out."""
    heads = tuple(name + "." for name in submodules)
    for key in [k for k in state if k.startswith(heads)]:
        del state[key]
    return state


def leave_frozen_out_of_state_dict(module: nn.Module, *submodules: str) -> None:
    """From now on ``module.state_dict()`` leaves out its frozen ``submodules`` (see
    :func:`drop_frozen`); a training objective's state is then exactly what the trainer saves."""

    def hook(_module, state, prefix, _local_metadata) -> None:
        drop_frozen(state, *(prefix + name for name in submodules))

    module.register_state_dict_post_hook(hook)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], what: str) -> None:
    """Raise one ValueError naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(found)
        if tuple(found[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = ", ".join(items[:10]) + (f" (+{len(items) - 10} more)" if len(items) > 10 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{what} does not match the model; " + "; ".join(problems))


def read_state_dict(path: str, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch checkpoint (a ``state_dict`` entry and
    DDP's ``module.`` prefix unwrapped), e.g. an open_clip CLIP checkpoint."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    return {k.removeprefix("module."): v for k, v in state.items()}


def save_trainable(model: nn.Module, path: str) -> None:
    """Every non-LLM tensor of a FusedVLM, with its config in the file's metadata."""
    meta = {CONFIG_KEY: json.dumps(model.cfg.to_dict())} if hasattr(model, "cfg") else None
    atomic_save_safetensors(model.trainable_state_dict(), path, meta)


def read_config(path: str) -> ModelConfig:
    """The ModelConfig stored in a checkpoint written by :func:`save_trainable`."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path} carries no fusedvlm config")
    return ModelConfig.from_dict(json.loads(meta[CONFIG_KEY]))


def load_trainable(model: nn.Module, path: str) -> None:
    """Load a checkpoint written by :func:`save_trainable` into ``model`` (strict)."""
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    expected = model.trainable_state_dict()
    check_state_dict(expected, state, f"checkpoint {path}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])
