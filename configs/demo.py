"""CPU-sized demo on the synthetic data: trains in a few minutes on two cores."""
from configs import default


def get_config():
    config = default.get_config()
    config.data_dir = "data/synthetic"
    config.image_size = (128, 192)
    config.batch_size = 8
    config.num_train_steps = 900
    config.warmup_steps = 30
    config.learning_rate = 3e-3
    config.val_fraction = 0.15
    config.checkpoint_every = 300
    config.eval_every = 300
    config.log_every = 10
    config.num_workers = 1
    config.model.features = 8
    config.model.depth = 4
    return config
