"""One training run per workdir: an exclusive lock on WORKDIR/.lock for as long as the run lives.

The lock is the kernel's (``flock``), so it goes when the process that holds it goes — a crashed or
``kill -9``-ed run leaves nothing to clean up — and the file names the holder, so a second run can say
which process to wait for or stop."""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time

from carvana_jax.errors import WorkdirBusy

LOCK_NAME = ".lock"


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 200).decode(errors="replace").strip()
    return text or "a process that has not written its name yet"


@contextlib.contextmanager
def held(workdir: str):
    """Hold ``workdir``'s lock inside the block; WorkdirBusy naming the holder if a live run has it."""
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(os.path.join(workdir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise WorkdirBusy(f"{workdir} is in use by another run ({holder}); wait for it or stop it, "
                          "or train in another --workdir") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the last descriptor of it releases the lock
