"""`python -m eva_jax.benchmark` = eva-benchmark."""
from eva_jax.cli.benchmark import run

run()
