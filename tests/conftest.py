"""Shared fixtures. Four CPU devices are made before jax starts, so data-parallel tests can
compare a 1-device mesh with a 4-device one in the same process."""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

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
