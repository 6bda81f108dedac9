"""Mask clean-up: specks dropped, the car and its nearby parts kept, small holes filled; an independent
implementation (scipy.ndimage) agrees on random masks."""
import cv2
import numpy as np
import pytest
from scipy import ndimage

from carvana_jax import postprocess, rle

FULL = rle.FULL_SHAPE


def _car_scene():
    """A 1280×1918 mask: an elliptical car body, a wheel-sized blob 10 px below it, far-off specks, small
    holes in the body, one big hole and a notch of background reaching the image border."""
    m = np.zeros(FULL, np.uint8)
    cv2.ellipse(m, (960, 640), (700, 300), 0, 0, 360, 1, -1)   # body: ~660 k pixels
    cv2.circle(m, (960, 1040), 90, 1, -1)                      # wheel: ~25 k pixels (< KEEP_FRACTION), 10 px off
    specks = [(50, 50), (80, 1800), (1250, 30), (1200, 1850), (300, 100)]
    for y, x in specks:
        m[y:y + 4, x:x + 5] = 1
    holes = [(500, 700), (700, 1200), (640, 960)]
    for y, x in holes:
        m[y:y + 6, x:x + 7] = 0                                  # 42-pixel holes
    m[560:660, 1300:1400] = 0                                    # a 10 k-pixel hole: bigger than FILL_MAX_AREA
    m[0:400, 950:970] = 0                                        # background cut from the top border into the body
    return m, specks, holes


def test_specks_far_away_go_and_the_car_and_a_nearby_wheel_stay():
    m, specks, _ = _car_scene()
    out = postprocess.apply(m, "components")
    for y, x in specks:
        assert not out[y:y + 4, x:x + 5].any()
    assert out[1040, 960] == 1 and out[640, 400] == 1            # wheel and body
    expected = m.copy()
    for y, x in specks:
        expected[y:y + 4, x:x + 5] = 0
    np.testing.assert_array_equal(out, expected)                 # nothing else changed (holes stay holes)


def test_a_big_far_away_component_is_kept_and_a_small_one_near_the_edge_of_near_px():
    m = np.zeros((200, 300), np.uint8)
    m[20:120, 20:120] = 1                                        # largest: 10 000
    m[20:60, 240:290] = 1                                        # 2 000 = 20 %, far: kept at fraction 0.1
    m[150:153, 60:63] = 1                                        # 31 rows below the largest's last row
    m[125:127, 125:127] = 1                                      # diagonal gap (6, 6): distance 8.49
    out = postprocess.keep_components(m, keep_fraction=0.1, near_px=8.5)
    np.testing.assert_array_equal(out[20:60, 240:290], 1)
    assert not out[150:153, 60:63].any() and out[125:127, 125:127].all()
    out = postprocess.keep_components(m, keep_fraction=0.1, near_px=8.4)
    assert not out[125:127, 125:127].any()
    out = postprocess.keep_components(m, keep_fraction=0.3, near_px=31)
    assert not out[20:60, 240:290].any() and out[150:153, 60:63].all()


def test_small_holes_are_filled_and_big_or_border_touching_background_stays():
    m, _, holes = _car_scene()
    out = postprocess.apply(m, "fill")
    for y, x in holes:
        np.testing.assert_array_equal(out[y:y + 6, x:x + 7], 1)
    assert not out[560:660, 1300:1400].any()                     # big hole
    assert not out[0:400, 950:970].any()                         # reaches the border
    assert not out[0, 0] and not out[30, 30]                     # the outer background
    expected = m.copy()
    for y, x in holes:
        expected[y:y + 6, x:x + 7] = 1
    np.testing.assert_array_equal(out, expected)


def test_clean_is_both_steps_and_a_clean_mask_comes_back_unchanged():
    m, _, _ = _car_scene()
    both = postprocess.apply(m, "clean")
    np.testing.assert_array_equal(both, postprocess.fill_holes(postprocess.keep_components(m)))
    np.testing.assert_array_equal(postprocess.apply(m, "fill,components"), both)
    assert postprocess.apply(both, "clean") is both              # nothing left to do: no copy
    assert postprocess.apply(m, "none") is m
    packed = np.packbits(m.reshape(-1))
    np.testing.assert_array_equal(postprocess.apply_packed(packed, "clean", FULL), np.packbits(both.reshape(-1)))
    clean_packed = np.packbits(both.reshape(-1))
    assert postprocess.apply_packed(clean_packed, "clean", FULL) is clean_packed


def test_parse_and_names():
    assert postprocess.parse("none") == () and postprocess.parse(None) == ()
    assert postprocess.parse("clean") == postprocess.parse("fill, components") == ("components", "fill")
    assert postprocess.name("fill,components") == "components,fill" and postprocess.name("none") == "none"
    assert postprocess.name("fill") == "fill"
    with pytest.raises(ValueError, match="'holes'"):
        postprocess.parse("components,holes")


# ------------------------------------------------------------------------ an independent implementation

EIGHT = np.ones((3, 3), bool)


def _reference_keep(mask, keep_fraction, near_px):
    labels, n = ndimage.label(mask, structure=EIGHT)
    if n <= 1:
        return mask.copy()
    areas = np.bincount(labels.ravel())[1:]
    largest = int(np.argmax(areas)) + 1
    distance = ndimage.distance_transform_edt(labels != largest)  # to the nearest pixel of the largest
    out = np.zeros_like(mask)
    for i in range(1, n + 1):
        if i == largest or areas[i - 1] >= keep_fraction * areas[largest - 1] or \
                distance[labels == i].min() <= near_px:
            out[labels == i] = 1
    return out


def _reference_fill(mask, max_area):
    labels, n = ndimage.label(mask == 0)  # scipy's default structure: 4-connected
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
    out = mask.copy()
    for i in range(1, n + 1):
        if i not in border and (labels == i).sum() < max_area:
            out[labels == i] = 1
    return out


def _random_mask(rng, shape=(48, 72)):
    """Blobs: thresholded smoothed noise, so there are components, holes and diagonal contacts."""
    while True:
        noise = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), 1.5)
        m = (noise > np.quantile(noise, rng.uniform(0.4, 0.75))).astype(np.uint8)
        labels, n = ndimage.label(m, structure=EIGHT)
        areas = np.bincount(labels.ravel())[1:]
        if n >= 3 and (areas == areas.max()).sum() == 1:  # an unambiguous largest component
            return m


@pytest.mark.parametrize("looped", [True, False], ids=["per-component", "whole-image"])
def test_agrees_with_scipy_on_random_masks(looped, monkeypatch):
    if not looped:
        monkeypatch.setattr(postprocess, "MAX_LOOPED", 0)
    rng = np.random.default_rng(0)
    for trial in range(40):
        m = _random_mask(rng)
        fraction, near, area = rng.uniform(0.05, 0.5), rng.uniform(0, 6), int(rng.integers(2, 30))
        np.testing.assert_array_equal(postprocess.keep_components(m, fraction, near),
                                      _reference_keep(m, fraction, near), err_msg=f"trial {trial}")
        np.testing.assert_array_equal(postprocess.fill_holes(m, area), _reference_fill(m, area),
                                      err_msg=f"trial {trial}")
