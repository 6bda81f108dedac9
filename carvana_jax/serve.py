"""A local web service that cuts the car out of photos, with a page to try it in a browser, as ``rembg s`` does.

    python -m carvana_jax.serve --ckpt DIR [--ckpt DIR2 ...] [--host 127.0.0.1] [--port 8000] [--max_upload_mb 25]
                                [--tta hflip] [--postprocess guided] [--threshold T] [--step N]
                                [--batch_size 8] [--max_wait_ms 10]

``GET /``: a page to choose or drop a photo and see its cut-out over a checkerboard, with the mask, soft edges
or a background colour, and download the PNG. ``POST /api/cutout`` (the photo as the multipart field ``file``,
or as the raw body) answers the cut-out PNG at the photo's size, as ``carvana_jax.cutout`` writes it; query
``only_mask=1`` (the 0/255 mask instead), ``soft=1`` (alpha = the probability), ``bgcolor=R,G,B[,A]``.
``GET /api/health``: JSON naming the models. Errors answer JSON ``{"error": "..."}``: 400 for a photo that is
no readable image or a bad query, 413 for one over --max_upload_mb, 404 for an unknown path.

Photos are decoded and their PNGs encoded in request threads; one thread owns the devices and runs the
photos waiting for it in batches of one size (``cutter.Cutter``), waiting at most --max_wait_ms after the
first photo of a batch for more. The programs for the Kaggle photo size are compiled before the server
listens; other sizes compile on first use.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import socket
import threading
import time
from importlib import resources

from absl import flags
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

FLAGS = flags.FLAGS
PAGE = "serve_page.html"
KAGGLE_HW = (1280, 1918)
MB = 1024 * 1024


def define_flags() -> None:
    """The command's flags (defined only when it runs, so importing this module adds none)."""
    flags.DEFINE_multi_string("ckpt", None, "A training workdir, its checkpoints/ folder, or one checkpoint step "
                              "folder; repeat it to average several models' probabilities.", required=True)
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface, reachable from "
                        "other machines).")
    flags.DEFINE_integer("port", 8000, "TCP port to listen on.", lower_bound=1, upper_bound=65535)
    flags.DEFINE_float("max_upload_mb", 25.0, "Largest photo accepted, in MiB (a larger one is answered 413).",
                       lower_bound=0.001)
    flags.DEFINE_integer("step", None, "Checkpoint step to load from each --ckpt workdir (default: the best by val "
                         "Dice, else the latest).")
    flags.DEFINE_string("tta", None, "Test-time augmentation, as eval takes it (default: the first checkpoint's).")
    flags.DEFINE_string("postprocess", None, "Post-processing, as eval takes it (default: the first checkpoint's).")
    flags.DEFINE_float("threshold", None, "Probability above which a pixel is car (default: the first checkpoint's).")
    flags.DEFINE_integer("batch_size", 8, "Most photos of one size run on the devices together.", lower_bound=1)
    flags.DEFINE_float("max_wait_ms", 10.0, "How long the first photo of a batch waits for others of its size "
                       "before the batch runs, in milliseconds.", lower_bound=0.0)


# ---------------------------------------------------------------------------------------------- batching

@dataclasses.dataclass(eq=False)
class _Job:
    prepared: object  # cutter.Prepared
    arrived: float
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


class Batcher:
    """Runs prepared photos through ``cut`` (``Cutter.cut``) on one thread, the only one using the devices:
    the oldest waiting photo with up to ``batch_size - 1`` others of its bucket, once the batch is full or the
    oldest has waited ``max_wait_s``. Photos that queue while a batch runs are batched as soon as it ends."""

    def __init__(self, cut, batch_size: int, max_wait_s: float):
        self._cut, self.batch_size, self.max_wait_s = cut, max(1, batch_size), max_wait_s
        self._cond = threading.Condition()
        self._waiting: list[_Job] = []  # in arrival order
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="devices", daemon=True)
        self._thread.start()

    def submit(self, prepared) -> concurrent.futures.Future:
        """A future of ``prepared``'s (mask, alpha)."""
        job = _Job(prepared, time.monotonic())
        with self._cond:
            if self._stopped:
                raise RuntimeError("the server is shutting down")
            self._waiting.append(job)
            self._cond.notify()
        return job.future

    def stop(self) -> None:
        """Finish the batch running, fail the photos still waiting, end the thread."""
        with self._cond:
            self._stopped = True
            left, self._waiting = self._waiting, []
            self._cond.notify()
        for job in left:
            job.future.set_exception(RuntimeError("the server is shutting down"))
        self._thread.join()

    def _next_batch(self) -> list[_Job] | None:
        with self._cond:
            while not self._stopped:
                if not self._waiting:
                    self._cond.wait()
                    continue
                first = self._waiting[0]
                batch = [j for j in self._waiting if j.prepared.bucket == first.prepared.bucket][:self.batch_size]
                left = first.arrived + self.max_wait_s - time.monotonic()
                if len(batch) == self.batch_size or left <= 0:
                    self._waiting = [j for j in self._waiting if j not in batch]
                    return batch
                self._cond.wait(left)
            return None

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                results = self._cut([job.prepared for job in batch])
            except Exception as e:  # noqa: BLE001 - the requests answer it; the thread keeps serving
                for job in batch:
                    job.future.set_exception(e)
                continue
            for job, result in zip(batch, results):
                job.future.set_result(result)


def warm_up(cut, batch_size: int) -> None:
    """Compile the programs of a Kaggle-size photo, for every batch size ``Cutter.cut`` pads to."""
    import cv2
    import numpy as np
    photo = np.random.default_rng(0).integers(0, 256, (*KAGGLE_HW, 3), dtype=np.uint8)
    prepared = cut.prepare(cv2.imencode(".jpg", photo)[1].tobytes(), "<warm-up photo>", keep_photo=False)
    n = 1
    while True:
        cut.cut([prepared] * n)
        if n >= batch_size:
            break
        n = min(2 * n, batch_size)


# ---------------------------------------------------------------------------------------------- the app

class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _switch(params, name: str) -> bool:
    value = params.get(name, "0").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise HTTPError(400, f"{name} is 0 or 1; got {value!r}")


async def _read_body(request, limit: int) -> bytes:
    """The request's body, refused with 413 past ``limit`` bytes: by its Content-Length before reading any, and
    by what arrives (a chunked or lying client) before keeping more."""
    too_large = HTTPError(413, f"upload larger than --max_upload_mb ({limit / MB:g} MiB)")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _upload(request, limit: int) -> tuple[bytes, str]:
    """(the photo's bytes, its name): the multipart field 'file', else the whole body."""
    body = await _read_body(request, limit)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}
        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=16, max_part_size=limit)
        except Exception as e:  # noqa: BLE001 - starlette's MultiPartException and the parser's own errors
            raise HTTPError(400, f"malformed multipart upload ({e})") from e
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPError(400, "no photo: send it as the multipart field 'file' or as the request body")
        return await upload.read(), upload.filename or "upload"
    return body, "upload"


def create_app(cut, batcher: Batcher, about: dict, max_upload_bytes: int):
    """The FastAPI app over a ``cutter.Cutter`` and the ``Batcher`` running it; ``about`` is /api/health's."""
    from carvana_jax import cutter
    from carvana_jax.errors import DataError

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.stop()  # here, not after uvicorn returns: uvicorn re-raises SIGTERM after its shutdown

    app = FastAPI(title="carvana_jax cut-outs", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("carvana_jax").joinpath(PAGE).read_text(encoding="utf-8")

    @app.exception_handler(HTTPException)
    async def http_error(_request, e: HTTPException):  # 404, 405: the same JSON as every other error
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(HTTPError)
    async def user_error(_request, e: HTTPError):
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(Exception)
    async def server_error(_request, e: Exception):  # the traceback still goes to the log
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/api/health")
    async def health():
        return about

    @app.post("/api/cutout")
    async def cutout(request: Request):
        params = request.query_params
        only_mask, soft = _switch(params, "only_mask"), _switch(params, "soft")
        try:
            bgcolor = cutter.parse_bgcolor(params.get("bgcolor"))
        except ValueError as e:
            raise HTTPError(400, f"bgcolor: {e}") from e
        data, name = await _upload(request, max_upload_bytes)
        if not data:
            raise HTTPError(400, "empty upload: no photo in the request")
        try:
            prepared = await run_in_threadpool(cut.prepare, data, name, not only_mask)
        except DataError as e:
            raise HTTPError(400, str(e)) from e
        mask, alpha = await asyncio.wrap_future(batcher.submit(prepared))
        pngs = await run_in_threadpool(cutter.outputs, mask, alpha, prepared.photo, soft=soft, bgcolor=bgcolor,
                                       only_mask=only_mask)
        return Response(pngs["mask" if only_mask else "cutout"], media_type="image/png")

    return app


def describe(ensemble, loaded, batch_size: int, max_wait_ms: float) -> dict:
    """/api/health's answer: the models and the settings they run with."""
    models = [{"checkpoint": path, "step": int(step), "image_size": list(member.image_size), "fit": member.fit}
              for (path, step), member in zip(loaded, ensemble.members)]
    return {"status": "ok", "models": models, "tta": ensemble.tta_name, "threshold": ensemble.threshold,
            "postprocess": ensemble.postprocess_name, "batch_size": batch_size, "max_wait_ms": max_wait_ms}


def check_address(host: str, port: int) -> None:
    """ConfigError unless the server could listen at host:port (before minutes of loading and compiling)."""
    from carvana_jax.errors import ConfigError
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, port), family=family):  # SO_REUSEADDR, as uvicorn binds
            pass
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or "
                          "--host") from e


def serve(ckpts, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 25.0, step=None, tta=None,
          postprocess=None, threshold=None, batch_size: int = 8, max_wait_ms: float = 10.0) -> None:
    """Load the models, compile them for Kaggle photos and serve until SIGINT or SIGTERM."""
    check_address(host, port)  # before importing jax, too
    import uvicorn

    from carvana_jax import cutter, predict
    _, ensemble, loaded = predict.load_ensemble(ckpts, step, None, threshold, tta, postprocess)
    cut = cutter.Cutter(ensemble, batch_size)
    warm_up(cut, batch_size)
    batcher = Batcher(cut.cut, batch_size, max_wait_ms / 1000.0)
    about = describe(ensemble, loaded, batch_size, max_wait_ms)
    app = create_app(cut, batcher, about, int(max_upload_mb * MB))
    models = ", ".join(f"{path} step {at}" for path, at in loaded)
    where = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # listening: say where, once
                print(f"serving on {where} (models: {models})", flush=True)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down on
        pass
    finally:
        batcher.stop()


def main(argv) -> None:
    from carvana_jax import cli
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {argv[1:]} (photos are sent to the server, not named here)")
    with cli.friendly_errors():
        serve(FLAGS.ckpt, FLAGS.host, FLAGS.port, FLAGS.max_upload_mb, FLAGS.step, FLAGS.tta, FLAGS.postprocess,
              FLAGS.threshold, FLAGS.batch_size, FLAGS.max_wait_ms)


if __name__ == "__main__":
    from carvana_jax import cli
    define_flags()
    cli.run(main)
