"""Where examples come from: the Kaggle folder (file paths) or the prepared TFDS dataset (bytes).

Both give the same examples in the same order (sorted by name for training, sample_submission order
for test) and the same split by car, so a run reads the same batches from either.
"""
from __future__ import annotations

import os
from typing import Sequence

from carvana_jax.data import kaggle


class Subset:
    """Items ``indices`` of a random-access source, as a picklable sequence (grain's source)."""

    def __init__(self, source, indices: Sequence[int]):
        self.source = source
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Subset(self.source, self.indices[index])
        return self.source[self.indices[index]]

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, {len(self)} items)"


def tfds_dir(config) -> str:
    return config.tfds_dir or os.path.join(config.data_dir, "tfds")


def _tfds_split(config, split: str):
    from carvana_jax.data import tfds_carvana  # imports tensorflow_datasets: only when asked for
    return tfds_carvana.load_split(tfds_dir(config), split)


def train_and_val(config) -> tuple[Sequence, Sequence]:
    """(train, val) examples of ``config.data_source``, whole cars held out for validation."""
    if config.data_source == "folder":
        return kaggle.split_by_car(kaggle.index_train(config.data_dir), config.val_fraction, config.seed)
    source = _tfds_split(config, "train")
    refs = [kaggle.Record(name, car, angle, image_path=f"{name}.jpg") for name, car, angle in source.metadata]
    position = {ref.name: i for i, ref in enumerate(refs)}
    # The folder's order (sorted by name), so both sources give the same batches for the same seed.
    train, val = kaggle.split_by_car(sorted(refs, key=lambda r: r.name), config.val_fraction, config.seed)
    return (Subset(source, [position[r.name] for r in train]), Subset(source, [position[r.name] for r in val]))


def test_examples(config) -> Sequence:
    """The test photos in sample_submission order."""
    if config.data_source == "folder":
        return kaggle.index_test(config.data_dir)
    source = _tfds_split(config, "test")
    return Subset(source, range(len(source)))


def example_name(example) -> str:
    """'CARID_NN' of a folder Record or of a TFDS example."""
    return example["name"] if isinstance(example, dict) else example.name
