"""Tests of carvana_jax.synthetic: the Kaggle layout, exact masks, determinism, and realism."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carvana_jax import rle
from carvana_jax.synthetic import cars, render
from carvana_jax.synthetic import dataset as writer

SEED = 3
NUM_TRAIN, NUM_TEST = 2, 1


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _car_ids(folder: Path) -> set[str]:
    return {p.name.split("_")[0] for p in folder.iterdir()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "carvana"
    writer.generate(out, NUM_TRAIN, num_test_cars=NUM_TEST, seed=SEED, workers=1, progress=False)
    return out


def test_layout_and_names(dataset: Path):
    assert sorted(p.name for p in dataset.iterdir()) == [
        "metadata.csv", "sample_submission.csv", "test", "train", "train_masks", "train_masks.csv"]
    # Nothing left behind next to the output (the temporary folder was renamed into place).
    assert [p.name for p in dataset.parent.iterdir()] == ["carvana"]
    train = sorted(p.name for p in (dataset / "train").iterdir())
    masks = sorted(p.name for p in (dataset / "train_masks").iterdir())
    test = sorted(p.name for p in (dataset / "test").iterdir())
    assert len(train) == 16 * NUM_TRAIN and len(test) == 16 * NUM_TEST
    assert all(re.fullmatch(r"[0-9a-f]{12}_(0[1-9]|1[0-6])\.jpg", n) for n in train + test)
    assert masks == [n.replace(".jpg", "_mask.gif") for n in train]
    train_ids, test_ids = _car_ids(dataset / "train"), _car_ids(dataset / "test")
    assert len(train_ids) == NUM_TRAIN and len(test_ids) == NUM_TEST and not train_ids & test_ids
    for cid in train_ids:
        assert {n for n in train if n.startswith(cid)} == {f"{cid}_{nn:02d}.jpg" for nn in range(1, 17)}


def test_images_are_full_size_rgb_jpegs(dataset: Path):
    for path in sorted((dataset / "train").iterdir()) + sorted((dataset / "test").iterdir()):
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (1918, 1280)), path.name


def test_masks_are_palette_gifs_matching_the_csv(dataset: Path):
    rows = _read_csv(dataset / "train_masks.csv")
    assert rows[0] == ["img", "rle_mask"]
    names = [r[0] for r in rows[1:]]
    assert names == sorted(p.name for p in (dataset / "train").iterdir())
    for name, code in rows[1:]:
        with Image.open(dataset / "train_masks" / name.replace(".jpg", "_mask.gif")) as im:
            assert (im.format, im.mode, im.size) == ("GIF", "P", (1918, 1280))
            gif = np.array(im)
        assert set(np.unique(gif).tolist()) == {0, 1}, name
        assert 0.03 < gif.mean() < 0.7, name  # a car, neither a speck nor the whole frame
        np.testing.assert_array_equal(rle.decode(code), gif, err_msg=name)


def test_sample_submission_lists_exactly_the_test_images(dataset: Path):
    rows = _read_csv(dataset / "sample_submission.csv")
    assert rows[0] == ["img", "rle_mask"]
    assert [r[0] for r in rows[1:]] == sorted(p.name for p in (dataset / "test").iterdir())
    assert all(r[1] == "1 1" for r in rows[1:])


def test_metadata_has_every_car(dataset: Path):
    rows = _read_csv(dataset / "metadata.csv")
    assert rows[0] == ["id", "year", "make", "model", "trim1", "trim2"]
    ids = [r[0] for r in rows[1:]]
    assert sorted(ids) == sorted(_car_ids(dataset / "train") | _car_ids(dataset / "test"))
    for r in rows[1:]:
        assert 1990 <= int(r[1]) <= 2020 and all(r[2:]), r


def test_same_seed_same_masks_other_seed_other_masks(dataset: Path):
    # generate() renders car i with car_rng(seed, i); re-rendering must give the written masks.
    first_id = writer.car_ids(NUM_TRAIN + NUM_TEST, SEED)[0]
    gif_of = lambda nn: np.array(Image.open(dataset / "train_masks" / f"{first_id}_{nn:02d}_mask.gif"))
    rng = writer.car_rng(SEED, 0)
    car = cars.sample_car(rng)
    for nn in (1, 2, 3):
        _, mask = render.render_view(car, render.view_angle(nn), rng)
        np.testing.assert_array_equal(mask, gif_of(nn))
    other_rng = writer.car_rng(SEED + 1, 0)
    _, other = render.render_view(cars.sample_car(other_rng), render.view_angle(1), other_rng)
    assert np.mean(other != gif_of(1)) > 0.005
    assert writer.car_ids(3, SEED) != writer.car_ids(3, SEED + 1)


def test_output_does_not_depend_on_worker_count(dataset: Path, tmp_path: Path):
    out = tmp_path / "again"
    out.mkdir()  # an existing but empty folder is fine
    writer.generate(out, NUM_TRAIN, num_test_cars=NUM_TEST, seed=SEED, workers=2, progress=False)
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for rel in files:
        assert (dataset / rel).read_bytes() == (out / rel).read_bytes(), rel


def test_views_go_around_the_car():
    # Side views (05, 13) are long and low; front and back (01, 09) are narrow; all are one blob.
    rng = np.random.default_rng(7)
    car = cars.sample_car(rng)
    aspect = {}
    for nn in (1, 3, 5, 9, 13):
        _, mask = render.render_view(car, render.view_angle(nn), rng)
        ys, xs = np.nonzero(mask)
        aspect[nn] = (xs.max() - xs.min()) / (ys.max() - ys.min())
    assert aspect[5] > 1.6 * aspect[1] and aspect[13] > 1.6 * aspect[9]
    assert aspect[1] < aspect[3] < aspect[5]


@pytest.mark.parametrize("paint", ["white", "silver", "pearl"])
def test_light_cars_are_not_separable_by_a_colour_threshold(paint: str):
    """The best single threshold on brightness or any channel, either way round, is a poor mask."""
    rng = np.random.default_rng(11)
    car = cars.sample_car(rng, paint=paint)
    assert car.is_light
    for nn in (1, 5):
        img, mask = render.render_view(car, render.view_angle(nn), rng)
        car_px = mask.reshape(-1).astype(bool)
        best = 0.0
        channels = [img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)] + [img[..., c] for c in range(3)]
        for ch in channels:
            values = np.clip(ch, 0, 255).astype(np.int64).reshape(-1)
            hist_car = np.bincount(values[car_px], minlength=256)
            hist_all = np.bincount(values, minlength=256)
            for tp, predicted in ((np.cumsum(hist_car), np.cumsum(hist_all)),  # car = darker than t
                                  (np.cumsum(hist_car[::-1]), np.cumsum(hist_all[::-1]))):  # car = brighter
                best = max(best, float(np.max(2 * tp / (predicted + car_px.sum()))))
        assert best < 0.9, (paint, nn, best)


def test_a_good_share_of_cars_is_light():
    rng = np.random.default_rng(0)
    share = np.mean([cars.sample_car(rng).is_light for _ in range(300)])
    assert 0.25 <= share <= 0.5


def test_shadow_darkens_the_floor_outside_the_mask():
    rng = np.random.default_rng(5)
    car = cars.sample_car(rng)
    img, mask = render.render_view(car, render.view_angle(5), rng)  # side view
    grey = img.astype(np.float32).mean(2)
    ys, xs = np.nonzero(mask)
    bottom, x0, x1 = ys.max(), xs.min(), xs.max()
    rows = slice(bottom + 2, bottom + 8)
    cols = slice(x0 + (x1 - x0) // 4, x1 - (x1 - x0) // 4)
    assert not mask[rows, cols].any()  # the shadow is not part of the car
    under = grey[rows, cols].mean()
    width = x1 - x0
    beside = np.concatenate([grey[rows, max(0, x0 - width // 2 - 100):max(1, x0 - width // 2)].ravel(),
                             grey[rows, x1 + width // 2:x1 + width // 2 + 100].ravel()]).mean()
    assert under < 0.92 * beside


def test_refuses_a_non_empty_output_folder(tmp_path: Path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(writer.OutputExistsError, match="already exists and is not empty"):
        writer.generate(out, 1, num_test_cars=0, workers=1, progress=False)
    assert writer.main(["--out", str(out), "--cars", "1", "--test_cars", "0", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "--overwrite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch):
    calls = []
    real = writer._render_car_task

    def flaky(task):
        if calls:
            raise KeyboardInterrupt
        calls.append(task)
        return real(task)

    monkeypatch.setattr(writer, "_render_car_task", flaky)
    with pytest.raises(KeyboardInterrupt):
        writer.generate(tmp_path / "data", 1, num_test_cars=1, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_folder(tmp_path: Path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "old.txt").write_text("old")
    writer.generate(out, 1, num_test_cars=0, seed=1, workers=1, progress=False, overwrite=True)
    assert not (out / "old.txt").exists() and len(list((out / "train").iterdir())) == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_cli_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        writer.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--cars", "--test_cars", "--seed", "--quality", "--workers", "--overwrite"):
        assert flag in text
    assert "default: 4" in text and "default: 90" in text
