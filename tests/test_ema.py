"""The parameters' exponential moving average, updated once per optimiser update (its saving, resuming and use
by eval: tests/test_train.py's resume test)."""
import functools

import jax
import numpy as np
import optax

from carvana_jax import losses, optim, parallel, steps
from carvana_jax.models import unet
from carvana_jax.train_state import create_train_state


def _batch(rng, n, size=(32, 48)):
    images = rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)
    return {"image": images, "mask": (images.mean(-1) > 127).astype(np.uint8)}


def test_ema_follows_the_formula_once_per_update(tiny_config):
    tiny_config.model.depth = 2
    decay, accum = 0.9, 2
    mesh = parallel.make_mesh(1)
    model = unet.from_config(tiny_config.model)
    tx = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=accum)
    state = parallel.replicate(create_train_state(jax.random.PRNGKey(0), model, tx, (32, 48), ema=True), mesh)
    step = parallel.data_parallel(functools.partial(
        steps.train_step, loss_fn=losses.get("bce_dice"), schedule=optim.learning_rate_schedule(tiny_config),
        ema_decay=decay), mesh)
    expected = jax.device_get(state.params)
    rng = np.random.default_rng(0)
    for micro in range(6):
        state, _ = step(state, parallel.shard_batch(_batch(rng, 4), mesh))
        if (micro + 1) % accum == 0:  # an optimiser update happened: fold the new parameters in
            t = (micro + 1) // accum
            d = min(decay, (1 + t) / (10 + t))
            expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p, expected, jax.device_get(state.params))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     jax.device_get(state.ema_params), expected)
    assert not np.allclose(jax.tree.leaves(state.ema_params)[0], jax.tree.leaves(state.params)[0])
    # Prediction uses the average.
    assert state.variables["params"] is state.ema_params
