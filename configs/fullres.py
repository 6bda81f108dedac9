"""Full resolution: 1280×1920 (the 1918-wide photo padded by the warp, fit='pad': no resampling), batch 1 × 16
accumulated.

Memory (python -m carvana_jax.memory --config configs/fullres.py): ≈ 7.5 GB per device at batch 1, so model.remat
stays off on an 80 GB GPU. Remat is what would let batch 16 run without accumulation: ≈ 62 GB with
--config.model.remat=true against ≈ 82 GB without.
"""
from configs import unet768


def get_config():
    config = unet768.get_config()
    config.image_size = (1280, 1920)
    config.fit = "pad"  # the 1918-wide photo gets one reflected column each side; predictions are cropped back
    config.batch_size = 1
    config.grad_accum_steps = 16
    config.model.depth = 6
    config.model.dtype = "bfloat16"
    config.model.remat = False  # fits without at batch 1: see above
    return config
