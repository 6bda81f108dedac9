"""Training loop: data → data-parallel steps → metrics, validation, plots and checkpoints.

    python -m carvana_jax.train --config configs/demo.py --workdir workdirs/demo [--config.key=value ...]

Re-running the same command in the same workdir resumes from its latest checkpoint, with the
input pipeline where it was, and gives the numbers an uninterrupted run would have.

Several processes (hosts, or GPUs of a host) train one model when started with
--coordinator_address HOST:PORT --num_processes N --process_id I, by ``python -m carvana_jax.launch``,
or under SLURM's srun: every process runs this same loop on its share of every global batch, and
process 0 alone writes metrics, plots and progress. The global batches, hence the numbers, are the
same whatever the number of processes and devices, and a checkpoint resumes on any number of them.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from carvana_jax import (losses, memory, metric_writers, optim, parallel, plots, predict, profiling, steps, stopping,
                         workdir_lock)
from carvana_jax.checkpoint import Checkpointer, model_mismatch
from carvana_jax.config import validate_config
from carvana_jax.data import pipeline, sources
from carvana_jax.errors import CheckpointError, NonFiniteLossError
from carvana_jax.models import pretrained, unet
from carvana_jax.train_state import create_train_state


def _host_metrics(pending: list) -> dict:
    """Mean of the micro-steps' metrics of one update, as floats; raises on a non-finite loss."""
    rows = jax.device_get(pending)
    losses_ = [float(r["loss"]) for r in rows]
    if not all(math.isfinite(x) for x in losses_):
        raise NonFiniteLossError(f"loss became {losses_[-1]} at update {int(rows[-1]['update_step'])}")
    return {"step": int(rows[-1]["update_step"]), "loss": float(np.mean(losses_)),
            "dice": float(np.mean([float(r["dice"]) for r in rows])), "learning_rate": float(rows[-1]["learning_rate"])}


def _plot_validation(state, val_records, config, mesh, out_path: str) -> np.ndarray | None:
    """Overlays of the first few validation photos with their masks and the model's predictions, drawn in
    ``out_path``; the picture as (H, W, 3) RGB on process 0, None elsewhere.

    Every process predicts (the prediction runs on the whole mesh); process 0 draws."""
    import cv2
    records = val_records[: config.num_plot_images]
    if not records:
        return None
    batch = next(iter(pipeline.eval_dataset(records, config, len(records), num_workers=0)))
    preds = predict.model_size_predictions(state.variables, state.apply_fn, batch["image"], mesh, config.threshold)
    if not parallel.is_main_process():
        return None
    size = (config.image_size[1], config.image_size[0])
    truths = [cv2.resize(m, size, interpolation=cv2.INTER_NEAREST) for m in batch["mask_full"]]
    plots.plot_overlays(batch["image"], truths, preds, out_path, titles=[sources.example_name(r) for r in records])
    return cv2.imread(out_path, cv2.IMREAD_COLOR)[..., ::-1]


def data_checkpoint(stream_position: int) -> dict:
    """The input pipeline's state as checkpointed: how many elements of the global training stream
    (shuffled, repeated, augmented by index) the saved updates consumed. It names no process, device or
    worker, so the run resumes at the same global batch on any number of them."""
    return {"stream_position": int(stream_position)}


def resume_point(data_state: dict | None) -> tuple[int, dict | None]:
    """(stream position to start the pipeline at, grain iterator state to set instead). Checkpoints written
    before positions were stored hold one process's grain state: with num_workers=0 that is the position
    itself; a worker pool's state is set as it is (it needs the same num_workers, as it always did)."""
    if data_state is None:
        return 0, None
    if "stream_position" in data_state:
        return int(data_state["stream_position"]), None
    if set(data_state) == {"next_index"}:
        return int(data_state["next_index"]), None
    return 0, data_state


def coarse_config(config):
    """The config of the first ``coarse_steps`` updates: the input at ``coarse_image_size``, and the boundary
    band, which is counted in model pixels, narrowed with it so it covers the same share of the car."""
    coarse = config.copy_and_resolve_references()
    coarse.image_size = tuple(config.coarse_image_size)
    scale = coarse.image_size[0] / config.image_size[0]
    coarse.loss_boundary_width = max(1, round(config.loss_boundary_width * scale))
    return coarse


def config_at(config, update: int):
    """The config that trains the update after ``update``: coarse (``coarse_config``) for the first
    ``coarse_steps``, then ``config`` itself."""
    return coarse_config(config) if update < config.get("coarse_steps", 0) else config


def step_function(config, mesh):
    """The data-parallel train step ``config`` trains with: its loss (boundary weighting included), learning-rate
    schedule, soft-mask scale and EMA (bench train times this same step)."""
    return parallel.data_parallel(functools.partial(
        steps.train_step, loss_fn=losses.from_config(config), schedule=optim.learning_rate_schedule(config),
        mask_scale=1 / 255 if config.soft_masks else 1.0, ema_decay=config.ema_decay), mesh)


def train_and_evaluate(config, workdir: str, *, mesh=None, stop_after: int | None = None,
                       progress: bool = True, stops: stopping.StopSignals | None = None) -> dict:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the last metrics.

    ``stop_after`` ends the run after that many optimiser updates. ``stops`` (``stopping.stop_on_signals``)
    ends it after the update in flight when a stop signal comes, with a checkpoint of that update; the
    metrics then name the signal as ``stopped_by``. Process 0 holds the workdir's lock throughout
    (``workdir_lock``): a second run in the same workdir is refused by name.
    """
    validate_config(config)
    lock = workdir_lock.held(workdir) if parallel.is_main_process() else contextlib.nullcontext()
    with lock:
        return _train_and_evaluate(config, workdir, mesh, stop_after, progress, stops)


def _train_and_evaluate(config, workdir: str, mesh, stop_after: int | None, progress: bool,
                        stops: stopping.StopSignals | None) -> dict:
    profile = profiling.ProfileWindow(config.profile_steps, workdir)  # a bad window is refused before anything
    os.makedirs(workdir, exist_ok=True)
    metrics_path, plot_dir = os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "plots")
    train_records, val_records = sources.train_and_val(config)
    mesh = mesh or parallel.make_mesh()
    parallel.check_batch_divides(config.batch_size, mesh)
    if progress and parallel.is_main_process():
        print(memory.estimate(config, mesh.devices.size).summary(), flush=True)

    model = unet.from_config(config.model)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
    encoder_weights = None
    if ckpt.latest_step() is None and config.model.pretrained:  # a fresh start: the encoder begins at ImageNet's
        encoder_weights = pretrained.encoder_variables(config.model.pretrained, config.model.encoder)
    state = create_train_state(jax.random.PRNGKey(config.seed), model, optim.create_optimizer(config),
                               tuple(config.image_size), ema=config.ema_decay > 0, encoder_weights=encoder_weights)
    state = parallel.replicate(state, mesh)
    data_state = None
    if (latest := ckpt.latest_step()) is not None:
        if mismatch := model_mismatch(ckpt.load_config(latest), config):
            raise CheckpointError(f"{workdir} holds checkpoints of a different model ({'; '.join(mismatch)}); "
                                  "use another --workdir or the same config")
        _, state, data_state = ckpt.restore_newest_readable(state, say=lambda line: print(line, file=sys.stderr))

    position, legacy_state = resume_point(data_state)
    update = int(jax.device_get(state.update_step))
    stage = config_at(config, update)

    def open_stream(stage_config, start):
        data_iter = iter(pipeline.train_dataset(train_records, stage_config, parallel.process_index(),
                                                parallel.process_count(), start=start))
        return data_iter, parallel.prefetch_to_mesh(data_iter, mesh, config.prefetch_batches)

    if legacy_state is not None and stage is not config:
        raise CheckpointError(f"{workdir}'s checkpoint holds a worker pool's pipeline state, from before "
                              "coarse_steps existed: resume it with --config.coarse_steps=0")
    data_iter, batches = open_stream(stage, position)
    if legacy_state is not None:
        data_iter.set_state(legacy_state)
        position = None  # unknown: such a run goes on saving grain's state
    step_fn = step_function(stage, mesh)

    accum, total = config.grad_accum_steps, config.num_train_steps
    end = total if stop_after is None else min(total, stop_after)
    images_per_update = config.batch_size * accum
    bar = tqdm(total=total, initial=update, unit="step", desc="train",
               disable=not progress or not parallel.is_main_process())
    writer = metric_writers.for_run(workdir, main_process=parallel.is_main_process(), tensorboard=config.tensorboard,
                                    bar=bar, num_val_images=len(val_records))
    writer.write_hparams(metric_writers.flat_hparams(config.to_dict()))
    last = {}
    window_time, window_update = time.perf_counter(), update  # images/s over the last log window
    try:
        while update < end:
            if stage is not config and update >= config.coarse_steps:  # the coarse updates are done
                data_iter.close()
                stage = config
                data_iter, batches = open_stream(stage, position)
                step_fn = step_function(stage, mesh)
            profile.before_update(update)
            pending = []
            with memory.out_of_memory_explained(config, mesh.devices.size):
                for _ in range(accum):
                    batch, data_state = next(batches)
                    state, metrics = step_fn(state, batch)
                    if position is not None:
                        position += config.batch_size
                        data_state = data_checkpoint(position)
                    pending.append(metrics)
            update += 1
            profile.after_update(update, state)
            stop_now = stops is not None and stops.reached(update) and update < end  # at the end it simply ends
            due_log = update % config.log_every == 0 or update == end or stop_now
            due_eval = bool(val_records) and (update % config.eval_every == 0 or update == total)
            due_ckpt = update % config.checkpoint_every == 0 or update == end or stop_now
            if not (due_log or due_eval or due_ckpt):
                continue
            with memory.out_of_memory_explained(config, mesh.devices.size):
                last = _host_metrics(pending)  # also the NaN guard before anything is saved
            now = time.perf_counter()
            last["images_per_sec"] = (update - window_update) * images_per_update / (now - window_time)
            if (peak := memory.peak_device_bytes(jax.local_devices()[0])) is not None:  # None on the CPU
                last["peak_memory_gb"] = peak / 1e9
            ckpt_metrics = None
            if due_eval:
                scores = predict.val_dice(state.variables, state.apply_fn, val_records, config, mesh)
                last["val_dice"] = float(np.nanmean(scores))
                ckpt_metrics = {"val_dice": last["val_dice"]}
            writer.write_scalars(update, {k: v for k, v in last.items() if k != "step"})
            window_time, window_update = time.perf_counter(), update  # evaluation and saving are not training
            if due_ckpt or due_eval:
                ckpt.save(update, state, data_state, config, ckpt_metrics)
            if due_eval:
                if parallel.is_main_process():
                    plots.plot_curves(metrics_path, os.path.join(plot_dir, "curves.png"))
                overlays = _plot_validation(state, val_records, config, mesh, os.path.join(plot_dir, "overlays.png"))
                if overlays is not None:
                    writer.write_images(update, {"val/overlays": overlays})
                writer.flush()
            if stop_now:
                last["stopped_by"] = stopping.signal_name(stops.received)
                break
    finally:
        profile.stop()
        bar.close()
        writer.close()
        data_iter.close()  # stops grain's workers and frees their shared memory
        ckpt.close()  # after the save in flight
    if parallel.is_main_process() and os.path.exists(metrics_path):
        plots.plot_curves(metrics_path, os.path.join(plot_dir, "curves.png"))
    last["state"] = state
    return last


def main(argv) -> None:
    from carvana_jax import cli
    del argv
    config, workdir = cli.FLAGS.config, cli.workdir_for(cli.FLAGS.config, cli.FLAGS.workdir)
    with cli.friendly_errors():
        cli.initialize_distributed()  # before anything touches a device
        with stopping.stop_on_signals(synced=parallel.process_count() > 1) as stops:
            result = train_and_evaluate(config, workdir, stops=stops)
    if "stopped_by" in result:
        if parallel.is_main_process():
            print(f"stopped at update {result['step']} ({result['stopped_by']}), saved; "
                  "rerun the same command to resume", file=sys.stderr)
        sys.exit(stops.exit_status)
    if parallel.is_main_process():
        summary = {k: v for k, v in result.items() if k != "state"}
        print(f"trained: {json.dumps(summary)}\nworkdir: {workdir}")


if __name__ == "__main__":
    from carvana_jax import cli
    cli.run(main, needs_config=True, distributed=True)
