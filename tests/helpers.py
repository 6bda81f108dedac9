"""Helpers shared by the tests (imported as a plain module: pytest puts tests/ on sys.path)."""
import csv
import os
import shutil
import time

from carvana_jax.data import kaggle
from configs import demo

FEW_ANGLES = 4  # photos per car in conftest's kaggle_dir_few


def tiny_config_for(data_dir):
    """conftest's tiny_config on ``data_dir``: small_config shrunk to seconds (a 3-level U-Net of width 4, 4 updates,
    checkpoints and validation every 2, one of the three cars held out)."""
    config = small_config(data_dir, num_train_steps=4, warmup_steps=1, checkpoint_every=2, eval_every=2, log_every=1,
                          val_fraction=0.34)
    config.model.features = 4
    config.model.depth = 3
    return config


def shared_model(config):
    """``config`` at 32×48 with a depth-2 U-Net: the model most training tests share, so that its programs are
    compiled once per session (the compilation cache keeps them)."""
    config.image_size = (32, 48)
    config.model.depth = 2
    return config


def small_config(data_dir, **overrides):
    """The demo config at 64×96, batch 4, read in-process, with ``overrides`` applied."""
    config = demo.get_config()
    config.data_dir = data_dir
    config.image_size = (64, 96)
    config.batch_size = 4
    config.num_workers = 0
    for key, value in overrides.items():
        config[key] = value
    return config


def take(ds, n):
    """The first ``n`` items of a dataset, its iterator closed after (grain's workers stopped)."""
    it = iter(ds)
    try:
        return [next(it) for _ in range(n)]
    finally:
        if hasattr(it, "close"):
            it.close()


def kaggle_subset(kaggle_dir, out, angles: int) -> str:
    """A copy of the Kaggle-layout folder ``kaggle_dir`` in ``out`` keeping each car's photos 1..``angles`` (its
    masks, CSV rows and submission order too): the same cars, with fewer full-resolution photos to score."""
    out = str(out)
    for folder in ("train", "train_masks", "test"):
        os.makedirs(os.path.join(out, folder))
        for name in os.listdir(os.path.join(kaggle_dir, folder)):
            if kaggle.parse_name(name)[2] <= angles:
                shutil.copy(os.path.join(kaggle_dir, folder, name), os.path.join(out, folder, name))
    shutil.copy(os.path.join(kaggle_dir, "metadata.csv"), os.path.join(out, "metadata.csv"))
    for name in ("train_masks.csv", "sample_submission.csv"):
        with open(os.path.join(kaggle_dir, name), newline="") as f:
            rows = list(csv.reader(f))
        with open(os.path.join(out, name), "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([rows[0]] + [r for r in rows[1:]
                                                                      if kaggle.parse_name(r[0])[2] <= angles])
    return out


def session_alive(sid: int) -> list[str]:
    """Command lines of the live (not zombie) processes of session ``sid``."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    alive.append(f.read().replace(b"\0", b" ").decode(errors="replace")[:120])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return alive


def assert_nothing_left(sid: int) -> None:
    deadline = time.monotonic() + 10
    while (alive := session_alive(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"left running: {alive}"
