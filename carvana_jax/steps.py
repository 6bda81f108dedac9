"""The pure per-device train step: (state, batch) → (state, metrics), written for one device of a named axis
(the prediction kernels are inference.py's).

They never know how many devices exist: gradients, loss and BatchNorm statistics are averaged
with lax.pmean over AXIS, and parallel.py maps them over the mesh.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from carvana_jax import dice as dice_lib
from carvana_jax.models.unet import AXIS
from carvana_jax.train_state import ema_update


def normalise(images):
    """uint8 photos → float32 in [0, 1] (done on the device to move 4× fewer bytes)."""
    return images.astype(jnp.float32) / 255.0


def _variables(params, batch_stats):
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def train_step(state, batch, *, loss_fn, schedule, mask_scale: float = 1.0, ema_decay: float = 0.0):
    """One micro-step: forward, loss, backward, mean gradients over devices, optimiser (MultiSteps), and
    the parameters' moving average after each optimiser update when the state keeps one. The masks are
    ``batch['mask'] * mask_scale`` (1/255 for soft-coverage masks)."""
    images, masks = normalise(batch["image"]), batch["mask"].astype(jnp.float32) * mask_scale

    def compute_loss(params):
        logits, updates = state.apply_fn(_variables(params, state.batch_stats), images, train=True,
                                         mutable=["batch_stats"])
        return loss_fn(logits, masks), (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
    grads = lax.pmean(grads, AXIS)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if state.ema_params:
        update = new_state.opt_state.gradient_step
        averaged = ema_update(state.ema_params, new_state.params, ema_decay, update)
        updated = update != state.opt_state.gradient_step  # MultiSteps: only every grad_accum_steps-th
        new_state = new_state.replace(ema_params=jax.tree.map(
            lambda a, e: jnp.where(updated, a, e), averaged, state.ema_params))
    dice = dice_lib.per_image(logits > 0, masks > 0.5).mean()
    metrics = {"loss": loss, "dice": dice}
    metrics = lax.pmean(metrics, AXIS)
    metrics["learning_rate"] = schedule(state.opt_state.gradient_step)
    metrics["update_step"] = new_state.opt_state.gradient_step
    return new_state, metrics
