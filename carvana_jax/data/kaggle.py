"""The Kaggle Carvana download: find its files, index images and masks, split by car.

Layout (as `kaggle competitions download -c carvana-image-masking-challenge` gives it, zipped or
unzipped): train/ID_NN.jpg, train_masks/ID_NN_mask.gif, train_masks.csv, test/ID_NN.jpg,
sample_submission.csv, metadata.csv. Kaggle's higher-quality JPEGs of the same photos, train_hq/ and
test_hq/ (same names; train_hq.zip / test_hq.zip), are read instead of train/ and test/ when present.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import zipfile
from collections.abc import Sequence

import numpy as np

from carvana_jax.errors import DataError

GET_DATA = (
    "get it with `kaggle competitions download -c carvana-image-masking-challenge -p DIR` "
    "or make synthetic data with `python -m carvana_jax.synthetic --out DIR --cars 24`"
)


@dataclasses.dataclass(frozen=True)
class Record:
    """One photo: its name (``ID_NN``), car id, angle (1..16), file paths, and its mask's RLE when
    train_masks.csv lists it (decoding that is ~30x cheaper than decoding the GIF)."""
    name: str
    car_id: str
    angle: int
    image_path: str
    mask_path: str | None = None
    mask_rle: str | None = None


def parse_name(filename: str) -> tuple[str, str, int]:
    """('ID_NN', 'ID', NN) from a file name like ``ID_NN.jpg`` or ``ID_NN_mask.gif``."""
    stem = os.path.basename(filename).split(".")[0].removesuffix("_mask")
    car_id, _, angle = stem.rpartition("_")
    if not car_id or not angle.isdigit():
        raise DataError(f"{filename}: not a Carvana file name (expected CARID_NN.jpg)")
    return stem, car_id, int(angle)


def ensure_unzipped(data_dir: str, member: str) -> str:
    """Path of ``member`` (a folder or file) in data_dir, extracting ``member.zip`` once if needed.

    Extraction goes to a temporary folder renamed into place, so an interrupted unzip is redone.
    """
    path = os.path.join(data_dir, member)
    if os.path.exists(path):
        return path
    archive = path + ".zip"
    if not os.path.exists(archive):
        return path
    tmp = path + ".unzipping"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
    except zipfile.BadZipFile as e:
        raise DataError(f"{archive}: not a readable zip ({e}); download it again") from e
    inner = os.path.join(tmp, member)  # Kaggle's zips hold the folder (or file) itself
    os.replace(inner if os.path.exists(inner) else tmp, path)
    shutil.rmtree(tmp, ignore_errors=True)
    return path


def image_dir(data_dir: str, split: str) -> str:
    """The folder of ``split``'s photos ('train' or 'test'): Kaggle's higher-quality ``SPLIT_hq/`` when it or
    ``SPLIT_hq.zip`` is there (extracted once), else ``SPLIT/`` (or ``SPLIT.zip``)."""
    hq = f"{split}_hq"
    if os.path.exists(os.path.join(data_dir, hq)) or os.path.exists(os.path.join(data_dir, hq + ".zip")):
        return ensure_unzipped(data_dir, hq)
    return ensure_unzipped(data_dir, split)


def _require_dir(data_dir: str) -> None:
    if not os.path.isdir(data_dir) or not os.listdir(data_dir):
        raise DataError(f"data_dir {data_dir!r} is missing or empty; {GET_DATA}")


def _list_images(folder: str, what: str) -> list[str]:
    if not os.path.isdir(folder):
        raise DataError(f"{folder} (the {what} images) is missing; {GET_DATA}")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(".jpg"))
    if not names:
        raise DataError(f"{folder} holds no .jpg images; {GET_DATA}")
    return names


def index_train(data_dir: str) -> list[Record]:
    """Every training photo with its mask GIF, sorted by name; a photo without a mask is an error."""
    _require_dir(data_dir)
    images = image_dir(data_dir, "train")
    mask_dir = ensure_unzipped(data_dir, "train_masks")
    names = _list_images(images, "training")
    if not os.path.isdir(mask_dir):
        raise DataError(f"{mask_dir} (the training masks) is missing; {GET_DATA}")
    masks = set(os.listdir(mask_dir))
    rles = read_train_rles(data_dir)
    records = []
    for filename in names:
        name, car_id, angle = parse_name(filename)
        mask_file = f"{name}_mask.gif"
        if mask_file not in masks:
            raise DataError(f"{os.path.join(mask_dir, mask_file)}: mask missing for {filename}")
        records.append(Record(name, car_id, angle, os.path.join(images, filename),
                              os.path.join(mask_dir, mask_file), rles.get(filename)))
    return records


def read_train_rles(data_dir: str) -> dict[str, str]:
    """{image file name: RLE of its mask} from train_masks.csv (zipped or not); {} when it is missing
    or has no ``img,rle_mask`` header. Kaggle's CSV holds the same masks as the GIFs."""
    path = ensure_unzipped(data_dir, "train_masks.csv")
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as f:
        rows = csv.reader(f)
        if next(rows, [])[:2] != ["img", "rle_mask"]:
            return {}
        return {row[0]: row[1] for row in rows if len(row) >= 2}


def read_submission_order(data_dir: str) -> list[str]:
    """Image file names in sample_submission.csv order (the order Kaggle expects)."""
    path = ensure_unzipped(data_dir, "sample_submission.csv")
    if not os.path.exists(path):
        raise DataError(f"{path} is missing; it fixes the submission's order; {GET_DATA}")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:1] != ["img"]:
        raise DataError(f"{path}: expected a header starting with 'img'")
    return [row[0] for row in rows[1:] if row]


def index_test(data_dir: str) -> list[Record]:
    """Test photos in sample_submission order; a listed photo that is missing is an error."""
    _require_dir(data_dir)
    images = image_dir(data_dir, "test")
    present = set(_list_images(images, "test"))
    records = []
    for filename in read_submission_order(data_dir):
        if filename not in present:
            raise DataError(f"{os.path.join(images, filename)}: listed in sample_submission.csv but missing")
        name, car_id, angle = parse_name(filename)
        records.append(Record(name, car_id, angle, os.path.join(images, filename)))
    return records


def split_by_car(records: list[Record], val_fraction: float, seed: int,
                 val_cars: Sequence[str] = ()) -> tuple[list[Record], list[Record]]:
    """(train, val): whole cars go to validation, so no car's angles fall on both sides.

    The held-out cars are ``val_cars`` when given (an explicit list, e.g. one fold of a cross-validation;
    ``val_fraction`` must then be 0), else a seeded random ``val_fraction`` of them."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    cars = sorted({r.car_id for r in records})
    if val_cars:
        if val_fraction > 0:
            raise DataError(f"val_cars and val_fraction={val_fraction} both choose held-out cars; set only one")
        held_out = set(val_cars)
        known = set(cars)
        if unknown := [car for car in val_cars if car not in known]:
            raise DataError(f"val_cars names car {unknown[0]}, which has no photo among the {len(cars)} "
                            "training cars")
        if held_out == known:
            raise DataError(f"val_cars holds out all {len(cars)} training cars: none left to train on")
        return ([r for r in records if r.car_id not in held_out], [r for r in records if r.car_id in held_out])
    num_val = int(round(val_fraction * len(cars)))
    if val_fraction > 0 and num_val == 0:
        num_val = 1
    if num_val >= len(cars) and num_val > 0:
        raise DataError(f"val_fraction={val_fraction} leaves no training cars out of {len(cars)}")
    val_cars = set(np.random.default_rng(seed).permutation(cars)[:num_val].tolist())
    return ([r for r in records if r.car_id not in val_cars], [r for r in records if r.car_id in val_cars])
