"""Clean-up of a prediction: snap its edge to the photo's, drop far-off specks, fill small holes.

'guided' works on the probabilities, on the devices, before they are thresholded (``carvana_jax.refine``).
The others are pure functions on a binary uint8 (H, W) mask (1 = car), applied on the host where the
ensemble's masks are binary. All are chosen by ``predict.Ensemble``'s ``postprocess``, eval's
``--postprocess``, whose default is the checkpoint config's ``postprocess`` key. A spec is a comma list of
steps, run in this order:

  none        the mask as predicted
  guided      the probabilities refined by a guided filter with the photo as guide, at the resolution the
              photo was decoded at for the model (``carvana_jax.refine``): the edge follows the photo's
  components  keep the car: the largest 8-connected component, every component whose area is at least
              KEEP_FRACTION of it, and every component with a pixel within NEAR_PX pixels (Euclidean,
              pixel centres) of it (a wheel or mirror cut off by a thin gap); drop the rest
  fill        fill holes: 4-connected background components that touch no image border and are smaller
              than FILL_MAX_AREA pixels (bigger ones are real, e.g. between the wheels)
  clean       both: 'components,fill'

The thresholds are in full-resolution (1918×1280) pixels; the car covers ~1 M of them, a wheel ~30–50 k.
8-connected foreground with 4-connected background is the usual dual pair: a diagonal chain of car
pixels closes a hole. Cost: one ``cv2.connectedComponents`` pass per step (~5 ms at 1918×1280) when there is nothing to
remove or fill; otherwise another pass with the components' statistics, a gather (and for 'components'
a distance transform around the car), ~30–60 ms.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

KEEP_FRACTION = 0.05  # 'components': a component this large relative to the largest is kept wherever it is
NEAR_PX = 24          # 'components': ... and one whose nearest pixel is within this many pixels of the largest
FILL_MAX_AREA = 4000  # 'fill': an enclosed background component below this many pixels becomes car

MAX_LOOPED = 64       # up to this many components are handled one bounding box at a time, more in one pass

STEPS = ("guided", "components", "fill")
HOST_STEPS = ("components", "fill")  # the steps on binary masks, on the host
ALIASES = {"none": (), "": (), "clean": HOST_STEPS}


def parse(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """The steps of a spec ('none', 'guided', 'components', 'fill', 'clean', or a comma list of them), in
    STEPS order; ValueError naming the bad part."""
    parts = [] if spec is None else spec.split(",") if isinstance(spec, str) else list(spec)
    steps: set[str] = set()
    for part in (p.strip().lower() for p in parts):
        if part in ALIASES:
            steps.update(ALIASES[part])
        elif part in STEPS:
            steps.add(part)
        else:
            raise ValueError(f"postprocess: unknown step {part!r} (choose from none, {', '.join(STEPS)}, clean, "
                             "or a comma list of them)")
    return tuple(s for s in STEPS if s in steps)


def host_steps(spec) -> tuple[str, ...]:
    """The steps of a spec that clean binary masks on the host."""
    return tuple(s for s in parse(spec) if s in HOST_STEPS)


def name(spec) -> str:
    """The canonical spelling of a spec: its steps in STEPS order ('guided,components,fill'), or 'none'."""
    return ",".join(parse(spec)) or "none"


def _box(stats: np.ndarray, i: int, grow: int, shape) -> tuple[slice, slice]:
    """Rows and columns of component ``i``'s bounding box grown by ``grow`` pixels, inside ``shape``."""
    x, y, w, h = (int(v) for v in stats[i, :4])
    return (slice(max(y - grow, 0), min(y + h + grow, shape[0])), slice(max(x - grow, 0), min(x + w + grow, shape[1])))


def _set_components(mask: np.ndarray, labels: np.ndarray, stats: np.ndarray, which: np.ndarray, value: int
                    ) -> np.ndarray:
    """A copy of ``mask`` with the pixels of components ``which`` (label indices) set to ``value``: inside
    each one's bounding box when there are few, else by one look-up over the whole image."""
    out = mask.copy()
    if len(which) <= MAX_LOOPED:
        for i in which:
            box = _box(stats, i, 0, mask.shape)
            out[box][labels[box] == i] = value
        return out
    table = np.zeros(len(stats), np.uint8)
    table[which] = 1
    hit = np.take(table, labels).view(bool)
    out[hit] = value
    return out


def _near(labels: np.ndarray, stats: np.ndarray, largest: int, candidates: np.ndarray, near_px: float
          ) -> np.ndarray:
    """The ``candidates`` with a pixel within ``near_px`` (Euclidean, pixel centres) of component ``largest``."""
    grow = int(np.ceil(near_px)) + 1
    if len(candidates) > MAX_LOOPED:  # one distance transform around the largest component
        box = _box(stats, largest, grow, labels.shape)
        crop = labels[box]
        distance = cv2.distanceTransform((crop != largest).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return np.intersect1d(candidates, np.unique(crop[distance <= near_px]))
    near = []
    for i in candidates:  # each candidate's neighbourhood: any pixel of the largest that near is inside it
        box = _box(stats, i, grow, labels.shape)
        crop = labels[box]
        if not (crop == largest).any():
            continue
        distance = cv2.distanceTransform((crop != largest).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        if (distance[crop == i] <= near_px).any():
            near.append(i)
    return np.array(near, np.int64)


def keep_components(mask: np.ndarray, keep_fraction: float = KEEP_FRACTION, near_px: float = NEAR_PX
                    ) -> np.ndarray:
    """The mask with only the car's components (see the module doc): a new array, or ``mask`` itself when
    nothing is dropped."""
    if cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_32S)[0] <= 2:
        return mask  # background and at most one component: the common case, without the slower stats
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=cv2.CV_32S)
    areas = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    largest = int(np.argmax(areas[1:])) + 1  # the first of equal largest ones
    keep = areas >= keep_fraction * areas[largest]
    keep[0], keep[largest] = False, True
    # Not kept by area: those whose bounding box is within near_px of the largest's may be near it.
    x, y, w, h = (stats[:, k].astype(np.int64) for k in range(4))
    gap_x = np.maximum(np.maximum(x[largest] - (x + w - 1), x - (x[largest] + w[largest] - 1)), 0)
    gap_y = np.maximum(np.maximum(y[largest] - (y + h - 1), y - (y[largest] + h[largest] - 1)), 0)
    candidates = np.flatnonzero(~keep & (np.hypot(gap_x, gap_y) <= near_px))
    candidates = candidates[candidates > 0]
    if near_px > 0 and len(candidates):
        keep[_near(labels, stats, largest, candidates, near_px)] = True
    drop = np.flatnonzero(~keep[1:]) + 1
    if not len(drop):
        return mask
    return _set_components(mask, labels, stats, drop, 0)


def fill_holes(mask: np.ndarray, max_area: int = FILL_MAX_AREA) -> np.ndarray:
    """The mask with its small enclosed holes filled (see the module doc): a new array, or ``mask`` itself
    when none is."""
    background = np.equal(mask, 0).view(np.uint8)
    n = cv2.connectedComponents(background, connectivity=4, ltype=cv2.CV_32S)[0]
    border = background[0].any() or background[-1].any() or background[:, 0].any() or background[:, -1].any()
    if n <= 1 or (n == 2 and border):
        return mask  # no background, or one component that reaches the border: the common case
    n, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4, ltype=cv2.CV_32S)
    x, y, w, h, area = (stats[:, k] for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH,
                                                cv2.CC_STAT_HEIGHT, cv2.CC_STAT_AREA))
    height, width = mask.shape
    inside = (x > 0) & (y > 0) & (x + w < width) & (y + h < height)
    holes = np.flatnonzero(inside & (area < max_area))
    holes = holes[holes > 0]  # label 0 is the car
    if not len(holes):
        return mask
    return _set_components(mask, labels, stats, holes, 1)


def apply(mask: np.ndarray, spec) -> np.ndarray:
    """``mask`` (binary uint8 H×W) cleaned by the host steps of ``spec``; ``mask`` itself when they change
    nothing."""
    mask = np.ascontiguousarray(mask, np.uint8)
    for step in host_steps(spec):
        mask = keep_components(mask) if step == "components" else fill_holes(mask)
    return mask


def apply_packed(packed: np.ndarray, spec, shape: tuple[int, int]) -> np.ndarray:
    """The same on a bit-packed mask (np.packbits order, ``shape`` pixels): unpacked, cleaned, repacked."""
    mask = np.unpackbits(packed, count=shape[0] * shape[1]).reshape(shape)
    cleaned = apply(mask, spec)
    return packed if cleaned is mask else np.packbits(cleaned.reshape(-1))
