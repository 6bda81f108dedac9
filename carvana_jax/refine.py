"""Edge refinement of predicted probabilities by the photo itself: He, Sun and Tang's guided filter.

A small U-Net places the car's edge to within about one of its own pixels, five full-resolution pixels at
256×384; most of its remaining error lies there (BENCHMARKS.md, "Where the errors are"). The guided filter
fits, in every window of the photo, the probabilities as a linear function of the photo's colour
(q = a·I + b, least squares with ridge ``eps`` on a), then averages the fits of the windows over each
pixel. Where the window holds the car's edge the fit follows the colour edge, so the 0.5 level moves onto
it; in flat windows it only smooths. No training, no parameters beyond the window and ``eps``.

It runs on the devices, in the prediction program, at the resolution of the JPEG decode the models'
inputs are warped from (``guide_scale``: 1/4 of the photo for a 256×384 model), so it costs no decode.
The window is ``RADIUS_FULL_PX`` full-resolution pixels wide either side, whatever that scale.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from jax import lax

from carvana_jax.data.augment import dct_scale

RADIUS_FULL_PX = 8  # window half-width in full-resolution pixels (2 at 1/4 scale), measured on real cars
EPS = 1e-4          # ridge on a, for colours in [0, 1]: below it a window's colour variance counts as flat


def guide_scale(full_hw: tuple[int, int], model_sizes: Sequence[tuple[int, int]]) -> int:
    """The scale-down k of the guide: the finest JPEG decode any of the models' inputs is warped from
    (``augment.dct_scale``), so the guide costs no decode of its own."""
    return min(dct_scale(full_hw, tuple(size)) for size in model_sizes)


def guide_shape(full_hw: tuple[int, int], k: int) -> tuple[int, int]:
    """(H, W) of the guide at 1/k scale: the decode's own size (rounded up, as libjpeg does)."""
    return -(-full_hw[0] // k), -(-full_hw[1] // k)


def radius(k: int) -> int:
    """Window half-width at 1/k scale, in guide pixels."""
    return max(1, round(RADIUS_FULL_PX / k))


def box_mean(x, r: int):
    """Mean of (B, H, W[, C]) ``x`` over (2r+1)×(2r+1) windows on axes 1 and 2, edges mirrored
    (cv2.BORDER_REFLECT: the edge pixel repeated, ``dcba|abcd``). Separable sums, no running totals, so
    float32 keeps the variances below ``EPS`` exact enough."""
    pad = [(0, 0), (r, r), (r, r)] + [(0, 0)] * (x.ndim - 3)
    x = jnp.pad(x, pad, mode="symmetric")
    window = (1, 2 * r + 1, 1) + (1,) * (x.ndim - 3)
    x = lax.reduce_window(x, 0.0, lax.add, window, (1,) * x.ndim, "VALID")
    window = (1, 1, 2 * r + 1) + (1,) * (x.ndim - 3)
    x = lax.reduce_window(x, 0.0, lax.add, window, (1,) * x.ndim, "VALID")
    return x / (2 * r + 1) ** 2


def _solve3(s, c):
    """x with s x = c per pixel, for symmetric positive definite 3×3 ``s`` (…, 3, 3) and ``c`` (…, 3):
    the adjugate over the determinant, written out as elementwise products XLA fuses."""
    a00, a01, a02 = s[..., 0, 0], s[..., 0, 1], s[..., 0, 2]
    a11, a12, a22 = s[..., 1, 1], s[..., 1, 2], s[..., 2, 2]
    i00, i01, i02 = a11 * a22 - a12 * a12, a02 * a12 - a01 * a22, a01 * a12 - a02 * a11
    i11, i12, i22 = a00 * a22 - a02 * a02, a01 * a02 - a00 * a12, a00 * a11 - a01 * a01
    det = a00 * i00 + a01 * i01 + a02 * i02
    c0, c1, c2 = c[..., 0], c[..., 1], c[..., 2]
    return jnp.stack([i00 * c0 + i01 * c1 + i02 * c2, i01 * c0 + i11 * c1 + i12 * c2,
                      i02 * c0 + i12 * c1 + i22 * c2], axis=-1) / det[..., None]


def guided_filter(guide, p, r: int, eps: float = EPS):
    """(B, H, W) ``p`` filtered by the colour guide (B, H, W, 3) in [0, 1]: q = mean(a)·I + mean(b) with
    a = (Σ + eps·1)⁻¹ cov(I, p) and b = mean(p) − a·mean(I) over each (2r+1)² window."""
    guide = guide.astype(jnp.float32)
    mean_i = box_mean(guide, r)
    mean_p = box_mean(p, r)
    cov = box_mean(guide * p[..., None], r) - mean_i * mean_p[..., None]
    outer = box_mean(guide[..., :, None] * guide[..., None, :], r) - mean_i[..., :, None] * mean_i[..., None, :]
    a = _solve3(outer + eps * jnp.eye(3, dtype=jnp.float32), cov)
    b = mean_p - jnp.sum(a * mean_i, axis=-1)
    return jnp.sum(box_mean(a, r) * guide, axis=-1) + box_mean(b, r)


def refined(probs, guide_uint8, k: int):
    """Probabilities at the guide's size, refined by the uint8 guide photo at 1/k scale."""
    return guided_filter(guide_uint8.astype(jnp.float32) / 255.0, probs, radius(k))

