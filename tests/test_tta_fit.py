"""Test-time augmentation views, and fit='pad': the 1918-wide photo padded to 1920 and the prediction cropped back
with no resampling anywhere."""
import functools

import jax
import numpy as np
import pytest
from jax import lax

from carvana_jax import inference, parallel, predict, rle
from carvana_jax.data import augment, kaggle, pipeline
from carvana_jax.models import unet
from configs import default

FULL = rle.FULL_SHAPE          # (1280, 1918)
PADDED = (1280, 1920)
SIZE = (64, 96)


@pytest.fixture(scope="module")
def model():
    """A random 3-level U-Net (input multiple 8) and its variables: nothing in it is mirror- or shift-symmetric."""
    net = unet.UNet(features=4, depth=3)
    shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), np.zeros((1, *SIZE, 3), np.float32),
                                             train=False))  # shapes only: nothing to compile
    rng = np.random.default_rng(3)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            return (rng.standard_normal(leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:-1]))).astype(leaf.dtype)
        return np.ones(leaf.shape, leaf.dtype) if ("var" in name or "scale" in name) else np.zeros(leaf.shape,
                                                                                                 leaf.dtype)
    return net.apply, jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (2, *SIZE, 3), dtype=np.uint8)


def _probs(apply_fn, variables, x):
    return np.asarray(jax.jit(lambda v, z: jax.nn.sigmoid(apply_fn(v, z, train=False)))(variables, x))


def _np_shift(x, dy, dx):
    """out[i, j] = x[i - dy, j - dx], edge rows/columns repeated (the numpy way)."""
    a, b = abs(dy), abs(dx)
    pad = [(0, 0), (a, a), (b, b)] + [(0, 0)] * (x.ndim - 3)
    return np.pad(x, pad, mode="edge")[:, a - dy:a - dy + x.shape[1], b - dx:b - dx + x.shape[2]]


def test_tta_specs():
    assert inference.parse_tta("none") == () and inference.parse_tta(None) == ()
    assert inference.parse_tta("scale, hflip") == ("hflip", "scale")
    assert inference.tta_name("shift,hflip") == "hflip,shift" and inference.tta_name("none") == "none"
    assert len(inference.tta_views("hflip,shift,scale")) == 5  # plus the plain view: 6 forward passes
    assert len(inference.tta_views("phase")) == 1 and len(inference.tta_views("hflip,phase")) == 3  # both phases mirrored
    with pytest.raises(ValueError, match="'vflip'"):
        inference.parse_tta("hflip,vflip")


def test_shift_moves_content_and_repeats_the_edges():
    x = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    got = np.asarray(inference.shift(x, 2, -3))
    np.testing.assert_array_equal(got[:, 2:, :4], x[:, :3, 3:])
    np.testing.assert_array_equal(got[:, 0], got[:, 2])        # rows above the moved content: its first row
    np.testing.assert_array_equal(got[:, :, 6], got[:, :, 3])  # columns right of it: its last column
    np.testing.assert_array_equal(got, _np_shift(x, 2, -3))


def test_hflip_tta_equals_the_old_mean_with_the_mirrored_prediction(model, images):
    apply_fn, variables = model
    x = images.astype(np.float32) / 255
    old = (_probs(apply_fn, variables, x) + _probs(apply_fn, variables, x[:, :, ::-1])[:, :, ::-1]) / 2
    new = np.asarray(jax.jit(functools.partial(inference.predict_probs, apply_fn=apply_fn, tta="hflip"))(variables, images))
    compat = np.asarray(jax.jit(functools.partial(inference.predict_probs, apply_fn=apply_fn, hflip_tta=True))(
        variables, images))
    np.testing.assert_allclose(new, old, atol=1e-6)
    np.testing.assert_array_equal(new, compat)
    plain = np.asarray(jax.jit(functools.partial(inference.predict_probs, apply_fn=apply_fn))(variables, images))
    assert np.abs(plain - new).max() > 1e-3  # the view changes something


def test_tta_is_the_mean_of_each_views_own_prediction(model, images):
    apply_fn, variables = model
    x = images.astype(np.float32) / 255
    views = [_probs(apply_fn, variables, x),
             _probs(apply_fn, variables, x[:, :, ::-1])[:, :, ::-1]]
    k = inference.SHIFT_PX
    for d in (k, -k):
        views.append(_np_shift(_probs(apply_fn, variables, _np_shift(x, d, d)), -d, -d))
    # 64x96 at input multiple 8: 0.9x -> 57.6x86.4 -> 56x88, 1.1x -> 70.4x105.6 -> 72x104.
    assert inference.SCALES == (0.9, 1.1)
    for size in ((56, 88), (72, 104)):
        z = np.asarray(jax.image.resize(x, (2, *size, 3), "bilinear"))
        views.append(np.asarray(jax.image.resize(_probs(apply_fn, variables, z), (2, *SIZE), "bilinear")))
    fn = jax.jit(functools.partial(inference.predict_probs, apply_fn=apply_fn, tta="hflip,shift,scale", multiple=8))
    got = np.asarray(fn(variables, images))
    np.testing.assert_allclose(got, np.mean(views, axis=0), atol=2e-6)
    for names, chosen in (("shift", [0, 2, 3]), ("scale", [0, 4, 5])):
        fn = jax.jit(functools.partial(inference.predict_probs, apply_fn=apply_fn, tta=names, multiple=8))
        np.testing.assert_allclose(np.asarray(fn(variables, images)), np.mean([views[i] for i in chosen], axis=0),
                                   atol=2e-6)


def test_phase_tta_is_the_mean_of_both_phases_in_both_orientations(model, images):
    apply_fn, variables = model
    x = images.astype(np.float32) / 255
    d = inference.PHASE_PX
    flip = (lambda z: z[:, :, ::-1])
    plain = _probs(apply_fn, variables, x)
    mirrored = flip(_probs(apply_fn, variables, flip(x)))
    moved = _np_shift(_probs(apply_fn, variables, _np_shift(x, d, d)), -d, -d)
    moved_mirrored = flip(_np_shift(_probs(apply_fn, variables, _np_shift(flip(x), d, d)), -d, -d))
    for spec, chosen in (("phase", [plain, moved]), ("hflip,phase", [plain, mirrored, moved, moved_mirrored])):
        got = np.asarray(jax.jit(functools.partial(inference.predict_probs, apply_fn=apply_fn, tta=spec))(variables, images))
        np.testing.assert_allclose(got, np.mean(chosen, axis=0), atol=2e-6)
    assert np.abs(moved - plain).max() > 1e-3  # the moved view is another prediction


def test_ensemble_with_tta_thresholds_the_upsampled_tta_mean(model, kaggle_dir):
    apply_fn, variables = model
    mesh = parallel.make_mesh()
    config = default.get_config()
    config.update(data_dir=kaggle_dir, image_size=SIZE, num_workers=0)
    records = kaggle.index_test(kaggle_dir)[:4]
    batch = next(iter(pipeline.eval_dataset(records, config, 4, 0)))["image"]
    probs = np.asarray(jax.jit(lambda v, z: inference.upsample(inference.predict_probs(
        v, z, apply_fn, tta="shift,scale", multiple=8)))(variables, batch))
    threshold = float(np.median(probs))
    ensemble = predict.Ensemble([predict.Member(parallel.replicate(variables, mesh), apply_fn, SIZE, multiple=8)],
                                mesh, threshold, tta="scale,shift")
    assert ensemble.tta_name == "shift,scale"
    got = np.stack([m for _, m in ensemble.masks(records, config)])
    assert np.mean(got != (probs > threshold)) < 1e-5  # up to probabilities sitting on the threshold


# ------------------------------------------------------------------------------------------ fit='pad'

def _train_photo(kaggle_dir, i=0):
    record = kaggle.index_train(kaggle_dir)[i]
    photo, full_hw = augment.decode_image(record.image_path, FULL)  # a full-scale decode
    assert full_hw == FULL == photo.shape[:2]
    return record, photo, augment.decode_mask(record.mask_path)


def test_pad_fit_matrix_offsets_and_checks():
    assert augment.pad_offsets(FULL, PADDED) == (0, 1)
    np.testing.assert_array_equal(augment.fit_matrix(FULL, PADDED, "pad"), [[1, 0, 1], [0, 1, 0], [0, 0, 1]])
    p = augment.AugmentParams(zoom=1.05, rotation=3.0, hflip=True)
    np.testing.assert_allclose(augment.composed_matrix(p, FULL, FULL, PADDED, "pad"),
                               augment.fit_matrix(FULL, PADDED, "pad") @ augment.augment_matrix(p, FULL))
    assert augment.PAD_BORDER == __import__("cv2").BORDER_REFLECT
    for bad in ((768, 768), (1280, 1918 + 64), (1216, 1920)):
        with pytest.raises(ValueError, match="fit='pad'"):
            augment.fit_matrix(FULL, bad, "pad")
    with pytest.raises(ValueError, match="fit must be"):
        augment.check_fit(FULL, PADDED, "crop")
    with pytest.raises(ValueError, match="fit='pad'"):
        predict.Ensemble([predict.Member(None, None, (768, 768), "pad")], parallel.make_mesh())


def test_padded_warp_is_np_pad_symmetric_exactly():
    """BORDER_REFLECT is np.pad's 'symmetric' (on a random array, with pads wider than one pixel too)."""
    a = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    got = augment.warp(a, augment.fit_matrix((5, 7), (6, 10), "pad"), (6, 10), border=augment.fit_border("pad"))
    np.testing.assert_array_equal(got, np.pad(a, ((0, 1), (1, 2), (0, 0)), mode="symmetric"))


def test_eval_and_train_images_and_masks_are_the_photo_padded_exactly(kaggle_dir):
    record, photo, mask = _train_photo(kaggle_dir)
    expected = np.pad(photo, ((0, 0), (1, 1), (0, 0)), mode="symmetric")
    item = pipeline.LoadForEval(PADDED, fit="pad").map_with_index(0, record)
    np.testing.assert_array_equal(item["image"], expected)
    np.testing.assert_array_equal(item["mask_full"], mask)
    both = pipeline.LoadAtSizes([PADDED, SIZE], fits=["pad", "resize"]).map_with_index(0, record)
    np.testing.assert_array_equal(both["image0"], expected)
    np.testing.assert_array_equal(both["image1"], pipeline.LoadForEval(SIZE).map_with_index(0, record)["image"])
    off = default.get_config().augment
    off.enabled = False
    train = pipeline.PairedAugment(PADDED, off, fit="pad").random_map(record, np.random.default_rng(0))
    np.testing.assert_array_equal(train["image"], expected)
    np.testing.assert_array_equal(train["mask"], np.pad(mask, ((0, 0), (1, 1)), mode="symmetric"))
    # The augmentation is in the same single affine: a mirror of the photo is the mirrored photo, padded.
    flip = augment.AugmentParams(hflip=True)
    image, flipped_mask = augment.load_pair(record.image_path, record.mask_path, PADDED, flip, fit="pad")
    np.testing.assert_array_equal(image, np.pad(photo[:, ::-1], ((0, 0), (1, 1), (0, 0)), mode="symmetric"))
    np.testing.assert_array_equal(flipped_mask, np.pad(mask[:, ::-1], ((0, 0), (1, 1)), mode="symmetric"))


def test_mask_pad_crop_round_trip_is_exact(kaggle_dir):
    _, _, mask = _train_photo(kaggle_dir, 5)
    padded = augment.warp_mask(mask, augment.fit_matrix(FULL, PADDED, "pad"), PADDED, border=augment.PAD_BORDER)
    assert padded.shape == PADDED
    np.testing.assert_array_equal(np.asarray(inference.crop(padded[None])), mask[None])
    np.testing.assert_array_equal(np.asarray(inference.to_full(padded[None].astype(np.float32), "pad")), mask[None])


def _conv_model():
    """A fake fully convolutional 'model': one random 3x3 conv of the photo to a logit (cheap at 1280x1920)."""
    kernel = np.random.default_rng(2).standard_normal((3, 3, 3, 1)).astype(np.float32)

    def apply_fn(variables, x, train=False):
        y = lax.conv_general_dilated(x, variables["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return 4.0 * (y[..., 0] - 0.3)
    return apply_fn, {"k": kernel}


def test_padded_model_predictions_are_its_own_probabilities_cropped(kaggle_dir):
    apply_fn, variables = _conv_model()
    records = kaggle.index_train(kaggle_dir)[:2]
    own = []  # independent: np.pad each photo, predict, crop the two columns off
    for record in records:
        photo, _ = augment.decode_image(record.image_path, PADDED)
        x = np.pad(photo, ((0, 0), (1, 1), (0, 0)), mode="symmetric")[None].astype(np.float32) / 255
        own.append(_probs(apply_fn, variables, x)[0][:, 1:-1])
    own = np.stack(own)
    assert own.shape == (2, *FULL)
    config = default.get_config()
    config.update(data_dir=kaggle_dir, image_size=PADDED, fit="pad", num_workers=0)
    batch = next(iter(pipeline.eval_dataset(records, config, 2, 0)))
    probs = np.asarray(jax.jit(functools.partial(inference.ensemble_probs, apply_fns=(apply_fn,), image_keys=("image",),
                                                 fits=("pad",)))((variables,), batch))
    np.testing.assert_allclose(probs, own, atol=1e-6)
    mesh = parallel.make_mesh()
    threshold = float(np.median(own))
    ensemble = predict.single_model_ensemble(parallel.replicate(variables, mesh), apply_fn, config, mesh)
    assert ensemble.members[0].fit == "pad"
    ensemble.threshold = threshold
    got = np.stack([m for _, m in ensemble.masks(records, config)])
    assert np.mean(got != (own > threshold)) < 1e-6
    scores, _ = ensemble.dice(records, config)
    for score, record, mask in zip(scores, records, got):
        truth = augment.decode_mask(record.mask_path)
        assert score == pytest.approx(2 * (mask & truth).sum() / (mask.sum() + truth.sum()), abs=1e-9)
