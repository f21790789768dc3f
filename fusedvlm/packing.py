"""Packed (varlen) token streams, flash-attn style.

A pack of n segments is a tensor of shape (T, ...) with T = sum of the lengths, plus
``cu_seqlens``: int32 (n + 1,) offsets, ``cu_seqlens[0] == 0`` and
``cu_seqlens[i + 1] - cu_seqlens[i]`` the length of segment i. Zero-length segments are
allowed (an empty sample keeps its slot), an empty pack has ``cu_seqlens == [0]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _as_lengths(lengths: Sequence[int] | torch.Tensor, device=None) -> torch.Tensor:
    t = torch.as_tensor(lengths, dtype=torch.int64, device=device)
    if t.dim() != 1:
        raise ValueError(f"lengths must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"lengths must be >= 0, got {t.tolist()}")
    return t


def cu_seqlens_from_lengths(lengths: Sequence[int] | torch.Tensor, device=None) -> torch.Tensor:
    """(n,) lengths -> (n + 1,) int32 offsets."""
    t = _as_lengths(lengths, device)
    cu = torch.zeros(t.numel() + 1, dtype=torch.int64, device=t.device)
    torch.cumsum(t, 0, out=cu[1:])
    if cu[-1] > torch.iinfo(torch.int32).max:
        raise ValueError(f"pack of {int(cu[-1])} tokens does not fit int32 offsets")
    return cu.to(torch.int32)


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int | None = None, name: str = "cu_seqlens") -> None:
    """Raise a ValueError naming the problem unless ``cu_seqlens`` is a valid offset vector."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be 1-D with n + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if int(cu[0]) != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(cu[0])}")
    if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing, got {cu.tolist()}")
    if total is not None and int(cu[-1]) != total:
        raise ValueError(f"{name}[-1] = {int(cu[-1])} but the pack has {total} tokens")


def lengths_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(n + 1,) offsets -> (n,) int64 lengths."""
    cu = cu_seqlens.to(torch.int64)
    return cu[1:] - cu[:-1]


def segment_ids(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """(T,) int64: the segment index of every token of the pack."""
    lengths = lengths_from_cu_seqlens(cu_seqlens)
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(ids, lengths, output_size=total)


def positions_in_segment(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """(T,) int64: each token's index inside its own segment (0 at every segment start)."""
    cu = cu_seqlens.to(torch.int64)
    seg = segment_ids(cu_seqlens, total)
    return torch.arange(seg.numel(), device=cu.device) - cu[:-1][seg]


def pack(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (L_i, ...) tensors -> ((sum L_i, ...), cu_seqlens)."""
    if len(tensors) == 0:
        raise ValueError(
            "pack() needs at least one tensor to know the trailing shape; pass an empty (0, ...) tensor for an empty pack"
        )
    trailing = tensors[0].shape[1:]
    for i, t in enumerate(tensors):
        if t.shape[1:] != trailing:
            raise ValueError(f"tensor {i} has trailing shape {tuple(t.shape[1:])}, expected {tuple(trailing)}")
    cu = cu_seqlens_from_lengths([t.shape[0] for t in tensors], device=tensors[0].device)
    return torch.cat(list(tensors), 0), cu


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of :func:`pack`: views into ``packed``, one per segment."""
    check_cu_seqlens(cu_seqlens, packed.shape[0])
    return list(torch.split(packed, lengths_from_cu_seqlens(cu_seqlens).tolist(), 0))


def interleave_index(cu_a: torch.Tensor, cu_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where segment i of pack A followed by segment i of pack B lands in the merged pack.

    Returns (index_a, index_b, cu_merged): ``merged[index_a] = a``, ``merged[index_b] = b``
    gives, for every i, ``merged segment i = cat(a segment i, b segment i)``. This is how a
    cached prefix (A) and newly appended tokens (B) become one key/value stream.
    """
    if cu_a.numel() != cu_b.numel():
        raise ValueError(f"packs have {cu_a.numel() - 1} and {cu_b.numel() - 1} segments; they must match")
    la, lb = lengths_from_cu_seqlens(cu_a), lengths_from_cu_seqlens(cu_b)
    cu_m = cu_seqlens_from_lengths(la + lb, device=cu_a.device).to(torch.int64)
    seg_a = segment_ids(cu_a)
    seg_b = segment_ids(cu_b)
    index_a = cu_m[:-1][seg_a] + positions_in_segment(cu_a)
    index_b = cu_m[:-1][seg_b] + la[seg_b] + positions_in_segment(cu_b)
    return index_a, index_b, cu_m.to(torch.int32)


def interleave(
    a: torch.Tensor, cu_a: torch.Tensor, b: torch.Tensor, cu_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment concatenation of two packs: segment i = cat(a_i, b_i). Returns (merged, cu)."""
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"trailing shapes differ: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")
    index_a, index_b, cu_m = interleave_index(cu_a, cu_b)
    out = a.new_empty((a.shape[0] + b.shape[0], *a.shape[1:]))
    out[index_a] = a
    out[index_b] = b
    return out, cu_m


# ---------------------------------------------------------------------------- padded batches


def pad_rows(
    rows: Sequence[Sequence], value, *, side: str = "right", dtype: torch.dtype = torch.long, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths -> (padded (n, width) tensor, attention mask (n, width) long,
    1 on every real entry); ``side`` says where the padding goes."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            out[i, cols] = torch.as_tensor(r, dtype=dtype)
            mask[i, cols] = 1
    return out.to(device), mask.to(device)


def pad_tokens(
    rows: Sequence, pad_id: int, *, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:class:`fusedvlm.chat.Tokens` rows -> (ids, fused, labels, attention mask), each (n, width):
    ``pad_id`` pads the ids, False the fused slots, IGNORE_INDEX the labels."""
    from fusedvlm.chat import IGNORE_INDEX

    ids, mask = pad_rows([t.ids for t in rows], pad_id, side=side)
    fused, _ = pad_rows([t.fused for t in rows], False, side=side, dtype=torch.bool)
    labels, _ = pad_rows([t.labels for t in rows], IGNORE_INDEX, side=side)
    return ids, fused, labels, mask
