import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from carvana_jax import optim


def _config(**kw):
    c = demo.get_config()
    c.update(kw)
    return c


def test_multisteps_updates_once_per_accumulation_with_the_mean_gradient():
    config = _config(grad_accum_steps=4, learning_rate=0.1, warmup_steps=0, num_train_steps=10, grad_clip_norm=0.0,
                     optimizer="rmsprop")
    tx = optim.create_optimizer(config)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    grads = [{"w": jnp.full(3, g)} for g in (1.0, 2.0, 3.0, 6.0)]
    for i, g in enumerate(grads[:3]):
        updates, state = tx.update(g, state, params)
        assert np.all(updates["w"] == 0), f"micro-step {i} must not move the parameters"
        assert int(state.gradient_step) == 0
    updates, state = tx.update(grads[3], state, params)
    assert int(state.gradient_step) == 1
    # One real RMSProp update with the mean gradient 3.0: -lr · g / sqrt(0.1·g² + eps).
    inner = optim._optimizer(config, optim.learning_rate_schedule(config))
    expected, _ = inner.update({"w": jnp.full(3, 3.0)}, inner.init(params), params)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
    assert float(jnp.abs(updates["w"]).max()) > 0


def test_schedule_counts_real_updates_warmup_then_cosine():
    config = _config(learning_rate=1.0, warmup_steps=10, num_train_steps=110)
    schedule = optim.learning_rate_schedule(config)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(60)) == pytest.approx(0.01 + 0.99 * 0.5, rel=1e-4)  # cosine half-way
    assert float(schedule(110)) == pytest.approx(0.01)


def test_clipping_bounds_the_gradient_norm():
    config = _config(grad_accum_steps=1, learning_rate=1.0, warmup_steps=0, num_train_steps=10, optimizer="rmsprop",
                     grad_clip_norm=1.0)
    tx = optim.create_optimizer(config)
    params = {"w": jnp.zeros(4)}
    updates_big, _ = tx.update({"w": jnp.full(4, 100.0)}, tx.init(params), params)
    updates_unit, _ = tx.update({"w": jnp.full(4, 0.5)}, tx.init(params), params)  # norm exactly 1
    np.testing.assert_allclose(updates_big["w"], updates_unit["w"], rtol=1e-5)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="sgdx"):
        optim.create_optimizer(_config(optimizer="sgdx"))
