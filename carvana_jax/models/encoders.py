"""U-Nets on torchvision's ImageNet encoders, in Flax linen: TernausNet11 and a ResNet34 U-Net.

The encoders mirror torchvision's layouts (the same convolutions, strides, paddings and BatchNorm epsilon), so
models/pretrained.py can load torchvision's ImageNet weights into them:

- ``VGG11Encoder``: torchvision ``vgg11().features`` (eight 3×3 convs with bias and ReLU, no BatchNorm), in five
  stages split at its max-pools; stage k's map is at H/2**(k-1) (64, 128, 256, 512, 512 channels).
- ``ResNet34Encoder``: torchvision ``resnet34()``'s conv1/bn1/relu (stage 1, H/2), then maxpool + layer1 (H/4),
  layer2 (H/8), layer3 (H/16) and layer4 (H/32) of BasicBlocks (64, 64, 128, 256, 512 channels).

Both take ImageNet-normalised NHWC images and return every stage's map (the skip connections). The U-Nets take
(B, H, W, 3) images in [0, 1] like models/unet.UNet, apply ImageNet's mean and std themselves (so training,
evaluation and prediction feed them as they feed the plain U-Net) and return (B, H, W) logits:

- ``TernausNet11``: the VGG11 encoder and TernausNet's decoder (ternaus/TernausNet ``UNet11``: a 3×3 conv then a
  stride-2 transposed conv per level, widths from ``features``, 32 in the paper).
- ``ResNet34UNet``: the ResNet34 encoder and a U-Net decoder (nearest ×2 up-sampling, concatenated skip, a
  double-conv block of width ``features * 2**level`` at H/2**level), with a last block at full resolution.

``depth`` is the number of encoder stages used, 1..5 (5, the whole encoder, is TernausNet11 and the whole
resnet34); either way the coarsest map is at H/2**depth, so the input must divide by 2**depth as for the plain
U-Net. ``norm`` is the decoder's (the ResNet encoder always has its BatchNorm, the VGG one none); BatchNorm
averages its statistics over ``AXIS`` in training. ``remat`` recomputes each encoder stage (VGG) or BasicBlock
(ResNet) and each decoder block in the backward pass; the parameter tree is the same either way.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from carvana_jax.models.unet import ConvNormReLU, _maybe_remat, _norm, _upsample2x, make_block

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_DEPTH = 5  # stages of either encoder

# torchvision vgg11().features: (index in the Sequential, output channels) of each conv, by stage.
VGG11_STAGES = (((0, 64),), ((3, 128),), ((6, 256), (8, 256)), ((11, 512), (13, 512)), ((16, 512), (18, 512)))
# torchvision resnet34(): (channels, BasicBlocks, stride of the first) of layer1..layer4.
RESNET34_LAYERS = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
STEM_FEATURES = 64  # resnet34's conv1


def imagenet_normalise(x):
    """Images in [0, 1] → torchvision's ImageNet input: (x - mean) / std per channel."""
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def _pad(k: int):
    """PyTorch's symmetric padding of a k×k conv (Flax's 'SAME' pads stride-2 convs on one side only)."""
    return ((k // 2, k // 2), (k // 2, k // 2))


def _check_depth(depth: int) -> None:
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"model.depth must be 1..{MAX_DEPTH} for a pretrained encoder (its stages), got {depth}")


# ---------------------------------------------------------------------------------------------- encoders

class VGGStage(nn.Module):
    """One stage of vgg11().features: max-pool (but the first), then 3×3 conv + ReLU per entry of ``convs``."""
    convs: tuple[tuple[int, int], ...]
    pool: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.pool:
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        for index, width in self.convs:
            x = nn.relu(nn.Conv(width, (3, 3), padding=_pad(3), dtype=self.dtype, name=f"features_{index}")(x))
        return x


class VGG11Encoder(nn.Module):
    """torchvision's vgg11().features, stage by stage: NHWC ImageNet-normalised images → [stage 1, .., depth]."""
    depth: int = MAX_DEPTH
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        _check_depth(self.depth)
        stage, features = _maybe_remat(VGGStage, self.remat), []
        for k, convs in enumerate(VGG11_STAGES[:self.depth], start=1):
            x = stage(convs, k > 1, self.dtype, name=f"stage{k}")(x, train)
            features.append(x)
        return features


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: 3×3 conv (stride) → BN → ReLU → 3×3 conv → BN, + shortcut, ReLU."""
    features: int
    strides: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = _norm("batch", train, self.dtype)
        y = nn.Conv(self.features, (3, 3), strides=self.strides, padding=_pad(3), use_bias=False, dtype=self.dtype,
                    name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = nn.Conv(self.features, (3, 3), padding=_pad(3), use_bias=False, dtype=self.dtype, name="conv2")(y)
        y = norm(name="bn2")(y)
        if self.downsample:
            x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False, dtype=self.dtype,
                        name="downsample_0")(x)
            x = norm(name="downsample_1")(x)
        return nn.relu(y + x)


class ResNet34Encoder(nn.Module):
    """torchvision's resnet34() without avgpool/fc: NHWC ImageNet-normalised images → [stage 1, .., stage depth]
    (stage 1 = relu(bn1(conv1)) at H/2, stage k+1 = layer k)."""
    depth: int = MAX_DEPTH
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        _check_depth(self.depth)
        norm = _norm("batch", train, self.dtype)
        x = nn.Conv(STEM_FEATURES, (7, 7), strides=2, padding=_pad(7), use_bias=False, dtype=self.dtype,
                    name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        features = [x]
        block = _maybe_remat(BasicBlock, self.remat)
        for layer, (width, blocks, stride) in enumerate(RESNET34_LAYERS[:self.depth - 1], start=1):
            if layer == 1:
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
            for b in range(blocks):
                first = b == 0
                x = block(width, stride if first else 1, first and layer > 1, self.dtype,
                          name=f"layer{layer}_{b}")(x, train)
            features.append(x)
        return features


# ---------------------------------------------------------------------------------------------- U-Nets

class TernausDecoderBlock(nn.Module):
    """TernausNet's DecoderBlock: 3×3 conv → ReLU, then a 3×3 stride-2 transposed conv → ReLU (doubles H and W);
    with norm='batch' each conv is followed by BatchNorm."""
    middle: int
    features: int
    norm: str
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        x = ConvNormReLU(self.middle, self.norm, self.dtype)(x, train)
        norm = _norm(self.norm, train, self.dtype)
        x = nn.ConvTranspose(self.features, (3, 3), strides=(2, 2), padding="SAME", use_bias=norm is None,
                             dtype=self.dtype)(x)
        if norm is not None:
            x = norm()(x)
        return nn.relu(x)


def _head(x):
    return nn.Conv(1, (1, 1), dtype=jnp.float32, name="head")(x)[..., 0].astype(jnp.float32)


class TernausNet11(nn.Module):
    """(B, H, W, 3) images in [0, 1] → (B, H, W) logits: the VGG11 encoder with TernausNet's decoder.

    With depth 5 and features 32 the layout is UNet11's: centre (512 → 256), dec5 (512 → 256), dec4 (512 → 128),
    dec3 (256 → 64), dec2 (128 → 32), dec1 (32), each the (middle → output) widths of a decoder block."""
    features: int = 32
    depth: int = MAX_DEPTH
    norm: str = "batch"
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        f, d = self.features, self.depth
        skips = VGG11Encoder(d, self.dtype, self.remat, name="encoder")(imagenet_normalise(x).astype(self.dtype),
                                                                          train)
        block = _maybe_remat(TernausDecoderBlock, self.remat)

        def widths(k):  # (middle, output) of the block whose output meets stage k's map
            return f * min(2 ** (k + 1), 16), f * min(2 ** (k - 1), 8)

        x = block(*widths(d), self.norm, self.dtype, name="centre")(nn.max_pool(skips[-1], (2, 2), strides=(2, 2)),
                                                                     train)
        for k in reversed(range(1, d)):
            x = block(*widths(k), self.norm, self.dtype, name=f"dec{k + 1}")(
                jnp.concatenate([x, skips[k]], axis=-1), train)
        x = _maybe_remat(ConvNormReLU, self.remat)(f, self.norm, self.dtype, name="dec1")(
            jnp.concatenate([x, skips[0]], axis=-1), train)
        return _head(x)


class ResNet34UNet(nn.Module):
    """(B, H, W, 3) images in [0, 1] → (B, H, W) logits: the ResNet34 encoder with a U-Net decoder up to full
    resolution (block ``up{level}`` at H/2**level, ``features * 2**level`` wide; ``up0`` has no skip)."""
    features: int = 32
    depth: int = MAX_DEPTH
    norm: str = "batch"
    block: str = "double_conv"
    dense_layers: int = 4
    dtype: Any = jnp.float32
    remat: bool = False

    def _block(self, features: int, name: str) -> nn.Module:
        return make_block(self, features, name)

    @nn.compact
    def __call__(self, x, train: bool = False):
        skips = ResNet34Encoder(self.depth, self.dtype, self.remat, name="encoder")(
            imagenet_normalise(x).astype(self.dtype), train)
        x = skips[-1]
        for level in reversed(range(1, self.depth)):
            x = self._block(self.features * 2**level, f"up{level}")(
                jnp.concatenate([_upsample2x(x), skips[level - 1]], axis=-1), train)
        x = self._block(self.features, "up0")(_upsample2x(x), train)
        return _head(x)


ENCODERS = {"vgg11": VGG11Encoder, "resnet34": ResNet34Encoder}


def from_config(model_cfg, dtype) -> nn.Module:
    """The U-Net on ``model_cfg.encoder`` ('vgg11' or 'resnet34') that a ``config.model`` describes."""
    encoder = model_cfg.encoder
    _check_depth(model_cfg.depth)
    if encoder == "vgg11":
        return TernausNet11(features=model_cfg.features, depth=model_cfg.depth, norm=model_cfg.norm, dtype=dtype,
                            remat=model_cfg.remat)
    if encoder == "resnet34":
        return ResNet34UNet(features=model_cfg.features, depth=model_cfg.depth, norm=model_cfg.norm,
                            block=model_cfg.block, dense_layers=model_cfg.dense_layers, dtype=dtype,
                            remat=model_cfg.remat)
    raise ValueError(f"model.encoder must be 'unet', 'vgg11' or 'resnet34', got {encoder!r}")
