"""Batched prediction over records on all devices: full-resolution Dice or full-resolution masks."""
from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
from tqdm import tqdm

from carvana_jax import parallel, steps
from carvana_jax.data import pipeline
from carvana_jax.data.kaggle import Record


def _device_batches(records, config, mesh, batch_size, num_workers=None):
    """(device batch padded to the mesh, number of real rows, their record indices) in record order."""
    batches = iter(pipeline.eval_dataset(records, config, batch_size, num_workers))
    try:
        for batch in batches:
            indices = batch.pop("index")
            padded, n = parallel.pad_to_multiple(batch, mesh.devices.size)
            yield parallel.shard_batch(padded, mesh), n, indices
    finally:
        batches.close()  # stops grain's workers even when the caller stops early


def val_dice(variables, apply_fn, records: list[Record], config, mesh, *, hflip_tta=False,
             progress=False) -> np.ndarray:
    """Per-record Dice at 1918×1280 (NaN for a record skipped as unreadable)."""
    fn = parallel.data_parallel_map(
        functools.partial(steps.eval_dice, apply_fn=apply_fn, threshold=config.threshold, hflip_tta=hflip_tta), mesh)
    scores = np.full(len(records), np.nan)
    bar = tqdm(total=len(records), desc="val Dice", unit="img", disable=not progress, leave=False)
    for batch, n, indices in _device_batches(records, config, mesh, config.eval_batch_size):
        scores[indices] = parallel.to_host(fn(variables, batch))[:n]
        bar.update(n)
    bar.close()
    return scores


def predict_masks(variables, apply_fn, records: list[Record], config, mesh, *, hflip_tta=False
                  ) -> Iterator[tuple[Record, np.ndarray]]:
    """(record, binary uint8 1280×1918 mask) for each record, in order."""
    fn = parallel.data_parallel_map(
        functools.partial(steps.full_res_masks, apply_fn=apply_fn, threshold=config.threshold, hflip_tta=hflip_tta),
        mesh)
    for batch, n, indices in _device_batches(records, config, mesh, config.eval_batch_size):
        masks = parallel.to_host(fn(variables, batch["image"]))
        for i in range(n):
            yield records[indices[i]], masks[i]


def model_size_predictions(variables, apply_fn, images: np.ndarray, mesh, threshold: float) -> np.ndarray:
    """Binary masks at model size for a few images (for pictures)."""
    fn = parallel.data_parallel_map(lambda v, x: steps.predict_probs(v, x, apply_fn) > threshold, mesh)
    padded, n = parallel.pad_to_multiple({"image": images}, mesh.devices.size)
    return parallel.to_host(fn(variables, parallel.shard_batch(padded, mesh)["image"]))[:n]
