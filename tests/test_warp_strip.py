"""The warp's strip width: measured once a machine, cached by CPU and OpenCV version, overridable; and a warp in
strips or whole gives the same pixels to OpenCV's rounding."""
import json

import cv2
import numpy as np
import pytest

from carvana_jax.data import warp_strip


PHOTO, MASK, DST = (640, 959, 3), (1280, 1918), (768, 768)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No override, an empty cache home, and the process's choices forgotten (before and after)."""
    monkeypatch.delenv(warp_strip.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(warp_strip, "_chosen", {})
    return tmp_path


def _timings(seconds, calls=None):
    """A stand-in for ``measure`` that returns ``seconds`` (None: fails, as nothing should be measured)."""
    def measure(src_shape, dst_hw, candidates=warp_strip.CANDIDATES, repeats=5):
        if seconds is None:
            raise AssertionError("measured although the choice was known")
        if calls is not None:
            calls.append((tuple(src_shape), tuple(dst_hw)))
        return dict(seconds)
    return measure


def _cached() -> dict:
    with open(warp_strip.cache_path()) as f:
        return json.load(f)


def test_the_fastest_candidate_is_chosen_per_kind_cached_and_read_back_without_measuring(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(warp_strip, "measure", _timings({64: 0.004, 128: 0.0035, 0: 0.003}, calls))
    assert warp_strip.warp_strip(PHOTO, DST) == 0
    assert warp_strip.warp_strip((641, 958, 3), DST) == 0 and len(calls) == 1  # the same kind: asked once
    monkeypatch.setattr(warp_strip, "measure", _timings({64: 0.002, 128: 0.0035, 0: 0.003}, calls))
    assert warp_strip.warp_strip(MASK, DST) == 64 and calls[-1] == (MASK, DST)  # another kind: measured on its shapes
    (machine, kinds), = _cached().items()
    assert warp_strip.cpu_name() in machine and cv2.__version__ in machine
    assert {k: v["strip"] for k, v in kinds.items()} == {warp_strip.kind(PHOTO, DST): 0, warp_strip.kind(MASK, DST): 64}
    monkeypatch.setattr(warp_strip, "_chosen", {})  # another process on this machine
    monkeypatch.setattr(warp_strip, "measure", _timings(None))
    assert (warp_strip.warp_strip(PHOTO, DST), warp_strip.warp_strip(MASK, DST)) == (0, 64)


def test_a_damaged_cache_is_measured_again_and_rewritten(fresh, monkeypatch):
    path = warp_strip.cache_path()
    (fresh / "cache" / "carvana_jax").mkdir(parents=True)
    with open(path, "w") as f:
        f.write('{"truncated": ')
    monkeypatch.setattr(warp_strip, "measure", _timings({64: 0.002, 128: 0.004, 0: 0.005}))
    assert warp_strip.warp_strip(PHOTO, DST) == 64
    assert [v["strip"] for kinds in _cached().values() for v in kinds.values()] == [64]


def test_a_near_tie_keeps_the_default(fresh, monkeypatch):
    monkeypatch.setattr(warp_strip, "measure", _timings({64: 0.0040, 128: 0.0039, 0: 0.0037}))
    assert warp_strip.warp_strip(PHOTO, DST) == warp_strip.DEFAULT  # 7.5% faster is within the margin


def test_a_small_output_keeps_the_default_unmeasured(fresh, monkeypatch):
    monkeypatch.setattr(warp_strip, "measure", _timings(None))
    assert warp_strip.warp_strip((160, 240, 3), (128, 192)) == warp_strip.DEFAULT


def test_the_environment_overrides_and_a_negative_width_is_refused(fresh, monkeypatch):
    monkeypatch.setattr(warp_strip, "measure", _timings(None))
    monkeypatch.setenv(warp_strip.ENV, "32")
    assert warp_strip.warp_strip(PHOTO, DST) == 32
    monkeypatch.setenv(warp_strip.ENV, "-1")
    with pytest.raises(ValueError, match=warp_strip.ENV):
        warp_strip.warp_strip(PHOTO, DST)


def test_kinds_group_sizes_by_power_of_two_and_channels():
    assert warp_strip.kind((640, 959, 3), DST) == warp_strip.kind((650, 950, 3), DST)
    assert warp_strip.kind((640, 959, 3), DST) != warp_strip.kind((640, 959), DST)  # a mask
    assert warp_strip.kind((1280, 1918, 3), DST) != warp_strip.kind((640, 959, 3), DST)


def test_measure_times_every_candidate_on_the_given_shapes():
    seconds = warp_strip.measure((64, 96), (48, 48), repeats=1)
    assert set(seconds) == set(warp_strip.CANDIDATES) and all(0 < s < 5 for s in seconds.values())


@pytest.mark.parametrize("dst", [(768, 768), (50, 63)])
def test_strips_and_one_whole_warp_agree_to_the_rounding(dst):
    rng = np.random.default_rng(1)
    src = cv2.GaussianBlur(rng.integers(0, 256, (300, 451, 3), dtype=np.uint8), (5, 5), 0)
    matrix = np.vstack([cv2.getRotationMatrix2D((225, 150), 3.0, dst[0] / 300), [0, 0, 1]])
    whole = cv2.warpAffine(src, matrix[:2], (dst[1], dst[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    one_call = warp_strip.warp_in_strips(src, matrix, dst, np.empty_like(whole), cv2.BORDER_REPLICATE, 0)
    np.testing.assert_array_equal(one_call, whole)
    strips = warp_strip.warp_in_strips(src, matrix, dst, np.empty_like(whole), cv2.BORDER_REPLICATE, 64)
    diff = np.abs(strips.astype(int) - whole)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_augment_warp_follows_the_choice(monkeypatch):
    from carvana_jax.data import augment
    src = np.random.default_rng(2).integers(0, 256, (120, 180, 3), dtype=np.uint8)
    matrix = np.vstack([cv2.getRotationMatrix2D((90, 60), 3.0, 1.1), [0, 0, 1]])
    whole = cv2.warpAffine(src, matrix[:2], (200, 130), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    monkeypatch.setenv(warp_strip.ENV, "0")
    np.testing.assert_array_equal(augment.warp(src, matrix, (130, 200)), whole)
    monkeypatch.setenv(warp_strip.ENV, "16")
    calls = []
    real = warp_strip.warp_in_strips
    monkeypatch.setattr(augment, "warp_in_strips", lambda *a: calls.append(a[-1]) or real(*a))
    augment.warp(src, matrix, (130, 200))
    assert calls == [16]
