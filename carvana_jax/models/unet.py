"""U-Net in Flax linen: DoubleConv (or dense) blocks, max-pool down, nearest up-sampling up.

With the defaults (depth 4, double_conv) it is the seed's network: 4 down blocks, a centre block
and 4 up blocks of two 3×3 conv + BatchNorm + ReLU each (18 convs), then a 1×1 conv to one logit.
BatchNorm statistics are averaged over ``axis_name`` so data-parallel training normalises by the
global batch, exactly as one device would. With ``remat`` every block is wrapped in flax's lifted
``nn.remat``: the backward pass recomputes the activations inside a block from its input instead of
keeping them, trading about one extra forward pass for memory (carvana_jax/memory.py counts both ways);
the parameter tree is the same either way, so a checkpoint fits both.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

AXIS = "data"


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One convolution: a ``kernel``×``kernel`` map from ``cin`` to ``cout`` channels; ``normed``: followed by
    BatchNorm (and so without a bias of its own)."""
    kernel: int
    cin: int
    cout: int
    normed: bool


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One block of the U-Net: its parameter name, the level it runs at (0 is the input's size, or the folded
    patches' with space_to_depth), its channels in and out, and its convolutions in order."""
    name: str
    kind: str  # 'down', 'centre' or 'up'
    level: int
    cin: int
    cout: int
    convs: tuple[ConvSpec, ...]


def dense_growth(features: int) -> int:
    """Channels each layer of a dense block adds."""
    return max(features // 2, 4)


def block_convs(block: str, norm: str, dense_layers: int, cin: int, cout: int) -> tuple[ConvSpec, ...]:
    """The convolutions of one block of kind ``block`` (what DoubleConv and DenseBlock build)."""
    normed = norm == "batch"
    if block == "double_conv":
        return ConvSpec(3, cin, cout, normed), ConvSpec(3, cout, cout, normed)
    if block == "dense":
        growth = dense_growth(cout)
        layers = tuple(ConvSpec(3, cin + i * growth, growth, normed) for i in range(dense_layers))
        return layers + (ConvSpec(1, cin + dense_layers * growth, cout, False),)
    raise ValueError(f"model.block must be 'double_conv' or 'dense', got {block!r}")


def _norm(kind: str, train: bool, dtype):
    if kind == "batch":
        return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 axis_name=AXIS if train else None, dtype=dtype)
    if kind == "none":
        return None
    raise ValueError(f"model.norm must be 'batch' or 'none', got {kind!r}")


class ConvNormReLU(nn.Module):
    features: int
    norm: str
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        norm = _norm(self.norm, train, self.dtype)
        x = nn.Conv(self.features, (3, 3), use_bias=norm is None, dtype=self.dtype)(x)
        if norm is not None:
            x = norm()(x)
        return nn.relu(x)


class DoubleConv(nn.Module):
    """(3×3 conv → norm → ReLU) × 2."""
    features: int
    norm: str
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        x = ConvNormReLU(self.features, self.norm, self.dtype)(x, train)
        return ConvNormReLU(self.features, self.norm, self.dtype)(x, train)


class DenseBlock(nn.Module):
    """DenseNet-style block: each layer sees all earlier ones; a 1×1 conv brings it to ``features``."""
    features: int
    norm: str
    dtype: Any
    layers: int = 4

    @nn.compact
    def __call__(self, x, train: bool):
        growth = dense_growth(self.features)
        for _ in range(self.layers):
            x = jnp.concatenate([x, ConvNormReLU(growth, self.norm, self.dtype)(x, train)], axis=-1)
        return nn.relu(nn.Conv(self.features, (1, 1), dtype=self.dtype)(x))


def _maybe_remat(block: type[nn.Module], remat: bool) -> type[nn.Module]:
    """The block class, or its rematerialised twin. ``train`` (argument 2, counting ``self``) is a Python bool
    that picks BatchNorm's mode, so it must stay static rather than be traced."""
    return nn.remat(block, static_argnums=(2,)) if remat else block


def make_block(model: nn.Module, features: int, name: str) -> nn.Module:
    """One U-Net block of ``model``'s kind (its ``block``, ``norm``, ``dtype``, ``dense_layers``, ``remat``)."""
    if model.block == "double_conv":
        return _maybe_remat(DoubleConv, model.remat)(features, model.norm, model.dtype, name=name)
    if model.block == "dense":
        return _maybe_remat(DenseBlock, model.remat)(features, model.norm, model.dtype, model.dense_layers, name=name)
    raise ValueError(f"model.block must be 'double_conv' or 'dense', got {model.block!r}")


def level_widths(features: int, depth: int, widths=()) -> list[int]:
    """The channels of the blocks at each level 0..depth (the last is the centre): ``widths`` when given (one per
    level), else ``features`` doubling per level."""
    if widths:
        if len(widths) != depth + 1 or min(widths) < 1:
            raise ValueError(f"model.widths needs {depth + 1} positive widths (levels 0..{depth}, the centre "
                             f"last) for depth {depth}; got {tuple(widths)}")
        return [int(w) for w in widths]
    return [features * 2**level for level in range(depth + 1)]


def _upsample2x(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def space_to_depth(x, s: int):
    """(B, H, W, C) → (B, H/s, W/s, s·s·C): each s×s patch of pixels becomes one pixel's channels."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // s, s, w // s, s, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // s, w // s, s * s * c)


def depth_to_space(x, s: int):
    """The inverse of ``space_to_depth``: (B, H, W, s·s·C) → (B, H·s, W·s, C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, s, s, c // (s * s))
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, c // (s * s))


class UNet(nn.Module):
    """(B, H, W, 3) images in [0, 1] → (B, H, W) logits of 'car'.

    With ``space_to_depth`` s > 1 the blocks run at H/s × W/s: each s×s patch of the photo enters as one pixel's
    s·s·3 channels, and a 3×3 head over the last block and those same input patches gives each patch its s·s
    logits. The photo's detail and the mask's resolution are those of H × W; the compute is nearly that of a U-Net
    at H/s × W/s (BENCHMARKS.md, "Real cars")."""
    features: int = 32
    depth: int = 4
    norm: str = "batch"
    block: str = "double_conv"
    dense_layers: int = 4
    dtype: Any = jnp.float32
    remat: bool = False
    space_to_depth: int = 1
    widths: tuple[int, ...] = ()

    # The network's one description: __call__ builds these blocks and head, and the memory estimate
    # (carvana_jax/memory.py), the FLOP count and the torch twin (carvana_jax/bench/) read them.
    def level_widths(self) -> list[int]:
        return level_widths(self.features, self.depth, self.widths)

    def block_specs(self) -> list[BlockSpec]:
        """Every block in forward order: down0 … down{depth-1}, centre, up{depth-1} … up0."""
        widths, depth = self.level_widths(), self.depth
        ins = [self.patch_channels()] + widths[:depth]  # each down block's input; the centre's is the last
        kinds = ([("down", level, ins[level]) for level in range(depth)] + [("centre", depth, ins[depth])]
                 + [("up", level, widths[level + 1] + widths[level]) for level in reversed(range(depth))])
        return [BlockSpec("centre" if kind == "centre" else f"{kind}{level}", kind, level, cin, widths[level],
                          block_convs(self.block, self.norm, self.dense_layers, cin, widths[level]))
                for kind, level, cin in kinds]

    def patch_channels(self) -> int:
        """Channels of the first block's input: the RGB photo, or its s×s patches folded into channels."""
        return 3 * self.space_to_depth ** 2

    def head_spec(self) -> ConvSpec:
        """A 1×1 conv to one logit, or with space_to_depth s a 3×3 conv over the last block and the patches
        to the s·s logits of each patch."""
        s, width = self.space_to_depth, self.level_widths()[0]
        return ConvSpec(1, width, 1, False) if s == 1 else ConvSpec(3, width + self.patch_channels(), s * s, False)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype)
        s = self.space_to_depth
        if s > 1:
            x = patches = space_to_depth(x, s)
        skips = []
        for spec in self.block_specs():
            if spec.kind == "up":
                x = jnp.concatenate([_upsample2x(x), skips.pop()], axis=-1)
            x = make_block(self, spec.cout, spec.name)(x, train)
            if spec.kind == "down":
                skips.append(x)
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        head = self.head_spec()
        if s == 1:
            logits = nn.Conv(head.cout, (1, 1), dtype=jnp.float32, name="head")(x)
        else:  # the sub-pixel head sees its neighbours and the photo's own patches, not only the coarse features
            x = jnp.concatenate([x, patches], axis=-1)
            logits = depth_to_space(nn.Conv(head.cout, (3, 3), dtype=jnp.float32, name="head")(x), s)
        return logits[..., 0].astype(jnp.float32)


def plain_unet(model_cfg, dtype=jnp.float32) -> UNet:
    """This file's U-Net for ``config.model``, whatever its ``encoder`` says (the memory estimate and the FLOP
    count read its block specs)."""
    return UNet(features=model_cfg.features, depth=model_cfg.depth, norm=model_cfg.norm, block=model_cfg.block,
                dense_layers=model_cfg.dense_layers, dtype=dtype, remat=model_cfg.remat,
                space_to_depth=int(model_cfg.get("space_to_depth", 1)), widths=tuple(model_cfg.get("widths", ())))


def from_config(model_cfg) -> nn.Module:
    """The U-Net a ``config.model`` describes: this file's for encoder 'unet' (the default, and what configs saved
    before the key existed mean), models/encoders.py's on a torchvision encoder for 'vgg11' or 'resnet34'."""
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if model_cfg.dtype not in dtypes:
        raise ValueError(f"model.dtype must be one of {sorted(dtypes)}, got {model_cfg.dtype!r}")
    if model_cfg.get("encoder", "unet") != "unet":
        from carvana_jax.models import encoders
        return encoders.from_config(model_cfg, dtypes[model_cfg.dtype])
    return plain_unet(model_cfg, dtypes[model_cfg.dtype])
