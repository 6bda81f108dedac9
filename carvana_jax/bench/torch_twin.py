"""The U-Net of models/unet.py in PyTorch (eager, NCHW float32), for side-by-side CPU timings.

Only ``python -m carvana_jax.bench train --torch`` uses it; torch is an optional dependency
(``pip install torch==2.13.0``, the CPU wheel, or the project's ``bench`` extra). The network is built from the
Flax U-Net's own block specs (``UNet.block_specs``, ``UNet.head_spec``), so it has the same layers, widths and
parameter count for the same ``config.model``: DoubleConv =
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

from carvana_jax.models import unet

SMOOTH = 1.0  # as carvana_jax.losses


class ConvNormReLU(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = nn.Conv2d(conv.cin, conv.cout, conv.kernel, padding=conv.kernel // 2, bias=not conv.normed)
        self.norm = nn.BatchNorm2d(conv.cout, eps=1e-5, momentum=0.1) if conv.normed else nn.Identity()

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


class Block(nn.Module):
    """A block of convolutions (``unet.BlockSpec.convs``): in sequence (DoubleConv), or, when a convolution's
    input is wider than the one before it gave, each layer's output concatenated to its input (DenseBlock)."""

    def __init__(self, spec):
        super().__init__()
        self.layers = nn.ModuleList(ConvNormReLU(conv) for conv in spec.convs)
        self.dense = any(later.cin != earlier.cout for earlier, later in zip(spec.convs, spec.convs[1:]))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.cat([x, layer(x)], dim=1) if self.dense else layer(x)
        return self.layers[-1](x)


class UNet(nn.Module):
    """(B, 3, H, W) images in [0, 1] → (B, H, W) logits: the blocks and head the Flax U-Net describes."""

    def __init__(self, flax_unet):
        super().__init__()
        self.s = flax_unet.space_to_depth
        blocks = flax_unet.block_specs()
        self.down = nn.ModuleList(Block(b) for b in blocks if b.kind == "down")
        self.centre = Block(next(b for b in blocks if b.kind == "centre"))
        self.up = nn.ModuleList(Block(b) for b in sorted((b for b in blocks if b.kind == "up"), key=lambda b: b.level))
        head = flax_unet.head_spec()
        self.head = nn.Conv2d(head.cin, head.cout, head.kernel, padding=head.kernel // 2)

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
    return UNet(unet.plain_unet(model_cfg))


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
