"""Faults a cluster deals out. One run per workdir: a second run in a held workdir is refused in one line
naming the holder, and the lock dies with its process. A damaged latest checkpoint is named, set aside, and
the run resumes from the one before; eval does the same for a workdir and refuses a damaged explicit step.
A full disk stops training in one line naming the folder, with the earlier checkpoints intact and nothing
half-written. (Stop signals: test_stopping.py.)"""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import assert_nothing_left, shared_model

from carvana_jax import checkpoint, train, workdir_lock
from carvana_jax.errors import CheckpointError, CheckpointWriteError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = ("import sys, time; from carvana_jax import workdir_lock\n"
        "with workdir_lock.held(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)")


def _env():
    return dict(os.environ, JAX_NUM_CPU_DEVICES="1", CARVANA_JAX_CACHE=os.path.join(ROOT, ".pytest_cache", "xla"))


def _wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _try_hold(workdir) -> bool:
    try:
        with workdir_lock.held(str(workdir)):
            return True
    except workdir_lock.WorkdirBusy:
        return False


def test_a_held_workdir_is_refused_naming_the_holder_and_freed_by_its_death(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir_lock.WorkdirBusy, match=rf"{tmp_path}.*pid {holder.pid} "):
            with workdir_lock.held(str(tmp_path)):
                pass
    finally:
        holder.kill()  # SIGKILL: nothing of the holder's runs after it
        holder.wait()
    assert _try_hold(tmp_path)  # nothing stuck
    with workdir_lock.held(str(tmp_path)):  # and a finished holder releases it too
        assert f"pid {os.getpid()} " in open(tmp_path / workdir_lock.LOCK_NAME).read()
    assert _try_hold(tmp_path)


def _train(workdir, data_dir, *extra):
    return [sys.executable, "-m", "carvana_jax.train", "--config", "configs/demo.py", f"--workdir={workdir}",
            f"--config.data_dir={data_dir}", "--config.image_size=(32,48)", "--config.model.depth=2",
            "--config.model.features=4", "--config.batch_size=4", "--config.val_fraction=0.34",
            "--config.log_every=1", "--config.eval_every=100000", *extra]


@pytest.mark.slow
def test_a_second_train_in_a_live_runs_workdir_refuses_and_a_killed_run_leaves_it_free(kaggle_dir_few, tmp_path):
    workdir = tmp_path / "w"
    first = subprocess.Popen(_train(workdir, kaggle_dir_few, "--config.num_train_steps=100000",
                                    "--config.checkpoint_every=100000", "--config.num_workers=1"),
                             cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:  # training, with its grain worker running, once the first metrics are written
        _wait_for(lambda: (workdir / "metrics.jsonl").exists() or first.poll() is not None, 240, "the first run")
        assert first.poll() is None
        second = subprocess.run(_train(workdir, kaggle_dir_few, "--config.num_train_steps=2"), cwd=ROOT, env=_env(),
                                capture_output=True, text=True, timeout=240)
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"pid {first.pid} " in errors[0] and str(workdir) in errors[0], second.stderr
        assert first.poll() is None  # the refused run touched nothing of the live one's
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert_nothing_left(first.pid)  # its grain worker ends with it, though nothing of the killed run stopped it
    # The kernel drops the lock with the process (its grain worker holds no copy of it).
    _wait_for(lambda: _try_hold(workdir), 30, "the killed run's lock to go")
    third = subprocess.run(_train(workdir, kaggle_dir_few, "--config.num_train_steps=2", "--config.num_workers=0"),
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert third.returncode == 0, third.stderr
    assert "trained:" in third.stdout


def _truncate_array_files(workdir, step: int) -> None:
    """Cut every array data file of checkpoint ``step`` to half, as a full disk or a failing one leaves them. (Not
    only the largest: OCDBT keeps files whose records the merged index no longer points at, and cutting one of
    those alone leaves a checkpoint that still restores.)"""
    folder = os.path.join(workdir, "checkpoints", str(step), "state")
    files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names
             if os.path.basename(d) == "d" and "ocdbt.process_" in d]
    assert files, f"no array data files under {folder}"
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def _four_updates(tiny_config, kaggle_dir_few):
    """tiny_config on kaggle_dir_few with the shared 32×48 U-Net: checkpoints at updates 2 and 4, validated at 4."""
    tiny_config.data_dir = kaggle_dir_few
    config = shared_model(tiny_config)
    config.num_train_steps, config.eval_every, config.checkpoint_every = 4, 4, 2
    return config


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
        tiny_config, kaggle_dir_few, tmp_path, capsys):
    config = _four_updates(tiny_config, kaggle_dir_few)
    workdir = str(tmp_path / "w")
    whole = train.train_and_evaluate(config, workdir, progress=False)
    _truncate_array_files(workdir, 4)
    capsys.readouterr()
    resumed = train.train_and_evaluate(config, workdir, progress=False)  # updates 3 and 4 again, from update 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and os.path.join("checkpoints", "4") in warnings[0] and "4.unreadable" in warnings[0]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "4.unreadable"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["state"].params),
                 jax.device_get(whole["state"].params))


def test_eval_reads_the_next_best_checkpoint_of_a_workdir_and_refuses_a_damaged_explicit_step(
        tiny_config, kaggle_dir_few, tmp_path, capsys):
    config = _four_updates(tiny_config, kaggle_dir_few)
    workdir = str(tmp_path / "w")
    train.train_and_evaluate(config, workdir, progress=False)  # 4 is the best (the only one validated)
    _truncate_array_files(workdir, 4)
    with pytest.raises(CheckpointError, match=r"checkpoints/4 is unreadable"):
        checkpoint.load_checkpoint(workdir, step=4)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))  # a named step is refused, not moved
    _, _, _, step = checkpoint.load_checkpoint(workdir)
    assert step == 2 and "4.unreadable" in capsys.readouterr().err


@pytest.mark.slow
def test_the_train_command_resumes_past_a_damaged_checkpoint_without_a_traceback(kaggle_dir_few, tmp_path):
    workdir = tmp_path / "w"
    args = _train(workdir, kaggle_dir_few, "--config.num_train_steps=4", "--config.checkpoint_every=2",
                  "--config.num_workers=0")
    first = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr
    _truncate_array_files(str(workdir), 4)
    again = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stderr and "Event loop is closed" not in again.stderr, again.stderr
    warnings = [line for line in again.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "unreadable" in warnings[0], again.stderr
    assert (workdir / "checkpoints" / "4.unreadable").is_dir() and (workdir / "checkpoints" / "4").is_dir()


def test_a_failed_checkpoint_write_is_named_and_leaves_the_earlier_ones_and_no_partial_one(
        tiny_config, kaggle_dir_few, tmp_path, monkeypatch):
    config = _four_updates(tiny_config, kaggle_dir_few)
    workdir = str(tmp_path / "w")
    real_save = ocp.CheckpointManager.save

    def save_until_the_disk_is_full(manager, step, *args, **kwargs):
        if step < 4:
            return real_save(manager, step, *args, **kwargs)
        os.makedirs(os.path.join(manager.directory, f"{step}.orbax-checkpoint-tmp-1", "state"))  # what orbax leaves
        raise ValueError(f'RESOURCE_EXHAUSTED: Failed writing: "{manager.directory}/{step}": Failed to write '
                         "112 bytes to file 7: No space left on device [os_error_code='28']")

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_until_the_disk_is_full)
    with pytest.raises(CheckpointWriteError) as failure:
        train.train_and_evaluate(config, workdir, progress=False)
    folder = os.path.join(workdir, "checkpoints")
    assert str(failure.value) == (f"cannot write checkpoint 4 in {folder}: No space left on device; "
                                  "the checkpoints before it are intact")
    assert os.listdir(folder) == ["2"]
    _, _, _, step = checkpoint.load_checkpoint(workdir)
    assert step == 2


def _mounted_tmpfs(path, size: str) -> bool:
    os.makedirs(path)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return mount.returncode == 0


@pytest.mark.slow
def test_a_full_disk_stops_training_in_one_line_with_the_earlier_checkpoints_intact(kaggle_dir_few, tmp_path):
    disk = tmp_path / "disk"
    if not _mounted_tmpfs(disk, "600k"):  # one checkpoint of this model fits (≈ 400 kB), not two
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        workdir = disk / "w"
        run = subprocess.run(_train(workdir, kaggle_dir_few, "--config.num_train_steps=60",
                                    "--config.checkpoint_every=5", "--config.num_workers=0"),
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
        told = "\n".join(line for line in run.stderr.replace("\r", "\n").splitlines() if not line.startswith("train:"))
        assert run.returncode == 1 and "Traceback" not in told, told
        errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "No space left on device" in errors[0], told
        assert f"cannot write checkpoint 10 in {workdir / 'checkpoints'}: " in errors[0], errors
        assert os.listdir(workdir / "checkpoints") == ["5"], told  # nothing of the failed one
        _, _, _, step = checkpoint.load_checkpoint(str(workdir))
        assert step == 5
    finally:
        subprocess.run(["umount", str(disk)], check=False)
