"""`python -m eva_jax.pretrain`: kept as an alias of `python -m eva_jax.cli.pretrain` (eva-pretrain)."""
if __name__ == '__main__':
  from eva_jax.cli.pretrain import run
  run()
