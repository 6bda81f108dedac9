"""A ``jax.profiler`` trace of chosen training updates, on request: ``profile_steps = "START:STOP"`` traces
updates START+1 … STOP into ``workdir/profile/`` (TensorBoard's profile tab, or Perfetto: ui.perfetto.dev opens
the ``*.trace.json.gz`` under ``profile/plugins/profile/<run>/``)."""
from __future__ import annotations

import os

from carvana_jax.errors import ConfigError


def parse_window(text: str) -> tuple[int, int] | None:
    """'START:STOP' as (START, STOP) with 0 ≤ START < STOP; '' as None."""
    if not text:
        return None
    try:
        start, stop = (int(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"profile_steps must be 'START:STOP' (updates, e.g. '10:15'), got {text!r}") from None
    if not 0 <= start < stop:
        raise ConfigError(f"profile_steps {text!r}: START must be ≥ 0 and below STOP")
    return start, stop


def profile_dir(workdir: str) -> str:
    return os.path.join(workdir, "profile")


class ProfileWindow:
    """Starts the trace before update START+1 and stops it once update STOP's work is done."""

    def __init__(self, text: str, workdir: str):
        self.window = parse_window(text)
        self.logdir = profile_dir(workdir)
        self.active = False

    def before_update(self, update: int) -> None:
        """``update``: the updates done so far."""
        if self.window and update == self.window[0]:
            import jax
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after_update(self, update: int, state) -> None:
        if self.active and update >= self.window[1]:
            self.stop(state)

    def stop(self, state=None) -> None:
        if self.active:
            import jax
            if state is not None:
                jax.block_until_ready(state)  # the traced updates' device work, not only their dispatch
            jax.profiler.stop_trace()
            self.active = False
