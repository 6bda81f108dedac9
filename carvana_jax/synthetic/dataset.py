"""The synthetic dataset in the Kaggle layout, written whole or not at all, and its command."""
from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from carvana_jax import rle
from carvana_jax.synthetic.cars import sample_car
from carvana_jax.synthetic.render import NUM_ANGLES, render_view, view_angle

class OutputExistsError(FileExistsError):
    """The output directory already exists and is not empty (and overwrite was not asked for)."""



# --------------------------------------------------------------------------------------------
# Dataset generation
# --------------------------------------------------------------------------------------------

def car_ids(num: int, seed: int) -> list[str]:
    """``num`` distinct 12-hex-digit car ids (like Kaggle's ``00087a6bd4dc``), fixed by the seed."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA4]))
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < num:
        cid = rng.bytes(6).hex()
        if cid not in seen:
            seen.add(cid)
            ids.append(cid)
    return ids


def car_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of car ``index`` (train cars first, then test cars)."""
    return np.random.default_rng(np.random.SeedSequence([seed, 0x5EED, index]))


def _palette_gif(mask: np.ndarray, path: Path) -> None:
    im = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask, np.uint8).tobytes())
    im.putpalette([0, 0, 0, 255, 255, 255])
    im.save(path, format="GIF")


def _render_car_task(task: tuple) -> tuple[str, dict, list[tuple[str, str]]]:
    """Worker: render and write the 16 photos (and masks) of one car; returns (id, metadata, csv rows)."""
    root, car_id, index, seed, quality, is_train = task
    rng = car_rng(seed, index)
    car = sample_car(rng)
    root = Path(root)
    rows = []
    for nn in range(1, NUM_ANGLES + 1):
        img, mask = render_view(car, view_angle(nn), rng)
        name = f"{car_id}_{nn:02d}"
        bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        path = root / ("train" if is_train else "test") / f"{name}.jpg"
        if not cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)]):
            raise OSError(f"could not write {path}")
        if is_train:
            _palette_gif(mask, root / "train_masks" / f"{name}_mask.gif")
            rows.append((f"{name}.jpg", rle.encode(mask)))
        else:
            rows.append((f"{name}.jpg", "1 1"))
    return car_id, car.metadata(), rows


def _init_worker() -> None:
    cv2.setNumThreads(1)


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _is_nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def generate(out_dir: str | os.PathLike, num_cars: int, num_test_cars: int = 4, seed: int = 0, quality: int = 90,
             workers: int | None = None, progress: bool = True, overwrite: bool = False) -> None:
    """Write a synthetic Carvana dataset (``num_cars`` train cars, ``num_test_cars`` test cars) to ``out_dir``.

    Raises OutputExistsError if ``out_dir`` exists and is not empty, unless ``overwrite``.
    """
    if num_cars < 1 or num_test_cars < 0:
        raise ValueError(f"need at least one train car and no negative test cars, got {num_cars}, {num_test_cars}")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    out = Path(out_dir)
    if _is_nonempty(out) and not overwrite:
        raise OutputExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        for sub in ("train", "train_masks", "test"):
            (tmp / sub).mkdir()
        ids = car_ids(num_cars + num_test_cars, seed)
        tasks = [(str(tmp), cid, i, seed, quality, i < num_cars) for i, cid in enumerate(ids)]
        workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
        results = []
        from tqdm import tqdm
        with tqdm(total=len(tasks) * NUM_ANGLES, unit="img", desc="synthetic carvana", disable=not progress) as bar:
            if workers == 1:
                for task in tasks:
                    results.append(_render_car_task(task))
                    bar.update(NUM_ANGLES)
            else:
                ctx = multiprocessing.get_context("spawn")  # safe even if the caller has started threads (JAX)
                with ctx.Pool(workers, initializer=_init_worker) as pool:
                    for res in pool.imap_unordered(_render_car_task, tasks):
                        results.append(res)
                        bar.update(NUM_ANGLES)
        train_ids = set(ids[:num_cars])
        train_rows = sorted(r for cid, _, rows in results if cid in train_ids for r in rows)
        test_rows = sorted(r for cid, _, rows in results if cid not in train_ids for r in rows)
        meta = sorted((cid, m["year"], m["make"], m["model"], m["trim1"], m["trim2"]) for cid, m, _ in results)
        # The CSVs last: a folder with them is complete.
        _write_csv(tmp / "metadata.csv", ["id", "year", "make", "model", "trim1", "trim2"], meta)
        _write_csv(tmp / "sample_submission.csv", ["img", "rle_mask"], test_rows)
        _write_csv(tmp / "train_masks.csv", ["img", "rle_mask"], train_rows)
        if out.exists() or out.is_symlink():
            if _is_nonempty(out):
                old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
                os.replace(out, old / "data")
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                out.rmdir() if out.is_dir() else out.unlink()
                os.replace(tmp, out)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m carvana_jax.synthetic",
        description="Write a synthetic dataset in the exact Kaggle Carvana layout "
                    "(train/, train_masks/, test/, train_masks.csv, sample_submission.csv, metadata.csv).")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--cars", type=int, required=True, help="number of training cars (16 photos and masks each)")
    parser.add_argument("--test_cars", type=int, default=4, help="number of test cars, photos only (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="base random seed; the output depends only on it (default: 0)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100 (default: 90)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help=f"worker processes, one car at a time each (default: os.cpu_count() = {os.cpu_count()})")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already exists and is not empty")
    parser.add_argument("--no_progress", action="store_true", help="do not show a progress bar")
    args = parser.parse_args(argv)
    if args.cars < 1:
        parser.error("--cars must be at least 1")
    if args.test_cars < 0:
        parser.error("--test_cars must be 0 or more")
    if not 1 <= args.quality <= 100:
        parser.error("--quality must be in 1..100")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        generate(args.out, args.cars, args.test_cars, args.seed, args.quality, args.workers,
                 progress=not args.no_progress, overwrite=args.overwrite)
    except OutputExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


