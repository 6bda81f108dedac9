"""orbax checkpoints: train state, input-pipeline state and config in one step directory.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it), so an
interrupted save never looks complete. The latest ``keep`` checkpoints are kept, plus the best by
validation Dice.
"""
from __future__ import annotations

import contextlib
import gc
import glob
import json
import os
import re
import shutil
import sys
import threading
import traceback

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from carvana_jax import optim, parallel
from carvana_jax.errors import CheckpointError, CheckpointWriteError, UnreadableCheckpoint
from carvana_jax.models import unet
from carvana_jax.train_state import create_train_state

MODEL_KEYS = ("image_size", "model")  # what must match for a checkpoint's parameters to fit
MODEL_KEY_DEFAULTS = {"model.encoder": "unet", "model.widths": []}  # what a config saved before the key existed meant
INIT_ONLY_KEYS = ("model.pretrained",)  # where a fresh run's first parameters came from, not what they are


def write_failure_reason(error: BaseException) -> str:
    """The operating system's reason for a failed write: an OSError's own, or the one tensorstore's
    errors (raised by orbax as ValueError) carry as os_error_code; else the error's first line."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if code := re.search(r"os_error_code='?(\d+)", str(error)):
        return os.strerror(int(code.group(1)))
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:200]


def checkpoint_dir(path: str) -> str:
    """The checkpoints folder of a workdir, or the path itself if it already is one."""
    nested = os.path.join(path, "checkpoints")
    return os.path.abspath(nested if os.path.isdir(nested) else path)


def _val_dice(metrics: dict) -> float:
    """A checkpoint's validation Dice; -inf for one saved without a validation pass."""
    return metrics.get("val_dice", float("-inf"))


def _leaf_name(path) -> str:
    """'params/down0/Conv_0/kernel' for a tree path, whether its keys are dict keys or attributes."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _from_orbax(filename: str) -> bool:
    return f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in filename


def _raised_in_orbax(tb) -> bool:
    """Whether a traceback passes through orbax's code."""
    return any(_from_orbax(f.filename) for f in (traceback.extract_tb(tb) if tb else []))


def _drop_orbax_errors(record) -> bool:
    return not (record.levelno >= absl_logging.ERROR and _from_orbax(record.pathname))


def _late_write_callback(exc_type, exc, tb) -> bool:
    """tensorstore's writes still in flight when orbax gave up on a failed save complete into the event loop
    orbax has closed, and tensorstore reports each ``RuntimeError('Event loop is closed')`` as unraisable."""
    frames = traceback.extract_tb(tb) if tb else []
    return (exc_type is RuntimeError and str(exc) == "Event loop is closed"
            and bool(frames) and frames[-1].filename.endswith(os.path.join("asyncio", "base_events.py")))


def quiet_background_save_errors() -> None:
    """A failed save is told by orbax's background threads (a thread's traceback, an ERROR log line, and
    ``_late_write_callback``'s), and the main thread raises it again at the next save or wait, where it
    becomes one line (CheckpointWriteError): the background tellings are dropped, nothing else."""
    if getattr(threading.excepthook, "quiet_orbax", False):
        return
    thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook

    def on_thread_error(args):
        if not _raised_in_orbax(args.exc_traceback):
            thread_hook(args)

    def on_unraisable(args):
        if not _late_write_callback(args.exc_type, args.exc_value, args.exc_traceback):
            unraisable_hook(args)

    on_thread_error.quiet_orbax = True
    threading.excepthook, sys.unraisablehook = on_thread_error, on_unraisable
    absl_logging.get_absl_logger().addFilter(_drop_orbax_errors)


@contextlib.contextmanager
def _abandoned_reads_dropped():
    """A restore that fails on one damaged array abandons orbax's reads of the others; each is reported as an
    unraisable "Exception ignored in <coroutine ...>" traceback when collected. The one failure is raised (and
    told in one line) anyway, so those reports are dropped: collected here, while the filter is on."""
    previous = sys.unraisablehook

    def on_unraisable(args):
        if not _raised_in_orbax(args.exc_traceback):
            previous(args)

    sys.unraisablehook = on_unraisable
    try:
        yield
    finally:
        # Also after a restore that succeeds: a failed one's reads are freed only once its exception is handled,
        # so the next restore (of the checkpoint before) is where they are collected.
        gc.collect()
        sys.unraisablehook = previous


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, read_only: bool = False):
        preserve = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=_val_dice, n=1, keep_checkpoints_without_metrics=False),
        ])
        self.directory = os.path.abspath(directory)  # orbax's async writer refuses relative paths
        self._in_flight: int | None = None  # the step an asynchronous save is writing
        self._failed = False  # a failed save was reported: orbax raises it again on every later wait
        if not read_only:
            quiet_background_save_errors()
        verbosity = absl_logging.get_verbosity()
        if read_only:  # orbax warns that a read-only manager will not save, which is the point
            absl_logging.set_verbosity(absl_logging.ERROR)
        try:
            # best_fn makes orbax store each checkpoint's metrics, which best_step() reads back.
            options = ocp.CheckpointManagerOptions(preservation_policy=preserve, best_fn=_val_dice, read_only=read_only,
                                                   create=not read_only, enable_async_checkpointing=True)
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl_logging.set_verbosity(verbosity)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the highest validation Dice; the latest when none was measured."""
        scored = [(_val_dice(self.manager.metrics(step) or {}), step) for step in self.manager.all_steps()]
        best = max(scored, default=(float("-inf"), None))
        return best[1] if best[0] > float("-inf") else self.latest_step()

    def save(self, step: int, state, data_state: dict | None, config, metrics: dict | None = None) -> None:
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config.to_dict())}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        self.wait()  # orbax waits for the save before anyway; a failure of that one is named as its own
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics or {}, force=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise self._write_failed(step, e) from e
        self._in_flight = step

    def load_config(self, step: int) -> ml_collections.ConfigDict:
        path = os.path.join(self.directory, str(step), "config", "metadata")
        try:
            with open(path) as f:
                return ml_collections.ConfigDict(json.load(f))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read the checkpoint's config ({e})") from e

    def check_shapes(self, step: int, target_state) -> None:
        """Raise CheckpointError naming the first array whose stored shape differs from the model's."""
        path = epath.Path(self.directory) / str(step) / "state"
        try:
            stored = ocp.StandardCheckpointHandler().metadata(path)
        except Exception as e:  # orbax and tensorstore raise plain Exceptions for damaged files
            raise UnreadableCheckpoint(str(path.parent), _first_line(e)) from e
        stored_shapes = {_leaf_name(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(stored)}
        for key, leaf in jax.tree_util.tree_leaves_with_path(target_state):
            name = _leaf_name(key)
            if name not in stored_shapes:
                raise CheckpointError(f"checkpoint {path.parent} has no {name}: it is of a different model")
            if stored_shapes[name] != tuple(leaf.shape):
                raise CheckpointError(f"checkpoint {path.parent} does not fit this model: {name} is "
                                      f"{stored_shapes[name]} there but {tuple(leaf.shape)} here")

    def restore(self, step: int, target_state, with_data: bool = True):
        """(state, data_state) of ``step``, placed like ``target_state``; data_state None if absent."""
        self.check_shapes(step, target_state)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if with_data and os.path.isdir(os.path.join(self.directory, str(step), "data")):
            items["data"] = ocp.args.JsonRestore()
        try:
            with _abandoned_reads_dropped():
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {self.directory}/{step} does not fit this model: {e}".splitlines()[0]) from e
        except Exception as e:  # the shapes fitted, so the arrays' files are damaged
            raise UnreadableCheckpoint(os.path.join(self.directory, str(step)), _first_line(e)) from e
        return restored["state"], restored.get("data") if "data" in items else None

    def set_aside(self, step: int) -> str:
        """Rename ``step``'s folder to STEP.unreadable (kept for a look, never read again); the new path."""
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.unreadable"
        n = 1
        while os.path.exists(dst):
            n += 1
            dst = f"{src}.unreadable{n}"
        os.rename(src, dst)
        self.manager.reload()
        return dst

    def restore_newest_readable(self, target_state, say=print):
        """(step, state, data_state) of the newest checkpoint that reads back, each unreadable newer one named in
        one line (``say``) and set aside; (None, target_state, None) when none does. Only process 0 renames."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return (step, *self.restore(step, target_state))
            except UnreadableCheckpoint as e:
                if jax.process_index() == 0:
                    aside = self.set_aside(step)
                    say(f"warning: {e}; set aside as {os.path.basename(aside)}, trying the one before")
        return None, target_state, None

    def _write_failed(self, step: int, error: BaseException) -> CheckpointWriteError:
        """The error to raise for a failed save of ``step``, its partial folders removed (orbax writes into
        STEP.orbax-checkpoint-tmp* and renames only a complete one, so no checkpoint looks complete)."""
        self._in_flight, self._failed = None, True
        for partial in glob.glob(os.path.join(glob.escape(self.directory), "*.orbax-checkpoint-tmp*")):
            shutil.rmtree(partial, ignore_errors=True)
        return CheckpointWriteError(f"cannot write checkpoint {step} in {self.directory}: "
                                    f"{write_failure_reason(error)}; the checkpoints before it are intact")

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except (OSError, ValueError, RuntimeError) as e:
            if not self._failed:
                raise self._write_failed(self._in_flight, e) from e
        self._in_flight = None

    def close(self) -> None:
        """Wait for the save in flight (raising its failure) and release orbax's threads either way."""
        try:
            self.wait()
        finally:
            self.manager.close()


def model_mismatch(saved, current) -> list[str]:
    """'key: saved vs current' for each model-defining key that differs between two configs."""
    def flat(cfg):
        def plain(value):  # a JSON-restored config holds lists where the live one holds tuples
            return list(value) if isinstance(value, (tuple, list)) else value
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        out = {}
        for key in MODEL_KEYS:
            value = d.get(key)
            if isinstance(value, dict):
                out.update({f"{key}.{k}": plain(v) for k, v in value.items()})
            else:
                out[key] = plain(value)
        return {**MODEL_KEY_DEFAULTS, **{k: v for k, v in out.items() if k not in INIT_ONLY_KEYS}}
    a, b = flat(saved), flat(current)
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# ---------------------------------------------------------------------------------------------- loading a model

def step_path(path: str, step: int | None) -> tuple[str, int | None]:
    """(workdir or checkpoints folder, step) of a --ckpt that may name one step folder."""
    path = os.path.abspath(path)
    if os.path.basename(path).isdigit() and step is None:
        return os.path.dirname(path), int(os.path.basename(path))
    return path, step


def ckpt_workdir(path: str) -> str:
    """The training workdir a --ckpt belongs to (where eval's outputs go by default)."""
    return os.path.dirname(checkpoint_dir(step_path(path, None)[0]))


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A stored config on top of today's defaults, so a checkpoint saved before a key existed still loads."""
    from configs import default
    merged = default.get_config()
    merged.update(config.to_dict())
    return merged


def load_checkpoint(path: str, step: int | None = None, mesh=None):
    """(config, variables, apply_fn, step) of a checkpoint; step defaults to the best, else the latest."""
    path, step = step_path(path, step)
    directory = checkpoint_dir(path)
    if not os.path.isdir(directory):
        raise CheckpointError(f"--ckpt {path}: no such folder")
    ckpt = Checkpointer(directory, read_only=True)
    mesh = mesh or parallel.make_mesh()
    try:
        while True:  # an unreadable best checkpoint of a workdir is set aside and the next best read instead
            chosen = step if step is not None else ckpt.best_step()
            if chosen is None or chosen not in ckpt.manager.all_steps():
                raise CheckpointError(f"--ckpt {path}: no checkpoint{'' if chosen is None else f' at step {chosen}'} "
                                      "there (expected a training workdir or its checkpoints/ folder)")
            config = with_defaults(ckpt.load_config(chosen))
            model = unet.from_config(config.model)
            target = create_train_state(jax.random.PRNGKey(0), model, optim.create_optimizer(config),
                                        tuple(config.image_size), ema=config.ema_decay > 0)
            try:
                state, _ = ckpt.restore(chosen, parallel.replicate(target, mesh), with_data=False)
                break
            except UnreadableCheckpoint as e:
                if step is not None:  # the user named this one: refuse it rather than score another
                    raise
                aside = ckpt.set_aside(chosen)
                print(f"warning: {e}; set aside as {os.path.basename(aside)}, reading the next best",
                      file=sys.stderr)
    finally:
        ckpt.close()
    return config, state.variables, model.apply, chosen
