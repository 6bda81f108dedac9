"""Shared command-line plumbing: the --config/--workdir flags, absl start-up, one-line errors.

Importing it imports neither jax nor the modules that do, so light commands (score, launch) start in
a fraction of a second; what needs them imports them when it runs."""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import sys

from absl import app, flags, logging

from carvana_jax import errors, stopping

FLAGS = flags.FLAGS


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions whose message tells a user what to fix."""
    return errors.USER_ERRORS


def define_config_flags(default_config: str | None = "configs/demo.py") -> None:
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", default_config, "Config file (get_config()); override keys with "
                                    "--config.KEY=VALUE.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl and plots go "
                        "(default: workdirs/<config name>).")


def define_distributed_flags() -> None:
    """Where this process stands in a multi-process run; unset, the environment or the cluster (SLURM,
    Open MPI) says, and without either the run is one process."""
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, which every process connects to "
                        "(multi-process runs; default: $JAX_COORDINATOR_ADDRESS or the cluster's).")
    flags.DEFINE_integer("num_processes", None, "Processes in the run, one per host or per GPU "
                         "(default: $JAX_NUM_PROCESSES or the cluster's; none: one process).", lower_bound=1)
    flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1 "
                         "(default: $JAX_PROCESS_ID or the cluster's).", lower_bound=0)
    flags.DEFINE_integer("coordinator_timeout", 300, "Seconds to wait for every process to connect.", lower_bound=1)


def initialize_distributed() -> bool:
    """Join the other processes of the run if there are any (the flags above, else the environment)."""
    from carvana_jax import distributed
    return distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                  FLAGS.coordinator_timeout)


def workdir_for(config, workdir: str | None) -> str:
    if workdir:
        return workdir
    name = os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0]
    return os.path.join("workdirs", name)


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO)


@contextlib.contextmanager
def friendly_errors():
    """Turn the errors a user can fix into one line on stderr and exit status 1: ours, and a file that
    cannot be written (a full disk or quota, a read-only folder), named."""
    try:
        yield
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        print(f"error: cannot write {e.filename or 'a file'}: {e.strerror}", file=sys.stderr)
        sys.exit(1)


def enable_compilation_cache(directory: str | None = None) -> None:
    """Keep compiled XLA programs on disk, so training, evaluation and reruns compile each once.

    Before jax is imported, jax's own environment variables say it (and reach child processes too);
    after, its config does."""
    directory = directory or os.environ.get("CARVANA_JAX_CACHE",
                                            os.path.join(os.path.expanduser("~"), ".cache", "carvana_jax", "xla"))
    settings = {"jax_compilation_cache_dir": directory, "jax_persistent_cache_min_compile_time_secs": 0.5}
    if "jax" in sys.modules:
        for key, value in settings.items():
            sys.modules["jax"].config.update(key, value)
    else:
        os.environ.update({key.upper(): str(value) for key, value in settings.items()})


def run(main, needs_config: bool = False, distributed: bool = False) -> None:
    """absl.app.run (grain's worker processes read absl flags), quieter logs, config flags if asked
    and the multi-process flags if asked (made key flags of the main module, so that --help lists them)."""
    names = []
    if needs_config:
        define_config_flags()
        names += ["config", "workdir"]
    if distributed:
        define_distributed_flags()
        names += ["coordinator_address", "num_processes", "process_id", "coordinator_timeout"]
    for name in names:
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])  # absl's name for the main module
    logging.set_verbosity(logging.WARNING)
    # grain's workers leave a few prefetched elements in shared memory at shutdown; multiprocessing's
    # resource tracker (a child process, hence the environment variable) frees them and need not warn.
    os.environ.setdefault("PYTHONWARNINGS", "ignore:resource_tracker:UserWarning")
    enable_compilation_cache()
    stopping.exit_on_sigterm()
    app.run(functools.partial(_interruptible, main), flags_parser=_parse_flags)


def _interruptible(main, argv):
    """``main``, with a stop signal it did not handle itself said in one line instead of a traceback (the
    ``finally`` blocks on the way out have stopped its worker processes); exit status 128 + the signal."""
    try:
        return main(argv)
    except KeyboardInterrupt:  # on a line of its own, after any progress bar
        print("\ninterrupted (SIGINT)", file=sys.stderr)
        sys.exit(130)
    except stopping.Interrupted as e:
        print(f"\nstopped ({stopping.signal_name(e.code - 128)})", file=sys.stderr)
        raise


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad flag or config override reported as one line rather than a traceback."""
    try:
        return FLAGS(argv)
    except SystemExit:  # absl's --help prints the usage and exits 1; asking for help is no failure
        if any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections' override errors
        words = re.sub(r"\\n|\\'|[\\'\"]", " ", str(e)).split()
        message = "bad --config override: " + " ".join(words)
    print(f"error: {message}\nRun with --help for the flags.", file=sys.stderr)
    sys.exit(2)
