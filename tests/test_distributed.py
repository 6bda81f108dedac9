"""Multi-process training on JAX's distributed runtime: 2 processes × 2 CPU devices (gloo collectives on
localhost, started by carvana_jax.launch) train like 1 process × 4 devices, and their checkpoint resumes
in one process. Subprocesses run under timeouts, so a hung collective fails the test instead of the suite."""
import json
import os
import signal
import subprocess
import sys
import time

import distributed_worker
import grain
import jax
import numpy as np
import pytest
from helpers import assert_nothing_left

from carvana_jax import distributed, launch, optim, train
from carvana_jax.checkpoint import Checkpointer
from carvana_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "distributed_worker.py")
ATOL = 2e-6
TIMEOUT_S = 400  # the launcher stops both processes after this; subprocess.run gives it a minute more


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _saved(workdir, step, like):
    """(state, data state) of checkpoint ``step``, placed like the state ``like`` (on this process's mesh)."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        state, data = ckpt.restore(step, like)
    finally:
        ckpt.close()
    return jax.device_get(state), data


def _max_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _allclose(a, b):
    """Equal up to float noise: the summation order of the gradient all-reduce differs with the device and
    process count. (With SGD at 0.01 this model's parameters after 2 updates on 1 vs 4 devices of one process
    differ by 5e-7; at 0.1 by 4e-5, the tiny BatchNorm'd net amplifying the noise.)"""
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=ATOL), a, b)


def _launch(args, timeout=TIMEOUT_S + 60, **env):
    cmd = [sys.executable, "-m", "carvana_jax.launch", *args]
    return subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": REPO, **env})


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(tiny_config, tmp_path, monkeypatch):
    tiny_config.num_train_steps = 4  # checkpoints and validation at updates 2 and 4
    tiny_config.image_size, tiny_config.model.depth = (32, 48), 2  # fewer convs for every process to compile
    tiny_config.learning_rate = 0.01
    monkeypatch.setattr(optim, "create_optimizer", distributed_worker.sgd_optimizer)
    assert jax.process_count() == 1 and jax.device_count() == 4, "conftest asks for 4 CPU devices"
    one = str(tmp_path / "one")
    whole = train.train_and_evaluate(tiny_config, one, progress=False)  # 1 process × 4 devices, uninterrupted

    two = str(tmp_path / "two")
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(tiny_config.to_dict()))
    result = _launch(["--num_processes=2", "--devices_per_process=2", "--platform=cpu", f"--timeout={TIMEOUT_S}",
                      "--", sys.executable, WORKER, str(config_path), two, "2"])  # "pre-empted" after update 2
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # The same global batches: the same losses, validation Dice, parameters and BatchNorm statistics.
    one_rows, two_rows = _metrics(one), _metrics(two)
    assert sorted(two_rows) == [1, 2], "process 0 alone writes metrics"
    for step in (1, 2):
        np.testing.assert_allclose(two_rows[step]["loss"], one_rows[step]["loss"], rtol=1e-5)
        # Dice counts thresholded pixels: float noise in a logit near 0 may flip a few of them.
        np.testing.assert_allclose(two_rows[step]["dice"], one_rows[step]["dice"], atol=1e-3)
    np.testing.assert_allclose(two_rows[2]["val_dice"], one_rows[2]["val_dice"], atol=1e-4)
    assert two_rows[2]["val_dice"] > 0
    (state1, data1), (state2, data2) = _saved(one, 2, whole["state"]), _saved(two, 2, whole["state"])
    _allclose(state2.params, state1.params)
    _allclose(state2.batch_stats, state1.batch_stats)
    assert int(state2.update_step) == 2
    assert data2 == data1 == {"stream_position": 2 * tiny_config.batch_size}, "counted in the global stream"
    assert os.path.exists(os.path.join(two, "plots", "overlays.png"))

    # One process × 4 devices picks up the 2-process checkpoint at update 2 and global batch 3.
    resumed = train.train_and_evaluate(tiny_config, two, progress=False)
    final = jax.device_get(whole["state"].params)
    _allclose(jax.device_get(resumed["state"].params), final)
    assert _max_diff(final, state1.params) > 100 * ATOL, "updates 3 and 4 moved the parameters well past the noise"
    resumed_rows = _metrics(two)
    for step in (3, 4):
        np.testing.assert_allclose(resumed_rows[step]["loss"], one_rows[step]["loss"], rtol=1e-5)
    assert one_rows[4]["loss"] != one_rows[1]["loss"], "the parameters must actually move"


def test_process_slices_from_a_resume_point_tile_the_single_process_stream():
    stream = grain.MapDataset.range(100)
    start, batch = 12, 8
    alone = pipeline.ProcessSlice(stream, batch, 0, 1, start)
    halves = [pipeline.ProcessSlice(stream, batch, i, 2, start) for i in range(2)]
    quarters = [pipeline.ProcessSlice(stream, batch, i, 4, start) for i in range(4)]
    for k in range(len(alone) // batch):
        expected = [alone[k * batch + j] for j in range(batch)]
        assert expected == list(range(start + k * batch, start + (k + 1) * batch))
        for parts in (halves, quarters):
            local = batch // len(parts)
            assert [p[k * local + j] for p in parts for j in range(local)] == expected
    assert len(alone) == (100 - start) // batch * batch and len(halves[1]) == len(alone) // 2


def test_old_checkpoints_resume_from_their_grain_state():
    assert train.resume_point(None) == (0, None)
    assert train.resume_point(train.data_checkpoint(24)) == (24, None)
    assert train.resume_point({"next_index": 8}) == (8, None)  # one process, num_workers=0
    pool = {"next_index_in_cycle": 0, "iterators_in_use_states": [{"next_index": 2}, {"next_index": 2}]}
    assert train.resume_point(pool) == (0, pool)


def test_the_launcher_stops_the_others_when_one_fails():
    script = ("import os, sys, time; i = int(os.environ['JAX_PROCESS_ID']); print('process', i, 'of', "
              "os.environ['JAX_NUM_PROCESSES'], os.environ['JAX_NUM_CPU_DEVICES'], flush=True); "
              "time.sleep(0.5 if i == 1 else 120); sys.exit(3)")
    began = time.monotonic()
    result = _launch(["--num_processes=3", "--devices_per_process=2", "--platform=cpu", "--timeout=100", "--",
                      sys.executable, "-c", script], timeout=110)
    assert result.returncode == 3
    assert time.monotonic() - began < 60, "the two sleeping processes were stopped, not waited for"
    for i in range(3):
        assert f"[{i}] process {i} of 3 2" in result.stdout
    assert "process 1 exited with status 3; stopped the other 2" in result.stderr


def test_after_a_stop_the_launcher_stops_a_process_left_waiting_once_the_grace_is_over():
    """Process 0 fails at the stop; process 1 goes on (as if waiting for process 0 in a collective) until the
    launcher's own SIGTERM, a second one."""
    script = ("import os, signal, sys, time; i = int(os.environ['JAX_PROCESS_ID']); seen = []\n"
              "def on_term(signum, frame):\n"
              "    seen.append(signum)\n"
              "    if i == 0 or len(seen) > 1: sys.exit(3 if i == 0 else 0)\n"
              "signal.signal(signal.SIGTERM, on_term); print('ready', i, flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-m", "carvana_jax.launch", "--num_processes=2", "--platform=cpu",
                             "--stop_grace=1", "--", sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
    try:
        ready = [proc.stdout.readline() for _ in range(2)]
        assert sorted(line.split("] ")[1].strip() for line in ready) == ["ready 0", "ready 1"], ready
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err
    assert time.monotonic() - began < 20, "process 1 was stopped after the grace, not waited for"
    assert "process(es) 1 still running 1 s after the first ended; stopped them" in err, err
    assert_nothing_left(proc.pid)


def test_launcher_environment_gives_each_process_its_place_and_devices():
    env = launch.process_env(1, 2, 1234, 4, "gpu", base={})
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234" and env["JAX_PROCESS_ID"] == "1"
    assert env["JAX_NUM_PROCESSES"] == "2" and env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    cpu = launch.process_env(0, 2, 1234, 2, "cpu", base={})
    assert cpu["JAX_NUM_CPU_DEVICES"] == "2" and cpu["JAX_PLATFORMS"] == "cpu"


def test_a_single_process_run_does_not_start_the_runtime(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_STEP_NODELIST",
                 "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1) is False


@pytest.mark.parametrize("kwargs, message", [
    ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"}, "process_id must be one of 0..1"),
    ({"num_processes": 2, "process_id": 1}, "coordinator_address must be HOST:PORT"),
    ({"process_id": 1, "coordinator_address": "h:1"}, "needs --num_processes"),
])
def test_bad_process_flags_are_named(kwargs, message, monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.initialize(**kwargs)


def test_an_unreachable_coordinator_is_one_line(tmp_path):
    port = launch.free_port()  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "carvana_jax.train", "--config", os.path.join(REPO, "configs", "demo.py"),
         "--workdir", str(tmp_path), f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         "--process_id=1", "--coordinator_timeout=2"], check=False, cwd=REPO, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        (f"error: cannot reach the coordinator 127.0.0.1:{port} (process 0) within 2 s: Connection refused; "
         "is process 0 running, and its port open to this host?")]
