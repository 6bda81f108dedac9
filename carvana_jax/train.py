"""Training loop: data → data-parallel steps → metrics, validation, plots and checkpoints.

    python -m carvana_jax.train --config configs/demo.py --workdir workdirs/demo [--config.key=value ...]

Re-running the same command in the same workdir resumes from its latest checkpoint, with the
input pipeline where it was, and gives the numbers an uninterrupted run would have.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from carvana_jax import losses, optim, parallel, plots, predict, steps
from carvana_jax.checkpoint import Checkpointer, CheckpointError, model_mismatch
from carvana_jax.config import validate_config
from carvana_jax.data import pipeline, sources
from carvana_jax.models import unet
from carvana_jax.train_state import create_train_state


class NonFiniteLossError(Exception):
    """The loss became NaN or inf; the last good checkpoint is left as it was."""


def _log(path: str, row: dict) -> None:
    if jax.process_index() == 0:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _host_metrics(pending: list) -> dict:
    """Mean of the micro-steps' metrics of one update, as floats; raises on a non-finite loss."""
    rows = jax.device_get(pending)
    losses_ = [float(r["loss"]) for r in rows]
    if not all(math.isfinite(x) for x in losses_):
        raise NonFiniteLossError(f"loss became {losses_[-1]} at update {int(rows[-1]['update_step'])}")
    return {"step": int(rows[-1]["update_step"]), "loss": float(np.mean(losses_)),
            "dice": float(np.mean([float(r["dice"]) for r in rows])), "learning_rate": float(rows[-1]["learning_rate"])}


def _plot_validation(state, val_records, config, mesh, out_path: str) -> None:
    """Overlays of the first few validation photos with their masks and the model's predictions."""
    import cv2
    records = val_records[: config.num_plot_images]
    if not records:
        return
    batch = next(iter(pipeline.eval_dataset(records, config, len(records), num_workers=0)))
    preds = predict.model_size_predictions(state.variables, state.apply_fn, batch["image"], mesh, config.threshold)
    size = (config.image_size[1], config.image_size[0])
    truths = [cv2.resize(m, size, interpolation=cv2.INTER_NEAREST) for m in batch["mask_full"]]
    plots.plot_overlays(batch["image"], truths, preds, out_path, titles=[sources.example_name(r) for r in records])


def train_and_evaluate(config, workdir: str, *, mesh=None, stop_after: int | None = None,
                       progress: bool = True) -> dict:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the last metrics.

    ``stop_after`` ends the run after that many optimiser updates, as a pre-emption would.
    """
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    metrics_path, plot_dir = os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "plots")
    train_records, val_records = sources.train_and_val(config)
    mesh = mesh or parallel.make_mesh()
    parallel.check_batch_divides(config.batch_size, mesh)

    model = unet.from_config(config.model)
    schedule = optim.learning_rate_schedule(config)
    state = create_train_state(jax.random.PRNGKey(config.seed), model, optim.create_optimizer(config),
                               tuple(config.image_size))
    state = parallel.replicate(state, mesh)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
    data_state = None
    if (latest := ckpt.latest_step()) is not None:
        if mismatch := model_mismatch(ckpt.load_config(latest), config):
            raise CheckpointError(f"{workdir} holds checkpoints of a different model ({'; '.join(mismatch)}); "
                                  "use another --workdir or the same config")
        state, data_state = ckpt.restore(latest, state)

    data_iter = iter(pipeline.train_dataset(train_records, config, jax.process_index(), jax.process_count()))
    if data_state is not None:
        data_iter.set_state(data_state)
    batches = parallel.prefetch_to_mesh(data_iter, mesh, config.prefetch_batches)
    step_fn = parallel.data_parallel(
        functools.partial(steps.train_step, loss_fn=losses.get(config.loss), schedule=schedule), mesh)

    accum, total = config.grad_accum_steps, config.num_train_steps
    update = int(jax.device_get(state.update_step))
    end = total if stop_after is None else min(total, stop_after)
    images_per_update = config.batch_size * accum
    bar = tqdm(total=total, initial=update, unit="step", desc="train", disable=not progress or jax.process_index())
    last = {}
    window_time, window_update = time.perf_counter(), update  # images/s over the last log window
    try:
        while update < end:
            pending = []
            for _ in range(accum):
                batch, data_state = next(batches)
                state, metrics = step_fn(state, batch)
                pending.append(metrics)
            update += 1
            due_log = update % config.log_every == 0 or update == end
            due_eval = bool(val_records) and (update % config.eval_every == 0 or update == total)
            due_ckpt = update % config.checkpoint_every == 0 or update == end
            if not (due_log or due_eval or due_ckpt):
                continue
            last = _host_metrics(pending)  # also the NaN guard before anything is saved
            now = time.perf_counter()
            rate = (update - window_update) * images_per_update / (now - window_time)
            last["images_per_sec"] = rate
            bar.set_postfix(loss=f"{last['loss']:.4f}", dice=f"{last['dice']:.4f}", img_s=f"{rate:.1f}")
            bar.update(update - bar.n)
            ckpt_metrics = None
            if due_eval:
                scores = predict.val_dice(state.variables, state.apply_fn, val_records, config, mesh)
                last["val_dice"] = float(np.nanmean(scores))
                ckpt_metrics = {"val_dice": last["val_dice"]}
                bar.write(f"update {update}: val Dice {last['val_dice']:.5f} at 1918x1280 over {len(scores)} images")
            _log(metrics_path, last)
            window_time, window_update = time.perf_counter(), update  # evaluation and saving are not training
            if due_ckpt or due_eval:
                ckpt.save(update, state, data_state, config, ckpt_metrics)
            if due_eval and jax.process_index() == 0:
                plots.plot_curves(metrics_path, os.path.join(plot_dir, "curves.png"))
                _plot_validation(state, val_records, config, mesh, os.path.join(plot_dir, "overlays.png"))
    finally:
        bar.close()
        data_iter.close()  # stops grain's workers and frees their shared memory
        ckpt.wait()
        ckpt.close()
    if jax.process_index() == 0 and os.path.exists(metrics_path):
        plots.plot_curves(metrics_path, os.path.join(plot_dir, "curves.png"))
    last["state"] = state
    return last


def main(argv) -> None:
    from carvana_jax import cli
    del argv
    config, workdir = cli.FLAGS.config, cli.workdir_for(cli.FLAGS.config, cli.FLAGS.workdir)
    with cli.friendly_errors():
        result = train_and_evaluate(config, workdir)
    summary = {k: v for k, v in result.items() if k != "state"}
    print(f"trained: {json.dumps(summary)}\nworkdir: {workdir}")


if __name__ == "__main__":
    from carvana_jax import cli
    cli.run(main, needs_config=True)
