"""K-fold cross-validation by car: fold assignment, out-of-fold aggregation, resume, the command."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from carvana_jax import cv, parallel, score, train
from carvana_jax import evaluation
from carvana_jax.config import validate_config
from carvana_jax.data import kaggle
from carvana_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def car_ids(n, seed=0):
    rng = np.random.default_rng(seed)
    return [f"{x:012x}" for x in rng.integers(0, 2 ** 48, n)]


# ---------------------------------------------------------------------------------------------- pure parts

@pytest.mark.parametrize("num_cars,folds", [(2, 2), (7, 3), (23, 5), (318, 5), (10, 10)])
def test_fold_assignment_covers_every_car_once_in_near_equal_seeded_shares(num_cars, folds):
    cars = car_ids(num_cars)
    assigned = cv.assign_folds(cars, folds, seed=0)
    assert len(assigned) == folds
    assert sorted(sum(assigned, [])) == sorted(cars)  # every car exactly once
    sizes = [len(share) for share in assigned]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert cv.assign_folds(cars[::-1], folds, seed=0) == assigned  # deterministic, whatever the input order
    assert cv.assign_folds(cars, folds, seed=0) == assigned
    if num_cars > folds:
        assert cv.assign_folds(cars, folds, seed=1) != assigned


def test_fewer_than_two_folds_or_more_folds_than_cars_is_an_error():
    with pytest.raises(ConfigError, match="more than the 3 cars"):
        cv.assign_folds(car_ids(3), 4, seed=0)
    with pytest.raises(ConfigError, match="at least 2"):
        cv.assign_folds(car_ids(3), 1, seed=0)


def test_out_of_fold_aggregation_means_over_photos_and_names_what_is_missing():
    index = [("a_01.jpg", "a"), ("a_02.jpg", "a"), ("b_01.jpg", "b"), ("c_01.jpg", "c"), ("c_02.jpg", "c")]
    folds = [["a", "c"], ["b"]]
    scores = [{"a_01.jpg": 0.9, "a_02.jpg": 0.8, "c_01.jpg": 0.7, "c_02.jpg": float("nan")}, {"b_01.jpg": 0.5}]
    rows, summary = cv.aggregate_oof(index, folds, scores)
    assert rows == [("a_01.jpg", 0, 0.9), ("a_02.jpg", 0, 0.8), ("b_01.jpg", 1, 0.5), ("c_01.jpg", 0, 0.7),
                    ("c_02.jpg", 0, rows[4][2])] and np.isnan(rows[4][2])
    assert summary["per_fold"] == [{"fold": 0, "images": 3, "dice": pytest.approx(0.8)},
                                   {"fold": 1, "images": 1, "dice": 0.5}]
    # The mean over photos, not the mean of the folds' means (0.65); the unreadable photo counts in neither.
    assert summary["overall"] == {"images": 4, "dice": pytest.approx((0.9 + 0.8 + 0.7 + 0.5) / 4)}
    with pytest.raises(kaggle.DataError, match="b_01.jpg: no out-of-fold Dice from fold 1"):
        cv.aggregate_oof(index, folds, [scores[0], {}])
    with pytest.raises(kaggle.DataError, match="car b is held out by no fold"):
        cv.aggregate_oof(index, [["a", "c"]], scores[:1])
    with pytest.raises(kaggle.DataError, match="car a is held out by folds 0 and 1"):
        cv.aggregate_oof(index, [["a", "c"], ["a", "b"]], scores)


def test_eta_and_durations():
    assert cv.eta_seconds([], 3) is None
    assert cv.eta_seconds([60.0, 120.0], 2) == 180.0
    assert [cv.format_seconds(s) for s in (None, 7, 65, 3725)] == ["-", "7s", "1m05s", "1h02m"]


def test_the_folds_file_is_written_once_and_a_rerun_with_other_folds_or_seed_is_refused(tmp_path):
    cars = car_ids(7)
    first = cv.folds_for(str(tmp_path), cars, 3, seed=0)
    saved = json.loads((tmp_path / "folds.json").read_text())
    assert saved["folds"] == 3 and saved["seed"] == 0 and [saved["held_out"][str(i)] for i in range(3)] == first
    assert cv.folds_for(str(tmp_path), cars, 3, seed=0) == first
    with pytest.raises(ConfigError, match="3 folds with seed 0, this run asks for 4 with seed 0"):
        cv.folds_for(str(tmp_path), cars, 4, seed=0)
    with pytest.raises(ConfigError, match="asks for 3 with seed 1"):
        cv.folds_for(str(tmp_path), cars, 3, seed=1)
    with pytest.raises(kaggle.DataError, match="other cars"):
        cv.folds_for(str(tmp_path), cars[:6], 3, seed=0)


def test_explicit_held_out_cars_split_by_car(kaggle_dir, tiny_config):
    records = kaggle.index_train(kaggle_dir)
    cars = sorted({r.car_id for r in records})
    train_records, val = kaggle.split_by_car(records, 0.0, 0, val_cars=[cars[1]])
    assert {r.car_id for r in val} == {cars[1]} and len(val) == 16
    assert {r.car_id for r in train_records} == {cars[0], cars[2]}
    with pytest.raises(kaggle.DataError, match="names car nope"):
        kaggle.split_by_car(records, 0.0, 0, val_cars=["nope"])
    with pytest.raises(kaggle.DataError, match="all 3 training cars"):
        kaggle.split_by_car(records, 0.0, 0, val_cars=cars)
    config = cv.fold_config(tiny_config, [cars[1]])
    validate_config(config)
    assert config.val_fraction == 0 and config.val_cars == (cars[1],) and tiny_config.val_cars == ()
    tiny_config.val_cars = (cars[1],)  # with val_fraction 0.34 as well
    with pytest.raises(ConfigError, match="val_cars and val_fraction"):
        validate_config(tiny_config)


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def cv_data(kaggle_dir_few):
    """Synthetic Kaggle-layout data: 3 training cars and 1 test car, helpers.FEW_ANGLES photos each (the full-resolution
    scoring stays quick)."""
    return kaggle_dir_few


def cv_config(data_dir):
    from configs import demo
    c = demo.get_config()
    c.update(data_dir=data_dir, image_size=(32, 48), batch_size=4, num_train_steps=2, warmup_steps=1,
             checkpoint_every=1, eval_every=2, log_every=1, num_workers=0, tta="hflip", num_plot_images=1)
    c.model.update(features=4, depth=2)
    return c


def _mtimes(folder):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(folder) for f in files}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.slow
def test_cross_validation_end_to_end_scores_every_photo_out_of_fold_resumes_and_runs_fold_by_fold(
        cv_data, tmp_path, monkeypatch):
    config = cv_config(cv_data)
    workdir = str(tmp_path / "cv")
    mesh = parallel.make_mesh()  # all devices, as eval uses: the same programs, the same pixels
    result = cv.cross_validate(config, workdir, 2, mesh=mesh, progress=False)
    assert result["missing"] == []
    held_out = result["folds"]
    assert sorted(sum(held_out, [])) == sorted({r.car_id for r in kaggle.index_train(cv_data)})

    # oof.csv: every training photo once, scored by the fold holding out its car.
    rows = _rows(os.path.join(workdir, "oof.csv"))
    assert rows[0] == ["img", "fold", "dice"]
    photos = sorted(f for f in os.listdir(os.path.join(cv_data, "train")))
    assert [r[0] for r in rows[1:]] == photos
    fold_of = {car: i for i, cars in enumerate(held_out) for car in cars}
    assert all(int(fold) == fold_of[kaggle.parse_name(img)[1]] for img, fold, _ in rows[1:])
    oof = {img: float(d) for img, _, d in rows[1:]}

    # Independently: eval --split val of each fold's best checkpoint (its stored config holds out its cars),
    # with the same TTA.
    report = json.loads(open(os.path.join(workdir, "cv.json")).read())
    for i in range(2):
        ev = evaluation.evaluate(cv.fold_dir(workdir, i), split="val", tta="hflip", out=str(tmp_path / f"ev{i}"),
                               progress=False)
        per_image = {img: float(d) for img, d in _rows(tmp_path / f"ev{i}" / "per_image.csv")[1:]}
        assert set(per_image) == {img for img, fold, _ in rows[1:] if int(fold) == i}
        for img, dice in per_image.items():
            assert oof[img] == pytest.approx(dice, abs=1e-12)
        assert report["per_fold"][i]["dice"] == pytest.approx(ev["dice"], abs=1e-12)
        assert report["per_fold"][i]["held_out_cars"] == held_out[i]
    assert report["overall"] == {"images": len(photos), "dice": pytest.approx(np.mean(list(oof.values())))}
    assert report["tta"] == "hflip" and report["per_fold"][0]["train_seconds"] > 0

    # The fold ensemble's submission (eval's, of both folds' best checkpoints): every test photo, valid.
    submission = os.path.join(workdir, "submission.csv")
    assert score.validate_submission(submission, kaggle.read_submission_order(cv_data)) == []
    assert report["submission"]["settings"]["checkpoints"] == [
        [os.path.join(os.path.abspath(cv.fold_dir(workdir, i)), "checkpoints"), report["per_fold"][i]["step"]]
        for i in range(2)]

    # A rerun trains nothing, scores nothing, and leaves the checkpoints as they were.
    calls = []
    monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: calls.append("train"))
    real_score = cv.score_fold
    monkeypatch.setattr(cv, "score_fold", lambda *a, **k: calls.append("score") or real_score(*a, **k))
    before = {i: _mtimes(os.path.join(cv.fold_dir(workdir, i), "checkpoints")) for i in range(2)}
    before_submission = os.stat(submission).st_mtime_ns
    rerun = cv.cross_validate(config, workdir, 2, mesh=mesh, progress=False)
    assert calls == [] and rerun["overall"] == result["overall"]
    assert {i: _mtimes(os.path.join(cv.fold_dir(workdir, i), "checkpoints")) for i in range(2)} == before
    assert os.stat(submission).st_mtime_ns == before_submission  # same checkpoints: not predicted again
    monkeypatch.undo()

    # Fold by fold in another workdir: fold 0 (trained: copied) is not retrained, fold 1 was interrupted after
    # its first update (a copy without its last checkpoint) and resumes; the overall results appear once both
    # are done.
    other = str(tmp_path / "by_fold")
    os.makedirs(other)
    shutil.copy(os.path.join(workdir, "folds.json"), other)
    shutil.copytree(cv.fold_dir(workdir, 0), cv.fold_dir(other, 0))
    shutil.copytree(cv.fold_dir(workdir, 1), cv.fold_dir(other, 1))
    shutil.rmtree(os.path.join(cv.fold_dir(other, 1), "checkpoints", "2"))
    os.remove(os.path.join(cv.fold_dir(other, 1), cv.FOLD_STATE))
    metrics = os.path.join(cv.fold_dir(other, 1), "metrics.jsonl")
    with open(metrics) as f:
        first_line = f.readline()
    with open(metrics, "w") as f:
        f.write(first_line)
    calls = []
    real_train = train.train_and_evaluate
    monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: calls.append(a[1]) or real_train(*a, **k))
    partial = cv.cross_validate(config, other, 2, fold=0, mesh=mesh, progress=False)
    assert partial["missing"] == [1] and calls == [] and not os.path.exists(os.path.join(other, "oof.csv"))
    done = cv.cross_validate(config, other, 2, fold=1, mesh=mesh, progress=False, submission=False)
    assert calls == [cv.fold_dir(other, 1)] and done["missing"] == []
    with open(os.path.join(cv.fold_dir(other, 1), "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]  # resumed at update 1, not restarted
    assert _rows(os.path.join(other, "oof.csv")) == rows  # the same training, the same out-of-fold Dice
    assert not os.path.exists(os.path.join(other, "submission.csv"))

    # Another number of folds in the same workdir is refused.
    with pytest.raises(ConfigError, match="folds.json splits the cars into 2 folds"):
        cv.cross_validate(config, other, 3, mesh=mesh, progress=False)


def _command(*args):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    return subprocess.run([sys.executable, "-m", "carvana_jax.cv", *args], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_command_has_help_and_refuses_more_folds_than_cars_in_one_line(cv_data, tmp_path):
    proc = _command("--help")
    assert proc.returncode == 0 and "--folds" in proc.stdout + proc.stderr and "--fold" in proc.stdout + proc.stderr
    proc = _command("--config", "configs/demo.py", "--folds", "4", f"--workdir={tmp_path}/w",
                    f"--config.data_dir={cv_data}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
    assert "--folds 4 is more than the 3 cars" in errors[0]
