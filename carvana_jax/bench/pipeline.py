"""``python -m carvana_jax.bench pipeline``: throughput of the training input pipeline.

On the same photos, in one run (so all figures see the same machine load):

- **pipeline**: ``pipeline.train_dataset`` as training builds it (augmentation on, the config's
  ranges), images/s over ``batches`` batches after one untimed warm-up batch (worker start-up);
- **decode-only limit**: the same grain graph (same shuffle, workers, batching) whose map only
  decodes the JPEG at the scale the pipeline uses and the mask the way the pipeline does, and
  returns nothing big: what the pipeline would deliver if warping, jitter and moving the pixels
  between processes cost nothing;
- **baseline**: a straightforward pipeline through the same grain graph: full-resolution PIL
  decode, PIL resize to the target, then a separate PIL affine transform for the image and for the
  mask (same augmentation parameters, same colour jitter via ``ImageEnhance``), mask from the GIF;
- **stages**: each step of the pipeline timed in-process on the same photos (ms per image), and the
  alternatives the design rejected, timed alongside (PIL decode, GIF mask, old RLE decode,
  whole-image warp, float32 NumPy jitter).

Pipeline and decode-only run at 1 worker and at ``num_workers``; the baseline at 1 worker (0 when
``num_workers`` is 0: then everything runs in this process on grain's reading threads). Rates: images
delivered / wall time, batches waited for one at a time. With ``rounds`` > 1 every measurement is
repeated, interleaved, and the medians are reported. Each timed window also records the CPUs this
process and its workers kept busy, the CPUs other processes used, and the CPU time the hypervisor
stole (``measurements``), so a figure taken on a busy machine says so.
"""
from __future__ import annotations

import io
import os
import statistics
import time

import cv2
import numpy as np

from carvana_jax import rle
from carvana_jax.data import augment, kaggle, pipeline
from carvana_jax.data.warp_strip import cpu_name, warp_in_strips, warp_strip

# ---------------------------------------------------------------------------------------- examples


def load_examples(config, data_dir: str | None) -> list:
    """The training examples of ``data_dir`` (the folder layout, masks from train_masks.csv when it
    lists them), or of ``config.data_source`` when no data_dir is given."""
    if data_dir:
        return kaggle.index_train(data_dir)
    if config.data_source == "folder":
        return kaggle.index_train(config.data_dir)
    from carvana_jax.data import sources  # the TFDS source (imports tensorflow_datasets)
    train, val = sources.train_and_val(config)
    return list(train) + list(val)


# ---------------------------------------------------------------------------------------- grain maps


class DecodeOnly(pipeline.grain.transforms.RandomMap):
    """The decoding the pipeline does, and nothing else: JPEG at the pipeline's DCT scale, the mask
    from the same source (RLE or GIF) at full size. Returns only the decoded sizes."""

    def __init__(self, image_size, augment_cfg):
        self.image_size = tuple(image_size)
        self.augment_cfg = augment_cfg

    def random_map(self, element, rng):
        augment.sample_params(rng, self.augment_cfg)  # same draws as PairedAugment, not used
        parts = pipeline.element_parts(element)
        image, full_hw = augment.decode_image(parts.image, self.image_size, parts.name)
        mask = parts.mask.decode(full_hw, value=255)
        return {"hw": np.array(image.shape[:2] + mask.shape, np.int32)}


def _pil_affine(matrix: np.ndarray) -> tuple:
    """PIL's ``Image.transform(AFFINE)`` data for a forward 3×3 map in pixel-centre coordinates: PIL
    wants the inverse map, in coordinates whose pixel i spans [i, i+1)."""
    centre = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1.0]])
    inverse = np.linalg.inv(centre @ matrix @ np.linalg.inv(centre))
    return tuple(inverse[:2].reshape(-1))


def baseline_pair(image_src, mask_src, dst_hw, p: augment.AugmentParams):
    """The straightforward way: full-resolution PIL decode, PIL resize to dst_hw, then one PIL affine
    transform for the image (bilinear) and one for the mask (nearest), PIL colour enhancers."""
    from PIL import Image, ImageEnhance
    h, w = dst_hw
    with Image.open(image_src if isinstance(image_src, str) else io.BytesIO(image_src)) as im:
        photo = im.convert("RGB")
    full_hw = (photo.height, photo.width)
    # The augmentation in the resized image's pixels: resize ∘ augment ∘ resize⁻¹.
    r = augment.resize_matrix(full_hw, dst_hw)
    data = _pil_affine(r @ augment.augment_matrix(p, full_hw) @ np.linalg.inv(r))
    photo = photo.resize((w, h), Image.BILINEAR).transform((w, h), Image.AFFINE, data, Image.BILINEAR)
    photo = ImageEnhance.Color(photo).enhance(p.saturation)
    photo = ImageEnhance.Contrast(photo).enhance(p.contrast)
    photo = ImageEnhance.Brightness(photo).enhance(p.brightness)
    with Image.open(mask_src if isinstance(mask_src, str) else io.BytesIO(mask_src)) as gif:
        mask = gif.convert("L").resize((w, h), Image.NEAREST).transform((w, h), Image.AFFINE, data, Image.NEAREST)
    return np.asarray(photo), (np.asarray(mask) > 0).view(np.uint8)


class Baseline(pipeline.grain.transforms.RandomMap):
    """``baseline_pair`` as a grain map, drawing the same parameters as PairedAugment."""

    def __init__(self, image_size, augment_cfg):
        self.image_size = tuple(image_size)
        self.augment_cfg = augment_cfg

    def random_map(self, element, rng):
        params = augment.sample_params(rng, self.augment_cfg)
        image, mask = _files(element)
        image, mask = baseline_pair(image, mask, self.image_size, params)
        return {"image": image, "mask": mask}


def _files(element):
    """(JPEG, mask GIF) of an element: paths of a Record, bytes of a TFDS example."""
    if isinstance(element, kaggle.Record):
        return element.image_path, element.mask_path
    return pipeline.as_bytes(element["image"]), pipeline.as_bytes(element["mask"])


def _dataset(examples, config, transform):
    """pipeline.train_dataset's graph with another map in place of PairedAugment."""
    ds = pipeline.grain.MapDataset.source(examples).shuffle(seed=config.seed).repeat()
    ds = pipeline.read_by_workers(ds.random_map(transform, seed=config.seed), config.num_workers, config.batch_size)
    return ds.batch(config.batch_size, drop_remainder=True)


# ---------------------------------------------------------------------------------------- timing


class CpuMeter:
    """CPU use during a window, from /proc: this process and its children (grain's workers) against the
    whole machine, so a figure taken while something else ran says so. All None off Linux."""

    def __init__(self):
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def _machine() -> tuple[int, int] | None:
        """(busy, steal) jiffies of all CPUs."""
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
        return user + nice + system + irq + softirq, steal

    @staticmethod
    def _process(pid) -> int:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            return 0

    def _own(self) -> int:
        import multiprocessing
        pids = [os.getpid()] + [p.pid for p in multiprocessing.active_children()]
        return sum(self._process(pid) for pid in pids)

    def start(self) -> None:
        self._t, self._m, self._o = time.perf_counter(), self._machine(), self._own()

    def stop(self) -> dict:
        """{'own_cpus', 'other_cpus', 'steal_cpus'}: average CPUs busy over the window."""
        wall, m, own = time.perf_counter() - self._t, self._machine(), self._own()
        if m is None or self._m is None or wall <= 0:
            return {"own_cpus": None, "other_cpus": None, "steal_cpus": None}
        scale = 1.0 / (self._tick * wall)
        own_cpus = (own - self._o) * scale
        return {"own_cpus": own_cpus, "other_cpus": max(0.0, (m[0] - self._m[0]) * scale - own_cpus),
                "steal_cpus": (m[1] - self._m[1]) * scale}


def time_batches(ds, batches: int, keep: int = 0) -> tuple[float, list, dict]:
    """(images/s over ``batches`` batches after one untimed warm-up batch, the first ``keep`` timed
    batches, CpuMeter's figures for the timed window)."""
    it = iter(ds)
    meter = CpuMeter()
    try:
        next(it)  # warm-up: worker start-up, first file reads
        kept, images = [], 0
        meter.start()
        start = time.perf_counter()
        for i in range(batches):
            batch = next(it)
            images += len(next(iter(batch.values())))
            if i < keep:
                kept.append(batch)
        elapsed = time.perf_counter() - start
        load = meter.stop()
    finally:
        if hasattr(it, "close"):
            it.close()
    return images / elapsed, kept, load


def _best_ms(fn, items, repeats: int) -> float:
    """Milliseconds per item of ``fn`` over ``items``: the best of ``repeats`` passes (the least
    disturbed by other load on the machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - start) / len(items))
    return best * 1e3


def _old_rle_decode(text: str, shape) -> np.ndarray:
    """The former rle.decode, kept as a baseline: run ends marked with np.add.at, then a cumulative sum."""
    starts, lengths = rle.parse(text)
    size = shape[0] * shape[1]
    delta = np.zeros(size + 1, np.int32)
    np.add.at(delta, starts - 1, 1)
    np.add.at(delta, starts - 1 + lengths, -1)
    return (np.cumsum(delta[:-1]) > 0).astype(np.uint8).reshape(shape)


def _pil_decode(data: bytes, target_hw) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (target_hw[1], target_hw[0]))
        return np.asarray(im.convert("RGB"))


def _numpy_jitter(image: np.ndarray, p: augment.AugmentParams) -> np.ndarray:
    """The former float32 NumPy jitter, kept as a baseline (same formula, truncating)."""
    x = image.astype(np.float32)
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = grey[..., None] + p.saturation * (x - grey[..., None])
    x = (x - grey.mean()) * p.contrast + grey.mean() * p.brightness
    return np.clip(x, 0, 255).astype(np.uint8)


def _whole_warp(array, matrix, dst_hw):
    return cv2.warpAffine(array, matrix[:2], (dst_hw[1], dst_hw[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def stage_times(examples, config, photos: int = 12, repeats: int = 3) -> dict:
    """ms per image of each step of PairedAugment on the first ``photos`` examples (same parameters as
    the pipeline would draw for a fresh rng), and of the rejected alternatives."""
    hw = tuple(config.image_size)
    rng = np.random.default_rng(config.seed)
    items = []
    for element in examples[:photos]:
        parts = pipeline.element_parts(element)
        items.append({"parts": parts, "params": augment.sample_params(rng, config.augment)})
    if any(it["parts"].mask is None for it in items):
        raise kaggle.DataError("the pipeline benchmark needs training examples with masks")

    stages: dict[str, float] = {}
    stages["read"] = _best_ms(lambda it: it.__setitem__("data", augment.read_bytes(it["parts"].image)), items, 1)
    stages["decode_image"] = _best_ms(
        lambda it: it.update(zip(("photo", "full_hw"), augment.decode_image(it["data"], hw))), items, repeats)
    stages["decode_mask"] = _best_ms(
        lambda it: it.__setitem__("mask255", it["parts"].mask.decode(it["full_hw"], value=255)), items, repeats)
    stages["matrix"] = _best_ms(lambda it: it.update(
        matrix=augment.composed_matrix(it["params"], it["full_hw"], it["photo"].shape[:2], hw),
        mask_matrix=augment.composed_matrix(it["params"], it["full_hw"], it["full_hw"], hw)), items, repeats)
    stages["warp_image"] = _best_ms(
        lambda it: it.__setitem__("image", augment.warp(it["photo"], it["matrix"], hw)), items, repeats)
    stages["warp_mask"] = _best_ms(
        lambda it: it.__setitem__("mask", augment._warp_mask255(it["mask255"], it["mask_matrix"], hw)), items, repeats)
    stages["jitter"] = _best_ms(lambda it: augment.jitter_colour(it["image"], it["params"]), items, repeats)
    batch = config.batch_size
    groups = [items[i:i + batch] for i in range(0, len(items) - batch + 1, batch)] or [items]
    stages["batch"] = _best_ms(lambda g: (np.stack([it["image"] for it in g]), np.stack([it["mask"] for it in g])),
                               groups, repeats) * len(groups) / sum(map(len, groups))

    alternatives: dict[str, float] = {}
    alternatives["decode_image_pil"] = _best_ms(lambda it: _pil_decode(it["data"], hw), items, repeats)
    gif_items = [it for it in items if it["parts"].mask.file is not None]
    if gif_items:
        alternatives["decode_mask_gif"] = _best_ms(
            lambda it: augment.decode_mask(it["parts"].mask.file), gif_items, repeats)
    rle_items = [it for it in items if it["parts"].mask.rle is not None]
    if rle_items:
        alternatives["decode_mask_rle_old"] = _best_ms(
            lambda it: _old_rle_decode(it["parts"].mask.rle, it["full_hw"]), rle_items, repeats)
    alternatives["warp_image_whole"] = _best_ms(lambda it: _whole_warp(it["photo"], it["matrix"], hw), items, repeats)
    alternatives["warp_mask_whole"] = _best_ms(
        lambda it: _whole_warp(it["mask255"], it["mask_matrix"], hw), items, repeats)
    for strip in (64, 128):
        alternatives[f"warp_image_strips{strip}"] = _best_ms(lambda it, strip=strip: warp_in_strips(
            it["photo"], it["matrix"], hw, np.empty_like(it["image"]), cv2.BORDER_REPLICATE, strip), items, repeats)
    alternatives["jitter_numpy"] = _best_ms(lambda it: _numpy_jitter(it["image"], it["params"]), items, repeats)
    first = items[0]
    return {"stages_ms": stages, "stage_sum_ms": sum(stages.values()), "alternatives_ms": alternatives,
            "full_hw": list(first["full_hw"]), "decoded_hw": list(first["photo"].shape[:2]),
            "dct_scale": augment.dct_scale(first["full_hw"], hw),
            "mask_source": "rle" if first["parts"].mask.rle is not None else "gif",
            "warp_strip": {"image": warp_strip(first["photo"].shape, hw),
                           "mask": warp_strip(first["mask255"].shape, hw)},
            "stage_photos": len(items)}


# ---------------------------------------------------------------------------------------- the benchmark


def _with(config, **changes):
    c = config.copy_and_resolve_references()
    c.unlock()
    for key, value in changes.items():
        c[key] = value
    return c


def bench_pipeline(config, *, data_dir: str | None, image_size, num_workers: int, batches: int,
                   batch_size: int | None = None, dump: str | None = None, rounds: int = 1,
                   baseline: bool = True, stage_photos: int = 12) -> dict:
    """Everything in the module doc, as one dict (JSON-ready)."""
    import grain
    import PIL

    examples = load_examples(config, data_dir)
    if not examples:
        raise kaggle.DataError(f"no training examples in {data_dir or config.data_dir}")
    batch_size = batch_size or config.batch_size
    config = _with(config, image_size=tuple(image_size), batch_size=batch_size)
    config.augment.enabled = True
    base = 1 if num_workers >= 1 else 0
    worker_counts = sorted({base, num_workers})

    result = {"benchmark": "pipeline", "data_dir": data_dir or config.data_dir, "examples": len(examples),
              "image_size": list(config.image_size), "batch_size": batch_size, "num_workers": num_workers,
              "batches": batches, "rounds": rounds, "seed": config.seed,
              "augment": {k: config.augment[k] for k in config.augment},
              "cpu": cpu_name(), "cpu_count": os.cpu_count(),
              "versions": {"opencv": cv2.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
                           "grain": getattr(grain, "__version__", "?")}}
    result.update(stage_times(examples, config, photos=stage_photos))

    runs: dict[str, dict[int, list[float]]] = {"pipeline": {}, "decode_only": {}, "baseline": {}}
    loads: list[dict] = []
    kept: list = []

    def measure(what, workers, ds, keep=0):
        rate, got, load = time_batches(ds, batches, keep)
        runs[what].setdefault(workers, []).append(rate)
        loads.append({"what": what, "workers": workers, "images_per_sec": rate, **load})
        return got

    for _ in range(rounds):  # interleaved, so a burst of load on the machine hits every variant alike
        for workers in worker_counts:
            c = _with(config, num_workers=workers)
            got = measure("pipeline", workers, pipeline.train_dataset(examples, c), 4 if dump and not kept else 0)
            kept = kept or got
            measure("decode_only", workers, _dataset(examples, c, DecodeOnly(c.image_size, c.augment)))
        if baseline:
            c = _with(config, num_workers=base)
            measure("baseline", base, _dataset(examples, c, Baseline(c.image_size, c.augment)))

    rates = {what: {str(w): statistics.median(v) for w, v in by.items()} for what, by in runs.items() if by}
    result["images_per_sec"] = rates
    result["measurements"] = loads  # every timed window: its rate and the CPUs busy (ours, others', stolen)
    others = [m["other_cpus"] for m in loads if m["other_cpus"] is not None]
    result["max_other_cpus"] = max(others) if others else None
    n, b = str(num_workers), str(base)
    result["pipeline_over_decode_only"] = {w: rates["pipeline"][w] / rates["decode_only"][w] for w in rates["pipeline"]}
    if num_workers > base:
        result["scaling_over_1_worker"] = rates["pipeline"][n] / rates["pipeline"][b]
        result["decode_only_scaling_over_1_worker"] = rates["decode_only"][n] / rates["decode_only"][b]
    if baseline:
        result["pipeline_over_baseline"] = rates["pipeline"][b] / rates["baseline"][b]
    if dump:
        images = np.concatenate([k["image"] for k in kept])
        masks = np.concatenate([k["mask"] for k in kept])
        os.makedirs(os.path.dirname(os.path.abspath(dump)), exist_ok=True)
        np.savez(dump, image=images, mask=masks)
        result["dump"] = {"path": dump, "images": len(images)}
    return result


def print_table(r: dict) -> None:
    h, w = r["image_size"]
    print(f"input pipeline: {r['examples']} photos of {r['full_hw'][1]}x{r['full_hw'][0]} from {r['data_dir']} "
          f"-> {h}x{w}, batch {r['batch_size']}, {r['batches']} timed batches x {r['rounds']} round(s)")
    print(f"JPEG decoded at 1/{r['dct_scale']} scale ({r['decoded_hw'][1]}x{r['decoded_hw'][0]}); "
          f"mask from {r['mask_source'].upper()}; CPU: {r['cpu']} ({r['cpu_count']} CPUs)")
    rates = r["images_per_sec"]
    print(f"\n{'':34s} " + " ".join(f"{w + ' worker' + ('s' if w != '1' else ''):>10s}"
                                    for w in rates["pipeline"]))
    labels = {"pipeline": "pipeline (augmented), images/s", "decode_only": "decode-only limit, images/s",
              "baseline": "straightforward PIL, images/s"}
    for what, by in rates.items():
        print(f"{labels[what]:34s} " + " ".join(f"{by.get(w, float('nan')):10.1f}" for w in rates["pipeline"]))
    print(f"{'pipeline / decode-only':34s} " + " ".join(f"{v:9.2f}x" for v in r["pipeline_over_decode_only"].values()))
    if "scaling_over_1_worker" in r:
        print(f"{r['num_workers']} workers / 1 worker: pipeline {r['scaling_over_1_worker']:.2f}x, "
              f"decode-only {r['decode_only_scaling_over_1_worker']:.2f}x")
    if "pipeline_over_baseline" in r:
        print(f"pipeline / straightforward baseline (same workers): {r['pipeline_over_baseline']:.2f}x")
    if r.get("max_other_cpus") is not None:
        steal = max(m["steal_cpus"] for m in r["measurements"])
        print(f"other load while timing: up to {r['max_other_cpus']:.2f} CPUs busy with other processes, "
              f"up to {steal:.2f} stolen by the host" + ("  (figures disturbed)" if r["max_other_cpus"] > 0.2 else ""))
    chosen = {what: f"in strips of {strip} columns" if strip else "whole" for what, strip in r["warp_strip"].items()}
    print(f"\nstages, in-process, ms per image (best of 3 passes over {r['stage_photos']} photos; this CPU's "
          f"choice of warps: the image {chosen['image']}, the mask {chosen['mask']}):")
    for name, ms in r["stages_ms"].items():
        print(f"  {name:14s} {ms:7.2f}")
    print(f"  {'sum':14s} {r['stage_sum_ms']:7.2f}")
    print("alternatives (not used), ms per image:")
    for name, ms in r["alternatives_ms"].items():
        print(f"  {name:20s} {ms:7.2f}")
    if "dump" in r:
        print(f"\nwrote {r['dump']['images']} augmented images and masks to {r['dump']['path']}")


def parse_image_size(text: str) -> tuple[int, int]:
    """'H,W' (or 'HxW', or one number for a square) → (H, W)."""
    parts = text.strip().replace("x", ",").split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise ValueError(f"--image_size must be H,W with positive integers, got {text!r}")
    return values
