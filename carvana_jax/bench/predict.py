"""``python -m carvana_jax.bench predict``: how fast the test set turns into a submission.

Over the first ``n`` test photos, in one run (so all figures see the same machine load):

- **end to end**: ``submission.write_submission`` as ``eval --split test`` runs it (grain pipeline, devices,
  RLE thread pool, streamed CSV, all overlapped), after one untimed batch has compiled the device
  program; ``stream`` is up to the last row written, ``validate`` the check of the finished file after it;
- **stages**, each timed on its own over the same photos, one after the other:
  ``decode`` (the grain eval pipeline delivering every batch: JPEG decode and resize),
  ``device`` (host→device copy, predict, up-sample, threshold and bit-pack, waited for),
  ``transfer`` (the packed masks device→host), ``rle`` (encoding them in the same thread pool),
  ``csv`` (writing the rows, flushed and synced as the real writer does);
- **overlap**: end-to-end stream time / the slowest stage (1.0 = every other stage hidden under it);
- **RLE of one 1918×1280 mask** (a real prediction): ``rle.encode`` and ``rle.encode_packed`` against
  the straightforward numpy version (``naive_encode``), medians of ``rle_repeats`` calls, same strings;
- **per-image CPU cost on one core** (for projections to other hosts): the eval map (decode + resize)
  at the model's size and at ``cpu_size``, RLE per mask, CSV per row;
- with ``torch``, **the device stage against its PyTorch eager twin** (``torch_twin.Predictor``: the same
  checkpoint's weights, the same views, up-sampling, threshold and bit-packing), batch by batch on the same
  decoded photos, alternated, each waited for: images/s of both, their ratio and the share of mask pixels on
  which the two differ (probabilities on the threshold).

Pipeline start-up (spawning grain's worker processes: ~1.2 s each here) is inside ``decode`` and ``end to end``
alike, and reported (time to the first batch): nothing can overlap it, so it weighs on short runs.
"""
from __future__ import annotations

import concurrent.futures
import os
import platform
import statistics
import tempfile
import time

import numpy as np

from carvana_jax import parallel, predict, rle, submission
from carvana_jax.bench.pipeline import CpuMeter
from carvana_jax.data import pipeline, sources
from carvana_jax.data.warp_strip import cpu_name
from carvana_jax.errors import ConfigError

SHAPE = rle.FULL_SHAPE


class TreeCpuMeter(CpuMeter):
    """bench_pipeline.CpuMeter counting every descendant of this process, alive or ended (grain's worker
    processes are not all multiprocessing children, and they end before a stage's window closes)."""

    def _own(self) -> int:
        parents = {}
        for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        tree, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            children = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
            tree.update(children)
            frontier = children
        return sum(self._with_reaped(pid) for pid in tree)

    @staticmethod
    def _with_reaped(pid) -> int:
        """utime + stime of ``pid`` and of its children that have ended (cutime + cstime)."""
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return sum(int(x) for x in fields[11:15])
        except (OSError, ValueError, IndexError):
            return 0


def naive_encode(mask: np.ndarray) -> str:
    """The straightforward numpy RLE (the Kaggle kernels' version): pad, compare neighbours, join strings."""
    pixels = np.concatenate([[0], np.asarray(mask).reshape(-1), [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _per_item_ms(fn, items) -> float:
    """Milliseconds per item of ``fn`` over ``items``, one thread, best of two passes."""
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - start) / len(items))
    return 1e3 * best


def dispatch_packed(ensemble, host_batch: dict):
    """(the ensemble's bit-packed masks of a host batch, dispatched on the devices and not waited for; its number
    of real rows): the batch padded to the mesh and sharded, as eval feeds it."""
    batch = {k: v for k, v in host_batch.items() if k != "index"}
    padded, n = parallel.pad_to_multiple(batch, ensemble.mesh.devices.size)
    return ensemble.packed_fn(ensemble.variables, parallel.shard_batch(padded, ensemble.mesh)), n


def time_stages(ensemble, records, config, batch_size: int, num_workers: int, threads: int, names) -> dict:
    """Each stage on its own over ``records`` (see the module doc); seconds, plus what the next needs."""
    seconds = {}
    meter = TreeCpuMeter()
    meter.start()
    start = time.perf_counter()
    batches = iter(ensemble.dataset(records, config, batch_size, num_workers))
    host_batches = [next(batches)]
    first_batch_s = time.perf_counter() - start
    host_batches.extend(batches)
    batches.close()
    seconds["decode"] = time.perf_counter() - start
    load = {"decode": meter.stop()}

    meter.start()
    start = time.perf_counter()
    outputs = []
    for batch in host_batches:
        outputs.append(dispatch_packed(ensemble, batch))
    for out, _ in outputs:
        out.block_until_ready()
    seconds["device"] = time.perf_counter() - start
    load["device"] = meter.stop()

    start = time.perf_counter()
    packed = np.concatenate([parallel.to_host(out)[:n] for out, n in outputs])
    seconds["transfer"] = time.perf_counter() - start

    meter.start()
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        texts = list(pool.map(rle.encode_packed, packed, [SHAPE] * len(packed)))
    seconds["rle"] = time.perf_counter() - start
    load["rle"] = meter.stop()

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stage.csv")
        start = time.perf_counter()
        with open(path, "w", newline="") as f:
            f.write("img,rle_mask\n")
            f.writelines(f"{name},{text}\n" for name, text in zip(names, texts))
            f.flush()
            os.fsync(f.fileno())
        seconds["csv"] = time.perf_counter() - start
        with open(path, "rb") as f:
            csv_bytes = f.read()
    return {"seconds": seconds, "load": load, "packed": packed, "texts": texts, "csv_bytes": csv_bytes,
            "first_batch_s": first_batch_s}


def time_end_to_end(ensemble, records, config, batch_size: int, num_workers: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "submission.csv")
        meter = TreeCpuMeter()
        meter.start()
        stats = submission.write_submission(ensemble, records, config, out, batch_size=batch_size,
                                          num_workers=num_workers, rle_threads=threads, progress=False)
        load = meter.stop()
        with open(out, "rb") as f:
            stats["csv_bytes"] = f.read()
    stats["load"] = load
    return stats


def time_rle(mask: np.ndarray, repeats: int) -> dict:
    """One full-size mask: rle.encode, rle.encode_packed and naive_encode, checked equal."""
    packed = np.packbits(mask.reshape(-1))
    text = rle.encode(mask)
    if naive_encode(mask) != text or rle.encode_packed(packed, SHAPE) != text:
        raise AssertionError("rle.encode, rle.encode_packed and the straightforward RLE disagree")
    result = {"runs": len(text.split()) // 2,
              "encode_ms": _median_ms(lambda: rle.encode(mask), repeats),
              "naive_ms": _median_ms(lambda: naive_encode(mask), repeats),
              "encode_packed_ms": _median_ms(lambda: rle.encode_packed(packed, SHAPE), repeats)}
    result["speedup"] = result["naive_ms"] / result["encode_ms"]
    return result


def cpu_costs(ensemble, records, config, texts, packed, cpu_size) -> dict:
    """Per-image milliseconds on one core: the eval map at the model's size and at ``cpu_size``, RLE, CSV row."""
    photos = records[:16]
    model_map = pipeline.LoadForEval(ensemble.sizes[0])
    big_map = pipeline.LoadForEval(cpu_size)
    rows = [f"{i}_01.jpg,{t}\n" for i, t in enumerate(texts[:64])]
    with tempfile.TemporaryFile("w") as f:
        csv_ms = _per_item_ms(f.write, rows)
    return {"decode_resize_ms_model_size": _per_item_ms(lambda r: model_map.map_with_index(0, r), photos),
            "decode_resize_ms_cpu_size": _per_item_ms(lambda r: big_map.map_with_index(0, r), photos),
            "cpu_size": list(cpu_size),
            "rle_ms": _per_item_ms(lambda p: rle.encode_packed(p, SHAPE), packed[:64]),
            "csv_row_ms": csv_ms}


def check_torch_twin(ensemble, config) -> None:
    """ConfigError unless the torch twin can predict what ``ensemble`` does: one plain U-Net fitted by resizing,
    TTA none or hflip, no post-processing."""
    member = ensemble.members[0]
    problems = [what for what, bad in [
        (f"{len(ensemble.members)} models", len(ensemble.members) > 1),
        (f"encoder {config.model.get('encoder', 'unet')!r}", config.model.get("encoder", "unet") != "unet"),
        (f"fit {member.fit!r}", member.fit != "resize"),
        (f"tta {ensemble.tta_name!r}", set(ensemble.tta) - {"hflip"}),
        (f"postprocess {ensemble.postprocess_name!r} (pass --postprocess none)", ensemble.postprocess)] if bad]
    if problems:
        raise ConfigError("--torch: the torch twin predicts one plain U-Net ('unet' encoder, fit 'resize') with tta "
                          f"none or hflip and no post-processing; got {', '.join(problems)}")


def time_torch_twin(ensemble, records, config, batch_size: int, rounds: int) -> dict:
    """The device stage with the packed masks' copy to the host, batch by batch, against ``torch_twin.Predictor``
    on the same decoded batches, one after the other for every batch, ``rounds`` times over all of them."""
    import jax
    import torch

    from carvana_jax.bench import torch_twin
    from carvana_jax.models import unet
    threads = torch_twin.set_threads()
    twin = torch_twin.Predictor(unet.from_config(config.model), jax.device_get(ensemble.variables[0]),
                                hflip="hflip" in ensemble.tta, threshold=ensemble.threshold)
    key = ensemble.device_kw["image_keys"][0]
    batches = list(ensemble.dataset(records, config, batch_size, num_workers=0))

    def jax_stage(batch):
        packed, n = dispatch_packed(ensemble, batch)
        return parallel.to_host(packed)[:n]

    jax_stage(batches[0]), twin(batches[0][key])  # warm-up: compile, first-touch the twin's buffers
    seconds = {"jax": 0.0, "torch": 0.0}
    differing = total = 0
    for _ in range(rounds):
        for batch in batches:
            start = time.perf_counter()
            ours = jax_stage(batch)
            seconds["jax"] += time.perf_counter() - start
            start = time.perf_counter()
            theirs = twin(batch[key])
            seconds["torch"] += time.perf_counter() - start
            differing += int(np.unpackbits(ours ^ theirs).sum())
            total += ours.size * 8
    images = rounds * len(records)
    return {"jax_images_per_sec": images / seconds["jax"], "torch_images_per_sec": images / seconds["torch"],
            "jax_over_torch": seconds["torch"] / seconds["jax"], "differing_pixels": differing / total,
            "torch_version": torch.__version__, "torch_threads": threads}


def bench_predict(ckpts, *, data_dir: str | None, n: int, batch_size: int | None = None,
                  num_workers: int | None = None, rle_threads: int | None = None, tta: str = "none",
                  rounds: int = 1, rle_repeats: int = 50, cpu_size=(1024, 1024), postprocess: str | None = None,
                  torch: bool = False) -> dict:
    import jax
    mesh = parallel.make_mesh()
    config, ensemble, loaded = predict.load_ensemble(ckpts, mesh=mesh, tta=tta, postprocess=postprocess)
    if torch:
        check_torch_twin(ensemble, config)
    if data_dir:
        config.data_dir = data_dir
    records = list(sources.test_examples(config))[:n]
    names = [submission.image_name(r) for r in records]
    batch_size = batch_size or config.eval_batch_size
    workers = config.num_workers if num_workers is None else num_workers
    threads = rle_threads or max(1, min(8, os.cpu_count() or 1))

    start = time.perf_counter()  # compile the device program on one batch (untimed below)
    for _ in ensemble.packed_masks(records[:batch_size], config, batch_size, num_workers=0):
        pass
    compile_s = time.perf_counter() - start

    runs, ends = [], []
    for _ in range(rounds):  # interleaved, so both see the same machine load
        ends.append(time_end_to_end(ensemble, records, config, batch_size, workers, threads))
        runs.append(time_stages(ensemble, records, config, batch_size, workers, threads, names))
    if any(e["csv_bytes"] != runs[0]["csv_bytes"] for e in ends):
        raise AssertionError("the end-to-end CSV differs from the one the stages wrote")

    stage_s = {k: statistics.median(r["seconds"][k] for r in runs) for k in runs[0]["seconds"]}
    stream_s = statistics.median(e["stream_seconds"] for e in ends)
    validate_s = statistics.median(e["validate_seconds"] for e in ends)
    slowest = max(stage_s, key=stage_s.get)
    first = runs[0]
    mask = np.unpackbits(first["packed"][0], count=SHAPE[0] * SHAPE[1]).reshape(SHAPE)
    devices = mesh.devices.flatten()
    return {
        "benchmark": "predict",
        "checkpoints": [[path, step] for path, step in loaded],
        "image_sizes": [list(s) for s in ensemble.sizes], "models": len(ensemble.members), "tta": tta,
        "images": len(records), "batch_size": batch_size, "num_workers": workers, "rle_threads": threads,
        "rounds": rounds, "device_kind": devices[0].device_kind, "device_count": len(devices),
        "platform": devices[0].platform, "jax_version": jax.__version__, "cpu": cpu_name(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "compile_s": compile_s,
        "end_to_end_s": stream_s, "end_to_end_images_per_sec": len(records) / stream_s,
        "validate_s": validate_s,
        "stage_s": stage_s, "stage_images_per_sec": {k: len(records) / v for k, v in stage_s.items()},
        "pipeline_first_batch_s": statistics.median(r["first_batch_s"] for r in runs),
        "slowest_stage": slowest, "overlap_ratio": stream_s / stage_s[slowest],
        "measurements": {"end_to_end": [e["load"] for e in ends], "stages": [r["load"] for r in runs]},
        "per_round": [{"end_to_end_s": e["stream_seconds"], "stage_s": r["seconds"],
                       "overlap_ratio": e["stream_seconds"] / max(r["seconds"].values()),
                       "other_cpus_max": max([e["load"]["other_cpus"] or 0.0]
                                             + [x["other_cpus"] or 0.0 for x in r["load"].values()])}
                      for e, r in zip(ends, runs)],
        "rle_full_mask": time_rle(mask, rle_repeats),
        "cpu_per_image": cpu_costs(ensemble, records, config, first["texts"], first["packed"], tuple(cpu_size)),
        "postprocess": ensemble.postprocess_name,
        "torch": time_torch_twin(ensemble, records, config, batch_size, rounds) if torch else None,
    }


def print_table(r: dict) -> None:
    n = r["images"]
    sizes = ", ".join(f"{h}x{w}" for h, w in r["image_sizes"])
    print(f"predict: {r['models']} model(s) at {sizes}, tta={r['tta']}, postprocess={r['postprocess']}; "
          f"{n} test photos, batch {r['batch_size']}, {r['num_workers']} grain workers, {r['rle_threads']} RLE "
          f"threads; "
          f"{r['device_count']} x {r['device_kind']} ({r['platform']}); rounds {r['rounds']} (medians)")
    print(f"compile (untimed warm-up): {r['compile_s']:.1f} s")
    print(f"{'':44s} {'seconds':>8s} {'images/s':>9s} {'ms/image':>9s}")
    print(f"{'end to end (write_submission, streaming)':44s} {r['end_to_end_s']:8.2f} "
          f"{r['end_to_end_images_per_sec']:9.1f} {1e3 * r['end_to_end_s'] / n:9.2f}")
    labels = {"decode": "decode + resize (grain pipeline)",
              "device": "device: predict+upsample+threshold+pack",
              "transfer": "device -> host (packed masks)", "rle": "RLE encode (thread pool)",
              "csv": "CSV write"}
    for key, label in labels.items():
        s = r["stage_s"][key]
        mark = "  <- slowest" if key == r["slowest_stage"] else ""
        if key == "decode":
            mark += f"  (first batch after {r['pipeline_first_batch_s']:.2f} s: start-up)"
        print(f"  {label:42s} {s:8.2f} {n / s:9.1f} {1e3 * s / n:9.2f}{mark}")
    print(f"  {'validate the finished file (after, serial)':42s} {r['validate_s']:8.2f}")
    print(f"overlap: end to end / slowest stage = {r['overlap_ratio']:.2f} (1.00 = perfect)")
    if r["rounds"] > 1:
        print("rounds: " + "; ".join(f"{x['end_to_end_s']:.2f} s end to end, overlap {x['overlap_ratio']:.2f}, "
                                     f"other processes ≤ {x['other_cpus_max']:.2f} CPUs" for x in r["per_round"]))
    q = r["rle_full_mask"]
    print(f"RLE of one 1918x1280 mask ({q['runs']} runs): rle.encode {q['encode_ms']:.2f} ms, "
          f"rle.encode_packed {q['encode_packed_ms']:.2f} ms, straightforward numpy {q['naive_ms']:.2f} ms "
          f"({q['speedup']:.1f}x)")
    c = r["cpu_per_image"]
    print(f"one core, ms per image: decode+resize {c['decode_resize_ms_model_size']:.2f} at the model size, "
          f"{c['decode_resize_ms_cpu_size']:.2f} at {c['cpu_size'][0]}x{c['cpu_size'][1]}; RLE {c['rle_ms']:.2f}; "
          f"CSV row {c['csv_row_ms']:.3f}")
    t = r["torch"]
    if t:
        print(f"device stage against its torch twin ({t['torch_version']} eager, {t['torch_threads']} threads; same "
              f"photos, alternated batch by batch): JAX {t['jax_images_per_sec']:.1f} images/s, torch "
              f"{t['torch_images_per_sec']:.1f} — JAX / torch {t['jax_over_torch']:.2f}x; masks differ on "
              f"{100 * t['differing_pixels']:.4f}% of pixels")
