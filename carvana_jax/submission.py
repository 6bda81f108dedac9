"""Writing the Kaggle submission for many photos: overlapped, streamed, resumable, validated.

The rows stream into OUT.partial in ``sample_submission.csv`` order; a rerun after an interruption keeps
its well-formed rows and predicts only the rest, and OUT appears only once every row is in and the file
passes carvana_jax.score's checks, so a partial submission never looks complete.
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import time
from collections.abc import Sequence

from tqdm import tqdm

from carvana_jax import predict, rle
from carvana_jax import score as score_lib
from carvana_jax.data import kaggle, sources

FLUSH_EVERY_S = 2.0  # the partial submission is flushed and its rows made durable at least this often


def image_name(example) -> str:
    """The submission's ``img`` of an example: 'CARID_NN.jpg'."""
    return f"{sources.example_name(example)}.jpg"


def _well_formed(text: bytes, shape: tuple[int, int]) -> bool:
    try:
        return score_lib.validate_rle(text.decode("ascii"), shape) is None
    except UnicodeDecodeError:
        return False


HEADER = b"img,rle_mask\n"


def finished_rows(path: str, names: Sequence[str], shape: tuple[int, int] = rle.FULL_SHAPE) -> tuple[int, int]:
    """(rows, bytes) of the longest well-formed prefix of a (partial) submission: the header, then one
    ``name,rle`` line per image in ``names`` order, each ending in a newline, with runs that are in order
    and inside the mask. A torn or malformed line and everything after it are not counted."""
    rows = 0
    with open(path, "rb") as f:  # line by line: a whole test-set partial is ~1 GB
        if f.readline() != HEADER:
            return 0, 0
        offset = len(HEADER)
        for line in f:
            if rows == len(names) or not line.endswith(b"\n"):
                break
            name, comma, text = line[:-1].partition(b",")
            if not comma or name != names[rows].encode() or not _well_formed(text, shape):
                break
            rows, offset = rows + 1, offset + len(line)
    return rows, offset


def _resume(partial: str, state_path: str, names: Sequence[str], settings: dict) -> int:
    """Rows of ``partial`` to keep (it is truncated after them), or 0 after starting it afresh."""
    if os.path.exists(partial) and os.path.exists(state_path):
        with open(state_path) as f:
            saved = json.load(f)
        if saved != settings:
            differs = ", ".join(k for k in settings if saved.get(k) != settings[k])
            raise kaggle.DataError(f"{partial} was written by a different prediction ({differs} differ); "
                                   "delete it (and its .json) to start again, or choose another --out")
        rows, offset = finished_rows(partial, names)
        if rows:
            with open(partial, "r+b") as f:
                f.truncate(offset)
            return rows
    with open(partial, "wb") as f:
        f.write(HEADER)
    tmp = state_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(settings, f)
    os.replace(tmp, state_path)
    return 0


def write_submission(ensemble: predict.Ensemble, records: Sequence, config, out_path: str, *,
                     settings: dict | None = None, stop_after: int | None = None, rle_threads: int | None = None,
                     batch_size: int | None = None, num_workers: int | None = None, progress: bool = True) -> dict:
    """Predict every record and stream ``img,rle_mask`` rows in order into OUT.partial; rename it to OUT
    only once every row is in and it validates.

    Stages overlap: grain workers decode, the devices predict, up-sample, threshold and bit-pack with
    batches in flight (``Ensemble.packed_masks``), a thread pool encodes the RLE, and this thread writes
    the rows in order, flushed at least every FLUSH_EVERY_S. A rerun after an interruption keeps the
    partial's well-formed rows (``finished_rows``) and predicts only the rest; OUT.partial.json holds the
    ``settings`` the rows were made with, and a rerun with other settings is refused. ``stop_after``
    stops after that many rows are written, as a pre-emption would. Returns {'rows', 'predicted',
    'resumed_from', 'complete', 'seconds' (all of it), 'stream_seconds' (before validation),
    'validate_seconds'}."""
    names = [image_name(r) for r in records]
    out_path = os.path.abspath(out_path)
    partial, state_path = out_path + ".partial", out_path + ".partial.json"
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    if os.path.exists(out_path):
        os.remove(out_path)  # a failed run must not leave an older, complete-looking submission behind
    done = _resume(partial, state_path, names, settings or {})
    todo = records[done:]
    shape = rle.FULL_SHAPE
    threads = rle_threads or max(1, min(8, os.cpu_count() or 1))
    max_pending = 4 * (batch_size or config.eval_batch_size)  # encoded rows waiting: bounds host memory
    rows, predicted, start = done, 0, time.perf_counter()
    pending: collections.deque = collections.deque()

    def write_ready(f, block: bool) -> bool:
        """Write finished rows from the head of ``pending``; False once ``stop_after`` rows are written."""
        nonlocal rows
        while pending and (block or pending[0][1].done()):
            if stop_after is not None and rows - done >= stop_after:
                return False
            name, future = pending.popleft()
            f.write(f"{name},{future.result()}\n")
            rows += 1
            bar.update(1)
        return True

    bar = tqdm(total=len(names), initial=done, unit="img", desc="test", disable=not progress, smoothing=0.1)
    last_flush = time.perf_counter()
    stopped = False
    with open(partial, "a", newline="") as f, concurrent.futures.ThreadPoolExecutor(threads) as pool:
        try:
            for indices, packed in ensemble.packed_masks(todo, config, batch_size, num_workers):
                predicted += len(indices)
                pending.extend((names[done + int(i)], pool.submit(rle.encode_packed, p, shape))
                               for i, p in zip(indices, packed))
                if not write_ready(f, block=len(pending) > max_pending):
                    stopped = True
                    break
                if time.perf_counter() - last_flush > FLUSH_EVERY_S:
                    f.flush()
                    os.fsync(f.fileno())
                    last_flush = time.perf_counter()
            stopped = stopped or not write_ready(f, block=True)
        finally:
            bar.close()
            for _, future in pending:
                future.cancel()
            f.flush()
            os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    result = {"rows": rows, "predicted": predicted, "resumed_from": done, "complete": False,
              "seconds": elapsed, "stream_seconds": elapsed}
    if stopped:
        return result
    if rows != len(names):
        raise kaggle.DataError(f"only {rows} of {len(names)} test images could be predicted (unreadable files "
                               f"skipped); no submission written, {partial} kept")
    validate_start = time.perf_counter()
    problems = score_lib.validate_submission(partial, names)
    result["validate_seconds"] = time.perf_counter() - validate_start
    if problems:
        os.replace(partial, out_path + ".invalid")
        os.remove(state_path)
        raise kaggle.DataError(f"the submission failed validation ({'; '.join(problems[:3])}); "
                               f"kept as {out_path}.invalid, no {out_path} written")
    os.replace(partial, out_path)
    os.remove(state_path)
    result.update(complete=True, seconds=time.perf_counter() - start)
    return result
