"""Batched prediction over records on all devices: full-resolution Dice, masks, or bit-packed masks.

An ``Ensemble`` is one or more models, each with its own input size and fit. Every photo is decoded once
per JPEG DCT scale its models need (one decode when they share a scale, as 768² and 1024² do) and warped
to each model's size exactly as a single model's pipeline would; on the devices each model predicts
at its size (averaged over the TTA views there: ``inference.predict_probs``), its probabilities are
up-sampled to 1918×1280 (or cropped, for fit='pad'), averaged over models and thresholded; with the
'guided' post-processing step they are averaged at the size of the photo's finest decode, refined there by
the photo (``carvana_jax.refine``) and then up-sampled. ``packed_masks`` keeps batches in flight on the
devices and brings back only the bit-packed masks (306,880 bytes an image instead of 2.4 MB); with host
``postprocess`` steps they are cleaned on the host (``carvana_jax.postprocess``, in a thread pool) before
anyone sees them, for Dice and submission alike.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
from tqdm import tqdm

from carvana_jax import checkpoint, dice, inference, parallel, refine, rle
from carvana_jax import postprocess as postprocess_lib
from carvana_jax.data import augment, pipeline
from carvana_jax.data.kaggle import Record
from carvana_jax.errors import CheckpointError, ConfigError

IN_FLIGHT = 2  # device batches dispatched ahead of the one being brought back
HOST_KEYS = ("mask_full",)  # batch arrays that stay on the host


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of an ensemble: its variables (on the devices), apply function, input (H, W), how the photo
    is fitted to it ('resize' | 'pad': augment.fit_matrix) and the multiple its input sizes must be of
    (2**depth for a U-Net: TTA 'scale' resizes to such sizes)."""
    variables: Any
    apply_fn: Callable
    image_size: tuple[int, int]
    fit: str = "resize"
    multiple: int = 1


def input_multiple(config) -> int:
    """What a config's model needs its input sizes to be a multiple of: 2**model.depth (its coarsest map is at
    H/2**depth, for the plain U-Net and the encoder U-Nets alike) times model.space_to_depth (the blocks start at
    H/s)."""
    return 2 ** int(config.model.depth) * int(config.model.get("space_to_depth", 1))


def member(variables, apply_fn, config) -> Member:
    """The ensemble member of a model trained with ``config``."""
    return Member(variables, apply_fn, tuple(config.image_size), config.get("fit", "resize"), input_multiple(config))


class Ensemble:
    """Models whose full-resolution probabilities are averaged, then thresholded, on all devices.

    ``tta``: a TTA spec (``inference.parse_tta``: 'none', 'hflip', 'hflip,shift,scale', …; ``hflip_tta=True`` is
    the older spelling of 'hflip'), the same for every model. ``postprocess``: a ``carvana_jax.postprocess``
    spec: 'guided' runs on the devices, the other steps on the host on every mask before it is scored or
    written, in ``postprocess_threads`` threads (default: up to 8); 'none' leaves the masks as the devices
    made them, with no extra pass."""

    def __init__(self, members: list[Member], mesh, threshold: float = 0.5, hflip_tta: bool = False, *,
                 tta=None, postprocess="none", postprocess_threads: int | None = None):
        if not members:
            raise ValueError("an ensemble needs at least one model")
        for m in members:
            augment.check_fit(rle.FULL_SHAPE, m.image_size, m.fit)
        self.members, self.mesh = list(members), mesh
        self.threshold = float(threshold)
        self.tta = inference.parse_tta(("hflip",) if tta is None and hflip_tta else tta)
        self.hflip_tta = "hflip" in self.tta
        self.postprocess = postprocess_lib.parse(postprocess)
        self.host_steps = postprocess_lib.host_steps(self.postprocess)
        self.postprocess_threads = postprocess_threads or max(1, min(8, os.cpu_count() or 1))
        # The distinct model inputs, in order: models of one size and fit share one.
        self.inputs = list(dict.fromkeys((tuple(m.image_size), m.fit) for m in members))
        self.sizes = [size for size, _ in self.inputs]
        self.variables = tuple(m.variables for m in members)
        self.input_keys = keys = pipeline.input_keys(len(self.inputs))  # the batch key of each distinct input
        # 'guided': the guide is the photo at the finest decode scale any model's input is warped from.
        self.guide_scale = refine.guide_scale(rle.FULL_SHAPE, self.sizes) if "guided" in self.postprocess else 0
        self.guide_hw = refine.guide_shape(rle.FULL_SHAPE, self.guide_scale) if self.guide_scale else None
        # The device programs' static arguments (inference.ensemble_probs).
        self.device_kw = {"apply_fns": tuple(m.apply_fn for m in members), "tta": self.tta,
                          "image_keys": tuple(keys[self.inputs.index((tuple(m.image_size), m.fit))] for m in members),
                          "multiples": tuple(int(m.multiple) for m in members), "fits": tuple(m.fit for m in members)}

    @property
    def tta_name(self) -> str:
        return ",".join(self.tta) or "none"

    @property
    def postprocess_name(self) -> str:
        return ",".join(self.postprocess) or "none"

    @functools.cached_property
    def masks_fn(self) -> Callable:
        """(variables, device batch) → uint8 masks (B, 1280, 1918): without the guided filter as two programs,
        the models' probabilities at their own sizes, then the masks from them
        (``inference.masks_of_member_probs`` says why)."""
        if self.guide_scale:
            return parallel.data_parallel_map(
                functools.partial(inference.ensemble_masks, threshold=self.threshold, guide_scale=self.guide_scale,
                                  **self.device_kw), self.mesh)
        kw = dict(self.device_kw)
        fits = kw.pop("fits")
        probs_fn = parallel.data_parallel_map(functools.partial(inference.member_probs, **kw), self.mesh)
        full_fn = parallel.data_parallel_map(
            lambda _, probs: inference.masks_of_member_probs(probs, threshold=self.threshold, fits=fits), self.mesh)
        return lambda variables, batch: full_fn((), probs_fn(variables, batch))

    @functools.cached_property
    def pack_fn(self) -> Callable:
        """Device masks → bit-packed masks (B, 306880), as sharded as the masks (a program of its own:
        inference.pack_masks says why)."""
        return jax.jit(inference.pack_masks)

    def packed_fn(self, variables, batch):
        """(variables, device batch) → bit-packed masks (B, 306880); both programs dispatched asynchronously."""
        return self.pack_fn(self.masks_fn(variables, batch))

    def dataset(self, records, config, batch_size: int, num_workers: int | None = None) -> grain.IterDataset:
        """In-order batches of every record at every model size (``pipeline.LoadAtSizes``)."""
        transform = pipeline.LoadAtSizes(self.sizes, config.skip_bad_files, [fit for _, fit in self.inputs],
                                         self.guide_hw)
        return pipeline.eval_dataset(records, config, batch_size, num_workers, transform)

    def device_batches(self, records, config, batch_size: int | None = None, num_workers: int | None = None
                       ) -> Iterator[tuple[dict, int, np.ndarray, dict]]:
        """(device batch padded to the mesh, number of real rows, their record indices, what stays on the host:
        {'mask_full': the full-resolution masks} where known) in record order."""
        batches = iter(self.dataset(records, config, batch_size or config.eval_batch_size, num_workers))
        try:
            for batch in batches:
                indices = batch.pop("index")
                host = {key: batch.pop(key) for key in HOST_KEYS if key in batch}
                padded, n = parallel.pad_to_multiple(batch, self.mesh.devices.size)
                yield parallel.shard_batch(padded, self.mesh), n, indices, host
        finally:
            batches.close()  # stops grain's workers even when the caller stops early

    def _in_flight(self, records, config, batch_size=None, num_workers=None, in_flight: int = IN_FLIGHT
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
        """(record indices, bit-packed masks (n, 306880) uint8, host-only arrays) batch by batch, in order.

        Device work is dispatched asynchronously and its result starts copying to the host at once;
        batch k is waited for only after batches k+1 … k+in_flight are dispatched, so the devices,
        the input pipeline and whatever the caller does with batch k overlap. With host post-processing
        steps the masks of batch k are cleaned in a thread pool while batch k+1 is waited for."""
        if self.host_steps:
            yield from self._cleaned(self._in_flight_raw(records, config, batch_size, num_workers, in_flight))
        else:
            yield from self._in_flight_raw(records, config, batch_size, num_workers, in_flight)

    def _in_flight_raw(self, records, config, batch_size, num_workers, in_flight):
        pending = collections.deque()
        for batch, n, indices, host in self.device_batches(records, config, batch_size, num_workers):
            packed = self.packed_fn(self.variables, batch)
            packed.copy_to_host_async()
            pending.append((packed, n, indices, host))
            if len(pending) > in_flight:
                yield _to_host_rows(*pending.popleft())
        while pending:
            yield _to_host_rows(*pending.popleft())

    def _cleaned(self, batches) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
        """``batches`` with each bit-packed mask post-processed (``postprocess.apply_packed``), one batch
        being cleaned while the next is brought back."""
        clean = functools.partial(postprocess_lib.apply_packed, spec=self.host_steps, shape=rle.FULL_SHAPE)
        with concurrent.futures.ThreadPoolExecutor(self.postprocess_threads) as pool:
            pending: collections.deque = collections.deque()
            try:
                for indices, packed, host in batches:
                    pending.append((indices, [pool.submit(clean, p) for p in packed], host))
                    if len(pending) > 1:
                        yield _collect(*pending.popleft())
                while pending:
                    yield _collect(*pending.popleft())
            finally:
                for _, futures, _ in pending:
                    for future in futures:
                        future.cancel()
                if hasattr(batches, "close"):
                    batches.close()  # stops the device loop and grain's workers when the caller stops early

    def dice(self, records, config, *, progress: bool = False, keep_worst: int = 0
             ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """(per-record Dice at 1918×1280, NaN for a record skipped as unreadable; {record index: bit-packed
        mask} of the ``keep_worst`` lowest-scoring records, kept as they go by).

        The masks come back bit-packed and are scored on the host against the pipeline's full-resolution
        masks (``dice.of_packed``), which never go to the devices: 2.4 MB less to copy per image, and on
        the CPU backend a Dice reduction over 2.4 M pixels took 12 ms an image (95 ms fused with the
        prediction, against 14 for the prediction alone)."""
        scores = np.full(len(records), np.nan)
        worst: dict[int, np.ndarray] = {}
        bar = tqdm(total=len(records), desc="Dice", unit="img", disable=not progress, leave=False)
        for indices, packed, host in self._in_flight(records, config):
            scores[indices] = [dice.of_packed(p, t) for p, t in zip(packed, host["mask_full"])]
            if keep_worst:
                worst.update((int(i), p) for i, p in zip(indices, packed))
                worst = dict(sorted(worst.items(), key=lambda kv: scores[kv[0]])[:keep_worst])
            bar.update(len(indices))
        bar.close()
        return scores, worst

    def masks(self, records, config) -> Iterator[tuple[int, np.ndarray]]:
        """(record index, binary uint8 1280×1918 mask) for each record, in order (the simple path)."""
        for batch, n, indices, _ in self.device_batches(records, config):
            masks = parallel.to_host(self.masks_fn(self.variables, batch))
            for i in range(n):
                yield int(indices[i]), postprocess_lib.apply(masks[i], self.host_steps)

    def packed_masks(self, records, config, batch_size: int | None = None, num_workers: int | None = None,
                     in_flight: int = IN_FLIGHT) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(record indices, their bit-packed masks (n, 306880) uint8) batch by batch, in order, with
        ``in_flight`` batches dispatched ahead (``_in_flight``)."""
        for indices, packed, _ in self._in_flight(records, config, batch_size, num_workers, in_flight):
            yield indices, packed


def _to_host_rows(packed, n: int, indices, host: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    return np.asarray(indices[:n]), parallel.to_host(packed)[:n], {k: v[:n] for k, v in host.items()}


def _collect(indices, futures, host) -> tuple[np.ndarray, np.ndarray, dict]:
    return indices, np.stack([f.result() for f in futures]), host


def single_model_ensemble(variables, apply_fn, config, mesh, hflip_tta: bool = False, *, tta=None, postprocess="none"
           ) -> Ensemble:
    """An ensemble of one model trained with ``config`` (its image_size, fit, threshold)."""
    return Ensemble([member(variables, apply_fn, config)], mesh, config.threshold, hflip_tta, tta=tta,
                    postprocess=postprocess)


def val_dice(variables, apply_fn, records: list[Record], config, mesh, *, hflip_tta=False, tta=None,
             postprocess="none", progress=False) -> np.ndarray:
    """Per-record Dice at 1918×1280 (NaN for a record skipped as unreadable)."""
    ensemble = single_model_ensemble(variables, apply_fn, config, mesh, hflip_tta, tta=tta, postprocess=postprocess)
    return ensemble.dice(records, config, progress=progress)[0]


def predict_masks(variables, apply_fn, records: list[Record], config, mesh, *, hflip_tta=False, tta=None,
                  postprocess="none") -> Iterator[tuple[Record, np.ndarray]]:
    """(record, binary uint8 1280×1918 mask) for each record, in order."""
    ensemble = single_model_ensemble(variables, apply_fn, config, mesh, hflip_tta, tta=tta, postprocess=postprocess)
    for index, mask in ensemble.masks(records, config):
        yield records[index], mask


def model_size_predictions(variables, apply_fn, images: np.ndarray, mesh, threshold: float) -> np.ndarray:
    """Binary masks at model size for a few images (for pictures)."""
    fn = parallel.data_parallel_map(lambda v, x: inference.predict_probs(v, x, apply_fn) > threshold, mesh)
    padded, n = parallel.pad_to_multiple({"image": images}, mesh.devices.size)
    return parallel.to_host(fn(variables, parallel.shard_batch(padded, mesh)["image"]))[:n]


def load_ensemble(ckpts: Sequence[str], step: int | None = None, mesh=None, threshold: float | None = None,
                  tta: str | None = None, postprocess: str | None = None):
    """(first checkpoint's config, Ensemble, [(checkpoint folder, step), ...]) of one or more --ckpt; ``tta``
    and ``postprocess`` default to the first checkpoint's config."""
    if isinstance(ckpts, str):
        ckpts = [ckpts]
    if not ckpts:
        raise CheckpointError("no --ckpt given")
    try:  # a bad --tta / --postprocess fails before any checkpoint is read
        inference.parse_tta(tta)
        postprocess_lib.parse(postprocess)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    mesh = mesh or parallel.make_mesh()
    members, loaded, first = [], [], None
    for path in ckpts:
        config, variables, apply_fn, at = checkpoint.load_checkpoint(path, step, mesh)
        first = first or config
        split = ("seed", "val_fraction", "val_cars")
        if any(config[k] != first[k] for k in split):
            print(f"note: {path} held out other cars ({', '.join(f'{k}={config[k]}' for k in split)}) than "
                  f"{ckpts[0]}; --split val scores the first one's, which it may have trained on")
        members.append(member(variables, apply_fn, config))
        loaded.append((checkpoint.checkpoint_dir(checkpoint.step_path(path, None)[0]), at))
    threshold = first.threshold if threshold is None else threshold
    if not 0.0 <= threshold < 1.0:
        raise CheckpointError(f"--threshold must be in [0, 1), got {threshold}")
    tta = first.get("tta", "none") if tta is None else tta
    postprocess = first.get("postprocess", "none") if postprocess is None else postprocess
    try:
        ensemble = Ensemble(members, mesh, threshold, tta=tta, postprocess=postprocess)
    except ValueError as e:  # a bad --tta / --postprocess, or a fit='pad' checkpoint of the wrong size
        raise ConfigError(str(e)) from e
    return first, ensemble, loaded
