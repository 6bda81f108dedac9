"""Pseudo-labels: test photos with a submission CSV's masks mixed into every training batch."""
import os

import grain
import numpy as np
import pytest
from helpers import small_config, take

from carvana_jax import rle, train
from carvana_jax.config import validate_config
from carvana_jax.data import augment, kaggle, pipeline, sources
from carvana_jax.errors import ConfigError

FULL = rle.FULL_SHAPE
ALL_CAR = f"1 {FULL[0] * FULL[1]}"  # a mask no real photo has: every pixel is car


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        f.write("img,rle_mask\n")
        f.writelines(f"{img},{text}\n" for img, text in rows)
    return str(path)


@pytest.fixture(scope="module")
def records(kaggle_dir):
    return kaggle.index_train(kaggle_dir)


@pytest.fixture(scope="module")
def test_names(kaggle_dir):
    return kaggle.read_submission_order(kaggle_dir)


@pytest.fixture
def all_car_csv(tmp_path, test_names):
    """Six test photos whose pseudo-masks are all car: in a batch, they are the elements whose mask is all 1."""
    return write_csv(tmp_path / "pseudo.csv", [(name, ALL_CAR) for name in test_names[:6]])


def pseudo_config(kaggle_dir, csv_path, fraction=0.5, **overrides):
    config = small_config(kaggle_dir, pseudo_labels=csv_path, pseudo_fraction=fraction, val_fraction=0.0,
                          **overrides)
    config.augment.enabled = False  # every mask keeps its every pixel: an all-car mask stays all car
    validate_config(config)
    return config


def is_pseudo(batch):
    return [bool(mask.all()) for mask in batch["mask"]]


@pytest.mark.parametrize("batch_size,fraction,expected", [(4, 0.5, 2), (4, 0.25, 1), (8, 0.3, 2), (3, 0.5, 2)])
def test_every_batch_holds_round_fraction_times_batch_pseudo_labelled_photos(
        kaggle_dir, records, all_car_csv, test_names, batch_size, fraction, expected):
    config = pseudo_config(kaggle_dir, all_car_csv, fraction, batch_size=batch_size)
    assert pipeline.pseudo_per_batch(fraction, batch_size) == expected
    batches = take(pipeline.train_dataset(records, config), 6)
    assert [sum(is_pseudo(b)) for b in batches] == [expected] * 6
    # The pseudo-labelled elements are the CSV's test photos, the others training photos, as the pipeline
    # loads them without augmentation.
    test_dir = os.path.join(kaggle_dir, "test")
    photos = {name: augment.load_pair(os.path.join(test_dir, name), None, config.image_size)[0]
              for name in test_names[:6]}
    train_photos = [augment.load_pair(r.image_path, None, config.image_size)[0] for r in records]
    for batch in batches:
        for image, pseudo in zip(batch["image"], is_pseudo(batch)):
            pool = photos.values() if pseudo else train_photos
            assert any(np.array_equal(image, p) for p in pool)


def test_mixed_batches_interleave_two_streams_each_in_its_own_order():
    real = grain.MapDataset.source(list(range(100)))
    pseudo = grain.MapDataset.source(list(range(1000, 1100)))
    mixed = pipeline.MixedBatches(real, pseudo, batch_size=5, per_batch=2)
    items = [mixed[i] for i in range(50)]
    batches = [items[i:i + 5] for i in range(0, 50, 5)]
    assert all(sum(x >= 1000 for x in b) == 2 for b in batches)
    assert [x for x in items if x < 1000] == list(range(30))  # 3 real elements a batch, in the real stream's order
    assert [x for x in items if x >= 1000] == list(range(1000, 1020))
    assert [mixed.is_pseudo(i) for i in range(5)] == [x >= 1000 for x in batches[0]]
    with pytest.raises(ValueError, match="do not fit"):
        pipeline.MixedBatches(real, pseudo, batch_size=4, per_batch=4)


def test_without_pseudo_labels_the_stream_is_unchanged(kaggle_dir, records, all_car_csv):
    plain = small_config(kaggle_dir, val_fraction=0.0)
    base = grain.MapDataset.source(records)
    assert pipeline.mix_pseudo_labels(base, plain) is base
    mixed = take(pipeline.train_dataset(records, pseudo_config(kaggle_dir, all_car_csv, 0.5)), 2)
    assert sum(map(sum, map(is_pseudo, mixed))) == 4


def test_masks_round_trip_from_the_csv_and_photos_come_from_the_test_folder(kaggle_dir, test_names, tmp_path):
    rng = np.random.default_rng(0)
    masks = {}
    for name in test_names[:4]:
        mask = np.zeros(FULL, np.uint8)
        y, x = rng.integers(0, 1000), rng.integers(0, 1600)
        mask[y:y + rng.integers(50, 280), x:x + rng.integers(50, 318)] = 1
        mask[rng.random(FULL) < 0.001] = 1  # ragged: many runs
        masks[name] = mask
    rows = [(name, rle.encode(mask)) for name, mask in masks.items()] + [(test_names[4], "")]  # an empty mask
    path = write_csv(tmp_path / "p.csv", rows)
    source = sources.pseudo_labelled(small_config(kaggle_dir, pseudo_labels=path, pseudo_fraction=0.5))
    assert len(source) == 4  # the empty mask is no label: left out
    for i, name in enumerate(masks):
        element = source[i]
        assert element.image_path == os.path.join(kaggle_dir, "test", name)
        parts = pipeline.element_parts(element)
        np.testing.assert_array_equal(parts.mask.decode(FULL), masks[name])


def test_same_batches_after_a_restart_at_a_stream_position_on_any_process_count(kaggle_dir, records, all_car_csv):
    config = pseudo_config(kaggle_dir, all_car_csv, 0.5)
    whole = take(pipeline.train_dataset(records, config), 5)
    again = take(pipeline.train_dataset(records, config), 5)
    for a, b in zip(whole, again):
        np.testing.assert_array_equal(a["image"], b["image"])
    # A run resumed at stream position 3 batches (what train's checkpoint stores) continues the same batches,
    # whether in one process or two.
    position = 3 * config.batch_size
    resumed = take(pipeline.train_dataset(records, config, start=position), 2)
    halves = [take(pipeline.train_dataset(records, config, p, 2, start=position), 2) for p in (0, 1)]
    for k in range(2):
        for key in ("image", "mask"):
            np.testing.assert_array_equal(resumed[k][key], whole[3 + k][key])
            np.testing.assert_array_equal(np.concatenate([halves[0][k][key], halves[1][k][key]]), whole[3 + k][key])
    # A worker process (the source is pickled to it and reads the CSV by offset) gives the same batches.
    workers = take(pipeline.train_dataset(records, pseudo_config(kaggle_dir, all_car_csv, 0.5, num_workers=1)), 5)
    for a, b in zip(whole, workers):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])


def test_a_photo_missing_from_the_test_folder_is_named_with_the_csv(kaggle_dir, test_names, tmp_path):
    path = write_csv(tmp_path / "p.csv", [(test_names[0], ALL_CAR), ("ffffffffffff_01.jpg", ALL_CAR)])
    config = small_config(kaggle_dir, pseudo_labels=path, pseudo_fraction=0.5)
    message = r"ffffffffffff_01\.jpg: listed in the pseudo-labels .*p\.csv but not a test photo of .*test"
    with pytest.raises(kaggle.DataError, match=message):
        sources.pseudo_labelled(config)


@pytest.mark.parametrize("text,problem", [("1 2 3", "odd number of values"), ("5 3 2 1", "out of order"),
                                          ("1 x", "not an integer"), (f"1 {FULL[0] * FULL[1] + 1}", "past the last")])
def test_a_malformed_rle_is_named_with_its_photo_and_the_csv(kaggle_dir, test_names, tmp_path, text, problem):
    path = write_csv(tmp_path / "p.csv", [(test_names[0], ALL_CAR), (test_names[1], text)])
    config = small_config(kaggle_dir, pseudo_labels=path, pseudo_fraction=0.5)
    with pytest.raises(kaggle.DataError, match=f"pseudo_labels .*p.csv: {test_names[1]}: .*{problem}"):
        sources.pseudo_labelled(config)


def test_unreadable_csvs_are_one_clear_error(kaggle_dir, test_names, tmp_path):
    def error(path):
        with pytest.raises(kaggle.DataError) as info:
            sources.pseudo_labelled(small_config(kaggle_dir, pseudo_labels=str(path), pseudo_fraction=0.5))
        return str(info.value)

    assert "no such file" in error(tmp_path / "none.csv")
    (tmp_path / "h.csv").write_text("image,mask\na,b\n")
    assert "expected exactly the header img,rle_mask" in error(tmp_path / "h.csv")
    twice = write_csv(tmp_path / "t.csv", [(test_names[0], ALL_CAR), (test_names[0], ALL_CAR)])
    assert "listed 2 times" in error(twice)
    assert "no row with a non-empty mask" in error(write_csv(tmp_path / "e.csv", [(test_names[0], "")]))


def test_the_config_keys_are_checked_together(kaggle_dir):
    def check(**overrides):
        validate_config(small_config(kaggle_dir, **overrides))

    check(pseudo_labels="p.csv", pseudo_fraction=0.25)
    for overrides, message in (({"pseudo_fraction": 1.0, "pseudo_labels": "p.csv"}, r"in \[0, 1\)"),
                               ({"pseudo_fraction": -0.1}, r"in \[0, 1\)"),
                               ({"pseudo_labels": "p.csv"}, "pseudo_fraction=0"),
                               ({"pseudo_fraction": 0.25}, "no pseudo_labels"),
                               ({"pseudo_labels": "p.csv", "pseudo_fraction": 0.1}, "rounds to 0"),
                               ({"pseudo_labels": "p.csv", "pseudo_fraction": 0.9}, "rounds to 4")):
        with pytest.raises(ConfigError, match=message):
            check(**overrides)


def test_from_tfds_the_mixed_batches_equal_the_folders(kaggle_dir, records, all_car_csv, test_names, tmp_path):
    from carvana_jax.data import tfds_carvana
    tfds_dir = str(tmp_path / "tfds")
    tfds_carvana.build(kaggle_dir, tfds_dir, progress=False)
    folder = pseudo_config(kaggle_dir, all_car_csv, 0.5)
    from_tfds = pseudo_config(kaggle_dir, all_car_csv, 0.5, data_source="tfds", tfds_dir=tfds_dir)
    a = take(pipeline.train_dataset(sources.train_and_val(folder)[0], folder), 3)
    b = take(pipeline.train_dataset(sources.train_and_val(from_tfds)[0], from_tfds), 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["mask"], y["mask"])
    missing = write_csv(tmp_path / "m.csv", [("ffffffffffff_01.jpg", ALL_CAR)])
    from_tfds.pseudo_labels = missing
    with pytest.raises(kaggle.DataError, match="not a test photo of the TFDS test split"):
        sources.pseudo_labelled(from_tfds)


@pytest.mark.slow
def test_training_with_pseudo_labels_runs(tiny_config, all_car_csv, tmp_path):
    tiny_config.update(num_train_steps=2, pseudo_labels=all_car_csv, pseudo_fraction=0.25, val_fraction=0.0,
                       image_size=(32, 48))
    tiny_config.model.depth = 2
    # On all devices: pseudo-labels change the data, not the step, which test_cv and test_train compile too.
    result = train.train_and_evaluate(tiny_config, str(tmp_path / "run"), progress=False)
    assert result["step"] == 2 and np.isfinite(result["loss"])
