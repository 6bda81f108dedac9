"""Hard Dice, the competition's metric, on each form a mask takes here: dense arrays (on the devices or the
host), bit-packed bytes (full-resolution predictions kept on the host) and RLE run lists (submissions). Two
empty masks score 1, as Kaggle scores them."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def from_counts(intersection: int, total: int) -> float:
    """2·|A∩B| / (|A| + |B|), 1 when both are empty."""
    return 1.0 if total == 0 else 2.0 * intersection / total


def per_image(pred, truth, xp=jnp):
    """Dice of each binary prediction against its truth over all but the first axis (``xp``: jnp or np)."""
    pred = pred.reshape(pred.shape[0], -1).astype(bool)
    truth = truth.reshape(truth.shape[0], -1).astype(bool)
    intersection = (pred & truth).sum(-1)
    total = pred.sum(-1) + truth.sum(-1)
    return xp.where(total == 0, 1.0, 2.0 * intersection / xp.maximum(total, 1))


def of_packed(packed: np.ndarray, truth: np.ndarray) -> float:
    """Dice of a bit-packed predicted mask against a binary truth mask of the same pixels, counted with
    popcounts on the packed bytes."""
    truth_bits = np.packbits(np.asarray(truth).reshape(-1) != 0)
    if truth_bits.shape != packed.shape:
        raise ValueError(f"a {np.shape(truth)} truth mask does not fit a prediction of {8 * packed.size} pixels")
    inter = int(np.bitwise_count(packed & truth_bits).sum())
    return from_counts(inter, int(np.bitwise_count(packed).sum()) + int(np.bitwise_count(truth_bits).sum()))


def _covered_before(starts: np.ndarray, lengths: np.ndarray, cumulative: np.ndarray,
                    pixels: np.ndarray) -> np.ndarray:
    """How many of the runs' pixels are numbered below each of ``pixels`` (runs sorted, disjoint)."""
    i = np.searchsorted(starts, pixels, side="right") - 1  # the last run starting at or before
    inside = np.minimum(pixels - starts[np.maximum(i, 0)], lengths[np.maximum(i, 0)])
    return np.where(i >= 0, cumulative[np.maximum(i, 0)] + inside, 0)


def run_overlap(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> int:
    """Pixels in both of two run lists (starts, lengths), each sorted with disjoint runs.

    Each run [s, s+l) of ``b`` contains covered_a(s+l) - covered_a(s) pixels of ``a``, where
    covered_a(x) counts ``a``'s pixels below x; ``b``'s runs being disjoint, these add up."""
    (a_starts, a_lengths), (b_starts, b_lengths) = a, b
    if not a_starts.size or not b_starts.size:
        return 0
    cumulative = np.concatenate([[0], np.cumsum(a_lengths)])
    ends = _covered_before(a_starts, a_lengths, cumulative, b_starts + b_lengths)
    begins = _covered_before(a_starts, a_lengths, cumulative, b_starts)
    return int((ends - begins).sum())


def of_runs(pred: tuple[np.ndarray, np.ndarray], truth: tuple[np.ndarray, np.ndarray]) -> float:
    """Dice of two run lists (starts, lengths); 1 when both are empty, as Kaggle scores it."""
    return from_counts(run_overlap(pred, truth), int(pred[1].sum()) + int(truth[1].sum()))
