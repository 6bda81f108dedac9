"""Benchmarks: ``python -m carvana_jax.bench train|pipeline|predict|cutout`` (results and how to reproduce them:
BENCHMARKS.md). A leaf: nothing in the library imports it."""
