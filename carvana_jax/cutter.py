"""Cut-outs of any photo with a trained ensemble: the mask (and the probability as a soft alpha) at the photo's
own size, made on the devices by the program eval makes masks with (``inference.ensemble_cutouts``), and the
RGBA picture composed from it.

Photos are prepared one by one (``Cutter.prepare``: decoded and warped to each model's input as
``carvana_jax.photos`` says) and run in batches of photos that share a *bucket*: the photo's size as displayed
(the masks come back at exactly that size) and so its model inputs and guide. Each bucket and batch size is
one compiled program, kept for reuse; batches are padded to a power of two so a bucket compiles at most
log2(batch size) + 2 of them. A folder from one camera is one bucket.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import cv2
import numpy as np

from carvana_jax import inference, parallel, photos, refine
from carvana_jax import postprocess as postprocess_lib
from carvana_jax.data import augment

# zlib level: for a 1918×1280 cut-out and its mask 81 + 18 ms at 1 against 139 + 30 ms at 3, for files 4% larger
# (BENCHMARKS.md, "Cut-outs")
PNG_COMPRESSION = 1


@dataclasses.dataclass
class Prepared:
    """A photo ready for the devices: its name, (H, W) as displayed, the device arrays (each model input and
    the guide) and, unless only the mask is wanted, the upright photo at full resolution."""
    name: str
    full_hw: tuple[int, int]
    arrays: dict[str, np.ndarray]
    photo: np.ndarray | None = None

    @property
    def bucket(self) -> tuple:
        return self.full_hw, tuple((key, value.shape) for key, value in sorted(self.arrays.items()))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class Cutter:
    """Cut-outs with a ``predict.Ensemble`` (its models, TTA, threshold and post-processing, as eval uses
    them)."""

    def __init__(self, ensemble, batch_size: int = 8):
        self.ensemble = ensemble
        self.batch_size = max(1, int(batch_size))
        self._image_keys = ensemble.input_keys

    @functools.lru_cache(maxsize=64)
    def _plan(self, full_hw) -> tuple[tuple[tuple[int, int], ...], tuple[str, ...], int]:
        """(each distinct model input's size, its fit, the guide's scale-down or 0) for a ``full_hw`` photo: the
        models' own inputs for the photo size they were trained on, else its aspect ratio at their pixel count
        ('resize'); the guide at the finest JPEG scale those inputs are warped from, as eval takes it."""
        sizes, fits = [], []
        for member_size, fit in self.ensemble.inputs:
            multiple = next(m.multiple for m in self.ensemble.members
                            if (tuple(m.image_size), m.fit) == (member_size, fit))
            size = photos.model_size(full_hw, member_size, multiple)
            sizes.append(size)
            fits.append(fit if size == tuple(member_size) else "resize")
        guide = refine.guide_scale(full_hw, sizes) if self.ensemble.guide_scale else 0
        return tuple(sizes), tuple(fits), guide

    def prepare(self, data: bytes, name: str, keep_photo: bool = True) -> Prepared:
        """Decode and warp one photo's bytes (DataError naming ``name`` when they are no readable image)."""
        header = photos.read_header(data, name)
        full_hw = header.full_hw
        sizes, fits, k_guide = self._plan(full_hw)
        decoded, arrays = {}, {}
        for key, size, fit in zip(self._image_keys, sizes, fits):
            k = augment.dct_scale(full_hw, size)
            if k not in decoded:
                decoded[k] = photos.decode(data, header, k, name)
            arrays[key] = photos.model_input(decoded[k], full_hw, size, fit)
        if k_guide:  # from the finest decode made, as eval's pipeline takes it
            finest = decoded[min(decoded)]
            arrays["guide"] = photos.model_input(finest, full_hw, refine.guide_shape(full_hw, k_guide))
        photo = None
        if keep_photo:
            photo = decoded[1] if 1 in decoded else photos.decode(data, header, 1, name)
        return Prepared(name, full_hw, arrays, photo)

    @functools.lru_cache(maxsize=32)
    def _program(self, full_hw):
        """The device program of a ``full_hw`` photo's bucket (jit compiles it once per batch size)."""
        _, fits, guide_scale = self._plan(full_hw)
        kw = dict(self.ensemble.device_kw)
        key_fit = dict(zip(self._image_keys, fits))
        kw["fits"] = tuple(key_fit[key] for key in kw["image_keys"])
        fn = functools.partial(inference.ensemble_cutouts, threshold=self.ensemble.threshold,
                               guide_scale=guide_scale, shape=tuple(full_hw), **kw)
        return parallel.data_parallel_map(fn, self.ensemble.mesh)

    def cut(self, prepared: Sequence[Prepared]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(binary uint8 mask, uint8 alpha) at each photo's size, for photos of one bucket (at most
        ``batch_size``), the ensemble's host post-processing applied to the mask (and where it changed the
        mask, to the alpha)."""
        if not prepared:
            return []
        bucket = prepared[0].bucket
        if any(p.bucket != bucket for p in prepared):
            raise ValueError("Cutter.cut takes photos of one bucket (one size)")
        full_hw = prepared[0].full_hw
        batch = {key: np.stack([p.arrays[key] for p in prepared]) for key in prepared[0].arrays}
        mesh = self.ensemble.mesh
        rows = min(_pow2_at_least(len(prepared)), max(len(prepared), self.batch_size))
        batch, n = parallel.pad_to_multiple(batch, rows)
        batch, _ = parallel.pad_to_multiple(batch, mesh.devices.size)
        fn = self._program(full_hw)
        masks, alphas = fn(self.ensemble.variables, parallel.shard_batch(batch, mesh))
        masks, alphas = parallel.to_host(masks)[:n], parallel.to_host(alphas)[:n]
        out = []
        for mask, alpha in zip(masks, alphas):
            cleaned = postprocess_lib.apply(mask, self.ensemble.host_steps)
            if cleaned is not mask:
                alpha = np.where(cleaned != mask, cleaned * np.uint8(255), alpha)
            out.append((cleaned, alpha))
        return out


def parse_bgcolor(text: str | None) -> tuple[int, int, int, int] | None:
    """'R,G,B' or 'R,G,B,A' (0–255 each) → (R, G, B, A); None for None or ''."""
    if not text:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (3, 4) or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"a background colour is R,G,B or R,G,B,A with each 0-255; got {text!r}")
    return tuple(values + [255] * (4 - len(values)))


def compose(photo: np.ndarray, alpha: np.ndarray, bgcolor: tuple[int, int, int, int] | None = None
            ) -> np.ndarray:
    """RGBA uint8: the photo with ``alpha`` as its alpha, or laid over ``bgcolor`` (Porter–Duff 'over').
    Fully transparent pixels are stored black: nothing shows them, and the PNG is half the size and encodes
    faster."""
    if bgcolor is None:
        return np.dstack([np.where((alpha == 0)[..., None], np.uint8(0), photo), alpha])
    a = alpha.astype(np.float32)[..., None] / 255.0
    bg = np.asarray(bgcolor[:3], np.float32)
    bg_a = bgcolor[3] / 255.0
    out_a = a + bg_a * (1.0 - a)
    rgb = (photo.astype(np.float32) * a + bg * bg_a * (1.0 - a)) / np.maximum(out_a, 1e-6)
    return np.dstack([np.clip(np.round(rgb), 0, 255).astype(np.uint8),
                      np.round(out_a[..., 0] * 255.0).astype(np.uint8)])


def png_bytes(array: np.ndarray) -> bytes:
    """A PNG of an (H, W) greyscale or (H, W, 4) RGBA uint8 array."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGBA2BGRA)
    ok, buffer = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buffer.tobytes()


def outputs(mask: np.ndarray, alpha: np.ndarray, photo: np.ndarray | None, *, soft: bool = False,
            bgcolor=None, only_mask: bool = False) -> dict[str, bytes]:
    """{'cutout': PNG, 'mask': PNG} of one photo ('cutout' left out with ``only_mask``): the mask 0/255, the
    cut-out with alpha the mask, or the probability with ``soft``."""
    out = {"mask": png_bytes(mask * np.uint8(255))}
    if not only_mask:
        out["cutout"] = png_bytes(compose(photo, alpha if soft else mask * np.uint8(255), bgcolor))
    return out
