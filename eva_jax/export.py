"""`python -m eva_jax.export`: kept as an alias of `python -m eva_jax.cli.export` (eva-export)."""
if __name__ == '__main__':
  from eva_jax.cli.export import run
  run()
