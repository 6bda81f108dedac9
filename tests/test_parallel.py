"""Data parallelism: the same global batch gives the same result on 1 device as on 4."""
import functools

import jax
import numpy as np
import optax
import pytest

from carvana_jax import losses, optim, parallel, steps
from carvana_jax.models import unet
from carvana_jax.train_state import create_train_state


def _batch(rng, n, size=(32, 48)):
    images = rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)
    masks = (images.mean(-1) > 127).astype(np.uint8)  # learnable: bright pixels are 'car'
    return {"image": images, "mask": masks}


def _run(config, mesh, batches, tx=None):
    model = unet.from_config(config.model)
    tx = tx or optim.create_optimizer(config)
    state = create_train_state(jax.random.PRNGKey(0), model, tx, (32, 48))
    state = parallel.replicate(state, mesh)
    step = parallel.data_parallel(functools.partial(steps.train_step, loss_fn=losses.get(config.loss),
                                                    schedule=optim.learning_rate_schedule(config)), mesh)
    history = []
    for batch in batches:
        state, metrics = step(state, parallel.shard_batch(batch, mesh))
        history.append(float(metrics["loss"]))
    return history, jax.device_get(state.params), jax.device_get(state.batch_stats)


@pytest.fixture
def config(tiny_config):
    tiny_config.model.depth = 2
    tiny_config.learning_rate = 1e-2
    return tiny_config


def test_four_devices_equal_one_device_with_batchnorm_synchronised(config):
    assert jax.device_count() == 4, "conftest asks for 4 CPU devices"
    rng = np.random.default_rng(0)
    batches = [_batch(rng, 8) for _ in range(3)]
    # Plain SGD, so parameters differ only as much as the gradients do (Adam would turn the float
    # noise of near-zero gradients into ±lr steps, whatever the device count).
    sgd = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=1)
    loss1, params1, stats1 = _run(config, parallel.make_mesh(1), batches, sgd)
    loss4, params4, stats4 = _run(config, parallel.make_mesh(4), batches, sgd)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params4, params1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), stats4, stats1)
    assert loss1[-1] != loss1[0], "the parameters must actually move"


def test_gradient_accumulation_equals_the_large_batch_without_batchnorm(config):
    config.model.norm = "none"
    rng = np.random.default_rng(1)
    big = [_batch(rng, 8) for _ in range(2)]
    small = [{k: v[i:i + 2] for k, v in b.items()} for b in big for i in range(0, 8, 2)]
    config.grad_accum_steps = 1
    _, params_big, _ = _run(config, parallel.make_mesh(1), big)
    config.grad_accum_steps = 4
    _, params_acc, _ = _run(config, parallel.make_mesh(1), small)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_acc, params_big)


def test_batch_must_divide_over_devices():
    with pytest.raises(ValueError, match="divisible by the 4 devices"):
        parallel.check_batch_divides(6, parallel.make_mesh(4))


def test_pad_to_multiple_repeats_the_last_row():
    batch = {"a": np.arange(5)}
    padded, n = parallel.pad_to_multiple(batch, 4)
    assert n == 5 and padded["a"].tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
