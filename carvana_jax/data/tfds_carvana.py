"""The Kaggle Carvana download as a TFDS dataset ``carvana``, built and read without TensorFlow.

Build it once (``python -m carvana_jax.data.prepare --data_dir D --tfds_dir T``), then read any split
by random access with :func:`load_split`. Every example holds the ORIGINAL files, byte for byte:

=============  ==========================================  =======================================
feature        TFDS feature                                value
=============  ==========================================  =======================================
``image``      ``Scalar(np.object_)`` (a bytes string)     the JPEG file as downloaded
``mask``       ``Scalar(np.object_)``                      the mask GIF as downloaded; b'' in test
``mask_rle``   ``Text()``                                  Kaggle RLE of that GIF's mask; '' in test
``id``         ``Text()``                                  photo name, e.g. ``00087a6bd4dc_01``
``car_id``     ``Text()``                                  e.g. ``00087a6bd4dc``
``angle``      ``Scalar(np.int32)``                        1..16
=============  ==========================================  =======================================

Why plain bytes: TFDS needs TensorFlow only to encode and check arrays and images
(``tfds.features.Image`` would decode and re-check every photo with TF ops). Bytes, text and
scalars go straight into a ``tf.train.Example`` protobuf (TFDS ships its own copy of the proto, so
no TF there), and ``ExampleParserNp`` reads them back with NumPy. The photo is decoded later, in
the input pipeline, at the reduced DCT scale the model size allows.

Order: both splits are written unshuffled (``disable_shuffling``): ``train`` in file-name order
(as :func:`kaggle.index_train` gives it, so the same seed splits and shuffles it exactly as the
folder reader), ``test`` in ``sample_submission.csv`` order. The (name, car_id, angle) of every
example, in that order, is kept in the dataset's ``metadata.json`` (``info.metadata``), so the
split by car needs no pass over the images.

Validation while building: every JPEG is fully decoded (a truncated one is a DataError naming
it), every training photo needs its mask GIF, which must decode and have the photo's size. With
``skip_bad_files=True`` such examples are left out, logged one by one, counted and listed in the
metadata. ``train_masks.csv`` (if present) is checked against the GIFs; ``mask_rle`` is always the
RLE of the GIF, so the two mask features never disagree.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import io
import json
import os
import resource
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image, UnidentifiedImageError

from carvana_jax import rle
from carvana_jax.data import kaggle
from carvana_jax.errors import DataError

NAME = "carvana"
DATASET_VERSION = "1.0.0"
SPLITS = ("train", "test")
HOMEPAGE = "https://www.kaggle.com/c/carvana-image-masking-challenge"


def prepare_command(data_dir: str = "D", tfds_dir: str = "T") -> str:
    return f"python -m carvana_jax.data.prepare --data_dir {data_dir} --tfds_dir {tfds_dir}"


_INSTRUCTIONS = """\
Download the Kaggle Carvana Image Masking Challenge data (accept the competition rules on
https://www.kaggle.com/c/carvana-image-masking-challenge first) into the manual directory:

    kaggle competitions download -c carvana-image-masking-challenge -p MANUAL_DIR

It must hold, zipped or unzipped (a `NAME.zip` is extracted next to itself on first use):

    train/ID_NN.jpg              (or train.zip)           training photos, 1918x1280 JPEG
    train_masks/ID_NN_mask.gif   (or train_masks.zip)     their masks, palette GIF, 1 = car
    train_masks.csv              (or train_masks.csv.zip) RLE of the masks (optional, cross-checked)
    test/ID_NN.jpg               (or test.zip)            test photos, no masks
    train_hq/, test_hq/          (or their .zip; optional) higher-quality JPEGs, read instead when there
    sample_submission.csv        (or .csv.zip)            fixes the order of the test split

Or make a small synthetic dataset in the same layout:

    python -m carvana_jax.synthetic --out MANUAL_DIR --cars 24

Then: python -m carvana_jax.data.prepare --data_dir MANUAL_DIR --tfds_dir TFDS_DIR
"""


# --------------------------------------------------------------------------------------------
# Reading and checking one example
# --------------------------------------------------------------------------------------------

def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e


def jpeg_size(data: bytes, path: str) -> tuple[int, int]:
    """(width, height) of a JPEG after decoding ALL of it; a truncated or corrupt one is a DataError."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                raise DataError(f"{path}: not a JPEG (found {im.format})")
            im.load()  # the whole entropy-coded stream; PIL raises on truncation
            return im.size
    except DataError:
        raise
    except UnidentifiedImageError as e:
        raise DataError(f"{path}: not an image") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable or truncated JPEG ({e})") from e


def decode_mask_bytes(data: bytes, path: str) -> np.ndarray:
    """Binary uint8 mask (1 = car) of a Carvana mask GIF given as bytes (palette index > 0 = car)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mask = np.asarray(im if im.mode in ("P", "L", "1") else im.convert("L"))
    except UnidentifiedImageError as e:
        raise DataError(f"{path}: not an image") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable mask ({e})") from e
    return (mask > 0).astype(np.uint8)


def _normalise_rle(s: str) -> str:
    return " ".join(s.split())


def _example(record: kaggle.Record, csv_rle: str | None) -> tuple[dict, str | None]:
    """The TFDS example of one record, checked; and a warning when train_masks.csv disagrees."""
    image = _read_bytes(record.image_path)
    width, height = jpeg_size(image, record.image_path)
    example = {"image": image, "mask": b"", "mask_rle": "", "id": record.name, "car_id": record.car_id,
               "angle": np.int32(record.angle)}
    if record.mask_path is None:
        return example, None
    if not os.path.exists(record.mask_path):
        raise DataError(f"{record.mask_path}: mask missing for {os.path.basename(record.image_path)}")
    mask_bytes = _read_bytes(record.mask_path)
    mask = decode_mask_bytes(mask_bytes, record.mask_path)
    if mask.shape != (height, width):
        raise DataError(f"{record.mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                        f"{record.image_path} is {width}x{height}")
    mask_rle = rle.encode(mask)
    warning = None
    if csv_rle is not None and _normalise_rle(csv_rle) != mask_rle:
        warning = (f"train_masks.csv: the RLE of {record.name}.jpg differs from {record.mask_path}; "
                   "using the GIF's")
    example.update(mask=mask_bytes, mask_rle=mask_rle)
    return example, warning


def _ordered_map(fn: Callable, items: list, workers: int) -> Iterator:
    """fn over items in order, ``workers`` threads at a time (PIL and zlib release the GIL while
    decoding); at most 2×workers results are held, so memory stays flat. Exceptions are returned, not
    raised, so the caller sees them in item order."""
    def call(item):
        try:
            return fn(item)
        except Exception as e:  # noqa: BLE001  (handed to the caller, in order)
            return e
    if workers <= 1:
        yield from map(call, items)
        return
    window = 2 * workers
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="carvana-check") as pool:
        pending = collections.deque()
        it = iter(items)
        try:
            for item in it:
                pending.append(pool.submit(call, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


# --------------------------------------------------------------------------------------------
# Building without TensorFlow
# --------------------------------------------------------------------------------------------

class _GFile:
    """The three ``tf.io.gfile`` calls TFDS's shuffler makes, on etils.epath (no TensorFlow)."""

    @staticmethod
    def GFile(path, mode="r"):
        return epath.Path(path).open(mode)

    @staticmethod
    def exists(path) -> bool:
        return epath.Path(path).exists()

    @staticmethod
    def remove(path) -> None:
        epath.Path(path).unlink()


class _TfShim:
    """Just enough of ``tf`` for ``tensorflow_datasets.core.shuffle``: a split over 1 GB is spilled to
    1000 bucket files through tf.io.gfile, which would import TensorFlow."""

    class io:
        gfile = _GFile

    class errors:
        class ResourceExhaustedError(Exception):
            message = ""


@contextlib.contextmanager
def _tf_free_shuffler():
    from tensorflow_datasets.core import shuffle
    if not hasattr(shuffle, "tf"):  # a TFDS that no longer spills through tf: nothing to do
        yield
        return
    # The 1000 bucket files are open at once; TFDS raises the limit only on a TF error.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = shuffle.BUCKETS_NUMBER + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    saved = shuffle.tf
    shuffle.tf = _TfShim
    try:
        yield
    finally:
        shuffle.tf = saved


def ordered_key(index: int, total: int) -> int:
    """Example key that keeps generation order AND spreads examples evenly over TFDS's buckets.

    With ``disable_shuffling`` TFDS sorts examples by their (integer) key and, above 1 GB, first
    spills them into 1000 buckets by ``key * 1000 // 2**128``; keys 0, 1, 2... would all land in
    bucket 0, which is then sorted in memory (the whole split). Stretched keys keep each bucket
    about 1/1000 of the split. (A string key such as the photo id is replaced by its position
    when shuffling is disabled, so the id is a feature instead.)
    """
    return index * ((1 << 128) // max(total, 1))


# --------------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------------

class Carvana(tfds.core.GeneratorBasedBuilder):
    """Kaggle Carvana Image Masking Challenge: studio photos of cars and their masks."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Original JPEG and GIF bytes, RLE, id, car_id, angle; ArrayRecord; unshuffled."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS finds this through importlib_resources, which tensorflow-datasets 4.9.10 uses but
        # does not declare (tensorflow/datasets#11212); the file is simply this one.
        return epath.Path(__file__)

    def __init__(self, *, skip_bad_files: bool = False, num_workers: int | None = None, progress: bool = True,
                 **kwargs):
        """skip_bad_files: leave out (and count) unreadable photos and missing or bad masks instead of
        failing; num_workers: threads reading and checking files (default: the CPU count, at most 8);
        progress: a tqdm bar per split, over the photos."""
        kwargs.setdefault("file_format", "array_record")
        self.skip_bad_files = bool(skip_bad_files)
        self.progress = bool(progress)
        self.num_workers = max(1, num_workers or min(8, os.cpu_count() or 1))
        self.skipped: dict[str, list[str]] = {}
        super().__init__(**kwargs)
        self._original_state.update(skip_bad_files=self.skip_bad_files, num_workers=num_workers,
                                    progress=self.progress)

    def _info(self) -> tfds.core.DatasetInfo:
        text = lambda doc: tfds.features.Text(doc=doc)
        return tfds.core.DatasetInfo(
            builder=self,
            description="Kaggle Carvana Image Masking Challenge: 1918x1280 studio photos of cars from 16 "
                        "angles; train with binary masks of the car, test without. Stored as the original "
                        "JPEG/GIF bytes (decode them yourself) and the mask's Kaggle RLE.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Scalar(np.object_, doc="the original JPEG file, byte for byte"),
                "mask": tfds.features.Scalar(np.object_, doc="the original mask GIF (index >0 = car); "
                                                             "b'' in test"),
                "mask_rle": text("Kaggle RLE of the mask (1-indexed row-major start length pairs); '' in test"),
                "id": text("photo name CARID_NN, e.g. 00087a6bd4dc_01"),
                "car_id": text("car id, e.g. 00087a6bd4dc"),
                "angle": tfds.features.Scalar(np.int32, doc="turntable position 1..16 (01 = front)"),
            }),
            homepage=HOMEPAGE,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        try:
            data_dir = os.fspath(dl_manager.manual_dir)
        except AssertionError as e:  # TFDS's "does not exist or is empty", with the instructions
            raise DataError(f"data_dir {self._manual_dir_name()} is missing or empty; {kaggle.GET_DATA}") from e
        train = _index_train(data_dir, self.skip_bad_files)
        test = kaggle.index_test(data_dir)
        rles = kaggle.read_train_rles(data_dir)
        self.info.metadata["examples"] = {}
        self.info.metadata["skipped"] = {}
        return {
            "train": self._generate_examples(train, rles, "train"),
            "test": self._generate_examples(test, None, "test"),
        }

    def _manual_dir_name(self) -> str:
        return os.fspath(self._download_config_manual_dir or "(TFDS default manual dir)")

    _download_config_manual_dir = None

    def _download_and_prepare(self, dl_manager, download_config=None, **kwargs):
        self._download_config_manual_dir = getattr(download_config, "manual_dir", None)
        with _tf_free_shuffler():
            return super()._download_and_prepare(dl_manager, download_config=download_config, **kwargs)

    def _generate_examples(self, records: list[kaggle.Record], rles: dict[str, str] | None, split: str):
        skipped: list[str] = []
        examples: list[list] = []
        self.skipped[split] = skipped
        mismatches = 0
        from tqdm import tqdm
        bar = tqdm(total=len(records), desc=f"carvana {split}", unit="img", dynamic_ncols=True,
                   disable=not self.progress)
        with bar:
            results = _ordered_map(
                lambda r: _example(r, None if rles is None else rles.get(os.path.basename(r.image_path))),
                records, self.num_workers)
            for index, (record, result) in enumerate(zip(records, results)):
                bar.update(1)
                if isinstance(result, DataError) and self.skip_bad_files:
                    skipped.append(str(result))
                    logging.warning("skipping bad file: %s", result)
                    continue
                if isinstance(result, BaseException):
                    raise result
                example, warning = result
                if warning:
                    mismatches += 1
                    logging.warning("%s", warning)
                examples.append([record.name, record.car_id, record.angle])
                yield ordered_key(index, len(records)), example
            bar.set_postfix_str(f"{len(examples)} kept, {len(skipped)} skipped; writing ArrayRecord")
        if skipped:
            logging.warning("%s: skipped %d bad example(s) of %d", split, len(skipped), len(records))
        if mismatches:
            logging.warning("%s: train_masks.csv disagreed with %d GIF(s); mask_rle follows the GIFs",
                            split, mismatches)
        if not examples:
            raise DataError(f"no usable {split} examples: all {len(records)} were bad (see the warnings)")
        self.info.metadata["examples"][split] = examples
        self.info.metadata["skipped"][split] = skipped


def _index_train(data_dir: str, skip_bad_files: bool) -> list[kaggle.Record]:
    """kaggle.index_train, except that with skip_bad_files a photo without a mask is kept (its
    example then fails when generated, and is skipped and counted)."""
    if not skip_bad_files:
        return kaggle.index_train(data_dir)
    image_dir = kaggle.image_dir(data_dir, "train")  # train_hq/ when there is one
    mask_dir = kaggle.ensure_unzipped(data_dir, "train_masks")
    names = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(".jpg")) \
        if os.path.isdir(image_dir) and os.path.isdir(mask_dir) else []
    if not names:
        return kaggle.index_train(data_dir)  # the usual DataError for a missing folder
    records = []
    for filename in names:
        name, car_id, angle = kaggle.parse_name(filename)
        records.append(kaggle.Record(name, car_id, angle, os.path.join(image_dir, filename),
                                     os.path.join(mask_dir, f"{name}_mask.gif")))
    return records


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def dataset_dir(tfds_dir: str) -> str:
    """Where the built dataset lives: TFDS_DIR/carvana/1.0.0."""
    return os.path.join(os.fspath(tfds_dir), NAME, DATASET_VERSION)


def is_prepared(tfds_dir: str) -> bool:
    return os.path.exists(os.path.join(dataset_dir(tfds_dir), "dataset_info.json"))


class CarvanaSource:
    """Random access to one split of a built ``carvana`` dataset; picklable (grain sends it to its
    worker processes, each of which opens the ArrayRecord files on first use).

    ``source[i]`` is ``{'name', 'car_id', 'angle', 'image' (JPEG bytes), 'mask' (GIF bytes, b'' in
    test), 'mask_rle'}``; ``source.metadata`` is every (name, car_id, angle) in index order, read from
    metadata.json without touching the images.
    """

    def __init__(self, tfds_dir: str, split: str):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; the carvana dataset has {', '.join(SPLITS)}")
        self.tfds_dir = os.fspath(tfds_dir)
        self.split = split
        self.path = dataset_dir(self.tfds_dir)
        if not is_prepared(self.tfds_dir):
            raise DataError(f"no prepared carvana dataset in {self.tfds_dir}; build it with "
                            f"`{prepare_command(tfds_dir=self.tfds_dir)}`")
        meta_path = os.path.join(self.path, "metadata.json")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            rows = meta["examples"][split]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{meta_path}: unreadable or incomplete ({e}); rebuild with "
                            f"`{prepare_command(tfds_dir=self.tfds_dir)} --overwrite`") from e
        self.metadata: list[tuple[str, str, int]] = [(str(n), str(c), int(a)) for n, c, a in rows]
        self.skipped: list[str] = list(meta.get("skipped", {}).get(split, []))
        self._source = None

    def _data_source(self):
        if self._source is None:
            builder = tfds.builder_from_directory(self.path)
            self._source = builder.as_data_source(split=self.split)
            if len(self._source) != len(self.metadata):
                raise DataError(f"{self.path}: the {self.split} split holds {len(self._source)} examples but "
                                f"metadata.json lists {len(self.metadata)}; rebuild with --overwrite")
        return self._source

    def __len__(self) -> int:
        return len(self.metadata)

    @staticmethod
    def _convert(ex: dict) -> dict:
        text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
        return {"name": text(ex["id"]), "car_id": text(ex["car_id"]), "angle": int(ex["angle"]),
                "image": bytes(ex["image"]), "mask": bytes(ex["mask"]), "mask_rle": text(ex["mask_rle"])}

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} {self.split} examples")
        return self._convert(self._data_source()[index])

    def __getitems__(self, indices: Iterable[int]) -> list[dict]:
        return [self._convert(ex) for ex in self._data_source().__getitems__([int(i) for i in indices])]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_source"] = None
        return state

    def __repr__(self) -> str:
        return f"CarvanaSource({self.path!r}, split={self.split!r}, {len(self)} examples)"


def load_split(tfds_dir: str, split: str) -> CarvanaSource:
    """Random-access source of ``split`` ('train' or 'test') of the dataset built in tfds_dir; a
    DataError saying how to build it when it has not been."""
    return CarvanaSource(tfds_dir, split)


def build(data_dir: str, tfds_dir: str, skip_bad_files: bool = False, overwrite: bool = False,
          num_workers: int | None = None, progress: bool = True) -> Carvana:
    """Build (or reuse) the dataset from the Kaggle download in data_dir; returns the builder."""
    builder = Carvana(data_dir=os.fspath(tfds_dir), skip_bad_files=skip_bad_files, num_workers=num_workers,
                      progress=progress)
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    builder.download_and_prepare(
        download_dir=os.path.join(os.fspath(tfds_dir), "downloads"),
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(data_dir), download_mode=mode),
    )
    return builder
