"""``bench cutout``: cutting a folder of photos out end to end (``cutout.Runner``, as the command runs) against
each of its stages on its own over the same photos.

Stages, each timed alone after an untimed warm-up that compiles the device program:
- prepare: read, decode (at the DCT scale the model needs, and whole for the cut-out) and warp each photo
  (``Cutter.prepare``), in the command's thread pool;
- device: ``Cutter.cut`` on batches of prepared photos (the U-Net, TTA, guided filter, up-sampling to the
  photo's size, threshold, back to the host);
- encode: both PNGs of every photo (``cutter.outputs``), in the same thread pool, and writing them.

With ``clients`` > 0 it also starts the server (``python -m carvana_jax.serve``, a real subprocess on a free
port, its Kaggle-size programs compiled before it listens) and times ``clients`` concurrent clients, each
posting photos of the folder one after another (``requests`` in all): requests/s and each request's latency.
"""
from __future__ import annotations

import concurrent.futures
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from carvana_jax import cutout, cutter, predict
from carvana_jax.data.warp_strip import cpu_name


def _jobs(folder: str, n: int) -> list:
    jobs, _, missing = cutout.expand([folder], None)
    if missing or not jobs:
        raise FileNotFoundError(f"{folder}: no photos to cut out")
    return jobs[:n]


def _read(job) -> bytes:
    with open(job.path, "rb") as f:
        return f.read()


def time_stages(cut, jobs, batch_size: int, threads: int, out_dir: str) -> dict:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        prepared = list(pool.map(lambda j: cut.prepare(_read(j), j.path), jobs))
        prepare_s = time.perf_counter() - start

        start = time.perf_counter()
        results = []
        buckets: dict = {}
        for p in prepared:
            buckets.setdefault(p.bucket, []).append(p)
        for group in buckets.values():
            for i in range(0, len(group), batch_size):
                results.extend(zip(group[i:i + batch_size], cut.cut(group[i:i + batch_size])))
        device_s = time.perf_counter() - start

        def encode(item):
            p, (mask, alpha) = item
            for kind, data in cutter.outputs(mask, alpha, p.photo).items():
                cutout.write_atomic(os.path.join(out_dir, f"{len(data)}_{kind}_{id(p)}.png"), data)

        start = time.perf_counter()
        list(pool.map(encode, results))
        encode_s = time.perf_counter() - start
    return {"prepare": prepare_s, "device": device_s, "encode": encode_s}


def time_end_to_end(cut, jobs, batch_size: int, threads: int, out_dir: str) -> float:
    runner = cutout.Runner(cut, out_dir, overwrite=True, threads=threads, batch_size=batch_size, progress=False)
    start = time.perf_counter()
    runner.run(jobs)
    seconds = time.perf_counter() - start
    if runner.tally.done != len(jobs):
        raise AssertionError(f"cut out {runner.tally.done} of {len(jobs)} photos")
    return seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, data: bytes) -> float:
    """Seconds for one raw-body POST of a photo, its PNG read whole."""
    start = time.perf_counter()
    request = urllib.request.Request(url, data=data, method="POST")
    with urllib.request.urlopen(request, timeout=600) as answer:
        if answer.status != 200 or not answer.read():
            raise AssertionError(f"the server answered {answer.status}")
    return time.perf_counter() - start


def time_server(ckpts, photos: list[bytes], clients: int, requests: int, batch_size: int, tta) -> dict:
    """Requests/s of ``clients`` concurrent clients against a fresh ``carvana_jax.serve`` subprocess."""
    port = _free_port()
    args = [sys.executable, "-m", "carvana_jax.serve", "--port", str(port), "--batch_size", str(batch_size)]
    args += [a for c in ckpts for a in ("--ckpt", c)] + (["--tta", tta] if tta else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        started = time.perf_counter()
        for line in proc.stdout:
            if line.startswith("serving on"):
                break
        else:
            raise RuntimeError(f"the server exited (status {proc.wait()}) before it listened")
        startup_s = time.perf_counter() - started
        url = f"http://127.0.0.1:{port}/api/cutout"
        _post(url, photos[0])  # a first request outside the timing
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            start = time.perf_counter()
            latencies = list(pool.map(lambda i: _post(url, photos[i % len(photos)]), range(requests)))
            seconds = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(60)
    return {"clients": clients, "requests": requests, "seconds": seconds, "requests_per_sec": requests / seconds,
            "latency_median_s": statistics.median(latencies), "latency_max_s": max(latencies),
            "startup_s": startup_s}


def bench_cutout(ckpts, folder: str, *, n: int = 32, batch_size: int = 8, threads: int | None = None,
                 tta: str | None = None, clients: int = 0, requests: int | None = None) -> dict:
    import jax
    _, ensemble, loaded = predict.load_ensemble(ckpts, tta=tta)
    cut = cutter.Cutter(ensemble, batch_size)
    jobs = _jobs(folder, n)
    threads = threads or max(1, min(8, os.cpu_count() or 1))
    scratch = tempfile.mkdtemp(prefix="bench_cutout_")
    try:
        start = time.perf_counter()  # compile for the first photo's size and a full batch (untimed below)
        time_end_to_end(cut, jobs[:batch_size], batch_size, threads, os.path.join(scratch, "warm"))
        compile_s = time.perf_counter() - start
        end_to_end_s = time_end_to_end(cut, jobs, batch_size, threads, os.path.join(scratch, "end_to_end"))
        stages = time_stages(cut, jobs, batch_size, threads, os.path.join(scratch, "stages"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    devices = jax.devices()
    sizes = sorted({cut.prepare(_read(j), j.path, keep_photo=False).full_hw for j in jobs[:4]})
    server = None
    if clients:
        server = time_server(ckpts, [_read(j) for j in jobs], clients, requests or 2 * clients, batch_size, tta)
    return {"benchmark": "cutout", "checkpoints": [[p, s] for p, s in loaded], "server": server,
            "image_sizes": [list(s) for s in ensemble.sizes], "tta": ensemble.tta_name,
            "postprocess": ensemble.postprocess_name, "photos": len(jobs), "photo_sizes": [list(s) for s in sizes],
            "batch_size": batch_size, "threads": threads, "device_kind": devices[0].device_kind,
            "device_count": len(devices), "cpu": cpu_name(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "jax_version": jax.__version__, "compile_s": compile_s,
            "end_to_end_s": end_to_end_s, "end_to_end_images_per_sec": len(jobs) / end_to_end_s,
            "stage_s": stages, "stage_images_per_sec": {k: len(jobs) / v for k, v in stages.items()},
            "slowest_stage": max(stages, key=stages.get)}


def print_table(r: dict) -> None:
    n = r["photos"]
    sizes = ", ".join(f"{h}x{w}" for h, w in r["image_sizes"])
    print(f"cutout: model(s) at {sizes}, tta={r['tta']}, postprocess={r['postprocess']}; {n} photos "
          f"({', '.join(f'{w}x{h}' for h, w in r['photo_sizes'])}), batch {r['batch_size']}, {r['threads']} threads; "
          f"{r['device_count']} x {r['device_kind']}; CPU {r['cpu']} ({r['cpus']})")
    print(f"compile (untimed warm-up): {r['compile_s']:.1f} s")
    print(f"{'':36s} {'seconds':>8s} {'images/s':>9s} {'ms/image':>9s}")
    print(f"{'end to end (cutout.Runner)':36s} {r['end_to_end_s']:8.2f} {r['end_to_end_images_per_sec']:9.1f} "
          f"{1e3 * r['end_to_end_s'] / n:9.1f}")
    labels = {"prepare": "read + decode + warp (thread pool)", "device": "device: cut (batches)",
              "encode": "PNG encode + write (thread pool)"}
    for key, label in labels.items():
        s = r["stage_s"][key]
        mark = "  <- slowest" if key == r["slowest_stage"] else ""
        print(f"  {label:34s} {s:8.2f} {n / s:9.1f} {1e3 * s / n:9.1f}{mark}")
    q = r.get("server")
    if q:
        print(f"server ({q['clients']} concurrent clients, {q['requests']} requests, started in "
              f"{q['startup_s']:.1f} s): {q['requests_per_sec']:.2f} requests/s; latency median "
              f"{q['latency_median_s']:.2f} s, "
              f"max {q['latency_max_s']:.2f} s")
