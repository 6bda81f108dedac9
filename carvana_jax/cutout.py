"""Cut the car out of any photo with trained models, as rembg does with its own.

    python -m carvana_jax.cutout --ckpt DIR [--ckpt DIR2 ...] INPUT... --out OUTDIR [--tta hflip]
                                 [--only_mask] [--soft] [--bgcolor R,G,B[,A]] [--threshold T] [--overwrite] [--watch]
    python -m carvana_jax.cutout --ckpt DIR - < photo.jpg > cutout.png

INPUT: image files, folders (walked recursively; their layout is mirrored under OUTDIR) and globs. For
``REL/NAME.ext`` it writes ``OUTDIR/REL/NAME.png`` (the photo as RGBA, alpha = the mask; --soft: alpha = the
probability; --bgcolor: laid over that colour) and ``OUTDIR/REL/NAME_mask.png`` (0/255); --only_mask writes only
the mask. Any size and common format (JPEG, PNG, WebP, BMP, TIFF), EXIF orientation honoured: each photo is
read as the models' pipeline reads a Kaggle photo (carvana_jax/photos.py) and its mask comes back at its own
size — for a Kaggle photo exactly the mask ``eval --split test`` encodes. Files are written atomically;
photos whose outputs exist are skipped unless --overwrite, so an interrupted run resumes. A file that is no
readable image is named on one line and skipped, and the exit status is then 1. ``-`` reads one photo from
standard input and writes its cut-out (or with --only_mask its mask) PNG to standard output. --watch keeps
watching the input folders and cuts out photos as they arrive (Ctrl-C stops).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator

from absl import flags
from tqdm import tqdm

from carvana_jax import cli, cutter, photos, predict
from carvana_jax.errors import ConfigError, DataError

FLAGS = flags.FLAGS
STDIN = "-"
SUFFIX_MASK = "_mask"


def define_flags() -> None:
    flags.DEFINE_multi_string("ckpt", None, "Checkpoint folder (a workdir, its checkpoints/ or checkpoints/N); "
                              "repeat for an ensemble.")
    flags.DEFINE_string("out", None, "Output folder (required unless the input is '-').")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("tta", None, "Test-time augmentation, as eval takes it (default: the first checkpoint's).")
    flags.DEFINE_string("postprocess", None, "Post-processing, as eval takes it (default: the first checkpoint's).")
    flags.DEFINE_float("threshold", None, "Probability above which a pixel is car (default: the checkpoint's).")
    flags.DEFINE_bool("only_mask", False, "Write only NAME_mask.png.")
    flags.DEFINE_bool("soft", False, "Cut-out alpha = the probability (soft edges) instead of the 0/255 mask.")
    flags.DEFINE_string("bgcolor", None, "R,G,B[,A]: lay the cut-out over this colour instead of transparency.")
    flags.DEFINE_bool("overwrite", False, "Redo photos whose outputs exist.")
    flags.DEFINE_bool("watch", False, "After the inputs, keep watching the input folders for new photos.")
    flags.DEFINE_float("watch_interval", 1.0, "--watch: seconds between looks at the folders.", lower_bound=0.05)
    flags.DEFINE_integer("batch_size", 8, "Photos of one size per device batch.", lower_bound=1)
    flags.DEFINE_integer("threads", None, "Decoding and PNG-encoding threads (default: the CPU count, at most 8).",
                         lower_bound=1)


@dataclasses.dataclass(frozen=True)
class Job:
    """One input photo and where its outputs go."""
    path: str
    rel: str  # its path under the input folder (its name for a file given by itself)

    def outputs(self, out_dir: str, only_mask: bool) -> dict[str, str]:
        stem = os.path.join(out_dir, os.path.splitext(self.rel)[0])
        paths = {"mask": stem + SUFFIX_MASK + ".png"}
        if not only_mask:
            paths["cutout"] = stem + ".png"
        return paths


def _is_image_name(path: str) -> bool:
    return path.lower().endswith(photos.EXTENSIONS)


def _walk(folder: str, skip: str | None) -> Iterator[Job]:
    """Image files under ``folder`` (by extension, sorted), not under ``skip`` (the output folder)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not (skip and os.path.abspath(os.path.join(root, d)) == skip))
        for name in sorted(files):
            path = os.path.join(root, name)
            if _is_image_name(name):
                yield Job(path, os.path.relpath(path, folder))


def expand(inputs: Iterable[str], out_dir: str | None) -> tuple[list[Job], list[str], list[str]]:
    """(jobs, folders to watch, inputs that name nothing) of the command line's INPUTs: files as they are
    (any extension: a file given by name is tried), folders walked, globs matched."""
    skip = os.path.abspath(out_dir) if out_dir else None
    jobs, folders, missing = [], [], []
    for item in inputs:
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        if not matches or not all(os.path.exists(m) for m in matches):
            missing.append(item)
            continue
        for match in matches:
            if os.path.isdir(match):
                folders.append(match)
                jobs.extend(_walk(match, skip))
            elif not glob.has_magic(item) or _is_image_name(match):
                jobs.append(Job(match, os.path.basename(match)))
    return _unique_outputs(jobs), folders, missing


def _unique_outputs(jobs: list[Job]) -> list[Job]:
    """The jobs, each input once, and two inputs that would write the same outputs (a.jpg beside a.png)
    told apart: the later one's outputs keep its extension (a.png → a_png.png)."""
    seen_paths, seen_stems, out = set(), set(), []
    for job in jobs:
        if os.path.abspath(job.path) in seen_paths:
            continue
        seen_paths.add(os.path.abspath(job.path))
        stem, ext = os.path.splitext(job.rel)
        if stem in seen_stems:
            job = Job(job.path, f"{stem}_{ext.lstrip('.')}{ext}")
        seen_stems.add(os.path.splitext(job.rel)[0])
        out.append(job)
    return out


def write_atomic(path: str, data: bytes) -> None:
    """``path`` holds ``data`` or is left as it was: written beside it, then renamed over it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@dataclasses.dataclass
class Tally:
    done: int = 0
    skipped: int = 0
    bad: int = 0


class Runner:
    """Cuts out jobs: photos decoded and warped in a thread pool, run on the devices in batches of one
    size (``cutter.Cutter``), PNGs encoded and written in the same pool while the next batch runs."""

    def __init__(self, cut, out_dir: str, *, only_mask=False, soft=False, bgcolor=None, overwrite=False,
                 threads: int = 4, batch_size: int = 8, progress: bool = True):
        self.cut, self.out_dir = cut, out_dir
        self.only_mask, self.soft, self.bgcolor, self.overwrite = only_mask, soft, bgcolor, overwrite
        self.threads, self.batch_size, self.progress = threads, batch_size, progress
        self.tally = Tally()

    def todo(self, jobs: Iterable[Job]) -> list[Job]:
        """The jobs whose outputs are not all there (all of them with --overwrite); the others counted."""
        out = []
        for job in jobs:
            if not self.overwrite and all(os.path.exists(p) for p in
                                          job.outputs(self.out_dir, self.only_mask).values()):
                self.tally.skipped += 1
            else:
                out.append(job)
        return out

    def _prepare(self, job: Job):
        with open(job.path, "rb") as f:
            data = f.read()
        return self.cut.prepare(data, job.path, keep_photo=not self.only_mask)

    def _write(self, job: Job, mask, alpha, photo) -> None:
        encoded = cutter.outputs(mask, alpha, photo, soft=self.soft, bgcolor=self.bgcolor,
                                 only_mask=self.only_mask)
        for kind, path in job.outputs(self.out_dir, self.only_mask).items():
            write_atomic(path, encoded[kind])

    def run(self, jobs: list[Job]) -> None:
        bar = tqdm(total=len(jobs), desc="cutout", unit="img", disable=not self.progress or not jobs,
                   file=sys.stderr)
        pending: dict = {}  # bucket → [(job, prepared)]
        writes: collections.deque = collections.deque()
        held = 2 * self.batch_size  # photos decoded or cut but not yet written: bounds the memory held

        def written(keep: int) -> None:
            """Wait for the oldest writes until at most ``keep`` are left."""
            while len(writes) > keep:
                writes.popleft().result()
                self.tally.done += 1
                bar.update(1)

        def flush(bucket) -> None:
            group = pending.pop(bucket)
            for (job, prepared), (mask, alpha) in zip(group, self.cut.cut([p for _, p in group])):
                writes.append(pool.submit(self._write, job, mask, alpha, prepared.photo))
            written(held)

        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            futures, queue = {}, collections.deque(jobs)
            while queue or futures:
                while queue and len(futures) < 2 * self.threads + self.batch_size:
                    job = queue.popleft()
                    futures[pool.submit(self._prepare, job)] = job
                done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    job = futures.pop(future)
                    try:
                        prepared = future.result()
                    except (DataError, OSError) as e:
                        self.tally.bad += 1
                        bar.write(f"skipped: {e if isinstance(e, DataError) else f'{job.path}: {e.strerror or e}'}",
                                  file=sys.stderr)
                        bar.update(1)
                        continue
                    pending.setdefault(prepared.bucket, []).append((job, prepared))
                    if len(pending[prepared.bucket]) >= self.batch_size:
                        flush(prepared.bucket)
                    elif sum(map(len, pending.values())) > held:  # many sizes at once
                        flush(max(pending, key=lambda b: len(pending[b])))
                if not futures:  # nothing more is being decoded: run what is left, however few
                    for bucket in list(pending):
                        flush(bucket)
            written(0)
        bar.close()


def cut_stdin(cut, only_mask: bool, soft: bool, bgcolor) -> None:
    data = sys.stdin.buffer.read()
    prepared = cut.prepare(data, "<stdin>", keep_photo=not only_mask)
    [(mask, alpha)] = cut.cut([prepared])
    encoded = cutter.outputs(mask, alpha, prepared.photo, soft=soft, bgcolor=bgcolor, only_mask=only_mask)
    sys.stdout.buffer.write(encoded["mask" if only_mask else "cutout"])
    sys.stdout.buffer.flush()


def watch(runner: Runner, folders: list[str], interval: float, seen: set[str]) -> None:
    """Cut out photos that appear in ``folders`` (not in ``seen``) until SIGINT or SIGTERM, which let the photos
    in hand finish; a file is taken once its size has stayed the same for one interval, so a half-copied
    photo waits."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    sizes: dict[str, int] = {}
    print(f"watching {', '.join(folders)} (Ctrl-C stops)", file=sys.stderr)
    while not stop.wait(interval):
        ready = []
        for folder in folders:
            for job in _walk(folder, os.path.abspath(runner.out_dir)):
                if job.path in seen:
                    continue
                try:
                    size = os.path.getsize(job.path)
                except OSError:
                    continue
                if sizes.get(job.path) == size:
                    ready.append(job)
                    seen.add(job.path)
                sizes[job.path] = size
        if ready:
            runner.run(ready)


def main(argv) -> None:
    inputs = argv[1:]
    with cli.friendly_errors():
        sys.exit(cutout(inputs))


def cutout(inputs: list[str]) -> int:
    """The command: returns its exit status."""
    if not inputs:
        raise ConfigError("give at least one INPUT (image files, folders, globs, or - for standard input)")
    if not FLAGS.ckpt:
        raise ConfigError("--ckpt is required (a training workdir or checkpoint folder)")
    try:
        bgcolor = cutter.parse_bgcolor(FLAGS.bgcolor)
    except ValueError as e:
        raise ConfigError(f"--bgcolor: {e}") from e
    stdin = inputs == [STDIN]
    if STDIN in inputs and not stdin:
        raise ConfigError("'-' (standard input) must be the only INPUT")
    if not stdin and not FLAGS.out:
        raise ConfigError("--out OUTDIR is required (unless the input is '-')")
    if FLAGS.watch and stdin:
        raise ConfigError("--watch watches folders, not standard input")
    _, ensemble, _ = predict.load_ensemble(FLAGS.ckpt, FLAGS.step, None, FLAGS.threshold, FLAGS.tta,
                                            FLAGS.postprocess)
    cut = cutter.Cutter(ensemble, FLAGS.batch_size)
    if stdin:
        cut_stdin(cut, FLAGS.only_mask, FLAGS.soft, bgcolor)
        return 0
    jobs, folders, missing = expand(inputs, FLAGS.out)
    for item in missing:
        print(f"skipped: {item}: no such file or folder", file=sys.stderr)
    threads = FLAGS.threads or max(1, min(8, os.cpu_count() or 1))
    runner = Runner(cut, FLAGS.out, only_mask=FLAGS.only_mask, soft=FLAGS.soft, bgcolor=bgcolor,
                    overwrite=FLAGS.overwrite, threads=threads, batch_size=FLAGS.batch_size)
    runner.tally.bad += len(missing)
    start = time.perf_counter()
    runner.run(runner.todo(jobs))
    if FLAGS.watch and folders:
        watch(runner, folders, FLAGS.watch_interval, {job.path for job in jobs})
    elif FLAGS.watch:
        print("--watch: no folder among the inputs to watch", file=sys.stderr)
    seconds = time.perf_counter() - start
    t = runner.tally
    rate = f", {t.done / seconds:.1f} images/s" if t.done and seconds > 0 else ""
    print(f"cut out {t.done} photo{'s' if t.done != 1 else ''} into {FLAGS.out} ({t.skipped} already done, "
          f"{t.bad} unreadable or missing{rate})", file=sys.stderr)
    return 1 if t.bad else 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
