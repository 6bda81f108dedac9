"""bench predict: the straightforward RLE it compares against, its figures on a tiny checkpoint, the command."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from carvana_jax import optim, parallel, rle
from carvana_jax.bench import predict as bench_predict
from carvana_jax.checkpoint import Checkpointer
from carvana_jax.models import unet
from carvana_jax.train_state import create_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_naive_encode_is_the_kaggle_rle():
    rng = np.random.default_rng(0)
    masks = [np.zeros((4, 6), np.uint8), np.ones((4, 6), np.uint8), (rng.random((40, 60)) < 0.5).astype(np.uint8),
             np.array([[0, 1, 1, 0], [0, 0, 0, 1], [1, 1, 0, 1]], np.uint8)]
    for mask in masks:
        assert bench_predict.naive_encode(mask) == rle.encode(mask)
    assert bench_predict.naive_encode(masks[3]) == "2 2 8 3 12 1"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, kaggle_dir):
    """An untrained tiny model saved as a checkpoint (the benchmark times, it does not score): the 32×48
    depth-2 U-Net whose initialisation test_cv, test_eval and test_train compile too."""
    from configs import demo
    config = demo.get_config()
    config.update(data_dir=kaggle_dir, image_size=(32, 48), num_workers=0, eval_batch_size=4)
    config.model.update(features=4, depth=2)
    model = unet.from_config(config.model)
    state = create_train_state(jax.random.PRNGKey(0), model, optim.create_optimizer(config), (32, 48))
    path = tmp_path_factory.mktemp("bench") / "run"
    ckpt = Checkpointer(str(path / "checkpoints"))
    ckpt.save(1, parallel.replicate(state, parallel.make_mesh()), None, config)
    ckpt.wait()
    ckpt.close()
    return str(path)


def test_predict_benchmark_times_every_stage_on_the_same_photos(checkpoint):
    r = bench_predict.bench_predict([checkpoint], data_dir=None, n=8, rle_repeats=3, cpu_size=(128, 192))
    assert r["images"] == 8 and r["models"] == 1 and r["image_sizes"] == [[32, 48]]
    assert set(r["stage_s"]) == {"decode", "device", "transfer", "rle", "csv"}
    assert all(s > 0 for s in r["stage_s"].values())
    assert r["slowest_stage"] in r["stage_s"]
    assert r["overlap_ratio"] == pytest.approx(r["end_to_end_s"] / max(r["stage_s"].values()))
    q = r["rle_full_mask"]
    assert q["encode_ms"] > 0 and q["naive_ms"] > 0 and q["speedup"] == pytest.approx(q["naive_ms"] / q["encode_ms"])
    assert r["cpu_per_image"]["decode_resize_ms_cpu_size"] > 0
    json.dumps(r)


def test_predict_benchmark_times_the_torch_twin_with_the_checkpoints_weights(checkpoint):
    pytest.importorskip("torch", reason="torch not installed (optional: pip install torch==2.13.0)")
    r = bench_predict.bench_predict([checkpoint], data_dir=None, n=8, rle_repeats=1, cpu_size=(32, 48), tta="hflip",
                                    torch=True)
    t = r["torch"]
    assert t["jax_images_per_sec"] > 0 and t["torch_images_per_sec"] > 0
    assert t["jax_over_torch"] == pytest.approx(t["jax_images_per_sec"] / t["torch_images_per_sec"])
    assert t["differing_pixels"] < 1e-4  # the same weights and views: only probabilities on the threshold differ
    json.dumps(r)


def test_torch_twin_refuses_what_it_cannot_predict(checkpoint):
    from carvana_jax import predict
    from carvana_jax.errors import ConfigError
    config, ensemble, _ = predict.load_ensemble([checkpoint], tta="hflip,shift", postprocess="fill")
    with pytest.raises(ConfigError, match=r"tta 'hflip,shift', postprocess 'fill' \(pass --postprocess none\)"):
        bench_predict.check_torch_twin(ensemble, config)
    config, ensemble, _ = predict.load_ensemble([checkpoint], tta="hflip", postprocess="none")
    bench_predict.check_torch_twin(ensemble, config)


def _run(*args):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2")
    return subprocess.run([sys.executable, "-m", "carvana_jax.bench", "predict", *args], cwd=ROOT, env=env,
                          check=False, capture_output=True, text=True, timeout=300)


def test_predict_without_a_checkpoint_is_a_one_line_error(tmp_path):
    for args, words in [((), "needs --ckpt"), (("--ckpt", str(tmp_path / "nope")), "no such folder")]:
        proc = _run(*args)
        assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and words in errors[0], proc.stderr


@pytest.mark.slow
def test_predict_benchmark_command_prints_json(checkpoint):
    proc = _run("--ckpt", checkpoint, "--n", "8", "--json", "--cpu_size", "128,192")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["benchmark"] == "predict" and r["device_count"] == 2 and r["end_to_end_images_per_sec"] > 0
