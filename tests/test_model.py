import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carvana_jax.config import validate_config
from carvana_jax.errors import ConfigError
from carvana_jax.models import unet
from configs import unet768

# Dense blocks of 2 layers (the default is 4): each layer already sees every earlier one through the concatenation,
# and every extra conv costs a second or two of XLA compiling its random initialiser on the CPU.
DENSE_LAYERS = 2


def _init(model, size=(64, 64)):
    """The model's variables from a counter-based 'rbg' key: the tests here need some initial values, the same for
    the same key, not threefry's (whose initialiser programs take XLA many seconds per U-Net to compile on the CPU;
    training initialises with threefry everywhere else)."""
    key = jax.random.key(0, impl="rbg")
    return jax.jit(model.init, static_argnames="train")(key, jnp.zeros((2, *size, 3)), train=False)


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
    model = unet.from_config(cfg)  # shapes only: init's tree without compiling its random initialisers
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 3)), train=False))
    kernels = [x for x in jax.tree.leaves(variables["params"]) if x.ndim == 4]
    assert sum(k.shape[:2] == (3, 3) for k in kernels) == 18
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert n_params == _expected_double_conv_params(cfg.features, cfg.depth)


@pytest.mark.parametrize("block", ["double_conv", "dense"])
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_output_is_one_logit_per_pixel(block, norm):
    model = unet.UNet(features=4, depth=2, norm=norm, block=block, dense_layers=DENSE_LAYERS)
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


def _loss_and_grads(model, variables, x):
    """Training-mode loss and parameter gradients; vmap names the BatchNorm axis that shard_map would."""
    def loss(params, x):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                mutable=["batch_stats"])
        return jnp.mean(logits ** 2)
    grad_fn = jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0), axis_name=unet.AXIS)
    return jax.jit(grad_fn)(variables["params"], x[None])


@pytest.mark.parametrize("block", ["double_conv", "dense"])
def test_remat_keeps_the_parameter_tree_outputs_and_gradients(block):
    plain = unet.UNet(features=4, depth=2, block=block, dense_layers=DENSE_LAYERS)
    remat = unet.UNet(features=4, depth=2, block=block, dense_layers=DENSE_LAYERS, remat=True)
    variables = _init(plain, (32, 48))
    remat_variables = _init(remat, (32, 48))
    # same names, shapes and initial values: a checkpoint of one restores into the other
    assert jax.tree.structure(variables) == jax.tree.structure(remat_variables)
    jax.tree.map(np.testing.assert_array_equal, variables, remat_variables)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 48, 3))
    np.testing.assert_allclose(jax.jit(remat.apply)(variables, x), jax.jit(plain.apply)(variables, x), rtol=1e-6)
    (loss, grads), (remat_loss, remat_grads) = (_loss_and_grads(m, variables, x) for m in (plain, remat))
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), remat_grads, grads)


def test_remat_recomputes_every_block_in_the_backward_pass():
    """The switch really reaches JAX: one remat (checkpoint) call per block, none without it."""
    def remat_calls(model):
        variables = _init(model, (32, 32))
        f = lambda p: model.apply({**variables, "params": p}, jnp.zeros((1, 32, 32, 3))).sum()
        return str(jax.make_jaxpr(jax.grad(f))(variables["params"])).count("remat")
    assert remat_calls(unet.UNet(features=4, depth=2)) == 0
    assert remat_calls(unet.UNet(features=4, depth=2, remat=True)) == 2 * 2 + 1  # 2 down, centre, 2 up


def test_from_config_passes_remat():
    cfg = unet768.get_config().model
    assert unet.from_config(cfg).remat is False
    cfg.remat = True
    assert unet.from_config(cfg).remat is True


def test_level_widths_double_by_default_or_are_given_one_per_level():
    assert unet.level_widths(8, 4) == [8, 16, 32, 64, 128]
    assert unet.level_widths(8, 3, (8, 16, 48, 96)) == [8, 16, 48, 96]
    for bad in ((8, 16, 32), (8, 16, 0, 64)):
        with pytest.raises(ValueError, match="model.widths needs 4 positive widths"):
            unet.level_widths(8, 3, bad)


def test_given_widths_shape_every_block():
    model = unet.UNet(features=4, depth=2, widths=(4, 12, 20))
    variables = _init(model, (16, 16))
    kernels = {name: block["ConvNormReLU_1"]["Conv_0"]["kernel"].shape[-1]
               for name, block in variables["params"].items() if name != "head"}
    assert kernels == {"down0": 4, "down1": 12, "centre": 20, "up1": 12, "up0": 4}


@pytest.mark.parametrize("widths, message", [((8, 16, 32), "must be 5 positive integers"),
                                             ((8, 16, 32, 64, 0), "must be 5 positive integers")])
def test_config_with_bad_widths_is_refused_in_one_line(widths, message):
    from configs import demo
    config = demo.get_config()
    config.model.widths = widths
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_saved_widths_match_the_live_config_and_a_config_saved_before_them_means_the_default():
    import json

    import ml_collections

    from carvana_jax.checkpoint import model_mismatch
    from configs import demo, real_cpu
    live = real_cpu.get_config()
    restored = ml_collections.ConfigDict(json.loads(json.dumps(live.to_dict())))  # tuples come back as lists
    assert model_mismatch(restored, live) == []
    old = demo.get_config()
    del old.model["widths"]
    assert model_mismatch(old, demo.get_config()) == []
    assert any(m.startswith(f"model.widths: [] vs {list(live.model.widths)}") for m in model_mismatch(old, live))


@pytest.mark.parametrize("kwargs", [dict(features=4, depth=2), dict(features=4, depth=2, block="dense"),
                                    dict(features=4, depth=2, space_to_depth=2, widths=(4, 12, 16)),
                                    dict(features=4, depth=2, norm="none")])
def test_the_block_specs_are_the_parameter_tree(kwargs):
    """The specs the memory estimate, the FLOP count and the torch twin read are exactly the kernels built."""
    kwargs = {"dense_layers": DENSE_LAYERS, **kwargs}
    model = unet.UNet(**kwargs)
    params = _init(model, (32, 32))["params"]
    specs = model.block_specs()
    assert [b.name for b in specs] == ["down0", "down1", "centre", "up1", "up0"]
    assert set(params) == {b.name for b in specs} | {"head"}
    for block in specs:
        kernels = [leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(params[block.name])
                   if path[-1].key == "kernel"]
        expected = [(c.kernel, c.kernel, c.cin, c.cout) for c in block.convs]  # the tree's order is by name
        assert sorted(kernels) == sorted(expected), block.name
        biases = sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params[block.name])
                     if path[-1].key == "bias" and path[-2].key.startswith("Conv"))
        assert biases == sum(c.cout for c in block.convs if not c.normed), block.name
    head = model.head_spec()
    assert params["head"]["kernel"].shape == (head.kernel, head.kernel, head.cin, head.cout)
