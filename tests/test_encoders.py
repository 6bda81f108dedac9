"""models/encoders.py and models/pretrained.py: torchvision weights give torchvision's feature maps in Flax, the
converted tree is cached once, a wrong file is named by its first misfit, and each U-Net trains a step.

The feature-map tests need PyTorch (`pip install -e '.[torch]'`, which `./run.sh test` installs). They build the
reference with torchvision where it imports, else with the twins below: the same modules under the same state dict
keys as torchvision's vgg11().features and resnet34(), in plain torch.nn (PyPI's torchvision does not import beside
the CPU build of torch; test_the_twins_are_torchvisions_layouts checks the twins wherever torchvision is there).
"""
import functools
import os
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from carvana_jax import cli, losses, memory, optim, parallel, steps
from carvana_jax.checkpoint import model_mismatch
from carvana_jax.config import validate_config
from carvana_jax.errors import ConfigError
from carvana_jax.models import encoders, pretrained, unet
from carvana_jax.train_state import create_train_state
from configs import default

SIZE = (64, 64)


def _torch():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: the feature maps are compared with "
                                "torch's (pip install -e '.[torch]', or ./run.sh test, installs it)")
    torch.set_num_threads(2)
    return torch


def _torchvision():
    try:
        import torchvision
        return torchvision
    except Exception:  # missing, or PyPI's CUDA build failing to load beside the CPU torch
        return None


# ---------------------------------------------------------------------------------------------- torch twins

def _vgg11_features_twin():
    """torchvision.models.vgg11().features: configuration 'A' of torchvision's VGG, without BatchNorm."""
    from torch import nn
    layers, cin = [], 3
    for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


def _resnet_twin(blocks=(3, 4, 6, 3)):
    """torchvision.models.resnet34() (resnet18 with blocks (2, 2, 2, 2)): the same modules under the same names."""
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            cin = 64
            for i, (width, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
                stride = 1 if i == 1 else 2
                layer = [BasicBlock(cin, width, stride)] + [BasicBlock(width, width, 1) for _ in range(n - 1)]
                setattr(self, f"layer{i}", nn.Sequential(*layer))
                cin = width
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512, 1000)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.avgpool(x).flatten(1))

    return ResNet()


def _reference(arch):
    """A torch module of ``arch`` with random weights and BatchNorm statistics, in eval mode; its state dict."""
    torch = _torch()
    torch.manual_seed(0)
    tv = _torchvision()
    if arch == "vgg11":
        # vgg11's classifier is 120M parameters that no encoder reads: the state dict holds the features only
        module = tv.models.vgg11(weights=None).features if tv else _vgg11_features_twin()
        prefix = "features."
    else:
        module = tv.models.resnet34(weights=None) if tv else _resnet_twin()
        prefix = ""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    module.eval()
    return module, {prefix + k: v for k, v in module.state_dict().items()}


def _torch_stages(arch, module, x):
    """Every stage's output of the torch module, NHWC."""
    torch = _torch()
    outs = []
    with torch.no_grad():
        if arch == "vgg11":
            ends = {1, 4, 9, 14, 19}  # the ReLU closing each stage, before the next max-pool
            for i, layer in enumerate(module):
                x = layer(x)
                if i in ends:
                    outs.append(x)
        else:
            x = module.relu(module.bn1(module.conv1(x)))
            outs.append(x)
            x = module.maxpool(x)
            for i in range(1, 5):
                x = getattr(module, f"layer{i}")(x)
                outs.append(x)
    return [o.numpy().transpose(0, 2, 3, 1) for o in outs]


def _save(state_dict, path):
    """A state dict as the file ``path`` names: .pth with torch.save, .safetensors with safetensors' numpy API."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()}, path)
    else:
        import torch
        torch.save(state_dict, path)
    return path


def _numpy_state_dict(arch, rng=None, drop=()):
    """Random tensors of every key the ``arch`` encoder reads (no torch needed), less those starting with ``drop``."""
    rng = rng or np.random.default_rng(0)
    out = {}
    for key, _, _, shape in pretrained.layout(arch):
        if not any(key.startswith(d) for d in drop):
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32) if key.endswith("running_var") else \
                rng.normal(0, 0.05, shape).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------- feature maps

def test_the_twins_are_torchvisions_layouts():
    torch = _torch()
    tv = _torchvision()
    if tv is None:
        pytest.skip("torchvision does not import here (PyPI's build needs the CUDA torch); the twins stand in for it")
    for twin, real in ((_vgg11_features_twin(), tv.models.vgg11(weights=None).features),
                       (_resnet_twin(), tv.models.resnet34(weights=None)),
                       (_resnet_twin((2, 2, 2, 2)), tv.models.resnet18(weights=None))):
        got = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
        assert got == {k: tuple(v.shape) for k, v in real.state_dict().items()}
        twin.load_state_dict(real.state_dict())
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            np.testing.assert_array_equal(twin.eval()(x).numpy(), real.eval()(x).numpy())


@pytest.mark.parametrize("arch", ["vgg11", "resnet34"])
def test_torchvision_weights_give_torchvisions_feature_maps_from_pth_and_safetensors(arch, tmp_path):
    torch = _torch()
    module, state_dict = _reference(arch)
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    want = _torch_stages(arch, module, x)
    assert [w.shape[1] for w in want] == ([64, 32, 16, 8, 4] if arch == "vgg11" else [32, 16, 8, 4, 2])
    encoder = encoders.ENCODERS[arch]()
    apply = jax.jit(functools.partial(encoder.apply, train=False))
    for path in (str(tmp_path / f"{arch}.pth"), str(tmp_path / f"{arch}.safetensors")):
        _save(state_dict, path)
        variables = pretrained.encoder_variables(path, arch)
        got = apply({k: v for k, v in variables.items() if v}, x.numpy().transpose(0, 2, 3, 1))
        assert len(got) == len(want) == 5
        for stage, (g, w) in enumerate(zip(got, want), start=1):
            scale = float(np.abs(w).max())
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-4 * scale,
                                       err_msg=f"{path}: stage {stage}")


@pytest.mark.parametrize("encoder", ["vgg11", "resnet34"])
def test_the_unets_feed_their_encoder_imagenet_normalised_images(encoder):
    x = np.random.default_rng(0).random((1, 32, 32, 3), np.float32)
    model = unet.from_config(_config(encoder, depth=1).model)

    def encoder_input(x):
        seen = []

        def grab(call, args, kwargs, context):
            if context.module.name == "encoder" and context.method_name == "__call__":
                seen.append(args[0])
            return call(*args, **kwargs)
        with nn.intercept_methods(grab):
            model.init(jax.random.PRNGKey(0), x)
        return seen[0]
    want = (x - np.array(encoders.IMAGENET_MEAN)) / np.array(encoders.IMAGENET_STD)
    np.testing.assert_allclose(jax.jit(encoder_input)(x), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the cache

def test_the_converted_tree_is_cached_once_and_reused_until_the_source_changes(tmp_path, monkeypatch):
    path = _save(_numpy_state_dict("resnet34"), str(tmp_path / "r34.safetensors"))
    first = pretrained.encoder_variables(path, "resnet34")
    cache = pretrained.cache_path(path, "resnet34")
    assert os.path.basename(cache) == "r34.safetensors.resnet34.flax.npz" and os.path.isfile(cache)
    written = os.stat(cache).st_mtime_ns
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]

    def no_reading(p):
        raise AssertionError(f"read {p} again instead of the cache")
    monkeypatch.setattr(pretrained, "load_state_dict", no_reading)
    again = pretrained.encoder_variables(path, "resnet34")
    assert os.stat(cache).st_mtime_ns == written
    jax.tree.map(np.testing.assert_array_equal, again, first)
    assert again["params"]["layer2_0"]["downsample_0"]["kernel"].shape == (1, 1, 64, 128)
    assert again["batch_stats"]["bn1"]["var"].shape == (64,)

    monkeypatch.undo()
    newer = os.stat(path).st_mtime + 10
    os.utime(path, (newer, newer))  # the source changed after the cache was written: convert again
    pretrained.encoder_variables(path, "resnet34")
    assert os.stat(cache).st_mtime_ns != written


def test_a_safetensors_file_needs_no_torch_and_a_pth_names_the_install(tmp_path, monkeypatch):
    state_dict = _numpy_state_dict("vgg11")
    path = _save(state_dict, str(tmp_path / "vgg11.safetensors"))
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    variables = pretrained.encoder_variables(path, "vgg11")
    np.testing.assert_array_equal(variables["params"]["stage3"]["features_8"]["kernel"],
                                  state_dict["features.8.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["params"]["stage1"]["features_0"]["bias"], state_dict["features.0.bias"])
    assert variables["batch_stats"] == {}
    pth = tmp_path / "vgg11.pth"
    pth.write_bytes(b"not read")
    with pytest.raises(pretrained.PretrainedError) as e:
        pretrained.encoder_variables(str(pth), "vgg11")
    assert "needs PyTorch" in str(e.value) and "pip install torch==2.13.0" in str(e.value)


# ---------------------------------------------------------------------------------------------- wrong files

def _error(path, arch) -> str:
    with pytest.raises(pretrained.PretrainedError) as e:
        pretrained.encoder_variables(path, arch)
    message = str(e.value)
    assert "\n" not in message and isinstance(e.value, cli.user_errors())  # the CLIs print it as one line
    return message


def test_a_resnet18_for_resnet34_is_named_by_its_first_missing_key(tmp_path):
    _torch()
    tv = _torchvision()
    resnet18 = tv.models.resnet18(weights=None) if tv else _resnet_twin((2, 2, 2, 2))
    path = _save(resnet18.state_dict(), str(tmp_path / "resnet18.pth"))
    assert _error(path, "resnet34") == (f"{path}: key layer1.2.conv1.weight missing "
                                        "(not a torchvision resnet34 state dict)")


def test_truncated_misshapen_or_foreign_files_are_named_by_their_first_misfit(tmp_path):
    truncated = _save(_numpy_state_dict("resnet34", drop=("layer4.1",)), str(tmp_path / "cut.safetensors"))
    assert _error(truncated, "resnet34") == (f"{truncated}: key layer4.1.conv1.weight missing "
                                             "(not a torchvision resnet34 state dict)")
    state_dict = _numpy_state_dict("resnet34")
    state_dict["layer1.0.conv1.weight"] = np.zeros((64, 64, 1, 1), np.float32)  # resnet50's bottleneck 1×1
    misshapen = _save(state_dict, str(tmp_path / "r50.safetensors"))
    assert _error(misshapen, "resnet34") == (f"{misshapen}: key layer1.0.conv1.weight has shape (64, 64, 1, 1), "
                                             "expected (64, 64, 3, 3) (not a torchvision resnet34 state dict)")
    assert _error(misshapen, "vgg11") == (f"{misshapen}: key features.0.weight missing "
                                          "(not a torchvision vgg11 state dict)")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 16)
    assert _error(str(garbage), "vgg11").startswith(f"{garbage}: not a readable safetensors file")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".npz")], "nothing is cached from a bad file"


def test_a_missing_file_is_one_line_naming_it(tmp_path):
    path = str(tmp_path / "nowhere" / "resnet34-b627a593.pth")
    assert _error(path, "resnet34").startswith(f"model.pretrained {path}: no such file")


# ---------------------------------------------------------------------------------------------- the U-Nets

def _config(encoder, **model):
    c = default.get_config()
    c.image_size, c.batch_size, c.warmup_steps = SIZE, 4, 1
    c.model.encoder, c.model.features = encoder, 4
    for key, value in model.items():
        c.model[key] = value
    return c


def _batch(n=4):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, *SIZE, 3), dtype=np.uint8)
    return {"image": images, "mask": (images.mean(-1) > 127).astype(np.uint8)}


# depth 1 keeps the compilation short; deeper models are traced above and resnet34's blocks train end to end below
@pytest.mark.parametrize("encoder,depth", [("vgg11", 1), ("resnet34", 1)])
def test_each_encoder_unet_trains_one_real_step(encoder, depth, tmp_path):
    config = _config(encoder, depth=depth)
    validate_config(config)
    model = unet.from_config(config.model)
    assert isinstance(model, encoders.TernausNet11 if encoder == "vgg11" else encoders.ResNet34UNet)
    weights = pretrained.encoder_variables(
        _save(_numpy_state_dict(encoder), str(tmp_path / f"{encoder}.safetensors")), encoder)
    state = create_train_state(jax.random.PRNGKey(0), model, optim.create_optimizer(config), SIZE,
                               encoder_weights=weights)
    def first_conv(tree):
        return tree["stage1"]["features_0"] if encoder == "vgg11" else tree["conv1"]
    np.testing.assert_array_equal(first_conv(state.params["encoder"])["kernel"],
                                  first_conv(weights["params"])["kernel"])
    if encoder == "resnet34":  # depth 1 uses the stem only
        assert sorted(state.params["encoder"]) == ["bn1", "conv1"]
        np.testing.assert_array_equal(state.batch_stats["encoder"]["bn1"]["var"], weights["batch_stats"]["bn1"]["var"])
    logits = jax.eval_shape(model.apply, state.variables, jax.ShapeDtypeStruct((2, *SIZE, 3), np.float32))
    assert logits.shape == (2, *SIZE) and logits.dtype == np.float32

    mesh = parallel.make_mesh(2)
    step = parallel.data_parallel(functools.partial(steps.train_step, loss_fn=losses.get(config.loss),
                                                    schedule=optim.learning_rate_schedule(config)), mesh)
    state, metrics = step(parallel.replicate(state, mesh), parallel.shard_batch(_batch(), mesh))
    assert np.isfinite(float(metrics["loss"])) and int(jax.device_get(state.update_step)) == 1


def _shapes(encoder, **model):
    """The variables' shapes and the logits' of the U-Net on ``encoder``, traced, not run."""
    net = unet.from_config(_config(encoder, **model).model)
    x = jax.ShapeDtypeStruct((1, *SIZE, 3), np.float32)
    variables = jax.eval_shape(net.init, jax.random.PRNGKey(0), x)
    return variables, jax.eval_shape(net.apply, variables, x)


@pytest.mark.parametrize("encoder", ["vgg11", "resnet34"])
def test_depth_features_dtype_and_remat_are_honoured(encoder):
    full, logits = _shapes(encoder, depth=5, features=32)
    stages = [k for k in full["params"]["encoder"] if k.startswith(("stage", "layer"))]
    assert len(stages) == (5 if encoder == "vgg11" else 16)  # vgg11's five stages; resnet34's 3+4+6+3 blocks
    assert logits.shape == (1, *SIZE) and logits.dtype == np.float32
    if encoder == "vgg11":  # TernausNet11's decoder: (middle, output) widths 512→256, .., 128→32, then 32
        widths = {name: [leaf.shape[-1] for leaf in jax.tree.leaves(full["params"][name]) if leaf.ndim == 4]
                  for name in ("centre", "dec5", "dec4", "dec3", "dec2", "dec1")}
        assert widths == {"centre": [512, 256], "dec5": [512, 256], "dec4": [512, 128], "dec3": [256, 64],
                          "dec2": [128, 32], "dec1": [32]}
    else:  # the U-Net decoder: features * 2**level at H/2**level
        assert [full["params"][f"up{level}"]["ConvNormReLU_0"]["Conv_0"]["kernel"].shape[-1]
                for level in range(5)] == [32, 64, 128, 256, 512]
    shallow, _ = _shapes(encoder, depth=2)
    stages = [k for k in shallow["params"]["encoder"] if k.startswith(("stage", "layer"))]
    assert stages == (["stage1", "stage2"] if encoder == "vgg11" else ["layer1_0", "layer1_1", "layer1_2"])
    remat, _ = _shapes(encoder, depth=2, remat=True)
    assert jax.tree.structure(remat) == jax.tree.structure(shallow)  # a checkpoint fits either way
    bf16, out = _shapes(encoder, depth=2, dtype="bfloat16")
    assert jax.tree.map(lambda v: v.dtype, bf16) == jax.tree.map(lambda v: v.dtype, shallow)  # float32 params
    assert out.dtype == np.float32


def test_configs_are_checked_and_old_ones_mean_the_plain_unet():
    for encoder, changes, words in (("resnet34", {"depth": 6}, "model.depth must be 1..5"),
                                    ("vgg11", {"block": "dense"}, "model.block='dense' does not apply"),
                                    ("unet", {"pretrained": "r34.pth"}, "needs a pretrained encoder"),
                                    ("resnet50", {}, "model.encoder must be one of unet, vgg11, resnet34")):
        config = _config(encoder, **changes)
        config.image_size = (128, 128)
        with pytest.raises(ConfigError, match=words):
            validate_config(config)
    old = default.get_config()
    del old.model["encoder"], old.model["pretrained"]
    assert isinstance(unet.from_config(old.model), unet.UNet)
    current = default.get_config()
    current.model.pretrained = "weights/elsewhere.pth"  # where a fresh run's encoder came from: resuming ignores it
    assert model_mismatch(old, current) == []
    current.model.encoder = "resnet34"
    assert model_mismatch(old, current) == ["model.encoder: 'unet' vs 'resnet34'"]
    assert memory.estimate(_config("resnet34"), 1).summary() == \
        "memory estimate: not counted for encoder resnet34 (only the plain U-Net's is)"


@pytest.mark.slow
def test_a_fresh_run_starts_from_the_pretrained_encoder_and_a_resumed_one_reads_no_file(tiny_config, tmp_path,
                                                                                      monkeypatch):
    from carvana_jax import train
    config = tiny_config
    config.model.encoder, config.model.depth, config.val_fraction = "resnet34", 2, 0.0
    config.num_train_steps, config.learning_rate = 1, 0.0  # Adam's first update is 0: the params stay as loaded
    config.model.pretrained = _save(_numpy_state_dict("resnet34"), str(tmp_path / "r34.safetensors"))
    weights = pretrained.encoder_variables(config.model.pretrained, "resnet34")
    workdir = str(tmp_path / "run")
    params = jax.device_get(train.train_and_evaluate(config, workdir, progress=False)["state"].params)
    jax.tree.map(np.testing.assert_array_equal, params["encoder"],
                 {k: v for k, v in weights["params"].items() if k in params["encoder"]})

    def no_loading(*args):
        raise AssertionError("a resumed run loaded the pretrained weights again")
    monkeypatch.setattr(pretrained, "encoder_variables", no_loading)
    config.model.pretrained = str(tmp_path / "moved" / "r34.safetensors")  # only a fresh start reads it
    resumed = train.train_and_evaluate(config, workdir, progress=False)  # restores update 1, the last one
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["state"].params), params)
