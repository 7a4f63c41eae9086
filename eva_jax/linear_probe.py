"""`python -m eva_jax.linear_probe`: kept as an alias of `python -m eva_jax.cli.linear_probe` (eva-linear-probe)."""
if __name__ == '__main__':
  from eva_jax.cli.linear_probe import run
  run()
