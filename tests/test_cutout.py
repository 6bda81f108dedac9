"""Cut-outs of any photo: reading (formats, EXIF, greyscale, alpha, 16 bits), sizes, the masks against eval's,
compositing, and the command on a real folder (nested, mixed, bad files, resume, stdin, --watch)."""
import glob
import io
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image, ImageOps

from carvana_jax import cutter, photos, predict, rle
from carvana_jax import evaluation
from carvana_jax.data import kaggle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def kaggle_dir(kaggle_dir_few):
    return kaggle_dir_few


@pytest.fixture(scope="module")
def workdir(two_update_run):
    """conftest's 2-update 32×48 depth-2 U-Net (read only)."""
    return two_update_run["workdir"]


@pytest.fixture(scope="module")
def test_photos(kaggle_dir):
    return sorted(glob.glob(os.path.join(kaggle_dir, "test", "*.jpg")))


def _pattern(h=60, w=90):
    """An RGB picture no flip or turn leaves unchanged."""
    y, x = np.mgrid[:h, :w]
    return np.dstack([x * 255 // w, y * 255 // h, (x * y) % 256]).astype(np.uint8)


def _bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _read(data: bytes, k: int = 1):
    header = photos.read_header(data, "x")
    return header, photos.decode(data, header, k, "x")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_shows_the_photo_as_pillow_displays_it(orientation):
    image = Image.fromarray(_pattern())
    exif = image.getexif()
    exif[0x0112] = orientation
    data = _bytes(image, "JPEG", quality=95, exif=exif)
    header, decoded = _read(data)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert header.full_hw == shown.shape[:2] and decoded.shape == shown.shape
    assert np.abs(decoded.astype(int) - shown).mean() < 2  # the same pixels; decoders may differ by a step


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGB", "WEBP"),
                                      ("RGB", "BMP"), ("RGB", "TIFF"), ("L", "JPEG"), ("CMYK", "JPEG")])
def test_any_format_and_mode_reads_as_rgb_of_its_pixels(mode, fmt):
    image = Image.fromarray(_pattern()).convert(mode)
    lossless = fmt != "JPEG"
    data = _bytes(image, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    header, decoded = _read(data)
    expected = np.asarray(image.convert("RGB") if lossless else Image.open(io.BytesIO(data)).convert("RGB"))
    assert header.full_hw == (60, 90) and header.jpeg == (fmt == "JPEG")
    assert decoded.dtype == np.uint8 and decoded.shape == (60, 90, 3)
    if lossless:
        np.testing.assert_array_equal(decoded, expected)
    else:
        assert np.abs(decoded.astype(int) - expected).mean() < 1  # Pillow's and OpenCV's decoders


def test_sixteen_bit_greyscale_is_brought_to_eight_bits():
    values = (np.arange(60 * 90).reshape(60, 90) * 12).astype(np.uint16)
    data = _bytes(Image.fromarray(values), "PNG")
    _, decoded = _read(data)
    np.testing.assert_array_equal(decoded[..., 0], (values / 257.0).astype(np.uint8))
    assert (decoded[..., 0] == decoded[..., 2]).all()


def test_a_reduced_decode_of_a_png_is_its_area_average():
    image = _pattern(64, 96)
    header, decoded = _read(_bytes(Image.fromarray(image), "PNG"), k=4)
    expected = image.reshape(16, 4, 24, 4, 3).mean(axis=(1, 3))
    assert decoded.shape == (16, 24, 3) and np.abs(decoded - expected).max() <= 0.5 + 1e-9


_JPEG = _bytes(Image.fromarray(_pattern()), "JPEG")
_PNG = _bytes(Image.fromarray(_pattern()), "PNG")


@pytest.mark.parametrize("data,message", [(b"hello, not a photo", "not an image"),
                                          (_JPEG[: len(_JPEG) // 2], r"unreadable image \(truncated JPEG"),
                                          (_PNG[: len(_PNG) // 2], "unreadable image")])
def test_bad_bytes_are_a_data_error_naming_the_file(data, message):
    with pytest.raises(kaggle.DataError, match=f"^/some/where.jpg: {message}"):
        header = photos.read_header(data, "/some/where.jpg")
        photos.decode(data, header, 1, "/some/where.jpg")


def test_model_size_is_the_models_own_for_kaggle_photos_and_keeps_the_aspect_otherwise():
    assert photos.model_size(rle.FULL_SHAPE, (256, 384), 32) == (256, 384)
    assert photos.model_size((640, 959), (256, 384), 32) == (256, 384)  # Kaggle's shape, smaller
    rng = np.random.default_rng(0)
    for _ in range(200):
        full = tuple(int(v) for v in rng.integers(1, 5000, 2))
        h, w = photos.model_size(full, (256, 384), 32)
        assert h % 32 == 0 and w % 32 == 0 and h >= 32 and w >= 32
        short = min(full) * (256 * 384 / (full[0] * full[1])) ** 0.5  # the short side before rounding
        if short >= 4 * 32:  # then rounding moves each side by at most 1/8
            assert abs(np.log(h / w) - np.log(full[0] / full[1])) <= np.log(9 / 7)
            assert (7 / 8) ** 2 <= h * w / (256 * 384) <= (9 / 8) ** 2


@pytest.mark.parametrize("postprocess", ["none", "guided"])
def test_a_kaggle_photos_mask_is_exactly_evals(workdir, kaggle_dir, test_photos, postprocess):
    config, ensemble, _ = predict.load_ensemble([workdir], postprocess=postprocess)
    config.data_dir = kaggle_dir
    records = evaluation.records_for("test", config)
    cut = cutter.Cutter(ensemble, batch_size=4)
    evals = dict(ensemble.masks(records, config))
    prepared = []
    for record in records:
        with open(record.image_path, "rb") as f:
            prepared.append(cut.prepare(f.read(), record.image_path))
    for i, (mask, alpha) in enumerate(cut.cut(prepared)):
        assert mask.shape == alpha.shape == rle.FULL_SHAPE
        np.testing.assert_array_equal(mask, evals[i])
        assert ((alpha > 127.5) == mask.astype(bool)).mean() > 0.999  # the alpha is the same probability


def test_a_batch_cuts_each_photo_as_it_would_alone_and_refuses_mixed_sizes(workdir, test_photos):
    _, ensemble, _ = predict.load_ensemble([workdir])
    cut = cutter.Cutter(ensemble, batch_size=4)
    data = [_bytes(Image.open(p).resize((150, 100)), "PNG") for p in test_photos[:3]]
    prepared = [cut.prepare(d, f"p{i}") for i, d in enumerate(data)]
    together = cut.cut(prepared)
    for p, (mask, alpha) in zip(prepared, together):
        [(alone_mask, alone_alpha)] = cut.cut([p])
        assert mask.shape == (100, 150)
        np.testing.assert_array_equal(mask, alone_mask)
        np.testing.assert_array_equal(alpha, alone_alpha)
    other = cut.prepare(_bytes(Image.open(test_photos[0]).resize((90, 100)), "PNG"), "q")
    with pytest.raises(ValueError, match="one bucket"):
        cut.cut([prepared[0], other])


def test_compose_is_porter_duff_over():
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    alpha[:3] = 0
    plain = cutter.compose(photo, alpha)
    shown = alpha > 0
    np.testing.assert_array_equal(plain[shown][:, :3], photo[shown])
    assert (plain[~shown][:, :3] == 0).all()  # what nothing shows is stored black
    np.testing.assert_array_equal(plain[..., 3], alpha)
    opaque = cutter.compose(photo, alpha, (10, 200, 30, 255)).astype(float)
    a = alpha[..., None] / 255.0
    np.testing.assert_allclose(opaque[..., :3], photo * a + np.array([10, 200, 30]) * (1 - a), atol=0.5 + 1e-6)
    assert (opaque[..., 3] == 255).all()
    hard = cutter.compose(photo, (alpha > 127) * np.uint8(255), (0, 0, 255, 100))
    car = alpha > 127
    np.testing.assert_array_equal(hard[car][:, :3], photo[car])
    assert (hard[~car][:, :3] == [0, 0, 255]).all() and (hard[~car][:, 3] == 100).all()


@pytest.mark.parametrize("text", ["1,2", "1,2,3,4,5", "256,0,0", "a,b,c", "-1,0,0"])
def test_a_bad_background_colour_is_refused(text):
    with pytest.raises(ValueError, match="R,G,B"):
        cutter.parse_bgcolor(text)


def test_background_colour_parses_with_opaque_default():
    assert cutter.parse_bgcolor("1,2,3") == (1, 2, 3, 255) and cutter.parse_bgcolor("1,2,3,4") == (1, 2, 3, 4)
    assert cutter.parse_bgcolor(None) is None


# ------------------------------------------------------------------------------------------ the command

def _cutout(*args, stdin=None):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    return subprocess.run([sys.executable, "-m", "carvana_jax.cutout", *args], cwd=ROOT, env=env, check=False,
                          capture_output=True, input=stdin, timeout=300)


@pytest.fixture(scope="module")
def mixed_folder(test_photos, tmp_path_factory):
    """A folder as a user brings it: a Kaggle JPEG, smaller PNG/WebP/BMP/TIFF copies in nested folders (a PNG and
    a WebP of one name), a greyscale JPEG, an RGBA PNG, an EXIF-turned JPEG, a truncated JPEG, a text file named
    .jpg and a non-image file with another extension (ignored).
    {'dir', 'good': {rel: (displayed (H, W), its outputs' stem)}, 'bad': [rel]}."""
    root = tmp_path_factory.mktemp("mixed") / "in"
    (root / "sub" / "deeper").mkdir(parents=True)
    src = [Image.open(p) for p in test_photos]
    shutil.copy(test_photos[0], root / "kaggle.jpg")
    src[1].resize((480, 320)).save(root / "sub" / "small.png")
    src[2].resize((300, 200)).save(root / "sub" / "small.webp")
    src[3].resize((200, 260)).save(root / "sub" / "deeper" / "portrait.bmp")
    src[0].resize((240, 160)).save(root / "sub" / "deeper" / "t.tiff")
    src[1].resize((240, 160)).convert("L").save(root / "sub" / "grey.jpg")
    src[2].resize((240, 160)).convert("RGBA").save(root / "sub" / "rgba.png")
    turned = src[3].resize((240, 160))
    exif = turned.getexif()
    exif[0x0112] = 6  # shown turned a quarter clockwise: 160 wide, 240 high
    turned.save(root / "sub" / "turned.jpg", exif=exif)
    data = open(test_photos[0], "rb").read()
    (root / "sub" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "notes.jpg").write_text("not a photo\n")
    (root / "readme.txt").write_text("ignored: not an image extension\n")
    good = {"kaggle.jpg": rle.FULL_SHAPE, "sub/small.png": (320, 480), "sub/small.webp": (200, 300),
            "sub/deeper/portrait.bmp": (260, 200), "sub/deeper/t.tiff": (160, 240), "sub/grey.jpg": (160, 240),
            "sub/rgba.png": (160, 240), "sub/turned.jpg": (240, 160)}
    stems = {rel: os.path.splitext(rel)[0] for rel in good}
    stems["sub/small.webp"] = "sub/small_webp"  # small.png's outputs are sub/small.png and sub/small_mask.png
    good = {rel: (hw, stems[rel]) for rel, hw in good.items()}
    return {"dir": str(root), "good": good, "bad": ["sub/truncated.jpg", "notes.jpg"]}


def _outputs(out):
    return sorted(os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "**", "*"), recursive=True)
                  if os.path.isfile(p))


def _mtimes(out):
    return {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in _outputs(out)}


@pytest.mark.slow
def test_command_cuts_out_a_mixed_folder_names_bad_files_and_a_rerun_rewrites_nothing(workdir, mixed_folder,
                                                                                       tmp_path):
    out = str(tmp_path / "out")
    proc = _cutout("--ckpt", workdir, mixed_folder["dir"], "--out", out)
    stderr = proc.stderr.decode()
    assert proc.returncode == 1, stderr
    skipped = [line.strip() for line in stderr.splitlines() if "skipped:" in line]
    assert len(skipped) == 2 and "Traceback" not in stderr
    for rel in mixed_folder["bad"]:
        assert sum(os.path.join(mixed_folder["dir"], rel) in line for line in skipped) == 1, stderr
    expected = sorted([stem + suffix for _, stem in mixed_folder["good"].values() for suffix in (".png", "_mask.png")])
    assert _outputs(out) == expected  # nothing for the bad files, no temporary files left
    for hw, stem in mixed_folder["good"].values():
        stem = os.path.join(out, stem)
        cut, mask = Image.open(stem + ".png"), Image.open(stem + "_mask.png")
        assert cut.mode == "RGBA" and mask.mode == "L" and cut.size == mask.size == hw[::-1]
        m, c = np.asarray(mask), np.asarray(cut)
        assert set(np.unique(m)) <= {0, 255}
        np.testing.assert_array_equal(c[..., 3], m)  # the cut-out's alpha is the mask
    assert "cut out 8 photos" in stderr and "2 unreadable" in stderr

    before = _mtimes(out)
    again = _cutout("--ckpt", workdir, mixed_folder["dir"], "--out", out)
    assert again.returncode == 1 and _mtimes(out) == before, again.stderr.decode()
    assert "cut out 0 photos" in again.stderr.decode() and "8 already done" in again.stderr.decode()

    # an interrupted run: one photo's outputs missing, and one left with only its mask
    os.remove(os.path.join(out, "sub", "small.png"))
    os.remove(os.path.join(out, "sub", "deeper", "portrait.png"))
    os.remove(os.path.join(out, "sub", "deeper", "portrait_mask.png"))
    resumed = _cutout("--ckpt", workdir, os.path.join(mixed_folder["dir"], "sub"), "--out", os.path.join(out, "sub"))
    after = _mtimes(out)
    redone = {p for p in after if after[p] != before.get(p)}
    assert redone == {"sub/small.png", "sub/small_mask.png", "sub/deeper/portrait.png",
                      "sub/deeper/portrait_mask.png"}, resumed.stderr.decode()


@pytest.mark.slow
def test_command_stdin_to_stdout_only_mask_soft_and_background(workdir, test_photos, tmp_path):
    data = open(test_photos[1], "rb").read()
    piped = _cutout("--ckpt", workdir, "-", stdin=data)
    assert piped.returncode == 0, piped.stderr.decode()
    cut = np.asarray(Image.open(io.BytesIO(piped.stdout)))
    assert cut.shape == (*rle.FULL_SHAPE, 4)

    _, ensemble, _ = predict.load_ensemble([workdir])
    c = cutter.Cutter(ensemble)
    prepared = c.prepare(data, "x")
    [(mask, alpha)] = c.cut([prepared])
    np.testing.assert_array_equal(cut, cutter.compose(prepared.photo, mask * np.uint8(255)))

    mask_only = _cutout("--ckpt", workdir, "-", "--only_mask", stdin=data)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(mask_only.stdout))), mask * 255)

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(test_photos[1], folder / "p.jpg")
    out = tmp_path / "out"
    proc = _cutout("--ckpt", workdir, str(folder / "*.jpg"), "--out", str(out), "--soft", "--bgcolor", "0,0,0")
    assert proc.returncode == 0, proc.stderr.decode()
    composed = np.asarray(Image.open(out / "p.png"))
    np.testing.assert_array_equal(composed, cutter.compose(prepared.photo, alpha, (0, 0, 0, 255)))
    assert np.asarray(Image.open(out / "p_mask.png")).max() == 255

    only = _cutout("--ckpt", workdir, str(folder), "--out", str(tmp_path / "only"), "--only_mask")
    assert only.returncode == 0 and _outputs(str(tmp_path / "only")) == ["p_mask.png"]


def test_command_errors_are_one_line(workdir, tmp_path):
    for args, message in [((str(tmp_path),), "--out"), (("-", str(tmp_path)), "only INPUT"),
                          ((str(tmp_path), "--out", str(tmp_path / "o"), "--bgcolor", "red"), "--bgcolor")]:
        proc = _cutout("--ckpt", workdir, *args)
        stderr = proc.stderr.decode()
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and "Traceback" not in stderr and len(errors) == 1, stderr
        assert message in errors[0]


@pytest.mark.slow
def test_command_watch_cuts_out_photos_as_they_arrive(workdir, test_photos, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    proc = subprocess.Popen([sys.executable, "-m", "carvana_jax.cutout", "--ckpt", workdir, str(folder), "--out",
                             str(out), "--watch", "--watch_interval", "0.2"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        Image.open(test_photos[2]).resize((300, 200)).save(folder / "new.png")
        deadline = time.time() + 120
        while not (out / "new_mask.png").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (out / "new_mask.png").exists() and (out / "new.png").exists()
        assert Image.open(out / "new.png").size == (300, 200)
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()
    assert "cut out 1 photo " in stderr.decode()


def test_cutout_benchmark_times_every_stage_on_the_same_photos(workdir, kaggle_dir):
    from carvana_jax.bench import cutout as bench_cutout
    r = bench_cutout.bench_cutout([workdir], os.path.join(kaggle_dir, "test"), n=4, batch_size=2, threads=2,
                                  clients=3, requests=4)
    assert r["photos"] == 4 and r["photo_sizes"] == [list(rle.FULL_SHAPE)] and r["image_sizes"] == [[32, 48]]
    assert set(r["stage_s"]) == {"prepare", "device", "encode"} and all(s > 0 for s in r["stage_s"].values())
    assert r["end_to_end_images_per_sec"] == pytest.approx(4 / r["end_to_end_s"])
    assert r["slowest_stage"] == max(r["stage_s"], key=r["stage_s"].get)
    q = r["server"]
    assert q["clients"] == 3 and q["requests"] == 4 and q["requests_per_sec"] == pytest.approx(4 / q["seconds"])
    assert 0 < q["latency_median_s"] <= q["latency_max_s"]
