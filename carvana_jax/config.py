"""Checks of a config's values, so a bad one fails at start-up with the key named."""
from __future__ import annotations

from carvana_jax import losses
from carvana_jax.errors import ConfigError


def validate_config(config) -> None:
    s2d = config.model.get("space_to_depth", 1)
    if not isinstance(s2d, int) or s2d < 1:
        raise ConfigError(f"model.space_to_depth must be a positive integer, got {s2d!r}")
    _check_size("image_size", tuple(config.image_size), 2 ** config.model.depth * s2d)
    for key in ("batch_size", "grad_accum_steps", "num_train_steps", "checkpoint_every", "eval_every", "log_every",
                "eval_batch_size", "model.features", "model.depth"):
        value = config
        for part in key.split("."):
            value = value[part]
        if value < 1:
            raise ConfigError(f"{key} must be ≥ 1, got {value}")
    widths = tuple(config.model.get("widths", ()))
    if widths and (len(widths) != config.model.depth + 1 or not all(isinstance(v, int) and v > 0 for v in widths)):
        raise ConfigError(f"model.widths must be {config.model.depth + 1} positive integers (the blocks' widths at "
                          f"levels 0..{config.model.depth}, the centre last), or () to double model.features per "
                          f"level; got {widths}")
    if widths and config.model.get("encoder", "unet") != "unet":
        raise ConfigError("model.widths is for model.encoder=unet (a pretrained encoder has its own widths)")
    choices = {"loss": tuple(losses.LOSSES), "model.norm": ("batch", "none"),
               "model.block": ("double_conv", "dense"), "model.dtype": ("float32", "bfloat16"),
               "model.encoder": ("unet", "vgg11", "resnet34"),
               "optimizer": ("adam", "adamw", "rmsprop"), "data_source": ("folder", "tfds")}
    for key, allowed in choices.items():
        value = config
        for part in key.split("."):
            value = value[part]
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
    _validate_encoder(config.model)
    _validate_coarse(config, 2 ** config.model.depth * s2d)
    _validate_val_cars(config)
    _validate_pseudo_labels(config)
    _validate_prediction(config)


def _check_size(key: str, size: tuple, step: int, limit: tuple | None = None) -> None:
    """(H, W): two positive integers, each divisible by ``step`` (the U-Net halves it depth times) and at most
    ``limit``'s."""
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ConfigError(f"{key} must be two positive integers (H, W), got {size!r}")
    if limit is not None and any(v > m for v, m in zip(size, limit)):
        raise ConfigError(f"{key} {size} must be no larger than image_size {limit}")
    h, w = size
    if h % step or w % step:
        raise ConfigError(f"{key} {h}x{w} must be divisible by 2**model.depth * model.space_to_depth = {step}")


def _validate_coarse(config, step: int) -> None:
    coarse_steps = config.get("coarse_steps", 0)
    if coarse_steps == 0:
        return
    if not 0 < coarse_steps < config.num_train_steps:
        raise ConfigError(f"coarse_steps must be 0 (off) or 1..num_train_steps-1 = {config.num_train_steps - 1}, "
                          f"got {coarse_steps}")
    _check_size("coarse_image_size", tuple(config.get("coarse_image_size", ())), step, tuple(config.image_size))


def _validate_val_cars(config) -> None:
    val_cars = config.get("val_cars", ())
    if isinstance(val_cars, str) or not all(isinstance(car, str) and car for car in val_cars):
        raise ConfigError(f"val_cars must be a list of car ids (e.g. ('00087a6bd4dc', '02159e548029')), "
                          f"got {val_cars!r}")
    if val_cars and config.val_fraction > 0:
        raise ConfigError(f"val_cars and val_fraction={config.val_fraction} both choose the held-out cars; "
                          "set val_fraction=0 to hold out val_cars")


def _validate_pseudo_labels(config) -> None:
    from carvana_jax.data import pipeline  # grain and OpenCV: only when a config is checked
    path, fraction = config.get("pseudo_labels", ""), config.get("pseudo_fraction", 0.0)
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"pseudo_fraction must be in [0, 1), got {fraction}")
    if path and fraction == 0:
        raise ConfigError(f"pseudo_labels={path!r} but pseudo_fraction=0: set the share of each batch drawn from "
                          "it (e.g. --config.pseudo_fraction=0.25), or pseudo_labels='' to train without")
    if fraction > 0 and not path:
        raise ConfigError(f"pseudo_fraction={fraction} but no pseudo_labels: set --config.pseudo_labels to a "
                          "submission CSV of the test photos, or pseudo_fraction=0")
    if path:
        n = pipeline.pseudo_per_batch(fraction, config.batch_size)
        if not 0 < n < config.batch_size:
            raise ConfigError(f"pseudo_fraction={fraction} of batch_size {config.batch_size} rounds to {n} "
                              f"pseudo-labelled photos per batch; choose one giving 1 to {config.batch_size - 1} "
                              "of them")


def _validate_prediction(config) -> None:
    """fit (and, for 'pad', image_size against the 1918×1280 photo), tta and postprocess."""
    from carvana_jax import inference, postprocess, rle
    from carvana_jax.data import augment
    checks = ((augment.check_fit, (rle.FULL_SHAPE, tuple(config.image_size), config.get("fit", "resize"))),
              (inference.parse_tta, (config.get("tta", "none"),)),
              (postprocess.parse, (config.get("postprocess", "none"),)))
    for check, args in checks:
        try:
            check(*args)
        except ValueError as e:
            raise ConfigError(str(e)) from e


def _validate_encoder(model) -> None:
    """A pretrained encoder's depth is the number of its stages used (models/encoders.py)."""
    if model.encoder != "unet" and model.get("space_to_depth", 1) != 1:
        raise ConfigError(f"model.space_to_depth={model.space_to_depth} needs model.encoder=unet (a pretrained "
                          "encoder takes the photo's own pixels)")
    if model.encoder == "unet":
        if model.pretrained:
            raise ConfigError(f"model.pretrained={model.pretrained!r} needs a pretrained encoder: "
                              "set model.encoder to vgg11 or resnet34 (or model.pretrained='')")
        return
    if model.depth > 5:
        raise ConfigError(f"model.depth must be 1..5 for model.encoder={model.encoder} (the stages of its "
                          f"encoder; 5 uses them all), got {model.depth}")
    if model.encoder == "vgg11" and model.block != "double_conv":
        raise ConfigError(f"model.block={model.block!r} does not apply to model.encoder=vgg11 (TernausNet's "
                          "decoder blocks); leave it at double_conv")
