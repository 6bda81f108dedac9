"""Benchmarks, one subcommand each (results and how to reproduce them: BENCHMARKS.md).

    python -m carvana_jax.bench train --config configs/demo.py [--config.key=value ...]
                                      [--steps 30] [--warmup 3] [--json] [--torch] [--ops]
                                      [--xla_option KEY=VALUE ...]
    python -m carvana_jax.bench pipeline --data_dir D --image_size 768,768 --num_workers N --batches K
                                      [--batch_size B] [--json] [--dump FILE.npz] [--rounds R]
    python -m carvana_jax.bench predict --ckpt DIR [--ckpt DIR2] --data_dir D --n N [--num_workers W]
                                      [--batch_size B] [--rle_threads T] [--tta hflip] [--rounds R] [--json]
                                      [--postprocess none] [--torch]
    python -m carvana_jax.bench cutout --ckpt DIR [--ckpt DIR2] --photos FOLDER --n N [--batch_size B]
                                      [--threads T] [--tta hflip] [--clients 32] [--requests R] [--json]

``train`` times the real data-parallel train step (``train.step_function``: the config's loss with its
boundary weighting, its EMA, over all local devices) on random uint8 batches of the config's global batch_size
and image_size that are already on the devices, so it measures the model, loss and optimiser, not the input
pipeline. Compilation is timed on its own; then ``--warmup`` steps run untimed and ``--steps`` timed ones,
each waited for with jax.block_until_ready. With ``--torch`` the same U-Net in PyTorch eager (bench/torch_twin.py)
runs on the same CPU in the same process, one torch step after each JAX step, so both see the same machine
load; the twin has the plain loss and no EMA, so compare configs without boundary weighting or EMA (the demo's).

``pipeline`` times the training input pipeline (pipeline.train_dataset, augmentation on) against the
decode-only limit and a straightforward PIL pipeline on the same photos, with a per-stage breakdown
(bench/pipeline.py says exactly what each figure is). The config (default configs/demo.py) gives the
augmentation ranges and seed; --image_size, --batch_size and --num_workers override it.

``predict`` times writing a submission for the first N test photos end to end (submission.write_submission)
against each of its stages on its own over the same photos, and one mask's RLE against the
straightforward numpy version; with ``--torch`` also the device stage against the same model in PyTorch eager
with the checkpoint's weights (bench/predict.py says exactly what each figure is).

``cutout`` times cutting the first N photos of a folder out end to end (``cutout.Runner``: decode, device,
PNG encoding and writing, overlapped as the command runs them) against each stage alone, then the server's
requests/s under --clients concurrent clients (bench/cutout.py).
"""
from __future__ import annotations

import json
import sys

from absl import flags

from carvana_jax import cli
from carvana_jax.bench.train import bench_train, parse_xla_options, print_train_table

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when it runs, so importing this module, e.g. for unet_flops, adds none)."""
    flags.DEFINE_integer("steps", 30, "Timed steps.")
    flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
    flags.DEFINE_bool("torch", False, "train, predict: also time the same U-Net in PyTorch eager on the CPU, "
                      "side by side (predict: with the checkpoint's weights).")
    flags.DEFINE_bool("ops", False, "train: also trace 3 steps with jax.profiler and print where their time goes, "
                      "by the model operation each kernel runs (forward/backward convolutions, norms, …).")
    flags.DEFINE_multi_string("xla_option", [], "train: also time the step compiled with this XLA compiler option "
                              "(KEY=VALUE, repeatable; e.g. xla_cpu_experimental_ynn_fusion_type= for no YNNPACK "
                              "fusions), alternated with the default step in the same process.")
    flags.DEFINE_bool("xla_cache", False,
                      "Use the persistent XLA compilation cache (then 'compile' may time a cache load).")
    # pipeline
    flags.DEFINE_string("data_dir", None, "pipeline: the Kaggle-layout folder to read (default: the config's "
                        "data_dir, or its TFDS dataset with --config.data_source=tfds).")
    flags.DEFINE_string("image_size", "768,768", "pipeline: H,W of the training images.")
    flags.DEFINE_integer("num_workers", 1, "pipeline: grain worker processes (0 = in the main process); "
                         "1 worker is always measured too, for the scaling and the baseline.")
    flags.DEFINE_integer("batches", 20, "pipeline: timed batches per measurement (after 1 untimed warm-up batch).")
    flags.DEFINE_integer("batch_size", None, "pipeline: images per batch (default: the config's batch_size).")
    flags.DEFINE_string("dump", None, "pipeline: save the first 4 augmented batches (arrays 'image' N×H×W×3 "
                        "and 'mask' N×H×W, uint8) to this .npz file.")
    flags.DEFINE_integer("rounds", 1, "pipeline: repeat every measurement this many times, interleaved; "
                         "the medians are reported.")
    flags.DEFINE_bool("baseline", True, "pipeline: also time the straightforward PIL pipeline (--nobaseline skips it).")
    # predict (also --data_dir, --batch_size, --num_workers (default: the checkpoint's), --rounds, --json)
    flags.DEFINE_multi_string("ckpt", None, "predict: checkpoint(s) as eval --ckpt takes them.")
    flags.DEFINE_integer("n", 64, "predict: test photos (the first N in sample_submission order).")
    flags.DEFINE_integer("rle_threads", None, "predict: RLE encoding threads (default: as eval, min(8, CPUs)).")
    flags.DEFINE_enum("tta", "none", ["none", "hflip"], "predict: test-time augmentation.")
    flags.DEFINE_string("postprocess", None, "predict: post-processing as eval --postprocess takes it "
                        "(default: the checkpoint's config).")
    # cutout (also --ckpt, --n, --batch_size (default 8), --tta, --json)
    flags.DEFINE_string("photos", None, "cutout: the folder of photos to cut out (walked like cutout's INPUT).")
    flags.DEFINE_integer("threads", None, "cutout: decoding and PNG threads (default: as cutout, min(8, CPUs)).")
    flags.DEFINE_integer("clients", 32, "cutout: concurrent clients of the server timed after the folder "
                         "(0: the server is not timed).", lower_bound=0)
    flags.DEFINE_integer("requests", None, "cutout: requests the clients send in all (default: 2 per client).",
                         lower_bound=1)
    flags.DEFINE_string("cpu_size", "1024,1024", "predict: H,W at which the per-image decode+resize CPU cost "
                        "is also measured (for projections to a bigger model).")

TORCH_INSTALL = "pip install torch==2.13.0  (the CPU wheel; or pip install -e '.[bench]')"


def require_torch_if_asked() -> None:
    """With --torch, exit with a one-line error saying how to install PyTorch when it is not."""
    if FLAGS.torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print(f"error: --torch needs PyTorch, which is not installed; install it with: {TORCH_INSTALL}",
                  file=sys.stderr)
            sys.exit(1)


def cmd_train() -> None:
    import jax
    require_torch_if_asked()
    if FLAGS.steps < 1 or FLAGS.warmup < 0:
        print("error: --steps must be ≥ 1 and --warmup ≥ 0", file=sys.stderr)
        sys.exit(2)
    if not FLAGS.xla_cache:
        jax.config.update("jax_enable_compilation_cache", False)  # time a real compile, not a cache load
    with cli.friendly_errors():
        result = bench_train(FLAGS.config, FLAGS.steps, FLAGS.warmup, FLAGS.torch, FLAGS.ops,
                             parse_xla_options(FLAGS.xla_option))
    if FLAGS.json:
        print(json.dumps(result))
    else:
        print_train_table(result)


# ---------------------------------------------------------------------------------------------- pipeline

def cmd_pipeline() -> None:
    from carvana_jax.bench import pipeline as bench_pipeline
    try:
        image_size = bench_pipeline.parse_image_size(FLAGS.image_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.batches < 1 or FLAGS.num_workers < 0 or FLAGS.rounds < 1 or (FLAGS.batch_size or 1) < 1:
        print("error: --batches, --rounds and --batch_size must be ≥ 1 and --num_workers ≥ 0", file=sys.stderr)
        sys.exit(2)
    with cli.friendly_errors():
        result = bench_pipeline.bench_pipeline(
            FLAGS.config, data_dir=FLAGS.data_dir, image_size=image_size, num_workers=FLAGS.num_workers,
            batches=FLAGS.batches, batch_size=FLAGS.batch_size, dump=FLAGS.dump, rounds=FLAGS.rounds,
            baseline=FLAGS.baseline)
    if FLAGS.json:
        print(json.dumps(result))
    else:
        bench_pipeline.print_table(result)


# ---------------------------------------------------------------------------------------------- predict

def cmd_predict() -> None:
    from carvana_jax.bench import pipeline as bench_pipeline
    from carvana_jax.bench import predict as bench_predict
    if not FLAGS.ckpt:
        print("error: predict needs --ckpt (a training workdir or checkpoint; repeat it for an ensemble)",
              file=sys.stderr)
        sys.exit(2)
    require_torch_if_asked()
    try:
        cpu_size = bench_pipeline.parse_image_size(FLAGS.cpu_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.n < 1 or FLAGS.rounds < 1 or (FLAGS.batch_size or 1) < 1 or (FLAGS.rle_threads or 1) < 1 \
            or FLAGS.num_workers < 0:
        print("error: --n, --rounds, --batch_size and --rle_threads must be ≥ 1 and --num_workers ≥ 0",
              file=sys.stderr)
        sys.exit(2)
    with cli.friendly_errors():
        result = bench_predict.bench_predict(
            FLAGS.ckpt, data_dir=FLAGS.data_dir, n=FLAGS.n, batch_size=FLAGS.batch_size,
            num_workers=FLAGS.num_workers if FLAGS["num_workers"].present else None, rle_threads=FLAGS.rle_threads,
            tta=FLAGS.tta, rounds=FLAGS.rounds, cpu_size=cpu_size, postprocess=FLAGS.postprocess, torch=FLAGS.torch)
    if FLAGS.json:
        print(json.dumps(result))
    else:
        bench_predict.print_table(result)


# ---------------------------------------------------------------------------------------------- cutout

def cmd_cutout() -> None:
    from carvana_jax.bench import cutout as bench_cutout
    if not FLAGS.ckpt or not FLAGS.photos:
        print("error: cutout needs --ckpt (a training workdir or checkpoint) and --photos FOLDER", file=sys.stderr)
        sys.exit(2)
    if FLAGS.n < 1 or (FLAGS.batch_size or 1) < 1 or (FLAGS.threads or 1) < 1:
        print("error: --n, --batch_size and --threads must be ≥ 1", file=sys.stderr)
        sys.exit(2)
    with cli.friendly_errors():
        try:
            result = bench_cutout.bench_cutout(
                FLAGS.ckpt, FLAGS.photos, n=FLAGS.n, batch_size=FLAGS.batch_size or 8, threads=FLAGS.threads,
                tta=FLAGS.tta if FLAGS["tta"].present else None, clients=FLAGS.clients, requests=FLAGS.requests)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    if FLAGS.json:
        print(json.dumps(result))
    else:
        bench_cutout.print_table(result)


COMMANDS = {"train": cmd_train, "pipeline": cmd_pipeline, "predict": cmd_predict, "cutout": cmd_cutout}
USAGE = ("usage: python -m carvana_jax.bench train --config configs/demo.py [--steps N] [--warmup N] [--json] "
         "[--torch]\n"
         "       python -m carvana_jax.bench pipeline --data_dir D --image_size 768,768 --num_workers N --batches K "
         "[--batch_size B] [--json] [--dump FILE.npz]\n"
         "       python -m carvana_jax.bench predict --ckpt DIR --data_dir D --n N [--json]\n"
         "       python -m carvana_jax.bench cutout --ckpt DIR --photos FOLDER --n N [--json]")


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        got = f"got {argv[1]!r}" if len(argv) > 1 else "none given"
        print(f"error: the first argument must be a benchmark, one of: {', '.join(COMMANDS)} ({got})\n{USAGE}",
              file=sys.stderr)
        sys.exit(2)
    if argv[2:]:
        print(f"error: unexpected arguments after {argv[1]!r}: {' '.join(argv[2:])}", file=sys.stderr)
        sys.exit(2)
    COMMANDS[argv[1]]()


if __name__ == "__main__":
    define_flags()
    cli.run(main, needs_config=True)
