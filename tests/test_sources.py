"""The folder and the prepared TFDS dataset are interchangeable sources of the same examples."""
import jax
import numpy as np
import pytest
from helpers import shared_model

from carvana_jax import train
from carvana_jax.data import kaggle, sources, tfds_carvana


@pytest.fixture(scope="module")
def kaggle_dir(kaggle_dir_few):
    """4 photos per car (16 in conftest's kaggle_dir): fewer photos to pack into the TFDS dataset and to validate at
    1918×1280; conftest's two_update_run trained on these."""
    return kaggle_dir_few


@pytest.fixture(scope="module")
def tfds_dir(kaggle_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    tfds_carvana.build(kaggle_dir, path)
    return path


def test_both_sources_split_the_same_cars_in_the_same_order(tiny_config, tfds_dir):
    folder_train, folder_val = sources.train_and_val(tiny_config)
    tiny_config.update(data_source="tfds", tfds_dir=tfds_dir)
    tfds_train, tfds_val = sources.train_and_val(tiny_config)
    for records, examples in ((folder_train, tfds_train), (folder_val, tfds_val)):
        assert [r.name for r in records] == [sources.example_name(e) for e in examples]
        with open(records[0].image_path, "rb") as f:
            assert examples[0]["image"] == f.read()
    assert [sources.example_name(e) for e in sources.test_examples(tiny_config)] == \
        [n.removesuffix(".jpg") for n in kaggle.read_submission_order(tiny_config.data_dir)]


@pytest.mark.slow
def test_training_from_tfds_equals_training_from_the_folder(two_update_run, tiny_config, tfds_dir, tmp_path):
    folder = two_update_run  # the same config read from the folder kaggle_dir_few
    config = shared_model(tiny_config)
    config.num_train_steps = 2
    assert config.to_dict() == folder["config"].to_dict()
    config.update(data_source="tfds", tfds_dir=tfds_dir)
    from_tfds = train.train_and_evaluate(config, str(tmp_path / "tfds"), progress=False)
    assert from_tfds["val_dice"] == folder["result"]["val_dice"] and from_tfds["loss"] == folder["result"]["loss"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_tfds["state"].params), folder["params"])


def test_an_unprepared_tfds_dir_says_how_to_prepare(tiny_config, tmp_path):
    tiny_config.update(data_source="tfds", tfds_dir=str(tmp_path / "none"))
    with pytest.raises(kaggle.DataError, match="carvana_jax.data.prepare"):
        sources.train_and_val(tiny_config)
