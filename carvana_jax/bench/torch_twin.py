"""The U-Net of models/unet.py in PyTorch (eager, NCHW float32), for side-by-side CPU timings.

``python -m carvana_jax.bench train --torch`` times its training step and ``bench predict --torch`` its
prediction (``Predictor``: a trained checkpoint's Flax variables copied in, ``load_flax_variables``); torch is an
optional dependency
(``pip install torch==2.13.0``, the CPU wheel, or the project's ``bench`` extra). The network is built from the
Flax U-Net's own block specs (``UNet.block_specs``, ``UNet.head_spec``), so it has the same layers, widths and
parameter count for the same ``config.model``: DoubleConv =
(3×3 conv without bias → BatchNorm → ReLU) × 2 (or the dense block), 2×2 max-pool down, nearest ×2
up-sampling, the skip concatenated after the up-sampled features, and a 1×1 head with bias (with
``space_to_depth`` s: the patches folded into channels in models/unet.py's order, a 3×3 head over the last
block and the patches, pixel_shuffle out). Its loss is the
config's (BCE + soft Dice with smooth=1 per image by default, as losses.py) and its optimiser Adam/AdamW/
RMSProp after the same global-norm clipping. Only the compute dtype differs: torch always runs float32.
"""
from __future__ import annotations

import os

import numpy as np
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


def space_to_depth(x, s: int):
    """(B, C, H, W) → (B, s·s·C, H/s, W/s), each patch's channels ordered (row, column, colour) as
    models/unet.space_to_depth orders them (F.pixel_unshuffle puts the colour first), so Flax weights fit."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // s, s, w // s, s).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(b, s * s * c, h // s, w // s)


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
            x = patches = space_to_depth(x, self.s)
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


def _flax_layer_names(flax_unet, block) -> list[str]:
    """The Flax submodule of each of a block's convolutions: ConvNormReLU_i, and a dense block's closing 1×1
    convolution Conv_0."""
    names = [f"ConvNormReLU_{i}" for i in range(len(block.convs))]
    return names[:-1] + ["Conv_0"] if flax_unet.block == "dense" else names


def _copy(tensor: torch.Tensor, value, what: str) -> None:
    value = torch.from_numpy(np.array(value, np.float32))  # a writable copy (jax arrays give read-only views)
    if tuple(value.shape) != tuple(tensor.shape):
        raise ValueError(f"{what}: shape {tuple(value.shape)} does not fit the twin's {tuple(tensor.shape)}")
    tensor.copy_(value)


def _load_conv(conv: nn.Conv2d, params: dict, what: str) -> None:
    _copy(conv.weight, np.transpose(np.asarray(params["kernel"]), (3, 2, 0, 1)), f"{what}/kernel")  # HWIO → OIHW
    if conv.bias is not None:
        _copy(conv.bias, params["bias"], f"{what}/bias")


@torch.no_grad()
def load_flax_variables(twin: UNet, flax_unet, variables) -> UNet:
    """``twin`` with the Flax U-Net's ``variables`` ({'params', 'batch_stats'}) copied in: convolution kernels
    HWIO → OIHW, BatchNorm's scale, bias and running statistics; ValueError naming a key that does not fit."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    twins = {"centre": twin.centre, **{f"down{i}": b for i, b in enumerate(twin.down)},
             **{f"up{i}": b for i, b in enumerate(twin.up)}}
    for block in flax_unet.block_specs():
        for layer, name in zip(twins[block.name].layers, _flax_layer_names(flax_unet, block)):
            where = f"{block.name}/{name}"
            try:
                conv_params = params[block.name][name]
                _load_conv(layer.conv, conv_params if name == "Conv_0" else conv_params["Conv_0"],
                           where if name == "Conv_0" else f"{where}/Conv_0")
                if isinstance(layer.norm, nn.BatchNorm2d):
                    norm, norm_stats = conv_params["BatchNorm_0"], stats[block.name][name]["BatchNorm_0"]
                    _copy(layer.norm.weight, norm["scale"], f"{where}/BatchNorm_0/scale")
                    _copy(layer.norm.bias, norm["bias"], f"{where}/BatchNorm_0/bias")
                    _copy(layer.norm.running_mean, norm_stats["mean"], f"{where}/BatchNorm_0/mean")
                    _copy(layer.norm.running_var, norm_stats["var"], f"{where}/BatchNorm_0/var")
            except KeyError as e:
                raise ValueError(f"{where}: no {e} in the Flax variables") from None
    _load_conv(twin.head, params["head"], "head")
    return twin


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


class Predictor:
    """The prediction device stage in torch eager (``inference.ensemble_masks`` of one model, no guide): uint8
    NHWC photos at the model's size → normalised → the twin in eval mode (BatchNorm's running statistics), the
    mean of the plain and mirrored views' sigmoid with ``hflip``, bilinear up-sampling to 1280×1918
    (``F.interpolate``, pixel centres aligned, as inference.upsample), threshold, then np.packbits: (B, 306880)."""

    def __init__(self, flax_unet, variables, *, hflip: bool = False, threshold: float = 0.5,
                 shape: tuple[int, int] = (1280, 1918)):
        self.model = load_flax_variables(UNet(flax_unet), flax_unet, variables).eval()
        self.hflip, self.threshold, self.shape = hflip, float(threshold), tuple(shape)

    @torch.inference_mode()
    def probs(self, images: np.ndarray) -> torch.Tensor:
        """Model-size probabilities (B, H, W), the TTA mean."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
        probs = torch.sigmoid(self.model(x))
        if self.hflip:
            probs = (probs + torch.sigmoid(self.model(x.flip(3))).flip(2)) / 2
        return probs

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        full = F.interpolate(self.probs(images)[:, None], size=self.shape, mode="bilinear", align_corners=False)
        return np.packbits((full[:, 0] > self.threshold).numpy().reshape(len(images), -1), axis=1)
