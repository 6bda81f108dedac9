"""Device memory of one training micro-step: an estimate counted from the U-Net's shapes, and the measured peak.

    python -m carvana_jax.memory --config configs/unet1024.py [--config.model.remat=true] [--num_devices N]

The estimate adds what lives on a device at the step's peak, the start of the backward pass: parameters and
BatchNorm statistics, the optimiser state, the gradients, the micro-batch, the activations the forward pass keeps
for the backward one, and the gradients in flight. Activations are counted tensor by tensor from the U-Net's own
block specs (``UNet.block_specs``, which the FLOP count reads too). Checked against XLA's own buffer assignment
(``compiled.memory_analysis()``) and the measured peak RSS of a CPU step (tests/test_memory.py), and against the
peaks an H100 reported (BENCHMARKS.md, "Memory: estimate and measured").
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

from carvana_jax.errors import DeviceOutOfMemory
from carvana_jax.models import unet

COMPUTE_BYTES = {"float32": 4, "bfloat16": 2}
STATE_BYTES = 4            # parameters, gradients and optimiser state stay float32 whatever model.dtype is
OPTIMIZER_SLOTS = {"adam": 2, "adamw": 2, "rmsprop": 1}  # per-parameter moments of the inner optimiser
LOSS_MAPS = 4              # float32 full-size maps around the loss: logits, probabilities, mask, their gradient
# Gradients in flight during the backward pass, in full-size tensors of the first block's width: the one entering
# a block, the one leaving it, the skip connection's gradient held until its down block, and the layout copies
# and pooling indices XLA makes for the weight gradients. Fitted to XLA's buffer assignment for the CPU (7–9 across
# the widths and depths in tests/test_memory.py); the H100 peaks in BENCHMARKS.md fall within 20% with it.
BACKWARD_WORKING_TENSORS = 9


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one device for one micro-step of ``batch`` images."""
    params: int                 # parameters and BatchNorm statistics
    optimizer: int              # inner optimiser's moments + MultiSteps' accumulated gradients
    gradients: int
    activations_per_image: int  # kept for the backward pass, plus the gradients in flight
    batch: int                  # images per device per micro-step
    input_batch: int            # the uint8 images and masks
    remat: bool
    dtype: str
    encoder: str = "unet"       # counted for the plain U-Net only (models/unet.py)

    @property
    def activations(self) -> int:
        return self.activations_per_image * self.batch

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations + self.input_batch

    def summary(self) -> str:
        if self.encoder != "unet":
            return f"memory estimate: not counted for encoder {self.encoder} (only the plain U-Net's is)"
        return (f"memory estimate per device ({self.dtype}{', remat' if self.remat else ''}): "
                f"params {human_bytes(self.params)}, optimiser {human_bytes(self.optimizer)}, "
                f"gradients {human_bytes(self.gradients)}, activations {human_bytes(self.activations_per_image)}/image "
                f"× {self.batch} = {human_bytes(self.activations)}, total ≈ {human_bytes(self.total)}")

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "activations": self.activations, "total": self.total}


def human_bytes(n: float) -> str:
    """1234567 → '1.23 MB' (decimal units, three significant digits)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------------------------- parameters

def _convs(model_cfg) -> list[unet.ConvSpec]:
    """Every convolution of the U-Net, the head included."""
    model = unet.plain_unet(model_cfg)
    return [conv for block in model.block_specs() for conv in block.convs] + [model.head_spec()]


def param_count(model_cfg) -> int:
    """Trainable parameters: kernels, and per output channel either BatchNorm's scale and bias or the conv's bias."""
    return sum(c.kernel ** 2 * c.cin * c.cout + (2 if c.normed else 1) * c.cout for c in _convs(model_cfg))


def batch_stats_count(model_cfg) -> int:
    """BatchNorm's running mean and variance: two numbers per normalised channel."""
    return sum(2 * c.cout for c in _convs(model_cfg) if c.normed)


# ---------------------------------------------------------------------------------------------- activations

def _kept(convs) -> list[int]:
    """Channels of every tensor a block of ``convs`` keeps for the backward pass (its input not included); the last
    is its output. A conv → norm → ReLU keeps the conv's output (BatchNorm's backward needs its input) and the
    ReLU's output (the next convolution's input and the ReLU's own mask); without norm only the latter. A dense
    block (its convolutions' inputs grow) also keeps each concatenation, the input of its next convolution."""
    kept = []
    for conv, following in zip(convs, convs[1:] + (None,)):
        kept += [conv.cout, conv.cout] if conv.normed else [conv.cout]
        if following is not None and following.cin != conv.cout:
            kept.append(following.cin)
    return kept


def block_kept(model_cfg, cin: int, cout: int) -> list[int]:
    """Channels of every tensor a block from ``cin`` to ``cout`` channels keeps for the backward pass."""
    return _kept(unet.block_convs(model_cfg.block, model_cfg.norm, model_cfg.dense_layers, cin, cout))


def activation_bytes_per_image(model_cfg, image_size) -> int:
    """What one image adds to the step's peak: the tensors kept for the backward pass and the gradients in flight.

    Without remat every block keeps block_kept's tensors; the pooled maps and the up blocks' concatenated inputs
    are kept too (the next convolution's input, needed for its weight gradient). With remat only each block's input
    and output are kept, plus one block's worth of recomputed tensors (the largest), rebuilt while its gradient is
    taken."""
    h, w = image_size
    model = unet.plain_unet(model_cfg)
    s = model.space_to_depth
    dtype = COMPUTE_BYTES[model_cfg.dtype]
    pixels = [(h // s >> level) * (w // s >> level) for level in range(model_cfg.depth + 1)]
    kept = 3 * h * w  # the image (or its patches) in the compute dtype: the first convolution's input
    if s > 1:  # the head's input: the last block ++ the patches
        kept += model.head_spec().cin * pixels[0]
    largest_block = 0
    for block in model.block_specs():
        inside = sum(_kept(block.convs)) * pixels[block.level]
        largest_block = max(largest_block, inside)
        kept += block.cout * pixels[block.level] if model_cfg.remat else inside
        if block.kind == "up":  # its input, the up-sampled map ++ the skip
            kept += block.cin * pixels[block.level]
        if block.kind == "down":  # the max-pooled map, the next block's input
            kept += block.cout * pixels[block.level + 1]
    if model_cfg.remat:
        kept += largest_block
    in_flight = BACKWARD_WORKING_TENSORS * model.level_widths()[0] * pixels[0]
    return (kept + in_flight) * dtype + LOSS_MAPS * h * w * STATE_BYTES


# ---------------------------------------------------------------------------------------------- the estimate

def estimate(config, num_devices: int | None = None) -> MemoryEstimate:
    """The estimate for one device training ``config`` with its batch split over ``num_devices`` (default: all
    devices jax sees)."""
    if num_devices is None:
        import jax
        num_devices = jax.device_count()
    model_cfg = config.model
    batch = max(config.batch_size // num_devices, 1)
    params = param_count(model_cfg) * STATE_BYTES
    h, w = config.image_size
    return MemoryEstimate(
        # the parameters' moving average (ema_decay > 0) is one more copy of them
        params=params * (2 if config.get("ema_decay", 0.0) > 0 else 1) + batch_stats_count(model_cfg) * STATE_BYTES,
        optimizer=(OPTIMIZER_SLOTS[config.optimizer] + 1) * params,  # MultiSteps keeps acc_grads even when k = 1
        gradients=params,
        activations_per_image=activation_bytes_per_image(model_cfg, (h, w)),
        batch=batch,
        input_batch=batch * h * w * 4,  # uint8 RGB + uint8 mask
        remat=bool(model_cfg.remat), dtype=model_cfg.dtype, encoder=model_cfg.get("encoder", "unet"))


# ---------------------------------------------------------------------------------------------- measurement


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def out_of_memory_message(config, num_devices: int) -> str:
    per_device = config.batch_size // max(num_devices, 1)
    return (f"a training step of {per_device} image(s) of {config.image_size[0]}x{config.image_size[1]} per device "
            f"does not fit in device memory ({estimate(config, num_devices).summary()}); shrink it with "
            "--config.model.dtype=bfloat16, --config.model.remat=true, or a smaller --config.batch_size with "
            "--config.grad_accum_steps making up the same global batch")


@contextlib.contextmanager
def out_of_memory_explained(config, num_devices: int):
    """A device's out-of-memory error inside the block as one DeviceOutOfMemory line; other errors as they are."""
    import jax
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if not is_out_of_memory(e):
            raise
        raise DeviceOutOfMemory(out_of_memory_message(config, num_devices)) from e


def peak_device_bytes(device) -> int | None:
    """The device's peak bytes in use since start-up, or None where the backend does not say (the CPU)."""
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return int(peak) if peak is not None else None


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def host_peak_growth(fn: Callable[[], object]) -> int | None:
    """How far this process's resident memory peaked above where it stood, while ``fn()`` ran: the CPU's stand-in
    for a device's peak. Linux only (None elsewhere): writing 5 to /proc/self/clear_refs resets the high-water mark
    VmHWM to the current RSS, so compilation or earlier steps do not count. Memory the allocator kept from earlier
    frees is reused without growing RSS, so measure the first run of a program in a fresh process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return _status_bytes("VmHWM") - before


def xla_bytes(compiled) -> int | None:
    """XLA's own figure for a compiled program: its temporaries plus its arguments and the outputs that do not
    reuse a donated argument's buffer (None where the backend gives no analysis)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes)


def measure_train_step(config) -> dict:
    """Run one real train step (steps.train_step under parallel.data_parallel, all local devices) on a random
    batch and return the estimate next to what it took: the device's peak where the backend reports it, else the
    step's arguments (state and batch, already resident) plus the peak RSS growth while it ran, and XLA's figure.
    Compilation happens first and is not counted. Run it in a fresh process: see host_peak_growth."""
    import functools

    import jax
    import numpy as np

    from carvana_jax import losses, optim, parallel, steps
    from carvana_jax.models import unet
    from carvana_jax.train_state import create_train_state

    mesh = parallel.make_mesh()
    parallel.check_batch_divides(config.batch_size, mesh)
    h, w = config.image_size
    state = create_train_state(jax.random.PRNGKey(config.seed), unet.from_config(config.model),
                               optim.create_optimizer(config), (h, w))
    rng = np.random.default_rng(config.seed)
    host_batch = {"image": rng.integers(0, 256, (config.batch_size, h, w, 3), dtype=np.uint8),
                  "mask": rng.integers(0, 2, (config.batch_size, h, w), dtype=np.uint8)}
    state, batch = parallel.replicate(state, mesh), parallel.shard_batch(host_batch, mesh)
    step = parallel.data_parallel(functools.partial(
        steps.train_step, loss_fn=losses.get(config.loss), schedule=optim.learning_rate_schedule(config)), mesh)
    compiled = step.lower(state, batch).compile()
    num_devices = mesh.devices.size
    resident = sum(x.nbytes for x in jax.tree.leaves((state, batch)))  # all local devices: global arrays' bytes
    resident = resident + (num_devices - 1) * sum(x.nbytes for x in jax.tree.leaves(state))  # state is replicated
    growth = host_peak_growth(lambda: jax.block_until_ready(compiled(state, batch)))
    device = mesh.devices.flat[0]
    device_peak = peak_device_bytes(device)
    measured = device_peak
    if device_peak is None and growth is not None:  # CPU devices share this process's memory: split it evenly
        measured = (resident + growth) // num_devices
    return {"estimate": estimate(config, num_devices).as_dict(), "measured": measured,
            "how": "device peak_bytes_in_use" if device_peak is not None else "arguments + peak RSS growth",
            "host_peak_growth": growth, "arguments": resident // num_devices, "xla": xla_bytes(compiled),
            "platform": device.platform, "num_devices": num_devices}


# ---------------------------------------------------------------------------------------------- command

def main(argv: list[str]) -> None:
    import json

    from absl import flags

    from carvana_jax.config import validate_config
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    config, fl = flags.FLAGS.config, flags.FLAGS
    validate_config(config)
    if not fl.measure:
        print(json.dumps(estimate(config, fl.num_devices).as_dict()) if fl.json
              else estimate(config, fl.num_devices).summary())
        return
    result = measure_train_step(config)
    if fl.json:
        print(json.dumps(result))
        return
    print(estimate(config, result["num_devices"]).summary())
    total = result["estimate"]["total"]
    for name, value in (("measured (" + result["how"] + ")", result["measured"]), ("XLA memory_analysis", result["xla"])):
        print(f"{name}: " + (f"{human_bytes(value)} (estimate / this = {total / value:.2f})" if value else "n/a"))


if __name__ == "__main__":
    from absl import flags

    from carvana_jax import cli
    flags.DEFINE_integer("num_devices", 1, "Devices the global batch is split over (estimate only).")
    flags.DEFINE_bool("measure", False, "Also run one train step on the local devices and print what it took.")
    flags.DEFINE_bool("json", False, "Print one JSON object.")
    cli.run(main, needs_config=True)
