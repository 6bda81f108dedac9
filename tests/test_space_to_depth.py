"""model.space_to_depth: the U-Net's blocks run on s×s patches folded into channels; a sub-pixel head unfolds them."""
import functools
import importlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carvana_jax import losses, memory, optim, parallel, predict, steps
from carvana_jax.bench.train import unet_flops
from carvana_jax.config import validate_config
from carvana_jax.errors import ConfigError
from carvana_jax.models import unet
from carvana_jax.train_state import create_train_state


def _init(model, size):
    return jax.jit(model.init, static_argnames="train")(jax.random.PRNGKey(0), jnp.zeros((1, *size, 3)), train=False)


@pytest.mark.parametrize("s", [2, 3])
def test_space_to_depth_puts_each_patch_pixel_in_its_channels_and_depth_to_space_inverts_it(s):
    x = np.random.default_rng(0).random((2, 4 * s, 5 * s, 3)).astype(np.float32)
    y = np.asarray(unet.space_to_depth(jnp.asarray(x), s))
    assert y.shape == (2, 4, 5, s * s * 3)
    for i in range(4):
        for j in range(5):
            for a in range(s):
                for b in range(s):
                    k = (a * s + b) * 3
                    np.testing.assert_array_equal(y[:, i, j, k:k + 3], x[:, i * s + a, j * s + b])
    np.testing.assert_array_equal(np.asarray(unet.depth_to_space(jnp.asarray(y), s)), x)


def test_the_blocks_see_the_patches_at_half_size_and_the_head_unfolds_a_3x3_conv_over_them():
    s, size = 2, (32, 48)
    folded = unet.UNet(features=4, depth=2, space_to_depth=s)
    plain = unet.UNet(features=4, depth=2)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, *size, 3))
    patches = unet.space_to_depth(x, s)
    variables = folded.init(jax.random.PRNGKey(0), x)
    assert variables["params"]["down0"]["ConvNormReLU_0"]["Conv_0"]["kernel"].shape[2] == s * s * 3
    logits, state = folded.apply(variables, x, capture_intermediates=True)
    assert logits.shape == (2, *size)
    # the same blocks of a plain U-Net fed the patches give the same last block
    plain_vars = plain.init(jax.random.PRNGKey(0), patches)
    plain_vars = {"params": {**variables["params"], "head": plain_vars["params"]["head"]},
                  "batch_stats": variables["batch_stats"]}
    _, plain_state = plain.apply(plain_vars, patches, capture_intermediates=True)
    up0 = state["intermediates"]["up0"]["__call__"][0]
    np.testing.assert_allclose(up0, plain_state["intermediates"]["up0"]["__call__"][0], rtol=1e-5, atol=1e-6)
    assert up0.shape[1:3] == (size[0] // s, size[1] // s)
    # the head, computed independently: a 3×3 'SAME' conv over [last block, patches], then one logit per sub-pixel
    head = variables["params"]["head"]
    features = jnp.concatenate([up0, patches], axis=-1)
    conv = jax.lax.conv_general_dilated(features, head["kernel"], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + head["bias"]
    expected = np.zeros((2, *size), np.float32)
    for a in range(s):
        for b in range(s):
            expected[:, a::s, b::s] = conv[..., a * s + b]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_space_to_depth_multiplies_the_size_multiple_and_needs_the_plain_unet(tiny_config):
    tiny_config.model.space_to_depth = 2
    tiny_config.image_size = (64, 96)  # 2**3 · 2 = 16 divides both
    validate_config(tiny_config)
    assert predict.input_multiple(tiny_config) == 16
    tiny_config.image_size = (72, 96)  # divisible by 2**3 but not by 16
    with pytest.raises(ConfigError, match="model.space_to_depth = 16"):
        validate_config(tiny_config)
    tiny_config.image_size = (64, 96)
    tiny_config.model.space_to_depth = 0
    with pytest.raises(ConfigError, match="model.space_to_depth must be a positive integer"):
        validate_config(tiny_config)
    tiny_config.model.space_to_depth = 2
    tiny_config.model.encoder = "vgg11"
    with pytest.raises(ConfigError, match="model.space_to_depth=2 needs model.encoder=unet"):
        validate_config(tiny_config)


def _model_cfg(**overrides):
    from configs import default
    cfg = default.get_config().model
    cfg.unlock()
    cfg.update(overrides)
    return cfg


def test_the_parameter_count_and_flops_count_the_patches_and_the_sub_pixel_head():
    cfg, size = _model_cfg(features=8, depth=3, space_to_depth=2), (64, 96)
    variables = _init(unet.from_config(cfg), size)
    assert memory.param_count(cfg) == sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert memory.batch_stats_count(cfg) == sum(x.size for x in jax.tree.leaves(variables["batch_stats"]))
    forward = jax.jit(lambda x: unet.from_config(cfg).apply(variables, x))
    analysis = forward.lower(jnp.zeros((1, *size, 3))).compile().cost_analysis()
    xla = (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"]
    assert abs(unet_flops(cfg, size) - xla) / xla < 0.10, (unet_flops(cfg, size), xla)
    # the blocks run at half size: a plain U-Net at 32×48 costs the same but for the first conv and the head
    plain = unet_flops(_model_cfg(features=8, depth=3), (32, 48))
    first, head = 2 * 9 * (12 - 3) * 8 * 32 * 48, 2 * 9 * (8 + 12) * 4 * 32 * 48 - 2 * 8 * 32 * 48
    assert unet_flops(cfg, size) == plain + first + head


def test_the_memory_estimate_of_a_folded_unet_agrees_with_xla():
    from configs import demo
    config = demo.get_config()
    config.image_size, config.model.space_to_depth = (256, 384), 2
    mesh = parallel.make_mesh(1)
    model = unet.from_config(config.model)
    state = jax.eval_shape(lambda: create_train_state(jax.random.PRNGKey(0), model, optim.create_optimizer(config),
                                                      tuple(config.image_size)))
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, 256, 384, 3), jnp.uint8),
             "mask": jax.ShapeDtypeStruct((config.batch_size, 256, 384), jnp.uint8)}
    step = parallel.data_parallel(functools.partial(
        steps.train_step, loss_fn=losses.get(config.loss), schedule=optim.learning_rate_schedule(config)), mesh)
    xla = memory.xla_bytes(step.lower(state, batch).compile())
    est = memory.estimate(config, num_devices=1).total
    assert abs(est - xla) / xla < 0.15, (est, xla)


def test_the_torch_twin_of_a_folded_unet_has_its_parameter_count_and_output_size():
    torch = pytest.importorskip("torch", reason="torch not installed (optional: pip install torch==2.13.0)")
    from carvana_jax.bench import torch_twin as bench_torch
    cfg = _model_cfg(features=4, depth=2, space_to_depth=2)
    twin = bench_torch.from_config(cfg)
    assert bench_torch.param_count(twin) == memory.param_count(cfg)
    assert twin(torch.zeros(2, 3, 32, 48)).shape == (2, 32, 48)


CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parent.parent / "configs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_passes_the_checks(name):
    validate_config(importlib.import_module(f"configs.{name}").get_config())
