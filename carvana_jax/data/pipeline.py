"""grain input pipelines: shuffled, paired-augmented training batches and in-order eval batches.

Training: source → shuffle (reseeded each epoch) → repeat → random_map(PairedAugment) → this
process's slice of every global batch → worker processes → drop bad files → batch. Sources hold
folder Records (file paths) or TFDS example dicts (the files' bytes); both decode the same way.
Randomness is keyed by the element's global index, so the same seed gives the same global batches whatever the
number of processes, workers or micro-steps they are cut into. With pseudo-labels, every global
batch draws a fixed number of its elements from a second shuffled, repeated stream (test photos and
the masks a submission CSV gives them) at fixed places, before the augmentation (``MixedBatches``), so
one global index still says where the run is. Workers each take every
num_workers-th element and grain interleaves them back in order, so the many-to-one steps (the
filter and the batching) run after the workers, in this process: batched inside the workers, a
batch would hold every num_workers-th element instead of consecutive ones.

Parallelism: with ``num_workers`` > 0 each worker process maps one element at a time on one reading
thread, while its main thread hands the previous element over (grain copies each array into a fresh
shared-memory block, which this process maps and stacks into the batch). With 0 workers, grain's
reading threads (one per CPU) map in this process; decoding and warping release the GIL, so they run
in parallel too. grain's default, 16 reading threads in every worker, made one worker 3x slower than
none (bench pipeline). Writing the outputs straight into shared memory was measured and dropped: the
first touch of fresh shared pages (~4.5 µs per 4 KiB page on the benchmark VM) then lands on the
worker's critical path instead of overlapping the next element.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import NamedTuple, Union

import grain
import numpy as np

from carvana_jax import photos
from carvana_jax.data import augment
from carvana_jax.data.kaggle import Record
from carvana_jax.errors import DataError

# An element of a source: a folder Record (file paths), or a TFDS example {'name', 'car_id', 'angle',
# 'image': JPEG bytes, 'mask': GIF bytes (b'' in test), 'mask_rle': its RLE ('' in test)}.
Element = Union[Record, Mapping]  # noqa: UP007 (a runtime alias: X | Y needs both to be types)


class Parts(NamedTuple):
    """What decoding an element needs: the photo (path or bytes), its mask (None when unknown) and
    what errors call the photo's bytes (None for a path, which names itself)."""
    image: augment.Source
    mask: augment.MaskSource | None
    name: str | None


def _as_str(value) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def as_bytes(value) -> bytes:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def element_parts(element: Element) -> Parts:
    """The photo, mask and name of a Record or of a TFDS example dict. The mask comes from its RLE when
    one is known (the CSV's for a Record, ``mask_rle`` for a dict), else from the GIF."""
    if isinstance(element, Record):
        mask = None
        if element.mask_rle is not None or element.mask_path is not None:
            where = element.mask_path if element.mask_rle is None else f"train_masks.csv ({element.name})"
            mask = augment.MaskSource(rle=element.mask_rle, file=element.mask_path, name=where)
        return Parts(element.image_path, mask, None)
    if not isinstance(element, Mapping):
        raise TypeError(f"expected a kaggle.Record or an example dict, got {type(element).__name__}")
    name = _as_str(element["name"])
    gif = as_bytes(element.get("mask", b""))
    text = element.get("mask_rle")
    text = None if text is None else _as_str(text)
    mask = None
    if gif:  # a training example: its RLE (the GIF's, written with it) when there is one
        mask = augment.MaskSource(rle=text, file=gif, name=f"{name} (mask)")
    elif text:  # only the RLE was kept
        mask = augment.MaskSource(rle=text, name=f"{name} (mask_rle)")
    return Parts(as_bytes(element["image"]), mask, f"{name} (image)")


class PairedAugment(grain.transforms.RandomMap):
    """Element → {'image': uint8 H×W×3, 'mask': uint8 H×W}, one random affine shared by both. The mask is
    0/1, or with ``soft_masks`` each pixel's car coverage 0..255."""

    def __init__(self, image_size, augment_cfg, skip_bad_files: bool = False, soft_masks: bool = False,
                 fit: str = "resize"):
        self.image_size = tuple(image_size)
        self.augment_cfg = augment_cfg
        self.skip_bad_files = skip_bad_files
        self.soft_masks = soft_masks
        self.fit = fit  # 'resize' | 'pad': augment.fit_matrix

    def random_map(self, element: Element, rng: np.random.Generator):
        params = augment.sample_params(rng, self.augment_cfg)
        try:
            parts = element_parts(element)
            if parts.mask is None:
                raise DataError(f"{augment.source_name(parts.image, parts.name)}: a training example without a mask")
            image, mask = augment.load_pair(parts.image, parts.mask, self.image_size, params, name=parts.name,
                                            soft=self.soft_masks, fit=self.fit)
        except DataError as e:
            if not self.skip_bad_files:
                raise
            return bad_item(e)
        return {"image": image, "mask": mask}


def input_keys(count: int) -> tuple[str, ...]:
    """The batch keys of a model's input photo: 'image' for one model size, 'image0', 'image1', … for several."""
    return ("image",) if count == 1 else tuple(f"image{i}" for i in range(count))


class LoadAtSizes(grain.transforms.MapWithIndex):
    """Element → {input_keys: the photo at each model size (placed as its ``fit`` says: augment.fit_matrix),
    'index', 'mask_full': the full-resolution mask when the element has one, and with ``guide_hw`` 'guide': the
    photo resized to it (the guided filter's guide)}: the one way photos are read for prediction.

    The JPEG is decoded once per DCT scale (``augment.dct_scale``) and each size is warped from the decode a
    model of that size alone would use, so every model sees what it saw in validation; the guide comes from
    the finest decode made. A bad file raises DataError, or with ``skip_bad_files`` becomes a ``bad_item``."""

    def __init__(self, sizes, skip_bad_files: bool = False, fits=None, guide_hw=None):
        self.sizes = [tuple(s) for s in sizes]
        self.skip_bad_files = skip_bad_files
        self.fits = list(fits) if fits is not None else ["resize"] * len(self.sizes)
        self.guide_hw = None if guide_hw is None else tuple(guide_hw)
        self.keys = input_keys(len(self.sizes))

    def map_with_index(self, index: int, element: Element):
        try:
            parts = element_parts(element)
            data = augment.read_bytes(parts.image, parts.name)
            what = augment.source_name(parts.image, parts.name)
            header = augment.jpeg_header(data)
            decoded, item, full_hw = {}, {"index": np.int64(index)}, None
            for key, size, fit in zip(self.keys, self.sizes, self.fits):
                scale = augment.dct_scale(header, size) if header else size
                if scale not in decoded:
                    decoded[scale] = augment.decode_image(data, size, what)
                photo, full_hw = decoded[scale]
                item[key] = photos.model_input(photo, full_hw, size, fit)
            if self.guide_hw is not None:
                photo, full_hw = max(decoded.values(), key=lambda d: d[0].shape[0])
                item["guide"] = photos.model_input(photo, full_hw, self.guide_hw)
            if parts.mask is not None:
                item["mask_full"] = parts.mask.decode(full_hw, image_name=parts.name)
        except DataError as e:
            if not self.skip_bad_files:
                raise
            return bad_item(e)
        return item


class LoadForEval(LoadAtSizes):
    """LoadAtSizes of one model size: {'image', 'index', 'mask_full', 'guide'}."""

    def __init__(self, image_size, skip_bad_files: bool = False, fit: str = "resize", guide_hw=None):
        super().__init__([image_size], skip_bad_files, [fit], guide_hw)


_skipped = 0


def bad_item(error: DataError) -> dict:
    global _skipped  # a per-worker count, only for the log line
    _skipped += 1
    logging.getLogger(__name__).warning("skipping bad file (%d so far in this worker): %s", _skipped, error)
    return {"bad": str(error)}


def is_good(item) -> bool:
    return "bad" not in item


class ProcessSlice(grain.MapDataset):
    """This process's consecutive share of every global batch of ``parent``, the global batches starting at
    element ``start`` of ``parent`` (where a resumed run picks up, whatever the process count then)."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int,
                 start: int = 0):
        super().__init__(parent)
        if global_batch % process_count:
            raise ValueError(f"batch_size {global_batch} is not divisible by {process_count} processes")
        self._global_batch = global_batch
        self._local_batch = global_batch // process_count
        self._start = start
        self._offset = start + process_index * self._local_batch

    def __len__(self) -> int:
        return max(len(self._parent) - self._start, 0) // self._global_batch * self._local_batch

    def __getitem__(self, index):
        batch, position = divmod(index, self._local_batch)
        return self._parent[batch * self._global_batch + self._offset + position]

    def __str__(self) -> str:
        return f"ProcessSlice(offset={self._offset}, local_batch={self._local_batch})"


def keep_freed_memory(worker_index: int = 0, worker_count: int = 1) -> bool:
    """In a worker process: glibc malloc keeps freed blocks of up to 32 MiB for reuse instead of giving
    every one back to the OS. A decoded 1918×1280 photo (7 MiB) is otherwise a fresh mmap each time,
    and first-touch page faults cost ~4 ms of its ~6 ms decode on the benchmark VM. Only in worker
    processes, which exist to run the pipeline; False where glibc's mallopt is not there."""
    del worker_index, worker_count
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 256 << 20))
    except (OSError, AttributeError):
        return False


def exit_with_parent(poll_s: float = 1.0) -> threading.Thread:
    """A watch, in a worker process, that ends it within ``poll_s`` of its parent's death: a main process
    killed by SIGKILL, or crashed, runs none of the clean-up that would stop its workers, and they would
    otherwise idle on, holding their memory."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def init_worker(worker_index: int = 0, worker_count: int = 1) -> None:
    """grain worker_init_fn: malloc tuned for decoding (``keep_freed_memory``), and an end with the parent
    only. Ctrl-C reaches the terminal's whole process group and SLURM signals every process of a job: a
    worker dying of that would break the main process's last batches while it saves; it stops the workers
    itself."""
    keep_freed_memory(worker_index, worker_count)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    exit_with_parent()


def read_by_workers(ds: grain.MapDataset, num_workers: int, batch_size: int) -> grain.IterDataset:
    """``ds`` read in order by ``num_workers`` worker processes (one element at a time each, about two
    batches buffered), or by one reading thread per CPU in this process when num_workers is 0."""
    if num_workers <= 0:
        threads = max(1, min(os.cpu_count() or 1, 16))
        return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                    prefetch_buffer_size=max(2 * batch_size, threads)))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    buffer = max(2, -(-2 * batch_size // num_workers))
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer),
                          worker_init_fn=init_worker)


def pseudo_per_batch(fraction: float, batch_size: int) -> int:
    """Pseudo-labelled elements in each global batch: ``fraction`` of ``batch_size``, rounded half up."""
    return int(math.floor(fraction * batch_size + 0.5))


class MixedBatches(grain.MapDataset):
    """Two endless streams interleaved batch by batch: of every ``batch_size`` consecutive elements,
    ``per_batch`` come from ``pseudo`` (spread evenly over the batch) and the rest from ``real``, each
    stream read in its own order. Element i depends only on i, so the global stream position, the
    per-process slices and resuming mean what they mean without pseudo-labels."""

    def __init__(self, real: grain.MapDataset, pseudo: grain.MapDataset, batch_size: int, per_batch: int):
        super().__init__([real, pseudo])
        if not 0 < per_batch < batch_size:
            raise ValueError(f"{per_batch} pseudo-labelled elements do not fit a batch of {batch_size} with real ones")
        self._batch, self._per_batch = batch_size, per_batch

    def __len__(self) -> int:
        return sys.maxsize  # both streams repeat

    def is_pseudo(self, index: int) -> bool:
        """Whether element ``index`` comes from the pseudo-labelled stream."""
        slot = index % self._batch
        return (slot + 1) * self._per_batch // self._batch > slot * self._per_batch // self._batch

    def __getitem__(self, index):
        batch, slot = divmod(index, self._batch)
        before = slot * self._per_batch // self._batch  # pseudo-labelled slots before this one in its batch
        if self.is_pseudo(index):
            return self._parents[1][batch * self._per_batch + before]
        return self._parents[0][batch * (self._batch - self._per_batch) + slot - before]

    def __str__(self) -> str:
        return f"MixedBatches(batch_size={self._batch}, pseudo_per_batch={self._per_batch})"


def mix_pseudo_labels(ds: grain.MapDataset, config, pseudo=None) -> grain.MapDataset:
    """``ds`` (the shuffled, repeated training examples) with ``pseudo_per_batch(config.pseudo_fraction,
    config.batch_size)`` elements of every global batch taken from the pseudo-labelled photos instead
    (``pseudo``, default ``sources.pseudo_labelled(config)``), shuffled and repeated with a seed of their own;
    ``ds`` itself without pseudo-labels."""
    if not config.get("pseudo_labels", ""):
        return ds
    if pseudo is None:
        from carvana_jax.data import sources  # sources reads the CSV (and imports the scorer)
        pseudo = sources.pseudo_labelled(config)
    seed = int(np.random.SeedSequence([config.seed, 1]).generate_state(1)[0])  # not the real stream's order
    stream = grain.MapDataset.source(pseudo).shuffle(seed=seed).repeat()
    return MixedBatches(ds, stream, config.batch_size, pseudo_per_batch(config.pseudo_fraction, config.batch_size))


def train_dataset(records: list[Element], config, process_index: int = 0, process_count: int = 1,
                  start: int = 0, pseudo=None) -> grain.IterDataset:
    """Endless training batches (this process's share) of augmented images and masks, from element ``start``
    of the global stream (the number of elements earlier global batches took). With ``config.pseudo_labels``,
    ``pseudo_per_batch`` elements of every global batch are pseudo-labelled test photos (``pseudo``, default
    ``sources.pseudo_labelled(config)``): see ``mix_pseudo_labels``."""
    if not records:
        raise DataError("no training images (is val_fraction too large?)")
    workers = config.num_workers
    ds = grain.MapDataset.source(records).shuffle(seed=config.seed).repeat()
    ds = mix_pseudo_labels(ds, config, pseudo)
    ds = ds.random_map(PairedAugment(config.image_size, config.augment, config.skip_bad_files,
                                             config.get("soft_masks", False), config.get("fit", "resize")),
                       seed=config.seed)
    local_batch = config.batch_size // process_count
    ds = read_by_workers(ProcessSlice(ds, config.batch_size, process_index, process_count, start), workers, local_batch)
    return ds.filter(is_good).batch(local_batch, drop_remainder=True)


def eval_dataset(records: list[Element], config, batch_size: int, num_workers: int | None = None,
                 transform: grain.transforms.MapWithIndex | None = None) -> grain.IterDataset:
    """Every record once, in order, mapped by ``transform`` (default: LoadForEval at the model's size, with
    full-size masks where known)."""
    workers = config.num_workers if num_workers is None else num_workers
    transform = transform or LoadForEval(config.image_size, config.skip_bad_files, config.get("fit", "resize"))
    ds = grain.MapDataset.source(records).map_with_index(transform)
    return read_by_workers(ds, workers, batch_size).filter(is_good).batch(batch_size, drop_remainder=False)
