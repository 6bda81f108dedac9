"""carvana_jax.memory: each part of the estimate against an independent count, the whole against XLA's buffer
assignment and against the peak memory a real CPU train step took."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carvana_jax import losses, memory, optim, parallel, steps
from carvana_jax.models import unet
from carvana_jax.train_state import create_train_state
from configs import demo, unet1024

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    """The demo config (batch 8 of 128×192, width 8, depth 4) with ``overrides``; 'model.x' keys reach the model."""
    config = demo.get_config()
    for key, value in overrides.items():
        *parents, name = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[name] = value
    return config


def _state_shapes(config):
    model = unet.from_config(config.model)
    return jax.eval_shape(lambda: create_train_state(jax.random.PRNGKey(0), model, optim.create_optimizer(config),
                                                     tuple(config.image_size)))


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("overrides", [{}, {"model.norm": "none"}, {"model.block": "dense", "model.depth": 3},
                                       {"model.features": 32, "model.depth": 5},
                                       {"model.depth": 3, "model.widths": (8, 16, 48, 96)}])
def test_param_count_matches_the_flax_model(overrides):
    model_cfg, state = _config(**overrides).model, _state_shapes(_config(**overrides))
    assert memory.param_count(model_cfg) * 4 == _nbytes(state.params)
    assert memory.batch_stats_count(model_cfg) * 4 == _nbytes(state.batch_stats)


@pytest.mark.parametrize("optimizer, accum", [("adam", 1), ("adam", 4), ("adamw", 2), ("rmsprop", 1)])
def test_optimiser_bytes_match_optax_state(optimizer, accum):
    """Adam keeps two moments, RMSProp one, and optax.MultiSteps an accumulated gradient even when k = 1."""
    config = _config(optimizer=optimizer, grad_accum_steps=accum)
    opt_state = _state_shapes(config).opt_state
    est = memory.estimate(config, num_devices=1)
    assert abs(_nbytes(opt_state) - est.optimizer) < 64  # step counters are a few scalars
    assert est.gradients == _nbytes(_state_shapes(config).params)


def test_double_conv_block_keeps_conv_and_relu_outputs_by_hand():
    cfg = _config().model
    assert memory.block_kept(cfg, 3, 8) == [8, 8, 8, 8]  # conv, ReLU, conv, ReLU
    cfg.norm = "none"
    assert memory.block_kept(cfg, 3, 8) == [8, 8]  # ReLU outputs only
    cfg.norm, cfg.block, cfg.dense_layers = "batch", "dense", 2
    assert memory.block_kept(cfg, 6, 8) == [4, 4, 10, 4, 4, 14, 8]  # growth 4: two layers, their concats, the 1×1


def test_remat_and_bfloat16_shrink_the_unet1024_estimate_at_least_twofold():
    base = unet1024.get_config()
    base.model.dtype, base.model.remat = "float32", False
    lean = unet1024.get_config()
    lean.model.dtype, lean.model.remat = "bfloat16", True
    plain, small = memory.estimate(base, num_devices=1), memory.estimate(lean, num_devices=1)
    assert plain.batch == small.batch == 4
    assert plain.total >= 2 * small.total, (plain.summary(), small.summary())
    assert small.params == plain.params and small.optimizer == plain.optimizer  # float32 state either way
    lean.model.remat = False
    bf16 = memory.estimate(lean, num_devices=1)
    assert small.activations_per_image < bf16.activations_per_image < plain.activations_per_image


def _printed_total_gb(*args) -> float:
    proc = subprocess.run([sys.executable, "-m", "carvana_jax.memory", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    value, unit = proc.stdout.strip().splitlines()[-1].split("total ≈ ")[1].split()
    return float(value) * {"GB": 1, "MB": 1e-3}[unit]


def test_the_command_prints_unet1024_twofold_smaller_with_remat_and_bfloat16():
    plain = _printed_total_gb("--config", "configs/unet1024.py", "--config.model.dtype=float32")
    lean = _printed_total_gb("--config", "configs/unet1024.py", "--config.model.dtype=bfloat16",
                             "--config.model.remat=true")
    assert plain >= 2 * lean, (plain, lean)


def test_batch_is_per_device_and_summary_says_the_total():
    est = memory.estimate(_config(batch_size=8), num_devices=4)
    assert est.batch == 2 and est.input_batch == 2 * 128 * 192 * 4
    assert est.total == est.params + est.optimizer + est.gradients + 2 * est.activations_per_image + est.input_batch
    text = est.summary()
    assert "per device" in text and "× 2" in text and f"total ≈ {memory.human_bytes(est.total)}" in text


def _xla_bytes(config) -> int:
    """XLA's buffer assignment for the real data-parallel train step on one CPU device, compiled from shapes."""
    mesh = parallel.make_mesh(1)
    h, w = config.image_size
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, h, w, 3), jnp.uint8),
             "mask": jax.ShapeDtypeStruct((config.batch_size, h, w), jnp.uint8)}
    step = parallel.data_parallel(functools.partial(
        steps.train_step, loss_fn=losses.get(config.loss), schedule=optim.learning_rate_schedule(config)), mesh)
    return memory.xla_bytes(step.lower(_state_shapes(config), batch).compile())


@pytest.mark.parametrize("overrides", [
    {}, {"model.remat": True}, {"model.norm": "none", "batch_size": 4},
    {"model.features": 16, "model.depth": 2}, {"model.block": "dense", "model.depth": 2, "batch_size": 4},
])
def test_estimate_agrees_with_xla_buffer_assignment(overrides):
    config = _config(**overrides)
    est, xla = memory.estimate(config, num_devices=1).total, _xla_bytes(config)
    assert abs(est - xla) / xla < 0.15, (overrides, est, xla)


def _measure(*overrides):
    """One real step in a fresh process (so no memory freed earlier is reused), on one CPU device."""
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    proc = subprocess.run([sys.executable, "-m", "carvana_jax.memory", "--config", "configs/demo.py", "--measure",
                           "--json", *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable VmHWM")
@pytest.mark.parametrize("remat", [False, True])
def test_estimate_agrees_with_the_measured_peak_of_a_cpu_train_step(remat):
    result = _measure(f"--config.model.remat={remat}")
    assert result["how"] == "arguments + peak RSS growth"
    est = result["estimate"]["total"]
    assert abs(est - result["measured"]) / result["measured"] < 0.30, result
    assert result["host_peak_growth"] > result["estimate"]["activations"] / 2  # the step really ran and allocated


def test_remat_saves_in_the_estimate_what_it_saves_in_xla_buffer_assignment():
    """Within 10 percentage points (the same programs as above: the compilation cache has them)."""
    plain, remat = _config(), _config(**{"model.remat": True})
    est_saving = 1 - memory.estimate(remat, 1).total / memory.estimate(plain, 1).total
    xla_saving = 1 - _xla_bytes(remat) / _xla_bytes(plain)
    assert xla_saving > 0.1 and abs(est_saving - xla_saving) < 0.10, (est_saving, xla_saving)


class _Device:
    def __init__(self, stats):
        self._stats = stats

    def memory_stats(self):
        return self._stats


def test_peak_device_bytes_reads_the_backend_or_says_none():
    assert memory.peak_device_bytes(_Device({"peak_bytes_in_use": 123, "bytes_in_use": 7})) == 123
    assert memory.peak_device_bytes(_Device(None)) is None
    assert memory.peak_device_bytes(_Device({"bytes_in_use": 7})) is None
    assert memory.peak_device_bytes(jax.devices("cpu")[0]) is None  # the CPU backend keeps no such statistics


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable VmHWM")
def test_host_peak_growth_sees_a_touched_allocation_and_forgets_earlier_peaks():
    """In a fresh process, as the function's doc asks: in the suite's own process a background thread freeing an
    earlier test's buffers while the allocation is touched can hide it from the high-water mark."""
    script = ("import json, numpy as np\n"
              "from carvana_jax import memory\n"
              "earlier = np.ones(64 * 2**20, np.uint8)  # raise the high-water mark, then free it\n"
              "del earlier\n"
              "print(json.dumps([memory.host_peak_growth(lambda: None),\n"
              "                  memory.host_peak_growth(lambda: np.ones(48 * 2**20, np.uint8).sum())]))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    idle, touched = json.loads(out.stdout.splitlines()[-1])
    assert idle < 16 * 2**20
    assert 40 * 2**20 < touched < 80 * 2**20
