"""Score a checkpoint on validation photos, or write a Kaggle submission for the test photos.

    python -m carvana_jax.eval --ckpt WORKDIR [--split val|test] [--data_dir D] [--out FILE] [--tta hflip]

The checkpoint carries its config (model, image size, validation split), so nothing else is
needed; predictions are made at model size, up-sampled to 1918×1280 and thresholded.
"""
from __future__ import annotations

import csv
import os
import time

import jax
import numpy as np
from absl import flags
from tqdm import tqdm

from carvana_jax import optim, parallel, predict, rle
from carvana_jax.checkpoint import Checkpointer, CheckpointError, checkpoint_dir
from carvana_jax.data import kaggle, sources
from carvana_jax.models import unet
from carvana_jax.train_state import create_train_state

flags.DEFINE_string("ckpt", None, "A training workdir, its checkpoints/ folder, or one checkpoint step folder.",
                    required=True)
flags.DEFINE_enum("split", "val", ["val", "test"], "val: Dice against the held-out cars' masks; "
                  "test: predict every test photo and write the submission CSV.")
flags.DEFINE_string("data_dir", None, "Kaggle-layout data folder (default: the one the checkpoint was trained on).")
flags.DEFINE_enum("data_source", None, ["folder", "tfds"], "Read the Kaggle folder or the prepared TFDS dataset "
                  "(default: what the checkpoint was trained on).")
flags.DEFINE_string("tfds_dir", None, "Where the TFDS dataset was prepared (default: the checkpoint's, else DATA_DIR/tfds).")
flags.DEFINE_string("out", None, "Submission CSV path for --split test (default: CKPT_WORKDIR/submission.csv).")
flags.DEFINE_enum("tta", "none", ["none", "hflip"], "Test-time augmentation: average with the h-flipped prediction.")
flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the best by val Dice, else the latest).")
FLAGS = flags.FLAGS


def load_checkpoint(path: str, step: int | None = None, mesh=None):
    """(config, variables, apply_fn, step) of a checkpoint; step defaults to the best, else the latest."""
    path = os.path.abspath(path)
    if os.path.basename(path).isdigit() and step is None:
        path, step = os.path.dirname(path), int(os.path.basename(path))
    directory = checkpoint_dir(path)
    if not os.path.isdir(directory):
        raise CheckpointError(f"--ckpt {path}: no such folder")
    ckpt = Checkpointer(directory, read_only=True)
    step = step if step is not None else ckpt.best_step()
    if step is None or step not in ckpt.manager.all_steps():
        raise CheckpointError(f"--ckpt {path}: no checkpoint{'' if step is None else f' at step {step}'} there "
                              "(expected a training workdir or its checkpoints/ folder)")
    config = ckpt.load_config(step)
    model = unet.from_config(config.model)
    target = create_train_state(jax.random.PRNGKey(0), model, optim.create_optimizer(config), tuple(config.image_size))
    mesh = mesh or parallel.make_mesh()
    state, _ = ckpt.restore(step, parallel.replicate(target, mesh), with_data=False)
    ckpt.close()
    return config, state.variables, model.apply, step


def write_submission(records_and_masks, total: int, out_path: str) -> int:
    """Stream (record, mask) pairs into ``out_path`` as img,rle_mask; written to a temporary file
    and renamed only when every row is in, so a partial submission never looks complete."""
    tmp = out_path + ".partial"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    rows = 0
    start = time.perf_counter()
    with open(tmp, "w", newline="") as f, tqdm(total=total, unit="img", desc="test") as bar:
        writer = csv.writer(f)
        writer.writerow(["img", "rle_mask"])
        for record, mask in records_and_masks:
            writer.writerow([f"{sources.example_name(record)}.jpg", rle.encode(mask)])
            rows += 1
            bar.update(1)
    if rows != total:
        os.remove(tmp)
        raise kaggle.DataError(f"only {rows} of {total} test images could be predicted; no submission written")
    os.replace(tmp, out_path)
    print(f"wrote {rows} rows in {time.perf_counter() - start:.1f}s")
    return rows


def evaluate(ckpt: str, split: str = "val", data_dir: str | None = None, out: str | None = None,
             tta: str = "none", step: int | None = None, data_source: str | None = None,
             tfds_dir: str | None = None) -> dict:
    mesh = parallel.make_mesh()
    config, variables, apply_fn, step = load_checkpoint(ckpt, step, mesh)
    for key, value in (("data_dir", data_dir), ("data_source", data_source), ("tfds_dir", tfds_dir)):
        if value is not None:
            config[key] = value
    hflip = tta == "hflip"
    if split == "val":
        _, val_records = sources.train_and_val(config)
        if not val_records:
            raise kaggle.DataError("the checkpoint was trained with val_fraction=0: no held-out cars to score "
                                   "(train with --config.val_fraction=0.1, or use --split test)")
        scores = predict.val_dice(variables, apply_fn, val_records, config, mesh, hflip_tta=hflip, progress=True)
        result = {"split": "val", "step": step, "images": int(np.isfinite(scores).sum()),
                  "dice": float(np.nanmean(scores)), "tta": tta}
        print(f"validation Dice at 1918x1280: {result['dice']:.5f} over {result['images']} images "
              f"(checkpoint step {step}, tta={tta})")
        return result
    records = sources.test_examples(config)
    out = out or os.path.join(os.path.dirname(checkpoint_dir(os.path.abspath(ckpt))), "submission.csv")
    rows = write_submission(predict.predict_masks(variables, apply_fn, records, config, mesh, hflip_tta=hflip),
                            len(records), out)
    print(f"submission: {out} ({rows} images, checkpoint step {step}, tta={tta})")
    return {"split": "test", "step": step, "images": rows, "submission": out}


def main(argv) -> None:
    del argv
    from carvana_jax import cli
    with cli.friendly_errors():
        evaluate(FLAGS.ckpt, FLAGS.split, FLAGS.data_dir, FLAGS.out, FLAGS.tta, FLAGS.step, FLAGS.data_source,
                 FLAGS.tfds_dir)


if __name__ == "__main__":
    from carvana_jax import cli
    cli.run(main)
