"""Where examples come from: the Kaggle folder (file paths) or the prepared TFDS dataset (bytes).

Both give the same examples in the same order (sorted by name for training, sample_submission order
for test) and the same split by car, so a run reads the same batches from either. Pseudo-labelled test
photos (``pseudo_labelled``: a submission CSV's masks on the test photos) come from either source too.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

from carvana_jax import score
from carvana_jax.data import kaggle


class Subset:
    """Items ``indices`` of a random-access source, as a picklable sequence (grain's source)."""

    def __init__(self, source, indices: Sequence[int]):
        self.source = source
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Subset(self.source, self.indices[index])
        return self.source[self.indices[index]]

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, {len(self)} items)"


def tfds_dir(config) -> str:
    return config.tfds_dir or os.path.join(config.data_dir, "tfds")


def _tfds_split(config, split: str):
    from carvana_jax.data import tfds_carvana  # imports tensorflow_datasets: only when asked for
    return tfds_carvana.load_split(tfds_dir(config), split)


def train_and_val(config) -> tuple[Sequence, Sequence]:
    """(train, val) examples of ``config.data_source``, whole cars held out for validation: the cars of
    ``config.val_cars`` when it lists any, else a seeded ``val_fraction`` of them."""
    val_cars = tuple(config.get("val_cars", ()))
    if config.data_source == "folder":
        return kaggle.split_by_car(kaggle.index_train(config.data_dir), config.val_fraction, config.seed, val_cars)
    source = _tfds_split(config, "train")
    refs = [kaggle.Record(name, car, angle, image_path=f"{name}.jpg") for name, car, angle in source.metadata]
    position = {ref.name: i for i, ref in enumerate(refs)}
    # The folder's order (sorted by name), so both sources give the same batches for the same seed.
    train, val = kaggle.split_by_car(sorted(refs, key=lambda r: r.name), config.val_fraction, config.seed,
                                     val_cars)
    return (Subset(source, [position[r.name] for r in train]), Subset(source, [position[r.name] for r in val]))


def train_index(config) -> list[tuple[str, str]]:
    """(name, car id) of every training example, in the order ``train_and_val`` keeps them (by name), read
    without touching the photos."""
    if config.data_source == "folder":
        return [(r.name, r.car_id) for r in kaggle.index_train(config.data_dir)]
    return sorted((name, car) for name, car, _ in _tfds_split(config, "train").metadata)


def test_examples(config) -> Sequence:
    """The test photos in sample_submission order."""
    if config.data_source == "folder":
        return kaggle.index_test(config.data_dir)
    source = _tfds_split(config, "test")
    return Subset(source, range(len(source)))


def example_name(example) -> str:
    """'CARID_NN' of a folder Record or of a TFDS example."""
    return example["name"] if isinstance(example, dict) else example.name


# ---------------------------------------------------------------------------------------------- pseudo-labels

class PseudoLabelled:
    """Test photos with the masks a submission CSV gives them: item i is ``photos[i]`` (a folder Record or
    a TFDS example) with its CSV row's RLE as its mask, ready for the training pipeline.

    The RLEs stay in the CSV and are read by byte offset when an item is asked for: grain sends the
    source to every worker process, and a whole test set's CSV is about a gigabyte."""

    def __init__(self, csv_path: str, photos: Sequence, rows: Sequence[tuple[str, int, int]]):
        if len(photos) != len(rows):
            raise ValueError(f"{len(photos)} photos for {len(rows)} rows")
        self.csv_path = os.path.abspath(csv_path)
        self.photos = photos
        self.rows = list(rows)  # (img, byte offset of its line, the line's length without the newline)

    def __len__(self) -> int:
        return len(self.rows)

    def rle(self, index: int) -> str:
        """The RLE mask of item ``index``, as its row of the CSV holds it."""
        img, offset, length = self.rows[index]
        try:
            with open(self.csv_path, "rb") as f:
                f.seek(offset)
                line = f.read(length)
        except OSError as e:
            raise kaggle.DataError(f"{self.csv_path}: cannot read the pseudo-labels ({e.strerror or e})") from e
        head = f"{img},".encode()
        if not line.startswith(head):
            raise kaggle.DataError(f"{self.csv_path} changed since training started ({img}'s row moved); "
                                   "restart the run")
        return line[len(head):].decode("ascii")

    def __getitem__(self, index: int):
        photo, text = self.photos[index], self.rle(index)
        if isinstance(photo, kaggle.Record):
            return dataclasses.replace(photo, mask_rle=text)
        return {**photo, "mask_rle": text}

    def __repr__(self) -> str:
        return f"PseudoLabelled({self.csv_path!r}, {len(self)} photos)"


def read_pseudo_labels(path: str) -> list[tuple[str, int, int]]:
    """(img, byte offset, length) of each row of a submission CSV (``img,rle_mask``), after the checks
    ``carvana_jax.score`` makes of a submission (header, two columns, each image once, well-formed runs
    inside a 1918×1280 mask); a DataError names the CSV and the first problem. Rows with an empty mask
    are left out (a test photo always shows a car: an empty prediction is no label to learn from)."""
    where = f"pseudo_labels {path}"
    if path.endswith(".gz"):
        raise kaggle.DataError(f"{where}: gzipped; training reads its rows by offset, so gunzip it first")
    if not os.path.isfile(path):
        raise kaggle.DataError(f"{where}: no such file (a submission CSV img,rle_mask, e.g. from "
                               "`python -m carvana_jax.eval --split test` or a cross-validation's submission.csv)")
    rows, empty = [], 0
    with open(path, "rb") as f:
        offset = len(f.readline())  # the header: score.validate_submission checks it
        for number, line in enumerate(f, start=2):
            body = line.rstrip(b"\r\n")
            if b'"' in body:
                raise kaggle.DataError(f"{where}: line {number} has quoted fields; expected plain img,rle_mask rows "
                                       "as carvana_jax.eval writes them")
            name, comma, text = body.partition(b",")
            if comma and not text.strip():
                empty += 1
            elif body:
                rows.append((name.decode("utf-8", "replace"), offset, len(body)))
            offset += len(line)
    problems = score.validate_submission(path, [name for name, _, _ in rows])
    problems = [p for p in problems if not p.endswith(": not an expected image")]  # the empty masks' rows
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise kaggle.DataError(f"{where}: {problems[0]}{more}")
    if empty:
        logging.getLogger(__name__).warning("%s: %d rows with an empty mask left out", where, empty)
    if not rows:
        raise kaggle.DataError(f"{where}: no row with a non-empty mask to train on")
    return rows


def pseudo_labelled(config) -> PseudoLabelled | None:
    """The test photos of ``config.pseudo_labels`` (a submission CSV) with its masks, from the config's
    source (the test photos of DATA_DIR as ``kaggle.index_test`` finds them, or the TFDS test split); None
    when the config has no pseudo-labels. A photo the CSV names that is not among the test photos is a
    DataError naming it and the CSV."""
    path = config.get("pseudo_labels", "")
    if not path:
        return None
    rows = read_pseudo_labels(path)
    if config.data_source == "folder":
        tests = {f"{r.name}.jpg": r for r in kaggle.index_test(config.data_dir)}
        where = os.path.dirname(next(iter(tests.values())).image_path)
    else:
        source = _tfds_split(config, "test")
        tests = {f"{name}.jpg": i for i, (name, _, _) in enumerate(source.metadata)}
        where = f"the TFDS test split ({tfds_dir(config)})"
    if missing := next((img for img, _, _ in rows if img not in tests), None):
        raise kaggle.DataError(f"{missing}: listed in the pseudo-labels {path} but not a test photo of {where}")
    if config.data_source == "folder":
        photos = [tests[img] for img, _, _ in rows]
    else:
        photos = Subset(source, [tests[img] for img, _, _ in rows])
    return PseudoLabelled(path, photos, rows)
