"""A car's 3D geometry, built once per car in the car frame: lofted lower body with wheel arches, greenhouse
and glass, mirrors, wheel wells."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from carvana_jax.synthetic.cars import Car


# Normalised cross-section of the lower body (half-width fraction, height fraction), as a closed
# ring: right side bottom -> top, then left side top -> bottom.
_RING_HALF = [(0.84, 0.0), (0.96, 0.1), (1.0, 0.32), (1.0, 0.6), (0.97, 0.8), (0.88, 0.94), (0.62, 1.0)]
_RING = np.array(_RING_HALF + [(-sy, sz) for sy, sz in reversed(_RING_HALF)], dtype=np.float64)
_CABIN_SINK = 0.05  # the greenhouse starts this far below the belt, on the body's shoulders
_TRIM_EDGES = (0, 1, len(_RING) - 2, len(_RING) - 1)  # ring edges near the bottom (rocker panels)


# --------------------------------------------------------------------------------------------
# Geometry (built once per car, in the car frame)
# --------------------------------------------------------------------------------------------

@dataclass
class Geometry:
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


def build_geometry(car: Car) -> Geometry:
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
    return Geometry(quads, normals, trim, caps, seams, cab_quads, cab_normals, glass, decals, mirrors,
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


