"""Decode a photo and its mask, and warp both with ONE composed affine into the training size.

Coordinates are pixel centres (OpenCV's convention): a point x in a W-pixel image maps to
(x + 0.5) * W'/W - 0.5 in a W'-pixel one. The augmentation (zoom, shear, rotation, shift,
flip) acts about the centre of the full-resolution photo; the resize to the model's size and the
JPEG's DCT down-scaling fold into the same 3×3 matrix, so each pixel is interpolated once.

Where the time goes, and why it is spent this way (figures: BENCHMARKS.md, ``bench pipeline``):

- JPEG: OpenCV's libjpeg-turbo, asked for RGB at the smallest DCT scale (1, 1/2, 1/4, 1/8) that
  still covers the target. Same pixels as PIL's ``draft`` decode, but without PIL's per-row
  unpacking and ``tobytes`` copies (at full scale PIL takes ~5× as long).
- Mask: from its RLE when one is known (Kaggle's train_masks.csv, or the TFDS example's
  ``mask_rle``): a few hundred runs expanded with ``np.repeat`` (~0.2 ms), against ~6 ms to
  decode the LZW-compressed GIF. The GIF is read only when there is no RLE.
- Warp: ``cv2.warpAffine`` in column strips of the output, or whole, whichever this CPU does faster
  (data/warp_strip.py measures it once and caches the choice). With a rotation of a few degrees a
  whole-image warp reads the 7 MB source along slanted lines; narrow strips walk it top to bottom, which
  some CPUs' prefetchers reward and others do not. The pixels are the same to within OpenCV's
  fixed-point rounding.
- Colour jitter: brightness, contrast and saturation are one 3×4 colour matrix, applied in place
  by ``cv2.transform`` (~20× faster than the float32 NumPy version).
- Outputs can be written into caller-given arrays (``out_image``, ``out_mask``).
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Union

import cv2
import numpy as np
from PIL import Image

from carvana_jax import rle
from carvana_jax.data.warp_strip import warp_in_strips, warp_strip
from carvana_jax.errors import DataError

cv2.setNumThreads(1)  # grain parallelises over images; OpenCV threads would fight it for cores

Source = Union[str, os.PathLike, bytes]  # a file's path, or the file's bytes

# OpenCV's flags for an RGB decode at 1/k scale; EXIF orientation is ignored, as PIL ignores it.
_CV2_FLAGS = {k: cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION | reduced
              for k, reduced in ((1, 0), (2, cv2.IMREAD_REDUCED_GRAYSCALE_2),
                                 (4, cv2.IMREAD_REDUCED_GRAYSCALE_4), (8, cv2.IMREAD_REDUCED_GRAYSCALE_8))}
_GREY = np.array([0.299, 0.587, 0.114])


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
    hue: float = 0.0            # degrees of rotation about the grey axis
    greyscale: bool = False
    channels: tuple[int, int, int] = (0, 1, 2)  # output channel i is input channel channels[i]


def sample_params(rng: np.random.Generator, cfg) -> AugmentParams:
    """Draw augmentation parameters from the ranges in ``config.augment``."""
    if not cfg.enabled:
        return AugmentParams()
    u = lambda r: float(rng.uniform(-r, r))  # noqa: E731
    params = AugmentParams(
        zoom=1.0 + u(cfg.zoom), shear=u(cfg.shear), rotation=u(cfg.rotation),
        shift_x=u(cfg.shift), shift_y=u(cfg.shift), hflip=bool(rng.random() < cfg.hflip),
        brightness=1.0 + u(cfg.brightness), contrast=1.0 + u(cfg.contrast),
        saturation=1.0 + u(cfg.saturation))
    # Drawn only when asked for, so configs without them keep the same random stream as before.
    extra = {}
    if cfg.get("hue", 0.0) > 0:
        extra["hue"] = u(cfg.hue)
    if cfg.get("greyscale", 0.0) > 0:
        extra["greyscale"] = bool(rng.random() < cfg.greyscale)
    if cfg.get("channel_shuffle", 0.0) > 0 and rng.random() < cfg.channel_shuffle:
        extra["channels"] = tuple(int(c) for c in rng.permutation(3))
    return dataclasses.replace(params, **extra) if extra else params


# ------------------------------------------------------------------------------------------ matrices

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


# How the photo is brought to the model's size (config key ``fit``): 'resize' stretches it onto image_size;
# 'pad' puts it unscaled in the middle of an image_size at most the photo's size rounded up to a multiple of
# PAD_MULTIPLE (1280×1918 → 1280×1920: one column each side), the rim filled by PAD_BORDER, and the
# prediction is cropped back (inference.crop) with no interpolation anywhere.
FITS = ("resize", "pad")
PAD_MULTIPLE = 64
# cv2.BORDER_REFLECT is np.pad(mode='symmetric'): the rim mirrors the photo's edge, edge pixel included (for a
# one-pixel rim: the edge column repeated). With fit='pad' it fills every warp's out-of-photo pixels, the
# augmentation's too, for the photo and its mask alike.
PAD_BORDER = cv2.BORDER_REFLECT


def pad_offsets(full_hw, dst_hw) -> tuple[int, int]:
    """(top, left) of a full_hw photo padded into a dst_hw image by fit='pad' (the odd pixel goes last)."""
    return (dst_hw[0] - full_hw[0]) // 2, (dst_hw[1] - full_hw[1]) // 2


def check_fit(full_hw, dst_hw, fit: str) -> None:
    """ValueError unless ``fit`` is one of FITS and, for 'pad', dst_hw is full_hw rounded up (by less
    than PAD_MULTIPLE on each axis)."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}; got {fit!r}")
    if fit == "pad":
        up = tuple(-(-v // PAD_MULTIPLE) * PAD_MULTIPLE for v in full_hw)
        if not all(f <= d <= u for f, d, u in zip(full_hw, dst_hw, up)):
            raise ValueError(f"fit='pad' pads the {full_hw[1]}x{full_hw[0]} photo to image_size, so image_size must "
                             f"be the photo's size rounded up (at most to a multiple of {PAD_MULTIPLE}: "
                             f"({full_hw[0]}..{up[0]}, {full_hw[1]}..{up[1]}), e.g. {up}); got "
                             f"{tuple(dst_hw)}. Use fit='resize' for other sizes")


def fit_matrix(full_hw, dst_hw, fit: str = "resize") -> np.ndarray:
    """Map from the full_hw photo onto the dst_hw model image: the resize, or for fit='pad' the whole-pixel
    translation to ``pad_offsets``."""
    check_fit(full_hw, dst_hw, fit)
    if fit == "pad":
        top, left = pad_offsets(full_hw, dst_hw)
        return _translate(left, top)
    return resize_matrix(full_hw, dst_hw)


def fit_border(fit: str = "resize") -> int:
    """The cv2 border mode of a warp to a ``fit`` image: PAD_BORDER for 'pad', else the edge repeated."""
    return PAD_BORDER if fit == "pad" else cv2.BORDER_REPLICATE


def composed_matrix(p: AugmentParams, full_hw, src_hw, dst_hw, fit: str = "resize") -> np.ndarray:
    """Map from a src_hw decode of the full_hw photo to the dst_hw training image, augmentation included
    (``fit_matrix`` says how the photo meets dst_hw)."""
    return fit_matrix(full_hw, dst_hw, fit) @ augment_matrix(p, full_hw) @ dct_matrix(src_hw, full_hw)


# ------------------------------------------------------------------------------------------ decoding

def source_name(src: Source, name: str | None = None) -> str:
    """What an error message calls a source: its path, else the example's name."""
    if name:
        return name
    return "<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)


def read_bytes(src: Source, name: str | None = None) -> bytes:
    """The file's bytes (a path is read; bytes are returned as they are)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src) if not isinstance(src, bytes) else src
    try:
        with open(src, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{source_name(src, name)}: cannot read ({e.strerror or e})") from e


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_header(data: bytes) -> tuple[int, int] | None:
    """(H, W) from a JPEG's frame header, without decoding; None when ``data`` is no JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _SOF:
            if pos + 9 > n:
                return None
            return int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big")
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def _jpeg_complete(data: bytes) -> bool:
    """Whether the entropy-coded data runs to an end-of-image marker. Byte stuffing keeps FF D9 out of
    the scans, so a file cut anywhere after its first scan starts has none after it."""
    sos = data.find(b"\xff\xda")
    return sos >= 0 and data.rfind(b"\xff\xd9") > sos


def dct_scale(full_hw: tuple[int, int], target_hw: tuple[int, int]) -> int:
    """The largest libjpeg scale-down k in (8, 4, 2, 1) whose decode is still ≥ target_hw (PIL's
    ``draft`` rule: full // target ≥ k on both axes)."""
    most = min(full_hw[0] // max(target_hw[0], 1), full_hw[1] // max(target_hw[1], 1))
    return next(k for k in (8, 4, 2, 1) if k <= max(most, 1))


def decode_image(src: Source, target_hw: tuple[int, int], name: str | None = None
                 ) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB uint8 photo decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) still ≥ target_hw,
    and the photo's full (H, W). ``src`` is a path or the file's bytes; errors name the path, or
    ``name`` (the example's name) for bytes."""
    data = read_bytes(src, name)
    full_hw = jpeg_header(data)
    if full_hw is None:  # not a JPEG: whatever PIL reads, at full scale
        return _decode_image_pil(data, target_hw, source_name(src, name))
    return decode_jpeg(data, full_hw, dct_scale(full_hw, target_hw), source_name(src, name)), full_hw


def decode_jpeg(data: bytes, full_hw: tuple[int, int], k: int, what: str) -> np.ndarray:
    """RGB uint8 of the (H, W) = ``full_hw`` JPEG ``data`` decoded at 1/k scale (libjpeg's DCT scaling),
    its EXIF orientation ignored; errors name ``what``."""
    if not _jpeg_complete(data):
        raise DataError(f"{what}: unreadable image (truncated JPEG: no end-of-image marker)")
    array = cv2.imdecode(np.frombuffer(data, np.uint8), _CV2_FLAGS[k])
    expected = (-(-full_hw[0] // k), -(-full_hw[1] // k))
    if array is None or array.shape != (*expected, 3):
        raise DataError(f"{what}: unreadable image (the JPEG does not decode)")
    return array


def _decode_image_pil(data: bytes, target_hw, what: str):
    try:
        with Image.open(io.BytesIO(data)) as im:
            full_hw = (im.height, im.width)
            im.draft("RGB", (target_hw[1], target_hw[0]))  # JPEG only; a no-op for other formats
            array = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{what}: unreadable image ({e})") from e
    return array, full_hw


def _decode_gif(src: Source, name: str | None) -> np.ndarray:
    """The mask file's raw values (palette indices for a GIF)."""
    data = read_bytes(src, name)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im if im.mode in ("P", "L", "1") else im.convert("L"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{source_name(src, name)}: unreadable mask ({e})") from e


def decode_mask(src: Source, name: str | None = None) -> np.ndarray:
    """Binary uint8 mask (1 = car) from a Carvana GIF (palette index 1 = car) or PNG, given as a path
    or as the file's bytes."""
    return (_decode_gif(src, name) > 0).view(np.uint8)


@dataclasses.dataclass(frozen=True)
class MaskSource:
    """Where a photo's mask comes from: its RLE (preferred: cheapest to decode) or its GIF/PNG file
    (a path or the bytes). ``name`` is what errors call it."""
    rle: str | None = None
    file: Source | None = None
    name: str | None = None

    def decode(self, shape: tuple[int, int], value: int = 1, image_name: str = "photo",
               out: np.ndarray | None = None) -> np.ndarray:
        """uint8 mask of ``shape`` (the photo's): ``value`` = car, 0 = background, written into ``out``
        when given; a mask file of another size is a DataError naming it and ``image_name``."""
        if self.rle is not None:
            try:
                return rle.decode(self.rle, shape, out=out, value=value)
            except ValueError as e:
                raise DataError(f"{self.name or 'mask'}: bad RLE mask ({e})") from e
        raw = _decode_gif(self.file, self.name)
        if raw.shape != tuple(shape):
            raise DataError(f"{source_name(self.file, self.name)} is {raw.shape[1]}x{raw.shape[0]} but its image "
                            f"{image_name} is {shape[1]}x{shape[0]}")
        if raw.dtype != np.uint8:  # mode '1': booleans
            raw = raw.view(np.uint8)
        return cv2.threshold(raw, 0, value, cv2.THRESH_BINARY, dst=out)[1]


# ------------------------------------------------------------------------------------------ warping

def warp(array: np.ndarray, matrix: np.ndarray, dst_hw: tuple[int, int], out: np.ndarray | None = None,
         border: int = cv2.BORDER_REPLICATE) -> np.ndarray:
    """Bilinear warp by a 3×3 forward matrix; pixels from outside ``array`` follow the cv2 ``border`` mode
    (default: the edge pixels repeated; ``fit_border``). In column strips or whole, as this CPU does such a
    warp faster (``warp_strip``); written into ``out`` when given."""
    h, w = dst_hw
    if out is None:
        out = np.empty((h, w) + array.shape[2:], array.dtype)
    return warp_in_strips(array, matrix, dst_hw, out, border, warp_strip(array.shape, dst_hw))


def _warp_mask255(mask255: np.ndarray, matrix, dst_hw, out=None, border: int = cv2.BORDER_REPLICATE
                  ) -> np.ndarray:
    """A 0/255 mask warped bilinearly and thresholded at one half into a 0/1 mask (in place)."""
    warped = warp(mask255, matrix, dst_hw, out, border)
    cv2.threshold(warped, 127, 1, cv2.THRESH_BINARY, dst=warped)  # ≥ 128 → 1
    return warped


def warp_mask(mask: np.ndarray, matrix: np.ndarray, dst_hw: tuple[int, int], out: np.ndarray | None = None,
              border: int = cv2.BORDER_REPLICATE) -> np.ndarray:
    """Warp a 0/1 mask bilinearly and threshold at one half: binary, and aligned with the image."""
    return _warp_mask255(mask * np.uint8(255), matrix, dst_hw, out, border)


def hue_matrix(degrees: float) -> np.ndarray:
    """3×3 rotation of RGB about the grey axis (1, 1, 1)/√3 by ``degrees``: a hue shift that keeps each
    pixel's mean of R, G and B."""
    a = math.radians(degrees)
    k = np.ones((3, 3)) / 3
    cross = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / math.sqrt(3)  # [n]× for n = (1,1,1)/√3
    return math.cos(a) * np.eye(3) + math.sin(a) * cross + (1 - math.cos(a)) * k


def colour_matrix(p: AugmentParams, mean_rgb) -> np.ndarray | None:
    """The 3×4 matrix [A | b] of the colour jitter, out = A·rgb + b; None for the identity.

    In order: channel permutation P, hue rotation H about the grey axis, greyscale (every channel = the
    grey g = 0.299R + 0.587G + 0.114B), saturation s (mix with g), contrast c about the mean grey m of
    the photo, brightness b scaling m: out = c·S·G·H·P·x + m·(b − c). All of it is linear, so it is one
    matrix and one pass over the pixels whatever is switched on."""
    plain = (p.brightness == p.contrast == p.saturation == 1.0 and p.hue == 0.0 and not p.greyscale
             and tuple(p.channels) == (0, 1, 2))
    if plain:
        return None
    a = np.eye(3)[list(p.channels)]  # row i picks input channel channels[i]
    if p.hue:
        a = hue_matrix(p.hue) @ a
    if p.greyscale:
        a = np.repeat(_GREY[None, :], 3, axis=0) @ a
    a = (p.saturation * np.eye(3) + (1 - p.saturation) * np.repeat(_GREY[None, :], 3, axis=0)) @ a
    mean_grey = float(np.dot(mean_rgb, _GREY))
    m = np.empty((3, 4))
    m[:, :3] = p.contrast * a
    m[:, 3] = mean_grey * (p.brightness - p.contrast)
    return m


def jitter_colour(image: np.ndarray, p: AugmentParams, out: np.ndarray | None = None) -> np.ndarray:
    """Brightness, contrast and saturation jitter of a uint8 RGB image (rounded, saturated to 0..255);
    ``out`` may be ``image`` itself."""
    m = colour_matrix(p, cv2.mean(image)[:3])
    if m is None:
        if out is None or out is image:
            return image
        np.copyto(out, image)
        return out
    return cv2.transform(image, m, dst=out)


# ------------------------------------------------------------------------------------------ both

def soft_mask(mask255: np.ndarray, matrix: np.ndarray, dst_hw: tuple[int, int], out: np.ndarray | None = None,
              border: int = cv2.BORDER_REPLICATE) -> np.ndarray:
    """Each output pixel's car coverage, 0..255, of a full-resolution 0/255 mask warped by ``matrix`` (full
    photo → output). The mask is box-averaged (cv2.INTER_AREA) to the smallest integer shrink still at
    least the output's size, then warped bilinearly from there: coverage, not a sample, so a model pixel
    half on the car reads 128 (a bilinear warp straight from full resolution aliases at a 10× shrink)."""
    full_hw = mask255.shape[:2]
    k = dct_scale(full_hw, dst_hw)
    if k > 1:
        small_hw = (-(-full_hw[0] // k), -(-full_hw[1] // k))
        mask255 = cv2.resize(mask255, (small_hw[1], small_hw[0]), interpolation=cv2.INTER_AREA)
        matrix = matrix @ resize_matrix(small_hw, full_hw)
    return warp(mask255, matrix, dst_hw, out, border)


def load_pair(image: Source, mask: Source | MaskSource | None, dst_hw, params: AugmentParams = AugmentParams(),
              *, name: str | None = None, out_image: np.ndarray | None = None,
              out_mask: np.ndarray | None = None, soft: bool = False, fit: str = "resize"):
    """(image, mask) warped to dst_hw with one composed affine each; mask is None when ``mask`` is.

    ``image`` is the JPEG's path or bytes; ``mask`` its mask's path or bytes (a GIF/PNG) or a
    MaskSource (e.g. an RLE). ``name`` names the example in errors about bytes. The results go into
    ``out_image`` (H×W×3) and ``out_mask`` (H×W) when given. Sizes must agree. The mask is 0/1, or with
    ``soft`` each pixel's car coverage 0..255 (``soft_mask``). ``fit`` ('resize' or 'pad') is how the photo
    meets dst_hw (``fit_matrix``), with its border mode (``fit_border``) for both."""
    photo, full_hw = decode_image(image, dst_hw, name)
    matrix = composed_matrix(params, full_hw, photo.shape[:2], dst_hw, fit)
    border = fit_border(fit)
    out_image = warp(photo, matrix, dst_hw, out_image, border)
    jitter_colour(out_image, params, out=out_image)
    if mask is None:
        return out_image, None
    if not isinstance(mask, MaskSource):
        mask = MaskSource(file=mask, name=name)
    mask255 = mask.decode(full_hw, value=255, image_name=source_name(image, name))
    mask_matrix = composed_matrix(params, full_hw, full_hw, dst_hw, fit)
    if soft:
        return out_image, soft_mask(mask255, mask_matrix, dst_hw, out_mask, border)
    return out_image, _warp_mask255(mask255, mask_matrix, dst_hw, out_mask, border)
