"""Segmentation losses on logits (B, H, W) against masks in [0, 1] (binary, or soft coverage); each averages
per-image terms. Every loss takes optional per-pixel ``weights`` (B, H, W): ``boundary_weights`` makes the
pixels near the true edge count more, as the winning Carvana teams did."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax import lax

SMOOTH = 1.0  # keeps soft Dice/Jaccard defined (and 1) on empty masks


def _flat(x):
    return x.reshape(x.shape[0], -1)


def bce(logits, masks, weights=None):
    per_pixel = _flat(optax.sigmoid_binary_cross_entropy(logits, masks))
    if weights is None:
        return per_pixel.mean()
    weights = _flat(weights)
    return ((per_pixel * weights).sum(-1) / weights.sum(-1)).mean()


def _overlaps(logits, masks, weights=None):
    """Per-image (Σ w·p·m, Σ w·(p + m)) of the probabilities p against the masks m, w = 1 without weights."""
    probs, masks = _flat(jax.nn.sigmoid(logits)), _flat(masks)
    w = 1.0 if weights is None else _flat(weights)
    return (w * probs * masks).sum(-1), (w * (probs + masks)).sum(-1)


def soft_dice(logits, masks, weights=None):
    """Per-image soft Dice (B,)."""
    intersection, total = _overlaps(logits, masks, weights)
    return (2.0 * intersection + SMOOTH) / (total + SMOOTH)


def soft_dice_loss(logits, masks, weights=None):
    return (1.0 - soft_dice(logits, masks, weights)).mean()


def soft_jaccard_loss(logits, masks, weights=None):
    intersection, total = _overlaps(logits, masks, weights)
    return (1.0 - (intersection + SMOOTH) / (total - intersection + SMOOTH)).mean()


def log_dice_loss(logits, masks, weights=None):
    """−log soft Dice: its gradient grows as Dice nears 1 stops mattering to 1 − Dice (TernausNet's −log J)."""
    return -jnp.log(soft_dice(logits, masks, weights)).mean()


LOSSES = {
    "bce": bce,
    "dice": soft_dice_loss,
    "bce_dice": lambda logits, masks, weights=None: bce(logits, masks, weights) + soft_dice_loss(logits, masks, weights),
    "bce_jaccard": lambda logits, masks, weights=None: (bce(logits, masks, weights)
                                                        + soft_jaccard_loss(logits, masks, weights)),
    "bce_logdice": lambda logits, masks, weights=None: bce(logits, masks, weights) + log_dice_loss(logits, masks, weights),
}


def boundary_band(masks, width: int):
    """1.0 where a pixel lies within ``width`` pixels (Chebyshev distance) of the other class, of the masks
    thresholded at one half; else 0.0. A window of 2·width+1 holding both classes is the band."""
    binary = (masks > 0.5).astype(jnp.float32)
    return _square_window(binary, lax.max, -jnp.inf, width) - _square_window(binary, lax.min, jnp.inf, width)


def _square_window(x, op, init, width: int):
    """``op`` (max or min) of (B, H, W) ``x`` over (2·width+1)² windows, outside the image ignored: a pass along
    the rows, then one along the columns — 2·(2·width+1) comparisons a pixel instead of (2·width+1)², which XLA's
    CPU backend does not find by itself (BENCHMARKS.md, "separable boundary band")."""
    k, ones = 2 * width + 1, (1, 1, 1)
    x = lax.reduce_window(x, init, op, (1, k, 1), ones, "SAME")
    return lax.reduce_window(x, init, op, (1, 1, k), ones, "SAME")


def boundary_weights(masks, weight: float, width: int):
    """Per-pixel weights 1 + ``weight`` in the edge band of ``width`` model pixels, 1 elsewhere."""
    return 1.0 + weight * lax.stop_gradient(boundary_band(masks, width))


def get(name: str, boundary_weight: float = 0.0, boundary_width: int = 2):
    """The loss ``name`` as a function of (logits, masks); with ``boundary_weight`` > 0 its pixels near the
    true edge weigh 1 + boundary_weight."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {name!r}")
    loss = LOSSES[name]
    if boundary_weight <= 0:
        return loss
    return functools.partial(_weighted, loss, boundary_weight, boundary_width)


def _weighted(loss, weight, width, logits, masks):
    return loss(logits, masks, boundary_weights(masks, weight, width))


def from_config(config):
    """The training loss a config asks for."""
    return get(config.loss, config.get("loss_boundary_weight", 0.0), config.get("loss_boundary_width", 2))
