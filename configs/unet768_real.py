"""The GPU recipe for the real photos: the seed's U-Net (width 32, double-conv blocks) at about the seed's compute,
with what the real-car measurements kept (BENCHMARKS.md, "Real cars").

- The whole 1918×1280 photo, never resampled (fit='pad': one reflected column each side, the prediction cropped
  back), folded into 2×2 patches (model.space_to_depth=2): the blocks run at 640×960 — 614k pixels against the
  seed's 768² = 590k — and the mask is predicted at full resolution, whose ceiling is a Dice of 1. On the CPU the
  fold gave +0.0018 over the same U-Net at half the size.
- Boundary weighting of the loss (+0.0008 on the CPU), over 16 full-resolution pixels either side of the edge.
- A moving average of the parameters for validation and the submission, and the h-flip at test time.

Memory (python -m carvana_jax.memory --config configs/unet768_real.py): ≈ 6 GB per device at batch 4 in bf16.
Forward pass 329 GFLOP a photo against unet768's 251. Not yet trained on a GPU: no device was lent.
"""
from configs import unet768


def get_config():
    config = unet768.get_config()
    config.image_size = (1280, 1920)
    config.fit = "pad"
    config.model.space_to_depth = 2
    config.model.depth = 5               # the centre at 20×30, as the seed's 48×48 was at 768² / 16
    config.model.dtype = "bfloat16"      # twice the step rate of float32 on an H100 (BENCHMARKS.md)
    config.loss_boundary_weight = 2.0
    config.loss_boundary_width = 16
    config.soft_masks = True             # at full resolution the coverage mask is the 0/1 mask itself
    config.ema_decay = 0.999
    config.tta = "hflip"
    return config
