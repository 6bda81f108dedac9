"""Joining JAX's distributed runtime when a run is one of several processes (hosts, or GPUs of a host).

Where the run's place comes from, first found wins:
  1. the train command's flags --coordinator_address HOST:PORT --num_processes N --process_id I;
  2. the environment JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (what ``carvana_jax.launch`` sets);
  3. a cluster JAX recognises by itself: SLURM under srun, Open MPI (mpirun), with more than one task.
Otherwise the run is one process and nothing happens. Every process then sees every process's devices in
``jax.devices()``; parallel.py builds one mesh over them and each process feeds its share of every batch.
"""
from __future__ import annotations

import os
import socket
import time

from carvana_jax.errors import DistributedError

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def _cluster_task_count() -> int:
    """Tasks of the SLURM step (srun) or Open MPI world this process is one of; 1 outside both."""
    if "SLURM_STEP_NODELIST" in os.environ and "SLURM_PROCID" in os.environ:  # inside srun, not just sbatch
        return _env_int("SLURM_NTASKS") or 1
    return _env_int("OMPI_COMM_WORLD_SIZE") or 1


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise DistributedError(f"--coordinator_address must be HOST:PORT, got {address!r}") from None


def _check_port_free(address: str) -> None:
    """Process 0 serves on the coordinator's port: say so in one line if something else holds it."""
    _, port = _host_port(address)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise DistributedError(f"process 0 cannot serve the coordinator on port {port}: {e.strerror}; "
                                   "choose another port in --coordinator_address") from None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Wait until process 0's coordinator accepts connections. JAX itself aborts the whole process with a
    page of gRPC detail when it cannot connect, so the usual failure is caught here first, in one line."""
    host, port = _host_port(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(f"cannot reach the coordinator {address} (process 0) within {timeout_s:g} s: "
                                       f"{e.strerror or e}; is process 0 running, and its port open to this host?"
                                       ) from None
            time.sleep(0.5)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> bool:
    """Join the distributed runtime if this run is one of several processes; False if it runs alone.

    Call it before anything touches a device (jax.devices(), an array, a jit): JAX fixes the device
    list the first time it is asked.
    """
    import jax
    address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
    count = num_processes if num_processes is not None else _env_int(ENV_COUNT)
    index = process_id if process_id is not None else _env_int(ENV_ID)
    if count is None and index is None and address is None:
        if _cluster_task_count() <= 1:
            return False
        where = "the cluster's environment (SLURM or Open MPI)"
    else:
        if count is None or count < 1:
            raise DistributedError("a multi-process run needs --num_processes N (N ≥ 1) with --process_id "
                                   "and --coordinator_address")
        if count == 1 and index in (None, 0):
            return False
        if index is None or not 0 <= index < count:
            raise DistributedError(f"--process_id must be one of 0..{count - 1} for {count} processes, got {index}")
        if not address or ":" not in address:
            raise DistributedError(f"--coordinator_address must be HOST:PORT (process 0's host), got {address!r}")
        where = f"coordinator {address}"
    if jax.distributed.is_initialized():
        return True
    if address is not None and index == 0:  # (a cluster's own detection finds the address itself)
        _check_port_free(address)
    elif address is not None and index is not None:
        _wait_for_coordinator(address, timeout_s)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives between processes
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index,
                                   initialization_timeout=timeout_s)
    except Exception as e:  # jax raises RuntimeError or XlaRuntimeError with a page of gRPC detail
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DistributedError(
            f"could not join the other processes through {where} within {timeout_s} s "
            f"(is process 0 running and its port reachable from here? {first[:200]})") from e
    return True
