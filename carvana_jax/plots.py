"""Pictures of a run: loss and Dice curves from metrics.jsonl, image | truth | prediction overlays."""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(rows, key):
    points = [(r["step"], r[key]) for r in rows if key in r]
    return tuple(zip(*points)) if points else ((), ())


def plot_curves(metrics_path: str, out_path: str) -> None:
    """Training loss, training Dice (model size) and validation Dice (full size) against updates."""
    rows = read_metrics(metrics_path)
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(*_series(rows, "loss"), label="train loss")
    ax_loss.set(xlabel="optimiser update", ylabel="loss", yscale="log", title="Loss")
    ax_dice.plot(*_series(rows, "dice"), label="train Dice (model size)")
    steps, val = _series(rows, "val_dice")
    ax_dice.plot(steps, val, "o-", label="val Dice (1918×1280)")
    ax_dice.set(xlabel="optimiser update", ylabel="Dice", title="Dice", ylim=(max(0.0, min(val or (0.5,)) - 0.05), 1.0))
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, out_path)


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return mask & ~inner


def overlay(image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray) -> np.ndarray:
    """The image with the truth tinted green and the predicted outline in red (all same size)."""
    out = image.astype(np.float32)
    if truth is not None:
        out[truth.astype(bool)] = 0.6 * out[truth.astype(bool)] + 0.4 * np.array([0, 255, 0])
    out[_outline(pred.astype(bool))] = (255, 0, 0)
    return out.astype(np.uint8)


def plot_overlays(images, truths, preds, out_path: str, titles=None) -> None:
    """One row per image: the photo, the true mask, the prediction, and truth/prediction overlaid."""
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(14, 2.4 * n), squeeze=False)
    for i in range(n):
        truth = None if truths is None else truths[i]
        panels = [images[i], truth if truth is not None else np.zeros_like(preds[i]), preds[i],
                  overlay(images[i], truth, preds[i])]
        for j, (ax, panel, name) in enumerate(zip(axes[i], panels, ["image", "truth", "prediction", "overlay"])):
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0, vmax=1 if panel.ndim == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
            if j == 0 and titles is not None:
                ax.set_ylabel(titles[i], fontsize=8)
    fig.tight_layout()
    _save(fig, out_path)


def _save(fig, out_path: str) -> None:
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out_path)


def plot_dice_histogram(scores, out_path: str) -> None:
    """Histogram of per-image Dice (NaN, unreadable images, left out), the mean marked."""
    scores = np.asarray(scores, float)
    scores = scores[np.isfinite(scores)]
    fig, ax = plt.subplots(figsize=(7, 4))
    if scores.size:
        low = min(float(scores.min()), 0.999)
        ax.hist(scores, bins=np.linspace(low, 1.0, 41), color="tab:blue")
        ax.axvline(float(scores.mean()), color="tab:red", label=f"mean {scores.mean():.5f}")
        ax.legend()
    ax.set(xlabel="Dice at 1918×1280", ylabel="images", title=f"Per-image Dice ({scores.size} images)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out_path)


def plot_worst(images, truths, preds, titles, out_path: str, cols: int = 3) -> None:
    """A grid of photos with the truth tinted green and the predicted outline in red, one title each."""
    n = len(images)
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, truth, pred, title in zip(axes.flat, images, truths, preds, titles):
        ax.imshow(overlay(image, truth, pred))
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, out_path)
