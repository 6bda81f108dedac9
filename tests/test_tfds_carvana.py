"""The TFDS `carvana` builder, its reader and the prepare command, on the tiny synthetic dataset
(3 training cars and 1 test car, 16 photos each)."""
import csv
import glob
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from carvana_jax import rle
from carvana_jax.data import kaggle, prepare, tfds_carvana
from carvana_jax.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(data_dir, tfds_dir, **kwargs):
    kwargs.setdefault("progress", False)
    return tfds_carvana.build(str(data_dir), str(tfds_dir), **kwargs)


@pytest.fixture(scope="module")
def tfds_dir(kaggle_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tfds")
    build(kaggle_dir, out)
    return str(out)


@pytest.fixture
def data_copy(kaggle_dir, tmp_path):
    """A private copy of the synthetic download, to corrupt."""
    dst = tmp_path / "kaggle"
    shutil.copytree(kaggle_dir, dst)
    return dst


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def incomplete_dirs(tfds_dir):
    return glob.glob(os.path.join(str(tfds_dir), "carvana", "incomplete.*"))


def gif_mask(path):
    with Image.open(path) as im:
        return (np.asarray(im) > 0).astype(np.uint8)


def test_train_split_is_the_files_byte_for_byte(kaggle_dir, tfds_dir):
    records = kaggle.index_train(kaggle_dir)
    source = tfds_carvana.load_split(tfds_dir, "train")
    assert len(source) == len(records) == 48
    assert source.metadata == [(r.name, r.car_id, r.angle) for r in records]
    for i, r in enumerate(records):
        ex = source[i]
        assert set(ex) == {"name", "car_id", "angle", "image", "mask", "mask_rle"}
        assert (ex["name"], ex["car_id"], ex["angle"]) == (r.name, r.car_id, r.angle)
        assert type(ex["angle"]) is int and isinstance(ex["name"], str) and isinstance(ex["mask_rle"], str)
        assert ex["image"] == read_bytes(r.image_path)  # no re-encoding
        assert ex["mask"] == read_bytes(r.mask_path)
    assert source[-1]["name"] == records[-1].name
    with pytest.raises(IndexError):
        source[len(source)]


def test_mask_rle_decodes_to_the_gif_mask(kaggle_dir, tfds_dir):
    source = tfds_carvana.load_split(tfds_dir, "train")
    with open(os.path.join(kaggle_dir, "train_masks.csv")) as f:
        csv_rles = {row["img"]: row["rle_mask"] for row in csv.DictReader(f)}
    for i in range(len(source)):
        ex = source[i]
        mask = gif_mask(os.path.join(kaggle_dir, "train_masks", f"{ex['name']}_mask.gif"))
        assert mask.any()
        np.testing.assert_array_equal(rle.decode(ex["mask_rle"], mask.shape), mask)
        assert ex["mask_rle"] == csv_rles[f"{ex['name']}.jpg"]


def test_test_split_follows_sample_submission_order(data_copy, tmp_path):
    path = data_copy / "sample_submission.csv"
    with open(path) as f:
        header, *rows = list(csv.reader(f))
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]  # not sorted any more
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    build(data_copy, tmp_path / "tfds")
    source = tfds_carvana.load_split(str(tmp_path / "tfds"), "test")
    assert len(source) == 16
    names = [source[i]["name"] for i in range(len(source))]
    assert names == [row[0].removesuffix(".jpg") for row in rows] != sorted(names)
    assert [m[0] for m in source.metadata] == names
    for i, name in enumerate(names):
        ex = source[i]
        assert ex["image"] == read_bytes(data_copy / "test" / f"{name}.jpg")
        assert ex["mask"] == b"" and ex["mask_rle"] == ""
        assert (ex["car_id"], ex["angle"]) == (name[:-3], int(name[-2:]))


def test_test_split_of_the_fixture(kaggle_dir, tfds_dir):
    source = tfds_carvana.load_split(tfds_dir, "test")
    assert [m[0] for m in source.metadata] == [r.name for r in kaggle.index_test(kaggle_dir)]
    assert len(source) == 16 and source.skipped == []


def test_source_pickles_and_reads_in_grain_workers(tfds_dir):
    import grain
    source = tfds_carvana.load_split(tfds_dir, "train")
    first = source[0]  # opened here; the pickle must not carry the open reader
    clone = pickle.loads(pickle.dumps(source))
    assert clone._source is None and clone[0] == first and len(clone) == 48
    assert [e["name"] for e in source.__getitems__([3, 1])] == [source[3]["name"], source[1]["name"]]
    ds = grain.MapDataset.source(source).map(_name_and_size).to_iter_dataset()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=2))
    got = list(ds)
    assert [g["name"] for g in got] == [m[0] for m in source.metadata]
    assert [int(g["size"]) for g in got] == [len(source[i]["image"]) for i in range(len(source))]


def _name_and_size(ex):
    return {"name": ex["name"], "size": np.int64(len(ex["image"]))}


def test_tfds_data_source_reads_it_too(tfds_dir):
    import tensorflow_datasets as tfds
    ds = tfds.data_source("carvana", split="train", data_dir=tfds_dir)
    assert len(ds) == 48 and ds[0]["id"] == tfds_carvana.load_split(tfds_dir, "train")[0]["name"].encode()


def test_builds_and_reads_where_tensorflow_cannot_be_imported(kaggle_dir, tmp_path):
    blocker = tmp_path / "block"
    (blocker / "tensorflow").mkdir(parents=True)
    (blocker / "tensorflow" / "__init__.py").write_text('raise ImportError("no TensorFlow here")\n')
    script = textwrap.dedent(f"""
        import sys
        try:
            import tensorflow
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker did not block tensorflow")
        # Spill to TFDS's on-disk buckets above 1 MB (not 1 GB): the path the real test split takes,
        # which TFDS runs through tf.io.gfile.
        from tensorflow_datasets.core import shuffle
        shuffle.MAX_MEM_BUFFER_SIZE = 1 << 20
        from carvana_jax.data import kaggle, tfds_carvana
        tfds_carvana.build({str(kaggle_dir)!r}, {str(tmp_path / 'tfds')!r}, progress=False)
        train = tfds_carvana.load_split({str(tmp_path / 'tfds')!r}, "train")
        test = tfds_carvana.load_split({str(tmp_path / 'tfds')!r}, "test")
        records = kaggle.index_train({str(kaggle_dir)!r})
        assert (len(train), len(test)) == (48, 16), (len(train), len(test))
        for i in (0, 17, 47):
            assert train[i]["image"] == open(records[i].image_path, "rb").read()
            assert train[i]["name"] == records[i].name
        assert [train[i]["name"] for i in range(48)] == [r.name for r in records]
        assert "tensorflow" not in sys.modules
        print("TF-FREE OK")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), ROOT]))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TF-FREE OK" in out.stdout


def test_truncated_jpeg_fails_the_build_naming_it(data_copy, tmp_path):
    bad = data_copy / "train" / sorted(os.listdir(data_copy / "train"))[7]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"{bad}.*truncated"):
        build(data_copy, tmp_path / "tfds")
    assert not tfds_carvana.is_prepared(tmp_path / "tfds") and not incomplete_dirs(tmp_path / "tfds")


def test_truncated_test_jpeg_fails_too(data_copy, tmp_path):
    bad = data_copy / "test" / sorted(os.listdir(data_copy / "test"))[3]
    bad.write_bytes(bad.read_bytes()[:-2])  # only the end-of-image marker is missing
    with pytest.raises(DataError, match=str(bad)):
        build(data_copy, tmp_path / "tfds")


def test_missing_mask_fails_the_build_naming_it(data_copy, tmp_path):
    gone = data_copy / "train_masks" / sorted(os.listdir(data_copy / "train_masks"))[5]
    gone.unlink()
    with pytest.raises(DataError, match=rf"{gone}: mask missing"):
        build(data_copy, tmp_path / "tfds")
    assert not tfds_carvana.is_prepared(tmp_path / "tfds")


def test_mask_of_another_size_fails_naming_both(data_copy, tmp_path):
    name = sorted(os.listdir(data_copy / "train"))[9].removesuffix(".jpg")
    mask_path = data_copy / "train_masks" / f"{name}_mask.gif"
    with Image.open(mask_path) as im:
        im.resize((959, 640)).save(mask_path)
    with pytest.raises(DataError, match=rf"{mask_path} is 959x640 but its image .*{name}.jpg is 1918x1280"):
        build(data_copy, tmp_path / "tfds")


def test_skip_bad_files_skips_and_counts(data_copy, tmp_path, caplog):
    names = sorted(f.removesuffix(".jpg") for f in os.listdir(data_copy / "train"))
    truncated = data_copy / "train" / f"{names[2]}.jpg"
    truncated.write_bytes(truncated.read_bytes()[:30000])
    (data_copy / "train_masks" / f"{names[20]}_mask.gif").unlink()
    small = data_copy / "train_masks" / f"{names[40]}_mask.gif"
    with Image.open(small) as im:
        im.resize((100, 50)).save(small)
    caplog.set_level("WARNING")
    builder = build(data_copy, tmp_path / "tfds", skip_bad_files=True)
    assert [len(v) for v in builder.skipped.values()] == [3, 0]
    source = tfds_carvana.load_split(str(tmp_path / "tfds"), "train")
    kept = [n for i, n in enumerate(names) if i not in (2, 20, 40)]
    assert len(source) == 45 and [m[0] for m in source.metadata] == kept
    assert [source[i]["name"] for i in range(45)] == kept
    assert len(source.skipped) == 3
    for i, needle in ((2, "truncated"), (20, "mask missing"), (40, "100x50")):
        assert any(names[i] in s and needle in s for s in source.skipped), (needle, source.skipped)
    assert sum("skipping bad file" in r.getMessage() for r in caplog.records) == 3
    assert any("skipped 3 bad example(s) of 48" in r.getMessage() for r in caplog.records)
    assert len(tfds_carvana.load_split(str(tmp_path / "tfds"), "test")) == 16


def test_train_masks_csv_that_disagrees_with_the_gif_is_overruled(data_copy, tmp_path, caplog):
    path = data_copy / "train_masks.csv"
    with open(path) as f:
        rows = list(csv.reader(f))
    rows[4][1] = "1 10"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    caplog.set_level("WARNING")
    build(data_copy, tmp_path / "tfds")
    name = rows[4][0].removesuffix(".jpg")
    source = tfds_carvana.load_split(str(tmp_path / "tfds"), "train")
    ex = source[[m[0] for m in source.metadata].index(name)]
    np.testing.assert_array_equal(rle.decode(ex["mask_rle"]), gif_mask(data_copy / "train_masks" / f"{name}_mask.gif"))
    assert any(name in r.getMessage() and "differs" in r.getMessage() for r in caplog.records)


def test_zipped_download_builds_the_same(data_copy, tmp_path, tfds_dir):
    for member in ("train", "train_masks", "test"):
        shutil.make_archive(str(data_copy / member), "zip", root_dir=data_copy, base_dir=member)
        shutil.rmtree(data_copy / member)
    build(data_copy, tmp_path / "tfds")
    for split in ("train", "test"):
        a = tfds_carvana.load_split(str(tmp_path / "tfds"), split)
        b = tfds_carvana.load_split(tfds_dir, split)
        assert a.metadata == b.metadata
        assert all(a[i] == b[i] for i in range(0, len(a), 5))


def test_interrupted_build_rerun_finishes(kaggle_dir, tmp_path, monkeypatch, tfds_dir):
    real = tfds_carvana._example
    calls = []

    def failing(record, csv_rle):
        if record.mask_path is None:  # half-way through the test split, after train is written
            calls.append(record.name)
            if len(calls) == 8:
                raise RuntimeError("interrupted")
        return real(record, csv_rle)

    monkeypatch.setattr(tfds_carvana, "_example", failing)
    out = tmp_path / "tfds"
    with pytest.raises(RuntimeError, match="interrupted"):
        build(kaggle_dir, out)
    assert not tfds_carvana.is_prepared(out) and not incomplete_dirs(out)
    with pytest.raises(DataError, match="carvana_jax.data.prepare"):
        tfds_carvana.load_split(str(out), "train")
    monkeypatch.setattr(tfds_carvana, "_example", real)
    build(kaggle_dir, out)
    _assert_same_dataset(str(out), tfds_dir)


def _assert_same_dataset(a_dir, b_dir):
    for split, n in (("train", 48), ("test", 16)):
        a, b = tfds_carvana.load_split(a_dir, split), tfds_carvana.load_split(b_dir, split)
        assert len(a) == len(b) == n and a.metadata == b.metadata
        assert all(a[i] == b[i] for i in range(n))


KILLED_BUILD = """
import os, sys, time
from carvana_jax.data import tfds_carvana
real = tfds_carvana._example
calls = []
def hang_half_way(record, csv_rle):
    if record.mask_path is None:  # the test split, after train's shard is written
        calls.append(record.name)
        if len(calls) > 8:
            open(os.environ["MARKER"], "w").close()
            time.sleep(600)
    return real(record, csv_rle)
tfds_carvana._example = hang_half_way

from carvana_jax.data import prepare
prepare.run()
"""


def test_killed_build_rerun_finishes(kaggle_dir, tmp_path, tfds_dir):
    out, marker = tmp_path / "tfds", tmp_path / "hanging"
    cmd = ["--data_dir", kaggle_dir, "--tfds_dir", str(out), "--noprogress"]
    env = dict(os.environ, MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, *cmd], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    leftovers = incomplete_dirs(out)
    assert not tfds_carvana.is_prepared(out) and leftovers  # killed half-way: only an incomplete dir
    assert glob.glob(os.path.join(leftovers[0], "carvana-train.array_record*"))  # with train already in it
    done = subprocess.run([sys.executable, "-m", "carvana_jax.data.prepare", *cmd], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "left by an interrupted build" in done.stderr and not incomplete_dirs(out)
    assert "train 48 examples, test 16 examples" in done.stdout
    _assert_same_dataset(str(out), tfds_dir)


def test_load_split_of_an_unprepared_dir_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError) as e:
        tfds_carvana.load_split(str(tmp_path), "train")
    message = str(e.value)
    assert "\n" not in message
    assert "python -m carvana_jax.data.prepare --data_dir" in message and str(tmp_path) in message


def test_load_split_of_an_unknown_split(tfds_dir):
    with pytest.raises(DataError, match="unknown split 'val'"):
        tfds_carvana.load_split(tfds_dir, "val")


def test_prepare_without_data_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="missing or empty"):
        prepare.prepare(str(tmp_path / "nothing"))
    assert not (tmp_path / "nothing").exists()  # not even the default tfds dir inside it


def test_prepare_cli_end_to_end(kaggle_dir, tmp_path, tfds_dir):
    out = tmp_path / "tfds"
    cmd = [sys.executable, "-m", "carvana_jax.data.prepare", "--data_dir", kaggle_dir, "--tfds_dir", str(out)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"written in {out}/carvana/1.0.0: train 48 examples, test 16 examples" in first.stdout
    assert "carvana train" in first.stderr and "48/48" in first.stderr  # the progress bar
    _assert_same_dataset(str(out), tfds_dir)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already prepared" in again.stdout
    rebuilt = subprocess.run(cmd + ["--overwrite", "--noprogress"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert rebuilt.returncode == 0 and "written in" in rebuilt.stdout and "carvana train" not in rebuilt.stderr
    _assert_same_dataset(str(out), tfds_dir)
    missing = subprocess.run([sys.executable, "-m", "carvana_jax.data.prepare", "--data_dir", str(tmp_path / "no")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0 and missing.stderr.startswith("error: data_dir")
    helped = subprocess.run([sys.executable, "-m", "carvana_jax.data.prepare", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0
    for flag in ("--data_dir", "--tfds_dir", "--skip_bad_files", "--overwrite", "--workers"):
        assert flag in helped.stdout + helped.stderr
