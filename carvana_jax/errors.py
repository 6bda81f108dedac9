"""The errors a user can fix, in one place: each message names the file, key or process and what to do, and
the commands print it as one line (``cli.friendly_errors``) instead of a traceback. A leaf module: it imports
nothing of ours, so any layer may raise these."""
from __future__ import annotations


class DataError(Exception):
    """Bad or missing input data; the message names the file and what to do."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


class CheckpointError(Exception):
    """A checkpoint that is missing or does not fit the model; the message says which and why."""


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint whose files cannot be read back (truncated, corrupt, half-deleted)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"checkpoint {path} is unreadable ({reason})")


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk or quota, a read-only folder); the ones before it
    are intact, and nothing of the failed one is left that looks like a checkpoint."""


class PretrainedError(CheckpointError):
    """A model.pretrained file that is missing, unreadable or of another architecture; the message names it."""


class DistributedError(Exception):
    """The processes of a run could not find each other; the message says what to check."""


class WorkdirBusy(Exception):
    """Another live run holds the workdir."""


class DeviceOutOfMemory(Exception):
    """A training step did not fit in a device's memory; the message gives the estimate and what shrinks it."""


class NonFiniteLossError(Exception):
    """The loss became NaN or inf; the last good checkpoint is left as it was."""


USER_ERRORS = (DataError, ConfigError, CheckpointError, DistributedError, WorkdirBusy, DeviceOutOfMemory,
               NonFiniteLossError)
