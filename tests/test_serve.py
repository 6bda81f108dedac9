"""The web service as a user meets it: a real server process, its answers pixel-equal to the in-process
cut-outs (alone and under concurrent load), its errors, and its page in a real headless browser."""
import concurrent.futures
import glob
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

from carvana_jax import cutter, predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BATCH = 4
MAX_UPLOAD_MB = 1  # the synthetic photos are ≈ 0.2 MB


@pytest.fixture(scope="module")
def workdir(two_update_run):
    """conftest's 2-update 32×48 depth-2 U-Net (read only)."""
    return two_update_run["workdir"]


@pytest.fixture(scope="module")
def photos(kaggle_dir_few):
    """{name: bytes}: three Kaggle test JPEGs (1918×1280) and a PNG of another size (a bucket of its own)."""
    paths = sorted(glob.glob(os.path.join(kaggle_dir_few, "test", "*.jpg")))[:3]
    out = {}
    for path in paths:
        with open(path, "rb") as f:
            out[os.path.basename(path)] = f.read()
    small = cv2.resize(cv2.imread(paths[0]), (640, 427), interpolation=cv2.INTER_AREA)
    out["small.png"] = cv2.imencode(".png", small)[1].tobytes()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(workdir, tmp_path_factory):
    """The base URL of ``python -m carvana_jax.serve`` on the checkpoint, stopped by SIGTERM afterwards (and
    checked to have stopped cleanly)."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "carvana_jax.serve", "--ckpt", workdir, "--port", str(port),
                                 "--max_upload_mb", str(MAX_UPLOAD_MB), "--batch_size", str(BATCH),
                                 "--max_wait_ms", "50"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while "serving on" not in log_path.read_text():
            assert proc.poll() is None, f"the server exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"the server did not start:\n{log_path.read_text()}"
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    assert proc.returncode in (0, 128 + signal.SIGTERM), text  # stopped as asked, through every finally block
    assert "Traceback" not in text, text
    started = [line for line in text.splitlines() if line.startswith("serving on")]
    assert started == [f"serving on {url} (models: {os.path.join(workdir, 'checkpoints')} step 2)"], text


def _multipart(data: bytes, name: str) -> tuple[bytes, str]:
    boundary = "carvana-test-boundary-7f3a"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _request(url: str, path: str, data: bytes | None = None, name: str = "photo.jpg", multipart: bool = True):
    """(status, content type, body) of a GET (no data) or POST."""
    headers = {}
    if data is not None and multipart:
        data, headers["Content-Type"] = _multipart(data, name)
    req = urllib.request.Request(url + path, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as answer:
            return answer.status, answer.headers.get_content_type(), answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get_content_type(), e.read()


def _png(body: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)


QUERIES = {"": "cutout", "?only_mask=1": "mask", "?soft=1": "cutout", "?bgcolor=0,128,255": "cutout"}


@pytest.fixture(scope="module")
def expected(workdir, photos):
    """{(photo name, query): decoded PNG} as the Cutter API makes them in this process."""
    _, ensemble, _ = predict.load_ensemble([workdir])
    cut = cutter.Cutter(ensemble, BATCH)
    out = {}
    for name, data in photos.items():
        prepared = cut.prepare(data, name)
        [(mask, alpha)] = cut.cut([prepared])
        for query, kind in QUERIES.items():
            pngs = cutter.outputs(mask, alpha, prepared.photo, soft="soft" in query,
                                  bgcolor=cutter.parse_bgcolor(query.partition("bgcolor=")[2]),
                                  only_mask=kind == "mask")
            out[name, query] = _png(pngs[kind])
    return out


def test_health_names_the_model(server, workdir):
    status, kind, body = _request(server, "/api/health")
    assert status == 200 and kind == "application/json"
    about = json.loads(body)
    assert about["models"] == [{"checkpoint": os.path.join(workdir, "checkpoints"), "step": 2,
                                "image_size": [32, 48], "fit": "resize"}]
    assert about["tta"] and about["postprocess"] and about["batch_size"] == BATCH


@pytest.mark.parametrize("query", list(QUERIES))
def test_an_answer_is_the_cut_out_the_library_makes(server, photos, expected, query):
    for name in ("small.png", sorted(photos)[0]):
        status, kind, body = _request(server, "/api/cutout" + query, photos[name], name)
        assert (status, kind) == (200, "image/png"), body[:300]
        np.testing.assert_array_equal(_png(body), expected[name, query])


def test_the_raw_photo_as_the_body_is_cut_out_too(server, photos, expected):
    name = sorted(photos)[1]
    status, _, body = _request(server, "/api/cutout?soft=1", photos[name], multipart=False)
    assert status == 200
    np.testing.assert_array_equal(_png(body), expected[name, "?soft=1"])


def test_concurrent_requests_are_each_answered_as_alone(server, photos, expected):
    names = sorted(photos)
    jobs = [(names[i % len(names)], list(QUERIES)[i % 3]) for i in range(32)]

    def ask(job):
        name, query = job
        return _request(server, "/api/cutout" + query, photos[name], name)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (name, query), (status, _, body) in zip(jobs, answers):
        assert status == 200, body[:300]
        np.testing.assert_array_equal(_png(body), expected[name, query])


def _error(status, kind, body) -> tuple[int, str]:
    assert kind == "application/json", body[:300]
    return status, json.loads(body)["error"]


def test_errors_are_json_and_the_server_keeps_serving(server, photos, expected):
    jpeg = photos[sorted(photos)[0]]
    status, message = _error(*_request(server, "/api/cutout", b"just some text\n", "notes.txt"))
    assert status == 400 and "notes.txt" in message and "not an image" in message
    status, message = _error(*_request(server, "/api/cutout", jpeg[: len(jpeg) // 2], "cut.jpg"))
    assert status == 400 and "cut.jpg" in message and "truncated" in message
    status, message = _error(*_request(server, "/api/cutout?bgcolor=red", jpeg))
    assert status == 400 and "bgcolor" in message
    status, message = _error(*_request(server, "/api/cutout?only_mask=2", jpeg))
    assert status == 400 and "only_mask" in message
    assert _error(*_request(server, "/api/cutout", b"", multipart=False))[0] == 400
    assert _error(*_request(server, "/nothing/here"))[0] == 404
    status, _, body = _request(server, "/api/health")
    assert status == 200 and json.loads(body)["models"]
    status, _, body = _request(server, "/api/cutout", jpeg)
    assert status == 200
    np.testing.assert_array_equal(_png(body), expected[sorted(photos)[0], ""])


def _post_large(url: str, size: int, chunked: bool) -> tuple[int, str]:
    """POST ``size`` bytes, announced by Content-Length or sent chunked without it: (status, error)."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    data = os.urandom(size)
    try:
        if chunked:  # no Content-Length: the server must count what arrives
            conn.request("POST", "/api/cutout", body=(data[i:i + 65536] for i in range(0, size, 65536)),
                         encode_chunked=True)
        else:
            conn.request("POST", "/api/cutout", body=data)
    except (BrokenPipeError, ConnectionResetError):  # it may answer and close before reading it all
        pass
    answer = conn.getresponse()
    try:
        return answer.status, json.loads(answer.read())["error"]
    finally:
        conn.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content_length", "chunked"])
def test_an_upload_over_the_limit_is_413(server, photos, chunked):
    status, message = _post_large(server, 2 * 1024 * 1024, chunked)
    assert status == 413 and "max_upload_mb" in message
    assert _request(server, "/api/cutout", photos["small.png"], "small.png")[0] == 200


def test_a_busy_port_is_a_one_line_error_before_any_loading(server, workdir):
    port = server.rpartition(":")[2]
    proc = subprocess.run([sys.executable, "-m", "carvana_jax.serve", "--ckpt", workdir, "--port", port], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}")


# ---------------------------------------------------------------------------------------------- the page

def _browser(profile_dir):
    """A headless chromium under Selenium; skipped (failed where CARVANA_REQUIRE_BROWSER is set, as in CI) when
    Debian's chromium and chromium-driver are not installed."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        reason = f"{', '.join(missing)} absent (apt-get install chromium chromium-driver)"
        if os.environ.get("CARVANA_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000", f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


SHOWN = """const img = document.getElementById('cutout');
return [img.complete ? img.naturalWidth : 0, document.getElementById('download').download,
        document.getElementById('status').textContent];"""


def test_the_page_cuts_out_a_chosen_photo_and_offers_it_for_download(server, kaggle_dir_few, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    photo = sorted(glob.glob(os.path.join(kaggle_dir_few, "test", "*.jpg")))[0]
    stem = os.path.splitext(os.path.basename(photo))[0]
    driver = _browser(tmp_path / "chromium_profile")
    try:
        driver.get(server + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "step 2" in d.find_element(By.ID, "models").text)
        driver.find_element(By.ID, "file").send_keys(photo)
        width, download, status = wait.until(lambda d: (shown := d.execute_script(SHOWN))[0] and shown)
        assert (width, download) == (1918, f"{stem}.png"), status
        assert "1918×1280" in status and "error" not in status
        assert driver.find_element(By.ID, "download").get_attribute("href").startswith("blob:")
        driver.find_element(By.ID, "only_mask").click()  # a toggle asks again: the mask, named so
        wait.until(lambda d: d.execute_script(SHOWN)[1] == f"{stem}_mask.png" and d.execute_script(SHOWN)[0] == 1918)
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()
