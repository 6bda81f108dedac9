"""Where a training run's numbers and pictures go: one writer interface the loop calls, several back-ends.

    writer.write_hparams({...})            once, at the start: the run's config
    writer.write_scalars(step, {...})      loss, Dice, val Dice, learning rate, images/s, peak memory
    writer.write_images(step, {...})       the validation overlays (H, W, 3) uint8

Back-ends: ``JsonlWriter`` (``metrics.jsonl``, one line per call, which ``plots`` reads), ``TensorBoardWriter``
(event files in ``workdir/tensorboard``, written by tensorboardX without TensorFlow: ``tensorboard --logdir
WORKDIR``), ``ProgressWriter`` (the progress bar's numbers and the validation lines) and ``MultiWriter`` over
several. Only process 0 writes; the others get ``NullWriter``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np


class MetricWriter:
    """The interface; every method does nothing unless a back-end says otherwise."""

    def write_hparams(self, hparams: Mapping) -> None:
        pass

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        pass

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()


class NullWriter(MetricWriter):
    """What processes other than 0 write through."""


class JsonlWriter(MetricWriter):
    """``{"step": N, **scalars}`` as one JSON line per call, appended (a resumed run continues the file)."""

    def __init__(self, path: str):
        self.path = path

    def write_scalars(self, step, scalars):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")


class ProgressWriter(MetricWriter):
    """The tqdm bar's postfix (loss, Dice, images/s) and one printed line per validation."""

    def __init__(self, bar, num_val_images: int):
        self.bar, self.num_val_images = bar, num_val_images

    def write_scalars(self, step, scalars):
        if "loss" in scalars:
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", dice=f"{scalars['dice']:.4f}",
                                 img_s=f"{scalars.get('images_per_sec', 0.0):.1f}")
        self.bar.update(step - self.bar.n)
        if "val_dice" in scalars:
            self.bar.write(f"update {step}: val Dice {scalars['val_dice']:.5f} at 1918x1280 "
                           f"over {self.num_val_images} images")


def flat_hparams(config: Mapping, prefix: str = "") -> dict:
    """A nested config as {'model.features': 8, ...}, values as TensorBoard's hparams take them (numbers,
    strings, booleans; sequences as their text)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(list(value) if isinstance(value, Sequence) else value)
    return out


class TensorBoardWriter(MetricWriter):
    """TensorBoard event files in ``logdir`` (tensorboardX: no TensorFlow). Scalars are grouped as
    train/…, val/… and system/… tags; images as HWC uint8; the config as text and as hparams."""

    GROUPS = {"loss": "train", "dice": "train", "learning_rate": "train", "val_dice": "val"}

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter
        self._writer = SummaryWriter(logdir=logdir)

    def write_hparams(self, hparams):
        text = "\n".join(f"    {k} = {v}" for k, v in sorted(hparams.items()))
        self._writer.add_text("config", text, 0)

    def write_scalars(self, step, scalars):
        for key, value in scalars.items():
            self._writer.add_scalar(f"{self.GROUPS.get(key, 'system')}/{key}", float(value), int(step))

    def write_images(self, step, images):
        for key, image in images.items():
            self._writer.add_image(key, np.asarray(image), int(step), dataformats="HWC")

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class MultiWriter(MetricWriter):
    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write_hparams(self, hparams):
        for w in self.writers:
            w.write_hparams(hparams)

    def write_scalars(self, step, scalars):
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_images(self, step, images):
        for w in self.writers:
            w.write_images(step, images)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


def tensorboard_dir(workdir: str) -> str:
    return os.path.join(workdir, "tensorboard")


def for_run(workdir: str, *, main_process: bool, tensorboard: bool, bar=None, num_val_images: int = 0) -> MetricWriter:
    """The writers of a training run in ``workdir``: metrics.jsonl, TensorBoard if asked, the progress bar."""
    if not main_process:
        return NullWriter()
    writers: list[MetricWriter] = [JsonlWriter(os.path.join(workdir, "metrics.jsonl"))]
    if tensorboard:
        writers.append(TensorBoardWriter(tensorboard_dir(workdir)))
    if bar is not None:
        writers.append(ProgressWriter(bar, num_val_images))
    return MultiWriter(writers)
