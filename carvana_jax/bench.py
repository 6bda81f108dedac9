"""Benchmarks, one subcommand each (results and how to reproduce them: BENCHMARKS.md).

    python -m carvana_jax.bench train --config configs/demo.py [--config.key=value ...]
                                      [--steps 30] [--warmup 3] [--json] [--torch]
    python -m carvana_jax.bench pipeline --data_dir D --image_size 768,768 --num_workers N --batches K
                                      [--batch_size B] [--json] [--dump FILE.npz] [--rounds R]
    python -m carvana_jax.bench predict --ckpt DIR [--ckpt DIR2] --data_dir D --n N [--num_workers W]
                                      [--batch_size B] [--rle_threads T] [--tta hflip] [--rounds R] [--json]
    python -m carvana_jax.bench cutout --ckpt DIR [--ckpt DIR2] --photos FOLDER --n N [--batch_size B]
                                      [--threads T] [--tta hflip] [--clients 32] [--requests R] [--json]

``train`` times the real data-parallel train step (``train.step_function``: the config's loss with its
boundary weighting, its EMA, over all local devices) on random uint8 batches of the config's global batch_size
and image_size that are already on the devices, so it measures the model, loss and optimiser, not the input
pipeline. Compilation is timed on its own; then ``--warmup`` steps run untimed and ``--steps`` timed ones,
each waited for with jax.block_until_ready. With ``--torch`` the same U-Net in PyTorch eager (bench_torch.py)
runs on the same CPU in the same process, one torch step after each JAX step, so both see the same machine
load; the twin has the plain loss and no EMA, so compare configs without boundary weighting or EMA (the demo's).

``pipeline`` times the training input pipeline (pipeline.train_dataset, augmentation on) against the
decode-only limit and a straightforward PIL pipeline on the same photos, with a per-stage breakdown
(bench_pipeline.py says exactly what each figure is). The config (default configs/demo.py) gives the
augmentation ranges and seed; --image_size, --batch_size and --num_workers override it.

``predict`` times writing a submission for the first N test photos end to end (submission.write_submission)
against each of its stages on its own over the same photos, and one mask's RLE against the
straightforward numpy version (bench_predict.py says exactly what each figure is).

``cutout`` times cutting the first N photos of a folder out end to end (``cutout.Runner``: decode, device,
PNG encoding and writing, overlapped as the command runs them) against each stage alone, then the server's
requests/s under --clients concurrent clients (bench_cutout.py).
"""
from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from collections.abc import Callable

from absl import flags

from carvana_jax import cli
from carvana_jax.models.unet import level_widths

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when it runs, so importing this module, e.g. for unet_flops, adds none)."""
    flags.DEFINE_integer("steps", 30, "Timed steps.")
    flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
    flags.DEFINE_bool("torch", False, "Also time the same U-Net in PyTorch eager on the CPU, side by side.")
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


# ---------------------------------------------------------------------------------------------- FLOPs

def _conv_flops(k: int, cin: int, cout: int, h: int, w: int) -> int:
    """Multiply-adds × 2 of a stride-1 'SAME' k×k convolution (bias and padding ignored)."""
    return 2 * k * k * cin * cout * h * w


def _block_flops(model_cfg, cin: int, cout: int, h: int, w: int) -> int:
    if model_cfg.block == "double_conv":
        return _conv_flops(3, cin, cout, h, w) + _conv_flops(3, cout, cout, h, w)
    if model_cfg.block == "dense":
        growth, flops = max(cout // 2, 4), 0
        for _ in range(model_cfg.dense_layers):
            flops += _conv_flops(3, cin, growth, h, w)
            cin += growth
        return flops + _conv_flops(1, cin, cout, h, w)
    raise ValueError(f"model.block must be 'double_conv' or 'dense', got {model_cfg.block!r}")


def unet_flops(model_cfg, image_size) -> int:
    """Forward FLOPs of one image through models/unet.UNet, counted from its shapes: 2·k·k·Cin·Cout·H·W for
    every convolution (the head and the dense blocks' 1×1 convs included); pooling, norms, activations,
    up-sampling and the space-to-depth reshapes are left out (a few percent)."""
    s = model_cfg.get("space_to_depth", 1)
    h, w = image_size[0] // s, image_size[1] // s  # where the blocks run
    depth = model_cfg.depth
    widths = level_widths(model_cfg.features, depth, model_cfg.get("widths", ()))
    flops, cin = 0, 3 * s * s
    for level in range(depth):
        flops += _block_flops(model_cfg, cin, widths[level], h >> level, w >> level)
        cin = widths[level]
    flops += _block_flops(model_cfg, cin, widths[depth], h >> depth, w >> depth)
    for level in reversed(range(depth)):
        flops += _block_flops(model_cfg, widths[level + 1] + widths[level], widths[level], h >> level, w >> level)
    if s == 1:
        return flops + _conv_flops(1, widths[0], 1, h, w)
    return flops + _conv_flops(3, widths[0] + 3 * s * s, s * s, h, w)


# ---------------------------------------------------------------------------------------------- train

def _random_batch(config, seed: int = 0) -> dict:
    import numpy as np
    rng = np.random.default_rng(seed)
    h, w = config.image_size
    return {"image": rng.integers(0, 256, (config.batch_size, h, w, 3), dtype=np.uint8),
            "mask": rng.integers(0, 2, (config.batch_size, h, w), dtype=np.uint8)}


def _summary(times: list[float], batch_size: int, flops_per_image: int) -> dict:
    images_per_sec = batch_size * len(times) / sum(times)
    return {"images_per_sec": images_per_sec,
            "ms_per_step_median": 1e3 * statistics.median(times),
            "ms_per_step_mean": 1e3 * statistics.fmean(times),
            "gflops_per_sec": 3 * flops_per_image * images_per_sec / 1e9}


def _timed(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_train(config, steps: int, warmup: int, with_torch: bool) -> dict:
    import jax
    import numpy as np

    from carvana_jax import memory, optim, parallel, train
    from carvana_jax.config import validate_config
    from carvana_jax.models import unet
    from carvana_jax.train_state import create_train_state

    validate_config(config)
    mesh = parallel.make_mesh()
    parallel.check_batch_divides(config.batch_size, mesh)
    image_size = tuple(config.image_size)
    model = unet.from_config(config.model)
    state = create_train_state(jax.random.PRNGKey(config.seed), model, optim.create_optimizer(config), image_size,
                               ema=config.ema_decay > 0)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    state = parallel.replicate(state, mesh)
    host_batch = _random_batch(config, config.seed)
    batch = parallel.shard_batch(host_batch, mesh)  # one process: its share is the whole batch
    step_fn = train.step_function(config, mesh)

    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start

    def jax_step():
        nonlocal state
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))

    torch_step = None
    if with_torch:
        from carvana_jax import bench_torch
        threads = bench_torch.set_threads()
        trainer = bench_torch.TrainStep(config, seed=config.seed)
        torch_params = bench_torch.param_count(trainer.model)
        if torch_params != params:
            raise AssertionError(f"the torch U-Net has {torch_params} parameters, the Flax one {params}")
        images, masks = trainer.prepare(host_batch)

        def torch_step():
            trainer(images, masks)

    devices = mesh.devices.flatten()
    # The CPU reports no device peak; this process's RSS growth over one (extra, untimed) first run stands in.
    host_growth = memory.host_peak_growth(jax_step) if devices[0].platform == "cpu" else None
    for _ in range(warmup):
        jax_step()
        if torch_step:
            torch_step()
    jax_times, torch_times = [], []
    for _ in range(steps):  # alternate, so both frameworks see the same machine load
        jax_times.append(_timed(jax_step))
        if torch_step:
            torch_times.append(_timed(torch_step))

    flops = unet_flops(config.model, image_size)
    device_peak = memory.peak_device_bytes(devices[0])
    estimate = memory.estimate(config, len(devices))
    xla_bytes = memory.xla_bytes(compiled)
    result = {
        "benchmark": "train",
        "config": FLAGS["config"].config_filename if "config" in FLAGS else None,
        "image_size": list(image_size), "batch_size": config.batch_size,
        "model": {k: config.model[k] for k in ("features", "depth", "norm", "block", "dense_layers", "dtype")},
        "device_kind": devices[0].device_kind, "device_count": len(devices), "platform": devices[0].platform,
        "param_count": params, "forward_gflop_per_image": flops / 1e9,
        "steps": steps, "warmup": warmup, "compile_s": compile_s,
        "jax_version": jax.__version__,
        "peak_memory_gb": device_peak / 1e9 if device_peak is not None else None,  # None: the device does not say
        "memory_estimate_gb": estimate.total / 1e9, "memory_estimate": estimate.as_dict(),
        "memory_summary": estimate.summary(),
        "xla_memory_gb": xla_bytes / 1e9 if xla_bytes is not None else None,
        "host_peak_growth_gb": host_growth / 1e9 if host_growth is not None else None,
        **_summary(jax_times, config.batch_size, flops),
    }
    if with_torch:
        import torch
        t = _summary(torch_times, config.batch_size, flops)
        result.update({f"torch_{k}": v for k, v in t.items()})
        result.update({"torch_version": torch.__version__, "torch_threads": threads, "torch_param_count": torch_params,
                       "jax_over_torch": result["images_per_sec"] / t["images_per_sec"]})
    return result


def print_train_table(r: dict) -> None:
    model = r["model"]
    print(f"train step: {r['config']}  batch {r['batch_size']} of {r['image_size'][0]}x{r['image_size'][1]}  "
          f"U-Net {model['block']} width {model['features']} depth {model['depth']} {model['dtype']}")
    print(f"devices: {r['device_count']} x {r['device_kind']} ({r['platform']})   parameters: {r['param_count']:,}"
          + (f" (torch: {r['torch_param_count']:,}, equal)" if "torch_param_count" in r else ""))
    print(f"forward: {r['forward_gflop_per_image']:.3f} GFLOP/image (train counted as 3x)   "
          f"compile: {r['compile_s']:.1f} s   timed steps: {r['steps']} after {r['warmup']} warm-up")
    rows = [("JAX " + r["jax_version"], "")]
    if "torch_images_per_sec" in r:
        rows.append((f"torch {r['torch_version']} eager ({r['torch_threads']} threads)", "torch_"))
    print(f"{'':34s} {'images/s':>9s} {'ms/step median':>15s} {'ms/step mean':>13s} {'GFLOP/s':>8s}")
    for name, p in rows:
        print(f"{name:34s} {r[p + 'images_per_sec']:9.2f} {r[p + 'ms_per_step_median']:15.1f} "
              f"{r[p + 'ms_per_step_mean']:13.1f} {r[p + 'gflops_per_sec']:8.2f}")
    if "jax_over_torch" in r:
        print(f"JAX / torch (images/s, same run, steps alternated): {r['jax_over_torch']:.2f}x")
    print(r["memory_summary"])
    print(f"memory per device: estimate {_gb(r['memory_estimate_gb'])}   peak reported by the device "
          f"{_gb(r['peak_memory_gb'])}   XLA memory_analysis {_gb(r['xla_memory_gb'])}")
    if r.get("host_peak_growth_gb") is not None:
        print(f"first step's peak RSS growth {_gb(r['host_peak_growth_gb'])} (the whole process, "
              f"{r['device_count']} CPU device(s); over the state and batch already resident)")


def _gb(value: float | None) -> str:
    from carvana_jax.memory import human_bytes
    return "n/a" if value is None else human_bytes(value * 1e9)


def cmd_train() -> None:
    import jax
    if FLAGS.torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print(f"error: --torch needs PyTorch, which is not installed; install it with: {TORCH_INSTALL}",
                  file=sys.stderr)
            sys.exit(1)
    if FLAGS.steps < 1 or FLAGS.warmup < 0:
        print("error: --steps must be ≥ 1 and --warmup ≥ 0", file=sys.stderr)
        sys.exit(2)
    if not FLAGS.xla_cache:
        jax.config.update("jax_enable_compilation_cache", False)  # time a real compile, not a cache load
    with cli.friendly_errors():
        result = bench_train(FLAGS.config, FLAGS.steps, FLAGS.warmup, FLAGS.torch)
    if FLAGS.json:
        print(json.dumps(result))
    else:
        print_train_table(result)


# ---------------------------------------------------------------------------------------------- pipeline

def cmd_pipeline() -> None:
    from carvana_jax import bench_pipeline
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
    from carvana_jax import bench_pipeline, bench_predict
    if not FLAGS.ckpt:
        print("error: predict needs --ckpt (a training workdir or checkpoint; repeat it for an ensemble)",
              file=sys.stderr)
        sys.exit(2)
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
            tta=FLAGS.tta, rounds=FLAGS.rounds, cpu_size=cpu_size)
    if FLAGS.json:
        print(json.dumps(result))
    else:
        bench_predict.print_table(result)


# ---------------------------------------------------------------------------------------------- cutout

def cmd_cutout() -> None:
    from carvana_jax import bench_cutout
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
