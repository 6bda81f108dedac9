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


def decode(rle: str, shape: tuple[int, int] = FULL_SHAPE, out: np.ndarray | None = None, value: int = 1) -> np.ndarray:
    """uint8 mask of ``shape`` from an RLE string: ``value`` (1 unless told) on the runs, 0 elsewhere;
    written into ``out`` when given.

    The runs and the gaps between them become one array of lengths, expanded with ``np.repeat``:
    ~0.2 ms for a Carvana mask, against ~10 ms for marking run ends and taking a cumulative sum.
    Runs out of order or overlapping (not Kaggle's, but legal) are merged first: their union is set.
    """
    starts, lengths = parse(rle)
    size = shape[0] * shape[1]
    if starts.size and (starts.min() < 1 or lengths.min() < 1 or (starts + lengths - 1).max() > size):
        raise ValueError(f"RLE runs fall outside a {shape[0]}x{shape[1]} mask")
    begin = starts - 1
    end = begin + lengths
    if begin.size > 1 and np.any(begin[1:] < end[:-1]):  # unsorted or overlapping: merge into disjoint runs
        order = np.argsort(begin, kind="stable")
        begin, end = begin[order], np.maximum.accumulate(end[order])
        first = np.ones(begin.size, bool)
        first[1:] = begin[1:] > end[:-1]
        begin, end = begin[first], end[np.append(first[1:], True)]
    bounds = np.empty(2 * begin.size + 2, np.int64)
    bounds[0], bounds[-1] = 0, size
    bounds[1:-1:2], bounds[2:-1:2] = begin, end
    values = np.zeros(bounds.size - 1, np.uint8)
    values[1::2] = value
    flat = np.repeat(values, np.diff(bounds))
    if out is None:
        return flat.reshape(shape)
    out[...] = flat.reshape(shape)
    return out
