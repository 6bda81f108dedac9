"""``python -m carvana_jax.eval``: the command of carvana_jax/evaluation.py (a package, so that no module of
ours is named after the builtin it would shadow for its importers)."""
