"""The exact scorer: Dice against an independent decode-and-count, every malformed input reported by
name, unreadable files as one line from the command, GIF truth equal to CSV truth."""
import csv
import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from carvana_jax import dice, rle, score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = (37, 53)


# --- an independent Dice: a plain loop over runs into a full boolean array, numpy sums -------------

def reference_decode(text: str, shape) -> np.ndarray:
    flat = np.zeros(shape[0] * shape[1], bool)
    values = [int(v) for v in text.split()]
    for start, length in zip(values[0::2], values[1::2]):
        for number in range(start, start + length):
            flat[number - 1] = True
    return flat


def reference_dice(pred_text: str, truth_text: str, shape) -> float:
    pred, truth = reference_decode(pred_text, shape), reference_decode(truth_text, shape)
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def random_mask(rng, shape) -> np.ndarray:
    """Empty, full, rectangles, ellipses, or salt noise, at random."""
    h, w = shape
    kind = rng.integers(6)
    mask = np.zeros(shape, bool)
    if kind == 1:
        mask[:] = True
    elif kind in (2, 3):
        for _ in range(rng.integers(1, 6)):
            y0, x0 = rng.integers(h), rng.integers(w)
            mask[y0:y0 + rng.integers(1, h), x0:x0 + rng.integers(1, w)] = True
    elif kind == 4:
        yy, xx = np.mgrid[:h, :w]
        for _ in range(rng.integers(1, 4)):
            cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, h / 2), rng.uniform(1, w / 2)
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    elif kind == 5:
        mask = rng.random(shape) < rng.uniform(0.01, 0.6)
    return mask


def split_runs(text: str, rng) -> str:
    """The same pixels with some runs cut into touching pieces (valid, though never written by us)."""
    values = [int(v) for v in text.split()]
    out = []
    for start, length in zip(values[0::2], values[1::2]):
        if length > 1 and rng.random() < 0.5:
            cut = int(rng.integers(1, length))
            out += [start, cut, start + cut, length - cut]
        else:
            out += [start, length]
    return " ".join(map(str, out))


def test_score_matches_independent_dice_on_random_small_submissions():
    rng = np.random.default_rng(0)
    truth, submission = {}, {}
    for i in range(300):
        name = f"car{i // 16:03d}_{i % 16 + 1:02d}.jpg"
        t = random_mask(rng, SMALL)
        p = t ^ (rng.random(SMALL) < rng.uniform(0, 0.2)) if rng.random() < 0.5 else random_mask(rng, SMALL)
        truth[name] = rle.encode(t)
        submission[name] = split_runs(rle.encode(p), rng)
    per_image = score.score(submission, truth, SMALL)
    assert list(per_image) == list(truth)
    expected = {name: reference_dice(submission[name], truth[name], SMALL) for name in truth}
    for name in truth:
        assert abs(per_image[name] - expected[name]) <= 1e-9, name
    assert abs(score.mean_dice(per_image) - np.mean(list(expected.values()))) <= 1e-9
    values = list(expected.values())  # the draw covers every case: 0, 1 (empty pairs too), between
    assert 0.0 in values and 1.0 in values and any(0 < v < 1 for v in values)
    assert any(not truth[n] and not submission[n] for n in truth)
    assert any(not truth[n] and submission[n] for n in truth) and any(truth[n] and not submission[n] for n in truth)


def test_empty_against_empty_is_one_and_empty_against_anything_is_zero():
    truth = {"a.jpg": "", "b.jpg": "", "c.jpg": "3 4", "d.jpg": "3 4", "e.jpg": "3 4"}
    submission = {"a.jpg": "", "b.jpg": "1 2", "c.jpg": "", "d.jpg": "3 4", "e.jpg": "5 4"}
    per_image = score.score(submission, truth, (3, 4))
    assert per_image == {"a.jpg": 1.0, "b.jpg": 0.0, "c.jpg": 0.0, "d.jpg": 1.0, "e.jpg": 0.5}
    assert score.mean_dice(per_image) == pytest.approx(2.5 / 5, abs=1e-12)


def test_full_size_masks_match_independent_dice():
    rng = np.random.default_rng(1)
    shape = rle.FULL_SHAPE
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    car = ((yy - 700) / 300.0) ** 2 + ((xx - 960) / 800.0) ** 4 < 1
    car &= ~((rng.random(shape) < 0.5) & (car ^ np.roll(car, 2, axis=1)))  # ragged edges
    shifted = np.roll(car, (3, -5), axis=(0, 1))
    noisy = car ^ (rng.random(shape) < 0.001)
    corner = np.zeros(shape, bool)
    corner[0, 0] = corner[-1, -1] = True
    empty = np.zeros(shape, bool)
    pairs = {"same.jpg": (car, car), "shifted.jpg": (shifted, car), "noisy.jpg": (noisy, car),
             "corner.jpg": (corner, car | corner), "empty_empty.jpg": (empty, empty),
             "empty_pred.jpg": (empty, car), "empty_truth.jpg": (car, empty)}
    submission = {name: rle.encode(p) for name, (p, _) in pairs.items()}
    truth = {name: rle.encode(t) for name, (_, t) in pairs.items()}
    per_image = score.score(submission, truth)
    for name, (p, t) in pairs.items():
        total = int(p.sum()) + int(t.sum())
        expected = 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total
        assert abs(per_image[name] - expected) <= 1e-9, name
        assert abs(per_image[name] - reference_dice(submission[name], truth[name], shape)) <= 1e-9, name
    assert per_image["same.jpg"] == per_image["empty_empty.jpg"] == 1.0
    assert per_image["empty_pred.jpg"] == per_image["empty_truth.jpg"] == 0.0
    assert 0.9 < per_image["shifted.jpg"] < 1.0


def test_overlap_by_hand():
    a = score.parse_rle("2 3 10 4", (4, 4))  # pixels 2-4, 10-13
    b = score.parse_rle("1 2 4 8", (4, 4))  # pixels 1-2, 4-11
    assert dice.run_overlap(a, b) == dice.run_overlap(b, a) == 1 + 1 + 2  # 2 | 4 | 10, 11
    assert dice.of_runs(a, b) == 2 * 4 / (7 + 10)


def test_score_names_an_image_missing_from_the_submission():
    with pytest.raises(ValueError, match="b.jpg"):
        score.score({"a.jpg": ""}, {"a.jpg": "", "b.jpg": "1 1"}, (2, 2))


# --- malformed RLE: each kind reported with the image's name ---------------------------------------

def write_csv(path, rows, header=("img", "rle_mask")) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return str(path)


NAMES = ["0cdf5b5d0ce1_01.jpg", "0cdf5b5d0ce1_02.jpg", "0cdf5b5d0ce1_03.jpg"]
N = rle.FULL_SHAPE[0] * rle.FULL_SHAPE[1]


@pytest.mark.parametrize("text, kind", [
    ("1 2 3 4 5 6 7", "odd number of values (7)"),
    ("1 2 x 3", "not an integer: 'x'"),
    ("1.5 2", "not an integer: '1.5'"),
    ("1 2 +3 4", "not an integer: '+3'"),
    ("1\t2", "not an integer"),
    ("1 2\x00", "not an integer"),
    ("1  2", "two spaces in a row"),
    (" 1 2", "leading or trailing space"),
    ("1 2 ", "leading or trailing space"),
    ("1 " + "9" * 19, "more than 18 digits"),
    ("5 0", "lengths must be positive"),
    ("5 -2", "lengths must be positive"),
    ("0 3", "pixel numbers start at 1"),
    ("-4 3", "pixel numbers start at 1"),
    ("10 2 5 2", "out of order"),
    ("10 2 10 4", "out of order"),
    ("10 5 12 4", "overlap"),
    (f"{N} 2", "past the last pixel"),
    (f"{N + 1} 1", "past the last pixel"),
])
def test_each_malformed_rle_is_reported_by_image_name(tmp_path, text, kind):
    rows = [(NAMES[0], "1 5"), (NAMES[1], text), (NAMES[2], "")]
    problems = score.validate_submission(write_csv(tmp_path / "s.csv", rows), NAMES)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{NAMES[1]}: ") and kind in problems[0], problems


@pytest.mark.parametrize("text", ["", "1 1", f"1 {N}", f"{N} 1", "1 2 3 4", "5 2 20 1 21 3"])
def test_well_formed_rle_is_valid_touching_runs_included(text):
    assert score.validate_rle(text) is None


def test_validate_rle_small_shape():
    assert score.validate_rle("11 2", (3, 4)) is None
    assert "past the last pixel 12 of a 4x3 mask" in score.validate_rle("12 2", (3, 4))


def test_missing_duplicated_and_unexpected_images_are_named(tmp_path):
    rows = [(NAMES[0], "1 5"), ("stranger_01.jpg", ""), (NAMES[0], "1 5")]
    problems = score.validate_submission(write_csv(tmp_path / "s.csv", rows), NAMES)
    assert f"{NAMES[0]}: listed 2 times (lines 2, 4)" in problems
    assert "stranger_01.jpg (line 3): not an expected image" in problems
    assert f"{NAMES[1]}: missing" in problems and f"{NAMES[2]}: missing" in problems
    assert len(problems) == 4


def test_wrong_column_count_is_reported_by_name_and_line(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text(f"img,rle_mask\n{NAMES[0]},1 5,oops\n{NAMES[1]}\n{NAMES[2]},\n,1 1\n")
    problems = score.validate_submission(str(path), NAMES)
    assert f"{NAMES[0]} (line 2): 3 columns; expected 2 (img,rle_mask)" in problems
    assert f"{NAMES[1]} (line 3): 1 columns; expected 2 (img,rle_mask)" in problems
    assert "line 5: no image name" in problems
    assert f"{NAMES[0]}: missing" in problems and f"{NAMES[1]}: missing" in problems
    assert len(problems) == 5


@pytest.mark.parametrize("content, kind", [
    (b"", "empty file"),
    (b"image,mask\na.jpg,1 2\n", "expected exactly the header img,rle_mask"),
    (b"img,rle_mask,extra\n", "expected exactly the header"),
    (b"0cdf5b5d0ce1_01.jpg,1 5\n", "expected exactly the header"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\x00junk", "not a text CSV"),
    (b"img,rle_mask\na.jpg,1 2\n\xff\xfe\x00\n", "not a text CSV"),
])
def test_unreadable_or_headerless_file_is_one_problem(tmp_path, content, kind):
    path = tmp_path / "s.csv"
    path.write_bytes(content)
    problems = score.validate_submission(str(path), NAMES)
    assert len(problems) == 1 and kind in problems[0] and str(path) in problems[0], problems


def test_missing_file_is_one_problem(tmp_path):
    assert score.validate_submission(str(tmp_path / "nope.csv"), NAMES) == [f"{tmp_path / 'nope.csv'}: no such file"]


def test_valid_submission_has_no_problems_in_any_order_with_bom_or_gzip(tmp_path):
    rows = [(NAMES[2], ""), (NAMES[0], "1 5 7 2"), (NAMES[1], f"{N} 1")]
    path = write_csv(tmp_path / "s.csv", rows)
    assert score.validate_submission(path, NAMES) == []
    bom = tmp_path / "bom.csv"
    with open(path, "rb") as f:
        bom.write_bytes(b"\xef\xbb\xbf" + f.read())
    assert score.validate_submission(str(bom), NAMES) == []
    with open(path, "rb") as f, gzip.open(tmp_path / "s.csv.gz", "wb") as g:
        g.write(f.read())
    assert score.validate_submission(str(tmp_path / "s.csv.gz"), NAMES) == []
    submission, problems = score.read_submission(str(tmp_path / "s.csv.gz"))
    assert problems == [] and submission == dict(rows)


def test_read_submission_keeps_the_first_of_a_repeated_image(tmp_path):
    path = write_csv(tmp_path / "s.csv", [("a.jpg", "1 1"), ("a.jpg", "2 2")])
    rows, problems = score.read_submission(path)
    assert rows == {"a.jpg": "1 1"} and problems == ["a.jpg: listed 2 times (lines 2, 3)"]


def test_long_rle_fields_are_read(tmp_path):
    noise = (np.random.default_rng(2).random(rle.FULL_SHAPE) < 0.5)
    text = rle.encode(noise)
    assert len(text) > 131072  # the csv module's default field limit
    path = write_csv(tmp_path / "s.csv", [(NAMES[0], text)])
    assert score.validate_submission(path, NAMES[:1]) == []


def test_format_problems_caps_the_list():
    assert score.format_problems("s.csv", ["only one"]) == "error: only one"
    text = score.format_problems("s.csv", [f"img{i}.jpg: missing" for i in range(25)])
    lines = text.splitlines()
    assert lines[0] == "error: s.csv is not a valid submission (25 problems):"
    assert lines[1:21] == [f"  img{i}.jpg: missing" for i in range(20)]
    assert lines[21:] == ["  ... and 5 more"]


# --- the truth: GIFs and CSV agree ---------------------------------------------------------------

def test_gif_folder_truth_equals_csv_truth(kaggle_dir):
    from_csv = score.read_truth(os.path.join(kaggle_dir, "train_masks.csv"))
    from_gifs = score.read_truth(os.path.join(kaggle_dir, "train_masks"))
    assert len(from_csv) == 48 and sorted(from_csv) == sorted(from_gifs)
    assert from_csv == {name: from_gifs[name] for name in from_csv}
    assert score.read_truth(kaggle_dir) == from_csv
    assert any(from_csv.values())


def test_data_folder_without_csv_reads_its_gifs(kaggle_dir, tmp_path):
    shutil.copytree(os.path.join(kaggle_dir, "train_masks"), tmp_path / "train_masks")
    assert score.read_truth(str(tmp_path)) == score.read_truth(os.path.join(kaggle_dir, "train_masks.csv"))


def test_bad_truth_is_a_data_error(tmp_path):
    from carvana_jax.errors import DataError
    with pytest.raises(DataError, match="nope"):
        score.read_truth(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="b.jpg: odd number"):
        score.read_truth(write_csv(tmp_path / "t.csv", [("a.jpg", "1 1"), ("b.jpg", "1 2 3")]))
    with pytest.raises(DataError, match="no \\*_mask.gif"):
        score.read_truth(str(tmp_path))


# --- the command ---------------------------------------------------------------------------------

def run_score(*args):
    return subprocess.run([sys.executable, "-m", "carvana_jax.score", *args], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def assert_one_line_error(proc, needle):
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_cli_unreadable_submissions_are_one_line_errors(tmp_path):
    truth = write_csv(tmp_path / "truth.csv", [(NAMES[0], "1 5")])
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "junk.csv").write_bytes(bytes(np.random.default_rng(3).integers(0, 256, 4096, np.uint8)))
    assert_one_line_error(run_score("--submission", str(tmp_path / "nope.csv"), "--truth", truth), "no such file")
    assert_one_line_error(run_score("--submission", str(tmp_path / "empty.csv"), "--truth", truth), "empty file")
    assert_one_line_error(run_score("--submission", str(tmp_path / "junk.csv"), "--truth", truth), "junk.csv")
    assert_one_line_error(run_score("--submission", truth, "--truth", str(tmp_path / "nope")), "nope")


def test_cli_scores_lists_problems_and_writes_json_and_per_image(kaggle_dir, tmp_path):
    truth = score.read_truth(kaggle_dir)
    names = list(truth)
    rows = [(name, truth[name]) for name in names]
    rows[0] = (names[0], "")  # Dice 0 on the first image
    path = write_csv(tmp_path / "s.csv", rows)
    proc = run_score("--submission", path, "--truth", kaggle_dir, "--per_image", str(tmp_path / "per.csv"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"Dice {47 / 48:.9f} over 48 images"
    with open(tmp_path / "per.csv", newline="") as f:
        per = list(csv.reader(f))
    assert per[0] == ["img", "dice"] and per[1] == [names[0], "0.000000000"] and len(per) == 49
    proc = run_score("--submission", path, "--truth", os.path.join(kaggle_dir, "train_masks.csv"), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["valid"] and result["images"] == 48 and abs(result["dice"] - 47 / 48) < 1e-12

    bad = write_csv(tmp_path / "bad.csv", [(name, "1 2 3") for name in names[:30]])  # 30 odd + 18 missing
    proc = run_score("--submission", bad, "--truth", kaggle_dir, "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == f"error: {bad} is not a valid submission (48 problems):"
    assert lines[1] == f"  {names[0]}: odd number of values (3)" and lines[-1] == "  ... and 28 more"
    assert len(lines) == 22
    result = json.loads(proc.stdout)
    assert not result["valid"] and result["problem_count"] == 48 and f"{names[-1]}: missing" in result["problems"]


def test_cli_help_describes_every_flag():
    proc = run_score("--help")
    assert proc.returncode == 0
    for flag in ("--submission", "--truth", "--json", "--per_image"):
        assert flag in proc.stdout + proc.stderr
