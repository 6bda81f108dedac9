"""Decode a photo and its mask, and warp both with ONE composed affine into the training size.

Coordinates are pixel centres (OpenCV's convention): a point x in a W-pixel image maps to
(x + 0.5) * W'/W - 0.5 in a W'-pixel one. The augmentation (zoom, shear, rotation, shift,
flip) acts about the centre of the full-resolution photo; the resize to the model's size and the
JPEG's DCT down-scaling fold into the same 3×3 matrix, so each pixel is interpolated once.
"""
from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
from PIL import Image

from carvana_jax.data.kaggle import DataError

cv2.setNumThreads(1)  # grain parallelises over images; OpenCV threads would fight it for cores


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """One draw of the paired augmentation; the identity when left at the defaults."""
    zoom: float = 1.0
    shear: float = 0.0          # radians
    rotation: float = 0.0       # degrees
    shift_x: float = 0.0        # fraction of the width
    shift_y: float = 0.0        # fraction of the height
    hflip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0


def sample_params(rng: np.random.Generator, cfg) -> AugmentParams:
    """Draw augmentation parameters from the ranges in ``config.augment``."""
    if not cfg.enabled:
        return AugmentParams()
    u = lambda r: float(rng.uniform(-r, r))  # noqa: E731
    return AugmentParams(
        zoom=1.0 + u(cfg.zoom), shear=u(cfg.shear), rotation=u(cfg.rotation),
        shift_x=u(cfg.shift), shift_y=u(cfg.shift), hflip=bool(rng.random() < cfg.hflip),
        brightness=1.0 + u(cfg.brightness), contrast=1.0 + u(cfg.contrast),
        saturation=1.0 + u(cfg.saturation))


def _translate(tx: float, ty: float) -> np.ndarray:
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)


def _scale(sx: float, sy: float) -> np.ndarray:
    return np.diag([sx, sy, 1.0])


def resize_matrix(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """Pixel-centre-aligned map from a src_hw image onto a dst_hw one."""
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    return _translate(-0.5, -0.5) @ _scale(sx, sy) @ _translate(0.5, 0.5)


def augment_matrix(p: AugmentParams, hw: tuple[int, int]) -> np.ndarray:
    """The augmentation about the centre of an hw image, in that image's pixel coordinates."""
    h, w = hw
    cx, cy = (w - 1) / 2, (h - 1) / 2
    flip = _scale(-1.0, 1.0) if p.hflip else np.eye(3)
    a = math.radians(p.rotation)
    rotate = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    shear = np.array([[1, math.tan(p.shear), 0], [0, 1, 0], [0, 0, 1]])
    centred = _translate(p.shift_x * w, p.shift_y * h) @ rotate @ shear @ _scale(p.zoom, p.zoom) @ flip
    return _translate(cx, cy) @ centred @ _translate(-cx, -cy)


def dct_matrix(src_hw: tuple[int, int], full_hw: tuple[int, int]) -> np.ndarray:
    """Map from a libjpeg 1/k-scale decode to the full photo: decoded pixel i covers pixels [k·i, k·i+k)."""
    ky, kx = round(full_hw[0] / src_hw[0]), round(full_hw[1] / src_hw[1])
    return _translate(-0.5, -0.5) @ _scale(kx, ky) @ _translate(0.5, 0.5)


def composed_matrix(p: AugmentParams, full_hw, src_hw, dst_hw) -> np.ndarray:
    """Map from a src_hw decode of the full_hw photo to the dst_hw training image, augmentation included."""
    return resize_matrix(full_hw, dst_hw) @ augment_matrix(p, full_hw) @ dct_matrix(src_hw, full_hw)


def decode_image(path: str, target_hw: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB uint8 photo decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) still ≥ target_hw,
    and the photo's full (H, W)."""
    try:
        with Image.open(path) as im:
            full_hw = (im.height, im.width)
            # draft() picks the largest libjpeg scale-down keeping the image at least this big.
            im.draft("RGB", (target_hw[1], target_hw[0]))
            array = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from e
    return array, full_hw


def decode_mask(path: str) -> np.ndarray:
    """Binary uint8 mask (1 = car) from a Carvana GIF (palette index 1 = car) or PNG."""
    try:
        with Image.open(path) as im:
            im.load()
            mask = np.asarray(im if im.mode in ("P", "L", "1") else im.convert("L"))
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable mask ({e})") from e
    return (mask > 0).astype(np.uint8)


def warp(array: np.ndarray, matrix: np.ndarray, dst_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear warp by a 3×3 forward matrix; borders repeat the edge pixels."""
    return cv2.warpAffine(array, matrix[:2], (dst_hw[1], dst_hw[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def warp_mask(mask: np.ndarray, matrix: np.ndarray, dst_hw: tuple[int, int]) -> np.ndarray:
    """Warp a 0/1 mask bilinearly and threshold at one half: binary, and aligned with the image."""
    return (warp(mask * np.uint8(255), matrix, dst_hw) >= 128).astype(np.uint8)


def jitter_colour(image: np.ndarray, p: AugmentParams) -> np.ndarray:
    """Brightness, contrast and saturation jitter of a uint8 RGB image."""
    if p.brightness == p.contrast == p.saturation == 1.0:
        return image
    x = image.astype(np.float32)
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = grey[..., None] + p.saturation * (x - grey[..., None])
    x = (x - grey.mean()) * p.contrast + grey.mean() * p.brightness
    return np.clip(x, 0, 255).astype(np.uint8)


def load_pair(image_path: str, mask_path: str | None, dst_hw, params: AugmentParams = AugmentParams()):
    """(image, mask) warped to dst_hw; mask is None when mask_path is. Sizes must agree."""
    image, full_hw = decode_image(image_path, dst_hw)
    matrix = composed_matrix(params, full_hw, image.shape[:2], dst_hw)
    out_image = jitter_colour(warp(image, matrix, dst_hw), params)
    if mask_path is None:
        return out_image, None
    mask = decode_mask(mask_path)
    if mask.shape != full_hw:
        raise DataError(f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                        f"{image_path} is {full_hw[1]}x{full_hw[0]}")
    mask_matrix = composed_matrix(params, full_hw, full_hw, dst_hw)
    return out_image, warp_mask(mask, mask_matrix, dst_hw)
