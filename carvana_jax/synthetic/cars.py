"""What a synthetic car is: body type, shape, paint, make and model, drawn at random per car."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from carvana_jax import rle

IMAGE_H, IMAGE_W = rle.FULL_SHAPE  # 1280 rows x 1918 columns: the photo the camera of a Car takes


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

    @property
    def is_light(self) -> bool:
        """White, silver, light grey or similar: hard to tell from the studio by brightness."""
        return float(self.paint @ np.array([0.299, 0.587, 0.114])) > 0.6

    def metadata(self) -> dict:
        return dict(year=self.year, make=self.make, model=self.model, trim1=self.trim1, trim2=self.trim2)


def uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def sample_car(rng: np.random.Generator, paint: str | None = None) -> Car:
    """A random car (body, paint, camera, studio); ``paint`` forces a paint name from _PAINTS."""
    names = list(_BODIES)
    weights = np.array([_BODIES[n]["w"] for n in names])
    body = names[rng.choice(len(names), p=weights / weights.sum())]
    spec = _BODIES[body]
    make, model = _MODELS[body][rng.integers(len(_MODELS[body]))]

    L, W, H = (uniform(rng, *spec[k]) for k in ("L", "W", "H"))
    c, r = uniform(rng, *spec["c"]), uniform(rng, *spec["r"])
    arch = 1.13 * r
    belt = H * uniform(rng, 0.6, 0.69)
    wheelbase = L * uniform(rng, 0.57, 0.63)
    overhang = L - wheelbase
    front_over = max(arch + 0.25, overhang * uniform(rng, 0.45, 0.56))
    rear_over = max(arch + 0.25, overhang - front_over)
    front_axle = L / 2 - front_over
    rear_axle = -L / 2 + rear_over
    nose = max(belt - uniform(rng, 0.1, 0.26 if body != "suv" else 0.16), r + arch + 0.12)
    deck = belt + uniform(rng, *spec["deck"])
    ws, rf, rr, rw = (f * L + uniform(rng, -0.02, 0.02) * L for f in spec["cab"])
    rw = max(rw, -L / 2 + 0.02)
    half = W / 2
    cabin_w = (half * uniform(rng, 0.84, 0.88), half * uniform(rng, 0.62, 0.72))
    pb = rr + (rf - rr) * uniform(rng, 0.38, 0.55)
    pillars = (pb, rr + (pb - rr) * uniform(rng, 0.25, 0.45)) if spec["third"] else (pb,)
    round_ends = (uniform(rng, 0.18, 0.32), uniform(rng, 0.06, 0.14), uniform(rng, 0.08, 0.2) * half)

    if paint is None:
        p = np.array([w for _, _, w in _PAINTS])
        paint_name, rgb, _ = _PAINTS[rng.choice(len(_PAINTS), p=p / p.sum())]
    else:
        paint_name, rgb, _ = next(x for x in _PAINTS if x[0] == paint)
    paint_rgb = np.clip(np.array(rgb) + rng.uniform(-0.03, 0.03, 3), 0.0, 1.0)
    trim = np.full(3, uniform(rng, 0.08, 0.2)) if rng.random() < (0.6 if body == "suv" else 0.25) else None
    glass = np.array([0.10, 0.12, 0.14]) * uniform(rng, 0.6, 1.6) + rng.uniform(-0.015, 0.015, 3)
    rim_kind = rng.random()
    rim = np.full(3, uniform(rng, 0.68, 0.86)) if rim_kind < 0.65 else (
        np.full(3, uniform(rng, 0.16, 0.3)) if rim_kind < 0.9 else paint_rgb * 0.9)

    # Camera: a fixed camera, the car turns on a turntable. Focal length so that the side view
    # spans 40-80 % of the image width.
    cam_dist = uniform(rng, 7.0, 12.0)
    frac = uniform(rng, 0.42, 0.72)
    focal = frac * IMAGE_W * cam_dist / L
    slack = max(0.0, (0.92 - frac) / 2)
    center = (IMAGE_W * (0.5 + uniform(rng, -0.6, 0.6) * min(0.06, slack)),
              IMAGE_H * uniform(rng, 0.46, 0.56))
    cam_height = uniform(rng, 0.9, 2.1)
    target_z = H * uniform(rng, 0.35, 0.55)

    # Studio: light wall, a floor of a slightly different tone, the junction at a varying height.
    tint = rng.uniform(-0.02, 0.02, 3)
    wall = np.clip(uniform(rng, 0.78, 0.97) + tint, 0, 1)
    floor = np.clip(wall + uniform(rng, -0.14, 0.04) + rng.uniform(-0.015, 0.015, 3), 0, 1)
    return Car(
        body=body, year=int(rng.integers(2001, 2018)), make=make, model=model,
        trim1=_TRIM1[rng.integers(len(_TRIM1))], trim2=_TRIM2[rng.integers(len(_TRIM2))],
        length=L, width=W, height=H, clearance=c, belt=belt, nose=nose, deck=deck, wheel_r=r,
        tyre_w=uniform(rng, 0.19, 0.26), front_axle=front_axle, rear_axle=rear_axle,
        cabin_x=(ws, rf, rr, rw), cabin_w=cabin_w, pillars=pillars, round_ends=round_ends,
        paint_name=paint_name, paint=paint_rgb, reflect=uniform(rng, 0.12, 0.32), spec=uniform(rng, 0.25, 0.6),
        gloss=uniform(rng, 12, 40), trim=trim, glass=np.clip(glass, 0.02, 0.3), glass_alpha=uniform(rng, 0.72, 0.9),
        tyre=np.full(3, uniform(rng, 0.06, 0.12)), rim=rim, rim_frac=uniform(rng, 0.55, 0.72),
        spokes=int(rng.choice([5, 5, 6, 7, 10])),
        cam_dist=cam_dist, cam_height=cam_height, target_z=target_z, focal=focal, center=center,
        light_side=uniform(rng, -0.6, 0.6), wall=wall, floor=floor, wall_dist=uniform(rng, 2.0, 10.0),
        cove=uniform(rng, 2.0, 30.0),
        shadow_strength=uniform(rng, 0.4, 0.7), shadow_blur=uniform(rng, 0.03, 0.08), noise=int(rng.integers(2, 6)),
        noise_seed=int(rng.integers(2 ** 63)), studio_seed=int(rng.integers(2 ** 63)),
    )


