"""1024×1024 at effective batch 16: batch 4 accumulated over 4 micro-steps, bf16 compute.

Memory (python -m carvana_jax.memory --config configs/unet1024.py): ≈ 9.0 GB per device (7.6 GB measured on an
H100), so it fits an 80 GB GPU without rematerialisation and model.remat stays off: remat would bring it to ≈ 7.0 GB
at the price of recomputing every block's forward pass. Even batch 16 without accumulation fits (≈ 34 GB).
"""
from configs import unet768


def get_config():
    config = unet768.get_config()
    config.image_size = (1024, 1024)
    config.batch_size = 4
    config.grad_accum_steps = 4
    config.model.depth = 5
    config.model.dtype = "bfloat16"
    config.model.remat = False  # fits without: see above
    return config
