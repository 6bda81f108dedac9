"""bench pipeline: the command and its JSON, the dump, the baseline's alignment, the fast RLE decode."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from carvana_jax import rle
from carvana_jax.bench import pipeline as bench_pipeline
from carvana_jax.data import augment, kaggle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL_HW = (1280, 1918)


def _bench(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "carvana_jax.bench", "pipeline", *args], cwd=ROOT,
                          env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"), capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------------- the command

def test_pipeline_command_prints_json_and_dumps_batches(kaggle_dir, tmp_path):
    dump = tmp_path / "out" / "batches.npz"
    proc = _bench("--data_dir", kaggle_dir, "--image_size", "48,80", "--num_workers", "0", "--batches", "2",
                  "--batch_size", "2", "--json", "--dump", str(dump))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["benchmark"] == "pipeline" and r["image_size"] == [48, 80] and r["batch_size"] == 2
    assert r["examples"] == 48 and r["full_hw"] == list(FULL_HW) and r["mask_source"] == "rle"
    assert r["dct_scale"] == 8 and r["decoded_hw"] == [160, 240]
    for what in ("pipeline", "decode_only", "baseline"):
        assert r["images_per_sec"][what]["0"] > 0
    assert r["pipeline_over_decode_only"]["0"] > 0 and r["pipeline_over_baseline"] > 0
    stages = r["stages_ms"]
    assert set(stages) == {"read", "decode_image", "decode_mask", "matrix", "warp_image", "warp_mask", "jitter",
                           "batch"}
    assert all(v > 0 for v in stages.values()) and r["stage_sum_ms"] == pytest.approx(sum(stages.values()))
    assert {"decode_image_pil", "decode_mask_gif", "decode_mask_rle_old", "warp_image_whole",
            "jitter_numpy"} <= set(r["alternatives_ms"])

    data = np.load(dump)
    images, masks = data["image"], data["mask"]
    assert images.shape == (4, 48, 80, 3) and images.dtype == np.uint8  # 2 timed batches of 2 (4 kept at most)
    assert masks.shape == (4, 48, 80) and masks.dtype == np.uint8
    assert set(np.unique(masks).tolist()) <= {0, 1} and masks.any()
    assert r["dump"] == {"path": str(dump), "images": 4}


def test_pipeline_table_and_bad_flags(kaggle_dir):
    proc = _bench("--data_dir", kaggle_dir, "--image_size", "32,48", "--num_workers", "0", "--batches", "1",
                  "--batch_size", "2", "--nobaseline")
    assert proc.returncode == 0, proc.stderr
    assert "decode-only limit" in proc.stdout and "warp_image" in proc.stdout
    assert "straightforward" not in proc.stdout  # --nobaseline
    for args in (["--image_size", "7x"], ["--image_size", "0,5"], ["--batches", "0"], ["--num_workers", "-1"]):
        proc = _bench("--data_dir", kaggle_dir, *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert proc.stderr.startswith("error:"), proc.stderr
    assert bench_pipeline.parse_image_size("768") == (768, 768)
    assert bench_pipeline.parse_image_size("768,1024") == bench_pipeline.parse_image_size("768x1024") == (768, 1024)
    proc = _bench("--data_dir", os.path.join(kaggle_dir, "nowhere"), "--batches", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "nowhere" in proc.stderr


@pytest.mark.slow
def test_pipeline_command_with_two_workers(kaggle_dir):
    proc = _bench("--data_dir", kaggle_dir, "--image_size", "64,96", "--num_workers", "2", "--batches", "3",
                  "--batch_size", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(r["images_per_sec"]["pipeline"]) == set(r["images_per_sec"]["decode_only"]) == {"1", "2"}
    assert set(r["images_per_sec"]["baseline"]) == {"1"}
    assert r["scaling_over_1_worker"] > 0 and r["decode_only_scaling_over_1_worker"] > 0
    assert r["pipeline_over_baseline"] > 0


# ------------------------------------------------------------------------------- baseline vs pipeline

CAR_RGB = np.array([235, 215, 90], np.uint8)
BACKGROUND_RGB = np.array([25, 45, 70], np.uint8)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A photo whose colours encode its mask (as in test_augment): an off-centre ellipse and a box."""
    folder = tmp_path_factory.mktemp("baseline")
    h, w = FULL_HW
    yy, xx = np.mgrid[:h, :w]
    mask = ((xx - 760) / 520) ** 2 + ((yy - 560) / 300) ** 2 < 1
    mask |= (xx > 1150) & (xx < 1650) & (yy > 700) & (yy < 1050)
    image = np.where(mask[..., None], CAR_RGB, BACKGROUND_RGB).astype(np.uint8)
    jpeg, gif = folder / "abc_01.jpg", folder / "abc_01_mask.gif"
    Image.fromarray(image).save(jpeg, quality=95)
    g = Image.fromarray(mask.astype(np.uint8), mode="P")
    g.putpalette([0, 0, 0, 255, 255, 255])
    g.save(gif)
    return str(jpeg), str(gif), mask.astype(np.uint8)


def _car(image):
    return image.astype(np.float32).mean(-1) > (CAR_RGB.mean() + BACKGROUND_RGB.mean()) / 2


def _iou(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("size", [(128, 192), (768, 768)])
@pytest.mark.parametrize("hflip", [False, True])
def test_baseline_and_pipeline_give_aligned_pairs_of_the_same_geometry(photo, size, hflip):
    jpeg, gif, _ = photo
    rng = np.random.default_rng(int(hflip) + size[0])
    params = augment.AugmentParams(zoom=rng.uniform(0.9, 1.1), shear=rng.uniform(-0.05, 0.05),
                                   rotation=rng.uniform(-5, 5), shift_x=rng.uniform(-0.06, 0.06),
                                   shift_y=rng.uniform(-0.06, 0.06), hflip=hflip)
    base_image, base_mask = bench_pipeline.baseline_pair(jpeg, gif, size, params)
    ours_image, ours_mask = augment.load_pair(jpeg, gif, size, params)
    for image, mask in ((base_image, base_mask), (ours_image, ours_mask)):
        assert image.shape == (*size, 3) and mask.shape == size
        assert set(np.unique(mask).tolist()) == {0, 1}
        assert _iou(_car(image), mask) >= 0.97  # each pipeline's image and mask agree
    assert _iou(base_mask, ours_mask) >= 0.97  # and both made the same geometry from the parameters
    # A wrong flip in the baseline would show: the control.
    flipped = augment.AugmentParams(**{**params.__dict__, "hflip": not hflip})
    assert _iou(bench_pipeline.baseline_pair(jpeg, gif, size, flipped)[1], ours_mask) < 0.9


# ------------------------------------------------------------------------------- RLE decode

def old_decode(text, shape):
    """rle.decode before this issue (np.add.at marks, cumulative sum): the definition to match."""
    return bench_pipeline._old_rle_decode(text, shape)


def test_fast_rle_decode_equals_the_gifs_and_the_old_decode(kaggle_dir):
    with open(os.path.join(kaggle_dir, "train_masks.csv"), newline="") as f:
        rows = list(csv.DictReader(f))[:6]
    for row in rows:
        name = row["img"].removesuffix(".jpg")
        gif = augment.decode_mask(os.path.join(kaggle_dir, "train_masks", f"{name}_mask.gif"))
        fast = rle.decode(row["rle_mask"], FULL_HW)
        np.testing.assert_array_equal(fast, gif, err_msg=name)
        np.testing.assert_array_equal(fast, old_decode(row["rle_mask"], FULL_HW), err_msg=name)
        np.testing.assert_array_equal(rle.decode(row["rle_mask"], FULL_HW, value=255), gif * np.uint8(255))
    records = kaggle.index_train(kaggle_dir)
    assert {r.name: r.mask_rle for r in records}[rows[0]["img"].removesuffix(".jpg")] == rows[0]["rle_mask"]


def test_fast_rle_decode_merges_unsorted_and_overlapping_runs_like_the_old_one():
    rng = np.random.default_rng(3)
    shape = (37, 53)
    size = shape[0] * shape[1]
    for _ in range(200):
        n = int(rng.integers(1, 12))
        starts = rng.integers(1, size + 1, n)
        lengths = np.minimum(rng.integers(1, 400, n), size - starts + 1)
        text = " ".join(f"{s} {l}" for s, l in zip(starts.tolist(), lengths.tolist()))
        np.testing.assert_array_equal(rle.decode(text, shape), old_decode(text, shape), err_msg=text)
    out = np.full(shape, 7, np.uint8)
    assert rle.decode("5 3 1 2 6 10", shape, out=out) is out
    np.testing.assert_array_equal(out, old_decode("5 3 1 2 6 10", shape))
