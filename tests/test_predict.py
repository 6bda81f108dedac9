"""Prediction: ensembles of input sizes, bit-packing on the device, the fast submission path and its resume.

The models are freshly initialised (no training needed: these are equalities between two ways of
computing the same thing), on the 4 CPU devices conftest makes.
"""
import functools
import json
import os

import jax
import numpy as np
import pytest

from carvana_jax import evaluation
from carvana_jax import dice, inference, parallel, predict, rle, score, submission
from carvana_jax.data import kaggle, pipeline
from carvana_jax.models import unet

SIZE_A, SIZE_B = (64, 96), (176, 264)  # JPEG decoded at 1/8 and at 1/4 scale


def _member(config, size, seed):
    """A U-Net with random He-initialised weights (shapes from eval_shape: nothing to compile)."""
    model = unet.from_config(config.model)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, *size, 3), np.float32),
                                               train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            return (rng.standard_normal(leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:-1]))).astype(leaf.dtype)
        return np.ones(leaf.shape, leaf.dtype) if ("var" in name or "scale" in name) else np.zeros(leaf.shape, leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    return predict.Member(parallel.replicate(variables, parallel.make_mesh()), model.apply, size)


@pytest.fixture(scope="module")
def config(kaggle_dir):
    from helpers import small_config
    c = small_config(kaggle_dir, eval_batch_size=4)
    c.model.features, c.model.depth = 4, 3
    return c


@pytest.fixture(scope="module")
def members(config):
    return [_member(config, SIZE_A, 0), _member(config, SIZE_B, 1)]


@pytest.fixture(scope="module")
def test_records(kaggle_dir):
    return kaggle.index_test(kaggle_dir)


@pytest.fixture(scope="module")
def threshold(members, config, test_records):
    """The first model's median probability on a test photo: masks neither empty nor full."""
    return float(np.median(_own_probs(members[0], test_records[:1], config)))


def test_pack_masks_on_the_device_round_trips():
    rng = np.random.default_rng(0)
    masks = (rng.random((2, *rle.FULL_SHAPE)) < 0.3).astype(np.uint8)
    packed = np.asarray(jax.jit(inference.pack_masks)(masks))
    assert packed.shape == (2, 1280 * 1918 // 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(packed, np.packbits(masks.reshape(2, -1), axis=1))
    np.testing.assert_array_equal(np.unpackbits(packed, axis=1).reshape(masks.shape), masks)
    assert rle.encode_packed(packed[1], rle.FULL_SHAPE) == rle.encode(masks[1])


@pytest.mark.parametrize("size", [(64, 96), (5, 7), (1280, 1918)])
def test_upsample_is_jax_image_resize_bilinear(size):
    probs = np.random.default_rng(1).random((2, *size), dtype=np.float32)
    ours = np.asarray(jax.jit(inference.upsample)(probs))
    theirs = np.asarray(jax.image.resize(probs, (2, *rle.FULL_SHAPE), method="bilinear"))
    np.testing.assert_allclose(ours, theirs, atol=3e-5)
    shrink = np.random.default_rng(2).random((1, 1280, 1920), dtype=np.float32)  # configs/fullres.py's width
    np.testing.assert_array_equal(inference.upsample(shrink), jax.image.resize(shrink, (1, *rle.FULL_SHAPE), "bilinear"))


def test_dice_of_packed_masks_is_the_competition_dice():
    rng = np.random.default_rng(3)
    for pred, truth in [(rng.random((37, 53)) < 0.4, rng.random((37, 53)) < 0.6),
                        (np.zeros((8, 8), bool), np.zeros((8, 8), bool)),
                        (np.zeros((8, 8), bool), np.ones((8, 8), bool))]:
        got = dice.of_packed(np.packbits(pred.reshape(-1)), truth.astype(np.uint8))
        assert got == pytest.approx(float(dice.per_image(pred[None], truth[None], xp=np)[0]), abs=1e-12)


def test_load_at_sizes_equals_each_sizes_own_eval_pipeline(test_records):
    both = pipeline.LoadAtSizes([SIZE_A, SIZE_B])
    for index in (0, 7):
        item = both.map_with_index(index, test_records[index])
        for key, size in (("image0", SIZE_A), ("image1", SIZE_B)):
            own = pipeline.LoadForEval(size).map_with_index(index, test_records[index])
            np.testing.assert_array_equal(item[key], own["image"])


def _own_probs(member, records, config):
    """One model's full-resolution probabilities from its own single-size pipeline, on one device."""
    fn = jax.jit(lambda v, x: inference.upsample(inference.predict_probs(v, x, member.apply_fn)))
    variables = jax.device_get(member.variables)
    size_config = config.copy_and_resolve_references()
    size_config.image_size = member.image_size
    out = [np.asarray(fn(variables, b["image"])) for b in pipeline.eval_dataset(records, size_config, 4, 0)]
    return np.concatenate(out)


def test_ensemble_of_two_input_sizes_equals_the_mean_of_each_models_own_probabilities(members, config, test_records):
    records = test_records[:4]
    mean = (_own_probs(members[0], records, config) + _own_probs(members[1], records, config)) / 2
    threshold = float(np.median(mean))  # about half the pixels on: random weights have no 'car' to find
    expected = (mean > threshold).astype(np.uint8)
    ensemble = predict.Ensemble(members, parallel.make_mesh(), threshold=threshold)
    got = np.stack([mask for _, mask in ensemble.masks(records, config)])
    assert 0.2 < expected.mean() < 0.8
    # Same pixels up to float rounding of probabilities sitting exactly on the threshold.
    assert np.mean(got != expected) < 1e-5
    alone = predict.Ensemble(members[:1], parallel.make_mesh(), threshold=threshold)
    assert np.mean(np.stack([m for _, m in alone.masks(records, config)]) != got) > 1e-3, \
        "the second model must change the prediction"


def test_fast_submission_equals_the_simple_paths_masks(members, config, test_records, threshold, kaggle_dir,
                                                      tmp_path):
    mesh = parallel.make_mesh()
    ensemble = predict.Ensemble(members[:1], mesh, threshold=threshold)
    out = str(tmp_path / "sub.csv")
    stats = submission.write_submission(ensemble, test_records, config, out, progress=False)
    assert stats["complete"] and stats["rows"] == stats["predicted"] == len(test_records) == 16
    with open(out) as f:
        rows = [line.rstrip("\n").split(",") for line in f]
    assert rows[0] == ["img", "rle_mask"]
    assert [r[0] for r in rows[1:]] == kaggle.read_submission_order(kaggle_dir)
    fn = parallel.data_parallel_map(functools.partial(inference.full_res_masks, apply_fn=members[0].apply_fn,
                                                      threshold=threshold), mesh)
    batches = pipeline.eval_dataset(test_records, config, 4, 0)
    direct = np.concatenate([parallel.to_host(fn(members[0].variables, parallel.shard_batch(
        {"image": b["image"]}, mesh)["image"])) for b in batches])
    assert 0.2 < direct.mean() < 0.8
    for (name, text), mask in zip(rows[1:], direct):
        np.testing.assert_array_equal(rle.decode(text), mask, err_msg=name)
    assert not os.path.exists(out + ".partial") and not os.path.exists(out + ".partial.json")


def test_an_interrupted_submission_resumes_byte_for_byte_without_predicting_finished_images(
        members, config, test_records, threshold, tmp_path):
    ensemble = predict.Ensemble(members[:1], parallel.make_mesh(), threshold=threshold)
    settings = {"checkpoints": [["a", 1]], "tta": "none"}
    whole = tmp_path / "whole.csv"
    submission.write_submission(ensemble, test_records, config, str(whole), settings=settings, progress=False)

    out = tmp_path / "resumed.csv"
    first = submission.write_submission(ensemble, test_records, config, str(out), settings=settings, stop_after=6,
                                      progress=False)
    assert first["rows"] == 6 and not first["complete"] and not out.exists()
    partial = tmp_path / "resumed.csv.partial"
    assert partial.read_bytes() == whole.read_bytes()[:partial.stat().st_size]
    rest = whole.read_bytes()[partial.stat().st_size:]
    assert len(rest.split(b"\n")[0]) > 100, "row 7 should be a real mask"
    with open(partial, "ab") as f:  # killed half-way through writing row 7
        f.write(rest[:rest.index(b"\n") - 1])
    second = submission.write_submission(ensemble, test_records, config, str(out), settings=settings, progress=False)
    assert second["complete"] and second["resumed_from"] == 6
    assert second["predicted"] == len(test_records) - 6
    assert out.read_bytes() == whole.read_bytes()
    assert not partial.exists() and not (tmp_path / "resumed.csv.partial.json").exists()


def test_a_partial_from_other_settings_is_refused(members, config, test_records, tmp_path):
    ensemble = predict.Ensemble(members[:1], parallel.make_mesh())
    out = str(tmp_path / "sub.csv")
    submission.write_submission(ensemble, test_records, config, out, settings={"tta": "none"}, stop_after=2,
                              progress=False)
    with pytest.raises(kaggle.DataError, match="different prediction.*tta"):
        submission.write_submission(ensemble, test_records, config, out, settings={"tta": "hflip"}, progress=False)
    assert not os.path.exists(out)


def test_finished_rows_keeps_the_well_formed_prefix(tmp_path):
    names = ["a_01.jpg", "a_02.jpg", "a_03.jpg"]
    path = tmp_path / "s.csv"
    good = b"img,rle_mask\na_01.jpg,1 2 10 3\na_02.jpg,\n"
    for tail, rows in [(b"", 2), (b"a_03.jpg,5 1", 2), (b"a_03.jpg,5 1\n", 3), (b"a_09.jpg,5 1\n", 2),
                       (b"a_03.jpg,5 x\n", 2), (b"a_03.jpg,5\n", 2), (b"a_03.jpg,5 1 3 1\n", 2),
                       (b"a_03.jpg,0 1\n", 2), (b"a_03.jpg,25 2\n", 2), (b"a_03.jpg,24 2\n", 3)]:
        path.write_bytes(good + tail)
        got, offset = submission.finished_rows(str(path), names, shape=(5, 5))
        assert got == rows, tail
        assert offset == len(good) + (len(tail) if rows == 3 else 0)
    path.write_bytes(b"img,wrong\n")
    assert submission.finished_rows(str(path), names) == (0, 0)


def test_an_unreadable_test_image_is_named_and_leaves_no_submission(members, config, test_records, tmp_path):
    broken = tmp_path / "broken.jpg"
    with open(test_records[5].image_path, "rb") as f:
        data = f.read()
    broken.write_bytes(data[: len(data) // 2])
    records = list(test_records)
    records[5] = kaggle.Record(records[5].name, records[5].car_id, records[5].angle, str(broken))
    out = tmp_path / "sub.csv"
    ensemble = predict.Ensemble(members[:1], parallel.make_mesh())
    with pytest.raises(kaggle.DataError, match="broken.jpg"):
        submission.write_submission(ensemble, records, config, str(out), progress=False)
    assert not out.exists()
    assert json.loads((tmp_path / "sub.csv.partial.json").read_text()) == {}


def test_a_submission_that_fails_validation_is_not_left_looking_complete(members, config, test_records, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(score, "validate_submission", lambda path, names: ["x_01.jpg: something wrong"])
    out = tmp_path / "sub.csv"
    ensemble = predict.Ensemble(members[:1], parallel.make_mesh())
    with pytest.raises(kaggle.DataError, match="failed validation.*something wrong"):
        submission.write_submission(ensemble, test_records[:4], config, str(out), progress=False)
    assert not out.exists() and (tmp_path / "sub.csv.invalid").exists()
    assert not (tmp_path / "sub.csv.partial").exists()


def test_eval_refuses_to_run_in_several_processes(monkeypatch, tmp_path):
    from carvana_jax.errors import ConfigError
    monkeypatch.setattr(parallel, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match="one process"):
        evaluation.evaluate(str(tmp_path), split="test", out=str(tmp_path / "sub.csv"))
    assert not (tmp_path / "sub.csv").exists()
