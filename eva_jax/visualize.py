"""`python -m eva_jax.visualize`: kept as an alias of `python -m eva_jax.cli.visualize` (eva-visualize)."""
if __name__ == '__main__':
  from eva_jax.cli.visualize import run
  run()
