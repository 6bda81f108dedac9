"""Any photo a user brings — JPEG, PNG, WebP, BMP or TIFF, of any size, greyscale or with alpha, turned by its EXIF
orientation — read as the model's own pipeline reads a Kaggle photo.

A Kaggle JPEG goes exactly the eval pipeline's way (``augment.decode_image``: decoded at the JPEG DCT scale its
model input needs, then warped to the model's size), so its mask is eval's. Other JPEGs take the same DCT-scaled
decode and are then turned upright. Other formats have no DCT scaling: they are decoded whole and shrunk by the
same factor with area averaging, which is what a DCT-scaled decode approximates, before the same warp.

A photo of another shape than the model's training photos is not stretched to the model's size: it is fitted
to about the same number of pixels at its own aspect ratio, rounded to the multiple the U-Net needs
(``model_size``), so any size is accepted.
"""
from __future__ import annotations

import dataclasses
import io
import math

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from carvana_jax import rle
from carvana_jax.data import augment
from carvana_jax.errors import DataError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_EXIF_ORIENTATION = 0x0112
# EXIF orientation → the numpy view that shows the stored pixels upright (PIL's ImageOps.exif_transpose).
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


@dataclasses.dataclass(frozen=True)
class Header:
    """What a photo's header says: its (H, W) as displayed, whether it is a JPEG, its EXIF orientation."""
    full_hw: tuple[int, int]
    jpeg: bool
    orientation: int = 1


def _open(data: bytes, what: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise DataError(f"{what}: not an image (no JPEG, PNG, WebP, BMP, TIFF or other format Pillow reads)") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{what}: unreadable image ({e})") from e


def read_header(data: bytes, what: str) -> Header:
    """The photo's ``Header``, without decoding its pixels; DataError naming ``what`` if it is no image."""
    jpeg_hw = augment.jpeg_header(data)
    with _open(data, what) as im:
        try:
            orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
        except Exception:  # a broken EXIF block: the pixels may still be fine; show them as stored
            orientation = 1
        stored = jpeg_hw or (im.height, im.width)
    orientation = orientation if orientation in _UPRIGHT else 1
    turned = orientation in (5, 6, 7, 8)
    return Header(tuple(stored[::-1] if turned else stored), jpeg_hw is not None, orientation)


def _pil_rgb(data: bytes, what: str) -> np.ndarray:
    """The whole photo, upright, as RGB uint8: greyscale spread to three channels, alpha dropped, 16-bit
    samples brought to 8."""
    with _open(data, what) as im:
        try:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = Image.fromarray(np.clip(np.asarray(im, np.float64) / 257.0, 0, 255).astype(np.uint8))
            return np.ascontiguousarray(np.asarray(im.convert("RGB")))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{what}: unreadable image ({e})") from e


def reduced_shape(full_hw: tuple[int, int], k: int) -> tuple[int, int]:
    """(H, W) of a 1/k decode: rounded up, as libjpeg does."""
    return -(-full_hw[0] // k), -(-full_hw[1] // k)


def decode(data: bytes, header: Header, k: int, what: str) -> np.ndarray:
    """RGB uint8 of the upright photo at 1/k scale (``reduced_shape``)."""
    if header.jpeg:
        stored = header.full_hw[::-1] if header.orientation in (5, 6, 7, 8) else header.full_hw
        array = augment.decode_jpeg(data, stored, k, what)
        return np.ascontiguousarray(_UPRIGHT[header.orientation](array)) if header.orientation != 1 else array
    array = _pil_rgb(data, what)
    if array.shape[:2] != header.full_hw:
        raise DataError(f"{what}: unreadable image (decoded {array.shape[1]}x{array.shape[0]}, its header says "
                        f"{header.full_hw[1]}x{header.full_hw[0]})")
    if k == 1:
        return array
    h, w = reduced_shape(header.full_hw, k)
    return cv2.resize(array, (w, h), interpolation=cv2.INTER_AREA)


def model_size(full_hw: tuple[int, int], image_size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """The model input (h, w) for a ``full_hw`` photo: ``image_size`` itself for the size the model was trained
    on (Kaggle's 1918×1280) or any photo whose shape rounds to it; otherwise the photo's own aspect ratio at
    about image_size's pixel count, each side rounded to ``multiple`` (at least one multiple)."""
    if tuple(full_hw) == rle.FULL_SHAPE:
        return tuple(image_size)
    scale = math.sqrt(image_size[0] * image_size[1] / (full_hw[0] * full_hw[1]))
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in full_hw)


def model_input(decoded: np.ndarray, full_hw, size, fit: str = "resize") -> np.ndarray:
    """The model's ``size`` image from a decode of the photo, as ``pipeline.LoadAtSizes`` warps it (no augmentation; placed as ``fit`` says)."""
    matrix = augment.composed_matrix(augment.AugmentParams(), full_hw, decoded.shape[:2], size, fit)
    return augment.warp(decoded, matrix, size, border=augment.fit_border(fit))
