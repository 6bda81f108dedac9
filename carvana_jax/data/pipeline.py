"""grain input pipelines: shuffled, paired-augmented training batches and in-order eval batches.

Training: source → shuffle (reseeded each epoch) → repeat → random_map(PairedAugment) → this
process's slice of every global batch → worker processes → drop bad files → batch. Randomness is
keyed by the element's global index, so the same seed gives the same global batches whatever the
number of processes, workers or micro-steps they are cut into. Workers each take every
num_workers-th element and grain interleaves them back in order, so the many-to-one steps (the
filter and the batching) run after the workers, in this process: batched inside the workers, a
batch would hold every num_workers-th element instead of consecutive ones.
"""
from __future__ import annotations

import logging

import grain
import numpy as np

from carvana_jax.data import augment
from carvana_jax.data.kaggle import DataError, Record


class PairedAugment(grain.transforms.RandomMap):
    """Record → {'image': uint8 H×W×3, 'mask': uint8 H×W}, one random affine shared by both."""

    def __init__(self, image_size, augment_cfg, skip_bad_files: bool = False):
        self.image_size = tuple(image_size)
        self.augment_cfg = augment_cfg
        self.skip_bad_files = skip_bad_files

    def random_map(self, record: Record, rng: np.random.Generator):
        params = augment.sample_params(rng, self.augment_cfg)
        try:
            image, mask = augment.load_pair(record.image_path, record.mask_path, self.image_size, params)
        except DataError as e:
            if not self.skip_bad_files:
                raise
            return _bad(e)
        return {"image": image, "mask": mask}


class LoadForEval(grain.transforms.MapWithIndex):
    """Record → model-size image, its index, and the full-resolution mask when the record has one."""

    def __init__(self, image_size, skip_bad_files: bool = False):
        self.image_size = tuple(image_size)
        self.skip_bad_files = skip_bad_files

    def map_with_index(self, index: int, record: Record):
        try:
            image, _ = augment.load_pair(record.image_path, None, self.image_size)
            item = {"image": image, "index": np.int64(index)}
            if record.mask_path is not None:
                item["mask_full"] = augment.decode_mask(record.mask_path)
        except DataError as e:
            if not self.skip_bad_files:
                raise
            return _bad(e)
        return item


_skipped = 0


def _bad(error: DataError) -> dict:
    global _skipped  # a per-worker count, only for the log line
    _skipped += 1
    logging.warning("skipping bad file (%d so far in this worker): %s", _skipped, error)
    return {"bad": str(error)}


def _is_good(item) -> bool:
    return "bad" not in item


class ProcessSlice(grain.MapDataset):
    """This process's consecutive share of every global batch of ``parent``."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        if global_batch % process_count:
            raise ValueError(f"batch_size {global_batch} is not divisible by {process_count} processes")
        self._global_batch = global_batch
        self._local_batch = global_batch // process_count
        self._offset = process_index * self._local_batch

    def __len__(self) -> int:
        return len(self._parent) // self._global_batch * self._local_batch

    def __getitem__(self, index):
        batch, position = divmod(index, self._local_batch)
        return self._parent[batch * self._global_batch + self._offset + position]

    def __str__(self) -> str:
        return f"ProcessSlice(offset={self._offset}, local_batch={self._local_batch})"


def _with_workers(ds: grain.IterDataset, num_workers: int, batch_size: int) -> grain.IterDataset:
    """Elements of ``ds`` made in worker processes, in the same order; about two batches buffered."""
    if num_workers <= 0:
        return ds
    buffer = max(2, -(-2 * batch_size // num_workers))
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer))


def train_dataset(records: list[Record], config, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Endless training batches (this process's share) of augmented images and masks."""
    if not records:
        raise DataError("no training images (is val_fraction too large?)")
    ds = grain.MapDataset.source(records).shuffle(seed=config.seed).repeat()
    ds = ds.random_map(PairedAugment(config.image_size, config.augment, config.skip_bad_files), seed=config.seed)
    local_batch = config.batch_size // process_count
    ds = ProcessSlice(ds, config.batch_size, process_index, process_count).to_iter_dataset()
    ds = _with_workers(ds, config.num_workers, local_batch)
    return ds.filter(_is_good).batch(local_batch, drop_remainder=True)


def eval_dataset(records: list[Record], config, batch_size: int, num_workers: int | None = None) -> grain.IterDataset:
    """Every record once, in order, at model size (with full-size masks where known)."""
    ds = grain.MapDataset.source(records).map_with_index(LoadForEval(config.image_size, config.skip_bad_files))
    ds = _with_workers(ds.to_iter_dataset(), config.num_workers if num_workers is None else num_workers, batch_size)
    return ds.filter(_is_good).batch(batch_size, drop_remainder=False)
