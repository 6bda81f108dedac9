"""The U-Net of models/unet.py in PyTorch (eager, NCHW float32), for side-by-side CPU timings.

Only ``python -m carvana_jax.bench train --torch`` uses it; torch is an optional dependency
(``pip install torch==2.13.0``, the CPU wheel, or the project's ``bench`` extra). The network has the same
layers, widths and parameter count as the Flax one for the same ``config.model``: DoubleConv =
(3×3 conv without bias → BatchNorm → ReLU) × 2 (or the dense block), 2×2 max-pool down, nearest ×2
up-sampling, the skip concatenated after the up-sampled features, and a 1×1 head with bias (with
``space_to_depth`` s: pixel_unshuffle in, a 3×3 head over the last block and the patches, pixel_shuffle out —
torch orders a patch's channels differently, which changes neither the cost nor the count). Its loss is the
config's (BCE + soft Dice with smooth=1 per image by default, as losses.py) and its optimiser Adam/AdamW/
RMSProp after the same global-norm clipping. Only the compute dtype differs: torch always runs float32.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F

from carvana_jax.models.unet import level_widths

SMOOTH = 1.0  # as carvana_jax.losses


class ConvNormReLU(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=norm != "batch")
        self.norm = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1) if norm == "batch" else nn.Identity()

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


class DoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__()
        self.a, self.b = ConvNormReLU(cin, cout, norm), ConvNormReLU(cout, cout, norm)

    def forward(self, x):
        return self.b(self.a(x))


class DenseBlock(nn.Module):
    """As models/unet.DenseBlock: each layer sees all earlier ones; a 1×1 conv (with bias) brings it to cout."""

    def __init__(self, cin: int, cout: int, norm: str, layers: int):
        super().__init__()
        growth = max(cout // 2, 4)
        self.layers = nn.ModuleList(ConvNormReLU(cin + i * growth, growth, norm) for i in range(layers))
        self.out = nn.Conv2d(cin + layers * growth, cout, 1)

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return F.relu(self.out(x))


class UNet(nn.Module):
    """(B, 3, H, W) images in [0, 1] → (B, H, W) logits."""

    def __init__(self, features: int = 32, depth: int = 4, norm: str = "batch", block: str = "double_conv",
                 dense_layers: int = 4, space_to_depth: int = 1, widths=()):
        super().__init__()
        self.s = s = space_to_depth
        if norm not in ("batch", "none"):
            raise ValueError(f"model.norm must be 'batch' or 'none', got {norm!r}")
        if block not in ("double_conv", "dense"):
            raise ValueError(f"model.block must be 'double_conv' or 'dense', got {block!r}")

        def make(cin, cout):
            return DoubleConv(cin, cout, norm) if block == "double_conv" else DenseBlock(cin, cout, norm, dense_layers)

        widths = level_widths(features, depth, widths)
        patch = 3 * s * s
        self.down = nn.ModuleList(make(patch if level == 0 else widths[level - 1], widths[level])
                                  for level in range(depth))
        self.centre = make(widths[depth - 1] if depth else 3, widths[depth])
        # up[level] sees the up-sampled output of the level below (width widths[level+1]) and the skip
        self.up = nn.ModuleList(make(widths[level + 1] + widths[level], widths[level]) for level in range(depth))
        self.head = nn.Conv2d(widths[0], 1, 1) if s == 1 else nn.Conv2d(widths[0] + patch, s * s, 3, padding=1)

    def forward(self, x):
        if self.s > 1:
            x = patches = F.pixel_unshuffle(x, self.s)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.centre(x)
        for level in reversed(range(len(self.up))):
            x = torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skips[level]], dim=1)
            x = self.up[level](x)
        if self.s == 1:
            return self.head(x)[:, 0]
        return F.pixel_shuffle(self.head(torch.cat([x, patches], dim=1)), self.s)[:, 0]


def from_config(model_cfg) -> UNet:
    return UNet(features=model_cfg.features, depth=model_cfg.depth, norm=model_cfg.norm, block=model_cfg.block,
                dense_layers=model_cfg.dense_layers, space_to_depth=model_cfg.get("space_to_depth", 1),
                widths=tuple(model_cfg.get("widths", ())))


def param_count(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm's running statistics are buffers, as Flax keeps them in batch_stats)."""
    return sum(p.numel() for p in model.parameters())


def _bce(logits, masks):
    return F.binary_cross_entropy_with_logits(logits, masks)


def _overlaps(logits, masks):
    probs = torch.sigmoid(logits).flatten(1)
    masks = masks.flatten(1)
    return (probs * masks).sum(-1), probs.sum(-1) + masks.sum(-1)


def _dice(logits, masks):
    intersection, total = _overlaps(logits, masks)
    return (1.0 - (2.0 * intersection + SMOOTH) / (total + SMOOTH)).mean()


def _jaccard(logits, masks):
    intersection, total = _overlaps(logits, masks)
    return (1.0 - (intersection + SMOOTH) / (total - intersection + SMOOTH)).mean()


LOSSES = {
    "bce": _bce,
    "dice": _dice,
    "bce_dice": lambda logits, masks: _bce(logits, masks) + _dice(logits, masks),
    "bce_jaccard": lambda logits, masks: _bce(logits, masks) + _jaccard(logits, masks),
}


def _optimizer(config, params):
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.learning_rate)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.learning_rate)
    raise ValueError(f"optimizer must be 'adam', 'adamw' or 'rmsprop', got {config.optimizer!r}")


def set_threads() -> int:
    """Intra-op threads = every CPU, as XLA's CPU backend uses; returns the number."""
    torch.set_num_threads(os.cpu_count() or 1)
    return torch.get_num_threads()


class TrainStep:
    """One eager training step on uint8 NHWC host batches, like steps.train_step on one device:
    normalise, forward in train mode, loss, backward, clip, optimiser step; returns the loss."""

    def __init__(self, config, seed: int = 0):
        torch.manual_seed(seed)
        self.model = from_config(config.model).train()
        self.loss_fn = LOSSES[config.loss]
        self.clip = config.grad_clip_norm
        self.opt = _optimizer(config, self.model.parameters())

    def prepare(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Host numpy batch → tensors (kept as uint8; the step converts, as the JAX step does on device)."""
        return torch.from_numpy(batch["image"]), torch.from_numpy(batch["mask"])

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> float:
        x = images.permute(0, 3, 1, 2).float().div_(255.0).contiguous()
        m = masks.float()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), m)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return float(loss.detach())
