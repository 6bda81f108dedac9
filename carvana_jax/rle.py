"""Run-length encoding of masks in the Kaggle Carvana format.

Pixels are numbered 1.. in row-major (C) order over the H×W mask; an RLE string is
space-separated ``start length`` pairs of the runs of foreground pixels.
"""
from __future__ import annotations

import numpy as np

FULL_SHAPE = (1280, 1918)


def run_boundaries(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-indexed run starts and run lengths of the nonzero pixels of ``mask``."""
    flat = np.asarray(mask).reshape(-1).astype(bool)
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]
    return starts + 1, ends - starts


def encode(mask: np.ndarray) -> str:
    """RLE string of a binary mask (any nonzero pixel is foreground); '' for an empty mask."""
    starts, lengths = run_boundaries(mask)
    pairs = np.empty(2 * starts.size, dtype=np.int64)
    pairs[0::2], pairs[1::2] = starts, lengths
    return " ".join(map(str, pairs.tolist()))


def parse(rle: str) -> tuple[np.ndarray, np.ndarray]:
    """Starts (1-indexed) and lengths of an RLE string; raises ValueError when malformed."""
    values = np.array(rle.split(), dtype=np.int64) if isinstance(rle, str) and rle.strip() else np.zeros(0, np.int64)
    if values.size % 2:
        raise ValueError(f"RLE has an odd number of values ({values.size})")
    return values[0::2], values[1::2]


def decode(rle: str, shape: tuple[int, int] = FULL_SHAPE, out: np.ndarray | None = None) -> np.ndarray:
    """Binary uint8 mask of ``shape`` from an RLE string; reuses ``out`` when given."""
    starts, lengths = parse(rle)
    size = shape[0] * shape[1]
    if starts.size and (starts.min() < 1 or lengths.min() < 1 or (starts + lengths - 1).max() > size):
        raise ValueError(f"RLE runs fall outside a {shape[0]}x{shape[1]} mask")
    flat = np.zeros(size, np.uint8) if out is None else out.reshape(-1)
    if out is not None:
        flat[:] = 0
    # Mark run starts with +1 and run ends with -1, then a cumulative sum fills the runs.
    delta = np.zeros(size + 1, np.int32)
    np.add.at(delta, starts - 1, 1)
    np.add.at(delta, starts - 1 + lengths, -1)
    flat[:] = np.cumsum(delta[:-1]) > 0
    return flat.reshape(shape)
