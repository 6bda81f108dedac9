"""The train state: parameters, BatchNorm statistics, optimiser state, step and PRNG key."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from carvana_jax.models import pretrained


class TrainState(train_state.TrainState):
    """flax's TrainState plus BatchNorm statistics and a PRNG key. ``step`` counts micro-steps."""
    batch_stats: dict
    rng: jax.Array

    @property
    def variables(self) -> dict:
        """What the model's apply takes: parameters, and BatchNorm statistics when it has them."""
        return {"params": self.params, "batch_stats": self.batch_stats} if self.batch_stats else {"params": self.params}

    @property
    def update_step(self):
        """Optimiser updates so far (micro-steps / grad_accum_steps)."""
        return self.opt_state.gradient_step


def create_train_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
                       image_size: tuple[int, int], encoder_weights: dict | None = None) -> TrainState:
    """A fresh state. With ``encoder_weights`` (models/pretrained.encoder_variables) the encoder starts from them
    instead of at random."""
    init_rng, state_rng = jax.random.split(rng)
    init = jax.jit(model.init, static_argnames="train")  # one compiled program, not op-by-op dispatch
    variables = init(init_rng, jnp.zeros((1, *image_size, 3), jnp.float32), train=False)
    if encoder_weights is not None:
        variables = pretrained.merge_encoder(variables, encoder_weights)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}), rng=state_rng)
