"""How wide the column strips of ``augment.warp`` are on this CPU: chosen by measurement, then cached.

``cv2.warpAffine`` of a slightly rotated photo reads its source along slanted lines; narrow output strips make it
walk the source top to bottom. Whether that pays depends on the CPU, the sizes and the channels: on this project's
AMD EPYC, warping 1918×1280 photos to 768×768, strips of 128 columns take 2.6 ms where one whole warp takes 6.6, but
a mask warps fastest whole (1.1 against 1.7 ms in strips of 64); on an Intel Xeon one whole warp of a photo was
1.8× faster than strips of 64 (BENCHMARKS.md, "Input pipeline"). So the first warp of a kind (channels, and source
and output sizes to the nearest power of two of their pixel counts) on a machine times each candidate on arrays of
its shapes and writes the winner — if it beats strips of 64, the old default, by more than 10% — to
``cache_path()``, under the CPU's model name and OpenCV's version; every later one, in any process, reads it.
Outputs under 512×512 pixels keep strips of 64 (they cost little either way, and the CPU configs' numbers stay
those of every machine). ``CARVANA_WARP_STRIP=N`` (0: one whole warp) overrides. The pixels agree to OpenCV's
fixed-point rounding (±1, rarely) whichever is chosen.
"""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time

import cv2
import numpy as np

ENV = "CARVANA_WARP_STRIP"
CANDIDATES = (64, 128, 0)  # output columns per warpAffine call; 0: the whole image at once
DEFAULT = 64  # kept unless another candidate is clearly faster: near-ties are noise, and would make two machines
MARGIN = 0.9  # (or two runs) warp the same photo differently for nothing
MIN_PIXELS = 1 << 18  # smaller outputs (the CPU configs' 128×192, 256×384) take well under a millisecond either way
_DEGREES = 4.0  # the measured warp's rotation: the training pipeline's typical few degrees
_SOURCES_BYTES = 64 << 20  # the measured sources together: more than a last-level cache holds
_chosen: dict[str, int] = {}  # this process's choices, by kind of warp


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "carvana_jax", "warp_strip.json")


def _machine_key() -> str:
    return f"{cpu_name()} | opencv {cv2.__version__}"


def kind(src_shape, dst_hw) -> str:
    """A warp's kind: its channels and the sizes of its source and output, to the nearest power of two of their
    pixel counts (photos of any size fall into a few kinds)."""
    channels = src_shape[2] if len(src_shape) > 2 else 1
    return (f"{channels}ch {round(math.log2(max(src_shape[0] * src_shape[1], 1)))}"
            f"->{round(math.log2(max(dst_hw[0] * dst_hw[1], 1)))}")


def warp_in_strips(array: np.ndarray, matrix: np.ndarray, dst_hw, out: np.ndarray, border: int, strip: int
                   ) -> np.ndarray:
    """``cv2.warpAffine`` by the 3×3 forward ``matrix`` into ``out``, ``strip`` output columns a call (0: one)."""
    h, w = dst_hw
    step = strip or w
    part = matrix[:2].astype(np.float64)  # copy: the strip offset goes into its last column
    for x0 in range(0, w, step):
        x1 = min(x0 + step, w)
        part[0, 2] = matrix[0, 2] - x0
        cv2.warpAffine(array, part, (x1 - x0, h), dst=out[:, x0:x1], flags=cv2.INTER_LINEAR, borderMode=border)
    return out


def _resize_and_turn(src_hw, dst_hw, degrees: float) -> np.ndarray:
    """The 3×3 map of a photo resized to ``dst_hw`` (each axis on its own, as fit='resize' does) and turned by
    ``degrees`` about the centre."""
    (sh, sw), (dh, dw) = src_hw, dst_hw
    def shift(x, y):
        return np.array([[1.0, 0.0, x], [0.0, 1.0, y], [0.0, 0.0, 1.0]])
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    turn = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    scale = np.diag([dw / sw, dh / sh, 1.0])
    return shift(dw / 2, dh / 2) @ turn @ scale @ shift(-sw / 2, -sh / 2)


def measure(src_shape, dst_hw, candidates=CANDIDATES, repeats: int = 3) -> dict[int, float]:
    """Best-of-``repeats`` seconds of warps from ``src_shape`` arrays to ``dst_hw`` for each candidate strip
    width, the candidates alternated so that a busy moment of the machine falls on all of them alike. Each pass
    warps several distinct sources, together larger than a CPU's last-level cache, half of them mirrored, each resized
    to ``dst_hw`` and turned a few degrees, as the pipeline warps photos just decoded: the same source warped again
    and again would sit in the cache, and a uniform scale would read other spans of it; either changes the winner."""
    count = int(min(16, max(3, -(-_SOURCES_BYTES // max(int(np.prod(src_shape)), 1)))))
    sources = [np.full(tuple(src_shape), i, np.uint8) for i in range(count)]
    plain = _resize_and_turn(src_shape[:2], dst_hw, _DEGREES)
    mirrored = np.array([[-1.0, 0.0, dst_hw[1] - 1], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ plain
    out = np.empty(tuple(dst_hw) + tuple(src_shape[2:]), np.uint8)
    best = {strip: float("inf") for strip in candidates}
    for _ in range(repeats):
        for strip in candidates:
            start = time.perf_counter()
            for i, src in enumerate(sources):
                warp_in_strips(src, plain if i % 2 else mirrored, dst_hw, out, cv2.BORDER_REPLICATE, strip)
            best[strip] = min(best[strip], (time.perf_counter() - start) / count)
    return best


def _read_cache() -> dict:
    try:
        with open(cache_path()) as f:
            cached = json.load(f)
        return cached if isinstance(cached, dict) else {}
    except (OSError, ValueError):  # absent, unreadable or not JSON: measured again and rewritten
        return {}


def _write_cache(cached: dict) -> None:
    """Written whole or not at all (a temporary file renamed into place); a read-only home only costs a
    measurement per process."""
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".warp_strip-")
        with os.fdopen(fd, "w") as f:
            json.dump(cached, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass


def _override() -> int | None:
    if not os.environ.get(ENV):
        return None
    strip = int(os.environ[ENV])
    if strip < 0:
        raise ValueError(f"{ENV} must be 0 (one whole warp) or a positive number of columns, got {strip}")
    return strip


def warp_strip(src_shape, dst_hw) -> int:
    """The strip width for a warp from a ``src_shape`` array to ``dst_hw``: $CARVANA_WARP_STRIP, else this
    machine's cached choice for the warp's kind, else by ``measure()`` (then cached) the fastest candidate if it
    beats DEFAULT by more than 10%, else DEFAULT. Outputs under MIN_PIXELS keep DEFAULT unmeasured."""
    override = _override()
    if override is not None:
        return override
    if dst_hw[0] * dst_hw[1] < MIN_PIXELS:
        return DEFAULT
    key = kind(src_shape, dst_hw)
    if key in _chosen:
        return _chosen[key]
    cached = _read_cache()
    machine = cached.get(_machine_key())
    machine = machine if isinstance(machine, dict) else {}
    entry = machine.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("strip"), int) and entry["strip"] >= 0:
        _chosen[key] = entry["strip"]
        return entry["strip"]
    seconds = measure(src_shape, dst_hw)
    fastest = min(seconds, key=seconds.get)
    strip = fastest if seconds[fastest] < MARGIN * seconds[DEFAULT] else DEFAULT
    machine[key] = {"strip": strip, "ms": {str(k): round(v * 1e3, 3) for k, v in seconds.items()}}
    cached[_machine_key()] = machine
    _write_cache(cached)
    _chosen[key] = strip
    return strip
