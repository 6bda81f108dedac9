"""Start N local processes of one command as one distributed JAX run (multi-process training on one machine).

    python -m carvana_jax.launch --num_processes 2 --devices_per_process 2 -- \\
        python -m carvana_jax.train --config configs/demo.py --workdir workdirs/demo2

Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES and JAX_PROCESS_ID, which
carvana_jax.distributed reads, and its devices: JAX_NUM_CPU_DEVICES on CPU, its own CUDA_VISIBLE_DEVICES on GPU.
Their output is forwarded line by line, prefixed with the process index. When one process fails, the others are
stopped (they would wait for it forever in the next collective) and the launcher exits with its status. SIGTERM
or Ctrl-C is passed on to every process (training saves the update in flight, the same one everywhere, and
exits); a second one stops them at once, and so does the end of ``--stop_grace`` seconds after the first process
has ended (one that failed while the others saved would leave them waiting for it in a collective forever).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import flags

from carvana_jax.distributed import ENV_ADDRESS, ENV_COUNT, ENV_ID

flags.DEFINE_integer("num_processes", 2, "Processes to start.", lower_bound=1)
flags.DEFINE_integer("devices_per_process", 1, "CPU devices (or GPUs) each process gets.", lower_bound=1)
flags.DEFINE_enum("platform", "auto", ["auto", "cpu", "gpu"], "cpu: JAX_NUM_CPU_DEVICES per process; gpu: "
                  "CUDA_VISIBLE_DEVICES per process; auto: gpu where nvidia-smi lists GPUs.")
flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one).", lower_bound=0)
flags.DEFINE_float("timeout", 0, "Stop every process and exit 124 after this many seconds (0: never).", lower_bound=0)
flags.DEFINE_float("stop_grace", 120, "After a stop signal, seconds the processes still running may take once one "
                   "has ended, before they are stopped.", lower_bound=0)
FLAGS = flags.FLAGS

GRACE_S = 10  # between SIGTERM and SIGKILL when stopping the others


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def process_env(index: int, count: int, port: int, devices: int, platform: str, base: dict | None = None) -> dict:
    """The environment of process ``index`` of ``count``."""
    env = dict(os.environ if base is None else base)
    env.update({ENV_ADDRESS: f"127.0.0.1:{port}", ENV_COUNT: str(count), ENV_ID: str(index), "PYTHONUNBUFFERED": "1"})
    if platform == "gpu":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in range(index * devices, (index + 1) * devices))
    else:
        env.update({"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)})
    return env


def _forward(stream, prefix: bytes, lock: threading.Lock) -> None:
    """Copy a child's output to ours, each line (or \\r-refreshed progress line) prefixed."""
    out = sys.stdout.buffer
    pending = b""
    while chunk := stream.read1(65536):
        pending += chunk
        while True:
            cut = min((i for i in (pending.find(b"\n"), pending.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            content, separator = pending[:cut], pending[cut:cut + 1]
            with lock:
                out.write((prefix + content if content else b"") + separator)
                out.flush()
            pending = pending[cut + 1:]
    if pending:
        with lock:
            out.write(prefix + pending + b"\n")
            out.flush()


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every running process's group, then SIGKILL what is left after GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + GRACE_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)


def log(message: str) -> None:
    print(f"launch: {message}", file=sys.stderr, flush=True)


class StopRequests:
    """Stop signals received by the launcher (SIGTERM from a scheduler, SIGINT from Ctrl-C), in order."""

    def __init__(self):
        self.received: list[int] = []

    def handle(self, signum, frame) -> None:
        del frame
        self.received.append(signum)


def launch(command: list[str], num_processes: int, devices_per_process: int = 1, platform: str = "cpu",
           port: int = 0, timeout: float = 0, stops: StopRequests | None = None, stop_grace: float = 120) -> int:
    """Run ``command`` as ``num_processes`` processes; 0 when all succeed, else the first failure's status.

    A first stop signal in ``stops`` is passed on to every process, which then finish as they choose
    (training saves the update in flight and exits): the launcher waits for them and exits with the first
    non-zero status among theirs. A second stops them at once; so does the end of ``stop_grace`` seconds after
    the first of them has ended (then the status is the first failure's, or 128 + SIGTERM)."""
    port = port or free_port()
    stops = stops or StopRequests()
    lock = threading.Lock()
    procs, threads = [], []
    passed_on = False
    first_end = None  # when the first process ended after a stop was passed on
    try:
        for i in range(num_processes):
            env = process_env(i, num_processes, port, devices_per_process, platform)
            try:
                p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # its own group, so stopping it stops its workers
            except OSError as e:
                log(f"cannot start {command[0]!r}: {e.strerror}")
                return 127
            procs.append(p)
            t = threading.Thread(target=_forward, args=(p.stdout, f"[{i}] ".encode(), lock), daemon=True)
            t.start()
            threads.append(t)
        start = time.monotonic()
        while True:
            if len(stops.received) > 1:
                _stop(procs)
                log(f"{signal.Signals(stops.received[-1]).name} again: stopped all {num_processes} processes")
                return 128 + stops.received[-1]
            if stops.received and not passed_on:
                passed_on = _pass_on(procs, stops.received[0])
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed and not passed_on:
                i, code = failed[0]
                _stop(procs)
                log(f"process {i} exited with status {code}; stopped the other {num_processes - 1}")
                return _status(code)
            if all(c is not None for c in codes):
                return _status(failed[0][1]) if failed else 0
            if passed_on and any(c is not None for c in codes):
                first_end = first_end or time.monotonic()
                if time.monotonic() - first_end > stop_grace:
                    running = [i for i, c in enumerate(codes) if c is None]
                    _stop(procs)
                    log(f"process(es) {', '.join(map(str, running))} still running {stop_grace:g} s after the first "
                        "ended; stopped them")
                    return _status(failed[0][1]) if failed else 128 + signal.SIGTERM
            if timeout and time.monotonic() - start > timeout:
                _stop(procs)
                log(f"timed out after {timeout:g} s; stopped all {num_processes} processes")
                return 124
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(procs)
        log("interrupted; stopped all processes")
        return 130
    finally:
        _stop(procs)
        for t in threads:
            t.join(timeout=5)


def _status(code: int) -> int:
    """A child's exit status as a shell reports it: killed by signal N is 128 + N."""
    return code if code > 0 else 128 - code


def _pass_on(procs: list[subprocess.Popen], signum: int) -> bool:
    """Send ``signum`` to every running process (not to their groups: their workers are theirs to stop)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)
    log(f"{signal.Signals(signum).name}: passed on to the processes; waiting for them to finish "
        "(again to stop them at once)")
    return True


def main(argv: list[str]) -> None:
    command = argv[1:]
    if not command:
        print("error: nothing to launch; put the command after --, e.g.\n  python -m carvana_jax.launch "
              "--num_processes 2 -- python -m carvana_jax.train --config configs/demo.py", file=sys.stderr)
        sys.exit(2)
    platform = FLAGS.platform
    if platform == "auto":
        platform = "gpu" if gpu_count() else "cpu"
    if platform == "gpu" and (have := gpu_count()) < FLAGS.num_processes * FLAGS.devices_per_process:
        print(f"error: {FLAGS.num_processes} processes × {FLAGS.devices_per_process} GPUs need "
              f"{FLAGS.num_processes * FLAGS.devices_per_process} GPUs; nvidia-smi lists {have}", file=sys.stderr)
        sys.exit(2)
    stops = StopRequests()
    for signum in (signal.SIGTERM, signal.SIGINT):  # a scheduler's stop, or Ctrl-C, reaches every process
        signal.signal(signum, stops.handle)
    sys.exit(launch(command, FLAGS.num_processes, FLAGS.devices_per_process, platform, FLAGS.port, FLAGS.timeout,
                    stops, FLAGS.stop_grace))


if __name__ == "__main__":
    from carvana_jax import cli
    cli.run(main)
