"""Paired augmentation: the matrices, and that the warped photo and mask stay aligned."""
import dataclasses

import cv2
import numpy as np
import pytest
from PIL import Image

from carvana_jax.data import augment
from carvana_jax.errors import DataError
from configs import default

FULL_HW = (1280, 1918)
CAR_RGB = np.array([235, 215, 90], np.uint8)
BACKGROUND_RGB = np.array([25, 45, 70], np.uint8)
NO_JITTER = dict(brightness=1.0, contrast=1.0, saturation=1.0)
# One size per libjpeg DCT scale: 1/8, 1/4, 1/2 and 1 (full decode).
SIZES = [(128, 192), (256, 384), (480, 720), (768, 768)]


def apply(matrix, x, y):
    out = matrix @ np.array([x, y, 1.0])
    return out[:2] / out[2]


# ------------------------------------------------------------------------------- matrices

def test_identity_params_same_size_is_identity():
    p = augment.AugmentParams()
    np.testing.assert_allclose(augment.augment_matrix(p, FULL_HW), np.eye(3), atol=1e-12)
    np.testing.assert_allclose(augment.resize_matrix(FULL_HW, FULL_HW), np.eye(3), atol=1e-12)
    np.testing.assert_allclose(augment.dct_matrix(FULL_HW, FULL_HW), np.eye(3), atol=1e-12)
    np.testing.assert_allclose(augment.composed_matrix(p, FULL_HW, FULL_HW, FULL_HW), np.eye(3), atol=1e-12)


@pytest.mark.parametrize("src,dst", [((1280, 1918), (128, 192)), ((1280, 1918), (768, 768)),
                                     ((10, 20), (30, 50)), ((7, 3), (7, 3))])
def test_resize_matrix_maps_pixel_centres(src, dst):
    m = augment.resize_matrix(src, dst)
    (sh, sw), (dh, dw) = src, dst
    sy, sx = dh / sh, dw / sw
    # The first pixel's centre (0, 0) sits half a source pixel in, i.e. s/2 destination pixels
    # from the image's edge at -0.5.
    np.testing.assert_allclose(apply(m, 0, 0), [sx / 2 - 0.5, sy / 2 - 0.5], atol=1e-9)
    np.testing.assert_allclose(apply(m, sw - 1, sh - 1), [dw - sx / 2 - 0.5, dh - sy / 2 - 0.5], atol=1e-9)
    # The image's outer edges map onto the outer edges, and its centre onto the centre.
    np.testing.assert_allclose(apply(m, -0.5, -0.5), [-0.5, -0.5], atol=1e-9)
    np.testing.assert_allclose(apply(m, sw - 0.5, sh - 0.5), [dw - 0.5, dh - 0.5], atol=1e-9)
    np.testing.assert_allclose(apply(m, (sw - 1) / 2, (sh - 1) / 2), [(dw - 1) / 2, (dh - 1) / 2], atol=1e-9)


def test_dct_matrix_maps_decoded_pixels_to_the_centre_of_their_block():
    m = augment.dct_matrix((160, 240), FULL_HW)  # a 1/8 decode
    # Decoded pixel (i, j) averages full pixels [8i, 8i+8) x [8j, 8j+8), centre 8i + 3.5.
    for i, j in [(0, 0), (5, 17), (159, 239)]:
        np.testing.assert_allclose(apply(m, j, i), [8 * j + 3.5, 8 * i + 3.5], atol=1e-9)
    m = augment.dct_matrix((640, 959), FULL_HW)  # a 1/2 decode (1918 / 2 = 959)
    np.testing.assert_allclose(apply(m, 10, 3), [20.5, 6.5], atol=1e-9)  # [20, 22) x [6, 8)


def test_augment_matrix_geometry():
    h, w = FULL_HW
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    # Flip: about the centre, so column x goes to column w-1-x.
    m = augment.augment_matrix(augment.AugmentParams(hflip=True), FULL_HW)
    np.testing.assert_allclose(apply(m, 0, 7), [w - 1, 7], atol=1e-9)
    np.testing.assert_allclose(apply(m, 100, 9), [w - 101, 9], atol=1e-9)
    # Shift: fractions of width and height.
    m = augment.augment_matrix(augment.AugmentParams(shift_x=0.1, shift_y=-0.25), FULL_HW)
    np.testing.assert_allclose(apply(m, *c), c + [0.1 * w, -0.25 * h], atol=1e-9)
    # Zoom: distances from the centre scale, the centre stays.
    m = augment.augment_matrix(augment.AugmentParams(zoom=1.5), FULL_HW)
    np.testing.assert_allclose(apply(m, *c), c, atol=1e-9)
    np.testing.assert_allclose(apply(m, *(c + [100, -40])), c + [150, -60], atol=1e-9)
    # Rotation: keeps the centre and distances; turns a vector by the angle in degrees.
    m = augment.augment_matrix(augment.AugmentParams(rotation=30.0), FULL_HW)
    np.testing.assert_allclose(apply(m, *c), c, atol=1e-9)
    v = apply(m, *(c + [200, 0])) - c
    np.testing.assert_allclose(np.hypot(*v), 200, atol=1e-9)
    np.testing.assert_allclose(np.degrees(abs(np.arctan2(v[1], v[0]))), 30.0, atol=1e-9)
    # Shear (radians): horizontal, proportional to the distance below the centre.
    m = augment.augment_matrix(augment.AugmentParams(shear=0.1), FULL_HW)
    np.testing.assert_allclose(apply(m, *(c + [0, 100])), c + [100 * np.tan(0.1), 100], atol=1e-9)


def test_composed_matrix_is_dct_then_augment_then_resize():
    p = augment.AugmentParams(zoom=1.1, shear=0.03, rotation=-4.0, shift_x=0.05, shift_y=-0.02, hflip=True)
    src, dst = (160, 240), (128, 192)
    composed = augment.composed_matrix(p, FULL_HW, src, dst)
    rng = np.random.default_rng(0)
    for x, y in rng.uniform(0, 150, size=(5, 2)):
        step = apply(augment.dct_matrix(src, FULL_HW), x, y)  # decoded → full photo
        step = apply(augment.augment_matrix(p, FULL_HW), *step)  # augmented full photo
        step = apply(augment.resize_matrix(FULL_HW, dst), *step)  # → model size
        np.testing.assert_allclose(apply(composed, x, y), step, atol=1e-9)


# ------------------------------------------------------------------------------- photos

def shape_mask(hw=FULL_HW) -> np.ndarray:
    """An off-centre ellipse plus a rectangle: no left-right or up-down symmetry."""
    h, w = hw
    yy, xx = np.mgrid[:h, :w]
    sy, sx = h / 1280, w / 1918
    mask = ((xx - 760 * sx) / (520 * sx)) ** 2 + ((yy - 560 * sy) / (300 * sy)) ** 2 < 1
    mask |= (xx > 1150 * sx) & (xx < 1650 * sx) & (yy > 700 * sy) & (yy < 1050 * sy)
    return mask.astype(np.uint8)


def write_gif(path, mask: np.ndarray) -> None:
    gif = Image.fromarray(mask.astype(np.uint8), mode="P")
    gif.putpalette([0, 0, 0, 255, 255, 255])  # index 0 = background, 1 = car, as Carvana's GIFs
    gif.save(path)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """(jpeg path, gif path, full-res mask): the photo's colours encode the mask."""
    folder = tmp_path_factory.mktemp("augment")
    mask = shape_mask()
    image = np.where(mask[..., None].astype(bool), CAR_RGB, BACKGROUND_RGB).astype(np.uint8)
    jpeg, gif = folder / "abc_01.jpg", folder / "abc_01_mask.gif"
    Image.fromarray(image).save(jpeg, quality=95)
    write_gif(gif, mask)
    return str(jpeg), str(gif), mask


def car_pixels(image: np.ndarray) -> np.ndarray:
    """Where the photo shows the car: its grey value thresholded halfway between the two colours."""
    threshold = (CAR_RGB.mean() + BACKGROUND_RGB.mean()) / 2
    return image.astype(np.float32).mean(-1) > threshold


def iou(a, b) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return (a & b).sum() / (a | b).sum()


def centroid(b) -> np.ndarray:
    ys, xs = np.nonzero(b)
    return np.array([ys.mean(), xs.mean()])


def random_params(rng, hflip: bool) -> augment.AugmentParams:
    return augment.AugmentParams(
        zoom=rng.uniform(0.85, 1.15), shear=rng.uniform(-0.1, 0.1), rotation=rng.uniform(-10, 10),
        shift_x=rng.uniform(-0.08, 0.08), shift_y=rng.uniform(-0.08, 0.08), hflip=hflip, **NO_JITTER)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("hflip", [False, True])
def test_image_and_mask_stay_aligned(photo, size, hflip):
    jpeg, gif, _ = photo
    rng = np.random.default_rng(hash((size, hflip)) % 2**32)
    params = random_params(rng, hflip)
    image, mask = augment.load_pair(jpeg, gif, size, params)
    seen = car_pixels(image)
    assert 0.1 < seen.mean() < 0.9  # the shape is in view, not warped away
    assert iou(seen, mask) >= 0.97
    # A sub-pixel check: a half-pixel slip (e.g. a DCT-scale decode taken to start at the block's
    # corner rather than its centre) moves the image's shape ~0.4 px against the mask's at 128x192,
    # while the IoU would barely notice.
    np.testing.assert_allclose(centroid(seen), centroid(mask), atol=0.15)

    # Controls: the same comparison against masks warped with slightly different parameters must
    # fail clearly, so the thresholds above can catch a misalignment.
    for wrong in (dataclasses.replace(params, hflip=not hflip),
                  dataclasses.replace(params, shift_x=params.shift_x + 0.02),
                  dataclasses.replace(params, rotation=params.rotation + 3.0)):
        _, wrong_mask = augment.load_pair(jpeg, gif, size, wrong)
        assert iou(seen, wrong_mask) < 0.95


def test_warp_geometry_against_independent_operations(photo):
    """Identity params = plain bilinear resize; a flip = np.fliplr of that; a shift = moved columns."""
    jpeg, gif, full_mask = photo
    size = (128, 192)
    _, plain = augment.load_pair(jpeg, gif, size)
    resized = cv2.resize(full_mask * np.uint8(255), (size[1], size[0]), interpolation=cv2.INTER_LINEAR) >= 128
    assert (plain == resized).mean() > 0.999
    _, flipped = augment.load_pair(jpeg, gif, size, augment.AugmentParams(hflip=True))
    assert (flipped == plain[:, ::-1]).mean() > 0.999
    # shift_x = 10/192 of the width moves everything 10 model pixels to the right.
    _, shifted = augment.load_pair(jpeg, gif, size, augment.AugmentParams(shift_x=10 / 192))
    assert (shifted[:, 10:] == plain[:, :-10]).mean() > 0.999
    assert (shifted != plain).mean() > 0.01


@pytest.mark.parametrize("size", [(128, 192), (768, 768), (100, 100)])
def test_output_types_and_values(photo, size):
    jpeg, gif, _ = photo
    params = random_params(np.random.default_rng(3), hflip=True)
    image, mask = augment.load_pair(jpeg, gif, size, params)
    assert image.shape == (*size, 3) and image.dtype == np.uint8
    assert mask.shape == size and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 1}
    image_only, none = augment.load_pair(jpeg, None, size, params)
    assert none is None
    np.testing.assert_array_equal(image_only, image)


def test_decode_mask_reads_palette_index_one_as_car(photo):
    _, gif, full_mask = photo
    mask = augment.decode_mask(gif)
    assert mask.dtype == np.uint8 and mask.shape == FULL_HW
    np.testing.assert_array_equal(mask, full_mask)


@pytest.mark.parametrize("target,expected", [((128, 192), (160, 240)),   # 1/8: ceil(1280/8), ceil(1918/8)
                                             ((256, 384), (320, 480)),   # 1/4
                                             ((480, 720), (640, 959)),   # 1/2
                                             ((768, 768), (1280, 1918))])  # 1280 // 768 = 1: full
def test_decode_image_uses_reduced_dct_scale(photo, target, expected):
    jpeg, _, _ = photo
    image, full_hw = augment.decode_image(jpeg, target)
    assert full_hw == FULL_HW
    assert image.shape == (*expected, 3) and image.dtype == np.uint8
    assert image.shape[0] >= target[0] and image.shape[1] >= target[1]
    if target == (128, 192):
        assert image.shape[:2] < FULL_HW


def test_colour_jitter_changes_image_never_mask(photo):
    jpeg, gif, _ = photo
    base = random_params(np.random.default_rng(5), hflip=False)
    plain_image, plain_mask = augment.load_pair(jpeg, gif, (128, 192), base)
    for jitter in (dict(brightness=1.1), dict(contrast=0.9), dict(saturation=1.1),
                   dict(brightness=0.9, contrast=1.1, saturation=0.9)):
        image, mask = augment.load_pair(jpeg, gif, (128, 192), dataclasses.replace(base, **jitter))
        assert np.abs(image.astype(int) - plain_image).mean() > 1.0, jitter
        np.testing.assert_array_equal(mask, plain_mask)
    # Saturation 0 leaves grey only.
    grey = augment.jitter_colour(plain_image, dataclasses.replace(base, saturation=0.0))
    assert np.abs(grey.astype(int) - grey[..., :1]).max() <= 1


def test_sample_params_disabled_is_identity():
    cfg = default.get_config().augment
    cfg.enabled = False
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert augment.sample_params(rng, cfg) == augment.AugmentParams()


def test_sample_params_within_configured_ranges():
    cfg = default.get_config().augment
    cfg.zoom, cfg.shear, cfg.rotation, cfg.shift, cfg.hflip = 0.2, 0.07, 12.0, 0.1, 0.3
    cfg.brightness, cfg.contrast, cfg.saturation = 0.15, 0.25, 0.05
    rng = np.random.default_rng(0)
    draws = [augment.sample_params(rng, cfg) for _ in range(400)]

    def check(values, low, high):
        values = np.array(values, np.float64)
        assert values.min() >= low and values.max() <= high
        # Spread over the range, not stuck at a value.
        assert values.min() < low + 0.2 * (high - low) and values.max() > high - 0.2 * (high - low)

    check([d.zoom for d in draws], 0.8, 1.2)
    check([d.shear for d in draws], -0.07, 0.07)
    check([d.rotation for d in draws], -12.0, 12.0)
    check([d.shift_x for d in draws], -0.1, 0.1)
    check([d.shift_y for d in draws], -0.1, 0.1)
    check([d.brightness for d in draws], 0.85, 1.15)
    check([d.contrast for d in draws], 0.75, 1.25)
    check([d.saturation for d in draws], 0.95, 1.05)
    assert np.corrcoef([d.shift_x for d in draws], [d.shift_y for d in draws])[0, 1] < 0.5
    flips = np.mean([d.hflip for d in draws])
    assert 0.22 < flips < 0.38
    # Same seed, same draws.
    again = np.random.default_rng(0)
    assert [augment.sample_params(again, cfg) for _ in range(400)] == draws


# ------------------------------------------------------------------------------- decoding fast paths

@pytest.mark.parametrize("target", [(128, 192), (256, 384), (480, 720), (768, 768)])
def test_opencv_decode_equals_pil_draft_decode(photo, target):
    """The OpenCV decode (libjpeg-turbo, reduced DCT scale) gives PIL's draft-mode pixels exactly."""
    jpeg, _, _ = photo
    with Image.open(jpeg) as im:
        im.draft("RGB", (target[1], target[0]))
        expected = np.asarray(im.convert("RGB"))
    image, _ = augment.decode_image(jpeg, target)
    np.testing.assert_array_equal(image, expected)


def test_decode_from_bytes_equals_decode_from_path(photo):
    jpeg, gif, _ = photo
    with open(jpeg, "rb") as f:
        jpeg_bytes = f.read()
    with open(gif, "rb") as f:
        gif_bytes = f.read()
    for size in ((128, 192), (768, 768)):
        a, hw_a = augment.decode_image(jpeg, size)
        b, hw_b = augment.decode_image(jpeg_bytes, size, name="abc_01")
        np.testing.assert_array_equal(a, b)
        assert hw_a == hw_b == FULL_HW
    np.testing.assert_array_equal(augment.decode_mask(gif), augment.decode_mask(gif_bytes))
    params = random_params(np.random.default_rng(9), hflip=True)
    for x, y in zip(augment.load_pair(jpeg, gif, (96, 128), params),
                    augment.load_pair(jpeg_bytes, gif_bytes, (96, 128), params, name="abc_01")):
        np.testing.assert_array_equal(x, y)


def test_errors_about_bytes_name_the_example(photo):
    jpeg, _, _ = photo
    with open(jpeg, "rb") as f:
        data = f.read()
    for bad in (data[: len(data) // 2], data[:100], b"not a photo at all"):
        with pytest.raises(DataError, match="car_07") as e:
            augment.decode_image(bad, (128, 192), name="car_07")
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="car_07 mask"):
        augment.decode_mask(b"GIF89a not really", name="car_07 mask")


def test_jpeg_header_reads_the_size_without_decoding(photo, tmp_path):
    jpeg, gif, _ = photo
    with open(jpeg, "rb") as f:
        assert augment.jpeg_header(f.read()) == FULL_HW
    with open(gif, "rb") as f:
        assert augment.jpeg_header(f.read()) is None
    # A photo that is no JPEG still decodes (through PIL, at full scale).
    png = tmp_path / "abc_01.png"
    Image.fromarray(np.full((40, 60, 3), 7, np.uint8)).save(png)
    image, hw = augment.decode_image(str(png), (20, 30))
    assert hw == (40, 60) and image.shape == (40, 60, 3) and (image == 7).all()


@pytest.mark.parametrize("full,target,k", [((1280, 1918), (128, 192), 8), ((1280, 1918), (160, 239), 8),
                                           ((1280, 1918), (160, 240), 4), ((1280, 1918), (640, 959), 2),
                                           ((1280, 1918), (641, 959), 1), ((1280, 1918), (768, 768), 1),
                                           ((1280, 1918), (2000, 3000), 1), ((8, 8), (1, 1), 8)])
def test_dct_scale_keeps_the_decode_at_least_the_target(full, target, k):
    """PIL draft()'s rule: k ≤ full // target on both axes (so 1918 // 240 = 7 gives 1/4, not 1/8)."""
    assert augment.dct_scale(full, target) == k
    assert -(-full[0] // k) >= min(target[0], full[0]) and -(-full[1] // k) >= min(target[1], full[1])


def test_mask_from_rle_equals_mask_from_gif(photo):
    from carvana_jax import rle
    _, gif, full_mask = photo
    text = rle.encode(full_mask)
    for value in (1, 255):
        from_rle = augment.MaskSource(rle=text).decode(FULL_HW, value=value)
        from_gif = augment.MaskSource(file=gif).decode(FULL_HW, value=value)
        np.testing.assert_array_equal(from_rle, from_gif)
        np.testing.assert_array_equal(from_rle, full_mask * np.uint8(value))
    with pytest.raises(DataError, match="x_01 mask.*RLE"):
        augment.MaskSource(rle="3 4 5", name="x_01 mask").decode(FULL_HW)


def old_jitter(image, p):
    """The float32 NumPy colour jitter the cv2.transform version replaced (it truncated)."""
    x = image.astype(np.float32)
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = grey[..., None] + p.saturation * (x - grey[..., None])
    x = (x - grey.mean()) * p.contrast + grey.mean() * p.brightness
    return np.clip(x, 0, 255)


def test_colour_matrix_jitter_equals_the_formula():
    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for jitter in (dict(brightness=1.1), dict(contrast=0.85), dict(saturation=1.2),
                   dict(brightness=0.9, contrast=1.1, saturation=0.9), dict(brightness=1.3, contrast=1.4)):
        p = augment.AugmentParams(**jitter)
        expected = old_jitter(image, p)
        got = augment.jitter_colour(image, p)
        assert got.dtype == np.uint8 and got.shape == image.shape
        error = np.abs(got - expected)  # OpenCV rounds (in fixed point): within one level
        assert error.max() <= 1.0 and error.mean() <= 0.5
        again = image.copy()
        assert augment.jitter_colour(again, p, out=again) is again  # in place
        np.testing.assert_array_equal(again, got)
    assert augment.jitter_colour(image, augment.AugmentParams()) is image


@pytest.mark.parametrize("dst", [(768, 768), (128, 192), (50, 63)])
def test_strip_warp_equals_one_whole_warp(photo, dst):
    jpeg, _, _ = photo
    image, full_hw = augment.decode_image(jpeg, dst)
    params = random_params(np.random.default_rng(4), hflip=True)
    matrix = augment.composed_matrix(params, full_hw, image.shape[:2], dst)
    whole = cv2.warpAffine(image, matrix[:2], (dst[1], dst[0]), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
    strips = augment.warp(image, matrix, dst)
    diff = np.abs(strips.astype(int) - whole)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # OpenCV's fixed-point rounding, now and then
    out = np.empty_like(whole)
    assert augment.warp(image, matrix, dst, out) is out
    np.testing.assert_array_equal(out, strips)


def test_load_pair_writes_into_given_arrays(photo):
    jpeg, gif, _ = photo
    params = random_params(np.random.default_rng(2), hflip=False)
    image, mask = augment.load_pair(jpeg, gif, (64, 96), params)
    out_image, out_mask = np.empty_like(image), np.empty_like(mask)
    got = augment.load_pair(jpeg, gif, (64, 96), params, out_image=out_image, out_mask=out_mask)
    assert got[0] is out_image and got[1] is out_mask
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask)


# ------------------------------------------------------------------------------- colour robustness

def test_hue_rotation_by_120_degrees_cycles_the_channels_and_keeps_grey():
    # A rotation by 120° about the grey axis maps R → G → B → R; any rotation leaves greys alone.
    np.testing.assert_allclose(augment.hue_matrix(120.0) @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(augment.hue_matrix(120.0) @ [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], atol=1e-12)
    for degrees in (7.0, -33.0):
        np.testing.assert_allclose(augment.hue_matrix(degrees) @ [0.4, 0.4, 0.4], [0.4, 0.4, 0.4], atol=1e-12)
        rgb = np.array([0.9, 0.2, 0.1])
        assert (augment.hue_matrix(degrees) @ rgb).sum() == pytest.approx(rgb.sum())
        assert np.linalg.norm(augment.hue_matrix(degrees) @ rgb) == pytest.approx(np.linalg.norm(rgb))


def test_greyscale_and_channel_shuffle_equal_their_numpy_versions():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    shuffled = augment.jitter_colour(image, augment.AugmentParams(channels=(2, 0, 1)))
    np.testing.assert_array_equal(shuffled, image[..., [2, 0, 1]])
    grey = augment.jitter_colour(image, augment.AugmentParams(greyscale=True))
    expected = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(grey.astype(float) - expected[..., None]).max() <= 1.0
    # Hue with everything else: one matrix equals the steps done one after another (within rounding).
    p = augment.AugmentParams(hue=40.0, channels=(1, 2, 0), contrast=1.2, brightness=0.9)
    step = image[..., [1, 2, 0]].astype(np.float64) @ augment.hue_matrix(40.0).T
    m = float(image.reshape(-1, 3).mean(0) @ np.array([0.299, 0.587, 0.114]))
    expected = (step - m) * 1.2 + m * 0.9
    got = augment.jitter_colour(image, p).astype(float)
    inside = (step.min(-1) > 0) & (expected.max(-1) < 255) & (expected.min(-1) > 0)  # no clipping on the way
    assert np.abs(got - expected)[inside].max() <= 1.0


def test_colour_draws_only_when_asked_and_within_range():
    cfg = default.get_config().augment
    plain = [augment.sample_params(np.random.default_rng(1), cfg) for _ in range(3)]
    assert all(p.hue == 0 and not p.greyscale and p.channels == (0, 1, 2) for p in plain)
    cfg.hue, cfg.greyscale, cfg.channel_shuffle = 30.0, 0.25, 0.5
    rng = np.random.default_rng(0)
    draws = [augment.sample_params(rng, cfg) for _ in range(400)]
    hues = np.array([d.hue for d in draws])
    assert hues.min() >= -30 and hues.max() <= 30 and hues.max() - hues.min() > 45
    assert 0.17 < np.mean([d.greyscale for d in draws]) < 0.33
    shuffled = [d.channels for d in draws if d.channels != (0, 1, 2)]
    assert 0.3 < len(shuffled) / len(draws) < 0.5  # 0.5 × 5/6 of the permutations move a channel
    assert all(sorted(c) == [0, 1, 2] for c in shuffled)


# ------------------------------------------------------------------------------- soft masks

def test_soft_mask_is_the_box_average_at_an_integer_shrink():
    rng = np.random.default_rng(0)
    mask = (rng.random((64, 96)) < 0.5).astype(np.uint8) * 255
    matrix = augment.composed_matrix(augment.AugmentParams(), (64, 96), (64, 96), (8, 12))
    soft = augment.soft_mask(mask, matrix, (8, 12))
    expected = mask.reshape(8, 8, 12, 8).mean(axis=(1, 3))
    assert np.abs(soft.astype(float) - expected).max() <= 1.0


def test_soft_mask_reads_coverage_at_an_edge_and_agrees_with_the_hard_mask():
    # A vertical edge through the middle of output column 5 (of 12, from 96 px): coverage ~ one half there.
    mask = np.zeros((64, 96), np.uint8)
    mask[:, 44:] = 255  # output column 5 covers source columns 40..47
    matrix = augment.composed_matrix(augment.AugmentParams(), (64, 96), (64, 96), (8, 12))
    soft = augment.soft_mask(mask, matrix, (8, 12)).astype(int)
    assert abs(soft[:, 5] - 128).max() <= 2
    assert (soft[:, :5] == 0).all() and (soft[:, 6:] == 255).all()
    # With an augmentation, the soft mask thresholded at one half is the hard mask but for edge pixels.
    p = augment.AugmentParams(zoom=1.1, rotation=4.0, shift_x=0.03, hflip=True)
    big = np.zeros((640, 960), np.uint8)
    cv2.circle(big, (480, 320), 200, 255, -1)
    m = augment.composed_matrix(p, (640, 960), (640, 960), (64, 96))
    soft, hard = augment.soft_mask(big, m, (64, 96)), augment.warp_mask(big // 255, m, (64, 96))
    assert ((soft >= 128) != hard.astype(bool)).mean() < 0.01
    assert ((soft > 0) & (soft < 255)).sum() > 50  # the edge is soft


def test_load_pair_soft_masks_keep_the_image(photo):
    jpeg, gif, _ = photo
    image, hard = augment.load_pair(jpeg, gif, (32, 48))
    image2, soft = augment.load_pair(jpeg, gif, (32, 48), soft=True)
    np.testing.assert_array_equal(image, image2)
    assert soft.dtype == np.uint8 and soft.max() > 1 and ((soft >= 128) == hard.astype(bool)).mean() > 0.97
