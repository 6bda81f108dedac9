"""Indexing the Kaggle layout, splitting by car, and clear errors for bad or missing input."""
import csv
import logging
import os
import shutil
import zipfile

import numpy as np
import pytest
from helpers import small_config
from PIL import Image

from carvana_jax.data import augment, kaggle, pipeline


def copy_subset(kaggle_dir: str, dst, names=None, test: bool = False):
    """A fresh Kaggle-layout folder holding copies of the given training photos (all when None)."""
    dst = str(dst)
    os.makedirs(os.path.join(dst, "train"))
    os.makedirs(os.path.join(dst, "train_masks"))
    for filename in sorted(os.listdir(os.path.join(kaggle_dir, "train"))):
        name = filename.removesuffix(".jpg")
        if names is None or name in names:
            shutil.copy(os.path.join(kaggle_dir, "train", filename), os.path.join(dst, "train", filename))
            shutil.copy(os.path.join(kaggle_dir, "train_masks", f"{name}_mask.gif"),
                        os.path.join(dst, "train_masks", f"{name}_mask.gif"))
    for csv_name in ("train_masks.csv", "sample_submission.csv", "metadata.csv"):
        shutil.copy(os.path.join(kaggle_dir, csv_name), os.path.join(dst, csv_name))
    if test:
        shutil.copytree(os.path.join(kaggle_dir, "test"), os.path.join(dst, "test"))
    return dst


def one_line(message: str) -> bool:
    return "\n" not in message.strip()


def train_names(kaggle_dir):
    return sorted(f.removesuffix(".jpg") for f in os.listdir(os.path.join(kaggle_dir, "train")))


# ------------------------------------------------------------------------------- indexing

def test_index_train(kaggle_dir):
    records = kaggle.index_train(kaggle_dir)
    assert len(records) == 3 * 16
    assert [r.name for r in records] == sorted(r.name for r in records)
    assert len({r.car_id for r in records}) == 3
    for r in records:
        assert os.path.isfile(r.image_path) and os.path.isfile(r.mask_path)
        assert os.path.basename(r.image_path) == f"{r.name}.jpg"
        assert os.path.basename(r.mask_path) == f"{r.name}_mask.gif"
        assert r.name == f"{r.car_id}_{r.angle:02d}" and 1 <= r.angle <= 16
    for car in {r.car_id for r in records}:
        assert sorted(r.angle for r in records if r.car_id == car) == list(range(1, 17))
    # The same names as the CSV of RLE masks that Kaggle ships.
    with open(os.path.join(kaggle_dir, "train_masks.csv")) as f:
        listed = sorted(row["img"].removesuffix(".jpg") for row in csv.DictReader(f))
    assert listed == [r.name for r in records]


def test_parse_name():
    assert kaggle.parse_name("/x/0cdf5b5d0ce1_07.jpg") == ("0cdf5b5d0ce1_07", "0cdf5b5d0ce1", 7)
    assert kaggle.parse_name("0cdf5b5d0ce1_16_mask.gif") == ("0cdf5b5d0ce1_16", "0cdf5b5d0ce1", 16)
    with pytest.raises(kaggle.DataError, match="holiday.jpg"):
        kaggle.parse_name("holiday.jpg")


def test_stray_jpeg_name_is_a_clear_error(kaggle_dir, tmp_path):
    data = copy_subset(kaggle_dir, tmp_path / "d", names=train_names(kaggle_dir)[:2])
    shutil.copy(os.path.join(data, "train", os.listdir(os.path.join(data, "train"))[0]),
                os.path.join(data, "train", "holiday.jpg"))
    with pytest.raises(kaggle.DataError, match="holiday.jpg") as e:
        kaggle.index_train(data)
    assert one_line(str(e.value))


def test_index_test_follows_sample_submission_order(kaggle_dir, tmp_path):
    records = kaggle.index_test(kaggle_dir)
    assert len(records) == 16 and all(r.mask_path is None for r in records)
    with open(os.path.join(kaggle_dir, "sample_submission.csv")) as f:
        assert [r.name + ".jpg" for r in records] == [row["img"] for row in csv.DictReader(f)]
    # An order that is not the sorted one must be kept, too.
    data = copy_subset(kaggle_dir, tmp_path / "d", names=[], test=True)
    order = [r.name + ".jpg" for r in records]
    order = order[5:] + order[:5][::-1]
    with open(os.path.join(data, "sample_submission.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["img", "rle_mask"])
        writer.writerows([name, "1 1"] for name in order)
    shuffled = kaggle.index_test(data)
    assert [r.name + ".jpg" for r in shuffled] == order
    assert all(os.path.isfile(r.image_path) for r in shuffled)


def test_index_test_listed_but_missing(kaggle_dir, tmp_path):
    data = copy_subset(kaggle_dir, tmp_path / "d", names=[], test=True)
    gone = sorted(os.listdir(os.path.join(data, "test")))[3]
    os.remove(os.path.join(data, "test", gone))
    with pytest.raises(kaggle.DataError, match=gone) as e:
        kaggle.index_test(data)
    assert one_line(str(e.value))


# ------------------------------------------------------------------------------- split

def test_split_by_car(kaggle_dir):
    records = kaggle.index_train(kaggle_dir)
    seen_val_cars = set()
    for seed in range(6):
        train, val = kaggle.split_by_car(records, 0.34, seed)
        train_cars, val_cars = {r.car_id for r in train}, {r.car_id for r in val}
        assert not train_cars & val_cars
        assert len(val_cars) == 1 and len(val) == 16  # round(0.34 * 3) = 1 car, all its angles
        assert sorted(train + val, key=lambda r: r.name) == records
        assert [r.name for r in train] == sorted(r.name for r in train)
        again = kaggle.split_by_car(records, 0.34, seed)
        assert again == (train, val)  # deterministic per seed
        seen_val_cars |= val_cars
    assert len(seen_val_cars) > 1  # the seed matters


def test_split_by_car_sizes():
    records = [kaggle.Record(f"car{c:02d}_{a:02d}", f"car{c:02d}", a, f"car{c:02d}_{a:02d}.jpg")
               for c in range(20) for a in range(1, 17)]
    for fraction, cars in ((0.1, 2), (0.25, 5), (0.5, 10), (0.01, 1)):  # at least one car when > 0
        train, val = kaggle.split_by_car(records, fraction, seed=3)
        assert len({r.car_id for r in val}) == cars and len(val) == 16 * cars
        assert not {r.car_id for r in train} & {r.car_id for r in val}
    train, val = kaggle.split_by_car(records, 0.0, seed=3)
    assert val == [] and train == records
    a = kaggle.split_by_car(records, 0.25, seed=1)[1]
    b = kaggle.split_by_car(records, 0.25, seed=2)[1]
    assert {r.car_id for r in a} != {r.car_id for r in b}
    for bad in (1.0, -0.1, 0.99):
        with pytest.raises(kaggle.DataError, match="val_fraction"):
            kaggle.split_by_car(records, bad, seed=0)


# ------------------------------------------------------------------------------- missing data

@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_or_empty_data_dir(tmp_path, make):
    data = tmp_path / "nowhere"
    if make == "empty":
        data.mkdir()
    for index in (kaggle.index_train, kaggle.index_test):
        with pytest.raises(kaggle.DataError) as e:
            index(str(data))
        message = str(e.value)
        assert str(data) in message
        assert "kaggle competitions download -c carvana-image-masking-challenge" in message
        assert "carvana_jax.synthetic" in message
        assert one_line(message)


def test_missing_train_folder(kaggle_dir, tmp_path):
    data = copy_subset(kaggle_dir, tmp_path / "d", names=[])
    shutil.rmtree(os.path.join(data, "train"))
    with pytest.raises(kaggle.DataError, match="kaggle competitions download") as e:
        kaggle.index_train(data)
    assert os.path.join(data, "train") in str(e.value)


def test_missing_mask_names_the_mask_file(kaggle_dir, tmp_path):
    names = train_names(kaggle_dir)[:4]
    data = copy_subset(kaggle_dir, tmp_path / "d", names=names)
    os.remove(os.path.join(data, "train_masks", f"{names[2]}_mask.gif"))
    with pytest.raises(kaggle.DataError) as e:
        kaggle.index_train(data)
    assert os.path.join(data, "train_masks", f"{names[2]}_mask.gif") in str(e.value)
    assert one_line(str(e.value))


# ------------------------------------------------------------------------------- zips

def zip_folder(src_root: str, folder: str, archive: str, prefix: bool = True) -> None:
    """Zip ``src_root/folder`` as Kaggle does: the archive holds ``folder/…`` (or bare files)."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        if prefix:
            zf.write(os.path.join(src_root, folder), folder)  # the folder's own entry
        for filename in sorted(os.listdir(os.path.join(src_root, folder))):
            zf.write(os.path.join(src_root, folder, filename),
                     f"{folder}/{filename}" if prefix else filename)


@pytest.mark.parametrize("prefix", [True, False], ids=["kaggle-layout", "bare-files"])
def test_zipped_layout(kaggle_dir, tmp_path, prefix):
    data = tmp_path / "zipped"
    data.mkdir()
    for csv_name in ("train_masks.csv", "sample_submission.csv", "metadata.csv"):
        shutil.copy(os.path.join(kaggle_dir, csv_name), data / csv_name)
    zip_folder(kaggle_dir, "train", str(data / "train.zip"), prefix)
    zip_folder(kaggle_dir, "train_masks", str(data / "train_masks.zip"), prefix)
    assert not (data / "train").exists()

    records = kaggle.index_train(str(data))
    assert [r.name for r in records] == [r.name for r in kaggle.index_train(kaggle_dir)]
    for r in records:
        assert r.image_path == os.path.join(str(data), "train", f"{r.name}.jpg")
        assert os.path.isfile(r.image_path) and os.path.isfile(r.mask_path)
    original = os.path.join(kaggle_dir, "train", f"{records[7].name}.jpg")
    with open(records[7].image_path, "rb") as a, open(original, "rb") as b:
        assert a.read() == b.read()
    assert sorted(os.listdir(data)) == ["metadata.csv", "sample_submission.csv", "train", "train.zip",
                                        "train_masks", "train_masks.csv", "train_masks.zip"]
    assert sorted(os.listdir(data / "train")) == sorted(os.listdir(os.path.join(kaggle_dir, "train")))
    # A second index reuses the extracted folders.
    assert kaggle.index_train(str(data)) == records


def test_zipped_test_set_and_csv(kaggle_dir, tmp_path):
    data = tmp_path / "zipped"
    data.mkdir()
    zip_folder(kaggle_dir, "test", str(data / "test.zip"))
    with zipfile.ZipFile(data / "sample_submission.csv.zip", "w") as zf:  # Kaggle zips the CSVs, too
        zf.write(os.path.join(kaggle_dir, "sample_submission.csv"), "sample_submission.csv")
    records = kaggle.index_test(str(data))
    assert [r.name for r in records] == [r.name for r in kaggle.index_test(kaggle_dir)]
    assert all(os.path.isfile(r.image_path) for r in records)
    assert (data / "sample_submission.csv").is_file()


def test_unreadable_zip(kaggle_dir, tmp_path):
    data = copy_subset(kaggle_dir, tmp_path / "d", names=[])
    shutil.rmtree(os.path.join(data, "train"))
    with open(os.path.join(data, "train.zip"), "wb") as f:
        f.write(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(kaggle.DataError, match="train.zip") as e:
        kaggle.index_train(data)
    assert one_line(str(e.value))


# ------------------------------------------------------------------------------- bad files

def truncate(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def test_truncated_jpeg_names_the_file(kaggle_dir, tmp_path):
    name = train_names(kaggle_dir)[5]
    data = copy_subset(kaggle_dir, tmp_path / "d", names=[name])
    image = os.path.join(data, "train", f"{name}.jpg")
    mask = os.path.join(data, "train_masks", f"{name}_mask.gif")
    truncate(image)
    for size in ((128, 192), (768, 768)):  # a reduced-scale decode and a full one
        with pytest.raises(kaggle.DataError) as e:
            augment.load_pair(image, mask, size, augment.AugmentParams())
        assert image in str(e.value) and one_line(str(e.value))


def test_truncated_or_garbage_mask_names_the_file(kaggle_dir, tmp_path):
    name = train_names(kaggle_dir)[5]
    data = copy_subset(kaggle_dir, tmp_path / "d", names=[name])
    image = os.path.join(data, "train", f"{name}.jpg")
    mask = os.path.join(data, "train_masks", f"{name}_mask.gif")
    truncate(mask)
    with pytest.raises(kaggle.DataError) as e:
        augment.load_pair(image, mask, (128, 192))
    assert mask in str(e.value)
    with open(mask, "wb") as f:
        f.write(b"GIF89a not really")
    with pytest.raises(kaggle.DataError) as e:
        augment.load_pair(image, mask, (128, 192))
    assert mask in str(e.value) and one_line(str(e.value))


def test_mask_size_mismatch_names_both_files(kaggle_dir, tmp_path):
    name = train_names(kaggle_dir)[0]
    data = copy_subset(kaggle_dir, tmp_path / "d", names=[name])
    image = os.path.join(data, "train", f"{name}.jpg")
    mask = os.path.join(data, "train_masks", f"{name}_mask.gif")
    with Image.open(mask) as gif:
        small = gif.resize((959, 640), Image.NEAREST)
        small.save(mask)
    with pytest.raises(kaggle.DataError) as e:
        augment.load_pair(image, mask, (128, 192))
    message = str(e.value)
    assert image in message and mask in message and one_line(message)
    assert "959" in message and "1918" in message


@pytest.fixture
def data_with_bad_file(kaggle_dir, tmp_path):
    """Eight photos of one car, the fourth (sorted) truncated."""
    names = train_names(kaggle_dir)[:8]
    data = copy_subset(kaggle_dir, tmp_path / "d", names=names)
    bad = os.path.join(data, "train", f"{names[3]}.jpg")
    truncate(bad)
    return data, bad


def test_bad_file_fails_the_pipeline_by_default(data_with_bad_file):
    data, bad = data_with_bad_file
    records = kaggle.index_train(data)
    config = small_config(data, skip_bad_files=False)
    with pytest.raises(kaggle.DataError, match=bad):
        it = iter(pipeline.train_dataset(records, config))
        for _ in range(4):  # 16 draws from 8 records: the bad one comes up
            next(it)
    with pytest.raises(kaggle.DataError, match=bad):
        list(pipeline.eval_dataset(records, config, batch_size=3))


def test_skip_bad_files_train(data_with_bad_file, caplog):
    data, bad = data_with_bad_file
    records = kaggle.index_train(data)
    config = small_config(data, skip_bad_files=True)
    with caplog.at_level(logging.WARNING):
        it = iter(pipeline.train_dataset(records, config))
        batches = [next(it) for _ in range(5)]  # 20 good draws need more than two epochs of 8
    for batch in batches:
        assert batch["image"].shape == (4, 64, 96, 3) and batch["mask"].shape == (4, 64, 96)
        assert "bad" not in batch
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(bad in m for m in warnings), warnings


def test_skip_bad_files_eval(data_with_bad_file, caplog):
    data, bad = data_with_bad_file
    records = kaggle.index_train(data)
    config = small_config(data, skip_bad_files=True)
    with caplog.at_level(logging.WARNING):
        batches = list(pipeline.eval_dataset(records, config, batch_size=3))
    indices = np.concatenate([b["index"] for b in batches]).tolist()
    assert indices == [0, 1, 2, 4, 5, 6, 7]  # every good record once, in order, the bad one skipped
    assert [len(b["index"]) for b in batches] == [3, 3, 1]
    assert any(bad in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.slow
def test_skip_bad_files_with_workers_gives_the_in_process_batches(data_with_bad_file):
    data, _ = data_with_bad_file
    records = kaggle.index_train(data)
    batches = {}
    for workers in (0, 2):
        it = iter(pipeline.train_dataset(records, small_config(data, skip_bad_files=True, num_workers=workers)))
        batches[workers] = [next(it) for _ in range(5)]
        if hasattr(it, "close"):
            it.close()
    for a, b in zip(batches[0], batches[2]):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])


# ------------------------------------------------------------------------------- higher-quality photos

def _hq_copy(src_folder: str, dst_folder, names=None) -> None:
    """The photos of ``src_folder`` re-encoded at JPEG quality 100 (other bytes, same names), as train_hq/ is."""
    os.makedirs(dst_folder)
    for filename in sorted(os.listdir(src_folder)):
        if names is None or filename.removesuffix(".jpg") in names:
            with Image.open(os.path.join(src_folder, filename)) as im:
                im.save(os.path.join(dst_folder, filename), quality=100)


@pytest.mark.parametrize("zipped", [False, True], ids=["folders", "zips"])
def test_hq_folders_are_read_instead_when_present(kaggle_dir, tmp_path, zipped):
    names = train_names(kaggle_dir)[:6]
    data = copy_subset(kaggle_dir, tmp_path / "d", names=names, test=True)
    hq_root = str(tmp_path / "hq") if zipped else data
    _hq_copy(os.path.join(data, "train"), os.path.join(hq_root, "train_hq"))
    _hq_copy(os.path.join(data, "test"), os.path.join(hq_root, "test_hq"))
    if zipped:
        zip_folder(hq_root, "train_hq", os.path.join(data, "train_hq.zip"))
        zip_folder(hq_root, "test_hq", os.path.join(data, "test_hq.zip"))
    plain_train, plain_test = kaggle.index_train(kaggle_dir), kaggle.index_test(kaggle_dir)
    records = kaggle.index_train(data)
    assert [r.name for r in records] == names
    for r in records:
        assert r.image_path == os.path.join(data, "train_hq", f"{r.name}.jpg")
        assert r.mask_path == os.path.join(data, "train_masks", f"{r.name}_mask.gif")  # masks: as before
        assert r.mask_rle == next(p.mask_rle for p in plain_train if p.name == r.name)
    tests = kaggle.index_test(data)
    assert [r.name for r in tests] == [r.name for r in plain_test]
    assert all(r.image_path == os.path.join(data, "test_hq", f"{r.name}.jpg") for r in tests)
    # The pipeline reads the hq bytes (the quality-100 decode), not the train/ photo's.
    config = small_config(data)
    item = pipeline.LoadForEval(config.image_size).map_with_index(0, records[0])
    hq_photo, full_hw = augment.decode_image(records[0].image_path, config.image_size)
    matrix = augment.composed_matrix(augment.AugmentParams(), full_hw, hq_photo.shape[:2], config.image_size)
    np.testing.assert_array_equal(item["image"], augment.warp(hq_photo, matrix, config.image_size))
    with open(records[0].image_path, "rb") as a, open(os.path.join(data, "train", f"{names[0]}.jpg"), "rb") as b:
        assert a.read() != b.read()
    # Without the hq folders (and zips), train/ and test/ again.
    for folder in ("train_hq", "test_hq"):
        shutil.rmtree(os.path.join(data, folder))
        if zipped:
            os.remove(os.path.join(data, f"{folder}.zip"))
    assert kaggle.index_train(data)[0].image_path == os.path.join(data, "train", f"{names[0]}.jpg")
    assert kaggle.image_dir(data, "test") == os.path.join(data, "test")


def test_hq_folder_alone_without_train(kaggle_dir, tmp_path):
    data = copy_subset(kaggle_dir, tmp_path / "d", names=train_names(kaggle_dir)[:3])
    os.rename(os.path.join(data, "train"), os.path.join(data, "train_hq"))
    records = kaggle.index_train(data)
    assert len(records) == 3 and all("train_hq" in r.image_path for r in records)
