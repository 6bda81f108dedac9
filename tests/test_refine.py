"""The guided filter: its box mean against a brute-force one, the properties that define it, its guide."""
import cv2
import jax
import numpy as np
import pytest

from carvana_jax import photos, postprocess, refine, rle
from carvana_jax.data import augment


def _brute_box_mean(x, r):
    pad = [(0, 0), (r, r), (r, r)] + [(0, 0)] * (x.ndim - 3)
    padded = np.pad(x, pad, mode="symmetric")
    out = np.zeros_like(x, dtype=np.float64)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out += padded[:, dy:dy + x.shape[1], dx:dx + x.shape[2]]
    return out / (2 * r + 1) ** 2


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("channels", [None, 3])
def test_box_mean_is_the_window_mean_with_mirrored_edges(r, channels):
    rng = np.random.default_rng(r)
    x = rng.random((2, 9, 11) + ((channels,) if channels else ())).astype(np.float32)
    np.testing.assert_allclose(refine.box_mean(x, r), _brute_box_mean(x, r), atol=1e-6)
    # cv2's BORDER_REFLECT, the border the filter was measured with
    np.testing.assert_allclose(refine.box_mean(x, r)[0],
                               cv2.boxFilter(x[0], -1, (2 * r + 1, 2 * r + 1), borderType=cv2.BORDER_REFLECT),
                               atol=1e-6)


def test_a_linear_function_of_the_guide_passes_unchanged():
    rng = np.random.default_rng(0)
    guide = rng.random((1, 12, 14, 3)).astype(np.float32)
    p = guide @ np.array([0.3, -0.2, 0.5], np.float32) + 0.1
    np.testing.assert_allclose(refine.guided_filter(guide, p, 2, eps=1e-9), p, atol=2e-3)


def test_a_flat_guide_only_smooths():
    p = np.random.default_rng(1).random((2, 10, 12)).astype(np.float32)
    guide = np.full((2, 10, 12, 3), 0.4, np.float32)
    np.testing.assert_allclose(refine.guided_filter(guide, p, 2), _brute_box_mean(_brute_box_mean(p, 2), 2),
                               atol=1e-5)


def test_the_edge_moves_onto_the_photos_edge():
    """A blurred prediction whose 0.5 level is a pixel right of the photo's colour edge: filtered, the 0.5
    level lies on the photo's edge in every row, and the probability steps up most across it."""
    h, w, edge = 16, 40, 20
    cols = np.arange(w, dtype=np.float32)
    guide = np.zeros((1, h, w, 3), np.float32)
    guide[..., edge:, :] = [0.9, 0.8, 0.7]   # the car starts at column 20
    guide[..., :edge, :] = [0.2, 0.25, 0.3]
    p = np.broadcast_to(1 / (1 + np.exp(-(cols - edge - 0.5) / 1.5)), (1, h, w)).astype(np.float32)
    assert np.all(np.argmax(p > 0.5, axis=-1) == edge + 1)
    q = np.asarray(refine.guided_filter(guide, p, 2))
    assert np.all(np.argmax(q > 0.5, axis=-1) == edge)
    assert np.all(np.argmax(np.diff(q, axis=-1), axis=-1) == edge - 1)
    assert np.all(np.argmax(np.diff(p, axis=-1), axis=-1) != edge - 1)


def test_it_compiles_under_jit_at_the_guide_size():
    probs = np.random.default_rng(2).random((2, 40, 60)).astype(np.float32)
    guide = np.random.default_rng(3).integers(0, 256, (2, 40, 60, 3), dtype=np.uint8)
    got = jax.jit(lambda p, g: refine.refined(p, g, 8))(probs, guide)
    np.testing.assert_allclose(got, refine.guided_filter(guide / 255.0, probs, refine.radius(8)), atol=1e-5)


def test_the_guide_is_the_models_own_decode(tmp_path):
    """The guide's scale is the finest decode the models' inputs are warped from, and its shape that
    decode's: no second decode. The radius stays RADIUS_FULL_PX full-resolution pixels."""
    full = rle.FULL_SHAPE
    assert refine.guide_scale(full, [(256, 384)]) == 4
    assert refine.guide_scale(full, [(128, 192)]) == 8
    assert refine.guide_scale(full, [(128, 192), (256, 384)]) == 4
    assert refine.guide_scale(full, [(1280, 1920)]) == 1  # fit='pad' at full resolution
    photo = np.random.default_rng(4).integers(0, 256, (*full, 3), dtype=np.uint8)
    path = str(tmp_path / "car_01.jpg")
    cv2.imwrite(path, photo)
    for size, k in (((256, 384), 4), ((128, 192), 8)):
        decoded, full_hw = augment.decode_image(path, size)
        assert decoded.shape[:2] == refine.guide_shape(full, k)
        assert refine.radius(k) == max(1, round(refine.RADIUS_FULL_PX / k))
        guide = photos.model_input(decoded, full_hw, refine.guide_shape(full, k))
        assert guide.shape == decoded.shape and guide.dtype == np.uint8


def test_guided_is_a_device_step_of_the_postprocess_spec():
    assert postprocess.parse("clean,guided") == ("guided", "components", "fill")
    assert postprocess.name("fill, guided") == "guided,fill"
    assert postprocess.host_steps("guided,components") == ("components",)
    assert postprocess.host_steps("guided") == ()
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4] = 1
    assert postprocess.apply(mask, "guided") is mask  # nothing for the host to do
