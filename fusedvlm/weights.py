"""Weights in bounded memory: read safetensors files one tensor at a time, write them one tensor
at a time, and fill a module built without storage (docs/design.md, loading).

A 7B model in bf16 is ~14.6 GB; building it in fp32 and casting, or holding a shard twice while
serialising it, needs two to four times that. Here:

* :class:`SafetensorsFile` parses the header only (8-byte length + JSON) and hands out
  :class:`TensorEntry` records; a tensor is read when asked for. Read on the CPU in the file's
  dtype, it is a view of a private memory map of the file (no copy; the kernel can drop and
  re-read its pages). Any other dtype or device allocates the result once and fills it with
  ``pread`` through one reused 16 MB buffer, converting as it goes: no staging copy, no fp32
  detour, and no host memory beyond that buffer when the result lives on a GPU.
* :func:`write_safetensors` writes the header from shapes and dtypes, then streams each tensor's
  bytes (safetensors' own ``save_file`` copies every tensor to ``bytes`` first).
* :func:`params_on_meta` builds a module whose parameters have no storage while its buffers are
  real (rotary tables and the like are computed by the constructors, not stored in checkpoints);
  :func:`fill_module` then assigns every parameter and persistent buffer from the files.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

# safetensors dtype names <-> torch dtypes (the ones torch can hold).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
# Bytes per read when converting a tensor, and per write when copying one file to another: the
# one host buffer a converting load needs (small against a 7B model, large enough for full speed).
CHUNK = 16 << 20


class WeightsError(ValueError):
    """A weight file that cannot be read as asked; the message names the file (and tensor)."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file."""

    file: SafetensorsFile
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def load(
        self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, scratch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The tensor on ``device``; floating tensors in ``dtype`` if given. On the CPU in the
        file's dtype it is a view of the file's private memory map (copy-on-write). Otherwise
        the result is allocated once and filled through ``scratch`` (a uint8 CPU tensor; one of
        :data:`CHUNK` bytes is made if not given), so the host holds no copy of the tensor."""
        device = torch.device(device)
        want = dtype if dtype is not None and self.dtype.is_floating_point else self.dtype
        if device.type == "cpu" and want == self.dtype:
            return self.file.view(self)
        out = torch.empty(self.shape, dtype=want, device=device)
        if scratch is None:
            scratch = torch.empty(min(self.nbytes, CHUNK), dtype=torch.uint8)
        flat = out.view(-1)
        per = max(1, scratch.numel() // self.dtype.itemsize)
        fd = os.open(self.file.path, os.O_RDONLY)
        try:
            for start in range(0, flat.numel(), per):
                n = min(per, flat.numel() - start)
                chunk = scratch[: n * self.dtype.itemsize]
                self.file.pread_into(fd, chunk, self.begin + start * self.dtype.itemsize, self.name)
                # copy_ converts the dtype and, for a GPU, copies synchronously from pageable memory.
                flat[start : start + n].copy_(chunk.view(self.dtype))
        finally:
            os.close(fd)
        return out

    def write_to(self, out) -> None:
        """Copy this tensor's bytes into the binary file object ``out`` without mapping them."""
        self.file.copy_bytes(self.begin, self.end, out)


class SafetensorsFile:
    """The header of one safetensors file; tensors are read on request (see the module docs)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"weight file not found: {self.path}")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{self.path} is not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise WeightsError(f"{self.path} is not a safetensors file (header of {n} bytes, file of {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, ValueError) as e:
                raise WeightsError(f"{self.path} is not a safetensors file (header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise WeightsError(f"{self.path}: the safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = meta if isinstance(meta, dict) else {}
        start = 8 + n
        self.entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                b, e = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise WeightsError(f"{self.path}: tensor {name!r} has an unreadable header entry {info!r}") from None
            want = math.prod(shape) * dtype.itemsize
            if e - b != want or b < 0 or start + e > size:
                raise WeightsError(
                    f"{self.path}: tensor {name!r} ({info['dtype']} {list(shape)}) needs bytes {b}..{e} of the data "
                    f"({want} bytes) but the file has {size - start} data bytes (truncated or corrupt?)"
                )
            self.entries[name] = TensorEntry(self, name, dtype, shape, start + b, start + e)
        self._map: mmap.mmap | None = None

    def view(self, entry: TensorEntry) -> torch.Tensor:
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        if self._map is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: a private mapping, so a tensor written in place never changes the file.
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=entry.nbytes, offset=entry.begin)
        return flat.view(entry.dtype).view(entry.shape)

    def pread_into(self, fd: int, buf: torch.Tensor, offset: int, name: str) -> None:
        view = memoryview(buf.numpy())
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise WeightsError(f"{self.path}: tensor {name!r} ends past the end of the file (truncated?)")
            done += got

    def copy_bytes(self, begin: int, end: int, out) -> None:
        with open(self.path, "rb", buffering=0) as f:
            f.seek(begin)
            left = end - begin
            while left:
                chunk = f.read(min(left, CHUNK))
                if not chunk:
                    raise WeightsError(f"{self.path} ends before byte {end} (truncated?)")
                out.write(chunk)
                left -= len(chunk)


def index_files(folder: str) -> list[str]:
    """The safetensors files of a Hugging Face model directory (sharded with an index, or one
    ``model.safetensors``); [] when it has none."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{index} is not a readable safetensors index: {e}") from None
        files = [os.path.join(folder, name) for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"missing file {f} (listed in {index})")
        return files
    single = os.path.join(folder, "model.safetensors")
    return [single] if os.path.isfile(single) else []


def open_entries(files: Iterable[str]) -> dict[str, TensorEntry]:
    """Every tensor of ``files`` by name; a name in two files is an error."""
    entries: dict[str, TensorEntry] = {}
    for path in files:
        for name, entry in SafetensorsFile(path).entries.items():
            if name in entries:
                raise WeightsError(f"tensor {name!r} is in both {entries[name].file.path} and {path}")
            entries[name] = entry
    return entries


# ---------------------------------------------------------------------------- writing
def write_safetensors(path: str, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as one safetensors file, one tensor's bytes at a time: name -> a
    torch.Tensor, or anything with ``dtype``, ``shape`` and ``write_to(file)`` that writes
    exactly its bytes (a :class:`TensorEntry`: copied file to file)."""
    specs = {}
    for name, t in tensors.items():
        if t.dtype not in NAMES:
            raise WeightsError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        specs[name] = (NAMES[t.dtype], tuple(t.shape), math.prod(t.shape) * t.dtype.itemsize)
    # Wider dtypes first keeps every tensor aligned to its element size (as safetensors does).
    order = sorted(specs, key=lambda k: (-tensors[k].dtype.itemsize, k))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape, nbytes = specs[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for name in order:
            t = tensors[name]
            if not isinstance(t, torch.Tensor):
                t.write_to(out)
            elif t.numel():
                t = t.detach().to("cpu").contiguous()
                out.write(memoryview(t.view(-1).view(torch.uint8).numpy()))


# ---------------------------------------------------------------------------- modules
@contextlib.contextmanager
def params_on_meta():
    """Modules built inside get their parameters on the meta device (no storage, no init
    cost); buffers stay real, computed by the constructors as usual."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:  # a meta one may be tied: keep the object
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _tensor_groups(module: nn.Module) -> list[list[tuple[str, nn.Module, str, bool]]]:
    """Every parameter and persistent buffer as a group of (name, owner, attribute, is_parameter)
    that hold the same tensor: tied weights are one tensor under several names."""
    groups: dict[int, list[tuple[str, nn.Module, str, bool]]] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        prefix = mod_name + "." if mod_name else ""
        for attr, p in mod._parameters.items():
            if p is not None:
                groups.setdefault(id(p), []).append((prefix + attr, mod, attr, True))
        for attr, b in mod._buffers.items():
            if b is not None and attr not in mod._non_persistent_buffers_set:
                groups.setdefault(id(b), []).append((prefix + attr, mod, attr, False))
    return list(groups.values())


def fill_module(
    module: nn.Module,
    entries: dict[str, TensorEntry],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    what: str = "weights",
    ignore: tuple[str, ...] = (),
) -> None:
    """Assign every parameter and persistent buffer of ``module`` from ``entries`` (floating
    ones in ``dtype``), one tensor at a time. Strict: missing, unexpected and mis-shaped tensors
    are named in one error before anything is read. A tied weight needs only one of its names;
    entry names ending in one of ``ignore`` are skipped (tables that older writers stored)."""
    from fusedvlm.checkpoint import check_state_dict

    groups = _tensor_groups(module)
    found = {k: v for k, v in entries.items() if not k.endswith(ignore)}
    expected, present, plan = {}, {}, []
    for group in groups:
        names = [g[0] for g in group]
        key = next((n for n in names if n in found), names[0])
        _, owner, attr, is_param = group[0]
        expected[key] = (owner._parameters if is_param else owner._buffers)[attr]
        if key in found:
            present[key] = torch.empty(found[key].shape, device="meta")
        plan.append((key, group))
    known = {g[0] for group in groups for g in group}
    extra = {k: torch.empty(0, device="meta") for k in found if k not in known}
    check_state_dict(expected, present | extra, what)
    scratch = torch.empty(CHUNK, dtype=torch.uint8)  # reused by every converting read
    for key, group in plan:
        t = found[key].load(device, dtype, scratch)
        _, owner, attr, is_param = group[0]
        if is_param:
            t = nn.Parameter(t, requires_grad=owner._parameters[attr].requires_grad)
        for _, owner, attr, is_param in group:
            (owner._parameters if is_param else owner._buffers)[attr] = t


def buffers_to(module: nn.Module, device: torch.device | str) -> None:
    """Move the buffers a constructor computed inside :func:`params_on_meta` (rotary tables and
    the like: small, never stored) to ``device``; the parameters are left alone."""
    for mod in module.modules():
        for k, b in mod._buffers.items():
            if b is not None:
                mod._buffers[k] = b.to(device)


def iter_missing(module: nn.Module) -> Iterator[str]:
    """Names of tensors still on the meta device."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta:
            yield name
