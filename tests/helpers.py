"""Helpers shared by the data tests (imported as a plain module: pytest puts tests/ on sys.path)."""
from configs import demo


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
