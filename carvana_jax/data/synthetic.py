"""Synthetic data in the exact Kaggle Carvana layout, for tests and for trying the pipeline offline.

``python -m carvana_jax.data.synthetic --out DIR --cars N`` writes what the unzipped Kaggle download
holds::

    DIR/train/{id}_{NN}.jpg                 RGB JPEG, 1918 wide x 1280 high, NN = 01..16
    DIR/train_masks/{id}_{NN}_mask.gif      palette GIF, index 1 = car, 0 = background
    DIR/train_masks.csv                     img,rle_mask   (rle of each GIF, carvana_jax.rle)
    DIR/test/{id}_{NN}.jpg                  test cars (other ids), no masks
    DIR/sample_submission.csv               img,rle_mask   (every test image, rle "1 1")
    DIR/metadata.csv                        id,year,make,model,trim1,trim2

Each car is a small 3D model (a lofted lower body with wheel arches, a greenhouse with glass,
wheels with rims, mirrors, lights) photographed on a turntable in a white studio from 16 angles
22.5 degrees apart (01 = front, 09 = rear). The studio has a wall-to-floor gradient and a soft
shadow under the car that is not part of the mask; about a third of the cars are white, silver or
light grey, so a model must learn shapes rather than threshold a colour. The mask is rasterised
from the same polygons as the photo, so it is exact.

Everything is written into ``DIR.tmp-XXXX`` first and renamed to DIR at the end, so an interrupted
run never leaves something that looks complete. Output depends only on the seed (each car has its
own seed), not on the number of worker processes.
"""
from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from carvana_jax import rle

IMAGE_H, IMAGE_W = rle.FULL_SHAPE  # 1280 rows x 1918 columns
NUM_ANGLES = 16
ANGLE_STEP = 360.0 / NUM_ANGLES

_SHIFT = 3  # fractional bits for cv2.fillPoly coordinates (sub-pixel precise polygons)
_ONE = 1 << _SHIFT
_BG_SCALE = 4  # background and shadow are computed at 1/4 resolution, then upsampled
_NOISE_PAD = 32
_BG_H, _BG_W = IMAGE_H // _BG_SCALE, int(math.ceil(IMAGE_W / _BG_SCALE))

# Normalised cross-section of the lower body (half-width fraction, height fraction), as a closed
# ring: right side bottom -> top, then left side top -> bottom.
_RING_HALF = [(0.84, 0.0), (0.96, 0.1), (1.0, 0.32), (1.0, 0.6), (0.97, 0.8), (0.88, 0.94), (0.62, 1.0)]
_RING = np.array(_RING_HALF + [(-sy, sz) for sy, sz in reversed(_RING_HALF)], dtype=np.float64)
_CABIN_SINK = 0.05  # the greenhouse starts this far below the belt, on the body's shoulders
_TRIM_EDGES = (0, 1, len(_RING) - 2, len(_RING) - 1)  # ring edges near the bottom (rocker panels)

# (name, rgb, weight): about a third of the weight is white / silver / light grey / beige.
_PAINTS = [
    ("white", (0.95, 0.95, 0.95), 0.13), ("pearl", (0.93, 0.92, 0.87), 0.05),
    ("silver", (0.76, 0.77, 0.79), 0.09), ("light grey", (0.66, 0.67, 0.69), 0.05),
    ("champagne", (0.82, 0.77, 0.66), 0.03),
    ("black", (0.04, 0.04, 0.05), 0.12), ("dark grey", (0.22, 0.23, 0.25), 0.08),
    ("navy", (0.06, 0.09, 0.24), 0.06), ("maroon", (0.32, 0.04, 0.06), 0.04),
    ("dark green", (0.06, 0.18, 0.12), 0.03), ("red", (0.76, 0.05, 0.05), 0.08),
    ("blue", (0.10, 0.26, 0.70), 0.07), ("sky blue", (0.36, 0.56, 0.80), 0.03),
    ("yellow", (0.93, 0.78, 0.10), 0.02), ("orange", (0.90, 0.40, 0.05), 0.02),
    ("green", (0.15, 0.50, 0.20), 0.02), ("brown", (0.36, 0.22, 0.12), 0.02),
    ("teal", (0.05, 0.45, 0.48), 0.02),
]

# Body types: weight, (length, width, height, clearance, wheel radius) ranges in metres,
# greenhouse x positions (windscreen base, roof front, roof rear, rear-window base) as fractions
# of the length from the centre (front positive), and whether there is a third side window.
_BODIES = {
    "sedan": dict(w=0.28, L=(4.4, 5.0), W=(1.75, 1.9), H=(1.38, 1.5), c=(0.14, 0.20), r=(0.31, 0.36),
                  cab=(0.17, 0.03, -0.17, -0.30), third=False, deck=(0.0, 0.05)),
    "hatchback": dict(w=0.18, L=(3.8, 4.4), W=(1.68, 1.8), H=(1.42, 1.55), c=(0.14, 0.19), r=(0.29, 0.34),
                      cab=(0.20, 0.06, -0.33, -0.46), third=False, deck=(-0.04, 0.0)),
    "suv": dict(w=0.28, L=(4.3, 4.95), W=(1.8, 2.0), H=(1.65, 1.85), c=(0.20, 0.28), r=(0.35, 0.42),
                cab=(0.24, 0.11, -0.43, -0.48), third=True, deck=(-0.04, 0.0)),
    "wagon": dict(w=0.08, L=(4.5, 4.95), W=(1.78, 1.88), H=(1.45, 1.55), c=(0.15, 0.20), r=(0.31, 0.35),
                  cab=(0.19, 0.05, -0.42, -0.47), third=True, deck=(-0.03, 0.0)),
    "coupe": dict(w=0.08, L=(4.2, 4.7), W=(1.78, 1.9), H=(1.28, 1.4), c=(0.12, 0.17), r=(0.32, 0.36),
                  cab=(0.14, -0.02, -0.12, -0.34), third=False, deck=(0.0, 0.03)),
    "minivan": dict(w=0.10, L=(4.8, 5.2), W=(1.9, 2.0), H=(1.7, 1.8), c=(0.15, 0.20), r=(0.33, 0.37),
                    cab=(0.36, 0.17, -0.45, -0.49), third=True, deck=(-0.03, 0.0)),
}

_MODELS = {
    "sedan": [("Honda", "Accord"), ("Toyota", "Camry"), ("Nissan", "Altima"), ("Hyundai", "Sonata"),
              ("Chevrolet", "Malibu"), ("Ford", "Fusion"), ("BMW", "3 Series"), ("Audi", "A4"),
              ("Kia", "Optima"), ("Volkswagen", "Passat"), ("Mazda", "Mazda6"), ("Lexus", "ES 350")],
    "hatchback": [("Honda", "Fit"), ("Toyota", "Prius"), ("Volkswagen", "Golf"), ("Ford", "Focus"),
                  ("Mazda", "Mazda3"), ("Kia", "Rio"), ("Chevrolet", "Sonic"), ("Nissan", "Versa Note")],
    "suv": [("Honda", "CR-V"), ("Toyota", "RAV4"), ("Ford", "Explorer"), ("Jeep", "Grand Cherokee"),
            ("Nissan", "Rogue"), ("Chevrolet", "Equinox"), ("Subaru", "Forester"), ("Hyundai", "Santa Fe"),
            ("Kia", "Sorento"), ("Mazda", "CX-5"), ("Ford", "Escape"), ("GMC", "Acadia")],
    "wagon": [("Subaru", "Outback"), ("Volkswagen", "Jetta SportWagen"), ("Volvo", "V60"),
              ("Audi", "allroad"), ("Toyota", "Venza")],
    "coupe": [("Ford", "Mustang"), ("Chevrolet", "Camaro"), ("Dodge", "Challenger"), ("BMW", "4 Series"),
              ("Honda", "Civic Coupe"), ("Audi", "A5")],
    "minivan": [("Honda", "Odyssey"), ("Toyota", "Sienna"), ("Chrysler", "Pacifica"), ("Kia", "Sedona"),
                ("Dodge", "Grand Caravan")],
}
_TRIM1 = ["Base", "LX", "EX", "EX-L", "SE", "LE", "XLE", "S", "SV", "SL", "Sport", "Limited",
          "Touring", "Premium", "GT", "SXT"]
_TRIM2 = ["FWD", "AWD", "4WD", "RWD", "2.4L", "2.5L", "3.5L V6", "w/ Navigation", "w/ Sunroof", "Hybrid"]


class OutputExistsError(FileExistsError):
    """The output directory already exists and is not empty (and overwrite was not asked for)."""


# --------------------------------------------------------------------------------------------
# Car and studio description
# --------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Car:
    """Everything needed to render one car from any angle: shape, paint, camera and studio."""
    body: str
    year: int
    make: str
    model: str
    trim1: str
    trim2: str
    # shape (metres; car frame: x forward, y left, z up, origin on the floor under the centre)
    length: float
    width: float
    height: float
    clearance: float
    belt: float
    nose: float
    deck: float
    wheel_r: float
    tyre_w: float
    front_axle: float
    rear_axle: float
    cabin_x: tuple[float, float, float, float]
    cabin_w: tuple[float, float]  # half-widths of the greenhouse at the belt and at the roof
    pillars: tuple[float, ...]    # x of the B (and C) pillars
    round_ends: tuple[float, float, float]  # nose/tail rounding: length, height drop, width drop
    # appearance
    paint_name: str
    paint: np.ndarray
    reflect: float
    spec: float
    gloss: float
    trim: np.ndarray | None
    glass: np.ndarray
    glass_alpha: float
    tyre: np.ndarray
    rim: np.ndarray
    rim_frac: float
    spokes: int
    # camera and studio
    cam_dist: float
    cam_height: float
    target_z: float
    focal: float
    center: tuple[float, float]
    light_side: float
    wall: np.ndarray
    floor: np.ndarray
    wall_dist: float
    cove: float
    shadow_strength: float = 0.5
    shadow_blur: float = 0.05
    noise: int = 3
    noise_seed: int = 0
    studio_seed: int = 0

    @cached_property
    def background(self) -> np.ndarray:
        """The empty studio at 1/4 resolution, (_BG_H, _BG_W, 3) float32 RGB in 0..1, without shadow."""
        return _studio_background(self, np.random.default_rng(self.studio_seed))

    @cached_property
    def noise_tile(self) -> np.ndarray:
        """Sensor noise in 0..2*noise, a little larger than a photo; each photo takes a shifted window."""
        rng = np.random.default_rng(self.noise_seed)
        return rng.integers(0, 2 * self.noise + 1, (IMAGE_H + _NOISE_PAD, IMAGE_W + _NOISE_PAD, 3), dtype=np.uint8)

    @property
    def is_light(self) -> bool:
        """White, silver, light grey or similar: hard to tell from the studio by brightness."""
        return float(self.paint @ np.array([0.299, 0.587, 0.114])) > 0.6

    @cached_property
    def geometry(self) -> "_Geometry":
        return _build_geometry(self)

    def metadata(self) -> dict:
        return dict(year=self.year, make=self.make, model=self.model, trim1=self.trim1, trim2=self.trim2)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def sample_car(rng: np.random.Generator, paint: str | None = None) -> Car:
    """A random car (body, paint, camera, studio); ``paint`` forces a paint name from _PAINTS."""
    names = list(_BODIES)
    weights = np.array([_BODIES[n]["w"] for n in names])
    body = names[rng.choice(len(names), p=weights / weights.sum())]
    spec = _BODIES[body]
    make, model = _MODELS[body][rng.integers(len(_MODELS[body]))]

    L, W, H = (_u(rng, *spec[k]) for k in ("L", "W", "H"))
    c, r = _u(rng, *spec["c"]), _u(rng, *spec["r"])
    arch = 1.13 * r
    belt = H * _u(rng, 0.6, 0.69)
    wheelbase = L * _u(rng, 0.57, 0.63)
    overhang = L - wheelbase
    front_over = max(arch + 0.25, overhang * _u(rng, 0.45, 0.56))
    rear_over = max(arch + 0.25, overhang - front_over)
    front_axle = L / 2 - front_over
    rear_axle = -L / 2 + rear_over
    nose = max(belt - _u(rng, 0.1, 0.26 if body != "suv" else 0.16), r + arch + 0.12)
    deck = belt + _u(rng, *spec["deck"])
    ws, rf, rr, rw = (f * L + _u(rng, -0.02, 0.02) * L for f in spec["cab"])
    rw = max(rw, -L / 2 + 0.02)
    half = W / 2
    cabin_w = (half * _u(rng, 0.84, 0.88), half * _u(rng, 0.62, 0.72))
    pb = rr + (rf - rr) * _u(rng, 0.38, 0.55)
    pillars = (pb, rr + (pb - rr) * _u(rng, 0.25, 0.45)) if spec["third"] else (pb,)
    round_ends = (_u(rng, 0.18, 0.32), _u(rng, 0.06, 0.14), _u(rng, 0.08, 0.2) * half)

    if paint is None:
        p = np.array([w for _, _, w in _PAINTS])
        paint_name, rgb, _ = _PAINTS[rng.choice(len(_PAINTS), p=p / p.sum())]
    else:
        paint_name, rgb, _ = next(x for x in _PAINTS if x[0] == paint)
    paint_rgb = np.clip(np.array(rgb) + rng.uniform(-0.03, 0.03, 3), 0.0, 1.0)
    trim = np.full(3, _u(rng, 0.08, 0.2)) if rng.random() < (0.6 if body == "suv" else 0.25) else None
    glass = np.array([0.10, 0.12, 0.14]) * _u(rng, 0.6, 1.6) + rng.uniform(-0.015, 0.015, 3)
    rim_kind = rng.random()
    rim = np.full(3, _u(rng, 0.68, 0.86)) if rim_kind < 0.65 else (
        np.full(3, _u(rng, 0.16, 0.3)) if rim_kind < 0.9 else paint_rgb * 0.9)

    # Camera: a fixed camera, the car turns on a turntable. Focal length so that the side view
    # spans 40-80 % of the image width.
    cam_dist = _u(rng, 7.0, 12.0)
    frac = _u(rng, 0.42, 0.72)
    focal = frac * IMAGE_W * cam_dist / L
    slack = max(0.0, (0.92 - frac) / 2)
    center = (IMAGE_W * (0.5 + _u(rng, -0.6, 0.6) * min(0.06, slack)),
              IMAGE_H * _u(rng, 0.46, 0.56))
    cam_height = _u(rng, 0.9, 2.1)
    target_z = H * _u(rng, 0.35, 0.55)

    # Studio: light wall, a floor of a slightly different tone, the junction at a varying height.
    tint = rng.uniform(-0.02, 0.02, 3)
    wall = np.clip(_u(rng, 0.78, 0.97) + tint, 0, 1)
    floor = np.clip(wall + _u(rng, -0.14, 0.04) + rng.uniform(-0.015, 0.015, 3), 0, 1)
    return Car(
        body=body, year=int(rng.integers(2001, 2018)), make=make, model=model,
        trim1=_TRIM1[rng.integers(len(_TRIM1))], trim2=_TRIM2[rng.integers(len(_TRIM2))],
        length=L, width=W, height=H, clearance=c, belt=belt, nose=nose, deck=deck, wheel_r=r,
        tyre_w=_u(rng, 0.19, 0.26), front_axle=front_axle, rear_axle=rear_axle,
        cabin_x=(ws, rf, rr, rw), cabin_w=cabin_w, pillars=pillars, round_ends=round_ends,
        paint_name=paint_name, paint=paint_rgb, reflect=_u(rng, 0.12, 0.32), spec=_u(rng, 0.25, 0.6),
        gloss=_u(rng, 12, 40), trim=trim, glass=np.clip(glass, 0.02, 0.3), glass_alpha=_u(rng, 0.72, 0.9),
        tyre=np.full(3, _u(rng, 0.06, 0.12)), rim=rim, rim_frac=_u(rng, 0.55, 0.72),
        spokes=int(rng.choice([5, 5, 6, 7, 10])),
        cam_dist=cam_dist, cam_height=cam_height, target_z=target_z, focal=focal, center=center,
        light_side=_u(rng, -0.6, 0.6), wall=wall, floor=floor, wall_dist=_u(rng, 2.0, 10.0),
        cove=_u(rng, 2.0, 30.0),
        shadow_strength=_u(rng, 0.4, 0.7), shadow_blur=_u(rng, 0.03, 0.08), noise=int(rng.integers(2, 6)),
        noise_seed=int(rng.integers(2 ** 63)), studio_seed=int(rng.integers(2 ** 63)),
    )


# --------------------------------------------------------------------------------------------
# Geometry (built once per car, in the car frame)
# --------------------------------------------------------------------------------------------

@dataclass
class _Geometry:
    body_quads: np.ndarray      # (F, 4, 3)
    body_normals: np.ndarray    # (F, 3) outward
    body_trim: np.ndarray       # (F,) bool: painted with the trim colour
    caps: list                  # [(points (K,3), normal (3,))] front and rear end faces
    seams: list                 # [(side, points (n,3), thickness)] door lines and handles
    cabin_quads: np.ndarray
    cabin_normals: np.ndarray
    glass: list                 # [(points (n,3), normal (3,))]
    decals: list                # [(cap index, points (n,3), rgb)]
    mirrors: list               # [(side, quads (6,4,3), normals (6,3))]
    wells: list                 # [(side, points (n,3))]
    wheels: list                # [(x, side)]


def _profile(car: Car, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bottom z, top z and half-width of the lower body at positions x (wheel arches cut in)."""
    L, half = car.length, car.width / 2
    ws, _, _, rw = car.cabin_x
    top = np.full_like(x, car.belt)
    front = x > ws  # bonnet: from the belt at the windscreen down to the nose
    t = np.clip((x[front] - ws) / (L / 2 - ws), 0, 1)
    top[front] = car.belt - (car.belt - car.nose) * t ** 1.6
    rear = x < rw  # boot / rear end
    t = np.clip((rw - x[rear]) / (rw + L / 2), 0, 1) if rw > -L / 2 else np.zeros(rear.sum())
    top[rear] = car.belt + (car.deck - car.belt) * np.sqrt(t)
    top += 0.03 * (-x / L)  # the belt line rises a little towards the back
    bottom = np.full_like(x, car.clearance)
    width = np.full_like(x, half)
    rl, rz, rwid = car.round_ends
    d = L / 2 - np.abs(x)
    k = np.where(d < rl, 1 - np.sqrt(np.clip(1 - ((rl - d) / rl) ** 2, 0, 1)), 0.0)
    top -= rz * k
    bottom += 0.35 * rz * k
    width -= rwid * k
    width *= 1 - 0.04 * (x / (L / 2)) ** 2
    arch = 1.13 * car.wheel_r
    for xa in (car.front_axle, car.rear_axle):
        dx = x - xa
        inside = np.abs(dx) < arch
        bottom[inside] = np.maximum(bottom[inside], car.wheel_r + np.sqrt(arch ** 2 - dx[inside] ** 2))
    return bottom, top, width


def _loft(xs: np.ndarray, ring: np.ndarray, bottom, top, width) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quads (F,4,3) and outward normals (F,3) of a loft through ring-shaped slices; also the slice points."""
    pts = np.empty((len(xs), len(ring), 3))
    pts[:, :, 0] = xs[:, None]
    pts[:, :, 1] = ring[None, :, 0] * width[:, None]
    pts[:, :, 2] = bottom[:, None] + ring[None, :, 1] * (top - bottom)[:, None]
    j0 = np.arange(len(ring))
    j1 = (j0 + 1) % len(ring)
    a, b = pts[:-1][:, j0], pts[:-1][:, j1]
    c, d = pts[1:][:, j1], pts[1:][:, j0]
    quads = np.stack([a, b, c, d], axis=2).reshape(-1, 4, 3)
    normals = np.cross(quads[:, 2] - quads[:, 0], quads[:, 1] - quads[:, 3])
    # Orient outward, using the face that is furthest from the slice centre (robust for convex rings).
    centre = np.stack([quads[:, :, 0].mean(1), np.zeros(len(quads)),
                       0.5 * (bottom[:-1, None] + top[:-1, None]).repeat(len(ring), 1).reshape(-1)], 1)
    lat = quads.mean(1) - centre
    lat[:, 0] = 0
    score = np.einsum("ij,ij->i", normals, lat)
    if np.sum(score) < 0:
        normals = -normals
    norm = np.linalg.norm(normals, axis=1, keepdims=True)
    return quads, normals / np.maximum(norm, 1e-12), pts


def _box(cx, cy, cz, sx, sy, sz) -> tuple[np.ndarray, np.ndarray]:
    """Quads and normals of an axis-aligned box centred at (cx, cy, cz) with sizes (sx, sy, sz)."""
    quads, normals = [], []
    for axis in range(3):
        for sign in (-1, 1):
            n = np.zeros(3)
            n[axis] = sign
            u, v = [a for a in range(3) if a != axis]
            corners = []
            for du, dv in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
                p = np.zeros(3)
                p[axis], p[u], p[v] = sign, du, dv
                corners.append(p)
            quads.append(np.array(corners))
            normals.append(n)
    q = np.array(quads) * (np.array([sx, sy, sz]) / 2) + np.array([cx, cy, cz])
    return q, np.array(normals)


def _newell(points: np.ndarray) -> np.ndarray:
    n = np.cross(points, np.roll(points, -1, axis=0)).sum(0)
    return n / max(np.linalg.norm(n), 1e-12)


def _build_geometry(car: Car) -> _Geometry:
    L = car.length
    xs = np.linspace(-L / 2, L / 2, 72)
    arch = 1.13 * car.wheel_r
    extra = [xa + arch * s for xa in (car.front_axle, car.rear_axle) for s in np.linspace(-1, 1, 9)]
    rl = car.round_ends[0]
    extra += list(L / 2 - rl * (1 - np.cos(np.linspace(0, np.pi / 2, 6))))
    extra += list(-L / 2 + rl * (1 - np.cos(np.linspace(0, np.pi / 2, 6))))
    xs = np.unique(np.round(np.concatenate([xs, extra]), 5))
    xs = xs[(xs >= -L / 2) & (xs <= L / 2)]
    bottom, top, width = _profile(car, xs)
    quads, normals, pts = _loft(xs, _RING, bottom, top, width)
    edge = np.tile(np.arange(len(_RING)), len(xs) - 1)
    trim = np.isin(edge, _TRIM_EDGES) if car.trim is not None else np.zeros(len(quads), bool)
    caps = [(pts[-1][::-1].copy(), np.array([1.0, 0, 0])), (pts[0].copy(), np.array([-1.0, 0, 0]))]

    # Lights, grille and plate on the end faces, in (half-width fraction, height fraction).
    def on_cap(i: int, poly, rgb, mirror: bool):
        x = xs[-1] if i == 0 else xs[0]
        k = -1 if i == 0 else 0
        out = []
        for sgn in ((1, -1) if mirror else (1,)):
            p = np.array([(x + (0.004 if i == 0 else -0.004), sgn * sy * width[k], bottom[k] + sz * (top[k] - bottom[k]))
                          for sy, sz in poly])
            out.append((i, p, np.asarray(rgb, float)))
        return out

    lamp = np.array([0.9, 0.92, 0.95])
    decals = []
    decals += on_cap(0, [(0.42, 0.56), (0.9, 0.6), (0.88, 0.88), (0.4, 0.84)], np.full(3, 0.18), True)
    decals += on_cap(0, [(0.5, 0.63), (0.83, 0.66), (0.82, 0.81), (0.49, 0.78)], lamp, True)
    decals += on_cap(0, [(-0.32, 0.36), (0.32, 0.36), (0.36, 0.74), (-0.36, 0.74)], np.full(3, 0.08), False)
    decals += on_cap(0, [(-0.55, 0.1), (0.55, 0.1), (0.58, 0.26), (-0.58, 0.26)], np.full(3, 0.1), False)
    decals += on_cap(1, [(0.52, 0.55), (0.9, 0.58), (0.88, 0.84), (0.52, 0.8)], np.array([0.62, 0.04, 0.05]), True)
    decals += on_cap(1, [(-0.2, 0.3), (0.2, 0.3), (0.2, 0.52), (-0.2, 0.52)], np.array([0.88, 0.88, 0.84]), False)

    # Door seams: vertical lines on the sides, between the belt and the sill, avoiding the arches.
    seams = []
    ws, rf, rr, rw = car.cabin_x
    seam_x = [ws + 0.03, car.pillars[0]] + ([rr - 0.05] if len(car.pillars) == 1 and car.body != "coupe" else
                                            [car.pillars[-1]] if len(car.pillars) > 1 else [])
    ring_sz = np.array([sz for _, sz in _RING_HALF])
    ring_sy = np.array([sy for sy, _ in _RING_HALF])
    for x in seam_x:
        if any(abs(x - xa) < arch + 0.03 for xa in (car.front_axle, car.rear_axle)):
            continue
        b, t, w = (v[0] for v in _profile(car, np.array([x])))
        sz = np.linspace(0.12, 0.86, 6)
        for side in (1, -1):
            seams.append((side, np.stack([np.full(6, x), side * 1.003 * w * np.interp(sz, ring_sz, ring_sy),
                                          b + sz * (t - b)], 1), 1))
            if x != seam_x[0]:  # a door handle ahead of the door's rear edge
                hx = np.array([x - 0.2, x - 0.08])
                hz = b + 0.78 * (t - b)
                hy = side * 1.006 * w * np.interp(0.78, ring_sz, ring_sy)
                seams.append((side, np.stack([hx, np.full(2, hy), np.full(2, hz)], 1), 3))

    # Greenhouse: a second loft from the rear-window base to the windscreen base.
    cx = np.unique(np.concatenate([np.linspace(rw, rr, 8), np.linspace(rr, rf, 8), np.linspace(rf, ws, 10)]))
    zroof = _roof(car, cx)
    z0 = _profile(car, cx)[1] - _CABIN_SINK
    cw, tw = car.cabin_w
    # Cross-section: sloping sides (tumblehome) from the belt to the roof rails, a rounded roof.
    ring_y = np.array([cw, tw + 0.12 * (cw - tw), tw * 0.94, tw * 0.6])
    ring_z = np.array([0.0, 0.86, 0.97, 1.0])
    ring = np.concatenate([np.stack([ring_y, ring_z], 1), np.stack([-ring_y[::-1], ring_z[::-1]], 1)])
    cab_quads, cab_normals, _ = _loft(cx, np.stack([ring[:, 0] / cw, ring[:, 1]], 1), z0, zroof,
                                      cw * _cabin_scale(car, cx))

    # Glass: windscreen, rear window, and side windows split by pillars.
    glass = []
    gx = np.linspace(rf + 0.02, ws - 0.06, 8)
    glass.append(_top_glass(car, gx, 0.86))
    gx = np.linspace(rw + 0.05, rr - 0.02, 8)
    glass.append(_top_glass(car, gx, 0.84))
    pw = 0.07
    edges = sorted([rw, ws] + [p for p in car.pillars])
    for i in range(len(edges) - 1):
        x0, x1 = edges[i], edges[i + 1]
        x0 = x0 + (pw / 2 if i > 0 else 0.0)
        x1 = x1 - (pw / 2 if i < len(edges) - 2 else 0.0)
        for side in (1, -1):
            poly = _side_glass(car, x0, x1, side, pw)
            if poly is not None:
                glass.append(poly)

    # Mirrors at the base of the A pillars.
    mirrors = []
    mx = ws - 0.12
    mz = _profile(car, np.array([mx]))[1][0] + 0.03
    for side in (1, -1):
        q, n = _box(mx, side * (cw + 0.06), mz, 0.1, 0.17, 0.13)
        mirrors.append((side, q, n))

    wells = []
    for xa in (car.front_axle, car.rear_axle):
        a = np.linspace(0, np.pi, 19)
        ax, az = xa + arch * np.cos(a), car.wheel_r + arch * np.sin(a)
        keep = az >= car.clearance
        ax, az = ax[keep], az[keep]
        w = _profile(car, np.array([xa]))[2][0]
        for side in (1, -1):
            outer = np.stack([ax, np.full_like(ax, side * 0.97 * w), az], 1)
            inner = np.stack([ax, np.full_like(ax, side * (0.97 * w - 0.5)), az], 1)
            wells.append((side, np.concatenate([outer, inner])))
    wheels = [(xa, side) for xa in (car.front_axle, car.rear_axle) for side in (1, -1)]
    return _Geometry(quads, normals, trim, caps, seams, cab_quads, cab_normals, glass, decals, mirrors,
                     wells, wheels)


def _roof(car: Car, x: np.ndarray) -> np.ndarray:
    """Height of the greenhouse top along x: windscreen, roof, rear window."""
    ws, rf, rr, rw = car.cabin_x
    belt = _profile(car, x)[1]
    z = np.empty_like(x)
    H = car.height
    f = x > rf
    t = np.clip((x[f] - rf) / (ws - rf), 0, 1)
    z[f] = belt[f] + (H - belt[f]) * (1 - t ** 1.3)
    m = (x <= rf) & (x >= rr)
    s = (x[m] - rr) / max(rf - rr, 1e-6)
    z[m] = H - 0.035 * (2 * s - 1) ** 2
    b = x < rr
    t = np.clip((rr - x[b]) / max(rr - rw, 1e-6), 0, 1)
    z[b] = belt[b] + (H - 0.035 - belt[b]) * (1 - t ** 1.6)
    return np.maximum(z, belt - 0.02)


def _cabin_scale(car: Car, x: np.ndarray) -> np.ndarray:
    """Width factor of the greenhouse so it never overhangs the lower body (near the rounded tail)."""
    return np.minimum(1.0, 0.88 * _profile(car, x)[2] / car.cabin_w[0])


def _top_glass(car: Car, gx: np.ndarray, frac: float) -> tuple[np.ndarray, np.ndarray]:
    """A windscreen or rear window: a strip on the greenhouse top between the two side rails."""
    tw = car.cabin_w[1]
    z = _roof(car, gx) + 0.008
    y = frac * tw * _cabin_scale(car, gx)
    right = np.stack([gx, y, z], 1)
    left = np.stack([gx, -y, z], 1)[::-1]
    pts = np.concatenate([right, left])
    n = _newell(pts)
    if n[2] < 0:
        n = -n
    return pts, n


def _side_glass(car: Car, x0: float, x1: float, side: int, pw: float):
    """A side window on the greenhouse side between x0 and x1, inset from the pillars and the roof."""
    if x1 - x0 < 0.12:
        return None
    xs = np.linspace(x0, x1, 24)
    belt = _profile(car, xs)[1] - _CABIN_SINK
    # Eroding the roof line sideways by the pillar width insets the window from the A/C pillars.
    top = np.minimum(_roof(car, xs - pw), _roof(car, xs + pw))
    zt = belt + 0.86 * (top - belt) - 0.04
    zb = _profile(car, xs)[1] + 0.05
    ok = zt > zb + 0.03
    if ok.sum() < 2:
        return None
    xs, zt, zb, belt, top = xs[ok], zt[ok], zb[ok], belt[ok], top[ok]
    scale = _cabin_scale(car, xs)
    cw, tw = car.cabin_w[0] * scale, car.cabin_w[1] * scale
    y_top = tw + 0.12 * (cw - tw)

    def y_at(z, b, t):
        s = np.clip((z - b) / np.maximum(0.86 * (t - b), 1e-6), 0, 1)
        return side * (cw + s * (y_top - cw) + 0.008)

    upper = np.stack([xs, y_at(zt, belt, top), zt], 1)
    lower = np.stack([xs, y_at(zb, belt, top), zb], 1)[::-1]
    pts = np.concatenate([upper, lower])
    n = _newell(pts)
    if n[1] * side < 0:
        n = -n
    return pts, n


# --------------------------------------------------------------------------------------------
# Camera, studio and rendering
# --------------------------------------------------------------------------------------------

class _Camera:
    """Fixed pinhole camera looking at a turntable; the car is turned by ``angle`` degrees."""

    def __init__(self, car: Car, angle: float, shift: tuple[float, float] = (0.0, 0.0)):
        a = math.radians(angle)
        self.rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
        self.pos = np.array([car.cam_dist, 0.0, car.cam_height])
        fwd = np.array([0.0, 0.0, car.target_z]) - self.pos
        fwd /= np.linalg.norm(fwd)
        right = np.cross(fwd, [0, 0, 1.0])
        right /= np.linalg.norm(right)
        self.basis = np.stack([right, np.cross(right, fwd), fwd])  # rows: image x, image up, depth
        self.focal = car.focal
        self.cx, self.cy = car.center[0] + shift[0], car.center[1] + shift[1]
        # Lights: a key light near the camera, raised and pushed to one side; sky light from above.
        key = np.array([1.0, car.light_side, 0.9])
        self.key = key / np.linalg.norm(key)

    def world(self, p: np.ndarray) -> np.ndarray:
        return p @ self.rot.T

    def project(self, p: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Image (u, v) in pixels (times ``scale``) and depth of car-frame points ``p`` (..., 3)."""
        c = (p @ self.rot.T - self.pos) @ self.basis.T
        depth = c[..., 2]
        uv = np.stack([self.cx + self.focal * c[..., 0] / depth, self.cy - self.focal * c[..., 1] / depth], -1)
        return uv * scale, depth

    def facing(self, p: np.ndarray, n: np.ndarray) -> np.ndarray:
        """n . (camera - p) in the world frame for car-frame points and normals (>0: faces the camera)."""
        return np.einsum("...i,...i->...", n @ self.rot.T, self.pos - p @ self.rot.T)


def _studio_background(car: Car, rng: np.random.Generator) -> np.ndarray:
    """Wall and floor at 1/4 resolution (float32 RGB in 0..1), without the car's shadow."""
    cam = _Camera(car, 0.0)
    uv, _ = cam.project(np.array([-car.wall_dist, 0.0, 0.0]))
    horizon = float(np.clip(uv[1], 0.18 * IMAGE_H, 0.78 * IMAGE_H)) / _BG_SCALE
    rows = np.arange(_BG_H, dtype=np.float32)[:, None]
    cols = np.arange(_BG_W, dtype=np.float32)[None, :]
    blend = 0.5 * (1 + np.tanh((rows - horizon) / (2 * car.cove / _BG_SCALE)))  # 0 wall .. 1 floor
    wall_grad = 1 + _u(rng, -0.08, 0.06) * (rows / _BG_H - 0.5)
    floor_grad = 1 + _u(rng, -0.06, 0.1) * ((rows - horizon) / max(_BG_H - horizon, 1.0))
    xc = (cols / _BG_W - 0.5) * 2
    yc = (rows / _BG_H - 0.5) * 2
    vignette = 1 - _u(rng, 0.0, 0.12) * (xc ** 2 * 0.7 + yc ** 2 * 0.3)
    wall = car.wall.astype(np.float32)[None, None, :] * (wall_grad * vignette)[..., None]
    floor = car.floor.astype(np.float32)[None, None, :] * (floor_grad * vignette)[..., None]
    img = wall * (1 - blend[..., None]) + floor * blend[..., None]
    blotch = cv2.resize(rng.normal(0, 1, (6, 9)).astype(np.float32), (_BG_W, _BG_H), interpolation=cv2.INTER_CUBIC)
    img *= (1 + _u(rng, 0.005, 0.025) * blotch)[..., None]
    # A faint line where the wall meets the floor, on some studios.
    if rng.random() < 0.5:
        img *= (1 - _u(rng, 0.0, 0.05) * np.exp(-((rows - horizon) / 1.5) ** 2))[..., None]
    return np.clip(img, 0, 1).astype(np.float32)


def _shadow(car: Car, cam: _Camera) -> np.ndarray:
    """Soft shadow on the floor under the car, at 1/4 resolution, 0 (none) .. 1 (darkest).

    Computed on the floor plane (each pixel's ray meets z = 0), so its softness is in metres and
    it is foreshortened like the floor.
    """
    out = np.zeros((_BG_H, _BG_W), np.float32)
    L, W = car.length / 2, car.width / 2
    blur = car.shadow_blur * 4  # metres
    reach = 0.2 + 6 * blur  # beyond this the shadow is negligible
    corners = np.array([[sx * (L + reach), sy * (W + reach), 0.0] for sx in (-1, 1) for sy in (-1, 1)])
    uv, depth = cam.project(corners, 1.0 / _BG_SCALE)
    if (depth <= 0).any():
        return out
    x0, y0 = np.clip(np.floor(uv.min(0)).astype(int), 0, [_BG_W, _BG_H])
    x1, y1 = np.clip(np.ceil(uv.max(0)).astype(int) + 1, 0, [_BG_W, _BG_H])
    if x1 <= x0 or y1 <= y0:
        return out
    u = (np.arange(x0, x1, dtype=np.float32) + 0.5) * _BG_SCALE
    v = (np.arange(y0, y1, dtype=np.float32) + 0.5) * _BG_SCALE
    du, dv = np.meshgrid((u - cam.cx) / cam.focal, -(v - cam.cy) / cam.focal)
    basis = cam.basis.astype(np.float32)
    rays = du[..., None] * basis[0] + dv[..., None] * basis[1] + basis[2]  # world frame
    down = rays[..., 2] < -1e-6
    t = np.where(down, np.float32(-cam.pos[2]) / np.where(down, rays[..., 2], -1.0), 0.0)
    ground = (cam.pos.astype(np.float32) + t[..., None] * rays) @ cam.rot.astype(np.float32)  # car frame
    gx, gy = ground[..., 0], ground[..., 1]
    ax, ay = np.abs(gx), np.abs(gy)

    def soft_box(margin: float, sigma: float) -> np.ndarray:
        return (0.25 * (1 + np.tanh((L + margin - ax) / (2 * sigma)))
                * (1 + np.tanh((W + margin - ay) / (2 * sigma))))

    core = soft_box(-0.05, 0.25 * blur)
    halo = soft_box(0.2 + blur, blur)
    contact = np.zeros_like(ax)
    for xa, side in car.geometry.wheels:
        yc = side * (W * 0.97 - 0.02 - car.tyre_w / 2)
        d2 = ((gx - xa) / (0.5 * car.wheel_r)) ** 2 + ((gy - yc) / car.tyre_w) ** 2
        contact += np.exp(-np.minimum(d2, 50.0))
    shadow = np.clip(0.8 * core + 0.45 * halo + 0.9 * contact, 0, 1)
    out[y0:y1, x0:x1] = np.where(down, shadow, 0.0)
    return out


def _shade(car: Car, cam: _Camera, base: np.ndarray, points: np.ndarray, normals: np.ndarray,
           reflect: float | None = None, spec: float | None = None) -> np.ndarray:
    """Colours (F, 3) in 0..1 of faces with base colours (F, 3) or (3,), centroids and normals (car frame)."""
    n = normals @ cam.rot.T
    view = cam.pos - points @ cam.rot.T
    view /= np.linalg.norm(view, axis=-1, keepdims=True)
    ndv = np.clip(np.einsum("ij,ij->i", n, view), 0, 1)
    ndl = np.clip(n @ cam.key, 0, 1)
    nz = n[:, 2]
    refl = (car.reflect if reflect is None else reflect) + 0.3 * (1 - ndv) ** 3
    # What the paint reflects: ceiling above, wall, a dark band where the wall meets the floor, floor.
    env = np.where(nz[:, None] > 0.35, 1.0, np.where(nz[:, None] > 0.0, car.wall[None],
                   np.where(nz[:, None] > -0.16, 0.3 * car.wall[None], 0.9 * car.floor[None])))
    diffuse = 0.32 + 0.5 * ndl + 0.18 * np.clip(nz, 0, 1)
    half = cam.key[None, :] + view
    half /= np.linalg.norm(half, axis=-1, keepdims=True)
    ndh = np.clip(np.einsum("ij,ij->i", n, half), 0, 1)
    highlight = (car.spec if spec is None else spec) * ndh ** car.gloss
    col = base * diffuse[:, None] * (1 - refl[:, None]) + env * refl[:, None] + highlight[:, None]
    return np.clip(col, 0, 1)


def _to_px(uv: np.ndarray) -> np.ndarray:
    return np.round(uv * _ONE).astype(np.int32)


def _fill(img: np.ndarray, mask: np.ndarray, uv: np.ndarray, rgb) -> None:
    pts = [_to_px(uv)]
    color = tuple(float(c) for c in np.clip(np.asarray(rgb) * 255.0, 0, 255))
    cv2.fillPoly(img, pts, color, cv2.LINE_8, _SHIFT)
    cv2.fillPoly(mask, pts, 1, cv2.LINE_8, _SHIFT)


def _draw_faces(img, mask, car: Car, cam: _Camera, quads: np.ndarray, normals: np.ndarray, base) -> None:
    """Back-face culled, depth-sorted (far first) flat-shaded polygons."""
    centroids = quads.mean(1)
    vis = cam.facing(centroids, normals) > 1e-9
    if not vis.any():
        return
    quads, normals, centroids = quads[vis], normals[vis], centroids[vis]
    base = np.broadcast_to(base, (len(vis), 3))[vis] if np.ndim(base) == 2 else base
    colors = _shade(car, cam, base, centroids, normals)
    uv, depth = cam.project(quads)
    for i in np.argsort(-depth.mean(1), kind="stable"):
        _fill(img, mask, uv[i], colors[i])


def _draw_glass(img, mask, bg, car: Car, cam: _Camera, pts: np.ndarray, normal: np.ndarray) -> None:
    """A window: tinted, with a top-to-bottom reflection gradient, showing a little of what is behind."""
    uv, _ = cam.project(pts)
    px = _to_px(uv)
    x0, y0 = np.floor(uv.min(0)).astype(int) - 1
    x1, y1 = np.ceil(uv.max(0)).astype(int) + 2
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, IMAGE_W), min(y1, IMAGE_H)
    if x1 <= x0 or y1 <= y0:
        return
    local = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(local, [px - np.array([x0, y0]) * _ONE], 1, cv2.LINE_8, _SHIFT)
    cv2.fillPoly(mask, [px], 1, cv2.LINE_8, _SHIFT)
    sel = local.astype(bool)
    n = normal @ cam.rot.T
    view = cam.pos - pts.mean(0) @ cam.rot.T
    ndv = max(0.0, float(n @ view / np.linalg.norm(view)))
    sky = 0.25 + 0.45 * max(0.0, float(n[2])) + 0.25 * (1 - ndv) ** 2  # windscreens reflect the ceiling
    rows = np.linspace(0, 1, y1 - y0, dtype=np.float32)[:, None]
    top = car.glass * (1 - sky) + car.wall * sky
    col = (top[None] * (1 - 0.55 * rows) + car.glass[None] * 0.55 * rows) * 255.0  # (h, 3)
    roi_bg = bg[y0:y1, x0:x1].astype(np.float32)
    a = car.glass_alpha
    out = a * col[:, None, :] + (1 - a) * 0.55 * roi_bg
    roi = img[y0:y1, x0:x1]
    roi[sel] = np.clip(out[sel], 0, 255).astype(np.uint8)


def _circle(x: float, y: float, zc: float, radius: float, n: int = 36) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([x + radius * np.cos(a), np.full(n, y), zc + radius * np.sin(a)], 1)


def _draw_wheel(img, mask, car: Car, cam: _Camera, xa: float, side: int) -> None:
    r, tw = car.wheel_r, car.tyre_w
    y_out = side * (car.width / 2 * 0.97 - 0.02)
    y_in = y_out - side * tw
    outer, inner = _circle(xa, y_out, r, r), _circle(xa, y_in, r, r)
    uv, _ = cam.project(np.concatenate([outer, inner]))
    hull = cv2.convexHull(uv.astype(np.float32)).reshape(-1, 2)
    _fill(img, mask, hull, car.tyre)
    n = np.array([0.0, side, 0.0])
    centre = np.array([xa, y_out, r])
    out_facing = cam.facing(centre, n)
    face_y, sgn = (y_out, 1) if out_facing > 0 else (y_in, -1)
    nf = n * sgn
    cos = float(cam.facing(np.array([xa, face_y, r]), nf)) / np.linalg.norm(
        cam.pos - cam.world(np.array([xa, face_y, r])))
    if cos < 0.05:
        return
    project = lambda p: cam.project(p)[0]
    _fill(img, mask, project(_circle(xa, face_y, r, r * 0.97)), car.tyre * 1.6)
    rim_y = face_y + side * sgn * 0.004
    rr = r * car.rim_frac
    shade = 0.55 + 0.45 * cos
    _fill(img, mask, project(_circle(xa, rim_y, r, rr)), car.rim * shade)
    # Dark openings between the spokes.
    k = car.spokes
    half_spoke = (np.pi / k) * 0.35
    for i in range(k):
        a = np.linspace(2 * np.pi * i / k + half_spoke, 2 * np.pi * (i + 1) / k - half_spoke, 6)
        ring_out = np.stack([xa + 0.86 * rr * np.cos(a), np.full(6, rim_y), r + 0.86 * rr * np.sin(a)], 1)
        ring_in = np.stack([xa + 0.32 * rr * np.cos(a[::-1]), np.full(6, rim_y), r + 0.32 * rr * np.sin(a[::-1])], 1)
        _fill(img, mask, project(np.concatenate([ring_out, ring_in])), car.tyre * 0.8)
    _fill(img, mask, project(_circle(xa, rim_y + side * sgn * 0.002, r, rr * 0.18, 12)), car.rim * shade * 0.8)


def render_view(car: Car, angle: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One photo of ``car`` turned ``angle`` degrees (0 = front): (RGB uint8 HxWx3, mask uint8 HxW in {0,1})."""
    geo = car.geometry
    cam = _Camera(car, angle, tuple(rng.uniform(-4, 4, 2)))

    shadow = _shadow(car, cam)
    small = car.background * (1 - car.shadow_strength * shadow)[..., None]
    small *= rng.uniform(0.97, 1.03) * (1 + rng.uniform(-0.01, 0.01, 3)).astype(np.float32)
    small8 = np.clip(small * 255 + 0.5, 0, 255).astype(np.uint8)
    img = cv2.resize(small8, (IMAGE_W, IMAGE_H), interpolation=cv2.INTER_LINEAR)
    bg = img.copy()
    mask = np.zeros((IMAGE_H, IMAGE_W), np.uint8)

    # Which sides of the car face the camera (wheels on a visible side are drawn over the body).
    near = {side: cam.facing(np.array([0.0, side * car.width / 2, car.belt * 0.5]), np.array([0.0, side, 0.0])) > 0.05 *
            car.cam_dist for side in (1, -1)}
    well_color = np.full(3, 0.035)
    for phase in (False, True):  # far side first, then the near side
        for side, pts in geo.wells:
            if near[side] == phase:
                uv, _ = cam.project(pts)
                _fill(img, mask, cv2.convexHull(uv.astype(np.float32)).reshape(-1, 2), well_color)
        if not phase:
            for xa, side in geo.wheels:
                if not near[side]:
                    _draw_wheel(img, mask, car, cam, xa, side)

    # Lower body (with its end faces), back faces culled, depth sorted (far first).
    centroids = geo.body_quads.mean(1)
    vis = cam.facing(centroids, geo.body_normals) > 1e-9
    base = np.where(geo.body_trim[vis, None], car.trim if car.trim is not None else car.paint, car.paint[None])
    colors = list(_shade(car, cam, base, centroids[vis], geo.body_normals[vis]))
    uv, depth = cam.project(geo.body_quads[vis])
    polys = list(uv)
    depths = list(depth.mean(1))
    for pts, n in geo.caps:
        c = pts.mean(0)
        if cam.facing(c, n) > 1e-9:
            cuv, cdepth = cam.project(pts)
            polys.append(cuv)
            depths.append(cdepth.mean())
            colors.append(_shade(car, cam, car.paint[None], c[None], n[None])[0])
    for j in np.argsort(-np.array(depths), kind="stable"):
        _fill(img, mask, polys[j], colors[j])

    # Lights, grille and plate on visible end faces; door seams on visible sides.
    for cap_i, pts, rgb in geo.decals:
        cap_pts, cap_n = geo.caps[cap_i]
        if cam.facing(cap_pts.mean(0), cap_n) > 0:
            col = _shade(car, cam, rgb[None], pts.mean(0)[None], cap_n[None], reflect=0.1, spec=0.5)[0]
            _fill(img, mask, cam.project(pts)[0], col)
    thick = max(1, int(round(car.focal / car.cam_dist * 0.006)))
    seam_rgb = tuple(float(c) for c in car.paint * 255 * 0.45)
    for side, pts, weight in geo.seams:
        if near[side]:
            cv2.polylines(img, [_to_px(cam.project(pts)[0])], False, seam_rgb, thick * weight, cv2.LINE_AA, _SHIFT)

    # Greenhouse, glass and mirrors (the far mirror hides behind the greenhouse).
    for side, q, n in geo.mirrors:
        if not near[side]:
            _draw_faces(img, mask, car, cam, q, n, car.paint)
    _draw_faces(img, mask, car, cam, geo.cabin_quads, geo.cabin_normals, car.paint)
    for pts, n in geo.glass:
        if cam.facing(pts.mean(0), n) > 0:
            _draw_glass(img, mask, bg, car, cam, pts, n)
    for side, q, n in geo.mirrors:
        if near[side]:
            _draw_faces(img, mask, car, cam, q, n, car.paint)
    for xa, side in geo.wheels:
        if near[side]:
            _draw_wheel(img, mask, car, cam, xa, side)

    # Camera: a little optical blur (soft edges) and sensor noise.
    img = cv2.GaussianBlur(img, (3, 3), 0.75)
    dy, dx = rng.integers(0, _NOISE_PAD, 2)
    img = cv2.add(img, car.noise_tile[dy:dy + IMAGE_H, dx:dx + IMAGE_W])
    img = cv2.subtract(img, (float(car.noise),) * 3 + (0.0,))
    return img, mask


def view_angle(nn: int) -> float:
    """Turntable angle in degrees of photo NN (1..16): 01 = front, 09 = rear."""
    return (nn - 1) * ANGLE_STEP


# --------------------------------------------------------------------------------------------
# Dataset generation
# --------------------------------------------------------------------------------------------

def car_ids(num: int, seed: int) -> list[str]:
    """``num`` distinct 12-hex-digit car ids (like Kaggle's ``00087a6bd4dc``), fixed by the seed."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA4]))
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < num:
        cid = rng.bytes(6).hex()
        if cid not in seen:
            seen.add(cid)
            ids.append(cid)
    return ids


def car_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of car ``index`` (train cars first, then test cars)."""
    return np.random.default_rng(np.random.SeedSequence([seed, 0x5EED, index]))


def _palette_gif(mask: np.ndarray, path: Path) -> None:
    im = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask, np.uint8).tobytes())
    im.putpalette([0, 0, 0, 255, 255, 255])
    im.save(path, format="GIF")


def _render_car_task(task: tuple) -> tuple[str, dict, list[tuple[str, str]]]:
    """Worker: render and write the 16 photos (and masks) of one car; returns (id, metadata, csv rows)."""
    root, car_id, index, seed, quality, is_train = task
    rng = car_rng(seed, index)
    car = sample_car(rng)
    root = Path(root)
    rows = []
    for nn in range(1, NUM_ANGLES + 1):
        img, mask = render_view(car, view_angle(nn), rng)
        name = f"{car_id}_{nn:02d}"
        bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        path = root / ("train" if is_train else "test") / f"{name}.jpg"
        if not cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)]):
            raise OSError(f"could not write {path}")
        if is_train:
            _palette_gif(mask, root / "train_masks" / f"{name}_mask.gif")
            rows.append((f"{name}.jpg", rle.encode(mask)))
        else:
            rows.append((f"{name}.jpg", "1 1"))
    return car_id, car.metadata(), rows


def _init_worker() -> None:
    cv2.setNumThreads(1)


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _is_nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def generate(out_dir: str | os.PathLike, num_cars: int, num_test_cars: int = 4, seed: int = 0, quality: int = 90,
             workers: int | None = None, progress: bool = True, overwrite: bool = False) -> None:
    """Write a synthetic Carvana dataset (``num_cars`` train cars, ``num_test_cars`` test cars) to ``out_dir``.

    Raises OutputExistsError if ``out_dir`` exists and is not empty, unless ``overwrite``.
    """
    if num_cars < 1 or num_test_cars < 0:
        raise ValueError(f"need at least one train car and no negative test cars, got {num_cars}, {num_test_cars}")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    out = Path(out_dir)
    if _is_nonempty(out) and not overwrite:
        raise OutputExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        for sub in ("train", "train_masks", "test"):
            (tmp / sub).mkdir()
        ids = car_ids(num_cars + num_test_cars, seed)
        tasks = [(str(tmp), cid, i, seed, quality, i < num_cars) for i, cid in enumerate(ids)]
        workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
        results = []
        from tqdm import tqdm
        with tqdm(total=len(tasks) * NUM_ANGLES, unit="img", desc="synthetic carvana", disable=not progress) as bar:
            if workers == 1:
                for task in tasks:
                    results.append(_render_car_task(task))
                    bar.update(NUM_ANGLES)
            else:
                ctx = multiprocessing.get_context("spawn")  # safe even if the caller has started threads (JAX)
                with ctx.Pool(workers, initializer=_init_worker) as pool:
                    for res in pool.imap_unordered(_render_car_task, tasks):
                        results.append(res)
                        bar.update(NUM_ANGLES)
        train_ids = set(ids[:num_cars])
        train_rows = sorted(r for cid, _, rows in results if cid in train_ids for r in rows)
        test_rows = sorted(r for cid, _, rows in results if cid not in train_ids for r in rows)
        meta = sorted((cid, m["year"], m["make"], m["model"], m["trim1"], m["trim2"]) for cid, m, _ in results)
        # The CSVs last: a folder with them is complete.
        _write_csv(tmp / "metadata.csv", ["id", "year", "make", "model", "trim1", "trim2"], meta)
        _write_csv(tmp / "sample_submission.csv", ["img", "rle_mask"], test_rows)
        _write_csv(tmp / "train_masks.csv", ["img", "rle_mask"], train_rows)
        if out.exists() or out.is_symlink():
            if _is_nonempty(out):
                old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
                os.replace(out, old / "data")
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                out.rmdir() if out.is_dir() else out.unlink()
                os.replace(tmp, out)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m carvana_jax.data.synthetic",
        description="Write a synthetic dataset in the exact Kaggle Carvana layout "
                    "(train/, train_masks/, test/, train_masks.csv, sample_submission.csv, metadata.csv).")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--cars", type=int, required=True, help="number of training cars (16 photos and masks each)")
    parser.add_argument("--test_cars", type=int, default=4, help="number of test cars, photos only (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="base random seed; the output depends only on it (default: 0)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100 (default: 90)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help=f"worker processes, one car at a time each (default: os.cpu_count() = {os.cpu_count()})")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already exists and is not empty")
    parser.add_argument("--no_progress", action="store_true", help="do not show a progress bar")
    args = parser.parse_args(argv)
    if args.cars < 1:
        parser.error("--cars must be at least 1")
    if args.test_cars < 0:
        parser.error("--test_cars must be 0 or more")
    if not 1 <= args.quality <= 100:
        parser.error("--quality must be in 1..100")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        generate(args.out, args.cars, args.test_cars, args.seed, args.quality, args.workers,
                 progress=not args.no_progress, overwrite=args.overwrite)
    except OutputExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
