"""1024×1024 at effective batch 16: batch 4 accumulated over 4 micro-steps, bf16 compute."""
from configs import unet768


def get_config():
    config = unet768.get_config()
    config.image_size = (1024, 1024)
    config.batch_size = 4
    config.grad_accum_steps = 4
    config.model.depth = 5
    config.model.dtype = "bfloat16"
    return config
