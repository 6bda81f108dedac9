"""The train state: parameters, BatchNorm statistics, optimiser state, step and PRNG key."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from carvana_jax.models import pretrained


class TrainState(train_state.TrainState):
    """flax's TrainState plus BatchNorm statistics, a PRNG key and, when kept, the exponential moving
    average of the parameters (``ema_params``; {} when not). ``step`` counts micro-steps."""
    batch_stats: dict
    rng: jax.Array
    ema_params: dict

    @property
    def variables(self) -> dict:
        """What the model predicts with (validation, eval): the parameters' moving average when one is kept,
        else the parameters, and the BatchNorm statistics when it has them."""
        params = self.ema_params or self.params
        return {"params": params, "batch_stats": self.batch_stats} if self.batch_stats else {"params": params}

    @property
    def update_step(self):
        """Optimiser updates so far (micro-steps / grad_accum_steps)."""
        return self.opt_state.gradient_step


def create_train_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
                       image_size: tuple[int, int], ema: bool = False,
                       encoder_weights: dict | None = None) -> TrainState:
    """A fresh state; with ``ema`` it keeps a moving average of the parameters, starting at them. With
    ``encoder_weights`` (models/pretrained.encoder_variables) the encoder starts from them instead of at random."""
    init_rng, state_rng = jax.random.split(rng)
    init = jax.jit(model.init, static_argnames="train")  # one compiled program, not op-by-op dispatch
    variables = init(init_rng, jnp.zeros((1, *image_size, 3), jnp.float32), train=False)
    if encoder_weights is not None:
        variables = pretrained.merge_encoder(variables, encoder_weights)
    params = variables["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                             batch_stats=variables.get("batch_stats", {}), rng=state_rng,
                             ema_params=jax.tree.map(jnp.copy, params) if ema else {})


def ema_update(ema_params, params, decay: float, update_step):
    """The moving average after optimiser update ``update_step`` (1, 2, …): decay min(decay, (1+t)/(10+t)),
    so the first updates are not averaged with the random initialisation for thousands of steps."""
    t = update_step.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)
