"""Pure per-device prediction kernels: the test-time-augmentation views, model-size probabilities, their
up-sampling (or crop) to the photo, ensembles of several models, and the masks bit-packed for the host.

Like the train step (steps.py) they are written for one device; predict.py and cutter.py map them over the
mesh and batch the photos.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from carvana_jax import refine
from carvana_jax.data.augment import pad_offsets
from carvana_jax.rle import FULL_SHAPE
from carvana_jax.steps import normalise

# Test-time augmentation: each transform's views are predicted on the transformed input and mapped back,
# and the mean over the plain view and all of them is taken at model size, before any up-sampling.
TTA = ("hflip", "shift", "scale", "phase")
SHIFT_PX = 4          # 'shift': two views, the input moved by (+4, +4) and (-4, -4) model pixels (edges repeated)
SCALES = (0.9, 1.1)   # 'scale': two views, the input resized by these factors (to a multiple of the model's)
PHASE_PX = 1          # 'phase': the input moved by one pixel diagonally — half a block pixel under a 2×2 fold


def parse_tta(spec) -> tuple[str, ...]:
    """The transforms of a TTA spec ('none', or a comma list of TTA's names), in TTA's order; ValueError
    naming a bad one."""
    parts = [] if spec is None else spec.split(",") if isinstance(spec, str) else list(spec)
    names = set()
    for part in (p.strip().lower() for p in parts):
        if part not in ("", "none") and part not in TTA:
            raise ValueError(f"tta: unknown transform {part!r} (choose from none, {', '.join(TTA)}, or a comma "
                             "list of them)")
        names.add(part)
    return tuple(t for t in TTA if t in names)


def tta_name(spec) -> str:
    """The canonical spelling of a TTA spec: 'none', or its transforms in TTA's order ('hflip,shift')."""
    return ",".join(parse_tta(spec)) or "none"


def tta_views(tta) -> tuple[tuple, ...]:
    """The views a TTA predicts besides the plain one: ('hflip',), ('shift', dy, dx), ('scale', f), and for
    'phase' ('shift', 1, 1) — with its mirror ('hflip_shift', 1, 1) when 'hflip' is on too, so both
    orientations see both phases of the fold's patches."""
    names = parse_tta(tta)
    views = []
    for name in names:
        if name == "hflip":
            views.append(("hflip",))
        elif name == "shift":
            views += [("shift", SHIFT_PX, SHIFT_PX), ("shift", -SHIFT_PX, -SHIFT_PX)]
        elif name == "scale":
            views += [("scale", f) for f in SCALES]
        else:
            views.append(("shift", PHASE_PX, PHASE_PX))
            if "hflip" in names:
                views.append(("hflip_shift", PHASE_PX, PHASE_PX))
    return tuple(views)


def shift(x, dy: int, dx: int):
    """(B, H, W, ...) moved by dy rows and dx columns: out[i, j] = x[i - dy, j - dx], the edge rows and
    columns repeated where that falls outside."""
    a, b = abs(dy), abs(dx)
    padded = jnp.pad(x, [(0, 0), (a, a), (b, b)] + [(0, 0)] * (x.ndim - 3), mode="edge")
    return padded[:, a - dy:a - dy + x.shape[1], b - dx:b - dx + x.shape[2]]


def scaled_size(hw, factor: float, multiple: int = 1) -> tuple[int, int]:
    """(H, W) times ``factor``, each rounded to the nearest multiple of ``multiple`` (at least one)."""
    return tuple(max(multiple, int(round(v * factor / multiple)) * multiple) for v in hw)


def predict_probs(variables, images, apply_fn, hflip_tta: bool = False, *, tta=None, multiple: int = 1):
    """Probabilities at model size: the mean over the plain prediction and each TTA view's (``tta``: a
    spec for ``parse_tta``; the older ``hflip_tta=True`` means tta='hflip'). 'hflip' predicts the mirrored
    image and mirrors back; 'shift' predicts inputs moved by ±SHIFT_PX (edges repeated) and moves back;
    'scale' predicts the input resized by each of SCALES (to sizes that are multiples of ``multiple``,
    2**depth for a U-Net) and resizes the probabilities back (bilinear, antialiased when shrinking); 'phase'
    moves the input by PHASE_PX pixels diagonally (mirrored too with 'hflip') and moves back."""
    views = tta_views(("hflip",) if tta is None and hflip_tta else tta)
    x = normalise(images)
    hw = x.shape[1:3]

    def predict(z):
        return jax.nn.sigmoid(apply_fn(variables, z, train=False))

    probs = predict(x)
    for view in views:
        if view[0] == "hflip":
            p = predict(x[:, :, ::-1])[:, :, ::-1]
        elif view[0] == "shift":
            p = shift(predict(shift(x, view[1], view[2])), -view[1], -view[2])
        elif view[0] == "hflip_shift":
            p = shift(predict(shift(x[:, :, ::-1], view[1], view[2])), -view[1], -view[2])[:, :, ::-1]
        else:
            size = scaled_size(hw, view[1], multiple)
            z = jax.image.resize(x, (x.shape[0], *size, x.shape[3]), method="bilinear")
            p = jax.image.resize(predict(z), (x.shape[0], *hw), method="bilinear")
        probs = probs + p
    return probs / (len(views) + 1) if views else probs


def crop(probs, shape=FULL_SHAPE):
    """The ``shape`` photo's pixels of (B, h, w) probabilities predicted on it padded to (h, w) by
    fit='pad' (``augment.pad_offsets`` says where it sits): no interpolation at all."""
    top, left = pad_offsets(shape, probs.shape[1:3])
    return probs[:, top:top + shape[0], left:left + shape[1]]


def to_full(probs, fit: str = "resize", shape=FULL_SHAPE):
    """Model-size probabilities → the photo's ``shape``: up-sampled (fit='resize') or cropped (fit='pad')."""
    return crop(probs, shape) if fit == "pad" else upsample(probs, shape)


def _lerp_along(x, axis: int, size: int):
    """Linear interpolation of ``x`` along ``axis`` to ``size`` samples: pixel centres aligned, the
    outermost samples repeated beyond the edges. Indices and weights are constants of the shapes."""
    n = x.shape[axis]
    pos = np.clip((np.arange(size) + 0.5) * (n / size) - 0.5, 0, n - 1)
    lo = np.floor(pos).astype(np.int32)
    hi = np.minimum(lo + 1, n - 1)
    shape = [1] * x.ndim
    shape[axis] = size
    frac = jnp.asarray((pos - lo).reshape(shape), x.dtype)
    return jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, hi, axis=axis) * frac


def upsample(probs, shape=FULL_SHAPE):
    """Bilinear (pixel-centre aligned) resize of (B, h, w) probabilities to (B, *shape).

    Enlarging, it is two passes of two-tap interpolation (rows, then columns): what
    ``jax.image.resize(method='bilinear')`` computes (within 2e-5), 7x faster on the CPU than its dense
    weight matrices (6.5 against 48 ms an image from 128x192). Shrinking any axis, jax.image.resize
    (whose antialiasing kernel is then wider than two taps)."""
    if probs.shape[1] > shape[0] or probs.shape[2] > shape[1]:
        return jax.image.resize(probs, (probs.shape[0], *shape), method="bilinear")
    return _lerp_along(_lerp_along(probs, 1, shape[0]), 2, shape[1])


def full_res_masks(variables, images, *, apply_fn, threshold=0.5, hflip_tta=False, tta=None, multiple=1,
                   fit="resize"):
    """Binary uint8 masks at 1280×1918 for a batch of model-size images."""
    probs = to_full(predict_probs(variables, images, apply_fn, hflip_tta, tta=tta, multiple=multiple), fit)
    return (probs > threshold).astype(jnp.uint8)


# Ensembles: ``members`` is a tuple of each model's variables, ``apply_fns`` their apply functions,
# ``image_keys`` which batch key holds each model's input (models of one input size and fit share one
# key), ``multiples`` each one's input multiple (for TTA 'scale') and ``fits`` how its input was fitted.

def member_probs(members, batch, *, apply_fns, image_keys, hflip_tta=False, tta=None, multiples=None):
    """Each model's probabilities at its own input size (``predict_probs``, TTA included): a tuple, one per model."""
    multiples = multiples or (1,) * len(apply_fns)
    return tuple(predict_probs(variables, batch[key], apply_fn, hflip_tta, tta=tta, multiple=multiple)
                 for variables, apply_fn, key, multiple in zip(members, apply_fns, image_keys, multiples))


def mean_full(probs, *, fits=None, shape=FULL_SHAPE):
    """Mean over models of their model-size probabilities (``member_probs``), each brought to ``shape``
    first (``to_full``)."""
    fits = fits or ("resize",) * len(probs)
    total = None
    for p, fit in zip(probs, fits):
        p = to_full(p, fit, shape)
        total = p if total is None else total + p
    return total if len(probs) == 1 else total / len(probs)


def ensemble_probs(members, batch, *, apply_fns, image_keys, hflip_tta=False, tta=None, multiples=None,
                   fits=None, shape=FULL_SHAPE):
    """Mean over models of each one's probabilities at its own size (TTA included), brought to ``shape``
    first (``to_full``)."""
    probs = member_probs(members, batch, apply_fns=apply_fns, image_keys=image_keys, hflip_tta=hflip_tta, tta=tta,
                         multiples=multiples)
    return mean_full(probs, fits=fits, shape=shape)


def ensemble_photo_probs(members, batch, *, guide_scale: int = 0, shape=FULL_SHAPE, **kw):
    """The ensemble's mean probabilities at the photo's ``shape`` (``ensemble_probs``). With ``guide_scale`` k
    they are brought to the size of ``batch['guide']`` (the photo at 1/k scale) first, refined there by the
    guided filter (``refine.refined``) and then up-sampled."""
    if not guide_scale:
        return ensemble_probs(members, batch, shape=shape, **kw)
    guide = batch["guide"]
    probs = refine.refined(ensemble_probs(members, batch, shape=guide.shape[1:3], **kw), guide, guide_scale)
    return probs if probs.shape[1:] == tuple(shape) else upsample(probs, tuple(shape))


def ensemble_masks(members, batch, *, threshold=0.5, **kw):
    """Binary uint8 masks at 1280×1918: the ensemble's mean probability (``ensemble_photo_probs``) above
    ``threshold``."""
    return (ensemble_photo_probs(members, batch, **kw) > threshold).astype(jnp.uint8)


def masks_of_member_probs(probs, *, threshold=0.5, fits=None, shape=FULL_SHAPE):
    """``ensemble_masks`` without a guide, from the models' probabilities at their own sizes (``member_probs``),
    as a program of its own. Compiled together, XLA:CPU fuses the probabilities' sigmoid and TTA mean into the
    up-sampling's gathers and computes them again four times for every full-resolution pixel (400 times a
    model pixel at 128×192): the two programs take 5–20% less time (BENCHMARKS.md, "Prediction"). With the guided
    filter in between, one program was the faster, so ``ensemble_masks`` stays one."""
    return (mean_full(probs, fits=fits, shape=shape) > threshold).astype(jnp.uint8)


def ensemble_cutouts(members, batch, *, threshold=0.5, **kw):
    """(binary uint8 masks, uint8 alpha = the probability × 255) at the photo's ``shape``: the masks are
    ``ensemble_masks``' for the same photo."""
    probs = ensemble_photo_probs(members, batch, **kw)
    alpha = jnp.round(jnp.clip(probs, 0.0, 1.0) * 255.0).astype(jnp.uint8)
    return (probs > threshold).astype(jnp.uint8), alpha


def pack_masks(masks):
    """(B, H, W) binary masks → (B, H·W/8) uint8, eight row-major pixels a byte, first pixel in the high
    bit (np.packbits' order): 8× fewer bytes to bring back to the host. Best compiled on its own:
    fused into the program that makes the masks, XLA's CPU backend took 3x longer for both (19 against
    7 ms an image)."""
    return jnp.packbits(masks.reshape(masks.shape[0], -1).astype(bool), axis=1)
