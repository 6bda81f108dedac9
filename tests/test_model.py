import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import unet768
from carvana_jax.config import ConfigError, validate_config
from carvana_jax.models import unet


def _init(model, size=(64, 64)):
    return jax.jit(model.init, static_argnames="train")(jax.random.PRNGKey(0), jnp.zeros((2, *size, 3)), train=False)


def _expected_double_conv_params(features, depth):
    """Weights + BatchNorm (scale, bias) of the seed U-Net, counted from its widths alone."""
    def block(cin, cout):
        return 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout
    widths = [features * 2**i for i in range(depth + 1)]
    total, cin = 0, 3
    for w in widths[:-1]:
        total += block(cin, w)
        cin = w
    total += block(widths[-2], widths[-1])
    for level in reversed(range(depth)):
        total += block(widths[level + 1] + widths[level], widths[level])
    return total + widths[0] * 1 + 1  # 1×1 head with bias


def test_seed_unet_has_18_convs_and_the_expected_parameter_count():
    cfg = unet768.get_config().model
    variables = _init(unet.from_config(cfg))
    kernels = [x for x in jax.tree.leaves(variables["params"]) if x.ndim == 4]
    assert sum(k.shape[:2] == (3, 3) for k in kernels) == 18
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert n_params == _expected_double_conv_params(cfg.features, cfg.depth)


@pytest.mark.parametrize("block", ["double_conv", "dense"])
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_output_is_one_logit_per_pixel(block, norm):
    model = unet.UNet(features=4, depth=2, norm=norm, block=block)
    variables = _init(model, (32, 48))
    assert ("batch_stats" in variables) == (norm == "batch")
    out = jax.jit(model.apply)(variables, jnp.ones((2, 32, 48, 3)))
    assert out.shape == (2, 32, 48) and out.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_parameters_and_logits_close():
    f32 = unet.UNet(features=4, depth=2)
    bf16 = unet.UNet(features=4, depth=2, dtype=jnp.bfloat16)
    variables = _init(f32, (32, 32))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(_init(bf16, (32, 32))))
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
    a, b = jax.jit(f32.apply)(variables, x), jax.jit(bf16.apply)(variables, x)
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, atol=0.1 * float(jnp.abs(a).max()) + 1e-3)


def test_image_size_must_divide_by_the_depth(tiny_config):
    tiny_config.image_size = (60, 96)
    with pytest.raises(ConfigError, match="image_size 60x96"):
        validate_config(tiny_config)


def test_unknown_choices_name_their_key(tiny_config):
    tiny_config.model.block = "resnet"
    with pytest.raises(ConfigError, match="model.block"):
        validate_config(tiny_config)
