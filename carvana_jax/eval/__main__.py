from absl import flags

from carvana_jax import cli, evaluation

__doc__ = evaluation.__doc__  # absl's --help prints the main module's docstring as the usage
evaluation.define_flags()
flags.adopt_module_key_flags(evaluation)  # and lists the main module's flags, defined over there
cli.run(evaluation.main)
