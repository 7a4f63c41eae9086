"""`python -m eva_jax.plot`: kept as an alias of `python -m eva_jax.cli.plot` (eva-plot)."""
if __name__ == '__main__':
  from eva_jax.cli.plot import run
  run()
