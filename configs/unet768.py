"""The seed's model: 768×768×3 U-Net, 18 convs (4 down, centre, 4 up), BCE+Dice, batch 4, all of train."""
from configs import default


def get_config():
    config = default.get_config()
    config.image_size = (768, 768)
    config.batch_size = 4
    config.val_fraction = 0.0
    config.model.features = 32
    config.model.depth = 4
    return config
