"""One photo and its exact mask: the car on a turntable in a white studio, seen by a fixed camera."""
from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from carvana_jax.synthetic.cars import IMAGE_H, IMAGE_W, Car, uniform
from carvana_jax.synthetic.geometry import Geometry, build_geometry

NUM_ANGLES = 16
ANGLE_STEP = 360.0 / NUM_ANGLES

_SHIFT = 3  # fractional bits for cv2.fillPoly coordinates (sub-pixel precise polygons)
_ONE = 1 << _SHIFT
_BG_SCALE = 4  # background and shadow are computed at 1/4 resolution, then upsampled
_NOISE_PAD = 32
_BG_H, _BG_W = IMAGE_H // _BG_SCALE, int(math.ceil(IMAGE_W / _BG_SCALE))


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
    wall_grad = 1 + uniform(rng, -0.08, 0.06) * (rows / _BG_H - 0.5)
    floor_grad = 1 + uniform(rng, -0.06, 0.1) * ((rows - horizon) / max(_BG_H - horizon, 1.0))
    xc = (cols / _BG_W - 0.5) * 2
    yc = (rows / _BG_H - 0.5) * 2
    vignette = 1 - uniform(rng, 0.0, 0.12) * (xc ** 2 * 0.7 + yc ** 2 * 0.3)
    wall = car.wall.astype(np.float32)[None, None, :] * (wall_grad * vignette)[..., None]
    floor = car.floor.astype(np.float32)[None, None, :] * (floor_grad * vignette)[..., None]
    img = wall * (1 - blend[..., None]) + floor * blend[..., None]
    blotch = cv2.resize(rng.normal(0, 1, (6, 9)).astype(np.float32), (_BG_W, _BG_H), interpolation=cv2.INTER_CUBIC)
    img *= (1 + uniform(rng, 0.005, 0.025) * blotch)[..., None]
    # A faint line where the wall meets the floor, on some studios.
    if rng.random() < 0.5:
        img *= (1 - uniform(rng, 0.0, 0.05) * np.exp(-((rows - horizon) / 1.5) ** 2))[..., None]
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
    for xa, side in geometry_of(car).wheels:
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


# A car is rendered from 16 angles in a row: its geometry, empty studio and noise are made once.
@functools.lru_cache(maxsize=2)
def geometry_of(car: Car) -> Geometry:
    return build_geometry(car)


@functools.lru_cache(maxsize=2)
def background_of(car: Car) -> np.ndarray:
    """The empty studio at 1/4 resolution, (_BG_H, _BG_W, 3) float32 RGB in 0..1, without shadow."""
    return _studio_background(car, np.random.default_rng(car.studio_seed))


@functools.lru_cache(maxsize=2)
def noise_tile_of(car: Car) -> np.ndarray:
    """Sensor noise in 0..2*noise, a little larger than a photo; each photo takes a shifted window."""
    rng = np.random.default_rng(car.noise_seed)
    return rng.integers(0, 2 * car.noise + 1, (IMAGE_H + _NOISE_PAD, IMAGE_W + _NOISE_PAD, 3), dtype=np.uint8)


def render_view(car: Car, angle: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One photo of ``car`` turned ``angle`` degrees (0 = front): (RGB uint8 HxWx3, mask uint8 HxW in {0,1})."""
    geo = geometry_of(car)
    cam = _Camera(car, angle, tuple(rng.uniform(-4, 4, 2)))

    shadow = _shadow(car, cam)
    small = background_of(car) * (1 - car.shadow_strength * shadow)[..., None]
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
    img = cv2.add(img, noise_tile_of(car)[dy:dy + IMAGE_H, dx:dx + IMAGE_W])
    img = cv2.subtract(img, (float(car.noise),) * 3 + (0.0,))
    return img, mask


def view_angle(nn: int) -> float:
    """Turntable angle in degrees of photo NN (1..16): 01 = front, 09 = rear."""
    return (nn - 1) * ANGLE_STEP


