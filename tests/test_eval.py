"""Evaluation and submission from real checkpoints on disk: one model, ensembles, TTA, the command."""
import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import FEW_ANGLES as ANGLES

from carvana_jax import evaluation
from carvana_jax import checkpoint, inference, parallel, postprocess, predict, refine, rle
from carvana_jax.data import augment, kaggle, pipeline
from carvana_jax.errors import CheckpointError, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def kaggle_dir(kaggle_dir_few):
    """The 3 training cars and 1 test car with ANGLES photos each (16 in conftest's kaggle_dir): every evaluation
    here scores each at 1918×1280."""
    return kaggle_dir_few


@pytest.fixture(scope="module")
def workdir(two_update_run):
    """conftest's 2-update run on kaggle_dir_few: a 32×48 depth-2 U-Net of width 4, one car held out, validated and
    checkpointed at update 2 (the tests here only read its checkpoint and write their outputs beside it)."""
    return two_update_run["workdir"]


@pytest.fixture(scope="module")
def workdir_b(workdir, tmp_path_factory):
    """A checkpoint of another config: the same fully convolutional weights, stored with a 96×176 input size
    and threshold 0.4 (its photos decode at 1/4 scale, the first model's at 1/8). Nothing to train."""
    path = tmp_path_factory.mktemp("eval") / "run_b"
    shutil.copytree(workdir, path)
    meta = path / "checkpoints" / "2" / "config" / "metadata"
    config = json.loads(meta.read_text())
    config.update(image_size=[96, 176], threshold=0.4)
    meta.write_text(json.dumps(config))
    return str(path)


def _dice(pred, truth):
    inter, total = np.logical_and(pred, truth).sum(), pred.sum() + truth.sum()
    return 1.0 if total == 0 else 2 * inter / total


def _per_image(folder):
    with open(os.path.join(folder, "per_image.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["img", "dice"]
    return {name: float(d) for name, d in rows[1:]}


def test_val_dice_and_per_image_csv_equal_an_independent_full_resolution_computation(workdir, kaggle_dir, tmp_path):
    result = evaluation.evaluate(workdir, split="val", out=str(tmp_path / "ev"), progress=False)
    config, variables, apply_fn, _ = checkpoint.load_checkpoint(workdir)
    _, val_records = kaggle.split_by_car(kaggle.index_train(kaggle_dir), config.val_fraction, config.seed)
    scores = {}
    for record, pred in predict.predict_masks(variables, apply_fn, val_records, config, parallel.make_mesh()):
        truth = augment.decode_mask(record.mask_path)
        assert pred.shape == truth.shape == (1280, 1918)
        scores[f"{record.name}.jpg"] = _dice(pred, truth)
    assert result["images"] == len(val_records) == ANGLES  # the held-out car's photos
    assert result["dice"] == pytest.approx(np.mean(list(scores.values())), abs=1e-6)
    per_image = _per_image(tmp_path / "ev")
    assert list(per_image) == list(scores)
    np.testing.assert_allclose(list(per_image.values()), list(scores.values()), atol=1e-6)
    for plot in ("dice_histogram.png", "worst.png"):
        assert (tmp_path / "ev" / plot).stat().st_size > 10_000


def test_default_output_folder_is_next_to_the_checkpoint_and_train_scores_every_training_photo(workdir):
    result = evaluation.evaluate(os.path.join(workdir, "checkpoints", "2"), split="train", progress=False)
    assert result["out"] == os.path.join(workdir, "eval_train") and result["images"] == 3 * ANGLES
    assert len(_per_image(result["out"])) == 3 * ANGLES


def test_ensemble_of_two_input_sizes_with_hflip_runs_end_to_end_and_equals_the_mean_of_probabilities(
        workdir, workdir_b, kaggle_dir, tmp_path):
    result = evaluation.evaluate([workdir, workdir_b], split="val", tta="hflip", out=str(tmp_path / "ev"),
                               progress=False)
    assert result["steps"] == [2, 2] and 0.0 < result["dice"] <= 1.0 and result["images"] == ANGLES
    assert result["threshold"] == 0.5  # the first checkpoint's
    mesh = parallel.make_mesh()
    config, _, _, _ = checkpoint.load_checkpoint(workdir)
    _, val_records = kaggle.split_by_car(kaggle.index_train(kaggle_dir), config.val_fraction, config.seed)
    records = val_records[:3]
    probs = []
    for path in (workdir, workdir_b):  # each model's own full-resolution probabilities, computed on its own
        own_config, variables, apply_fn, _ = checkpoint.load_checkpoint(path)
        fn = parallel.data_parallel_map(
            lambda v, x, f=apply_fn: inference.upsample(inference.predict_probs(v, x, f, hflip_tta=True)), mesh)
        batch = next(iter(pipeline.eval_dataset(records, own_config, 4, 0)))["image"]
        padded, n = parallel.pad_to_multiple({"image": batch}, mesh.devices.size)
        probs.append(parallel.to_host(fn(variables, parallel.shard_batch(padded, mesh)["image"]))[:n])
    expected = ((probs[0] + probs[1]) / 2 > config.threshold)
    per_image = _per_image(tmp_path / "ev")
    for record, pred in zip(records, expected):
        assert per_image[f"{record.name}.jpg"] == pytest.approx(_dice(pred, augment.decode_mask(record.mask_path)),
                                                                abs=1e-5)


def test_hflip_tta_runs_and_changes_the_prediction(workdir, tmp_path):
    plain = evaluation.evaluate(workdir, split="val", out=str(tmp_path / "a"), progress=False)
    flipped = evaluation.evaluate(workdir, split="val", tta="hflip", out=str(tmp_path / "b"), progress=False)
    assert 0.0 <= flipped["dice"] <= 1.0 and flipped["dice"] != plain["dice"]


@pytest.fixture(scope="module")
def workdir_defaults(workdir, tmp_path_factory):
    """The first checkpoint with tta='hflip' and postprocess='clean' stored in its config: eval's defaults."""
    path = tmp_path_factory.mktemp("eval") / "run_defaults"
    shutil.copytree(workdir, path)
    meta = path / "checkpoints" / "2" / "config" / "metadata"
    config = json.loads(meta.read_text())
    config.update(tta="hflip", postprocess="clean")
    meta.write_text(json.dumps(config))
    return str(path)


def test_postprocessed_val_dice_is_the_dice_of_the_cleaned_masks(workdir, kaggle_dir, tmp_path):
    result = evaluation.evaluate(workdir, split="val", postprocess="clean", out=str(tmp_path / "ev"), progress=False)
    assert result["postprocess"] == "components,fill"
    config, variables, apply_fn, _ = checkpoint.load_checkpoint(workdir)
    _, val_records = kaggle.split_by_car(kaggle.index_train(kaggle_dir), config.val_fraction, config.seed)
    expected, changed = {}, 0
    for record, pred in predict.predict_masks(variables, apply_fn, val_records, config, parallel.make_mesh()):
        cleaned = postprocess.apply(pred, "clean")  # by hand, on the unprocessed mask
        changed += int((cleaned != pred).any())
        expected[f"{record.name}.jpg"] = _dice(cleaned, augment.decode_mask(record.mask_path))
    assert changed >= 1, "the test needs masks that post-processing changes"
    per_image = _per_image(tmp_path / "ev")
    assert list(per_image) == list(expected)
    np.testing.assert_allclose(list(per_image.values()), list(expected.values()), atol=1e-9)
    assert result["dice"] == pytest.approx(np.mean(list(expected.values())), abs=1e-9)


def test_guided_val_dice_is_the_dice_of_the_refined_probabilities(workdir, kaggle_dir, tmp_path):
    """eval --postprocess guided against the same steps by hand, one photo at a time: the model's
    probabilities up-sampled to the guide (the photo at its 1/8 decode for this 32×48 model), the guided
    filter, up-sampled to 1918×1280 and thresholded."""
    result = evaluation.evaluate(workdir, split="val", postprocess="guided", out=str(tmp_path / "ev"), progress=False)
    plain = evaluation.evaluate(workdir, split="val", out=str(tmp_path / "plain"), progress=False)
    assert result["postprocess"] == "guided"
    config, variables, apply_fn, _ = checkpoint.load_checkpoint(workdir)
    _, val_records = kaggle.split_by_car(kaggle.index_train(kaggle_dir), config.val_fraction, config.seed)
    k = refine.guide_scale(rle.FULL_SHAPE, [tuple(config.image_size)])
    load = pipeline.LoadForEval(config.image_size, guide_hw=refine.guide_shape(rle.FULL_SHAPE, k))
    predict_probs = jax.jit(lambda v, x: inference.predict_probs(v, x, apply_fn))
    expected = {}
    for i, record in enumerate(val_records):
        item = load.map_with_index(i, record)
        probs = inference.upsample(predict_probs(variables, item["image"][None]), item["guide"].shape[:2])
        mask = np.asarray(inference.upsample(refine.refined(probs, item["guide"][None], k)) > 0.5)[0]
        expected[f"{record.name}.jpg"] = _dice(mask, augment.decode_mask(record.mask_path))
    per_image = _per_image(tmp_path / "ev")
    assert list(per_image) == list(expected)
    np.testing.assert_allclose(list(per_image.values()), list(expected.values()), atol=1e-4)
    assert per_image != _per_image(tmp_path / "plain"), "the test needs photos that the filter changes"
    assert result["dice"] != plain["dice"]


def test_a_guided_ensemble_of_two_sizes_takes_the_guide_from_the_finer_decode(workdir, tmp_path):
    """The first model's photos decode at 1/8 scale, a copy's at 192×320 at 1/4: the guide is the 1/4 decode."""
    fine = tmp_path / "run_fine"
    shutil.copytree(workdir, fine)
    meta = fine / "checkpoints" / "2" / "config" / "metadata"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "image_size": [192, 320]}))
    _, ensemble, _ = predict.load_ensemble([workdir, str(fine)], postprocess="guided")
    assert ensemble.guide_scale == 4 and ensemble.guide_hw == (320, 480)
    guided = evaluation.evaluate([workdir, str(fine)], split="val", postprocess="guided", out=str(tmp_path / "a"),
                               progress=False)
    plain = evaluation.evaluate([workdir, str(fine)], split="val", out=str(tmp_path / "b"), progress=False)
    assert 0.0 <= guided["dice"] <= 1.0 and guided["dice"] != plain["dice"]


def test_tta_and_postprocess_default_to_the_checkpoints_config(workdir, workdir_defaults, tmp_path):
    default = evaluation.evaluate(workdir_defaults, split="val", out=str(tmp_path / "a"), progress=False)
    assert default["tta"] == "hflip" and default["postprocess"] == "components,fill"
    explicit = evaluation.evaluate(workdir, split="val", tta="hflip", postprocess="clean", out=str(tmp_path / "b"),
                                 progress=False)
    assert default["dice"] == explicit["dice"]
    overridden = evaluation.evaluate(workdir_defaults, split="val", tta="none", postprocess="none",
                                   out=str(tmp_path / "c"), progress=False)
    plain = evaluation.evaluate(workdir, split="val", out=str(tmp_path / "d"), progress=False)
    assert overridden["tta"] == plain["tta"] == "none" and overridden["dice"] == plain["dice"]


def test_shift_and_scale_tta_run_end_to_end(workdir, tmp_path):
    result = evaluation.evaluate(workdir, split="val", tta="scale,shift,hflip", out=str(tmp_path / "ev"),
                               progress=False)
    assert result["tta"] == "hflip,shift,scale" and 0.0 <= result["dice"] <= 1.0
    with pytest.raises(ConfigError, match="'vflip'"):
        evaluation.evaluate(workdir, split="val", tta="hflip,vflip", progress=False)
    with pytest.raises(ConfigError, match="'holes'"):
        evaluation.evaluate(workdir, split="val", postprocess="holes", progress=False)


def test_postprocessed_submission_rows_are_the_cleaned_masks(workdir, kaggle_dir, tmp_path):
    out = str(tmp_path / "submission.csv")
    evaluation.evaluate(workdir, split="test", out=out, postprocess="clean", progress=False)
    with open(out, newline="") as f:
        rows = list(csv.reader(f))[1:]
    config, variables, apply_fn, _ = checkpoint.load_checkpoint(workdir)
    records = kaggle.index_test(kaggle_dir)[:4]
    for (name, text), (record, mask) in zip(rows, predict.predict_masks(variables, apply_fn, records, config,
                                                                        parallel.make_mesh())):
        assert name == f"{record.name}.jpg"
        np.testing.assert_array_equal(rle.decode(text), postprocess.apply(mask, "clean"))


def test_submission_lists_every_test_image_once_in_order_with_decodable_masks(workdir, kaggle_dir, tmp_path):
    out = str(tmp_path / "submission.csv")
    evaluation.evaluate(workdir, split="test", out=out, progress=False)
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["img", "rle_mask"]
    assert [r[0] for r in rows[1:]] == kaggle.read_submission_order(kaggle_dir)
    config, variables, apply_fn, _ = checkpoint.load_checkpoint(workdir)
    first = next(predict.predict_masks(variables, apply_fn, kaggle.index_test(kaggle_dir)[:1], config,
                                       parallel.make_mesh()))[1]
    np.testing.assert_array_equal(rle.decode(rows[1][1]), first)
    assert not os.path.exists(out + ".partial")


def test_a_missing_test_image_is_named_and_leaves_no_submission(workdir, kaggle_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(kaggle_dir, data)
    victim = sorted(os.listdir(data / "test"))[3]
    os.remove(data / "test" / victim)
    out = tmp_path / "submission.csv"
    with pytest.raises(kaggle.DataError, match=victim):
        evaluation.evaluate(workdir, split="test", data_dir=str(data), out=str(out), progress=False)
    assert not out.exists()


def test_ckpt_pointing_at_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        checkpoint.load_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load_checkpoint(str(tmp_path / "empty"))


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_a_clear_error(workdir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    step_dir = broken / "checkpoints" / "2"
    meta = step_dir / "config" / "metadata"
    config = json.loads(meta.read_text())
    config["model"]["features"] = 8  # the wider model test_train's refused workdir builds too
    meta.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not fit"):
        checkpoint.load_checkpoint(str(broken))


def _eval_command(*args):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    return subprocess.run([sys.executable, "-m", "carvana_jax.eval", *args], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=300)


def test_command_with_a_bad_tta_says_so_in_one_line(workdir):
    proc = _eval_command("--ckpt", workdir, "--split", "val", "--tta", "hflip,mirror")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'mirror'" in errors[0], proc.stderr


def test_command_with_a_ckpt_pointing_at_nothing_says_so_in_one_line(tmp_path):
    proc = _eval_command("--ckpt", str(tmp_path / "nope"), "--split", "test")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nope" in errors[0] and "no such folder" in errors[0], proc.stderr


@pytest.mark.slow
def test_command_writes_a_validated_submission_for_an_ensemble(workdir, workdir_b, tmp_path):
    out = tmp_path / "sub.csv"
    proc = _eval_command("--ckpt", workdir, "--ckpt", workdir_b, "--split", "test", "--tta", "hflip",
                         "--threshold", "0.4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "validated" in proc.stdout and "threshold=0.4" in proc.stdout
    assert out.exists() and not os.path.exists(str(out) + ".partial")
