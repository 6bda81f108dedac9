"""Shared fixtures. Four CPU devices are made before jax starts, so data-parallel tests can
compare a 1-device mesh with a 4-device one in the same process."""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")

import tempfile  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

from carvana_jax import cli  # noqa: E402

# Many tests build the same small programs; a persistent cache compiles each once per session.
cli.enable_compilation_cache(tempfile.mkdtemp(prefix="carvana_jax_xla_"))

# grain's worker processes read absl flags; the CLIs parse them in absl.app.run, tests here.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def kaggle_dir(tmp_path_factory):
    """A small synthetic dataset in the Kaggle layout: 3 training cars and 1 test car, 16 angles each."""
    from carvana_jax.data import synthetic
    out = tmp_path_factory.mktemp("data") / "kaggle"
    synthetic.generate(str(out), num_cars=3, num_test_cars=1, seed=0, progress=False)
    return str(out)


@pytest.fixture
def tiny_config(kaggle_dir):
    """The demo config shrunk to seconds: 64×96 images, a 3-level U-Net of width 4, 4 updates."""
    from configs import demo
    c = demo.get_config()
    c.data_dir = kaggle_dir
    c.image_size = (64, 96)
    c.batch_size = 4
    c.num_train_steps = 4
    c.warmup_steps = 1
    c.checkpoint_every = 2
    c.eval_every = 2
    c.log_every = 1
    c.num_workers = 0
    c.val_fraction = 0.34  # one of the three cars
    c.model.features = 4
    c.model.depth = 3
    return c
