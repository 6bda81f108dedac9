"""The command lines as a user meets them: one clear line for each mistake, no traceback."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", CARVANA_JAX_CACHE=os.path.join(ROOT, ".pytest_cache", "xla"))
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_missing_data_dir_says_how_to_get_data(tmp_path):
    proc = _run("carvana_jax.train", "--config", "configs/demo.py", f"--workdir={tmp_path}/w",
                f"--config.data_dir={tmp_path}/nothing")
    _one_line_error(proc, "nothing", "kaggle competitions download", "carvana_jax.synthetic")


@pytest.mark.slow
def test_unknown_config_key_is_named(tmp_path):
    proc = _run("carvana_jax.train", "--config", "configs/demo.py", f"--workdir={tmp_path}/w", "--config.lerning_rate=1")
    assert proc.returncode != 0 and "lerning_rate" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_eval_of_a_missing_checkpoint_is_one_line(tmp_path):
    _one_line_error(_run("carvana_jax.eval", f"--ckpt={tmp_path}/none"), "no such folder")


@pytest.mark.slow
def test_every_command_has_help():
    for module, flag in (("carvana_jax.train", "--config"), ("carvana_jax.eval", "--ckpt"),
                         ("carvana_jax.synthetic", "--out"), ("carvana_jax.score", "--submission"),
                         ("carvana_jax.memory", "--config"), ("carvana_jax.launch", "--num_processes"),
                         ("carvana_jax.data.prepare", "--data_dir")):
        proc = _run(module, "--help")
        assert proc.returncode == 0 and flag in proc.stdout + proc.stderr, (module, proc.stdout, proc.stderr)


@pytest.mark.slow
def test_a_truncated_photo_read_by_a_worker_process_is_named(kaggle_dir, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(kaggle_dir, data)
    victim = sorted((data / "train").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:20_000])
    proc = _run("carvana_jax.train", "--config", "configs/demo.py", f"--workdir={tmp_path}/w", f"--config.data_dir={data}",
                "--config.num_workers=1", "--config.val_fraction=0", "--config.image_size=(64,96)",
                "--config.model.features=4", "--config.model.depth=2", "--config.batch_size=16",
                "--config.num_train_steps=4")  # depth 2: fewer convs to compile while .pytest_cache/xla is cold
    _one_line_error(proc, str(victim), "truncated")
    assert "memory estimate per device (float32): params" in proc.stdout  # printed at start-up
