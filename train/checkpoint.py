"""Training checkpoints: one safetensors file per save, written atomically (through
:func:`fusedvlm.checkpoint.atomic_save_safetensors`), holding

* ``model/<name>``: the objective's state (trainable model weights, stage-1 heads and text
  tower; never the frozen LLM);
* ``optim/<param index>/<key>``: the optimiser's per-parameter state; its hyper-parameters
  and scalar state go into the JSON metadata;
* ``rng/torch`` (and ``rng/cuda/<i>``): generator states; Python's and NumPy's go into the
  metadata with the step, the data position, the scheduler and the run's settings.

Safetensors metadata is a flat ``str -> str`` map, so the structured parts are JSON strings.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re

import numpy as np
import torch

from fusedvlm.checkpoint import atomic_save_safetensors, read_safetensors, safetensors_metadata

_STEP_FILE = re.compile(r"step-(\d+)\.safetensors$")


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _jsonable(x):
    if isinstance(x, tuple | list):
        return [_jsonable(v) for v in x]
    return x


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = meta["param_groups"]
    ours = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in ours]:
        raise ValueError(
            f"the checkpoint's optimiser has parameter groups of sizes {[len(g['params']) for g in groups]}, "
            f"this run has {[len(g['params']) for g in ours]}: the trainable parameters differ"
        )
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_training_checkpoint(
    path: str,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    meta: dict,
) -> None:
    tensors = {f"model/{k}": v for k, v in model_state.items()}
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    rng_tensors, rng_meta = rng_state()
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    metadata = {
        "format": "fusedvlm-train-1",
        "trainer": json.dumps(meta),
        "optimizer": json.dumps(opt_meta),
        "rng": json.dumps(rng_meta),
    }
    atomic_save_safetensors(tensors, path, metadata)


def load_training_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict, dict, dict]:
    """-> (model state, other tensors, trainer meta, optimiser meta, rng meta)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    metadata = safetensors_metadata(path, "training checkpoint")
    if metadata.get("format") != "fusedvlm-train-1":
        raise ValueError(f"{path} is not a fusedvlm training checkpoint")
    # Reading every tensor is what proves the file whole (a truncated file fails here).
    tensors = read_safetensors(path, "training checkpoint")
    try:
        parts = [json.loads(metadata[k]) for k in ("trainer", "optimizer", "rng")]
    except (KeyError, ValueError) as e:
        raise ValueError(f"training checkpoint {path} has damaged metadata: {e}") from None
    model = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    other = {k: v for k, v in tensors.items() if not k.startswith("model/")}
    return model, other, *parts


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step-{step:08d}.safetensors")


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in ``directory``, oldest first."""
    found = []
    for path in glob.glob(os.path.join(directory, "step-*.safetensors")):
        m = _STEP_FILE.search(path)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)
