"""Shared fixtures. Four CPU devices are made before jax starts, so data-parallel tests can
compare a 1-device mesh with a 4-device one in the same process."""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
# The warp's strip width is otherwise measured on first use and may differ between two processes measuring at
# once; the tests fix it (tests/test_warp_strip.py tests the measuring).
os.environ.setdefault("CARVANA_WARP_STRIP", "64")

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
def synthetic_data(tmp_path_factory):
    """A small synthetic dataset in the Kaggle layout: 3 training cars and 1 test car, 16 angles each."""
    from carvana_jax.synthetic import dataset
    out = tmp_path_factory.mktemp("data") / "kaggle"
    dataset.generate(str(out), num_cars=3, num_test_cars=1, seed=0, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def kaggle_dir(synthetic_data):
    """synthetic_data (a module may override kaggle_dir with kaggle_dir_few)."""
    return synthetic_data


@pytest.fixture
def tiny_config(kaggle_dir):
    """The demo config shrunk to seconds: 64×96 images, a 3-level U-Net of width 4, 4 updates."""
    from helpers import tiny_config_for
    return tiny_config_for(kaggle_dir)


@pytest.fixture(scope="session")
def kaggle_dir_few(synthetic_data, tmp_path_factory):
    """synthetic_data's 3 training cars and 1 test car with helpers.FEW_ANGLES photos each instead of 16: for the
    tests that validate or predict at 1918×1280 many times."""
    from helpers import FEW_ANGLES, kaggle_subset
    return kaggle_subset(synthetic_data, tmp_path_factory.mktemp("data_few") / "kaggle", FEW_ANGLES)


@pytest.fixture(scope="session")
def two_update_run(kaggle_dir_few, tmp_path_factory):
    """One training run that several tests read (and copy before changing): tiny_config on kaggle_dir_few with
    the shared 32×48 depth-2 U-Net, 2 updates, validated and checkpointed at update 2.

    {'config', 'workdir', 'result': train_and_evaluate's metrics without the state, 'params': on the host}."""
    import jax

    from carvana_jax import train
    from helpers import shared_model, tiny_config_for
    config = shared_model(tiny_config_for(kaggle_dir_few))
    config.num_train_steps = 2
    workdir = str(tmp_path_factory.mktemp("two_update_run") / "run")
    result = train.train_and_evaluate(config, workdir, progress=False)
    params = jax.device_get(result.pop("state").params)
    return {"config": config, "workdir": workdir, "result": result, "params": params}
