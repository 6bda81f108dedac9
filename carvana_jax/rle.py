"""Run-length encoding of masks in the Kaggle Carvana format.

Pixels are numbered 1.. in row-major (C) order over the H×W mask; an RLE string is
space-separated ``start length`` pairs of the runs of foreground pixels.

Encoding packs the mask into bits first (``np.packbits``, ~0.08 ms for 1918×1280): a run edge is a
bit that differs from the one before it, found with a few byte-wise operations on 8× fewer
elements, and only the bytes holding an edge are unpacked again. With the pairs written by one
``%``-format of a tuple, a Carvana mask encodes in ~0.5 ms, against ~6 ms for the textbook version
(``np.where`` of the padded diff, ``' '.join(str(x) for x in runs)``).
"""
from __future__ import annotations

import numpy as np

FULL_SHAPE = (1280, 1918)


def _edges(packed: np.ndarray, size: int) -> np.ndarray:
    """Positions (0-indexed) where a run starts or ends, alternately, in the first ``size`` bits of
    ``packed`` (np.packbits order: most significant bit first); the pixels before 0 and from
    ``size`` on count as background, whatever the padding bits of the last byte hold."""
    # changed[i] has bit b set where stream bit 8i+b differs from the bit before it (bit 8i-1 is the
    # previous byte's lowest bit; ``* 128`` moves it up: numpy's uint8 ``<< 7`` is ~10x slower).
    changed = packed >> 1
    changed[1:] |= (packed[:-1] & 1) * np.uint8(128)
    changed ^= packed
    where = np.flatnonzero(changed != 0)  # on bool: ~15x faster than flatnonzero on uint8
    bits = np.flatnonzero(np.unpackbits(changed[where]))
    edges = where[bits >> 3] * 8 + (bits & 7)
    if edges.size and edges[-1] >= size:  # padding bits past the mask
        edges = edges[edges < size]
    if edges.size % 2:  # the last pixel is foreground: its run ends at ``size``
        edges = np.append(edges, size)
    return edges


def _pack(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels in row-major order as np.packbits bits (any nonzero value is 1)."""
    flat = np.asarray(mask).reshape(-1)
    if flat.dtype != bool and flat.dtype.kind not in "ui":  # packbits takes integers and bools only
        flat = flat != 0
    return np.packbits(flat)


def _pairs(edges: np.ndarray) -> np.ndarray:
    """Interleaved 1-indexed starts and lengths from alternating run start and end positions."""
    pairs = edges.astype(np.int64)
    pairs[1::2] -= edges[0::2]
    pairs[0::2] += 1
    return pairs


def _format(pairs: np.ndarray) -> str:
    """Space-separated integers: one %-format of a tuple (~2x faster than ``' '.join(map(str, ...))``)."""
    return ("%d " * pairs.size % tuple(pairs.tolist()))[:-1]


def run_boundaries(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-indexed run starts and run lengths of the nonzero pixels of ``mask``."""
    pairs = _pairs(_edges(_pack(mask), np.size(mask)))
    return pairs[0::2], pairs[1::2]


def encode(mask: np.ndarray) -> str:
    """RLE string of a binary mask (any nonzero pixel is foreground); '' for an empty mask."""
    return _format(_pairs(_edges(_pack(mask), np.size(mask))))


def encode_packed(packed: np.ndarray, shape: tuple[int, int]) -> str:
    """RLE string of a mask of ``shape`` given bit-packed: ``np.packbits(mask.reshape(-1))`` (e.g. as
    the device sends it, 8x smaller); padding bits of the last byte are ignored."""
    packed = np.asarray(packed)
    size = int(np.prod(shape))
    if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != (size + 7) // 8:
        raise ValueError(f"expected np.packbits of a {'x'.join(map(str, shape))} mask: {(size + 7) // 8} "
                         f"uint8 values in one dimension, got {packed.dtype} of shape {packed.shape}")
    return _format(_pairs(_edges(packed, size)))


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
