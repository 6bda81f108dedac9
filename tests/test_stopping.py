"""Stop signals. SIGTERM (a scheduler's pre-emption) or Ctrl-C ends training after the update in flight, with a
checkpoint of that update, exit status 0 or 130, and the same command resumes to the parameters of an
uninterrupted run — with one process or two (their stop agreed through JAX's pre-emption sync point); a second
signal stops at once. Every command leaves no process of ours behind after SIGTERM."""
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import assert_nothing_left, session_alive
from test_faults import ROOT, _env, _train, _wait_for

from carvana_jax import checkpoint, stopping


def _metric_rows(workdir) -> int:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _final_params(workdir, step: int):
    _, variables, _, _ = checkpoint.load_checkpoint(str(workdir), step=step)
    return variables["params"]


def _assert_same_params(a, b) -> None:
    import jax
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_first_stop_signal_is_recorded_and_a_second_stops_at_once():
    stops = stopping.StopSignals()
    assert not stops.reached(1)
    stops.handle(signal.SIGINT)
    assert stops.reached(2) and stops.exit_status == 130
    with pytest.raises(stopping.Interrupted) as second:
        stops.handle(signal.SIGTERM)
    assert second.value.code == 128 + signal.SIGTERM
    term = stopping.StopSignals()
    term.handle(signal.SIGTERM)
    assert term.exit_status == 0  # the scheduler asked for it: done as asked


def test_stop_signals_are_taken_inside_the_block_and_given_back_after():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stopping.stop_on_signals() as stops:
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for(lambda: stops.received is not None, 5, "the signal")
        assert stops.received == signal.SIGTERM and stops.reached(7)
    assert {s: signal.getsignal(s) for s in before} == before


def _stop_at_random_update(cmd, workdir, signum, *, group=False, most: int = 50):
    """Start ``cmd`` in its own session, send ``signum`` (to its whole process group if ``group``, as Ctrl-C
    does) once it has logged a random number of updates (3 to ``most``); (exit status, stdout, stderr, updates
    logged then)."""
    rows = random.randint(3, most)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for(lambda: _metric_rows(workdir) >= rows or proc.poll() is not None, 240, f"{rows} updates")
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signum) if group else proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert_nothing_left(proc.pid)
    return proc.returncode, out, err, rows


def _stopped_update(err: str) -> int:
    lines = [line for line in err.splitlines() if "stopped at update" in line]
    assert len(lines) == 1, err
    return int(lines[0].split("stopped at update ")[1].split()[0])


TOTAL = 100  # updates of the single-process runs: a few seconds, stopped within the first 50
ONE_PROCESS = ("--config.num_workers=1", f"--config.num_train_steps={TOTAL}", "--config.checkpoint_every=100000")


@pytest.fixture(scope="module")
def uninterrupted(kaggle_dir_few, tmp_path_factory):
    """The workdir of the single-process run, uninterrupted."""
    workdir = tmp_path_factory.mktemp("uninterrupted") / "w"
    whole = subprocess.run(_train(workdir, kaggle_dir_few, *ONE_PROCESS), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=240)
    assert whole.returncode == 0, whole.stderr
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("signum,group,status", [(signal.SIGTERM, False, 0), (signal.SIGINT, True, 130)],
                         ids=["sigterm", "ctrl-c to the process group"])
def test_a_stop_signal_saves_the_update_in_flight_and_the_rerun_ends_like_an_uninterrupted_run(
        kaggle_dir_few, uninterrupted, tmp_path, signum, group, status):
    total, args = TOTAL, ONE_PROCESS
    workdir = tmp_path / "stopped"
    cmd = _train(workdir, kaggle_dir_few, *args)
    code, _, err, rows = _stop_at_random_update(cmd, workdir, signum, group=group)
    assert code == status and "Traceback" not in err, err
    update = _stopped_update(err)
    assert rows <= update < total, err  # the update in flight when the signal came, or the next
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(update)]
    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    _assert_same_params(_final_params(workdir, total), _final_params(uninterrupted, total))


@pytest.mark.slow
def test_two_processes_stop_at_the_same_update_and_resume_like_an_uninterrupted_run(kaggle_dir_few, tmp_path):
    total = 60

    def launched(workdir):
        return [sys.executable, "-m", "carvana_jax.launch", "--num_processes=2", "--platform=cpu", "--timeout=400",
                "--", *_train(workdir, kaggle_dir_few, "--config.num_workers=1", f"--config.num_train_steps={total}",
                              "--config.checkpoint_every=100000")]
    whole = subprocess.run(launched(tmp_path / "whole"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=460)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr
    workdir = tmp_path / "stopped"
    code, out, err, rows = _stop_at_random_update(launched(workdir), workdir, signal.SIGTERM, most=30)
    assert code == 0, out[-3000:] + err
    update = _stopped_update(out)  # process 0's line, through the launcher
    assert rows <= update < total
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(update)]  # one checkpoint: both processes' update
    again = subprocess.run(launched(workdir), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=460)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr
    _assert_same_params(_final_params(workdir, total), _final_params(tmp_path / "whole", total))


def _stop_when_working(cmd, ready, what: str):
    """Start ``cmd`` in its own session, SIGTERM it once ``ready(session's live processes)``; (status, stderr)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for(lambda: ready(session_alive(proc.pid)) or proc.poll() is not None, 240, what)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert_nothing_left(proc.pid)
    return proc.returncode, err


@pytest.mark.slow
def test_sigterm_of_eval_while_its_worker_decodes_leaves_nothing_running(two_update_run, kaggle_dir):
    cmd = [sys.executable, "-m", "carvana_jax.eval", "--ckpt", two_update_run["workdir"], "--split", "train",
           f"--data_dir={kaggle_dir}", "--num_workers=1", "--tta=hflip"]
    code, err = _stop_when_working(cmd, lambda alive: any("spawn_main" in c for c in alive), "eval's worker")
    assert code == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert "stopped (SIGTERM)" in [line.strip() for line in err.splitlines()], err


@pytest.mark.slow
def test_sigterm_of_cutout_midway_leaves_nothing_running_and_no_partial_file(two_update_run, kaggle_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "carvana_jax.cutout", "--ckpt", two_update_run["workdir"],
           os.path.join(kaggle_dir, "train"), "--out", str(out), "--only_mask", "--threads=1"]
    code, err = _stop_when_working(cmd, lambda _: out.is_dir() and any(out.iterdir()), "the first cut-out")
    assert code == 128 + signal.SIGTERM and "Traceback" not in err, err
    written = sorted(p.name for p in out.iterdir())
    assert 0 < len(written) < 48 and all(name.endswith("_mask.png") for name in written), written
    _assert_whole_pngs(out)


def _assert_whole_pngs(folder) -> None:
    import cv2
    for path in folder.iterdir():  # every file there is a whole PNG (written to a temporary name, then renamed)
        assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is not None, path
