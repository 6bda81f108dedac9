"""carvana_jax.bench: the FLOP count against XLA's, the torch twin's size, and the command itself."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carvana_jax.bench.train import unet_flops
from carvana_jax.models import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_cfg(**overrides):
    from configs import default
    cfg = default.get_config().model
    cfg.unlock()
    cfg.update(overrides)
    return cfg


def _xla_forward_flops(model_cfg, image_size):
    """XLA's own count for one image's forward pass (inference mode), from the compiled program."""
    model = unet.from_config(model_cfg)
    x = jnp.zeros((1, *image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returned one dict per program
        analysis = analysis[0]
    return analysis["flops"]


@pytest.mark.parametrize("overrides, image_size", [
    ({"features": 8, "depth": 3}, (64, 96)),
    ({"features": 4, "depth": 4, "norm": "none"}, (96, 128)),
    ({"features": 8, "depth": 2, "block": "dense", "dense_layers": 3}, (32, 48)),
    ({"features": 8, "depth": 3, "widths": (8, 16, 48, 96)}, (64, 96)),
])
def test_unet_flops_matches_xla_cost_analysis(overrides, image_size):
    cfg = _model_cfg(**overrides)
    ours, xla = unet_flops(cfg, image_size), _xla_forward_flops(cfg, image_size)
    assert abs(ours - xla) / xla < 0.10, (ours, xla)


def test_unet_flops_by_hand():
    """Depth 1, width 2, 4×4 image: every convolution written out."""
    cfg = _model_cfg(features=2, depth=1)
    hw, q = 16, 4  # pixels at full and half resolution
    expected = 2 * 9 * (3 * 2 + 2 * 2) * hw  # down0
    expected += 2 * 9 * (2 * 4 + 4 * 4) * q  # centre
    expected += 2 * 9 * (6 * 2 + 2 * 2) * hw  # up0 (4 up-sampled + 2 skip channels in)
    expected += 2 * 2 * hw  # 1×1 head
    assert unet_flops(cfg, (4, 4)) == expected


def _flax_param_count(model_cfg, image_size=(32, 32)):
    model = unet.from_config(model_cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_size, 3)), train=False))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("overrides", [
    {"features": 8, "depth": 4},
    {"features": 32, "depth": 4},
    {"features": 4, "depth": 3, "norm": "none"},
    {"features": 8, "depth": 2, "block": "dense", "dense_layers": 3},
    {"features": 8, "depth": 3, "widths": (8, 16, 48, 96)},
])
def test_torch_unet_has_the_flax_parameter_count(overrides):
    pytest.importorskip("torch", reason="torch not installed (optional: pip install torch==2.13.0); "
                                        "only this parameter-count check is skipped")
    from carvana_jax.bench import torch_twin as bench_torch
    cfg = _model_cfg(**overrides)
    assert bench_torch.param_count(bench_torch.from_config(cfg)) == _flax_param_count(cfg)


def test_torch_train_step_runs_and_keeps_shapes():
    torch = pytest.importorskip("torch", reason="torch not installed (optional: pip install torch==2.13.0)")
    from carvana_jax.bench import torch_twin as bench_torch
    from configs import demo
    config = demo.get_config()
    config.model.features, config.model.depth = 4, 2
    step = bench_torch.TrainStep(config)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (2, 16, 24, 3), dtype=np.uint8),
             "mask": rng.integers(0, 2, (2, 16, 24), dtype=np.uint8)}
    loss = step(*step.prepare(batch))
    assert np.isfinite(loss) and loss > 0
    assert step.model(torch.zeros(2, 3, 16, 24)).shape == (2, 16, 24)


def _random_variables(model, image_size, seed=0):
    """Random weights and BatchNorm statistics far from their initial values (so a mix-up of scale and mean, or
    of a kernel's axes, shows)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_size, 3)), train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            return (rng.standard_normal(leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:-1]))).astype(np.float32)
        if "var" in name:
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        if "scale" in name:
            return (1 + 0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return (0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("overrides, image_size", [
    ({"features": 4, "depth": 3}, (32, 48)),
    ({"features": 4, "depth": 2, "norm": "none"}, (16, 24)),
    ({"features": 8, "depth": 2, "block": "dense", "dense_layers": 3}, (16, 24)),
    ({"features": 4, "depth": 2, "space_to_depth": 2, "widths": (4, 8, 24)}, (32, 48)),
])
def test_torch_twin_with_flax_weights_gives_the_flax_logits(overrides, image_size):
    pytest.importorskip("torch", reason="torch not installed (optional: pip install torch==2.13.0)")
    import torch

    from carvana_jax.bench import torch_twin as bench_torch
    model = unet.from_config(_model_cfg(**overrides))
    variables = _random_variables(model, image_size)
    x = np.random.default_rng(1).random((2, *image_size, 3), dtype=np.float32)
    flax_logits = np.asarray(model.apply(variables, x, train=False))
    twin = bench_torch.load_flax_variables(bench_torch.UNet(model), model, variables).eval()
    with torch.no_grad():
        torch_logits = twin(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    assert flax_logits.shape == torch_logits.shape == (2, *image_size)
    np.testing.assert_allclose(torch_logits, flax_logits, atol=2e-4 * np.abs(flax_logits).max())


def test_torch_predictor_masks_are_the_jax_prediction_paths():
    pytest.importorskip("torch", reason="torch not installed (optional: pip install torch==2.13.0)")
    from carvana_jax import inference
    from carvana_jax.bench import torch_twin as bench_torch
    size = (32, 48)
    model = unet.from_config(_model_cfg(features=4, depth=2, space_to_depth=2))
    variables = _random_variables(model, size)
    images = np.random.default_rng(2).integers(0, 256, (2, *size, 3), dtype=np.uint8)
    probs = np.asarray(inference.upsample(inference.predict_probs(variables, images, model.apply, tta="hflip")))
    threshold = float(np.median(probs))  # random weights: about half the pixels on
    expected = np.packbits((probs > threshold).reshape(2, -1), axis=1)
    got = bench_torch.Predictor(model, variables, hflip=True, threshold=threshold)(images)
    assert got.shape == expected.shape == (2, 1280 * 1918 // 8)
    differ = np.unpackbits(got ^ expected).mean()
    assert differ < 1e-4, differ  # pixels whose probability sits on the threshold
    plain = bench_torch.Predictor(model, variables, threshold=threshold)(images)
    assert np.unpackbits(plain ^ expected).mean() > 1e-3, "the mirrored view must change the masks"


def test_torch_twin_names_the_flax_weight_that_does_not_fit():
    pytest.importorskip("torch", reason="torch not installed (optional: pip install torch==2.13.0)")
    from carvana_jax.bench import torch_twin as bench_torch
    narrow, wide = (unet.from_config(_model_cfg(features=f, depth=2)) for f in (4, 8))
    with pytest.raises(ValueError, match=r"down0/ConvNormReLU_0/Conv_0/kernel: shape \(4, 3, 3, 3\)"):
        bench_torch.load_flax_variables(bench_torch.UNet(wide), wide, _random_variables(narrow, (16, 24)))


def _run(*args, env_extra=None, timeout=300):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "carvana_jax.bench", *args], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=timeout)


def test_unknown_benchmark_is_one_line_error():
    proc = _run("nonsense")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train" in proc.stderr and "nonsense" in proc.stderr


def test_torch_flag_without_torch_says_how_to_install(tmp_path):
    (tmp_path / "torch.py").write_text("raise ImportError('torch hidden by the test')\n")
    proc = _run("train", "--torch", env_extra={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pip install torch==2.13.0" in errors[0], proc.stderr


@pytest.mark.slow
def test_train_benchmark_prints_json():
    # depth 1 (the demo's is 4): fewer convs for the benchmark's uncached compile to build
    proc = _run("train", "--config", "configs/demo.py", "--config.model.features=4", "--config.model.depth=1",
                "--config.image_size=(32,48)", "--steps", "2", "--warmup", "1", "--json", "--ops",
                "--xla_option", "xla_cpu_experimental_ynn_fusion_type=")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # the step compiled a second time with the option, timed alternately with the default one
    assert result["xla_options"] == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert result["option_images_per_sec"] > 0 and result["option_over_default"] == pytest.approx(
        result["option_images_per_sec"] / result["images_per_sec"])
    ops = dict(result["ops_ms_per_step"])  # a real trace of the real step: its convolutions, both passes
    assert ops["forward conv_general_dilated"] > 0 and all(ms >= 0 for ms in ops.values())
    assert any(k.startswith("backward ") for k in ops)
    assert result["images_per_sec"] > 0 and result["ms_per_step_median"] > 0
    assert result["device_count"] == 2 and result["batch_size"] == 8
    assert result["param_count"] > 0 and result["forward_gflop_per_image"] > 0
    assert result["peak_memory_gb"] is None  # the CPU does not report one: not a fake 0
    estimate = result["memory_estimate"]
    assert estimate["batch"] == 4 and result["memory_estimate_gb"] == pytest.approx(estimate["total"] / 1e9)
    assert estimate["params"] >= result["param_count"] * 4  # float32 parameters (+ BatchNorm statistics)
    assert result["xla_memory_gb"] > 0
    if os.path.exists("/proc/self/clear_refs"):
        assert result["host_peak_growth_gb"] > 0


def test_xla_options_are_parsed_by_kind_and_a_bad_one_is_named():
    from carvana_jax.bench.train import parse_xla_options
    from carvana_jax.errors import ConfigError
    assert parse_xla_options(["a=true", "b=False", "c=-3", "d=", "e=X,Y"]) == {
        "a": True, "b": False, "c": -3, "d": "", "e": "X,Y"}
    with pytest.raises(ConfigError, match="'novalue' is not KEY=VALUE"):
        parse_xla_options(["novalue"])


def test_an_unknown_xla_option_is_a_one_line_error():
    proc = _run("train", "--config", "configs/demo.py", "--config.model.features=4", "--config.model.depth=1",
                "--config.image_size=(32,48)", "--steps", "1", "--warmup", "0", "--xla_option", "xla_no_such=1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--xla_option" in errors[0] and "xla_no_such" in errors[0], proc.stderr


def test_train_table_prints_memory_and_na_for_an_unreported_peak(capsys):
    from carvana_jax.bench.train import print_train_table
    result = {"config": "configs/demo.py", "batch_size": 8, "image_size": [32, 48],
              "model": {"block": "double_conv", "features": 4, "depth": 4, "dtype": "float32"},
              "device_count": 1, "device_kind": "cpu", "platform": "cpu", "param_count": 1000,
              "forward_gflop_per_image": 0.01, "compile_s": 1.0, "steps": 2, "warmup": 1, "jax_version": "0",
              "images_per_sec": 10.0, "ms_per_step_median": 1.0, "ms_per_step_mean": 1.0, "gflops_per_sec": 1.0,
              "memory_summary": "memory estimate per device (float32): total ≈ 1 GB", "memory_estimate_gb": 1.234,
              "peak_memory_gb": None, "xla_memory_gb": 1.0, "host_peak_growth_gb": 1.5}
    print_train_table(result)
    out = capsys.readouterr().out
    assert "memory estimate per device" in out and "estimate 1.23 GB" in out
    assert "peak reported by the device n/a" in out and "RSS growth 1.5 GB" in out
