"""One process of a multi-process training run, for test_distributed.py (started by carvana_jax.launch):

    python tests/distributed_worker.py CONFIG.json WORKDIR STOP_AFTER

Trains with plain SGD (``sgd_optimizer``), so that runs on different device counts differ only as much as
their gradients do (Adam turns the float noise of near-zero gradients into ±learning-rate steps).
"""
import json
import sys

import optax


def sgd_optimizer(config):
    """Stands in for optim.create_optimizer: SGD at ``config.learning_rate``, accumulated like the real one."""
    return optax.MultiSteps(optax.sgd(config.learning_rate), every_k_schedule=config.grad_accum_steps)


def main(config_path: str, workdir: str, stop_after: int) -> None:
    from carvana_jax import distributed
    distributed.initialize()  # from the launcher's JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
    import ml_collections
    from absl import flags

    from carvana_jax import optim, train
    flags.FLAGS.mark_as_parsed()  # grain reads absl flags
    optim.create_optimizer = sgd_optimizer
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    config.image_size = tuple(config.image_size)
    train.train_and_evaluate(config, workdir, stop_after=stop_after, progress=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
