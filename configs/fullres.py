"""Full resolution: 1280×1920 (the 1918-wide photo padded by the warp), batch 1 × 16 accumulated."""
from configs import unet768


def get_config():
    config = unet768.get_config()
    config.image_size = (1280, 1920)
    config.batch_size = 1
    config.grad_accum_steps = 16
    config.model.depth = 6
    config.model.dtype = "bfloat16"
    return config
