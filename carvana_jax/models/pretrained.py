"""torchvision ImageNet weights → the Flax variables of models/encoders.py's VGG11 and ResNet34 encoders.

``model.pretrained`` names a torchvision state dict the user downloaded (``vgg11-8a719046.pth``,
``resnet34-b627a593.pth``, or the same tensors as ``.safetensors``); nothing is downloaded here. Every tensor the
encoder needs is checked by key and shape, in the state dict's own order, so a file of another architecture is
named by its first misfit; the classifier (``classifier.*``, ``fc.*``) is not used. Conv weights go OIHW → HWIO,
BatchNorm's weight/bias → scale/bias (params) and running_mean/running_var → mean/var (batch_stats).

The converted tree is cached once as ``PATH.ARCH.flax.npz`` beside the file and read instead while it is newer
than the file, so a run needs PyTorch only the first time, and never for a ``.safetensors`` file (read with
safetensors' numpy API).
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

from carvana_jax.errors import PretrainedError
from carvana_jax.models.encoders import RESNET34_LAYERS, STEM_FEATURES, VGG11_STAGES

ARCHS = ("vgg11", "resnet34")
TORCH_INSTALL = "pip install torch==2.13.0 (or pip install -e '.[torch]')"
_BN = (("weight", "params", "scale"), ("bias", "params", "bias"),
       ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var"))


# ---------------------------------------------------------------------------------------------- layouts

def _conv(key: str, path: tuple[str, ...], cout: int, cin: int, k: int, bias: bool) -> list[tuple]:
    rows = [(f"{key}.weight", "params", (*path, "kernel"), (cout, cin, k, k))]
    return rows + ([(f"{key}.bias", "params", (*path, "bias"), (cout,))] if bias else [])


def _bn(key: str, path: tuple[str, ...], c: int) -> list[tuple]:
    return [(f"{key}.{torch_name}", collection, (*path, name), (c,)) for torch_name, collection, name in _BN]


def layout(arch: str) -> list[tuple[str, str, tuple[str, ...], tuple[int, ...]]]:
    """(torchvision key, Flax collection, path in the encoder's tree, torchvision shape) of every tensor the
    encoder takes, in torchvision's state dict order."""
    rows, cin = [], 3
    if arch == "vgg11":
        for stage, convs in enumerate(VGG11_STAGES, start=1):
            for index, cout in convs:
                rows += _conv(f"features.{index}", (f"stage{stage}", f"features_{index}"), cout, cin, 3, bias=True)
                cin = cout
        return rows
    if arch == "resnet34":
        rows = _conv("conv1", ("conv1",), STEM_FEATURES, 3, 7, bias=False) + _bn("bn1", ("bn1",), STEM_FEATURES)
        cin = STEM_FEATURES
        for layer, (width, blocks, stride) in enumerate(RESNET34_LAYERS, start=1):
            for b in range(blocks):
                key, path = f"layer{layer}.{b}", (f"layer{layer}_{b}",)
                rows += _conv(f"{key}.conv1", (*path, "conv1"), width, cin, 3, bias=False)
                rows += _bn(f"{key}.bn1", (*path, "bn1"), width)
                rows += _conv(f"{key}.conv2", (*path, "conv2"), width, width, 3, bias=False)
                rows += _bn(f"{key}.bn2", (*path, "bn2"), width)
                if b == 0 and (stride != 1 or cin != width):
                    rows += _conv(f"{key}.downsample.0", (*path, "downsample_0"), width, cin, 1, bias=False)
                    rows += _bn(f"{key}.downsample.1", (*path, "downsample_1"), width)
                cin = width
        return rows
    raise ValueError(f"no pretrained layout for encoder {arch!r}; one of {', '.join(ARCHS)}")


# ---------------------------------------------------------------------------------------------- reading

def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a torchvision state dict file as numpy arrays: ``.safetensors`` with safetensors' numpy
    API, anything else with torch.load(map_location='cpu', weights_only=True)."""
    if not os.path.isfile(path):
        raise PretrainedError(f"model.pretrained {path}: no such file (download torchvision's ImageNet weights "
                              "first; README.md, 'Pretrained encoders')")
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise PretrainedError(f"{path}: reading .safetensors needs the safetensors package "
                                  "(pip install safetensors)") from None
        try:
            return dict(load_file(path))
        except Exception as e:  # safetensors raises its own SafetensorError for a malformed header
            raise PretrainedError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    try:
        import torch
    except ImportError:
        raise PretrainedError(f"{path}: reading a .pth needs PyTorch ({TORCH_INSTALL}), or give the same "
                              "weights as .safetensors") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle of a whole model, or no pickle at all
        raise PretrainedError(f"{path}: not a readable PyTorch state dict ({_first_line(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise PretrainedError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    return {k: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
            for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def convert(state_dict: dict[str, np.ndarray], arch: str, name: str = "state dict") -> dict:
    """{'params': tree, 'batch_stats': tree} of the ``arch`` encoder from a torchvision state dict; the first
    missing key or misshapen tensor raises PretrainedError naming ``name``, the key and the shape."""
    variables: dict = {"params": {}, "batch_stats": {}}
    for key, collection, path, shape in layout(arch):
        if key not in state_dict:
            raise PretrainedError(f"{name}: key {key} missing (not a torchvision {arch} state dict)")
        value = np.asarray(state_dict[key])
        if value.shape != shape:
            raise PretrainedError(f"{name}: key {key} has shape {tuple(value.shape)}, expected {shape} "
                                  f"(not a torchvision {arch} state dict)")
        value = value.astype(np.float32)
        node = variables[collection]
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW → HWIO
    return variables


# ---------------------------------------------------------------------------------------------- the cache

def cache_path(path: str, arch: str) -> str:
    return f"{path}.{arch}.flax.npz"


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _unflatten(flat) -> dict:
    tree: dict = {"params": {}, "batch_stats": {}}
    for key in flat.files:
        *parts, leaf = key.split("/")
        node = tree
        for part in parts:
            node = node.setdefault(part, {})
        node[leaf] = flat[key]
    return tree


def _read_cache(cache: str, source: str) -> dict | None:
    if not os.path.isfile(cache) or os.path.getmtime(cache) < os.path.getmtime(source):
        return None
    try:
        with np.load(cache) as flat:
            return _unflatten(flat)
    except (OSError, ValueError, EOFError):  # torn or foreign file: convert again
        return None


def _write_cache(cache: str, variables: dict) -> None:
    """Written to a temporary file and renamed, so processes converting at once never see half a cache."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(cache) + ".", suffix=".tmp",
                                   dir=os.path.dirname(cache) or ".")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **_flatten(variables))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from the other users of the weights file
        os.replace(tmp, cache)
    except OSError as e:
        print(f"note: could not cache the converted weights as {cache} ({e}); converting on every run",
              file=sys.stderr)


def encoder_variables(path: str, arch: str) -> dict:
    """{'params': ..., 'batch_stats': ...} of the ``arch`` encoder from the torchvision file ``path``, from the
    cache beside it when that is newer, else converted (and cached)."""
    if arch not in ARCHS:
        raise PretrainedError(f"model.pretrained is for model.encoder {' or '.join(ARCHS)}, not {arch!r}")
    if not os.path.isfile(path):
        load_state_dict(path)  # raises the missing-file error
    cache = cache_path(path, arch)
    if (variables := _read_cache(cache, path)) is not None:
        return variables
    variables = convert(load_state_dict(path), arch, path)
    _write_cache(cache, variables)
    return variables


# ---------------------------------------------------------------------------------------------- into a model

def merge_encoder(variables: dict, encoder: dict, name: str = "model.pretrained") -> dict:
    """``variables`` (a model's init) with every leaf under its 'encoder' module replaced by ``encoder``'s; the
    encoder may hold more stages than the model uses (a smaller model.depth), never fewer."""
    def fill(model_tree, loaded, where):
        out = {}
        for key, value in model_tree.items():
            here = f"{where}/{key}"
            if key not in loaded:
                raise PretrainedError(f"{name}: no weights for {here}")
            if isinstance(value, dict):
                out[key] = fill(value, loaded[key], here)
            elif np.shape(loaded[key]) != np.shape(value):
                raise PretrainedError(f"{name}: {here} has shape {np.shape(loaded[key])}, the model "
                                      f"{np.shape(value)}")
            else:
                out[key] = np.asarray(loaded[key], dtype=np.asarray(value).dtype)
        return out

    merged = dict(variables)
    for collection, tree in variables.items():
        if "encoder" in tree:
            merged[collection] = {**tree, "encoder": fill(tree["encoder"], encoder.get(collection, {}),
                                                          f"{collection}/encoder")}
    return merged


def load_into(variables: dict, model_cfg) -> dict:
    """A freshly initialised model's variables with the encoder taken from ``model_cfg.pretrained``."""
    return merge_encoder(variables, encoder_variables(model_cfg.pretrained, model_cfg.encoder),
                         model_cfg.pretrained)
