"""Evaluation and submission from a real checkpoint on disk."""
import csv
import json
import os
import shutil

import numpy as np
import pytest

from carvana_jax import eval as eval_lib
from carvana_jax import parallel, predict, rle, train
from carvana_jax.checkpoint import CheckpointError
from carvana_jax.data import augment, kaggle


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, kaggle_dir):
    from configs import demo
    c = demo.get_config()
    c.update(data_dir=kaggle_dir, image_size=(64, 96), batch_size=4, num_train_steps=3, warmup_steps=1,
             checkpoint_every=3, eval_every=3, log_every=1, num_workers=0, val_fraction=0.34)
    c.model.update(features=4, depth=3)
    path = str(tmp_path_factory.mktemp("eval") / "run")
    train.train_and_evaluate(c, path, progress=False)
    return path


def test_val_dice_equals_an_independent_full_resolution_computation(workdir, kaggle_dir):
    result = eval_lib.evaluate(workdir, split="val")
    config, variables, apply_fn, _ = eval_lib.load_checkpoint(workdir)
    _, val_records = kaggle.split_by_car(kaggle.index_train(kaggle_dir), config.val_fraction, config.seed)
    scores = []
    for record, pred in predict.predict_masks(variables, apply_fn, val_records, config, parallel.make_mesh()):
        truth = augment.decode_mask(record.mask_path)
        assert pred.shape == truth.shape == (1280, 1918)
        inter, total = np.logical_and(pred, truth).sum(), pred.sum() + truth.sum()
        scores.append(1.0 if total == 0 else 2 * inter / total)
    assert result["images"] == len(val_records) == 16
    assert result["dice"] == pytest.approx(np.mean(scores), abs=1e-6)


def test_hflip_tta_runs_and_changes_the_prediction(workdir):
    plain = eval_lib.evaluate(workdir, split="val")
    flipped = eval_lib.evaluate(workdir, split="val", tta="hflip")
    assert 0.0 <= flipped["dice"] <= 1.0 and flipped["dice"] != plain["dice"]


def test_submission_lists_every_test_image_once_in_order_with_decodable_masks(workdir, kaggle_dir, tmp_path):
    out = str(tmp_path / "submission.csv")
    eval_lib.evaluate(workdir, split="test", out=out)
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["img", "rle_mask"]
    assert [r[0] for r in rows[1:]] == kaggle.read_submission_order(kaggle_dir)
    config, variables, apply_fn, _ = eval_lib.load_checkpoint(workdir)
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
        eval_lib.evaluate(workdir, split="test", data_dir=str(data), out=str(out))
    assert not out.exists()


def test_ckpt_pointing_at_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        eval_lib.load_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        eval_lib.load_checkpoint(str(tmp_path / "empty"))


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_a_clear_error(workdir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    step_dir = broken / "checkpoints" / "3"
    meta = step_dir / "config" / "metadata"
    config = json.loads(meta.read_text())
    config["model"]["features"] = 16
    meta.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not fit"):
        eval_lib.load_checkpoint(str(broken))
