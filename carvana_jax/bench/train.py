"""``bench train``: the real data-parallel train step timed on batches already on the devices, its FLOPs
counted from the U-Net's shapes, and optionally the same U-Net in PyTorch eager side by side (torch_twin.py)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from absl import flags

from carvana_jax.errors import ConfigError
from carvana_jax.models import unet

FLAGS = flags.FLAGS

# ---------------------------------------------------------------------------------------------- FLOPs

def _conv_flops(conv, pixels: int) -> int:
    """Multiply-adds × 2 of a stride-1 'SAME' convolution over ``pixels`` output pixels (bias and padding ignored)."""
    return 2 * conv.kernel ** 2 * conv.cin * conv.cout * pixels


def unet_flops(model_cfg, image_size) -> int:
    """Forward FLOPs of one image through models/unet.UNet, counted from the blocks it describes
    (``UNet.block_specs``, ``UNet.head_spec``): 2·k·k·Cin·Cout·H·W for every convolution (the head and the dense
    blocks' 1×1 convs included); pooling, norms, activations, up-sampling and the space-to-depth reshapes are left
    out (a few percent)."""
    model = unet.plain_unet(model_cfg)
    s = model.space_to_depth
    h, w = image_size[0] // s, image_size[1] // s  # where the blocks run
    flops = sum(_conv_flops(conv, (h >> block.level) * (w >> block.level))
                for block in model.block_specs() for conv in block.convs)
    return flops + _conv_flops(model.head_spec(), h * w)


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


def parse_xla_options(items: list[str]) -> dict:
    """``KEY=VALUE`` strings as XLA compiler options: true/false as booleans, integers as ints, the rest as
    text (an empty value is kept: ``xla_cpu_experimental_ynn_fusion_type=`` turns YNNPACK's fusions off)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--xla_option {item!r} is not KEY=VALUE")
        if value.lower() in ("true", "false"):
            options[key] = value.lower() == "true"
        else:
            options[key] = int(value) if value.lstrip("-").isdigit() else value
    return options


def check_xla_options(options: dict) -> None:
    """Refuse an unknown XLA option, or a value of the wrong kind, in a second, before the step is built."""
    import jax
    try:
        jax.jit(lambda x: x + 1).lower(1.0).compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as e:
        raise ConfigError(f"--xla_option: {str(e).splitlines()[0]}") from e


def bench_train(config, steps: int, warmup: int, with_torch: bool, ops: bool = False,
                xla_options: dict | None = None) -> dict:
    import jax
    import numpy as np

    from carvana_jax import memory, optim, parallel, train
    from carvana_jax.config import validate_config
    from carvana_jax.models import unet
    from carvana_jax.train_state import create_train_state

    validate_config(config)
    if xla_options:
        check_xla_options(xla_options)
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

    option_step = None
    if xla_options:  # the same step compiled with other XLA options, on its own copy of the (donated) state
        option_compiled = step_fn.lower(state, batch).compile(compiler_options=xla_options)
        option_state = jax.tree.map(lambda x: x.copy(), state)

        def option_step():
            nonlocal option_state
            option_state, metrics = option_compiled(option_state, batch)
            jax.block_until_ready((option_state, metrics))

    torch_step = None
    if with_torch:
        from carvana_jax.bench import torch_twin as bench_torch
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
    others = {name: fn for name, fn in (("option", option_step), ("torch", torch_step)) if fn}
    for _ in range(warmup):
        jax_step()
        for fn in others.values():
            fn()
    jax_times, other_times = [], {name: [] for name in others}
    for _ in range(steps):  # alternate, so every variant sees the same machine load
        jax_times.append(_timed(jax_step))
        for name, fn in others.items():
            other_times[name].append(_timed(fn))

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
    if ops:  # after the timing, so that the profiler's own cost is in no timed step
        from carvana_jax.bench import op_profile
        result["ops_ms_per_step"] = op_profile.profile_step(jax_step, compiled.as_text())
    if xla_options:
        t = _summary(other_times["option"], config.batch_size, flops)
        result.update({f"option_{k}": v for k, v in t.items()})
        result["xla_options"] = xla_options
        result["option_over_default"] = t["images_per_sec"] / result["images_per_sec"]
    if with_torch:
        import torch
        t = _summary(other_times["torch"], config.batch_size, flops)
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
    if "option_images_per_sec" in r:
        rows.append(("JAX with " + " ".join(f"{k}={v}" for k, v in r["xla_options"].items()), "option_"))
    if "torch_images_per_sec" in r:
        rows.append((f"torch {r['torch_version']} eager ({r['torch_threads']} threads)", "torch_"))
    width = max(34, *(len(name) for name, _ in rows))
    print(f"{'':{width}s} {'images/s':>9s} {'ms/step median':>15s} {'ms/step mean':>13s} {'GFLOP/s':>8s}")
    for name, p in rows:
        print(f"{name:{width}s} {r[p + 'images_per_sec']:9.2f} {r[p + 'ms_per_step_median']:15.1f} "
              f"{r[p + 'ms_per_step_mean']:13.1f} {r[p + 'gflops_per_sec']:8.2f}")
    if "option_over_default" in r:
        print(f"JAX with the options / default (images/s, same run, steps alternated): {r['option_over_default']:.2f}x")
    if "jax_over_torch" in r:
        print(f"JAX / torch (images/s, same run, steps alternated): {r['jax_over_torch']:.2f}x")
    if "ops_ms_per_step" in r:
        table = r["ops_ms_per_step"]
        print(f"where a step's time goes (jax.profiler, 3 steps; kernels summed by operation, "
              f"{sum(ms for _, ms in table):.1f} ms in all — kernels may overlap):")
        for where, ms in table[:20]:
            print(f"  {where:44s} {ms:8.2f} ms")
    print(r["memory_summary"])
    print(f"memory per device: estimate {_gb(r['memory_estimate_gb'])}   peak reported by the device "
          f"{_gb(r['peak_memory_gb'])}   XLA memory_analysis {_gb(r['xla_memory_gb'])}")
    if r.get("host_peak_growth_gb") is not None:
        print(f"first step's peak RSS growth {_gb(r['host_peak_growth_gb'])} (the whole process, "
              f"{r['device_count']} CPU device(s); over the state and batch already resident)")


def _gb(value: float | None) -> str:
    from carvana_jax.memory import human_bytes
    return "n/a" if value is None else human_bytes(value * 1e9)
