"""Save and load the trainable parts of a model (everything but the frozen LLM) as safetensors,
and the crash-safe writing that every checkpoint of fusedvlm goes through.

Writes are atomic: a file is written (and fsynced) under a temporary name beside its final
one and moved into place with ``os.replace``; a checkpoint *directory* is written whole as a
sibling temporary directory and switched with the old one in a single ``renameat2`` exchange
(:func:`atomic_directory`), so a reader sees the old directory or the new one, never a mix.
Temporaries carry the writer's pid: one left by a killed writer is removed by the next save.
Everything is created with the user's umask (``mkstemp``/``mkdtemp`` would make them private).
Loading is strict: missing, unexpected and wrongly shaped tensors are all reported, by name,
in one error; unreadable files are named in a one-line error.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import sys

import torch
from torch import nn

from fusedvlm.config import ModelConfig

CONFIG_KEY = "fusedvlm_config"
CONFIG_NAME = "config.json"  # the JSON beside the weights of a save_pretrained / model directory
_TEMP = re.compile(r"\.(?P<base>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def read_config_json(config: str, fmt: str, version: int, refused: dict[str, str] | None = None, parse=None):
    """``parse(meta["config"])`` of a ``{"format": fmt, "version": version, "config": ...}`` JSON
    file (the ``config`` dict itself without ``parse``), else one ValueError naming the file:
    unreadable JSON, another format (``refused`` maps a known other format to what to say),
    another version, or a config ``parse`` rejects."""
    try:
        with open(config, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{config} is not valid JSON (truncated or corrupt?): {e}") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found in (refused or {}):
        raise ValueError(refused[found])
    if found != fmt:
        raise ValueError(f"{config} is not a {fmt} config (format={found!r})")
    if meta.get("version") != version:
        raise ValueError(f"{config} has version {meta.get('version')!r}; this fusedvlm reads version {version}")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{config} has no 'config' object (the model's settings)")
    try:
        return meta["config"] if parse is None else parse(meta["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{config}: bad config: {e}") from None


def umask() -> int:
    """The process's umask, read without changing it where Linux allows (setting it to read it
    back would briefly affect files other threads create)."""
    with contextlib.suppress(OSError):  # no /proc: read it the portable way below
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(path: str, kind: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str) -> None:
    """Delete the temporaries that writers of ``path`` killed before they finished left behind
    (their pid is gone); a previous version parked by an interrupted directory switch is put
    back if ``path`` itself is missing."""
    folder, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        m = _TEMP.match(name)
        if not m or m["base"] != base or _alive(int(m["pid"])):
            continue
        stale = os.path.join(folder, name)
        if m["kind"] == "old" and not os.path.lexists(path):
            os.rename(stale, path)
        elif os.path.isdir(stale) and not os.path.islink(stale):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield an empty temporary directory beside ``path``; when the block succeeds its files
    are fsynced and it replaces ``path`` in one atomic switch (files of an existing ``path``
    that the block did not write are carried over). If the block fails, or the process dies at
    any point, ``path`` is left exactly as it was."""
    path = os.path.abspath(os.fspath(path))
    if os.path.islink(path):
        # Switch the directory the link points to; swapping the link itself would replace it.
        path = os.path.realpath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a directory")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temp_path(path, "partial")
    os.mkdir(tmp)
    try:
        yield tmp
        carried = set()
        if os.path.isdir(path):
            for name in os.listdir(path):
                src, dst = os.path.join(path, name), os.path.join(tmp, name)
                if os.path.lexists(dst) or _TEMP.match(name):
                    continue
                carried.add(name)
                if os.path.isdir(src) and not os.path.islink(src):
                    shutil.copytree(src, dst, symlinks=True)
                else:
                    shutil.copy2(src, dst, follow_symlinks=False)
        file_mode = 0o666 & ~umask()
        for root, _, files in os.walk(tmp):
            for name in files:
                f = os.path.join(root, name)
                if not os.path.islink(f):
                    if os.path.relpath(f, tmp).split(os.sep)[0] not in carried:
                        os.chmod(f, file_mode)  # safetensors creates its files 0600
                    _fsync(f)
            _fsync(root)
        if not os.path.exists(path):
            os.rename(tmp, path)
        elif not _exchange(tmp, path):
            # No atomic exchange here: park the old directory, then move the new one in. A
            # death between the two renames is repaired by the next save (the old one returns).
            old = _temp_path(path, "old")
            os.rename(path, old)
            os.rename(tmp, path)
            tmp = old
        _fsync(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save_file

    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temp_path(path, "partial")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~umask())
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_safetensors(path: str, what: str = "checkpoint", device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a missing, truncated or garbage file is one error
    naming it."""
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory, not a .safetensors file")
    try:
        return load_file(path, device=device)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{what} {path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def safetensors_metadata(path: str, what: str = "checkpoint") -> dict[str, str]:
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory, not a .safetensors file")
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{what} {path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


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
    if path.endswith(".safetensors"):
        state = read_safetensors(path, what)
    else:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{what} not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{what} {path} is not a readable torch checkpoint: {e}") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise ValueError(f"{what} {path} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


STAGE_KEY = "fusedvlm_stage"  # "stage1" / "stage2": which training stage wrote the weights


def save_trainable(model: nn.Module, path: str, stage: str | None = None) -> None:
    """Every non-LLM tensor of a FusedVLM, with its config (and the training stage that
    produced it, if any) in the file's metadata."""
    meta = {CONFIG_KEY: json.dumps(model.cfg.to_dict())} if hasattr(model, "cfg") else {}
    if stage is not None:
        meta[STAGE_KEY] = stage
    atomic_save_safetensors(model.trainable_state_dict(), path, meta or None)


def read_metadata(path: str) -> dict[str, str]:
    """The metadata of a checkpoint written by :func:`save_trainable`; a directory written by
    ``save_pretrained`` or a file without a fusedvlm config is refused with a hint."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, CONFIG_NAME)):
            raise ValueError(
                f"{path} is a save_pretrained directory (FusionModule.from_pretrained reads it); --checkpoint takes the "
                "model.safetensors file that fusedvlm train or save_trainable writes"
            )
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            raise ValueError(f"{path} is a directory: pass the file {os.path.join(path, 'model.safetensors')}")
    meta = safetensors_metadata(path)
    if CONFIG_KEY not in meta:
        if "format" in meta and meta["format"].startswith("fusedvlm-train"):
            raise ValueError(f"{path} is a training checkpoint (for --resume); use the run's model.safetensors")
        raise ValueError(f"{path} carries no fusedvlm config (not written by save_trainable or fusedvlm train)")
    return meta


def read_config(path: str) -> ModelConfig:
    """The ModelConfig stored in a checkpoint written by :func:`save_trainable`."""
    meta = read_metadata(path)
    try:
        return ModelConfig.from_dict(json.loads(meta[CONFIG_KEY]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: malformed fusedvlm config in the metadata: {e}") from None


def load_trainable(model: nn.Module, path: str) -> None:
    """Load a checkpoint written by :func:`save_trainable` into ``model`` (strict)."""
    if os.path.isdir(path):
        read_metadata(path)  # names what the directory is
    state = read_safetensors(path)
    expected = model.trainable_state_dict()
    check_state_dict(expected, state, f"checkpoint {path}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])


# The authors' (tensorfusionvlm) top-level model type; their directories go through
# ``fusedvlm convert-upstream`` first.
UPSTREAM_MODEL_TYPE = "modeling_query_adapt_clip_llm"


def is_upstream_checkpoint(path: str) -> bool:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    try:
        with open(config) as f:
            return json.load(f).get("model_type") == UPSTREAM_MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False
