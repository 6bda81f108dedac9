"""The training loop on real files: resume equals an uninterrupted run, NaN guard, workdir checks."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from helpers import shared_model

from carvana_jax import checkpoint, parallel, train
from carvana_jax.checkpoint import Checkpointer
from carvana_jax.config import validate_config
from carvana_jax.errors import CheckpointError, ConfigError


@pytest.fixture
def tiny_config(tiny_config, kaggle_dir_few):
    """conftest's tiny config as two_update_run trains it: on kaggle_dir_few (4 held-out photos to validate at
    1918×1280 per evaluation instead of 16), with the 32×48 depth-2 U-Net the cv, ema and parallel tests train too."""
    tiny_config.data_dir = kaggle_dir_few
    return shared_model(tiny_config)


def _copy_of(run, tmp_path):
    """A copy of a finished run's workdir, to go on from without changing the shared one."""
    workdir = str(tmp_path / "run")
    shutil.copytree(run["workdir"], workdir)
    return workdir


def _params(result):
    return jax.device_get(result["state"].params)


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tiny_config, tmp_path):
    tiny_config.num_train_steps, tiny_config.eval_every = 4, 4  # validation at the end only
    tiny_config.soft_masks, tiny_config.ema_decay = True, 0.5  # the moving average is saved and resumed too
    whole = train.train_and_evaluate(tiny_config, str(tmp_path / "whole"), progress=False)
    resumed_dir = str(tmp_path / "resumed")
    train.train_and_evaluate(tiny_config, resumed_dir, stop_after=2, progress=False)  # "pre-empted" at update 2
    assert Checkpointer(os.path.join(resumed_dir, "checkpoints")).latest_step() == 2
    resumed = train.train_and_evaluate(tiny_config, resumed_dir, progress=False)
    _assert_trees_equal(_params(resumed), _params(whole))
    _assert_trees_equal(jax.device_get(resumed["state"].ema_params), jax.device_get(whole["state"].ema_params))
    assert resumed["loss"] == whole["loss"] and resumed["val_dice"] == whole["val_dice"]
    # eval predicts with the saved average, which differs from the parameters.
    _, variables, _, _ = checkpoint.load_checkpoint(resumed_dir, step=4)
    _assert_trees_equal(jax.device_get(variables["params"]), jax.device_get(whole["state"].ema_params))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables["params"]),
                                                        jax.tree.leaves(_params(whole))))
    # The resumed run logged updates 3 and 4 with the same losses as the uninterrupted one.
    whole_rows = {r["step"]: r["loss"] for r in _metrics(str(tmp_path / "whole"))}
    resumed_rows = {r["step"]: r["loss"] for r in _metrics(resumed_dir)}
    assert resumed_rows == whole_rows


@pytest.mark.slow
def test_the_data_position_is_stored_by_global_stream_and_old_grain_states_still_resume(tiny_config, tmp_path):
    tiny_config.num_train_steps = 4
    tiny_config.val_fraction = 0.0
    whole = train.train_and_evaluate(tiny_config, str(tmp_path / "whole"), progress=False)
    workdir = str(tmp_path / "old")
    train.train_and_evaluate(tiny_config, workdir, stop_after=2, progress=False)
    data_file = os.path.join(workdir, "checkpoints", "2", "data", "metadata")
    with open(data_file) as f:
        assert json.load(f) == {"stream_position": 2 * tiny_config.batch_size}
    with open(data_file, "w") as f:  # what a checkpoint written before positions held: grain's iterator state
        json.dump({"next_index": 2 * tiny_config.batch_size}, f)  # (num_workers=0)
    resumed = train.train_and_evaluate(tiny_config, workdir, progress=False)
    _assert_trees_equal(_params(resumed), _params(whole))


@pytest.mark.slow
def test_gradient_accumulation_through_the_pipeline_equals_the_large_batch(tiny_config, tmp_path):
    tiny_config.model.norm = "none"
    tiny_config.num_train_steps = 2
    tiny_config.val_fraction = 0.0
    mesh = parallel.make_mesh(2)  # a micro-batch of 2 cannot split over 4 devices
    tiny_config.update(batch_size=8, grad_accum_steps=1)
    big = train.train_and_evaluate(tiny_config, str(tmp_path / "big"), mesh=mesh, progress=False)
    tiny_config.update(batch_size=2, grad_accum_steps=4)
    accumulated = train.train_and_evaluate(tiny_config, str(tmp_path / "acc"), mesh=mesh, progress=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), _params(accumulated), _params(big))
    assert [r["step"] for r in _metrics(str(tmp_path / "acc"))] == [1, 2], "steps are optimiser updates"


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(two_update_run, tiny_config, tmp_path):
    workdir = _copy_of(two_update_run, tmp_path)  # 2 good updates, checkpointed at update 2
    tiny_config.num_train_steps = 4
    tiny_config.learning_rate = float("inf")
    tiny_config.warmup_steps = 0
    with pytest.raises(train.NonFiniteLossError, match="loss became nan"):
        train.train_and_evaluate(tiny_config, workdir, progress=False)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert list(ckpt.manager.all_steps()) == [2]
    params = ckpt.manager.restore(2)["state"]["params"]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_a_workdir_of_another_model_is_refused_by_name(two_update_run, tiny_config, tmp_path):
    workdir = _copy_of(two_update_run, tmp_path)  # checkpoints of width 4
    tiny_config.num_train_steps = 2
    tiny_config.model.features = 8
    with pytest.raises(CheckpointError, match="model.features: 4 vs 8"):
        train.train_and_evaluate(tiny_config, workdir, progress=False)


def test_plots_and_metrics_are_written(two_update_run):
    workdir, result = two_update_run["workdir"], two_update_run["result"]  # tiny_config, 2 updates
    assert 0.0 <= result["val_dice"] <= 1.0
    rows = _metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2] and "val_dice" in rows[-1]
    for name in ("curves.png", "overlays.png"):
        assert os.path.getsize(os.path.join(workdir, "plots", name)) > 10_000


def test_evaluation_defaults_to_the_checkpoint_with_the_best_val_dice(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    tiny_config.num_train_steps = 4
    train.train_and_evaluate(tiny_config, workdir, progress=False)
    scores = {r["step"]: r["val_dice"] for r in _metrics(workdir) if "val_dice" in r}
    assert set(scores) == {2, 4}
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert {step: ckpt.manager.metrics(step)["val_dice"] for step in (2, 4)} == scores  # stored with each checkpoint
    assert ckpt.best_step() == max(scores, key=scores.get)
    assert checkpoint.load_checkpoint(workdir)[3] == max(scores, key=scores.get)


@pytest.mark.slow
def test_coarse_updates_train_at_their_size_and_resume_after_the_switch(tiny_config, tmp_path):
    tiny_config.update(num_train_steps=4, eval_every=4, checkpoint_every=2, val_fraction=0.0)
    tiny_config.update(coarse_steps=2, coarse_image_size=(16, 24))  # tiny_config trains at 32×48
    whole = train.train_and_evaluate(tiny_config, str(tmp_path / "whole"), progress=False)
    # Pre-empted after the switch: the resumed run reopens the stream at image_size where it was.
    workdir = str(tmp_path / "stopped_at_3")
    train.train_and_evaluate(tiny_config, workdir, stop_after=3, progress=False)
    resumed = train.train_and_evaluate(tiny_config, workdir, progress=False)
    _assert_trees_equal(_params(resumed), _params(whole))
    # The coarse updates are those of a run at the coarse size (the same schedule, stream and seed).
    small = tiny_config.copy_and_resolve_references()
    small.update(coarse_steps=0, image_size=(16, 24))
    small_run = train.train_and_evaluate(small, str(tmp_path / "small"), stop_after=2, progress=False)
    _, after_coarse, _, _ = checkpoint.load_checkpoint(str(tmp_path / "whole"), step=2)
    _assert_trees_equal(jax.device_get(after_coarse["params"]), _params(small_run))


def test_coarse_config_scales_the_boundary_band_and_bad_coarse_settings_are_named(tiny_config):
    tiny_config.update(image_size=(64, 96), loss_boundary_width=4, coarse_steps=3, coarse_image_size=(32, 48))
    validate_config(tiny_config)
    coarse = train.coarse_config(tiny_config)
    assert tuple(coarse.image_size) == (32, 48) and coarse.loss_boundary_width == 2
    assert tuple(tiny_config.image_size) == (64, 96) and tiny_config.loss_boundary_width == 4  # not changed
    assert train.config_at(tiny_config, 2).image_size == (32, 48)
    assert train.config_at(tiny_config, 3) is tiny_config
    bad = [("coarse_image_size", (34, 48), "divisible by 2\\*\\*model.depth"),
           ("coarse_image_size", (128, 48), "no larger than image_size"),
           ("coarse_steps", tiny_config.num_train_steps, "coarse_steps must be 0 \\(off\\) or 1..")]
    for key, value, message in bad:
        broken = tiny_config.copy_and_resolve_references()
        broken[key] = value
        with pytest.raises(ConfigError, match=message):
            validate_config(broken)


def test_a_worker_pools_old_pipeline_state_is_not_resumed_into_coarse_updates(two_update_run, tiny_config, tmp_path):
    workdir = _copy_of(two_update_run, tmp_path)  # checkpointed at update 2
    with open(os.path.join(workdir, "checkpoints", "2", "data", "metadata"), "w") as f:
        json.dump({"workers_state": "…"}, f)  # grain's state of a worker pool, as checkpoints before positions held
    tiny_config.update(num_train_steps=4, coarse_steps=3, coarse_image_size=(16, 24))
    with pytest.raises(CheckpointError, match="resume it with --config.coarse_steps=0"):
        train.train_and_evaluate(tiny_config, workdir, progress=False)
