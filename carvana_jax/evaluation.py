"""Score checkpoints on photos with known masks, or write a Kaggle submission for the test photos.

    python -m carvana_jax.eval --ckpt DIR [--ckpt DIR2 ...] [--split val|train|test] [--tta none|hflip,shift,scale,phase]
                               [--postprocess none|guided|components|fill|clean|LIST] [--threshold T] [--out PATH]
                               [--step N] [--data_dir D] [--num_workers W]

Each checkpoint carries its config (model, image size, validation split), so nothing else is needed.
Several checkpoints, of any configs and input sizes, are averaged as probabilities at 1918×1280: each
model predicts at its own size (averaged there over the --tta views), its probabilities are up-sampled
to full resolution (or cropped, for a fit='pad' model), and the mean over models is thresholded, then
cleaned by --postprocess ('guided' refines the mean by the photo before the threshold). The records,
the split and the defaults of --threshold, --tta and --postprocess come from the first checkpoint's config.

val / train: mean Dice, and in --out (default CKPT_WORKDIR/eval_<split>/) per_image.csv (img, dice),
dice_histogram.png and worst.png (the 12 worst photos, truth and prediction overlaid).
test: the submission CSV at --out (default CKPT_WORKDIR/submission.csv), streamed into OUT.partial; an
interrupted run resumes from it, and OUT appears only when every row is in and the file validates.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np
from absl import flags

from carvana_jax import checkpoint, parallel, plots, predict, rle, submission
from carvana_jax.data import augment, kaggle, pipeline, sources
from carvana_jax.errors import ConfigError


def define_flags() -> None:
    """The command's flags (defined only when it runs, so importing this module adds none)."""
    flags.DEFINE_multi_string("ckpt", None, "A training workdir, its checkpoints/ folder, or one checkpoint step "
                              "folder; repeat it to average several models' probabilities.", required=True)
    flags.DEFINE_enum("split", "val", ["val", "train", "test"], "val: Dice against the held-out cars' masks; "
                      "train: Dice over every training photo; test: predict every test photo and write the "
                      "submission CSV.")
    flags.DEFINE_string("data_dir", None, "Kaggle-layout data folder (default: the one the checkpoint was trained on).")
    flags.DEFINE_enum("data_source", None, ["folder", "tfds"], "Read the Kaggle folder or the prepared TFDS dataset "
                      "(default: what the checkpoint was trained on).")
    flags.DEFINE_string("tfds_dir", None, "Where the TFDS dataset was prepared (default: the checkpoint's, else "
                        "DATA_DIR/tfds).")
    flags.DEFINE_string("out", None, "test: the submission CSV (default CKPT_WORKDIR/submission.csv); val/train: the "
                        "folder for per_image.csv and the plots (default CKPT_WORKDIR/eval_<split>/).")
    flags.DEFINE_string("tta", None, "Test-time augmentation, a comma list: none, hflip (the mirrored photo), "
                        "shift (moved by ±4 model pixels diagonally), scale (resized 0.9x and 1.1x), phase (moved "
                        "by one pixel diagonally, mirrored too with hflip); the "
                        "probabilities of the plain and every listed view are averaged at model size "
                        "(default: the first checkpoint's tta).")
    flags.DEFINE_string("postprocess", None, "Prediction clean-up before scoring or writing, a comma list of: "
                        "none, guided (snap the edge to the photo's with a guided filter, on the devices), "
                        "components (drop specks away from the car), fill (fill small holes), clean "
                        "(components,fill) (default: the first checkpoint's postprocess).")
    flags.DEFINE_integer("step", None, "Checkpoint step to load from each --ckpt workdir (default: the best by val "
                         "Dice, else the latest).")
    flags.DEFINE_float("threshold", None, "Probability above which a pixel is car (default: the first checkpoint's).")
    flags.DEFINE_integer("num_workers", None, "grain worker processes decoding the photos; 0 reads them in this "
                         "process (default: the first checkpoint's).")


FLAGS = flags.FLAGS

WORST = 12  # photos drawn in worst.png
PLOT_HW = (320, 480)  # size the photos are drawn at (a 1/4 JPEG decode)


# ---------------------------------------------------------------------------------------------- scoring

def records_for(split: str, config) -> Sequence:
    """The examples of ``split``: the config's held-out cars, every training photo, or the test photos."""
    if split == "test":
        return sources.test_examples(config)
    if split == "train":
        everything = config.copy_and_resolve_references()
        everything.val_fraction = 0.0
        everything.val_cars = ()
        return sources.train_and_val(everything)[0]
    _, val = sources.train_and_val(config)
    if not val:
        raise kaggle.DataError("the checkpoint was trained with val_fraction=0: no held-out cars to score "
                               "(train with --config.val_fraction=0.1, or use --split train or test)")
    return val


def write_per_image(path: str, names: Sequence[str], scores: np.ndarray) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["img", "dice"])
        writer.writerows((name, repr(float(s))) for name, s in zip(names, scores))


def _plot_photo(example) -> tuple[np.ndarray, object]:
    """(the photo at PLOT_HW, its mask source or None) of an example."""
    import cv2
    parts = pipeline.element_parts(example)
    photo, _ = augment.decode_image(parts.image, PLOT_HW, parts.name)
    return cv2.resize(photo, PLOT_HW[::-1], interpolation=cv2.INTER_AREA), parts


def plot_worst(records: Sequence, scores: np.ndarray, worst: dict[int, np.ndarray], out_path: str) -> None:
    """The photos of ``worst`` ({record index: bit-packed predicted mask}), lowest Dice first, with truth
    and prediction overlaid."""
    import cv2
    photos, truths, preds, titles = [], [], [], []
    for index in sorted(worst, key=lambda i: scores[i]):
        photo, parts = _plot_photo(records[index])
        shape = rle.FULL_SHAPE
        mask = np.unpackbits(worst[index], count=shape[0] * shape[1]).reshape(shape)
        truth = parts.mask.decode(shape, image_name=parts.name)
        photos.append(photo)
        truths.append(cv2.resize(truth, PLOT_HW[::-1], interpolation=cv2.INTER_NEAREST))
        preds.append(cv2.resize(mask, PLOT_HW[::-1], interpolation=cv2.INTER_NEAREST))
        titles.append(f"{submission.image_name(records[index])}  Dice {scores[index]:.4f}")
    if photos:
        plots.plot_worst(photos, truths, preds, titles, out_path)


def score(ensemble: predict.Ensemble, records: Sequence, config, out_dir: str, progress: bool = True) -> np.ndarray:
    """Per-image Dice at 1918×1280, written to OUT_DIR/per_image.csv with a histogram and the worst photos."""
    scores, worst = ensemble.dice(records, config, progress=progress, keep_worst=WORST)
    names = [submission.image_name(r) for r in records]
    write_per_image(os.path.join(out_dir, "per_image.csv"), names, scores)
    plots.plot_dice_histogram(scores, os.path.join(out_dir, "dice_histogram.png"))
    plot_worst(records, scores, worst, os.path.join(out_dir, "worst.png"))
    return scores


# ---------------------------------------------------------------------------------------------- command

def evaluate(ckpt: str | Sequence[str], split: str = "val", data_dir: str | None = None, out: str | None = None,
             tta: str | None = None, step: int | None = None, data_source: str | None = None,
             tfds_dir: str | None = None, threshold: float | None = None, progress: bool = True,
             num_workers: int | None = None, postprocess: str | None = None, **submission_kw) -> dict:
    """Score (val/train) or predict the test photos (test) with one checkpoint or an ensemble of several;
    ``tta``, ``postprocess`` and ``threshold`` default to the first checkpoint's config."""
    ckpts = [ckpt] if isinstance(ckpt, str) else list(ckpt)
    if parallel.process_count() > 1:  # every process would write the same files
        raise ConfigError(f"eval runs in one process (this job has {parallel.process_count()}); start it without "
                          "--num_processes / the launcher: one process uses all of its machine's devices")
    mesh = parallel.make_mesh()
    config, ensemble, loaded = predict.load_ensemble(ckpts, step, mesh, threshold, tta, postprocess)
    tta, postprocess = ensemble.tta_name, ensemble.postprocess_name
    for key, value in (("data_dir", data_dir), ("data_source", data_source), ("tfds_dir", tfds_dir),
                       ("num_workers", num_workers)):
        if value is not None:
            config[key] = value
    records = records_for(split, config)
    workdir = checkpoint.ckpt_workdir(ckpts[0])
    steps = [at for _, at in loaded]
    about = f"{len(ckpts)} checkpoint{'s' if len(ckpts) > 1 else ''} (steps {steps}), tta={tta}, " \
            f"threshold={ensemble.threshold}" + (f", postprocess={postprocess}" if postprocess != "none" else "")
    if split in ("val", "train"):
        out_dir = out or os.path.join(workdir, f"eval_{split}")
        scores = score(ensemble, records, config, out_dir, progress)
        result = {"split": split, "step": steps[0], "steps": steps, "images": int(np.isfinite(scores).sum()),
                  "dice": float(np.nanmean(scores)), "tta": tta, "threshold": ensemble.threshold,
                  "postprocess": postprocess, "out": out_dir}
        print(f"{split} Dice at 1918x1280: {result['dice']:.5f} over {result['images']} images ({about}); "
              f"per-image Dice and plots in {out_dir}")
        return result
    out = out or os.path.join(workdir, "submission.csv")
    settings = {"checkpoints": [[path, at] for path, at in loaded], "tta": tta, "threshold": ensemble.threshold,
                "images": len(records)}
    if postprocess != "none":  # only then: partials written before the key existed still resume
        settings["postprocess"] = postprocess
    stats = submission.write_submission(ensemble, records, config, out, settings=settings, progress=progress,
                                        **submission_kw)
    if stats["complete"]:
        rate = stats["predicted"] / max(stats["seconds"], 1e-9)
        resumed = f", resumed after {stats['resumed_from']}" if stats["resumed_from"] else ""
        print(f"submission: {out} ({stats['rows']} images, {rate:.1f} images/s{resumed}; {about}), validated")
    return {"split": "test", "step": steps[0], "steps": steps, "images": stats["rows"], "submission": out, **stats}


def main(argv) -> None:
    del argv
    from carvana_jax import cli
    with cli.friendly_errors():
        evaluate(FLAGS.ckpt, FLAGS.split, FLAGS.data_dir, FLAGS.out, FLAGS.tta, FLAGS.step, FLAGS.data_source,
                 FLAGS.tfds_dir, FLAGS.threshold, num_workers=FLAGS.num_workers, postprocess=FLAGS.postprocess)
