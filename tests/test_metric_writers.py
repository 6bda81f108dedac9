"""The metric-writer seam: TensorBoard event files (read back here by their own record format, not by the writer)
hold what metrics.jsonl holds, plus the validation overlays and the config; a profiler trace of chosen updates on
request; a device out-of-memory error explained in one line."""
import glob
import json
import os
import struct

import cv2
import jax
import numpy as np
import pytest
from helpers import shared_model
from tensorboardX.proto import event_pb2

from carvana_jax import memory, metric_writers, profiling, train
from carvana_jax.errors import ConfigError


def read_events(logdir) -> list:
    """Every Event of the event files in ``logdir``: TFRecord framing (length, its CRC, data, its CRC)."""
    events = []
    for path in sorted(glob.glob(os.path.join(str(logdir), "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
            at += 12 + length + 4
    return events


def scalars_of(events) -> dict:
    """{(tag, step): value} of the scalar summaries."""
    return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value if v.HasField("simple_value")}


def images_of(events) -> dict:
    """{(tag, step): RGB array} of the image summaries."""
    out = {}
    for e in events:
        for v in e.summary.value:
            if v.HasField("image"):
                bgr = cv2.imdecode(np.frombuffer(v.image.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
                out[(v.tag, e.step)] = bgr[..., ::-1]
    return out


def test_tensorboard_events_hold_the_scalars_images_and_config_written(tmp_path):
    writer = metric_writers.TensorBoardWriter(str(tmp_path))
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    writer.write_hparams({"model.features": 8, "loss": "bce_dice"})
    writer.write_scalars(3, {"loss": 0.5, "val_dice": 0.98, "images_per_sec": 12.5})
    writer.write_images(3, {"val/overlays": image})
    writer.close()
    events = read_events(tmp_path)
    assert scalars_of(events) == {("train/loss", 3): 0.5, ("val/val_dice", 3): pytest.approx(0.98),
                                  ("system/images_per_sec", 3): 12.5}
    np.testing.assert_array_equal(images_of(events)[("val/overlays", 3)], image)  # PNG: lossless
    texts = [v.tensor.string_val[0].decode() for e in events for v in e.summary.value if v.tag.startswith("config")]
    assert texts and "model.features = 8" in texts[0] and "loss = bce_dice" in texts[0]


def test_the_jsonl_writer_appends_one_row_per_call(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    for step in (1, 2):
        metric_writers.JsonlWriter(path).write_scalars(step, {"loss": step / 10})
    with open(path) as f:
        assert [json.loads(line) for line in f] == [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}]


def test_flat_hparams_name_nested_keys_with_dots():
    assert metric_writers.flat_hparams({"a": 1, "m": {"w": (8, 16), "d": "x"}, "f": True}) == {
        "a": 1, "m.w": "[8, 16]", "m.d": "x", "f": True}


def test_a_training_run_writes_to_tensorboard_what_metrics_jsonl_holds(tiny_config, tmp_path):
    config = shared_model(tiny_config)  # 4 updates, each logged, validated at 2 and 4
    config.profile_steps = "1:3"
    workdir = tmp_path / "w"
    train.train_and_evaluate(config, str(workdir), progress=False)
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    events = read_events(metric_writers.tensorboard_dir(str(workdir)))
    logged = {(tag.split("/", 1)[1], step): value for (tag, step), value in scalars_of(events).items()}
    expected = {(k, r["step"]): v for r in rows for k, v in r.items() if k != "step"}
    assert logged.keys() == expected.keys() and {k for k, _ in expected} >= {"loss", "dice", "learning_rate",
                                                                             "images_per_sec", "val_dice"}
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6), key  # float32 in the events
    overlays = images_of(events)
    assert sorted(overlays) == [("val/overlays", 2), ("val/overlays", 4)]
    drawn = cv2.imread(str(workdir / "plots" / "overlays.png"))[..., ::-1]
    np.testing.assert_array_equal(overlays[("val/overlays", 4)], drawn)  # the latest picture is the plot's
    assert glob.glob(str(workdir / "profile" / "plugins" / "profile" / "*" / "*.trace.json.gz"))


@pytest.mark.parametrize("window", ["3:1", "2", "a:b", "-1:2"])
def test_a_bad_profile_window_is_refused_by_name(window):
    with pytest.raises(ConfigError, match="profile_steps"):
        profiling.parse_window(window)


def test_a_device_out_of_memory_becomes_one_line_with_the_estimate_and_the_switches(tiny_config):
    with pytest.raises(memory.DeviceOutOfMemory) as told:
        with memory.out_of_memory_explained(tiny_config, 1):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")
    message = str(told.value)
    assert "\n" not in message and memory.estimate(tiny_config, 1).summary() in message
    assert all(s in message for s in ("model.dtype=bfloat16", "model.remat=true", "grad_accum_steps"))
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):  # any other device error is left as it is
        with memory.out_of_memory_explained(tiny_config, 1):
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")
