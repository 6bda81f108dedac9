"""The GPU recipe for the real photos: the seed's 768×768 U-Net with what the real-car measurements kept
(BENCHMARKS.md, "Real cars"): a moving average of the parameters for validation and the submission, and the h-flip
at test time. Soft-coverage masks are on too: they cost nothing, and the ideal coverage mask at 768² is within 1e-4
of the truth either way, so they matter only at small inputs."""
from configs import unet768


def get_config():
    config = unet768.get_config()
    config.soft_masks = True
    config.ema_decay = 0.999
    config.tta = "hflip"
    return config
