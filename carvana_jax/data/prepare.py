"""Build the TFDS ``carvana`` dataset from a Kaggle-layout download (zipped or unzipped); no TensorFlow needed.

    python -m carvana_jax.data.prepare --data_dir data/kaggle [--tfds_dir data/kaggle/tfds] [--skip_bad_files]

TFDS writes into ``TFDS_DIR/carvana/incomplete.XXXXXX_1.0.0`` and renames it to ``TFDS_DIR/carvana/1.0.0``
only when both splits are complete, so an interrupted build leaves nothing that looks finished: run the
same command again (it also removes what a killed build left behind). A finished dataset is reused
unless ``--overwrite``.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from absl import flags

from carvana_jax import cli
from carvana_jax.data import kaggle

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags; defined only when it runs, so importing this module (tests, the eval CLI's
    own --data_dir) defines none."""
    flags.DEFINE_string("data_dir", None, "The Kaggle Carvana download (train/, train_masks/, test/, "
                        "sample_submission.csv, train_masks.csv; or their .zip files), or a synthetic dataset "
                        "made with `python -m carvana_jax.synthetic`.")
    flags.DEFINE_string("tfds_dir", None, "Where to write the TFDS dataset (it goes to TFDS_DIR/carvana/1.0.0); "
                        "default: DATA_DIR/tfds.")
    flags.DEFINE_bool("skip_bad_files", False, "Leave out photos that do not decode and photos whose mask is "
                      "missing, unreadable or of another size (each is logged, and the total printed) instead "
                      "of stopping at the first with an error naming it.")
    flags.DEFINE_bool("overwrite", False, "Rebuild even if TFDS_DIR already holds a finished dataset.")
    flags.DEFINE_integer("workers", None, "Threads reading and checking files (default: the CPU count, at most 8).",
                         lower_bound=1)
    flags.DEFINE_bool("progress", True, "Show a progress bar per split (--noprogress to hide it).")
    flags.mark_flag_as_required("data_dir")


def remove_leftovers(tfds_dir: str) -> list[str]:
    """Remove what a killed build left (TFDS's incomplete.* folders); returns their paths."""
    from carvana_jax.data import tfds_carvana
    pattern = os.path.join(tfds_dir, tfds_carvana.NAME, f"incomplete.*_{tfds_carvana.DATASET_VERSION}")
    removed = sorted(glob.glob(pattern))
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def prepare(data_dir: str, tfds_dir: str | None = None, skip_bad_files: bool = False, overwrite: bool = False,
            workers: int | None = None, progress: bool = True) -> dict[str, int]:
    """Build (or reuse) the dataset; prints where it is and the examples per split, and returns those counts."""
    data_dir = os.path.abspath(data_dir)
    tfds_dir = os.path.abspath(tfds_dir or os.path.join(data_dir, "tfds"))
    # Check before TFDS creates anything (the default tfds_dir is inside data_dir).
    if not os.path.isdir(data_dir) or not [f for f in os.listdir(data_dir) if f != "tfds"]:
        raise kaggle.DataError(f"data_dir {data_dir!r} is missing or empty; {kaggle.GET_DATA}")

    import tensorflow_datasets as tfds

    from carvana_jax.data import tfds_carvana
    for path in remove_leftovers(tfds_dir):
        print(f"removed {path} (left by an interrupted build)", file=sys.stderr)
    reused = tfds_carvana.is_prepared(tfds_dir) and not overwrite
    if not reused:
        tfds.disable_progress_bar()  # its bars do not know the totals; the builder shows one per split
        tfds_carvana.build(data_dir, tfds_dir, skip_bad_files=skip_bad_files, overwrite=overwrite,
                           num_workers=workers, progress=progress)
    counts, skipped = {}, 0
    for split in tfds_carvana.SPLITS:
        source = tfds_carvana.load_split(tfds_dir, split)
        counts[split] = len(source)
        skipped += len(source.skipped)
    where = tfds_carvana.dataset_dir(tfds_dir)
    print(f"carvana {tfds_carvana.DATASET_VERSION} {'already prepared' if reused else 'written'} in {where}: "
          + ", ".join(f"{split} {n} examples" for split, n in counts.items())
          + (f"; {skipped} bad file(s) skipped (listed in {os.path.join(where, 'metadata.json')})" if skipped else "")
          + (" (--overwrite rebuilds it)" if reused else ""))
    print(f"read it with --config.data_source=tfds --config.tfds_dir={tfds_dir}")
    return counts


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}\nRun with --help for the flags.", file=sys.stderr)
        sys.exit(2)
    with cli.friendly_errors():
        prepare(FLAGS.data_dir, FLAGS.tfds_dir, skip_bad_files=FLAGS.skip_bad_files, overwrite=FLAGS.overwrite,
                workers=FLAGS.workers, progress=FLAGS.progress)


def run() -> None:
    define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
