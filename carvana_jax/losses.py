"""Segmentation losses on logits (B, H, W) against binary masks; each averages per-image terms."""
from __future__ import annotations

import jax
import optax

SMOOTH = 1.0  # keeps soft Dice/Jaccard defined (and 1) on empty masks


def bce(logits, masks):
    return optax.sigmoid_binary_cross_entropy(logits, masks).mean()


def _overlaps(logits, masks):
    probs = jax.nn.sigmoid(logits).reshape(logits.shape[0], -1)
    masks = masks.reshape(masks.shape[0], -1)
    return (probs * masks).sum(-1), probs.sum(-1) + masks.sum(-1)


def soft_dice_loss(logits, masks):
    intersection, total = _overlaps(logits, masks)
    return (1.0 - (2.0 * intersection + SMOOTH) / (total + SMOOTH)).mean()


def soft_jaccard_loss(logits, masks):
    intersection, total = _overlaps(logits, masks)
    return (1.0 - (intersection + SMOOTH) / (total - intersection + SMOOTH)).mean()


LOSSES = {
    "bce": bce,
    "dice": soft_dice_loss,
    "bce_dice": lambda logits, masks: bce(logits, masks) + soft_dice_loss(logits, masks),
    "bce_jaccard": lambda logits, masks: bce(logits, masks) + soft_jaccard_loss(logits, masks),
}


def get(name: str):
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {name!r}")
    return LOSSES[name]
